//! A link's task: connects (with backoff), runs one connection at a time, and turns what the
//! server sends into window bookkeeping, settled messages and commands for the devices.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{LinkShared, Settled};
use crate::backoff::Backoff;
use crate::downstream::DownstreamSession;
use crate::mqtt::props::MessageProperties;
use crate::mqtt::upstream::{
    self, is_transient_refusal, ConnectOptions, Connection, Queued, ServerEvent, Transport,
    UpstreamError, FAILURE,
};
use crate::telemetry::directory::PasswordSource;
use crate::telemetry::topic::CommandFilter;

/// A command's PUBACK, for the connection (`generation`) it arrived on.
pub(super) struct CommandAck {
    generation: u64,
    pkid: u16,
}

pub(super) struct Driver {
    pub(super) shared: Arc<LinkShared>,
    pub(super) address: (String, u16),
    pub(super) transport: Transport,
    pub(super) options: ConnectOptions,
    pub(super) settled: mpsc::UnboundedSender<Settled>,
    pub(super) downstream: Arc<DownstreamSession>,
    pub(super) commands: Option<CommandFilter>,
    pub(super) command_timeout: Duration,
    pub(super) backoff: Backoff,
    /// Username and a maker of fresh passwords (SAS tokens expire: each connection gets a new
    /// one).
    pub(super) credentials: Option<(String, Option<PasswordSource>)>,
    pub(super) shutdown: watch::Receiver<bool>,
    /// PUBACKs of commands delivered downstream, made with the first command: most links
    /// never carry one, and a channel allocates its first block up front (about 1 KB per
    /// device link, issue 22).
    pub(super) acks: Option<CommandAcks>,
    /// Counts connections, so a command's PUBACK never goes out on a later one.
    pub(super) generation: u64,
}

/// How many messages a connection may have out.
#[derive(Clone, Copy, Debug)]
struct Window {
    /// Sent and not yet settled (acknowledged and durably gone from the outbox): the bound on
    /// what is resent after a crash.
    link: usize,
    /// Sent and not yet acknowledged: the server's Receive Maximum.
    unacknowledged: usize,
}

/// The sending and receiving side of a link's command acknowledgements.
pub(super) type CommandAcks = (
    mpsc::UnboundedSender<CommandAck>,
    mpsc::UnboundedReceiver<CommandAck>,
);

