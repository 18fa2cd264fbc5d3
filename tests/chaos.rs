//! Chaos: `fleetgw run` is SIGKILLed and restarted at random points while devices provision and
//! send telemetry. Checked at the end: every device provisioned exactly once (one thing each,
//! attached to one certificate), every telemetry message a device had acknowledged reached the
//! cloud (the emulator), and the store opened cleanly after every kill (opened by this test
//! between kill and restart, every record decoding). Orphaned certificates (issued by the
//! cloud, lost with a killed daemon before it stored them, so the device got another) are
//! counted and reported per kill; they are bounded by `certificates_in_flight` per kill.
//!
//! Sized by `FLEETGW_CHAOS_ITERATIONS` (kills, default 3), `FLEETGW_CHAOS_DEVICES` (6) and
//! `FLEETGW_CHAOS_MESSAGES` (messages per device at least, 30; devices go on until the last
//! kill): the short run of `scripts/test`.
//! `scripts/chaos --iterations N` runs it longer against the release build (panic=abort).
//! Devices publish one QoS 1 message at a time and publish it again, on a new connection,
//! until it is PUBACKed: a PUBACK from the embedded broker means the message is fsynced in the
//! outbox, so the test knows exactly what the gateway promised.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use rumqttc::QoS;
use serde_json::Value;
use tokio::time::Instant;

use common::device::{connect_retrying, provision};
use common::http::http_within;
use common::messages;
use common::mqtt_client::ClientEvent;
use common::process::{EmulatorProcess, Fleetgw};
use common::{env_or, free_port};
use fleetgw::store::{Store, StoreOptions};

/// Range of the random pause before each kill, in milliseconds.
const KILL_EVERY_MS: std::ops::Range<u64> = 100..1200;
/// Bound of the whole run.
const RUN_LIMIT: Duration = Duration::from_secs(900);

async fn api(emu: &EmulatorProcess, path: &str) -> Value {
    let (status, v) = http_within(emu.api, "GET", path, None, Duration::from_secs(60)).await;
    assert_eq!(status, 200, "GET {path}: {v}");
    v
}

