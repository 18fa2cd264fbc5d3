//! Telemetry: the durable store-and-forward path from downstream devices to the cloud, and
//! cloud-to-device commands back (docs/architecture.md, "Telemetry").
//!
//! ```text
//! downstream session ──► intake ──► outbox (store, group commit) ──► ack downstream PUBLISH
//!                          │ hand-off (in memory)          ▲ remove (batched, durable)
//!                          ▼                               │
//!                      dispatcher ──► links (one rumqttc connection per device, or one for
//!                                     the gateway) ──► PUBACK ──► remover
//! ```
//!
//! - [`intake`] takes telemetry messages in batches, refuses those of devices that are not
//!   provisioned or are disabled (counted, a notice on `fleetgw/{id}/status` at most once a
//!   minute per device) and payloads above the cloud's limit, appends the rest to the outbox
//!   with one group commit per batch and only then acknowledges the downstream PUBLISHes. When
//!   the outbox is full it either stops acknowledging (`backpressure`) or drops the oldest
//!   messages (`drop-oldest`).
//! - [`dispatch`] loads messages (handed over in memory, or scanned from the outbox after a
//!   restart or when more is stored than it keeps in memory) in outbox order and routes them to
//!   links, opening device links lazily, closing idle ones and keeping at most
//!   `max_upstream_connections` open (LRU among idle links).
//! - [`link`] publishes at QoS 1 with a bounded in-flight window, in order, and republishes
//!   what was unacknowledged after a reconnect; the remover deletes acknowledged messages from
//!   the outbox in batches and only then frees their window slots, so a crash resends at most
//!   one window per link.
//!
//! Per-device order holds because outbox keys are arrival order, a device's messages always
//! take the same link, and a link never reorders.

mod ack;
pub mod delay;
mod directory;
mod dispatch;
mod https_link;
mod intake;
mod link;
pub mod topic;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::cloud::{
    CloudError, TelemetryProfile, UpstreamAuth, UpstreamSpec, UpstreamTransport, Upstreams,
};
use crate::config::{TelemetryIdentity, WhenFull};
use crate::device_id::DeviceId;
use crate::downstream::{DownstreamMessage, DownstreamSession};
use crate::identity::{tls, IdentityError, PrivateKey, Sealer};
pub use crate::mqtt::upstream::MqttVersion;
use crate::store::Store;

pub use topic::{CommandFilter, TopicTemplate};

/// AWS IoT Core's largest publish payload (128 KiB).
pub const AWS_MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// The cloud's MQTT endpoint (mutual TLS).
#[derive(Clone, Debug)]
pub struct UpstreamEndpoint {
    /// Host name (also the TLS server name) or IP address.
    pub host: String,
    /// Port (8883 for AWS IoT).
    pub port: u16,
    /// PEM CA certificate(s) the endpoint's certificate chains to.
    pub ca_pem: String,
}

impl UpstreamEndpoint {
    /// Parses `[cloud.aws] endpoint` (`host[:port]`, port 8883 when absent; IPv6 in brackets).
    pub fn parse(endpoint: &str, ca_pem: String) -> Result<Self, TelemetryError> {
        let bad = |reason: &str| TelemetryError::Option {
            key: "cloud.aws.endpoint",
            reason: format!("{endpoint:?}: {reason}"),
        };
        let (host, port) = match endpoint.strip_prefix('[') {
            Some(v6) => {
                let (host, rest) = v6
                    .split_once(']')
                    .ok_or_else(|| bad("unterminated '[' in an IPv6 address"))?;
                (host, rest.strip_prefix(':'))
            }
            None => match endpoint.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (endpoint, None),
            },
        };
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(bad(
                "expected host[:port], e.g. abc123-ats.iot.eu-west-1.amazonaws.com:8883",
            ));
        }
        let port = match port {
            None => 8883,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
        };
        Ok(Self {
            host: host.to_string(),
            port,
            ca_pem,
        })
    }
}

/// AWS IoT's convention: every device connects to this endpoint with its own certificate,
/// client id = thing name.
impl Upstreams for UpstreamEndpoint {
    fn upstream(
        &self,
        _device: &DeviceId,
        cloud_id: &str,
        _endpoint: Option<&str>,
    ) -> Result<UpstreamSpec, CloudError> {
        Ok(UpstreamSpec {
            transport: UpstreamTransport::Mqtt,
            host: self.host.clone(),
            port: self.port,
            connect: None,
            ca_pem: Arc::from(self.ca_pem.as_str()),
            client_id: cloud_id.to_string(),
            username: None,
            auth: UpstreamAuth::DeviceCertificate,
        })
    }
}

