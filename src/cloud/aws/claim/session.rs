//! One claim session: a task that keeps one connection to AWS IoT Core (our own
//! [`mqtt::upstream`](crate::mqtt::upstream) client, MQTT 3.1.1 as the claim sessions always
//! spoke) and carries one provisioning request at a time over it.
//!
//! Why our own client rather than rumqttc: rumqttc's event loop flushes after every packet it
//! takes (one TLS record and one `writev` per PUBLISH and per PUBACK, four per device) and is
//! polled through a forwarding task, two wake-ups per packet. Here the session owns the
//! connection: it decodes everything one read brought in before it waits again, and it writes
//! only when it is about to wait, so under load the PUBACK of one answer and the next request
//! leave in one TLS record.
//!
//! The guarantees of [`ClaimPool`](super::ClaimPool), as this task keeps them:
//! - the response topics are subscribed (and the SUBACK checked: one code per filter, none
//!   refused) before anything is published, afresh on every connection (clean session);
//! - one request at a time: the next request is taken only once the answer arrived and the
//!   cloud acknowledged the request's PUBLISH, and the next answer on that API's
//!   `/accepted` or `/rejected` topic is the answer; anything on another topic is
//!   acknowledged and ignored;
//! - no answer (or no PUBACK) within the request timeout drops the connection, so a late
//!   answer is never taken for the next request's;
//! - a broken server (refused SUBACK, QoS 2, garbage, a packet over the limit, an
//!   acknowledgement for an id never used) ends the connection with an error, and the pool
//!   reconnects after a jittered, doubling delay.
//!
//! What the cloud sends at QoS 1 is acknowledged: the PUBACK is queued at once and goes out
//! with the next write: with the next request when one comes within 20 ms ([`ACK_HOLD`]),
//! else on its own; while a request is out, before the session waits for the server.
//! An answer the cloud sends again before that PUBACK reached it (DUP set, the packet id of
//! the answer just taken) is acknowledged and ignored, never taken for the next request's.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::time::{sleep_until, timeout_at, Instant};

use super::{ClaimApi, ClaimOptions, ClaimRequest, ClaimResponse, PoolCounters, Reply};
use crate::backoff::Backoff;
use crate::cloud::aws::topics;
use crate::cloud::CloudError;
use crate::mqtt::upstream::{
    self, ConnectOptions, Connection, Inflight, MqttVersion, Queued, ServerEvent, Transport,
    UpstreamError, FAILURE,
};

/// QoS 1 publishes the cloud may have unacknowledged towards a claim session (one answer at a
/// time, plus whatever it sends unasked).
const RECEIVE_MAXIMUM: u16 = 16;
/// The keep-alive floor (AWS IoT takes 30 to 1,200 s; the emulator and tests use less).
const MIN_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// How long an idle session holds the PUBACK of an answer for the next request to go with it.
/// Far below any redelivery interval of the cloud, and above the gap between requests while
/// devices queue for a session.
const ACK_HOLD: Duration = Duration::from_millis(20);

/// Why a connection ended.
enum Ended {
    Shutdown,
    /// The connection failed; `healthy` says whether it had been usable.
    Failed {
        reason: String,
        healthy: bool,
    },
}

fn failed(reason: String, healthy: bool) -> Ended {
    Ended::Failed { reason, healthy }
}

/// The topics one session uses, made once.
struct ApiTopics {
    request: String,
    accepted: String,
    rejected: String,
}

impl ApiTopics {
    fn new(request: String) -> Self {
        ApiTopics {
            accepted: topics::accepted(&request),
            rejected: topics::rejected(&request),
            request,
        }
    }
}

/// One claim connection's task.
pub(super) struct ClaimSession {
    pub(super) client_id: String,
    pub(super) opts: Arc<ClaimOptions>,
    pub(super) queue: Arc<Mutex<mpsc::Receiver<ClaimRequest>>>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) counters: Arc<PoolCounters>,
    /// Packet id of the last answer taken on this connection: the same message sent again
    /// (DUP set) while its PUBACK is on its way is not the next request's answer.
    pub(super) last_answer: Option<u16>,
}

