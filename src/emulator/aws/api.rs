//! The emulator's inspection and fault-injection API: plain HTTP/JSON on `--api` (axum).
//!
//! | route | answer |
//! |---|---|
//! | `GET /things` | `[{"thingName","attributes","certificateIds","templateName","createdAtMs"}]` |
//! | `GET /certificates` | `[{"certificateId","status","createdAtMs","tokenExpiresAtMs","thingName"?}]` |
//! | `GET /messages[?clientId=&after=SEQ&limit=N]` | `[{"seq","clientId","topic","payloadBase64","qos","properties","receivedAtMs"}]`, arrival order; `properties`: the MQTT 5 properties by the Azure emulator's names (user properties by name, `$.ct` content type, `$.cid` correlation data, `$.ce` `utf-8` for payload format 1) |
//! | `GET /stats` | connection, request and per-client counters |
//! | `GET /faults` | the faults in force |
//! | `POST /faults` | `{"outageSeconds"?,"tps"?,"responseDelayMs"?,"dropResponses"?}` -> faults in force |
//! | `DELETE /faults` | clears every fault (tps back to `--tps`) |
//! | `POST /topics/{topic}[?qos=0\|1&contentType=&responseTopic=]` | body = payload: the data plane's HTTPS Publish, delivered to the device connections subscribed to `topic` -> `{"topic","qos","bytes"}`; MQTT 5 properties as IoT Core's Publish API takes them: headers `x-amz-mqtt5-user-properties` (base64 of a JSON array of one-pair objects), `x-amz-mqtt5-correlation-data` (base64), `x-amz-mqtt5-payload-format-indicator` (`UTF8_DATA` or `UNSPECIFIED_BYTES`) |
//!
//! Errors are `{"error": "..."}` with status 400.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::counters::Counters;
use super::server::{CloudPublish, ServerContext, MAX_PAYLOAD_BYTES};
use super::state::CertificateStatus;
use crate::emulator::api::{bad_request, fault_routes, FaultTarget};
use crate::emulator::faults::Faults;
use crate::mqtt::props::MessageProperties;

/// What the API handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The server's shared context.
    pub ctx: Arc<ServerContext>,
    /// The `--tps` the emulator started with (restored by `DELETE /faults`).
    pub default_tps: Option<f64>,
}

/// The API routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/things", get(things))
        .route("/certificates", get(certificates))
        .route("/messages", get(messages))
        .route("/stats", get(stats))
        .route("/faults", fault_routes())
        .route("/topics/{*topic}", post(publish))
        .with_state(state)
}

