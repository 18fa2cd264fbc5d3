//! The checks serde cannot express: ranges, combinations of keys and formats (topics, ids,
//! endpoints). Each failure names the key to fix; `load` adds the file that set it.

use std::fmt;

use super::{
    AdmissionMode, AzureAttestation, BrokerMode, CloudProvider, Config, DownstreamAuth,
    TelemetryIdentity,
};
use crate::device_id::DeviceId;

/// Largest MQTT packet the protocol can describe (remaining length of 268,435,455 bytes).
const MQTT_MAX_PACKET: u32 = 268_435_455;
/// Smallest useful packet limit: a provisioning response carries a certificate chain and a key.
const MIN_PACKET_BYTES: u32 = 4096;

/// A semantic check failed: (key path, message).
pub(super) type Violation = (String, String);

fn check(ok: bool, key: &str, message: impl FnOnce() -> String) -> Result<(), Violation> {
    if ok {
        Ok(())
    } else {
        Err((key.to_string(), message()))
    }
}

fn at_least<T: PartialOrd + fmt::Display + Copy>(
    value: T,
    min: T,
    key: &str,
) -> Result<(), Violation> {
    check(value >= min, key, || {
        format!("must be at least {min}, got {value}")
    })
}

/// A secret key given as base64 must decode to at least one byte; the message never echoes it.
fn base64_key(key: Option<&crate::identity::Secret>, name: &str) -> Result<(), Violation> {
    use base64::Engine as _;
    let Some(key) = key else { return Ok(()) };
    let decoded = base64::engine::general_purpose::STANDARD.decode(key.expose());
    check(decoded.is_ok_and(|k| !k.is_empty()), name, || {
        "is not a non-empty base64 string (value not shown: it is a secret)".into()
    })
}

fn not_both<A, B>(a: &Option<A>, b: &Option<B>, key_a: &str, key_b: &str) -> Result<(), Violation> {
    check(a.is_none() || b.is_none(), key_a, || {
        format!("set either {key_a} or {key_b}, not both")
    })
}

fn has_wildcard(topic: &str) -> bool {
    topic.contains(['+', '#'])
}

impl Config {
    /// Checks the values; the first violation found is returned.
    pub(super) fn validate(&self) -> Result<(), Violation> {
        let g = &self.gateway;
        if let Err(e) = DeviceId::parse(&g.id) {
            return Err(("gateway.id".into(), format!("{e}")));
        }
        check(
            !g.state_dir.as_os_str().is_empty(),
            "gateway.state_dir",
            || "must not be empty".into(),
        )?;
        check(
            !self.admin.socket.as_os_str().is_empty(),
            "admin.socket",
            || "must not be empty".into(),
        )?;
        check(!self.admin.group.is_empty(), "admin.group", || {
            "must not be empty".into()
        })?;
        if let Some(listen) = self.admin.listen {
            // The TCP listener is for tools on this host; a bearer token crossing the network
            // in clear would be anyone's.
            check(listen.ip().is_loopback(), "admin.listen", || {
                format!("{listen} is not a loopback address; use 127.0.0.1 or [::1]")
            })?;
            check(self.admin.token_file.is_some(), "admin.listen", || {
                "needs admin.token_file (the bearer token clients must send)".into()
            })?;
        }
        self.validate_downstream()?;
        self.validate_admission()?;
        self.validate_provision()?;
        self.validate_cloud()?;
        self.validate_telemetry()?;
        at_least(
            self.store.cache_capacity_bytes,
            1 << 20,
            "store.cache_capacity_bytes",
        )?;
        check(
            self.store.min_commit_interval_us <= 100_000,
            "store.min_commit_interval_us",
            || {
                format!(
                    "{} is more than 100000 (0.1 s); every durable write would wait that long under load",
                    self.store.min_commit_interval_us
                )
            },
        )?;
        check(
            tracing_subscriber::EnvFilter::try_new(&self.log.level).is_ok(),
            "log.level",
            || {
                format!(
                    "{:?} is not a log filter; use a level (error, warn, info, debug, trace) or directives like \"info,fleetgw=debug\"",
                    self.log.level
                )
            },
        )?;
        Ok(())
    }

