//! Intake: downstream telemetry -> checks -> outbox (one group commit per batch) -> ack.
//!
//! Messages are taken in batches (everything already waiting, up to `batch_max`), so one fsync
//! covers many messages. A batch is inserted into the outbox and handed to the dispatcher at
//! once, and the intake goes on with the next batch while its flush runs; a separate task
//! (`ack.rs`) acknowledges each downstream PUBLISH once its batch is durable or the cloud has
//! the message, whichever comes first. So the flush delays neither the message's way to the
//! cloud nor, while the cloud answers sooner, the device's PUBACK, and a crash before the flush
//! ends costs a duplicate (the device was not acknowledged and publishes again), never a loss.
//! Refused messages are acknowledged (they will never be forwarded, redelivery
//! would not change that) after a rate-limited log line and status notice.
//!
//! Duplicates. A message whose downstream connection dropped (or whose gateway was killed) before
//! the broker processed its PUBACK is in the outbox and is appended again when the broker
//! redelivers it: per lost downstream connection at most the broker's in-flight window to the
//! gateway (1,000 for the embedded broker, and with its end-to-end acknowledgement no more than the
//! devices' own windows together) or the session's read-ahead bound (`max_unconfirmed`, 1,000),
//! whichever is smaller; the read-ahead is what holds the bound with mosquitto 2.0.11, which
//! exceeds its own window (see `downstream::session`). The intake does not deduplicate them: some
//! brokers renumber redeliveries and clear DUP, so nothing in the message reliably tells a copy
//! from a new one, and skipping messages whose ack is stale would lose them when the broker did not
//! keep the session.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use super::ack::{self, Pending};
use super::directory::{Directory, Gate, RefusalKind};
use super::dispatch::Handoff;
use super::Shared;
use crate::clock;
use crate::config::WhenFull;
use crate::device_id::DeviceId;
use crate::downstream::{
    AckHandle, DeviceStatus, DeviceTopic, DownstreamMessage, QoS, RejectedResponse, StatusReport,
};
use crate::mqtt::props::MessageProperties;
use crate::store::OutboxMessage;

/// Status notices being published at once at most; more are skipped (and only logged).
const MAX_NOTICES_IN_FLIGHT: usize = 16;
/// Notice bookkeeping is pruned beyond this many devices.
const MAX_NOTICE_ENTRIES: usize = 10_000;

pub(crate) struct Intake {
    shared: Arc<Shared>,
    inbound: mpsc::Receiver<DownstreamMessage>,
    handoff: mpsc::Sender<Handoff>,
    shutdown: watch::Receiver<bool>,
    directory: Directory,
    last_notice: HashMap<DeviceId, Instant>,
    notices: Arc<Semaphore>,
    last_full_log: Option<Instant>,
    dropped_since_log: u64,
    batch_bytes_max: usize,
}

/// How many times the intake yields to the tasks feeding it, finding its channel empty, before
/// it closes a batch (see `run`). Each costs a trip through the scheduler, not a timer. With
/// none, batches are too small (fewer messages per second unpaced); one did as well as two or
/// better once the session handed messages to the intake directly (docs/benchmarks.md,
/// "one task hop fewer").
const COALESCE_YIELDS: u32 = 1;

/// Batches in the outbox with devices still to acknowledge; the intake waits when this many
/// are. (The broker's window to the gateway bounds them first.)
const PENDING_BATCHES: usize = 64;

impl Intake {
    pub fn new(
        shared: Arc<Shared>,
        inbound: mpsc::Receiver<DownstreamMessage>,
        handoff: mpsc::Sender<Handoff>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let opts = &shared.opts;
        let directory = Directory::new(
            shared.store.clone(),
            opts.identity,
            opts.device_certificates,
            opts.device_cache_ttl,
        );
        // A batch never needs more than a quarter of the outbox, so drop-oldest always finds
        // room for it and backpressure always ends once the cloud takes messages again.
        let batch_bytes_max =
            ((opts.max_bytes / 4) as usize).clamp(opts.max_payload_bytes + 4096, 8 << 20);
        Self {
            directory,
            shared,
            inbound,
            handoff,
            shutdown,
            last_notice: HashMap::new(),
            notices: Arc::new(Semaphore::new(MAX_NOTICES_IN_FLIGHT)),
            last_full_log: None,
            dropped_since_log: 0,
            batch_bytes_max,
        }
    }

