//! Loss, duplication and order of sequence-numbered telemetry, judged by what the cloud
//! emulator received: the one checker behind `fleetgw demo`, `fleetgw simulate
//! --emulator-api`, the telemetry tests and the benchmarks.
//!
//! Every test publisher and simulated device sends JSON payloads
//! `{"seq":n,"t":unixMs,"tu":unixMicros,"pad":"..."}`: `seq` counts from 0 per device, `t` is
//! the send time in unix milliseconds and `tu` the same in microseconds (both optional for the
//! checker, which prefers `tu`; without either a message gives no latency sample). The emulator
//! logs each publish with its arrival time in microseconds
//! (`receivedAtUs` of `GET /messages`, see `emulator::aws::api`); for one
//! device, the arrivals in arrival order against the sequence numbers the device sent give:
//!
//! - lost: sent sequence numbers that never arrived,
//! - duplicates: arrivals of a sequence number that had already arrived,
//! - out of order: first arrivals of a sequence number lower than one that arrived before it,
//! - unexpected: sequence numbers the device never sent.
//!
//! Device-to-cloud latency is the emulator's arrival time minus the send time (`tu`, else `t`)
//! of the first arrival of each sequence number, to the microsecond (a millisecond clock at both ends would be off by up
//! to a millisecond either way, a fifth of a 5 ms latency target); it is meaningful when both
//! clocks are the same (one machine).

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::pin::Pin;
use std::time::Duration;

use base64::Engine as _;
use hdrhistogram::Histogram;
use hyper::body::Body as _;
use serde::Deserialize;
use tokio::net::TcpStream;

use super::latency::{self, LatencySummary};

/// Messages asked for per `GET /messages` page.
const PAGE: usize = 20_000;
/// How many lost sequence numbers a device's check lists.
const LOST_LISTED: usize = 10;

