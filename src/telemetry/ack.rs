//! The intake's acknowledgements: a device's PUBLISH is acknowledged once the gateway no longer
//! needs the device to keep it, that is once the first of these happens:
//!
//! - the outbox batch holding it is durable (its group commit's flush ended), or
//! - the gateway is finished with it upstream: the cloud acknowledged it, or refused it for
//!   good, or it expired (the remover reports these as they arrive, before it deletes them).
//!
//! The second way is what keeps a slow disk out of the devices' path while the cloud is up. A
//! flush normally ends in a millisecond or two, but now and then an fsync takes tens of
//! milliseconds; every device's window of unacknowledged messages then fills, and when the
//! flush ends they all publish their backlog at once. The cloud usually answers first.
//!
//! After a crash, a message acknowledged because the cloud had it may be missing from the
//! outbox (its insertion had not been flushed yet): it is in the cloud, so nothing is lost, and
//! it is not sent again. A message that is neither durable nor finished upstream is never
//! acknowledged.
//!
//! Acknowledgements may so be given out of arrival order: the downstream session sends the
//! PUBACKs of one connection in arrival order whatever order they come in (`AckHandle`), and one
//! device's messages are finished upstream in their order, since they take one link, in order.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::downstream::AckHandle;
use crate::store::{Store, StoreError, WriteTicket};

/// A message's acknowledgement (the downstream PUBLISH's [`AckHandle`]; the tests record it).
pub(crate) trait Ack: Send + 'static {
    fn ack(self);
}

impl Ack for AckHandle {
    fn ack(self) {
        let _ = AckHandle::ack(self);
    }
}

/// An outbox batch with devices still to acknowledge.
pub(crate) struct Pending<A> {
    ticket: WriteTicket,
    /// By sequence number (increasing); `None` once acknowledged.
    acks: Vec<(u64, Option<A>)>,
    /// How many of `acks` are still to acknowledge.
    left: usize,
}

impl<A: Ack> Pending<A> {
    /// The batch's messages as inserted (sequence numbers increasing) and the ticket of its
    /// insertion.
    pub fn new(ticket: WriteTicket, acks: impl IntoIterator<Item = (u64, A)>) -> Self {
        let acks: Vec<_> = acks.into_iter().map(|(seq, a)| (seq, Some(a))).collect();
        debug_assert!(acks.windows(2).all(|w| w[0].0 < w[1].0));
        Self {
            ticket,
            left: acks.len(),
            acks,
        }
    }

    fn last_seq(&self) -> u64 {
        self.acks.last().map_or(0, |(seq, _)| *seq)
    }
}

/// The batches not fully acknowledged yet, in intake order (so by sequence number).
struct Waiting<A> {
    batches: VecDeque<Pending<A>>,
}

impl<A: Ack> Waiting<A> {
    fn new() -> Self {
        Self {
            batches: VecDeque::new(),
        }
    }

    fn push(&mut self, p: Pending<A>) {
        if p.left > 0 {
            self.batches.push_back(p);
        }
    }