    fn validate_downstream(&self) -> Result<(), Violation> {
        let d = &self.downstream;
        let prefix = &d.topic_prefix;
        check(!prefix.is_empty(), "downstream.topic_prefix", || {
            "must not be empty".into()
        })?;
        check(!has_wildcard(prefix), "downstream.topic_prefix", || {
            format!("{prefix:?} contains an MQTT wildcard ('+' or '#')")
        })?;
        check(
            !prefix.starts_with(['/', '$'])
                && !prefix.ends_with('/')
                && !prefix.contains("//")
                && !prefix.contains('\0'),
            "downstream.topic_prefix",
            || {
                format!("{prefix:?} must not start with '/' or '$', end with '/', contain an empty level or NUL")
            },
        )?;
        check(
            (MIN_PACKET_BYTES..=MQTT_MAX_PACKET).contains(&d.max_packet_bytes),
            "downstream.max_packet_bytes",
            || {
                format!(
                    "must be between {MIN_PACKET_BYTES} and {MQTT_MAX_PACKET} (the MQTT limit), got {}",
                    d.max_packet_bytes
                )
            },
        )?;
        at_least(d.max_request_bytes, 1, "downstream.max_request_bytes")?;
        check(
            d.max_request_bytes <= d.max_packet_bytes,
            "downstream.max_request_bytes",
            || {
                format!(
                    "{} is larger than downstream.max_packet_bytes ({})",
                    d.max_request_bytes, d.max_packet_bytes
                )
            },
        )?;
        at_least(
            d.device_rate_per_minute,
            1,
            "downstream.device_rate_per_minute",
        )?;
        at_least(d.max_connections, 1, "downstream.max_connections")?;
        at_least(
            d.max_connections_per_address,
            1,
            "downstream.max_connections_per_address",
        )?;
        check(
            (64..=65_535).contains(&d.max_topic_bytes),
            "downstream.max_topic_bytes",
            || format!("{} is outside 64 .. 65535", d.max_topic_bytes),
        )?;
        check(
            (4..=1024).contains(&d.max_topic_levels),
            "downstream.max_topic_levels",
            || format!("{} is outside 4 .. 1024", d.max_topic_levels),
        )?;
        at_least(
            d.max_subscriptions_per_client,
            1,
            "downstream.max_subscriptions_per_client",
        )?;
        at_least(
            d.kept_session_expiry_secs,
            1,
            "downstream.kept_session_expiry_secs",
        )?;
        at_least(
            d.max_inbound_per_second,
            1,
            "downstream.max_inbound_per_second",
        )?;
        at_least(d.connect_timeout_secs, 1, "downstream.connect_timeout_secs")?;
        if d.auth == DownstreamAuth::Device {
            check(d.broker == BrokerMode::Embedded, "downstream.auth", || {
                "\"device\" is for the embedded broker; an external broker authenticates devices itself".into()
            })?;
            check(
                d.tls_listen.is_some() || self.admission.mode == AdmissionMode::SymmetricKey,
                "downstream.auth",
                || {
                    format!(
                        "\"device\" with admission mode {} needs downstream.tls_listen: devices prove their id there with a certificate",
                        self.admission.mode
                    )
                },
            )?;
        }
        check(
            d.broker != BrokerMode::Embedded || d.listen.is_some() || d.tls_listen.is_some(),
            "downstream.listen",
            || "\"off\" needs downstream.tls_listen: devices must reach the broker somehow".into(),
        )?;
        if d.broker == BrokerMode::External {
            let Some(url) = &d.url else {
                return Err((
                    "downstream.broker".into(),
                    "\"external\" needs downstream.url, e.g. \"mqtt://127.0.0.1:1883\"".into(),
                ));
            };
            check(
                url.starts_with("mqtt://") || url.starts_with("mqtts://"),
                "downstream.url",
                || format!("{url:?} must start with mqtt:// or mqtts://"),
            )?;
        }
        if d.tls_listen.is_some() {
            check(
                d.tls_cert.is_some() && d.tls_key.is_some(),
                "downstream.tls_listen",
                || "needs downstream.tls_cert and downstream.tls_key".into(),
            )?;
        }
        not_both(
            &d.password,
            &d.password_file,
            "downstream.password",
            "downstream.password_file",
        )?;
        for (i, user) in d.users.iter().enumerate() {
            let key = |field: &str| format!("downstream.users[{i}].{field}");
            check(!user.name.is_empty(), &key("name"), || {
                "a user needs a name (the MQTT user name it connects with)".into()
            })?;
            check(
                d.users[..i].iter().all(|u| u.name != user.name),
                &key("name"),
                || format!("{:?} is listed twice", user.name),
            )?;
            if let Err(e) = crate::identity::check_password_hash(&user.password_hash) {
                return Err((
                    key("password_hash"),
                    format!("{e}; make one with `fleetgw passwd`"),
                ));
            }
            for (field, filters) in [("publish", &user.publish), ("subscribe", &user.subscribe)] {
                for filter in filters {
                    check(crate::mqtt::wire::valid_filter(filter), &key(field), || {
                        format!("{filter:?} is not a valid MQTT topic filter")
                    })?;
                }
            }
        }
        Ok(())
    }

