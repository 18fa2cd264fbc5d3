//! `GET /status` (what an operator asks first: is it up, how many devices in which status,
//! how full is the outbox) and `GET /metrics` (the same and the counters of every part, in
//! the Prometheus text format, version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::health::StoreView;
use super::AdminState;
use crate::downstream::contract::DeviceStatus;

/// `GET /status`
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    /// fleetgw version.
    pub version: &'static str,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Admission mode.
    pub admission_mode: String,
    /// Number of devices in each status (every status present, 0 included).
    pub devices: BTreeMap<&'static str, u64>,
    /// Telemetry messages in the outbox.
    pub outbox_messages: u64,
    /// Bytes in the outbox.
    pub outbox_bytes: u64,
    /// Devices the engine is driving or retrying.
    pub provisioning_active: u64,
    /// Upstream telemetry connections open.
    pub upstream_links: u64,
    /// Cloud sessions connected now (AWS: claim sessions), when the daemon knows them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_sessions_connected: Option<u64>,
    /// Cloud sessions configured (`cloud.aws.sessions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_sessions: Option<u64>,
    /// Devices connected to the embedded broker (absent with an external broker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_sessions: Option<u64>,
    /// The store's state (`ok` / `full`), as `GET /health` shows it.
    pub store: StoreView,
}

fn count_by_status(state: &AdminState) -> Result<BTreeMap<&'static str, u64>, ApiError> {
    let mut counts: BTreeMap<&'static str, u64> =
        DeviceStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for rec in state.store.devices() {
        *counts
            .entry(DeviceStatus::of(&rec?.state).as_str())
            .or_default() += 1;
    }
    Ok(counts)
}

/// `GET /status`
#[utoipa::path(get, path = "/status", responses((status = 200, body = StatusView)))]
pub async fn get_status(State(state): State<AdminState>) -> Result<Json<StatusView>, ApiError> {
    let s = state.clone();
    let devices = tokio::task::spawn_blocking(move || count_by_status(&s))
        .await
        .map_err(|e| ApiError::internal("counting devices", &e))??;
    let telemetry = state.telemetry.as_ref().map(|t| t()).unwrap_or_default();
    let cloud = state.cloud_sessions.as_ref().map(|c| c());
    Ok(Json(StatusView {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: state.uptime().as_secs(),
        admission_mode: state.mode.to_string(),
        devices,
        outbox_messages: state.store.outbox_len(),
        outbox_bytes: state.store.outbox_bytes(),
        provisioning_active: state.engine_stats().active,
        upstream_links: telemetry.open_connections,
        cloud_sessions_connected: cloud.map(|(connected, _)| connected as u64),
        cloud_sessions: cloud.map(|(_, configured)| configured as u64),
        broker_sessions: state.broker.as_ref().map(|b| b.sessions() as u64),
        store: StoreView::of(&state),
    }))
}

/// Writes one metric family: HELP, TYPE and its samples (`labels` pre-rendered, may be
/// empty).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

/// One Prometheus histogram family: `buckets` are (upper bound in seconds, count at or below
/// it), cumulative; the `+Inf` bucket and `_count` are `count`.
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    buckets: impl IntoIterator<Item = (f64, u64)>,
    sum_secs: f64,
    count: u64,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (le, n) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {sum_secs}");
    let _ = writeln!(out, "{name}_count {count}");
}

/// Request -> delivered latency as a Prometheus histogram (seconds), from the HDR histogram
/// (milliseconds).
fn latency_histogram(out: &mut String, h: &hdrhistogram::Histogram<u64>) {
    const BOUNDS_MS: [u64; 12] = [
        10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000,
    ];
    let buckets = BOUNDS_MS.map(|le| {
        let n = if h.is_empty() {
            0
        } else {
            h.count_between(0, le)
        };
        (le as f64 / 1000.0, n)
    });
    histogram(
        out,
        "fleetgw_provision_latency_seconds",
        "Time from a device's provisioning request to the delivery of its result.",
        buckets,
        h.mean() * h.len() as f64 / 1000.0,
        h.len(),
    );
}

