//! The provisioning state machine against a scripted fake cloud ([`FakeProvider`]): every
//! transition, the ownership-token detours, how cloud errors are counted against
//! `max_attempts`, and resuming from every stored state after a restart (a new [`Engine`] on
//! the same store). The device side is the embedded broker in-process, so nothing here starts a
//! process or an emulator.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::admission::{Admission, AdmissionOptions};
use crate::cloud::fake::{self, Api, Call, FakeProvider, Outcome};
use crate::cloud::INVALID_OWNERSHIP_TOKEN;
use crate::device_id::DeviceId;
use crate::downstream::{
    BrokerOptions, Downstream, DownstreamOptions, DownstreamSession, EmbeddedBrokerOptions,
};
use crate::identity::KeyType;
use crate::provision::{Engine, EngineOptions, EngineParts, EngineStats, RequestPolicy};
use crate::store::{DeviceRecord, DeviceState, Store, StoreOptions};

/// A call that must not answer while the test runs.
const FOREVER: Duration = Duration::from_secs(3600);
/// How long a device may take to reach a state before the test fails.
const WITHIN: Duration = Duration::from_secs(10);

fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).expect("a valid test device id")
}

/// Short retry delays so the tests take milliseconds; few attempts so limits are reached.
fn options() -> EngineOptions {
    let mut o = EngineOptions::new(RequestPolicy {
        max_request_bytes: 64 * 1024,
        allowed_csr_key_types: vec![KeyType::EcdsaP256],
        default_parameters: BTreeMap::new(),
    });
    o.max_attempts = 3;
    o.retry_base = Duration::from_millis(1);
    o.retry_max = Duration::from_millis(10);
    o.workers = 2;
    o.shutdown_grace = Duration::from_millis(200);
    o
}

/// A store, the in-process broker with the gateway's session, and the fake cloud.
struct Bench {
    _dir: tempfile::TempDir,
    store: Store,
    downstream: Downstream,
    _inbound: mpsc::Receiver<crate::downstream::DownstreamMessage>,
}

impl Bench {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open(dir.path(), &StoreOptions::default()).expect("the store opens");
        let broker = EmbeddedBrokerOptions {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            ..EmbeddedBrokerOptions::default()
        };
        let opts = DownstreamOptions::new("fleetgw-test".into(), BrokerOptions::Embedded(broker));
        let (downstream, inbound) = Downstream::start(&opts)
            .await
            .expect("the embedded broker and the session start");
        Self {
            _dir: dir,
            store,
            downstream,
            _inbound: inbound,
        }
    }

    /// Starts an engine on this bench's store, answering devices through `session`.
    fn engine_with(
        &self,
        fake: &Arc<FakeProvider>,
        session: Arc<DownstreamSession>,
        opts: EngineOptions,
    ) -> Engine {
        let (_requests_tx, requests) = mpsc::channel(1);
        let parts = EngineParts {
            store: self.store.clone(),
            provider: fake.clone(),
            downstream: session,
            admission: Admission::new(AdmissionOptions::default())
                .expect("open admission")
                .into(),
            sealer: None,
        };
        Engine::start(parts, opts, requests)
    }

    fn engine(&self, fake: &Arc<FakeProvider>, opts: EngineOptions) -> Engine {
        self.engine_with(fake, self.downstream.session().clone(), opts)
    }

    async fn put(&self, rec: DeviceRecord) {
        self.store
            .put_device(&rec)
            .await
            .expect("the record is stored");
    }

    async fn put_requested(&self, id: &str) -> DeviceId {
        let id = device(id);
        let mut rec = DeviceRecord::new(id.clone(), "json", crate::clock::unix_ms());
        rec.provision.parameters = BTreeMap::from([("SerialNumber".into(), id.to_string())]);
        self.put(rec).await;
        id
    }

    fn record(&self, id: &DeviceId) -> DeviceRecord {
        self.store
            .device(id)
            .expect("the store reads")
            .expect("the record exists")
    }

    /// Polls the store until the device's record satisfies `done`.
    async fn wait_for(
        &self,
        id: &DeviceId,
        what: &str,
        done: impl Fn(&DeviceRecord) -> bool,
    ) -> DeviceRecord {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            let rec = self.record(id);
            if done(&rec) {
                return rec;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} did not reach {what} within {WITHIN:?}; it is {:?}",
                rec.state
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_delivered(&self, id: &DeviceId) -> DeviceRecord {
        self.wait_for(id, "delivered", |r| r.state == DeviceState::Delivered)
            .await
    }

    async fn wait_failed(&self, id: &DeviceId) -> DeviceRecord {
        self.wait_for(id, "failed", |r| {
            matches!(r.state, DeviceState::Failed { .. })
        })
        .await
    }
}

