//! The emulated AWS IoT Core MQTT endpoint: mutual TLS (tokio-rustls), MQTT 3.1.1 and 5
//! (rumqttc's codecs, see `wire.rs`), one tokio task per connection.
//!
//! What it enforces, as IoT Core does:
//! - the claim certificate may only use `$aws/certificates/...` and
//!   `$aws/provisioning-templates/...`; anything else closes the connection;
//! - provisioning responses go only to the requesting connection, and only if it subscribed
//!   to the response topic (no correlation ids, no broker fan-out);
//! - other certificates must be ACTIVE and the client id must be a thing they are attached
//!   to (the emulator's ready-made gateway certificate, like the claim certificate, is known
//!   without being in the registry: it connects as its thing, `gw-01`); QoS 2 publishes, payloads over 128 KB and `$` topics close the connection; a second
//!   connection with the same client id takes over; keep-alive is enforced (1.5 x).
//!
//! What it does not: IoT policies on device topics (any device connection may publish or
//! subscribe to any non-reserved topic) and routing between device connections. Cloud-side
//! messages (the data plane's HTTPS Publish, `POST /topics/{topic}` on the API) go to every
//! device connection subscribed to a matching filter, QoS 1 without redelivery.
//!
//! Each connection reads what the socket has, handles every complete packet in it, records
//! device messages in one batch and writes all answers with one flush: that is what keeps
//! QoS 1 ingestion and certificate issuing cheap per message.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch, Notify};
use tokio::time::{timeout, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::counters::Counters;
use super::provisioning::{fingerprint_hex, Provisioning};
use super::state::{DeviceAccess, Registry};
use crate::clock;
use crate::cloud::aws::topics;
use crate::emulator::faults::Faults;
use crate::emulator::listeners::accept_until_shutdown;
use crate::emulator::messages::{LoggedMessage, MessageLog};
use crate::identity::tls::peer_leaf_der;
use crate::mqtt::props::MessageProperties;
use crate::mqtt::stream::{PacketStream, StreamError};
use crate::mqtt::wire::{
    self, ClientPacket, ConnectOutcome, ServerFeatures, ServerPacket, SubscriptionRequest,
    WireError,
};

/// TLS handshake and CONNECT must complete within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Writing one batch of answers must complete within this time.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// IoT Core's maximum keep-alive (also used when a client asks for 0).
const MAX_KEEP_ALIVE_SECS: u16 = 1200;
/// IoT Core's message payload limit.
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// The largest packet a client may send: a 128 KB payload plus room for topic and
/// properties. Anything larger is refused while still in the buffer.
const MAX_INCOMING_PACKET: usize = MAX_PAYLOAD_BYTES + 2048;

/// A CONNACK as IoT Core sends it: no stored sessions, no retained messages.
fn connack(outcome: ConnectOutcome) -> ServerPacket<'static> {
    ServerPacket::ConnAck {
        outcome,
        session_present: false,
        features: ServerFeatures::basic(false, MAX_INCOMING_PACKET as u32),
        assigned_client_id: None,
        reason: None,
    }
}

/// Cloud-side messages a slow connection may fall behind by before it misses some.
const DELIVERY_BACKLOG: usize = 1024;

/// A message published by the cloud side (the data plane's Publish API), for the device
/// connections subscribed to it.
#[derive(Clone, Debug)]
pub struct CloudPublish {
    /// Topic name (no wildcards, not reserved).
    pub topic: String,
    /// Requested QoS (0 or 1); a connection gets at most the QoS it subscribed with.
    pub qos: u8,
    /// Payload.
    pub payload: Bytes,
    /// MQTT 5 properties (the Publish API's `x-amz-mqtt5-*` headers and `contentType`),
    /// delivered to MQTT 5 connections.
    pub properties: Option<MessageProperties>,
}

/// What the emulator keeps of a device publish.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// Topic published to.
    pub topic: String,
    /// Payload bytes.
    pub payload: Bytes,
    /// QoS 0 or 1.
    pub qos: u8,
    /// MQTT 5 properties, by the names the Azure emulator logs: user properties by their
    /// names, `$.ct` content type, `$.cid` correlation data (UTF-8; other bytes as `$.cidb64`,
    /// base64), `$.ce = utf-8` for payload format indicator 1.
    pub properties: BTreeMap<String, String>,
}

