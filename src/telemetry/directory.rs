//! What telemetry needs to know about a device, read from the store and cached briefly: may
//! it send telemetry (provisioned, enabled, and in `device` mode the gateway holds its key), its
//! thing name, and the TLS identity it connects upstream with.
//!
//! The verdict is cached for `ttl` so the hot path does not decode a device record per
//! message; an operator disabling a device takes effect within that time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::TelemetryError;
use crate::admission::sas;
use crate::cloud::{UpstreamAuth, UpstreamSpec, UpstreamTransport, Upstreams};
use crate::config::TelemetryIdentity;
use crate::device_id::DeviceId;
use crate::downstream::{DeviceStatus, RejectedResponse};
use crate::identity::{tls, PrivateKey, SealedRecord, Sealer};
use crate::store::{DeviceRecord, DeviceState, Store};

/// Why a device's telemetry is not forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// Counter bucket.
    pub kind: RefusalKind,
    /// The device's current status for the notice (`None`: unknown device, no notice).
    pub status: Option<DeviceStatus>,
    /// The notice's error.
    pub error: RejectedResponse,
}

/// Counter buckets of refused telemetry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RefusalKind {
    Unknown,
    NotProvisioned,
    Disabled,
    NoKey,
}

/// The cached verdict for one device.
#[derive(Clone, Debug)]
pub(crate) enum Gate {
    Forward {
        thing_name: Arc<str>,
    },
    Refuse(Arc<Refusal>),
    /// The record could not be read: not the device's fault, so the message is left
    /// unacknowledged (the broker redelivers it) and the verdict is not cached.
    Unavailable(String),
}

/// Device lookups with a short-lived cache.
pub(crate) struct Directory {
    store: Store,
    mode: TelemetryIdentity,
    /// Devices connect with their certificate: the gateway must hold their key.
    certificates: bool,
    ttl: Duration,
    cache: HashMap<DeviceId, (Instant, Gate)>,
}

/// Bound on cached verdicts; devices publishing under random ids must not grow memory forever.
const MAX_CACHED: usize = 100_000;

impl Directory {
    pub fn new(store: Store, mode: TelemetryIdentity, certificates: bool, ttl: Duration) -> Self {
        Self {
            store,
            mode,
            certificates,
            ttl,
            cache: HashMap::new(),
        }
    }

    /// The verdict for `id`, from the cache when fresh.
    pub fn gate(&mut self, id: &DeviceId) -> Gate {
        let now = Instant::now();
        if let Some((at, gate)) = self.cache.get(id) {
            if now.duration_since(*at) < self.ttl {
                return gate.clone();
            }
        }
        let gate = self.lookup(id);
        if matches!(gate, Gate::Unavailable(_)) {
            return gate;
        }
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        self.cache.insert(id.clone(), (now, gate.clone()));
        gate
    }

    fn lookup(&self, id: &DeviceId) -> Gate {
        match self.store.device(id) {
            Ok(Some(rec)) => verdict(&rec, self.mode, self.certificates),
            Ok(None) => refuse(
                RefusalKind::Unknown,
                None,
                404,
                "DeviceNotProvisioned",
                format!(
                    "device {id} is unknown to the gateway; provision it before sending telemetry"
                ),
            ),
            Err(e) => Gate::Unavailable(e.to_string()),
        }
    }
}

fn refuse(
    kind: RefusalKind,
    status: Option<DeviceStatus>,
    code: u16,
    error_code: &str,
    message: String,
) -> Gate {
    Gate::Refuse(Arc::new(Refusal {
        kind,
        status,
        error: RejectedResponse::new(code, error_code, message),
    }))
}

