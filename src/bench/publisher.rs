//! A device publishing a numbered sequence of QoS 1 messages and waiting for every PUBACK: the
//! load of the telemetry benchmarks (fleetgw and the mosquitto bridge alike) and of the
//! telemetry and downstream tests (`tests/common/publisher.rs` wraps it).
//!
//! A publisher keeps at most `window` messages unacknowledged; paced, message n is not sent
//! before its due time; with `until`, it stops starting new messages at that instant (a
//! benchmark of T seconds), then waits for the PUBACKs of what it sent.

use std::ops::Range;
use std::time::Duration;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout_at, Instant};

/// What one device publishes and how.
pub struct Sequence {
    /// MQTT client id.
    pub client_id: String,
    /// Topic of every message.
    pub topic: String,
    /// The sequence numbers, published in order; the payload function makes each payload.
    pub seqs: Range<u64>,
    /// Most unacknowledged publishes.
    pub window: u16,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// MQTT clean session.
    pub clean_session: bool,
    /// (first due, interval): message n of the range is due at first + n x interval and is not
    /// published earlier.
    pub pace: Option<(Instant, Duration)>,
    /// No message is started at or after this instant (the rest of `seqs` is not sent).
    pub until: Option<Instant>,
    /// Every PUBACK must have come within this.
    pub within: Duration,
    /// Whether to read the connection's end after DISCONNECT (up to 1 s).
    pub linger: bool,
    /// Publishers that start together once all are connected ([`StartGate`]).
    pub gate: Option<StartGate>,
}

/// A start shared by many publishers: each reports its CONNACK and publishes nothing until the
/// gate opens, so a phase measures connected devices, not a storm of CONNECTs. `pace` and
/// `until` were computed from `base`; they move by as much as the opening is later than it.
pub struct StartGate {
    /// The instant `pace` and `until` were computed from.
    pub base: Instant,
    /// Told once, when the broker accepted the connection.
    pub connected: mpsc::UnboundedSender<()>,
    /// The start: `None` until the gate opens.
    pub open: watch::Receiver<Option<Instant>>,
}

impl Sequence {
    /// `seqs` from `client_id` on `topic`: window 10, keep-alive 10 s, clean session, unpaced,
    /// no end time, acknowledged within `within`.
    pub fn new(client_id: String, topic: String, seqs: Range<u64>, within: Duration) -> Self {
        Self {
            client_id,
            topic,
            seqs,
            window: 10,
            keep_alive: Duration::from_secs(10),
            clean_session: true,
            pace: None,
            until: None,
            within,
            linger: true,
            gate: None,
        }
    }
}

/// What a publisher did.
#[derive(Clone, Debug)]
pub struct Published {
    /// Messages sent (the first `sent` numbers of the range).
    pub sent: u64,
    /// How late the latest paced message went out after its due time (zero when unpaced).
    pub late: Duration,
    /// When the last PUBACK came.
    pub last_ack: Option<Instant>,
    /// Per message, microseconds from its payload being made (the publish call) to its
    /// PUBLISH being written: the wait for a free slot in the window.
    pub queued_us: Histogram<u64>,
    /// Per message, microseconds from its PUBLISH being written to its PUBACK.
    pub puback_us: Histogram<u64>,
}

/// A histogram of microseconds up to an hour, 3 significant digits.
pub fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn record_since(h: &mut Histogram<u64>, since: Instant, now: Instant) {
    let us = now.saturating_duration_since(since).as_micros();
    h.saturating_record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
}

/// Why a publisher stopped before every PUBACK came.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The connection failed.
    #[error("device {client_id}: {reason}")]
    Connection {
        /// The publisher.
        client_id: String,
        /// The client's error.
        reason: String,
    },
    /// Not every PUBACK came in time.
    #[error("device {client_id}: {acked} of {sent} PUBACKs within {within:?}")]
    Timeout {
        /// The publisher.
        client_id: String,
        /// PUBACKs received.
        acked: u64,
        /// Messages sent.
        sent: u64,
        /// The time allowed.
        within: Duration,
    },
}

