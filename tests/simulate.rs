//! `fleetgw simulate` and `fleetgw demo` as users run them: real processes (`fleetgw emulate
//! aws`, `fleetgw run`, `fleetgw simulate`), real sockets on 127.0.0.1, and the emulator's
//! inspection API as the judge of what the cloud ended up with.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use fleetgw::sim::arrival;
use serde_json::Value;

use common::free_port;
use common::http::http_within;
use common::messages;
use common::process::{EmulatorProcess, Fleetgw, FLEETGW};
use common::wait::eventually;

fn fleetgw() -> Command {
    Command::new(FLEETGW)
}

/// `GET path` on the emulator's API; the JSON body of a 200 answer.
async fn get_json(emulator: &EmulatorProcess, path: &str) -> Value {
    let (status, body) =
        http_within(emulator.api, "GET", path, None, Duration::from_secs(10)).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// The AWS emulator in its own process with free ports.
async fn start_emulator(dir: &Path) -> EmulatorProcess {
    let log = dir.join("emulator.log");
    EmulatorProcess::start(&dir.join("cloud"), log, |l| l.env("RUST_LOG", "warn")).await
}

/// `fleetgw run` against the emulator's gateway.toml with the device broker on a free port;
/// returns once the broker accepts connections.
async fn start_gateway(dir: &Path) -> (Fleetgw, SocketAddr) {
    let port = free_port();
    let config = dir.join("cloud").join("gateway.toml");
    let gateway = Fleetgw::run(&config, dir.join("gateway.log"))
        .env("RUST_LOG", "warn")
        .sets([
            format!("downstream.listen=127.0.0.1:{port}"),
            "cloud.aws.tps=1000".to_string(),
        ])
        .spawn();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    eventually(
        "the gateway's device broker",
        Duration::from_secs(30),
        || {
            gateway.assert_running();
            TcpStream::connect(addr).ok()
        },
    )
    .await;
    (gateway, addr)
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} exited with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_provisions_every_device_through_a_running_gateway() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let emulator = start_emulator(dir).await;
    let (_gateway, broker) = start_gateway(dir).await;
    let summary = dir.join("simulate.json");
    let ca = dir.join("cloud").join("ca.pem");

    let out = fleetgw()
        .args([
            "simulate",
            "--broker",
            &broker.to_string(),
            "--devices",
            "30",
            "--cbor-share",
            "0.5",
            "--own-csr-share",
            "0.5",
            "--ca",
            ca.to_str().unwrap(),
            "--run",
            "e2e",
            "--resend-secs",
            "2",
            "--timeout",
            "60",
            "--json",
            summary.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_success(&out, "fleetgw simulate");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("provisioned"), "{table}");

    let json = read_json(&summary);
    assert_eq!(json["devices"], 30);
    assert_eq!(json["provisioned"], 30, "{json}");
    assert_eq!(json["failed"], 0, "{json}");
    assert_eq!(json["cborDevices"], 15);
    assert_eq!(json["ownCsrDevices"], 15);
    assert!(json["p50Ms"].as_f64().unwrap() > 0.0);

    // The cloud has exactly one thing per device, each with one certificate.
    let things = get_json(&emulator, "/things").await;
    let things = things.as_array().unwrap();
    assert_eq!(things.len(), 30, "{things:?}");
    let names: BTreeSet<&str> = things
        .iter()
        .map(|t| t["thingName"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<String> = (1..=30).map(|n| format!("sim-e2e-{n}")).collect();
    assert_eq!(
        names,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    for thing in things {
        assert_eq!(
            thing["certificateIds"].as_array().unwrap().len(),
            1,
            "{thing}"
        );
    }
}

#[test]
fn demo_provisions_every_device_and_writes_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let summary = tmp.path().join("demo.json");
    let out = fleetgw()
        .args([
            "demo",
            "--devices",
            "50",
            "--messages",
            "30",
            "--json",
            summary.to_str().unwrap(),
        ])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert_success(&out, "fleetgw demo");
    // The first command a user runs prints its table, not a warning about a missing group.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("admin.group"), "{stderr}");
    let json = read_json(&summary);
    assert_eq!(json["devices"], 50, "{json}");
    assert_eq!(json["provisioned"], 50, "{json}");
    assert_eq!(json["failed"], 0, "{json}");
    assert_eq!(json["things"], 50, "{json}");
    let p50 = json["p50Ms"].as_f64().unwrap();
    let p99 = json["p99Ms"].as_f64().unwrap();
    assert!(p50 > 0.0 && p99 >= p50, "{json}");
    assert!(json["seconds"].as_f64().unwrap() > 0.0);
    assert!(json["devicesPerSecond"].as_f64().unwrap() > 0.0);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("things in the emulator"), "{table}");

    // The telemetry phase: the 25 devices whose key the gateway made (the demo's own-CSR
    // share is one half) sent 30 messages each, and the emulator has every one.
    assert_eq!(json["telemetryDevices"], 25, "{json}");
    assert_eq!(json["messages"], 25 * 30, "{json}");
    assert_eq!(json["lost"], 0, "{json}");
    assert_eq!(json["duplicates"], 0, "{json}");
    assert_eq!(json["outOfOrder"], 0, "{json}");
    let rate = json["messagesPerSecond"].as_f64().unwrap();
    assert!(rate > 0.0, "{json}");
    let t50 = json["telemetryP50Ms"].as_f64().unwrap();
    let t99 = json["telemetryP99Ms"].as_f64().unwrap();
    assert!(t50 > 0.0 && t99 >= t50 && t99 < 60_000.0, "{json}");
    for row in [
        "telemetry messages",
        "messages/s",
        "device-to-cloud p50 / p99",
        "lost",
        "duplicates",
    ] {
        assert!(table.contains(row), "{row}: {table}");
    }

    // Without --keep nothing is left behind in the temp dir but our own summary.
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("demo.json")]);
}