/// The next command acknowledgement; never, while no command arrived.
async fn next_ack(acks: &mut Option<CommandAcks>) -> Option<CommandAck> {
    match acks {
        // The driver holds a sender too, so this never ends with `None`.
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What woke the connection's task.
enum Wake {
    Event(Result<ServerEvent, UpstreamError>),
    Work,
    Timer,
    Ack(CommandAck),
    Stop,
}

/// How a connection ended.
enum Ended {
    /// The link is closing or the gateway shutting down: DISCONNECT sent, stop.
    Stop,
    /// Lost; reconnect after the backoff.
    Lost(UpstreamError),
}

impl Driver {
    pub(super) async fn run(mut self) {
        loop {
            if self.shared.lock().closing {
                break;
            }
            self.options.login = self.credentials.as_ref().map(|(username, password)| {
                let fresh = password.as_ref().map(|p| p()).unwrap_or_default();
                (username.clone(), fresh)
            });
            let (host, port) = (self.address.0.clone(), self.address.1);
            let attempt = tokio::select! {
                // Boxed: the TLS handshake's state is large and lives only while connecting;
                // inline, it would size the link's task for its whole life.
                c = Box::pin(upstream::connect(&host, port, &self.transport, &self.options)) => c,
                _ = crate::telemetry::stopped(&mut self.shutdown) => break,
                _ = self.shared.stop.notified() => break,
            };
            let (error, was_connected) = match attempt {
                Ok(conn) => match self.serve(conn).await {
                    Ended::Stop => break,
                    Ended::Lost(e) => (e, true),
                },
                Err(e) => (e, false),
            };
            if self.shared.lock().closing {
                break;
            }
            let resent = {
                let mut st = self.shared.lock();
                st.connected = false;
                st.requeue_unacknowledged()
            };
            let delay = self.backoff.next_delay();
            self.shared
                .counters
                .upstream_disconnects
                .fetch_add(1, Ordering::Relaxed);
            log_connection_error(&self.shared.client_id, &error, was_connected, resent, delay);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = crate::telemetry::stopped(&mut self.shutdown) => break,
                _ = self.shared.stop.notified() => break,
            }
        }
        let mut st = self.shared.lock();
        st.connected = false;
        st.requeue_unacknowledged();
    }

    /// Runs one connection from its CONNACK until it ends.
    async fn serve(&mut self, mut conn: Connection) -> Ended {
        self.backoff.reset();
        self.generation += 1;
        self.shared
            .counters
            .upstream_connects
            .fetch_add(1, Ordering::Relaxed);
        // The link's window bounds what is resent after a crash (sent or settling); the
        // server's Receive Maximum bounds only what it has not acknowledged yet.
        let window = Window {
            link: self.shared.window,
            unacknowledged: usize::from(conn.server().receive_maximum).max(1),
        };
        {
            let mut st = self.shared.lock();
            st.connected = true;
            st.subscribed = 0;
            st.last_activity = Some(Instant::now());
            tracing::debug!(client_id = %self.shared.client_id, queued = st.queued.len(), version = ?conn.version(), "upstream connected");
        }
        let result = self.exchange(&mut conn, window).await;
        self.shared.lock().connected = false;
        match result {
            Ok(()) => {
                conn.disconnect().await;
                Ended::Stop
            }
            Err(e) => Ended::Lost(e),
        }
    }

    /// Sends what the window allows, then waits for the server, new work, the keep-alive
    /// timer or a command's acknowledgement; `Ok` when asked to stop.
    async fn exchange(
        &mut self,
        conn: &mut Connection,
        window: Window,
    ) -> Result<(), UpstreamError> {
        loop {
            if self.fill(conn, window)? {
                return Ok(());
            }
            conn.flush().await?;
            let timer = conn
                .next_timer()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let wake = tokio::select! {
                event = conn.read_event() => Wake::Event(event),
                _ = self.shared.wake.notified() => Wake::Work,
                _ = tokio::time::sleep_until(timer) => Wake::Timer,
                Some(ack) = next_ack(&mut self.acks) => Wake::Ack(ack),
                _ = crate::telemetry::stopped(&mut self.shutdown) => Wake::Stop,
                _ = self.shared.stop.notified() => Wake::Stop,
            };
            match wake {
                Wake::Event(event) => self.on_event(conn, event?)?,
                Wake::Work => {}
                Wake::Timer => conn.on_timer(Instant::now())?,
                Wake::Ack(ack) => {
                    if ack.generation == self.generation {
                        conn.queue_puback(ack.pkid);
                    }
                }
                Wake::Stop => return Ok(()),
            }
        }
    }

    /// Queues new command subscriptions, then publishes queued messages while the window has
    /// room. Returns true when the link is closing.
    fn fill(&mut self, conn: &mut Connection, window: Window) -> Result<bool, UpstreamError> {
        let mut st = self.shared.lock();
        if st.closing {
            return Ok(true);
        }
        if let Some(filter) = &self.commands {
            if st.subscribed < st.command_things.len() {
                let filters: Vec<String> = st.command_things[st.subscribed..]
                    .iter()
                    .map(|(thing, _)| filter.filter(thing))
                    .collect();
                // Ahead of the publishes that follow: commands sent during an outage are not
                // held by a clean session, so subscribe first.
                if let Some(pkid) = st.inflight.subscribe_id() {
                    conn.queue_subscribe(pkid, &filters, 1)?;
                    st.subscribed = st.command_things.len();
                }
            }
        }
        while st.may_send(window.link, window.unacknowledged) {
            let Some(pkid) = st.inflight.next_free() else {
                break;
            };
            let Some(item) = st.queued.pop_front() else {
                break;
            };
            match conn.queue_publish(
                pkid,
                &item.topic,
                &item.payload,
                item.properties.as_deref(),
            )? {
                Queued::Yes => {
                    if let Some(at) = item.accepted {
                        self.shared.counters.forward_delay.record(at.elapsed());
                    }
                    st.inflight.insert(pkid, item);
                }
                Queued::TooLarge { size, limit } => {
                    self.shared
                        .counters
                        .refused_upstream
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(client_id = %self.shared.client_id, device = %item.device, seq = item.seq, size, limit, "telemetry message dropped: larger than the cloud's maximum packet size");
                    let _ = self.settled.send(Settled {
                        seq: item.seq,
                        mem: item.mem_size(),
                        link: None,
                    });
                }
            }
        }
        Ok(false)
    }

    fn on_event(&mut self, conn: &mut Connection, event: ServerEvent) -> Result<(), UpstreamError> {
        match event {
            ServerEvent::PubAck { pkid, reason } => self.on_puback(pkid, reason),
            ServerEvent::SubAck { pkid, refused, .. } => {
                self.shared.lock().inflight.suback(pkid)?;
                if refused > 0 {
                    tracing::warn!(client_id = %self.shared.client_id, refused, "the cloud refused a command subscription; check the thing's policy for the commands topic");
                }
                Ok(())
            }
            ServerEvent::Publish {
                topic,
                qos,
                pkid,
                payload,
                properties,
                ..
            } => {
                if qos > 1 {
                    return Err(UpstreamError::Protocol(format!(
                        "QoS {qos} message on {topic}; the link subscribes at QoS 1"
                    )));
                }
                self.on_command(conn, topic, qos, pkid, payload, properties);
                Ok(())
            }
            ServerEvent::Disconnect { reason } => Err(UpstreamError::Disconnected(reason)),
            ServerEvent::ConnAck(_) | ServerEvent::Refused { .. } => Err(UpstreamError::Protocol(
                "a second CONNACK on the connection".into(),
            )),
            // Taken by the connection itself.
            ServerEvent::PingResp => Ok(()),
        }
    }

    fn on_puback(&mut self, pkid: u16, reason: u8) -> Result<(), UpstreamError> {
        let mut st = self.shared.lock();
        if reason >= FAILURE && is_transient_refusal(reason) && st.inflight.contains(pkid) {
            // Left in flight: requeued in order with the rest when the connection ends.
            return Err(UpstreamError::RetryLater(reason));
        }
        let item = st.inflight.ack(pkid)?;
        st.last_activity = Some(Instant::now());
        if reason >= FAILURE {
            drop(st);
            self.shared
                .counters
                .refused_upstream
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client_id = %self.shared.client_id, device = %item.device, seq = item.seq, reason = format_args!("{reason:#04x}"), topic = %item.topic, "telemetry message dropped: the cloud refused it (PUBACK reason code); it would be refused again");
            let _ = self.settled.send(Settled {
                seq: item.seq,
                mem: item.mem_size(),
                link: None,
            });
            return Ok(());
        }
        st.settling += 1;
        drop(st);
        // The remover holds the slot until the outbox entry is durably gone.
        let _ = self.settled.send(Settled {
            seq: item.seq,
            mem: item.mem_size(),
            link: Some(self.shared.clone()),
        });
        Ok(())
    }

    fn on_command(
        &mut self,
        conn: &mut Connection,
        topic: String,
        qos: u8,
        pkid: u16,
        payload: bytes::Bytes,
        properties: Option<MessageProperties>,
    ) {
        let target = self.commands.as_ref().and_then(|filter| {
            let (thing, sub) = filter.match_topic(&topic)?;
            let st = self.shared.lock();
            st.command_things
                .iter()
                .find(|(t, _)| t == thing)
                .map(|(_, device)| (device.clone(), sub.map(str::to_string)))
        });
        let Some((device, subtopic)) = target else {
            tracing::debug!(client_id = %self.shared.client_id, %topic, "upstream message on an unexpected topic; ignored");
            if qos == 1 {
                conn.queue_puback(pkid);
            }
            return;
        };
        let downstream = self.downstream.clone();
        let shared = self.shared.clone();
        let within = self.command_timeout;
        let acks = self
            .acks
            .get_or_insert_with(mpsc::unbounded_channel)
            .0
            .clone();
        let generation = self.generation;
        tokio::spawn(async move {
            let sent = tokio::time::timeout(
                within,
                downstream.publish_command_with(&device, subtopic.as_deref(), payload, properties),
            )
            .await;
            let counters = &shared.counters;
            match sent {
                Ok(Ok(())) => {
                    counters.commands_forwarded.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    counters.commands_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%device, "cloud-to-device message not delivered downstream: {e}");
                }
                Err(_) => {
                    counters.commands_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%device, "cloud-to-device message not delivered downstream within {within:?}");
                }
            }
            // Acknowledged either way: a message the local broker cannot take now would only
            // come back on the next connection, and a clean session would not keep it.
            if qos == 1 {
                let _ = acks.send(CommandAck { generation, pkid });
            }
        });
    }
}

fn log_connection_error(
    client_id: &str,
    e: &UpstreamError,
    was_connected: bool,
    resent: usize,
    delay: Duration,
) {
    match e {
        UpstreamError::Refused { code, reason } => tracing::warn!(
            client_id, code = format_args!("{code:#04x}"), reason = %reason, retry_in = ?delay,
            "the cloud refused the upstream connection (check the certificate is active and the policy allows this client id)"
        ),
        _ if was_connected => {
            tracing::info!(client_id, error = %e, unacknowledged = resent, retry_in = ?delay, "upstream connection lost; unacknowledged messages will be sent again")
        }
        // Failed reconnect attempts during an outage: one line per link and attempt would
        // flood the journal with thousands of devices.
        _ => {
            tracing::debug!(client_id, error = %e, retry_in = ?delay, "upstream connection attempt failed")
        }
    }
}
