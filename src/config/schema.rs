//! The configuration schema: one struct per `[section]`, their defaults (the values the
//! sample `gateway.toml` documents) and the accessors modules above use. Field names are the
//! key names operators write, so renaming a field is an interface change.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use super::{AdmissionMode, Origin, PayloadFormat};
use crate::identity::{KeyType, Secret};

/// The whole gateway configuration. Every key has a default; see `gateway.toml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[gateway]`: identity and state of this gateway.
    pub gateway: GatewaySection,
    /// `[admin]`: the local admin API socket.
    pub admin: AdminSection,
    /// `[downstream]`: the local MQTT side devices talk to.
    pub downstream: DownstreamSection,
    /// `[admission]`: which devices may provision.
    pub admission: AdmissionSection,
    /// `[provision]`: keys, retries and RegisterThing parameters.
    pub provision: ProvisionSection,
    /// `[cloud]`: the cloud provider and its settings.
    pub cloud: CloudSection,
    /// `[telemetry]`: upstream telemetry forwarding and the outbox.
    pub telemetry: TelemetrySection,
    /// `[store]`: the sled state store.
    pub store: StoreSection,
    /// `[log]`: logging.
    pub log: LogSection,
    /// Directory relative paths resolve against (the main config file's directory).
    #[serde(skip)]
    pub(super) base_dir: PathBuf,
    /// Files and overrides this config was built from, in merge order.
    #[serde(skip)]
    pub(super) sources: Vec<Origin>,
}

/// `[gateway]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySection {
    /// Gateway id (registration-id rules); used as its client id and in logs.
    pub id: String,
    /// Directory of the state store and device secrets (created 0700).
    pub state_dir: PathBuf,
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self {
            id: "gw-01".into(),
            state_dir: "/var/lib/fleetgw".into(),
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Unix socket of the admin API (mode 0660).
    pub socket: PathBuf,
    /// Group whose members (and root) may change state through the admin API.
    pub group: String,
    /// Group whose members may read (list, show, status, metrics) but change nothing; empty:
    /// no read-only group.
    pub read_group: String,
    /// Loopback TCP address of a second admin listener for tools that cannot speak Unix
    /// sockets (off when absent); it requires the bearer token of `token_file`.
    pub listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token of the TCP listener (needed with `listen`).
    pub token_file: Option<PathBuf>,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            socket: "/run/fleetgw/admin.sock".into(),
            group: "fleetgw".into(),
            read_group: String::new(),
            listen: None,
            token_file: None,
        }
    }
}

/// Which MQTT broker devices connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerMode {
    /// The MQTT broker inside the gateway process.
    #[default]
    Embedded,
    /// An existing broker (e.g. mosquitto) the gateway connects to as a client.
    External,
}

/// How the embedded broker knows a device is who its client id says (`[downstream] auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DownstreamAuth {
    /// By its client id alone (lab setting): anyone who reaches the listener can claim an id
    /// no device is connected with.
    #[default]
    None,
    /// The device proves its id at CONNECT (symmetric-key mode: user name = id, password =
    /// its SAS token).
    Device,
}

