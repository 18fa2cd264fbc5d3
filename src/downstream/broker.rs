//! The embedded downstream broker: rumqttd 0.20 running in-process (`broker = "embedded"`).
//!
//! rumqttd is driven entirely by its own threads: a router thread, and one OS thread with its own
//! current-thread runtime per listener. `Broker::start()` never returns while the listener runs,
//! so it gets a dedicated std thread, and there is no way to stop it: the broker lives until the
//! process exits. [`EmbeddedBroker::start`] returns only once the listener answers an MQTT
//! CONNECT, so the daemon reports READY only when devices can connect.
//!
//! What rumqttd cannot do, and how this module deals with it:
//! - It binds its listener itself and never says which port it got, so port 0 is served by
//!   picking a free port first and retrying when another process takes it in between (a failed
//!   bind ends rumqttd's listener thread, which is how the failure is seen).
//! - Built with `default-features = false` it has no TLS stack (its `tls` setting is then
//!   silently ignored). The optional TLS listener is therefore ours: a tokio-rustls acceptor on
//!   the configured address that forwards each decrypted stream to rumqttd listening in
//!   plain text on a loopback port ([`EmbeddedBroker::gateway_addr`]). That loopback port is
//!   reachable by local processes without TLS; the embedded broker has no per-device
//!   authentication anyway (one trust domain, see `docs/mosquitto.md` for isolation).
//! - Its router config defaults to all zeros; every limit is set here.
//! - It disconnects a client that publishes to a topic no subscription filter matches, unless
//!   `dynamic_filters` is on. The gateway publishes retained `/status` and `/accepted` whether
//!   or not the device subscribed yet, so dynamic filters are on.
//! - Redelivered messages carry DUP=0, sessions live in memory only, and a subscriber that falls
//!   more than `max_segment_bytes * max_segment_count` behind on one filter skips the oldest
//!   data (rumqttd's commit log drops whole segments).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::thread::JoinHandle as ThreadHandle;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsAcceptor;

use crate::identity::{self, IdentityError, PrivateKey, Secret};

/// How often a free port is picked again when another process takes it first.
const PORT_ATTEMPTS: usize = 8;
/// Pause between readiness probes while the listener comes up.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// Limit for one readiness probe (TCP connect plus CONNECT/CONNACK).
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Server certificate and key for the embedded broker's TLS listener.
#[derive(Clone, Debug)]
pub struct EmbeddedTls {
    /// PEM certificate chain, leaf first.
    pub cert_chain_pem: String,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1, unencrypted).
    pub key_pem: Secret,
}

/// Settings of the embedded broker (`[downstream] broker = "embedded"`).
#[derive(Clone, Debug)]
pub struct EmbeddedBrokerOptions {
    /// Address devices connect to; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Serve MQTT over TLS on `listen` instead of plain TCP.
    pub tls: Option<EmbeddedTls>,
    /// Device connections the broker accepts at once.
    pub max_connections: usize,
    /// Largest MQTT packet a client may send (certificates and telemetry exceed 10 KiB).
    pub max_packet_bytes: usize,
    /// Unacknowledged QoS 1/2 messages the broker sends to one client before waiting.
    pub max_inflight: usize,
    /// Size of one commit-log segment per subscription filter.
    pub max_segment_bytes: usize,
    /// Segments kept per subscription filter; a subscriber further behind loses the oldest.
    pub max_segment_count: usize,
    /// How long a new TCP (or TLS) connection may take to send CONNECT.
    pub connect_timeout: Duration,
    /// How long [`EmbeddedBroker::start`] waits for the listener to answer.
    pub startup_timeout: Duration,
}

impl Default for EmbeddedBrokerOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1883),
            tls: None,
            max_connections: 20_000,
            max_packet_bytes: 256 * 1024,
            max_inflight: 100,
            max_segment_bytes: 8 * 1024 * 1024,
            max_segment_count: 8,
            connect_timeout: Duration::from_secs(10),
            startup_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker: invalid option {option}: {reason}")]
    InvalidOption {
        option: &'static str,
        reason: String,
    },
    #[error("embedded broker: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded broker: cannot listen on {addr} (address in use or not local); see the rumqttd error in the log")]
    ListenerFailed { addr: SocketAddr },
    #[error("embedded broker: no free port found on {ip} after {attempts} attempts")]
    NoFreePort { ip: IpAddr, attempts: usize },
    #[error("embedded broker on {addr} did not answer an MQTT CONNECT within {waited:?}")]
    NotReady { addr: SocketAddr, waited: Duration },
    #[error("embedded broker: cannot start its thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("embedded broker TLS listener: {0}")]
    Tls(#[from] IdentityError),
}