/// What the session waits for between requests.
enum Idle {
    Request(ClaimRequest),
    Event(Result<ServerEvent, UpstreamError>),
    Timer,
    Shutdown,
}

/// What the session waits for while a request is out.
enum Busy {
    Event(Result<ServerEvent, UpstreamError>),
    Timer,
    Expired,
}

impl ClaimSession {
    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::new(self.opts.reconnect_min, self.opts.reconnect_max);
        let create = ApiTopics::new(topics::create_from_csr(self.opts.format));
        let register = ApiTopics::new(topics::register_thing(
            &self.opts.template,
            self.opts.format,
        ));
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            match self.serve_connection(&create, &register).await {
                Ended::Shutdown => return,
                Ended::Failed { reason, healthy } => {
                    if healthy {
                        backoff.reset();
                    }
                    tracing::warn!(session = %self.client_id, "claim connection ended: {reason}");
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.changed() => return,
            }
        }
    }

    fn connect_options(&self) -> ConnectOptions {
        let o = &self.opts;
        ConnectOptions {
            version: MqttVersion::V4,
            client_id: self.client_id.clone(),
            login: None,
            keep_alive: o.keep_alive.max(MIN_KEEP_ALIVE),
            connect_timeout: o.connect_timeout,
            // A write that takes longer than a request may wait for its answer has failed.
            write_timeout: o.request_timeout.max(Duration::from_secs(1)),
            max_packet_in: o.max_packet_bytes,
            receive_maximum: RECEIVE_MAXIMUM,
            attempts: None,
        }
    }

    async fn serve_connection(&mut self, create: &ApiTopics, register: &ApiTopics) -> Ended {
        self.last_answer = None;
        // TCP, TLS and CONNACK within the connect timeout; the SUBACK within a second more.
        let subscribe_deadline =
            Instant::now() + self.opts.connect_timeout + Duration::from_secs(1);
        let transport = Transport::Tls(self.opts.tls.clone());
        let options = self.connect_options();
        let attempt = tokio::select! {
            c = upstream::connect(&self.opts.host, self.opts.port, &transport, &options) => c,
            _ = self.shutdown.changed() => return Ended::Shutdown,
        };
        let mut conn = match attempt {
            Ok(conn) => conn,
            Err(e) => return failed(format!("connect: {e}"), false),
        };
        let mut ids: Inflight<()> = Inflight::default();
        match self
            .subscribe(&mut conn, &mut ids, create, register, subscribe_deadline)
            .await
        {
            Ok(()) => {}
            Err(Ended::Shutdown) => {
                conn.disconnect().await;
                return Ended::Shutdown;
            }
            Err(ended) => return ended,
        }

        self.counters.connected.fetch_add(1, Ordering::Relaxed);
        tracing::info!(session = %self.client_id, endpoint = %format!("{}:{}", self.opts.host, self.opts.port), "claim session connected");
        let ended = self
            .serve_requests(&mut conn, &mut ids, create, register)
            .await;
        self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        if matches!(ended, Ended::Shutdown) {
            conn.disconnect().await;
        }
        ended
    }

    /// Subscribes to both APIs' `/accepted` and `/rejected` topics and waits for the SUBACK.
    async fn subscribe(
        &mut self,
        conn: &mut Connection,
        ids: &mut Inflight<()>,
        create: &ApiTopics,
        register: &ApiTopics,
        deadline: Instant,
    ) -> Result<(), Ended> {
        let filters = [
            create.accepted.clone(),
            create.rejected.clone(),
            register.accepted.clone(),
            register.rejected.clone(),
        ];
        let pkid = ids
            .subscribe_id()
            .ok_or_else(|| failed("subscribe: no packet id free".into(), false))?;
        let sent = match conn.queue_subscribe(pkid, &filters, 1) {
            Ok(()) => conn.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            return Err(failed(format!("subscribe: {e}"), false));
        }
        loop {
            let event = tokio::select! {
                ev = timeout_at(deadline, conn.read_event()) => match ev {
                    Ok(ev) => ev,
                    Err(_) => {
                        return Err(failed(
                            format!(
                                "no SUBACK within {} ms",
                                self.opts.connect_timeout.as_millis() + 1000
                            ),
                            false,
                        ))
                    }
                },
                _ = self.shutdown.changed() => return Err(Ended::Shutdown),
            };
            let event = event.map_err(|e| failed(format!("subscribe: {e}"), false))?;
            match event {
                ServerEvent::SubAck {
                    pkid,
                    refused,
                    codes,
                } => {
                    ids.suback(pkid)
                        .map_err(|e| failed(format!("subscribe: {e}"), false))?;
                    if codes != filters.len() {
                        return Err(failed(
                            format!(
                                "subscribe: the SUBACK has {codes} return codes for {} filters",
                                filters.len()
                            ),
                            false,
                        ));
                    }
                    if refused > 0 {
                        return Err(failed(
                            "the cloud refused the provisioning response topics (check the claim certificate's policy)".into(),
                            false,
                        ));
                    }
                    return Ok(());
                }
                other => {
                    if let Err(e) = self.on_unasked(conn, ids, other) {
                        return Err(failed(format!("subscribe: {e}"), false));
                    }
                }
            }
        }
    }

    /// A packet with no request waiting for it: PUBACKs of earlier requests are checked, a
    /// message is acknowledged and ignored, anything else ends the connection.
    fn on_unasked(
        &self,
        conn: &mut Connection,
        ids: &mut Inflight<()>,
        event: ServerEvent,
    ) -> Result<(), UpstreamError> {
        match event {
            ServerEvent::PubAck { pkid, .. } => ids.ack(pkid),
            ServerEvent::Publish {
                topic, qos, pkid, ..
            } => {
                acknowledge(conn, &topic, qos, pkid)?;
                tracing::debug!(session = %self.client_id, %topic, "ignoring a response with no request in flight");
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }

    /// Takes a request that is already waiting, without waiting for one.
    fn waiting_request(&self) -> Option<ClaimRequest> {
        self.queue.try_lock().ok()?.try_recv().ok()
    }

    async fn serve_requests(
        &mut self,
        conn: &mut Connection,
        ids: &mut Inflight<()>,
        create: &ApiTopics,
        register: &ApiTopics,
    ) -> Ended {
        let mut flush_by = None;
        loop {
            // Everything already read is handled before a request goes out or the session
            // waits; what was queued meanwhile (PUBACKs) leaves with the next request.
            let buffered = match conn.buffered_event() {
                Ok(ev) => ev,
                Err(e) => return failed(e.to_string(), true),
            };
            if let Some(event) = buffered {
                if let Err(e) = self.on_unasked(conn, ids, event) {
                    return failed(e.to_string(), true);
                }
                continue;
            }
            let request = match self.waiting_request() {
                Some(request) => request,
                None => match self.wait_idle(conn, &mut flush_by).await {
                    Idle::Request(request) => request,
                    Idle::Event(Ok(event)) => {
                        if let Err(e) = self.on_unasked(conn, ids, event) {
                            return failed(e.to_string(), true);
                        }
                        continue;
                    }
                    Idle::Event(Err(e)) => return failed(e.to_string(), true),
                    Idle::Timer => {
                        if let Err(e) = conn.on_timer(Instant::now()) {
                            return failed(e.to_string(), true);
                        }
                        continue;
                    }
                    Idle::Shutdown => return Ended::Shutdown,
                },
            };
            if !request.start() {
                continue;
            }
            let api = match request.api {
                ClaimApi::CreateCertificateFromCsr => create,
                ClaimApi::RegisterThing => register,
            };
            if let Some(ended) = self.exchange(conn, ids, api, request).await {
                return ended;
            }
        }
    }

    /// Waits for a request, the server, a timer or shutdown. Acknowledgements queued while
    /// idle are held for at most [`ACK_HOLD`] (`flush_by`), so that under load they leave with
    /// the next request in one TLS record and one write; then they are flushed.
    async fn wait_idle(&mut self, conn: &mut Connection, flush_by: &mut Option<Instant>) -> Idle {
        let now = Instant::now();
        if !conn.has_queued() {
            *flush_by = None;
        } else if now >= *flush_by.get_or_insert(now + ACK_HOLD) {
            *flush_by = None;
            if let Err(e) = conn.flush().await {
                return Idle::Event(Err(e));
            }
        }
        let keep_alive = conn
            .next_timer()
            .unwrap_or_else(|| now + Duration::from_secs(3600));
        let timer = flush_by.map_or(keep_alive, |by| by.min(keep_alive));
        let queue = self.queue.clone();
        tokio::select! {
            r = async { queue.lock().await.recv().await } => match r {
                Some(r) => Idle::Request(r),
                None => Idle::Shutdown,
            },
            ev = conn.read_event() => Idle::Event(ev),
            _ = sleep_until(timer) => Idle::Timer,
            _ = self.shutdown.changed() => Idle::Shutdown,
        }
    }

    /// Sends one request and waits for its answer and its PUBACK; `Some` ends the connection.
    async fn exchange(
        &mut self,
        conn: &mut Connection,
        ids: &mut Inflight<()>,
        api: &ApiTopics,
        request: ClaimRequest,
    ) -> Option<Ended> {
        let name = request.api.name();
        let ClaimRequest {
            payload,
            check,
            reply,
            ..
        } = request;
        let mut reply = Some(reply);
        let mut check = check;
        let deadline = Instant::now() + self.opts.request_timeout;
        let disconnected = |reason: String| CloudError::Disconnected { api: name, reason };

        let Some(pkid) = ids.next_free() else {
            let reason = "no packet id free on the claim connection".to_string();
            return give_up(&mut reply, disconnected(reason.clone()), reason);
        };
        match conn.queue_publish(pkid, &api.request, &Bytes::from(payload), None) {
            Ok(Queued::Yes) => ids.insert(pkid, ()),
            Ok(Queued::TooLarge { size, limit }) => {
                // Nothing was sent: the connection stays in step.
                if let Some(reply) = reply.take() {
                    let _ = reply.send(Err(CloudError::Protocol {
                        api: name,
                        reason: format!(
                            "the request ({size} bytes) exceeds the cloud's maximum packet size ({limit} bytes)"
                        ),
                    }));
                }
                return None;
            }
            Err(e) => {
                return give_up(&mut reply, disconnected(e.to_string()), e.to_string());
            }
        }
        let mut answered = false;
        loop {
            if answered && !ids.contains(pkid) {
                return None;
            }
            let event = match conn.buffered_event() {
                Ok(Some(event)) => Ok(event),
                Ok(None) => match self.wait_busy(conn, deadline).await {
                    Busy::Event(event) => event,
                    Busy::Timer => match conn.on_timer(Instant::now()) {
                        Ok(()) => continue,
                        Err(e) => Err(e),
                    },
                    Busy::Expired => {
                        let error = CloudError::Timeout {
                            api: name,
                            after_ms: self.opts.request_timeout.as_millis() as u64,
                        };
                        // A late answer would be taken for the next request's: start afresh.
                        let what = if answered { "no PUBACK" } else { "no response" };
                        return give_up(&mut reply, error, format!("{name}: {what}; reconnecting"));
                    }
                },
                Err(e) => Err(e),
            };
            let event = match event {
                Ok(event) => event,
                Err(e) => return give_up(&mut reply, disconnected(e.to_string()), e.to_string()),
            };
            match event {
                ServerEvent::Publish {
                    topic,
                    qos,
                    pkid: message_id,
                    dup,
                    payload,
                    ..
                } => {
                    if let Err(e) = acknowledge(conn, &topic, qos, message_id) {
                        return give_up(&mut reply, disconnected(e.to_string()), e.to_string());
                    }
                    if qos > 0 && dup && self.last_answer == Some(message_id) {
                        tracing::debug!(session = %self.client_id, %topic, "ignoring a redelivered answer to an earlier request");
                        continue;
                    }
                    if answered || (topic != api.accepted && topic != api.rejected) {
                        tracing::debug!(session = %self.client_id, %topic, "ignoring a response for another call");
                        continue;
                    }
                    answered = true;
                    if qos > 0 {
                        self.last_answer = Some(message_id);
                    }
                    if topic == api.rejected {
                        if let Some(reply) = reply.take() {
                            let _ = reply.send(Ok(ClaimResponse::Rejected(payload)));
                        }
                        continue;
                    }
                    if let Some(check) = check.take() {
                        if let Err(reason) = check(&payload) {
                            return give_up(
                                &mut reply,
                                CloudError::Protocol { api: name, reason },
                                format!("{name}: an answer did not fit its request; reconnecting"),
                            );
                        }
                    }
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Ok(ClaimResponse::Accepted(payload)));
                    }
                }
                ServerEvent::PubAck {
                    pkid: acked,
                    reason,
                } => {
                    if let Err(e) = ids.ack(acked) {
                        return give_up(&mut reply, disconnected(e.to_string()), e.to_string());
                    }
                    if acked == pkid && reason >= FAILURE {
                        // MQTT 5 only: the cloud refused the request itself; no answer comes.
                        let reason = format!(
                            "the cloud refused the request (PUBACK reason code {reason:#04x})"
                        );
                        if let Some(reply) = reply.take() {
                            let _ = reply.send(Err(CloudError::Protocol { api: name, reason }));
                        }
                        return None;
                    }
                }
                other => {
                    let e = unexpected(other);
                    return give_up(&mut reply, disconnected(e.to_string()), e.to_string());
                }
            }
        }
    }

    /// Flushes what is queued, then waits for the server or the keep-alive timer until the
    /// request's deadline. Shutdown does not interrupt: a request in flight is finished.
    async fn wait_busy(&mut self, conn: &mut Connection, deadline: Instant) -> Busy {
        if let Err(e) = timeout_at(deadline, conn.flush())
            .await
            .unwrap_or_else(|_| Err(UpstreamError::WriteTimeout(self.opts.request_timeout)))
        {
            return Busy::Event(Err(e));
        }
        let timer = conn.next_timer().unwrap_or(deadline).min(deadline);
        tokio::select! {
            ev = conn.read_event() => Busy::Event(ev),
            _ = sleep_until(timer) => {
                if Instant::now() >= deadline {
                    Busy::Expired
                } else {
                    Busy::Timer
                }
            }
        }
    }
}