/// `[downstream]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownstreamSection {
    /// Embedded or external broker.
    pub broker: BrokerMode,
    /// How the embedded broker authenticates devices.
    pub auth: DownstreamAuth,
    /// Plain MQTT listener of the embedded broker; `None` (`"off"`) when only `tls_listen`
    /// serves devices.
    #[serde(
        deserialize_with = "socket_addr_or_off",
        serialize_with = "serialize_socket_addr_or_off"
    )]
    pub listen: Option<SocketAddr>,
    /// Optional MQTT-over-TLS listener of the embedded broker (needs `tls_cert`, `tls_key`).
    #[serde(
        deserialize_with = "optional_socket_addr",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls_listen: Option<SocketAddr>,
    /// Server certificate chain (PEM) for `tls_listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM) for `tls_listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// External broker URL, `mqtt://host:port` or `mqtts://host:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// CA bundle (PEM) to verify an external broker's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Username for an external broker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password for an external broker (prefer `password_file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// File holding the external broker password (trailing newline ignored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// First topic level of the device contract (`fleetgw/{id}/...`).
    pub topic_prefix: String,
    /// Largest MQTT packet accepted or sent, in bytes.
    pub max_packet_bytes: u32,
    /// Largest provisioning request payload accepted, in bytes.
    pub max_request_bytes: u32,
    /// Provisioning requests one device may send per minute.
    pub device_rate_per_minute: u32,
    /// Embedded broker: connections at once, all clients.
    pub max_connections: u32,
    /// Embedded broker: connections at once from one non-loopback address.
    pub max_connections_per_address: u32,
    /// Embedded broker: longest topic name or filter, in bytes.
    pub max_topic_bytes: u32,
    /// Embedded broker: most levels in a topic name or filter.
    pub max_topic_levels: u32,
    /// Embedded broker: subscriptions one client may hold.
    pub max_subscriptions_per_client: u32,
    /// Embedded broker: retained messages held, all topics.
    pub max_retained_messages: u32,
    /// Embedded broker: bytes of retained messages held, all topics.
    pub max_retained_bytes: u64,
    /// Embedded broker: sessions kept for absent clients.
    pub max_kept_sessions: u32,
    /// Embedded broker: the longest an absent client's session is kept, in seconds.
    pub kept_session_expiry_secs: u64,
    /// Embedded broker: PUBLISH packets one connection may send per second.
    pub max_inbound_per_second: u32,
    /// Embedded broker: time from TCP accept to a complete TLS handshake and CONNECT.
    pub connect_timeout_secs: u32,
    /// Send a gateway-generated private key to a device on a plain, unauthenticated
    /// connection from another host too (unsafe: anyone on the network can read it).
    pub allow_plain_key_delivery: bool,
    /// Local applications that may connect to the embedded broker with more than a
    /// device's rights (`[[downstream.users]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<DownstreamUser>,
}

/// One `[[downstream.users]]` entry: a local application (dashboard, historian, Node-RED).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownstreamUser {
    /// The MQTT user name it connects with.
    pub name: String,
    /// Argon2 PHC string of its password, as printed by `fleetgw passwd`.
    pub password_hash: String,
    /// Topic filters it may publish to; none means it may not publish.
    pub publish: Vec<String>,
    /// Topic filters it may subscribe within; none means it may not subscribe.
    pub subscribe: Vec<String>,
}

impl Default for DownstreamSection {
    fn default() -> Self {
        Self {
            broker: BrokerMode::Embedded,
            auth: DownstreamAuth::None,
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 1883))),
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            url: None,
            ca: None,
            username: None,
            password: None,
            password_file: None,
            topic_prefix: "fleetgw".into(),
            max_packet_bytes: 262_144,
            max_request_bytes: 65_536,
            device_rate_per_minute: 30,
            max_connections: 50_000,
            max_connections_per_address: 1024,
            max_topic_bytes: 1024,
            max_topic_levels: 32,
            max_subscriptions_per_client: 100,
            max_retained_messages: 100_000,
            max_retained_bytes: 64 * 1024 * 1024,
            max_kept_sessions: 50_000,
            kept_session_expiry_secs: 86_400,
            max_inbound_per_second: 10_000,
            connect_timeout_secs: 10,
            allow_plain_key_delivery: false,
            users: Vec::new(),
        }
    }
}

/// `[admission]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionSection {
    /// Admission mode.
    pub mode: AdmissionMode,
    /// Group key for `symmetric-key` mode, base64 (prefer `group_key_file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_key: Option<Secret>,
    /// File holding the base64 group key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_key_file: Option<PathBuf>,
    /// PEM bundle of CAs device certificates must chain to in `x509` mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_ca: Option<PathBuf>,
    /// How far an x509 attestation timestamp may be from the gateway's clock, in seconds.
    pub x509_window_secs: u64,
}

impl Default for AdmissionSection {
    fn default() -> Self {
        Self {
            mode: AdmissionMode::Approve,
            group_key: None,
            group_key_file: None,
            trusted_ca: None,
            x509_window_secs: 300,
        }
    }
}

