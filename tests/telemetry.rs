//! The telemetry pipeline end to end with real parts: devices publish over MQTT to the embedded
//! downstream broker, the gateway session hands the messages to `Telemetry`, which stores them
//! in a real sled outbox and forwards them over mutual TLS to the in-process AWS IoT emulator
//! (devices provisioned through its fleet provisioning API with the gateway's own claim
//! client). What arrived is read back from the emulator's `GET /messages` and checked by
//! per-device sequence numbers: nothing lost, per-device order kept, duplicates bounded.
//! Cloud-to-device commands use a mosquitto with mutual TLS as the cloud, since the emulator
//! does not route between clients.

mod common;

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::Value;
use tempfile::TempDir;
use tokio::time::Instant;

use common::http::http;
use common::messages;
use common::publisher::{publish_sequence, Sequence};
use common::wait::{eventually, eventually_async, Lazy};
use common::{env_or, now_ms};

use fleetgw::cloud::aws::claim::ClaimOptions;
use fleetgw::cloud::aws::{telemetry_profile, AwsProvider, AwsProviderOptions};
use fleetgw::cloud::codec::PayloadFormat;
use fleetgw::cloud::{Provider, RegisterInput, RegisterOutcome};
use fleetgw::config::{TelemetryIdentity, WhenFull};
use fleetgw::device_id::DeviceId;
use fleetgw::downstream::{
    AccessRules, BrokerOptions, Downstream, DownstreamOptions, DownstreamSession,
    EmbeddedBrokerOptions, Inbound, LocalUser, UserRights,
};
use fleetgw::emulator::aws::{self, AwsEmulatorHandle, AwsEmulatorOptions};
use fleetgw::identity::{self, CertificateAuthority, KeyType, PrivateKey};
use fleetgw::sim::arrival::{self, Arrival, TelemetryCheck};
use fleetgw::store::{DeviceRecord, DeviceState, Store, StoreOptions};
use fleetgw::telemetry::{
    GatewayCredentials, Telemetry, TelemetryOptions, TelemetryStats, UpstreamEndpoint,
};

use common::mosquitto::{Mosquitto, MosquittoConfig};
use common::mqtt_client::{self, TestClient};
use common::relay::{relayed_embedded_broker, Relay};

/// Upper bound for anything a test waits for.
const LIMIT: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------------------------
// Harness

/// What most tests start from: (temp dir, the emulator with its files in `emu/`, a store in
/// `state/`, the provisioned devices `sensor-NN` as (id, thing name)).
struct Fixture(TempDir, AwsEmulatorHandle, Store, Vec<(String, String)>);

impl Fixture {
    /// An emulator keeping up to a million messages.
    async fn start(devices: usize) -> Self {
        Self::start_with(devices, 1_000_000).await
    }

    async fn start_with(devices: usize, max_messages: usize) -> Self {
        common::capture_logs();
        let dir = tempfile::tempdir().unwrap();
        let mut opts = AwsEmulatorOptions::ephemeral(dir.path().join("emu"));
        opts.max_messages = max_messages;
        let emu = aws::start(opts).await.expect("emulator starts");
        let store = open_store(dir.path());
        let devices = provision_many(&store, &emu, devices).await;
        Self(dir, emu, store, devices)
    }
}

fn claim_provider(emu: &AwsEmulatorHandle) -> AwsProvider {
    let cert = std::fs::read_to_string(emu.claim_cert_path()).unwrap();
    let key =
        PrivateKey::from_pem(&std::fs::read_to_string(emu.claim_key_path()).unwrap()).unwrap();
    let tls = identity::tls::client_config(emu.ca_pem(), Some((&cert, &key))).unwrap();
    AwsProvider::start(AwsProviderOptions {
        claim: ClaimOptions {
            host: "127.0.0.1".into(),
            port: emu.mqtt_addr().port(),
            tls,
            client_id_prefix: "claim-test".into(),
            sessions: 2,
            template: aws::DEFAULT_TEMPLATE.into(),
            format: PayloadFormat::Json,
            keep_alive: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(1),
            queue_timeout: Duration::from_secs(20),
            max_packet_bytes: 256 * 1024,
        },
        tps: 1000.0,
        token_ttl: Duration::from_secs(3000),
        upstream: UpstreamEndpoint {
            host: "127.0.0.1".into(),
            port: emu.mqtt_addr().port(),
            ca_pem: emu.ca_pem().to_string(),
        },
        telemetry: telemetry_profile(&Default::default()).unwrap(),
    })
}

/// Provisions `id` with the emulator and records it in the store the way the engine does
/// (state delivered, thing name and certificate kept, gateway-generated key in `secrets`).
/// Returns the thing name.
async fn provision(store: &Store, provider: &AwsProvider, id: &str) -> String {
    let device = DeviceId::parse(id).unwrap();
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = identity::create_csr(id, &key).unwrap();
    let issued = provider.create_certificate(&device, &csr).await.unwrap();
    let params = BTreeMap::from([("SerialNumber".to_string(), id.to_string())]);
    let outcome = provider
        .register(RegisterInput {
            device: &device,
            certificate: Some(&issued),
            key_pem: None,
            parameters: &params,
        })
        .await
        .unwrap();
    let RegisterOutcome::Done(reg) = outcome else {
        panic!("AWS registers at once, got {outcome:?}")
    };
    let mut rec = DeviceRecord::new(device.clone(), "json", now_ms());
    rec.state = DeviceState::Delivered;
    rec.provision.gateway_key = true;
    rec.provision.certificate_id = Some(issued.certificate_id.clone());
    rec.provision.certificate_pem = Some(issued.certificate_pem.clone());
    rec.provision.thing_name = Some(reg.cloud_id.clone());
    store.put_device(&rec).await.unwrap();
    store
        .put_secret(&device, key.to_pkcs8_pem().expose())
        .await
        .unwrap();
    reg.cloud_id
}

const WATCHER: &str = "watcher";
const WATCHER_PASSWORD: &str = "watcher-password";

/// `[[downstream.users]]` entry of the test's status watcher.
fn watcher_user() -> LocalUser {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LocalUser {
        rights: std::sync::Arc::new(UserRights {
            name: WATCHER.into(),
            publish: vec![],
            subscribe: vec!["fleetgw/+/status".into()],
        }),
        password_hash: HASH
            .get_or_init(|| identity::hash_password(WATCHER_PASSWORD.as_bytes()).unwrap())
            .clone(),
    }
}

