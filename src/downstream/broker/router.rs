//! Sessions, subscriptions and retained messages of the embedded broker, shared by every
//! connection task.
//!
//! A PUBLISH is routed by the publishing connection's own task: it looks up the subscribers in
//! the filter trie (one lock, held for the walk), then appends the message to each
//! subscriber's session queue and wakes that subscriber's connection task, which writes it.
//! There is no router thread and no per-message channel hop, so routing scales with the cores
//! of the runtime and costs the same whether 10 or 50,000 devices are subscribed.
//!
//! Each session keeps its subscriptions, the QoS 1 messages sent but not yet acknowledged
//! (`inflight`, at most `max_inflight`) and the messages waiting for room in that window or
//! for the client to come back (`queue`, at most `max_queued_bytes`; beyond it the oldest are
//! dropped and counted). A session of a client that asked to keep it (3.1.1 clean session 0,
//! MQTT 5 session expiry > 0) outlives its connection: queued QoS 1 messages wait for the
//! client, unacknowledged ones are sent again with DUP set. Sessions live in memory: a
//! restart of the daemon ends them (the gateway's own session then re-subscribes, and devices
//! re-send unacknowledged messages, as MQTT clients do).
//!
//! End-to-end acknowledgement: with an acknowledging client configured (the gateway's own
//! session), a QoS 1 PUBLISH that client receives at QoS 1 is acknowledged to its publisher
//! only once no copy of it waits for that client any more: the client acknowledged it (the
//! gateway does after its outbox fsync), or it left the session (queue overflow, session
//! discarded). A device's PUBACK then means its message is durable at the gateway, and a
//! daemon crash cannot lose what devices were told was delivered. Each copy of the message
//! for that client carries an [`AckGuard`]; dropping the last one completes the publisher's
//! [`AckWait`] and wakes its connection, which sends the PUBACKs in arrival order. A message
//! that left the client's session without its PUBACK (queue overflow, session discarded) is
//! never acknowledged to the publisher: the broker closes the publisher's connection instead,
//! so the device resends it after reconnecting (a possible duplicate, never a loss).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use super::ack::AckGuard;
pub use super::ack::AckWait;
use super::rules::Owner;
use super::trie::{FilterTrie, RetainedTrie};
use crate::mqtt::wire::{SubscriptionRequest, Will};

/// A message on its way to subscribers.
#[derive(Clone, Debug)]
pub struct Message {
    /// Topic name.
    pub topic: Arc<str>,
    /// Payload.
    pub payload: Bytes,
    /// QoS the publisher used (2 is delivered as 1).
    pub qos: u8,
    /// Retain flag as published.
    pub retain: bool,
}

impl Message {
    fn cost(&self) -> usize {
        self.topic.len() + self.payload.len() + 64
    }
}

/// A message queued for one subscriber.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// QoS it is delivered with (min of published and granted).
    pub qos: u8,
    /// Retain flag to send.
    pub retain: bool,
    /// Sent before and not acknowledged.
    pub dup: bool,
    /// Held while this copy waits for the acknowledging client (see the module docs); never
    /// read, its drop is what completes the publisher's wait.
    #[allow(dead_code)]
    ack: Option<Arc<AckGuard>>,
}

/// Options of one subscription.
#[derive(Clone, Copy, Debug)]
pub struct SubOptions {
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
}

/// Per-session limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// QoS 1 messages sent to a client and not yet acknowledged.
    pub max_inflight: usize,
    /// The same for the client whose acknowledgements publishers wait for.
    pub ack_after_inflight: usize,
    /// Bytes queued for one session (connected or not) before the oldest are dropped.
    pub max_queued_bytes: usize,
    /// Subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Retained messages the broker holds, all topics.
    pub max_retained: usize,
    /// Bytes of retained messages the broker holds, all topics.
    pub max_retained_bytes: usize,
    /// Sessions kept for absent clients; past it a leaving client's session is not kept.
    pub max_kept_sessions: usize,
    /// The longest an absent client's session is kept (MQTT 5 clients may ask for less).
    pub kept_session_expiry: Duration,
}