impl LoggedMessage for Incoming {
    fn payload_len(&self) -> usize {
        self.payload.len()
    }
}

/// Everything connection tasks share.
pub struct ServerContext {
    /// The provisioning service.
    pub provisioning: Provisioning,
    /// Things and certificates.
    pub registry: Arc<Registry>,
    /// Device messages.
    pub messages: MessageLog<Incoming>,
    /// Counters for `/stats`.
    pub counters: Arc<Counters>,
    /// Injected faults.
    pub faults: Faults,
    /// Certificate id (SHA-256 hex) of the claim certificate.
    pub claim_certificate_id: String,
    /// The ready-made gateway certificate: (certificate id, thing name it connects as).
    pub gateway_certificate: (String, String),
    /// Client id -> (connection number, close signal) of the connection holding it.
    sessions: Mutex<HashMap<String, (u64, Arc<Notify>)>>,
    next_connection: AtomicU64,
    /// Cloud-side publishes, seen by every connection (each filters by its subscriptions).
    deliveries: broadcast::Sender<Arc<CloudPublish>>,
}

impl ServerContext {
    /// A context around the given services.
    pub fn new(
        provisioning: Provisioning,
        registry: Arc<Registry>,
        messages: MessageLog<Incoming>,
        counters: Arc<Counters>,
        claim_certificate_id: String,
        gateway_certificate: (String, String),
    ) -> Self {
        Self {
            provisioning,
            registry,
            messages,
            counters,
            faults: Faults::new(),
            claim_certificate_id,
            gateway_certificate,
            sessions: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            deliveries: broadcast::channel(DELIVERY_BACKLOG).0,
        }
    }

    /// Publishes a cloud-side message to the connected devices subscribed to its topic.
    pub fn publish(&self, message: CloudPublish) {
        // No receiver means no connection: nobody is subscribed, as with AWS, it is dropped.
        let _ = self.deliveries.send(Arc::new(message));
    }

    /// Connected clients right now.
    pub fn open_sessions(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Registers `client_id` for connection `number`, closing the connection that held it.
    fn take_over(&self, client_id: &str, number: u64, close: Arc<Notify>) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, previous)) = sessions.insert(client_id.to_string(), (number, close)) {
            previous.notify_one();
        }
    }

    fn release(&self, client_id: &str, number: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.get(client_id).is_some_and(|(n, _)| *n == number) {
            sessions.remove(client_id);
        }
    }
}

/// Accepts connections until `shutdown` turns true.
pub async fn run_listener(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<ServerContext>,
    shutdown: watch::Receiver<bool>,
) {
    let stopping = shutdown.clone();
    accept_until_shutdown(listener, stopping, "emulator MQTT", |tcp, peer| {
        if ctx.faults.in_outage() {
            Counters::bump(&ctx.counters.connections_refused);
            drop(tcp);
            return;
        }
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            serve_connection(tcp, peer, acceptor, ctx, shutdown).await;
        });
    })
    .await;
}

/// Who is on the other end, from the TLS client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Role {
    /// The claim certificate: provisioning topics only.
    Claim,
    /// Any other certificate issued by the emulator's CA (id = SHA-256 hex).
    Device(String),
}

/// Why a connection ended (for logs and counters).
#[derive(Debug)]
enum Close {
    /// The client sent DISCONNECT or closed the socket.
    ByClient,
    /// Policy or protocol violation: AWS closes without an answer.
    Violation(String),
    /// Keep-alive expired.
    KeepAlive,
    /// Another connection took the client id.
    TakenOver,
    /// Outage fault or emulator shutdown.
    Dropped,
    /// Socket error.
    Io(std::io::Error),
}

impl From<StreamError> for Close {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Closed => Close::ByClient,
            StreamError::Io(e) => Close::Io(e),
            other => Close::Violation(other.to_string()),
        }
    }
}

impl From<WireError> for Close {
    fn from(e: WireError) -> Self {
        Close::Violation(e.to_string())
    }
}

