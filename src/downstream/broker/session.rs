//! One client's session in the embedded broker: its subscriptions' options, the messages in
//! flight to it (at most its window) and queued for it (at most `max_queued_bytes`), and the
//! connection it is attached to. The router (`router.rs`) creates, finds and routes into
//! sessions; the connection task drains them (`take_sendable`) and settles what the client
//! acknowledges.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::ack::AckGuard;
use super::persist::Persistence;
use super::router::Message;
use super::rules::Owner;

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
    /// The identifiers of the client's subscriptions it matched (MQTT 5).
    pub subscription_ids: Vec<u32>,
    /// QoS 2: the client's PUBREC came; it waits for PUBCOMP (and is not sent again).
    pub(super) released: bool,
    /// Held while this copy waits for the acknowledging client (see the module docs); never
    /// read, its drop is what completes the publisher's wait.
    #[allow(dead_code)]
    pub(super) ack: Option<Arc<AckGuard>>,
}

/// Options of one subscription.
#[derive(Clone, Copy, Debug)]
pub struct SubOptions {
    pub(super) qos: u8,
    pub(super) no_local: bool,
    pub(super) retain_as_published: bool,
    /// MQTT 5 subscription identifier.
    pub(super) id: Option<u32>,
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
    pub(super) client_id: Arc<str>,
    /// Who made it: only a connection of the same owner resumes it.
    pub(super) owner: Owner,
    pub(super) state: Mutex<SessionState>,
    /// Wakes the connection task: messages queued, or taken over.
    pub(super) wake: Notify,
    /// Where changes of this session are reported to be persisted (`persist.rs`); `None`
    /// without persistence and for the gateway's own session.
    pub(super) persist: Option<Arc<Persistence>>,
}

/// What the broker knows about a client's current connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionFacts {
    /// Where it comes from.
    pub peer: std::net::SocketAddr,
    /// It arrived on the TLS listener.
    pub tls: bool,
    /// It proved who it is (a password of `[[downstream.users]]`, a device credential).
    pub authenticated: bool,
    /// SHA-256 of the client certificate it presented on the TLS listener, if any (what an
    /// operator compares before approving a device).
    pub client_cert_sha256: Option<[u8; 32]>,
}

#[derive(Debug, Default)]
pub(super) struct SessionState {
    /// Connection currently attached (its number), if any.
    pub(super) attached: Option<u64>,
    /// Facts of the attached connection.
    pub(super) facts: Option<ConnectionFacts>,
    /// How long to keep the session once its connection ends; `None`: discard it then.
    pub(super) keep: Option<Duration>,
    /// When a kept session of an absent client expires.
    pub(super) expires_at: Option<Instant>,
    /// Counted in [`Tables::kept`] (absent client, session kept).
    pub(super) counted_kept: bool,
    pub(super) subscriptions: HashMap<String, SubOptions>,
    pub(super) inflight: VecDeque<(u16, Delivery)>,
    pub(super) queue: VecDeque<Delivery>,
    pub(super) queued_bytes: usize,
    pub(super) next_pkid: u16,
    pub(super) dropped: u64,
    /// The timer of a delayed will (MQTT 5 will delay), at most one per session: replaced by
    /// the next one, cancelled when a connection resumes the session.
    pub(super) pending_will: Option<PendingWill>,
    /// Changed since the persistence writer last saved it (reported to it once per save).
    pub(super) unsaved: bool,
    /// The store holds a record of it (so a session no longer kept must be reported too).
    pub(super) saved: bool,
    /// QoS 2 PUBLISHes from the client answered with PUBREC and not yet released (PUBREL):
    /// a repeat of one of them is the same message, not a new one. At most 65,535 (packet
    /// ids).
    pub(super) incoming_qos2: HashSet<u16>,
}

/// A delayed will's timer task; dropping it cancels the will.
#[derive(Debug)]
pub struct PendingWill(pub tokio::task::AbortHandle);

impl Drop for PendingWill {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Session {
    /// Keeps the timer of this session's delayed will, cancelling an earlier one.
    pub(super) fn set_pending_will(&self, will: PendingWill) {
        self.lock().pending_will = Some(will);
    }

