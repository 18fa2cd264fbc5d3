//! The issue's zero-loss run against the real daemon: `fleetgw run` (a separate process, so it
//! can be SIGKILLed) with the AWS IoT emulator as the cloud, once with mosquitto as the
//! external downstream broker and once with the embedded broker (the default). Devices are
//! provisioned through the daemon, then publish numbered QoS 1 telemetry; the emulator goes
//! into outage in the middle, and the daemon is SIGKILLed and restarted during the outage.
//! Afterwards the emulator must hold every message, in per-device order, with duplicates
//! bounded by the in-flight windows per kill/reconnect.
//!
//! What makes a kill lossless differs by broker. mosquitto keeps what it acknowledged to
//! devices in the gateway's persistent session while the daemon is down
//! (`max_queued_messages 0` lifts its default 1000-message cap). The embedded broker dies with
//! the daemon, sessions included, but it acknowledges a device's QoS 1 PUBLISH only once the
//! gateway's session acknowledged it, i.e. once it is fsynced in the outbox (end-to-end
//! acknowledgement); what was not acknowledged yet the devices publish again after they
//! reconnect to the restarted daemon, which listens on the same port.
//!
//! The test devices therefore keep their unacknowledged messages themselves, like the
//! simulator (`src/sim/device.rs`): rumqttc 0.25 drops its pending publishes (including
//! requests still in its channel) when the broker answers a reconnect with no session present,
//! which a restarted embedded broker always does, so a persistent session on the device side
//! would not help; the devices use clean sessions and republish, in order, whatever was not
//! PUBACKed when the connection broke.
//!
//! Sized by `FLEETGW_BENCH_DEVICES` (50), `FLEETGW_BENCH_PER_DEVICE` (400) and
//! `FLEETGW_BENCH_OUTAGE_SECS` (10): 20,000 messages per broker, which `scripts/test` runs
//! every time; `benches/telemetry.sh` runs the mosquitto variant with the issue's figures
//! (50 x 20,000, 60 s outage).

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::Value;
use tokio::time::{timeout, timeout_at, Instant};

use fleetgw::downstream::session::DEFAULT_MAX_UNCONFIRMED;
use fleetgw::emulator::aws::{self, AwsEmulatorHandle, AwsEmulatorOptions};
use fleetgw::sim::arrival::{self, Arrival, TelemetryCheck};

use common::http::http_within;
use common::messages;
use common::mosquitto::{Mosquitto, MosquittoConfig};
use common::process::Fleetgw;
use common::{env_or, free_port};

const WINDOW: usize = 10;
/// mosquitto's `max_inflight_messages` for the gateway's session.
const MOSQUITTO_INFLIGHT: usize = 1000;
/// First pause before a device reconnects; doubles up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// Longest pause between a device's reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Bound of the whole run (and of every wait in it).
const RUN_LIMIT: Duration = Duration::from_secs(600);
/// How long the emulator's count may stand still, once every device has its PUBACKs, before
/// the run is checked as it is (and the missing sequence numbers are reported).
const STALL: Duration = Duration::from_secs(30);

/// The downstream broker the devices and the daemon meet on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum BrokerChoice {
    /// mosquitto as the external broker; it keeps running while the daemon is killed.
    Mosquitto,
    /// The daemon's embedded broker, which dies with the daemon and comes back on the same port.
    Embedded,
}

/// `fleetgw run` with the emulator's gateway.toml and test overrides; `downstream` are the
/// `--set` overrides choosing the broker.
fn start_daemon(config: &Path, state_dir: &Path, downstream: Vec<String>, log: PathBuf) -> Fleetgw {
    Fleetgw::run(config, log)
        .sets(downstream)
        .sets([
            "admission.mode=\"open\"".to_string(),
            format!("gateway.state_dir=\"{}\"", state_dir.display()),
            format!("telemetry.inflight={WINDOW}"),
            "log.level=\"info\"".to_string(),
        ])
        .spawn()
}

/// A request to the emulator's API that must succeed; the JSON answer.
async fn http(emu: &AwsEmulatorHandle, method: &str, path: &str, body: Option<&str>) -> Value {
    let addr = emu.api_addr();
    let (status, value) = http_within(addr, method, path, body, Duration::from_secs(60)).await;
    assert_eq!(status, 200, "{method} {path}: {value}");
    value
}

