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
//! This module sits at the bottom of the layering: it uses only `identity::{Secret, KeyType}`,
//! `device_id` and two plain data enums (`cloud::codec::PayloadFormat`,
//! `admission::AdmissionMode`). Modules above it receive a validated `Config` whose relative paths have
//! already been resolved against the main config file's directory.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::device_id::DeviceId;
use crate::identity::{KeyType, Secret};

// The plain data enums of the layers the config feeds are used as they are, so a mode or a
// format has one spelling and one type everywhere (neither module depends on `config`).
pub use crate::admission::AdmissionMode;
pub use crate::cloud::codec::PayloadFormat;

/// Where the packaged daemon looks for its config when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/fleetgw/gateway.toml";
/// Name of the drop-in directory next to the main config file.
pub const DROP_IN_DIR: &str = "config.d";

/// Largest MQTT packet the protocol can describe (remaining length of 268,435,455 bytes).
const MQTT_MAX_PACKET: u32 = 268_435_455;
/// Smallest useful packet limit: a provisioning response carries a certificate chain and a key.
const MIN_PACKET_BYTES: u32 = 4096;

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
    base_dir: PathBuf,
    /// Files and overrides this config was built from, in merge order.
    #[serde(skip)]
    sources: Vec<Origin>,
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
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            socket: "/run/fleetgw/admin.sock".into(),
            group: "fleetgw".into(),
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

/// `[downstream]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownstreamSection {
    /// Embedded or external broker.
    pub broker: BrokerMode,
    /// Plain MQTT listener of the embedded broker.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
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
}

impl Default for DownstreamSection {
    fn default() -> Self {
        Self {
            broker: BrokerMode::Embedded,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
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
    /// MQTT keep-alive of the claim sessions, in seconds.
    pub keep_alive_secs: u64,
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

/// `[cloud.azure]` (parsed and validated; the Azure provider comes with a later issue).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AzureSection {
    /// DPS ID scope (required when `cloud.provider = "azure"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_scope: Option<String>,
    /// DPS global endpoint host.
    pub dps_endpoint: String,
    /// MQTT or HTTPS.
    pub transport: AzureTransport,
    /// Symmetric key or X.509.
    pub attestation: AzureAttestation,
}

impl Default for AzureSection {
    fn default() -> Self {
        Self {
            id_scope: None,
            dps_endpoint: "global.azure-devices-provisioning.net".into(),
            transport: AzureTransport::Mqtt,
            attestation: AzureAttestation::SymmetricKey,
        }
    }
}

/// Whose identity upstream telemetry uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TelemetryIdentity {
    /// Each device connects with its own certificate.
    #[default]
    Device,
    /// One gateway connection, one topic per device.
    Gateway,
}

/// What the outbox does when it reaches `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Stop acknowledging device messages until there is room.
    #[default]
    Backpressure,
    /// Drop the oldest messages (counted in metrics).
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
    /// Unacknowledged upstream publishes on the gateway's one connection
    /// (`identity = "gateway"`), which carries every device.
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
            gateway_inflight: 300,
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

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    parse_socket_addr(&String::deserialize(d)?).map_err(D::Error::custom)
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

