//! The dispatcher and the remover with in-memory links ([`FakeUpstream`]): routing to device
//! links or the gateway link, the cap on open links (least recently used idle link closed, else
//! the device waits), the memory window (what does not fit stays in the outbox and is read
//! later), messages deleted by drop-oldest, and resending what was unacknowledged after a
//! restart. No network, no broker, no process: a test takes milliseconds.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{remover, Dispatcher, Handoff, Upstream, UpstreamLink};
use crate::device_id::DeviceId;
use crate::downstream::DownstreamSession;
use crate::store::{DeviceRecord, OutboxMessage, Store, StoreOptions};
use crate::telemetry::link::{Item, LinkConfig, Settled};
use crate::telemetry::topic::CommandFilter;
use crate::telemetry::{Counters, Shared, TelemetryError, TelemetryOptions, UpstreamEndpoint};

const WITHIN: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).expect("a valid test device id")
}

fn thing(id: &str) -> String {
    format!("thing-{id}")
}

/// What one fake link was given, for the test to look at.
struct LinkLog {
    client_id: String,
    window: u16,
    /// Routed and not yet acknowledged.
    queued: Mutex<VecDeque<Item>>,
    /// Every sequence number routed to it, in order.
    received: Mutex<Vec<u64>>,
    command_things: Mutex<Vec<String>>,
    last_activity: Mutex<Option<Instant>>,
    stopped: AtomicBool,
}

impl LinkLog {
    fn received(&self) -> Vec<u64> {
        lock(&self.received).clone()
    }

    /// The cloud acknowledges everything queued: handed to the remover as a real link does.
    fn ack_all(&self, settled: &mpsc::UnboundedSender<Settled>) {
        let n = lock(&self.queued).len();
        self.ack_first(n, settled);
    }

    /// The cloud acknowledges the `n` oldest messages.
    fn ack_first(&self, n: usize, settled: &mpsc::UnboundedSender<Settled>) {
        let acked: Vec<Item> = lock(&self.queued).drain(..n).collect();
        *lock(&self.last_activity) = Some(Instant::now());
        for item in acked {
            let _ = settled.send(Settled {
                seq: item.seq,
                mem: item.mem_size(),
                link: None,
            });
        }
    }
}

struct FakeLink(Arc<LinkLog>);

impl UpstreamLink for FakeLink {
    fn client_id(&self) -> &str {
        &self.0.client_id
    }

    fn enqueue(&self, items: impl IntoIterator<Item = Item>) {
        let mut queued = lock(&self.0.queued);
        for item in items {
            lock(&self.0.received).push(item.seq);
            queued.push_back(item);
        }
        *lock(&self.0.last_activity) = Some(Instant::now());
    }

    fn add_command_thing(&self, thing: &str, _device: &DeviceId, _filter: &CommandFilter) {
        lock(&self.0.command_things).push(thing.to_string());
    }

    fn is_empty(&self) -> bool {
        lock(&self.0.queued).is_empty()
    }

    fn last_activity(&self) -> Option<Instant> {
        *lock(&self.0.last_activity)
    }

    fn remove_queued(&self, mut drop: impl FnMut(&Item) -> bool) -> Vec<Item> {
        let mut queued = lock(&self.0.queued);
        let (gone, kept): (Vec<Item>, Vec<Item>) = queued.drain(..).partition(|i| drop(i));
        queued.extend(kept);
        gone
    }

    async fn stop(self, _within: Duration) -> Vec<Item> {
        self.0.stopped.store(true, Ordering::Relaxed);
        lock(&self.0.queued).drain(..).collect()
    }
}

/// Opens [`FakeLink`]s: device links named after the thing in the device's record, as the
/// real credentials are.
struct FakeUpstream {
    store: Store,
    gateway: Option<String>,
    opened: Arc<Mutex<Vec<Arc<LinkLog>>>>,
}

impl FakeUpstream {
    fn open(&self, client_id: String, cfg: &LinkConfig) -> FakeLink {
        let log = Arc::new(LinkLog {
            client_id,
            window: cfg.window,
            queued: Mutex::default(),
            received: Mutex::default(),
            command_things: Mutex::default(),
            last_activity: Mutex::default(),
            stopped: AtomicBool::new(false),
        });
        lock(&self.opened).push(log.clone());
        FakeLink(log)
    }
}

