//! The AWS IoT emulator: fleet provisioning (CreateCertificateFromCsr,
//! CreateKeysAndCertificate, RegisterThing; seed 002) and IoT Core device telemetry over
//! MQTT 3.1.1 / 5 with mutual TLS, plus an HTTP inspection and fault API.
//!
//! [`start`] is the entry point for tests, `fleetgw demo` and `fleetgw emulate aws`. Its DIR
//! holds everything that must survive a restart:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` (0600) | the root CA every certificate chains to |
//! | `server.pem`, `server.key` (0600) | the MQTT server certificate, SANs `DNS:localhost`, `IP:127.0.0.1` |
//! | `claim.pem`, `claim.key` (0600) | the fleet provisioning claim certificate |
//! | `gateway.pem`, `gateway.key` (0600) | a gateway's own upstream identity (`telemetry.identity = "gateway"`): accepted as an ACTIVE certificate of the thing [`GATEWAY_THING`], known like the claim certificate without being listed in `/things` or `/certificates` |
//! | `state.json` | things and certificates |
//! | `emulator.json` | addresses and paths, written once the listeners are bound |
//! | `gateway.toml` | a fleetgw config pointing a gateway at this emulator |
//!
//! Modules: `server` (TLS + MQTT connections), `crate::mqtt::wire` (MQTT 3.1.1/5 codec adapter, shared with the embedded broker),
//! `provisioning` (the three APIs, tokens, rate limits), `templates`, `state` (registry),
//! `counters`, `api` (HTTP); the device message log (`crate::emulator::messages`) and
//! `crate::emulator::faults` are shared with the Azure emulator.
//!
//! A simplification: unlike IoT Core, the emulator does not evaluate IoT policies on device
//! topics. Any ACTIVE certificate connected as its thing may publish and subscribe to any
//! non-reserved topic (only the claim certificate is confined), so a gateway certificate may
//! publish `dt/{thingName}/telemetry` for every device.

mod api;
mod counters;
mod provisioning;
mod server;
mod state;
mod templates;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub use crate::emulator::faults::{FaultRequest, FaultView};
pub use templates::DEFAULT_TEMPLATE;

use crate::clock;
use crate::emulator::dir::{self, read_opt, write, write_secret};
use crate::emulator::listeners::{self, bind, local, spawn_api, SHUTDOWN_TIMEOUT};
use crate::emulator::EmulatorError;
use crate::identity::{self, CertificateAuthority, KeyType, PrivateKey};

/// Default MQTT listen address (IoT Core's MQTT-over-TLS port).
pub const DEFAULT_MQTT_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8883);
/// Default inspection API listen address.
pub const DEFAULT_API_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8480);
/// Default ownership-token lifetime (AWS: 1 hour).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Default size of the `GET /messages` log.
pub const DEFAULT_MAX_MESSAGES: usize = 1_000_000;

const CA_CN: &str = "fleetgw AWS IoT emulator root CA";
const SERVER_CN: &str = "localhost";
const CLAIM_CN: &str = "fleetgw emulator claim";
/// The thing (= MQTT client id) the emulator's ready-made gateway certificate (`gateway.pem`)
/// connects as: the default `gateway.id`, so the default `telemetry.gateway_client_id` matches.
pub const GATEWAY_THING: &str = "gw-01";
const CREDENTIAL_VALIDITY_DAYS: u32 = 3650;

/// How to run the emulator (the `fleetgw emulate aws` flags).
#[derive(Clone, Debug)]
pub struct AwsEmulatorOptions {
    /// State and credentials directory (created if missing).
    pub dir: PathBuf,
    /// MQTT over TLS listen address; port 0 picks a free port.
    pub mqtt: SocketAddr,
    /// HTTP API listen address; port 0 picks a free port.
    pub api: SocketAddr,
    /// Extra provisioning templates (see `templates.rs` for the format).
    pub templates: Option<PathBuf>,
    /// Ownership-token lifetime; unactivated certificates are deleted when it ends.
    pub token_ttl: Duration,
    /// Requests per second per provisioning API (None = unlimited).
    pub tps: Option<f64>,
    /// How many device messages `GET /messages` keeps (the newest).
    pub max_messages: usize,
}

