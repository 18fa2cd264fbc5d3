//! The embedded downstream broker (`broker = "embedded"`): an MQTT 3.1.1 and 5 broker inside
//! the daemon, built for one job: thousands of devices, each on its own topics, talking to
//! one gateway session.
//!
//! - Routing walks a topic trie ([`trie`]), so a publish costs the same with 10 or 50,000
//!   subscribed devices. Connections route their own publishes on the daemon's runtime
//!   ([`router`]); there is no broker thread and no channel hop per message.
//! - The listener has a deep accept backlog and accepts as fast as connections arrive, so a
//!   whole fleet reconnecting after a power cut is admitted at once instead of losing SYNs.
//! - QoS 0, 1 and 2 end to end, retained messages, last wills, client-id takeover, keep-alive (1.5 x), persistent
//!   sessions in memory with a bounded queue and DUP-flagged redelivery of unacknowledged
//!   messages, an in-flight window per client and a packet size limit.
//! - End-to-end acknowledgement ([`EmbeddedBrokerOptions::ack_after_client`]): a device's
//!   QoS 1 PUBLISH is acknowledged once the gateway's session acknowledged it, i.e. once it is
//!   durable in the outbox, so a daemon crash never loses a message a device was told was
//!   delivered.
//! - The gateway's own session is in-process ([`local`], [`EmbeddedBroker::attach_local`]):
//!   no listener serves it and its client id is reserved, so no network client can take it
//!   over, read what devices send the gateway, or acknowledge their messages.
//! - Optional TLS on the device listener (tokio-rustls), next to the plain one or instead of
//!   it, with an optional client certificate.
//! - The trust boundary ([`rules`]): who may connect, and what each client may publish and
//!   subscribe; bounded resources (topic size and depth, subscriptions, retained messages,
//!   kept sessions, connections per address, CONNECT timeout, inbound rate).
//!
//! - MQTT 5: message properties and expiry, subscription options and identifiers, shared
//!   subscriptions, topic aliases from clients, the client's Receive Maximum and Maximum
//!   Packet Size, will delay, reason codes and strings (see the README for the whole list).
//!
//! - With a store ([`EmbeddedBrokerOptions::store`]), retained messages and kept sessions
//!   survive a restart ([`persist`]).
//!
//! Not provided: enhanced authentication (a CONNECT asking for it is refused with 0x8C), topic
//! aliases towards clients (docs/src/broker.md says why). Dropping the [`EmbeddedBroker`]
//! closes its listeners and every connection; [`EmbeddedBroker::shutdown`] saves first.

mod ack;
mod admit;
mod connection;
pub mod local;
pub mod persist;
mod rate;
mod router;
pub mod rules;
mod session;
pub mod trie;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::identity::{self, IdentityError, PrivateKey, Secret};
use crate::store::Store;
use admit::ConnectionConfig;
pub use local::{LocalClient, LocalDelivery};
use persist::Persistence;
pub use router::{ConnectionFacts, Refusals};
use router::{Limits, Router};
pub use rules::{AccessRules, LocalUser, UserRights};

