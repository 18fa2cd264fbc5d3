//! The Azure emulator: IoT Hub Device Provisioning Service (DPS) and IoT Hub, each over MQTT
//! 3.1.1 and HTTPS, with the TLS and authentication rules the official device SDK
//! (azure-iot-device 2.14) meets on the real services, plus an HTTP inspection and fault API.
//!
//! [`start`] is the entry point for tests and `fleetgw emulate azure`. Its DIR holds:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` (0600) | root CA: trust it for every listener |
//! | `server.pem`, `server.key` (0600), `server.sans` | the one server certificate of the four listeners: iPAddress SANs for every listen IP and `--hub-host` (a DNS SAN if it is a name), reissued when that list changes |
//! | `group-ca.pem`, `group-ca.key` (0600) | the X.509 enrollment group's CA (an intermediate of `ca.pem`): device certificates it issues with CN = registration id are accepted |
//! | `azure.json` | ID scope, group names and the symmetric-key group's primary and secondary keys |
//! | `registrations.json` | the devices DPS assigned |
//! | `gateway.toml`, then `emulator.json` | written once the listeners are bound |
//!
//! Modules: `auth` (groups, SAS and certificate checks), `dps` (registration operations),
//! `registry`, `hub` (telemetry log, message properties, cloud-to-device), `mqtt` and `https`
//! (the front ends), `api` (inspection); `crate::emulator::{messages, faults}` are shared with
//! the AWS emulator.
//!
//! TLS (every listener): TLS 1.2 or 1.3, no ALPN required, one certificate whatever the SNI
//! (the SDK sends none for IP hosts), a client certificate requested but optional.

mod api;
mod auth;
mod dps;
mod files;
mod https;
mod hub;
mod mqtt;
mod registry;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub use dps::{
    ERR_BAD_REQUEST, ERR_OPERATION_NOT_FOUND, ERR_SCOPE_NOT_FOUND, ERR_THROTTLED, ERR_UNAUTHORIZED,
};
pub use hub::MAX_MESSAGE_BYTES;

use crate::emulator::listeners::{self, bind, local, reachable, spawn_api};
use crate::emulator::{dir, EmulatorError};
use crate::identity;

/// Default DPS MQTT listen address.
pub const DEFAULT_DPS_MQTT: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 8883);
/// Default DPS HTTPS listen address.
pub const DEFAULT_DPS_HTTPS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 8443);
/// Default IoT Hub MQTT listen address.
pub const DEFAULT_HUB_MQTT: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), 8883);
/// Default IoT Hub HTTPS listen address.
pub const DEFAULT_HUB_HTTPS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), 8443);
/// Default inspection API listen address.
pub const DEFAULT_API: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8481);
/// Default size of the `GET /messages` log.
pub const DEFAULT_MAX_MESSAGES: usize = 1_000_000;
/// Default time a registration stays `assigning`.
pub const DEFAULT_ASSIGNING: Duration = Duration::from_millis(1500);

/// How to run the emulator (the `fleetgw emulate azure` flags).
#[derive(Clone, Debug)]
pub struct AzureEmulatorOptions {
    /// State and credentials directory (created if missing).
    pub dir: PathBuf,
    /// DPS over MQTT/TLS; port 0 picks a free port.
    pub dps_mqtt: SocketAddr,
    /// DPS over HTTPS.
    pub dps_https: SocketAddr,
    /// IoT Hub over MQTT/TLS.
    pub hub_mqtt: SocketAddr,
    /// IoT Hub over HTTPS.
    pub hub_https: SocketAddr,
    /// The hub's host name in `assignedHub` and in SAS resource URIs (default: the hub MQTT
    /// listen IP, so that SDKs connect to it directly).
    pub hub_host: Option<String>,
    /// Inspection API (plain HTTP).
    pub api: SocketAddr,
    /// DPS requests per second (None = unlimited); more get 429 with retry-after.
    pub tps: Option<f64>,
    /// How many device messages `GET /messages` keeps (the newest).
    pub max_messages: usize,
    /// How long a registration stays `assigning`.
    pub assigning: Duration,
}

