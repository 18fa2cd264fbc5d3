//! Cloud emulators: stand-ins for AWS IoT and for Azure DPS / IoT Hub that speak the
//! services' wire protocols closely enough for the official SDKs, so that tests, `fleetgw demo`
//! and the benchmarks run the whole provisioning and telemetry flow with no cloud account. (The
//! stand-in for the downstream hardware, the simulated device fleet, is `sim`.)
//!
//! Each emulator is a library first (`start(options) -> handle`, used in-process by tests and
//! the demo) and a CLI command second (`fleetgw emulate aws|azure`, see `cli::emulate`). What
//! both need lives here: the device message log (`messages`), injected faults (`faults`),
//! their DIR's files (`dir`), their listeners and tasks (`listeners`) and the error answer and
//! `/faults` routes of their inspection APIs (`api`).

pub mod api;
pub mod aws;
pub mod azure;
pub mod dir;
pub mod faults;
pub mod listeners;
pub mod messages;

use std::path::PathBuf;

/// Why an emulator could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// Creating or loading the emulator's CA, server or claim credentials failed.
    #[error("{what}: {source}")]
    Identity {
        /// Which credential: "DIR/ca.pem", "server certificate", ...
        what: String,
        /// The underlying identity error.
        #[source]
        source: crate::identity::IdentityError,
    },

    /// A file or directory in the emulator's DIR could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A listener could not be bound to the requested address.
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        /// "MQTT" or "API".
        what: &'static str,
        /// The requested address.
        addr: std::net::SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },

    /// A file in DIR exists but its contents are not what the emulator wrote.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The `--templates` file could not be read or is not a valid template set.
    #[error("templates file {path}: {reason}")]
    Templates {
        /// The templates file.
        path: PathBuf,
        /// What is wrong with it (names the template and key).
        reason: String,
    },
}