/// The gateway's own upstream identity, for `identity = "gateway"`.
#[derive(Clone, Debug)]
pub struct GatewayCredentials {
    /// MQTT client id (the gateway's thing name).
    pub client_id: String,
    /// Certificate chain (PEM).
    pub cert_pem: String,
    /// Private key.
    pub key: Arc<PrivateKey>,
}

/// Settings of the telemetry pipeline (from `[telemetry]` plus the cloud endpoint).
#[derive(Clone, Debug)]
pub struct TelemetryOptions {
    /// Device or gateway identity upstream.
    pub identity: TelemetryIdentity,
    /// Required when `identity` is [`TelemetryIdentity::Gateway`].
    pub gateway: Option<GatewayCredentials>,
    /// The cloud endpoint of the gateway identity's link (AWS).
    pub endpoint: UpstreamEndpoint,
    /// How each device connects upstream (the provider's answer; by default AWS's convention
    /// at `endpoint`).
    pub upstreams: Arc<dyn Upstreams>,
    /// Upstream topic template.
    pub topic: TopicTemplate,
    /// Commands filter template; `None` disables cloud-to-device forwarding.
    pub commands: Option<CommandFilter>,
    /// Outbox size limit (encoded bytes).
    pub max_bytes: u64,
    /// Messages older than this are not sent (counted as expired).
    pub max_age: Duration,
    /// Policy when the outbox is full.
    pub when_full: WhenFull,
    /// Open device connections at most.
    pub max_upstream_connections: usize,
    /// Idle device connections are closed after this.
    pub idle: Duration,
    /// Unacknowledged publishes per device connection.
    pub inflight: u16,
    /// Unacknowledged publishes on the gateway's connection (gateway identity), which
    /// carries every device: a window of 10 there would hold all of them to 10 messages per
    /// round trip and deletion flush.
    pub gateway_inflight: u16,
    /// Largest payload accepted (the cloud's limit).
    pub max_payload_bytes: usize,
    /// Devices connect upstream with their own certificate, so in `device` identity the
    /// gateway must hold their key (false with SAS tokens).
    pub device_certificates: bool,
    /// Bytes of messages kept in memory for sending; the rest waits in the outbox.
    pub max_memory_bytes: usize,
    /// Messages per outbox append (one group commit).
    pub batch_max: usize,
    /// How long a device's telemetry verdict (provisioned, enabled) is cached.
    pub device_cache_ttl: Duration,
    /// Refusal notices and logs per device at most this often.
    pub notice_interval: Duration,
    /// MQTT keep-alive upstream.
    pub keep_alive: Duration,
    /// MQTT 5 (properties travel upstream) or 3.1.1, for every MQTT link.
    pub mqtt_version: MqttVersion,
    /// TCP + TLS + CONNACK limit of one connection attempt.
    pub connect_timeout: Duration,
    /// First reconnect delay (jittered, doubling).
    pub reconnect_min: Duration,
    /// Reconnect delay cap.
    pub reconnect_max: Duration,
    /// How long forwarding one command downstream may take.
    pub command_timeout: Duration,
}

impl TelemetryOptions {
    /// The `[telemetry]` defaults for `endpoint`.
    pub fn new(endpoint: UpstreamEndpoint) -> Self {
        Self {
            identity: TelemetryIdentity::Device,
            gateway: None,
            upstreams: Arc::new(endpoint.clone()),
            endpoint,
            topic: TopicTemplate::parse("dt/{thingName}/telemetry{/subtopic}")
                .unwrap_or_else(|_| unreachable!("the default topic template parses")),
            commands: Some(
                CommandFilter::parse("cmd/{thingName}/#")
                    .unwrap_or_else(|_| unreachable!("the default commands filter parses")),
            ),
            max_bytes: 256 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            when_full: WhenFull::Backpressure,
            max_upstream_connections: 1000,
            idle: Duration::from_secs(300),
            inflight: 10,
            gateway_inflight: 500,
            max_payload_bytes: AWS_MAX_PAYLOAD_BYTES,
            device_certificates: true,
            max_memory_bytes: 32 * 1024 * 1024,
            batch_max: 2048,
            device_cache_ttl: Duration::from_secs(5),
            notice_interval: Duration::from_secs(60),
            keep_alive: Duration::from_secs(60),
            mqtt_version: MqttVersion::V5,
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            command_timeout: Duration::from_secs(10),
        }
    }

