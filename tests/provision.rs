//! End-to-end tests of provisioning: `fleetgw emulate aws` and `fleetgw run` as real processes,
//! devices as rumqttc clients on the daemon's embedded broker.
//!
//! Each test starts its own emulator (MQTT and API on free ports) and daemon (downstream on a
//! free port, state in a temp dir), drives devices through the device contract and checks the
//! outcome three ways: what each device received (a certificate that chains to the emulator CA
//! and matches the device's key), what the cloud holds (exactly one thing per device, no stray
//! certificates) and what the store holds after a clean stop.

use std::collections::{BTreeMap, HashMap};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleetgw::admission::{sas, Attestation};
use fleetgw::device_id::DeviceId;
use fleetgw::downstream::contract::{self, AcceptedResponse, ProvisionRequest, RejectedResponse};
use fleetgw::downstream::PayloadFormat;
use fleetgw::identity::{self, KeyType, PrivateKey};
use fleetgw::store::{DeviceState, Store, StoreOptions};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tempfile::TempDir;

mod common;

use common::http::http_within;
use common::process::{EmulatorProcess, Fleetgw};
use common::wait::{eventually, eventually_async, Lazy};
use common::{free_port, unix_now};

/// Bound of one request to the emulator's API.
const API_WAIT: Duration = Duration::from_secs(10);

// ---------- fixture ----------

/// What every test starts from: a temp dir, the emulator in it and the port the daemon's
/// device broker will listen on.
struct Fixture {
    dir: TempDir,
    emu: Emulator,
    port: u16,
}

impl Fixture {
    /// `emu_args`: extra `fleetgw emulate aws` arguments.
    async fn start(emu_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let emu = Emulator::start(dir.path(), emu_args).await;
        Self {
            dir,
            emu,
            port: free_port(),
        }
    }

    /// The first daemon, with `sets` as config overrides.
    async fn gateway(&self, sets: &[&str]) -> Gateway {
        Gateway::start(self, sets, &[], 1).await
    }
}

// ---------- emulator ----------

/// `fleetgw emulate aws` and what the checks read from its inspection API.
struct Emulator(EmulatorProcess);

impl Deref for Emulator {
    type Target = EmulatorProcess;

    fn deref(&self) -> &EmulatorProcess {
        &self.0
    }
}