/// Provisions `id` through the daemon over the downstream broker and waits until its retained
/// status says `provisioned` (the gateway refuses telemetry before it recorded the delivery);
/// returns the thing name. Connection failures (the embedded broker not listening yet) are
/// retried with back-off.
async fn provision(port: u16, id: &str, daemon: &Fleetgw) -> String {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 16);
    let status_topic = format!("fleetgw/{id}/status");
    let mut subscribed = 0;
    let mut thing = None;
    let mut provisioned = false;
    let mut backoff = Backoff::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    // With an external broker the daemon's session may subscribe after the device published
    // (mosquitto then drops the request); a repeated request is answered from the store, so
    // the device simply asks again until it gets an answer.
    let mut resend = tokio::time::interval(Duration::from_secs(2));
    loop {
        if let (Some(thing), true) = (&thing, provisioned) {
            let _ = client.disconnect().await;
            return String::clone(thing);
        }
        let ev = tokio::select! {
            ev = timeout(Duration::from_secs(10), eventloop.poll()) => ev,
            _ = resend.tick(), if subscribed == 2 && thing.is_none() => {
                client
                    .publish(
                        format!("fleetgw/{id}/provision/json"),
                        QoS::AtLeastOnce,
                        false,
                        br#"{"attestation":{"type":"none"}}"#.to_vec(),
                    )
                    .await
                    .unwrap();
                continue;
            }
        };
        assert!(
            Instant::now() < deadline,
            "{id}: not provisioned (answer {thing:?}, status provisioned {provisioned}); \
             daemon log:\n{}",
            daemon.log()
        );
        match ev {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                // Clean session: subscribe on every connection.
                subscribed = 0;
                backoff.reset();
                client
                    .subscribe(format!("fleetgw/{id}/provision/json/+"), QoS::AtLeastOnce)
                    .await
                    .unwrap();
                client
                    .subscribe(status_topic.clone(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subscribed += 1,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == status_topic => {
                let v: Value = serde_json::from_slice(&p.payload).unwrap();
                provisioned = v["status"] == "provisioned";
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let v: Value = serde_json::from_slice(&p.payload).unwrap();
                assert!(p.topic.ends_with("/accepted"), "{id}: {} {v}", p.topic);
                thing = Some(v["thingName"].as_str().unwrap().to_string());
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(_)) => backoff.pause(deadline).await,
        }
    }
}

/// A device's reconnect back-off: jittered, doubling from [`BACKOFF_FIRST`] to [`BACKOFF_MAX`].
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(BACKOFF_FIRST)
    }

    fn reset(&mut self) {
        self.0 = BACKOFF_FIRST;
    }

    /// Sleeps the current pause (never past `deadline`) and doubles the next one.
    async fn pause(&mut self, deadline: Instant) {
        let jittered = self.0.mul_f64(rand::rng().random_range(0.5..1.0));
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        tokio::time::sleep_until((Instant::now() + jittered).min(deadline)).await;
    }
}