/// The embedded broker + gateway session + telemetry pipeline.
struct Gateway {
    downstream: Downstream,
    session: Arc<DownstreamSession>,
    telemetry: Telemetry,
    broker_port: u16,
}

impl Gateway {
    /// Connects the local application that may read every device's status (devices may
    /// read only their own).
    async fn status_watcher(&self) -> TestClient {
        let mut o = mqtt_client::options("status-watcher", self.broker_port);
        o.set_credentials(WATCHER, WATCHER_PASSWORD);
        TestClient::connect_ok(o).await
    }

    /// Devices get their PUBACK once the message is in the outbox (end-to-end
    /// acknowledgement), unless `FLEETGW_BENCH_BROKER_ACK=routed` asks for the PUBACK as soon
    /// as the broker has the message in memory (for benchmark comparisons only).
    async fn start(store: &Store, opts: TelemetryOptions) -> Self {
        const CLIENT_ID: &str = "fleetgw-test-gw";
        let routed = std::env::var("FLEETGW_BENCH_BROKER_ACK").is_ok_and(|v| v == "routed");
        let mut rules = AccessRules::new("fleetgw");
        rules.users.push(watcher_user());
        let broker = EmbeddedBrokerOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ack_after_inflight: env_or("FLEETGW_BENCH_BROKER_INFLIGHT", 1000) as usize,
            ack_after_client: (!routed).then(|| CLIENT_ID.to_string()),
            rules: Some(rules),
            ..EmbeddedBrokerOptions::default()
        };
        let mut dopts = DownstreamOptions::new(CLIENT_ID.into(), BrokerOptions::Embedded(broker));
        dopts.inbound = Inbound {
            provision: true,
            telemetry: true,
        };
        let (downstream, inbound) = Downstream::start(&dopts).await.expect("downstream starts");
        let broker_port = downstream.broker().unwrap().listen_addr().port();
        let session = downstream.session().clone();
        let telemetry = start_pipeline(store, opts, &session, inbound);
        Self {
            downstream,
            session,
            telemetry,
            broker_port,
        }
    }

    /// What a daemon restart does to telemetry: the pipeline and the gateway session stop
    /// (unacknowledged downstream messages stay with the broker), new ones start on the same
    /// store. The broker itself stays, as it would with an external one.
    async fn restart(mut self, store: &Store, opts: TelemetryOptions) -> Self {
        self.telemetry.shutdown(Duration::from_secs(5)).await;
        self.session.shutdown(Duration::from_secs(2)).await;
        let (session, inbound) = self.downstream.restart_session().unwrap();
        session.wait_subscribed(LIMIT).await.unwrap();
        let telemetry = start_pipeline(store, opts, &session, inbound);
        Self {
            session,
            telemetry,
            ..self
        }
    }

    fn stats(&self) -> TelemetryStats {
        self.telemetry.stats()
    }

    async fn stop(self) {
        self.telemetry.shutdown(Duration::from_secs(5)).await;
        self.session.shutdown(Duration::from_secs(2)).await;
    }
}

fn start_pipeline(
    store: &Store,
    opts: TelemetryOptions,
    session: &Arc<DownstreamSession>,
    inbound: tokio::sync::mpsc::Receiver<fleetgw::downstream::DownstreamMessage>,
) -> Telemetry {
    // Everything the session reads goes to the pipeline (the daemon routes provisioning
    // requests to its engine; none come here).
    Telemetry::start(opts, store.clone(), session.clone(), None, inbound).expect("telemetry starts")
}

fn options(emu: &AwsEmulatorHandle) -> TelemetryOptions {
    let mut o = TelemetryOptions::new(UpstreamEndpoint {
        host: "127.0.0.1".into(),
        port: emu.mqtt_addr().port(),
        ca_pem: emu.ca_pem().to_string(),
    });
    o.reconnect_min = Duration::from_millis(100);
    o.reconnect_max = Duration::from_millis(500);
    o.connect_timeout = Duration::from_secs(2);
    o
}

fn open_store(dir: &Path) -> Store {
    Store::open(&dir.join("state"), &StoreOptions::default()).unwrap()
}

/// A store of its own, for tests without the emulator.
fn temp_store() -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    (dir, store)
}

/// One device publishing `fleetgw/{id}/telemetry/sensor` payloads `{"seq":n}` for n in
/// `range`, QoS 1, at most 10 unacknowledged; returns once every PUBACK came.
async fn publish_range(broker_port: u16, id: &str, range: std::ops::Range<u64>, pad: usize) {
    let topic = format!("fleetgw/{id}/telemetry/sensor");
    let seq = Sequence::new(id.to_string(), topic, range, LIMIT);
    let padding = "x".repeat(pad);
    publish_sequence(broker_port, seq, move |n| {
        format!(r#"{{"seq":{n},"pad":"{padding}"}}"#).into_bytes()
    })
    .await;
}

/// [`publish_range`] from every device at once; the publishers start now, the future
/// completes once each has all its PUBACKs.
fn publish_devices(
    port: u16,
    devices: &[(String, String)],
    range: std::ops::Range<u64>,
    pad: usize,
) -> impl Future<Output = ()> + Send + 'static {
    let tasks: Vec<_> = devices
        .iter()
        .map(|(id, _)| {
            let (id, range) = (id.clone(), range.clone());
            tokio::spawn(async move { publish_range(port, &id, range, pad).await })
        })
        .collect();
    async move {
        for t in tasks {
            t.await.unwrap();
        }
    }
}

