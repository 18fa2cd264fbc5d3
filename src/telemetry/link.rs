//! One upstream MQTT connection (a "link"): a device's own connection in `identity = "device"`
//! mode, or the gateway's single connection in `identity = "gateway"` mode, over our own client
//! ([`mqtt::upstream`](crate::mqtt::upstream)) in MQTT 5 (AWS IoT Core, message properties
//! travel) or MQTT 3.1.1 (IoT Hub, or AWS with `cloud.aws.mqtt_version = 3`).
//!
//! The link keeps the messages routed to it in order: `queued` (not yet sent), `inflight` (sent,
//! keyed by the packet id the link allocated) and `settling` (PUBACK received, outbox removal
//! not yet durable). The in-flight window counts `inflight` and `settling`, so after a crash at
//! most `window` messages of a link are sent again; within it, `inflight` alone never exceeds
//! the server's Receive Maximum (messages the server acknowledged no longer count against it,
//! while they wait for the outbox removal).
//!
//! Every connection starts a clean session (AWS IoT keeps none for us), so the link owns
//! retransmission: when the connection drops, every unacknowledged message goes back to the
//! front of `queued` in its original order and is published again after the next CONNACK;
//! reconnects wait a jittered, doubling delay.
//!
//! What the cloud refuses: a PUBACK with a failure reason code that may pass later (0x80
//! unspecified, 0x83 implementation specific, 0x91 packet id in use, 0x97 quota exceeded) ends
//! the connection, so the message and those after it are sent again, in order, after the
//! backoff; any other failure (not authorized, topic name invalid, payload format invalid)
//! would come back every time, so the message is dropped from the outbox, counted
//! (`refused_upstream`) and logged. So is a message larger than the server's Maximum Packet
//! Size, which is never sent.
//!
//! Cloud-to-device messages arriving on the link's command subscription are handed to the
//! downstream session (`fleetgw/{id}/commands/...`) with their MQTT 5 properties and
//! acknowledged upstream once the local broker has them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::directory::PasswordSource;
use super::topic::CommandFilter;
use super::Counters;
use crate::backoff::Backoff;
use crate::device_id::DeviceId;
use crate::downstream::DownstreamSession;
use crate::mqtt::props::MessageProperties;
use crate::mqtt::upstream::{ConnectOptions, Inflight, MqttVersion, Transport};

mod driver;
use driver::Driver;

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
    /// MQTT 5 properties sent with it (MQTT 5 links only; IoT Hub carries them in the topic).
    pub properties: Option<Box<MessageProperties>>,
    /// When the gateway got it, for `forward_delay` (handed over in memory only).
    pub accepted: Option<tokio::time::Instant>,
}

impl Item {
    /// A message not yet sent.
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
            properties: None,
            accepted: None,
        }
    }

    /// The same message, got by the gateway at `at`.
    pub fn accepted_at(mut self, at: Option<tokio::time::Instant>) -> Self {
        self.accepted = at;
        self
    }

    /// The same message with MQTT 5 properties.
    pub fn with_properties(mut self, properties: Option<MessageProperties>) -> Self {
        self.properties = properties.map(Box::new);
        self
    }

    /// Bytes of memory this message is accounted for while loaded.
    pub fn mem_size(&self) -> usize {
        self.payload.len()
            + self.topic.len()
            + 64
            + self.properties.as_ref().map_or(0, |p| p.cost() + 128)
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
    /// MQTT 5 or 3.1.1.
    pub version: MqttVersion,
    /// Bounds the connection attempts of all links at once ([`CONNECTS_AT_ONCE`]).
    pub connect_attempts: Arc<Semaphore>,
}