/// Publishes the sequence to the broker at 127.0.0.1:`port` (payload of message n:
/// `payload(n)`) and returns once every PUBACK of what it sent came.
pub async fn publish_sequence(
    port: u16,
    seq: Sequence,
    payload: impl Fn(u64) -> Vec<u8> + Send + 'static,
) -> Result<Published, PublishError> {
    let Sequence {
        client_id,
        topic,
        seqs,
        window,
        keep_alive,
        clean_session,
        pace,
        until,
        within,
        linger,
        gate,
    } = seq;
    let mut o = MqttOptions::new(client_id.as_str(), "127.0.0.1", port);
    o.set_keep_alive(keep_alive)
        .set_clean_session(clean_session)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(window);
    let (client, mut eventloop) = AsyncClient::new(o, usize::from(window));
    let first = seqs.start;
    // A gated publisher may wait for the others' connections as long as for its PUBACKs.
    let gated = gate.is_some();
    let (mut connected, open) = match gate {
        Some(g) => (Some(g.connected), Some((g.base, g.open))),
        None => (None, None),
    };
    // The publisher reports how many it sent once it stops; PUBACKs are counted here.
    let (done_tx, mut done_rx) = mpsc::channel::<(u64, Duration)>(1);
    // When each requested publish was made, oldest first: rumqttc writes them in that order.
    let requested: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    let requests = requested.clone();
    let publisher = tokio::spawn(async move {
        let (mut pace, mut until) = (pace, until);
        if let Some((base, mut open)) = open {
            let Ok(start) = open
                .wait_for(Option::is_some)
                .await
                .map(|s| s.unwrap_or(base))
            else {
                let _ = done_tx.send((0, Duration::ZERO)).await;
                return client;
            };
            let shift = start.saturating_duration_since(base);
            pace = pace.map(|(due, every)| (due + shift, every));
            until = until.map(|u| u + shift);
        }
        let mut late = Duration::ZERO;
        let mut sent = 0;
        for n in seqs {
            if let Some((start, every)) = pace {
                let due = start + every.mul_f64((n - first) as f64);
                if until.is_some_and(|u| due >= u) {
                    break;
                }
                tokio::time::sleep_until(due).await;
                late = late.max(Instant::now().saturating_duration_since(due));
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                break;
            }
            let body = payload(n);
            requests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back(Instant::now());
            if client
                .publish(&topic, QoS::AtLeastOnce, false, body)
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        let _ = done_tx.send((sent, late)).await;
        client
    });
    let deadline = until.unwrap_or_else(Instant::now) + if gated { within * 2 } else { within };
    let mut acked = 0;
    let mut total: Option<(u64, Duration)> = None;
    let mut last_ack = None;
    let (mut queued_us, mut puback_us) = (micros_histogram(), micros_histogram());
    let mut written: Vec<Option<Instant>> = vec![None; usize::from(window) * 2 + 2];
    'polling: while total.is_none_or(|(sent, _)| acked < sent) {
        // One poll at a time, never dropped half-way: rumqttc's poll is not cancel-safe. A
        // connection attempt dropped after its CONNECT was written leaves that CONNECT to the
        // broker, which may read it after the next attempt's and so take the live connection
        // over; a write dropped half-way is sent again whole.
        let poll = timeout_at(deadline, eventloop.poll());
        tokio::pin!(poll);
        let event = loop {
            tokio::select! {
                done = done_rx.recv(), if total.is_none() => {
                    total = Some(done.unwrap_or((acked, Duration::ZERO)));
                    if total.is_some_and(|(sent, _)| acked >= sent) {
                        break 'polling;
                    }
                }
                event = &mut poll => break event,
            }
        };
        match event {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                if let Some(tx) = connected.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                acked += 1;
                let now = Instant::now();
                last_ack = Some(now);
                let slot = usize::from(ack.pkid) % written.len();
                if let Some(at) = written[slot].take() {
                    record_since(&mut puback_us, at, now);
                }
            }
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                let now = Instant::now();
                let made = requested
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop_front();
                if let Some(made) = made {
                    record_since(&mut queued_us, made, now);
                }
                let slot = usize::from(pkid) % written.len();
                written[slot] = Some(now);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                publisher.abort();
                return Err(PublishError::Connection {
                    client_id,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                publisher.abort();
                return Err(PublishError::Timeout {
                    client_id,
                    acked,
                    sent: total.map_or(acked, |t| t.0),
                    within,
                });
            }
        }
    }
    let (sent, late) = total.unwrap_or_default();
    if let Ok(client) = publisher.await {
        let _ = client.disconnect().await;
        if linger {
            let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
        }
    }
    Ok(Published {
        sent,
        late,
        last_ack,
        queued_us,
        puback_us,
    })
}