/// Pending connections the kernel holds for the listener (capped by `net.core.somaxconn`).
const ACCEPT_BACKLOG: u32 = 4096;
/// Pause after a failed accept (EMFILE and friends) instead of spinning on the error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

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
    /// Address of the plain listener; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Whether the plain listener is on (it is off anyway when `tls` is set without
    /// `tls_listen`: TLS then takes `listen`).
    pub plain_listener: bool,
    /// Serve MQTT over TLS: on `tls_listen` next to the plain listener, or on `listen`
    /// instead of it when `tls_listen` is not set.
    pub tls: Option<EmbeddedTls>,
    /// Address of the TLS listener next to the plain one.
    pub tls_listen: Option<SocketAddr>,
    /// Device connections the broker accepts at once.
    pub max_connections: usize,
    /// Largest MQTT packet a client may send (certificates and telemetry exceed 10 KiB).
    pub max_packet_bytes: usize,
    /// Unacknowledged QoS 1 messages the broker sends to one client before waiting.
    pub max_inflight: usize,
    /// Bytes of messages queued for one client (connected but behind, or away with a kept
    /// session); beyond it the oldest are dropped and counted.
    pub max_queued_bytes: usize,
    /// How long a new TCP (or TLS) connection may take to send CONNECT.
    pub connect_timeout: Duration,
    /// End-to-end acknowledgement: a QoS 1 PUBLISH that this client (the gateway's own
    /// session) receives is acknowledged to its publisher only once this client acknowledged
    /// it, so a device's PUBACK means the gateway stored it durably. `None` (the default)
    /// acknowledges once the message is routed into the subscribers' in-memory queues.
    pub ack_after_client: Option<String>,
    /// The client id of the in-process session ([`EmbeddedBroker::attach_local`]): reserved,
    /// so a network CONNECT that names it is refused. The gateway sets it (and
    /// `ack_after_client`) to its own session's id.
    pub in_process_client: Option<String>,
    /// The `ack_after_client` session's window instead of `max_inflight`. Every device's
    /// PUBACK waits in it for the gateway's flush, so it bounds the rate at which all devices
    /// together are acknowledged to window / flush time: 100 at 3 ms would be 33k msg/s.
    pub ack_after_inflight: usize,
    /// The trust boundary (see [`rules`]): who may connect and what each client may publish
    /// and subscribe. `None` (the default) is a plain MQTT broker; the gateway always sets it.
    pub rules: Option<AccessRules>,
    /// Longest topic name or filter a client may use, in bytes.
    pub max_topic_bytes: usize,
    /// Most levels a topic name or filter may have (at most [`trie::MAX_TOPIC_LEVELS`]).
    pub max_topic_levels: usize,
    /// Subscriptions one client may hold.
    pub max_subscriptions: usize,
    /// Retained messages the broker holds.
    pub max_retained: usize,
    /// Bytes of retained messages the broker holds.
    pub max_retained_bytes: usize,
    /// Connections from one non-loopback source address at once (a LAN host cannot take
    /// every slot); loopback clients count only against `max_connections`.
    pub max_connections_per_address: usize,
    /// Sessions kept for absent clients (3.1.1 clean session 0, MQTT 5 session expiry > 0);
    /// past it a leaving client's session is discarded.
    pub max_kept_sessions: usize,
    /// The longest an absent client's session is kept; MQTT 5 clients may ask for less.
    pub kept_session_expiry: Duration,
    /// PUBLISH packets one connection may send per second (a burst of as many is allowed);
    /// beyond it the broker stops reading from that connection until the rate allows, so
    /// TCP flow control slows the client down.
    pub max_inbound_per_second: u32,
    /// Keep retained messages and kept sessions in this store across restarts ([`persist`]);
    /// `None` (the default) keeps them in memory only.
    pub store: Option<Store>,
}

impl Default for EmbeddedBrokerOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1883),
            plain_listener: true,
            tls: None,
            tls_listen: None,
            max_connections: 50_000,
            max_packet_bytes: 256 * 1024,
            max_inflight: 100,
            max_queued_bytes: 64 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            ack_after_client: None,
            in_process_client: None,
            ack_after_inflight: 1000,
            rules: None,
            max_topic_bytes: 1024,
            max_topic_levels: 32,
            max_subscriptions: 100,
            max_retained: 100_000,
            max_retained_bytes: 64 * 1024 * 1024,
            max_connections_per_address: 1024,
            max_kept_sessions: 50_000,
            kept_session_expiry: Duration::from_secs(24 * 3600),
            max_inbound_per_second: 10_000,
            store: None,
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
    #[error("embedded broker TLS listener: {0}")]
    Tls(#[from] IdentityError),
}

/// A running embedded broker; dropping it stops it.
pub struct EmbeddedBroker {
    listen_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    tls: bool,
    router: Arc<Router>,
    config: Arc<ConnectionConfig>,
    shutdown: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    persist: Option<Arc<Persistence>>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("listen_addr", &self.listen_addr)
            .field("tls_addr", &self.tls_addr)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in &self.listeners {
            task.abort();
        }
    }
}

