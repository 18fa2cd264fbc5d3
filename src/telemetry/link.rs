//! One upstream MQTT connection (a "link"): a device's own connection in `identity = "device"`
//! mode, or the gateway's single connection in `identity = "gateway"` mode.
//!
//! The link keeps the messages routed to it in order: `queued` (not yet given to rumqttc),
//! `submitted` (given to rumqttc, packet id not yet known), `inflight` (sent, keyed by packet
//! id) and `settling` (PUBACK received, outbox removal not yet durable). The in-flight window
//! counts all but `queued`, so after a crash at most `window` messages of a link are sent again.
//!
//! rumqttc drops its pending publishes when the broker starts a new session (every reconnect to
//! AWS IoT) and retries a connection at once. So the link owns retransmission: when the
//! connection drops, every unacknowledged message goes back to the front of `queued` in its
//! original order and is published again after the next CONNACK; reconnects wait a jittered,
//! doubling delay. Packet ids are matched to messages by following the `Outgoing::Publish` events
//! rumqttc reports in the order it takes requests from its channel.
//!
//! Cloud-to-device messages arriving on the link's command subscription are handed to the
//! downstream session (`fleetgw/{id}/commands/...`) and acknowledged upstream once the local
//! broker has them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, Publish, QoS,
    Request, Subscribe, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::directory::PasswordSource;
use super::topic::CommandFilter;
use super::Counters;
use crate::backoff::Backoff;
use crate::device_id::DeviceId;
use crate::downstream::DownstreamSession;
use crate::mqtt::client_ext;

/// A message on its way upstream.
#[derive(Debug)]
pub(crate) struct Item {
    /// Outbox sequence number.
    pub seq: u64,
    /// The sending device.
    pub device: DeviceId,
    /// Rendered upstream topic.
    pub topic: String,
    /// The payload as the device sent it.
    pub payload: Bytes,
    /// When the gateway accepted it (unix ms), for `max_age`.
    pub enqueued_at_ms: u64,
    /// Order of submission to rumqttc, to restore the order after a reconnect.
    order: u64,
}

impl Item {
    /// A message not yet submitted.
    pub fn new(
        seq: u64,
        device: DeviceId,
        topic: String,
        payload: Bytes,
        enqueued_at_ms: u64,
    ) -> Self {
        Self {
            seq,
            device,
            topic,
            payload,
            enqueued_at_ms,
            order: 0,
        }
    }

    /// Bytes of memory this message is accounted for while loaded.
    pub fn mem_size(&self) -> usize {
        self.payload.len() + self.topic.len() + 64
    }
}

/// Takes the items `drop` says yes to out of `queue`, keeping the others in order.
pub(crate) fn take_matching(
    queue: &mut VecDeque<Item>,
    mut drop: impl FnMut(&Item) -> bool,
) -> Vec<Item> {
    let mut removed = Vec::new();
    let mut kept = VecDeque::with_capacity(queue.len());
    for item in queue.drain(..) {
        if drop(&item) {
            removed.push(item);
        } else {
            kept.push_back(item);
        }
    }
    *queue = kept;
    removed
}

/// A message acknowledged by the cloud, for the remover.
pub(crate) struct Settled {
    pub seq: u64,
    pub mem: usize,
    pub link: Option<Arc<dyn Settle>>,
}

/// A link whose window slots the remover frees once acknowledged messages are durably gone.
pub(crate) trait Settle: Send + Sync {
    /// `n` of its acknowledged messages left the outbox.
    fn settle(&self, n: usize);
}

impl Settle for LinkShared {
    fn settle(&self, n: usize) {
        LinkShared::settle(self, n);
    }
}

/// Connection settings shared by every link.
#[derive(Clone)]
pub(crate) struct LinkConfig {
    pub window: u16,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub max_packet_bytes: usize,
    pub commands: Option<CommandFilter>,
    pub command_timeout: Duration,
}

