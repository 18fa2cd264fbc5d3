//! `fleetgw csr`: generate a device key and CSR on disk, for operators and tests.
//!
//! Writes `DIR/ID.key` (PKCS#8 PEM, mode 0600) and `DIR/ID.csr` (mode 0644) with the CSR's
//! CN set to the canonical device id, then prints the two paths.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::device_id::DeviceId;
use crate::identity::{self, IdentityError, KeyType, PrivateKey};

use super::{EX_IOERR, EX_SOFTWARE, EX_USAGE};

/// Arguments of `fleetgw csr`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Device id (registration-id rules: letters, digits and - . _ :; stored lower-case).
    #[arg(long, value_name = "ID")]
    pub id: String,

    /// Key algorithm: ecdsa-p256, ecdsa-p384, rsa-2048 or rsa-3072.
    #[arg(long, value_name = "TYPE", default_value = "ecdsa-p256")]
    pub key_type: KeyType,

    /// Output directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Replace an existing ID.key / ID.csr (by default an existing key is never overwritten:
    /// a certificate may already have been issued for it).
    #[arg(long)]
    pub force: bool,
}

/// Exit code when an output file already exists (sysexits.h EX_CANTCREAT).
const EX_CANTCREAT: u8 = 73;

/// Runs `fleetgw csr`.
pub fn run(args: Args) -> ExitCode {
    let id = match DeviceId::parse(&args.id) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("fleetgw csr: --id: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let key_path = args.out.join(format!("{id}.key"));
    if !args.force && key_path.exists() {
        eprintln!(
            "fleetgw csr: {} already exists; pass --force to replace it",
            key_path.display()
        );
        return ExitCode::from(EX_CANTCREAT);
    }
    match write_key_and_csr(&id, args.key_type, &args.out) {
        Ok((key_path, csr_path)) => {
            println!("{}", key_path.display());
            println!("{}", csr_path.display());
            ExitCode::SUCCESS
        }
        Err(e @ (IdentityError::CommonNameTooLong { .. } | IdentityError::CommonNameEmpty)) => {
            eprintln!("fleetgw csr: --id: the id is the certificate's common name: {e}");
            ExitCode::from(EX_USAGE)
        }
        Err(e) => {
            eprintln!("fleetgw csr: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn write_key_and_csr(
    id: &DeviceId,
    key_type: KeyType,
    out: &std::path::Path,
) -> Result<(PathBuf, PathBuf), IdentityError> {
    // Validate the name before spending time on an RSA key.
    identity::check_common_name(id.as_str())?;
    std::fs::create_dir_all(out).map_err(|e| IdentityError::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    let key = PrivateKey::generate(key_type)?;
    let csr = identity::create_csr(id.as_str(), &key)?;
    let key_path = out.join(format!("{id}.key"));
    let csr_path = out.join(format!("{id}.csr"));
    identity::write_file_atomic(&key_path, key.to_pkcs8_pem().expose(), 0o600)?;
    identity::write_file_atomic(&csr_path, csr.as_bytes(), 0o644)?;
    Ok((key_path, csr_path))
}

fn exit_code(e: &IdentityError) -> u8 {
    match e {
        IdentityError::Io { .. } => EX_IOERR,
        _ => EX_SOFTWARE,
    }
}
