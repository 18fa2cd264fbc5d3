//! A device publishing a numbered sequence of QoS 1 messages and waiting for every PUBACK: the
//! load of the telemetry and downstream tests.

use std::ops::Range;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::time::{timeout_at, Instant};

/// What one device publishes and how.
pub struct Sequence {
    pub client_id: String,
    pub topic: String,
    /// The sequence numbers, published in order; [`publish_sequence`] makes each payload.
    pub seqs: Range<u64>,
    /// Most unacknowledged publishes.
    pub window: u16,
    pub keep_alive: Duration,
    pub clean_session: bool,
    /// (first due, interval): message n of the range is due at first + n x interval and is not
    /// published earlier.
    pub pace: Option<(Instant, Duration)>,
    /// Every PUBACK must have come within this.
    pub within: Duration,
    /// Whether to read the connection's end after DISCONNECT (up to 1 s).
    pub linger: bool,
}

impl Sequence {
    /// `seqs` from `client_id` on `topic`: window 10, keep-alive 10 s, clean session, unpaced,
    /// acknowledged within `within`.
    pub fn new(client_id: String, topic: String, seqs: Range<u64>, within: Duration) -> Self {
        Self {
            client_id,
            topic,
            seqs,
            window: 10,
            keep_alive: Duration::from_secs(10),
            clean_session: true,
            pace: None,
            within,
            linger: true,
        }
    }
}

/// Publishes the sequence to the broker at 127.0.0.1:`port` (payload of message n:
/// `payload(n)`) and returns once every PUBACK came: how late the latest paced message was
/// published after its due time (zero when unpaced).
pub async fn publish_sequence(
    port: u16,
    seq: Sequence,
    payload: impl Fn(u64) -> Vec<u8> + Send + 'static,
) -> Duration {
    let Sequence {
        client_id,
        topic,
        seqs,
        window,
        keep_alive,
        clean_session,
        pace,
        within,
        linger,
    } = seq;
    let mut o = MqttOptions::new(client_id.as_str(), "127.0.0.1", port);
    o.set_keep_alive(keep_alive)
        .set_clean_session(clean_session)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(window);
    let (client, mut eventloop) = AsyncClient::new(o, usize::from(window));
    let total = seqs.end - seqs.start;
    let first = seqs.start;
    let publisher = tokio::spawn(async move {
        let mut late = Duration::ZERO;
        for n in seqs {
            if let Some((start, every)) = pace {
                let due = start + every.mul_f64((n - first) as f64);
                tokio::time::sleep_until(due).await;
                late = late.max(Instant::now().saturating_duration_since(due));
            }
            client
                .publish(&topic, QoS::AtLeastOnce, false, payload(n))
                .await
                .unwrap();
        }
        (client, late)
    });
    let deadline = Instant::now() + within;
    let mut acked = 0;
    while acked < total {
        match timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("device {client_id}: {e}"),
            Err(_) => panic!("device {client_id}: {acked} of {total} PUBACKs within {within:?}"),
        }
    }
    let (client, late) = publisher.await.unwrap();
    let _ = client.disconnect().await;
    if linger {
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    }
    late
}
