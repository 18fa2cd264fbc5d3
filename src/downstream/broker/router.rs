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
//! client, unacknowledged ones are sent again with DUP set. Sessions live in memory; with a
//! store, kept sessions and retained messages are also saved and restored across a restart
//! (`persist.rs`; the gateway's own session is not: it re-subscribes, and devices re-send
//! what it had not acknowledged, as MQTT clients do).
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use super::ack::AckGuard;
pub use super::ack::AckWait;
use super::persist::Persistence;
use super::rules::Owner;
use super::session::SessionState;
pub use super::session::{ConnectionFacts, Delivery, Limits, Session, SubOptions};
use super::trie::{FilterTrie, RetainedTrie};
use crate::mqtt::props::{self, MessageProperties};
use crate::mqtt::wire::{SubRefusal, SubscriptionRequest, Will};

/// A message on its way to subscribers.
#[derive(Clone, Debug)]
pub struct Message {
    /// Topic name.
    pub topic: Arc<str>,
    /// Payload.
    pub payload: Bytes,
    /// QoS the publisher used.
    pub qos: u8,
    /// Retain flag as published.
    pub retain: bool,
    /// MQTT 5 properties the publisher sent, forwarded unchanged.
    pub properties: Option<Arc<MessageProperties>>,
    /// When the message expires (MQTT 5 message expiry interval), if it does.
    pub expires_at: Option<Instant>,
    /// When the broker read it from its publisher (`None` for wills and messages restored
    /// after a restart): the start of the gateway's forward delay.
    pub published_at: Option<Instant>,
}

impl Message {
    /// A message without MQTT 5 properties or expiry.
    pub fn plain(topic: Arc<str>, payload: Bytes, qos: u8, retain: bool) -> Self {
        Self {
            topic,
            payload,
            qos,
            retain,
            properties: None,
            expires_at: None,
            published_at: None,
        }
    }

    pub(super) fn cost(&self) -> usize {
        self.topic.len()
            + self.payload.len()
            + 64
            + self.properties.as_ref().map_or(0, |p| p.cost())
    }

    pub(super) fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// What [`Router::connect`] decided.
pub struct Attached {
    /// The session, new or resumed.
    pub session: Arc<Session>,
    /// True if a stored session was resumed (CONNACK session present).
    pub resumed: bool,
}

/// A subscription in the filter trie: the session, its options and, for a shared
/// subscription, its share name.
type Subscriber = (Arc<Session>, SubOptions, Option<Arc<str>>);

#[derive(Default)]
pub(super) struct Tables {
    pub(super) sessions: HashMap<Arc<str>, Arc<Session>>,
    /// Sessions kept for absent clients.
    pub(super) kept: usize,
    /// Subscriptions by filter; a shared one is keyed `{client}\0{group}` under its inner
    /// filter and carries its share name (`{group}/{filter}`).
    pub(super) filters: FilterTrie<Arc<str>, Subscriber>,
    pub(super) retained: RetainedTrie<Message>,
    pub(super) retained_bytes: usize,
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
    pub(super) limits: Limits,
    /// Where retained messages and kept sessions are persisted (`persist.rs`), if anywhere.
    pub(super) persist: Option<Arc<Persistence>>,
    next_connection: AtomicU64,
    /// Messages dropped from full session queues, all sessions.
    dropped: AtomicU64,
    /// Retained messages not stored because the broker held its maximum.
    retained_refused: AtomicU64,
    /// Sessions not kept because the broker held its maximum of kept sessions.
    kept_refused: AtomicU64,
    /// Turns of shared subscriptions: each message goes to the next member.
    share_turn: AtomicU64,
    /// The client whose acknowledgements QoS 1 publishers wait for (see the module docs).
    ack_after: Option<Arc<str>>,
    /// The client id of the in-process session (`local.rs`), which no connection may use.
    reserved: Option<Arc<str>>,
    /// Whether other clients may connect: with `ack_after`, only once that client has
    /// subscribed ([`Router::open`]); before, a QoS 1 PUBLISH matching none of its filters
    /// would be acknowledged at once and the message lost.
    open: watch::Sender<bool>,
}

impl Router {
    /// An empty router; `ack_after` names the client whose acknowledgement a QoS 1 PUBLISH
    /// it receives waits for before the publisher gets its PUBACK, `reserved` the client id of
    /// the in-process session, which no connection may use.
    pub fn new(limits: Limits, ack_after: Option<&str>, reserved: Option<&str>) -> Self {
        Self {
            refusals: RefusalCounters::default(),
            tables: Mutex::new(Tables::default()),
            limits,
            persist: None,
            next_connection: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
            retained_refused: AtomicU64::new(0),
            kept_refused: AtomicU64::new(0),
            share_turn: AtomicU64::new(0),
            ack_after: ack_after.map(Arc::from),
            reserved: reserved.map(Arc::from),
            open: watch::channel(ack_after.is_none()).0,
        }
    }