#[derive(Default)]
struct LinkState {
    queued: VecDeque<Item>,
    submitted: VecDeque<Item>,
    inflight: HashMap<u16, Item>,
    collided: Option<(u16, Item)>,
    settling: usize,
    next_order: u64,
    connected: bool,
    closing: bool,
    /// Thing names whose commands this link subscribes to (one in device mode).
    command_things: Vec<(String, DeviceId)>,
    last_activity: Option<Instant>,
}

impl LinkState {
    fn used(&self) -> usize {
        self.submitted.len()
            + self.inflight.len()
            + usize::from(self.collided.is_some())
            + self.settling
    }

    /// Puts every message rumqttc had back in front of `queued`, oldest first.
    fn requeue_unacknowledged(&mut self) -> usize {
        let mut back: Vec<Item> = self
            .submitted
            .drain(..)
            .chain(self.inflight.drain().map(|(_, i)| i))
            .chain(self.collided.take().map(|(_, i)| i))
            .collect();
        let n = back.len();
        back.sort_by_key(|i| i.order);
        for item in back.into_iter().rev() {
            self.queued.push_front(item);
        }
        n
    }
}

/// What the dispatcher and the remover share with a link's task.
pub(crate) struct LinkShared {
    /// Client id (thing name) for logs.
    pub client_id: String,
    client: AsyncClient,
    window: usize,
    state: Mutex<LinkState>,
    counters: Arc<Counters>,
}

impl LinkShared {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // Plain bookkeeping behind the lock: a panic elsewhere cannot leave it half-updated in a
        // way that matters more than stopping the gateway would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues messages (in order) and publishes as many as the window allows.
    pub fn enqueue(&self, items: impl IntoIterator<Item = Item>) {
        let mut st = self.lock();
        st.queued.extend(items);
        st.last_activity = Some(Instant::now());
        self.pump(&mut st);
    }

    /// Adds a thing whose commands this link should receive; subscribes at once when connected.
    pub fn add_command_thing(&self, thing: &str, device: &DeviceId, filter: &CommandFilter) {
        let mut st = self.lock();
        if st.command_things.iter().any(|(t, _)| t == thing) {
            return;
        }
        st.command_things.push((thing.to_string(), device.clone()));
        if st.connected {
            let _ = self
                .client
                .try_subscribe(filter.filter(thing), QoS::AtLeastOnce);
        }
    }

    /// The cloud acknowledged a message and its outbox entry is gone: frees its window slot.
    pub fn settle(&self, n: usize) {
        let mut st = self.lock();
        st.settling = st.settling.saturating_sub(n);
        st.last_activity = Some(Instant::now());
        self.pump(&mut st);
    }

    /// Nothing queued, in flight or settling.
    pub fn is_empty(&self) -> bool {
        let st = self.lock();
        st.queued.is_empty() && st.used() == 0
    }

    /// When the link last had traffic.
    pub fn last_activity(&self) -> Option<Instant> {
        self.lock().last_activity
    }

    /// Drops queued (not yet sent) messages for which `drop` says yes; returns them.
    pub fn remove_queued(&self, drop: impl FnMut(&Item) -> bool) -> Vec<Item> {
        take_matching(&mut self.lock().queued, drop)
    }

    /// Asks the task to disconnect and stop; queued messages stay in the outbox.
    pub fn close(&self) -> Vec<Item> {
        let mut st = self.lock();
        st.closing = true;
        let _ = self.client.try_disconnect();
        let mut left: Vec<Item> = st.queued.drain(..).collect();
        st.requeue_unacknowledged();
        left.extend(st.queued.drain(..));
        left
    }

    fn pump(&self, st: &mut LinkState) {
        while st.connected && !st.closing && st.used() < self.window {
            let Some(mut item) = st.queued.pop_front() else {
                break;
            };
            // Payload copied once into rumqttc's request; the channel has room for the whole
            // window, so try_publish fails only if the task has stopped.
            match self.client.try_publish(
                item.topic.clone(),
                QoS::AtLeastOnce,
                false,
                item.payload.to_vec(),
            ) {
                Ok(()) => {
                    item.order = st.next_order;
                    st.next_order += 1;
                    st.submitted.push_back(item);
                }
                Err(_) => {
                    st.queued.push_front(item);
                    break;
                }
            }
        }
    }
}