impl AwsEmulatorOptions {
    /// The defaults of `fleetgw emulate aws --dir DIR`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            mqtt: DEFAULT_MQTT_ADDR,
            api: DEFAULT_API_ADDR,
            templates: None,
            token_ttl: DEFAULT_TOKEN_TTL,
            tps: None,
            max_messages: DEFAULT_MAX_MESSAGES,
        }
    }

    /// Both listeners on 127.0.0.1 with free ports (tests, demo).
    pub fn ephemeral(dir: impl Into<PathBuf>) -> Self {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Self {
            mqtt: any,
            api: any,
            ..Self::new(dir)
        }
    }
}

/// A running emulator. Dropping it stops the listeners; [`AwsEmulatorHandle::shutdown`]
/// also waits for them and writes the final state.
pub struct AwsEmulatorHandle {
    mqtt_addr: SocketAddr,
    api_addr: SocketAddr,
    dir: PathBuf,
    ca_pem: String,
    templates: Vec<String>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    persister: Option<JoinHandle<()>>,
}

impl AwsEmulatorHandle {
    /// The bound MQTT address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The bound API address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// `http://ADDR` of the API.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// The emulator's root CA (PEM): trust it for the server, and every issued certificate
    /// chains to it.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/ca.pem`.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `DIR/claim.pem`.
    pub fn claim_cert_path(&self) -> PathBuf {
        self.dir.join("claim.pem")
    }

    /// `DIR/claim.key`.
    pub fn claim_key_path(&self) -> PathBuf {
        self.dir.join("claim.key")
    }

    /// `DIR/gateway.pem`: an ACTIVE certificate attached to the thing [`GATEWAY_THING`].
    pub fn gateway_cert_path(&self) -> PathBuf {
        self.dir.join("gateway.pem")
    }

    /// `DIR/gateway.key`: the key of `gateway.pem`.
    pub fn gateway_key_path(&self) -> PathBuf {
        self.dir.join("gateway.key")
    }

    /// The thing name (= MQTT client id) that goes with `gateway.pem`.
    pub fn gateway_thing(&self) -> &str {
        GATEWAY_THING
    }

    /// `DIR/gateway.toml`.
    pub fn gateway_config_path(&self) -> PathBuf {
        self.dir.join("gateway.toml")
    }

    /// Names of the provisioning templates served.
    pub fn templates(&self) -> &[String] {
        &self.templates
    }

    /// Stops accepting, closes every connection, waits for the tasks and writes the state.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        listeners::stop(std::mem::take(&mut self.tasks)).await;
        if let Some(persister) = self.persister.take() {
            let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, persister).await;
        }
    }
}

impl Drop for AwsEmulatorHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Starts the emulator: loads or creates its credentials and state in `opts.dir`, binds both
/// listeners, then writes `emulator.json` and `gateway.toml`.
pub async fn start(opts: AwsEmulatorOptions) -> Result<AwsEmulatorHandle, EmulatorError> {
    let dir = dir::prepare_dir(&opts.dir)?;
    let pki = {
        let pki_dir = dir.clone();
        tokio::task::spawn_blocking(move || Pki::load_or_create(&pki_dir))
            .await
            .map_err(|e| EmulatorError::Corrupt {
                path: dir.clone(),
                reason: format!("credential setup task failed: {e}"),
            })??
    };
    let template_set = templates::TemplateSet::load(opts.templates.as_deref())?;
    let template_names = template_set.names();
    let registry = state::Registry::open(&dir.join("state.json"))?;
    let counters = Arc::new(counters::Counters::default());
    let provisioning = provisioning::Provisioning::new(
        pki.ca.clone(),
        template_set,
        registry.clone(),
        opts.token_ttl,
        opts.tps.filter(|t| *t > 0.0),
        counters.clone(),
    );
    let claim_id = certificate_id(&pki.claim_pem, &dir.join("claim.pem"))?;
    let gateway_cert_id = certificate_id(&pki.gateway_pem, &dir.join("gateway.pem"))?;
    let ctx = Arc::new(server::ServerContext::new(
        provisioning,
        registry.clone(),
        crate::emulator::messages::MessageLog::new(opts.max_messages),
        counters,
        claim_id,
        (gateway_cert_id, GATEWAY_THING.to_string()),
    ));

    let tls =
        identity::tls::server_config(&pki.server_pem, &pki.server_key, Some(pki.ca.cert_pem()))
            .map_err(|source| EmulatorError::Identity {
                what: "MQTT server TLS configuration".into(),
                source,
            })?;
    let mqtt_listener = bind(opts.mqtt, "MQTT").await?;
    let api_listener = bind(opts.api, "API").await?;
    let mqtt_addr = local(&mqtt_listener, &dir)?;
    let api_addr = local(&api_listener, &dir)?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(server::run_listener(
        mqtt_listener,
        TlsAcceptor::from(tls),
        ctx.clone(),
        shutdown_rx.clone(),
    )));
    let router = api::router(api::ApiState {
        ctx: ctx.clone(),
        default_tps: opts.tps.filter(|t| *t > 0.0),
    });
    tasks.push(spawn_api(
        api_listener,
        router,
        shutdown_rx.clone(),
        "emulator",
    ));
    tasks.push(tokio::spawn(run_sweeper(
        registry.clone(),
        opts.token_ttl,
        shutdown_rx.clone(),
    )));
    let persister = tokio::spawn(registry.run_persister(shutdown_rx));

    let handle = AwsEmulatorHandle {
        mqtt_addr,
        api_addr,
        dir: dir.clone(),
        ca_pem: pki.ca.cert_pem().to_string(),
        templates: template_names,
        shutdown: shutdown_tx,
        tasks,
        persister: Some(persister),
    };
    write_discovery_files(&handle)?;
    tracing::info!(mqtt = %mqtt_addr, api = %api_addr, dir = %dir.display(), "AWS IoT emulator listening");
    Ok(handle)
}

