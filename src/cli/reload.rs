//! Config reload on SIGHUP (`systemctl reload fleetgw`): the config is read again (main file,
//! `config.d/`, the `--set` overrides of the command line) and compared key by key with the
//! one in force. What can change live is applied and logged: `log.level`, `cloud.aws.tps`,
//! `downstream.device_rate_per_minute`, `[[downstream.users]]` and the enrollment keys of
//! `[admission]` (group key, trusted CAs, x509 window; files named there are read again).
//! Every other changed key is logged as needing a restart. A config that does not load keeps
//! the running one, and the log says why.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::logging::{self, LevelChange};
use super::run::Gateway;
use super::ConfigArgs;
use crate::config::{self, Config};

/// `[admission]` keys that change who may enroll; applied together, live, as long as the
/// mode stays the same.
const ENROLLMENT_KEYS: [&str; 4] = [
    "admission.group_key",
    "admission.group_key_file",
    "admission.trusted_ca",
    "admission.x509_window_secs",
];

/// The config in force: as loaded at start, with every change applied live since.
pub(super) struct Running {
    cfg: Config,
}

impl Running {
    pub(super) fn new(cfg: Config) -> Self {
        Running { cfg }
    }

    /// Loads the config again and applies what can change live (see the module docs).
    pub(super) async fn reload(&mut self, args: &ConfigArgs, gateway: &Gateway) {
        tracing::info!(config = %args.config.display(), "reloading the config (SIGHUP)");
        let new = match config::load(&args.config, &args.overrides) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!("reload: {e}; the running config stays in force");
                return;
            }
        };
        let changed = changed_keys(&self.cfg, &new);
        let mut restart = Vec::new();
        let mut enrollment = false;
        for key in &changed {
            match key.as_str() {
                "log.level" => self.apply_log_level(&new),
                "cloud.aws.tps" if new.cloud.provider == config::CloudProvider::Aws => {
                    gateway
                        .provider()
                        .set_tps(f64::from(new.cloud.aws.tps.max(1)))
                        .await;
                    tracing::info!(
                        from = self.cfg.cloud.aws.tps,
                        to = new.cloud.aws.tps,
                        "reload: cloud.aws.tps applied"
                    );
                    self.cfg.cloud.aws.tps = new.cloud.aws.tps;
                }
                "cloud.azure.tps" if new.cloud.provider == config::CloudProvider::Azure => {
                    gateway
                        .provider()
                        .set_tps(f64::from(new.cloud.azure.tps.max(1)))
                        .await;
                    tracing::info!(
                        from = self.cfg.cloud.azure.tps,
                        to = new.cloud.azure.tps,
                        "reload: cloud.azure.tps applied"
                    );
                    self.cfg.cloud.azure.tps = new.cloud.azure.tps;
                }
                "downstream.device_rate_per_minute" => {
                    let rate = new.downstream.device_rate_per_minute;
                    gateway.engine().set_device_rate_per_minute(rate);
                    tracing::info!(
                        from = self.cfg.downstream.device_rate_per_minute,
                        to = rate,
                        "reload: downstream.device_rate_per_minute applied"
                    );
                    self.cfg.downstream.device_rate_per_minute = rate;
                }
                "downstream.users" => match gateway.set_users(&new) {
                    true => {
                        let names: Vec<&str> = new
                            .downstream
                            .users
                            .iter()
                            .map(|u| u.name.as_str())
                            .collect();
                        tracing::info!(users = ?names, "reload: [[downstream.users]] applied; connected users keep their rights until they reconnect");
                        self.cfg.downstream.users = new.downstream.users.clone();
                    }
                    false => restart.push(key.clone()),
                },
                k if ENROLLMENT_KEYS.contains(&k) => enrollment = true,
                _ => restart.push(key.clone()),
            }
        }
        // Files named by the enrollment keys may have new contents under the same name.
        let files_named =
            new.admission.group_key_file.is_some() || new.admission.trusted_ca.is_some();
        if (enrollment || files_named) && new.admission.mode == self.cfg.admission.mode {
            self.apply_enrollment(&new, gateway, enrollment);
        } else if enrollment {
            restart.extend(
                changed
                    .iter()
                    .filter(|k| ENROLLMENT_KEYS.contains(&k.as_str()))
                    .cloned(),
            );
        }
        if !restart.is_empty() {
            tracing::warn!(
                keys = %restart.join(", "),
                "reload: changed keys that this version cannot apply live; needs a restart (systemctl restart fleetgw): {}",
                restart.join(", ")
            );
        }
        if changed.is_empty() && !files_named {
            tracing::info!("reload: nothing changed");
        }
    }

    fn apply_log_level(&mut self, new: &Config) {
        let level = super::run::log_filter(&new.log.level);
        match logging::set_level(&level) {
            Ok(LevelChange::Applied) => {
                tracing::info!(from = %self.cfg.log.level, to = %new.log.level, "reload: log.level applied");
                self.cfg.log.level = new.log.level.clone();
            }
            Ok(LevelChange::Ignored) => {
                tracing::warn!(
                    "reload: log.level changed, but RUST_LOG is set and wins; unchanged"
                );
            }
            Err(e) => tracing::error!("reload: log.level {e}; the old level stays"),
        }
    }

    fn apply_enrollment(&mut self, new: &Config, gateway: &Gateway, changed: bool) {
        match super::run::admission_options(new, gateway.enrollments())
            .and_then(|opts| crate::admission::Admission::new(opts).map_err(Into::into))
        {
            Ok(admission) => {
                gateway.admission().replace(admission);
                if changed {
                    tracing::info!("reload: enrollment ([admission] keys) applied");
                } else {
                    tracing::info!("reload: enrollment files read again");
                }
                self.cfg.admission = new.admission.clone();
            }
            Err(e) => tracing::error!("reload: enrollment: {e}; the running rules stay in force"),
        }
    }
}

/// The dotted keys whose values differ between `old` and `new` (tables compared key by key,
/// lists as a whole), secrets compared by value although the config prints them redacted.
pub(super) fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    flatten(
        "",
        &serde_json::to_value(old).unwrap_or(Value::Null),
        &mut a,
    );
    flatten(
        "",
        &serde_json::to_value(new).unwrap_or(Value::Null),
        &mut b,
    );
    let mut keys: BTreeSet<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    let secret = |s: &Option<crate::identity::Secret>| s.as_ref().map(|s| s.expose().to_vec());
    if secret(&old.admission.group_key) != secret(&new.admission.group_key) {
        keys.insert("admission.group_key".into());
    }
    if secret(&old.downstream.password) != secret(&new.downstream.password) {
        keys.insert("downstream.password".into());
    }
    // Everything but the users' names and rights is in the password hashes: compare them too.
    let hashes = |c: &Config| -> Vec<String> {
        c.downstream
            .users
            .iter()
            .map(|u| u.password_hash.clone())
            .collect()
    };
    if hashes(old) != hashes(new) {
        keys.insert("downstream.users".into());
    }
    keys.into_iter().collect()
}

fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}
