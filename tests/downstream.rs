//! Downstream against real brokers on 127.0.0.1: the embedded broker and mosquitto (external),
//! with rumqttc clients playing the devices. Covers the provisioning round trip, telemetry
//! routing, the invalid-id rejection, reconnect with backoff and resubscription, manual-ack
//! redelivery, and the mosquitto ACL recipe of docs/mosquitto.md.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::mosquitto::{Mosquitto, MosquittoConfig};
use common::mqtt_client::{options, ClientEvent, TestClient};
use common::publisher::{publish_sequence, Sequence};
use common::relay::Relay;
use common::wait::eventually;
use common::WAIT;
use fleetgw::device_id::DeviceId;
use fleetgw::downstream::{
    contract, session, AcceptedResponse, AckOutcome, Attestation, BrokerError, BrokerOptions,
    DeviceStatus, DeviceTopic, Downstream, DownstreamMessage, DownstreamOptions, EmbeddedBroker,
    EmbeddedBrokerOptions, EmbeddedTls, ExternalBrokerOptions, PayloadFormat, ProvisionRequest,
    RejectedResponse, SessionError, SessionStatus, StatusReport,
};
use fleetgw::identity::{CertificateAuthority, Secret};
use rumqttc::{QoS, SubscribeReasonCode, TlsConfiguration, Transport};
use tokio::sync::mpsc;

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn embedded_options() -> DownstreamOptions {
    let broker = EmbeddedBrokerOptions {
        listen: loopback0(),
        ..EmbeddedBrokerOptions::default()
    };
    DownstreamOptions::new("fleetgw-gw-test".into(), BrokerOptions::Embedded(broker))
}

fn external_options(url: String, user: Option<(&str, &str)>) -> DownstreamOptions {
    let mut x = ExternalBrokerOptions::new(url);
    if let Some((u, p)) = user {
        x.username = Some(u.to_string());
        x.password = Some(Secret::from(p));
    }
    DownstreamOptions::new("fleetgw-gw-test".into(), BrokerOptions::External(x))
}

/// Starts an external-broker gateway with quick reconnects and waits until it is subscribed.
async fn external_gateway(
    opts: &DownstreamOptions,
) -> (Downstream, mpsc::Receiver<DownstreamMessage>) {
    let (gw, rx) = Downstream::start_with(opts, |s| {
        s.reconnect_min = Duration::from_millis(100);
        s.reconnect_max = Duration::from_millis(800);
    })
    .await
    .expect("start downstream");
    gw.session()
        .wait_subscribed(WAIT)
        .await
        .expect("gateway subscribed");
    (gw, rx)
}

async fn next_message(rx: &mut mpsc::Receiver<DownstreamMessage>) -> DownstreamMessage {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("gateway received nothing in time")
        .expect("gateway channel closed")
}

async fn wait_status(gw: &Downstream, what: &str, pred: impl Fn(&SessionStatus) -> bool) {
    let mut rx = gw.session().watch_status();
    let ok = tokio::time::timeout(WAIT, rx.wait_for(|s| pred(s)))
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
    assert!(
        ok,
        "gateway session never {what}: {:?}",
        gw.session().status()
    );
}

/// The provisioning exchange of the device contract, between a device and the gateway.
async fn provision_round_trip(
    gw: &Downstream,
    rx: &mut mpsc::Receiver<DownstreamMessage>,
    device: mqtt_opts::Maker,
) {
    let sensor = id("sensor-1");
    let mut dev = TestClient::connect_ok(device("sensor-1")).await;
    for filter in [
        "fleetgw/sensor-1/provision/json/accepted",
        "fleetgw/sensor-1/status",
    ] {
        assert_eq!(
            dev.subscribe(filter, QoS::AtLeastOnce).await,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            "{filter}"
        );
    }
    let request = br#"{"attestation":{"type":"none"},"parameters":{"SerialNumber":"sn-1"}}"#;
    dev.publish_unacked(
        "fleetgw/sensor-1/provision/json",
        QoS::AtLeastOnce,
        false,
        request,
    )
    .await;

    let msg = next_message(rx).await;
    assert_eq!(
        msg.topic,
        DeviceTopic::ProvisionRequest {
            device: sensor.clone(),
            format: PayloadFormat::Json
        }
    );
    assert_eq!(msg.payload, Bytes::from_static(request));
    assert_eq!(msg.qos, QoS::AtLeastOnce);
    let decoded = ProvisionRequest::decode(PayloadFormat::Json, &msg.payload).unwrap();
    assert_eq!(decoded.attestation, Attestation::None);
    assert_eq!(decoded.parameters["SerialNumber"], "sn-1");
    assert_eq!(msg.ack.ack(), AckOutcome::Accepted);
    // The device's PUBACK follows the gateway's (end to end with the embedded broker).
    dev.expect_puback("the provisioning request").await;

    let accepted = AcceptedResponse {
        device_id: sensor.clone(),
        certificate_id: "cert-1".into(),
        certificate_pem: "-----BEGIN CERTIFICATE-----".into(),
        private_key: Some("-----BEGIN PRIVATE KEY-----".into()),
        thing_name: "sensor-1".into(),
        device_configuration: Default::default(),
        assigned_hub: None,
    };
    let status = StatusReport::new(DeviceStatus::Provisioned, 1_763_887_000_000);
    let session = gw.session();
    session
        .publish_accepted(
            &sensor,
            PayloadFormat::Json,
            contract::encode(PayloadFormat::Json, &accepted),
        )
        .await
        .expect("publish accepted (PUBACK)");
    session
        .publish_status(&sensor, &status)
        .await
        .expect("publish status (PUBACK)");

    let got = dev.next_publish().await.expect("device got /accepted");
    assert_eq!(got.topic, "fleetgw/sensor-1/provision/json/accepted");
    let got: AcceptedResponse = contract::decode(PayloadFormat::Json, &got.payload).unwrap();
    assert_eq!(got, accepted);
    let got = dev.next_publish().await.expect("device got /status");
    assert_eq!(got.topic, "fleetgw/sensor-1/status");
    let got: StatusReport = contract::decode(PayloadFormat::Json, &got.payload).unwrap();
    assert_eq!(got, status);

    // Reconnecting and subscribing only now, the device still learns its state: the status
    // is retained.
    drop(dev);
    let mut late = TestClient::connect_ok(device("sensor-1")).await;
    late.subscribe("fleetgw/sensor-1/status", QoS::AtLeastOnce)
        .await;
    let retained = late
        .next_publish()
        .await
        .expect("late subscriber got the status");
    assert_eq!(retained.topic, "fleetgw/sensor-1/status");
    assert!(retained.retain, "status must be retained");
    let got: StatusReport = contract::decode(PayloadFormat::Json, &retained.payload).unwrap();
    assert_eq!(got, status);
}

