//! One device connection of the embedded broker: CONNECT, then a loop that handles what the
//! client sends and writes what its session has queued, in one tokio task.
//!
//! Every complete packet in the read buffer is handled before anything is written, and all
//! answers and deliveries of one round go out with one write, so a busy client costs few
//! syscalls. QoS 1 and 2 deliveries respect the session's in-flight window, bounded by the
//! client's Receive Maximum; QoS 2 publishes from clients are received exactly once
//! (PUBREC/PUBREL/PUBCOMP), and QoS 2 deliveries complete the same exchange the other way.
//! MQTT 5 topic aliases from the client are resolved per connection; a delivery larger than
//! the client's Maximum Packet Size is not sent to it (MQTT-3.1.2-25).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};

use super::admit::ConnectionConfig;
use super::rate::InboundRate;
use super::router::{AckWait, ConnectionFacts, Delivery, Message, Refused, Router, Session};
use super::rules::{truncated, Principal};
use super::session::PendingWill;
use crate::mqtt::props::{self, MessageProperties};
use crate::mqtt::stream::{PacketStream, StreamError};
use crate::mqtt::wire::{
    self, ClientPacket, ConnectInfo, ConnectOutcome, DisconnectReason, Protocol, ServerFeatures,
    ServerPacket, SubRefusal, WireError,
};

/// Writing one round of packets must complete within this time.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Read buffer growth step.
const READ_CHUNK: usize = 4 * 1024;
/// Without a keep-alive a silent client is still dropped after this long.
const NO_KEEP_ALIVE_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// Topic aliases an MQTT 5 client may set up on one connection (announced in CONNACK).
pub const TOPIC_ALIAS_MAX: u16 = 64;

/// Why a connection ended.
enum Close {
    /// DISCONNECT from the client; `with_will` when it asked for its will anyway.
    Graceful {
        with_will: bool,
    },
    ByClient,
    Io(std::io::Error),
    KeepAlive,
    TakenOver,
    Violation(String),
    /// A packet over the broker's limit (MQTT 5: 0x95).
    TooLarge(String),
    /// A topic alias the broker did not grant, or not set up (MQTT 5: 0x94).
    AliasInvalid(String),
    Shutdown,
    /// A message of this client left the gateway's session before the gateway acknowledged it.
    NotDelivered,
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Close::Graceful { .. } => f.write_str("DISCONNECT"),
            Close::ByClient => f.write_str("closed by the client"),
            Close::Io(e) => write!(f, "I/O error: {e}"),
            Close::KeepAlive => f.write_str("keep-alive expired"),
            Close::TakenOver => {
                f.write_str("taken over by a new connection with the same client id")
            }
            Close::Violation(what) => write!(f, "protocol violation: {what}"),
            Close::TooLarge(what) => write!(f, "packet too large: {what}"),
            Close::AliasInvalid(what) => write!(f, "topic alias invalid: {what}"),
            Close::Shutdown => f.write_str("broker stopping"),
            Close::NotDelivered => f.write_str(
                "a message left the gateway's session before the gateway stored it (its queue was full or the session was discarded); closing so that the client sends it again",
            ),
        }
    }
}

impl From<StreamError> for Close {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Closed => Close::ByClient,
            StreamError::Io(e) => Close::Io(e),
            StreamError::Wire(e @ WireError::TooLarge { .. }) => Close::TooLarge(e.to_string()),
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
    /// What an MQTT 5 client is told before the broker closes (`None`: nothing to send: the
    /// client left, or the socket is gone).
    fn disconnect_reason(&self) -> Option<DisconnectReason> {
        match self {
            Close::Graceful { .. } | Close::ByClient | Close::Io(_) => None,
            Close::KeepAlive => Some(DisconnectReason::KeepAliveTimeout),
            Close::TakenOver => Some(DisconnectReason::SessionTakenOver),
            Close::Violation(_) => Some(DisconnectReason::ProtocolError),
            Close::TooLarge(_) => Some(DisconnectReason::PacketTooLarge),
            Close::AliasInvalid(_) => Some(DisconnectReason::TopicAliasInvalid),
            Close::Shutdown => Some(DisconnectReason::ServerShuttingDown),
            Close::NotDelivered => Some(DisconnectReason::UnspecifiedError),
        }
    }

