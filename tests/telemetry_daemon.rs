//! The issue's zero-loss run against the real daemon: `fleetgw run` (a separate process, so it
//! can be SIGKILLed) with mosquitto as the external downstream broker and the AWS IoT emulator
//! as the cloud. Devices are provisioned through the daemon, then publish numbered QoS 1
//! telemetry; the emulator goes into outage in the middle, and the daemon is SIGKILLed and
//! restarted during the outage. Afterwards the emulator must hold every message, in per-device
//! order, with duplicates bounded by the in-flight window per kill/reconnect.
//!
//! mosquitto keeps what it acknowledged to devices in the gateway's persistent session while
//! the daemon is down (`max_queued_messages 0` lifts its default 1000-message cap), which is
//! what makes a kill lossless end to end. With the embedded broker the messages it has
//! acknowledged to devices but not yet handed to the gateway live in the killed process.
//!
//! Sized by `FLEETGW_BENCH_DEVICES` (50), `FLEETGW_BENCH_PER_DEVICE` (400) and
//! `FLEETGW_BENCH_OUTAGE_SECS` (10): 20,000 messages, which `scripts/test` runs every time;
//! `benches/telemetry.sh` runs it with the issue's figures (50 x 20,000, 60 s outage).

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use fleetgw::downstream::session::DEFAULT_MAX_UNCONFIRMED;
use fleetgw::emulator::aws::{self, AwsEmulatorHandle, AwsEmulatorOptions};
use fleetgw::emulator::telemetry_check::{self, Arrival, TelemetryCheck};

use common::mosquitto::{Mosquitto, MosquittoConfig};
use common::{env_or, now_ms};

const WINDOW: usize = 10;
/// mosquitto's `max_inflight_messages` for the gateway's session.
const MOSQUITTO_INFLIGHT: usize = 1000;

/// `fleetgw run` with the emulator's gateway.toml and test overrides.
struct Daemon {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, state_dir: &Path, broker_url: &str, log: PathBuf) -> Self {
        let sets = [
            "downstream.broker=\"external\"".to_string(),
            format!("downstream.url=\"{broker_url}\""),
            "admission.mode=\"open\"".to_string(),
            format!("gateway.state_dir=\"{}\"", state_dir.display()),
            format!("telemetry.inflight={WINDOW}"),
            "log.level=\"info\"".to_string(),
        ];
        let mut args = vec![
            "run".to_string(),
            "-c".to_string(),
            config.display().to_string(),
        ];
        for s in sets {
            args.push("--set".into());
            args.push(s);
        }
        let mut d = Self {
            child: None,
            args,
            log,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fleetgw"))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn fleetgw run");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGKILL: no shutdown path runs.
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn http(emu: &AwsEmulatorHandle, method: &str, path: &str, body: Option<&str>) -> Value {
    let addr = emu.api_addr();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(" 200 "), "{method} {path}: {head}\n{body}");
    serde_json::from_str(body).unwrap()
}