/// `[provision]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvisionSection {
    /// Key type the gateway generates for devices that send no CSR.
    pub key_type: KeyType,
    /// Key types accepted in device CSRs.
    pub allowed_csr_key_types: Vec<KeyType>,
    /// Attempts per device before it stays `Failed`.
    pub max_attempts: u32,
    /// Timeout of one cloud request, in milliseconds.
    pub request_timeout_ms: u64,
    /// First retry delay (doubled per attempt, jittered), in milliseconds.
    pub retry_base_ms: u64,
    /// Retry delay cap, in milliseconds.
    pub retry_max_ms: u64,
    /// File with the key that seals device secrets at rest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealing_key_file: Option<PathBuf>,
    /// systemd credential name holding the sealing key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealing_credential: Option<String>,
    /// RegisterThing parameters; `{id}` is replaced by the device id. (Last: a TOML table.)
    pub parameters: BTreeMap<String, String>,
}

impl Default for ProvisionSection {
    fn default() -> Self {
        Self {
            key_type: KeyType::EcdsaP256,
            allowed_csr_key_types: KeyType::ALL.to_vec(),
            max_attempts: 10,
            request_timeout_ms: 10_000,
            retry_base_ms: 500,
            retry_max_ms: 60_000,
            sealing_key_file: None,
            sealing_credential: None,
            parameters: BTreeMap::from([("SerialNumber".to_string(), "{id}".to_string())]),
        }
    }
}

/// Which cloud provisions the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloudProvider {
    /// AWS IoT Core fleet provisioning.
    #[default]
    Aws,
    /// Azure IoT Hub Device Provisioning Service.
    Azure,
}

/// `[cloud]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudSection {
    /// The provider in use.
    pub provider: CloudProvider,
    /// `[cloud.aws]`
    pub aws: AwsSection,
    /// `[cloud.azure]`
    pub azure: AzureSection,
}

/// `[cloud.aws]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSection {
    /// IoT Core data endpoint, `host:port`.
    pub endpoint: String,
    /// CA bundle (PEM) that verifies the endpoint.
    pub ca: PathBuf,
    /// Claim certificate (PEM).
    pub claim_cert: PathBuf,
    /// Claim private key (any format `identity` imports).
    pub claim_key: PathBuf,
    /// File holding the claim key passphrase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_key_passphrase_file: Option<PathBuf>,
    /// systemd credential name holding the claim key passphrase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_key_passphrase_credential: Option<String>,
    /// Fleet provisioning template name.
    pub template: String,
    /// Payload format of the provisioning API.
    pub format: PayloadFormat,
    /// Claim sessions (MQTT connections), each with one request in flight.
    pub sessions: u32,
    /// Requests per second per API (token bucket).
    pub tps: u32,
    /// MQTT keep-alive of the claim sessions and the telemetry links, in seconds.
    pub keep_alive_secs: u64,
    /// MQTT version of the telemetry links to IoT Core: 5 (message properties travel with
    /// each publish) or 3 (MQTT 3.1.1, for endpoints and proxies that only speak it).
    pub mqtt_version: u8,
}

impl Default for AwsSection {
    fn default() -> Self {
        Self {
            endpoint: "localhost:8883".into(),
            ca: "ca.pem".into(),
            claim_cert: "claim.pem".into(),
            claim_key: "claim.key".into(),
            claim_key_passphrase_file: None,
            claim_key_passphrase_credential: None,
            template: "FleetTemplate".into(),
            format: PayloadFormat::Json,
            sessions: 4,
            tps: 50,
            keep_alive_secs: 60,
            mqtt_version: 5,
        }
    }
}

/// Transport to Azure DPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AzureTransport {
    /// MQTT over TLS.
    #[default]
    Mqtt,
    /// HTTPS REST.
    Https,
}

/// How the gateway attests to Azure DPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AzureAttestation {
    /// Group symmetric key (SAS tokens).
    #[default]
    SymmetricKey,
    /// X.509 group enrollment.
    X509,
}