    fn publishes_will(&self) -> bool {
        match self {
            Close::Graceful { with_will } => *with_will,
            Close::TakenOver | Close::Shutdown => false,
            Close::ByClient
            | Close::Io(_)
            | Close::KeepAlive
            | Close::Violation(_)
            | Close::TooLarge(_)
            | Close::AliasInvalid(_)
            | Close::NotDelivered => true,
        }
    }
}

/// Answers a refused CONNECT and logs it (rate-limited: a hostile client cannot flood the log).
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    router: &Router,
    peer: SocketAddr,
    client_id: &str,
    outcome: ConnectOutcome,
    features: ServerFeatures,
    why: &str,
) {
    if router.note_refused(Refused::Connect) {
        tracing::info!(%peer, client_id = %truncated(client_id), reason = why, "embedded broker: CONNECT refused (counted; logged at powers of two)");
    }
    let _ = conn.queue(ServerPacket::ConnAck {
        outcome,
        session_present: false,
        features,
        assigned_client_id: None,
        reason: Some(why),
    });
    let _ = conn.flush().await;
}

/// Serves one client until it leaves, misbehaves, is taken over or the broker stops.
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    // `Some` on the TLS listener, with the client's certificate chain (DER, leaf first; empty
    // without one).
    tls: Option<Vec<Vec<u8>>>,
    router: Arc<Router>,
    cfg: Arc<ConnectionConfig>,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Connection {
        io: PacketStream::new(stream, cfg.max_packet, READ_CHUNK),
        inbound: None,
        pending_acks: VecDeque::new(),
        aliases: HashMap::new(),
        client_max_packet: usize::MAX,
        problem_information: true,
    };
    let mut connect = match timeout(cfg.connect_timeout, conn.io.read_connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "embedded broker: no valid CONNECT");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "embedded broker: no CONNECT within {:?}", cfg.connect_timeout);
            return;
        }
    };
    let number = router.connection_number();
    let features = ServerFeatures {
        retain: true,
        max_packet: u32::try_from(cfg.max_packet).unwrap_or(u32::MAX),
        max_qos: 2,
        topic_alias_max: TOPIC_ALIAS_MAX,
        shared_subscriptions: true,
        subscription_identifiers: true,
    };
    if let Some(max) = connect.max_packet_size {
        conn.client_max_packet = usize::try_from(max).unwrap_or(usize::MAX);
    }
    conn.problem_information = connect.problem_information;
    let assigned = connect.client_id.is_empty();
    if assigned && connect.keep_session && connect.protocol == Protocol::V4 {
        // MQTT 3.1.1 §3.1.3.1: an empty client id needs a clean session.
        let _ = conn.queue(ServerPacket::ConnAck {
            outcome: ConnectOutcome::BadClientId,
            session_present: false,
            features,
            assigned_client_id: None,
            reason: Some("MQTT 3.1.1: an empty client id needs a clean session"),
        });
        let _ = conn.flush().await;
        return;
    }
    if connect.authentication_method.is_some() {
        // MQTT 5 §4.12: a server without the client's authentication method refuses and
        // closes (MQTT-4.12.0-1); enhanced authentication is not supported at all.
        let _ = conn.queue(ServerPacket::ConnAck {
            outcome: ConnectOutcome::BadAuthenticationMethod,
            session_present: false,
            features,
            assigned_client_id: None,
            reason: Some(
                "enhanced authentication (AUTH) is not supported: connect with a user name and \
                 password, a SAS token or a client certificate",
            ),
        });
        let _ = conn.flush().await;
        return;
    }
    let client_id = if assigned {
        format!("fleetgw-auto-{number}")
    } else {
        connect.client_id.clone()
    };
    if router.is_reserved(&client_id) {
        // The gateway's own session lives inside the process; nothing on the network may
        // take it over or speak for it, whatever credentials it brings.
        refuse(
            &mut conn,
            &router,
            peer,
            &client_id,
            ConnectOutcome::BadClientId,
            features,
            "the client id is the gateway's own (in-process) session",
        )
        .await;
        return;
    }
    let client_chain = tls.as_deref().unwrap_or_default();
    let principal = match cfg
        .admit(&connect, &client_id, assigned, client_chain)
        .await
    {
        Ok(p) => p,
        Err((outcome, why)) => {
            refuse(
                &mut conn, &router, peer, &client_id, outcome, features, &why,
            )
            .await;
            return;
        }
    };
    if let Some(will) = &mut connect.will {
        will.retain &= principal.may_retain();
    }
    conn.inbound = Some(InboundRate::new(cfg.max_inbound_per_second));
    // With end-to-end acks, devices wait (their CONNECT unanswered) until the gateway's
    // session has subscribed; the gateway's startup takes milliseconds.
    let mut stopping = shutdown.clone();
    tokio::select! {
        _ = router.admitted(&client_id) => {}
        _ = stopping.wait_for(|s| *s) => return,
    }
    let keep = connect
        .keep_session
        .then(|| match connect.session_expiry_secs {
            Some(secs) => Duration::from_secs(u64::from(secs)),
            None => Duration::MAX,
        });
    let attached = router.connect(
        &client_id,
        principal.owner(),
        number,
        connect.clean_start,
        keep,
    );
    let session = attached.session;
    router.set_facts(
        &session,
        number,
        ConnectionFacts {
            peer,
            tls: tls.is_some(),
            authenticated: matches!(
                principal,
                Principal::User(_)
                    | Principal::Device {
                        authenticated: true,
                        ..
                    }
            ),
            client_cert_sha256: client_chain.first().and_then(|der| {
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
                    .as_ref()
                    .try_into()
                    .ok()
            }),
        },
    );
    if let Err(close) = conn.queue(ServerPacket::ConnAck {
        outcome: ConnectOutcome::Accepted,
        session_present: attached.resumed,
        features,
        assigned_client_id: assigned.then_some(client_id.as_str()),
        reason: None,
    }) {
        router.disconnect(&session, number, None);
        tracing::debug!(%peer, client_id, %close, "embedded broker: cannot answer CONNECT");
        return;
    }
    let shutdown_for_will = shutdown.clone();
    let close = conn
        .run(
            &connect, &principal, &cfg, &router, &session, number, shutdown,
        )
        .await;
    match &close {
        Close::Graceful { .. } | Close::ByClient | Close::Shutdown => {
            tracing::trace!(%peer, client_id, "embedded broker: connection closed")
        }
        other => {
            tracing::debug!(%peer, client_id, close = %other, "embedded broker: connection ended")
        }
    }
    if connect.protocol == Protocol::V5 {
        if let Some(reason) = close.disconnect_reason() {
            let _ = conn.queue(ServerPacket::Disconnect {
                reason,
                reason_string: Some(truncated(&close.to_string())),
            });
            let _ = conn.flush().await;
        }
    }
    let will = if close.publishes_will() {
        connect.will.clone()
    } else {
        None
    };
    match will {
        // MQTT 5 will delay: published when the delay or the kept session ends, whichever is
        // first, unless the client is back in its session by then (MQTT-3.1.3-9). A session
        // that is not kept ends now, and so the will goes now. One timer per session at most
        // (a new one replaces it, a resuming connection cancels it), and it ends with the
        // broker, so disconnecting in a loop cannot pile timers up.
        Some(w) if w.delay_secs > 0 && keep.is_some() => {
            router.disconnect(&session, number, None);
            let delay = Duration::from_secs(u64::from(w.delay_secs)).min(keep.unwrap_or_default());
            let (timer_router, timer_session) = (router.clone(), session.clone());
            let mut stopping = shutdown_for_will;
            let timer = tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopping.wait_for(|s| *s) => return,
                }
                if !timer_router.is_attached(&timer_session) {
                    timer_router.publish_will(timer_session.client_id(), w);
                }
            });
            session.set_pending_will(PendingWill(timer.abort_handle()));
        }
        will => router.disconnect(&session, number, will),
    }
    conn.io.shutdown().await;
}

