//! Reading the messages an emulator recorded (`GET /messages`): the payload, and for
//! sequence-numbered telemetry the arrival the checker counts.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use fleetgw::sim::arrival::{self, Arrival};
use serde_json::Value;

use super::http::http_within;

/// The payload of one recorded message (`payloadBase64`).
pub fn payload(message: &Value) -> Vec<u8> {
    let text = message["payloadBase64"]
        .as_str()
        .unwrap_or_else(|| panic!("no payloadBase64 in {message}"));
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_else(|e| panic!("payloadBase64 of {message}: {e}"))
}

/// One recorded `{"seq","t"}` telemetry message as an arrival: its sequence number, when it
/// was sent and when the emulator received it.
pub fn arrival(message: &Value) -> Arrival {
    let (seq, sent_us) = arrival::parse_payload(&payload(message)).expect("a {\"seq\"} payload");
    Arrival {
        seq,
        sent_us,
        received_us: message["receivedAtUs"].as_u64().unwrap(),
    }
}

/// The messages (`GET /messages` entries) the emulator whose API is at `api` recorded from
/// `client_id`, in arrival order; the request is bounded by `within`.
pub async fn recorded(api: SocketAddr, client_id: &str, within: Duration) -> Vec<Value> {
    let (status, list) = http_within(
        api,
        "GET",
        &format!("/messages?clientId={client_id}"),
        None,
        within,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    match list {
        Value::Array(messages) => messages,
        other => panic!("GET /messages answered {other}"),
    }
}

/// The payloads (UTF-8) the emulator whose API is at `api` recorded from `client_id`, in
/// arrival order; the request is bounded by `within`.
pub async fn recorded_payloads(api: SocketAddr, client_id: &str, within: Duration) -> Vec<String> {
    recorded(api, client_id, within)
        .await
        .iter()
        .map(|m| String::from_utf8(payload(m)).unwrap())
        .collect()
}
