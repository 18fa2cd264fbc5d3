//! The simulated downstream device fleet: thousands of MQTT devices that provision themselves
//! through a gateway exactly as real sensors would, and check what they get back. It stands in
//! for the hardware on the downstream side, as `emulator` stands in for the cloud upstream.
//!
//! Used by `fleetgw simulate` (its own process), `fleetgw demo` (in-process, next to the AWS
//! emulator and the daemon), the integration tests and the benchmarks. Each device:
//!
//! 1. connects to the gateway's local broker (client id = device id, optional TLS and
//!    username/password, `{id}` in either is replaced by the device id so per-device broker
//!    credentials work),
//! 2. subscribes to `{p}/{id}/provision/{fmt}/+` (`/accepted` and `/rejected`; with
//!    `watch_status` also `{p}/{id}/status`) and waits for the SUBACK (the gateway answers only
//!    once, so subscribing late loses the answer),
//! 3. publishes its request (JSON or CBOR; the gateway generates the key, or the device sends
//!    its own CSR; attestation none, symmetric key or X.509),
//! 4. verifies the answer: the certificate parses, carries the device's own key or the returned
//!    private key, chains to the cloud CA when one is given, and a thing name is present.
//!
//! A connection lost before the answer is re-established with jittered exponential back-off
//! and the request is re-published after re-subscribing: the gateway answers a repeated request
//! with the stored result, so a daemon restart in the middle of a run (the crash tests) only
//! delays devices. A `/rejected` answer with status 429 or 5xx is retried the same way; any
//! other rejection fails the device with the gateway's `errorCode` and message.
//!
//! Scale: one tokio task per device drives that device's rumqttc event loop directly (no extra
//! task, no OS thread per device); `max_in_flight` bounds how many devices are between connect
//! and answer at once, and `rate` paces how many start per second. Everything about a device
//! (id, payload format, own CSR or not) follows from its index, so runs are reproducible.
//! Each device subscribes to one filter (`/accepted` and `/rejected` together), as a careful
//! device would; the status topic is opt-in.
//!
//! The per-device loop is a small stage machine (connecting, subscribing, waiting for the
//! answer, publishing telemetry) on one connection. With [`FleetOptions::telemetry`] set, a
//! provisioned device waits for its retained status to say `provisioned` (the gateway records
//! the delivery only after answering, and refuses telemetry until then), then publishes
//! `messages_per_device` QoS 1 messages on
//! `{p}/{id}/telemetry`, paced by `rate`, at most `window` unacknowledged, each carrying its
//! sequence number and send time (the payload of [`arrival::payload`]), so the cloud
//! side can be checked for loss, duplication and order with [`arrival`]. Messages not
//! acknowledged when the connection drops are published again after the reconnect (clean
//! session: the broker forgets them), so the gateway may see duplicates but never a gap.
//! The `max_in_flight` slot of a device is freed once it is provisioned, so telemetry does
//! not hold back provisioning of the rest of the fleet.
//!
//! Layout, dependencies running one way: `latency` (the latency histogram and its summary) is
//! a leaf and `arrival` (the telemetry payload and the cloud-side check for loss, duplication
//! and order) uses only it; `plan` (the options of a run, each device's plan and the request
//! it builds) stands alone; `report` (outcomes, failures, totals) uses `plan` and `arrival`;
//! `device` (the run of one device) uses `plan`, `report` and `arrival`; this file starts the
//! fleet ([`run_fleet`]) and waits for its telemetry to reach the cloud
//! ([`wait_for_delivery`]).

pub mod arrival;
mod device;
mod latency;
mod plan;
mod report;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::downstream::TopicPrefix;
use crate::identity;

pub use latency::LatencySummary;
pub use plan::{
    default_run_label, DevicePlan, FleetOptions, SimAttestation, SimCloud, SimError, TelemetryPlan,
};
pub use report::{
    DeviceFailure, DeviceTelemetry, FailureReason, FleetEvent, FleetReport, Stage, TelemetryReport,
};

