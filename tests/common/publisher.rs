//! A device publishing a numbered sequence of QoS 1 messages and waiting for every PUBACK: the
//! load of the telemetry and downstream tests. The publisher itself is the benchmarks'
//! (`fleetgw::bench::publisher`); here a failure panics with its reason, as tests want.

use std::time::Duration;

pub use fleetgw::bench::publisher::Sequence;

/// Publishes the sequence to the broker at 127.0.0.1:`port` (payload of message n:
/// `payload(n)`) and returns once every PUBACK came: how late the latest paced message was
/// published after its due time (zero when unpaced). Panics when a PUBACK does not come.
pub async fn publish_sequence(
    port: u16,
    seq: Sequence,
    payload: impl Fn(u64) -> Vec<u8> + Send + 'static,
) -> Duration {
    let total = seq.seqs.end - seq.seqs.start;
    let published = fleetgw::bench::publisher::publish_sequence(port, seq, payload)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(published.sent, total, "every message of the range was sent");
    published.late
}
