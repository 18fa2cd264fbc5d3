//! The AWS IoT emulator driven over real mutual TLS by rumqttc clients (MQTT 3.1.1 and 5):
//! the fleet provisioning APIs in JSON and CBOR, their errors, the per-certificate policy, device
//! telemetry, takeover, persistence across restarts and injected faults, checked through the
//! wire and the inspection API.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use common::http::http;
use common::messages;
use common::unix_now;
use common::wait::eventually_async;

use fleetgw::cloud::aws::topics;
use fleetgw::cloud::codec::{
    self, CreateCertificateFromCsrRequest, CreateCertificateFromCsrResponse,
    CreateKeysAndCertificateResponse, ErrorResponse, PayloadFormat, RegisterThingRequest,
    RegisterThingResponse,
};
use fleetgw::emulator::aws::{self, AwsEmulatorHandle, AwsEmulatorOptions};
use fleetgw::identity::{self, KeyType, PrivateKey};

const LIMIT: Duration = Duration::from_secs(15);
const JSON: PayloadFormat = PayloadFormat::Json;
const CBOR: PayloadFormat = PayloadFormat::Cbor;

// ---------------------------------------------------------------------------------------------
// Harness

async fn emulator(dir: &Path, tweak: impl FnOnce(&mut AwsEmulatorOptions)) -> AwsEmulatorHandle {
    let mut opts = AwsEmulatorOptions::ephemeral(dir);
    tweak(&mut opts);
    aws::start(opts).await.expect("emulator starts")
}

/// What a test starts from: an emulator with its files in a temp dir of its own.
struct Fixture {
    dir: TempDir,
    emu: AwsEmulatorHandle,
}

impl Fixture {
    async fn start(tweak: impl FnOnce(&mut AwsEmulatorOptions)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let emu = emulator(dir.path(), tweak).await;
        Self { dir, emu }
    }
}

fn claim_tls(emu: &AwsEmulatorHandle) -> Arc<rustls::ClientConfig> {
    let cert = std::fs::read_to_string(emu.claim_cert_path()).unwrap();
    let key =
        PrivateKey::from_pem(&std::fs::read_to_string(emu.claim_key_path()).unwrap()).unwrap();
    identity::tls::client_config(emu.ca_pem(), Some((&cert, &key))).unwrap()
}

fn device_tls(
    emu: &AwsEmulatorHandle,
    cert_pem: &str,
    key: &PrivateKey,
) -> Arc<rustls::ClientConfig> {
    identity::tls::client_config(emu.ca_pem(), Some((cert_pem, key))).unwrap()
}

/// What the test sees of a client connection.
#[derive(Debug)]
enum Ev {
    ConnAck,
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    PubAck,
    Publish(String, Bytes),
    Closed(String),
}

/// A rumqttc MQTT 3.1.1 client whose event loop runs in a task and reports into a channel;
/// the loop stops at the first error so a closed connection stays closed.
struct Client {
    mqtt: AsyncClient,
    events: mpsc::UnboundedReceiver<Ev>,
}

