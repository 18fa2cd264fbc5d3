//! `fleetgw passwd`: hash a local application's password for `[[downstream.users]]`.
//!
//! Reads the password from standard input (the first line, without its line ending, so
//! `echo secret | fleetgw passwd` and a typed line both work; it never appears in argv or the
//! shell history) and prints its Argon2id PHC string, the value of `password_hash`.

use std::io::BufRead;
use std::process::ExitCode;

use crate::identity;

use super::{EX_SOFTWARE, EX_USAGE};

/// Arguments of `fleetgw passwd` (none: the password comes from standard input).
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `fleetgw passwd`.
pub fn run(_args: Args) -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
        eprintln!("fleetgw passwd: cannot read the password from standard input: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        eprintln!("fleetgw passwd: no password on standard input (e.g. `echo \"$PASSWORD\" | fleetgw passwd`)");
        return ExitCode::from(EX_USAGE);
    }
    match identity::hash_password(password.as_bytes()) {
        Ok(phc) => {
            println!("{phc}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleetgw passwd: {e}");
            ExitCode::from(EX_SOFTWARE)
        }
    }
}