impl Emulator {
    async fn start(dir: &Path, extra: &[&str]) -> Emulator {
        let log = dir.join("emulator.log");
        let process = EmulatorProcess::start(&dir.join("emu"), log, |launch| {
            launch.env("RUST_LOG", "info,rumqttc=warn").args(extra)
        })
        .await;
        Emulator(process)
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = http_within(self.api, "GET", path, None, API_WAIT).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn post(&self, path: &str, body: &str) {
        let (status, text) = http_within(self.api, "POST", path, Some(body), API_WAIT).await;
        assert!((200..300).contains(&status), "POST {path}: {status} {text}");
    }

    /// thing name -> certificate ids
    async fn things(&self) -> HashMap<String, Vec<String>> {
        let mut out = HashMap::new();
        for t in self.get("/things").await.as_array().unwrap() {
            let name = t["thingName"].as_str().unwrap().to_string();
            let certs = t["certificateIds"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            assert!(
                out.insert(name.clone(), certs).is_none(),
                "thing {name} listed twice"
            );
        }
        out
    }

    /// certificate id -> status
    async fn certificates(&self) -> HashMap<String, String> {
        self.get("/certificates")
            .await
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["certificateId"].as_str().unwrap().to_string(),
                    c["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

// ---------- daemon ----------

struct Gateway {
    proc: Fleetgw,
    state_dir: PathBuf,
}

impl Gateway {
    /// Starts `fleetgw run` (the `n`th in this test) with the emulator's gateway.toml and waits
    /// for readiness.
    async fn start(f: &Fixture, sets: &[&str], envs: &[(&str, &str)], n: usize) -> Gateway {
        let dir = f.dir.path();
        let state_dir = dir.join("gateway-state");
        let mut launch = Fleetgw::run(
            &f.emu.gateway_config(),
            dir.join(format!("gateway-{n}.log")),
        )
        .env("RUST_LOG", "info,rumqttc=warn")
        .sets([
            format!("downstream.listen=\"127.0.0.1:{}\"", f.port),
            format!("gateway.state_dir=\"{}\"", state_dir.display()),
        ])
        .sets(sets);
        for (k, v) in envs {
            launch = launch.env(k, v);
        }
        let proc = launch.spawn();
        let what = Lazy(|| format!("fleetgw ready; log:\n{}", proc.log_tail()));
        eventually(what, Duration::from_secs(30), || {
            let log = proc.log();
            assert!(
                !log.contains("fleetgw: "),
                "daemon failed to start:\n{}",
                proc.log_tail()
            );
            log.contains("fleetgw ready").then_some(())
        })
        .await;
        Gateway { proc, state_dir }
    }

    /// SIGTERM, expect a clean exit 0.
    async fn stop(self) -> PathBuf {
        self.proc.signal(libc::SIGTERM);
        let status = self.proc.wait_exit(Duration::from_secs(30)).await;
        assert!(
            status.success(),
            "daemon exit {status:?} after SIGTERM; log:\n{}",
            self.proc.log_tail()
        );
        assert!(self.proc.log().contains("store flushed"));
        self.state_dir.clone()
    }

    fn kill(self) {
        self.proc.kill9();
    }
}

fn open_store(dir: &Path) -> Store {
    Store::open(
        dir,
        &StoreOptions {
            cache_capacity: 8 << 20,
            flush_interval_ms: None,
            ..StoreOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("store in {} does not open cleanly: {e}", dir.display()))
}

// ---------- devices ----------

/// One simulated device.
#[derive(Clone)]
struct Device {
    id: String,
    format: PayloadFormat,
    /// The device's own key (it sends a CSR); `None`: the gateway generates the key.
    own_key: Option<std::sync::Arc<PrivateKey>>,
    /// What the device proves itself with.
    attestation: Attestation,
    /// RegisterThing parameters the device asks for.
    parameters: BTreeMap<String, String>,
}

impl Device {
    fn new(id: &str, format: PayloadFormat, own_key: bool) -> Device {
        Device {
            id: id.to_string(),
            format,
            own_key: own_key
                .then(|| std::sync::Arc::new(PrivateKey::generate(KeyType::EcdsaP256).unwrap())),
            attestation: Attestation::None,
            parameters: BTreeMap::new(),
        }
    }

    fn request(&self) -> Vec<u8> {
        let csr = self
            .own_key
            .as_ref()
            .map(|k| identity::create_csr(&self.id, k).unwrap());
        let req = ProvisionRequest {
            csr,
            attestation: self.attestation.clone(),
            parameters: self.parameters.clone(),
            payload: None,
        };
        contract::encode(self.format, &req)
    }

    fn topic(&self) -> String {
        format!("fleetgw/{}/provision/{}", self.id, self.format.as_str())
    }
}

/// What a device ended with.
#[derive(Debug)]
enum Outcome {
    Accepted(AcceptedResponse),
    Rejected(RejectedResponse),
}

/// Connects, subscribes to its responses, requests provisioning (again after every reconnect
/// and every `retry` without an answer) and returns the first final answer. 429 answers are
/// retried, as a device would.
async fn provision(
    port: u16,
    dev: Device,
    payload: Vec<u8>,
    within: Duration,
    retry: Duration,
) -> Outcome {
    // A device connects with its id as client id: the broker lets it use its own topics only.
    let mut opts = MqttOptions::new(dev.id.to_string(), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(512 * 1024, 512 * 1024);
    let (client, mut ev) = AsyncClient::new(opts, 16);
    let topic = dev.topic();
    let (accepted, rejected) = (format!("{topic}/accepted"), format!("{topic}/rejected"));
    let deadline = tokio::time::Instant::now() + within;
    let mut next_request: Option<tokio::time::Instant> = None;
    loop {
        let wake = next_request.unwrap_or(deadline).min(deadline);
        let event = tokio::select! {
            e = ev.poll() => e,
            _ = tokio::time::sleep_until(wake) => {
                assert!(tokio::time::Instant::now() < deadline, "device {}: no answer within {within:?}", dev.id);
                client.publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone()).await.unwrap();
                next_request = Some(tokio::time::Instant::now() + retry);
                continue;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client
                    .subscribe(accepted.clone(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
                client
                    .subscribe(rejected.clone(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                // Both subscriptions granted after the second SUBACK; requesting after the first
                // is harmless (the answer comes after the second).
                next_request = Some(tokio::time::Instant::now());
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == accepted => {
                let _ = client.disconnect().await;
                return Outcome::Accepted(contract::decode(dev.format, &p.payload).unwrap());
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == rejected => {
                let r: RejectedResponse = contract::decode(dev.format, &p.payload).unwrap();
                if r.status_code == 429 {
                    next_request = Some(tokio::time::Instant::now() + retry);
                    continue;
                }
                let _ = client.disconnect().await;
                return Outcome::Rejected(r);
            }
            Ok(_) => {}
            Err(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "device {}: no answer within {within:?}",
                    dev.id
                );
                next_request = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Provisions every device concurrently; panics on a rejection.
async fn provision_all(port: u16, devices: &[Device], within: Duration) -> Vec<AcceptedResponse> {
    let tasks: Vec<_> = devices
        .iter()
        .map(|d| {
            let d = d.clone();
            let payload = d.request();
            tokio::spawn(provision(port, d, payload, within, Duration::from_secs(5)))
        })
        .collect();
    let mut out = Vec::new();
    for (t, d) in tasks.into_iter().zip(devices) {
        match t.await.unwrap() {
            Outcome::Accepted(a) => out.push(a),
            Outcome::Rejected(r) => panic!("device {} rejected: {r:?}", d.id),
        }
    }
    out
}

/// The answer is the device's: its id, a certificate chaining to the cloud CA for its key.
fn check_accepted(dev: &Device, a: &AcceptedResponse, ca_pem: &str) {
    assert_eq!(a.device_id.as_str(), dev.id);
    assert_eq!(
        a.thing_name, dev.id,
        "the template names things by serial number = id"
    );
    identity::verify_chain(&a.certificate_pem, ca_pem, unix_now()).unwrap_or_else(|e| {
        panic!(
            "device {}: certificate does not chain to the emulator CA: {e}",
            dev.id
        )
    });
    let key = match (&dev.own_key, &a.private_key) {
        (Some(own), None) => (**own).clone_for_test(),
        (None, Some(pem)) => PrivateKey::from_pem(pem).unwrap(),
        (own, returned) => panic!(
            "device {}: own key {} but private key returned {}",
            dev.id,
            own.is_some(),
            returned.is_some()
        ),
    };
    assert!(
        identity::cert_matches_key(&a.certificate_pem, &key).unwrap(),
        "device {}: certificate does not match its key",
        dev.id
    );
    let cert = &identity::parse_certificates(&a.certificate_pem).unwrap()[0];
    assert_eq!(cert.subject_cn.as_deref(), Some(dev.id.as_str()));
}

/// Re-reads a key through PEM (PrivateKey is not Clone).
trait CloneForTest {
    fn clone_for_test(&self) -> PrivateKey;
}

impl CloneForTest for PrivateKey {
    fn clone_for_test(&self) -> PrivateKey {
        PrivateKey::from_pem(self.to_pkcs8_pem().expose_str().unwrap()).unwrap()
    }
}

fn fleet(prefix: &str, n: usize) -> Vec<Device> {
    (0..n)
        .map(|i| {
            let format = if i % 3 == 2 {
                PayloadFormat::Cbor
            } else {
                PayloadFormat::Json
            };
            Device::new(&format!("{prefix}-{i:04}"), format, i % 2 == 1)
        })
        .collect()
}

/// Exactly one thing per device, and nothing else.
async fn assert_one_thing_per_device(
    emu: &Emulator,
    devices: &[Device],
) -> HashMap<String, Vec<String>> {
    let things = emu.things().await;
    for d in devices {
        let certs = things
            .get(&d.id)
            .unwrap_or_else(|| panic!("no thing for device {}", d.id));
        assert_eq!(certs.len(), 1, "thing {} has certificates {certs:?}", d.id);
    }
    assert_eq!(things.len(), devices.len(), "things: {:?}", things.keys());
    things
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_provision_end_to_end_and_repeats_get_the_stored_result() {
    let f = Fixture::start(&[]).await;
    let (emu, port) = (&f.emu, f.port);
    // Generated keys are sealed at rest.
    let sealing_key = f.dir.path().join("sealing.key");
    std::fs::write(&sealing_key, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(
        &sealing_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let sealing = format!("provision.sealing_key_file=\"{}\"", sealing_key.display());
    let gw = f.gateway(&[&sealing]).await;

    let devices = fleet("e2e", 24);
    let results = provision_all(port, &devices, Duration::from_secs(60)).await;
    for (d, a) in devices.iter().zip(&results) {
        check_accepted(d, a, &emu.ca_pem);
    }
    let things = assert_one_thing_per_device(emu, &devices).await;
    for (d, a) in devices.iter().zip(&results) {
        assert_eq!(things[&d.id], vec![a.certificate_id.clone()]);
    }
    let certs = emu.certificates().await;
    assert_eq!(certs.len(), devices.len(), "one certificate per device");
    assert!(certs.values().all(|s| s == "ACTIVE"), "{certs:?}");

    // A repeated request (gateway key and own CSR, JSON and CBOR) returns the stored result.
    for i in [0usize, 1, 2] {
        let d = &devices[i];
        let again = match provision(
            port,
            d.clone(),
            d.request(),
            Duration::from_secs(30),
            Duration::from_secs(5),
        )
        .await
        {
            Outcome::Accepted(a) => a,
            Outcome::Rejected(r) => panic!("repeat of {} rejected: {r:?}", d.id),
        };
        assert_eq!(again, results[i], "device {}", d.id);
    }
    assert_eq!(
        emu.certificates().await.len(),
        devices.len(),
        "no second certificate"
    );
    assert_eq!(emu.things().await.len(), devices.len());

    let state_dir = gw.stop().await;
    let store = open_store(&state_dir);
    let sealer = fleetgw::identity::Sealer::from_key_file(&sealing_key).unwrap();
    for d in &devices {
        let rec = store
            .device(&DeviceId::parse(&d.id).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(rec.state, DeviceState::Delivered, "{}", d.id);
        assert_eq!(rec.provision.thing_name.as_deref(), Some(d.id.as_str()));
        let secret = store.secret(&rec.id).unwrap();
        assert_eq!(secret.is_some(), d.own_key.is_none(), "{}", d.id);
        if let Some(sealed) = secret {
            assert!(
                !String::from_utf8_lossy(&sealed).contains("PRIVATE KEY"),
                "{}: key stored in the clear",
                d.id
            );
            let kind = fleetgw::identity::SealedRecord::DeviceKey;
            let plain = sealer.open(kind, rec.id.as_str(), &sealed).unwrap();
            // Bound to its device: the same blob under another id does not open.
            assert!(sealer.open(kind, "another-device", &sealed).is_err());
            let returned = &results[devices.iter().position(|x| x.id == d.id).unwrap()];
            assert_eq!(plain.expose_str(), returned.private_key.as_deref());
        }
    }
    assert_eq!(store.device_count(), devices.len());
}

/// Publishes `payload` on `topic` as the device the topic names and returns the answer on
/// `topic/rejected`.
async fn rejected_for(
    port: u16,
    topic: &str,
    payload: Vec<u8>,
    fmt: PayloadFormat,
) -> RejectedResponse {
    let client_id = topic.split('/').nth(1).expect("fleetgw/{id}/...");
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_max_packet_size(512 * 1024, 512 * 1024);
    let (client, mut ev) = AsyncClient::new(opts, 16);
    let rejected = format!("{topic}/rejected");
    let accepted = format!("{topic}/accepted");
    client
        .subscribe(rejected.clone(), QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe(accepted.clone(), QoS::AtLeastOnce)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut subacks = 0;
    loop {
        let Ok(polled) = tokio::time::timeout_at(deadline, ev.poll()).await else {
            panic!("{topic}: no answer");
        };
        let e = polled.unwrap();
        match e {
            Event::Incoming(Packet::SubAck(_)) => {
                subacks += 1;
                if subacks == 2 {
                    client
                        .publish(topic, QoS::AtLeastOnce, false, payload.clone())
                        .await
                        .unwrap();
                }
            }
            Event::Incoming(Packet::Publish(p)) if p.topic == rejected => {
                let _ = client.disconnect().await;
                return contract::decode(fmt, &p.payload).unwrap();
            }
            Event::Incoming(Packet::Publish(p)) if p.topic == accepted => {
                panic!("{topic}: accepted, expected a rejection")
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_rejected_stored_nowhere_and_others_still_provision() {
    let f = Fixture::start(&[]).await;
    let (emu, port) = (&f.emu, f.port);
    let gw = f
        .gateway(&[
            "provision.allowed_csr_key_types=[\"ecdsa-p256\"]",
            "downstream.device_rate_per_minute=6",
        ])
        .await;
    let json = PayloadFormat::Json;
    let none = r#"{"attestation":{"type":"none"}}"#;
    let with_csr = |csr: &str| {
        serde_json::json!({"attestation": {"type": "none"}, "csr": csr})
            .to_string()
            .into_bytes()
    };
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();

    // Well-behaved devices run alongside the bad ones.
    let good = fleet("good", 6);
    let good_task = {
        let good = good.clone();
        tokio::spawn(async move { provision_all(port, &good, Duration::from_secs(60)).await })
    };

    let mut cases: Vec<(&str, String, Vec<u8>, PayloadFormat, &str)> = vec![
        (
            "malformed-json",
            "fleetgw/bad-json/provision/json".into(),
            b"{\"attestation\":".to_vec(),
            json,
            "InvalidPayload",
        ),
        (
            "malformed-cbor",
            "fleetgw/bad-cbor/provision/cbor".into(),
            vec![0xa1, 0x6b, b'a'],
            PayloadFormat::Cbor,
            "InvalidPayload",
        ),
        // (An invalid id cannot connect to the embedded broker at all: tests/local_trust.rs.)
        (
            "non-canonical-id",
            "fleetgw/Bad-Case/provision/json".into(),
            none.as_bytes().to_vec(),
            json,
            "NonCanonicalDeviceId",
        ),
        (
            "oversize",
            "fleetgw/bad-big/provision/json".into(),
            vec![b' '; 70 * 1024],
            json,
            "PayloadTooLarge",
        ),
        (
            "cn-mismatch",
            "fleetgw/bad-cn/provision/json".into(),
            with_csr(&identity::create_csr("somebody-else", &key).unwrap()),
            json,
            "CsrSubjectMismatch",
        ),
    ];
    let p384 = PrivateKey::generate(KeyType::EcdsaP384).unwrap();
    cases.push((
        "key-type",
        "fleetgw/bad-kt/provision/json".into(),
        with_csr(&identity::create_csr("bad-kt", &p384).unwrap()),
        json,
        "KeyTypeNotAllowed",
    ));
    let good_csr = identity::create_csr("bad-sig", &key).unwrap();
    let block = pem::parse(&good_csr).unwrap();
    let mut der = block.contents().to_vec();
    let n = der.len();
    der[n - 3] ^= 0x01;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    cases.push((
        "bad-signature",
        "fleetgw/bad-sig/provision/json".into(),
        with_csr(&tampered),
        json,
        "InvalidCsr",
    ));

    for (name, topic, payload, fmt, code) in cases {
        let r = rejected_for(port, &topic, payload, fmt).await;
        assert_eq!(r.error_code, code, "{name}: {r:?}");
        assert!(
            r.status_code >= 400 && !r.error_message.is_empty(),
            "{name}: {r:?}"
        );
    }

    // A flood from one device: some requests are refused with 429, the daemon keeps serving.
    let flood_topic = "fleetgw/flooder/provision/json";
    let mut codes = Vec::new();
    {
        let mut opts = MqttOptions::new("flooder", "127.0.0.1", port);
        opts.set_max_packet_size(512 * 1024, 512 * 1024);
        let (client, mut ev) = AsyncClient::new(opts, 64);
        client
            .subscribe(format!("{flood_topic}/rejected"), QoS::AtLeastOnce)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut sent = false;
        while codes.len() < 20 {
            let e = tokio::time::timeout_at(deadline, ev.poll())
                .await
                .expect("flood answers")
                .unwrap();
            match e {
                Event::Incoming(Packet::SubAck(_)) if !sent => {
                    sent = true;
                    for _ in 0..20 {
                        // An invalid attestation type: each admitted request is refused as well,
                        // so every request gets an answer and nothing is stored.
                        client
                            .publish(
                                flood_topic,
                                QoS::AtLeastOnce,
                                false,
                                br#"{"attestation":{"type":"bogus"}}"#.to_vec(),
                            )
                            .await
                            .unwrap();
                    }
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let r: RejectedResponse = contract::decode(json, &p.payload).unwrap();
                    codes.push(r.error_code);
                }
                _ => {}
            }
        }
    }
    let throttled = codes.iter().filter(|c| *c == "TooManyRequests").count();
    assert!(throttled >= 15, "flood answers: {codes:?}");

    let good_results = good_task.await.unwrap();
    for (d, a) in good.iter().zip(&good_results) {
        check_accepted(d, a, &emu.ca_pem);
    }
    assert_one_thing_per_device(emu, &good).await;
    assert_eq!(
        emu.certificates().await.len(),
        good.len(),
        "no certificate for a bad request"
    );

    let state_dir = gw.stop().await;
    let store = open_store(&state_dir);
    assert_eq!(
        store.device_count(),
        good.len(),
        "only the good devices are stored"
    );
    for id in [
        "bad-json", "bad-cbor", "bad-big", "bad-cn", "bad-kt", "bad-sig", "flooder",
    ] {
        assert!(
            store
                .device(&DeviceId::parse(id).unwrap())
                .unwrap()
                .is_none(),
            "{id} stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_safety_under_repeated_sigkill() {
    let n: usize = std::env::var("FLEETGW_CRASH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let kills: usize = std::env::var("FLEETGW_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let sessions = 4;
    let f = Fixture::start(&[]).await;
    let (emu, port) = (&f.emu, f.port);
    // Slow the cloud a little so that kills often land while requests are in flight.
    emu.post("/faults", r#"{"responseDelayMs":5}"#).await;
    let sets = [
        "downstream.device_rate_per_minute=600",
        "cloud.aws.sessions=4",
    ];

    let devices = fleet("crash", n);
    let fleet_task = {
        let devices = devices.clone();
        tokio::spawn(async move {
            let tasks: Vec<_> = devices
                .iter()
                .map(|d| {
                    let d = d.clone();
                    let payload = d.request();
                    tokio::spawn(provision(
                        port,
                        d,
                        payload,
                        Duration::from_secs(300),
                        Duration::from_secs(3),
                    ))
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        })
    };

    let mut rng_state = unix_now() as u64 | 1;
    let mut next_rand = move |bound: u64| {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state % bound
    };
    let mut kills_mid_provisioning = 0;
    for k in 0..kills {
        let gw = Gateway::start(&f, &sets, &[], k).await;
        // Kill k lands at a random point of the k-th slice of the fleet's progress (things the
        // cloud has registered), then a random few milliseconds later, so that every kill hits
        // devices in all states whatever the speed of the machine.
        let slice = (n / (kills + 1)) as u64;
        let target = (k as u64 + 1) * slice - next_rand(slice / 2 + 1);
        eventually_async(
            "provisioning progress",
            Duration::from_secs(120),
            || async {
                let things = emu.get("/stats").await["things"].as_u64()?;
                (things >= target).then_some(())
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(next_rand(50))).await;
        gw.kill();
        // The store must open cleanly after every kill.
        let store = open_store(&f.dir.path().join("gateway-state"));
        let delivered = store
            .devices()
            .filter(|r| matches!(r.as_ref().unwrap().state, DeviceState::Delivered))
            .count();
        if delivered < n {
            kills_mid_provisioning += 1;
        }
        eprintln!("kill {}: {delivered}/{n} devices delivered", k + 1);
    }
    assert_eq!(
        kills_mid_provisioning, kills,
        "every kill must land while devices are still provisioning"
    );
    let gw = Gateway::start(&f, &sets, &[], kills).await;
    let outcomes = fleet_task.await.unwrap();
    for (d, o) in devices.iter().zip(&outcomes) {
        match o {
            Outcome::Accepted(a) => check_accepted(d, a, &emu.ca_pem),
            Outcome::Rejected(r) => panic!("device {} rejected: {r:?}", d.id),
        }
    }
    let things = assert_one_thing_per_device(emu, &devices).await;
    let certs = emu.certificates().await;
    let pending: Vec<_> = certs
        .iter()
        .filter(|(_, s)| s.as_str() == "PENDING_ACTIVATION")
        .collect();
    assert!(
        pending.len() <= sessions * kills,
        "{} certificates left PENDING_ACTIVATION after {kills} kills with {sessions} sessions",
        pending.len()
    );
    for (id, certs) in &things {
        for c in certs {
            assert!(certs_status(emu, c).await == "ACTIVE", "thing {id}");
        }
    }
    eprintln!(
        "crash test: {n} devices, {kills} kills, {} certificates, {} pending",
        certs.len(),
        pending.len()
    );

    let state_dir = gw.stop().await;
    let store = open_store(&state_dir);
    for d in &devices {
        let rec = store
            .device(&DeviceId::parse(&d.id).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(rec.state, DeviceState::Delivered, "{}", d.id);
    }
}

async fn certs_status(emu: &Emulator, id: &str) -> String {
    emu.certificates()
        .await
        .get(id)
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_cloud_still_provisions_everyone() {
    let f = Fixture::start(&["--tps", "20"]).await;
    let (emu, port) = (&f.emu, f.port);
    // The fleet provisioning API in CBOR this time.
    let gw = f
        .gateway(&["cloud.aws.tps=50", "cloud.aws.format=\"cbor\""])
        .await;
    let devices = fleet("tps", 80);
    let results = provision_all(port, &devices, Duration::from_secs(120)).await;
    for (d, a) in devices.iter().zip(&results) {
        check_accepted(d, a, &emu.ca_pem);
    }
    assert_one_thing_per_device(emu, &devices).await;
    let stats = emu.get("/stats").await;
    eprintln!("throttled run: emulator stats {stats}");
    let state_dir = gw.stop().await;
    let store = open_store(&state_dir);
    let failed = store
        .devices()
        .filter(|r| matches!(r.as_ref().unwrap().state, DeviceState::Failed { .. }))
        .count();
    assert_eq!(failed, 0);
}

/// Needs the daemon's crash hook, which only `--features test-hooks` builds have.
#[cfg(feature = "test-hooks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_ownership_token_gets_a_new_certificate() {
    let f = Fixture::start(&["--token-ttl", "2"]).await;
    let (emu, port) = (&f.emu, f.port);
    let dev = Device::new("token-1", PayloadFormat::Json, false);
    let device_task = {
        let dev = dev.clone();
        let payload = dev.request();
        tokio::spawn(provision(
            port,
            dev,
            payload,
            Duration::from_secs(90),
            Duration::from_secs(3),
        ))
    };

    // The daemon stops right after persisting CertificateIssued, before RegisterThing.
    let crash = [("FLEETGW_TEST_CRASH_AFTER", "certificateIssued")];
    let gw = Gateway::start(&f, &[], &crash, 1).await;
    let status = gw.proc.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(86), "{}", gw.proc.log_tail());
    let first: Vec<String> = emu.certificates().await.into_keys().collect();
    assert_eq!(first.len(), 1, "one certificate issued before the stop");
    // The token expires while the daemon is down: the emulator deletes the unactivated certificate.
    eventually_async(
        "the first certificate to expire",
        Duration::from_secs(30),
        || async { emu.certificates().await.is_empty().then_some(()) },
    )
    .await;

    let gw = Gateway::start(&f, &[], &[], 2).await;
    let a = match device_task.await.unwrap() {
        Outcome::Accepted(a) => a,
        Outcome::Rejected(r) => panic!("rejected: {r:?}"),
    };
    check_accepted(&dev, &a, &emu.ca_pem);
    assert_ne!(a.certificate_id, first[0], "a new certificate was issued");
    let things = assert_one_thing_per_device(emu, std::slice::from_ref(&dev)).await;
    assert_eq!(things[&dev.id], vec![a.certificate_id.clone()]);
    assert!(gw.proc.log().contains("requesting a new certificate"));
    gw.stop().await;
}

/// Not a timed test: prints the end-to-end rate for `FLEETGW_BENCH_DEVICES` devices (default
/// 1000). Run with `cargo test --test provision throughput_figure -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_figure() {
    let n: usize = std::env::var("FLEETGW_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let sessions = std::env::var("FLEETGW_BENCH_SESSIONS").unwrap_or_else(|_| "16".into());
    // With FLEETGW_BENCH_CLOUD_TPS the emulator throttles each API to that rate, and the
    // gateway is configured with the same quota: the figure then shows how much of it is used.
    let cloud_tps = std::env::var("FLEETGW_BENCH_CLOUD_TPS").ok();
    let emu_args: Vec<&str> = match &cloud_tps {
        Some(tps) => vec!["--tps", tps.as_str()],
        None => vec![],
    };
    let f = Fixture::start(&emu_args).await;
    let (emu, port) = (&f.emu, f.port);
    let sessions_set = format!("cloud.aws.sessions={sessions}");
    let tps_set = format!("cloud.aws.tps={}", cloud_tps.as_deref().unwrap_or("100000"));
    let gw = f.gateway(&[sessions_set.as_str(), tps_set.as_str()]).await;
    let devices = fleet("bench", n);
    let payloads: Vec<Vec<u8>> = devices.iter().map(Device::request).collect();
    let start = Instant::now();
    let cpu_before = gw.proc.cpu();
    // At most 500 devices connected at once, as a fleet coming online would be.
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(500));
    let tasks: Vec<_> = devices
        .iter()
        .zip(payloads)
        .map(|(d, p)| {
            let d = d.clone();
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let _slot = in_flight.acquire_owned().await.unwrap();
                provision(
                    port,
                    d,
                    p,
                    Duration::from_secs(600),
                    Duration::from_secs(30),
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Outcome::Accepted(_)));
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = (gw.proc.cpu() - cpu_before).as_secs_f64();
    let rss = format!("VmRSS: {} kB", gw.proc.rss_kib());
    let emulator_requests = emu.get("/stats").await["requests"].clone();
    eprintln!(
        "throughput: {n} devices in {secs:.2} s = {:.0} devices/s ({sessions} claim sessions, cloud quota {} per API, debug build); daemon CPU {:.2} ms/device, {rss}; emulator {}",
        n as f64 / secs,
        cloud_tps.as_deref().unwrap_or("unlimited"),
        cpu_secs * 1000.0 / n as f64,
        emulator_requests
    );
    assert_one_thing_per_device(emu, &devices).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_outage_and_dropped_responses_recover() {
    let f = Fixture::start(&[]).await;
    let (emu, port) = (&f.emu, f.port);
    // Half the responses are lost at first; those requests time out quickly and are retried.
    emu.post("/faults", r#"{"dropResponses":0.5}"#).await;
    let gw = f
        .gateway(&[
            "provision.request_timeout_ms=700",
            "provision.retry_base_ms=100",
            "provision.retry_max_ms=1000",
            "provision.max_attempts=50",
        ])
        .await;
    let devices = fleet("fault", 30);
    let fleet_task = {
        let devices = devices.clone();
        tokio::spawn(async move { provision_all(port, &devices, Duration::from_secs(120)).await })
    };
    eventually_async(
        "some requests to be dropped",
        Duration::from_secs(30),
        || async {
            let dropped = emu.get("/stats").await["requests"]["droppedResponses"].as_u64()?;
            (dropped >= 3).then_some(())
        },
    )
    .await;
    // Then the cloud goes away for two seconds, dropping every claim connection.
    emu.post("/faults", r#"{"dropResponses":0.0,"outageSeconds":2}"#)
        .await;
    let results = fleet_task.await.unwrap();
    for (d, a) in devices.iter().zip(&results) {
        check_accepted(d, a, &emu.ca_pem);
    }
    assert_one_thing_per_device(emu, &devices).await;
    let stats = emu.get("/stats").await;
    eprintln!("faults run: emulator stats {stats}");
    assert!(
        stats["connections"]["total"].as_u64().unwrap() > 4,
        "claim sessions reconnected: {stats}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_key_admission_admits_valid_sas_and_refuses_others() {
    use base64::Engine as _;
    let f = Fixture::start(&[]).await;
    let (emu, port) = (&f.emu, f.port);
    let group_key = [7u8; 32];
    let group_b64 = base64::engine::general_purpose::STANDARD.encode(group_key);
    let mode = "admission.mode=\"symmetric-key\"".to_string();
    let key = format!("admission.group_key=\"{group_b64}\"");
    let gw = f.gateway(&[&mode, &key]).await;

    let sas_for = |id: &str, group: &[u8], expiry: i64| {
        let device_id = DeviceId::parse(id).unwrap();
        let device_key = sas::derive_device_key(group, device_id.as_str());
        let uri = sas::registration_resource_uri("0ne00000000", &device_id);
        Attestation::SymmetricKey {
            sas: sas::generate_sas(&uri, &device_key, expiry, Some("registration")),
        }
    };
    let mut good = Device::new("sk-good", PayloadFormat::Json, false);
    good.attestation = sas_for("sk-good", &group_key, unix_now() + 600);
    let mut wrong_key = Device::new("sk-wrong", PayloadFormat::Json, false);
    wrong_key.attestation = sas_for("sk-wrong", &[9u8; 32], unix_now() + 600);
    let mut expired = Device::new("sk-expired", PayloadFormat::Cbor, true);
    expired.attestation = sas_for("sk-expired", &group_key, unix_now() - 10);
    let mut none = Device::new("sk-none", PayloadFormat::Json, false);
    none.attestation = Attestation::None;

    let within = Duration::from_secs(30);
    match provision(
        port,
        good.clone(),
        good.request(),
        within,
        Duration::from_secs(5),
    )
    .await
    {
        Outcome::Accepted(a) => check_accepted(&good, &a, &emu.ca_pem),
        Outcome::Rejected(r) => panic!("valid SAS rejected: {r:?}"),
    }
    for d in [&wrong_key, &expired, &none] {
        match provision(port, d.clone(), d.request(), within, Duration::from_secs(5)).await {
            Outcome::Rejected(r) => {
                assert_eq!(r.status_code, 403, "{}: {r:?}", d.id);
                assert!(!r.error_code.is_empty() && !r.error_message.is_empty());
            }
            Outcome::Accepted(_) => panic!("{} admitted", d.id),
        }
    }
    assert_one_thing_per_device(emu, std::slice::from_ref(&good)).await;
    let state_dir = gw.stop().await;
    let store = open_store(&state_dir);
    assert_eq!(store.device_count(), 1, "refused devices are not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_mode_keeps_new_devices_waiting() {
    let f = Fixture::start(&[]).await;
    let (emu, port) = (&f.emu, f.port);
    let gw = f.gateway(&["admission.mode=\"approve\""]).await;
    let dev = Device::new("waiting-1", PayloadFormat::Json, false);

    let mut opts = MqttOptions::new("waiting-1", "127.0.0.1", port);
    opts.set_max_packet_size(512 * 1024, 512 * 1024);
    let (client, mut ev) = AsyncClient::new(opts, 16);
    let status_topic = "fleetgw/waiting-1/status";
    client
        .subscribe(status_topic, QoS::AtLeastOnce)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut requested = false;
    let status: Value = loop {
        let Ok(polled) = tokio::time::timeout_at(deadline, ev.poll()).await else {
            panic!("no status for a device waiting for approval");
        };
        match polled.unwrap() {
            Event::Incoming(Packet::SubAck(_)) if !requested => {
                requested = true;
                client
                    .publish(dev.topic(), QoS::AtLeastOnce, false, dev.request())
                    .await
                    .unwrap();
            }
            Event::Incoming(Packet::Publish(p)) if p.topic == status_topic => {
                break serde_json::from_slice(&p.payload).unwrap();
            }
            _ => {}
        }
    };
    assert_eq!(status["status"], "waitingApproval", "{status}");
    assert!(
        emu.certificates().await.is_empty(),
        "nothing asked of the cloud before approval"
    );
    let state_dir = gw.stop().await;
    let store = open_store(&state_dir);
    let rec = store
        .device(&DeviceId::parse("waiting-1").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(rec.state, DeviceState::WaitingApproval);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_refusal_fails_the_device_with_the_clouds_error() {
    let f = Fixture::start(&[]).await;
    let (emu, port) = (&f.emu, f.port);
    let gw = f.gateway(&[]).await;
    // The built-in template's pre-provisioning hook denies serial numbers "denied-*".
    let mut denied = Device::new("denied-dev", PayloadFormat::Json, false);
    denied
        .parameters
        .insert("SerialNumber".into(), "denied-7".into());
    let r = match provision(
        port,
        denied.clone(),
        denied.request(),
        Duration::from_secs(30),
        Duration::from_secs(10),
    )
    .await
    {
        Outcome::Rejected(r) => r,
        Outcome::Accepted(a) => panic!("denied device provisioned: {a:?}"),
    };
    assert_eq!(r.status_code, 403, "{r:?}");
    assert!(!r.error_code.is_empty() && !r.error_message.is_empty());
    assert!(emu.things().await.is_empty());

    let state_dir = gw.stop().await;
    let store = open_store(&state_dir);
    let rec = store
        .device(&DeviceId::parse("denied-dev").unwrap())
        .unwrap()
        .unwrap();
    let DeviceState::Failed {
        error,
        next_attempt_at_ms,
    } = &rec.state
    else {
        panic!("state {:?}", rec.state);
    };
    assert_eq!(
        next_attempt_at_ms, &None,
        "a permanent error is not retried"
    );
    assert_eq!(
        (
            error.status_code,
            error.error_code.as_str(),
            error.error_message.as_str()
        ),
        (
            r.status_code,
            r.error_code.as_str(),
            r.error_message.as_str()
        ),
        "the cloud's error is kept with the device"
    );
    assert_eq!(rec.last_error.as_ref(), Some(error));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_requests_fail_the_device_after_max_attempts() {
    let f = Fixture::start(&[]).await;
    let (emu, port) = (&f.emu, f.port);
    emu.post("/faults", r#"{"dropResponses":1.0}"#).await;
    let gw = f
        .gateway(&[
            "provision.request_timeout_ms=300",
            "provision.max_attempts=3",
            "provision.retry_base_ms=50",
            "provision.retry_max_ms=200",
        ])
        .await;
    let dev = Device::new("silent-cloud", PayloadFormat::Cbor, true);
    let r = match provision(
        port,
        dev.clone(),
        dev.request(),
        Duration::from_secs(60),
        Duration::from_secs(30),
    )
    .await
    {
        Outcome::Rejected(r) => r,
        Outcome::Accepted(a) => panic!("provisioned without answers: {a:?}"),
    };
    assert_eq!(
        (r.status_code, r.error_code.as_str()),
        (504, "CloudTimeout"),
        "{r:?}"
    );
    let dropped = emu.get("/stats").await["requests"]["droppedResponses"]
        .as_u64()
        .unwrap();
    assert_eq!(dropped, 3, "one request per attempt");
    let state_dir = gw.stop().await;
    let store = open_store(&state_dir);
    let rec = store
        .device(&DeviceId::parse("silent-cloud").unwrap())
        .unwrap()
        .unwrap();
    assert!(
        matches!(rec.state, DeviceState::Failed { .. }),
        "{:?}",
        rec.state
    );
    assert_eq!(rec.attempts, 3, "every attempt is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_provision_through_an_external_mosquitto() {
    use common::mosquitto::{Mosquitto, MosquittoConfig};
    let broker = Mosquitto::start(&MosquittoConfig::anonymous());
    let f = Fixture::start(&[]).await;
    let emu = &f.emu;
    let external = "downstream.broker=\"external\"".to_string();
    let url = format!("downstream.url=\"{}\"", broker.url());
    let gw = f.gateway(&[&external, &url]).await;

    // The gateway's session connects in the background; devices retry until it listens.
    let devices = fleet("mosq", 12);
    let tasks: Vec<_> = devices
        .iter()
        .map(|d| {
            let (d, p) = (d.clone(), d.request());
            tokio::spawn(provision(
                broker.port(),
                d,
                p,
                Duration::from_secs(60),
                Duration::from_secs(2),
            ))
        })
        .collect();
    for (t, d) in tasks.into_iter().zip(&devices) {
        match t.await.unwrap() {
            Outcome::Accepted(a) => check_accepted(d, &a, &emu.ca_pem),
            Outcome::Rejected(r) => panic!("device {} rejected: {r:?}", d.id),
        }
    }
    assert_one_thing_per_device(emu, &devices).await;
    let state_dir = gw.stop().await;
    assert_eq!(open_store(&state_dir).device_count(), devices.len());
}