    /// Whether `client_id` belongs to the in-process session (no connection may use it).
    pub fn is_reserved(&self, client_id: &str) -> bool {
        self.reserved.as_deref() == Some(client_id)
    }

    /// The in-process session's client id, if the broker has one.
    pub fn reserved(&self) -> Option<&str> {
        self.reserved.as_deref()
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

    /// Persists retained messages and kept sessions through `persist` (see `persist.rs`).
    pub(super) fn persisting(mut self, persist: Arc<Persistence>) -> Self {
        self.persist = Some(persist);
        self
    }

    pub(super) fn tables(&self) -> MutexGuard<'_, Tables> {
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
            // A kept session whose expiry passed is gone even if the sweep has not removed
            // it yet (MQTT-3.1.2-23: CONNACK must not say session present).
            let expired = {
                let st = existing.lock();
                st.attached.is_none() && st.expires_at.is_some_and(|at| at <= Instant::now())
            };
            let clean = clean || expired || existing.owner != owner;
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
                // Back in time: its delayed will is not sent (MQTT-3.1.3-9).
                st.pending_will = None;
                if std::mem::take(&mut st.counted_kept) {
                    t.kept -= 1;
                }
                // Unacknowledged messages go first, marked as redeliveries; QoS 2 messages the
                // client has received stay in flight and only their PUBREL is sent again.
                let inflight: Vec<(u16, Delivery)> = st.inflight.drain(..).collect();
                let (released, resend): (Vec<_>, Vec<_>) =
                    inflight.into_iter().partition(|(_, d)| d.released);
                st.inflight.extend(released);
                for (_, mut d) in resend.into_iter().rev() {
                    d.dup = true;
                    st.queued_bytes += d.message.cost();
                    st.queue.push_front(d);
                }
                existing.changed(&mut st);
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
            persist: self
                .persist
                .clone()
                .filter(|_| !self.is_reserved(client_id)),
        });
        t.sessions
            .insert(session.client_id.clone(), session.clone());
        session.changed(&mut session.lock());
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
                        session.changed(&mut st);
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
            self.publish_will(&session.client_id, w);
        }
    }

    /// Publishes a client's will.
    pub fn publish_will(&self, client_id: &str, w: Will) {
        self.publish(
            client_id,
            Message {
                topic: Arc::from(w.topic.as_str()),
                payload: w.payload,
                qos: w.qos,
                retain: w.retain,
                properties: w.properties.map(Arc::new),
                expires_at: props::expiry_deadline(w.expiry_secs),
                published_at: None,
            },
        );
    }

    /// Whether `session` is attached to a connection now (a delayed will is dropped when
    /// its client came back to the session in time).
    pub fn is_attached(&self, session: &Session) -> bool {
        session.lock().attached.is_some()
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
        let mut targets: Vec<(Arc<Session>, SubOptions, Vec<u32>)> = Vec::new();
        let mut shared: Vec<(Arc<str>, Arc<Session>, SubOptions)> = Vec::new();
        {
            let mut t = self.tables();
            if message.retain {
                let _ = self.retain(&mut t, &message);
            }
            t.filters
                .for_each_match(&message.topic, |_, (session, opts, share)| {
                    if let Some(share) = share {
                        shared.push((share.clone(), session.clone(), *opts));
                        return;
                    }
                    if opts.no_local && &*session.client_id == from {
                        return;
                    }
                    // Overlapping filters of one client: one copy, at the highest granted QoS,
                    // with every matching subscription identifier (MQTT-3.3.4-3, -5).
                    match targets.iter_mut().find(|(s, _, _)| Arc::ptr_eq(s, session)) {
                        Some((_, o, ids)) => {
                            o.qos = o.qos.max(opts.qos);
                            o.retain_as_published |= opts.retain_as_published;
                            ids.extend(opts.id);
                        }
                        None => {
                            targets.push((session.clone(), *opts, opts.id.into_iter().collect()))
                        }
                    }
                });
        }
        self.pick_shared(shared, &mut targets);
        let count = targets.len();
        let mut wait = None;
        for (session, opts, subscription_ids) in targets {
            let qos = message.qos.min(opts.qos);
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
                subscription_ids,
                released: false,
                ack,
            };
            let mut st = session.lock();
            if qos == 0 && st.attached.is_none() {
                continue;
            }
            let before = st.dropped;
            st.push(delivery, &self.limits);
            session.changed(&mut st);
            let dropped = st.dropped - before;
            drop(st);
            if dropped > 0 {
                self.note_dropped(&session, dropped);
            }
            session.wake.notify_one();
        }
        (count, wait)
    }

    /// One member of each shared subscription the message matched gets it (MQTT 5 §4.8.2):
    /// the members take turns, and connected members go before absent ones.
    fn pick_shared(
        &self,
        mut shared: Vec<(Arc<str>, Arc<Session>, SubOptions)>,
        targets: &mut Vec<(Arc<Session>, SubOptions, Vec<u32>)>,
    ) {
        if shared.is_empty() {
            return;
        }
        shared.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| a.1.client_id.cmp(&b.1.client_id))
        });
        let mut start = 0;
        while start < shared.len() {
            let name = shared[start].0.clone();
            let end = start + shared[start..].iter().take_while(|m| m.0 == name).count();
            let members = &shared[start..end];
            let connected: Vec<&(Arc<str>, Arc<Session>, SubOptions)> = members
                .iter()
                .filter(|m| m.1.lock().attached.is_some())
                .collect();
            let pool: Vec<&(Arc<str>, Arc<Session>, SubOptions)> = if connected.is_empty() {
                members.iter().collect()
            } else {
                connected
            };
            let turn = self.share_turn.fetch_add(1, Ordering::Relaxed) as usize;
            let (_, session, opts) = pool[turn % pool.len()];
            targets.push((session.clone(), *opts, opts.id.into_iter().collect()));
            start = end;
        }
    }

    /// Stores (or with an empty payload clears) the retained message of its topic, within
    /// the broker's count and byte limits: past them a new one is refused and counted.
    pub(super) fn retain(&self, t: &mut Tables, message: &Message) -> bool {
        if message.payload.is_empty() {
            if let Some(old) = t.retained.clear(&message.topic) {
                t.retained_bytes = t.retained_bytes.saturating_sub(old.cost());
                if let Some(p) = &self.persist {
                    p.retained_changed(&message.topic);
                }
            }
            return true;
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
            return false;
        }
        t.retained.set(&message.topic, message.clone());
        t.retained_bytes = bytes_after;
        if let Some(p) = &self.persist {
            p.retained_changed(&message.topic);
        }
        true
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

    /// Adds `session`'s subscriptions; returns the granted QoS per filter (or why not)
    /// filter) and queues the retained messages they match.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        requests: &[SubscriptionRequest],
    ) -> Vec<Result<u8, SubRefusal>> {
        let mut granted = Vec::with_capacity(requests.len());
        let mut retained = Vec::new();
        {
            let mut t = self.tables();
            for r in requests {
                let share = match crate::mqtt::wire::shared_subscription(&r.filter) {
                    None if crate::mqtt::wire::valid_filter(&r.filter) => None,
                    // No Local on a shared subscription is a protocol error (MQTT-3.8.3-4).
                    Some(Ok(_)) if !r.no_local => {
                        Some(Arc::<str>::from(&r.filter["$share/".len()..]))
                    }
                    _ => {
                        granted.push(Err(SubRefusal::InvalidFilter));
                        continue;
                    }
                };
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
                    granted.push(Err(SubRefusal::QuotaExceeded));
                    continue;
                }
                let opts = SubOptions {
                    qos: r.qos.min(2),
                    no_local: r.no_local,
                    retain_as_published: r.retain_as_published,
                    id: r.id,
                };
                let (trie_filter, key) = trie_slot(&r.filter, &session.client_id);
                let is_shared = share.is_some();
                let is_new = t
                    .filters
                    .insert(trie_filter, key, (session.clone(), opts, share));
                {
                    let mut st = session.lock();
                    st.subscriptions.insert(r.filter.clone(), opts);
                    session.changed(&mut st);
                }
                granted.push(Ok(opts.qos));
                // Shared subscriptions get no retained messages (mosquitto does the same).
                let send_retained = !is_shared
                    && match r.retain_handling {
                        0 => true,
                        1 => is_new,
                        _ => false,
                    };
                if send_retained {
                    let now = Instant::now();
                    for m in t.retained.matching(&r.filter) {
                        if !m.expired(now) {
                            retained.push((m, opts));
                        }
                    }
                }
            }
        }
        if !retained.is_empty() {
            let mut st = session.lock();
            for (message, opts) in retained {
                let qos = message.qos.min(opts.qos);
                st.push(
                    Delivery {
                        message,
                        qos,
                        retain: true,
                        dup: false,
                        subscription_ids: opts.id.into_iter().collect(),
                        released: false,
                        ack: None,
                    },
                    &self.limits,
                );
            }
            session.changed(&mut st);
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
                let (trie_filter, key) = trie_slot(f, &session.client_id);
                t.filters.remove(trie_filter, &key);
            }
        }
        session.changed(&mut st);
    }

    /// Retained messages held.
    pub fn retained_count(&self) -> usize {
        self.tables().retained.len()
    }
}

/// Where a subscription lives in the filter trie: under its filter and its client's id, or a
/// shared one under its inner filter and `{client}\0{group}`, apart from the client's own.
pub(super) fn trie_slot<'f>(filter: &'f str, client_id: &Arc<str>) -> (&'f str, Arc<str>) {
    match crate::mqtt::wire::shared_subscription(filter) {
        Some(Ok((group, inner))) => (inner, Arc::from(format!("{client_id}\0{group}"))),
        _ => (filter, client_id.clone()),
    }
}

pub(super) fn remove_session(t: &mut Tables, session: &Arc<Session>) {
    if let Some(p) = &session.persist {
        // Only a session the store may hold: a clean session leaving costs no write.
        let st = session.lock();
        if st.saved || st.keep.is_some() {
            p.session_changed(&session.client_id);
        }
    }
    let filters: Vec<String> = {
        let mut st = session.lock();
        if std::mem::take(&mut st.counted_kept) {
            t.kept -= 1;
        }
        st.subscriptions.drain().map(|(f, _)| f).collect()
    };
    for f in filters {
        let (trie_filter, key) = trie_slot(&f, &session.client_id);
        t.filters.remove(trie_filter, &key);
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