    /// Options from the config's `[telemetry]` section for `endpoint`, with the provider's
    /// topics and payload limit (`profile`); the rest keep their defaults.
    /// `identity = "gateway"` also needs [`TelemetryOptions::gateway`] set.
    pub fn from_config(
        section: &crate::config::TelemetrySection,
        endpoint: UpstreamEndpoint,
        profile: TelemetryProfile,
    ) -> Result<Self, TelemetryError> {
        let mut o = Self::new(endpoint);
        o.identity = section.identity;
        if o.identity == TelemetryIdentity::Gateway && !profile.gateway_identity {
            return Err(TelemetryError::Option {
                key: "telemetry.identity",
                reason: "\"gateway\" is not available with this cloud provider: IoT Hub has no way to carry many devices over one MQTT connection; use \"device\"".into(),
            });
        }
        o.topic = profile.topic;
        o.commands = profile.commands;
        o.max_payload_bytes = profile.max_payload_bytes;
        o.device_certificates = profile.device_certificates;
        o.mqtt_version = profile.mqtt_version;
        o.max_bytes = section.max_bytes;
        o.max_age = Duration::from_secs(section.max_age_secs);
        o.when_full = section.when_full;
        o.max_upstream_connections = section.max_upstream_connections as usize;
        o.idle = Duration::from_secs(section.idle_secs);
        o.inflight = u16::try_from(section.inflight).map_err(|_| TelemetryError::Option {
            key: "telemetry.inflight",
            reason: format!("must be between 1 and 65535, got {}", section.inflight),
        })?;
        o.gateway_inflight =
            u16::try_from(section.gateway_inflight).map_err(|_| TelemetryError::Option {
                key: "telemetry.gateway_inflight",
                reason: format!(
                    "must be between 1 and 65535, got {}",
                    section.gateway_inflight
                ),
            })?;
        o.validate_settings()?;
        Ok(o)
    }

    fn validate(&self) -> Result<(), TelemetryError> {
        self.validate_settings()?;
        if self.identity == TelemetryIdentity::Gateway && self.gateway.is_none() {
            return Err(TelemetryError::Option {
                key: "telemetry.identity",
                reason: "\"gateway\" needs the gateway's upstream certificate and key".into(),
            });
        }
        Ok(())
    }

    fn validate_settings(&self) -> Result<(), TelemetryError> {
        let bad = |key: &'static str, reason: String| Err(TelemetryError::Option { key, reason });
        if self.inflight == 0 {
            return bad("telemetry.inflight", "must be at least 1".into());
        }
        if self.gateway_inflight == 0 {
            return bad("telemetry.gateway_inflight", "must be at least 1".into());
        }
        if self.max_upstream_connections == 0 {
            return bad(
                "telemetry.max_upstream_connections",
                "must be at least 1".into(),
            );
        }
        if self.max_bytes < (self.max_payload_bytes as u64) * 2 + 4096 {
            return bad(
                "telemetry.max_bytes",
                format!(
                    "{} is too small: it must hold at least two of the largest messages ({} bytes each)",
                    self.max_bytes, self.max_payload_bytes
                ),
            );
        }
        if self.max_age.is_zero() {
            return bad("telemetry.max_age_secs", "must be at least 1".into());
        }
        if self.reconnect_min.is_zero() {
            return bad("telemetry.reconnect_min", "must be above zero".into());
        }
        Ok(())
    }
}