/// One client's session.
#[derive(Debug)]
pub struct Session {
    client_id: Arc<str>,
    /// Who made it: only a connection of the same owner resumes it.
    owner: Owner,
    state: Mutex<SessionState>,
    /// Wakes the connection task: messages queued, or taken over.
    wake: Notify,
}

/// What the broker knows about a client's current connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionFacts {
    /// Where it comes from.
    pub peer: std::net::SocketAddr,
    /// It arrived on the TLS listener.
    pub tls: bool,
    /// It proved who it is (a password of `[[downstream.users]]`, the gateway's secret).
    pub authenticated: bool,
    /// SHA-256 of the client certificate it presented on the TLS listener, if any (what an
    /// operator compares before approving a device).
    pub client_cert_sha256: Option<[u8; 32]>,
}

#[derive(Debug, Default)]
struct SessionState {
    /// Connection currently attached (its number), if any.
    attached: Option<u64>,
    /// Facts of the attached connection.
    facts: Option<ConnectionFacts>,
    /// How long to keep the session once its connection ends; `None`: discard it then.
    keep: Option<Duration>,
    /// When a kept session of an absent client expires.
    expires_at: Option<Instant>,
    /// Counted in [`Tables::kept`] (absent client, session kept).
    counted_kept: bool,
    subscriptions: HashMap<String, SubOptions>,
    inflight: VecDeque<(u16, Delivery)>,
    queue: VecDeque<Delivery>,
    queued_bytes: usize,
    next_pkid: u16,
    dropped: u64,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the connection task serving this session.
    pub(super) fn wake_up(&self) {
        self.wake.notify_one();
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Resolves when messages were queued for this session or it was taken over.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// For connection `number`: moves queued messages into the in-flight window and returns
    /// what to write now, with packet ids assigned. False when the session was taken over.
    pub fn take_sendable(
        &self,
        number: u64,
        window: usize,
        out: &mut Vec<(u16, Delivery)>,
    ) -> bool {
        let mut st = self.lock();
        if st.attached != Some(number) {
            return false;
        }
        while let Some(front) = st.queue.front() {
            if front.qos > 0 && st.inflight.len() >= window {
                break;
            }
            let Some(d) = st.queue.pop_front() else {
                break;
            };
            st.queued_bytes = st.queued_bytes.saturating_sub(d.message.cost());
            if d.qos == 0 {
                out.push((0, d));
                continue;
            }
            let pkid = st.next_packet_id();
            st.inflight.push_back((pkid, d.clone()));
            out.push((pkid, d));
        }
        true
    }

    /// A PUBACK: frees the window slot of `pkid`. False if no such message was in flight.
    pub fn acknowledge(&self, pkid: u16) -> bool {
        let mut st = self.lock();
        match st.inflight.iter().position(|(p, _)| *p == pkid) {
            Some(i) => {
                if let Some((_, d)) = st.inflight.remove(i) {
                    if let Some(guard) = &d.ack {
                        guard.mark_acknowledged();
                    }
                }
                true
            }
            None => false,
        }
    }
}

impl SessionState {
    fn next_packet_id(&mut self) -> u16 {
        // Skip ids still in flight (only possible after 65,535 sends with one stuck message).
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid == 0 {
                continue;
            }
            if !self.inflight.iter().any(|(p, _)| *p == self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    fn push(&mut self, d: Delivery, limits: &Limits) {
        self.queued_bytes += d.message.cost();
        self.queue.push_back(d);
        while self.queued_bytes > limits.max_queued_bytes && self.queue.len() > 1 {
            if let Some(old) = self.queue.pop_front() {
                self.queued_bytes = self.queued_bytes.saturating_sub(old.message.cost());
                self.dropped += 1;
            }
        }
    }
}

/// What [`Router::connect`] decided.
pub struct Attached {
    /// The session, new or resumed.
    pub session: Arc<Session>,
    /// True if a stored session was resumed (CONNACK session present).
    pub resumed: bool,
}

#[derive(Default)]
struct Tables {
    sessions: HashMap<Arc<str>, Arc<Session>>,
    /// Sessions kept for absent clients.
    kept: usize,
    filters: FilterTrie<Arc<str>, (Arc<Session>, SubOptions)>,
    retained: RetainedTrie<Message>,
    retained_bytes: usize,
}

/// What the broker refused clients since it started (the trust boundary at work).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// CONNECTs refused (client id not a device's, credentials missing or wrong, too many
    /// connections from one address).
    pub connects: u64,
    /// PUBLISHes refused (a topic outside the client's rights) and dropped.
    pub publishes: u64,
    /// Subscription filters refused (outside the client's rights, invalid, over the limit).
    pub subscriptions: u64,
}

#[derive(Debug, Default)]
struct RefusalCounters {
    connects: AtomicU64,
    publishes: AtomicU64,
    subscriptions: AtomicU64,
}

/// Which refusal to count.
#[derive(Clone, Copy, Debug)]
pub enum Refused {
    /// A CONNECT.
    Connect,
    /// A PUBLISH.
    Publish,
    /// A subscription filter.
    Subscription,
}

/// The broker's shared state.
pub struct Router {
    refusals: RefusalCounters,
    tables: Mutex<Tables>,
    limits: Limits,
    next_connection: AtomicU64,
    /// Messages dropped from full session queues, all sessions.
    dropped: AtomicU64,
    /// Retained messages not stored because the broker held its maximum.
    retained_refused: AtomicU64,
    /// Sessions not kept because the broker held its maximum of kept sessions.
    kept_refused: AtomicU64,
    /// The client whose acknowledgements QoS 1 publishers wait for (see the module docs).
    ack_after: Option<Arc<str>>,
    /// Whether other clients may connect: with `ack_after`, only once that client has
    /// subscribed ([`Router::open`]); before, a QoS 1 PUBLISH matching none of its filters
    /// would be acknowledged at once and the message lost.
    open: watch::Sender<bool>,
}

impl Router {
    /// An empty router; `ack_after` names the client whose acknowledgement a QoS 1 PUBLISH
    /// it receives waits for before the publisher gets its PUBACK.
    pub fn new(limits: Limits, ack_after: Option<&str>) -> Self {
        Self {
            refusals: RefusalCounters::default(),
            tables: Mutex::new(Tables::default()),
            limits,
            next_connection: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            retained_refused: AtomicU64::new(0),
            kept_refused: AtomicU64::new(0),
            ack_after: ack_after.map(Arc::from),
            open: watch::channel(ack_after.is_none()).0,
        }
    }