struct Connection<S> {
    io: PacketStream<S>,
    /// The client's PUBLISH rate (set once the client is admitted).
    inbound: Option<InboundRate>,
    /// QoS 1 PUBLISHes of this client not acknowledged yet, in arrival order: those waiting
    /// for the acknowledging client hold back the ones after them (MQTT 3.1.1 §4.6).
    pending_acks: VecDeque<PendingAck>,
    /// MQTT 5 topic aliases the client set up on this connection.
    aliases: HashMap<u16, Arc<str>>,
    /// The largest packet the client accepts (MQTT 5 Maximum Packet Size).
    client_max_packet: usize,
    /// MQTT 5 Request Problem Information: reason strings on SUBACK, PUBACK and PUBREC.
    problem_information: bool,
}

/// A QoS 1 PUBLISH waiting for its PUBACK.
struct PendingAck {
    pkid: u16,
    /// What the PUBACK waits for (end-to-end acknowledgement), if anything.
    wait: Option<Arc<AckWait>>,
    /// Refused by the trust boundary: the PUBACK says so (MQTT 5).
    refused: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    fn queue(&mut self, packet: ServerPacket<'_>) -> Result<(), Close> {
        Ok(self.io.queue(packet)?)
    }

    async fn flush(&mut self) -> Result<(), Close> {
        Ok(self.io.flush(WRITE_TIMEOUT).await?)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        connect: &ConnectInfo,
        principal: &Principal,
        cfg: &ConnectionConfig,
        router: &Router,
        session: &Arc<Session>,
        number: u64,
        mut shutdown: watch::Receiver<bool>,
    ) -> Close {
        // MQTT: the server may drop a client silent for 1.5 x its keep-alive.
        let idle_limit = match connect.keep_alive {
            0 => NO_KEEP_ALIVE_LIMIT,
            k => Duration::from_millis(u64::from(k) * 1500),
        };
        let mut deadline = Instant::now() + idle_limit;
        let mut sendable: Vec<(u16, Delivery)> = Vec::new();
        // The client's Receive Maximum bounds the window too (MQTT-3.3.4-9).
        let window = router
            .window(session.client_id())
            .min(usize::from(connect.receive_maximum.unwrap_or(u16::MAX)).max(1));
        // QoS 2 messages the client received on an earlier connection: PUBREL again.
        for pkid in session.releases_to_resend(number) {
            if let Err(close) = self.queue(ServerPacket::PubRel(pkid)) {
                return close;
            }
        }
        loop {
            if let Err(close) = self.process_buffer(principal, cfg, router, session) {
                let _ = self.flush().await;
                return close;
            }
            if let Err(close) = self.release_acks() {
                return close;
            }
            if !session.take_sendable(number, window, &mut sendable) {
                return Close::TakenOver;
            }
            let now = std::time::Instant::now();
            for (pkid, d) in sendable.drain(..) {
                // What is left of its life goes with it (MQTT-3.3.2-6).
                let left = props::remaining(d.message.expires_at, now);
                if left == props::Remaining::Expired {
                    session.acknowledge(pkid);
                    // Its window slot is free: take the next message without waiting.
                    session.wake_up();
                    continue;
                }
                let expiry = left.interval();
                let properties = match connect.protocol {
                    Protocol::V4 => None,
                    Protocol::V5 => MessageProperties::to_publish(
                        d.message.properties.as_deref(),
                        expiry,
                        &d.subscription_ids,
                    ),
                };
                let packet = ServerPacket::Publish {
                    topic: &d.message.topic,
                    qos: d.qos,
                    pkid,
                    retain: d.retain,
                    dup: d.dup,
                    payload: d.message.payload.clone(),
                    properties,
                };
                match self.io.queue_within(packet, self.client_max_packet) {
                    Ok(true) => {}
                    // Larger than the client accepts: discarded as if sent (MQTT-3.1.2-25).
                    Ok(false) => {
                        if d.qos > 0 {
                            session.acknowledge(pkid);
                            session.wake_up();
                        }
                    }
                    Err(e) => return Close::Violation(e.to_string()),
                }
            }
            if let Err(close) = self.flush().await {
                return close;
            }
            // Over its PUBLISH rate, the client is not read until the rate allows: TCP flow
            // control holds it back, and a flood costs the broker nothing.
            let pause = self.inbound.as_mut().and_then(InboundRate::pause);
            tokio::select! {
                _ = shutdown.changed() => return Close::Shutdown,
                _ = session.woken() => {}
                _ = tokio::time::sleep(pause.unwrap_or_default()), if pause.is_some() => {
                    // It was busy, not silent.
                    deadline = deadline.max(Instant::now() + idle_limit);
                }
                read = timeout_at(deadline, self.io.fill()), if pause.is_none() => match read {
                    Ok(Ok(())) => deadline = Instant::now() + idle_limit,
                    Ok(Err(e)) => return e.into(),
                    Err(_) => return Close::KeepAlive,
                },
            }
        }
    }