impl Upstream for FakeUpstream {
    type Link = FakeLink;

    fn open_gateway(&mut self, cfg: &LinkConfig) -> Option<FakeLink> {
        let client_id = self.gateway.take()?;
        Some(self.open(client_id, cfg))
    }

    fn open_device(
        &mut self,
        device: &DeviceId,
        cfg: &LinkConfig,
    ) -> Result<(String, FakeLink), TelemetryError> {
        let thing = self
            .store
            .device(device)
            .ok()
            .flatten()
            .and_then(|r| r.provision.thing_name)
            .ok_or_else(|| TelemetryError::DeviceCredentials {
                device: device.clone(),
                reason: "no record".into(),
            })?;
        let link = self.open(thing.clone(), cfg);
        Ok((thing, link))
    }
}

fn options() -> TelemetryOptions {
    let endpoint = UpstreamEndpoint::parse("localhost:8883", String::new()).expect("an endpoint");
    TelemetryOptions::new(endpoint)
}

/// A running dispatcher and remover over a store.
struct Rig {
    store: Store,
    shared: Arc<Shared>,
    opened: Arc<Mutex<Vec<Arc<LinkLog>>>>,
    handoff: mpsc::Sender<Handoff>,
    settled: mpsc::UnboundedSender<Settled>,
    shutdown: watch::Sender<bool>,
    dispatcher: JoinHandle<()>,
    remover: JoinHandle<()>,
    /// What the remover reported finished (for the intake's acknowledgements), and all it
    /// reported so far.
    finished: Mutex<(mpsc::UnboundedReceiver<Vec<u64>>, Vec<u64>)>,
}

impl Rig {
    async fn start(store: Store, opts: TelemetryOptions, gateway: Option<&str>) -> Self {
        let shared = Arc::new(Shared {
            opts,
            store: store.clone(),
            downstream: DownstreamSession::closed_for_tests().await,
            counters: Arc::new(Counters::default()),
            room: Notify::new(),
            freed: Notify::new(),
        });
        let opened = Arc::new(Mutex::new(Vec::new()));
        let upstream = FakeUpstream {
            store: store.clone(),
            gateway: gateway.map(str::to_string),
            opened: opened.clone(),
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (handoff, handoff_rx) = mpsc::channel(64);
        let (settled, settled_rx) = mpsc::unbounded_channel();
        let (finished, finished_rx) = mpsc::unbounded_channel();
        let remover = tokio::spawn(remover(shared.clone(), settled_rx, finished));
        let dispatcher = Dispatcher::with_upstream(
            shared.clone(),
            upstream,
            handoff_rx,
            settled.clone(),
            shutdown_rx,
        );
        let dispatcher = tokio::spawn(dispatcher.run());
        Self {
            store,
            shared,
            opened,
            handoff,
            settled,
            shutdown,
            dispatcher,
            remover,
            finished: Mutex::new((finished_rx, Vec::new())),
        }
    }

    /// Every sequence number the remover reported finished so far, in report order.
    fn finished(&self) -> Vec<u64> {
        let mut f = lock(&self.finished);
        while let Ok(seqs) = f.0.try_recv() {
            f.1.extend(seqs);
        }
        f.1.clone()
    }

    /// Stops the dispatcher (closing its links) and the remover, as a shutdown does.
    async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.dispatcher.await.expect("the dispatcher ends");
        drop(self.settled);
        self.remover.await.expect("the remover ends");
    }

    /// Appends messages of `devices` (in this order) to the outbox and hands them over, as
    /// the intake does; returns their sequence numbers.
    async fn send(&self, devices: &[&str]) -> Vec<u64> {
        let msgs: Vec<OutboxMessage> = devices.iter().map(|d| message(d)).collect();
        let seqs = self.store.outbox_append(&msgs).await.expect("appended");
        let handed = seqs
            .iter()
            .zip(msgs)
            .zip(devices)
            .map(|((seq, msg), d)| {
                let at = tokio::time::Instant::now();
                (*seq, msg, Arc::from(thing(d).as_str()), at)
            })
            .collect();
        self.handoff
            .send(Handoff::Appended(handed))
            .await
            .expect("the dispatcher takes hand-overs");
        seqs
    }