impl Close {
    fn describe(&self) -> String {
        match self {
            Close::ByClient => "closed by the client".into(),
            Close::Violation(reason) => format!("closed by the emulator: {reason}"),
            Close::KeepAlive => "keep-alive expired".into(),
            Close::TakenOver => "taken over by a newer connection with the same client id".into(),
            Close::Dropped => "dropped (outage fault or shutdown)".into(),
            Close::Io(e) => format!("socket error: {e}"),
        }
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: Arc<ServerContext>,
    shutdown: watch::Receiver<bool>,
) {
    Counters::bump(&ctx.counters.connections_total);
    let stream = match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "emulator TLS handshake failed");
            Counters::bump(&ctx.counters.connections_refused);
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "emulator TLS handshake timed out");
            Counters::bump(&ctx.counters.connections_refused);
            return;
        }
    };
    let Some(leaf) = peer_leaf_der(stream.get_ref().1) else {
        // The server config requires a client certificate; this is defence in depth.
        Counters::bump(&ctx.counters.connections_refused);
        return;
    };
    let certificate_id = fingerprint_hex(&leaf);
    let role = if certificate_id == ctx.claim_certificate_id {
        Role::Claim
    } else {
        Role::Device(certificate_id)
    };
    let number = ctx.next_connection.fetch_add(1, Ordering::Relaxed);
    let mut conn = Connection {
        io: PacketStream::new(stream, MAX_INCOMING_PACKET, READ_CHUNK),
        client_id: String::new(),
        role,
        subscriptions: Vec::new(),
        next_pkid: 0,
        ctx: ctx.clone(),
        batch: Vec::new(),
    };
    let connect = match timeout(HANDSHAKE_TIMEOUT, conn.io.read_connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let close = Close::from(e);
            tracing::debug!(%peer, close = %close.describe(), "emulator connection closed before CONNECT");
            Counters::bump(&ctx.counters.connections_refused);
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "emulator: no CONNECT in time");
            Counters::bump(&ctx.counters.connections_refused);
            return;
        }
    };
    conn.client_id = connect.client_id.clone();
    if let Role::Device(id) = &conn.role {
        let access = match &ctx.gateway_certificate {
            (gw, thing) if gw == id && *thing == connect.client_id => DeviceAccess::Allowed,
            (gw, _) if gw == id => DeviceAccess::ClientIdNotThing,
            _ => ctx.registry.device_access(id, &connect.client_id),
        };
        if access != DeviceAccess::Allowed {
            tracing::debug!(%peer, client_id = %connect.client_id, ?access, "emulator refused device connection");
            Counters::bump(&ctx.counters.connections_refused);
            let _ = conn.refuse().await;
            return;
        }
    }
    if conn.client_id.is_empty() {
        // IoT Core requires a client id; assign one so takeover bookkeeping stays simple.
        conn.client_id = format!("emulator-assigned-{number}");
    }

    let close = Arc::new(Notify::new());
    ctx.take_over(&conn.client_id, number, close.clone());
    Counters::bump(&ctx.counters.connections_open);
    tracing::debug!(%peer, client_id = %conn.client_id, protocol = ?conn.io.protocol(), role = ?conn.role, "emulator connection accepted");
    let keep_alive = match connect.keep_alive {
        0 => MAX_KEEP_ALIVE_SECS,
        k => k.min(MAX_KEEP_ALIVE_SECS),
    };
    let idle_limit = Duration::from_millis(u64::from(keep_alive) * 1500);
    let result = conn.run(idle_limit, close, shutdown).await;
    ctx.release(&conn.client_id, number);
    ctx.counters
        .connections_open
        .fetch_sub(1, Ordering::Relaxed);
    if let Close::Violation(reason) = &result {
        Counters::bump(&ctx.counters.connections_closed_by_policy);
        tracing::info!(%peer, client_id = %conn.client_id, %reason, "emulator closed connection");
    } else {
        tracing::debug!(%peer, client_id = %conn.client_id, close = %result.describe(), "emulator connection ended");
    }
    conn.io.shutdown().await;
}

struct Connection {
    io: PacketStream<TlsStream<TcpStream>>,
    client_id: String,
    role: Role,
    /// (filter, granted QoS); a handful per connection, so a Vec beats a map.
    subscriptions: Vec<(String, u8)>,
    next_pkid: u16,
    ctx: Arc<ServerContext>,
    /// Device messages of the current read, recorded together.
    batch: Vec<Incoming>,
}

impl Connection {
    async fn refuse(&mut self) -> Result<(), Close> {
        self.queue(connack(ConnectOutcome::NotAuthorized))?;
        self.flush().await
    }

    fn queue(&mut self, packet: ServerPacket<'_>) -> Result<(), Close> {
        Ok(self.io.queue(packet)?)
    }

