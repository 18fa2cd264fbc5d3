//! The claim session pool: N MQTT connections to AWS IoT Core authenticated with the claim
//! certificate, each carrying at most one fleet provisioning request at a time.
//!
//! AWS answers CreateCertificateFromCsr and RegisterThing on `/accepted` or `/rejected` with no
//! correlation id, and only to the connection that asked. So a session subscribes to the
//! response topics before it publishes anything, sends one request, and treats the next answer
//! on that API's topics as the answer to it. If no answer comes within the request timeout the
//! session drops its connection: a late answer must never be taken for the next request's.
//!
//! Each session is a task owning a rumqttc `EventLoop` (polled continuously by a helper task
//! that forwards the events that matter). Sessions take requests from one shared queue, so a
//! request goes to whichever session is connected and idle. Connections are re-made with
//! jittered exponential back-off; the subscriptions are made afresh on every connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

use crate::backoff::Backoff;
use crate::cloud::aws::topics;
use crate::cloud::codec::PayloadFormat;
use crate::cloud::CloudError;

/// The fleet provisioning calls a claim session makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimApi {
    /// `$aws/certificates/create-from-csr/{fmt}`
    CreateCertificateFromCsr,
    /// `$aws/provisioning-templates/{template}/provision/{fmt}`
    RegisterThing,
}

impl ClaimApi {
    /// The API name as AWS documents it (used in errors and logs).
    pub fn name(self) -> &'static str {
        match self {
            ClaimApi::CreateCertificateFromCsr => "CreateCertificateFromCsr",
            ClaimApi::RegisterThing => "RegisterThing",
        }
    }
}

/// How the pool connects and paces itself.
#[derive(Clone, Debug)]
pub struct ClaimOptions {
    /// AWS IoT endpoint host (also the TLS server name).
    pub host: String,
    /// MQTT over TLS port (8883).
    pub port: u16,
    /// TLS client config presenting the claim certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// Client ids are `{prefix}-{n}`.
    pub client_id_prefix: String,
    /// Number of sessions (connections).
    pub sessions: usize,
    /// Provisioning template for RegisterThing.
    pub template: String,
    /// Payload format (and topic suffix).
    pub format: PayloadFormat,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// How long one request may wait for its answer.
    pub request_timeout: Duration,
    /// TCP + TLS + CONNACK (and SUBACK) limit for one connection attempt.
    pub connect_timeout: Duration,
    /// First reconnect delay (jittered, doubled per failure).
    pub reconnect_min: Duration,
    /// Upper bound of the reconnect delay.
    pub reconnect_max: Duration,
    /// How long a call waits for a connected, idle session before giving up.
    pub queue_timeout: Duration,
    /// Largest MQTT packet in either direction (certificates are several KiB).
    pub max_packet_bytes: usize,
}

/// A response from the cloud: which topic it came on and its payload.
#[derive(Clone, Debug)]
pub enum ClaimResponse {
    /// Arrived on `/accepted`.
    Accepted(Bytes),
    /// Arrived on `/rejected`.
    Rejected(Bytes),
}

/// Checks that an `/accepted` payload answers the request it is taken for (e.g. that a
/// certificate carries the CSR's public key); `Err` says why not.
pub type ResponseCheck = Box<dyn FnOnce(&[u8]) -> Result<(), String> + Send>;

struct ClaimRequest {
    api: ClaimApi,
    payload: Vec<u8>,
    check: Option<ResponseCheck>,
    started: oneshot::Sender<()>,
    reply: oneshot::Sender<Result<ClaimResponse, CloudError>>,
}

#[derive(Debug, Default)]
struct PoolCounters {
    connected: AtomicUsize,
}

/// The running pool of claim sessions.
#[derive(Debug)]
pub struct ClaimPool {
    queue: mpsc::Sender<ClaimRequest>,
    shutdown: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<PoolCounters>,
    opts: Arc<ClaimOptions>,
}

impl std::fmt::Debug for ClaimRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimRequest")
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