/// Deletes unactivated certificates whose ownership token expired.
async fn run_sweeper(
    registry: Arc<state::Registry>,
    token_ttl: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let period = (token_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let deleted = registry.sweep_expired(clock::unix_ms());
                if deleted > 0 {
                    tracing::debug!(deleted, "emulator deleted unactivated certificates");
                }
            }
            _ = shutdown.changed() => break,
        }
    }
}

/// The emulator's credentials.
struct Pki {
    ca: CertificateAuthority,
    server_pem: String,
    server_key: PrivateKey,
    claim_pem: String,
    gateway_pem: String,
}

impl Pki {
    /// Loads `ca.*`, `server.*`, `claim.*` from `dir`, creating what is missing.
    fn load_or_create(dir: &Path) -> Result<Self, EmulatorError> {
        let ca = match (
            read_opt(&dir.join("ca.pem"))?,
            read_opt(&dir.join("ca.key"))?,
        ) {
            (Some(cert), Some(key)) => {
                CertificateAuthority::from_pem(&cert, &key).map_err(|source| {
                    EmulatorError::Identity {
                        what: dir.join("ca.pem").display().to_string(),
                        source,
                    }
                })?
            }
            (None, None) => {
                let ca = CertificateAuthority::generate(CA_CN).map_err(|source| {
                    EmulatorError::Identity {
                        what: "emulator root CA".into(),
                        source,
                    }
                })?;
                write_secret(&dir.join("ca.key"), &ca.key_pem())?;
                write(&dir.join("ca.pem"), ca.cert_pem().as_bytes(), 0o644)?;
                ca
            }
            _ => {
                return Err(EmulatorError::Corrupt {
                    path: dir.to_path_buf(),
                    reason: "ca.pem and ca.key must both exist or both be absent".into(),
                })
            }
        };
        let (server_pem, server_key) = Self::leaf(dir, "server", &ca, |ca| {
            ca.issue_server(
                SERVER_CN,
                &["localhost"],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                CREDENTIAL_VALIDITY_DAYS,
            )
        })?;
        let (claim_pem, _) = Self::leaf(dir, "claim", &ca, |ca| {
            ca.issue_client(CLAIM_CN, KeyType::EcdsaP256, CREDENTIAL_VALIDITY_DAYS)
        })?;
        let (gateway_pem, _) = Self::leaf(dir, "gateway", &ca, |ca| {
            ca.issue_client(GATEWAY_THING, KeyType::EcdsaP256, CREDENTIAL_VALIDITY_DAYS)
        })?;
        Ok(Self {
            ca,
            server_pem,
            server_key,
            claim_pem,
            gateway_pem,
        })
    }