    fn links(&self) -> Vec<Arc<LinkLog>> {
        lock(&self.opened).clone()
    }

    fn link(&self, client_id: &str) -> Arc<LinkLog> {
        self.links()
            .into_iter()
            .rev()
            .find(|l| l.client_id == client_id)
            .unwrap_or_else(|| panic!("no link {client_id} was opened"))
    }

    /// Polls until `done` holds.
    async fn until(&self, what: &str, done: impl Fn(&Rig) -> bool) {
        let deadline = Instant::now() + WITHIN;
        while !done(self) {
            assert!(Instant::now() < deadline, "not within {WITHIN:?}: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn memory(&self) -> usize {
        self.shared.counters.memory_bytes.load(Ordering::Relaxed)
    }
}

fn message(device_id: &str) -> OutboxMessage {
    OutboxMessage {
        device: device(device_id),
        topic: String::new(),
        payload: vec![0u8; 100],
        qos: 1,
        enqueued_at_ms: crate::clock::unix_ms(),
        properties: Vec::new(),
    }
}

async fn store_with(dir: &tempfile::TempDir, devices: &[&str]) -> Store {
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("the store opens");
    with_devices(store, devices).await
}

async fn with_devices(store: Store, devices: &[&str]) -> Store {
    for d in devices {
        let mut rec = DeviceRecord::new(device(d), "json", 0);
        rec.provision.thing_name = Some(thing(d));
        store.put_device(&rec).await.expect("stored");
    }
    store
}

// --- routing ----------------------------------------------------------------------------------

#[tokio::test]
async fn device_mode_gives_each_device_its_own_link_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(&dir, &["a", "b", "c"]).await;
    let mut opts = options();
    opts.inflight = 7;
    let rig = Rig::start(store, opts, None).await;

    let seqs = rig.send(&["a", "b", "a", "c", "a"]).await;
    rig.until("three links", |r| r.links().len() == 3).await;
    rig.until("every message routed", |r| {
        r.links().iter().map(|l| l.received().len()).sum::<usize>() == 5
    })
    .await;
    assert_eq!(rig.link("thing-a").received(), [seqs[0], seqs[2], seqs[4]]);
    assert_eq!(rig.link("thing-b").received(), [seqs[1]]);
    assert_eq!(rig.link("thing-c").received(), [seqs[3]]);
    for link in rig.links() {
        assert_eq!(link.window, 7, "device links get `inflight`");
        assert_eq!(
            *lock(&link.command_things),
            std::slice::from_ref(&link.client_id)
        );
    }
    let open = rig.shared.counters.open_links.load(Ordering::Relaxed);
    assert_eq!(open, 3);

    // The cloud acknowledges: the remover empties the outbox and frees the memory, and
    // reports each message finished, for the devices' acknowledgements.
    for link in rig.links() {
        link.ack_all(&rig.settled);
    }
    rig.until("the outbox emptied", |r| r.store.outbox_len() == 0)
        .await;
    rig.until("memory released", |r| r.memory() == 0).await;
    let mut finished = rig.finished();
    finished.sort_unstable();
    assert_eq!(finished, seqs, "each message reported finished once");
    rig.stop().await;
}

#[tokio::test]
async fn the_remover_reports_finished_messages_while_a_deletion_waits_for_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let stall = dir.path().join("stall");
    let store = Store::open_stalled_while(&dir.path().join("db"), &StoreOptions::default(), &stall)
        .expect("the store opens");
    let store = with_devices(store, &["a"]).await;
    let rig = Rig::start(store, options(), None).await;
    // Two outbox chunks: deleting either one waits for a flush.
    let first = rig.send(&["a"]).await;
    let second = rig.send(&["a"]).await;
    rig.until("both routed", |r| {
        r.links().len() == 1 && r.link("thing-a").received().len() == 2
    })
    .await;