impl AzureEmulatorOptions {
    /// The defaults of `fleetgw emulate azure --dir DIR`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            dps_mqtt: DEFAULT_DPS_MQTT,
            dps_https: DEFAULT_DPS_HTTPS,
            hub_mqtt: DEFAULT_HUB_MQTT,
            hub_https: DEFAULT_HUB_HTTPS,
            hub_host: None,
            api: DEFAULT_API,
            tps: None,
            max_messages: DEFAULT_MAX_MESSAGES,
            assigning: DEFAULT_ASSIGNING,
        }
    }

    /// Every listener on 127.0.0.1 with a free port (tests).
    pub fn ephemeral(dir: impl Into<PathBuf>) -> Self {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Self {
            dps_mqtt: any,
            dps_https: any,
            hub_mqtt: any,
            hub_https: any,
            api: any,
            ..Self::new(dir)
        }
    }
}

/// Bound addresses and where the credentials are: what `emulator.json` says.
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// DPS MQTT.
    pub dps_mqtt: SocketAddr,
    /// DPS HTTPS.
    pub dps_https: SocketAddr,
    /// Hub MQTT.
    pub hub_mqtt: SocketAddr,
    /// Hub HTTPS.
    pub hub_https: SocketAddr,
    /// Inspection API.
    pub api: SocketAddr,
    /// The hub host name.
    pub hub_host: String,
}

/// A running emulator. Dropping it stops the listeners; [`AzureEmulatorHandle::shutdown`]
/// also waits for them.
pub struct AzureEmulatorHandle {
    endpoints: Endpoints,
    dir: PathBuf,
    identity: files::Identity,
    ca_pem: String,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl AzureEmulatorHandle {
    /// Bound addresses.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// `http://ADDR` of the inspection API.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.endpoints.api)
    }

    /// The DPS ID scope.
    pub fn id_scope(&self) -> &str {
        &self.identity.id_scope
    }

    /// The symmetric-key group's primary key (base64).
    pub fn primary_key(&self) -> &str {
        &self.identity.symmetric.primary_key
    }

    /// The symmetric-key group's secondary key (base64).
    pub fn secondary_key(&self) -> &str {
        &self.identity.symmetric.secondary_key
    }

    /// The root CA (PEM) every listener's certificate chains to.
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

    /// `DIR/group-ca.pem`: the X.509 enrollment group's CA certificate.
    pub fn group_ca_cert_path(&self) -> PathBuf {
        self.dir.join(files::GROUP_CA_CERT)
    }

    /// `DIR/group-ca.key`: its key.
    pub fn group_ca_key_path(&self) -> PathBuf {
        self.dir.join(files::GROUP_CA_KEY)
    }

    /// `DIR/gateway.toml`.
    pub fn gateway_config_path(&self) -> PathBuf {
        self.dir.join("gateway.toml")
    }

    /// Stops accepting, closes every connection and waits for the tasks.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        listeners::stop(std::mem::take(&mut self.tasks)).await;
    }
}