    /// Runs until shutdown; `finished` carries the sequence numbers the remover is done with
    /// upstream, for the acknowledgements.
    pub async fn run(mut self, finished: mpsc::UnboundedReceiver<Vec<u64>>) {
        let batch_max = self.shared.opts.batch_max.max(1);
        let mut batch = Vec::with_capacity(batch_max);
        let (pending, pending_rx) = mpsc::channel(PENDING_BATCHES);
        let acker = tokio::spawn(ack::acknowledge(
            self.shared.store.clone(),
            pending_rx,
            finished,
            self.shutdown.clone(),
        ));
        loop {
            let first = tokio::select! {
                m = self.inbound.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = super::stopped(&mut self.shutdown) => break,
            };
            let mut bytes = first.payload.len();
            batch.push(first);
            // Gather what is already on its way: the devices' connections route messages to
            // the downstream session one at a time and it hands each over as it takes it, so
            // the channel looks empty between two of them while the broker still holds a
            // whole window for us. Yielding lets those tasks run before the batch is closed;
            // only a channel still empty after that ends it.
            let mut empty_looks = 0;
            while batch.len() < batch_max && bytes < self.batch_bytes_max {
                match self.inbound.try_recv() {
                    Ok(m) => {
                        bytes += m.payload.len();
                        batch.push(m);
                        empty_looks = 0;
                    }
                    Err(mpsc::error::TryRecvError::Empty) if empty_looks < COALESCE_YIELDS => {
                        empty_looks += 1;
                        tokio::task::yield_now().await;
                    }
                    Err(_) => break,
                }
            }
            if !self.process(&mut batch, &pending).await {
                break;
            }
            batch.clear();
        }
        // Batches already in the outbox are acknowledged once their flush ends.
        drop(pending);
        let _ = acker.await;
        tracing::debug!("telemetry intake stopped");
    }