    async fn flush(&mut self) -> Result<(), Close> {
        Ok(self.io.flush(WRITE_TIMEOUT).await?)
    }

    async fn run(
        &mut self,
        idle_limit: Duration,
        close: Arc<Notify>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Close {
        let mut outage = self.ctx.faults.outage_watch();
        outage.mark_unchanged();
        let mut deliveries = self.ctx.deliveries.subscribe();
        // An outage that began during this connection's handshake drops it too.
        if self.ctx.faults.in_outage() {
            return Close::Dropped;
        }
        if let Err(c) = self.queue(connack(ConnectOutcome::Accepted)) {
            return c;
        }
        // Bytes that arrived with the CONNECT are handled before waiting for more.
        let mut deadline = Instant::now() + idle_limit;
        loop {
            if let Err(c) = self.process_buffer().await {
                return c;
            }
            if let Err(c) = self.flush().await {
                return c;
            }
            tokio::select! {
                filled = tokio::time::timeout_at(deadline, self.io.fill()) => match filled {
                    Ok(Ok(())) => deadline = Instant::now() + idle_limit,
                    Ok(Err(e)) => return e.into(),
                    Err(_) => return Close::KeepAlive,
                },
                delivery = deliveries.recv() => match delivery {
                    Ok(message) => {
                        if let Err(c) = self.deliver(&message) {
                            return c;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(client_id = %self.client_id, missed, "emulator connection fell behind cloud-side publishes; some were not delivered");
                    }
                    // The sender lives in the context this connection holds.
                    Err(broadcast::error::RecvError::Closed) => return Close::Dropped,
                },
                _ = close.notified() => return Close::TakenOver,
                _ = outage.changed() => return Close::Dropped,
                _ = shutdown.changed() => return Close::Dropped,
            }
        }
    }

    /// Handles every complete packet in the read buffer.
    async fn process_buffer(&mut self) -> Result<(), Close> {
        loop {
            let packet = match self.io.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e @ WireError::TooLarge { .. }) => {
                    return Err(Close::Violation(format!(
                        "{e} (IoT Core allows {MAX_PAYLOAD_BYTES}-byte payloads)"
                    )))
                }
                Err(e) => return Err(Close::Violation(e.to_string())),
            };
            match packet {
                ClientPacket::Publish {
                    topic,
                    qos,
                    pkid,
                    payload,
                    properties,
                    ..
                } => {
                    self.on_publish(topic, qos, pkid, payload, properties)
                        .await?
                }
                ClientPacket::Subscribe { pkid, filters } => self.on_subscribe(pkid, filters)?,
                ClientPacket::Unsubscribe { pkid, filters } => {
                    self.subscriptions
                        .retain(|(f, _)| !filters.iter().any(|u| u == f));
                    self.queue(ServerPacket::UnsubAck {
                        pkid,
                        count: filters.len(),
                    })?;
                }
                ClientPacket::PubAck(_) => {}
                ClientPacket::PubRel(_) => {
                    return Err(Close::Violation(
                        "PUBREL (IoT Core supports QoS 0 and 1)".into(),
                    ))
                }
                ClientPacket::PingReq => self.queue(ServerPacket::PingResp)?,
                ClientPacket::Disconnect { .. } => {
                    self.record_batch();
                    self.flush().await?;
                    return Err(Close::ByClient);
                }
                ClientPacket::PubRec(_) | ClientPacket::PubComp(_) => {
                    return Err(Close::Violation(
                        "PUBREC/PUBCOMP (IoT Core never sends QoS 2)".into(),
                    ))
                }
                ClientPacket::Unexpected(what) => return Err(Close::Violation(what.into())),
            }
        }
        // Messages are visible in /messages before their PUBACKs leave.
        self.record_batch();
        Ok(())
    }