    // The disk stalls. The cloud acknowledges the first message: reported at once, and its
    // deletion waits for the flush.
    std::fs::write(&stall, b"").unwrap();
    rig.link("thing-a").ack_first(1, &rig.settled);
    rig.until("the first reported", |r| r.finished() == first)
        .await;
    // The second is reported while that deletion still waits (the outbox's counters drop
    // only once the flush is done).
    rig.link("thing-a").ack_first(1, &rig.settled);
    rig.until("the second reported", |r| {
        r.finished() == [first[0], second[0]]
    })
    .await;
    assert_eq!(rig.store.outbox_len(), 2, "no deletion is durable yet");

    // The disk answers again: both deletions go through.
    std::fs::remove_file(&stall).unwrap();
    rig.until("the outbox emptied", |r| r.store.outbox_len() == 0)
        .await;
    assert_eq!(rig.finished(), [first[0], second[0]], "reported once each");
    rig.stop().await;
}

#[tokio::test]
async fn gateway_mode_sends_every_device_over_the_gateway_link() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(&dir, &["a", "b"]).await;
    let mut opts = options();
    opts.identity = crate::config::TelemetryIdentity::Gateway;
    opts.gateway_inflight = 33;
    let rig = Rig::start(store, opts, Some("gateway-thing")).await;

    let seqs = rig.send(&["a", "b", "a"]).await;
    let gw = rig.link("gateway-thing");
    rig.until("every message routed", |_| gw.received().len() == 3)
        .await;
    assert_eq!(gw.received(), seqs, "one link, outbox order");
    assert_eq!(gw.window, 33, "the gateway link gets `gateway_inflight`");
    assert_eq!(*lock(&gw.command_things), [thing("a"), thing("b")]);
    assert_eq!(rig.links().len(), 1, "no device links in gateway mode");
    rig.stop().await;
    assert!(gw.stopped.load(Ordering::Relaxed));
}

// --- the connection cap -----------------------------------------------------------------------

#[tokio::test]
async fn at_the_cap_the_least_recently_used_idle_link_is_closed_else_the_device_waits() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(&dir, &["a", "b", "c", "d", "e"]).await;
    let mut opts = options();
    opts.max_upstream_connections = 2;
    let rig = Rig::start(store, opts, None).await;

    rig.send(&["a", "b"]).await;
    rig.until("two links", |r| r.links().len() == 2).await;
    // Both idle once acknowledged; a's traffic is the older.
    rig.link("thing-a").ack_all(&rig.settled);
    tokio::time::sleep(Duration::from_millis(5)).await;
    rig.link("thing-b").ack_all(&rig.settled);
    rig.until("the outbox emptied", |r| r.store.outbox_len() == 0)
        .await;

    let c = rig.send(&["c"]).await;
    rig.until("c's link", |r| r.links().len() == 3).await;
    assert!(
        rig.link("thing-a").stopped.load(Ordering::Relaxed),
        "a was least recent"
    );
    assert!(!rig.link("thing-b").stopped.load(Ordering::Relaxed));
    rig.until("c routed", |r| r.link("thing-c").received() == c)
        .await;

    // b is idle, c is not: d takes b's slot.
    rig.send(&["d"]).await;
    rig.until("d's link", |r| r.links().len() == 4).await;
    assert!(rig.link("thing-b").stopped.load(Ordering::Relaxed));
    assert!(!rig.link("thing-c").stopped.load(Ordering::Relaxed));

    // c and d both busy: e waits for a slot, its message kept.
    let e = rig.send(&["e", "e"]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(rig.links().len(), 4, "no third connection is opened");
    rig.link("thing-c").ack_all(&rig.settled);
    rig.until("e's link", |r| r.links().len() == 5).await;
    assert!(rig.link("thing-c").stopped.load(Ordering::Relaxed));
    rig.until("e's messages, in order", |r| {
        r.link("thing-e").received() == e
    })
    .await;
    let open = rig.shared.counters.open_links.load(Ordering::Relaxed);
    assert_eq!(open, 2);
    rig.stop().await;
}

// --- the memory window ------------------------------------------------------------------------