    /// Lets every client connect (see the `open` field).
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Resolves once `client_id` may be attached: at once for the acknowledging client or an
    /// open router, else when [`Router::open`] is called.
    pub async fn admitted(&self, client_id: &str) {
        if self.ack_after.as_deref() == Some(client_id) {
            return;
        }
        let mut rx = self.open.subscribe();
        // The sender lives as long as the router, which outlives its connections.
        let _ = rx.wait_for(|open| *open).await;
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many QoS 1 messages `client_id` may have unacknowledged.
    pub fn window(&self, client_id: &str) -> usize {
        if self.ack_after.as_deref() == Some(client_id) {
            self.limits.ack_after_inflight
        } else {
            self.limits.max_inflight
        }
    }

    /// A number for a new connection.
    pub fn connection_number(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Sessions held (connected or kept for an absent client).
    pub fn session_count(&self) -> usize {
        self.tables().sessions.len()
    }

    /// Messages dropped from full session queues since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Counts a refusal; true when it is worth a log line (the first, then each power of
    /// two), so a hostile client cannot flood the journal.
    pub fn note_refused(&self, what: Refused) -> bool {
        let counter = match what {
            Refused::Connect => &self.refusals.connects,
            Refused::Publish => &self.refusals.publishes,
            Refused::Subscription => &self.refusals.subscriptions,
        };
        (counter.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
    }

    /// The refusals so far.
    pub fn refusals(&self) -> Refusals {
        Refusals {
            connects: self.refusals.connects.load(Ordering::Relaxed),
            publishes: self.refusals.publishes.load(Ordering::Relaxed),
            subscriptions: self.refusals.subscriptions.load(Ordering::Relaxed),
        }
    }

    /// Discards the kept sessions of absent clients that expired by `now`; returns how many.
    pub fn expire_kept_sessions(&self, now: Instant) -> usize {
        let mut t = self.tables();
        let expired: Vec<Arc<Session>> = t
            .sessions
            .values()
            .filter(|s| {
                let st = s.lock();
                st.attached.is_none() && st.expires_at.is_some_and(|at| at <= now)
            })
            .cloned()
            .collect();
        for session in &expired {
            remove_session(&mut t, session);
        }
        expired.len()
    }

    /// The facts of `client_id`'s current connection, if it is connected.
    pub fn connection_facts(&self, client_id: &str) -> Option<ConnectionFacts> {
        let session = self.tables().sessions.get(client_id).cloned()?;
        let st = session.lock();
        st.attached.and(st.facts)
    }

    /// Records the facts of the connection attached to `session` as `number`.
    pub fn set_facts(&self, session: &Session, number: u64, facts: ConnectionFacts) {
        let mut st = session.lock();
        if st.attached == Some(number) {
            st.facts = Some(facts);
        }
    }

    /// Sessions kept for absent clients.
    pub fn kept_sessions(&self) -> usize {
        self.tables().kept
    }

    /// Retained messages refused since start because the broker held its maximum.
    pub fn retained_refused(&self) -> u64 {
        self.retained_refused.load(Ordering::Relaxed)
    }

    /// Attaches connection `number` to `client_id`'s session, taking it over from another
    /// connection if one holds it. `clean` discards a stored session; `keep` keeps this one
    /// for that long after the connection ends (at most `kept_session_expiry`). A session
    /// made by another `owner` is never resumed.
    pub fn connect(
        &self,
        client_id: &str,
        owner: Owner,
        number: u64,
        clean: bool,
        keep: Option<Duration>,
    ) -> Attached {
        let keep = keep.map(|d| d.min(self.limits.kept_session_expiry));
        let mut t = self.tables();
        if let Some(existing) = t.sessions.get(client_id).cloned() {
            let clean = clean || existing.owner != owner;
            let previous = {
                let mut st = existing.lock();
                st.attached.replace(number)
            };
            if previous.is_some() {
                // The connection holding it sees it is no longer attached and closes.
                existing.wake.notify_one();
            }
            if !clean {
                let mut st = existing.lock();
                st.keep = keep;
                st.expires_at = None;
                if std::mem::take(&mut st.counted_kept) {
                    t.kept -= 1;
                }
                // Unacknowledged messages go first, marked as redeliveries.
                let inflight: Vec<(u16, Delivery)> = st.inflight.drain(..).collect();
                for (_, mut d) in inflight.into_iter().rev() {
                    d.dup = true;
                    st.queued_bytes += d.message.cost();
                    st.queue.push_front(d);
                }
                drop(st);
                existing.wake.notify_one();
                return Attached {
                    session: existing,
                    resumed: true,
                };
            }
            remove_session(&mut t, &existing);
        }
        let session = Arc::new(Session {
            client_id: Arc::from(client_id),
            owner,
            state: Mutex::new(SessionState {
                attached: Some(number),
                keep,
                ..SessionState::default()
            }),
            wake: Notify::new(),
        });
        t.sessions
            .insert(session.client_id.clone(), session.clone());
        Attached {
            session,
            resumed: false,
        }
    }

    /// Connection `number` ended: the session is dropped unless the client asked to keep it
    /// (or another connection took it over). A will is published when `will` is given.
    pub fn disconnect(&self, session: &Arc<Session>, number: u64, will: Option<Will>) {
        let still_ours = {
            let mut st = session.lock();
            if st.attached == Some(number) {
                st.attached = None;
                Some(st.keep)
            } else {
                None
            }
        };
        if let Some(keep) = still_ours {
            let mut t = self.tables();
            let mut st = session.lock();
            // Only if nobody attached in between.
            if st.attached.is_none() {
                match keep {
                    Some(d) if st.counted_kept || t.kept < self.limits.max_kept_sessions => {
                        st.expires_at = Some(Instant::now() + d);
                        if !std::mem::replace(&mut st.counted_kept, true) {
                            t.kept += 1;
                        }
                    }
                    _ => {
                        if keep.is_some() {
                            let total = self.kept_refused.fetch_add(1, Ordering::Relaxed) + 1;
                            if total.is_power_of_two() {
                                tracing::warn!(
                                    client = %super::rules::truncated(&session.client_id),
                                    kept = t.kept,
                                    refused_total = total,
                                    "embedded broker: kept-session limit reached, session not kept (counted; logged at powers of two)"
                                );
                            }
                        }
                        drop(st);
                        remove_session(&mut t, session);
                    }
                }
            }
        }
        if let Some(w) = will {
            self.publish(
                &session.client_id,
                Message {
                    topic: Arc::from(w.topic.as_str()),
                    payload: w.payload,
                    qos: w.qos.min(1),
                    retain: w.retain,
                },
            );
        }
    }

    /// Routes `message` from client `from` to every matching subscriber; returns how many
    /// sessions it was queued for.
    pub fn publish(&self, from: &str, message: Message) -> usize {
        self.route(from, None, message).0
    }

    /// Routes a QoS 1 `message` published by `publisher`'s client; returns what its PUBACK
    /// must wait for, if the acknowledging client gets a QoS 1 copy (else: PUBACK at once).
    pub fn publish_acked(
        &self,
        publisher: &Arc<Session>,
        message: Message,
    ) -> Option<Arc<AckWait>> {
        self.route(&publisher.client_id, Some(publisher), message).1
    }

    fn route(
        &self,
        from: &str,
        publisher: Option<&Arc<Session>>,
        message: Message,
    ) -> (usize, Option<Arc<AckWait>>) {
        let mut targets: Vec<(Arc<Session>, SubOptions)> = Vec::new();
        {
            let mut t = self.tables();
            if message.retain {
                self.retain(&mut t, &message);
            }
            t.filters
                .for_each_match(&message.topic, |_, (session, opts)| {
                    if opts.no_local && &*session.client_id == from {
                        return;
                    }
                    // Overlapping filters of one client: one copy, at the highest granted QoS.
                    match targets.iter_mut().find(|(s, _)| Arc::ptr_eq(s, session)) {
                        Some((_, o)) => {
                            o.qos = o.qos.max(opts.qos);
                            o.retain_as_published |= opts.retain_as_published;
                        }
                        None => targets.push((session.clone(), *opts)),
                    }
                });
        }
        let count = targets.len();
        let mut wait = None;
        for (session, opts) in targets {
            let qos = message.qos.min(opts.qos).min(1);
            let ack = match (publisher, &self.ack_after) {
                (Some(p), Some(acker))
                    if qos == 1 && session.client_id == *acker && !Arc::ptr_eq(p, &session) =>
                {
                    let w = Arc::new(AckWait::default());
                    wait = Some(w.clone());
                    Some(Arc::new(AckGuard::new(w, p.clone())))
                }
                _ => None,
            };
            let delivery = Delivery {
                retain: message.retain && opts.retain_as_published,
                message: message.clone(),
                qos,
                dup: false,
                ack,
            };
            let mut st = session.lock();
            if qos == 0 && st.attached.is_none() {
                continue;
            }
            let before = st.dropped;
            st.push(delivery, &self.limits);
            let dropped = st.dropped - before;
            drop(st);
            if dropped > 0 {
                self.note_dropped(&session, dropped);
            }
            session.wake.notify_one();
        }
        (count, wait)
    }

    /// Stores (or with an empty payload clears) the retained message of its topic, within
    /// the broker's count and byte limits: past them a new one is refused and counted.
    fn retain(&self, t: &mut Tables, message: &Message) {
        if message.payload.is_empty() {
            if let Some(old) = t.retained.clear(&message.topic) {
                t.retained_bytes = t.retained_bytes.saturating_sub(old.cost());
            }
            return;
        }
        let replaced = t.retained.get(&message.topic).map_or(0, Message::cost);
        let count_after = t.retained.len() + usize::from(replaced == 0);
        let bytes_after = t.retained_bytes - replaced + message.cost();
        if count_after > self.limits.max_retained || bytes_after > self.limits.max_retained_bytes {
            let total = self.retained_refused.fetch_add(1, Ordering::Relaxed) + 1;
            if total.is_power_of_two() {
                tracing::warn!(
                    refused_total = total,
                    held = t.retained.len(),
                    held_bytes = t.retained_bytes,
                    "embedded broker: retained message limit reached, message delivered but not retained"
                );
            }
            return;
        }
        t.retained.set(&message.topic, message.clone());
        t.retained_bytes = bytes_after;
    }

    fn note_dropped(&self, session: &Session, n: u64) {
        let total = self.dropped.fetch_add(n, Ordering::Relaxed) + n;
        // One line per power of two keeps a persistent overflow visible without flooding.
        if total.is_power_of_two() {
            tracing::warn!(
                client = %session.client_id,
                dropped_total = total,
                "embedded broker: a subscriber's queue is full, oldest messages dropped"
            );
        }
    }

    /// Adds `session`'s subscriptions; returns the granted QoS per filter (`None` = invalid
    /// filter) and queues the retained messages they match.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        requests: &[SubscriptionRequest],
    ) -> Vec<Option<u8>> {
        let mut granted = Vec::with_capacity(requests.len());
        let mut retained = Vec::new();
        {
            let mut t = self.tables();
            for r in requests {
                if !crate::mqtt::wire::valid_filter(&r.filter) || r.filter.starts_with("$share/") {
                    granted.push(None);
                    continue;
                }
                let (held, is_new) = {
                    let st = session.lock();
                    (
                        st.subscriptions.len(),
                        !st.subscriptions.contains_key(&r.filter),
                    )
                };
                if held >= self.limits.max_subscriptions && is_new {
                    tracing::debug!(
                        client = %session.client_id,
                        held,
                        "embedded broker: subscription limit reached, filter refused"
                    );
                    granted.push(None);
                    continue;
                }
                let opts = SubOptions {
                    qos: r.qos.min(1),
                    no_local: r.no_local,
                    retain_as_published: r.retain_as_published,
                };
                let is_new = t.filters.insert(
                    &r.filter,
                    session.client_id.clone(),
                    (session.clone(), opts),
                );
                session.lock().subscriptions.insert(r.filter.clone(), opts);
                granted.push(Some(opts.qos));
                let send_retained = match r.retain_handling {
                    0 => true,
                    1 => is_new,
                    _ => false,
                };
                if send_retained {
                    for m in t.retained.matching(&r.filter) {
                        retained.push((m, opts.qos));
                    }
                }
            }
        }
        if !retained.is_empty() {
            let mut st = session.lock();
            for (message, qos) in retained {
                let qos = message.qos.min(qos);
                st.push(
                    Delivery {
                        message,
                        qos,
                        retain: true,
                        dup: false,
                        ack: None,
                    },
                    &self.limits,
                );
            }
            drop(st);
            session.wake.notify_one();
        }
        granted
    }

    /// Removes `session`'s subscriptions to `filters`.
    pub fn unsubscribe(&self, session: &Arc<Session>, filters: &[String]) {
        let mut t = self.tables();
        let mut st = session.lock();
        for f in filters {
            if st.subscriptions.remove(f).is_some() {
                t.filters.remove(f, &session.client_id);
            }
        }
    }

    /// Retained messages held.
    pub fn retained_count(&self) -> usize {
        self.tables().retained.len()
    }
}

fn remove_session(t: &mut Tables, session: &Arc<Session>) {
    let filters: Vec<String> = {
        let mut st = session.lock();
        if std::mem::take(&mut st.counted_kept) {
            t.kept -= 1;
        }
        st.subscriptions.drain().map(|(f, _)| f).collect()
    };
    for f in filters {
        t.filters.remove(&f, &session.client_id);
    }
    if t.sessions
        .get(&session.client_id)
        .is_some_and(|s| Arc::ptr_eq(s, session))
    {
        t.sessions.remove(&session.client_id);
    }
}

impl Router {
    /// Closes `client_id`'s connection, if any, and discards its session (kept or not): the
    /// admin API's delete and block. True if there was a session.
    pub fn disconnect_client(&self, client_id: &str) -> bool {
        let mut t = self.tables();
        let Some(session) = t.sessions.get(client_id).cloned() else {
            return false;
        };
        // The connection holding it sees it is no longer attached and closes.
        session.lock().attached = None;
        session.wake.notify_one();
        remove_session(&mut t, &session);
        true
    }
}