mod mqtt_opts {
    /// Builds the MQTT options of a device from its client id.
    pub type Maker = Box<dyn Fn(&str) -> rumqttc::MqttOptions>;
}

#[tokio::test]
async fn embedded_broker_provisioning_round_trip() {
    let (gw, mut rx) = Downstream::start(&embedded_options())
        .await
        .expect("embedded downstream starts");
    let broker = gw.broker().expect("embedded broker");
    let port = broker.listen_addr().port();
    assert_ne!(port, 0, "port 0 resolved to the bound port");
    let status = gw.session().status();
    assert!(status.connected && status.subscribed, "{status:?}");

    provision_round_trip(&gw, &mut rx, Box::new(move |cid| options(cid, port))).await;
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn embedded_broker_routes_telemetry_once_and_rejects_non_canonical_ids() {
    let (gw, mut rx) = Downstream::start(&embedded_options()).await.unwrap();
    let port = gw.broker().unwrap().listen_addr().port();
    let mut dev = TestClient::connect_ok(options("sensor-2", port)).await;

    dev.publish_unacked("fleetgw/sensor-2/telemetry", QoS::AtLeastOnce, false, b"t1")
        .await;
    dev.publish(
        "fleetgw/sensor-2/telemetry/line/3",
        QoS::AtMostOnce,
        false,
        b"t2",
    )
    .await;
    // A device that writes its id in upper case listens where it asked, and is answered
    // there. (An invalid id cannot even connect to the embedded broker, and no device may
    // publish under another id: tests/local_trust.rs.)
    let mut bad = TestClient::connect_ok(options("Sensor-9", port)).await;
    bad.subscribe("fleetgw/Sensor-9/provision/json/rejected", QoS::AtLeastOnce)
        .await;
    // Its PUBACK queues behind the gateway's ack of t1 (the session acks in order).
    bad.publish_unacked(
        "fleetgw/Sensor-9/provision/json",
        QoS::AtLeastOnce,
        false,
        b"{}",
    )
    .await;
    // Marker: everything before it has been routed.
    dev.publish_unacked(
        "fleetgw/sensor-2/provision/cbor",
        QoS::AtLeastOnce,
        false,
        b"\xa0",
    )
    .await;

    let m = next_message(&mut rx).await;
    assert_eq!(
        (m.topic.clone(), &m.payload[..]),
        (
            DeviceTopic::Telemetry {
                device: id("sensor-2"),
                subtopic: None
            },
            &b"t1"[..]
        )
    );
    // End to end: the device hears nothing until the gateway has acknowledged.
    assert!(!dev.puback_within(Duration::from_millis(200)).await);
    m.ack.ack();
    dev.expect_puback("t1").await;
    let m = next_message(&mut rx).await;
    assert_eq!(
        m.topic,
        DeviceTopic::Telemetry {
            device: id("sensor-2"),
            subtopic: Some("line/3".into())
        }
    );
    // Brokers differ: mosquitto and the embedded broker deliver at min(publish, subscription).
    let expected = match m.qos {
        QoS::AtMostOnce => AckOutcome::NotRequired,
        _ => AckOutcome::Accepted,
    };
    assert_eq!(m.ack.ack(), expected);
    // Each telemetry message exactly once, the invalid request never: next is the marker.
    let m = next_message(&mut rx).await;
    assert_eq!(
        m.topic,
        DeviceTopic::ProvisionRequest {
            device: id("sensor-2"),
            format: PayloadFormat::Cbor
        }
    );
    m.ack.ack();
    dev.expect_puback("the marker").await;

    bad.expect_puback("the request with a non-canonical id")
        .await;
    let rejection = bad.next_publish().await.expect("bad device got /rejected");
    assert_eq!(rejection.topic, "fleetgw/Sensor-9/provision/json/rejected");
    let body: RejectedResponse = contract::decode(PayloadFormat::Json, &rejection.payload)
        .expect("rejection decodes as the contract says");
    assert_eq!(body.status_code, 400);
    assert_eq!(body.error_code, "NonCanonicalDeviceId");
    let text = &body.error_message;
    assert!(
        text.contains("\"Sensor-9\"") && text.contains("\"sensor-9\""),
        "{text}"
    );
    assert_eq!(gw.session().rejected_topics(), 1);
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn embedded_broker_reports_a_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let opts = EmbeddedBrokerOptions {
        listen: addr,
        ..EmbeddedBrokerOptions::default()
    };
    let err = EmbeddedBroker::start(&opts).await.unwrap_err();
    assert!(
        matches!(err, BrokerError::Bind { addr: a, .. } if a == addr),
        "{err:?}"
    );
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

/// A CA and a server certificate for 127.0.0.1: (CA PEM, server chain PEM, server key PEM).
fn test_pki() -> (String, String, Secret) {
    let ca = CertificateAuthority::generate("fleetgw test CA").unwrap();
    let (cert, key) = ca
        .issue_server("127.0.0.1", &[], &["127.0.0.1".parse().unwrap()], 1)
        .unwrap();
    (ca.cert_pem().to_string(), cert, key.to_pkcs8_pem())
}

#[tokio::test]
async fn embedded_broker_serves_tls() {
    let (ca, cert, key) = test_pki();
    let broker = EmbeddedBrokerOptions {
        listen: loopback0(),
        tls: Some(EmbeddedTls {
            cert_chain_pem: cert,
            key_pem: key,
        }),
        ..EmbeddedBrokerOptions::default()
    };
    let opts = DownstreamOptions::new("fleetgw-gw-tls".into(), BrokerOptions::Embedded(broker));
    let (gw, mut rx) = Downstream::start(&opts).await.expect("TLS embedded starts");
    let b = gw.broker().unwrap();
    assert!(b.is_tls());
    assert_eq!(
        b.tls_addr(),
        Some(b.listen_addr()),
        "TLS only: no plain port at all"
    );

    let client_tls = fleetgw::identity::tls::client_config(&ca, None).unwrap();
    let mut o = options("sensor-tls", b.listen_addr().port());
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        client_tls,
    )));
    let mut dev = TestClient::connect_ok(o).await;
    dev.publish_unacked(
        "fleetgw/sensor-tls/provision/json",
        QoS::AtLeastOnce,
        false,
        b"{}",
    )
    .await;
    let m = next_message(&mut rx).await;
    assert_eq!(m.topic.device(), &id("sensor-tls"));
    m.ack.ack();
    dev.expect_puback("the request over TLS").await;

    // A client that does not trust the CA is refused at the handshake.
    let (other_ca, _, _) = test_pki();
    let mut o = options("sensor-mitm", b.listen_addr().port());
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        fleetgw::identity::tls::client_config(&other_ca, None).unwrap(),
    )));
    let refused = TestClient::try_connect(o)
        .await
        .err()
        .expect("untrusted server accepted");
    assert!(refused.contains("no CONNACK"), "{refused}");
    gw.shutdown(WAIT).await;
}