/// `fleetgw demo --provider azure`: DPS with the symmetric-key group, telemetry to IoT Hub.
/// Every device (own CSR or not) is registered once and sends telemetry under SAS tokens.
#[test]
fn demo_with_azure_registers_every_device_in_dps_and_delivers_all_telemetry() {
    let tmp = tempfile::tempdir().unwrap();
    let summary = tmp.path().join("demo.json");
    let out = fleetgw()
        .args([
            "demo",
            "--provider",
            "azure",
            "--devices",
            "30",
            "--messages",
            "10",
            "--json",
            summary.to_str().unwrap(),
        ])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert_success(&out, "fleetgw demo --provider azure");
    let json = read_json(&summary);
    assert_eq!(json["provisioned"], 30, "{json}");
    assert_eq!(json["failed"], 0, "{json}");
    assert_eq!(
        json["things"], 30,
        "one DPS registration per device: {json}"
    );
    assert_eq!(json["telemetryDevices"], 30, "{json}");
    assert_eq!(json["messages"], 30 * 10, "{json}");
    assert_eq!(json["lost"], 0, "{json}");
    assert_eq!(json["duplicates"], 0, "{json}");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("DPS registrations"), "{table}");
}

/// The telemetry phase end to end: every device whose key the gateway made publishes 40
/// numbered messages after provisioning; `--emulator-api` makes simulate check the cloud side
/// itself, and the test checks it again from the emulator's message log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_telemetry_arrives_complete_and_in_order_at_the_emulator() {
    const PER_DEVICE: u64 = 40;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let emulator = start_emulator(dir).await;
    let (_gateway, broker) = start_gateway(dir).await;
    let api = format!("http://{}", emulator.api);
    let summary = dir.join("simulate.json");

    let out = fleetgw()
        .args([
            "simulate",
            "--broker",
            &broker.to_string(),
            "--devices",
            "20",
            "--own-csr-share",
            "0.25",
            "--run",
            "tel",
            "--resend-secs",
            "2",
            "--messages",
            &PER_DEVICE.to_string(),
            "--message-window",
            "5",
            "--payload-bytes",
            "300",
            "--emulator-api",
            &api,
            "--json",
            summary.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_success(&out, "fleetgw simulate --messages");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("device-to-cloud p50 / p99"), "{table}");

    // Own-CSR devices (5 of 20) sit the phase out: the gateway cannot connect as them.
    let json = read_json(&summary);
    assert_eq!(json["provisioned"], 20, "{json}");
    assert_eq!(json["telemetryDevices"], 15, "{json}");
    assert_eq!(json["messages"], 15 * PER_DEVICE, "{json}");
    assert_eq!(json["messagesAcked"], 15 * PER_DEVICE, "{json}");
    assert_eq!(json["lost"], 0, "{json}");
    assert_eq!(json["outOfOrder"], 0, "{json}");
    assert!(json["messagesPerSecond"].as_f64().unwrap() > 0.0, "{json}");
    let p50 = json["telemetryP50Ms"].as_f64().unwrap();
    assert!(
        p50 > 0.0 && json["telemetryP99Ms"].as_f64().unwrap() >= p50,
        "{json}"
    );

    // The emulator's own record: every sequence number of every publishing device, first
    // arrivals in order, on the device's upstream topic, under its thing name.
    let messages = get_json(&emulator, "/messages").await;
    let mut by_client: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for m in messages.as_array().unwrap() {
        let client = m["clientId"].as_str().unwrap().to_string();
        assert_eq!(
            m["topic"].as_str().unwrap(),
            format!("dt/{client}/telemetry"),
            "{m}"
        );
        let raw = messages::payload(m);
        assert_eq!(raw.len(), 300);
        let (seq, _) = arrival::parse_payload(&raw).unwrap();
        by_client.entry(client).or_default().push(seq);
    }
    // The thing name is the device id; which devices brought their own CSR follows from
    // the device number alone.
    let mut plan = fleetgw::sim::FleetOptions::new("127.0.0.1", 1, 20);
    plan.run = "tel".into();
    plan.own_csr_share = 0.25;
    let publishers: BTreeSet<String> = (1..=20)
        .map(|n| plan.plan(n).unwrap())
        .filter(|p| !p.own_csr)
        .map(|p| p.id.as_str().to_string())
        .collect();
    assert_eq!(
        by_client.keys().cloned().collect::<BTreeSet<_>>(),
        publishers
    );
    for (client, seqs) in &by_client {
        let check = arrival::check_sequence(seqs.iter().copied(), 0..PER_DEVICE);
        assert!(check.complete_in_order(), "{client}: {check:?}");
        assert_eq!((check.lost, check.expected), (0, PER_DEVICE), "{client}");
    }
}