async fn outage(emu: &AwsEmulatorHandle, seconds: f64) {
    let body = format!(r#"{{"outageSeconds": {seconds}}}"#);
    let (status, view) = http(emu.api_addr(), "POST", "/faults", Some(&body)).await;
    assert_eq!(status, 200, "{view}");
}

/// The sequence numbers the emulator received from one client, in arrival order.
async fn received_seqs(emu: &AwsEmulatorHandle, client_id: &str) -> Vec<u64> {
    received(emu, client_id)
        .await
        .into_iter()
        .map(|(_, s)| s)
        .collect()
}

/// What the emulator received from one client: (topic, seq) in arrival order.
async fn received(emu: &AwsEmulatorHandle, client_id: &str) -> Vec<(String, u64)> {
    received_with_times(emu, client_id)
        .await
        .into_iter()
        .map(|(topic, a)| (topic, a.seq))
        .collect()
}

/// What the emulator received from one client: (topic, arrival) in arrival order.
async fn received_with_times(emu: &AwsEmulatorHandle, client_id: &str) -> Vec<(String, Arrival)> {
    messages::recorded(emu.api_addr(), client_id, common::WAIT)
        .await
        .iter()
        .map(|m| {
            (
                m["topic"].as_str().unwrap().to_string(),
                messages::arrival(m),
            )
        })
        .collect()
}

/// Checks one device's arrivals against the `expected` sequence numbers (the library's
/// checker): each present, first arrivals in order, nothing else. Returns the duplicates.
fn check_sequence(device: &str, seqs: &[u64], expected: std::ops::Range<u64>) -> usize {
    let check = arrival::check_sequence(seqs.iter().copied(), expected);
    assert!(check.complete_in_order(), "{device}: {check:?}");
    check.duplicates as usize
}

async fn provision_many(store: &Store, emu: &AwsEmulatorHandle, n: usize) -> Vec<(String, String)> {
    let provider = claim_provider(emu);
    let mut devices = Vec::new();
    for i in 0..n {
        let id = format!("sensor-{i:02}");
        let thing = provision(store, &provider, &id).await;
        devices.push((id, thing));
    }
    provider.shutdown().await;
    devices
}

/// The gateway's own upstream identity for `identity = "gateway"`: a thing `gateway-00`
/// provisioned like any device (its record and key stay in `store`).
async fn gateway_credentials(store: &Store, emu: &AwsEmulatorHandle) -> GatewayCredentials {
    let provider = claim_provider(emu);
    let thing = provision(store, &provider, "gateway-00").await;
    provider.shutdown().await;
    let id = DeviceId::parse("gateway-00").unwrap();
    let rec = store.device(&id).unwrap().unwrap();
    let key = String::from_utf8(store.secret(&id).unwrap().unwrap()).unwrap();
    GatewayCredentials {
        client_id: thing,
        cert_pem: rec.provision.certificate_pem.unwrap(),
        key: Arc::new(PrivateKey::from_pem(&key).unwrap()),
    }
}

/// Messages the emulator has received so far (its `/stats`).
async fn emulator_messages(emu: &AwsEmulatorHandle) -> u64 {
    let (_, stats) = http(emu.api_addr(), "GET", "/stats", None).await;
    stats["messages"].as_u64().unwrap_or(0)
}

/// Messages the emulator has received, once it holds at least `n` (or panics after [`LIMIT`]).
async fn emulator_messages_reach(emu: &AwsEmulatorHandle, n: u64) -> u64 {
    let got = &Cell::new(0);
    let what = Lazy(|| format!("the emulator to get {n} messages (it has {})", got.get()));
    eventually_async(what, LIMIT, move || async move {
        got.set(emulator_messages(emu).await);
        (got.get() >= n).then_some(got.get())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Tests

/// 10 devices x 200 QoS 1 messages; the emulator is in outage while the second half is
/// published, and the gateway is restarted (a new pipeline on the same store) during the
/// outage. Every message arrives, in per-device order, with at most one in-flight window of
/// duplicates per device and connection loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_in_order_across_an_outage_and_a_restart() {
    const DEVICES: usize = 10;
    const PER_DEVICE: u64 = 200;
    let Fixture(_dir, emu, store, devices) = Fixture::start(DEVICES).await;
    let opts = options(&emu);
    let window = usize::from(opts.inflight);
    let gw = Gateway::start(&store, opts.clone()).await;
    let port = gw.broker_port;

    // First half with the cloud up.
    publish_devices(port, &devices, 0..PER_DEVICE / 2, 100).await;
    let half = DEVICES as u64 * PER_DEVICE / 2;
    eventually("the first half to be accepted", LIMIT, || {
        (gw.stats().accepted == half).then_some(())
    })
    .await;

    // Outage; the second half is published while the cloud is away.
    outage(&emu, 4.0).await;
    publish_devices(port, &devices, PER_DEVICE / 2..PER_DEVICE, 100).await;
    eventually("the second half to be stored", LIMIT, || {
        (gw.stats().accepted == 2 * half).then_some(())
    })
    .await;
    let before_restart = gw.stats();
    assert!(
        before_restart.forwarded < 2 * half,
        "the outage should have held messages back: {before_restart:?}"
    );

    // Restart during the outage: what is in the outbox is sent by the new pipeline.
    assert!(store.outbox_len() > 0, "messages waiting in the outbox");
    let gw = gw.restart(&store, opts).await;
    eventually("the outbox to drain after the outage", LIMIT, || {
        (store.outbox_len() == 0).then_some(())
    })
    .await;

    let mut duplicates = 0;
    for (id, thing) in &devices {
        let got = received(&emu, thing).await;
        assert!(
            got.iter()
                .all(|(t, _)| *t == format!("dt/{thing}/telemetry/sensor")),
            "{id}: unexpected topics"
        );
        let seqs: Vec<u64> = got.iter().map(|(_, s)| *s).collect();
        let dups = check_sequence(id, &seqs, 0..PER_DEVICE);
        // One connection loss (the outage) and one restart per device.
        assert!(
            dups <= 2 * window,
            "{id}: {dups} duplicates > 2 x window {window}"
        );
        duplicates += dups;
    }
    let stats = gw.stats();
    assert_eq!(
        stats.dropped_full + stats.expired + stats.undeliverable,
        0,
        "{stats:?}"
    );
    eprintln!(
        "outage test: {} messages, {duplicates} duplicates, stats after restart {stats:?}",
        2 * half
    );
    gw.stop().await;
    emu.shutdown().await;
}

/// The gateway's own connection to the embedded broker is cut several times while devices
/// publish (a TCP relay between the session and the broker). The broker redelivers what was not
/// acknowledged yet, so each cut may cost up to its in-flight window (100) of duplicates at the
/// cloud in all: the at-least-once price of a lost connection. It must not cost more, nor more
/// than one reconnect (messages read with the loss and then acknowledged on the next connection
/// under their old packet ids made rumqttd, the embedded broker then, drop it again and again,
/// redelivering each time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cut_of_the_downstream_connection_costs_at_most_one_broker_window_of_duplicates() {
    const DEVICES: usize = 5;
    const PER_DEVICE: u64 = 1000;
    const CUTS: u64 = 8;
    const BROKER_WINDOW: usize = 100;
    let Fixture(_dir, emu, store, devices) = Fixture::start(DEVICES).await;
    let (broker, relay, dopts) = relayed_embedded_broker(BROKER_WINDOW, "fleetgw-test-gw").await;
    let mut sopts = dopts.session_options(Some(relay.addr())).unwrap();
    // Below the broker's window, so the session often has messages unread in its socket when
    // the connection is cut: the case that used to start a storm.
    sopts.inbound_capacity = 8;
    sopts.reconnect_min = Duration::from_millis(20);
    sopts.reconnect_max = Duration::from_millis(200);
    let (session, inbound) = DownstreamSession::start(sopts).unwrap();
    session.wait_subscribed(LIMIT).await.unwrap();
    let session = Arc::new(session);
    let telemetry = start_pipeline(&store, options(&emu), &session, inbound);

    let publishing = publish_devices(broker.listen_addr().port(), &devices, 0..PER_DEVICE, 100);
    let total = DEVICES as u64 * PER_DEVICE;
    for cut in 1..=CUTS {
        // Reconnected after the previous cut, and messages flowing on this connection.
        eventually("progress before the next cut", LIMIT, || {
            let s = session.status();
            (s.connected
                && s.connections >= cut
                && telemetry.stats().received >= cut * total / (CUTS + 1))
                .then_some(())
        })
        .await;
        relay.sever();
    }
    publishing.await;
    let mut duplicates = 0;
    for (id, thing) in &devices {
        let deadline = Instant::now() + LIMIT;
        let seqs = loop {
            let seqs = received_seqs(&emu, thing).await;
            let distinct: std::collections::HashSet<u64> = seqs.iter().copied().collect();
            if distinct.len() as u64 == PER_DEVICE || Instant::now() >= deadline {
                break seqs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        duplicates += check_sequence(id, &seqs, 0..PER_DEVICE);
    }
    let connections = session.status().connections;
    eprintln!(
        "downstream cuts: {CUTS} cuts, {connections} connections, {total} messages, {duplicates} duplicates"
    );
    assert_eq!(
        connections,
        CUTS + 1,
        "one reconnect per cut ({duplicates} duplicates)"
    );
    assert!(
        duplicates <= CUTS as usize * BROKER_WINDOW,
        "{duplicates} duplicates after {CUTS} cuts > {CUTS} x broker window {BROKER_WINDOW}"
    );
    telemetry.shutdown(Duration::from_secs(5)).await;
    session.shutdown(Duration::from_secs(2)).await;
    emu.shutdown().await;
}

/// With `backpressure`, a full outbox stops acknowledging downstream (the broker keeps the
/// messages) without exceeding `max_bytes`; once the cloud is back, everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbox_backpressure_holds_messages_at_the_broker_then_delivers_all() {
    const TOTAL: u64 = 400;
    let Fixture(_dir, emu, store, devices) = Fixture::start(1).await;
    let (id, thing) = devices[0].clone();
    let mut opts = options(&emu);
    opts.max_payload_bytes = 4096;
    opts.max_bytes = 64 * 1024;
    opts.when_full = WhenFull::Backpressure;
    let max_bytes = opts.max_bytes;
    let gw = Gateway::start(&store, opts).await;

    outage(&emu, 5.0).await;
    // ~1 KiB each: 400 KiB offered to a 64 KiB outbox. With end-to-end acknowledgement the
    // device gets its PUBACKs only once the outbox has room, so it publishes in the background.
    let port = gw.broker_port;
    let device = id.clone();
    let publisher = tokio::spawn(async move { publish_range(port, &device, 0..TOTAL, 1000).await });
    eventually("backpressure to engage", LIMIT, || {
        (gw.stats().backpressure_episodes > 0).then_some(())
    })
    .await;
    let held = gw.stats();
    assert!(held.accepted < TOTAL, "{held:?}");
    assert!(
        store.outbox_bytes() <= max_bytes,
        "{} > {max_bytes}",
        store.outbox_bytes()
    );
    assert_eq!(held.dropped_full, 0);
    publisher.await.unwrap();

    eventually("every message to be forwarded", LIMIT, || {
        (gw.stats().forwarded >= TOTAL && store.outbox_len() == 0).then_some(())
    })
    .await;
    let seqs = received_seqs(&emu, &thing).await;
    let dups = check_sequence(&id, &seqs, 0..TOTAL);
    assert!(dups <= 10, "{dups} duplicates");
    assert_eq!(gw.stats().dropped_full, 0);
    gw.stop().await;
    emu.shutdown().await;
}

/// With `drop-oldest`, a full outbox deletes the oldest messages (counted) and keeps
/// acknowledging; after the outage exactly the newest messages arrive, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbox_drop_oldest_keeps_the_newest_and_counts_the_rest() {
    const TOTAL: u64 = 400;
    let Fixture(_dir, emu, store, devices) = Fixture::start(1).await;
    let (id, thing) = devices[0].clone();
    let mut opts = options(&emu);
    opts.max_payload_bytes = 4096;
    opts.max_bytes = 64 * 1024;
    opts.when_full = WhenFull::DropOldest;
    let max_bytes = opts.max_bytes;
    let gw = Gateway::start(&store, opts).await;

    outage(&emu, 4.0).await;
    publish_range(gw.broker_port, &id, 0..TOTAL, 1000).await;
    eventually("every message to be accepted", LIMIT, || {
        (gw.stats().accepted == TOTAL).then_some(())
    })
    .await;
    let full = gw.stats();
    assert!(full.dropped_full > 0, "{full:?}");
    assert_eq!(full.backpressure_episodes, 0);
    assert!(store.outbox_bytes() <= max_bytes);

    // The remover counts a message as forwarded just after its deletion is durable.
    eventually("the outbox to drain", LIMIT, || {
        let s = gw.stats();
        (store.outbox_len() == 0 && s.forwarded + s.dropped_full == TOTAL).then_some(())
    })
    .await;
    let stats = gw.stats();
    let seqs = received_seqs(&emu, &thing).await;
    let first_kept = stats.dropped_full;
    let dups = check_sequence(&id, &seqs, first_kept..TOTAL);
    assert_eq!(dups, 0);
    assert_eq!(stats.forwarded + stats.dropped_full, TOTAL, "{stats:?}");
    gw.stop().await;
    emu.shutdown().await;
}

/// Telemetry from a device that is waiting for approval, a disabled device, an unknown id and
/// an oversized payload is not forwarded; the known devices get a notice on their status
/// topic; a provisioned device's message still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_telemetry_is_not_forwarded_and_devices_are_told() {
    let Fixture(_dir, emu, store, devices) = Fixture::start(2).await;
    let (good, good_thing) = devices[0].clone();
    let (disabled, disabled_thing) = devices[1].clone();
    store
        .update_device(&DeviceId::parse(&disabled).unwrap(), None, |r| {
            r.map(|mut r| {
                r.enabled = false;
                r
            })
        })
        .await
        .unwrap();
    let mut waiting = DeviceRecord::new(DeviceId::parse("waiting-1").unwrap(), "json", now_ms());
    waiting.state = DeviceState::WaitingApproval;
    store.put_device(&waiting).await.unwrap();

    let mut opts = options(&emu);
    opts.max_payload_bytes = 1024;
    let gw = Gateway::start(&store, opts).await;
    let mut watcher = gw.status_watcher().await;
    watcher
        .subscribe("fleetgw/+/status", QoS::AtLeastOnce)
        .await;

    publish_range(gw.broker_port, "waiting-1", 0..3, 10).await;
    publish_range(gw.broker_port, &disabled, 0..3, 10).await;
    publish_range(gw.broker_port, "stranger-9", 0..3, 10).await;
    publish_range(gw.broker_port, &good, 0..1, 2000).await; // oversize
    publish_range(gw.broker_port, &good, 1..2, 10).await;

    let mut notices: HashMap<String, Value> = HashMap::new();
    while notices.len() < 3 {
        let p = watcher.next_publish().await.expect("status notice");
        let v: Value = serde_json::from_slice(&p.payload).unwrap();
        notices.insert(p.topic.clone(), v);
    }
    let n = &notices["fleetgw/waiting-1/status"];
    assert_eq!(n["status"], "waitingApproval");
    assert_eq!(n["error"]["errorCode"], "DeviceNotProvisioned");
    let n = &notices[&format!("fleetgw/{disabled}/status")];
    assert_eq!(n["status"], "provisioned");
    assert_eq!(n["error"]["errorCode"], "DeviceDisabled");
    let n = &notices[&format!("fleetgw/{good}/status")];
    assert_eq!(n["error"]["errorCode"], "PayloadTooLarge");
    assert!(n["error"]["errorMessage"]
        .as_str()
        .unwrap()
        .contains("1024"));
    assert!(!notices.contains_key("fleetgw/stranger-9/status"));

    eventually("the good message to be forwarded", LIMIT, || {
        (gw.stats().forwarded == 1).then_some(())
    })
    .await;
    let stats = gw.stats();
    assert_eq!(stats.refused_not_provisioned, 3, "{stats:?}");
    assert_eq!(stats.refused_disabled, 3);
    assert_eq!(stats.refused_unknown, 3);
    assert_eq!(stats.oversize, 1);
    assert_eq!(stats.accepted, 1);
    let got = received(&emu, &good_thing).await;
    assert_eq!(got, vec![(format!("dt/{good_thing}/telemetry/sensor"), 1)]);
    assert!(received(&emu, &disabled_thing).await.is_empty());
    gw.stop().await;
    emu.shutdown().await;
}

/// A mosquitto with mutual TLS stands in for the cloud: certificates from one CA, the client
/// certificate's CN as the username.
struct TlsCloud {
    mosquitto: Mosquitto,
    ca: CertificateAuthority,
    _files: tempfile::TempDir,
}

impl TlsCloud {
    fn start() -> Self {
        let ca = CertificateAuthority::generate("test cloud CA").unwrap();
        let (server_pem, server_key) = ca
            .issue_server("cloud", &["localhost"], &["127.0.0.1".parse().unwrap()], 30)
            .unwrap();
        let files = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = files.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let cafile = write("ca.pem", ca.cert_pem());
        let certfile = write("server.pem", &server_pem);
        let keyfile = write(
            "server.key",
            server_key.to_pkcs8_pem().expose_str().unwrap(),
        );
        let cfg = MosquittoConfig {
            extra: vec![
                format!("cafile {cafile}"),
                format!("certfile {certfile}"),
                format!("keyfile {keyfile}"),
                "require_certificate true".into(),
                "use_identity_as_username true".into(),
            ],
            ..MosquittoConfig::anonymous()
        };
        Self {
            mosquitto: Mosquitto::start(&cfg),
            ca,
            _files: files,
        }
    }

    fn endpoint(&self) -> UpstreamEndpoint {
        UpstreamEndpoint {
            host: "127.0.0.1".into(),
            port: self.mosquitto.port(),
            ca_pem: self.ca.cert_pem().to_string(),
        }
    }

    /// A client of the cloud side (the operator's application) with its own certificate.
    async fn app(&self, name: &str) -> TestClient {
        let (cert, key) = self.ca.issue_client(name, KeyType::EcdsaP256, 30).unwrap();
        let tls = identity::tls::client_config(self.ca.cert_pem(), Some((&cert, &key))).unwrap();
        let mut o = mqtt_client::options(name, self.mosquitto.port());
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        TestClient::connect_ok(o).await
    }
}

/// Records a provisioned device whose certificate comes from the test cloud's CA.
async fn record_device(store: &Store, ca: &CertificateAuthority, id: &str, thing: &str) {
    let device = DeviceId::parse(id).unwrap();
    let (cert, key) = ca.issue_client(thing, KeyType::EcdsaP256, 30).unwrap();
    let mut rec = DeviceRecord::new(device.clone(), "json", now_ms());
    rec.state = DeviceState::Delivered;
    rec.provision.gateway_key = true;
    rec.provision.certificate_pem = Some(cert);
    rec.provision.thing_name = Some(thing.into());
    store.put_device(&rec).await.unwrap();
    store
        .put_secret(&device, key.to_pkcs8_pem().expose())
        .await
        .unwrap();
}

/// Cloud-to-device: in device mode the device's own upstream connection subscribes to
/// `cmd/{thingName}/#` (opened by its first telemetry) and what the cloud sends there reaches
/// the device on `fleetgw/{id}/commands/...`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_commands_reach_the_device_in_device_mode() {
    let cloud = TlsCloud::start();
    let (_dir, store) = temp_store();
    record_device(&store, &cloud.ca, "pump-7", "thing-pump-7").await;
    let mut opts = TelemetryOptions::new(cloud.endpoint());
    opts.reconnect_min = Duration::from_millis(100);
    let gw = Gateway::start(&store, opts).await;

    let mut app = cloud.app("operator-app").await;
    app.subscribe("dt/#", QoS::AtLeastOnce).await;
    let mut device = TestClient::connect_ok(mqtt_client::options("pump-7", gw.broker_port)).await;
    device
        .subscribe("fleetgw/pump-7/commands/#", QoS::AtLeastOnce)
        .await;
    device
        .publish(
            "fleetgw/pump-7/telemetry",
            QoS::AtLeastOnce,
            false,
            b"{\"seq\":0}",
        )
        .await;
    let up = app.next_publish().await.expect("telemetry at the cloud");
    assert_eq!(up.topic, "dt/thing-pump-7/telemetry");
    assert_eq!(&up.payload[..], b"{\"seq\":0}");

    // The link subscribes right after CONNACK, before the telemetry went out.
    app.publish(
        "cmd/thing-pump-7/valve/close",
        QoS::AtLeastOnce,
        false,
        b"now",
    )
    .await;
    let cmd = device.next_publish().await.expect("command at the device");
    assert_eq!(cmd.topic, "fleetgw/pump-7/commands/valve/close");
    assert_eq!(&cmd.payload[..], b"now");
    eventually("the command to be counted", LIMIT, || {
        (gw.stats().commands_forwarded == 1).then_some(())
    })
    .await;
    gw.stop().await;
}