/// `[cloud.azure]`: Azure IoT Hub Device Provisioning Service and the IoT Hub it assigns.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AzureSection {
    /// DPS ID scope (required when `cloud.provider = "azure"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_scope: Option<String>,
    /// DPS endpoint: a host name (`global.azure-devices-provisioning.net`, port 8883 for
    /// MQTT and 443 for HTTPS), `host:port`, or an `IP:PORT` to connect to.
    pub dps_endpoint: String,
    /// MQTT or HTTPS to DPS.
    pub transport: AzureTransport,
    /// Symmetric key or X.509.
    pub attestation: AzureAttestation,
    /// CA certificates (PEM) trusted for DPS and IoT Hub (e.g. the system bundle
    /// `/etc/ssl/certs/ca-certificates.crt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The symmetric-key enrollment group's primary key (base64); each device's key is
    /// derived from it. Not `admission.group_key`, which admits devices to the gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_key: Option<Secret>,
    /// A file holding `group_key` (base64), mode 0600.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_key_file: Option<PathBuf>,
    /// The X.509 enrollment group's CA certificate (PEM): the gateway issues each device a
    /// certificate under it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_ca_cert: Option<PathBuf>,
    /// That CA's private key (PEM), mode 0600.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_ca_key: Option<PathBuf>,
    /// File holding the passphrase of an encrypted `group_ca_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_ca_key_passphrase_file: Option<PathBuf>,
    /// systemd credential holding that passphrase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_ca_key_passphrase_credential: Option<String>,
    /// MQTT or HTTPS to IoT Hub for telemetry.
    pub hub_transport: AzureTransport,
    /// Where to reach the assigned hub (`IP:PORT`) instead of its host name; the name stays
    /// in SAS tokens and usernames.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_connect: Option<SocketAddr>,
    /// DPS registrations in flight at most (each uses its own connection).
    pub registrations: u32,
    /// DPS calls per second at most (registrations and status polls).
    pub tps: u32,
    /// Lifetime of each SAS token the gateway makes (seconds).
    pub sas_ttl_secs: u64,
    /// MQTT keep-alive of the IoT Hub telemetry links, in seconds.
    pub keep_alive_secs: u64,
}

impl Default for AzureSection {
    fn default() -> Self {
        Self {
            id_scope: None,
            dps_endpoint: "global.azure-devices-provisioning.net".into(),
            transport: AzureTransport::Mqtt,
            attestation: AzureAttestation::SymmetricKey,
            ca: None,
            group_key: None,
            group_key_file: None,
            group_ca_cert: None,
            group_ca_key: None,
            group_ca_key_passphrase_file: None,
            group_ca_key_passphrase_credential: None,
            hub_transport: AzureTransport::Mqtt,
            hub_connect: None,
            registrations: 16,
            tps: 10,
            sas_ttl_secs: 3600,
            keep_alive_secs: 60,
        }
    }
}

/// Whose identity upstream telemetry is published under (`[telemetry] identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TelemetryIdentity {
    /// Each device connects with its own certificate; client id = thing name.
    #[default]
    Device,
    /// One connection with the gateway's certificate; the topic names the device.
    Gateway,
}

/// What the outbox does when it reaches `max_bytes` (`[telemetry] when_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Stop acknowledging device messages until there is room, so the broker holds them.
    #[default]
    Backpressure,
    /// Delete the oldest stored messages to make room (counted in metrics and logged).
    DropOldest,
}

/// `[telemetry]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySection {
    /// Upstream identity.
    pub identity: TelemetryIdentity,
    /// Upstream topic template.
    pub topic: String,
    /// Upstream topic filter for cloud-to-device commands.
    pub commands_topic: String,
    /// Outbox size limit, in bytes.
    pub max_bytes: u64,
    /// Outbox message age limit, in seconds.
    pub max_age_secs: u64,
    /// Outbox policy when full.
    pub when_full: WhenFull,
    /// Cap on open per-device upstream connections (LRU).
    pub max_upstream_connections: u32,
    /// Idle per-device connections are closed after this many seconds.
    pub idle_secs: u64,
    /// Unacknowledged upstream publishes per device connection.
    pub inflight: u32,
    /// Messages in flight on the gateway's one connection (`identity = "gateway"`), which
    /// carries every device: sent and not yet acknowledged by the cloud, or acknowledged and
    /// not yet removed from the outbox.
    pub gateway_inflight: u32,
    /// `identity = "gateway"`: the gateway's own upstream certificate chain (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_cert: Option<PathBuf>,
    /// `identity = "gateway"`: the gateway's upstream private key (any format `identity`
    /// imports).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_key: Option<PathBuf>,
    /// File holding the passphrase of an encrypted `gateway_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_key_passphrase_file: Option<PathBuf>,
    /// systemd credential name holding the passphrase of an encrypted `gateway_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_key_passphrase_credential: Option<String>,
    /// MQTT client id of the gateway's upstream connection (its thing name); unset means
    /// `gateway.id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_client_id: Option<String>,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self {
            identity: TelemetryIdentity::Device,
            topic: "dt/{thingName}/telemetry{/subtopic}".into(),
            commands_topic: "cmd/{thingName}/#".into(),
            max_bytes: 268_435_456,
            max_age_secs: 604_800,
            when_full: WhenFull::Backpressure,
            max_upstream_connections: 1000,
            idle_secs: 300,
            inflight: 10,
            gateway_inflight: 500,
            gateway_cert: None,
            gateway_key: None,
            gateway_key_passphrase_file: None,
            gateway_key_passphrase_credential: None,
            gateway_client_id: None,
        }
    }
}

