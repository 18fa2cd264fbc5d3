//! End-to-end acknowledgement in the embedded broker (see the router's module docs): a
//! device's QoS 1 PUBLISH routed to the acknowledging client (the gateway's own session) is
//! acknowledged to the device only once no copy of it waits for that client any more.
//!
//! Each copy queued or in flight for the acknowledging client holds an [`AckGuard`]; dropping
//! the last one completes the publisher's [`AckWait`] and wakes its connection, which sends
//! the PUBACKs in arrival order. A copy dropped without the client's PUBACK (queue overflow,
//! session discarded) marks the wait lost: the publisher's connection is closed so the
//! device sends the message again instead of being told it was delivered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::router::Session;

/// The publisher's side of an end-to-end acknowledgement: done once no copy of the message
/// waits for the acknowledging client any more.
#[derive(Debug, Default)]
pub struct AckWait {
    done: AtomicBool,
    /// No copy reached the acknowledging client's PUBACK (dropped from its full queue, or its
    /// session was discarded): the publisher must not be told the message was delivered.
    lost: AtomicBool,
}

impl AckWait {
    /// True once the publisher may be sent its PUBACK (or, if [`AckWait::is_lost`], must be
    /// made to resend instead).
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// True when the message left the acknowledging client's session unacknowledged.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

/// Shared by the copies of one message queued or in flight for the acknowledging client;
/// dropping the last one completes the wait and wakes the publisher's connection.
pub(super) struct AckGuard {
    wait: Arc<AckWait>,
    publisher: Arc<Session>,
    /// The acknowledging client acknowledged a copy.
    acknowledged: AtomicBool,
}

impl AckGuard {
    /// A guard for one message of `publisher`, completing `wait`.
    pub(super) fn new(wait: Arc<AckWait>, publisher: Arc<Session>) -> Self {
        Self {
            wait,
            publisher,
            acknowledged: AtomicBool::new(false),
        }
    }

    /// The acknowledging client acknowledged a copy of the message.
    pub(super) fn mark_acknowledged(&self) {
        self.acknowledged.store(true, Ordering::Release);
    }
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        if !self.acknowledged.load(Ordering::Acquire) {
            self.wait.lost.store(true, Ordering::Release);
        }
        self.wait.done.store(true, Ordering::Release);
        self.publisher.wake_up();
    }
}

impl std::fmt::Debug for AckGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the publisher's session: its state may hold guards too.
        f.debug_struct("AckGuard")
            .field("publisher", &self.publisher.client_id())
            .field("done", &self.wait.is_done())
            .finish()
    }
}