    /// The topic of a PUBLISH: its name, which an MQTT 5 alias then stands for, or the name
    /// an alias stands for (MQTT 5 §3.3.2.3.4).
    fn resolve_alias(&mut self, topic: String, alias: Option<u16>) -> Result<Arc<str>, Close> {
        let Some(alias) = alias else {
            return Ok(Arc::from(topic));
        };
        if alias == 0 || alias > TOPIC_ALIAS_MAX {
            return Err(Close::AliasInvalid(format!(
                "alias {alias} outside 1..={TOPIC_ALIAS_MAX}"
            )));
        }
        if topic.is_empty() {
            return self
                .aliases
                .get(&alias)
                .cloned()
                .ok_or_else(|| Close::AliasInvalid(format!("alias {alias} was never set")));
        }
        let topic: Arc<str> = Arc::from(topic);
        self.aliases.insert(alias, topic.clone());
        Ok(topic)
    }

    /// Acknowledges QoS 1 PUBLISH `pkid` at once if nothing before it waits, else after them.
    fn ack_in_order(
        &mut self,
        pkid: u16,
        wait: Option<Arc<AckWait>>,
        refused: bool,
    ) -> Result<(), Close> {
        if wait.is_none() && self.pending_acks.is_empty() {
            return self.queue(if refused {
                ServerPacket::PubAckRefused {
                    pkid,
                    say_why: self.problem_information,
                }
            } else {
                ServerPacket::PubAck(pkid)
            });
        }
        self.pending_acks.push_back(PendingAck {
            pkid,
            wait,
            refused,
        });
        Ok(())
    }

