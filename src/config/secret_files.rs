//! The permission check of the key and credential files the config names, run by [`load`]
//! after relative paths are resolved, so `check-config` and `run` both refuse a private key
//! or passphrase file that other users can read (exit 78, naming the key and the file).
//!
//! The rule itself lives in `identity::check_secret_file` (no "other" bits; group bits only
//! for the daemon's own group); the readers in `identity` apply it again on the opened file.
//! A file that does not exist yet is left to the step that reads it, which says so, except the
//! sealing key: `run` refuses to start without it, so `check-config` refuses it here already.
//!
//! [`load`]: super::load

use std::io::ErrorKind;
use std::path::Path;

use super::validate::Violation;
use super::{CloudProvider, Config};
use crate::identity::{check_secret_file, IdentityError};

/// The key of the sealing key file: the one secret file that must exist (see
/// [`Config::check_secret_files`]).
const SEALING_KEY_FILE: &str = "provision.sealing_key_file";

impl Config {
    /// Every configured secret file with the key that names it.
    fn secret_files(&self) -> Vec<(&'static str, &Path)> {
        let mut files: Vec<(&'static str, Option<&Path>)> = vec![
            ("downstream.tls_key", self.downstream.tls_key.as_deref()),
            (
                "downstream.password_file",
                self.downstream.password_file.as_deref(),
            ),
            (
                "admission.group_key_file",
                self.admission.group_key_file.as_deref(),
            ),
            (SEALING_KEY_FILE, self.provision.sealing_key_file.as_deref()),
            (
                "cloud.aws.claim_key_passphrase_file",
                self.cloud.aws.claim_key_passphrase_file.as_deref(),
            ),
            (
                "telemetry.gateway_key",
                self.telemetry.gateway_key.as_deref(),
            ),
            (
                "cloud.azure.group_key_file",
                self.cloud.azure.group_key_file.as_deref(),
            ),
            (
                "cloud.azure.group_ca_key",
                self.cloud.azure.group_ca_key.as_deref(),
            ),
            (
                "cloud.azure.group_ca_key_passphrase_file",
                self.cloud.azure.group_ca_key_passphrase_file.as_deref(),
            ),
            (
                "telemetry.gateway_key_passphrase_file",
                self.telemetry.gateway_key_passphrase_file.as_deref(),
            ),
        ];
        // `claim_key` has a default path: only the AWS provider reads it.
        if self.cloud.provider == CloudProvider::Aws {
            files.push(("cloud.aws.claim_key", Some(&self.cloud.aws.claim_key)));
        }
        files
            .into_iter()
            .filter_map(|(key, path)| path.map(|p| (key, p)))
            .collect()
    }

    /// Refuses the first configured secret file that is group- or world-accessible, and a
    /// sealing key file that does not exist: `run` never creates one (a key it made up would
    /// seal secrets nobody holds a copy of) and refuses to start without it, so
    /// `check-config` must refuse it too.
    pub(super) fn check_secret_files(&self) -> Result<(), Violation> {
        for (key, path) in self.secret_files() {
            match check_secret_file(path) {
                Ok(()) => {}
                Err(IdentityError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                    if key == SEALING_KEY_FILE {
                        return Err((
                            key.to_string(),
                            format!(
                                "{} does not exist; fleetgw run refuses to start without its sealing key (create 32 random bytes, mode 0600: head -c 32 /dev/urandom > {0}; chmod 600 {0}), and keep a copy: sealed keys and tokens cannot be opened without it",
                                path.display()
                            ),
                        ));
                    }
                }
                Err(e) => return Err((key.to_string(), e.to_string())),
            }
        }
        Ok(())
    }
}