#[test]
fn simulate_exits_1_and_lists_failures_when_devices_fail() {
    // Nothing listens on the port: every device times out while connecting.
    let port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let summary = tmp.path().join("s.json");
    let out = fleetgw()
        .args([
            "simulate",
            "--broker",
            &format!("127.0.0.1:{port}"),
            "--devices",
            "3",
            "--timeout",
            "1",
            "--run",
            "down",
            "--json",
            summary.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("first failures:"), "{stderr}");
    for n in 1..=3 {
        assert!(
            stderr.contains(&format!(
                "sim-down-{n}: no answer within 1s while connecting"
            )),
            "{stderr}"
        );
    }
    let json = read_json(&summary);
    assert_eq!(
        (json["provisioned"].as_u64(), json["failed"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(json["failures"].as_array().unwrap().len(), 3);
}

#[test]
fn simulate_refuses_bad_arguments_with_usage_errors() {
    for (args, needle) in [
        (vec!["--broker", "nohost", "--devices", "1"], "--broker"),
        (
            vec![
                "--broker",
                "127.0.0.1:1",
                "--devices",
                "1",
                "--cbor-share",
                "2",
            ],
            "--cbor-share",
        ),
        (
            vec![
                "--broker",
                "127.0.0.1:1",
                "--devices",
                "1",
                "--attestation",
                "x509",
            ],
            "--x509-ca-cert",
        ),
        (
            vec![
                "--broker",
                "127.0.0.1:1",
                "--devices",
                "1",
                "--ca",
                "/nonexistent/ca.pem",
            ],
            "/nonexistent/ca.pem",
        ),
    ] {
        let out = fleetgw().arg("simulate").args(&args).output().unwrap();
        assert!(
            matches!(out.status.code(), Some(64) | Some(74)),
            "{args:?}: {out:?}"
        );
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
