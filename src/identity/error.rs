//! [`IdentityError`]: everything that can go wrong with keys, CSRs, certificates, TLS
//! configuration and sealed secrets.
//!
//! Every variant names the input it is about (a file path, "CSR", "certificate 2 in chain",
//! a credential name) and says what is wrong, so the CLI and the admin API can show the message
//! as is.

use std::path::PathBuf;

use super::KeyType;

/// Why a key, CSR, certificate, chain or sealed secret was refused or could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Input that is not what it claims to be (garbage PEM, a truncated DER structure, ...).
    #[error("{input}: {reason}")]
    Malformed {
        /// Which input: "CSR", "private key", "certificate 2 in chain", a file path, ...
        input: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A key algorithm or size fleetgw does not use.
    #[error("{input}: unsupported key {detail}; supported are ecdsa-p256, ecdsa-p384, rsa-2048 and rsa-3072")]
    UnsupportedKey {
        /// Which input held the key.
        input: String,
        /// The algorithm / size that was found.
        detail: String,
    },

    /// The CSR is well-formed but its self-signature does not verify with its own public key.
    #[error("CSR: signature does not verify (the request was altered or not signed by its key)")]
    CsrSignature,

    /// The common name does not fit the X.509 upper bound (ub-common-name = 64).
    #[error("common name {common_name:?} is {len} characters long; X.509 allows at most 64")]
    CommonNameTooLong {
        /// The refused name.
        common_name: String,
        /// Its length in characters.
        len: usize,
    },

    /// An empty common name was given.
    #[error("common name is empty")]
    CommonNameEmpty,

    /// A certificate chain does not verify; `link` says which certificate failed.
    #[error("{link}: {reason}")]
    Chain {
        /// "certificate 2 in chain (CN=...)" or "trusted CA 1 (CN=...)".
        link: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A key file could not be imported.
    #[error("{path}: {reason}")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The key file is encrypted and no passphrase was configured.
    #[error("{path}: the private key is encrypted and no passphrase was given (configure a passphrase file or a systemd credential)")]
    PassphraseRequired {
        /// The key file.
        path: PathBuf,
    },

    /// The passphrase did not decrypt the key file.
    #[error("{path}: wrong passphrase (or the encrypted key is corrupt)")]
    WrongPassphrase {
        /// The key file.
        path: PathBuf,
    },

    /// A key or credential file that other users (or a foreign group) can access.
    #[error("{path}: {reason}")]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Which bits are wrong and how to fix them.
        reason: String,
    },

    /// A systemd credential could not be located.
    #[error("systemd credential {name:?}: {reason}")]
    Credential {
        /// The credential name.
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// The sealing key is not 32 bytes in one of the accepted encodings.
    #[error("sealing key {source_name}: {reason}")]
    SealingKey {
        /// The key file path or credential name.
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A sealed secret could not be opened.
    #[error("sealed secret: {reason}")]
    Unseal {
        /// Why (wrong key or tampering, unknown version, truncated).
        reason: String,
    },

    /// Key generation failed in the crypto backend.
    #[error("generating a {key_type} key failed: {reason}")]
    KeyGeneration {
        /// The requested key type.
        key_type: KeyType,
        /// The backend's message.
        reason: String,
    },

    /// Building or signing a CSR or certificate failed.
    #[error("{what}: {reason}")]
    Signing {
        /// What was being produced ("CSR for sensor-1", "certificate for CN=...").
        what: String,
        /// The backend's message.
        reason: String,
    },

    /// The private key does not belong to the certificate it was paired with.
    #[error("{input}: the private key does not match the certificate's public key")]
    KeyMismatch {
        /// Which pair ("CA certificate and key", "server certificate").
        input: String,
    },

    /// A TLS configuration could not be built.
    #[error("TLS {input}: {reason}")]
    Tls {
        /// Which part ("server certificate", "client CA", ...).
        input: String,
        /// What rustls said.
        reason: String,
    },
}

impl IdentityError {
    pub(crate) fn malformed(input: impl Into<String>, reason: impl ToString) -> Self {
        Self::Malformed {
            input: input.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn signing(what: impl Into<String>, reason: impl ToString) -> Self {
        Self::Signing {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}
