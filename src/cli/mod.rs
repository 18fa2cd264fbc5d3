//! The `fleetgw` command line: argv -> one subcommand -> exit code.
//!
//! Each subcommand lives in its own file with its `Args` struct and a `run` function that
//! returns the process exit code. Logging is set up here, once, before any command runs.

pub(crate) mod admin_client;
mod bench;
mod check_config;
mod cloud;
mod csr;
mod demo;
mod devices;
mod emulate;
mod logging;
mod passwd;
mod reload;
mod run;
mod service;
mod simulate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub use logging::LogFormat;

/// Exit code for a configuration error (sysexits.h EX_CONFIG).
pub const EX_CONFIG: u8 = 78;
/// Exit code for bad command-line usage or input (sysexits.h EX_USAGE / EX_DATAERR).
pub const EX_USAGE: u8 = 64;
/// Exit code when a required file cannot be read or written (sysexits.h EX_IOERR).
pub const EX_IOERR: u8 = 74;
/// Exit code for an internal failure (sysexits.h EX_SOFTWARE).
pub const EX_SOFTWARE: u8 = 70;

/// fleetgw — fleet provisioning gateway.
#[derive(Debug, Parser)]
#[command(name = "fleetgw", version, about, long_about = None)]
pub struct Cli {
    /// Log output format: text or json (overrides `log.format` in the config).
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

/// The config file and `--set` overrides, shared by every command that reads a config.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Main config file; `config.d/*.toml` next to it is merged in name order.
    #[arg(
        long,
        short = 'c',
        value_name = "PATH",
        default_value = "/etc/fleetgw/gateway.toml"
    )]
    pub config: PathBuf,

    /// Override one key, e.g. `--set cloud.aws.sessions=8` (repeatable; value parsed as TOML,
    /// falling back to a plain string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a device key and CSR: writes DIR/ID.key (0600) and DIR/ID.csr.
    Csr(csr::Args),
    /// Check the config: print the effective config (secrets redacted), or the error (exit 78).
    CheckConfig(check_config::Args),
    /// Run the gateway daemon until SIGTERM/SIGINT.
    Run(run::Args),
    /// Run a cloud emulator (AWS IoT) for tests, demos and benchmarks.
    Emulate(emulate::Args),
    /// Simulate a fleet of downstream devices provisioning through a gateway's broker.
    Simulate(Box<simulate::Args>),
    /// Run the AWS emulator, the gateway and a simulated fleet in one process and show the
    /// provisioning figures (nothing to install, no cloud account).
    Demo(demo::Args),
    /// Measure provisioning, telemetry, scale and footprint beside the baselines users would
    /// pick instead (the AWS SDK's per-device flow, the mosquitto bridge), in one run.
    Bench(bench::Args),
    /// Show the running daemon's status (over the admin socket).
    Status(devices::StatusArgs),
    /// List, show, approve, block, unblock, delete, reprovision or export devices (over the
    /// admin socket).
    Devices(devices::DevicesArgs),
    /// Show long-running operations (over the admin socket).
    Ops(devices::OpsArgs),
    /// Manage enrollment groups: who may provision besides the config (over the admin socket).
    Enrollment(devices::EnrollmentArgs),
    /// Hash a local application's password (read from standard input) for
    /// `[[downstream.users]] password_hash`.
    Passwd(passwd::Args),
}

/// Parses argv, sets up logging and runs the chosen command.
pub fn main() -> ExitCode {
    // Usage errors exit 64 (EX_USAGE) as every other refusal of bad input; help and version 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // `run` sets up logging itself, with the level and format of its config.
    // The demo draws a progress bar: only warnings unless RUST_LOG says otherwise.
    match cli.command {
        Command::Run(_) => {}
        Command::Demo(_) | Command::Bench(_) => logging::init(cli.log_format, Some("warn")),
        _ => logging::init(cli.log_format, None),
    }
    match cli.command {
        Command::Csr(args) => csr::run(args),
        Command::CheckConfig(args) => check_config::run(args),
        Command::Run(args) => run::run(args, cli.log_format),
        Command::Emulate(args) => emulate::run(args),
        Command::Simulate(args) => simulate::run(*args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Passwd(args) => passwd::run(args),
        Command::Status(args) => devices::status(args),
        Command::Devices(args) => devices::run(args),
        Command::Ops(args) => devices::ops(args),
        Command::Enrollment(args) => devices::enrollment(args),
    }
}

/// Resolves at the first SIGTERM or SIGINT: how `emulate` and `bench` end on request
/// (`bench` must then stop the processes it started, which run in their own process groups
/// and so do not get a terminal's Ctrl-C or a `kill` of `bench` itself).
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