    fn validate_admission(&self) -> Result<(), Violation> {
        let a = &self.admission;
        not_both(
            &a.group_key,
            &a.group_key_file,
            "admission.group_key",
            "admission.group_key_file",
        )?;
        base64_key(a.group_key.as_ref(), "admission.group_key")?;
        match a.mode {
            AdmissionMode::SymmetricKey => check(
                a.group_key.is_some() || a.group_key_file.is_some(),
                "admission.mode",
                || "\"symmetric-key\" needs admission.group_key or admission.group_key_file".into(),
            )?,
            AdmissionMode::X509 => check(a.trusted_ca.is_some(), "admission.mode", || {
                "\"x509\" needs admission.trusted_ca (a PEM bundle of the enrolled CAs)".into()
            })?,
            AdmissionMode::Approve | AdmissionMode::Open => {}
        }
        at_least(a.x509_window_secs, 1, "admission.x509_window_secs")
    }

    fn validate_provision(&self) -> Result<(), Violation> {
        let p = &self.provision;
        check(
            !p.allowed_csr_key_types.is_empty(),
            "provision.allowed_csr_key_types",
            || "must list at least one key type".into(),
        )?;
        at_least(p.max_attempts, 1, "provision.max_attempts")?;
        at_least(p.request_timeout_ms, 1, "provision.request_timeout_ms")?;
        at_least(p.retry_base_ms, 1, "provision.retry_base_ms")?;
        check(
            p.retry_max_ms >= p.retry_base_ms,
            "provision.retry_max_ms",
            || {
                format!(
                    "{} is smaller than provision.retry_base_ms ({})",
                    p.retry_max_ms, p.retry_base_ms
                )
            },
        )?;
        not_both(
            &p.sealing_key_file,
            &p.sealing_credential,
            "provision.sealing_key_file",
            "provision.sealing_credential",
        )?;
        if let Some(name) = p.parameters.keys().find(|k| k.is_empty()) {
            return Err((
                format!("provision.parameters.{name}"),
                "parameter names must not be empty".into(),
            ));
        }
        Ok(())
    }

