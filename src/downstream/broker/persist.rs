//! Retained messages and kept sessions across a daemon restart, through the store
//! (`store/broker_state.rs`).
//!
//! What is kept: every retained message, and every session a client asked to keep (3.1.1
//! clean session 0, MQTT 5 session expiry > 0) with its subscriptions, its queued messages
//! and its messages in flight (QoS 1 unacknowledged, QoS 2 before or after PUBREC), all
//! within the broker's limits. The gateway's own session is not kept: its client acknowledges
//! a device's message only once it is in the outbox, so what it had not taken the devices
//! send again.
//!
//! When: routing never writes. A change marks the retained topic or the session as unsaved
//! (one flag and, once per save, one short lock of the writer's set); a write-behind task
//! wakes on the first mark, waits [`BATCH_INTERVAL`] to gather more, saves the current state
//! of everything marked (off the runtime's workers) and asks for one group commit. A session
//! is saved when its client leaves, when it changes while kept, and at shutdown; a retained
//! message when it is set or cleared. A SIGKILL therefore loses at most what changed in the
//! last batch interval plus one flush: the last retained change, the last messages queued
//! for an absent client, acknowledgements made just before (those messages come again, with
//! DUP set).
//!
//! On start ([`Router::restore`]) the records come back bounded by the limits in force
//! now: expired sessions and messages are dropped, at most `max_kept_sessions` sessions
//! (those expiring last), `max_retained` / `max_retained_bytes` retained messages,
//! `max_subscriptions` per session, `max_queued_bytes` per queue, and every subscription is
//! checked again against the client's rights (a user removed from the config loses its
//! session). What is not restored is deleted from the store, so a hostile client cannot grow
//! the persisted state past what the broker would hold in memory.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use super::router::{remove_session, trie_slot, Message, Router};
use super::rules::{AccessRules, LocalUser, Owner, Principal};
use super::session::{Delivery, Session, SessionState, SubOptions};
use crate::device_id::DeviceId;
use crate::mqtt::props::MessageProperties;
use crate::store::broker_state::{
    KeptSessionRecord, RetainedRecord, StoredDelivery, StoredMessage, StoredOwner,
    StoredProperties, StoredSubscription, BROKER_RECORD_VERSION,
};
use crate::store::{Store, StoreError};

/// How long the writer gathers changes after the first one before it saves them.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(250);

/// The link from the broker to the store: what changed since the last save.
pub struct Persistence {
    store: Store,
    dirty: Mutex<Dirty>,
    wake: Notify,
    /// One save at a time: the final save at shutdown may start while the write-behind's last
    /// one is still writing, and an older snapshot must never land after a newer one.
    saving: Mutex<()>,
}

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Persistence")
    }
}

/// What one save wrote: retained topics (set or cleared), kept sessions and their messages.
#[derive(Clone, Copy, Debug, Default)]
struct Saved {
    retained: usize,
    sessions: usize,
    queued: usize,
}

#[derive(Default)]
struct Dirty {
    retained: HashSet<Arc<str>>,
    sessions: HashSet<Arc<str>>,
}

/// What [`Router::restore`] brought back and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Retained messages restored.
    pub retained: usize,
    /// Kept sessions restored.
    pub sessions: usize,
    /// Records not restored (expired, over a limit, no longer allowed, unreadable).
    pub dropped: usize,
}