/// Gateway mode: one upstream connection with the gateway's certificate carries every
/// device's telemetry on its own topic, and commands for each device it has seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_mode_uses_one_connection_with_per_device_topics_and_commands() {
    let cloud = TlsCloud::start();
    let (_dir, store) = temp_store();
    for i in 0..3 {
        let mut rec = DeviceRecord::new(
            DeviceId::parse(&format!("meter-{i}")).unwrap(),
            "json",
            now_ms(),
        );
        rec.state = DeviceState::Delivered;
        // Devices that brought their own key: only gateway mode can forward for them.
        rec.provision.thing_name = Some(format!("thing-meter-{i}"));
        store.put_device(&rec).await.unwrap();
    }
    let (cert, key) = cloud
        .ca
        .issue_client("gw-thing", KeyType::EcdsaP256, 30)
        .unwrap();
    let mut opts = TelemetryOptions::new(cloud.endpoint());
    opts.identity = TelemetryIdentity::Gateway;
    opts.gateway = Some(GatewayCredentials {
        client_id: "gw-thing".into(),
        cert_pem: cert,
        key: Arc::new(key),
    });
    let gw = Gateway::start(&store, opts).await;
    let mut app = cloud.app("operator-app").await;
    app.subscribe("dt/#", QoS::AtLeastOnce).await;

    for i in 0..3 {
        publish_range(gw.broker_port, &format!("meter-{i}"), 0..5, 10).await;
    }
    let mut per_topic: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..15 {
        let p = app.next_publish().await.expect("telemetry at the cloud");
        let v: Value = serde_json::from_slice(&p.payload).unwrap();
        per_topic
            .entry(p.topic.clone())
            .or_default()
            .push(v["seq"].as_u64().unwrap());
    }
    for i in 0..3 {
        assert_eq!(
            per_topic[&format!("dt/thing-meter-{i}/telemetry/sensor")],
            vec![0, 1, 2, 3, 4]
        );
    }
    assert_eq!(gw.stats().open_connections, 1);

    let mut device = TestClient::connect_ok(mqtt_client::options("meter-1", gw.broker_port)).await;
    device
        .subscribe("fleetgw/meter-1/commands/#", QoS::AtLeastOnce)
        .await;
    app.publish("cmd/thing-meter-1", QoS::AtLeastOnce, false, b"ping")
        .await;
    let cmd = device.next_publish().await.expect("command at the device");
    assert_eq!(cmd.topic, "fleetgw/meter-1/commands");
    assert_eq!(&cmd.payload[..], b"ping");
    gw.stop().await;
}