    fn resolve_paths_in_place(&mut self) {
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

/// Loads the config: `path`, then `config.d/*.toml` next to it in name order, then the
/// `--set key.path=value` overrides; deserializes and validates the result. Relative paths in
/// the returned config are already resolved against `path`'s directory.
pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
    let mut merged = toml::Table::new();
    let mut origins = Origins::default();
    let mut sources = Vec::new();

    let main = read_table(path)?;
    let main_origin = Origin::File(path.to_path_buf());
    merge(
        &mut merged,
        main,
        &mut Vec::new(),
        &main_origin,
        &mut origins,
    );
    sources.push(main_origin.clone());

    let dir = path.parent().unwrap_or(Path::new(""));
    for drop_in in drop_in_files(&dir.join(DROP_IN_DIR))? {
        let table = read_table(&drop_in)?;
        let origin = Origin::File(drop_in);
        merge(&mut merged, table, &mut Vec::new(), &origin, &mut origins);
        sources.push(origin);
    }

    for arg in overrides {
        let (key, value) = parse_override(arg)?;
        let origin = Origin::Override { key: key.join(".") };
        set_override(&mut merged, &key, value, arg)?;
        origins.set(&key, origin.clone());
        sources.push(origin);
    }

    let mut config = deserialize(merged, &origins, &main_origin)?;
    config.validate().map_err(|(key, message)| {
        let segments: Vec<String> = key.split('.').map(str::to_string).collect();
        ConfigError::Invalid {
            origin: origins.lookup(&segments).unwrap_or(&main_origin).clone(),
            key,
            message,
        }
    })?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    config.base_dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    config.sources = sources;
    config.resolve_paths_in_place();
    Ok(config)
}

/// Every leaf key path of [`Config`] (e.g. `cloud.aws.sessions`), in declaration order.
///
/// Derived from the serde field lists themselves, so it can never drift from the structs.
pub fn known_keys() -> Vec<String> {
    let mut out = Vec::new();
    collect_keys(&mut Vec::new(), &mut out);
    out
}

/// A field name no section will ever have, used to make serde list a section's fields.
const PROBE_KEY: &str = "__fleetgw_probe__";

fn collect_keys(prefix: &mut Vec<String>, out: &mut Vec<String>) {
    match section_fields(prefix) {
        Some(fields) => {
            for field in fields {
                prefix.push(field);
                collect_keys(prefix, out);
                prefix.pop();
            }
        }
        None => out.push(prefix.join(".")),
    }
}

/// The field names of the section at `prefix`, or `None` when `prefix` is not a section.
fn section_fields(prefix: &[String]) -> Option<Vec<String>> {
    let mut value = toml::Value::Table(toml::Table::from_iter([(
        PROBE_KEY.to_string(),
        toml::Value::Integer(0),
    )]));
    for segment in prefix.iter().rev() {
        value = toml::Value::Table(toml::Table::from_iter([(segment.clone(), value)]));
    }
    let err = serde_path_to_error::deserialize::<_, Config>(value).err()?;
    let (name, expected) = parse_unknown(err.inner().message(), "field")?;
    (name == PROBE_KEY).then_some(expected)
}

/// Splits serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown variant ...")
/// into the name and the expected names.
fn parse_unknown(message: &str, what: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix(&format!("unknown {what} `"))?;
    let (name, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((name.to_string(), expected))
}

/// The closest of `candidates` to `name`, if close enough to be a plausible typo.
fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Key paths whose values are secrets: their deserialization errors must not echo the value.
const SECRET_KEYS: [&str; 2] = ["downstream.password", "admission.group_key"];

fn deserialize(
    merged: toml::Table,
    origins: &Origins,
    main_origin: &Origin,
) -> Result<Config, ConfigError> {
    let err = match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(merged)) {
        Ok(config) => return Ok(config),
        Err(err) => err,
    };
    let mut segments: Vec<String> = err
        .path()
        .iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            serde_path_to_error::Segment::Seq { index } => Some(format!("[{index}]")),
            _ => None,
        })
        .collect();
    let raw = err.inner().message();
    let message = if let Some((name, expected)) = parse_unknown(raw, "field") {
        // serde_path_to_error already put the unknown key at the end of the path.
        if segments.last() != Some(&name) {
            segments.push(name.clone());
        }
        let hint = unknown_key_hint(&segments[..segments.len() - 1], &name, &expected);
        format!("unknown key; {hint}")
    } else if let Some((name, expected)) = parse_unknown(raw, "variant") {
        match closest(&name, expected.iter().map(String::as_str)) {
            Some(best) => format!("{raw}; did you mean `{best}`?"),
            None => raw.to_string(),
        }
    } else if SECRET_KEYS.contains(&segments.join(".").as_str()) {
        "expected a string (the value is a secret and is not shown)".to_string()
    } else {
        raw.to_string()
    };
    let origin = origins.lookup(&segments).unwrap_or(main_origin).clone();
    Err(ConfigError::Invalid {
        origin,
        key: join_key(&segments),
        message,
    })
}

fn join_key(segments: &[String]) -> String {
    let mut key = String::new();
    for segment in segments {
        if !key.is_empty() && !segment.starts_with('[') {
            key.push('.');
        }
        key.push_str(segment);
    }
    key
}