fn verdict(rec: &DeviceRecord, mode: TelemetryIdentity, certificates: bool) -> Gate {
    let id = &rec.id;
    let status = DeviceStatus::of(&rec.state);
    // The engine publishes `/accepted` only after `Registered` is durable and records
    // `Delivered` after that publish; a device that starts sending as soon as it has its answer
    // must not be refused in between.
    if !matches!(
        rec.state,
        DeviceState::Registered { .. } | DeviceState::Delivered
    ) {
        return refuse(
            RefusalKind::NotProvisioned,
            Some(status),
            403,
            "DeviceNotProvisioned",
            format!(
                "device {id} is {} and not provisioned; its telemetry is not forwarded",
                status.as_str()
            ),
        );
    }
    if !rec.enabled {
        return refuse(
            RefusalKind::Disabled,
            Some(status),
            403,
            "DeviceDisabled",
            format!("device {id} is disabled; its telemetry is not forwarded"),
        );
    }
    let Some(thing) = rec.provision.thing_name.as_deref() else {
        return refuse(
            RefusalKind::NotProvisioned,
            Some(status),
            500,
            "NoThingName",
            format!("device {id} has no thing name recorded; reprovision it"),
        );
    };
    if mode == TelemetryIdentity::Device
        && certificates
        && (!rec.provision.gateway_key || rec.provision.certificate_pem.is_none())
    {
        return refuse(
            RefusalKind::NoKey,
            Some(status),
            403,
            "NoDeviceKeyAtGateway",
            format!(
                "device {id} brought its own key, so the gateway cannot connect as it (telemetry.identity = \"device\"); use identity = \"gateway\" or let the gateway generate the key"
            ),
        );
    }
    Gate::Forward {
        thing_name: Arc::from(thing),
    }
}

/// Where and as whom a device's link connects.
pub(crate) struct LinkTarget {
    /// The cloud's name for the device (for commands and logs).
    pub cloud_id: String,
    /// MQTT or HTTPS.
    pub transport: UpstreamTransport,
    /// MQTT client id.
    pub client_id: String,
    /// Host name (TLS server name; SAS host).
    pub host: String,
    /// Where to connect.
    pub address: (String, u16),
    /// TLS client configuration (with the device's certificate where it has one).
    pub tls: Arc<rustls::ClientConfig>,
    /// MQTT username.
    pub username: Option<String>,
    /// Makes a fresh password (SAS token) for each connection or request.
    pub password: Option<PasswordSource>,
}

/// Makes a fresh SAS token (MQTT password, HTTPS `Authorization`).
pub(crate) type PasswordSource = Arc<dyn Fn() -> String + Send + Sync>;