/// `device` mode needs the device's key at the gateway: a device that brought its own CSR is
/// refused with a notice instead of being queued forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_mode_refuses_devices_whose_key_the_gateway_does_not_hold() {
    let cloud = TlsCloud::start();
    let (_dir, store) = temp_store();
    let mut rec = DeviceRecord::new(DeviceId::parse("own-key").unwrap(), "json", now_ms());
    rec.state = DeviceState::Delivered;
    rec.provision.thing_name = Some("thing-own".into());
    store.put_device(&rec).await.unwrap();
    let gw = Gateway::start(&store, TelemetryOptions::new(cloud.endpoint())).await;
    let mut watcher = gw.status_watcher().await;
    watcher
        .subscribe("fleetgw/own-key/status", QoS::AtLeastOnce)
        .await;
    publish_range(gw.broker_port, "own-key", 0..2, 10).await;
    let p = watcher.next_publish().await.expect("notice");
    let v: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v["error"]["errorCode"], "NoDeviceKeyAtGateway");
    eventually("both messages to be counted", LIMIT, || {
        (gw.stats().refused_no_key == 2).then_some(())
    })
    .await;
    assert_eq!(store.outbox_len(), 0);
    gw.stop().await;
}

/// With `max_upstream_connections = 2`, five devices share two connection slots: devices
/// without a slot wait (parked) and get one when a link goes idle; all messages arrive in
/// order, never more than two links are open, and idle links are closed after `idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_parks_devices_and_idle_links_close() {
    let Fixture(_dir, emu, store, devices) = Fixture::start(5).await;
    let mut opts = options(&emu);
    opts.max_upstream_connections = 2;
    opts.idle = Duration::from_secs(1);
    let gw = Gateway::start(&store, opts).await;
    publish_devices(gw.broker_port, &devices, 0..30, 10).await;
    let mut max_open = 0;
    let deadline = Instant::now() + LIMIT;
    while gw.stats().forwarded < 150 {
        max_open = max_open.max(gw.stats().open_connections);
        assert!(Instant::now() < deadline, "not forwarded: {:?}", gw.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(max_open <= 2, "{max_open} connections open at once");
    for (id, thing) in &devices {
        let seqs = received_seqs(&emu, thing).await;
        check_sequence(id, &seqs, 0..30);
    }
    eventually("idle links to close", LIMIT, || {
        (gw.stats().open_connections == 0).then_some(())
    })
    .await;
    gw.stop().await;
    emu.shutdown().await;
}

/// Messages older than `max_age` when the cloud comes back are dropped unsent (counted) and
/// leave the outbox; newer ones still go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_older_than_max_age_are_not_sent() {
    let Fixture(_dir, emu, store, devices) = Fixture::start(1).await;
    let (id, thing) = devices[0].clone();
    let mut opts = options(&emu);
    opts.max_age = Duration::from_secs(1);
    let gw = Gateway::start(&store, opts).await;
    outage(&emu, 3.0).await;
    publish_range(gw.broker_port, &id, 0..5, 10).await;
    eventually("the old messages to expire", LIMIT, || {
        (gw.stats().expired == 5 && store.outbox_len() == 0).then_some(())
    })
    .await;
    // After the outage a fresh message goes through, alone.
    eventually("the outage to end", LIMIT, || {
        (gw.stats().upstream_connects > 0).then_some(())
    })
    .await;
    publish_range(gw.broker_port, &id, 5..6, 10).await;
    eventually("the fresh message to be forwarded", LIMIT, || {
        (gw.stats().forwarded == 1).then_some(())
    })
    .await;
    let seqs = received_seqs(&emu, &thing).await;
    assert_eq!(seqs, vec![5]);
    gw.stop().await;
    emu.shutdown().await;
}

