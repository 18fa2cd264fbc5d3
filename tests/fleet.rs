//! The simulated device fleet (`sim::run_fleet`) against a real broker (the
//! gateway's embedded broker; mosquitto where the broker must be restarted) and a small in-test
//! gateway stand-in (the responder, `fleet_support`): what devices send, what they accept, and
//! why they fail when the answer is wrong.
//!
//! The responder issues certificates with a test CA exactly as the gateway's contract says
//! (own CSR -> certificate only; no CSR -> certificate and private key), and runs the real
//! admission code on every request, so the attestations the simulator makes are checked by the
//! same code the daemon uses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetgw::admission::{Admission, AdmissionMode, AdmissionOptions};
use fleetgw::identity::{CertificateAuthority, Secret};
use fleetgw::sim::arrival;
use fleetgw::sim::{
    run_fleet, FailureReason, FleetEvent, FleetOptions, SimAttestation, Stage, TelemetryPlan,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

mod common;
mod fleet_support;

use common::wait::eventually;
use fleet_support::{embedded_broker, options, start_responder, Script};

/// A mosquitto broker on a free loopback port, killed on drop.
struct TestBroker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    /// `None` (with a notice) when mosquitto is not installed.
    fn start() -> Option<Self> {
        Self::start_on(common::free_port())
    }

    /// On a given port (a restart of a stopped broker).
    fn start_on(port: u16) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n"),
        )
        .unwrap();
        let child = match Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("NOTICE: mosquitto not installed; skipping");
                return None;
            }
            Err(e) => panic!("start mosquitto: {e}"),
        };
        let broker = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(broker)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_is_provisioned_with_a_verified_certificate() {
    let broker = embedded_broker().await;
    let ca = Arc::new(CertificateAuthority::generate("test cloud CA").unwrap());
    let seen = start_responder(broker.listen_addr(), ca.clone(), Script::default()).await;

    let mut opts = options(broker.listen_addr(), 40, "ok");
    opts.cbor_share = 0.5;
    opts.own_csr_share = 0.5;
    opts.cloud_ca_pem = Some(ca.cert_pem().to_string());
    opts.max_in_flight = 16;
    let events = Mutex::new(Vec::new());
    let report = run_fleet(opts, |e| events.lock().unwrap().push(e))
        .await
        .unwrap();

    assert_eq!(report.failures, vec![], "{:#?}", report.failures);
    assert_eq!(
        (report.devices, report.provisioned, report.failed),
        (40, 40, 0)
    );
    assert!(report.all_provisioned());
    assert_eq!(
        (
            report.json_devices,
            report.cbor_devices,
            report.own_csr_devices
        ),
        (20, 20, 20)
    );
    assert_eq!(report.latency.count, 40);
    assert!(report.latency.p50_ms > 0.0 && report.latency.p99_ms >= report.latency.p50_ms);
    let events = events.into_inner().unwrap();
    assert_eq!(events.len(), 40);
    let things: BTreeSet<String> = events
        .iter()
        .map(|e| match e {
            FleetEvent::Provisioned { thing_name, .. } => thing_name.clone(),
            FleetEvent::Failed(f) => panic!("{f}"),
            FleetEvent::Telemetry(t) => panic!("no telemetry phase was asked for: {t:?}"),
        })
        .collect();
    assert_eq!(things.len(), 40);
    assert!(things.contains("thing-sim-ok-1") && things.contains("thing-sim-ok-40"));

    // One request per device, and every combination of format and key origin occurred.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.requests.len(), 40);
    let mut combos = BTreeMap::new();
    for (id, requests) in &seen.requests {
        assert_eq!(requests.len(), 1, "{id}: {requests:?}");
        *combos.entry(requests[0].clone()).or_insert(0) += 1;
    }
    assert_eq!(
        combos,
        BTreeMap::from([
            (("cbor".to_string(), false), 10),
            (("cbor".to_string(), true), 10),
            (("json".to_string(), false), 10),
            (("json".to_string(), true), 10),
        ])
    );
    let summary = report.to_json();
    assert_eq!(summary["provisioned"], 40);
    assert_eq!(summary["failed"], 0);
    assert!(summary["devicesPerSecond"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_answers_fail_their_device_with_the_reason() {
    let broker = embedded_broker().await;
    let ca = Arc::new(CertificateAuthority::generate("test cloud CA").unwrap());
    let script = Script {
        reject: BTreeSet::from([2]),
        wrong_key: BTreeSet::from([3, 4]),
        foreign_ca: BTreeSet::from([5]),
        ..Script::default()
    };
    start_responder(broker.listen_addr(), ca.clone(), script).await;
    let mut opts = options(broker.listen_addr(), 8, "bad");
    opts.own_csr_share = 0.5;
    opts.cloud_ca_pem = Some(ca.cert_pem().to_string());
    let report = run_fleet(opts, |_| {}).await.unwrap();

    assert_eq!(
        (report.provisioned, report.failed),
        (4, 4),
        "{:#?}",
        report.failures
    );
    let reasons: BTreeMap<u32, FailureReason> = report
        .failures
        .iter()
        .map(|f| (f.n, f.reason.clone()))
        .collect();
    assert_eq!(
        reasons[&2],
        FailureReason::Rejected {
            status_code: 400,
            error_code: "InvalidCsr".into(),
            error_message: "CSR signature does not verify".into()
        }
    );
    let own = |n: u32| {
        let plan = FleetOptions {
            devices: 8,
            own_csr_share: 0.5,
            ..options(broker.listen_addr(), 8, "bad")
        }
        .plan(n)
        .unwrap();
        plan.own_csr
    };
    let expected_mismatch = |n: u32| {
        FailureReason::KeyMismatch(if own(n) {
            "the device's own key"
        } else {
            "the returned private key"
        })
    };
    assert_eq!(reasons[&3], expected_mismatch(3));
    assert_eq!(reasons[&4], expected_mismatch(4));
    assert!(
        matches!(&reasons[&5], FailureReason::Chain(m) if !m.is_empty()),
        "{:?}",
        reasons[&5]
    );
    assert!(!report.all_provisioned());
    let text = reasons[&2].to_string();
    assert!(text.contains("400 InvalidCsr"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_rejections_are_retried() {
    let broker = embedded_broker().await;
    let ca = Arc::new(CertificateAuthority::generate("test cloud CA").unwrap());
    let script = Script {
        transient_first: true,
        ..Script::default()
    };
    let seen = start_responder(broker.listen_addr(), ca.clone(), script).await;
    let report = run_fleet(options(broker.listen_addr(), 5, "retry"), |_| {})
        .await
        .unwrap();
    assert_eq!(
        (report.provisioned, report.failed),
        (5, 0),
        "{:#?}",
        report.failures
    );
    assert_eq!(report.resent_requests, 5);
    assert!(seen.lock().unwrap().requests.values().all(|r| r.len() == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_requests_are_sent_again() {
    let broker = embedded_broker().await;
    let ca = Arc::new(CertificateAuthority::generate("test cloud CA").unwrap());
    let script = Script {
        ignore_first: true,
        ..Script::default()
    };
    let seen = start_responder(broker.listen_addr(), ca.clone(), script).await;
    let mut opts = options(broker.listen_addr(), 3, "resend");
    opts.resend_after = Some(Duration::from_secs(1));
    let report = run_fleet(opts, |_| {}).await.unwrap();
    assert_eq!(
        (report.provisioned, report.failed),
        (3, 0),
        "{:#?}",
        report.failures
    );
    assert_eq!(report.resent_requests, 3);
    assert!(report.latency.p50_ms >= 1000.0, "{:?}", report.latency);
    assert!(seen.lock().unwrap().requests.values().all(|r| r.len() == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_reconnect_resubscribe_and_resend_after_a_broker_restart() {
    let Some(broker) = TestBroker::start() else {
        return;
    };
    let ca = Arc::new(CertificateAuthority::generate("test cloud CA").unwrap());
    let spy = start_responder(
        broker.addr(),
        ca.clone(),
        Script {
            silent: true,
            ..Script::default()
        },
    )
    .await;
    // Devices go through a relay, so that they can be kept out of the restarted broker until
    // the new responder has subscribed: a request resent before that would reach nobody.
    let relay = common::relay::Relay::start(broker.addr()).await;
    let mut opts = options(relay.addr(), 6, "restart");
    opts.resend_after = None;
    let fleet = tokio::spawn(run_fleet(opts, |_| {}));

    // Every device has subscribed and sent its request, unanswered.
    eventually("the requests to arrive", Duration::from_secs(10), || {
        (spy.lock().unwrap().requests.len() >= 6).then_some(())
    })
    .await;
    let port = broker.port;
    relay.refuse_new(true);
    drop(broker);
    let broker = TestBroker::start_on(port).unwrap();
    let seen = start_responder(broker.addr(), ca.clone(), Script::default()).await;
    relay.refuse_new(false);

    let report = fleet.await.unwrap().unwrap();
    assert_eq!(
        (report.provisioned, report.failed),
        (6, 0),
        "{:#?}",
        report.failures
    );
    assert!(report.reconnects >= 6, "{}", report.reconnects);
    assert_eq!(report.resent_requests, 6);
    assert_eq!(seen.lock().unwrap().requests.len(), 6);
}

/// Subscribes to every device's telemetry on `broker` and records the sequence numbers per
/// device id in arrival order.
async fn collect_telemetry(broker: SocketAddr) -> Arc<Mutex<BTreeMap<String, Vec<u64>>>> {
    let got = Arc::new(Mutex::new(BTreeMap::<String, Vec<u64>>::new()));
    let mut o = MqttOptions::new(
        "telemetry-collector",
        broker.ip().to_string(),
        broker.port(),
    );
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 16);
    client
        .subscribe("fleetgw/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (suback_tx, suback_rx) = tokio::sync::oneshot::channel();
    let sink = got.clone();
    tokio::spawn(async move {
        let _client = client;
        let mut suback_tx = Some(suback_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = suback_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let id = p.topic.split('/').nth(1).unwrap().to_string();
                    let (seq, _) = arrival::parse_payload(&p.payload).unwrap();
                    sink.lock().unwrap().entry(id).or_default().push(seq);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), suback_rx)
        .await
        .expect("the collector's SUBACK")
        .unwrap();
    got
}

/// The telemetry phase across a network cut: every device's connection is severed while it
/// publishes; devices reconnect and publish again what was not acknowledged, so every
/// sequence number reaches the broker, first arrivals in order, duplicates at most a window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_survives_a_cut_connection_without_gaps_or_reordering() {
    const PER_DEVICE: u64 = 300;
    const WINDOW: u16 = 5;
    let broker = embedded_broker().await;
    let ca = Arc::new(CertificateAuthority::generate("test cloud CA").unwrap());
    let _seen = start_responder(broker.listen_addr(), ca.clone(), Script::default()).await;
    let got = collect_telemetry(broker.listen_addr()).await;
    let relay = common::relay::Relay::start(broker.listen_addr()).await;

    let mut opts = options(relay.addr(), 4, "cut");
    opts.own_csr_share = 0.25;
    opts.telemetry = Some(TelemetryPlan {
        messages_per_device: PER_DEVICE as u32,
        // Three seconds per device: the cut lands mid-phase even on a loaded machine.
        rate: 100.0,
        payload_bytes: 120,
        window: WINDOW,
        // The stand-in gateway publishes no status; with the real one this waits for it.
        await_status: false,
        after_fleet: true,
        own_csr_devices: true,
        timeout: Duration::from_secs(30),
    });
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let fleet = tokio::spawn(run_fleet(opts, move |e| sink.lock().unwrap().push(e)));

    // Cut every connection once each device is well into its phase.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let progressed = {
            let got = got.lock().unwrap();
            got.len() == 4 && got.values().all(|seqs| seqs.len() >= 30)
        };
        if progressed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "telemetry did not start: {:?}",
            got.lock()
                .unwrap()
                .iter()
                .map(|(id, seqs)| (id.clone(), seqs.len()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.sever();

    let report = fleet.await.unwrap().unwrap();
    assert_eq!(
        (report.provisioned, report.failed),
        (4, 0),
        "{:#?}",
        report.failures
    );
    let telemetry = report.telemetry.expect("a telemetry report");
    assert!(telemetry.reconnects >= 4, "{}", telemetry.reconnects);
    assert_eq!(telemetry.devices, 4);
    assert_eq!(
        (telemetry.published, telemetry.acked),
        (4 * PER_DEVICE, 4 * PER_DEVICE)
    );
    assert_eq!(telemetry.incomplete().count(), 0);
    // One Telemetry event per device, after its Provisioned event.
    let events = std::mem::take(&mut *events.lock().unwrap());
    for d in &telemetry.per_device {
        let provisioned = events
            .iter()
            .position(|e| matches!(e, FleetEvent::Provisioned { plan, .. } if plan.n == d.n));
        let done = events
            .iter()
            .position(|e| matches!(e, FleetEvent::Telemetry(t) if t.n == d.n));
        assert!(provisioned.unwrap() < done.unwrap(), "{d:?}");
        assert_eq!(d.thing_name, format!("thing-{}", d.id));
    }

    // Everything the devices got a PUBACK for is at the broker: wait for the last deliveries.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let complete = got
            .lock()
            .unwrap()
            .values()
            .all(|seqs| arrival::check_sequence(seqs.iter().copied(), 0..PER_DEVICE).lost == 0);
        if complete || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (id, seqs) in got.lock().unwrap().iter() {
        let check = arrival::check_sequence(seqs.iter().copied(), 0..PER_DEVICE);
        assert!(check.complete_in_order(), "{id}: {check:?}");
        assert!(check.duplicates <= u64::from(WINDOW), "{id}: {check:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_key_and_x509_attestations_pass_real_admission() {
    let broker = embedded_broker().await;
    let ca = Arc::new(CertificateAuthority::generate("test cloud CA").unwrap());
    let group_key = Secret::new(b"0123456789abcdef0123456789abcdef".to_vec());
    let device_ca = Arc::new(CertificateAuthority::generate("device attestation CA").unwrap());

    let sas_admission = Admission::new(AdmissionOptions {
        mode: AdmissionMode::SymmetricKey,
        group_key: Some(group_key.clone()),
        ..AdmissionOptions::default()
    })
    .unwrap();
    let seen = start_responder(
        broker.listen_addr(),
        ca.clone(),
        Script {
            admission: Some(Arc::new(sas_admission)),
            ..Script::default()
        },
    )
    .await;
    let mut opts = options(broker.listen_addr(), 4, "sas");
    opts.attestation = SimAttestation::SymmetricKey {
        group_key: group_key.clone(),
        id_scope: "0ne0001".into(),
    };
    let report = run_fleet(opts, |_| {}).await.unwrap();
    assert_eq!(
        (report.provisioned, report.failed),
        (4, 0),
        "{:#?}",
        report.failures
    );
    assert_eq!(seen.lock().unwrap().requests.len(), 4);

    // A wrong group key is refused by admission, and the device reports the refusal.
    let mut opts = options(broker.listen_addr(), 1, "sas-bad");
    opts.attestation = SimAttestation::SymmetricKey {
        group_key: Secret::new(b"another-key-another-key-00000000".to_vec()),
        id_scope: "0ne0001".into(),
    };
    let report = run_fleet(opts, |_| {}).await.unwrap();
    assert!(
        matches!(
            &report.failures[0].reason,
            FailureReason::Rejected {
                status_code: 403,
                ..
            }
        ),
        "{:?}",
        report.failures
    );

    // A second broker, so the symmetric-key responder does not answer the x509 devices.
    let broker = embedded_broker().await;
    let x509_admission = Admission::new(AdmissionOptions {
        mode: AdmissionMode::X509,
        trusted_ca_pem: Some(device_ca.cert_pem().to_string()),
        ..AdmissionOptions::default()
    })
    .unwrap();
    start_responder(
        broker.listen_addr(),
        ca.clone(),
        Script {
            admission: Some(Arc::new(x509_admission)),
            ..Script::default()
        },
    )
    .await;
    let mut opts = options(broker.listen_addr(), 4, "x509");
    opts.own_csr_share = 0.5;
    opts.attestation = SimAttestation::X509 { ca: device_ca };
    let report = run_fleet(opts, |_| {}).await.unwrap();
    assert_eq!(
        (report.provisioned, report.failed),
        (4, 0),
        "{:#?}",
        report.failures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_times_out_with_the_stage_and_last_status() {
    let broker = embedded_broker().await;
    // No responder; a retained status says the device waits for approval.
    let mut opts = MqttOptions::new("status-writer", "127.0.0.1", broker.listen_addr().port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .publish(
            "fleetgw/sim-quiet-1/status",
            QoS::AtLeastOnce,
            true,
            br#"{"status":"waitingApproval","updatedAt":1}"#.to_vec(),
        )
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
            break;
        }
    }
    let mut opts = options(broker.listen_addr(), 1, "quiet");
    opts.timeout = Duration::from_secs(2);
    opts.watch_status = true;
    let started = Instant::now();
    let report = run_fleet(opts, |_| {}).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(report.failed, 1);
    let reason = &report.failures[0].reason;
    assert_eq!(
        reason,
        &FailureReason::Timeout {
            timeout: Duration::from_secs(2),
            stage: Stage::WaitingForAnswer,
            last_status: Some("waitingApproval".into()),
            last_error: None,
        }
    );
    assert!(reason.to_string().contains("waitingApproval"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_times_out_while_connecting() {
    // A port nobody listens on: bound, then released.
    let port = common::free_port();
    let mut opts = FleetOptions::new("127.0.0.1", port, 2);
    opts.timeout = Duration::from_secs(1);
    let report = run_fleet(opts, |_| {}).await.unwrap();
    assert_eq!((report.provisioned, report.failed), (0, 2));
    for failure in &report.failures {
        match &failure.reason {
            FailureReason::Timeout {
                stage: Stage::Connecting,
                last_error: Some(e),
                ..
            } => assert!(!e.is_empty()),
            other => panic!("{other:?}"),
        }
    }
    assert!(report.reconnects >= 2);
}

/// Throughput of the simulator itself (not a timed test): `cargo test --test fleet -- --ignored
/// --nocapture`. Prints the report for FLEET_DEVICES devices (default 2000).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement, run by hand"]
async fn simulator_throughput() {
    let broker = embedded_broker().await;
    let devices = std::env::var("FLEET_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let ca = Arc::new(CertificateAuthority::generate("test cloud CA").unwrap());
    start_responder(broker.listen_addr(), ca.clone(), Script::default()).await;
    let mut opts = options(broker.listen_addr(), devices, "scale");
    opts.cbor_share = 0.5;
    opts.own_csr_share = 0.5;
    opts.cloud_ca_pem = Some(ca.cert_pem().to_string());
    let report = run_fleet(opts, |_| {}).await.unwrap();
    println!(
        "{}",
        serde_json::to_string_pretty(&report.to_json()).unwrap()
    );
    assert_eq!(
        report.failed,
        0,
        "{:#?}",
        &report.failures[..report.failures.len().min(5)]
    );
}