impl Config {
    /// The MQTT client id of the gateway's own upstream connection (`identity = "gateway"`):
    /// `telemetry.gateway_client_id`, or `gateway.id` when unset.
    pub fn gateway_upstream_client_id(&self) -> &str {
        self.telemetry
            .gateway_client_id
            .as_deref()
            .unwrap_or(&self.gateway.id)
    }
}

/// `[store]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    /// sled page cache, in bytes.
    pub cache_capacity_bytes: u64,
    /// sled background flush interval in milliseconds; 0 = off (group commit flushes).
    pub flush_interval_ms: u64,
    /// Shortest time between two group commits under load, in microseconds.
    pub min_commit_interval_us: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            cache_capacity_bytes: 67_108_864,
            flush_interval_ms: 0,
            min_commit_interval_us: crate::store::DEFAULT_MIN_COMMIT_INTERVAL_US,
        }
    }
}

/// How log lines are written (`[log] format`, `--log-format`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// Filter directive (`info`, `fleetgw=debug,rumqttc=warn`); `RUST_LOG` wins.
    pub level: String,
    /// Text or JSON.
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("{s:?} is not a socket address; expected IP:PORT such as \"127.0.0.1:1883\" or \"[::1]:1883\"")
    })
}

fn socket_addr_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    match String::deserialize(d)?.as_str() {
        "off" => Ok(None),
        s => parse_socket_addr(s)
            .map(Some)
            .map_err(|e| D::Error::custom(format!("{e}, or \"off\" for no plain listener"))),
    }
}

fn serialize_socket_addr_or_off<S: serde::Serializer>(
    addr: &Option<SocketAddr>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match addr {
        Some(addr) => s.collect_str(addr),
        None => s.serialize_str("off"),
    }
}

fn optional_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse_socket_addr(&s).map_err(D::Error::custom))
        .transpose()
}

impl Config {
    /// `p` if absolute, else `p` joined to the main config file's directory.
    pub fn resolve_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The directory relative paths resolve against.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// The files and overrides this config was built from, in merge order.
    pub fn sources(&self) -> &[Origin] {
        &self.sources
    }

    /// The effective config as TOML, secrets printed as `[redacted]`, unset optional keys
    /// left out.
    pub fn to_redacted_toml(&self) -> String {
        // Serializing these plain structs cannot fail; say so in the output rather than panic.
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render the config: {e}\n"))
    }

    /// Joins every relative path of the config to [`Config::base_dir`].
    pub(super) fn resolve_paths_in_place(&mut self) {
        let base = self.base_dir.clone();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        let fix_opt = |p: &mut Option<PathBuf>| {
            if let Some(p) = p.as_mut() {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        };
        fix(&mut self.gateway.state_dir);
        fix(&mut self.admin.socket);
        fix_opt(&mut self.admin.token_file);
        fix_opt(&mut self.downstream.tls_cert);
        fix_opt(&mut self.downstream.tls_key);
        fix_opt(&mut self.downstream.ca);
        fix_opt(&mut self.downstream.password_file);
        fix_opt(&mut self.admission.group_key_file);
        fix_opt(&mut self.admission.trusted_ca);
        fix_opt(&mut self.provision.sealing_key_file);
        fix(&mut self.cloud.aws.ca);
        fix(&mut self.cloud.aws.claim_cert);
        fix(&mut self.cloud.aws.claim_key);
        fix_opt(&mut self.cloud.aws.claim_key_passphrase_file);
        fix_opt(&mut self.telemetry.gateway_cert);
        fix_opt(&mut self.telemetry.gateway_key);
        fix_opt(&mut self.telemetry.gateway_key_passphrase_file);
    }
}