/// With `identity = "gateway"` one upstream connection carries every device, so its window is
/// `gateway_inflight`, not the per-device `inflight`: while the cloud's PUBACKs are held back,
/// exactly that many messages go out, and the rest follow once the PUBACKs come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_connection_keeps_gateway_inflight_unacknowledged() {
    const WINDOW: u64 = 5;
    let Fixture(_dir, emu, store, devices) = Fixture::start(2).await;
    let relay = Relay::start(emu.mqtt_addr()).await;
    let mut opts = options(&emu);
    opts.endpoint.port = relay.addr().port();
    opts.identity = TelemetryIdentity::Gateway;
    opts.gateway = Some(gateway_credentials(&store, &emu).await);
    opts.inflight = 1;
    opts.gateway_inflight = WINDOW as u16;
    let gw = Gateway::start(&store, opts).await;
    eventually("the gateway's upstream connection", LIMIT, || {
        (gw.stats().upstream_connects >= 1).then_some(())
    })
    .await;
    relay.hold_replies(true);
    for (id, _) in &devices {
        publish_range(gw.broker_port, id, 0..10, 0).await;
    }
    assert_eq!(emulator_messages_reach(&emu, WINDOW).await, WINDOW);
    // Nothing more while no PUBACK comes back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(emulator_messages_reach(&emu, WINDOW).await, WINDOW);
    relay.hold_replies(false);
    assert_eq!(emulator_messages_reach(&emu, 20).await, 20);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// In-process telemetry runs with an outage (ignored; `benches/telemetry.sh` names them): one