/// A running embedded broker. Dropping it stops the TLS listener; rumqttd itself runs until the
/// process exits.
pub struct EmbeddedBroker {
    listen_addr: SocketAddr,
    gateway_addr: SocketAddr,
    tls_task: Option<JoinHandle<()>>,
    _thread: ThreadHandle<()>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("listen_addr", &self.listen_addr)
            .field("gateway_addr", &self.gateway_addr)
            .field("tls", &self.tls_task.is_some())
            .finish()
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        if let Some(task) = &self.tls_task {
            task.abort();
        }
    }
}

impl EmbeddedBroker {
    /// Starts rumqttd (and the TLS listener if configured) and waits until it accepts MQTT.
    ///
    /// Must be called inside a tokio runtime: the TLS listener runs on it.
    pub async fn start(opts: &EmbeddedBrokerOptions) -> Result<Self, BrokerError> {
        validate(opts)?;
        let Some(tls_opts) = &opts.tls else {
            let (addr, thread) = start_rumqttd(opts, opts.listen).await?;
            tracing::info!(listen = %addr, "embedded MQTT broker listening");
            return Ok(Self {
                listen_addr: addr,
                gateway_addr: addr,
                tls_task: None,
                _thread: thread,
            });
        };
        let key_pem = tls_opts
            .key_pem
            .expose_str()
            .ok_or_else(|| BrokerError::InvalidOption {
                option: "tls key",
                reason: "the private key is not PEM text".to_string(),
            })?;
        let key = PrivateKey::from_pem(key_pem)?;
        let server_config = identity::tls::server_config(&tls_opts.cert_chain_pem, &key, None)?;
        let listener =
            TcpListener::bind(opts.listen)
                .await
                .map_err(|source| BrokerError::Bind {
                    addr: opts.listen,
                    source,
                })?;
        let listen_addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: opts.listen,
            source,
        })?;
        let internal = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let (gateway_addr, thread) = start_rumqttd(opts, internal).await?;
        let tls_task = tokio::spawn(serve_tls(
            listener,
            TlsAcceptor::from(server_config),
            gateway_addr,
            opts.connect_timeout,
            Arc::new(Semaphore::new(opts.max_connections)),
        ));
        tracing::info!(listen = %listen_addr, internal = %gateway_addr, "embedded MQTT broker listening (TLS)");
        Ok(Self {
            listen_addr,
            gateway_addr,
            tls_task: Some(tls_task),
            _thread: thread,
        })
    }

    /// Where devices connect (the bound address, port 0 resolved).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// Plain-MQTT address for the gateway's own session: `listen_addr` without TLS, the
    /// loopback port rumqttd listens on behind the TLS listener otherwise.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway_addr
    }

    /// True when the embedded broker serves TLS on [`listen_addr`](Self::listen_addr).
    pub fn is_tls(&self) -> bool {
        self.tls_task.is_some()
    }
}

fn validate(opts: &EmbeddedBrokerOptions) -> Result<(), BrokerError> {
    let bad = |option, reason: &str| {
        Err(BrokerError::InvalidOption {
            option,
            reason: reason.to_string(),
        })
    };
    if opts.max_connections == 0 {
        return bad("max_connections", "must be at least 1");
    }
    if opts.max_packet_bytes < 1024 {
        return bad("max_packet_bytes", "must be at least 1024");
    }
    if opts.max_inflight == 0 || opts.max_inflight > usize::from(u16::MAX) {
        return bad("max_inflight", "must be between 1 and 65535");
    }
    // rumqttd panics on segments below 1 KiB; a segment must also hold the largest packet.
    if opts.max_segment_bytes < opts.max_packet_bytes.max(1024) {
        return bad(
            "max_segment_bytes",
            "must be at least max_packet_bytes (and 1024)",
        );
    }
    if opts.max_segment_count == 0 {
        return bad("max_segment_count", "must be at least 1");
    }
    if opts.connect_timeout.is_zero() || opts.connect_timeout.as_millis() > u128::from(u16::MAX) {
        return bad("connect_timeout", "must be between 1 ms and 65.535 s");
    }
    Ok(())
}

fn rumqttd_config(opts: &EmbeddedBrokerOptions, listen: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: u16::try_from(opts.connect_timeout.as_millis()).unwrap_or(u16::MAX),
        max_payload_size: opts.max_packet_bytes,
        max_inflight_count: opts.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "fleetgw-downstream".to_string(),
        listen,
        tls: None,
        // rumqttd sleeps this long after every accept; any delay caps the connection rate.
        next_connection_delay_ms: 0,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            // + the gateway's own session and the readiness probe.
            max_connections: opts.max_connections + 2,
            max_outgoing_packet_count: 200,
            max_segment_size: opts.max_segment_bytes,
            max_segment_count: opts.max_segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    }
}