impl Persistence {
    /// Persistence through `store`.
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(Self {
            store,
            dirty: Mutex::new(Dirty::default()),
            wake: Notify::new(),
            saving: Mutex::new(()),
        })
    }

    fn dirty(&self) -> std::sync::MutexGuard<'_, Dirty> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets what is marked (what [`Router::restore`] just read is saved already).
    pub(super) fn forget_marks(&self) {
        *self.dirty() = Dirty::default();
    }

    /// The retained message of `topic` was set or cleared.
    pub(super) fn retained_changed(&self, topic: &Arc<str>) {
        if self.dirty().retained.insert(topic.clone()) {
            self.wake.notify_one();
        }
    }

    /// The session of `client_id` changed, was kept, or was discarded.
    pub(super) fn session_changed(&self, client_id: &Arc<str>) {
        if self.dirty().sessions.insert(client_id.clone()) {
            self.wake.notify_one();
        }
    }

    /// Saves what is marked now (blocking: sled and serde); returns what it wrote. Errors are
    /// logged: the broker goes on in memory, and the next change of the same item tries again.
    fn save(&self, router: &Router) -> Saved {
        let _one_at_a_time = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let mut saved = Saved::default();
        let dirty = std::mem::take(&mut *self.dirty());
        let mut failed = 0usize;
        let mut first_error = None;
        let mut note = |r: Result<(), StoreError>| {
            if let Err(e) = r {
                failed += 1;
                first_error.get_or_insert(e);
            }
        };
        saved.retained = dirty.retained.len();
        for topic in &dirty.retained {
            note(match router.retained_message(topic) {
                Some(m) => self.store.put_broker_retained(
                    topic,
                    &RetainedRecord {
                        v: BROKER_RECORD_VERSION,
                        message: stored_message(&m),
                    },
                ),
                None => self.store.remove_broker_retained(topic).map(|_| ()),
            });
        }
        for id in &dirty.sessions {
            note(match router.session_record(id) {
                Some(rec) => {
                    saved.sessions += 1;
                    saved.queued += rec.queue.len() + rec.inflight.len();
                    self.store.put_broker_session(&rec)
                }
                None => self.store.remove_broker_session(id).map(|_| ()),
            });
        }
        if let Some(e) = first_error {
            tracing::warn!(failed, error = %e, "embedded broker: saving retained messages or kept sessions failed");
        }
        saved
    }
}

/// The write-behind task: saves marked changes in batches until the broker stops.
pub(super) async fn write_behind(
    router: Arc<Router>,
    persist: Arc<Persistence>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = persist.wake.notified() => {}
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(BATCH_INTERVAL) => {}
        }
        if save_now(&router, &persist).await.is_err() {
            return;
        }
    }
}

/// Saves everything marked and waits until it is on disk.
async fn save_now(router: &Arc<Router>, persist: &Arc<Persistence>) -> Result<(), ()> {
    let (r, p) = (router.clone(), persist.clone());
    // A long queue of an absent client costs real CPU to encode: keep it off the workers.
    let saved = tokio::task::spawn_blocking(move || p.save(&r))
        .await
        .map_err(|_| ())?;
    match persist.store.durable().await {
        // Tests of the daemon wait for this line before they kill it.
        Ok(()) => tracing::debug!(
            retained = saved.retained,
            sessions = saved.sessions,
            queued = saved.queued,
            "embedded broker: retained messages and kept sessions saved"
        ),
        Err(e) => tracing::warn!(error = %e, "embedded broker: flushing broker state failed"),
    }
    Ok(())
}

/// The broker is stopping: saves every kept session as it is now (the connected ones as if
/// their clients left now) and everything else marked, durably.
pub(super) async fn save_all(router: &Arc<Router>, persist: &Arc<Persistence>) {
    let sessions: Vec<Arc<Session>> = router.tables().sessions.values().cloned().collect();
    for s in sessions {
        let keep = {
            let st = s.lock();
            st.keep.is_some() || st.saved
        };
        if keep && s.persist.is_some() {
            persist.session_changed(&s.client_id);
        }
    }
    let _ = save_now(router, persist).await;
}

/// What a restored session's owner may do now, or `None` when it no longer may connect.
pub(super) fn principal_for(
    rules: Option<&AccessRules>,
    users: &[LocalUser],
    owner: &Owner,
    client_id: &str,
) -> Option<Principal> {
    match (rules, owner) {
        (None, Owner::Anyone) => Some(Principal::Unrestricted),
        (Some(r), Owner::Device) => DeviceId::parse(client_id).ok().map(|_| Principal::Device {
            own: Arc::from(format!("{}/{client_id}/", r.prefix)),
            authenticated: false,
        }),
        (Some(_), Owner::User(name)) => users
            .iter()
            .find(|u| u.rights.name == **name)
            .map(|u| Principal::User(u.rights.clone())),
        _ => None,
    }
}

impl Router {
    fn retained_message(&self, topic: &str) -> Option<Message> {
        self.tables().retained.get(topic).cloned()
    }