    /// Returns false when shutting down before the batch could be stored (it stays
    /// unacknowledged, so the broker delivers it again on the next run).
    async fn process(
        &mut self,
        batch: &mut Vec<DownstreamMessage>,
        pending: &mpsc::Sender<Pending<AckHandle>>,
    ) -> bool {
        let counters = self.shared.counters.clone();
        counters
            .received
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let now = clock::unix_ms();
        let taken = Instant::now();
        let mut msgs = Vec::with_capacity(batch.len());
        let mut acks: Vec<AckHandle> = Vec::with_capacity(batch.len());
        let mut things = Vec::with_capacity(batch.len());
        let mut received = Vec::with_capacity(batch.len());
        let mut bytes = 0u64;
        for m in batch.drain(..) {
            let DownstreamMessage {
                topic,
                payload,
                qos,
                ack,
                properties,
                received_at,
                ..
            } = m;
            let DeviceTopic::Telemetry { device, subtopic } = topic else {
                // Not ours (a provisioning request routed here by mistake): leave it alone.
                ack.ack();
                continue;
            };
            let gate = self.directory.gate(&device);
            if payload.len() > self.shared.opts.max_payload_bytes {
                counters.oversize.fetch_add(1, Ordering::Relaxed);
                let status = match &gate {
                    Gate::Refuse(r) => r.status,
                    _ => Some(DeviceStatus::Provisioned),
                };
                let error = RejectedResponse::new(
                    413,
                    "PayloadTooLarge",
                    format!(
                        "telemetry payload of {} bytes exceeds the cloud's limit of {} bytes; it is not forwarded",
                        payload.len(),
                        self.shared.opts.max_payload_bytes
                    ),
                );
                self.notice(&device, status, error);
                ack.ack();
                continue;
            }
            let thing = match gate {
                Gate::Forward { thing_name } => thing_name,
                Gate::Refuse(r) => {
                    let c = match r.kind {
                        RefusalKind::Unknown => &counters.refused_unknown,
                        RefusalKind::NotProvisioned => &counters.refused_not_provisioned,
                        RefusalKind::Disabled => &counters.refused_disabled,
                        RefusalKind::NoKey => &counters.refused_no_key,
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                    self.notice(&device, r.status, r.error.clone());
                    ack.ack();
                    continue;
                }
                Gate::Unavailable(e) => {
                    tracing::error!(%device, "telemetry not accepted: the device record cannot be read ({e}); the broker will deliver it again");
                    drop(ack);
                    continue;
                }
            };
            let msg = OutboxMessage {
                device,
                topic: subtopic.unwrap_or_default(),
                payload: payload.to_vec(),
                qos: u8::from(qos != QoS::AtMostOnce),
                enqueued_at_ms: now,
                properties: properties
                    .as_deref()
                    .map(MessageProperties::to_stored)
                    .unwrap_or_default(),
            };
            bytes += msg.encoded_len() as u64;
            msgs.push(msg);
            acks.push(ack);
            things.push(thing);
            received.push(received_at.map_or(taken, Instant::from_std));
        }
        if msgs.is_empty() {
            return true;
        }
        if !self.make_room(bytes).await {
            return false;
        }
        let mut delay = Duration::from_millis(100);
        let (seqs, ticket) = loop {
            match self.shared.store.outbox_insert(&msgs) {
                Ok(inserted) => break inserted,
                Err(e) => {
                    // Nothing acknowledged: the messages are still the broker's. Retry the same
                    // batch rather than dropping acks (which would force a downstream reconnect).
                    tracing::error!(messages = msgs.len(), retry_in = ?delay, "telemetry not stored in the outbox: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = super::stopped(&mut self.shutdown) => return false,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        counters
            .accepted
            .fetch_add(msgs.len() as u64, Ordering::Relaxed);
        counters.append_batches.fetch_add(1, Ordering::Relaxed);
        // The acker takes the batch before any of its messages can reach a link (it only
        // stops when this intake does).
        let _ = pending
            .send(Pending::new(ticket, seqs.iter().copied().zip(acks)))
            .await;
        let items = seqs
            .into_iter()
            .zip(msgs)
            .zip(things)
            .zip(received)
            .map(|(((seq, msg), thing), at)| (seq, msg, thing, at))
            .collect();
        // Sent upstream while the flush runs: a crash before it ends loses the outbox entries,
        // but a device is only acknowledged once its message is durable or in the cloud, so
        // the others publish again (a duplicate at worst). The dispatcher only stops receiving
        // when it stops; the outbox holds the messages.
        let _ = self.handoff.send(Handoff::Appended(items)).await;
        true
    }

    /// Waits for (backpressure) or makes (drop-oldest) room for `need` bytes. Returns false
    /// when shutting down.
    async fn make_room(&mut self, need: u64) -> bool {
        let max = self.shared.opts.max_bytes;
        let mut episode = false;
        loop {
            let used = self.shared.store.outbox_bytes();
            if used + need <= max {
                return true;
            }
            if self.shared.opts.when_full == WhenFull::DropOldest {
                let excess = used + need - max;
                if self.drop_oldest(excess).await {
                    continue;
                }
            }
            if !episode {
                episode = true;
                self.shared
                    .counters
                    .backpressure_episodes
                    .fetch_add(1, Ordering::Relaxed);
                self.log_full(format_args!(
                    "telemetry outbox full ({used} of {max} bytes); not acknowledging devices until the cloud takes messages (when_full = \"backpressure\")"
                ));
            }
            let room = self.shared.room.notified();
            tokio::select! {
                _ = room => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = super::stopped(&mut self.shutdown) => return false,
            }
        }
    }

    /// Deletes the oldest outbox messages, at least `excess` bytes; false if nothing could be
    /// deleted.
    async fn drop_oldest(&mut self, excess: u64) -> bool {
        let mut seqs = Vec::new();
        let mut freed = 0u64;
        let mut from = 0u64;
        while freed < excess {
            let page = match self.shared.store.outbox_scan(from, 256) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("reading the oldest outbox messages to drop them: {e}");
                    break;
                }
            };
            if page.is_empty() {
                break;
            }
            for (seq, msg) in &page {
                if freed >= excess {
                    break;
                }
                freed += msg.encoded_len() as u64;
                seqs.push(*seq);
                from = seq + 1;
            }
            if page.len() < 256 {
                break;
            }
        }
        if seqs.is_empty() {
            return false;
        }
        match self.shared.store.outbox_remove(&seqs).await {
            Ok(n) => {
                self.shared
                    .counters
                    .dropped_full
                    .fetch_add(n as u64, Ordering::Relaxed);
                self.dropped_since_log += n as u64;
                let dropped = self.dropped_since_log;
                if self.log_full(format_args!(
                    "telemetry outbox full: dropped the {dropped} oldest messages (when_full = \"drop-oldest\")"
                )) {
                    self.dropped_since_log = 0;
                }
                let _ = self.handoff.send(Handoff::Dropped(seqs)).await;
                n > 0
            }
            Err(e) => {
                tracing::error!("dropping the oldest outbox messages: {e}");
                false
            }
        }
    }

    /// Logs a full-outbox warning at most every 10 s; true if it was logged.
    fn log_full(&mut self, msg: std::fmt::Arguments<'_>) -> bool {
        let now = Instant::now();
        if self
            .last_full_log
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return false;
        }
        self.last_full_log = Some(now);
        tracing::warn!("{msg}");
        true
    }

    /// Logs a refusal and tells the device on its status topic, once per `notice_interval`.
    fn notice(&mut self, device: &DeviceId, status: Option<DeviceStatus>, error: RejectedResponse) {
        let now = Instant::now();
        let interval = self.shared.opts.notice_interval;
        if let Some(last) = self.last_notice.get(device) {
            if now.duration_since(*last) < interval {
                return;
            }
        }
        if self.last_notice.len() >= MAX_NOTICE_ENTRIES {
            self.last_notice
                .retain(|_, t| now.duration_since(*t) < interval);
        }
        self.last_notice.insert(device.clone(), now);
        tracing::warn!(%device, code = %error.error_code, "telemetry not forwarded: {}", error.error_message);
        // Unknown ids get no retained status: any client could otherwise fill the broker's
        // retained store with ids nobody provisioned.
        let Some(status) = status else {
            return;
        };
        let Ok(permit) = self.notices.clone().try_acquire_owned() else {
            return;
        };
        let downstream = self.shared.downstream.clone();
        let device = device.clone();
        let report = StatusReport {
            status,
            updated_at: clock::unix_ms(),
            error: Some(error),
        };
        tokio::spawn(async move {
            if let Err(e) = downstream.publish_status(&device, &report).await {
                tracing::debug!(%device, "telemetry refusal notice not published: {e}");
            }
            drop(permit);
        });
    }
}