    /// Loads `NAME.pem` + `NAME.key` if both exist and the certificate chains to `ca`, or
    /// issues and writes new ones.
    fn leaf(
        dir: &Path,
        name: &str,
        ca: &CertificateAuthority,
        issue: impl FnOnce(
            &CertificateAuthority,
        ) -> Result<(String, PrivateKey), identity::IdentityError>,
    ) -> Result<(String, PrivateKey), EmulatorError> {
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        if let (Some(pem), Some(key_pem)) = (read_opt(&cert_path)?, read_opt(&key_path)?) {
            let key = PrivateKey::from_pem(&key_pem).map_err(|source| EmulatorError::Identity {
                what: key_path.display().to_string(),
                source,
            })?;
            let chains = identity::verify_chain(&pem, ca.cert_pem(), clock::unix_secs()).is_ok();
            let matches = identity::cert_matches_key(&pem, &key).unwrap_or(false);
            if chains && matches {
                return Ok((pem, key));
            }
            tracing::warn!(cert = %cert_path.display(), "emulator certificate does not match its CA or key; issuing a new one");
        }
        let (pem, key) = issue(ca).map_err(|source| EmulatorError::Identity {
            what: format!("emulator {name} certificate"),
            source,
        })?;
        write_secret(&key_path, &key.to_pkcs8_pem())?;
        write(&cert_path, pem.as_bytes(), 0o644)?;
        Ok((pem, key))
    }
}

/// The AWS certificate id (SHA-256 of the DER, hex) of the first certificate in `pem`.
fn certificate_id(pem: &str, path: &Path) -> Result<String, EmulatorError> {
    let parsed = pem::parse(pem).map_err(|e| EmulatorError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("not a PEM certificate: {e}"),
    })?;
    Ok(provisioning::fingerprint_hex(parsed.contents()))
}

/// `emulator.json` and `gateway.toml`, written after the listeners are bound so that their
/// addresses are the real ones.
fn write_discovery_files(handle: &AwsEmulatorHandle) -> Result<(), EmulatorError> {
    let path_str = |p: PathBuf| p.display().to_string();
    let discovery = json!({
        "mqtt": handle.mqtt_addr.to_string(),
        "api": handle.api_url(),
        "ca": path_str(handle.ca_path()),
        "claimCert": path_str(handle.claim_cert_path()),
        "claimKey": path_str(handle.claim_key_path()),
        "gatewayCert": path_str(handle.gateway_cert_path()),
        "gatewayKey": path_str(handle.gateway_key_path()),
        "gatewayThing": GATEWAY_THING,
        "templates": handle.templates,
    });
    dir::write_discovery(&handle.dir, gateway_toml(handle), &discovery, 0o644)
}

/// A complete fleetgw config for a gateway provisioning against this emulator.
fn gateway_toml(handle: &AwsEmulatorHandle) -> Result<String, toml::ser::Error> {
    use toml::{Table, Value};
    let s = |v: String| Value::String(v);
    let section = dir::toml_section;
    let template = handle
        .templates
        .iter()
        .find(|t| t.as_str() == DEFAULT_TEMPLATE)
        .or(handle.templates.first())
        .cloned()
        .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
    let mut cloud = Table::new();
    cloud.insert("provider".into(), s("aws".into()));
    cloud.insert(
        "aws".into(),
        section(vec![
            (
                "endpoint",
                s(format!("localhost:{}", handle.mqtt_addr.port())),
            ),
            ("ca", s(handle.ca_path().display().to_string())),
            (
                "claim_cert",
                s(handle.claim_cert_path().display().to_string()),
            ),
            (
                "claim_key",
                s(handle.claim_key_path().display().to_string()),
            ),
            ("template", s(template)),
        ]),
    );
    let mut root = dir::gateway_toml_base(&handle.dir);
    root.insert("cloud".into(), Value::Table(cloud));
    // Ready for `--set telemetry.identity=gateway`; the default identity stays "device".
    root.insert(
        "telemetry".into(),
        section(vec![
            (
                "gateway_cert",
                s(handle.gateway_cert_path().display().to_string()),
            ),
            (
                "gateway_key",
                s(handle.gateway_key_path().display().to_string()),
            ),
            ("gateway_client_id", s(GATEWAY_THING.into())),
        ]),
    );
    Ok(format!(
        "# Written by `fleetgw emulate aws`: a gateway provisioning against the emulator in\n\
         # {}.\n# Run it with: fleetgw run --config {}\n\
         # One upstream connection with the gateway's own certificate instead of one per device:\n\
         # fleetgw run --config {} --set telemetry.identity=gateway\n\n{}",
        handle.dir.display(),
        handle.gateway_config_path().display(),
        handle.gateway_config_path().display(),
        toml::to_string(&root)?
    ))
}