// result line each, asserting only loss and order where the design promises them, never
// timings. The published figures beside the mosquitto bridge are `fleetgw bench telemetry`'s,
// measured with the daemon in its own process (src/bench/telemetry.rs).

/// The load of one benchmark run, from the environment: `FLEETGW_BENCH_DEVICES` (50)
/// publishers `sensor-NN`, `FLEETGW_BENCH_PER_DEVICE` (400) QoS 1 messages of 200 bytes each, at
/// most 10 unacknowledged per publisher, and `FLEETGW_BENCH_RATE` msg/s offered in all, split
/// evenly over the publishers (0, the default: each publishes as fast as its window allows).
#[derive(Clone, Copy, Debug)]
struct Load {
    devices: usize,
    per_device: u64,
    rate: f64,
}

/// Payload size of the benchmark messages (padded `{"seq","t"}` JSON).
const BENCH_PAYLOAD: usize = 200;
/// Most unacknowledged publishes per benchmark publisher.
const BENCH_WINDOW: u16 = 10;

impl Load {
    fn from_env() -> Self {
        let rate = std::env::var("FLEETGW_BENCH_RATE")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or(0.0);
        Self {
            devices: env_or("FLEETGW_BENCH_DEVICES", 50) as usize,
            per_device: env_or("FLEETGW_BENCH_PER_DEVICE", 400),
            rate,
        }
    }

    fn total(&self) -> u64 {
        self.devices as u64 * self.per_device
    }

    /// The offered rate for result lines: msg/s, or `max` when unpaced.
    fn offered(&self) -> String {
        if self.rate > 0.0 {
            format!("{:.0}", self.rate)
        } else {
            "max".into()
        }
    }

    /// Runs every publisher against the broker at `port` and returns once each has all its
    /// PUBACKs: how long that took and how late the latest paced message went out.
    async fn publish_all(&self, port: u16) -> (Duration, Duration) {
        let started = Instant::now();
        // Paced publishers start staggered over one interval, so the offered load is smooth
        // rather than 50 messages at once every interval.
        let every =
            (self.rate > 0.0).then(|| Duration::from_secs_f64(self.devices as f64 / self.rate));
        let first_due = started + Duration::from_millis(100);
        let mut tasks = Vec::new();
        for i in 0..self.devices {
            let id = format!("sensor-{i:02}");
            let pace = every.map(|e| (first_due + e.mul_f64(i as f64 / self.devices as f64), e));
            let count = self.per_device;
            tasks.push(tokio::spawn(async move {
                publish_timed(port, &id, count, pace).await
            }));
        }
        let mut late = Duration::ZERO;
        for t in tasks {
            late = late.max(t.await.unwrap());
        }
        (started.elapsed(), late)
    }
}