/// How `id` connects upstream: the provider's [`UpstreamSpec`] for its registration, with its
/// certificate from the device record and its key from the `secrets` tree (unsealed when a
/// sealing key is set), or SAS tokens from the key the provider derives.
pub(crate) fn device_target(
    store: &Store,
    sealer: Option<&Sealer>,
    provider: &dyn Upstreams,
    id: &DeviceId,
) -> Result<LinkTarget, TelemetryError> {
    let cred = |reason: String| TelemetryError::DeviceCredentials {
        device: id.clone(),
        reason,
    };
    let rec = store
        .device(id)
        .map_err(|e| cred(format!("reading its record: {e}")))?
        .ok_or_else(|| cred("it has no record (deleted?)".into()))?;
    let cloud_id = rec
        .provision
        .thing_name
        .clone()
        .ok_or_else(|| cred("no cloud registration recorded".into()))?;
    let spec: UpstreamSpec = provider
        .upstream(id, &cloud_id, rec.provision.endpoint.as_deref())
        .map_err(|e| cred(e.to_string()))?;
    let (tls, password) = match spec.auth {
        UpstreamAuth::DeviceCertificate => {
            let cert = rec
                .provision
                .certificate_pem
                .as_deref()
                .ok_or_else(|| cred("no certificate recorded".into()))?;
            let stored = store
                .secret(id)
                .map_err(|e| cred(format!("reading its key: {e}")))?
                .ok_or_else(|| cred("its private key is not in the store".into()))?;
            let plain = match sealer {
                Some(s) => s
                    .open(SealedRecord::DeviceKey, id.as_str(), &stored)
                    .map_err(|e| cred(format!("unsealing its key: {e}")))?,
                None => crate::identity::Secret::new(stored),
            };
            let pem = plain.expose_str().ok_or_else(|| {
                cred(
                    "the stored key is not PEM text (sealed, but no sealing key configured?)"
                        .into(),
                )
            })?;
            let key = PrivateKey::from_pem(pem).map_err(|e| cred(format!("its key: {e}")))?;
            let tls = tls::client_config(&spec.ca_pem, Some((cert, &key)))
                .map_err(|e| cred(format!("TLS configuration: {e}")))?;
            (tls, None)
        }
        UpstreamAuth::Sas {
            device_key,
            resource,
            ttl,
        } => {
            let tls = tls::client_config(&spec.ca_pem, None)
                .map_err(|e| cred(format!("TLS configuration: {e}")))?;
            let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 4).max(60);
            let password: PasswordSource = Arc::new(move || {
                let expiry = crate::clock::unix_secs().saturating_add(ttl_secs);
                sas::generate_sas(&resource, device_key.expose(), expiry, None)
            });
            (tls, Some(password))
        }
    };
    // One connection uses this config, and it reconnects rarely: no session resumption.
    // rustls's default cache holds 256 sessions (about 14 KB per device link); even one sized
    // for 2 held about 3.3 KB per link: its table, up to 8 tickets per server, and each
    // ticket's copy of the server's certificate chain (heaptrack, issue 22). A reconnect does
    // a full handshake instead, and `CONNECTS_AT_ONCE` paces a fleet reconnecting at once.
    let mut tls = tls;
    if let Some(c) = Arc::get_mut(&mut tls) {
        c.resumption = rustls::client::Resumption::disabled();
    }
    let address = match spec.connect {
        Some(addr) => (addr.ip().to_string(), addr.port()),
        None => (spec.host.clone(), spec.port),
    };
    Ok(LinkTarget {
        cloud_id,
        transport: spec.transport,
        client_id: spec.client_id,
        host: spec.host,
        address,
        tls,
        username: spec.username,
        password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(state: DeviceState) -> DeviceRecord {
        let mut r = DeviceRecord::new(DeviceId::parse("dev-1").unwrap(), "json", 0);
        r.state = state;
        r.provision.thing_name = Some("thing-1".into());
        r.provision.certificate_pem = Some("PEM".into());
        r.provision.gateway_key = true;
        r
    }

    #[test]
    fn only_registered_enabled_devices_are_forwarded() {
        match verdict(
            &rec(DeviceState::Delivered),
            TelemetryIdentity::Device,
            true,
        ) {
            Gate::Forward { thing_name } => assert_eq!(&*thing_name, "thing-1"),
            other => panic!("{other:?}"),
        }
        // Answered on `/accepted` but `Delivered` not yet recorded: already forwarded.
        let registered = DeviceState::Registered {
            cloud_id: "thing-1".into(),
            endpoint: None,
            extras: Default::default(),
        };
        assert!(matches!(
            verdict(&rec(registered), TelemetryIdentity::Device, true),
            Gate::Forward { .. }
        ));
        let Gate::Refuse(r) = verdict(
            &rec(DeviceState::WaitingApproval),
            TelemetryIdentity::Device,
            true,
        ) else {
            panic!("waiting device forwarded")
        };
        assert_eq!(r.kind, RefusalKind::NotProvisioned);
        assert_eq!(r.status, Some(DeviceStatus::WaitingApproval));
        assert!(r.error.error_message.contains("dev-1"));
        let mut disabled = rec(DeviceState::Delivered);
        disabled.enabled = false;
        let Gate::Refuse(r) = verdict(&disabled, TelemetryIdentity::Gateway, true) else {
            panic!("disabled device forwarded")
        };
        assert_eq!(r.kind, RefusalKind::Disabled);
        assert_eq!(r.status, Some(DeviceStatus::Provisioned));
    }

    #[test]
    fn own_key_devices_need_gateway_identity() {
        let mut own = rec(DeviceState::Delivered);
        own.provision.gateway_key = false;
        let Gate::Refuse(r) = verdict(&own, TelemetryIdentity::Device, true) else {
            panic!("forwarded without a key")
        };
        assert_eq!(r.kind, RefusalKind::NoKey);
        assert!(matches!(
            verdict(&own, TelemetryIdentity::Gateway, true),
            Gate::Forward { .. }
        ));
        // SAS devices (Azure symmetric key) hold no certificate and need no key at the gateway.
        own.provision.certificate_pem = None;
        assert!(matches!(
            verdict(&own, TelemetryIdentity::Device, false),
            Gate::Forward { .. }
        ));
    }
}