use arrival::{FetchError, TelemetryCheck};
use device::{start_devices, Fleet};
use report::{DeviceReport, Tally};

/// How long one request to the emulator's API may take.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two looks at the emulator while waiting for delivery.
const POLL: Duration = Duration::from_millis(100);

/// Runs the fleet: starts every device (paced by `rate`, at most `max_in_flight` at once),
/// calls `progress` once per device as it finishes (on the caller's task, in finishing order),
/// and returns the totals once every device is provisioned or has given up.
pub async fn run_fleet(
    opts: FleetOptions,
    progress: impl Fn(FleetEvent),
) -> Result<FleetReport, SimError> {
    opts.validate()?;
    let plans = (1..=opts.devices)
        .map(|n| opts.plan(n))
        .collect::<Result<Vec<_>, _>>()?;
    let tls = opts
        .broker_ca_pem
        .as_deref()
        .map(|ca| identity::tls::client_config(ca, None))
        .transpose()
        .map_err(SimError::BrokerTls)?;
    let mut tally = Tally::new(&plans, opts.telemetry.as_ref());
    let prefix = TopicPrefix::new(&opts.topic_prefix).map_err(|e| SimError::InvalidOption {
        option: "prefix",
        reason: e.to_string(),
    })?;
    let after_fleet = opts.telemetry.as_ref().is_some_and(|t| t.after_fleet);
    let (gate, telemetry_gate) = watch::channel(!after_fleet);
    let shared = Arc::new(Fleet {
        opts,
        prefix,
        tls,
        telemetry_gate,
    });

    let started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut spawner = AbortOnDrop(tokio::spawn(start_devices(shared, plans, tx)));
    while let Some(report) = rx.recv().await {
        let event = match report {
            DeviceReport::Provisioning(outcome) => {
                let event = tally.record(outcome);
                if tally.provisioning_done() {
                    tally.provisioning_elapsed.get_or_insert(started.elapsed());
                    gate.send_replace(true);
                }
                event
            }
            DeviceReport::Telemetry(done) => Some(tally.record_telemetry(done)),
        };
        if let Some(event) = event {
            progress(event);
        }
    }
    // Every sender is gone: all device tasks ended. A task that panicked sent nothing.
    let join_error = (&mut spawner.0).await.err().map(|e| e.to_string());
    for event in tally.account_for_lost(join_error) {
        progress(event);
    }
    let elapsed = tally
        .provisioning_elapsed
        .unwrap_or_else(|| started.elapsed());
    Ok(tally.finish(elapsed))
}

/// Aborts the spawner (and with its JoinSet, every device task) when a run is dropped midway.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits until the emulator at `api_url` holds every message of `report` (or `within`
/// passes), then returns the check. The gateway acknowledges a device's message once it is
/// stored, before the cloud has it, so the cloud side lags the fleet's PUBACKs; polling
/// `GET /stats` first keeps the full message fetch to (almost) once.
pub async fn wait_for_delivery(
    api_url: &str,
    report: &TelemetryReport,
    within: Duration,
) -> Result<TelemetryCheck, FetchError> {
    let deadline = tokio::time::Instant::now() + within;
    let base = api_url.trim_end_matches('/');
    let stats_url = format!("{base}/stats");
    // Every published message may arrive, so wait for their count (duplicates count too).
    loop {
        let total = tokio::time::timeout(API_TIMEOUT, arrival::http_get(&stats_url))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
            .and_then(|v| v["messages"].as_u64());
        if total.is_some_and(|n| n >= report.published) || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    loop {
        let check = report.check(&arrival::fetch_arrivals(api_url, API_TIMEOUT).await?);
        if check.lost == 0 || tokio::time::Instant::now() >= deadline {
            return Ok(check);
        }
        tokio::time::sleep(POLL * 5).await;
    }
}