    /// The record of `client_id`'s session if it is to be kept; marks it saved.
    fn session_record(&self, client_id: &str) -> Option<KeptSessionRecord> {
        let session = self.tables().sessions.get(client_id).cloned()?;
        let mut st = session.lock();
        st.unsaved = false;
        session.persist.as_ref()?;
        let Some(keep) = st.keep else {
            st.saved = false;
            return None;
        };
        st.saved = true;
        let now = Instant::now();
        let left = match (st.attached, st.expires_at) {
            (None, Some(at)) => at.saturating_duration_since(now),
            _ => keep,
        };
        let rec = KeptSessionRecord {
            v: BROKER_RECORD_VERSION,
            client_id: client_id.to_string(),
            owner: stored_owner(&session.owner),
            expires_at_ms: unix_ms().saturating_add(left.as_millis() as u64),
            keep_secs: keep.as_secs(),
            subscriptions: st
                .subscriptions
                .iter()
                .map(|(filter, o)| StoredSubscription {
                    filter: filter.clone(),
                    qos: o.qos,
                    no_local: o.no_local,
                    retain_as_published: o.retain_as_published,
                    id: o.id,
                })
                .collect(),
            inflight: st
                .inflight
                .iter()
                .map(|(pkid, d)| stored_delivery(*pkid, d))
                .collect(),
            queue: st.queue.iter().map(|d| stored_delivery(0, d)).collect(),
            last_packet_id: st.next_pkid,
            awaiting_release: st.incoming_qos2.iter().copied().collect(),
        };
        Some(rec)
    }

    /// Brings back what `store` holds, within the limits in force (see the module docs);
    /// `principal` says what a session's owner may do now. Call before any client connects.
    pub(super) fn restore(
        &self,
        store: &Store,
        principal: impl Fn(&Owner, &str) -> Option<Principal>,
        filter_within_limits: impl Fn(&str) -> bool,
    ) -> Restored {
        let mut out = Restored::default();
        let now_ms = unix_ms();
        let now = Instant::now();
        let mut gone_retained = Vec::new();
        {
            let mut t = self.tables();
            for rec in store.broker_retained() {
                let rec = match rec {
                    Ok(rec) => rec,
                    Err(e) => {
                        tracing::warn!(error = %e, "embedded broker: a stored retained message is not restored");
                        out.dropped += 1;
                        continue;
                    }
                };
                let message = message_from(rec.message, now_ms, now);
                let kept = !message.expired(now)
                    && !message.payload.is_empty()
                    && self.retain(&mut t, &message);
                if kept {
                    out.retained += 1;
                } else {
                    out.dropped += 1;
                    gone_retained.push(message.topic.clone());
                }
            }
        }
        let mut records = Vec::new();
        let mut gone_sessions = Vec::new();
        for rec in store.broker_sessions() {
            match rec {
                Ok(rec) if rec.expires_at_ms > now_ms => records.push(rec),
                Ok(rec) => gone_sessions.push(rec.client_id),
                Err(e) => {
                    tracing::warn!(error = %e, "embedded broker: a stored session is not restored");
                    out.dropped += 1;
                }
            }
        }
        // Past the limit, the sessions that would expire first go.
        records.sort_by_key(|r| std::cmp::Reverse(r.expires_at_ms));
        for (i, rec) in records.into_iter().enumerate() {
            let owner = owner_from(&rec.owner);
            let allowed = match (i < self.limits.max_kept_sessions, self.reserved()) {
                (false, _) => None,
                (true, Some(r)) if r == rec.client_id => None,
                _ => principal(&owner, &rec.client_id),
            };
            match allowed {
                Some(p) => {
                    self.restore_session(rec, owner, &p, &filter_within_limits, now_ms, now);
                    out.sessions += 1;
                }
                None => gone_sessions.push(rec.client_id),
            }
        }
        out.dropped += gone_sessions.len();
        for topic in &gone_retained {
            let _ = store.remove_broker_retained(topic);
        }
        for id in &gone_sessions {
            let _ = store.remove_broker_session(id);
        }
        out
    }