/// The 1-minute load average of the machine (`/proc/loadavg`), for the result lines: the box
/// is shared, and figures taken under foreign load are not comparable.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// One device publishing `fleetgw/{id}/telemetry` payloads 0..count of [`BENCH_PAYLOAD`] bytes,
/// QoS 1, at most [`BENCH_WINDOW`] unacknowledged, each carrying the time it was handed to the
/// client (`t`, unix ms). With `pace` = (first due, interval) message n is due at first + n x
/// interval and is not published earlier; returns how late the latest message was published
/// after its due time (a publisher held back by its window falls behind the offered rate).
async fn publish_timed(
    broker_port: u16,
    id: &str,
    count: u64,
    pace: Option<(Instant, Duration)>,
) -> Duration {
    let mut seq = Sequence::new(
        id.to_string(),
        format!("fleetgw/{id}/telemetry"),
        0..count,
        // The publishers' own bound: ten minutes beyond the paced schedule.
        Duration::from_secs(600) + pace.map_or(Duration::ZERO, |(_, e)| e * count as u32),
    );
    seq.window = BENCH_WINDOW;
    seq.keep_alive = Duration::from_secs(30);
    seq.pace = pace;
    publish_sequence(broker_port, seq, |n| {
        arrival::payload(n, fleetgw::clock::unix_us(), BENCH_PAYLOAD)
    })
    .await
}

/// fleetgw, in-process: [`Load`] through the embedded broker, the durable (fsynced) outbox and
/// device-identity upstream links to the emulator. With `FLEETGW_BENCH_OUTAGE_SECS` > 0 the
/// emulator is in outage from a third of the run on. Prints one `FLEETGW` line: the rate
/// delivered (first send to last arrival at the emulator), device-to-emulator latency (the
/// gateway's added latency: the publishers and the emulator are local) and the loss, order
/// and duplicates counted by sequence numbers at the emulator; asserts nothing lost and
/// per-device order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "outage run: run with --ignored (see benches/telemetry.sh)"]
async fn bench_devices_through_an_outage() {
    let load = Load::from_env();
    let outage_secs = env_or("FLEETGW_BENCH_OUTAGE_SECS", 0);
    let total = load.total();
    let max_messages = (total as usize) * 2 + 1000 + load.devices;
    let Fixture(_dir, emu, store, devices) = Fixture::start_with(load.devices, max_messages).await;
    let mut opts = options(&emu);
    // `FLEETGW_BENCH_IDENTITY=gateway`: one upstream connection with the gateway's own
    // certificate, as the bridge has; the default is a connection per device.
    let gateway_identity = std::env::var("FLEETGW_BENCH_IDENTITY").is_ok_and(|v| v == "gateway");
    let gateway_thing = if gateway_identity {
        let credentials = gateway_credentials(&store, &emu).await;
        let thing = credentials.client_id.clone();
        opts.identity = TelemetryIdentity::Gateway;
        opts.gateway = Some(credentials);
        opts.gateway_inflight = env_or(
            "FLEETGW_BENCH_UPSTREAM_INFLIGHT",
            u64::from(opts.gateway_inflight),
        ) as u16;
        Some(thing)
    } else {
        None
    };
    if !gateway_identity {
        opts.inflight = env_or("FLEETGW_BENCH_UPSTREAM_INFLIGHT", u64::from(opts.inflight)) as u16;
    }
    let (window, links) = if gateway_identity {
        (u64::from(opts.gateway_inflight), 1)
    } else {
        (u64::from(opts.inflight), load.devices)
    };
    let gw = Gateway::start(&store, opts).await;
    let port = gw.broker_port;
    // Warm-up: one message per device on another subtopic first, so the upstream connections
    // are open before the measurement, as the bridge's is.
    publish_devices(port, &devices, 0..1, 0).await;
    let warmup = load.devices as u64;
    eventually("the warm-up messages to be forwarded", LIMIT, || {
        (gw.stats().forwarded >= warmup && store.outbox_len() == 0).then_some(())
    })
    .await;
    let load_before = load_average();
    let started = Instant::now();
    let publishing = tokio::spawn(async move { load.publish_all(port).await });
    if outage_secs > 0 {
        eventually("a third of the messages to be forwarded", LIMIT, || {
            (gw.stats().forwarded >= warmup + total / 3).then_some(())
        })
        .await;
        outage(&emu, outage_secs as f64).await;
    }
    let (acked_in, late) = publishing.await.unwrap();
    let deadline =
        Instant::now() + Duration::from_secs(outage_secs + env_or("FLEETGW_BENCH_DRAIN_SECS", 600));
    while gw.stats().forwarded < warmup + total || store.outbox_len() > 0 {
        assert!(Instant::now() < deadline, "not drained: {:?}", gw.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let load_after = load_average();
    let mut check = TelemetryCheck::new();
    let mut by_topic: BTreeMap<String, Vec<Arrival>> = BTreeMap::new();
    if let Some(gateway_thing) = &gateway_thing {
        // One connection carries every device: the topic tells them apart.
        for (topic, arrival) in received_with_times(&emu, gateway_thing).await {
            by_topic.entry(topic).or_default().push(arrival);
        }
    }
    for (id, thing) in &devices {
        // The measured messages (the warm-up went to `/sensor`).
        let topic = format!("dt/{thing}/telemetry");
        let arrivals: Vec<Arrival> = if gateway_thing.is_some() {
            by_topic.remove(&topic).unwrap_or_default()
        } else {
            received_with_times(&emu, thing)
                .await
                .into_iter()
                .filter(|(t, _)| *t == topic)
                .map(|(_, a)| a)
                .collect()
        };
        let device = check.add_device(id, &arrivals, 0..load.per_device);
        assert!(device.complete_in_order(), "{id}: {device:?}");
    }
    let latency = check.latency();
    let stats = gw.stats();
    eprintln!(
        "FLEETGW identity={} devices={} messages={total} offered_per_s={} outage_s={outage_secs} \
         acked_per_s={:.0} delivered_per_s={:.0} lost={} lost_pct={:.1} p50_ms={} p99_ms={} \
         max_ms={} publisher_late_ms={} duplicates={} (window {window} x {links} links) elapsed_s={:.2} \
         upstream_disconnects={} flushes={} append_batches={} remove_batches={} \
         load_before={load_before} load_after={load_after}",
        if gateway_identity { "gateway" } else { "device" },
        load.devices,
        load.offered(),
        total as f64 / acked_in.as_secs_f64(),
        check.messages_per_second(),
        check.lost,
        check.lost as f64 * 100.0 / total as f64,
        latency.p50_ms,
        latency.p99_ms,
        latency.max_ms,
        late.as_millis(),
        check.duplicates,
        elapsed.as_secs_f64(),
        stats.upstream_disconnects,
        store.flush_count(),
        stats.append_batches,
        stats.remove_batches,
    );
    assert_eq!(stats.dropped_full + stats.expired + stats.undeliverable, 0);
    gw.stop().await;
    emu.shutdown().await;
}