/// A TLS listener next to the plain one: devices on either reach the gateway, under the same
/// rules; with the plain listener off, only TLS serves devices.
#[tokio::test]
async fn embedded_broker_serves_plain_and_tls_side_by_side() {
    let (ca, cert, key) = test_pki();
    let tls = EmbeddedTls {
        cert_chain_pem: cert,
        key_pem: key,
    };
    let broker = EmbeddedBrokerOptions {
        listen: loopback0(),
        tls: Some(tls.clone()),
        tls_listen: Some(loopback0()),
        ..EmbeddedBrokerOptions::default()
    };
    let opts = DownstreamOptions::new("fleetgw-gw-both".into(), BrokerOptions::Embedded(broker));
    let (gw, mut rx) = Downstream::start(&opts)
        .await
        .expect("both listeners start");
    let b = gw.broker().unwrap();
    let tls_port = b.tls_addr().expect("a TLS listener").port();
    assert!(!b.is_tls());
    assert_ne!(tls_port, b.listen_addr().port());
    let over_tls = |cid: &str, port: u16| {
        let mut o = options(cid, port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            fleetgw::identity::tls::client_config(&ca, None).unwrap(),
        )));
        o
    };
    let mut plain = TestClient::connect_ok(options("sensor-plain", b.listen_addr().port())).await;
    let mut secure = TestClient::connect_ok(over_tls("sensor-secure", tls_port)).await;
    for (dev, id_) in [(&mut plain, "sensor-plain"), (&mut secure, "sensor-secure")] {
        let topic = format!("fleetgw/{id_}/telemetry");
        dev.publish_unacked(&topic, QoS::AtLeastOnce, false, id_.as_bytes())
            .await;
        let m = next_message(&mut rx).await;
        assert_eq!(m.topic.device(), &id(id_));
        m.ack.ack();
        dev.expect_puback(id_).await;
    }
    // The same rules on both: another device's topic is refused over TLS too.
    assert_eq!(
        secure
            .subscribe("fleetgw/sensor-plain/#", QoS::AtLeastOnce)
            .await,
        vec![SubscribeReasonCode::Failure]
    );
    gw.shutdown(WAIT).await;

    // Plain off: TLS only (the gateway's session has a loopback port of its own).
    let broker = EmbeddedBrokerOptions {
        listen: loopback0(),
        plain_listener: false,
        tls: Some(tls),
        tls_listen: Some(loopback0()),
        ..EmbeddedBrokerOptions::default()
    };
    let opts = DownstreamOptions::new("fleetgw-gw-tls".into(), BrokerOptions::Embedded(broker));
    let (gw, mut rx) = Downstream::start(&opts)
        .await
        .expect("the TLS listener starts");
    let b = gw.broker().unwrap();
    assert!(b.is_tls());
    assert_eq!(Some(b.listen_addr()), b.tls_addr());
    let mut secure =
        TestClient::connect_ok(over_tls("sensor-secure", b.listen_addr().port())).await;
    secure
        .publish_unacked(
            "fleetgw/sensor-secure/telemetry",
            QoS::AtLeastOnce,
            false,
            b"t",
        )
        .await;
    let m = next_message(&mut rx).await;
    m.ack.ack();
    secure.expect_puback("over TLS only").await;
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn mosquitto_external_provisioning_round_trip() {
    let broker = Mosquitto::start(&MosquittoConfig::recipe(
        "fleetgw",
        &[("sensor-1", "pw-1")],
        "gw-secret",
    ));
    let opts = external_options(broker.url(), Some(("fleetgw-gateway", "gw-secret")));
    let (gw, mut rx) = external_gateway(&opts).await;
    let port = broker.port();
    // The ACL lets only sensor-1 itself read its status, so the late subscriber is a second
    // connection of the same device.
    let maker: mqtt_opts::Maker = Box::new(move |cid| {
        let mut o = options(cid, port);
        o.set_credentials("sensor-1", "pw-1");
        o
    });
    provision_round_trip(&gw, &mut rx, maker).await;

    // Wrong gateway password: the session reports why it is not connected.
    let bad = external_options(broker.url(), Some(("fleetgw-gateway", "wrong")));
    let (gw2, _rx2) = Downstream::start(&bad).await.unwrap();
    wait_status(&gw2, "reported the refusal", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("NotAuthorized") || e.contains("BadUserNamePassword"))
    })
    .await;
    assert!(!gw2.session().status().connected);
    gw2.shutdown(WAIT).await;
    gw.shutdown(WAIT).await;
}