    fn front_ticket(&self) -> Option<WriteTicket> {
        self.batches.front().map(|p| p.ticket)
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// The oldest batch is durable: acknowledges what is left of it.
    fn front_durable(&mut self) {
        if let Some(p) = self.batches.pop_front() {
            for (_, ack) in p.acks {
                if let Some(ack) = ack {
                    ack.ack();
                }
            }
        }
        self.pop_done();
    }

    /// Acknowledges the messages among `seqs` that are waiting; others (acknowledged already,
    /// or read from the outbox rather than taken in by this intake) are ignored.
    fn finished(&mut self, seqs: &[u64]) {
        for &seq in seqs {
            let i = self.batches.partition_point(|p| p.last_seq() < seq);
            let Some(p) = self.batches.get_mut(i) else {
                continue;
            };
            let Ok(j) = p.acks.binary_search_by_key(&seq, |(s, _)| *s) else {
                continue;
            };
            if let Some(ack) = p.acks[j].1.take() {
                ack.ack();
                p.left -= 1;
            }
        }
        self.pop_done();
    }

    /// Drops the fully acknowledged batches at the front (later ones go when they get there).
    fn pop_done(&mut self) {
        while self.batches.front().is_some_and(|p| p.left == 0) {
            self.batches.pop_front();
        }
    }
}

/// What became of the oldest batch's flush.
enum Flush {
    Durable,
    Failed(StoreError),
    /// The retry delay after a failure is up: wait for a new flush.
    Retry,
}

/// Waits for the flush of the oldest batch's `ticket`, or for the retry delay after a failure.
async fn front_flush(store: Store, ticket: WriteTicket, retry: Option<Instant>) -> Flush {
    match retry {
        Some(at) => {
            tokio::time::sleep_until(at).await;
            Flush::Retry
        }
        None => match store.wait_durable(ticket).await {
            Ok(()) => Flush::Durable,
            Err(e) => Flush::Failed(e),
        },
    }
}

/// The wait of [`front_flush`] under way, and the ticket and retry time it is for.
type FlushWait = (
    WriteTicket,
    Option<Instant>,
    Pin<Box<dyn Future<Output = Flush> + Send>>,
);

async fn flushed(wait: &mut Option<FlushWait>) -> Flush {
    match wait {
        Some((_, _, f)) => f.await,
        None => std::future::pending().await,
    }
}

/// Acknowledges the intake's batches (from `pending`, each sent before any of its messages
/// can reach a link) as their flushes end or their messages are `finished` upstream (see the
/// module docs). A failed flush is retried with a new one while finished messages are still
/// acknowledged. Ends once the intake is gone and every batch is acknowledged; on shutdown
/// while flushes fail, the acknowledgements still waiting are dropped, so the broker delivers
/// those messages again on the next run.
pub(crate) async fn acknowledge<A: Ack>(
    store: Store,
    mut pending: mpsc::Receiver<Pending<A>>,
    mut finished: mpsc::UnboundedReceiver<Vec<u64>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut waiting = Waiting::new();
    let (mut intake_open, mut remover_open) = (true, true);
    let mut retry: Option<Instant> = None;
    let mut delay = Duration::from_millis(100);
    // Kept across turns of the loop: starting a wait subscribes to the flusher's progress.
    let mut wait: Option<FlushWait> = None;
    while intake_open || !waiting.is_empty() {
        let key = waiting.front_ticket().map(|t| (t, retry));
        if wait.as_ref().map(|(t, r, _)| (*t, *r)) != key {
            wait = key.map(|(t, r)| {
                let f: Pin<Box<dyn Future<Output = Flush> + Send>> =
                    Box::pin(front_flush(store.clone(), t, r));
                (t, r, f)
            });
        }
        tokio::select! {
            // The oldest batch's flush first: the intake feeds batches without pause under
            // load, and they must not keep its acknowledgements waiting.
            biased;
            flush = flushed(&mut wait) => {
                wait = None;
                match flush {
                    Flush::Durable => {
                        waiting.front_durable();
                        delay = Duration::from_millis(100);
                    }
                    Flush::Failed(e) => {
                        tracing::error!(retry_in = ?delay, "telemetry in the outbox but not flushed: {e}");
                        retry = Some(Instant::now() + delay);
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                    Flush::Retry => {
                        retry = None;
                        if let Some(p) = waiting.batches.front_mut() {
                            p.ticket = store.write_ticket();
                        }
                    }
                }
            },
            seqs = finished.recv(), if remover_open => match seqs {
                Some(seqs) => {
                    // A batch is sent before its messages are handed to the links, so the
                    // batches of these messages are in the channel by now.
                    intake_open &= take_ready(&mut pending, &mut waiting);
                    waiting.finished(&seqs);
                }
                None => remover_open = false,
            },
            p = pending.recv(), if intake_open => match p {
                Some(p) => {
                    waiting.push(p);
                    intake_open = take_ready(&mut pending, &mut waiting);
                }
                None => intake_open = false,
            },
            _ = super::stopped(&mut shutdown), if retry.is_some() => return,
        }
    }
}

/// Takes in the batches already sent; false once the intake is gone.
fn take_ready<A: Ack>(pending: &mut mpsc::Receiver<Pending<A>>, waiting: &mut Waiting<A>) -> bool {
    loop {
        match pending.try_recv() {
            Ok(p) => waiting.push(p),
            Err(mpsc::error::TryRecvError::Empty) => return true,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::device_id::DeviceId;
    use crate::store::{OutboxMessage, StoreOptions};

    /// Records its sequence number when acknowledged.
    struct Probe(u64, Arc<Mutex<Vec<u64>>>);

    impl Ack for Probe {
        fn ack(self) {
            self.1.lock().unwrap().push(self.0);
        }
    }

    fn msgs(n: usize) -> Vec<OutboxMessage> {
        (0..n)
            .map(|i| OutboxMessage {
                device: DeviceId::parse("sensor-ack").unwrap(),
                topic: String::new(),
                payload: format!("{{\"n\":{i}}}").into_bytes(),
                qos: 1,
                enqueued_at_ms: 0,
                properties: Vec::new(),
            })
            .collect()
    }

    struct Rig {
        _dir: tempfile::TempDir,
        stall: std::path::PathBuf,
        store: Store,
        acked: Arc<Mutex<Vec<u64>>>,
        pending: mpsc::Sender<Pending<Probe>>,
        finished: mpsc::UnboundedSender<Vec<u64>>,
        _shutdown: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Rig {
        fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let stall = dir.path().join("stall");
            let store =
                Store::open_stalled_while(&dir.path().join("db"), &StoreOptions::default(), &stall)
                    .unwrap();
            let (pending, pending_rx) = mpsc::channel(8);
            let (finished, finished_rx) = mpsc::unbounded_channel();
            let (shutdown, shutdown_rx) = watch::channel(false);
            let task = tokio::spawn(acknowledge(
                store.clone(),
                pending_rx,
                finished_rx,
                shutdown_rx,
            ));
            Self {
                _dir: dir,
                stall,
                store,
                acked: Arc::default(),
                pending,
                finished,
                _shutdown: shutdown,
                task,
            }
        }

        /// Inserts `n` messages and hands their batch over; returns their sequence numbers.
        async fn batch(&self, n: usize) -> Vec<u64> {
            let (seqs, ticket) = self.store.outbox_insert(&msgs(n)).unwrap();
            let probes = seqs.iter().map(|&s| (s, Probe(s, self.acked.clone())));
            self.pending
                .send(Pending::new(ticket, probes))
                .await
                .unwrap();
            seqs
        }

        fn acked(&self) -> Vec<u64> {
            let mut a = self.acked.lock().unwrap().clone();
            a.sort_unstable();
            a
        }

        async fn until_acked(&self, want: &[u64]) {
            let mut want = want.to_vec();
            want.sort_unstable();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.acked() != want {
                assert!(
                    Instant::now() < deadline,
                    "acknowledged {:?}, expected {want:?}",
                    self.acked()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }

        /// Lets the acker take in everything sent so far.
        async fn settle(&self) {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
        }
    }

    #[tokio::test]
    async fn durable_batches_are_acknowledged_whole() {
        let rig = Rig::start();
        let a = rig.batch(3).await;
        let b = rig.batch(2).await;
        rig.until_acked(&[a, b].concat()).await;
        assert_eq!(rig.store.outbox_len(), 5);
    }

    #[tokio::test]
    async fn while_the_flush_stalls_only_messages_finished_upstream_are_acknowledged() {
        let rig = Rig::start();
        std::fs::write(&rig.stall, b"").unwrap();
        let a = rig.batch(3).await;
        let b = rig.batch(3).await;
        // The cloud took a's middle message and b's first: they are acknowledged at once,
        // out of batch order, and nothing else is (neither durable nor finished).
        rig.finished.send(vec![b[0], a[1]]).unwrap();
        rig.until_acked(&[a[1], b[0]]).await;
        // Reports of messages not waiting (already acknowledged, or never taken in by this
        // intake) change nothing.
        rig.finished.send(vec![a[1], 1, a[2] + 1_000_000]).unwrap();
        rig.settle().await;
        assert_eq!(rig.acked(), [a[1], b[0]]);
        // The flush ends: the rest of both batches.
        std::fs::remove_file(&rig.stall).unwrap();
        rig.until_acked(&[a.clone(), b.clone()].concat()).await;
        // A late report of a message acknowledged as durable is ignored.
        rig.finished.send(vec![a[0], b[2]]).unwrap();
        rig.settle().await;
        assert_eq!(rig.acked().len(), 6);
    }

    #[tokio::test]
    async fn a_batch_finished_upstream_needs_no_flush_and_the_intake_may_go_away() {
        let rig = Rig::start();
        std::fs::write(&rig.stall, b"").unwrap();
        let a = rig.batch(2).await;
        rig.finished.send(a.clone()).unwrap();
        rig.until_acked(&a).await;
        let Rig { pending, task, .. } = rig;
        // The intake stops with nothing waiting: the acker ends though the flush still stalls.
        drop(pending);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the acker ended")
            .unwrap();
    }
}