    /// Reports a change of a kept session to the persistence writer, once until it is saved:
    /// one flag check on the hot path, one lock of the writer's set per save round.
    pub(super) fn changed(&self, st: &mut SessionState) {
        if (st.keep.is_some() || st.saved) && !st.unsaved {
            if let Some(p) = &self.persist {
                st.unsaved = true;
                p.session_changed(&self.client_id);
            }
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, SessionState> {
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
        let now = Instant::now();
        let before = out.len();
        while let Some(front) = st.queue.front() {
            if front.qos > 0 && st.inflight.len() >= window && !front.message.expired(now) {
                break;
            }
            let Some(d) = st.queue.pop_front() else {
                break;
            };
            st.queued_bytes = st.queued_bytes.saturating_sub(d.message.cost());
            if d.message.expired(now) {
                // MQTT-3.3.2-5: not forwarded once expired. The publisher asked for that, so
                // a publisher waiting on this copy is told it is done, not to resend.
                if let Some(guard) = &d.ack {
                    guard.mark_acknowledged();
                }
                continue;
            }
            if d.qos == 0 {
                out.push((0, d));
                continue;
            }
            let pkid = st.next_packet_id();
            st.inflight.push_back((pkid, d.clone()));
            out.push((pkid, d));
        }
        if out.len() > before {
            self.changed(&mut st);
        }
        true
    }

    /// A QoS 2 PUBLISH `pkid` from the client: true if it is new (to be routed), false if it
    /// repeats one received before its PUBREL.
    pub fn awaiting_release(&self, pkid: u16) -> bool {
        let mut st = self.lock();
        let new = st.incoming_qos2.insert(pkid);
        if new {
            self.changed(&mut st);
        }
        new
    }

    /// The client's PUBREL for its QoS 2 PUBLISH `pkid`.
    pub fn released_by_client(&self, pkid: u16) {
        let mut st = self.lock();
        if st.incoming_qos2.remove(&pkid) {
            self.changed(&mut st);
        }
    }

    /// A PUBREC for QoS 2 message `pkid`: it now waits for PUBCOMP. True when the PUBREL
    /// should be sent (the message was in flight).
    pub fn received(&self, pkid: u16) -> bool {
        let mut st = self.lock();
        match st.inflight.iter_mut().find(|(p, _)| *p == pkid) {
            Some((_, d)) if d.qos == 2 => {
                d.released = true;
                self.changed(&mut st);
                true
            }
            _ => false,
        }
    }

    /// For connection `number`: the QoS 2 messages whose PUBREC came on an earlier
    /// connection; their PUBREL is sent again (MQTT-4.4.0-1), not the message.
    pub fn releases_to_resend(&self, number: u64) -> Vec<u16> {
        let st = self.lock();
        if st.attached != Some(number) {
            return Vec::new();
        }
        st.inflight
            .iter()
            .filter(|(_, d)| d.released)
            .map(|(p, _)| *p)
            .collect()
    }

    /// A PUBACK or PUBCOMP (or a delivery the client could not take, see the connection):
    /// frees the window slot of `pkid`. False if no such message was in flight.
    pub fn acknowledge(&self, pkid: u16) -> bool {
        let mut st = self.lock();
        match st.inflight.iter().position(|(p, _)| *p == pkid) {
            Some(i) => {
                if let Some((_, d)) = st.inflight.remove(i) {
                    if let Some(guard) = &d.ack {
                        guard.mark_acknowledged();
                    }
                }
                self.changed(&mut st);
                true
            }
            None => false,
        }
    }

    /// For connection `number`: puts in-flight message `pkid` back at the front of the queue,
    /// marked DUP, to be delivered again. False if it is not in flight on that connection.
    pub fn requeue(&self, number: u64, pkid: u16) -> bool {
        let mut st = self.lock();
        if st.attached != Some(number) {
            return false;
        }
        let Some(i) = st.inflight.iter().position(|(p, _)| *p == pkid) else {
            return false;
        };
        let Some((_, mut d)) = st.inflight.remove(i) else {
            return false;
        };
        d.dup = true;
        st.queued_bytes += d.message.cost();
        st.queue.push_front(d);
        self.changed(&mut st);
        true
    }
}

impl SessionState {
    pub(super) fn next_packet_id(&mut self) -> u16 {
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

    pub(super) fn push(&mut self, d: Delivery, limits: &Limits) {
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