impl EmbeddedBroker {
    /// Binds the listener(s) and starts accepting; devices can connect when this returns.
    ///
    /// Must be called inside a tokio runtime: the broker runs on it.
    pub async fn start(opts: &EmbeddedBrokerOptions) -> Result<Self, BrokerError> {
        validate(opts)?;
        let acceptor = match &opts.tls {
            Some(tls) => {
                let key_pem =
                    tls.key_pem
                        .expose_str()
                        .ok_or_else(|| BrokerError::InvalidOption {
                            option: "tls key",
                            reason: "the private key is not PEM text".to_string(),
                        })?;
                let key = PrivateKey::from_pem(key_pem)?;
                // Asks for an optional client certificate: with `auth = "device"` it proves a
                // provisioned device (or, in x509 mode, a device of the trusted CA).
                let config = identity::tls::server_config_with_optional_client_cert(
                    &tls.cert_chain_pem,
                    &key,
                )?;
                Some(TlsAcceptor::from(config))
            }
            None => None,
        };
        let persist = opts.store.clone().map(Persistence::new);
        let router = Router::new(
            Limits {
                max_inflight: opts.max_inflight,
                ack_after_inflight: opts.ack_after_inflight,
                max_queued_bytes: opts.max_queued_bytes,
                max_subscriptions: opts.max_subscriptions,
                max_retained: opts.max_retained,
                max_retained_bytes: opts.max_retained_bytes,
                max_kept_sessions: opts.max_kept_sessions,
                kept_session_expiry: opts.kept_session_expiry,
            },
            opts.ack_after_client.as_deref(),
            opts.in_process_client.as_deref(),
        );
        let router = Arc::new(match &persist {
            Some(p) => router.persisting(p.clone()),
            None => router,
        });
        let config = Arc::new(ConnectionConfig {
            max_packet: opts.max_packet_bytes,
            connect_timeout: opts.connect_timeout,
            rules: opts.rules.clone(),
            users: std::sync::RwLock::new(Arc::new(
                opts.rules
                    .as_ref()
                    .map(|r| r.users.clone())
                    .unwrap_or_default(),
            )),
            max_topic_bytes: opts.max_topic_bytes,
            max_topic_levels: opts.max_topic_levels,
            max_inbound_per_second: opts.max_inbound_per_second,
        });
        let (shutdown, _) = watch::channel(false);
        if let (Some(p), Some(store)) = (&persist, &opts.store) {
            restore(&router, p, store, opts, &config);
        }
        let slots = Arc::new(Slots {
            total: Semaphore::new(opts.max_connections),
            per_address: Mutex::new(HashMap::new()),
            max_per_address: opts.max_connections_per_address,
        });
        let mut listeners = Vec::new();
        // The plain listener, unless it is off or (no `tls_listen`) TLS takes its address.
        let plain_on = opts.plain_listener && !(acceptor.is_some() && opts.tls_listen.is_none());
        let mut plain_addr = None;
        if plain_on {
            let listener = bind(opts.listen)?;
            plain_addr = Some(local_addr(&listener, opts.listen)?);
            listeners.push(tokio::spawn(accept_loop(
                listener,
                None,
                router.clone(),
                config.clone(),
                slots.clone(),
                shutdown.subscribe(),
            )));
        }
        let mut tls_addr = None;
        if let Some(acceptor) = acceptor {
            let at = opts.tls_listen.unwrap_or(opts.listen);
            let listener = bind(at)?;
            tls_addr = Some(local_addr(&listener, at)?);
            listeners.push(tokio::spawn(accept_loop(
                listener,
                Some(acceptor),
                router.clone(),
                config.clone(),
                slots.clone(),
                shutdown.subscribe(),
            )));
        }
        if let Some(p) = &persist {
            listeners.push(tokio::spawn(persist::write_behind(
                router.clone(),
                p.clone(),
                shutdown.subscribe(),
            )));
        }
        listeners.push(tokio::spawn(expire_kept_sessions(
            router.clone(),
            opts.kept_session_expiry,
            shutdown.subscribe(),
        )));
        let Some(listen_addr) = plain_addr.or(tls_addr) else {
            return Err(BrokerError::InvalidOption {
                option: "listen",
                reason: "the plain listener is off and there is no TLS listener".into(),
            });
        };
        tracing::info!(
            plain = ?plain_addr,
            tls = ?tls_addr,
            "embedded MQTT broker listening"
        );
        Ok(Self {
            listen_addr,
            tls_addr,
            tls: plain_addr.is_none(),
            router,
            config,
            shutdown,
            listeners,
            persist,
        })
    }