impl ClaimPool {
    /// Starts `opts.sessions` sessions; they connect in the background.
    pub fn start(opts: ClaimOptions) -> Self {
        let opts = Arc::new(opts);
        let sessions = opts.sessions.max(1);
        let (queue, rx) = mpsc::channel(sessions);
        let rx = Arc::new(Mutex::new(rx));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let counters = Arc::new(PoolCounters::default());
        let tasks = (0..sessions)
            .map(|n| {
                let session = ClaimSession {
                    client_id: format!("{}-{}", opts.client_id_prefix, n + 1),
                    opts: opts.clone(),
                    queue: rx.clone(),
                    shutdown: shutdown_rx.clone(),
                    counters: counters.clone(),
                };
                tokio::spawn(session.run())
            })
            .collect();
        ClaimPool {
            queue,
            shutdown,
            tasks: std::sync::Mutex::new(tasks),
            counters,
            opts,
        }
    }

    /// Sessions currently connected and subscribed.
    pub fn connected_sessions(&self) -> usize {
        self.counters.connected.load(Ordering::Relaxed)
    }

    /// Sends one request on the next idle session and returns the cloud's answer.
    ///
    /// Fails with [`CloudError::Disconnected`] when no session takes the request within the
    /// queue timeout (the cloud is unreachable), [`CloudError::Timeout`] when the request was
    /// sent but not answered in time, [`CloudError::Protocol`] when `check` refuses the
    /// accepted answer (the session then reconnects: its answers cannot be trusted to line up).
    pub async fn call(
        &self,
        api: ClaimApi,
        payload: Vec<u8>,
        check: Option<ResponseCheck>,
    ) -> Result<ClaimResponse, CloudError> {
        let (started_tx, started_rx) = oneshot::channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        let request = ClaimRequest {
            api,
            payload,
            check,
            started: started_tx,
            reply: reply_tx,
        };
        let unavailable = |reason: String| CloudError::Disconnected {
            api: api.name(),
            reason,
        };
        let deadline = Instant::now() + self.opts.queue_timeout;
        match timeout_at(deadline, self.queue.send(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(CloudError::ShuttingDown { api: api.name() }),
            Err(_) => {
                return Err(unavailable(format!(
                    "no claim session was free within {} ms",
                    self.opts.queue_timeout.as_millis()
                )))
            }
        }
        match timeout_at(deadline, started_rx).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(CloudError::ShuttingDown { api: api.name() }),
            Err(_) => {
                // Dropping `reply_rx` makes the session skip the request if it picks it up later.
                return Err(unavailable(format!(
                    "no claim session connected within {} ms",
                    self.opts.queue_timeout.as_millis()
                )));
            }
        }
        // The session answers within the request timeout; the margin covers scheduling only.
        let limit = self.opts.request_timeout + Duration::from_secs(2);
        match timeout(limit, reply_rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(unavailable("the claim session stopped".into())),
            Err(_) => Err(CloudError::Timeout {
                api: api.name(),
                after_ms: limit.as_millis() as u64,
            }),
        }
    }

    /// Stops taking requests, lets requests in flight finish (each is bounded by the request
    /// timeout) and closes the connections.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let tasks = match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        let limit = self.opts.request_timeout + Duration::from_secs(1);
        for task in tasks {
            if timeout(limit, task).await.is_err() {
                tracing::warn!("a claim session did not stop in time");
            }
        }
    }
}