fn unknown_key_hint(section: &[String], name: &str, expected: &[String]) -> String {
    if let Some(best) = closest(name, expected.iter().map(String::as_str)) {
        return format!("did you mean `{best}`?");
    }
    // The right key in the wrong section: `sessions` under [cloud] instead of [cloud.aws].
    let elsewhere = known_keys()
        .into_iter()
        .map(|key| {
            let leaf = key.rsplit('.').next().unwrap_or_default();
            (strsim::jaro_winkler(name, leaf), key)
        })
        .filter(|(score, _)| *score > 0.9)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, key)) = elsewhere {
        return format!("did you mean `{key}`?");
    }
    let here = if section.is_empty() {
        "at the top level".to_string()
    } else {
        format!("in [{}]", section.join("."))
    };
    format!("valid keys {here}: {}", expected.join(", "))
}

/// Which source last set each key path (longest recorded prefix wins).
#[derive(Default)]
struct Origins(BTreeMap<Vec<String>, Origin>);

impl Origins {
    fn set(&mut self, path: &[String], origin: Origin) {
        // A value replaced wholesale forgets where its old sub-keys came from.
        self.0
            .retain(|k, _| !(k.len() > path.len() && k.starts_with(path)));
        self.0.insert(path.to_vec(), origin);
    }