/// Why telemetry could not start (or a device could not be connected upstream).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A setting is out of range.
    #[error("{key}: {reason}")]
    Option {
        /// The config key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A topic template does not parse.
    #[error("{key} {template:?}: {reason}")]
    Topic {
        /// The config key.
        key: &'static str,
        /// The template as configured.
        template: String,
        /// What is wrong.
        reason: String,
    },
    /// The gateway's upstream TLS identity is unusable.
    #[error("gateway upstream identity: {0}")]
    GatewayTls(#[source] IdentityError),
    /// A device's upstream credentials could not be loaded.
    #[error("device {device}: cannot connect upstream: {reason}")]
    DeviceCredentials {
        /// The device.
        device: DeviceId,
        /// What is missing or broken.
        reason: String,
    },
}

/// Counters shared by the pipeline's tasks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub received: AtomicU64,
    pub accepted: AtomicU64,
    pub forwarded: AtomicU64,
    pub refused_unknown: AtomicU64,
    pub refused_not_provisioned: AtomicU64,
    pub refused_disabled: AtomicU64,
    pub refused_no_key: AtomicU64,
    pub oversize: AtomicU64,
    pub dropped_full: AtomicU64,
    pub expired: AtomicU64,
    pub undeliverable: AtomicU64,
    pub refused_upstream: AtomicU64,
    pub backpressure_episodes: AtomicU64,
    pub commands_forwarded: AtomicU64,
    pub commands_failed: AtomicU64,
    pub upstream_connects: AtomicU64,
    pub upstream_disconnects: AtomicU64,
    pub append_batches: AtomicU64,
    pub remove_batches: AtomicU64,
    pub open_links: AtomicUsize,
    pub parked_devices: AtomicUsize,
    pub memory_bytes: AtomicUsize,
    /// Broker read to upstream write, per message handed over in memory.
    pub forward_delay: delay::DelayHistogram,
}

/// A snapshot of the pipeline's counters (admin `/metrics`, `/status`, tests).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryStats {
    /// Telemetry messages taken from downstream.
    pub received: u64,
    /// Stored in the outbox and acknowledged downstream.
    pub accepted: u64,
    /// Acknowledged by the cloud and removed from the outbox.
    pub forwarded: u64,
    /// Refused: unknown device id.
    pub refused_unknown: u64,
    /// Refused: device not (yet) provisioned.
    pub refused_not_provisioned: u64,
    /// Refused: device disabled.
    pub refused_disabled: u64,
    /// Refused: device mode, but the device's key is not held by the gateway.
    pub refused_no_key: u64,
    /// Refused: payload above the cloud's limit.
    pub oversize: u64,
    /// Deleted unsent by `drop-oldest`.
    pub dropped_full: u64,
    /// Not sent because older than `max_age`.
    pub expired: u64,
    /// Not sent because the device's record is gone.
    pub undeliverable: u64,
    /// Dropped because the cloud refused them for good: a PUBACK failure reason code that
    /// would come back every time, or larger than its Maximum Packet Size (MQTT 5).
    pub refused_upstream: u64,
    /// Times the outbox was full under `backpressure`.
    pub backpressure_episodes: u64,
    /// Cloud-to-device messages delivered downstream.
    pub commands_forwarded: u64,
    /// Cloud-to-device messages the local broker did not take.
    pub commands_failed: u64,
    /// Upstream CONNACKs.
    pub upstream_connects: u64,
    /// Upstream connections lost or refused.
    pub upstream_disconnects: u64,
    /// Outbox appends (group commits) made by the intake; `accepted / append_batches` is
    /// the mean batch size.
    pub append_batches: u64,
    /// Outbox removal batches made by the remover.
    pub remove_batches: u64,
    /// Upstream connections open now.
    pub open_connections: u64,
    /// Devices waiting for a connection slot or for credentials.
    pub parked_devices: u64,
    /// Bytes of messages loaded in memory.
    pub memory_bytes: u64,
    /// Messages in the outbox.
    pub outbox_messages: u64,
    /// Encoded bytes in the outbox.
    pub outbox_bytes: u64,
    /// Time from the broker's read to the upstream write (`/metrics` only).
    #[serde(skip)]
    pub forward_delay: delay::DelaySnapshot,
}

/// Everything a pipeline task needs to share.
pub(crate) struct Shared {
    pub opts: TelemetryOptions,
    pub store: Store,
    pub downstream: Arc<DownstreamSession>,
    pub counters: Arc<Counters>,
    /// Signalled when the remover freed outbox space (intake waits on it under backpressure).
    pub room: Notify,
    /// Signalled when loaded messages left memory (the dispatcher loads more).
    pub freed: Notify,
}

