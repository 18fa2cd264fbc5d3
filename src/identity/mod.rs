//! Keys, CSRs, certificates and secrets: the only module that knows rcgen, openssl and
//! x509-parser.
//!
//! One crypto backend, aws-lc-rs, generates keys (ECDSA P-256/P-384, RSA-2048/3072), signs
//! CSRs and certificates (through rcgen), verifies signatures (through x509-parser) and runs
//! TLS (through rustls, see [`tls`]). openssl only imports key files users bring in legacy or
//! passphrase-protected formats ([`PrivateKey::import_file`]). This module is a leaf: it uses
//! no other fleetgw module.

mod atomic_file;
mod ca;
mod cert;
mod csr;
mod error;
mod key;
mod key_type;
mod password;
mod pem_plain;
mod seal;
mod secret;
mod secret_file;
pub mod tls;

pub use atomic_file::write_file_atomic;
pub use ca::CertificateAuthority;
pub use cert::{cert_matches_csr, cert_matches_key, parse_certificates, verify_chain, CertInfo};
pub use csr::{check_common_name, create_csr, parse_csr, CsrInfo, MAX_COMMON_NAME_LEN};
pub use error::IdentityError;
pub use key::{read_passphrase, PrivateKey};
pub use key_type::{KeyType, UnknownKeyType};
pub use password::{check_password_hash, hash_password, verify_password};
pub use seal::{SealedRecord, Sealer};
pub use secret::Secret;
pub use secret_file::{check_secret_file, read_secret_file};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_types_can_cross_threads() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<PrivateKey>();
        send_sync::<CertificateAuthority>();
        send_sync::<Sealer>();
        send_sync::<IdentityError>();
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Helpers for tests that check interoperability with the `openssl` command.

    use std::path::Path;
    use std::process::Command;

    /// Runs `openssl ARGS` in `dir`. `None` (after printing a notice) when the binary is
    /// absent, so the calling test can skip; panics with openssl's stderr if it fails.
    pub(crate) fn openssl(dir: &Path, args: &[&str]) -> Option<Vec<u8>> {
        let out = match Command::new("openssl").args(args).current_dir(dir).output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("NOTICE: openssl binary not found; skipping an openssl interop check");
                return None;
            }
            Err(e) => panic!("running openssl {args:?}: {e}"),
        };
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(out.stdout)
    }

    /// Has `openssl req` make a fresh key (written to `dir/k.pem`) and a CSR for `subject` in
    /// `dir/out`, and returns the CSR as PEM. `new_key` is the `-newkey` value followed by any
    /// `-pkeyopt` options. `None` when the binary is absent, as for [`openssl`].
    pub(crate) fn openssl_csr(
        dir: &Path,
        new_key: &[&str],
        subject: &str,
        out: &str,
    ) -> Option<String> {
        let mut args = vec!["req", "-new", "-newkey"];
        args.extend_from_slice(new_key);
        args.extend(["-nodes", "-keyout", "k.pem", "-subj", subject, "-out", out]);
        openssl(dir, &args)?;
        Some(std::fs::read_to_string(dir.join(out)).unwrap())
    }
}