async fn things(State(s): State<ApiState>) -> Response {
    Json(s.ctx.registry.things()).into_response()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertificateView {
    certificate_id: String,
    status: CertificateStatus,
    created_at_ms: u64,
    token_expires_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    thing_name: Option<String>,
}

async fn certificates(State(s): State<ApiState>) -> Response {
    let list: Vec<CertificateView> = s
        .ctx
        .registry
        .certificates()
        .into_iter()
        .map(|c| CertificateView {
            thing_name: c.registration.map(|r| r.thing_name),
            certificate_id: c.certificate_id,
            status: c.status,
            created_at_ms: c.created_at_ms,
            token_expires_at_ms: c.token_expires_at_ms,
        })
        .collect();
    Json(list).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessagesQuery {
    client_id: Option<String>,
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageView {
    seq: u64,
    client_id: String,
    topic: String,
    payload_base64: String,
    qos: u8,
    properties: BTreeMap<String, String>,
    received_at_ms: u64,
    /// The same arrival time in unix microseconds, for latencies of a few milliseconds.
    received_at_us: u64,
}

async fn messages(State(s): State<ApiState>, Query(q): Query<MessagesQuery>) -> Response {
    let list: Vec<MessageView> = s
        .ctx
        .messages
        .messages(
            q.client_id.as_deref(),
            q.after,
            q.limit.unwrap_or(usize::MAX),
        )
        .into_iter()
        .map(|m| MessageView {
            seq: m.seq,
            payload_base64: base64::engine::general_purpose::STANDARD.encode(&m.message.payload),
            client_id: m.client_id,
            topic: m.message.topic,
            qos: m.message.qos,
            properties: m.message.properties,
            received_at_ms: m.received_at_us / 1000,
            received_at_us: m.received_at_us,
        })
        .collect();
    Json(list).into_response()
}

async fn stats(State(s): State<ApiState>) -> Response {
    let c = &s.ctx.counters;
    let (certificates, things) = s.ctx.registry.counts();
    let (messages_total, clients) = s.ctx.messages.stats();
    Json(json!({
        "connections": {
            "open": Counters::get(&c.connections_open),
            "total": Counters::get(&c.connections_total),
            "refused": Counters::get(&c.connections_refused),
            "closedByPolicy": Counters::get(&c.connections_closed_by_policy),
            "sessions": s.ctx.open_sessions(),
        },
        "requests": {
            "createCertificateFromCsr": Counters::get(&c.create_from_csr),
            "createKeysAndCertificate": Counters::get(&c.create_keys),
            "registerThing": Counters::get(&c.register_thing),
            "accepted": Counters::get(&c.accepted),
            "rejected": Counters::get(&c.rejected),
            "throttled": Counters::get(&c.throttled),
            "droppedResponses": Counters::get(&c.dropped_responses),
        },
        "certificates": certificates,
        "things": things,
        "messages": messages_total,
        "clients": clients,
    }))
    .into_response()
}

/// `/faults` acts on the provisioning APIs' rate limit.
impl FaultTarget for ApiState {
    fn faults(&self) -> &Faults {
        &self.ctx.faults
    }

    fn tps(&self) -> Option<f64> {
        self.ctx.provisioning.tps()
    }

    fn set_tps(&self, tps: Option<f64>) {
        self.ctx.provisioning.set_tps(tps);
    }

    fn default_tps(&self) -> Option<f64> {
        self.default_tps
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PublishQuery {
    #[serde(default)]
    qos: u8,
    content_type: Option<String>,
    response_topic: Option<String>,
}

/// The MQTT 5 properties of a Publish API call (see the module table).
fn publish_properties(
    q: &PublishQuery,
    headers: &HeaderMap,
) -> Result<Option<MessageProperties>, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let header = |name: &str| -> Result<Option<&str>, String> {
        headers
            .get(name)
            .map(|v| v.to_str().map_err(|_| format!("header {name} is not text")))
            .transpose()
    };
    let mut p = MessageProperties {
        content_type: q.content_type.clone(),
        response_topic: q.response_topic.clone(),
        ..Default::default()
    };
    if let Some(v) = header("x-amz-mqtt5-user-properties")? {
        let json = b64
            .decode(v.trim())
            .map_err(|e| format!("x-amz-mqtt5-user-properties is not base64: {e}"))?;
        let pairs: Vec<BTreeMap<String, String>> = serde_json::from_slice(&json).map_err(|e| {
            format!("x-amz-mqtt5-user-properties is not a JSON array of name-value objects: {e}")
        })?;
        for pair in pairs {
            p.user_properties.extend(pair);
        }
    }
    if let Some(v) = header("x-amz-mqtt5-correlation-data")? {
        let data = b64
            .decode(v.trim())
            .map_err(|e| format!("x-amz-mqtt5-correlation-data is not base64: {e}"))?;
        p.correlation_data = Some(data.into());
    }
    match header("x-amz-mqtt5-payload-format-indicator")? {
        None => {}
        Some("UTF8_DATA") => p.payload_format_indicator = Some(1),
        Some("UNSPECIFIED_BYTES") => p.payload_format_indicator = Some(0),
        Some(other) => {
            return Err(format!(
            "x-amz-mqtt5-payload-format-indicator {other:?} is not UTF8_DATA or UNSPECIFIED_BYTES"
        ))
        }
    }
    Ok((!p.is_empty()).then_some(p))
}

/// The data plane's Publish (`POST /topics/{topic}?qos=1`, body = payload): what an
/// application or a rule sends to devices, e.g. a command on `cmd/{thingName}/...`.
async fn publish(
    State(s): State<ApiState>,
    Path(topic): Path<String>,
    Query(q): Query<PublishQuery>,
    headers: HeaderMap,
    payload: axum::body::Bytes,
) -> Response {
    let properties = match publish_properties(&q, &headers) {
        Ok(p) => p,
        Err(e) => return bad_request(format!("publish: {e}")),
    };
    if topic.is_empty() || topic.contains(['+', '#']) || topic.starts_with('$') {
        return bad_request(format!(
            "publish: topic {topic:?} must be a topic name: not empty, no wildcards, not reserved ($)"
        ));
    }
    if q.qos > 1 {
        return bad_request(format!("publish: qos {} is not supported (0 or 1)", q.qos));
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        return bad_request(format!(
            "publish: payload of {} bytes exceeds {MAX_PAYLOAD_BYTES} bytes",
            payload.len()
        ));
    }
    let bytes = payload.len();
    s.ctx.publish(CloudPublish {
        topic: topic.clone(),
        qos: q.qos,
        payload,
        properties,
    });
    Json(json!({ "topic": topic, "qos": q.qos, "bytes": bytes })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(content_type: Option<&str>) -> PublishQuery {
        PublishQuery {
            qos: 1,
            content_type: content_type.map(str::to_string),
            response_topic: None,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, value.parse().unwrap());
        }
        h
    }

    #[test]
    fn publish_api_properties_are_read_as_iot_core_takes_them() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let users = b64.encode(r#"[{"a":"1"},{"b":"2"},{"a":"3"}]"#);
        let p = publish_properties(
            &query(Some("text/plain")),
            &headers(&[
                ("x-amz-mqtt5-user-properties", &users),
                ("x-amz-mqtt5-correlation-data", &b64.encode("c-1")),
                ("x-amz-mqtt5-payload-format-indicator", "UTF8_DATA"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            p.user_properties,
            vec![
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string()),
                ("a".to_string(), "3".to_string())
            ]
        );
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(p.payload_format_indicator, Some(1));
        assert!(publish_properties(&query(None), &HeaderMap::new())
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_publish_api_properties_are_refused_naming_the_header() {
        for (name, value) in [
            ("x-amz-mqtt5-user-properties", "not base64!"),
            ("x-amz-mqtt5-user-properties", "eyJhIjoxfQ=="), // {"a":1}: not an array
            ("x-amz-mqtt5-correlation-data", "%%%"),
            ("x-amz-mqtt5-payload-format-indicator", "TEXT"),
        ] {
            let e = publish_properties(&query(None), &headers(&[(name, value)])).unwrap_err();
            assert!(e.contains(name), "{e}");
        }
    }
}