/// The running telemetry pipeline.
pub struct Telemetry {
    shared: Arc<Shared>,
    /// Tells the dispatcher to close a device's upstream link.
    closer: mpsc::Sender<dispatch::Handoff>,
    shutdown: watch::Sender<bool>,
    intake: JoinHandle<()>,
    dispatcher: JoinHandle<()>,
    remover: JoinHandle<()>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Starts the pipeline: `inbound` carries the downstream telemetry messages (the telemetry
    /// queue of [`crate::downstream::Downstream::start_routed`]); whatever the outbox holds
    /// from before is sent first.
    pub fn start(
        opts: TelemetryOptions,
        store: Store,
        downstream: Arc<DownstreamSession>,
        sealer: Option<Arc<Sealer>>,
        inbound: mpsc::Receiver<DownstreamMessage>,
    ) -> Result<Self, TelemetryError> {
        opts.validate()?;
        let gateway_tls = match &opts.gateway {
            Some(g) if opts.identity == TelemetryIdentity::Gateway => Some((
                g.client_id.clone(),
                tls::client_config(&opts.endpoint.ca_pem, Some((&g.cert_pem, &g.key)))
                    .map_err(TelemetryError::GatewayTls)?,
            )),
            _ => None,
        };
        let shared = Arc::new(Shared {
            opts,
            store,
            downstream,
            counters: Arc::new(Counters::default()),
            room: Notify::new(),
            freed: Notify::new(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (handoff_tx, handoff_rx) = mpsc::channel(64);
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        let remover = tokio::spawn(dispatch::remover(shared.clone(), settled_rx, finished_tx));
        let dispatcher = dispatch::Dispatcher::new(
            shared.clone(),
            sealer,
            gateway_tls,
            handoff_rx,
            settled_tx,
            shutdown_rx.clone(),
        );
        let dispatcher = tokio::spawn(dispatcher.run());
        let closer = handoff_tx.clone();
        let intake = intake::Intake::new(shared.clone(), inbound, handoff_tx, shutdown_rx);
        let intake = tokio::spawn(intake.run(finished_rx));
        Ok(Self {
            shared,
            closer,
            shutdown,
            intake,
            dispatcher,
            remover,
        })
    }

    /// The pipeline's counters now.
    pub fn stats(&self) -> TelemetryStats {
        snapshot(&self.shared)
    }

    /// A handle that closes a device's upstream link (device identity), for the admin API:
    /// after its certificate was replaced the old one must no longer be used upstream.
    /// Unsent messages wait for the next link, opened with the new certificate.
    pub fn link_closer(&self) -> Arc<dyn Fn(&DeviceId) + Send + Sync> {
        let tx = self.closer.clone();
        Arc::new(move |device: &DeviceId| {
            let tx = tx.clone();
            let device = device.clone();
            tokio::spawn(async move {
                let _ = tx.send(dispatch::Handoff::Close(device)).await;
            });
        })
    }

    /// A handle reading the counters, for the admin API (it outlives no part of the pipeline
    /// it reads: only the shared counters and the store).
    pub fn stats_source(&self) -> Arc<dyn Fn() -> TelemetryStats + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || snapshot(&shared))
    }

    /// Whether the intake, dispatcher and remover loops all still run (the watchdog's health
    /// check): one that ended or panicked means telemetry no longer flows.
    pub fn is_alive(&self) -> bool {
        !self.intake.is_finished() && !self.dispatcher.is_finished() && !self.remover.is_finished()
    }

    /// Stops taking messages (those not yet acknowledged stay with the broker), closes the
    /// upstream connections and finishes pending outbox removals, waiting at most `within`.
    /// Unsent messages stay in the outbox for the next start.
    pub async fn shutdown(self, within: Duration) {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + within;
        for (name, task) in [
            ("intake", self.intake),
            ("dispatcher", self.dispatcher),
            ("remover", self.remover),
        ] {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!("telemetry {name} did not stop within {within:?}; aborting it");
                abort.abort();
            }
        }
    }
}

/// Resolves once shutdown was signalled (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it here, inside.
    let _ = rx.wait_for(|s| *s).await.is_ok();
}