    fn validate_cloud(&self) -> Result<(), Violation> {
        let aws = &self.cloud.aws;
        let endpoint_ok = aws.endpoint.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        check(endpoint_ok, "cloud.aws.endpoint", || {
            format!(
                "{:?} is not HOST:PORT, e.g. \"xxxxxxxx-ats.iot.eu-west-1.amazonaws.com:8883\"",
                aws.endpoint
            )
        })?;
        check(
            (1..=36).contains(&aws.template.len())
                && aws
                    .template
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "cloud.aws.template",
            || {
                format!(
                    "{:?} is not a template name (1-36 letters, digits, '_' or '-')",
                    aws.template
                )
            },
        )?;
        at_least(aws.sessions, 1, "cloud.aws.sessions")?;
        at_least(aws.tps, 1, "cloud.aws.tps")?;
        check(
            (1..=u64::from(u16::MAX)).contains(&aws.keep_alive_secs),
            "cloud.aws.keep_alive_secs",
            || {
                format!(
                    "must be between 1 and 65535 (MQTT keep-alive), got {}",
                    aws.keep_alive_secs
                )
            },
        )?;
        check(
            matches!(aws.mqtt_version, 3 | 5),
            "cloud.aws.mqtt_version",
            || {
                format!(
                    "must be 5 (MQTT 5) or 3 (MQTT 3.1.1), got {}",
                    aws.mqtt_version
                )
            },
        )?;
        not_both(
            &aws.claim_key_passphrase_file,
            &aws.claim_key_passphrase_credential,
            "cloud.aws.claim_key_passphrase_file",
            "cloud.aws.claim_key_passphrase_credential",
        )?;
        let azure = &self.cloud.azure;
        check(
            !azure.dps_endpoint.is_empty(),
            "cloud.azure.dps_endpoint",
            || "must not be empty".into(),
        )?;
        if let Some(scope) = &azure.id_scope {
            check(!scope.is_empty(), "cloud.azure.id_scope", || {
                "must not be empty".into()
            })?;
        }
        not_both(
            &azure.group_key,
            &azure.group_key_file,
            "cloud.azure.group_key",
            "cloud.azure.group_key_file",
        )?;
        base64_key(azure.group_key.as_ref(), "cloud.azure.group_key")?;
        not_both(
            &azure.group_ca_key_passphrase_file,
            &azure.group_ca_key_passphrase_credential,
            "cloud.azure.group_ca_key_passphrase_file",
            "cloud.azure.group_ca_key_passphrase_credential",
        )?;
        at_least(azure.registrations, 1, "cloud.azure.registrations")?;
        check(
            (1..=u64::from(u16::MAX)).contains(&azure.keep_alive_secs),
            "cloud.azure.keep_alive_secs",
            || {
                format!(
                    "must be between 1 and 65535 (MQTT keep-alive), got {}",
                    azure.keep_alive_secs
                )
            },
        )?;
        at_least(azure.tps, 1, "cloud.azure.tps")?;
        check(
            (60..=365 * 24 * 3600).contains(&azure.sas_ttl_secs),
            "cloud.azure.sas_ttl_secs",
            || {
                format!(
                    "must be between 60 and 31536000 seconds, got {}",
                    azure.sas_ttl_secs
                )
            },
        )?;
        if self.cloud.provider == CloudProvider::Azure {
            check(azure.id_scope.is_some(), "cloud.provider", || {
                "\"azure\" needs cloud.azure.id_scope".into()
            })?;
            check(azure.ca.is_some(), "cloud.provider", || {
                "\"azure\" needs cloud.azure.ca (the CAs DPS and IoT Hub chain to, e.g. /etc/ssl/certs/ca-certificates.crt)".into()
            })?;
            match azure.attestation {
                AzureAttestation::SymmetricKey => check(
                    azure.group_key.is_some() || azure.group_key_file.is_some(),
                    "cloud.azure.attestation",
                    || {
                        "\"symmetric-key\" needs cloud.azure.group_key or cloud.azure.group_key_file (the enrollment group's primary key)".into()
                    },
                )?,
                AzureAttestation::X509 => check(
                    azure.group_ca_cert.is_some() && azure.group_ca_key.is_some(),
                    "cloud.azure.attestation",
                    || {
                        "\"x509\" needs cloud.azure.group_ca_cert and cloud.azure.group_ca_key (the enrollment group's CA)".into()
                    },
                )?,
            }
            let t = &self.telemetry;
            let defaults = super::TelemetrySection::default();
            check(t.topic == defaults.topic, "telemetry.topic", || {
                "is an AWS-only key: with cloud.provider = \"azure\" telemetry goes to devices/{deviceId}/messages/events/".into()
            })?;
            check(
                t.commands_topic == defaults.commands_topic,
                "telemetry.commands_topic",
                || {
                    "is an AWS-only key: with cloud.provider = \"azure\" commands come from devices/{deviceId}/messages/devicebound/#".into()
                },
            )?;
            check(
                t.identity == TelemetryIdentity::Device,
                "telemetry.identity",
                || {
                    "\"gateway\" is not available with cloud.provider = \"azure\": IoT Hub cannot carry many devices over one MQTT connection; use \"device\"".into()
                },
            )?;
        }
        Ok(())
    }

