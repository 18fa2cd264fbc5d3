//! The Azure emulator's inspection and fault API: plain HTTP/JSON on `--api` (axum).
//!
//! | route | answer |
//! |---|---|
//! | `GET /registrations` | `[{"registrationId","deviceId","assignedHub","status","attestation"}]` |
//! | `GET /messages[?after=SEQ&limit=N]` | `[{"seq","deviceId","clientId","transport","payloadBase64","properties","receivedAtMs"}]`, arrival order |
//! | `GET /stats` | connection, DPS and per-client counters, `recentRefusals` |
//! | `GET /faults`, `POST /faults`, `DELETE /faults` | as the AWS emulator: `{"outageSeconds"?,"tps"?,"responseDelayMs"?,"dropResponses"?}` |
//! | `POST /devices/{deviceId}/messages[?name=value...]` | body = payload: a cloud-to-device message on `devices/{deviceId}/messages/devicebound/{properties}` for the device's MQTT connection -> `{"deviceId","topic","bytes","connected"}` (`connected`: the device has a hub MQTT connection now; delivered only if it subscribed) |
//!
//! Errors are `{"error": "..."}` with status 400 (404 for an unknown device).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::hub::{self, CloudToDevice, Context, Counters, Transport};
use super::registry::Attestation;
use crate::emulator::api::{bad_request, fault_routes, FaultTarget};
use crate::emulator::faults::Faults;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The emulator's shared context.
    pub ctx: Arc<Context>,
    /// The `--tps` the emulator started with (restored by `DELETE /faults`).
    pub default_tps: Option<f64>,
}

/// The API routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/registrations", get(registrations))
        .route("/messages", get(messages))
        .route("/stats", get(stats))
        .route("/faults", fault_routes())
        .route("/devices/{id}/messages", post(cloud_to_device))
        .with_state(state)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RegistrationView {
    registration_id: String,
    device_id: String,
    assigned_hub: String,
    status: String,
    attestation: Attestation,
}

async fn registrations(State(s): State<ApiState>) -> Response {
    let list: Vec<RegistrationView> = s
        .ctx
        .registry
        .all()
        .into_iter()
        .map(|r| RegistrationView {
            registration_id: r.registration_id,
            device_id: r.device_id,
            assigned_hub: r.assigned_hub,
            status: r.status,
            attestation: r.attestation,
        })
        .collect();
    Json(list).into_response()
}

#[derive(Deserialize)]
struct MessagesQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageView {
    seq: u64,
    device_id: String,
    client_id: String,
    transport: Transport,
    payload_base64: String,
    properties: BTreeMap<String, String>,
    received_at_ms: u64,
    /// The same arrival time in unix microseconds, for latencies of a few milliseconds.
    received_at_us: u64,
}

async fn messages(State(s): State<ApiState>, Query(q): Query<MessagesQuery>) -> Response {
    let list: Vec<MessageView> = s
        .ctx
        .messages
        .messages(None, q.after, q.limit.unwrap_or(usize::MAX))
        .into_iter()
        .map(|m| MessageView {
            seq: m.seq,
            payload_base64: base64::engine::general_purpose::STANDARD.encode(&m.message.payload),
            device_id: m.message.device_id,
            client_id: m.client_id,
            transport: m.message.transport,
            properties: m.message.properties,
            received_at_ms: m.received_at_us / 1000,
            received_at_us: m.received_at_us,
        })
        .collect();
    Json(list).into_response()
}

async fn stats(State(s): State<ApiState>) -> Response {
    let c = &s.ctx.counters;
    let (messages_total, clients) = s.ctx.messages.stats();
    Json(json!({
        "connections": {
            "total": Counters::get(&c.connections_total),
            "refused": Counters::get(&c.connections_refused),
            "closedByPolicy": Counters::get(&c.closed_by_policy),
            "hubSessions": s.ctx.hub_sessions(),
        },
        "dps": {
            "registrations": Counters::get(&c.registrations),
            "polls": Counters::get(&c.polls),
            "throttled": Counters::get(&c.throttled),
            "droppedResponses": Counters::get(&c.dropped_responses),
            "assigned": s.ctx.registry.all().len(),
        },
        "messages": messages_total,
        "c2dDelivered": Counters::get(&c.c2d_delivered),
        "clients": clients,
        "recentRefusals": s.ctx.refusals(),
    }))
    .into_response()
}

/// `/faults` acts on DPS's rate limit.
impl FaultTarget for ApiState {
    fn faults(&self) -> &Faults {
        &self.ctx.faults
    }

    fn tps(&self) -> Option<f64> {
        self.ctx.dps.tps()
    }

    fn set_tps(&self, tps: Option<f64>) {
        self.ctx.dps.set_tps(tps);
    }

    fn default_tps(&self) -> Option<f64> {
        self.default_tps
    }
}

/// Queues a cloud-to-device message: query parameters become its properties.
async fn cloud_to_device(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Query(properties): Query<HashMap<String, String>>,
    payload: axum::body::Bytes,
) -> Response {
    let Some(registration) = s.ctx.registry.get(&id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("device {id:?} is not registered") })),
        )
            .into_response();
    };
    if payload.len() > hub::MAX_MESSAGE_BYTES {
        return bad_request(format!(
            "cloud-to-device message of {} bytes exceeds {} bytes",
            payload.len(),
            hub::MAX_MESSAGE_BYTES
        ));
    }
    let properties: BTreeMap<String, String> = properties.into_iter().collect();
    let topic = format!(
        "devices/{}/messages/devicebound/{}",
        registration.device_id,
        hub::encode_properties(&properties)
    );
    let bytes = payload.len();
    let connected = s.ctx.has_session(&registration.device_id);
    s.ctx.send_to_device(CloudToDevice {
        device: registration.device_id.to_ascii_lowercase(),
        topic: topic.clone(),
        payload,
    });
    Json(json!({
        "deviceId": registration.device_id,
        "topic": topic,
        "bytes": bytes,
        "connected": connected,
    }))
    .into_response()
}