fn snapshot(shared: &Shared) -> TelemetryStats {
    let c = &shared.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    TelemetryStats {
        received: get(&c.received),
        accepted: get(&c.accepted),
        forwarded: get(&c.forwarded),
        refused_unknown: get(&c.refused_unknown),
        refused_not_provisioned: get(&c.refused_not_provisioned),
        refused_disabled: get(&c.refused_disabled),
        refused_no_key: get(&c.refused_no_key),
        oversize: get(&c.oversize),
        dropped_full: get(&c.dropped_full),
        expired: get(&c.expired),
        undeliverable: get(&c.undeliverable),
        refused_upstream: get(&c.refused_upstream),
        backpressure_episodes: get(&c.backpressure_episodes),
        commands_forwarded: get(&c.commands_forwarded),
        commands_failed: get(&c.commands_failed),
        upstream_connects: get(&c.upstream_connects),
        upstream_disconnects: get(&c.upstream_disconnects),
        append_batches: get(&c.append_batches),
        remove_batches: get(&c.remove_batches),
        open_connections: c.open_links.load(Ordering::Relaxed) as u64,
        parked_devices: c.parked_devices.load(Ordering::Relaxed) as u64,
        memory_bytes: c.memory_bytes.load(Ordering::Relaxed) as u64,
        outbox_messages: shared.store.outbox_len(),
        outbox_bytes: shared.store.outbox_bytes(),
        forward_delay: c.forward_delay.snapshot(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parses_host_and_port_with_the_aws_default() {
        let e =
            UpstreamEndpoint::parse("abc-ats.iot.eu-west-1.amazonaws.com", String::new()).unwrap();
        assert_eq!(
            (e.host.as_str(), e.port),
            ("abc-ats.iot.eu-west-1.amazonaws.com", 8883)
        );
        let e = UpstreamEndpoint::parse("localhost:18883", String::new()).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("localhost", 18883));
        let e = UpstreamEndpoint::parse("[::1]:9000", String::new()).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 9000));
        for bad in ["", ":8883", "host:0", "host:x", "mqtts://host"] {
            let msg = UpstreamEndpoint::parse(bad, String::new())
                .unwrap_err()
                .to_string();
            assert!(msg.contains("cloud.aws.endpoint"), "{bad}: {msg}");
        }
    }

    #[test]
    fn config_section_maps_onto_options() {
        let mut section = crate::config::TelemetrySection {
            topic: "site/{deviceId}{/subtopic}".into(),
            when_full: crate::config::WhenFull::DropOldest,
            inflight: 25,
            gateway_inflight: 400,
            idle_secs: 7,
            ..Default::default()
        };
        let endpoint = UpstreamEndpoint::parse("localhost", String::new()).unwrap();
        let profile = crate::cloud::aws::telemetry_profile(&section).unwrap();
        let o = TelemetryOptions::from_config(&section, endpoint.clone(), profile.clone()).unwrap();
        assert_eq!(o.topic.render("t", "d", "x"), "site/d/x");
        assert_eq!(o.when_full, WhenFull::DropOldest);
        assert_eq!(o.inflight, 25);
        assert_eq!(o.gateway_inflight, 400);
        assert_eq!(o.idle, Duration::from_secs(7));
        assert_eq!(o.identity, TelemetryIdentity::Device);
        section.max_bytes = 1000;
        let msg = TelemetryOptions::from_config(&section, endpoint, profile)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("telemetry.max_bytes"), "{msg}");
    }

    /// The options' own defaults (what tests and the embedding code start from) are the
    /// config's: an empty `[telemetry]` section changes none of them.
    #[test]
    fn an_empty_section_keeps_the_defaults() {
        let section = crate::config::TelemetrySection::default();
        let endpoint = UpstreamEndpoint::parse("localhost", String::new()).unwrap();
        let profile = crate::cloud::aws::telemetry_profile(&section).unwrap();
        let d = TelemetryOptions::new(endpoint.clone());
        let o = TelemetryOptions::from_config(&section, endpoint, profile).unwrap();
        assert_eq!(
            (o.identity, o.inflight, o.gateway_inflight, o.when_full),
            (d.identity, d.inflight, d.gateway_inflight, d.when_full)
        );
        assert_eq!(
            (o.max_bytes, o.max_age, o.idle, o.max_upstream_connections),
            (d.max_bytes, d.max_age, d.idle, d.max_upstream_connections)
        );
        assert_eq!(o.max_payload_bytes, d.max_payload_bytes);
    }
}