    /// The source of `path` or of its closest enclosing key; failing that (a default value
    /// with a bad sub-key set somewhere), the first source that set a key inside `path`.
    fn lookup(&self, path: &[String]) -> Option<&Origin> {
        if path.is_empty() {
            return None;
        }
        (1..=path.len())
            .rev()
            .find_map(|n| self.0.get(&path[..n]))
            .or_else(|| {
                self.0
                    .iter()
                    .find(|(k, _)| k.starts_with(path))
                    .map(|(_, origin)| origin)
            })
    }
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse::<toml::Table>().map_err(|e| {
        let (line, column) = e
            .span()
            .map(|span| line_column(&text, span.start))
            .unwrap_or((1, 1));
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().trim_end().to_string(),
        }
    })
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// `DIR/*.toml` sorted by file name; none when `DIR` does not exist. Hidden files (editor
/// swap files) are skipped.
fn drop_in_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::ReadDir {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::ReadDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".toml") && !name.starts_with('.') {
            files.push(entry.path());
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Deep merge: tables merge key by key, anything else in `src` replaces what `dst` had.
fn merge(
    dst: &mut toml::Table,
    src: toml::Table,
    prefix: &mut Vec<String>,
    origin: &Origin,
    origins: &mut Origins,
) {
    for (key, value) in src {
        prefix.push(key.clone());
        match (dst.get_mut(&key), value) {
            (Some(toml::Value::Table(dst_table)), toml::Value::Table(src_table)) => {
                merge(dst_table, src_table, prefix, origin, origins);
            }
            (_, value) => {
                origins.set(prefix, origin.clone());
                dst.insert(key, value);
            }
        }
        prefix.pop();
    }
}

/// `a.b.c=value` -> (["a","b","c"], value parsed as TOML, or as a plain string if it is not).
fn parse_override(arg: &str) -> Result<(Vec<String>, toml::Value), ConfigError> {
    let bad = |message: &str| ConfigError::BadOverride {
        arg: arg.to_string(),
        message: message.to_string(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE, e.g. cloud.aws.sessions=8"))?;
    let key: Vec<String> = key.trim().split('.').map(str::to_string).collect();
    let valid_segment = |s: &String| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if !key.iter().all(valid_segment) {
        return Err(bad(
            "the key must be a dotted path of letters, digits, '_' and '-', e.g. cloud.aws.sessions",
        ));
    }
    let value = raw
        .parse::<toml::Value>()
        .unwrap_or_else(|_| toml::Value::String(raw.to_string()));
    Ok((key, value))
}

fn set_override(
    root: &mut toml::Table,
    key: &[String],
    value: toml::Value,
    arg: &str,
) -> Result<(), ConfigError> {
    let Some((leaf, parents)) = key.split_last() else {
        return Err(ConfigError::BadOverride {
            arg: arg.to_string(),
            message: "empty key".into(),
        });
    };
    let mut table = root;
    for (depth, segment) in parents.iter().enumerate() {
        let entry = table
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(ConfigError::BadOverride {
                    arg: arg.to_string(),
                    message: format!("{} is a value, not a section", key[..=depth].join(".")),
                })
            }
        };
    }
    match (table.get_mut(leaf), value) {
        // `--set provision.parameters={Region="eu"}` adds to the table rather than replace it,
        // the same deep merge the drop-ins get.
        (Some(toml::Value::Table(existing)), toml::Value::Table(new)) => {
            existing.extend(new);
        }
        (_, value) => {
            table.insert(leaf.clone(), value);
        }
    }
    Ok(())
}

/// A semantic check failed: (key path, message).
type Violation = (String, String);

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

fn not_both<A, B>(a: &Option<A>, b: &Option<B>, key_a: &str, key_b: &str) -> Result<(), Violation> {
    check(a.is_none() || b.is_none(), key_a, || {
        format!("set either {key_a} or {key_b}, not both")
    })
}

fn has_wildcard(topic: &str) -> bool {
    topic.contains(['+', '#'])
}

impl Config {
    fn validate(&self) -> Result<(), Violation> {
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
        Ok(())
    }

    fn validate_admission(&self) -> Result<(), Violation> {
        use base64::Engine as _;
        let a = &self.admission;
        not_both(
            &a.group_key,
            &a.group_key_file,
            "admission.group_key",
            "admission.group_key_file",
        )?;
        if let Some(key) = &a.group_key {
            let decoded = base64::engine::general_purpose::STANDARD.decode(key.expose());
            // Never echo the key: the message only says what is wrong with it.
            check(
                decoded.is_ok_and(|k| !k.is_empty()),
                "admission.group_key",
                || "is not a non-empty base64 string (value not shown: it is a secret)".into(),
            )?;
        }
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
        if self.cloud.provider == CloudProvider::Azure {
            check(azure.id_scope.is_some(), "cloud.provider", || {
                "\"azure\" needs cloud.azure.id_scope".into()
            })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    fn load_text(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
        let tmp = tempfile::tempdir().unwrap();
        let path = write(tmp.path(), "gateway.toml", text);
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        load(&path, &overrides)
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = load_text("", &[]).unwrap();
        assert_eq!(c.gateway.id, "gw-01");
        assert_eq!(c.admission.mode, AdmissionMode::Approve);
        assert_eq!(c.downstream.listen, "127.0.0.1:1883".parse().unwrap());
        assert_eq!(c.cloud.aws.sessions, 4);
        assert_eq!(c.cloud.aws.tps, 50);
        assert_eq!(c.provision.key_type, KeyType::EcdsaP256);
        assert_eq!(c.provision.parameters["SerialNumber"], "{id}");
        assert_eq!(c.telemetry.when_full, WhenFull::Backpressure);
        assert_eq!(c.store.cache_capacity_bytes, 64 << 20);
    }

    #[test]
    fn known_keys_lists_every_leaf_including_optional_ones() {
        let keys = known_keys();
        for k in [
            "gateway.id",
            "downstream.tls_listen",
            "downstream.password",
            "cloud.provider",
            "cloud.aws.sessions",
            "cloud.azure.id_scope",
            "provision.parameters",
            "log.format",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
        assert!(!keys.iter().any(|k| k == "cloud" || k == "cloud.aws"));
    }

    #[test]
    fn overrides_parse_as_toml_then_as_string() {
        let c = load_text(
            "",
            &[
                "cloud.aws.sessions=8",
                "gateway.id=gw-7",
                "provision.allowed_csr_key_types=[\"rsa-2048\"]",
                "provision.parameters={Region=\"eu\"}",
            ],
        )
        .unwrap();
        assert_eq!(c.cloud.aws.sessions, 8);
        assert_eq!(c.gateway.id, "gw-7");
        assert_eq!(c.provision.allowed_csr_key_types, vec![KeyType::Rsa2048]);
        // A table given anywhere replaces the built-in default map (only files merge).
        assert_eq!(
            c.provision.parameters,
            BTreeMap::from([("Region".to_string(), "eu".to_string())])
        );
    }

    #[test]
    fn override_errors_name_the_override() {
        let e = load_text("", &["cloud.aws.sessions=four"]).unwrap_err();
        assert_eq!(e.key(), Some("cloud.aws.sessions"));
        assert_eq!(
            e.to_string(),
            "--set cloud.aws.sessions: invalid type: string \"four\", expected u32"
        );
        let e = load_text("", &["no-equals-sign"]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--set no-equals-sign: expected KEY=VALUE"),
            "{e}"
        );
        let e = load_text("", &["gateway.id.x=1"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--set gateway.id.x: gateway.id: invalid type: map, expected a string"
        );
        let e = load_text("[gateway]\nid = \"a\"\n", &["gateway.id.x=1"]).unwrap_err();
        assert!(e.to_string().contains("gateway.id is a value"), "{e}");
    }

    #[test]
    fn unknown_keys_get_a_hint_with_the_key_path() {
        let e = load_text("[cloud.aws]\nsesions = 4\n", &[]).unwrap_err();
        assert_eq!(e.key(), Some("cloud.aws.sesions"));
        assert!(
            e.to_string()
                .ends_with("cloud.aws.sesions: unknown key; did you mean `sessions`?"),
            "{e}"
        );
        let e = load_text("[cloud]\nsessions = 4\n", &[]).unwrap_err();
        assert!(
            e.to_string().contains("did you mean `cloud.aws.sessions`?"),
            "{e}"
        );
        let e = load_text("[log]\nzzz = 1\n", &[]).unwrap_err();
        assert!(
            e.to_string().contains("valid keys in [log]: level, format"),
            "{e}"
        );
        let e = load_text("[downstream]\nbroker = \"embeded\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("did you mean `embedded`?"), "{e}");
    }

    #[test]
    fn secrets_are_not_echoed_in_errors_or_output() {
        let e = load_text("[downstream]\npassword = 123456\n", &[]).unwrap_err();
        assert!(!e.to_string().contains("123456"), "{e}");
        let e = load_text(
            "[admission]\nmode = \"symmetric-key\"\ngroup_key = \"not base64!!\"\n",
            &[],
        )
        .unwrap_err();
        assert!(!e.to_string().contains("not base64!!"), "{e}");
        assert_eq!(e.key(), Some("admission.group_key"));
        let c = load_text(
            "[admission]\nmode = \"symmetric-key\"\ngroup_key = \"c2VjcmV0LWdyb3VwLWtleQ==\"\n",
            &[],
        )
        .unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("c2VjcmV0"), "{out}");
        assert!(out.contains("group_key = \"[redacted]\""), "{out}");
    }

    #[test]
    fn semantic_errors_name_key_and_source() {
        let cases: [(&str, &str, &str); 10] = [
            (
                "[cloud.aws]\nsessions = 0\n",
                "cloud.aws.sessions",
                "must be at least 1",
            ),
            (
                "[cloud.aws]\ntps = 0\n",
                "cloud.aws.tps",
                "must be at least 1",
            ),
            (
                "[downstream]\nlisten = \"localhost:1883\"\n",
                "downstream.listen",
                "not a socket address",
            ),
            (
                "[downstream]\nbroker = \"external\"\n",
                "downstream.broker",
                "needs downstream.url",
            ),
            (
                "[admission]\nmode = \"symmetric-key\"\n",
                "admission.mode",
                "needs admission.group_key",
            ),
            (
                "[admission]\nmode = \"x509\"\n",
                "admission.mode",
                "needs admission.trusted_ca",
            ),
            (
                "[downstream]\ntopic_prefix = \"a/+\"\n",
                "downstream.topic_prefix",
                "wildcard",
            ),
            ("[log]\nlevel = \"=:=\"\n", "log.level", "not a log filter"),
            (
                "[store]\nmin_commit_interval_us = 250000\n",
                "store.min_commit_interval_us",
                "more than 100000",
            ),
            (
                "[telemetry]\ngateway_inflight = 0\n",
                "telemetry.gateway_inflight",
                "between 1 and 65535",
            ),
        ];
        for (text, key, what) in cases {
            let e = load_text(text, &[]).unwrap_err();
            assert_eq!(e.key(), Some(key), "{text}: {e}");
            let s = e.to_string();
            assert!(
                s.contains("gateway.toml: ") && s.contains(what),
                "{text}: {s}"
            );
        }
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let e = load_text("[gateway]\nid = \"gw\n", &[]).unwrap_err();
        match &e {
            ConfigError::Syntax { line, .. } => assert_eq!(*line, 2, "{e}"),
            other => panic!("expected a syntax error, got {other}"),
        }
        assert!(
            e.to_string().contains("gateway.toml: line 2, column "),
            "{e}"
        );
    }

    #[test]
    fn drop_ins_merge_in_name_order_and_errors_name_the_drop_in() {
        let tmp = tempfile::tempdir().unwrap();
        let main = write(
            tmp.path(),
            "gateway.toml",
            "[cloud.aws]\nsessions = 2\ntps = 7\n",
        );
        write(
            tmp.path(),
            "config.d/20-b.toml",
            "[cloud.aws]\nsessions = 6\n",
        );
        write(
            tmp.path(),
            "config.d/10-a.toml",
            "[cloud.aws]\nsessions = 5\n",
        );
        write(tmp.path(), "config.d/30-c.toml.dpkg-old", "garbage = [");
        let c = load(&main, &[]).unwrap();
        assert_eq!(c.cloud.aws.sessions, 6);
        assert_eq!(c.cloud.aws.tps, 7, "a drop-in must not wipe sibling keys");
        assert_eq!(c.sources().len(), 3);

        write(
            tmp.path(),
            "config.d/40-d.toml",
            "[cloud.aws]\ntps = \"fast\"\n",
        );
        let e = load(&main, &[]).unwrap_err();
        let drop_in = tmp.path().join("config.d/40-d.toml");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: cloud.aws.tps: invalid type: string \"fast\", expected u32",
                drop_in.display()
            )
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let main = write(
            tmp.path(),
            "etc/gateway.toml",
            "[gateway]\nstate_dir = \"state\"\n[cloud.aws]\nclaim_key = \"/abs/claim.key\"\n",
        );
        let c = load(&main, &[]).unwrap();
        let dir = tmp.path().join("etc");
        assert_eq!(c.gateway.state_dir, dir.join("state"));
        assert_eq!(c.cloud.aws.ca, dir.join("ca.pem"));
        assert_eq!(c.cloud.aws.claim_key, Path::new("/abs/claim.key"));
        assert_eq!(c.resolve_path(Path::new("x/y.pem")), dir.join("x/y.pem"));
    }

    #[test]
    fn redacted_toml_parses_back_to_the_same_values() {
        let c = load_text(
            "[cloud.aws]\nsessions = 9\n[downstream]\nurl = \"mqtt://h:1\"\n",
            &[],
        )
        .unwrap();
        let again: Config = toml::from_str(&c.to_redacted_toml()).unwrap();
        assert_eq!(again.cloud.aws.sessions, 9);
        assert_eq!(again.downstream.url.as_deref(), Some("mqtt://h:1"));
        assert_eq!(again.gateway.state_dir, c.gateway.state_dir);
    }

    #[test]
    fn gateway_client_id_defaults_to_the_gateway_id() {
        let c = load_text("[gateway]\nid = \"plant-7\"\n", &[]).unwrap();
        assert_eq!(c.gateway_upstream_client_id(), "plant-7");
        let c = load_text(
            "[gateway]\nid = \"plant-7\"\n[telemetry]\ngateway_client_id = \"gw-thing\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.gateway_upstream_client_id(), "gw-thing");
        let e = load_text("[telemetry]\nidentity = \"gateway\"\n", &[]).unwrap_err();
        assert_eq!(e.key(), Some("telemetry.identity"));
        assert!(
            e.to_string()
                .contains("needs telemetry.gateway_cert and telemetry.gateway_key"),
            "{e}"
        );
    }

    #[test]
    fn missing_main_file_is_named() {
        let e = load(Path::new("/nonexistent/fleetgw/gateway.toml"), &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/fleetgw/gateway.toml: cannot read config file"),
            "{e}"
        );
    }
}