    fn record_batch(&mut self) {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            self.ctx
                .messages
                .record(&self.client_id, batch, clock::unix_us());
        }
    }

    async fn on_publish(
        &mut self,
        topic: String,
        qos: u8,
        pkid: u16,
        payload: Bytes,
        properties: Option<Box<MessageProperties>>,
    ) -> Result<(), Close> {
        if qos > 1 {
            return Err(Close::Violation(format!(
                "QoS {qos} publish to {topic} (IoT Core supports QoS 0 and 1)"
            )));
        }
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Close::Violation(format!(
                "payload of {} bytes to {topic} exceeds {MAX_PAYLOAD_BYTES} bytes",
                payload.len()
            )));
        }
        match &self.role {
            Role::Claim => {
                let Some(request) = topics::parse_request_topic(&topic) else {
                    if topics::is_provisioning_topic(&topic) {
                        // Allowed by the claim policy but not an API: accepted and dropped.
                        if qos == 1 {
                            self.queue(ServerPacket::PubAck(pkid))?;
                        }
                        return Ok(());
                    }
                    return Err(Close::Violation(format!(
                        "claim certificate may not publish to {topic}"
                    )));
                };
                if qos == 1 {
                    self.queue(ServerPacket::PubAck(pkid))?;
                }
                let reply = self.ctx.provisioning.handle(&request, &topic, &payload);
                self.respond(&reply.topic, reply.payload).await
            }
            Role::Device(_) => {
                if topic.starts_with('$') {
                    return Err(Close::Violation(format!(
                        "device may not publish to reserved topic {topic}"
                    )));
                }
                self.batch.push(Incoming {
                    topic,
                    payload,
                    qos,
                    properties: properties
                        .map(|p| p.to_stored().into_iter().collect())
                        .unwrap_or_default(),
                });
                if qos == 1 {
                    self.queue(ServerPacket::PubAck(pkid))?;
                }
                Ok(())
            }
        }
    }

    /// Publishes a provisioning response to this connection if it subscribed to it.
    async fn respond(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), Close> {
        let (delay, drop) = self.ctx.faults.response_plan();
        if drop {
            Counters::bump(&self.ctx.counters.dropped_responses);
            return Ok(());
        }
        let granted = self
            .subscriptions
            .iter()
            .filter(|(f, _)| wire::topic_matches(topic, f))
            .map(|(_, q)| *q)
            .max();
        let Some(qos) = granted else {
            // Not subscribed: AWS computes the answer and nobody receives it.
            return Ok(());
        };
        if !delay.is_zero() {
            self.flush().await?;
            tokio::time::sleep(delay).await;
        }
        let pkid = self.pkid();
        self.queue(ServerPacket::Publish {
            topic,
            qos,
            pkid,
            retain: false,
            dup: false,
            payload: Bytes::from(payload),
            properties: None,
        })
    }

    /// Queues a cloud-side message if this device connection subscribed to its topic.
    fn deliver(&mut self, message: &CloudPublish) -> Result<(), Close> {
        if self.role == Role::Claim {
            return Ok(());
        }
        let granted = self
            .subscriptions
            .iter()
            .filter(|(f, _)| wire::topic_matches(&message.topic, f))
            .map(|(_, q)| *q)
            .max();
        let Some(qos) = granted else {
            return Ok(());
        };
        let pkid = self.pkid();
        self.queue(ServerPacket::Publish {
            topic: &message.topic,
            qos: qos.min(message.qos),
            pkid,
            retain: false,
            dup: false,
            payload: message.payload.clone(),
            properties: MessageProperties::to_publish(message.properties.as_ref(), None, &[]),
        })
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1);
        if self.next_pkid == 0 {
            self.next_pkid = 1;
        }
        self.next_pkid
    }

    fn on_subscribe(&mut self, pkid: u16, filters: Vec<SubscriptionRequest>) -> Result<(), Close> {
        let mut granted = Vec::with_capacity(filters.len());
        for SubscriptionRequest { filter, qos, .. } in filters {
            if self.role == Role::Claim && !topics::is_provisioning_topic(&filter) {
                return Err(Close::Violation(format!(
                    "claim certificate may not subscribe to {filter}"
                )));
            }
            if !wire::valid_filter(&filter) {
                // Encoded as before: 0x80 (3.1.1), 0x87 (5).
                granted.push(Err(wire::SubRefusal::NotAuthorized));
                continue;
            }
            // QoS 2 is granted as QoS 1, as IoT Core does.
            let qos = qos.min(1);
            match self.subscriptions.iter_mut().find(|(f, _)| *f == filter) {
                Some(existing) => existing.1 = qos,
                None => self.subscriptions.push((filter, qos)),
            }
            granted.push(Ok(qos));
        }
        self.queue(ServerPacket::SubAck {
            pkid,
            granted: &granted,
            reason: None,
        })
    }
}