impl Drop for ClaimPool {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Why a connection ended.
enum Ended {
    Shutdown,
    /// The connection failed; `healthy` says whether it had been usable.
    Failed {
        reason: String,
        healthy: bool,
    },
}

/// One claim connection's task.
struct ClaimSession {
    client_id: String,
    opts: Arc<ClaimOptions>,
    queue: Arc<Mutex<mpsc::Receiver<ClaimRequest>>>,
    shutdown: watch::Receiver<bool>,
    counters: Arc<PoolCounters>,
}

/// What the event-loop poller forwards to its session.
enum LinkEvent {
    ConnAck,
    SubAck(Vec<SubscribeReasonCode>),
    Publish { topic: String, payload: Bytes },
    Down(ConnectionError),
}

impl ClaimSession {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.opts.reconnect_min, self.opts.reconnect_max);
        loop {
            if *self.shutdown.borrow() {
                return;
            }
            match self.serve_connection().await {
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

    fn mqtt_options(&self) -> MqttOptions {
        let o = &self.opts;
        let mut mqtt = MqttOptions::new(self.client_id.clone(), o.host.clone(), o.port);
        mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            o.tls.clone(),
        )));
        mqtt.set_keep_alive(o.keep_alive.max(Duration::from_secs(5)));
        mqtt.set_max_packet_size(o.max_packet_bytes, o.max_packet_bytes);
        // A fresh session every time: nothing of an earlier connection may be redelivered.
        mqtt.set_clean_session(true);
        mqtt
    }

    async fn serve_connection(&mut self) -> Ended {
        let (client, mut eventloop) = AsyncClient::new(self.mqtt_options(), 16);
        let mut net = NetworkOptions::new();
        net.set_connection_timeout(self.opts.connect_timeout.as_secs().max(1));
        // One small request, one answer: Nagle plus delayed ACKs would add ~40 ms to each.
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (tx, mut events) = mpsc::channel(32);
        let poller = PollerGuard(tokio::spawn(poll_events(eventloop, tx)));

        let connect_deadline = Instant::now() + self.opts.connect_timeout + Duration::from_secs(1);
        match self.wait_event(&mut events, connect_deadline).await {
            Ok(LinkEvent::ConnAck) => {}
            Ok(LinkEvent::Down(e)) => return failed(format!("connect: {e}"), false),
            Ok(_) => return failed("connect: unexpected packet before CONNACK".into(), false),
            Err(ended) => return ended,
        }

        let fmt = self.opts.format;
        let request_topics = [
            topics::create_from_csr(fmt),
            topics::register_thing(&self.opts.template, fmt),
        ];
        let filters: Vec<SubscribeFilter> = request_topics
            .iter()
            .flat_map(|t| [topics::accepted(t), topics::rejected(t)])
            .map(|path| SubscribeFilter::new(path, QoS::AtLeastOnce))
            .collect();
        if let Err(e) = client.subscribe_many(filters).await {
            return failed(format!("subscribe: {e}"), false);
        }
        loop {
            match self.wait_event(&mut events, connect_deadline).await {
                Ok(LinkEvent::SubAck(codes)) => {
                    if codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        return failed(
                            "the cloud refused the provisioning response topics (check the claim certificate's policy)".into(),
                            false,
                        );
                    }
                    break;
                }
                Ok(LinkEvent::Down(e)) => return failed(format!("subscribe: {e}"), false),
                Ok(_) => continue,
                Err(ended) => return ended,
            }
        }

        self.counters.connected.fetch_add(1, Ordering::Relaxed);
        tracing::info!(session = %self.client_id, endpoint = %format!("{}:{}", self.opts.host, self.opts.port), "claim session connected");
        let ended = self.serve_requests(&client, &mut events).await;
        self.counters.connected.fetch_sub(1, Ordering::Relaxed);
        drop(poller);
        ended
    }

    /// Next event before `deadline`; `Err` ends the connection (shutdown, timeout, poller gone).
    async fn wait_event(
        &mut self,
        events: &mut mpsc::Receiver<LinkEvent>,
        deadline: Instant,
    ) -> Result<LinkEvent, Ended> {
        tokio::select! {
            ev = timeout_at(deadline, events.recv()) => match ev {
                Ok(Some(ev)) => Ok(ev),
                Ok(None) => Err(failed("the event loop stopped".into(), false)),
                Err(_) => Err(failed(
                    format!("no CONNACK/SUBACK within {} ms", self.opts.connect_timeout.as_millis() + 1000),
                    false,
                )),
            },
            _ = self.shutdown.changed() => Err(Ended::Shutdown),
        }
    }

    async fn serve_requests(
        &mut self,
        client: &AsyncClient,
        events: &mut mpsc::Receiver<LinkEvent>,
    ) -> Ended {
        let fmt = self.opts.format;
        let create = topics::create_from_csr(fmt);
        let register = topics::register_thing(&self.opts.template, fmt);
        let mut served = 0u64;
        loop {
            let queue = self.queue.clone();
            let request = tokio::select! {
                r = async { queue.lock().await.recv().await } => match r {
                    Some(r) => r,
                    None => return Ended::Shutdown,
                },
                ev = events.recv() => match ev {
                    None => return failed("the event loop stopped".into(), served > 0),
                    Some(LinkEvent::Down(e)) => return failed(e.to_string(), true),
                    Some(LinkEvent::Publish { topic, .. }) => {
                        tracing::debug!(session = %self.client_id, %topic, "ignoring a response with no request in flight");
                        continue;
                    }
                    Some(_) => continue,
                },
                _ = self.shutdown.changed() => return Ended::Shutdown,
            };
            if request.reply.is_closed() {
                continue;
            }
            let _ = request.started.send(());
            let topic = match request.api {
                ClaimApi::CreateCertificateFromCsr => &create,
                ClaimApi::RegisterThing => &register,
            };
            let (accepted, rejected) = (topics::accepted(topic), topics::rejected(topic));
            let api = request.api.name();
            let reply = request.reply;
            let check = request.check;
            let deadline = Instant::now() + self.opts.request_timeout;
            let sent = timeout_at(
                deadline,
                client.publish(topic.clone(), QoS::AtLeastOnce, false, request.payload),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                let _ = reply.send(Err(CloudError::Disconnected {
                    api,
                    reason: "the request could not be queued on the claim connection".into(),
                }));
                return failed("publish failed".into(), true);
            }
            loop {
                match timeout_at(deadline, events.recv()).await {
                    Err(_) => {
                        let _ = reply.send(Err(CloudError::Timeout {
                            api,
                            after_ms: self.opts.request_timeout.as_millis() as u64,
                        }));
                        // A late answer would be taken for the next request's: start afresh.
                        return failed(format!("{api}: no response; reconnecting"), true);
                    }
                    Ok(None) => {
                        let _ = reply.send(Err(CloudError::Disconnected {
                            api,
                            reason: "the event loop stopped".into(),
                        }));
                        return failed("the event loop stopped".into(), true);
                    }
                    Ok(Some(LinkEvent::Down(e))) => {
                        let reason = e.to_string();
                        let _ = reply.send(Err(CloudError::Disconnected {
                            api,
                            reason: reason.clone(),
                        }));
                        return failed(reason, true);
                    }
                    Ok(Some(LinkEvent::Publish { topic, payload })) => {
                        if topic == accepted {
                            if let Some(check) = check {
                                if let Err(reason) = check(&payload) {
                                    let _ = reply.send(Err(CloudError::Protocol { api, reason }));
                                    return failed(
                                        format!("{api}: an answer did not fit its request; reconnecting"),
                                        true,
                                    );
                                }
                            }
                            let _ = reply.send(Ok(ClaimResponse::Accepted(payload)));
                            break;
                        }
                        if topic == rejected {
                            let _ = reply.send(Ok(ClaimResponse::Rejected(payload)));
                            break;
                        }
                        tracing::debug!(session = %self.client_id, %topic, "ignoring a response for another call");
                    }
                    Ok(Some(_)) => {}
                }
            }
            served += 1;
        }
    }
}

fn failed(reason: String, healthy: bool) -> Ended {
    Ended::Failed { reason, healthy }
}

/// Aborts the poller (closing the connection) when the session is done with it.
struct PollerGuard(JoinHandle<()>);

impl Drop for PollerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls the event loop continuously (rumqttc needs it for keep-alive and acks) and forwards
/// what the session needs. Stops at the first connection error: the session reconnects with
/// a new event loop after its back-off, so nothing of the old connection is resent.
async fn poll_events(mut eventloop: EventLoop, tx: mpsc::Sender<LinkEvent>) {
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => LinkEvent::ConnAck,
            Ok(Event::Incoming(Packet::SubAck(ack))) => LinkEvent::SubAck(ack.return_codes),
            Ok(Event::Incoming(Packet::Publish(p))) => LinkEvent::Publish {
                topic: p.topic,
                payload: p.payload,
            },
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(LinkEvent::Down(e)).await;
                return;
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}