    fn validate_telemetry(&self) -> Result<(), Violation> {
        let t = &self.telemetry;
        check(!t.topic.is_empty(), "telemetry.topic", || {
            "must not be empty".into()
        })?;
        check(!has_wildcard(&t.topic), "telemetry.topic", || {
            format!(
                "{:?} contains an MQTT wildcard ('+' or '#'); it is a publish topic",
                t.topic
            )
        })?;
        let filter_ok = !t.commands_topic.is_empty()
            && t.commands_topic.split('/').enumerate().all(|(i, level)| {
                let last = i == t.commands_topic.split('/').count() - 1;
                match level {
                    "+" => true,
                    "#" => last,
                    _ => !has_wildcard(level),
                }
            });
        check(filter_ok, "telemetry.commands_topic", || {
            format!(
                "{:?} is not an MQTT topic filter ('+' must fill a whole level, '#' only as the last level)",
                t.commands_topic
            )
        })?;
        at_least(t.max_bytes, 1, "telemetry.max_bytes")?;
        at_least(t.max_age_secs, 1, "telemetry.max_age_secs")?;
        at_least(
            t.max_upstream_connections,
            1,
            "telemetry.max_upstream_connections",
        )?;
        at_least(t.idle_secs, 1, "telemetry.idle_secs")?;
        check(
            (1..=u32::from(u16::MAX)).contains(&t.inflight),
            "telemetry.inflight",
            || {
                format!(
                    "must be between 1 and 65535 (MQTT packet ids), got {}",
                    t.inflight
                )
            },
        )?;
        check(
            (1..=u32::from(u16::MAX)).contains(&t.gateway_inflight),
            "telemetry.gateway_inflight",
            || {
                format!(
                    "must be between 1 and 65535 (MQTT packet ids), got {}",
                    t.gateway_inflight
                )
            },
        )?;
        self.validate_gateway_identity()
    }

    fn validate_gateway_identity(&self) -> Result<(), Violation> {
        let t = &self.telemetry;
        not_both(
            &t.gateway_key_passphrase_file,
            &t.gateway_key_passphrase_credential,
            "telemetry.gateway_key_passphrase_file",
            "telemetry.gateway_key_passphrase_credential",
        )?;
        if let Some(id) = &t.gateway_client_id {
            // AWS IoT: 1-128 bytes; a wildcard or '/' could never match a thing name.
            check(
                (1..=128).contains(&id.len()) && !has_wildcard(id) && !id.contains('/'),
                "telemetry.gateway_client_id",
                || format!("{id:?} is not an MQTT client id (1-128 bytes, no '+', '#' or '/')"),
            )?;
        }
        if t.identity == TelemetryIdentity::Gateway {
            let missing: Vec<&str> = [
                ("telemetry.gateway_cert", t.gateway_cert.is_none()),
                ("telemetry.gateway_key", t.gateway_key.is_none()),
            ]
            .into_iter()
            .filter_map(|(key, missing)| missing.then_some(key))
            .collect();
            check(missing.is_empty(), "telemetry.identity", || {
                format!(
                    "\"gateway\" needs {} (the gateway's own certificate chain and key for its upstream connection)",
                    missing.join(" and ")
                )
            })?;
        }
        Ok(())
    }
}