/// The recipe's device listener is TLS: devices and the gateway provision over it with their
/// passwords, and a device that does not trust the broker's CA never gets to send one.
#[tokio::test]
async fn mosquitto_recipe_over_tls_provisions_a_device() {
    let (ca, cert, key) = test_pki();
    let files = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(
        &MosquittoConfig::recipe("fleetgw", &[("sensor-1", "pw-1")], "gw-secret").with_tls(
            files.path(),
            &cert,
            key.expose_str().unwrap(),
        ),
    );
    let mut x = ExternalBrokerOptions::new(format!("mqtts://127.0.0.1:{}", broker.port()));
    x.ca_pem = Some(ca.clone());
    x.username = Some("fleetgw-gateway".into());
    x.password = Some(Secret::from("gw-secret"));
    let opts = DownstreamOptions::new("fleetgw-gw-test".into(), BrokerOptions::External(x));
    let (gw, mut rx) = external_gateway(&opts).await;
    let port = broker.port();
    let tls = move |trusted: &str| {
        Transport::tls_with_config(TlsConfiguration::Rustls(
            fleetgw::identity::tls::client_config(trusted, None).unwrap(),
        ))
    };
    let device_ca = ca.clone();
    let maker: mqtt_opts::Maker = Box::new(move |cid| {
        let mut o = options(cid, port);
        o.set_credentials("sensor-1", "pw-1")
            .set_transport(tls(&device_ca));
        o
    });
    provision_round_trip(&gw, &mut rx, maker).await;

    let (other_ca, _, _) = test_pki();
    let mut o = options("sensor-1", port);
    o.set_credentials("sensor-1", "pw-1")
        .set_transport(tls(&other_ca));
    assert!(TestClient::try_connect(o).await.is_err());
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn gateway_session_survives_a_broker_restart() {
    let mut broker = Mosquitto::start(&MosquittoConfig::anonymous());
    // The relay forwards to the fixed mosquitto port and timestamps every connection attempt.
    let relay = Relay::start(broker.addr()).await;
    let opts = external_options(format!("mqtt://{}", relay.addr()), None);
    let (gw, mut rx) = external_gateway(&opts).await;
    assert_eq!(gw.session().status().connections, 1);

    broker.kill();
    wait_status(&gw, "noticed the broker is gone", |s| !s.connected).await;
    eventually("five reconnect attempts", WAIT, || {
        (relay.accept_times().len() >= 5).then_some(())
    })
    .await;
    let t = relay.accept_times();
    // t[0] is the first connection, t[k] the k-th reconnect attempt, which follows the
    // previous one after a jittered delay in [d/2, d], d = 100 ms * 2^(k-1), capped at 800 ms.
    let gaps: Vec<Duration> = t[1..].windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= Duration::from_millis(100), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(200), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(400), "{gaps:?}");

    broker.restart();
    // Fresh broker, no persistence: session_present = 0, so only a resubscription makes the
    // next message arrive.
    wait_status(&gw, "reconnected and resubscribed", |s| {
        s.connections >= 2 && s.connected && s.subscribed
    })
    .await;
    assert!(gw.session().status().last_error.is_some());
    let mut dev = TestClient::connect_ok(options("sensor-3", broker.port())).await;
    dev.publish(
        "fleetgw/sensor-3/telemetry",
        QoS::AtLeastOnce,
        false,
        b"after restart",
    )
    .await;
    let m = next_message(&mut rx).await;
    assert_eq!(m.topic.device(), &id("sensor-3"));
    assert_eq!(&m.payload[..], b"after restart");
    m.ack.ack();
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn unacked_message_is_redelivered_after_reconnect() {
    let broker = Mosquitto::start(&MosquittoConfig::anonymous());
    let relay = Relay::start(broker.addr()).await;
    let opts = external_options(format!("mqtt://{}", relay.addr()), None);
    let (gw, mut rx) = external_gateway(&opts).await;
    let mut dev = TestClient::connect_ok(options("sensor-4", broker.port())).await;

    dev.publish("fleetgw/sensor-4/telemetry", QoS::AtLeastOnce, false, b"m1")
        .await;
    let first = next_message(&mut rx).await;
    assert_eq!(&first.payload[..], b"m1");

    // Network failure before the gateway acked m1: the broker keeps it for the session.
    relay.sever();
    let again = next_message(&mut rx).await;
    assert_eq!(&again.payload[..], b"m1", "m1 redelivered");
    assert!(gw.session().status().connections >= 2);
    assert_eq!(
        first.ack.ack(),
        AckOutcome::Stale,
        "old connection's ack discarded"
    );
    assert_eq!(again.ack.ack(), AckOutcome::Accepted);
    // PUBACKs leave in order on one stream: once this publish is confirmed, m1's ack is in.
    gw.session()
        .publish_status(
            &id("sensor-4"),
            &StatusReport::new(DeviceStatus::Provisioned, 1),
        )
        .await
        .unwrap();

    relay.sever();
    wait_status(&gw, "reconnected", |s| s.connections >= 3 && s.subscribed).await;
    dev.publish("fleetgw/sensor-4/telemetry", QoS::AtLeastOnce, false, b"m2")
        .await;
    let next = next_message(&mut rx).await;
    assert_eq!(&next.payload[..], b"m2", "acked m1 must not come back");
    next.ack.ack();
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn dropping_an_ack_handle_gets_the_message_redelivered() {
    let (gw, mut rx) = Downstream::start(&embedded_options()).await.unwrap();
    let port = gw.broker().unwrap().listen_addr().port();
    let mut dev = TestClient::connect_ok(options("sensor-5", port)).await;
    dev.publish_unacked(
        "fleetgw/sensor-5/telemetry",
        QoS::AtLeastOnce,
        false,
        b"keep me",
    )
    .await;
    let m = next_message(&mut rx).await;
    assert_eq!(&m.payload[..], b"keep me");
    drop(m); // "not handled"

    let again = next_message(&mut rx).await;
    assert_eq!(&again.payload[..], b"keep me");
    assert!(again.dup, "a redelivery is marked DUP");
    assert_eq!(again.ack.ack(), AckOutcome::Accepted);
    dev.expect_puback("the redelivered message").await;
    gw.shutdown(WAIT).await;
}

/// Collects what `client` receives up to and including the first publish on `marker`; the
/// marker is published after everything the client must not see, so this waits for an event
/// instead of sleeping.
async fn received_before(client: &mut TestClient, marker: &str) -> Vec<(String, Vec<u8>)> {
    let mut seen = Vec::new();
    loop {
        let p = client
            .next_publish()
            .await
            .unwrap_or_else(|| panic!("no {marker} within {WAIT:?}; received {seen:?}"));
        if p.topic == marker {
            return seen;
        }
        seen.push((p.topic, p.payload.to_vec()));
    }
}

#[tokio::test]
async fn mosquitto_acl_isolates_devices() {
    let broker = Mosquitto::start(&MosquittoConfig::recipe(
        "fleetgw",
        &[("a", "pw-a"), ("b", "pw-b")],
        "gw-secret",
    ));
    let port = broker.port();
    let login = |cid: &str, user: &str, pw: &str| {
        let mut o = options(cid, port);
        o.set_credentials(user, pw);
        o
    };
    let opts = external_options(broker.url(), Some(("fleetgw-gateway", "gw-secret")));
    let (gw, mut rx) = external_gateway(&opts).await;
    let session = gw.session();
    let (a_id, b_id) = (id("a"), id("b"));

    let mut a = TestClient::connect_ok(login("a", "a", "pw-a")).await;
    for filter in ["fleetgw/a/provision/json/accepted", "fleetgw/a/status"] {
        assert_eq!(
            a.subscribe(filter, QoS::AtLeastOnce).await,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            "A may subscribe to its own {filter}"
        );
    }
    let mut b = TestClient::connect_ok(login("b", "b", "pw-b")).await;

    // 1. B cannot make the gateway see a request from A: mosquitto acks the forged publish
    //    (MQTT 3.1.1 has no way to refuse it) and drops it.
    b.publish(
        "fleetgw/a/provision/json",
        QoS::AtLeastOnce,
        false,
        br#"{"attestation":{"type":"none"}}"#,
    )
    .await;
    b.publish("fleetgw/b/provision/json", QoS::AtLeastOnce, false, b"own")
        .await;
    let m = next_message(&mut rx).await;
    assert_eq!(
        (m.topic.device(), &m.payload[..]),
        (&b_id, &b"own"[..]),
        "the forged request must never reach the gateway"
    );
    m.ack.ack();
    assert!(rx.try_recv().is_err(), "nothing else reached the gateway");

    // B, with its own valid credentials, tries every way to listen to A's answers (after its
    // own request, so the `fleetgw/#` filter has nothing of B's to echo).
    for filter in [
        "fleetgw/a/provision/json/accepted",
        "fleetgw/a/provision/json/rejected",
        "fleetgw/a/status",
        "fleetgw/+/provision/json/accepted",
        "fleetgw/#",
    ] {
        // mosquitto 2 grants these (its ACL is checked per message at delivery), so the
        // SUBACK proves nothing; what B receives below is the test.
        let codes = b.subscribe(filter, QoS::AtLeastOnce).await;
        assert_eq!(codes.len(), 1, "{filter}: {codes:?}");
    }
    assert_eq!(
        b.subscribe("fleetgw/b/status", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    // 2. B reads nothing of A's: accepted (with A's private key), rejected, retained status.
    let for_a = AcceptedResponse {
        device_id: a_id.clone(),
        certificate_id: "cert-a".into(),
        certificate_pem: "CERT-A".into(),
        private_key: Some("PRIVATE-KEY-OF-A".into()),
        thing_name: "a".into(),
        device_configuration: Default::default(),
        assigned_hub: None,
    };
    let encoded_for_a = contract::encode(PayloadFormat::Json, &for_a);
    session
        .publish_accepted(&a_id, PayloadFormat::Json, encoded_for_a.clone())
        .await
        .unwrap();
    session
        .reject(
            &a_id,
            PayloadFormat::Json,
            &RejectedResponse::new(400, "Example", "for a only"),
        )
        .await
        .unwrap();
    session
        .publish_status(&a_id, &StatusReport::new(DeviceStatus::Provisioned, 1))
        .await
        .unwrap();
    // The end marker: B's own status, published after all of A's messages.
    session
        .publish_status(&b_id, &StatusReport::new(DeviceStatus::Provisioning, 2))
        .await
        .unwrap();

    let got = a.next_publish().await.expect("A got its answer");
    assert_eq!(got.topic, "fleetgw/a/provision/json/accepted");
    assert_eq!(got.payload.to_vec(), encoded_for_a);
    let got = a.next_publish().await.expect("A got its status");
    assert_eq!(got.topic, "fleetgw/a/status");
    let seen_by_b = received_before(&mut b, "fleetgw/b/status").await;
    assert_eq!(seen_by_b, vec![], "B must receive nothing of A's");

    // 3. B's credentials with client id "a" do not take over A: the client id becomes "b",
    //    so the connection kicked off is B's own.
    let mut thief = TestClient::connect_ok(login("a", "b", "pw-b")).await;
    let kicked = b
        .next_matching(|e| matches!(e, ClientEvent::Closed(_)))
        .await;
    assert!(
        kicked.is_some(),
        "the session with client id b was taken over, not a"
    );
    // A retained status is no more readable than a live one.
    thief.subscribe("fleetgw/a/status", QoS::AtLeastOnce).await;
    thief.subscribe("fleetgw/b/status", QoS::AtLeastOnce).await;
    let seen_by_thief = received_before(&mut thief, "fleetgw/b/status").await;
    assert_eq!(seen_by_thief, vec![], "B read A's retained status");

    thief
        .publish(
            "fleetgw/a/provision/json",
            QoS::AtLeastOnce,
            false,
            b"forged-2",
        )
        .await;
    thief
        .publish(
            "fleetgw/b/provision/json",
            QoS::AtLeastOnce,
            false,
            b"own-2",
        )
        .await;
    let m = next_message(&mut rx).await;
    assert_eq!((m.topic.device(), &m.payload[..]), (&b_id, &b"own-2"[..]));
    m.ack.ack();
    session
        .publish_accepted(&a_id, PayloadFormat::Json, &b"still-a"[..])
        .await
        .unwrap();
    let got = a.next_publish().await.expect("A is still connected");
    assert_eq!(&got.payload[..], b"still-a");
    assert!(!a.saw_close(), "A must not have been disconnected");
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn client_id_pattern_alone_lets_a_device_impersonate_another() {
    // The negative control for docs/mosquitto.md: `%c` without use_username_as_clientid.
    let mut cfg = MosquittoConfig::recipe("fleetgw", &[("a", "pw-a"), ("b", "pw-b")], "gw");
    cfg.acl = Some(
        "pattern readwrite fleetgw/%c/#\n\nuser fleetgw-gateway\ntopic readwrite fleetgw/#\n"
            .into(),
    );
    cfg.use_username_as_clientid = false;
    let broker = Mosquitto::start(&cfg);
    let opts = external_options(broker.url(), Some(("fleetgw-gateway", "gw")));
    let (gw, mut rx) = external_gateway(&opts).await;

    let mut o = options("a", broker.port());
    o.set_credentials("b", "pw-b");
    let mut impostor = TestClient::connect_ok(o).await;
    impostor
        .publish(
            "fleetgw/a/provision/json",
            QoS::AtLeastOnce,
            false,
            b"forged",
        )
        .await;
    let m = next_message(&mut rx).await;
    assert_eq!(
        (m.topic.device(), &m.payload[..]),
        (&id("a"), &b"forged"[..])
    );
    m.ack.ack();
    gw.shutdown(WAIT).await;
}

/// A JSON provisioning request padded to exactly `len` bytes.
fn request_of_len(len: usize) -> Vec<u8> {
    let head = br#"{"attestation":{"type":"none"},"pad":""#;
    let tail = br#""}"#;
    let mut out = head.to_vec();
    out.resize(len - tail.len(), b'x');
    out.extend_from_slice(tail);
    out
}

/// Oversize input against a running gateway: a request over `max_request_bytes` is answered on
/// `/rejected` and never delivered, one of exactly that size is delivered, a packet over the
/// broker's limit costs only the sender its connection, and the gateway refuses to publish
/// more than its packet limit.
async fn oversize_is_handled(
    gw: &Downstream,
    rx: &mut mpsc::Receiver<DownstreamMessage>,
    device: mqtt_opts::Maker,
    max_request_bytes: usize,
    max_packet_bytes: usize,
) {
    let sensor = id("sensor-1");
    let mut dev = TestClient::connect_ok(device("sensor-1")).await;
    dev.subscribe("fleetgw/sensor-1/provision/json/rejected", QoS::AtLeastOnce)
        .await;

    let too_big = request_of_len(max_request_bytes + 1);
    dev.publish(
        "fleetgw/sensor-1/provision/json",
        QoS::AtLeastOnce,
        false,
        &too_big,
    )
    .await;
    let answer = dev.next_publish().await.expect("device got /rejected");
    assert_eq!(answer.topic, "fleetgw/sensor-1/provision/json/rejected");
    let rejected: RejectedResponse = contract::decode(PayloadFormat::Json, &answer.payload)
        .expect("rejection decodes as the contract says");
    assert_eq!(rejected.status_code, 413);
    assert_eq!(rejected.error_code, "PayloadTooLarge");
    assert!(
        rejected
            .error_message
            .contains(&format!("{} bytes", max_request_bytes + 1))
            && rejected.error_message.contains("max_request_bytes"),
        "{}",
        rejected.error_message
    );

    // Exactly at the limit is fine, and it is the first message the consumer sees.
    let at_limit = request_of_len(max_request_bytes);
    dev.publish_unacked(
        "fleetgw/sensor-1/provision/json",
        QoS::AtLeastOnce,
        false,
        &at_limit,
    )
    .await;
    let m = next_message(rx).await;
    assert_eq!(m.topic.device(), &sensor);
    assert_eq!(
        m.payload.len(),
        max_request_bytes,
        "the oversize one leaked"
    );
    let decoded = ProvisionRequest::decode(PayloadFormat::Json, &m.payload).unwrap();
    assert_eq!(decoded.attestation, Attestation::None);
    m.ack.ack();
    dev.expect_puback("the request at the limit").await;
    assert_eq!(gw.session().oversize_requests(), 1);

    // Over the broker's packet limit: the broker drops the sender, nobody else notices.
    let connections = gw.session().status().connections;
    dev.client
        .publish(
            "fleetgw/sensor-1/telemetry",
            QoS::AtLeastOnce,
            false,
            vec![b'x'; max_packet_bytes + 1],
        )
        .await
        .unwrap();
    let closed = dev
        .next_matching(|e| matches!(e, ClientEvent::Closed(_) | ClientEvent::PubAck(_)))
        .await;
    assert!(
        matches!(closed, Some(ClientEvent::Closed(_))),
        "the broker must drop a client sending an oversize packet: {closed:?}"
    );
    let mut again = TestClient::connect_ok(device("sensor-1")).await;
    again
        .publish_unacked("fleetgw/sensor-1/telemetry", QoS::AtLeastOnce, false, b"ok")
        .await;
    let m = next_message(rx).await;
    assert_eq!(&m.payload[..], b"ok", "the oversize packet never arrives");
    m.ack.ack();
    again
        .expect_puback("the message after the oversize one")
        .await;
    let status = gw.session().status();
    assert!(
        status.connected && status.connections == connections,
        "the gateway session was disturbed: {status:?}"
    );

    // The gateway itself never sends what the broker would refuse.
    let err = gw
        .session()
        .publish_accepted(&sensor, PayloadFormat::Json, vec![b'x'; max_packet_bytes])
        .await
        .unwrap_err();
    assert!(
        matches!(err, SessionError::PayloadTooLarge { size, max, .. } if size == max_packet_bytes && max == max_packet_bytes),
        "{err:?}"
    );
}

#[tokio::test]
async fn embedded_broker_handles_oversize_payloads() {
    let broker = EmbeddedBrokerOptions {
        listen: loopback0(),
        max_packet_bytes: 16 * 1024,
        ..EmbeddedBrokerOptions::default()
    };
    let mut opts =
        DownstreamOptions::new("fleetgw-gw-test".into(), BrokerOptions::Embedded(broker));
    opts.max_request_bytes = 1024;
    let (gw, mut rx) = Downstream::start(&opts).await.unwrap();
    let port = gw.broker().unwrap().listen_addr().port();
    oversize_is_handled(
        &gw,
        &mut rx,
        Box::new(move |cid| options(cid, port)),
        1024,
        16 * 1024,
    )
    .await;
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn mosquitto_handles_oversize_payloads() {
    // The recipe's max_packet_size (256 KiB) equals the gateway's default max_packet_bytes.
    let broker = Mosquitto::start(&MosquittoConfig::recipe(
        "fleetgw",
        &[("sensor-1", "pw-1")],
        "gw-secret",
    ));
    let opts = external_options(broker.url(), Some(("fleetgw-gateway", "gw-secret")));
    assert_eq!(opts.max_request_bytes, 64 * 1024);
    let (gw, mut rx) = external_gateway(&opts).await;
    let port = broker.port();
    let maker: mqtt_opts::Maker = Box::new(move |cid| {
        let mut o = options(cid, port);
        o.set_credentials("sensor-1", "pw-1");
        o
    });
    oversize_is_handled(&gw, &mut rx, maker, 64 * 1024, 256 * 1024).await;
    gw.shutdown(WAIT).await;
}

/// Publishes `count` numbered QoS 1 messages from device `dev-{n}` as fast as mosquitto takes
/// them (100 in flight); returns once all are acknowledged by the broker.
async fn publish_numbered(port: u16, n: usize, count: usize) {
    let topic = format!("fleetgw/dev-{n}/telemetry");
    let mut seq = Sequence::new(format!("dev-{n}"), topic, 0..count as u64, WAIT * 4);
    seq.window = 100;
    seq.linger = false;
    publish_sequence(port, seq, move |i| format!("{n}:{i}").into_bytes()).await;
}

/// mosquitto 2.0.11 (Debian 12) sends a client far more than `max_inflight_messages`
/// unacknowledged messages once a queue has formed: every PUBACK it processes moves up to a
/// whole window of queued messages into flight. The session's read-ahead still bounds what a
/// crash of the gateway makes it deliver twice: messages the consumer stored whose PUBACK the
/// broker had not processed, at most `max_unconfirmed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_crash_duplicates_at_most_the_read_ahead() {
    crash_and_count_duplicates(session::DEFAULT_MAX_HELD_BYTES).await;
}

/// The same with room for only a few held messages: the rest is left with mosquitto and
/// fetched again by a reconnect, which neither loses nor duplicates anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_beyond_the_held_cap_come_again_after_a_reconnect() {
    crash_and_count_duplicates(4096).await;
}

/// Devices publish numbered messages through mosquitto (window 10, unlimited queue); the
/// gateway's consumer records and acks a third of them, then the gateway "crashes" and a new
/// session takes over. Asserts that every message arrives and that at most `max_unconfirmed`
/// recorded ones come again.
async fn crash_and_count_duplicates(max_held_bytes: usize) {
    const DEVICES: usize = 10;
    const PER_DEVICE: usize = 400;
    const MAX_UNCONFIRMED: usize = 20;
    let broker = Mosquitto::start(&MosquittoConfig {
        extra: vec![
            "max_inflight_messages 10".into(),
            "max_queued_messages 0".into(),
        ],
        ..MosquittoConfig::anonymous()
    });
    let opts = external_options(broker.url(), None);
    let start = || {
        Downstream::start_with(&opts, |s| {
            s.max_unconfirmed = MAX_UNCONFIRMED;
            s.max_held_bytes = max_held_bytes;
            s.reconnect_min = Duration::from_millis(100);
            s.reconnect_max = Duration::from_millis(800);
        })
    };
    let key = |m: &DownstreamMessage| String::from_utf8(m.payload.to_vec()).unwrap();

    let (gw, mut rx) = start().await.expect("start downstream");
    gw.session()
        .wait_subscribed(WAIT)
        .await
        .expect("subscribed");
    let devices: Vec<_> = (0..DEVICES)
        .map(|n| tokio::spawn(publish_numbered(broker.port(), n, PER_DEVICE)))
        .collect();
    // The consumer "stores" (records) each message, then acks it, as the telemetry intake does.
    let mut stored = std::collections::HashSet::new();
    while stored.len() < DEVICES * PER_DEVICE / 3 {
        let m = next_message(&mut rx).await;
        assert!(stored.insert(key(&m)), "no duplicate before the crash");
        m.ack.ack();
    }
    let connections = gw.session().status().connections;
    // The crash: nothing more is stored, and the session dies without a DISCONNECT.
    drop(rx);
    drop(gw);

    // The broker resumes the session and resends what it has no PUBACK for, ahead of the
    // SUBACK: consume right away rather than waiting for the subscription.
    let (gw, mut rx) = start().await.expect("restart downstream");
    let mut duplicates = 0;
    let mut seen = stored.clone();
    while seen.len() < DEVICES * PER_DEVICE {
        let m = next_message(&mut rx).await;
        let k = key(&m);
        if stored.contains(&k) {
            duplicates += 1;
        }
        seen.insert(k);
        m.ack.ack();
    }
    for d in devices {
        d.await.unwrap();
    }
    eprintln!(
        "held cap {max_held_bytes} B: {connections} connection(s) before the crash, {} after; \
         stored {} before the crash, {duplicates} delivered again after it",
        gw.session().status().connections,
        stored.len()
    );
    assert!(
        duplicates <= MAX_UNCONFIRMED,
        "{duplicates} messages stored before the crash came again (read-ahead {MAX_UNCONFIRMED})"
    );
    gw.shutdown(WAIT).await;
}

/// A device's retained request or telemetry is handled when it is published: the copy
/// mosquitto replays to the gateway's session whenever it subscribes (at start and after every
/// reconnect) is acknowledged and dropped, never provisioned or sent upstream again.
#[tokio::test]
async fn retained_device_messages_are_not_replayed_upstream() {
    let broker = Mosquitto::start(&MosquittoConfig::anonymous());
    // Retained before the gateway subscribes: what the gateway then gets is the replay.
    let mut dev = TestClient::connect_ok(options("sensor-6", broker.port())).await;
    for topic in [
        "fleetgw/sensor-6/telemetry",
        "fleetgw/sensor-6/provision/json",
    ] {
        dev.publish(topic, QoS::AtLeastOnce, true, b"{}").await;
    }
    let opts = external_options(broker.url(), None);
    let (gw, mut rx) = external_gateway(&opts).await;
    eventually("both replays to be seen and dropped", WAIT, || {
        (gw.session().retained_replays() == 2).then_some(())
    })
    .await;
    // The first message the gateway hands on is the live one.
    dev.publish(
        "fleetgw/sensor-6/telemetry",
        QoS::AtLeastOnce,
        false,
        b"new",
    )
    .await;
    let m = next_message(&mut rx).await;
    assert_eq!(&m.payload[..], b"new");
    m.ack.ack();
    gw.shutdown(WAIT).await;
}
