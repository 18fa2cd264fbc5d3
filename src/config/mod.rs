//! Typed gateway configuration: defaults, loading, merging and validation.
//!
//! [`load`] reads the main file (by default `/etc/fleetgw/gateway.toml`), deep-merges the
//! drop-ins `config.d/*.toml` next to it in name order, applies `--set key.path=value`
//! overrides, then deserializes into [`Config`] and checks the values. Every failure is one
//! line of the form `SOURCE: key.path: what is wrong`, where SOURCE is the file (or
//! `--set key`) that last set the key, so an operator knows which file to edit. Key names are
//! an interface (users and tests address them with `--set`); the commented sample
//! `gateway.toml` at the top of the repository lists every one of them with its default.
//!
//! This module sits at the bottom of the layering: it uses only `identity::{Secret, KeyType}`
//! (and `identity::check_secret_file` for the permissions of key files, see `secret_files`),
//! `device_id` and two plain data enums (`cloud::codec::PayloadFormat`,
//! `admission::AdmissionMode`). Modules above it receive a validated `Config` whose relative paths have
//! already been resolved against the main config file's directory.
//!
//! The submodules follow that path: `schema` is the typed schema with its defaults (the
//! `[telemetry]` enums [`TelemetryIdentity`] and [`WhenFull`] are the ones the telemetry
//! pipeline uses), `load` reads, merges and deserializes, `keys` derives the list of key
//! paths from the schema types for `known_keys` and the typo hints, and `validate` holds the
//! checks serde cannot express.

mod keys;
mod load;
mod schema;
mod secret_files;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::io;
use std::path::PathBuf;

pub use keys::{key_spellings, known_keys};
pub use load::load;
pub use schema::{
    AdminSection, AdmissionSection, AwsSection, AzureAttestation, AzureSection, AzureTransport,
    BrokerMode, CloudProvider, CloudSection, Config, DownstreamAuth, DownstreamSection,
    DownstreamUser, GatewaySection, LogFormat, LogSection, ProvisionSection, StoreSection,
    TelemetryIdentity, TelemetrySection, WhenFull,
};

// The plain data enums of the layers the config feeds are used as they are, so a mode or a
// format has one spelling and one type everywhere (neither module depends on `config`).
pub use crate::admission::AdmissionMode;
pub use crate::cloud::codec::PayloadFormat;

/// Where the packaged daemon looks for its config when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/fleetgw/gateway.toml";
/// Name of the drop-in directory next to the main config file.
pub const DROP_IN_DIR: &str = "config.d";

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The main config file or a drop-in file.
    File(PathBuf),
    /// A `--set KEY=VALUE` override.
    Override {
        /// The dotted key path given on the command line.
        key: String,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Override { key } => write!(f, "--set {key}"),
        }
    }
}

/// Why a configuration could not be loaded. Each message names the file (or `--set`) and,
/// where there is one, the key path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The main config file or a drop-in could not be read.
    #[error("{}: cannot read config file: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The drop-in directory exists but could not be listed.
    #[error("{}: cannot list drop-in directory: {source}", path.display())]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A file is not valid TOML.
    #[error("{}: line {line}, column {column}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// What the TOML parser expected.
        message: String,
    },
    /// A `--set` argument is not of the form `key.path=value`.
    #[error("--set {arg}: {message}")]
    BadOverride {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        message: String,
    },
    /// A key has a wrong type, an unknown name or a value that fails validation.
    #[error("{}", render_invalid(.origin, .key, .message))]
    Invalid {
        /// The file or override that set the key (the main file for a default value).
        origin: Origin,
        /// Dotted key path, e.g. `cloud.aws.sessions`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key path the error is about, if it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

fn render_invalid(origin: &Origin, key: &str, message: &str) -> String {
    match origin {
        // `--set cloud.aws.sessions: cloud.aws.sessions: ...` would say the key twice.
        Origin::Override { key: set } if set == key => format!("--set {key}: {message}"),
        _ => format!("{origin}: {key}: {message}"),
    }
}