/// Provisions `id` through the daemon over the downstream broker; returns the thing name.
async fn provision(port: u16, id: &str, daemon: &Daemon) -> String {
    let mut o = MqttOptions::new(format!("prov-{id}"), "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 16);
    client
        .subscribe(format!("fleetgw/{id}/provision/json/+"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut subscribed = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    // With an external broker the daemon's session may subscribe after the device published
    // (mosquitto then drops the request); a repeated request is answered from the store, so
    // the device simply asks again until it gets an answer.
    let mut resend = tokio::time::interval(Duration::from_secs(2));
    loop {
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = resend.tick(), if subscribed => {
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
            "{id}: no provisioning answer; daemon log:\n{}",
            daemon.log()
        );
        match ev {
            Ok(Event::Incoming(Packet::SubAck(_))) => subscribed = true,
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let v: Value = serde_json::from_slice(&p.payload).unwrap();
                assert!(p.topic.ends_with("/accepted"), "{id}: {} {v}", p.topic);
                let _ = client.disconnect().await;
                return v["thingName"].as_str().unwrap().to_string();
            }
            Ok(_) => {}
            Err(e) => panic!("{id}: {e}"),
        }
    }
}

/// Publishes `{"seq":n,"t":ms,...}` (~200 bytes) for n in 0..count, 10 in flight; a persistent
/// session so the device itself loses nothing across broker hiccups.
async fn publish(port: u16, id: String, count: u64, acked_total: Arc<AtomicU64>) {
    let mut o = MqttOptions::new(format!("dev-{id}"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(WINDOW as u16);
    let (client, mut eventloop) = AsyncClient::new(o, 16);
    let topic = format!("fleetgw/{id}/telemetry");
    let publisher = tokio::spawn(async move {
        for n in 0..count {
            client
                .publish(
                    &topic,
                    QoS::AtLeastOnce,
                    false,
                    telemetry_check::payload(n, now_ms(), 200),
                )
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    while acked < count {
        match timeout(Duration::from_secs(600), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                acked += 1;
                acked_total.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("device {id}: {e}"),
            Err(_) => panic!("device {id}: only {acked} of {count} PUBACKs"),
        }
    }
    let client = publisher.await.unwrap();
    let _ = client.disconnect().await;
}

async fn emulator_total(emu: &AwsEmulatorHandle) -> u64 {
    http(emu, "GET", "/stats", None).await["messages"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sigkill_during_an_outage_loses_nothing() {
    let devices = env_or("FLEETGW_BENCH_DEVICES", 50) as usize;
    let per_device = env_or("FLEETGW_BENCH_PER_DEVICE", 400);
    let outage_secs = env_or("FLEETGW_BENCH_OUTAGE_SECS", 10);
    let total = devices as u64 * per_device;
    let dir = tempfile::tempdir().unwrap();
    let mut emu_opts = AwsEmulatorOptions::ephemeral(dir.path().join("emu"));
    emu_opts.max_messages = total as usize * 2 + 1000;
    let emu = aws::start(emu_opts).await.unwrap();
    let mosquitto = Mosquitto::start(&MosquittoConfig {
        extra: vec![
            "max_queued_messages 0".into(),
            format!("max_inflight_messages {MOSQUITTO_INFLIGHT}"),
            "max_packet_size 262144".into(),
        ],
        ..MosquittoConfig::anonymous()
    });
    let port = mosquitto.port();
    let mut daemon = Daemon::start(
        &emu.gateway_config_path(),
        &dir.path().join("state"),
        &mosquitto.url(),
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
    let deadline = Instant::now() + Duration::from_secs(600);
    while emulator_total(&emu).await < total / 3 {
        assert!(
            Instant::now() < deadline,
            "no progress; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    http(
        &emu,
        "POST",
        "/faults",
        Some(&format!(r#"{{"outageSeconds": {outage_secs}}}"#)),
    )
    .await;
    // Let the outbox fill (devices publish another sixth of the run, which mosquitto hands to
    // the daemon), then kill -9 and restart during the outage.
    // Devices may already be done (mosquitto acknowledges them whatever the daemon does): then
    // the outbox holds all it will get and the kill follows at once.
    let filled = (acked.load(Ordering::Relaxed) + total / 6).min(total);
    while acked.load(Ordering::Relaxed) < filled {
        assert!(
            Instant::now() < deadline,
            "devices stopped publishing during the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill9();
    daemon.spawn();
    for t in tasks {
        t.await.unwrap();
    }
    let published = started.elapsed();
    while emulator_total(&emu).await < total {
        assert!(
            Instant::now() < deadline,
            "not everything arrived; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();

    let mut check = TelemetryCheck::new();
    let mut worst = 0;
    let mut dup_ranges = Vec::new();
    for (id, thing) in &things {
        // The total above counts duplicates too: wait until this device is complete (or the
        // deadline passed, and the comparison below says what is missing).
        let list = loop {
            let list = http(&emu, "GET", &format!("/messages?clientId={thing}"), None).await;
            let distinct: HashSet<u64> = list
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|m| {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(m["payloadBase64"].as_str()?)
                        .ok()?;
                    Some(telemetry_check::parse_payload(&raw)?.0)
                })
                .collect();
            if distinct.len() as u64 >= per_device || Instant::now() >= deadline {
                break list;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let arrivals: Vec<Arrival> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(m["payloadBase64"].as_str().unwrap())
                    .unwrap();
                let (seq, sent_ms) = telemetry_check::parse_payload(&raw).unwrap();
                Arrival {
                    seq,
                    sent_ms,
                    received_ms: m["receivedAtMs"].as_u64().unwrap(),
                }
            })
            .collect();
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
        "DAEMON devices={devices} messages={total} outage_s={outage_secs} kills=1 \
         published_s={:.1} elapsed_s={:.1} msgs_per_s={:.0} p50_ms={} p99_ms={} \
         duplicates={duplicates} worst_device_duplicates={worst} lost=0",
        published.as_secs_f64(),
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        latency.p50_ms,
        latency.p99_ms,
    );
    // Loss and order are asserted above for every device; the duplicates are bounded too. A
    // copy is only a message in flight when the kill struck: downstream, one the gateway had
    // stored but whose PUBACK mosquitto had not yet processed, at most mosquitto's in-flight
    // window or the session's read-ahead, whichever is smaller (mosquitto 2.0.11 does not hold
    // to its window once acks flow; the read-ahead does, see src/downstream/session.rs);
    // upstream, each link's window.
    let downstream = MOSQUITTO_INFLIGHT.min(DEFAULT_MAX_UNCONFIRMED);
    let bound = downstream + devices * WINDOW;
    assert!(
        duplicates as usize <= bound,
        "{duplicates} duplicates (> downstream window {downstream} + {devices} x upstream \
         window {WINDOW}); worst device {worst}; duplicated ranges:\n{}",
        dup_ranges.join("\n")
    );
    drop(daemon);
    emu.shutdown().await;
}