    /// Stops the broker; with a store, saves every kept session and the retained messages
    /// first (durably), so a clean restart loses nothing a client was promised.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Some(p) = &self.persist {
            persist::save_all(&self.router, p).await;
        }
    }

    /// Replaces the local applications (`[[downstream.users]]`, on a config reload): new
    /// CONNECTs are checked against `users`; connections already admitted keep their rights
    /// until they reconnect.
    pub fn set_users(&self, users: Vec<LocalUser>) {
        *self.config.users.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(users);
    }

    /// With [`EmbeddedBrokerOptions::ack_after_client`], lets every other client connect: call
    /// it once that client has subscribed. Until then their CONNECTs wait unanswered, since a
    /// device's QoS 1 PUBLISH that no gateway filter matched would be acknowledged at once and
    /// lost. Without end-to-end acks the broker is open from the start.
    pub fn open(&self) {
        self.router.open();
    }

    /// Where devices connect (the bound address, port 0 resolved).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// Attaches the in-process session ([`local`]) named by
    /// [`EmbeddedBrokerOptions::in_process_client`]; a kept one is resumed with what waits in
    /// it. `None` when the broker was started without one.
    pub fn attach_local(&self) -> Option<LocalClient> {
        let client_id = self.router.reserved()?.to_string();
        Some(LocalClient::attach(self.router.clone(), &client_id))
    }

    /// True when the embedded broker serves TLS on [`listen_addr`](Self::listen_addr)
    /// (no plain listener).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The TLS listener's address, when there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Sessions held: connected clients plus kept sessions of absent ones.
    pub fn sessions(&self) -> usize {
        self.router.session_count()
    }

    /// Sessions kept for absent clients.
    pub fn kept_sessions(&self) -> usize {
        self.router.kept_sessions()
    }

    /// Retained messages held.
    pub fn retained(&self) -> usize {
        self.router.retained_count()
    }

    /// Messages dropped from full session queues since start.
    pub fn dropped(&self) -> u64 {
        self.router.dropped()
    }

    /// Retained messages refused since start because the broker held its maximum.
    pub fn retained_refused(&self) -> u64 {
        self.router.retained_refused()
    }

    /// A handle that answers what the broker knows about a client's current connection,
    /// for the parts of the gateway that decide what a connection may be sent.
    pub fn connections(&self) -> BrokerConnections {
        BrokerConnections(self.router.clone())
    }

    /// What clients were refused since start (CONNECTs, publishes, subscriptions).
    pub fn refusals(&self) -> Refusals {
        self.router.refusals()
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
    if opts.ack_after_inflight == 0 || opts.ack_after_inflight > usize::from(u16::MAX) {
        return bad("ack_after_inflight", "must be between 1 and 65535");
    }
    if opts.max_queued_bytes < opts.max_packet_bytes {
        return bad("max_queued_bytes", "must be at least max_packet_bytes");
    }
    if opts.connect_timeout.is_zero() {
        return bad("connect_timeout", "must be above zero");
    }
    if opts.max_topic_bytes < 64 || opts.max_topic_bytes > usize::from(u16::MAX) {
        return bad("max_topic_bytes", "must be between 64 and 65535");
    }
    if opts.max_topic_levels < 4 || opts.max_topic_levels > trie::MAX_TOPIC_LEVELS {
        return bad("max_topic_levels", "must be between 4 and 1024");
    }
    if opts.max_subscriptions == 0 {
        return bad("max_subscriptions", "must be at least 1");
    }
    if opts.max_connections_per_address == 0 {
        return bad("max_connections_per_address", "must be at least 1");
    }
    if opts.kept_session_expiry.is_zero() {
        return bad("kept_session_expiry", "must be above zero");
    }
    if opts.max_inbound_per_second == 0 {
        return bad("max_inbound_per_second", "must be at least 1");
    }
    Ok(())
}

/// What the embedded broker knows about its clients' connections (see
/// [`EmbeddedBroker::connections`]).
#[derive(Clone)]
pub struct BrokerConnections(Arc<Router>);

impl std::fmt::Debug for BrokerConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerConnections")
    }
}

