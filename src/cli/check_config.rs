//! `fleetgw check-config`: load the config exactly as the daemon would and show the result.
//!
//! Prints the effective configuration (main file + `config.d/*.toml` + `--set` overrides,
//! relative paths resolved, secrets `[redacted]`) on stdout and exits 0, or prints the one
//! error line `SOURCE: key.path: what is wrong` on stderr and exits 78 (EX_CONFIG), so it can
//! gate a deployment (`ExecStartPre=`, a package script or CI).

use std::io::Write as _;
use std::process::ExitCode;

use crate::config;

use super::{ConfigArgs, EX_CONFIG, EX_IOERR};

/// Arguments of `fleetgw check-config`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The config file and `--set` overrides.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// Runs `fleetgw check-config`.
pub fn run(args: Args) -> ExitCode {
    let config = match config::load(&args.config.config, &args.config.overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let mut out = String::from("# fleetgw effective configuration (secrets redacted)\n");
    for source in config.sources() {
        out.push_str(&format!("# from {source}\n"));
    }
    out.push('\n');
    out.push_str(&config.to_redacted_toml());
    // A closed stdout (`| head`) is not a config error; report it without panicking.
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetgw check-config: cannot write to stdout: {e}");
            ExitCode::from(EX_IOERR)
        }
    }
}