/// Upstream connection attempts (TCP, TLS handshake, CONNACK) in progress at once, over all
/// links. When thousands of device links start together, each handshake holds its buffers
/// and key exchange state until it completes. Measured with `fleetgw bench scale` at 4,000
/// and 8,000 devices (docs/benchmarks.md, 2026-12-07 afternoon): unbounded, the storm set the
/// peak RSS at 8,000 devices (286.1 MB against 251.1 MB with 256, p99 about the same); 64
/// slowed the ramp so much that messages queued behind it (p99 1.6 s). A cloud far away takes
/// several round trips per connection, another reason not to go lower (AWS IoT takes 500
/// CONNECTs per second per account by default).
pub(crate) const CONNECTS_AT_ONCE: usize = 256;

/// Commands from the cloud a link takes unacknowledged at once (MQTT 5 Receive Maximum);
/// each one is a downstream publish in flight.
const COMMANDS_IN_FLIGHT: u16 = 100;

#[derive(Default)]
struct LinkState {
    queued: VecDeque<Item>,
    inflight: Inflight<Item>,
    settling: usize,
    connected: bool,
    closing: bool,
    /// Thing names whose commands this link subscribes to (one in device mode).
    command_things: Vec<(String, DeviceId)>,
    /// How many of `command_things` were subscribed on the current connection.
    subscribed: usize,
    last_activity: Option<Instant>,
}

impl LinkState {
    fn used(&self) -> usize {
        self.inflight.len() + self.settling
    }

    /// Whether one more message may go out: fewer than `window` sent and not yet settled, and
    /// fewer than `unacknowledged` (the server's Receive Maximum) not yet acknowledged.
    fn may_send(&self, window: usize, unacknowledged: usize) -> bool {
        self.used() < window && self.inflight.len() < unacknowledged
    }

    /// Puts every message in flight back in front of `queued`, oldest first.
    fn requeue_unacknowledged(&mut self) -> usize {
        let back = self.inflight.drain_in_order();
        let n = back.len();
        for item in back.into_iter().rev() {
            self.queued.push_front(item);
        }
        self.subscribed = 0;
        n
    }
}

/// What the dispatcher and the remover share with a link's task.
pub(crate) struct LinkShared {
    /// Client id (thing name) for logs.
    pub client_id: String,
    window: usize,
    state: Mutex<LinkState>,
    counters: Arc<Counters>,
    /// Something for the task to do: messages queued, slots settled, a thing added.
    wake: Notify,
    /// `close` was called.
    stop: Notify,
}

impl LinkShared {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // Plain bookkeeping behind the lock: a panic elsewhere cannot leave it half-updated in a
        // way that matters more than stopping the gateway would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues messages (in order); the task publishes as many as the window allows.
    pub fn enqueue(&self, items: impl IntoIterator<Item = Item>) {
        let mut st = self.lock();
        st.queued.extend(items);
        st.last_activity = Some(Instant::now());
        drop(st);
        self.wake.notify_one();
    }

    /// Adds a thing whose commands this link should receive; subscribed at once when
    /// connected.
    pub fn add_command_thing(&self, thing: &str, device: &DeviceId, _filter: &CommandFilter) {
        let mut st = self.lock();
        if st.command_things.iter().any(|(t, _)| t == thing) {
            return;
        }
        st.command_things.push((thing.to_string(), device.clone()));
        drop(st);
        self.wake.notify_one();
    }