/// The telemetry payload of sequence number `seq` sent at `sent_us` (unix microseconds; `t`
/// carries it in whole milliseconds, `tu` as it is), padded with `x` to `size` bytes when `size`
/// is larger than the bare JSON.
pub fn payload(seq: u64, sent_us: u64, size: usize) -> Vec<u8> {
    let ms = sent_us / 1000;
    let head = format!(r#"{{"seq":{seq},"t":{ms},"tu":{sent_us},"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    let mut out = Vec::with_capacity(head.len() + pad + 2);
    out.extend_from_slice(head.as_bytes());
    out.resize(head.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// The sequence number and send time (unix microseconds) of a telemetry payload; `None` when
/// it is not JSON with a numeric `seq`. The time is `tu`, or else `t` (milliseconds, as devices
/// that only know milliseconds write it).
pub fn parse_payload(payload: &[u8]) -> Option<(u64, Option<u64>)> {
    #[derive(Deserialize)]
    struct Fields {
        seq: u64,
        t: Option<u64>,
        tu: Option<u64>,
    }
    let fields: Fields = serde_json::from_slice(payload).ok()?;
    let sent_us = fields
        .tu
        .or_else(|| fields.t.map(|t| t.saturating_mul(1000)));
    Some((fields.seq, sent_us))
}

/// One message as the emulator received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// The payload's sequence number.
    pub seq: u64,
    /// The payload's send time (unix microseconds), if it carries one.
    pub sent_us: Option<u64>,
    /// The emulator's arrival time (unix microseconds).
    pub received_us: u64,
}

/// The verdict for one device's arrivals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SequenceCheck {
    /// Sequence numbers the device sent.
    pub expected: u64,
    /// Arrivals, duplicates included.
    pub received: u64,
    /// Sent sequence numbers that never arrived.
    pub lost: u64,
    /// Arrivals of a sequence number that had already arrived.
    pub duplicates: u64,
    /// First arrivals that came after a higher sequence number.
    pub out_of_order: u64,
    /// Arrivals of sequence numbers the device never sent.
    pub unexpected: u64,
    /// The first few lost sequence numbers, ascending.
    pub lost_seqs: Vec<u64>,
}

impl SequenceCheck {
    /// Everything sent arrived, in order, and nothing else did (duplicates allowed).
    pub fn complete_in_order(&self) -> bool {
        self.lost == 0 && self.out_of_order == 0 && self.unexpected == 0
    }
}

/// Checks one device's arrival sequence (in arrival order) against the sequence numbers it
/// sent.
pub fn check_sequence(arrivals: impl IntoIterator<Item = u64>, sent: Range<u64>) -> SequenceCheck {
    let mut seen = HashSet::new();
    let mut check = SequenceCheck {
        expected: sent.end.saturating_sub(sent.start),
        ..SequenceCheck::default()
    };
    let mut highest: Option<u64> = None;
    for seq in arrivals {
        check.received += 1;
        if !sent.contains(&seq) {
            check.unexpected += 1;
            continue;
        }
        if !seen.insert(seq) {
            check.duplicates += 1;
            continue;
        }
        if highest.is_some_and(|h| seq < h) {
            check.out_of_order += 1;
        }
        highest = highest.max(Some(seq));
    }
    check.lost = check.expected - seen.len() as u64;
    if check.lost > 0 {
        check.lost_seqs = sent
            .filter(|s| !seen.contains(s))
            .take(LOST_LISTED)
            .collect();
    }
    check
}

/// The verdict over many devices, with the device-to-cloud latency histogram.
#[derive(Clone, Debug)]
pub struct TelemetryCheck {
    /// Devices checked.
    pub devices: u64,
    /// Messages the devices sent (distinct sequence numbers).
    pub expected: u64,
    /// Arrivals, duplicates included.
    pub received: u64,
    /// Sent messages that never arrived.
    pub lost: u64,
    /// Repeated arrivals.
    pub duplicates: u64,
    /// First arrivals after a higher sequence number of the same device.
    pub out_of_order: u64,
    /// Arrivals of sequence numbers no device sent.
    pub unexpected: u64,
    /// Earliest send time of an arrived message (unix microseconds).
    pub first_sent_us: Option<u64>,
    /// Latest arrival time (unix microseconds).
    pub last_received_us: Option<u64>,
    /// Devices whose check is not [`SequenceCheck::complete_in_order`], by device.
    pub incomplete: BTreeMap<String, SequenceCheck>,
    latency: Histogram<u64>,
}

impl Default for TelemetryCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl TelemetryCheck {
    /// An empty check.
    pub fn new() -> Self {
        Self {
            devices: 0,
            expected: 0,
            received: 0,
            lost: 0,
            duplicates: 0,
            out_of_order: 0,
            unexpected: 0,
            first_sent_us: None,
            last_received_us: None,
            incomplete: BTreeMap::new(),
            latency: latency::histogram(),
        }
    }

    /// Adds one device: its arrivals in arrival order and the sequence numbers it sent.
    /// Returns that device's verdict.
    pub fn add_device(
        &mut self,
        device: &str,
        arrivals: &[Arrival],
        sent: Range<u64>,
    ) -> SequenceCheck {
        let check = check_sequence(arrivals.iter().map(|a| a.seq), sent.clone());
        let mut firsts = HashSet::new();
        for a in arrivals {
            if !sent.contains(&a.seq) || !firsts.insert(a.seq) {
                continue;
            }
            self.last_received_us = self.last_received_us.max(Some(a.received_us));
            if let Some(sent_us) = a.sent_us {
                self.first_sent_us = Some(self.first_sent_us.map_or(sent_us, |f| f.min(sent_us)));
                let us = a.received_us.saturating_sub(sent_us);
                self.latency.saturating_record(us.max(1));
            }
        }
        self.devices += 1;
        self.expected += check.expected;
        self.received += check.received;
        self.lost += check.lost;
        self.duplicates += check.duplicates;
        self.out_of_order += check.out_of_order;
        self.unexpected += check.unexpected;
        if !check.complete_in_order() {
            self.incomplete.insert(device.to_string(), check.clone());
        }
        check
    }

    /// Device-to-cloud latency of the first arrival of every message that carried a send
    /// time (microsecond resolution).
    pub fn latency(&self) -> LatencySummary {
        LatencySummary::from_histogram(&self.latency)
    }

    /// Distinct messages delivered per second, from the earliest send to the latest arrival.
    pub fn messages_per_second(&self) -> f64 {
        let delivered = self.expected - self.lost;
        match (self.first_sent_us, self.last_received_us) {
            (Some(first), Some(last)) if last > first => {
                delivered as f64 * 1e6 / (last - first) as f64
            }
            _ => 0.0,
        }
    }

    /// Nothing lost, nothing out of order, nothing unexpected.
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.out_of_order == 0 && self.unexpected == 0
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageView {
    seq: u64,
    client_id: String,
    /// Absent from the Azure emulator's log, which names the device instead (and is only
    /// grouped by client id).
    #[serde(default)]
    topic: String,
    payload_base64: String,
    received_at_ms: u64,
    /// Absent from emulators older than the microsecond arrival times.
    #[serde(default)]
    received_at_us: Option<u64>,
}

/// Why the emulator's record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The HTTP request failed or timed out.
    #[error("GET {url}: {reason}")]
    Http {
        /// The URL asked for.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The answer is not the `GET /messages` JSON.
    #[error("GET {url}: not a message list: {reason}")]
    Format {
        /// The URL asked for.
        url: String,
        /// The decoder's message.
        reason: String,
    },
}

/// Every telemetry message the emulator at `api_url` (`http://HOST:PORT`) still holds, as
/// arrivals per MQTT client id (the thing name in device identity), in arrival order.
/// Messages whose payload carries no sequence number are skipped. Each page request may take
/// `timeout`.
pub async fn fetch_arrivals(
    api_url: &str,
    timeout: Duration,
) -> Result<BTreeMap<String, Vec<Arrival>>, FetchError> {
    fetch_arrivals_by(api_url, timeout, 0, GroupBy::ClientId).await
}

/// How [`fetch_arrivals_by`] groups the arrivals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    /// By MQTT client id (the thing name in device identity).
    ClientId,
    /// By topic: the one way to tell devices apart behind a single upstream connection (the
    /// gateway's own identity, a mosquitto bridge).
    Topic,
}

/// The messages the emulator logged after its arrival number `after` (0: all it holds), as
/// arrivals per key, in arrival order; otherwise as [`fetch_arrivals`].
pub async fn fetch_arrivals_by(
    api_url: &str,
    timeout: Duration,
    after: u64,
    group: GroupBy,
) -> Result<BTreeMap<String, Vec<Arrival>>, FetchError> {
    let base = api_url.trim_end_matches('/');
    let mut by_client: BTreeMap<String, Vec<Arrival>> = BTreeMap::new();
    let mut after = after;
    loop {
        let url = format!("{base}/messages?after={after}&limit={PAGE}");
        let body = tokio::time::timeout(timeout, http_get(&url))
            .await
            .map_err(|_| FetchError::Http {
                url: url.clone(),
                reason: format!("no answer within {timeout:?}"),
            })?
            .map_err(|reason| FetchError::Http {
                url: url.clone(),
                reason,
            })?;
        let page: Vec<MessageView> =
            serde_json::from_slice(&body).map_err(|e| FetchError::Format {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let count = page.len();
        for m in page {
            after = after.max(m.seq);
            let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(&m.payload_base64)
            else {
                continue;
            };
            if let Some((seq, sent_us)) = parse_payload(&raw) {
                let key = match group {
                    GroupBy::ClientId => m.client_id,
                    GroupBy::Topic => m.topic,
                };
                by_client.entry(key).or_default().push(Arrival {
                    seq,
                    sent_us,
                    received_us: m.received_at_us.unwrap_or(m.received_at_ms * 1000),
                });
            }
        }
        if count < PAGE {
            return Ok(by_client);
        }
    }
}

/// A plain HTTP/1.1 GET of `http://host:port/path`; the body when the status is 200.
pub async fn http_get(url: &str) -> Result<Vec<u8>, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .body(String::new())
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| format!("reading the body: {e}"))?;
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    driver.abort();
    if status != hyper::StatusCode::OK {
        return Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_in_order_is_clean() {
        let c = check_sequence(0..5, 0..5);
        assert_eq!((c.expected, c.received, c.lost), (5, 5, 0));
        assert!(c.complete_in_order());
        assert_eq!((c.duplicates, c.out_of_order, c.unexpected), (0, 0, 0));
    }

    #[test]
    fn a_gap_is_lost() {
        let c = check_sequence([0, 1, 3, 5], 0..6);
        assert_eq!(c.lost, 2);
        assert_eq!(c.lost_seqs, vec![2, 4]);
        assert_eq!((c.duplicates, c.out_of_order), (0, 0));
        assert!(!c.complete_in_order());
    }

    #[test]
    fn a_repeat_is_a_duplicate_not_a_reorder() {
        // A resend after a reconnect repeats a window: 2 and 3 come again after 3.
        let c = check_sequence([0, 1, 2, 3, 2, 3, 4], 0..5);
        assert_eq!((c.lost, c.duplicates, c.out_of_order), (0, 2, 0));
        assert!(c.complete_in_order());
    }

    #[test]
    fn a_reorder_counts_each_late_first_arrival() {
        let c = check_sequence([0, 3, 1, 2, 4], 0..5);
        assert_eq!((c.lost, c.duplicates, c.out_of_order), (0, 0, 2));
        assert!(!c.complete_in_order());
    }

    #[test]
    fn sequence_numbers_never_sent_are_unexpected() {
        let c = check_sequence([5, 6, 7, 99], 5..8);
        assert_eq!((c.lost, c.unexpected), (0, 1));
        assert!(!c.complete_in_order());
    }

    #[test]
    fn payloads_round_trip_and_pad_to_size() {
        let p = payload(42, 1_700_000_000_123, 200);
        assert_eq!(p.len(), 200);
        assert_eq!(parse_payload(&p), Some((42, Some(1_700_000_000_123))));
        // Smaller than the bare JSON: no padding, still valid.
        let p = payload(7, 1_765_100_000_123_456, 0);
        assert_eq!(
            std::str::from_utf8(&p).unwrap(),
            r#"{"seq":7,"t":1765100000123,"tu":1765100000123456,"pad":""}"#
        );
        assert_eq!(parse_payload(&p), Some((7, Some(1_765_100_000_123_456))));
        // Milliseconds only, as devices that only know milliseconds write them.
        assert_eq!(
            parse_payload(br#"{"seq":3,"t":25}"#),
            Some((3, Some(25_000)))
        );
        assert_eq!(parse_payload(br#"{"seq":3}"#), Some((3, None)));
        assert_eq!(parse_payload(b"not json"), None);
    }

    #[test]
    fn totals_and_latency_over_devices() {
        let arrivals = |seqs: &[u64], sent: u64, lag: u64| -> Vec<Arrival> {
            seqs.iter()
                .map(|&seq| Arrival {
                    seq,
                    sent_us: Some((sent + seq) * 1000),
                    received_us: (sent + seq + lag) * 1000,
                })
                .collect()
        };
        let mut all = TelemetryCheck::new();
        all.add_device("a", &arrivals(&[0, 1, 2, 3], 1000, 2), 0..4);
        all.add_device("b", &arrivals(&[0, 2, 1, 1], 1000, 8), 0..4);
        assert_eq!((all.devices, all.expected, all.received), (2, 8, 8));
        assert_eq!((all.lost, all.duplicates, all.out_of_order), (1, 1, 1));
        assert_eq!(all.incomplete.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(all.incomplete["b"].lost_seqs, vec![3]);
        assert!(!all.is_clean());
        let latency = all.latency();
        assert_eq!(latency.count, 7);
        assert!((latency.p50_ms - 2.0).abs() < 0.01, "{latency:?}");
        assert!((latency.max_ms - 8.0).abs() < 0.01, "{latency:?}");
        // 7 delivered between the first send (1000) and the last arrival (1010).
        assert_eq!(
            (all.first_sent_us, all.last_received_us),
            (Some(1_000_000), Some(1_010_000))
        );
        assert!((all.messages_per_second() - 7000.0 / 10.0).abs() < 1e-6);
    }
}