/// Owns a link's task.
pub(crate) struct Link {
    pub shared: Arc<LinkShared>,
    task: JoinHandle<()>,
}

impl Link {
    /// Starts a link connecting as `target` says.
    pub fn start(
        target: MqttTarget,
        cfg: &LinkConfig,
        counters: Arc<Counters>,
        settled: mpsc::UnboundedSender<Settled>,
        downstream: Arc<DownstreamSession>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let MqttTarget {
            client_id,
            address: (host, port),
            tls,
            username,
            password,
        } = target;
        let mut mqtt = MqttOptions::new(client_id.clone(), host, port);
        if let Some(username) = &username {
            let first = password.as_ref().map(|p| p()).unwrap_or_default();
            mqtt.set_credentials(username.clone(), first);
        }
        let window = cfg.window.max(1);
        mqtt.set_clean_session(true)
            .set_manual_acks(true)
            .set_keep_alive(cfg.keep_alive)
            .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes)
            .set_inflight(window)
            .set_request_channel_capacity(usize::from(window) * 2 + 16)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut eventloop) = AsyncClient::new(mqtt, usize::from(window) * 2 + 16);
        client_ext::set_connect_timeout(&mut eventloop, cfg.connect_timeout);
        let shared = Arc::new(LinkShared {
            client_id,
            client,
            window: usize::from(window),
            state: Mutex::new(LinkState::default()),
            counters,
        });
        let driver = Driver {
            shared: shared.clone(),
            eventloop,
            settled,
            downstream,
            commands: cfg.commands.clone(),
            command_timeout: cfg.command_timeout,
            backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
            credentials: username.zip(password),
            shutdown,
        };
        let task = tokio::spawn(driver.run());
        Self { shared, task }
    }

    /// Closes the link and waits (at most `within`) for its task; returns what was still queued.
    pub async fn stop(self, within: Duration) -> Vec<Item> {
        let left = self.shared.close();
        let mut task = self.task;
        if tokio::time::timeout(within, &mut task).await.is_err() {
            task.abort();
        }
        left
    }
}

struct Driver {
    shared: Arc<LinkShared>,
    eventloop: EventLoop,
    settled: mpsc::UnboundedSender<Settled>,
    downstream: Arc<DownstreamSession>,
    commands: Option<CommandFilter>,
    command_timeout: Duration,
    backoff: Backoff,
    /// Username and a maker of fresh passwords (SAS tokens expire: each connection gets a new
    /// one).
    credentials: Option<(String, PasswordSource)>,
    shutdown: watch::Receiver<bool>,
}

/// Where and as whom an MQTT link connects.
pub(crate) struct MqttTarget {
    /// MQTT client id.
    pub client_id: String,
    /// Host (also the TLS server name) and port.
    pub address: (String, u16),
    /// TLS client configuration.
    pub tls: Arc<rustls::ClientConfig>,
    /// MQTT username.
    pub username: Option<String>,
    /// Fresh password per connection.
    pub password: Option<PasswordSource>,
}