/// Starts rumqttd on `listen` (port 0: a picked free port) and waits until it answers MQTT.
async fn start_rumqttd(
    opts: &EmbeddedBrokerOptions,
    listen: SocketAddr,
) -> Result<(SocketAddr, ThreadHandle<()>), BrokerError> {
    let attempts = if listen.port() == 0 { PORT_ATTEMPTS } else { 1 };
    for _ in 0..attempts {
        let addr = if listen.port() == 0 {
            pick_free_port(listen.ip())?
        } else {
            listen
        };
        let config = rumqttd_config(opts, addr);
        let thread = std::thread::Builder::new()
            .name("fleetgw-broker".to_string())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(BrokerError::Thread)?;
        match wait_ready(addr, &thread, opts.startup_timeout).await {
            Ok(()) => return Ok((addr, thread)),
            // Someone took the picked port between our probe bind and rumqttd's: pick again.
            Err(BrokerError::ListenerFailed { .. }) if listen.port() == 0 => continue,
            Err(e) => return Err(e),
        }
    }
    Err(BrokerError::NoFreePort {
        ip: listen.ip(),
        attempts,
    })
}

fn pick_free_port(ip: IpAddr) -> Result<SocketAddr, BrokerError> {
    let addr = SocketAddr::new(ip, 0);
    let listener =
        StdTcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    listener
        .local_addr()
        .map_err(|source| BrokerError::Bind { addr, source })
}

/// Polls until `addr` answers an MQTT CONNECT with a CONNACK, the broker thread ends (its
/// listener could not bind) or the deadline passes.
async fn wait_ready(
    addr: SocketAddr,
    thread: &ThreadHandle<()>,
    within: Duration,
) -> Result<(), BrokerError> {
    let deadline = Instant::now() + within;
    let probe_addr = probe_target(addr);
    loop {
        if thread.is_finished() {
            return Err(BrokerError::ListenerFailed { addr });
        }
        if let Ok(Ok(())) = timeout(PROBE_TIMEOUT, mqtt_probe(probe_addr)).await {
            // The bind could still have failed just after a foreign listener answered.
            if !thread.is_finished() {
                return Ok(());
            }
        }
        if Instant::now() + PROBE_INTERVAL > deadline {
            return Err(BrokerError::NotReady {
                addr,
                waited: within,
            });
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// A wildcard listen address is probed on loopback.
fn probe_target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

async fn mqtt_probe(addr: SocketAddr) -> std::io::Result<()> {
    use rumqttc::{Connect, ConnectReturnCode, Packet};
    let mut stream = TcpStream::connect(addr).await?;
    let mut buf = BytesMut::new();
    let connect = Connect::new(format!("fleetgw-probe-{}", rand::random::<u32>()));
    Packet::Connect(connect)
        .write(&mut buf, 1024)
        .map_err(std::io::Error::other)?;
    stream.write_all(&buf).await?;
    buf.clear();
    loop {
        match Packet::read(&mut buf, 1024) {
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => break,
            Ok(other) => {
                return Err(std::io::Error::other(format!(
                    "unexpected answer to CONNECT: {other:?}"
                )))
            }
            Err(rumqttc::Error::InsufficientBytes(_)) => {
                if stream.read_buf(&mut buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
    buf.clear();
    Packet::Disconnect
        .write(&mut buf, 1024)
        .map_err(std::io::Error::other)?;
    stream.write_all(&buf).await
}

/// Accepts TLS connections and splices each decrypted stream to rumqttd's plain listener.
async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    upstream: SocketAddr,
    handshake_timeout: Duration,
    slots: Arc<Semaphore>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::warn!(error = %e, "embedded broker: TLS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "embedded broker: connection limit reached, refusing TLS client");
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let mut tls = match timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "embedded broker: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "embedded broker: TLS handshake timed out");
                    return;
                }
            };
            let mut plain = match timeout(handshake_timeout, TcpStream::connect(upstream)).await {
                Ok(Ok(plain)) => plain,
                Ok(Err(e)) => {
                    tracing::error!(%peer, error = %e, "embedded broker: internal listener unreachable");
                    return;
                }
                Err(_) => {
                    tracing::error!(%peer, "embedded broker: internal listener timed out");
                    return;
                }
            };
            let _ = plain.set_nodelay(true);
            // Idle connections are bounded by MQTT keep-alive, enforced by rumqttd.
            if let Err(e) = tokio::io::copy_bidirectional(&mut tls, &mut plain).await {
                tracing::debug!(%peer, error = %e, "embedded broker: TLS connection closed");
            }
        });
    }
}