    /// Queues the PUBACKs whose messages no longer wait for the acknowledging client, in
    /// arrival order.
    fn release_acks(&mut self) -> Result<(), Close> {
        // A message that will never reach the gateway ends the connection at once: the client
        // resends everything unacknowledged after reconnecting, in its order.
        if self
            .pending_acks
            .iter()
            .any(|p| p.wait.as_ref().is_some_and(|w| w.is_lost()))
        {
            return Err(Close::NotDelivered);
        }
        while let Some(front) = self.pending_acks.front() {
            if front.wait.as_ref().is_some_and(|w| !w.is_done()) {
                break;
            }
            let (pkid, refused) = (front.pkid, front.refused);
            self.pending_acks.pop_front();
            self.queue(if refused {
                ServerPacket::PubAckRefused {
                    pkid,
                    say_why: self.problem_information,
                }
            } else {
                ServerPacket::PubAck(pkid)
            })?;
        }
        Ok(())
    }

    /// Handles every complete packet in the read buffer.
    fn process_buffer(
        &mut self,
        principal: &Principal,
        cfg: &ConnectionConfig,
        router: &Router,
        session: &Arc<Session>,
    ) -> Result<(), Close> {
        loop {
            let Some(packet) = self.io.next_packet()? else {
                return Ok(());
            };
            match packet {
                ClientPacket::Publish {
                    topic,
                    qos,
                    pkid,
                    retain,
                    payload,
                    properties,
                    expiry_secs,
                    topic_alias,
                } => {
                    if let Some(rate) = &mut self.inbound {
                        rate.take();
                    }
                    let topic = self.resolve_alias(topic, topic_alias)?;
                    if !wire::valid_topic(&topic) {
                        return Err(Close::Violation(format!(
                            "invalid topic name {:?}",
                            truncated(&topic)
                        )));
                    }
                    if !cfg.topic_within_limits(&topic) {
                        return Err(Close::Violation(format!(
                            "topic name over {} bytes or {} levels",
                            cfg.max_topic_bytes, cfg.max_topic_levels
                        )));
                    }
                    if !principal.may_publish(&topic) {
                        if router.note_refused(Refused::Publish) {
                            tracing::info!(
                                client = %truncated(session.client_id()),
                                kind = principal.kind(),
                                topic = %truncated(&topic),
                                "embedded broker: PUBLISH outside the client's rights dropped (counted; logged at powers of two)"
                            );
                        }
                        match qos {
                            0 => {}
                            1 => self.ack_in_order(pkid, None, true)?,
                            _ => self.queue(ServerPacket::PubRecRefused {
                                pkid,
                                say_why: self.problem_information,
                            })?,
                        }
                        continue;
                    }
                    let message = Message {
                        topic,
                        payload,
                        qos,
                        // Only the gateway (and local applications) leave retained messages.
                        retain: retain && principal.may_retain(),
                        properties: properties.map(|p| Arc::new(*p)),
                        expires_at: props::expiry_deadline(expiry_secs),
                        published_at: Some(std::time::Instant::now()),
                    };
                    match qos {
                        0 => {
                            router.publish(session.client_id(), message);
                        }
                        1 => {
                            let wait = router.publish_acked(session, message);
                            self.ack_in_order(pkid, wait, false)?;
                        }
                        _ => {
                            // A repeated QoS 2 PUBLISH before PUBREL is the same message.
                            // Session state: also after a reconnect (MQTT-4.3.3-9).
                            if session.awaiting_release(pkid) {
                                router.publish(session.client_id(), message);
                            }
                            self.queue(ServerPacket::PubRec(pkid))?;
                        }
                    }
                }
                ClientPacket::PubAck(pkid) | ClientPacket::PubComp(pkid) => {
                    session.acknowledge(pkid);
                }
                ClientPacket::PubRec(pkid) => {
                    if session.received(pkid) {
                        self.queue(ServerPacket::PubRel(pkid))?;
                    }
                }
                ClientPacket::PubRel(pkid) => {
                    session.released_by_client(pkid);
                    self.queue(ServerPacket::PubComp(pkid))?;
                }
                ClientPacket::Subscribe { pkid, filters } => {
                    let allowed: Vec<Result<(), SubRefusal>> = filters
                        .iter()
                        .map(|f| {
                            // A shared subscription is judged by the filter inside it.
                            let inner = match wire::shared_subscription(&f.filter) {
                                Some(Ok((_, inner))) => inner,
                                _ => f.filter.as_str(),
                            };
                            if !cfg.topic_within_limits(&f.filter) {
                                Err(SubRefusal::InvalidFilter)
                            } else if !principal.may_subscribe(inner) {
                                Err(SubRefusal::NotAuthorized)
                            } else {
                                Ok(())
                            }
                        })
                        .collect();
                    let names: Vec<String> = filters.iter().map(|f| f.filter.clone()).collect();
                    let (permitted, refused): (Vec<_>, Vec<_>) = filters
                        .into_iter()
                        .zip(&allowed)
                        .partition(|(_, ok)| ok.is_ok());
                    for (f, _) in &refused {
                        if router.note_refused(Refused::Subscription) {
                            tracing::info!(
                                client = %truncated(session.client_id()),
                                kind = principal.kind(),
                                filter = %truncated(&f.filter),
                                "embedded broker: subscription outside the client's rights refused (counted; logged at powers of two)"
                            );
                        }
                    }
                    let permitted: Vec<_> = permitted.into_iter().map(|(f, _)| f).collect();
                    let mut answers = router.subscribe(session, &permitted).into_iter();
                    let granted: Vec<Result<u8, SubRefusal>> = allowed
                        .iter()
                        .map(|ok| match ok {
                            Ok(()) => answers.next().unwrap_or(Err(SubRefusal::InvalidFilter)),
                            Err(why) => Err(*why),
                        })
                        .collect();
                    let reason = wire::subscribe_refusal_reason(&names, &granted);
                    self.queue(ServerPacket::SubAck {
                        pkid,
                        granted: &granted,
                        // MQTT-3.1.2-29: no reason string if the client asked for none.
                        reason: reason.as_deref().filter(|_| self.problem_information),
                    })?;
                }
                ClientPacket::Unsubscribe { pkid, filters } => {
                    router.unsubscribe(session, &filters);
                    self.queue(ServerPacket::UnsubAck {
                        pkid,
                        count: filters.len(),
                    })?;
                }
                ClientPacket::PingReq => self.queue(ServerPacket::PingResp)?,
                ClientPacket::Disconnect { with_will } => {
                    return Err(Close::Graceful { with_will })
                }
                ClientPacket::Unexpected(what) => return Err(Close::Violation(what.into())),
            }
        }
    }
}