#[tokio::test]
async fn what_exceeds_the_memory_window_waits_in_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(&dir, &["a"]).await;
    // 600 messages from before the start; the dispatcher reads pages of 512.
    let stored: Vec<OutboxMessage> = (0..600).map(|_| message("a")).collect();
    let mut all = store.outbox_append(&stored).await.unwrap();
    let mut opts = options();
    opts.max_memory_bytes = 1;
    let rig = Rig::start(store, opts, None).await;

    rig.until("the first page", |r| {
        r.links().first().is_some_and(|l| l.received().len() == 512)
    })
    .await;
    // A hand-over while the backlog is read is left to the scan.
    all.extend(rig.send(&["a"]).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let link = rig.link("thing-a");
    assert_eq!(
        link.received().len(),
        512,
        "nothing more while memory is full"
    );

    // Acknowledged and removed: memory frees, the rest is read from the outbox.
    link.ack_all(&rig.settled);
    rig.until("the rest", |_| link.received().len() == 601)
        .await;
    // Full again (89 loaded > 1 byte): a new hand-over goes to the outbox only ...
    all.extend(rig.send(&["a"]).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(link.received().len(), 601);
    // ... and is read from there once memory frees.
    link.ack_all(&rig.settled);
    rig.until("the last one", |_| link.received().len() == 602)
        .await;
    assert_eq!(link.received(), all, "each message once, in outbox order");
    link.ack_all(&rig.settled);
    rig.until("the outbox emptied", |r| r.store.outbox_len() == 0)
        .await;
    rig.stop().await;
}

// --- drop-oldest, undeliverable, restart ------------------------------------------------------

#[tokio::test]
async fn messages_deleted_by_drop_oldest_leave_the_links() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(&dir, &["a"]).await;
    let rig = Rig::start(store, options(), None).await;
    let seqs = rig.send(&["a", "a", "a"]).await;
    rig.until("routed", |r| r.links().len() == 1).await;
    let link = rig.link("thing-a");
    rig.until("routed", |_| link.received().len() == 3).await;
    let before = rig.memory();
    rig.handoff
        .send(Handoff::Dropped(vec![seqs[1]]))
        .await
        .unwrap();
    rig.until("the dropped message gone", |_| {
        lock(&link.queued).len() == 2
    })
    .await;
    let left: Vec<u64> = lock(&link.queued).iter().map(|i| i.seq).collect();
    assert_eq!(left, [seqs[0], seqs[2]]);
    assert!(rig.memory() < before);
    rig.stop().await;
}

#[tokio::test]
async fn messages_of_a_deleted_device_are_dropped_from_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    // "gone" has no record: its stored message cannot be sent anywhere.
    let store = store_with(&dir, &["a"]).await;
    store
        .outbox_append(&[message("gone"), message("a")])
        .await
        .unwrap();
    let rig = Rig::start(store, options(), None).await;
    rig.until("a's message routed", |r| r.links().len() == 1)
        .await;
    rig.until("the undeliverable one removed", |r| {
        r.store.outbox_len() == 1
    })
    .await;
    let undeliverable = rig.shared.counters.undeliverable.load(Ordering::Relaxed);
    assert_eq!(undeliverable, 1);
    rig.stop().await;
}

#[tokio::test]
async fn unacknowledged_messages_are_sent_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(&dir, &["a", "b"]).await;
    let rig = Rig::start(store.clone(), options(), None).await;
    let seqs = rig.send(&["a", "b", "a", "b", "a"]).await;
    rig.until("routed", |r| {
        r.links().iter().map(|l| l.received().len()).sum::<usize>() == 5
    })
    .await;
    // b's messages are acknowledged, a's connection is lost with its three in flight.
    rig.link("thing-b").ack_all(&rig.settled);
    rig.until("b's messages removed", |r| r.store.outbox_len() == 3)
        .await;
    let a = rig.link("thing-a");
    rig.stop().await;
    assert!(a.stopped.load(Ordering::Relaxed));

    let rig = Rig::start(store, options(), None).await;
    rig.until("a's link again", |r| r.links().len() == 1).await;
    let again = rig.link("thing-a");
    rig.until("a's messages again", |_| again.received().len() == 3)
        .await;
    assert_eq!(again.received(), [seqs[0], seqs[2], seqs[4]]);
    let unique: HashSet<String> = rig.links().iter().map(|l| l.client_id.clone()).collect();
    assert_eq!(
        unique.len(),
        1,
        "nothing for b: its messages were acknowledged"
    );
    rig.stop().await;
}