    fn restore_session(
        &self,
        rec: KeptSessionRecord,
        owner: Owner,
        principal: &Principal,
        filter_within_limits: &impl Fn(&str) -> bool,
        now_ms: u64,
        now: Instant,
    ) {
        let keep = Duration::from_secs(rec.keep_secs).min(self.limits.kept_session_expiry);
        let left = Duration::from_millis(rec.expires_at_ms - now_ms).min(keep);
        let session = Arc::new(Session {
            client_id: Arc::from(rec.client_id.as_str()),
            owner,
            state: Mutex::new(SessionState {
                keep: Some(keep),
                expires_at: Some(now + left),
                counted_kept: true,
                next_pkid: rec.last_packet_id,
                saved: true,
                incoming_qos2: rec.awaiting_release.into_iter().collect(),
                ..SessionState::default()
            }),
            wake: Notify::new(),
            persist: self.persist.clone(),
        });
        let mut t = self.tables();
        if let Some(old) = t.sessions.get(&session.client_id).cloned() {
            remove_session(&mut t, &old);
        }
        let mut st = session.lock();
        for s in rec.subscriptions {
            if st.subscriptions.len() >= self.limits.max_subscriptions {
                break;
            }
            let share = match crate::mqtt::wire::shared_subscription(&s.filter) {
                None if crate::mqtt::wire::valid_filter(&s.filter) => None,
                Some(Ok(_)) if !s.no_local => Some(Arc::<str>::from(&s.filter["$share/".len()..])),
                _ => continue,
            };
            let inner = match crate::mqtt::wire::shared_subscription(&s.filter) {
                Some(Ok((_, inner))) => inner,
                _ => s.filter.as_str(),
            };
            if !filter_within_limits(&s.filter) || !principal.may_subscribe(inner) {
                continue;
            }
            let opts = SubOptions {
                qos: s.qos.min(2),
                no_local: s.no_local,
                retain_as_published: s.retain_as_published,
                id: s.id,
            };
            let (trie_filter, key) = trie_slot(&s.filter, &session.client_id);
            t.filters
                .insert(trie_filter, key, (session.clone(), opts, share));
            st.subscriptions.insert(s.filter, opts);
        }
        let mut ids = HashSet::new();
        for d in rec.inflight {
            if d.packet_id == 0 || !ids.insert(d.packet_id) || d.qos == 0 {
                continue;
            }
            let pkid = d.packet_id;
            let d = delivery_from(d, now_ms, now);
            if d.message.expired(now) && !d.released {
                continue;
            }
            st.inflight.push_back((pkid, d));
        }
        for d in rec.queue {
            let d = delivery_from(d, now_ms, now);
            if !d.message.expired(now) {
                st.push(d, &self.limits);
            }
        }
        drop(st);
        t.kept += 1;
        t.sessions
            .insert(session.client_id.clone(), session.clone());
    }
}

fn unix_ms() -> u64 {
    crate::clock::unix_ms()
}

fn stored_owner(owner: &Owner) -> StoredOwner {
    match owner {
        Owner::Anyone => StoredOwner::Anyone,
        Owner::Gateway => StoredOwner::Gateway,
        Owner::Device => StoredOwner::Device,
        Owner::User(name) => StoredOwner::User(name.to_string()),
    }
}

fn owner_from(owner: &StoredOwner) -> Owner {
    match owner {
        StoredOwner::Anyone => Owner::Anyone,
        StoredOwner::Gateway => Owner::Gateway,
        StoredOwner::Device => Owner::Device,
        StoredOwner::User(name) => Owner::User(Arc::from(name.as_str())),
    }
}

fn stored_message(m: &Message) -> StoredMessage {
    let now = Instant::now();
    StoredMessage {
        topic: m.topic.to_string(),
        payload: m.payload.to_vec(),
        qos: m.qos,
        retain: m.retain,
        expires_at_ms: m.expires_at.map(|at| {
            unix_ms().saturating_add(at.saturating_duration_since(now).as_millis() as u64)
        }),
        properties: m.properties.as_deref().map(|p| StoredProperties {
            payload_format_indicator: p.payload_format_indicator,
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.as_ref().map(|c| c.to_vec()),
            user_properties: p.user_properties.clone(),
        }),
    }
}

fn message_from(m: StoredMessage, now_ms: u64, now: Instant) -> Message {
    Message {
        topic: Arc::from(m.topic.as_str()),
        payload: Bytes::from(m.payload),
        qos: m.qos.min(2),
        retain: m.retain,
        properties: m.properties.map(|p| {
            Arc::new(MessageProperties {
                payload_format_indicator: p.payload_format_indicator,
                content_type: p.content_type,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data.map(Bytes::from),
                user_properties: p.user_properties,
            })
        }),
        // Already past: `now` itself, so the message counts as expired.
        expires_at: m
            .expires_at_ms
            .map(|at| now + Duration::from_millis(at.saturating_sub(now_ms))),
        published_at: None,
    }
}

fn stored_delivery(packet_id: u16, d: &Delivery) -> StoredDelivery {
    StoredDelivery {
        packet_id,
        message: stored_message(&d.message),
        qos: d.qos,
        retain: d.retain,
        dup: d.dup,
        subscription_ids: d.subscription_ids.clone(),
        released: d.released,
    }
}

fn delivery_from(d: StoredDelivery, now_ms: u64, now: Instant) -> Delivery {
    Delivery {
        message: message_from(d.message, now_ms, now),
        qos: d.qos.min(2),
        retain: d.retain,
        dup: d.dup,
        subscription_ids: d.subscription_ids,
        released: d.released,
        ack: None,
    }
}