/// Sends `{"seq":n}` for n = 0, 1, ..., one at a time, each until it is PUBACKed (reconnecting
/// while the daemon is down), at least `count` and until the kills are `done`; returns how
/// many. Counts every PUBACK in `acked`.
async fn telemetry(
    port: u16,
    id: String,
    count: u64,
    acked: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
) -> u64 {
    let topic = format!("fleetgw/{id}/telemetry");
    let deadline = Instant::now() + RUN_LIMIT;
    let mut dev = connect_retrying(&id, port, RUN_LIMIT).await;
    let mut n = 0;
    while n < count || !done.load(Ordering::Relaxed) {
        loop {
            assert!(
                Instant::now() < deadline,
                "{id}: message {n} never acknowledged"
            );
            let payload = format!(r#"{{"seq":{n}}}"#).into_bytes();
            let sent = dev
                .client
                .publish(&topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_ok();
            let ev = if sent {
                dev.next_matching_within(Duration::from_secs(10), |e| {
                    matches!(e, ClientEvent::PubAck(_) | ClientEvent::Closed(_))
                })
                .await
            } else {
                None
            };
            if matches!(ev, Some(ClientEvent::PubAck(_))) {
                acked.fetch_add(1, Ordering::Relaxed);
                n += 1;
                break;
            }
            // Killed daemon (or silence): a new connection, the same message again.
            dev = connect_retrying(&id, port, deadline - Instant::now()).await;
        }
    }
    let _ = dev.client.disconnect().await;
    n
}

/// Opens the store of the killed daemon and decodes every device record.
fn store_opens(state: &Path) -> usize {
    let store = Store::open(state, &StoreOptions::default())
        .unwrap_or_else(|e| panic!("the store does not open after a kill: {e}"));
    let devices: Vec<_> = store
        .devices()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("a device record after a kill: {e}"));
    assert_eq!(store.quarantined(), 0, "a kill left an undecodable record");
    devices.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_and_duplicates_no_device_and_no_telemetry() {
    let iterations = env_or("FLEETGW_CHAOS_ITERATIONS", 3);
    let devices = env_or("FLEETGW_CHAOS_DEVICES", 6) as usize;
    let per_device = env_or("FLEETGW_CHAOS_MESSAGES", 30);
    let tmp = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start_in(tmp.path()).await;
    let state = tmp.path().join("state");
    let port = free_port();
    let daemon = Fleetgw::run(&emu.gateway_config(), tmp.path().join("gw.log"))
        .embedded_open(&state, &tmp.path().join("admin.sock"), port)
        .sets(["log.level=\"info\""])
        .spawn();

    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..devices {
        let id = format!("chaos-{i}");
        let acked = Arc::clone(&acked);
        let done = Arc::clone(&done);
        // Devices come online spread over the kills, so kills hit provisioning too.
        let delay =
            Duration::from_millis(KILL_EVERY_MS.end / 2 * iterations * i as u64 / devices as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let thing = provision(port, &id, RUN_LIMIT).await;
            let sent = telemetry(port, id.clone(), per_device, acked, done).await;
            (id, thing, sent)
        }));
    }

    // The kills: at random points while the devices work, each followed by a store check.
    let mut kills = 0u64;
    let started = Instant::now();
    while kills < iterations {
        let pause = Duration::from_millis(rand::rng().random_range(KILL_EVERY_MS));
        tokio::time::sleep(pause).await;
        daemon.kill9();
        kills += 1;
        let stored = store_opens(&state);
        eprintln!(
            "CHAOS kill {kills} at {:.1}s: {stored} device records, {} messages acknowledged",
            started.elapsed().as_secs_f64(),
            acked.load(Ordering::Relaxed)
        );
        daemon.restart();
    }
    done.store(true, Ordering::Relaxed);
    let mut things = HashMap::new();
    for t in tasks {
        let (id, thing, sent) = tokio::time::timeout(RUN_LIMIT, t)
            .await
            .expect("devices finish")
            .unwrap();
        things.insert(id, (thing, sent));
    }

    // Devices: one thing each, with exactly one certificate attached.
    let listed = api(&emu, "/things").await;
    let mut per_thing: HashMap<String, Vec<String>> = HashMap::new();
    for t in listed.as_array().unwrap() {
        let certs = t["certificateIds"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        per_thing.insert(t["thingName"].as_str().unwrap().to_string(), certs);
    }
    assert_eq!(
        per_thing.len(),
        devices,
        "one thing per device: {per_thing:?}"
    );
    for (id, (thing, _)) in &things {
        let certs = per_thing
            .get(thing)
            .unwrap_or_else(|| panic!("{id}: no thing"));
        assert_eq!(certs.len(), 1, "{id}: certificates {certs:?}");
    }
    let certificates = api(&emu, "/certificates").await.as_array().unwrap().len();
    let orphaned = certificates.saturating_sub(devices);

    // Telemetry: every sequence number of every device at the emulator (duplicates allowed).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut duplicates = 0;
    let mut total = 0;
    for (id, (thing, sent)) in &things {
        let per_device = *sent;
        total += per_device;
        loop {
            let list = api(&emu, &format!("/messages?clientId={thing}")).await;
            let seqs: Vec<u64> = list
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|m| {
                    let v: Value = serde_json::from_slice(&messages::payload(m)).ok()?;
                    v["seq"].as_u64()
                })
                .collect();
            let distinct: HashSet<u64> = seqs.iter().copied().collect();
            if distinct.len() as u64 == per_device {
                duplicates += seqs.len() - distinct.len();
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: {} of {per_device} messages reached the cloud; missing {:?}",
                distinct.len(),
                (0..per_device)
                    .filter(|n| !distinct.contains(n))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    daemon.assert_running();
    eprintln!(
        "CHAOS kills={kills} devices={devices} lost_devices=0 duplicated_devices=0 \
         messages={} lost_messages=0 duplicate_messages={duplicates} certificates={certificates} \
         orphaned_certificates={orphaned} orphaned_per_kill={:.2} elapsed_s={:.1}",
        total,
        orphaned as f64 / kills.max(1) as f64,
        started.elapsed().as_secs_f64()
    );
}