impl Drop for AzureEmulatorHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Starts the emulator: loads or creates its credentials and state in `opts.dir`, binds every
/// listener, then writes `gateway.toml` and `emulator.json`.
pub async fn start(opts: AzureEmulatorOptions) -> Result<AzureEmulatorHandle, EmulatorError> {
    let dir = dir::prepare_dir(&opts.dir)?;
    let hub_host = opts
        .hub_host
        .clone()
        .unwrap_or_else(|| reachable(opts.hub_mqtt).ip().to_string());
    let listen_ips: Vec<IpAddr> = [opts.dps_mqtt, opts.dps_https, opts.hub_mqtt, opts.hub_https]
        .iter()
        .map(|a| reachable(*a).ip())
        .collect();
    let pki = {
        let (dir, hub_host) = (dir.clone(), hub_host.clone());
        tokio::task::spawn_blocking(move || {
            files::Pki::load_or_create(&dir, &listen_ips, &hub_host)
        })
        .await
        .map_err(|e| EmulatorError::Corrupt {
            path: opts.dir.clone(),
            reason: format!("credential setup task failed: {e}"),
        })??
    };
    let ident = files::Identity::load_or_create(&dir)?;
    let groups = Arc::new(ident.groups(&dir, &pki.group_ca_pem)?);
    let registry = Arc::new(registry::Registry::open(&dir.join("registrations.json"))?);
    let dps = Arc::new(dps::Dps::new(
        ident.id_scope.clone(),
        hub_host.clone(),
        groups.clone(),
        registry.clone(),
        opts.assigning,
        opts.tps,
    ));
    let ctx = Arc::new(hub::Context::new(
        dps,
        groups,
        registry,
        hub_host.clone(),
        opts.max_messages,
    ));
    let tls =
        identity::tls::server_config_with_optional_client_cert(&pki.server_pem, &pki.server_key)
            .map_err(|source| EmulatorError::Identity {
                what: "server TLS configuration".into(),
                source,
            })?;
    let acceptor = TlsAcceptor::from(tls);

    let dps_mqtt = bind(opts.dps_mqtt, "DPS MQTT").await?;
    let dps_https = bind(opts.dps_https, "DPS HTTPS").await?;
    let hub_mqtt = bind(opts.hub_mqtt, "IoT Hub MQTT").await?;
    let hub_https = bind(opts.hub_https, "IoT Hub HTTPS").await?;
    let api_listener = bind(opts.api, "API").await?;
    let endpoints = Endpoints {
        dps_mqtt: local(&dps_mqtt, &dir)?,
        dps_https: local(&dps_https, &dir)?,
        hub_mqtt: local(&hub_mqtt, &dir)?,
        hub_https: local(&hub_https, &dir)?,
        api: local(&api_listener, &dir)?,
        hub_host,
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for (listener, service) in [
        (dps_mqtt, mqtt::Service::Dps),
        (hub_mqtt, mqtt::Service::Hub),
    ] {
        tasks.push(tokio::spawn(mqtt::run_listener(
            listener,
            acceptor.clone(),
            ctx.clone(),
            service,
            shutdown_rx.clone(),
        )));
    }
    for (listener, service) in [
        (dps_https, https::Service::Dps),
        (hub_https, https::Service::Hub),
    ] {
        tasks.push(tokio::spawn(https::run_listener(
            listener,
            acceptor.clone(),
            ctx.clone(),
            service,
            shutdown_rx.clone(),
        )));
    }
    let router = api::router(api::ApiState {
        ctx: ctx.clone(),
        default_tps: opts.tps,
    });
    tasks.push(spawn_api(
        api_listener,
        router,
        shutdown_rx.clone(),
        "Azure emulator",
    ));

    let handle = AzureEmulatorHandle {
        endpoints,
        dir: dir.clone(),
        identity: ident,
        ca_pem: pki.ca_pem,
        shutdown: shutdown_tx,
        tasks,
    };
    files::write_discovery_files(&handle)?;
    tracing::info!(
        dps_mqtt = %handle.endpoints.dps_mqtt,
        dps_https = %handle.endpoints.dps_https,
        hub_mqtt = %handle.endpoints.hub_mqtt,
        hub_https = %handle.endpoints.hub_https,
        api = %handle.endpoints.api,
        dir = %dir.display(),
        "Azure emulator listening"
    );
    Ok(handle)
}

/// The accept loop of the four service listeners: until `shutdown` turns true, counts each
/// connection, refuses it during an outage fault, and hands the rest to `serve` (which
/// spawns the connection's task). `label` names the listener in the log.
async fn accept_until_shutdown(
    listener: TcpListener,
    ctx: &hub::Context,
    label: &str,
    shutdown: watch::Receiver<bool>,
    mut serve: impl FnMut(TcpStream, SocketAddr),
) {
    let label = format!("Azure emulator {label}");
    listeners::accept_until_shutdown(listener, shutdown, &label, |tcp, peer| {
        hub::Counters::bump(&ctx.counters.connections_total);
        if ctx.faults.in_outage() {
            hub::Counters::bump(&ctx.counters.connections_refused);
            return;
        }
        serve(tcp, peer);
    })
    .await;
}
