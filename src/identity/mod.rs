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
mod seal;
mod secret;
pub mod tls;

pub use atomic_file::write_file_atomic;
pub use ca::CertificateAuthority;
pub use cert::{cert_matches_csr, cert_matches_key, parse_certificates, verify_chain, CertInfo};
pub use csr::{check_common_name, create_csr, parse_csr, CsrInfo, MAX_COMMON_NAME_LEN};
pub use error::IdentityError;
pub use key::{read_passphrase, PrivateKey};
pub use key_type::{KeyType, UnknownKeyType};
pub use seal::Sealer;
pub use secret::Secret;