impl BrokerConnections {
    /// The facts of `client_id`'s current connection, if it is connected.
    pub fn facts(&self, client_id: &str) -> Option<ConnectionFacts> {
        self.0.connection_facts(client_id)
    }
}

/// Brings back the retained messages and kept sessions `store` holds, within today's limits
/// and rights.
fn restore(
    router: &Router,
    persist: &Persistence,
    store: &Store,
    opts: &EmbeddedBrokerOptions,
    config: &ConnectionConfig,
) {
    let users = opts
        .rules
        .as_ref()
        .map(|r| r.users.clone())
        .unwrap_or_default();
    let restored = router.restore(
        store,
        |owner, client_id| persist::principal_for(opts.rules.as_ref(), &users, owner, client_id),
        |filter| config.topic_within_limits(filter),
    );
    // What was just read needs no saving; what was dropped is already gone from the store.
    persist.forget_marks();
    tracing::info!(
        retained = restored.retained,
        sessions = restored.sessions,
        dropped = restored.dropped,
        "embedded broker: retained messages and kept sessions restored"
    );
}

/// Discards expired kept sessions, checking a few times per expiry period (at least every
/// minute), until the broker stops.
async fn expire_kept_sessions(
    router: Arc<Router>,
    expiry: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = (expiry / 4).clamp(Duration::from_millis(50), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let expired = router.expire_kept_sessions(std::time::Instant::now());
        if expired > 0 {
            tracing::debug!(
                expired,
                "embedded broker: kept sessions of absent clients expired"
            );
        }
    }
}

/// Connection slots: all listeners together, and per non-loopback source address.
struct Slots {
    total: Semaphore,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    max_per_address: usize,
}

/// A connection's slots, given back when it ends.
struct SlotPermit {
    slots: Arc<Slots>,
    address: Option<IpAddr>,
}

impl Slots {
    /// Takes a slot for a connection from `ip`; `Err` names the limit that is reached.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Result<SlotPermit, &'static str> {
        let total = self.total.try_acquire().map_err(|_| "max_connections")?;
        // Local processes all share 127.0.0.1 (the simulator, local applications): a
        // per-address cap would only cap the box itself, which `max_connections` does.
        let address = (!ip.is_loopback()).then_some(ip);
        if let Some(ip) = address {
            let mut per = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
            let n = per.entry(ip).or_default();
            if *n >= self.max_per_address {
                return Err("max_connections_per_address");
            }
            *n += 1;
        }
        total.forget();
        Ok(SlotPermit {
            slots: self.clone(),
            address,
        })
    }
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        self.slots.total.add_permits(1);
        if let Some(ip) = self.address {
            let mut per = self
                .slots
                .per_address
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = per.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&ip);
                }
            }
        }
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, BrokerError> {
    let err = |source| BrokerError::Bind { addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(ACCEPT_BACKLOG).map_err(err)
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    listener
        .local_addr()
        .map_err(|source| BrokerError::Bind { addr, source })
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Arc<Router>,
    config: Arc<ConnectionConfig>,
    slots: Arc<Slots>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "embedded broker: accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let permit = match slots.take(peer.ip()) {
            Ok(permit) => permit,
            Err(limit) => {
                if router.note_refused(router::Refused::Connect) {
                    tracing::warn!(%peer, limit, "embedded broker: connection limit reached, refusing client (counted; logged at powers of two)");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        match &tls {
            None => {
                tokio::spawn(async move {
                    let _permit = permit;
                    connection::serve(stream, peer, None, router, config, shutdown).await;
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let stream = match timeout(config.connect_timeout, acceptor.accept(stream))
                        .await
                    {
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
                    let chain = identity::tls::peer_chain_ders(stream.get_ref().1);
                    connection::serve(stream, peer, Some(chain), router, config, shutdown).await;
                });
            }
        }
    }
}

impl BrokerConnections {
    /// Closes `client_id`'s connection and discards its session; true if it had one.
    pub fn disconnect(&self, client_id: &str) -> bool {
        self.0.disconnect_client(client_id)
    }

    /// Client sessions held now.
    pub fn sessions(&self) -> usize {
        self.0.session_count()
    }

    /// What clients were refused since start.
    pub fn refusals(&self) -> Refusals {
        self.0.refusals()
    }
}