/// The metrics text.
pub fn render_metrics(state: &AdminState) -> Result<String, ApiError> {
    let mut out = String::new();
    let e = state.engine_stats();
    let t = state.telemetry.as_ref().map(|t| t()).unwrap_or_default();
    let counts = count_by_status(state)?;
    let labels: Vec<(String, u64)> = counts
        .iter()
        .map(|(s, n)| (format!("status=\"{s}\""), *n))
        .collect();
    let by_status: Vec<(&str, u64)> = labels.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    family(
        &mut out,
        "fleetgw_devices",
        "gauge",
        "Devices by status.",
        &by_status,
    );
    family(
        &mut out,
        "fleetgw_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        &[("", state.uptime().as_secs())],
    );
    let counters: [(&str, &str, u64); 5] = [
        (
            "fleetgw_provision_delivered_total",
            "Devices provisioned since start.",
            e.provisioned,
        ),
        (
            "fleetgw_provision_failed_total",
            "Devices that failed since start.",
            e.failed,
        ),
        (
            "fleetgw_provision_rejected_requests_total",
            "Requests refused on /rejected without being stored.",
            e.rejected_requests,
        ),
        (
            "fleetgw_provision_answered_from_store_total",
            "Repeated requests answered from the store.",
            e.answered_from_store,
        ),
        (
            "fleetgw_provision_resumed_total",
            "Devices resumed from the store at start.",
            e.resumed,
        ),
    ];
    for (name, help, v) in counters {
        family(&mut out, name, "counter", help, &[("", v)]);
    }
    if let Some(engine) = &state.engine {
        let m = engine.measurements();
        let labels: Vec<(String, u64)> = m
            .calls
            .iter()
            .map(|(api, result, n)| (format!("api=\"{api}\",result=\"{result}\""), *n))
            .collect();
        let samples: Vec<(&str, u64)> = labels.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        family(
            &mut out,
            "fleetgw_provision_cloud_requests_total",
            "counter",
            "Provisioning calls to the cloud by API and result (ok, throttled, rejected, error).",
            &samples,
        );
        family(
            &mut out,
            "fleetgw_provision_throttled_total",
            "counter",
            "Throttling answers from the cloud.",
            &[("", m.throttled())],
        );
        latency_histogram(&mut out, &m.latency_ms);
    }
    family(
        &mut out,
        "fleetgw_provision_active",
        "gauge",
        "Devices queued, in progress or waiting for a retry.",
        &[("", e.active)],
    );
    let delay = &t.forward_delay;
    histogram(
        &mut out,
        crate::telemetry::delay::FORWARD_DELAY_METRIC,
        "Time a telemetry message spends in the gateway, from the broker reading the device's PUBLISH to its upstream write (messages handed over in memory).",
        delay.cumulative_seconds(),
        delay.sum_us as f64 / 1e6,
        delay.count(),
    );
    let refused = [
        ("reason=\"unknown\"", t.refused_unknown),
        ("reason=\"not_provisioned\"", t.refused_not_provisioned),
        ("reason=\"disabled\"", t.refused_disabled),
        ("reason=\"no_key\"", t.refused_no_key),
        ("reason=\"oversize\"", t.oversize),
    ];
    let tele: [(&str, &str, u64); 12] = [
        (
            "fleetgw_telemetry_received_total",
            "Telemetry messages taken from downstream.",
            t.received,
        ),
        (
            "fleetgw_telemetry_accepted_total",
            "Telemetry messages stored in the outbox and acknowledged.",
            t.accepted,
        ),
        (
            "fleetgw_telemetry_forwarded_total",
            "Telemetry messages acknowledged by the cloud.",
            t.forwarded,
        ),
        (
            "fleetgw_telemetry_dropped_full_total",
            "Messages deleted unsent by drop-oldest.",
            t.dropped_full,
        ),
        (
            "fleetgw_telemetry_expired_total",
            "Messages not sent because older than max_age.",
            t.expired,
        ),
        (
            "fleetgw_telemetry_undeliverable_total",
            "Messages whose device record is gone.",
            t.undeliverable,
        ),
        (
            "fleetgw_telemetry_refused_upstream_total",
            "Messages the cloud refused for good (PUBACK failure reason code, or over its maximum packet size).",
            t.refused_upstream,
        ),
        (
            "fleetgw_telemetry_backpressure_episodes_total",
            "Times the outbox was full under backpressure.",
            t.backpressure_episodes,
        ),
        (
            "fleetgw_commands_forwarded_total",
            "Cloud-to-device messages delivered downstream.",
            t.commands_forwarded,
        ),
        (
            "fleetgw_commands_failed_total",
            "Cloud-to-device messages the local broker did not take.",
            t.commands_failed,
        ),
        (
            "fleetgw_upstream_connects_total",
            "Upstream telemetry CONNACKs.",
            t.upstream_connects,
        ),
        (
            "fleetgw_upstream_disconnects_total",
            "Upstream telemetry connections lost or refused.",
            t.upstream_disconnects,
        ),
    ];
    family(
        &mut out,
        "fleetgw_telemetry_refused_total",
        "counter",
        "Telemetry messages refused, by reason.",
        &refused,
    );
    for (name, help, v) in tele {
        family(&mut out, name, "counter", help, &[("", v)]);
    }
    family(
        &mut out,
        "fleetgw_upstream_connections",
        "gauge",
        "Upstream telemetry connections open.",
        &[("", t.open_connections)],
    );
    family(
        &mut out,
        "fleetgw_outbox_messages",
        "gauge",
        "Messages in the outbox.",
        &[("", state.store.outbox_len())],
    );
    family(
        &mut out,
        "fleetgw_outbox_bytes",
        "gauge",
        "Encoded bytes in the outbox.",
        &[("", state.store.outbox_bytes())],
    );
    family(
        &mut out,
        "fleetgw_store_flushes_total",
        "counter",
        "Group-commit flushes since start.",
        &[("", state.store.flush_count())],
    );
    family(
        &mut out,
        "fleetgw_store_quarantined_total",
        "counter",
        "Undecodable store values (outbox entries, device records) moved to the quarantine tree since start.",
        &[("", state.store.quarantined())],
    );
    let health = state.store.health();
    family(
        &mut out,
        "fleetgw_store_full",
        "gauge",
        "1 while the state directory's disk has no room for the store (writes refused), else 0.",
        &[("", u64::from(health.full.is_some()))],
    );
    family(
        &mut out,
        "fleetgw_store_full_episodes_total",
        "counter",
        "Disk-full episodes of the store since start.",
        &[("", health.full_episodes)],
    );
    family(
        &mut out,
        "fleetgw_store_reopens_total",
        "counter",
        "Reopens of the store to recover from a full disk since start.",
        &[("", health.reopens)],
    );
    family(
        &mut out,
        "fleetgw_store_blobs_synced_total",
        "counter",
        "Files sled wrote outside its log (blobs/) fsynced by the group commit since start.",
        &[("", state.store.blobs_synced())],
    );
    if let Some(b) = &state.broker {
        let r = b.refusals();
        family(
            &mut out,
            "fleetgw_broker_sessions",
            "gauge",
            "Client sessions of the embedded broker.",
            &[("", b.sessions() as u64)],
        );
        family(
            &mut out,
            "fleetgw_broker_refused_total",
            "counter",
            "What the embedded broker refused; kind=\"connect\" counts local authentication failures.",
            &[
                ("kind=\"connect\"", r.connects),
                ("kind=\"publish\"", r.publishes),
                ("kind=\"subscribe\"", r.subscriptions),
            ],
        );
    }
    Ok(out)
}

/// `GET /metrics`
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain")))]
pub async fn get_metrics(State(state): State<AdminState>) -> Result<impl IntoResponse, ApiError> {
    let text = tokio::task::spawn_blocking(move || render_metrics(&state))
        .await
        .map_err(|e| ApiError::internal("rendering metrics", &e))??;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}