impl Driver {
    async fn run(mut self) {
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(incoming)) => self.on_incoming(incoming),
                Ok(Event::Outgoing(outgoing)) => {
                    if self.on_outgoing(outgoing) {
                        break;
                    }
                }
                Err(e) => {
                    if self.shared.lock().closing {
                        break;
                    }
                    let was_connected = self.shared.lock().connected;
                    let resent = self.on_connection_lost();
                    let delay = self.backoff.next_delay();
                    self.shared
                        .counters
                        .upstream_disconnects
                        .fetch_add(1, Ordering::Relaxed);
                    log_connection_error(&self.shared.client_id, &e, was_connected, resent, delay);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = super::stopped(&mut self.shutdown) => break,
                    }
                    if self.shared.lock().closing {
                        break;
                    }
                    if let Some((username, password)) = &self.credentials {
                        self.eventloop
                            .mqtt_options
                            .set_credentials(username.clone(), password());
                    }
                }
            }
        }
        let mut st = self.shared.lock();
        st.connected = false;
        st.requeue_unacknowledged();
    }

    fn on_incoming(&mut self, incoming: Incoming) {
        match incoming {
            Incoming::ConnAck(_) => {
                self.backoff.reset();
                self.shared
                    .counters
                    .upstream_connects
                    .fetch_add(1, Ordering::Relaxed);
                let mut st = self.shared.lock();
                if let Some(filter) = &self.commands {
                    let filters: Vec<SubscribeFilter> = st
                        .command_things
                        .iter()
                        .map(|(thing, _)| {
                            SubscribeFilter::new(filter.filter(thing), QoS::AtLeastOnce)
                        })
                        .collect();
                    if !filters.is_empty() {
                        // Ahead of the publishes that follow: commands sent during an outage
                        // are not held by a clean session, so subscribe first.
                        client_ext::send_first(
                            &mut self.eventloop,
                            Request::Subscribe(Subscribe::new_many(filters)),
                        );
                    }
                }
                st.connected = true;
                st.last_activity = Some(Instant::now());
                tracing::debug!(client_id = %self.shared.client_id, queued = st.queued.len(), "upstream connected");
                self.shared.pump(&mut st);
            }
            Incoming::PubAck(ack) => {
                let mut st = self.shared.lock();
                if let Some(item) = st.inflight.remove(&ack.pkid) {
                    st.settling += 1;
                    st.last_activity = Some(Instant::now());
                    // The remover holds the slot until the outbox entry is durably gone.
                    let _ = self.settled.send(Settled {
                        seq: item.seq,
                        mem: item.mem_size(),
                        link: Some(self.shared.clone()),
                    });
                }
            }
            Incoming::SubAck(ack)
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure)) =>
            {
                tracing::warn!(client_id = %self.shared.client_id, "the cloud refused a command subscription; check the thing's policy for the commands topic");
            }
            Incoming::Publish(publish) => self.on_command(publish),
            _ => {}
        }
    }

    /// Returns true when the task should stop (DISCONNECT sent by `close`).
    fn on_outgoing(&mut self, outgoing: Outgoing) -> bool {
        let mut st = self.shared.lock();
        match outgoing {
            Outgoing::Publish(pkid) if pkid != 0 => {
                let item = match st.collided.take() {
                    Some((id, item)) if id == pkid => Some(item),
                    other => {
                        st.collided = other;
                        st.submitted.pop_front()
                    }
                };
                match item {
                    Some(item) => {
                        st.inflight.insert(pkid, item);
                    }
                    None => {
                        tracing::debug!(client_id = %self.shared.client_id, pkid, "upstream publish without a queued message")
                    }
                }
            }
            Outgoing::AwaitAck(pkid) => {
                if let Some(item) = st.submitted.pop_front() {
                    st.collided = Some((pkid, item));
                }
            }
            Outgoing::Disconnect => return st.closing,
            _ => {}
        }
        false
    }

    /// Puts unacknowledged messages back in order; returns how many will be sent again.
    fn on_connection_lost(&mut self) -> usize {
        // rumqttc may return the error with events of the lost connection still buffered (a
        // read that ended in an error, a publish whose write failed), and would hand them out
        // after the next CONNACK, where a stale `Outgoing::Publish` would pair a new message
        // with an old packet id. Settle them now: PUBACKs that did arrive count, packet ids
        // are paired as before; everything unacknowledged is requeued below anyway.
        let stale: Vec<Event> = client_ext::take_buffered_events(&mut self.eventloop);
        for event in stale {
            match event {
                Event::Outgoing(outgoing) => {
                    self.on_outgoing(outgoing);
                }
                Event::Incoming(Incoming::PubAck(ack)) => self.on_incoming(Incoming::PubAck(ack)),
                // A command's ack would carry an old packet id on the new connection.
                Event::Incoming(_) => {}
            }
        }
        // A publish held back by a packet id collision is ours (in `collided`, requeued
        // below); left in place, it would keep rumqttc from taking new requests for good.
        let _ = client_ext::release_collision(&mut self.eventloop);
        let mut st = self.shared.lock();
        st.connected = false;
        // poll() moved rumqttc's unacknowledged publishes and its request channel into
        // `pending`; anything submitted after that is moved too, under the lock. The link
        // republishes them itself, in order, after the next CONNACK.
        client_ext::move_requests_to_pending(&mut self.eventloop);
        client_ext::drop_pending(&mut self.eventloop, |r| {
            matches!(
                r,
                Request::Publish(_) | Request::PubAck(_) | Request::Subscribe(_)
            )
        });
        st.requeue_unacknowledged()
    }

    fn on_command(&self, publish: Publish) {
        let Some(filter) = &self.commands else {
            let _ = self.shared.client.try_ack(&publish);
            return;
        };
        let target = filter.match_topic(&publish.topic).and_then(|(thing, sub)| {
            let st = self.shared.lock();
            st.command_things
                .iter()
                .find(|(t, _)| t == thing)
                .map(|(_, device)| (device.clone(), sub.map(str::to_string)))
        });
        let Some((device, subtopic)) = target else {
            tracing::debug!(client_id = %self.shared.client_id, topic = %publish.topic, "upstream message on an unexpected topic; ignored");
            let _ = self.shared.client.try_ack(&publish);
            return;
        };
        let downstream = self.downstream.clone();
        let shared = self.shared.clone();
        let within = self.command_timeout;
        tokio::spawn(async move {
            let sent = tokio::time::timeout(
                within,
                downstream.publish_command(&device, subtopic.as_deref(), publish.payload.clone()),
            )
            .await;
            match sent {
                Ok(Ok(())) => {
                    shared
                        .counters
                        .commands_forwarded
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    shared
                        .counters
                        .commands_failed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%device, "cloud-to-device message not delivered downstream: {e}");
                }
                Err(_) => {
                    shared
                        .counters
                        .commands_failed
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%device, "cloud-to-device message not delivered downstream within {within:?}");
                }
            }
            // Acknowledged either way: a message the local broker cannot take now would only
            // come back on the next connection, and a clean session would not keep it.
            let _ = shared.client.try_ack(&publish);
        });
    }
}

fn log_connection_error(
    client_id: &str,
    e: &ConnectionError,
    was_connected: bool,
    resent: usize,
    delay: Duration,
) {
    match e {
        ConnectionError::ConnectionRefused(code) => tracing::warn!(
            client_id, ?code, retry_in = ?delay,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64, order: u64) -> Item {
        let mut i = Item::new(
            seq,
            DeviceId::parse("d").unwrap(),
            "t".into(),
            Bytes::new(),
            0,
        );
        i.order = order;
        i
    }

    #[test]
    fn requeue_restores_submission_order_in_front_of_queued() {
        let mut st = LinkState::default();
        st.queued.push_back(item(9, 0));
        st.inflight.insert(3, item(5, 2));
        st.inflight.insert(1, item(4, 1));
        st.collided = Some((2, item(6, 3)));
        st.submitted.push_back(item(7, 4));
        st.settling = 1;
        assert_eq!(st.used(), 5);
        assert_eq!(st.requeue_unacknowledged(), 4);
        let seqs: Vec<u64> = st.queued.iter().map(|i| i.seq).collect();
        assert_eq!(seqs, [4, 5, 6, 7, 9]);
        assert_eq!(
            st.used(),
            1,
            "settling slots stay until the removal is durable"
        );
    }
}