/// Publishes `{"seq":n,"t":ms,...}` (~200 bytes) for n in 0..count, at most [`WINDOW`]
/// unacknowledged, until every one is PUBACKed; returns how many times the connection broke.
///
/// A broken connection (the daemon and its embedded broker killed) is retried with back-off
/// until the broker listens again; every message not PUBACKed by then is published again, in
/// order, before new ones. The device keeps them itself because rumqttc drops its pending
/// publishes when the broker has no session for it (see the module docs), so the session is
/// clean and the device never publishes while disconnected.
async fn publish(port: u16, id: String, count: u64, acked_total: Arc<AtomicU64>) -> u32 {
    let mut o = MqttOptions::new(id.as_str(), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(WINDOW as u16);
    // Room for the whole window: `try_publish` below never finds the channel full.
    let (client, mut eventloop) = AsyncClient::new(o, WINDOW);
    let topic = format!("fleetgw/{id}/telemetry");
    let deadline = Instant::now() + RUN_LIMIT;
    let mut next = 0;
    // Handed to the client, waiting for their packet id (rumqttc reports them in order).
    let mut queued = VecDeque::new();
    let mut in_flight = HashMap::new();
    let mut resend = VecDeque::new();
    let mut connected = false;
    let mut acked = 0;
    let mut breaks = 0;
    let mut backoff = Backoff::new();
    while acked < count {
        while connected && queued.len() + in_flight.len() < WINDOW {
            let seq = match resend.pop_front() {
                Some(seq) => seq,
                None if next < count => {
                    next += 1;
                    next - 1
                }
                None => break,
            };
            client
                .try_publish(
                    &topic,
                    QoS::AtLeastOnce,
                    false,
                    arrival::payload(seq, fleetgw::clock::unix_us(), 200),
                )
                .unwrap();
            queued.push_back(seq);
        }
        let polled = timeout_at(deadline, eventloop.poll()).await;
        let Ok(polled) = polled else {
            panic!(
                "device {id}: only {acked} of {count} PUBACKs after {breaks} broken connections"
            );
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff.reset();
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(seq) = queued.pop_front() {
                    in_flight.insert(pkid, seq);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if in_flight.remove(&ack.pkid).is_some() {
                    acked += 1;
                    acked_total.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) => {}
            Err(_) => {
                if connected {
                    breaks += 1;
                }
                connected = false;
                let mut unacked: Vec<u64> = in_flight
                    .drain()
                    .map(|(_, seq)| seq)
                    .chain(queued.drain(..))
                    .chain(resend.drain(..))
                    .collect();
                unacked.sort_unstable();
                resend = unacked.into();
                backoff.pause(deadline).await;
            }
        }
    }
    let _ = client.disconnect().await;
    breaks
}

async fn emulator_total(emu: &AwsEmulatorHandle) -> u64 {
    http(emu, "GET", "/stats", None).await["messages"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sigkill_during_an_outage_loses_nothing() {
    sigkill_during_an_outage(BrokerChoice::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sigkill_with_the_embedded_broker_loses_nothing() {
    sigkill_during_an_outage(BrokerChoice::Embedded).await;
}

/// How long before the outage the messages the emulator took may still be sent again after
/// the kill: the outbox's chunk compaction age (250 ms) with as much again to spare.
const RECENT_BEFORE_OUTAGE_US: u64 = 500_000;

/// The whole run with `broker` downstream: provision, publish, outage, kill -9 and restart
/// during the outage, then check every device's sequence on the emulator.
async fn sigkill_during_an_outage(broker: BrokerChoice) {
    let devices = env_or("FLEETGW_BENCH_DEVICES", 50) as usize;
    let per_device = env_or("FLEETGW_BENCH_PER_DEVICE", 400);
    let outage_secs = env_or("FLEETGW_BENCH_OUTAGE_SECS", 10);
    let total = devices as u64 * per_device;
    let dir = tempfile::tempdir().unwrap();
    let mut emu_opts = AwsEmulatorOptions::ephemeral(dir.path().join("emu"));
    emu_opts.max_messages = total as usize * 2 + 1000;
    let emu = aws::start(emu_opts).await.unwrap();
    let (mosquitto, port, downstream) = match broker {
        BrokerChoice::Mosquitto => {
            let mosquitto = Mosquitto::start(&MosquittoConfig {
                extra: vec![
                    "max_queued_messages 0".into(),
                    format!("max_inflight_messages {MOSQUITTO_INFLIGHT}"),
                    "max_packet_size 262144".into(),
                ],
                ..MosquittoConfig::anonymous()
            });
            let sets = vec![
                "downstream.broker=\"external\"".to_string(),
                format!("downstream.url=\"{}\"", mosquitto.url()),
            ];
            let port = mosquitto.port();
            (Some(mosquitto), port, sets)
        }
        BrokerChoice::Embedded => {
            // Chosen before the first start so the restarted daemon listens where the devices
            // reconnect.
            let port = free_port();
            let sets = vec![
                "downstream.broker=\"embedded\"".to_string(),
                format!("downstream.listen=\"127.0.0.1:{port}\""),
            ];
            (None, port, sets)
        }
    };
    let daemon = start_daemon(
        &emu.gateway_config_path(),
        &dir.path().join("state"),
        downstream,
        std::env::var_os("FLEETGW_BENCH_DAEMON_LOG")
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.path().join("fleetgw.log")),
    );

    let mut things = Vec::new();
    for i in 0..devices {
        let id = format!("sensor-{i:03}");
        let thing = provision(port, &id, &daemon).await;
        things.push((id, thing));
    }

    let started = Instant::now();
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (id, _) in &things {
        tasks.push(tokio::spawn(publish(
            port,
            id.clone(),
            per_device,
            acked.clone(),
        )));
    }
    let deadline = Instant::now() + RUN_LIMIT;
    while emulator_total(&emu).await < total / 3 {
        assert!(
            Instant::now() < deadline,
            "no progress; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outage_from_us = fleetgw::clock::unix_us();
    http(
        &emu,
        "POST",
        "/faults",
        Some(&format!(r#"{{"outageSeconds": {outage_secs}}}"#)),
    )
    .await;
    let outage_us = outage_from_us..=fleetgw::clock::unix_us();
    // Let the outbox fill (devices publish another sixth of the run, which the broker hands to
    // the daemon), then kill -9 and restart during the outage.
    // Devices may already be done (mosquitto acknowledges them whatever the daemon does): then
    // the outbox holds all it will get and the kill follows at once. With the embedded broker
    // a device's PUBACK means the message is in the outbox, so this waits for the outbox.
    let filled = (acked.load(Ordering::Relaxed) + total / 6).min(total);
    while acked.load(Ordering::Relaxed) < filled {
        assert!(
            Instant::now() < deadline,
            "devices stopped publishing during the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked_at_kill = acked.load(Ordering::Relaxed);
    daemon.kill9();
    daemon.restart();
    let mut breaks = 0;
    for t in tasks {
        breaks += t.await.unwrap();
    }
    let published = started.elapsed();
    // Every device has its PUBACKs: the rest is the outbox draining after the outage. A total
    // that stops growing means messages are missing; the per-device check below says which.
    let mut last = (0, Instant::now());
    loop {
        let arrived = emulator_total(&emu).await;
        if arrived >= total {
            break;
        }
        if arrived > last.0 {
            last = (arrived, Instant::now());
        }
        if last.1.elapsed() > STALL || Instant::now() >= deadline {
            eprintln!("only {arrived} of {total} arrived; no progress for {STALL:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained = Instant::now();
    let elapsed = started.elapsed();

    let mut check = TelemetryCheck::new();
    // Messages the emulator took in the last moments before the outage, and copies of those it
    // took earlier (see the bounds below).
    let mut just_before_outage = 0usize;
    let mut copies_of_older = 0usize;
    let recent_from = outage_us.start().saturating_sub(RECENT_BEFORE_OUTAGE_US);
    let mut worst = 0;
    let mut dup_ranges = Vec::new();
    for (id, thing) in &things {
        // The total above counts duplicates too: wait until this device is complete (or the
        // arrivals stalled, and the comparison below says what is missing).
        let list = loop {
            let list = http(&emu, "GET", &format!("/messages?clientId={thing}"), None).await;
            let distinct: HashSet<u64> = list
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|m| Some(arrival::parse_payload(&messages::payload(m))?.0))
                .collect();
            if distinct.len() as u64 >= per_device || drained.elapsed() > STALL {
                break list;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let arrivals: Vec<Arrival> = list
            .as_array()
            .unwrap()
            .iter()
            .map(messages::arrival)
            .collect();
        just_before_outage += arrivals
            .iter()
            .filter(|a| (recent_from..=*outage_us.end()).contains(&a.received_us))
            .count();
        // Copies of messages the emulator first took well before the outage.
        let mut first = HashMap::<u64, u64>::new();
        for a in &arrivals {
            let at = *first.entry(a.seq).or_insert(a.received_us);
            if at != a.received_us && at < recent_from {
                copies_of_older += 1;
            }
        }
        let device = check.add_device(id, &arrivals, 0..per_device);
        assert!(
            device.complete_in_order(),
            "{id}: lost or reordered: {device:?}"
        );
        worst = worst.max(device.duplicates as usize);
        if device.duplicates > 0 {
            // Which sequence numbers came twice, for the failure message: a range that starts
            // below what the emulator had before the outage points at redelivery downstream.
            let mut counts = std::collections::HashMap::<u64, u32>::new();
            for a in &arrivals {
                *counts.entry(a.seq).or_default() += 1;
            }
            let twice = counts.iter().filter(|(_, n)| **n > 1).map(|(s, _)| *s);
            let (lo, hi) = twice.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
            dup_ranges.push(format!("{id}: {} in seq {lo}..={hi}", device.duplicates));
        }
    }
    let duplicates = check.duplicates;
    let latency = check.latency();
    eprintln!(
        "DAEMON broker={broker:?} devices={devices} messages={total} outage_s={outage_secs} \
         kills=1 acked_at_kill={acked_at_kill} device_reconnects={breaks} published_s={:.1} \
         elapsed_s={:.1} msgs_per_s={:.0} p50_ms={} p99_ms={} duplicates={duplicates} \
         worst_device_duplicates={worst} just_before_outage={just_before_outage} \
         copies_of_older={copies_of_older} lost=0",
        published.as_secs_f64(),
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        latency.p50_ms,
        latency.p99_ms,
    );
    // Loss and order are asserted above for every device; the duplicates are bounded too. A
    // copy is only a message in flight when the kill struck. Upstream, on either broker: one
    // the emulator had taken but whose PUBACK the daemon had not yet turned into a deletion
    // from the outbox, at most each link's window (one link per device); and one the emulator
    // had taken whose outbox chunk still held messages waiting for the outage to end. A chunk
    // holds the messages of many devices; once it is older than 250 ms it is written again
    // without its sent messages at the next deletion (src/store/chunk.rs), and the outage
    // stopped the deletions: so the messages taken in the last 250 ms or so before it (counted
    // with room to spare). Downstream:
    // - mosquitto: one the gateway had stored but whose PUBACK mosquitto had not yet
    //   processed, at most mosquitto's in-flight window or the session's read-ahead, whichever
    //   is smaller (mosquitto 2.0.11 does not hold to its window once acks flow; the read-ahead
    //   does, see src/downstream/session/read_ahead.rs);
    // - embedded: one the gateway had stored but whose PUBACK had not reached the device
    //   before the broker died; the device publishes it again after reconnecting, and it can
    //   only be among the device's own unacknowledged messages, at most its window.
    let downstream = match broker {
        BrokerChoice::Mosquitto => MOSQUITTO_INFLIGHT.min(DEFAULT_MAX_UNCONFIRMED),
        BrokerChoice::Embedded => devices * WINDOW,
    };
    let windows = downstream + devices * WINDOW;
    assert!(
        copies_of_older <= windows,
        "{copies_of_older} copies of messages the cloud took more than \
         {RECENT_BEFORE_OUTAGE_US} us before the outage (> downstream window {downstream} + \
         {devices} x upstream window {WINDOW}); duplicated ranges:\n{}",
        dup_ranges.join("\n")
    );
    let bound = windows + just_before_outage;
    assert!(
        duplicates as usize <= bound,
        "{duplicates} duplicates (> downstream window {downstream} + {devices} x upstream \
         window {WINDOW} + {just_before_outage} taken by the cloud just before the outage); \
         worst device {worst}; duplicated ranges:\n{}",
        dup_ranges.join("\n")
    );
    // The restarted daemon came up and took over the outbox the killed one left.
    let log = daemon.log();
    assert_eq!(
        log.matches("fleetgw ready").count(),
        2,
        "daemon log:\n{log}"
    );
    assert!(
        log.contains("telemetry outbox holds messages from before"),
        "the restart did not resume the outbox; daemon log:\n{log}"
    );
    if broker == BrokerChoice::Embedded {
        assert_eq!(
            log.matches("embedded broker listening").count(),
            2,
            "daemon log:\n{log}"
        );
        // Devices still publishing when the kill struck lost their connection with the
        // broker and reconnected to the restarted one.
        assert!(breaks > 0, "no device saw the broker go away");
    }
    drop(daemon);
    drop(mosquitto);
    emu.shutdown().await;
}