/// Waits until the engine's counters satisfy `done`: they move just after the record is
/// written, so a test that saw the record may be a moment early.
async fn wait_stats(engine: &Engine, what: &str, done: impl Fn(&EngineStats) -> bool) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !done(&engine.stats()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the engine's counters did not show {what} within {WITHIN:?}: {:?}",
            engine.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn apis(calls: &[Call]) -> Vec<Api> {
    calls.iter().map(Call::api).collect()
}

fn csr_of(call: &Call) -> &str {
    match call {
        Call::CreateCertificate { csr_pem, .. } => csr_pem,
        other => panic!("not a CreateCertificate call: {other:?}"),
    }
}

fn certificate_of(call: &Call) -> &str {
    match call {
        Call::Register { certificate_id, .. } => certificate_id,
        other => panic!("not a Register call: {other:?}"),
    }
}

fn error_code(rec: &DeviceRecord) -> &str {
    match &rec.state {
        DeviceState::Failed { error, .. } => &error.error_code,
        other => panic!("{} is not failed but {other:?}", rec.id),
    }
}

// --- transitions ------------------------------------------------------------------------------

#[tokio::test]
async fn a_requested_device_walks_every_state_to_delivered() {
    let bench = Bench::new().await;
    let id = bench.put_requested("walk-1").await;
    let fake = Arc::new(FakeProvider::new());
    let engine = bench.engine(&fake, options());

    let rec = bench.wait_delivered(&id).await;
    let calls = fake.calls();
    assert_eq!(apis(&calls), [Api::CreateCertificate, Api::Register]);
    let csr = csr_of(&calls[0]);
    assert!(csr.contains("BEGIN CERTIFICATE REQUEST"), "{csr}");
    assert_eq!(rec.provision.csr.as_deref(), Some(csr));
    assert_eq!(
        calls[1],
        Call::Register {
            device: id.clone(),
            certificate_id: "cert-1".into(),
            ownership_token: "token-1".into(),
            parameters: rec.provision.parameters.clone(),
        }
    );
    assert!(rec.provision.gateway_key);
    assert!(
        bench.store.secret(&id).unwrap().is_some(),
        "the key is kept"
    );
    assert_eq!(rec.provision.certificate_id.as_deref(), Some("cert-1"));
    assert_eq!(rec.provision.thing_name, Some(fake::thing_name(&id)));
    assert_eq!(
        bench.store.token(&id).unwrap(),
        None,
        "the used token is gone"
    );
    assert_eq!((rec.attempts, rec.last_error), (0, None));
    wait_stats(&engine, "one provisioned", |s| s.provisioned == 1).await;
    assert_eq!((engine.stats().failed, engine.resumed().await), (0, 1));
    engine.shutdown().await;
}

#[tokio::test]
async fn a_device_with_its_own_csr_gets_no_gateway_key() {
    let bench = Bench::new().await;
    let id = device("own-csr-1");
    let mut rec = DeviceRecord::new(id.clone(), "cbor", crate::clock::unix_ms());
    rec.provision.own_csr = Some("the device's own CSR".into());
    bench.put(rec).await;
    let fake = Arc::new(FakeProvider::new());
    let engine = bench.engine(&fake, options());

    let rec = bench.wait_delivered(&id).await;
    assert_eq!(csr_of(&fake.calls()[0]), "the device's own CSR");
    assert!(!rec.provision.gateway_key);
    assert_eq!(bench.store.secret(&id).unwrap(), None);
    engine.shutdown().await;
}

#[tokio::test]
async fn each_state_is_durable_before_the_next_cloud_call() {
    let bench = Bench::new().await;
    let id = bench.put_requested("steps-1").await;
    let fake = Arc::new(FakeProvider::new());
    fake.script_delayed(Api::CreateCertificate, FOREVER, Outcome::Succeed);
    let engine = bench.engine(&fake, options());
    // While CreateCertificateFromCsr is outstanding the device is KeyReady with its CSR.
    let rec = bench
        .wait_for(&id, "a pending CreateCertificate", |_| {
            fake.count(Api::CreateCertificate) == 1
        })
        .await;
    match &rec.state {
        DeviceState::KeyReady { own_csr: None, csr } => {
            assert_eq!(rec.provision.csr.as_ref(), Some(csr))
        }
        other => panic!("expected KeyReady, got {other:?}"),
    }
    engine.shutdown().await;

    // While RegisterThing is outstanding: CertificateIssued, its token in the tokens tree. (A
    // new store: on this one, a new engine would resume the first device too.)
    let bench = Bench::new().await;
    let id = bench.put_requested("steps-2").await;
    let fake = Arc::new(FakeProvider::new());
    fake.script_delayed(Api::Register, FOREVER, Outcome::Succeed);
    let engine = bench.engine(&fake, options());
    let rec = bench
        .wait_for(&id, "a pending Register", |_| {
            fake.count(Api::Register) == 1
        })
        .await;
    match &rec.state {
        DeviceState::CertificateIssued {
            certificate_id,
            ownership_token,
            ..
        } => {
            assert_eq!(certificate_id, "cert-1");
            assert_eq!(
                ownership_token.as_ref().map(|t| t.expose()),
                Some("token-1")
            );
        }
        other => panic!("expected CertificateIssued, got {other:?}"),
    }
    let token = bench.store.token(&id).unwrap().expect("the token is kept");
    assert_eq!(token.certificate_id, "cert-1");
    engine.shutdown().await;
}

// --- ownership tokens -------------------------------------------------------------------------

#[tokio::test]
async fn an_expired_token_goes_back_to_key_ready_with_the_same_csr() {
    let bench = Bench::new().await;
    let id = bench.put_requested("expired-1").await;
    let fake = Arc::new(FakeProvider::new());
    fake.script(
        Api::CreateCertificate,
        Outcome::IssueWithTokenTtl(Duration::ZERO),
    );
    let engine = bench.engine(&fake, options());

    let rec = bench.wait_delivered(&id).await;
    let calls = fake.calls();
    // The expired token is never presented: a new certificate first.
    assert_eq!(
        apis(&calls),
        [
            Api::CreateCertificate,
            Api::CreateCertificate,
            Api::Register
        ]
    );
    assert_eq!(csr_of(&calls[0]), csr_of(&calls[1]), "same key, same CSR");
    assert_eq!(certificate_of(&calls[2]), "cert-2");
    assert_eq!(rec.provision.certificate_id.as_deref(), Some("cert-2"));
    assert_eq!(rec.attempts, 1);
    let last = rec
        .last_error
        .expect("the detour is kept as the last error");
    assert_eq!(last.error_code, INVALID_OWNERSHIP_TOKEN);
    engine.shutdown().await;
}

#[tokio::test]
async fn a_refused_token_gets_a_new_certificate() {
    let bench = Bench::new().await;
    let id = bench.put_requested("refused-1").await;
    let fake = Arc::new(FakeProvider::new());
    fake.script(Api::Register, Outcome::Fail(fake::invalid_token()));
    let engine = bench.engine(&fake, options());

    let rec = bench.wait_delivered(&id).await;
    let calls = fake.calls();
    assert_eq!(
        apis(&calls),
        [
            Api::CreateCertificate,
            Api::Register,
            Api::CreateCertificate,
            Api::Register
        ]
    );
    assert_eq!(certificate_of(&calls[1]), "cert-1");
    assert_eq!(certificate_of(&calls[3]), "cert-2");
    assert_eq!(csr_of(&calls[0]), csr_of(&calls[2]));
    assert_eq!(rec.provision.certificate_id.as_deref(), Some("cert-2"));
    assert_eq!(rec.attempts, 1);
    engine.shutdown().await;
}

#[tokio::test]
async fn refused_tokens_count_against_max_attempts() {
    let bench = Bench::new().await;
    let id = bench.put_requested("refused-2").await;
    let fake = Arc::new(FakeProvider::new());
    fake.fail_times(Api::Register, 3, &fake::invalid_token());
    let engine = bench.engine(&fake, options());

    let rec = bench.wait_failed(&id).await;
    assert_eq!(error_code(&rec), INVALID_OWNERSHIP_TOKEN);
    assert_eq!(rec.attempts, 3);
    assert_eq!(fake.count(Api::Register), 3);
    assert_eq!(fake.count(Api::CreateCertificate), 3);
    assert_eq!(bench.store.token(&id).unwrap(), None);
    wait_stats(&engine, "one failed", |s| s.failed == 1).await;
    engine.shutdown().await;
}

// --- cloud errors -----------------------------------------------------------------------------

#[tokio::test]
async fn a_4xx_rejection_fails_the_device_at_once() {
    let bench = Bench::new().await;
    let id = bench.put_requested("permanent-1").await;
    let fake = Arc::new(FakeProvider::new());
    let bad_csr = fake::rejected(Api::CreateCertificate, 400, "InvalidCSR");
    fake.script(Api::CreateCertificate, Outcome::Fail(bad_csr));
    let engine = bench.engine(&fake, options());

    let rec = bench.wait_failed(&id).await;
    assert_eq!(error_code(&rec), "InvalidCSR");
    assert!(matches!(
        rec.state,
        DeviceState::Failed {
            next_attempt_at_ms: None,
            ..
        }
    ));
    assert_eq!(
        rec.attempts, 0,
        "a permanent error is not an attempt to repeat"
    );
    assert_eq!(apis(&fake.calls()), [Api::CreateCertificate]);
    engine.shutdown().await;

    // The same on RegisterThing: the certificate was issued, the registration refused.
    let id = bench.put_requested("permanent-2").await;
    let fake = Arc::new(FakeProvider::new());
    let missing = fake::rejected(Api::Register, 404, "ResourceNotFound");
    fake.script(Api::Register, Outcome::Fail(missing));
    let engine = bench.engine(&fake, options());
    let rec = bench.wait_failed(&id).await;
    assert_eq!(error_code(&rec), "ResourceNotFound");
    assert_eq!(apis(&fake.calls()), [Api::CreateCertificate, Api::Register]);
    assert_eq!(
        bench.store.token(&id).unwrap(),
        None,
        "its token is dropped"
    );
    wait_stats(&engine, "one failed", |s| s.failed == 1).await;
    engine.shutdown().await;
}

#[tokio::test]
async fn transient_errors_count_until_max_attempts() {
    let bench = Bench::new().await;
    let id = bench.put_requested("transient-1").await;
    let fake = Arc::new(FakeProvider::new());
    let unavailable = fake::rejected(Api::CreateCertificate, 503, "ServiceUnavailable");
    fake.fail_times(Api::CreateCertificate, 3, &unavailable);
    let engine = bench.engine(&fake, options());

    let rec = bench.wait_failed(&id).await;
    assert_eq!(error_code(&rec), "ServiceUnavailable");
    assert_eq!(rec.attempts, 3);
    assert_eq!(apis(&fake.calls()), [Api::CreateCertificate; 3]);
    engine.shutdown().await;

    // Timeouts count the same way, here on RegisterThing.
    let id = bench.put_requested("transient-2").await;
    let fake = Arc::new(FakeProvider::new());
    fake.fail_times(Api::Register, 3, &fake::timeout(Api::Register));
    let engine = bench.engine(&fake, options());
    let rec = bench.wait_failed(&id).await;
    assert_eq!(error_code(&rec), "CloudTimeout");
    assert_eq!(rec.attempts, 3);
    assert_eq!(fake.count(Api::CreateCertificate), 1);
    assert_eq!(fake.count(Api::Register), 3);
    engine.shutdown().await;
}

#[tokio::test]
async fn transient_errors_below_max_attempts_are_retried_to_success() {
    let bench = Bench::new().await;
    let id = bench.put_requested("transient-3").await;
    let fake = Arc::new(FakeProvider::new());
    let unavailable = fake::rejected(Api::CreateCertificate, 500, "InternalFailure");
    fake.fail_times(Api::CreateCertificate, 2, &unavailable);
    let engine = bench.engine(&fake, options());

    let rec = bench.wait_delivered(&id).await;
    assert_eq!(fake.count(Api::CreateCertificate), 3);
    assert_eq!(rec.attempts, 2);
    let last = rec.last_error.expect("kept for diagnosis");
    assert_eq!(last.error_code, "InternalFailure");
    engine.shutdown().await;
}

#[tokio::test]
async fn throttling_and_a_lost_connection_are_not_counted() {
    let bench = Bench::new().await;
    let id = bench.put_requested("busy-1").await;
    let fake = Arc::new(FakeProvider::new());
    // Five of each, with max_attempts 3: counted, they would fail the device.
    fake.fail_times(
        Api::CreateCertificate,
        5,
        &fake::throttled(Api::CreateCertificate),
    );
    fake.fail_times(Api::Register, 5, &fake::connection_lost(Api::Register));
    let engine = bench.engine(&fake, options());

    let rec = bench.wait_delivered(&id).await;
    assert_eq!(fake.count(Api::CreateCertificate), 6);
    assert_eq!(fake.count(Api::Register), 6);
    assert_eq!((rec.attempts, rec.last_error), (0, None));
    engine.shutdown().await;
}

// --- resuming after a restart -----------------------------------------------------------------

/// Runs a first engine (with `first`'s script and answering devices through `session`) until
/// the device's record satisfies `reached`, stops it as a crash would leave it (the call in
/// flight never answers), then starts a second engine on the same store and returns the
/// delivered record and the calls the second one made.
async fn restart_after(
    bench: &Bench,
    id: &DeviceId,
    first: Arc<FakeProvider>,
    session: Arc<DownstreamSession>,
    reached: impl Fn(&DeviceRecord) -> bool,
) -> (DeviceRecord, Vec<Call>) {
    let engine = bench.engine_with(&first, session, options());
    bench
        .wait_for(id, "the state to resume from", reached)
        .await;
    engine.shutdown().await;

    let second = Arc::new(FakeProvider::new());
    let engine = bench.engine(&second, options());
    assert_eq!(engine.resumed().await, 1);
    let rec = bench.wait_delivered(id).await;
    engine.shutdown().await;
    (rec, second.calls())
}

#[tokio::test]
async fn resumes_from_requested_and_approved() {
    let bench = Bench::new().await;
    let requested = bench.put_requested("resume-requested").await;
    let approved = device("resume-approved");
    let mut rec = DeviceRecord::new(approved.clone(), "json", crate::clock::unix_ms());
    rec.state = DeviceState::Approved;
    bench.put(rec).await;
    let fake = Arc::new(FakeProvider::new());
    let engine = bench.engine(&fake, options());
    assert_eq!(engine.resumed().await, 2);
    for id in [&requested, &approved] {
        bench.wait_delivered(id).await;
        let made: Vec<Api> = fake
            .calls()
            .iter()
            .filter(|c| c.device() == id)
            .map(Call::api)
            .collect();
        assert_eq!(made, [Api::CreateCertificate, Api::Register], "{id}");
    }
    engine.shutdown().await;
}

#[tokio::test]
async fn resumes_from_key_ready_with_the_stored_key() {
    let bench = Bench::new().await;
    let id = bench.put_requested("resume-key").await;
    let first = Arc::new(FakeProvider::new());
    first.script_delayed(Api::CreateCertificate, FOREVER, Outcome::Succeed);
    let session = bench.downstream.session().clone();
    let stopped = first.clone();
    let key_before = {
        let engine = bench.engine_with(&first, session, options());
        let rec = bench
            .wait_for(&id, "keyReady", |_| {
                stopped.count(Api::CreateCertificate) == 1
            })
            .await;
        assert!(matches!(rec.state, DeviceState::KeyReady { .. }));
        engine.shutdown().await;
        bench.store.secret(&id).unwrap()
    };

    let second = Arc::new(FakeProvider::new());
    let engine = bench.engine(&second, options());
    let rec = bench.wait_delivered(&id).await;
    engine.shutdown().await;
    let calls = second.calls();
    assert_eq!(apis(&calls), [Api::CreateCertificate, Api::Register]);
    assert_eq!(
        Some(csr_of(&calls[0])),
        rec.provision.csr.as_deref(),
        "the stored CSR is sent again"
    );
    assert_eq!(
        bench.store.secret(&id).unwrap(),
        key_before,
        "no new key was made"
    );
}

#[tokio::test]
async fn resumes_from_certificate_issued_without_a_new_certificate() {
    let bench = Bench::new().await;
    let id = bench.put_requested("resume-cert").await;
    let first = Arc::new(FakeProvider::new());
    first.script_delayed(Api::Register, FOREVER, Outcome::Succeed);
    let session = bench.downstream.session().clone();
    let (rec, calls) = restart_after(&bench, &id, first, session, |r| {
        matches!(r.state, DeviceState::CertificateIssued { .. })
    })
    .await;
    // Only RegisterThing, with the first engine's certificate and token.
    assert_eq!(
        calls,
        [Call::Register {
            device: id.clone(),
            certificate_id: "cert-1".into(),
            ownership_token: "token-1".into(),
            parameters: rec.provision.parameters.clone(),
        }]
    );
    assert_eq!(rec.provision.certificate_id.as_deref(), Some("cert-1"));
}

#[tokio::test]
async fn a_pending_registration_is_persisted_then_polled_until_done() {
    let bench = Bench::new().await;
    let id = bench.put_requested("pending-poll").await;
    let fake = Arc::new(FakeProvider::new());
    fake.script(Api::Register, Outcome::Pending(Duration::from_millis(5)))
        .script(Api::Poll, Outcome::Pending(Duration::from_millis(5)));
    let engine = bench.engine(&fake, options());
    let rec = bench.wait_delivered(&id).await;
    engine.shutdown().await;
    // One registration, then polls of its operation until the cloud answered.
    assert_eq!(
        apis(&fake.calls()),
        [Api::CreateCertificate, Api::Register, Api::Poll, Api::Poll]
    );
    assert_eq!(
        fake.calls()[2],
        Call::Poll {
            device: id.clone(),
            operation: format!("op-{id}"),
        }
    );
    assert_eq!(rec.provision.thing_name, Some(fake::thing_name(&id)));
}

#[tokio::test]
async fn resumes_a_stored_operation_by_polling_never_registering_again() {
    let bench = Bench::new().await;
    let id = bench.put_requested("resume-registering").await;
    let first = Arc::new(FakeProvider::new());
    first
        .script(Api::Register, Outcome::Pending(FOREVER))
        .script_delayed(Api::Poll, FOREVER, Outcome::Succeed);
    let session = bench.downstream.session().clone();
    let (rec, calls) = restart_after(&bench, &id, first, session, |r| {
        matches!(r.state, DeviceState::Registering { .. })
    })
    .await;
    assert_eq!(
        calls,
        [Call::Poll {
            device: id.clone(),
            operation: format!("op-{id}"),
        }],
        "the restarted engine polls the stored operation and registers nothing"
    );
    assert_eq!(rec.provision.thing_name, Some(fake::thing_name(&id)));
}

#[tokio::test]
async fn a_forgotten_operation_is_registered_again() {
    let bench = Bench::new().await;
    let id = bench.put_requested("forgotten-op").await;
    let fake = Arc::new(FakeProvider::new());
    fake.script(Api::Register, Outcome::Pending(Duration::from_millis(1)))
        .script(
            Api::Poll,
            Outcome::Fail(fake::rejected(Api::Poll, 404, "404202")),
        );
    let engine = bench.engine(&fake, options());
    bench.wait_delivered(&id).await;
    engine.shutdown().await;
    assert_eq!(
        apis(&fake.calls()),
        [
            Api::CreateCertificate,
            Api::Register,
            Api::Poll,
            Api::Register
        ]
    );
}

#[tokio::test]
async fn resumes_from_thing_registered_without_calling_the_cloud() {
    let bench = Bench::new().await;
    let id = bench.put_requested("resume-thing").await;
    // The first engine cannot answer the device, so it stays Registered.
    let first = Arc::new(FakeProvider::new());
    let (rec, calls) = restart_after(
        &bench,
        &id,
        first,
        DownstreamSession::closed_for_tests().await,
        |r| matches!(r.state, DeviceState::Registered { .. }),
    )
    .await;
    assert_eq!(calls, []);
    assert_eq!(rec.provision.thing_name, Some(fake::thing_name(&id)));
}

#[tokio::test]
async fn final_and_waiting_states_are_left_alone() {
    let bench = Bench::new().await;
    let states = [
        ("left-waiting", DeviceState::WaitingApproval),
        ("left-delivered", DeviceState::Delivered),
        ("left-blocked", DeviceState::Blocked),
        (
            "left-failed",
            DeviceState::Failed {
                error: crate::store::ErrorInfo {
                    status_code: 400,
                    error_code: "InvalidCSR".into(),
                    error_message: "m".into(),
                },
                next_attempt_at_ms: None,
            },
        ),
    ];
    for (id, state) in &states {
        let mut rec = DeviceRecord::new(device(id), "json", crate::clock::unix_ms());
        rec.state = state.clone();
        bench.put(rec).await;
    }
    let fake = Arc::new(FakeProvider::new());
    let engine = bench.engine(&fake, options());
    assert_eq!(engine.resumed().await, 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.calls(), []);
    for (id, state) in &states {
        assert_eq!(&bench.record(&device(id)).state, state);
    }
    engine.shutdown().await;
}