    /// The cloud acknowledged a message and its outbox entry is gone: frees its window slot.
    /// The link's task is woken only when a message waits for that slot; otherwise the next
    /// [`enqueue`](Self::enqueue) wakes it. At half rate nearly every settlement finds the queue
    /// empty, so this saves the task a turn of its loop per settled message.
    pub fn settle(&self, n: usize) {
        let mut st = self.lock();
        st.settling = st.settling.saturating_sub(n);
        st.last_activity = Some(Instant::now());
        let waiting = !st.queued.is_empty();
        drop(st);
        if waiting {
            self.wake.notify_one();
        }
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
        let mut left: Vec<Item> = st.queued.drain(..).collect();
        st.requeue_unacknowledged();
        left.extend(st.queued.drain(..));
        drop(st);
        self.stop.notify_one();
        left
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
            address,
            tls,
            username,
            password,
        } = target;
        let window = usize::from(cfg.window.max(1));
        let shared = Arc::new(LinkShared {
            client_id: client_id.clone(),
            window,
            state: Mutex::new(LinkState::default()),
            counters,
            wake: Notify::new(),
            stop: Notify::new(),
        });
        let driver = Driver {
            shared: shared.clone(),
            address,
            transport: Transport::Tls(tls),
            options: ConnectOptions {
                version: cfg.version,
                client_id,
                login: None,
                keep_alive: cfg.keep_alive,
                connect_timeout: cfg.connect_timeout,
                write_timeout: cfg.connect_timeout,
                max_packet_in: cfg.max_packet_bytes,
                receive_maximum: COMMANDS_IN_FLIGHT,
                attempts: Some(cfg.connect_attempts.clone()),
            },
            settled,
            downstream,
            commands: cfg.commands.clone(),
            command_timeout: cfg.command_timeout,
            backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
            credentials: username.map(|u| (u, password)),
            shutdown,
            acks: None,
            generation: 0,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the link's task would wake: takes the permit a `notify_one` left.
    async fn woken(shared: &LinkShared) -> bool {
        tokio::time::timeout(Duration::ZERO, shared.wake.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_settlement_wakes_the_link_only_when_a_message_waits_for_the_slot() {
        let shared = LinkShared {
            client_id: "c".into(),
            window: 1,
            state: Mutex::new(LinkState::default()),
            counters: Arc::default(),
            wake: Notify::new(),
            stop: Notify::new(),
        };
        shared.lock().settling = 2;
        shared.settle(1);
        assert!(!woken(&shared).await, "nothing queued: no wake-up");
        assert_eq!(shared.lock().settling, 1);
        // The window (1) is full and a message waits: freeing the slot must wake the task,
        // or the message would wait for the next enqueue.
        shared.lock().queued.push_back(item(7));
        assert!(!shared.lock().may_send(1, 10));
        shared.settle(1);
        assert!(
            woken(&shared).await,
            "a queued message waits for the freed slot"
        );
        assert!(shared.lock().may_send(1, 10));
    }

    fn item(seq: u64) -> Item {
        Item::new(
            seq,
            DeviceId::parse("d").unwrap(),
            "t".into(),
            Bytes::new(),
            0,
        )
    }

    /// Messages the server acknowledged wait for the outbox removal in the link's window, not
    /// in the server's Receive Maximum.
    #[test]
    fn settling_messages_count_against_the_window_not_the_receive_maximum() {
        let mut st = LinkState::default();
        for seq in 0..3 {
            let id = st.inflight.next_free().unwrap();
            st.inflight.insert(id, item(seq));
        }
        assert!(
            !st.may_send(1000, 3),
            "three unacknowledged: the server's maximum"
        );
        st.settling = 500;
        assert!(!st.may_send(503, 100), "the link's window is full");
        assert!(st.may_send(1000, 100));
        let id = st.inflight.next_free().unwrap();
        st.inflight.insert(id, item(3));
        st.inflight.ack(id).ok();
        st.settling += 1;
        assert!(
            st.may_send(1000, 4),
            "an acknowledged message frees a Receive Maximum slot"
        );
    }

    #[test]
    fn requeue_restores_send_order_in_front_of_queued() {
        let mut st = LinkState::default();
        st.queued.push_back(item(9));
        for seq in [4, 5, 6, 7] {
            let id = st.inflight.next_free().unwrap();
            st.inflight.insert(id, item(seq));
        }
        // Acknowledged out of order: the rest keep their order.
        let id = st.inflight.next_free().unwrap();
        st.inflight.insert(id, item(8));
        assert_eq!(st.inflight.ack(id).map(|i| i.seq).ok(), Some(8));
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