/// Queues the PUBACK of a QoS 1 message; a QoS 2 message breaks the protocol (we subscribe
/// at QoS 1).
fn acknowledge(
    conn: &mut Connection,
    topic: &str,
    qos: u8,
    pkid: u16,
) -> Result<(), UpstreamError> {
    match qos {
        0 => Ok(()),
        1 => {
            conn.queue_puback(pkid);
            Ok(())
        }
        _ => Err(UpstreamError::Protocol(format!(
            "QoS {qos} message on {topic}; the claim session subscribes at QoS 1"
        ))),
    }
}

/// Ends the connection, telling the caller why if it still waits.
fn give_up(reply: &mut Option<Reply>, error: CloudError, reason: String) -> Option<Ended> {
    if let Some(reply) = reply.take() {
        let _ = reply.send(Err(error));
    }
    Some(failed(reason, true))
}

fn unexpected(event: ServerEvent) -> UpstreamError {
    match event {
        ServerEvent::Disconnect { reason } => UpstreamError::Disconnected(reason),
        ServerEvent::SubAck { pkid, .. } => UpstreamError::Protocol(format!(
            "SUBACK for packet id {pkid}, which no SUBSCRIBE of ours used"
        )),
        other => UpstreamError::Protocol(format!("unexpected packet from the server: {other:?}")),
    }
}