impl Client {
    async fn connect(
        addr: SocketAddr,
        client_id: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Client, String> {
        let mut opts = MqttOptions::new(client_id, "localhost", addr.port());
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        opts.set_max_packet_size(512 * 1024, 512 * 1024);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(false);
        opts.set_credentials("?SDK=IoTDeviceSDK/Python&Platform=Linux", "");
        let (mqtt, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Ev::ConnAck,
                    Ok(Event::Incoming(Packet::SubAck(s))) => Ev::SubAck(s.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(_))) => Ev::PubAck,
                    Ok(Event::Incoming(Packet::Publish(p))) => Ev::Publish(p.topic, p.payload),
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Ev::Closed(e.to_string()));
                        return;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        let mut client = Client { mqtt, events };
        match client.next().await {
            Ev::ConnAck => Ok(client),
            Ev::Closed(e) => Err(e),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// A connection with the emulator's claim certificate.
    async fn claim(emu: &AwsEmulatorHandle, client_id: &str) -> Client {
        Client::connect(emu.mqtt_addr(), client_id, claim_tls(emu))
            .await
            .unwrap()
    }

    async fn next(&mut self) -> Ev {
        timeout(LIMIT, self.events.recv())
            .await
            .expect("an MQTT event in time")
            .expect("event loop alive")
    }

    async fn subscribe(&mut self, filter: &str) -> Vec<rumqttc::SubscribeReasonCode> {
        self.mqtt.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        loop {
            match self.next().await {
                Ev::SubAck(codes) => return codes,
                Ev::Closed(e) => panic!("closed while subscribing to {filter}: {e}"),
                _ => {}
            }
        }
    }

    async fn publish(&self, topic: &str, qos: QoS, payload: Vec<u8>) {
        self.mqtt.publish(topic, qos, false, payload).await.unwrap();
    }

    /// The next publish received (skipping acks).
    async fn next_publish(&mut self) -> (String, Bytes) {
        loop {
            match self.next().await {
                Ev::Publish(t, p) => return (t, p),
                Ev::Closed(e) => panic!("closed while waiting for a publish: {e}"),
                _ => {}
            }
        }
    }

    /// Waits until the emulator closes the connection; returns the client's error text.
    async fn closed(&mut self) -> String {
        loop {
            if let Ev::Closed(e) = self.next().await {
                return e;
            }
        }
    }

    /// Subscribes to both response topics of `request_topic`, publishes `payload` and returns
    /// (accepted?, response payload).
    async fn request(&mut self, request_topic: &str, payload: Vec<u8>) -> (bool, Bytes) {
        let accepted = topics::accepted(request_topic);
        let rejected = topics::rejected(request_topic);
        self.subscribe(&accepted).await;
        self.subscribe(&rejected).await;
        self.publish(request_topic, QoS::AtLeastOnce, payload).await;
        let (topic, body) = self.next_publish().await;
        assert!(
            topic == accepted || topic == rejected,
            "response on unexpected topic {topic}"
        );
        (topic == accepted, body)
    }
}

fn new_csr(cn: &str) -> (PrivateKey, String) {
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = identity::create_csr(cn, &key).unwrap();
    (key, csr)
}

async fn create_from_csr(
    client: &mut Client,
    fmt: PayloadFormat,
    csr: &str,
) -> CreateCertificateFromCsrResponse {
    let req = CreateCertificateFromCsrRequest {
        certificate_signing_request: csr.to_string(),
    };
    let (ok, body) = client
        .request(&topics::create_from_csr(fmt), codec::encode(fmt, &req))
        .await;
    assert!(
        ok,
        "rejected: {:?}",
        codec::decode::<ErrorResponse>(fmt, &body)
    );
    codec::decode(fmt, &body).unwrap()
}

async fn register(
    client: &mut Client,
    template: &str,
    fmt: PayloadFormat,
    token: &str,
    params: &[(&str, &str)],
) -> Result<RegisterThingResponse, ErrorResponse> {
    let req = RegisterThingRequest {
        certificate_ownership_token: token.to_string(),
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let (ok, body) = client
        .request(
            &topics::register_thing(template, fmt),
            codec::encode(fmt, &req),
        )
        .await;
    if ok {
        Ok(codec::decode(fmt, &body).unwrap())
    } else {
        Err(codec::decode(fmt, &body).unwrap())
    }
}

/// A provisioned device: (thing name, certificate PEM, key).
async fn provision_device(emu: &AwsEmulatorHandle, serial: &str) -> (String, String, PrivateKey) {
    let mut claim = Client::claim(emu, &format!("claim-{serial}")).await;
    let (key, csr) = new_csr(serial);
    let cert = create_from_csr(&mut claim, JSON, &csr).await;
    let reg = register(
        &mut claim,
        aws::DEFAULT_TEMPLATE,
        JSON,
        &cert.certificate_ownership_token,
        &[("SerialNumber", serial)],
    )
    .await
    .unwrap();
    (reg.thing_name, cert.certificate_pem, key)
}

async fn get(emu: &AwsEmulatorHandle, path: &str) -> Value {
    let (status, body) = http(emu.api_addr(), "GET", path, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// The certificate's status at the emulator is `expected` (`None`: there is no such certificate).
async fn assert_certificate_status(emu: &AwsEmulatorHandle, id: &str, expected: Option<&str>) {
    assert_eq!(
        certificate_status(emu, id).await.as_deref(),
        expected,
        "certificate {id}"
    );
}

async fn certificate_status(emu: &AwsEmulatorHandle, id: &str) -> Option<String> {
    get(emu, "/certificates")
        .await
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["certificateId"] == id)
        .map(|c| c["status"].as_str().unwrap().to_string())
}

// ---------------------------------------------------------------------------------------------
// Provisioning APIs

#[tokio::test]
async fn csr_flow_in_json_and_cbor_issues_pending_certificates_chained_to_the_ca() {
    let Fixture { dir, emu } = Fixture::start(|_| {}).await;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
        emu.ca_pem()
    );
    let mut claim = Client::claim(&emu, "claim-1").await;
    for fmt in [JSON, CBOR] {
        let (key, csr) = new_csr(&format!("dev-{fmt}"));
        let resp = create_from_csr(&mut claim, fmt, &csr).await;
        identity::verify_chain(&resp.certificate_pem, emu.ca_pem(), unix_now()).unwrap();
        assert!(identity::cert_matches_csr(&resp.certificate_pem, &csr).unwrap());
        assert!(identity::cert_matches_key(&resp.certificate_pem, &key).unwrap());
        let info = identity::parse_certificates(&resp.certificate_pem).unwrap();
        assert_eq!(resp.certificate_id, info[0].fingerprint_sha256_hex);
        assert_eq!(
            info[0].subject_cn.as_deref(),
            Some(format!("dev-{fmt}").as_str())
        );
        assert!(!resp.certificate_ownership_token.is_empty());
        assert_certificate_status(&emu, &resp.certificate_id, Some("PENDING_ACTIVATION")).await;
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn cbor_indefinite_length_request_is_accepted() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let mut claim = Client::claim(&emu, "claim-cbor").await;
    let (_key, csr) = new_csr("indefinite");
    // {_ "certificateSigningRequest": "<pem>"} with an indefinite-length map (0xBF .. 0xFF).
    let mut payload = vec![0xBF, 0x78, 25];
    payload.extend_from_slice(b"certificateSigningRequest");
    payload.push(0x79);
    payload.extend_from_slice(&(csr.len() as u16).to_be_bytes());
    payload.extend_from_slice(csr.as_bytes());
    payload.push(0xFF);
    let (ok, body) = claim.request(&topics::create_from_csr(CBOR), payload).await;
    assert!(ok, "{:?}", codec::decode::<ErrorResponse>(CBOR, &body));
    let resp: CreateCertificateFromCsrResponse = codec::decode(CBOR, &body).unwrap();
    assert!(identity::cert_matches_csr(&resp.certificate_pem, &csr).unwrap());
    emu.shutdown().await;
}

#[tokio::test]
async fn create_keys_and_certificate_accepts_empty_and_empty_map_payloads() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let mut claim = Client::claim(&emu, "claim-keys").await;
    for (fmt, payload) in [
        (JSON, b"{}".to_vec()),
        (JSON, Vec::new()),
        (CBOR, vec![0xA0]),
    ] {
        let (ok, body) = claim.request(&topics::create_keys(fmt), payload).await;
        assert!(ok, "{:?}", codec::decode::<ErrorResponse>(fmt, &body));
        let resp: CreateKeysAndCertificateResponse = codec::decode(fmt, &body).unwrap();
        let key = PrivateKey::from_pem(&resp.private_key).unwrap();
        assert!(identity::cert_matches_key(&resp.certificate_pem, &key).unwrap());
        identity::verify_chain(&resp.certificate_pem, emu.ca_pem(), unix_now()).unwrap();
        assert_certificate_status(&emu, &resp.certificate_id, Some("PENDING_ACTIVATION")).await;
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn register_thing_activates_the_certificate_once_even_when_repeated_elsewhere() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let mut claim = Client::claim(&emu, "claim-a").await;
    let (_key, csr) = new_csr("sn-100");
    let cert = create_from_csr(&mut claim, CBOR, &csr).await;
    let token = cert.certificate_ownership_token.clone();
    let first = register(
        &mut claim,
        "FleetTemplate",
        CBOR,
        &token,
        &[("SerialNumber", "sn-100")],
    )
    .await
    .unwrap();
    assert_eq!(first.thing_name, "sn-100");
    assert_eq!(
        first.device_configuration["TelemetryTopic"],
        "dt/sn-100/telemetry"
    );
    assert_certificate_status(&emu, &cert.certificate_id, Some("ACTIVE")).await;

    // The SDK may redeem a token on another connection; repeating it changes nothing.
    let mut other = Client::claim(&emu, "claim-b").await;
    let again = register(
        &mut other,
        "FleetTemplate",
        JSON,
        &token,
        &[("SerialNumber", "sn-100")],
    )
    .await
    .unwrap();
    assert_eq!(again, first);
    let things = get(&emu, "/things").await;
    let things = things.as_array().unwrap();
    assert_eq!(things.len(), 1, "{things:?}");
    assert_eq!(things[0]["thingName"], "sn-100");
    assert_eq!(things[0]["attributes"]["SerialNumber"], "sn-100");
    assert_eq!(things[0]["certificateIds"][0], cert.certificate_id.as_str());
    let stats = get(&emu, "/stats").await;
    assert_eq!(stats["requests"]["registerThing"], 2);
    assert_eq!(stats["things"], 1);
    emu.shutdown().await;
}

#[tokio::test]
async fn bad_requests_are_rejected_with_aws_errors_and_keep_the_connection() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let mut claim = Client::claim(&emu, "claim-errors").await;
    let reject = |body: Bytes, fmt| codec::decode::<ErrorResponse>(fmt, &body).unwrap();

    let (ok, body) = claim
        .request(
            &topics::create_from_csr(JSON),
            b"{\"certificateSigningRequest\": 5}".to_vec(),
        )
        .await;
    assert!(!ok);
    let err = reject(body, JSON);
    assert_eq!(
        (err.status_code, err.error_code.as_str()),
        (400, "InvalidPayload")
    );
    assert!(
        err.error_message.contains("certificateSigningRequest"),
        "{err:?}"
    );

    let (ok, body) = claim
        .request(
            &topics::create_from_csr(CBOR),
            codec::encode(
                CBOR,
                &CreateCertificateFromCsrRequest {
                    certificate_signing_request: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
                },
            ),
        )
        .await;
    assert!(!ok);
    assert_eq!(reject(body, CBOR).status_code, 400);

    let (_key, csr) = new_csr("errs");
    let cert = create_from_csr(&mut claim, JSON, &csr).await;
    let token = cert.certificate_ownership_token.as_str();

    let err = register(
        &mut claim,
        "FleetTemplate",
        JSON,
        "forged-token",
        &[("SerialNumber", "x")],
    )
    .await
    .unwrap_err();
    assert_eq!(
        (err.status_code, err.error_code.as_str()),
        (400, "InvalidCertificateOwnershipToken")
    );
    let err = register(
        &mut claim,
        "FleetTemplate",
        JSON,
        "",
        &[("SerialNumber", "x")],
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.error_message,
        "Certificate ownership token cannot be empty."
    );

    let err = register(
        &mut claim,
        "NoSuchTemplate",
        JSON,
        token,
        &[("SerialNumber", "x")],
    )
    .await
    .unwrap_err();
    assert_eq!(
        (err.status_code, err.error_code.as_str()),
        (404, "ResourceNotFound")
    );

    let err = register(&mut claim, "FleetTemplate", JSON, token, &[])
        .await
        .unwrap_err();
    assert_eq!(
        (err.status_code, err.error_code.as_str()),
        (400, "InvalidParameters")
    );
    assert!(err.error_message.contains("SerialNumber"), "{err:?}");

    let err = register(
        &mut claim,
        "FleetTemplate",
        JSON,
        token,
        &[("SerialNumber", "denied-9")],
    )
    .await
    .unwrap_err();
    assert_eq!(
        (err.status_code, err.error_code.as_str()),
        (403, "AccessDenied")
    );

    // None of the failures consumed the token or created anything.
    assert_eq!(get(&emu, "/things").await.as_array().unwrap().len(), 0);
    let ok = register(
        &mut claim,
        "FleetTemplate",
        JSON,
        token,
        &[("SerialNumber", "errs")],
    )
    .await
    .unwrap();
    assert_eq!(ok.thing_name, "errs");
    emu.shutdown().await;
}

#[tokio::test]
async fn expired_tokens_are_refused_and_their_certificates_deleted() {
    let Fixture { dir: _dir, emu } = Fixture::start(|o| o.token_ttl = Duration::from_secs(1)).await;
    let mut claim = Client::claim(&emu, "claim-ttl").await;
    let (_key, csr) = new_csr("late");
    let cert = create_from_csr(&mut claim, JSON, &csr).await;
    eventually_async(
        "the unactivated certificate to be deleted",
        LIMIT,
        || async {
            certificate_status(&emu, &cert.certificate_id)
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    let err = register(
        &mut claim,
        "FleetTemplate",
        JSON,
        &cert.certificate_ownership_token,
        &[("SerialNumber", "late")],
    )
    .await
    .unwrap_err();
    assert_eq!(
        (err.status_code, err.error_code.as_str()),
        (400, "InvalidCertificateOwnershipToken")
    );
    assert!(err.error_message.contains("expired"), "{err:?}");
    emu.shutdown().await;
}

#[tokio::test]
async fn per_api_rate_limit_answers_429_and_faults_change_it() {
    let Fixture { dir: _dir, emu } = Fixture::start(|o| o.tps = Some(1.0)).await;
    let mut claim = Client::claim(&emu, "claim-tps").await;
    let (_k, csr) = new_csr("tps");
    let req = codec::encode(
        JSON,
        &CreateCertificateFromCsrRequest {
            certificate_signing_request: csr,
        },
    );
    let (first, _) = claim
        .request(&topics::create_from_csr(JSON), req.clone())
        .await;
    assert!(first);
    let (second, body) = claim
        .request(&topics::create_from_csr(JSON), req.clone())
        .await;
    assert!(!second);
    let err: ErrorResponse = codec::decode(JSON, &body).unwrap();
    assert_eq!(err.status_code, 429);
    // Another API has its own bucket.
    let (ok, _) = claim
        .request(&topics::create_keys(JSON), b"{}".to_vec())
        .await;
    assert!(ok);

    let (status, view) = http(emu.api_addr(), "POST", "/faults", Some(r#"{"tps": 1000}"#)).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["tps"], 1000.0);
    for _ in 0..3 {
        let (ok, _) = claim
            .request(&topics::create_from_csr(JSON), req.clone())
            .await;
        assert!(ok);
    }
    let (status, view) = http(emu.api_addr(), "DELETE", "/faults", None).await;
    assert_eq!(status, 200);
    assert_eq!(view["tps"], 1.0);
    assert!(
        get(&emu, "/stats").await["requests"]["throttled"]
            .as_u64()
            .unwrap()
            >= 1
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn responses_go_only_to_the_requesting_connection() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let mut a = Client::claim(&emu, "claim-a").await;
    let mut b = Client::claim(&emu, "claim-b").await;
    // B listens on the same response topics before A asks.
    b.subscribe(&topics::accepted(&topics::create_from_csr(JSON)))
        .await;
    let (_ka, csr_a) = new_csr("isolated-a");
    let resp_a = create_from_csr(&mut a, JSON, &csr_a).await;
    assert!(identity::cert_matches_csr(&resp_a.certificate_pem, &csr_a).unwrap());
    // B's first publish is the answer to its own request, never A's.
    let (_kb, csr_b) = new_csr("isolated-b");
    let resp_b = create_from_csr(&mut b, JSON, &csr_b).await;
    assert!(identity::cert_matches_csr(&resp_b.certificate_pem, &csr_b).unwrap());
    // A request without a subscription gets no answer, but the certificate is still issued.
    let mut c = Client::claim(&emu, "claim-c").await;
    let (_kc, csr_c) = new_csr("unsubscribed");
    c.publish(
        &topics::create_from_csr(JSON),
        QoS::AtLeastOnce,
        codec::encode(
            JSON,
            &CreateCertificateFromCsrRequest {
                certificate_signing_request: csr_c,
            },
        ),
    )
    .await;
    eventually_async("the third certificate", LIMIT, || async {
        (get(&emu, "/certificates").await.as_array().unwrap().len() == 3).then_some(())
    })
    .await;
    // Unsubscribing works (the SDK's V2 client does it between APIs).
    c.mqtt
        .unsubscribe("$aws/certificates/create-from-csr/json/accepted")
        .await
        .unwrap();
    let resp_c2 = create_from_csr(&mut c, JSON, &new_csr("again").1).await;
    assert!(!resp_c2.certificate_id.is_empty());
    emu.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Policy: claim and device connections

#[tokio::test]
async fn claim_certificate_cannot_publish_or_subscribe_outside_provisioning_topics() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let mut claim = Client::claim(&emu, "claim-bad").await;
    claim
        .publish("dt/claim/telemetry", QoS::AtLeastOnce, b"{}".to_vec())
        .await;
    claim.closed().await;
    assert!(get(&emu, "/messages").await.as_array().unwrap().is_empty());

    let mut claim = Client::claim(&emu, "claim-bad2").await;
    claim
        .mqtt
        .subscribe("cmd/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    claim.closed().await;
    assert_eq!(
        get(&emu, "/stats").await["connections"]["closedByPolicy"],
        2
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn only_active_certificates_connect_and_only_as_their_thing() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let mut claim = Client::claim(&emu, "claim-p").await;
    let (key, csr) = new_csr("pending-1");
    let pending = create_from_csr(&mut claim, JSON, &csr).await;
    let tls = device_tls(&emu, &pending.certificate_pem, &key);
    let err = Client::connect(emu.mqtt_addr(), "pending-1", tls.clone())
        .await
        .err()
        .unwrap();
    assert!(err.contains("NotAuthorized"), "{err}");

    register(
        &mut claim,
        "FleetTemplate",
        JSON,
        &pending.certificate_ownership_token,
        &[("SerialNumber", "pending-1")],
    )
    .await
    .unwrap();
    let err = Client::connect(emu.mqtt_addr(), "someone-else", tls.clone())
        .await
        .err()
        .unwrap();
    assert!(err.contains("NotAuthorized"), "{err}");
    Client::connect(emu.mqtt_addr(), "pending-1", tls)
        .await
        .unwrap();
    emu.shutdown().await;
}

/// The ready-made gateway certificate (`DIR/gateway.pem`) connects as its thing only, may
/// publish any device's telemetry topic (no IoT policies on device topics) and receives what
/// the cloud side publishes with `POST /topics/{topic}` on the filters it subscribed to.
#[tokio::test]
async fn gateway_certificate_connects_as_its_thing_and_receives_cloud_side_publishes() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let cert = std::fs::read_to_string(emu.gateway_cert_path()).unwrap();
    let key = PrivateKey::import_file(&emu.gateway_key_path(), None).unwrap();
    let tls = device_tls(&emu, &cert, &key);
    let err = Client::connect(emu.mqtt_addr(), "sensor-1", tls.clone())
        .await
        .err()
        .unwrap();
    assert!(err.contains("NotAuthorized"), "{err}");
    let mut gw = Client::connect(emu.mqtt_addr(), emu.gateway_thing(), tls)
        .await
        .unwrap();

    assert_eq!(
        gw.subscribe("cmd/thing-a/#").await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let (status, body) = http(
        emu.api_addr(),
        "POST",
        "/topics/cmd/thing-b/x?qos=1",
        Some("b"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Percent-encoded slashes, as the AWS SDKs send the topic.
    let (status, body) = http(
        emu.api_addr(),
        "POST",
        "/topics/cmd%2Fthing-a%2Freboot?qos=1",
        Some("now"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["topic"], "cmd/thing-a/reboot");
    let (topic, payload) = gw.next_publish().await;
    assert_eq!(
        topic, "cmd/thing-a/reboot",
        "thing-b's message must not arrive"
    );
    assert_eq!(&payload[..], b"now");

    for bad in [
        "/topics/cmd/+/x",
        "/topics/%24aws/things/x",
        "/topics/cmd/a?qos=2",
    ] {
        let (status, body) = http(emu.api_addr(), "POST", bad, Some("x")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["error"].as_str().unwrap().starts_with("publish: "),
            "{body}"
        );
    }

    gw.publish(
        "dt/thing-a/telemetry",
        QoS::AtLeastOnce,
        b"{\"seq\":0}".to_vec(),
    )
    .await;
    let recorded = eventually_async("the gateway's message in /messages", LIMIT, || async {
        let list = get(&emu, "/messages").await;
        list.as_array().unwrap().first().cloned()
    })
    .await;
    assert_eq!(recorded["clientId"], "gw-01");
    assert_eq!(recorded["topic"], "dt/thing-a/telemetry");
    // Known like the claim certificate: not a provisioned thing or certificate.
    assert_eq!(get(&emu, "/things").await, serde_json::json!([]));
    assert_eq!(get(&emu, "/certificates").await, serde_json::json!([]));
    emu.shutdown().await;
}

#[tokio::test]
async fn device_qos1_telemetry_is_acknowledged_and_recorded_in_order() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let (thing, cert, key) = provision_device(&emu, "sensor-7").await;
    let mut dev = Client::connect(emu.mqtt_addr(), &thing, device_tls(&emu, &cert, &key))
        .await
        .unwrap();
    assert_eq!(
        dev.subscribe("cmd/sensor-7/#").await,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    for i in 0..3 {
        dev.publish(
            "dt/sensor-7/telemetry",
            QoS::AtLeastOnce,
            format!("{{\"n\":{i}}}").into_bytes(),
        )
        .await;
        loop {
            match dev.next().await {
                Ev::PubAck => break,
                Ev::Closed(e) => panic!("{e}"),
                _ => {}
            }
        }
    }
    let msgs = get(&emu, "/messages?clientId=sensor-7").await;
    let msgs = msgs.as_array().unwrap();
    assert_eq!(msgs.len(), 3);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["clientId"], "sensor-7");
        assert_eq!(m["topic"], "dt/sensor-7/telemetry");
        assert_eq!(m["qos"], 1);
        assert_eq!(messages::payload(m), format!("{{\"n\":{i}}}").into_bytes());
    }
    let stats = get(&emu, "/stats").await;
    assert_eq!(stats["clients"]["sensor-7"]["messages"], 3);
    emu.shutdown().await;
}

#[tokio::test]
async fn qos2_and_oversized_publishes_close_the_connection() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let (thing, cert, key) = provision_device(&emu, "limits-1").await;
    let tls = device_tls(&emu, &cert, &key);

    let mut dev = Client::connect(emu.mqtt_addr(), &thing, tls.clone())
        .await
        .unwrap();
    dev.publish("dt/limits-1/telemetry", QoS::ExactlyOnce, b"x".to_vec())
        .await;
    dev.closed().await;

    let mut dev = Client::connect(emu.mqtt_addr(), &thing, tls.clone())
        .await
        .unwrap();
    dev.publish(
        "dt/limits-1/telemetry",
        QoS::AtLeastOnce,
        vec![b'a'; 128 * 1024],
    )
    .await;
    loop {
        match dev.next().await {
            Ev::PubAck => break,
            Ev::Closed(e) => panic!("a 128 KiB payload is allowed: {e}"),
            _ => {}
        }
    }
    dev.publish(
        "dt/limits-1/telemetry",
        QoS::AtLeastOnce,
        vec![b'a'; 128 * 1024 + 1],
    )
    .await;
    dev.closed().await;
    let msgs = get(&emu, "/messages").await;
    assert_eq!(msgs.as_array().unwrap().len(), 1);
    emu.shutdown().await;
}

#[tokio::test]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let (thing, cert, key) = provision_device(&emu, "twin-1").await;
    let tls = device_tls(&emu, &cert, &key);
    let mut first = Client::connect(emu.mqtt_addr(), &thing, tls.clone())
        .await
        .unwrap();
    let mut second = Client::connect(emu.mqtt_addr(), &thing, tls).await.unwrap();
    first.closed().await;
    second
        .publish(
            "dt/twin-1/telemetry",
            QoS::AtLeastOnce,
            b"still here".to_vec(),
        )
        .await;
    loop {
        match second.next().await {
            Ev::PubAck => break,
            Ev::Closed(e) => panic!("{e}"),
            _ => {}
        }
    }
    emu.shutdown().await;
}

#[tokio::test]
async fn keep_alive_is_enforced() {
    use rumqttc::mqttbytes::v4;
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let tcp = TcpStream::connect(emu.mqtt_addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(claim_tls(&emu))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut connect = v4::Connect::new("silent");
    connect.keep_alive = 1;
    let mut buf = bytes::BytesMut::new();
    v4::Packet::Connect(connect)
        .write(&mut buf, usize::MAX)
        .unwrap();
    tls.write_all(&buf).await.unwrap();
    let started = Instant::now();
    let mut received = Vec::new();
    // CONNACK, then the server closes after 1.5 x keep-alive of silence.
    let read = timeout(LIMIT, tls.read_to_end(&mut received))
        .await
        .unwrap();
    assert!(read.is_ok() || !received.is_empty(), "{read:?}");
    assert_eq!(received[..2], [0x20, 0x02]);
    assert!(started.elapsed() >= Duration::from_millis(1400));
    emu.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// MQTT 5

#[tokio::test]
async fn mqtt5_clients_provision_and_publish() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};

    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let mut opts = Options5::new("claim-v5", "localhost", emu.mqtt_addr().port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        claim_tls(&emu),
    )));
    opts.set_max_packet_size(Some(512 * 1024));
    let (client, mut eventloop) = Client5::new(opts, 16);
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event5::Incoming(P5::ConnAck(c))) => {
                    let _ = tx.send(Err(format!("connack {:?}", c.code)));
                }
                Ok(Event5::Incoming(P5::SubAck(_))) => {
                    let _ = tx.send(Err("suback".to_string()));
                }
                Ok(Event5::Incoming(P5::Publish(p))) => {
                    let _ = tx.send(Ok((
                        String::from_utf8(p.topic.to_vec()).unwrap(),
                        p.payload,
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(format!("closed {e}")));
                    return;
                }
            }
        }
    });
    macro_rules! next {
        () => {
            timeout(LIMIT, rx.recv()).await.unwrap().unwrap()
        };
    }
    assert_eq!(next!(), Err("connack Success".to_string()));
    let csr_topic = topics::create_from_csr(JSON);
    client
        .subscribe(topics::accepted(&csr_topic), Q5::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(next!(), Err("suback".to_string()));
    let (key, csr) = new_csr("v5-dev");
    client
        .publish(
            csr_topic.clone(),
            Q5::AtLeastOnce,
            false,
            codec::encode(
                JSON,
                &CreateCertificateFromCsrRequest {
                    certificate_signing_request: csr.clone(),
                },
            ),
        )
        .await
        .unwrap();
    let (topic, body) = next!().unwrap();
    assert_eq!(topic, topics::accepted(&csr_topic));
    let cert: CreateCertificateFromCsrResponse = codec::decode(JSON, &body).unwrap();
    assert!(identity::cert_matches_csr(&cert.certificate_pem, &csr).unwrap());

    let reg_topic = topics::register_thing("FleetTemplate", JSON);
    client
        .subscribe(topics::accepted(&reg_topic), Q5::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(next!(), Err("suback".to_string()));
    let req = RegisterThingRequest {
        certificate_ownership_token: cert.certificate_ownership_token,
        parameters: BTreeMap::from([("SerialNumber".to_string(), "v5-dev".to_string())]),
    };
    client
        .publish(
            reg_topic.clone(),
            Q5::AtLeastOnce,
            false,
            codec::encode(JSON, &req),
        )
        .await
        .unwrap();
    let (topic, body) = next!().unwrap();
    assert_eq!(topic, topics::accepted(&reg_topic));
    let reg: RegisterThingResponse = codec::decode(JSON, &body).unwrap();
    assert_eq!(reg.thing_name, "v5-dev");

    // The device itself over MQTT 5: QoS 1 telemetry lands in /messages.
    let mut opts = Options5::new("v5-dev", "localhost", emu.mqtt_addr().port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        device_tls(&emu, &cert.certificate_pem, &key),
    )));
    let (device, mut device_loop) = Client5::new(opts, 16);
    device
        .publish(
            "dt/v5-dev/telemetry",
            Q5::AtLeastOnce,
            false,
            b"hello-5".to_vec(),
        )
        .await
        .unwrap();
    let acked = timeout(LIMIT, async {
        loop {
            match device_loop.poll().await {
                Ok(Event5::Incoming(P5::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap();
    acked.unwrap();
    let msgs = get(&emu, "/messages?clientId=v5-dev").await;
    assert_eq!(msgs[0]["payloadBase64"], "aGVsbG8tNQ==");
    emu.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Persistence, discovery files, faults

#[tokio::test]
async fn restart_with_the_same_dir_keeps_the_ca_things_and_certificates() {
    let Fixture { dir, emu } = Fixture::start(|_| {}).await;
    let ca_before = emu.ca_pem().to_string();
    let claim_before = std::fs::read(emu.claim_cert_path()).unwrap();
    let (thing, cert, key) = provision_device(&emu, "keeper-1").await;
    let things_before = get(&emu, "/things").await;
    emu.shutdown().await;

    let emu = emulator(dir.path(), |_| {}).await;
    assert_eq!(emu.ca_pem(), ca_before);
    assert_eq!(std::fs::read(emu.claim_cert_path()).unwrap(), claim_before);
    assert_eq!(get(&emu, "/things").await, things_before);
    let dev = Client::connect(emu.mqtt_addr(), &thing, device_tls(&emu, &cert, &key))
        .await
        .unwrap();
    dev.publish("dt/keeper-1/telemetry", QoS::AtMostOnce, b"back".to_vec())
        .await;
    eventually_async("the message after restart", LIMIT, || async {
        (get(&emu, "/messages").await.as_array().unwrap().len() == 1).then_some(())
    })
    .await;
    emu.shutdown().await;
}

#[tokio::test]
async fn discovery_files_describe_the_bound_listeners() {
    let Fixture { dir, emu } = Fixture::start(|_| {}).await;
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let discovery: Value =
        serde_json::from_slice(&std::fs::read(root.join("emulator.json")).unwrap()).unwrap();
    assert_eq!(discovery["mqtt"], emu.mqtt_addr().to_string());
    assert_eq!(discovery["api"], format!("http://{}", emu.api_addr()));
    assert_eq!(discovery["ca"], root.join("ca.pem").display().to_string());
    assert_eq!(
        discovery["claimCert"],
        root.join("claim.pem").display().to_string()
    );
    assert_eq!(
        discovery["claimKey"],
        root.join("claim.key").display().to_string()
    );
    assert_eq!(discovery["templates"], serde_json::json!(["FleetTemplate"]));
    assert_eq!(
        discovery["gatewayCert"],
        root.join("gateway.pem").display().to_string()
    );
    assert_eq!(
        discovery["gatewayKey"],
        root.join("gateway.key").display().to_string()
    );
    assert_eq!(discovery["gatewayThing"], "gw-01");
    use std::os::unix::fs::PermissionsExt;
    for secret in ["claim.key", "ca.key", "server.key", "gateway.key"] {
        let mode = std::fs::metadata(root.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }
    let server =
        identity::parse_certificates(&std::fs::read_to_string(root.join("server.pem")).unwrap())
            .unwrap();
    let server_der = &server[0].der;
    let (_, parsed) = x509_parser::parse_x509_certificate(server_der).unwrap();
    let san = parsed.subject_alternative_name().unwrap().unwrap().value;
    let names: Vec<String> = san.general_names.iter().map(|n| n.to_string()).collect();
    assert!(
        names.contains(&"DNSName(localhost)".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"IPAddress(7f:00:00:01)".to_string()),
        "{names:?}"
    );

    let config: toml::Table = std::fs::read_to_string(root.join("gateway.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let aws = &config["cloud"]["aws"];
    assert_eq!(config["cloud"]["provider"].as_str(), Some("aws"));
    assert_eq!(
        aws["endpoint"].as_str().unwrap(),
        format!("localhost:{}", emu.mqtt_addr().port())
    );
    assert_eq!(
        aws["ca"].as_str().unwrap(),
        root.join("ca.pem").display().to_string()
    );
    assert_eq!(
        aws["claim_cert"].as_str().unwrap(),
        root.join("claim.pem").display().to_string()
    );
    assert_eq!(
        aws["claim_key"].as_str().unwrap(),
        root.join("claim.key").display().to_string()
    );
    assert_eq!(aws["template"].as_str(), Some("FleetTemplate"));
    assert_eq!(config["admission"]["mode"].as_str(), Some("open"));
    assert!(config["gateway"]["state_dir"]
        .as_str()
        .unwrap()
        .starts_with(root.to_str().unwrap()));
    assert!(config["admin"]["socket"]
        .as_str()
        .unwrap()
        .starts_with(root.to_str().unwrap()));
    // And the gateway's own loader accepts it as a complete config.
    let loaded = fleetgw::config::load(&root.join("gateway.toml"), &[]).unwrap();
    assert_eq!(
        loaded.cloud.aws.endpoint,
        format!("localhost:{}", emu.mqtt_addr().port())
    );
    assert_eq!(loaded.cloud.aws.claim_key, root.join("claim.key"));
    // The gateway identity is ready but not chosen: `--set telemetry.identity=gateway`.
    assert_eq!(
        loaded.telemetry.identity,
        fleetgw::config::TelemetryIdentity::Device
    );
    assert_eq!(
        loaded.telemetry.gateway_cert.as_deref(),
        Some(root.join("gateway.pem").as_path())
    );
    assert_eq!(
        loaded.telemetry.gateway_key.as_deref(),
        Some(root.join("gateway.key").as_path())
    );
    assert_eq!(loaded.gateway_upstream_client_id(), emu.gateway_thing());
    let gw_cert = std::fs::read_to_string(root.join("gateway.pem")).unwrap();
    let gw_key = identity::PrivateKey::import_file(&root.join("gateway.key"), None).unwrap();
    assert!(identity::cert_matches_key(&gw_cert, &gw_key).unwrap());
    identity::verify_chain(&gw_cert, emu.ca_pem(), unix_now()).unwrap();
    let gw = identity::parse_certificates(&gw_cert).unwrap();
    assert_eq!(gw[0].subject_cn.as_deref(), Some("gw-01"));
    emu.shutdown().await;
}

#[tokio::test]
async fn an_outage_drops_connections_and_refuses_new_ones_until_it_ends() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let mut claim = Client::claim(&emu, "claim-outage").await;
    let (status, view) = http(
        emu.api_addr(),
        "POST",
        "/faults",
        Some(r#"{"outageSeconds": 2}"#),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    assert!(view["outageSecondsLeft"].as_f64().unwrap() > 0.0);
    claim.closed().await;
    assert!(
        Client::connect(emu.mqtt_addr(), "claim-outage", claim_tls(&emu))
            .await
            .is_err()
    );
    let mut back = eventually_async("the outage to end", LIMIT, || async {
        Client::connect(emu.mqtt_addr(), "claim-outage", claim_tls(&emu))
            .await
            .ok()
    })
    .await;
    let resp = create_from_csr(&mut back, JSON, &new_csr("after-outage").1).await;
    assert!(!resp.certificate_id.is_empty());

    let (status, body) = http(
        emu.api_addr(),
        "POST",
        "/faults",
        Some(r#"{"dropResponses": 2}"#),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("dropResponses"),
        "{body}"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn templates_file_adds_templates_and_inactive_certificates_cannot_connect() {
    let dir = tempfile::tempdir().unwrap();
    let templates = dir.path().join("templates.json");
    let file = serde_json::json!({"templates": [{
        "templateName": "Quarantine",
        "templateBody": serde_json::json!({
            "Parameters": {"SerialNumber": {"Type": "String"}, "Site": {"Type": "String", "Default": "lab"}},
            "Resources": {
                "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                    "ThingName": {"Fn::Join": ["-", ["q", {"Ref": "Site"}, {"Ref": "SerialNumber"}]]},
                    "AttributePayload": {"site": {"Ref": "Site"}}}},
                "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                    "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "Inactive"}}
            },
            "DeviceConfiguration": {"site": {"Ref": "Site"}}
        }).to_string(),
        "preProvisioningHook": {"deny": {"SerialNumber": ["SN-STOLEN"]}}
    }]});
    std::fs::write(&templates, file.to_string()).unwrap();
    let emu = emulator(&dir.path().join("emu"), |o| {
        o.templates = Some(templates.clone())
    })
    .await;
    assert_eq!(emu.templates(), ["FleetTemplate", "Quarantine"]);
    let mut claim = Client::claim(&emu, "claim-q").await;
    let (key, csr) = new_csr("q-1");
    let cert = create_from_csr(&mut claim, JSON, &csr).await;
    let token = cert.certificate_ownership_token.as_str();
    let err = register(
        &mut claim,
        "Quarantine",
        JSON,
        token,
        &[("SerialNumber", "SN-STOLEN")],
    )
    .await
    .unwrap_err();
    assert_eq!(err.status_code, 403);
    let reg = register(
        &mut claim,
        "Quarantine",
        JSON,
        token,
        &[("SerialNumber", "7")],
    )
    .await
    .unwrap();
    assert_eq!(reg.thing_name, "q-lab-7");
    assert_eq!(reg.device_configuration["site"], "lab");
    assert_certificate_status(&emu, &cert.certificate_id, Some("INACTIVE")).await;
    let err = Client::connect(
        emu.mqtt_addr(),
        "q-lab-7",
        device_tls(&emu, &cert.certificate_pem, &key),
    )
    .await
    .err()
    .unwrap();
    assert!(err.contains("NotAuthorized"), "{err}");
    emu.shutdown().await;
}

#[tokio::test]
async fn response_delay_and_dropped_response_faults() {
    let Fixture { dir: _dir, emu } = Fixture::start(|_| {}).await;
    let mut claim = Client::claim(&emu, "claim-faults").await;
    let (status, _) = http(
        emu.api_addr(),
        "POST",
        "/faults",
        Some(r#"{"responseDelayMs": 300}"#),
    )
    .await;
    assert_eq!(status, 200);
    let started = Instant::now();
    create_from_csr(&mut claim, JSON, &new_csr("slow").1).await;
    assert!(started.elapsed() >= Duration::from_millis(300));

    let (status, view) = http(
        emu.api_addr(),
        "POST",
        "/faults",
        Some(r#"{"dropResponses": 1.0, "responseDelayMs": 0}"#),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(view["dropResponses"], 1.0);
    claim
        .subscribe(&topics::accepted(&topics::create_from_csr(JSON)))
        .await;
    claim
        .publish(
            &topics::create_from_csr(JSON),
            QoS::AtLeastOnce,
            codec::encode(
                JSON,
                &CreateCertificateFromCsrRequest {
                    certificate_signing_request: new_csr("dropped").1,
                },
            ),
        )
        .await;
    eventually_async("the response to be dropped", LIMIT, || async {
        (get(&emu, "/stats").await["requests"]["droppedResponses"] == 1).then_some(())
    })
    .await;
    // The request was still served: the certificate exists, only its answer was lost.
    assert_eq!(
        get(&emu, "/certificates").await.as_array().unwrap().len(),
        2
    );

    let (status, view) = http(emu.api_addr(), "DELETE", "/faults", None).await;
    assert_eq!(status, 200);
    assert_eq!(view["dropResponses"], 0.0);
    let resp = create_from_csr(&mut claim, JSON, &new_csr("answered").1).await;
    assert!(!resp.certificate_id.is_empty());
    emu.shutdown().await;
}
