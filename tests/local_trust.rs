//! The local trust boundary of the embedded broker, tried as a hostile client on the local
//! network would: real MQTT 3.1.1 and 5 clients (rumqttc) over TCP against the gateway's
//! downstream side (embedded broker + the gateway's own session), each attack a case that
//! fails if its protection is removed.

mod common;

use common::mqtt_client::{options, ClientEvent, TestClient};
use common::WAIT;
use fleetgw::device_id::DeviceId;
use fleetgw::downstream::{
    contract, AcceptedResponse, AccessRules, BrokerOptions, DeviceStatus, DeviceTopic, Downstream,
    DownstreamMessage, DownstreamOptions, EmbeddedBroker, EmbeddedBrokerOptions, LocalUser,
    PayloadFormat, StatusReport, UserRights,
};
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
use rumqttc::{QoS, SubscribeReasonCode};
use tokio::sync::mpsc;

const GATEWAY_ID: &str = "fleetgw-gw-test";

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

async fn gateway() -> (Downstream, mpsc::Receiver<DownstreamMessage>, u16) {
    gateway_with_users(Vec::new()).await
}

/// The gateway's downstream side with these `[[downstream.users]]`.
async fn gateway_with_users(
    users: Vec<LocalUser>,
) -> (Downstream, mpsc::Receiver<DownstreamMessage>, u16) {
    let mut rules = AccessRules::new("fleetgw");
    rules.users = users;
    let broker = EmbeddedBrokerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        rules: Some(rules),
        ..EmbeddedBrokerOptions::default()
    };
    let opts = DownstreamOptions::new(GATEWAY_ID.into(), BrokerOptions::Embedded(broker));
    let (gw, rx) = Downstream::start(&opts).await.expect("downstream starts");
    let port = gw.broker().unwrap().listen_addr().port();
    (gw, rx, port)
}

async fn next_message(rx: &mut mpsc::Receiver<DownstreamMessage>) -> DownstreamMessage {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the gateway received nothing in time")
        .expect("gateway channel closed")
}

/// The next message the gateway gets must be `device`'s telemetry marker: whatever a hostile
/// client sent before it never reached the gateway.
async fn next_is_marker(
    rx: &mut mpsc::Receiver<DownstreamMessage>,
    device: &mut TestClient,
    device_id: &str,
) {
    device
        .publish_unacked(
            &format!("fleetgw/{device_id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            b"marker",
        )
        .await;
    let m = next_message(rx).await;
    assert_eq!(
        (&m.topic, &m.payload[..]),
        (
            &DeviceTopic::Telemetry {
                device: id(device_id),
                subtopic: None
            },
            &b"marker"[..]
        ),
        "something else reached the gateway first"
    );
    m.ack.ack();
    device.expect_puback("the marker").await;
}

/// Publishes a marker on the device's own answer topic through the gateway and asserts it is
/// the next thing `client` receives: nothing meant for another device came before it.
async fn next_received_is(client: &mut TestClient, topic: &str) {
    match client.next_publish().await {
        Some(p) => assert_eq!(p.topic, topic, "received {:?} first", p.topic),
        None => panic!("nothing received on {topic}"),
    }
}

/// Asserts the broker refuses this CONNECT with `code` (rumqttc's name for the CONNACK code).
async fn assert_refused(what: &str, opts: rumqttc::MqttOptions, code: &str) {
    let refused = TestClient::try_connect(opts).await.err();
    assert!(
        refused.as_deref().is_some_and(|e| e.contains(code)),
        "{what}: {refused:?}"
    );
}

/// Asserts an MQTT 5 CONNECT is refused with `code`.
async fn assert_v5_refused(opts: rumqttc::v5::MqttOptions, code: ConnectReturnCode) {
    let (_client, mut events) = rumqttc::v5::AsyncClient::new(opts, 8);
    let refused = tokio::time::timeout(WAIT, events.poll())
        .await
        .expect("an answer in time");
    assert!(
        matches!(&refused, Err(rumqttc::v5::ConnectionError::ConnectionRefused(c)) if *c == code),
        "expected {code:?}: {refused:?}"
    );
}

/// Asserts `client` gets a SUBACK failure for each filter.
async fn assert_filters_refused(client: &mut TestClient, filters: &[&str]) {
    for filter in filters {
        assert_eq!(
            client.subscribe(filter, QoS::AtLeastOnce).await,
            vec![SubscribeReasonCode::Failure],
            "{filter} must be refused"
        );
    }
}

/// An `/accepted` answer carrying a (stand-in) private key of `device`.
fn accepted_for(device: &str) -> Vec<u8> {
    let answer = AcceptedResponse {
        device_id: id(device),
        certificate_id: "cert-id".into(),
        certificate_pem: "-----BEGIN CERTIFICATE-----\n...\n".into(),
        private_key: Some(format!("-----BEGIN PRIVATE KEY-----\nsecret of {device}")),
        thing_name: device.into(),
        device_configuration: Default::default(),
        assigned_hub: None,
    };
    contract::encode(PayloadFormat::Json, &answer)
}

#[tokio::test]
async fn a_device_cannot_read_another_devices_answers() {
    let (gw, _rx, port) = gateway().await;
    let mut a = TestClient::connect_ok(options("sensor-a", port)).await;
    let mut b = TestClient::connect_ok(options("sensor-b", port)).await;
    assert_eq!(
        a.subscribe("fleetgw/sensor-a/provision/json/+", QoS::AtLeastOnce)
            .await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let foreign = [
        "#",
        "fleetgw/#",
        "fleetgw/+/provision/json/accepted",
        "fleetgw/sensor-a/#",
        "+/sensor-a/provision/json/accepted",
    ];
    assert_filters_refused(&mut b, &foreign).await;
    assert_eq!(
        b.subscribe("fleetgw/sensor-b/#", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let session = gw.session();
    session
        .publish_accepted(
            &id("sensor-a"),
            PayloadFormat::Json,
            accepted_for("sensor-a"),
        )
        .await
        .expect("answer published");
    session
        .publish_accepted(
            &id("sensor-b"),
            PayloadFormat::Json,
            accepted_for("sensor-b"),
        )
        .await
        .expect("answer published");
    next_received_is(&mut a, "fleetgw/sensor-a/provision/json/accepted").await;
    // B's first delivery is its own answer: A's, with A's private key, never reached it.
    next_received_is(&mut b, "fleetgw/sensor-b/provision/json/accepted").await;
    assert!(gw.broker().unwrap().refusals().subscriptions >= 5);
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn a_device_cannot_publish_as_another_device() {
    let (gw, mut rx, port) = gateway().await;
    let mut a = TestClient::connect_ok(options("sensor-a", port)).await;
    let mut b = TestClient::connect_ok(options("sensor-b", port)).await;
    assert_eq!(
        a.subscribe("fleetgw/sensor-a/commands/#", QoS::AtLeastOnce)
            .await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // Forged telemetry, a replayed request and forged answers, commands and status for A:
    // each gets its (3.1.1: plain) PUBACK and is dropped.
    for topic in [
        "fleetgw/sensor-a/telemetry",
        "fleetgw/sensor-a/telemetry/sub",
        "fleetgw/sensor-a/provision/json",
        "fleetgw/sensor-a/provision/json/accepted",
        "fleetgw/sensor-a/commands/valve/open",
        "fleetgw/sensor-a/status",
        "fleetgw/sensor-b/commands/x",
        "fleetgw/sensor-b/status",
        "elsewhere/topic",
    ] {
        b.publish(topic, QoS::AtLeastOnce, false, b"forged").await;
    }
    next_is_marker(&mut rx, &mut a, "sensor-a").await;
    // A's PLC hears no forged command: the next thing it gets is a real one from the gateway.
    gw.session()
        .publish_command(&id("sensor-a"), Some("valve/close"), b"{}".to_vec())
        .await
        .expect("command published");
    next_received_is(&mut a, "fleetgw/sensor-a/commands/valve/close").await;
    assert_eq!(gw.broker().unwrap().refusals().publishes, 9);
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn devices_never_leave_retained_messages() {
    let (gw, mut rx, port) = gateway().await;
    let mut b = TestClient::connect_ok(options("sensor-b", port)).await;
    // A retained forgery on C's answer and status topics is refused outright; a retained
    // publish on B's own telemetry is forwarded but not retained.
    for topic in [
        "fleetgw/sensor-c/provision/json/accepted",
        "fleetgw/sensor-c/status",
    ] {
        b.publish(topic, QoS::AtLeastOnce, true, b"forged").await;
    }
    b.publish_unacked("fleetgw/sensor-b/telemetry", QoS::AtLeastOnce, true, b"t")
        .await;
    let m = next_message(&mut rx).await;
    assert_eq!(&m.payload[..], b"t");
    m.ack.ack();
    b.expect_puback("own telemetry").await;
    assert_eq!(gw.broker().unwrap().retained(), 0);

    // The gateway's own retained status is what C finds.
    gw.session()
        .publish_status(
            &id("sensor-c"),
            &StatusReport::new(DeviceStatus::Provisioning, 1),
        )
        .await
        .expect("status published");
    let mut c = TestClient::connect_ok(options("sensor-c", port)).await;
    c.subscribe("fleetgw/sensor-c/#", QoS::AtLeastOnce).await;
    let p = c.next_publish().await.expect("retained status");
    assert_eq!(p.topic, "fleetgw/sensor-c/status");
    assert!(p.retain);
    assert!(
        !p.payload.windows(6).any(|w| w == b"forged"),
        "{:?}",
        p.payload
    );
    assert_eq!(gw.broker().unwrap().retained(), 1);
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn nobody_can_take_over_the_gateway_session() {
    let (gw, mut rx, port) = gateway().await;
    // The session is in-process: its client id is reserved, whatever a client brings.
    for clean in [true, false] {
        let mut o = options(GATEWAY_ID, port);
        o.set_clean_session(clean);
        assert_refused(&format!("clean={clean}"), o, "BadClientId").await;
        let mut o = options(GATEWAY_ID, port);
        o.set_clean_session(clean)
            .set_credentials(GATEWAY_ID, "guess");
        assert_refused(&format!("clean={clean}, password"), o, "BadClientId").await;
    }
    // MQTT 5 too.
    let mut o = rumqttc::v5::MqttOptions::new(GATEWAY_ID, "127.0.0.1", port);
    o.set_clean_start(false);
    assert_v5_refused(o, ConnectReturnCode::ClientIdentifierNotValid).await;
    // The gateway still has its session: device telemetry reaches it.
    let mut dev = TestClient::connect_ok(options("sensor-a", port)).await;
    next_is_marker(&mut rx, &mut dev, "sensor-a").await;
    assert!(gw.session().status().connected);
    assert!(gw.broker().unwrap().refusals().connects >= 4);
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn client_ids_that_are_not_device_ids_are_refused() {
    let (gw, _rx, port) = gateway().await;
    for bad in ["bad id", "ends-with.", "has/slash", "#"] {
        assert_refused(bad, options(bad, port), "BadClientId").await;
    }
    // MQTT 5 with an empty client id: the broker would assign one, but a device must name
    // itself.
    let mut o = rumqttc::v5::MqttOptions::new("", "127.0.0.1", port);
    o.set_clean_start(true);
    assert_v5_refused(o, ConnectReturnCode::ClientIdentifierNotValid).await;
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn mqtt5_clients_are_told_what_was_refused() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode as V5Sub};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let (gw, _rx, port) = gateway().await;
    let (client, mut events) = AsyncClient::new(MqttOptions::new("sensor-b", "127.0.0.1", port), 8);
    client
        .subscribe(
            "fleetgw/sensor-a/#",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    client
        .publish(
            "fleetgw/sensor-a/telemetry",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            b"forged".to_vec(),
        )
        .await
        .unwrap();
    let (mut suback, mut puback) = (None, None);
    let deadline = tokio::time::Instant::now() + WAIT;
    while suback.is_none() || puback.is_none() {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(s)))) => suback = Some(s.return_codes),
            Ok(Ok(Event::Incoming(Packet::PubAck(p)))) => puback = Some(p.reason),
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK/PUBACK: {other:?}"),
        }
    }
    assert_eq!(suback, Some(vec![V5Sub::NotAuthorized]));
    assert_eq!(puback, Some(PubAckReason::NotAuthorized));
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn deep_and_long_topics_are_refused_at_the_packet() {
    // A plain broker (no device rules), so only the size limits stand in the way.
    let broker = EmbeddedBroker::start(&EmbeddedBrokerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..EmbeddedBrokerOptions::default()
    })
    .await
    .unwrap();
    let port = broker.listen_addr().port();
    let deep = "a/".repeat(30_000) + "a";
    let mut attacker = TestClient::connect_ok(options("attacker", port)).await;
    attacker
        .client
        .publish(deep.as_str(), QoS::AtLeastOnce, true, b"x".to_vec())
        .await
        .unwrap();
    let closed = attacker
        .next_matching(|e| matches!(e, ClientEvent::Closed(_) | ClientEvent::PubAck(_)))
        .await;
    assert!(matches!(closed, Some(ClientEvent::Closed(_))), "{closed:?}");
    assert_eq!(broker.retained(), 0);

    // A deep filter is refused; the broker is alive and serves the next client.
    let mut other = TestClient::connect_ok(options("other", port)).await;
    let deep_filter = "+/".repeat(40) + "#";
    assert_eq!(
        other.subscribe(&deep_filter, QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Failure]
    );
    let long = "x".repeat(2000);
    assert_eq!(
        other.subscribe(&long, QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Failure]
    );
    assert_eq!(
        other.subscribe("#", QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
}

#[tokio::test]
async fn subscription_and_retained_floods_are_bounded() {
    let broker = EmbeddedBroker::start(&EmbeddedBrokerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_subscriptions: 5,
        max_retained: 3,
        ..EmbeddedBrokerOptions::default()
    })
    .await
    .unwrap();
    let port = broker.listen_addr().port();
    let mut c = TestClient::connect_ok(options("flooder", port)).await;
    for n in 0..5 {
        assert_eq!(
            c.subscribe(&format!("f/{n}"), QoS::AtMostOnce).await,
            vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
        );
    }
    assert_eq!(
        c.subscribe("f/5", QoS::AtMostOnce).await,
        vec![SubscribeReasonCode::Failure]
    );
    // Subscribing again to a filter it holds is not a new subscription.
    assert_eq!(
        c.subscribe("f/0", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    for n in 0..10 {
        c.publish(&format!("r/{n}"), QoS::AtLeastOnce, true, b"kept")
            .await;
    }
    assert_eq!(broker.retained(), 3);
    assert_eq!(broker.retained_refused(), 7);
    // Replacing a retained message and clearing one still work at the limit.
    c.publish("r/0", QoS::AtLeastOnce, true, b"new").await;
    c.publish("r/1", QoS::AtLeastOnce, true, b"").await;
    assert_eq!(broker.retained(), 2);
    c.publish("r/9", QoS::AtLeastOnce, true, b"kept").await;
    assert_eq!(broker.retained(), 3);
    let mut reader = TestClient::connect_ok(options("reader", port)).await;
    reader.subscribe("r/0", QoS::AtMostOnce).await;
    let p = reader.next_publish().await.expect("retained r/0");
    assert_eq!(&p.payload[..], b"new");
}

fn user(name: &str, password: &str, publish: &[&str], subscribe: &[&str]) -> LocalUser {
    LocalUser {
        rights: std::sync::Arc::new(UserRights {
            name: name.into(),
            publish: publish.iter().map(|f| f.to_string()).collect(),
            subscribe: subscribe.iter().map(|f| f.to_string()).collect(),
        }),
        password_hash: fleetgw::identity::hash_password(password.as_bytes()).unwrap(),
    }
}

fn as_user(client_id: &str, port: u16, name: &str, password: &str) -> rumqttc::MqttOptions {
    let mut o = options(client_id, port);
    o.set_credentials(name, password);
    o
}

#[tokio::test]
async fn local_applications_get_exactly_the_rights_listed_for_them() {
    let (gw, mut rx, port) = gateway_with_users(vec![
        user(
            "historian",
            "h-secret",
            &[],
            &["fleetgw/+/status", "fleetgw/+/telemetry/#"],
        ),
        user(
            "line-controller",
            "c-secret",
            &["fleetgw/+/commands/#"],
            &[],
        ),
    ])
    .await;

    // Wrong or missing password for a listed user: bad user name or password.
    for password in ["wrong", ""] {
        let opts = as_user("dash-1", port, "historian", password);
        assert_refused(password, opts, "NotAuthorized").await;
    }
    let mut historian =
        TestClient::connect_ok(as_user("dash-1", port, "historian", "h-secret")).await;
    assert_eq!(
        historian
            .subscribe("fleetgw/+/status", QoS::AtLeastOnce)
            .await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // Read-only: outside its filters, and no publishing at all.
    let outside = [
        "#",
        "fleetgw/+/provision/json/accepted",
        "fleetgw/+/commands/#",
    ];
    assert_filters_refused(&mut historian, &outside).await;
    historian
        .publish(
            "fleetgw/sensor-a/telemetry",
            QoS::AtLeastOnce,
            false,
            b"forged",
        )
        .await;
    let mut a = TestClient::connect_ok(options("sensor-a", port)).await;
    a.subscribe("fleetgw/sensor-a/commands/#", QoS::AtLeastOnce)
        .await;
    next_is_marker(&mut rx, &mut a, "sensor-a").await;

    // The controller may send commands to devices, as the cloud does.
    let mut controller =
        TestClient::connect_ok(as_user("plc-master", port, "line-controller", "c-secret")).await;
    controller
        .publish(
            "fleetgw/sensor-a/commands/stop",
            QoS::AtLeastOnce,
            false,
            b"1",
        )
        .await;
    next_received_is(&mut a, "fleetgw/sensor-a/commands/stop").await;

    // The historian sees statuses the gateway publishes.
    gw.session()
        .publish_status(
            &id("sensor-a"),
            &StatusReport::new(DeviceStatus::Provisioned, 2),
        )
        .await
        .unwrap();
    next_received_is(&mut historian, "fleetgw/sensor-a/status").await;
    gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn a_device_cannot_inherit_a_users_kept_session() {
    let (gw, _rx, port) = gateway_with_users(vec![user("app", "secret", &[], &["plant/#"])]).await;
    // A local application with a kept session on a client id that is also a valid device id.
    let mut o = as_user("sensor-z", port, "app", "secret");
    o.set_clean_session(false);
    let mut app = TestClient::connect_ok(o).await;
    app.subscribe("plant/#", QoS::AtLeastOnce).await;
    drop(app);
    // A device connecting with that id and clean session 0 gets a new session of its own.
    let mut o = options("sensor-z", port);
    o.set_clean_session(false);
    let (client, mut events) = rumqttc::AsyncClient::new(o, 8);
    let session_present = loop {
        match tokio::time::timeout(WAIT, events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => {
                break a.session_present
            }
            Ok(Ok(_)) => {}
            other => panic!("no CONNACK: {other:?}"),
        }
    };
    assert!(
        !session_present,
        "the device resumed the application's session"
    );
    drop(client);
    gw.shutdown(WAIT).await;
}

/// Connects `client_id` with clean session 0 and a subscription, then leaves cleanly.
async fn keep_a_session(port: u16, client_id: &str) {
    let mut o = options(client_id, port);
    o.set_clean_session(false);
    let mut c = TestClient::connect_ok(o).await;
    c.subscribe(&format!("k/{client_id}"), QoS::AtLeastOnce)
        .await;
    c.client.disconnect().await.unwrap();
    let closed = c
        .next_matching(|e| matches!(e, ClientEvent::Closed(_)))
        .await;
    assert!(closed.is_some(), "{client_id} did not leave");
}

#[tokio::test]
async fn kept_sessions_are_capped_and_expire() {
    use common::wait::eventually;
    use std::time::Duration;
    let capped = EmbeddedBroker::start(&EmbeddedBrokerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_kept_sessions: 2,
        ..EmbeddedBrokerOptions::default()
    })
    .await
    .unwrap();
    // Five clients ask to keep their sessions and leave: only two are kept.
    for n in 0..5 {
        keep_a_session(capped.listen_addr().port(), &format!("keeper-{n}")).await;
    }
    eventually("the connections to end", WAIT, || {
        (capped.sessions() == capped.kept_sessions()).then_some(())
    })
    .await;
    assert_eq!(capped.kept_sessions(), 2);

    // Kept sessions expire (the broker's cap, as 3.1.1 clients name none).
    let expiring = EmbeddedBroker::start(&EmbeddedBrokerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        kept_session_expiry: Duration::from_millis(300),
        ..EmbeddedBrokerOptions::default()
    })
    .await
    .unwrap();
    keep_a_session(expiring.listen_addr().port(), "keeper").await;
    eventually("the kept session to expire", WAIT, || {
        (expiring.sessions() == 0).then_some(())
    })
    .await;
    assert_eq!(expiring.kept_sessions(), 0);
}

/// `auth = "device"` in symmetric-key mode: a device's CONNECT must carry its id as user name
/// and a SAS token for it as password.
#[tokio::test]
async fn devices_prove_their_id_with_a_sas_token_at_connect() {
    use fleetgw::admission::{sas, Admission, AdmissionMode, AdmissionOptions};
    use fleetgw::identity::Secret;
    let group_key = b"a group key of the fleet, 32 b!!".to_vec();
    let admission = std::sync::Arc::new(
        Admission::new(AdmissionOptions {
            mode: AdmissionMode::SymmetricKey,
            group_key: Some(Secret::new(group_key.clone())),
            ..AdmissionOptions::default()
        })
        .unwrap(),
    );
    let mut rules = AccessRules::new("fleetgw");
    rules.device_auth = Some(std::sync::Arc::new(
        move |id, username, password, _chain| {
            admission
                .authenticate_connect(id, username, password, None, fleetgw::clock::unix_secs())
                .map(|()| true)
        },
    ));
    let opts = DownstreamOptions::new(
        GATEWAY_ID.into(),
        BrokerOptions::Embedded(EmbeddedBrokerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            rules: Some(rules),
            ..EmbeddedBrokerOptions::default()
        }),
    );
    let (gw, mut rx) = Downstream::start(&opts).await.unwrap();
    let port = gw.broker().unwrap().listen_addr().port();
    let sas_for = |device: &str, expiry: i64| {
        let key = sas::derive_device_key(&group_key, device);
        let uri = sas::registration_resource_uri("0ne000TEST", &id(device));
        sas::generate_sas(&uri, &key, expiry, Some(sas::REGISTRATION_KEY_NAME))
    };
    let now = fleetgw::clock::unix_secs();
    let with = |client_id: &str, username: &str, password: &str| {
        let mut o = options(client_id, port);
        o.set_credentials(username, password);
        o
    };
    // Missing, wrong, expired, another device's token, another user name: refused (5).
    for (what, o) in [
        ("no password", options("sensor-a", port)),
        (
            "wrong password",
            with("sensor-a", "sensor-a", "not a token"),
        ),
        (
            "expired",
            with("sensor-a", "sensor-a", &sas_for("sensor-a", now - 10)),
        ),
        (
            "B's token",
            with("sensor-a", "sensor-a", &sas_for("sensor-b", now + 300)),
        ),
        (
            "other user name",
            with("sensor-a", "sensor-b", &sas_for("sensor-a", now + 300)),
        ),
    ] {
        assert_refused(what, o, "NotAuthorized").await;
    }
    // MQTT 5 is told it was the user name or password (0x86).
    let mut o5 = rumqttc::v5::MqttOptions::new("sensor-a", "127.0.0.1", port);
    o5.set_credentials("sensor-a", "not a token");
    assert_v5_refused(o5, ConnectReturnCode::BadUserNamePassword).await;
    // The right token: connected, and marked authenticated for key delivery.
    let mut a = TestClient::connect_ok(with(
        "sensor-a",
        "sensor-a",
        &sas_for("sensor-a", now + 300),
    ))
    .await;
    next_is_marker(&mut rx, &mut a, "sensor-a").await;
    let facts = gw
        .broker()
        .unwrap()
        .connections()
        .facts("sensor-a")
        .unwrap();
    assert!(facts.authenticated && !facts.tls, "{facts:?}");
    assert!(gw.broker().unwrap().refusals().connects >= 6);
    gw.shutdown(WAIT).await;
}

/// The gateway's downstream side with `auth = "device"` as `fleetgw run` sets it up: a plain
/// and a TLS listener (its CA's PEM is returned), device credentials checked against
/// admission and the store.
async fn authenticating_gateway(
    admission: fleetgw::admission::AdmissionOptions,
    store: &fleetgw::store::Store,
) -> AuthGateway {
    let server_ca = fleetgw::identity::CertificateAuthority::generate("gateway TLS CA").unwrap();
    let (server_cert, server_key) = server_ca
        .issue_server("127.0.0.1", &[], &["127.0.0.1".parse().unwrap()], 1)
        .unwrap();
    use fleetgw::downstream::device_auth::{DeviceConnectCheck, Proof};
    let check = DeviceConnectCheck::new(
        fleetgw::admission::Admission::new(admission)
            .unwrap()
            .into(),
        store.clone(),
    );
    let mut rules = AccessRules::new("fleetgw");
    rules.device_auth = Some(std::sync::Arc::new(move |id, user, password, chain| {
        check
            .check(id, user, password, chain, fleetgw::clock::unix_secs())
            .map(|p| p == Proof::Authenticated)
    }));
    let broker = EmbeddedBrokerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: Some(fleetgw::downstream::EmbeddedTls {
            cert_chain_pem: server_cert,
            key_pem: fleetgw::identity::Secret::from(
                server_key.to_pkcs8_pem().expose_str().unwrap().to_string(),
            ),
        }),
        tls_listen: Some("127.0.0.1:0".parse().unwrap()),
        rules: Some(rules),
        ..EmbeddedBrokerOptions::default()
    };
    let opts = DownstreamOptions::new(GATEWAY_ID.into(), BrokerOptions::Embedded(broker));
    let (gw, rx) = Downstream::start(&opts).await.unwrap();
    let b = gw.broker().unwrap();
    AuthGateway {
        plain: b.listen_addr().port(),
        tls: b.tls_addr().unwrap().port(),
        ca: server_ca.cert_pem().to_string(),
        gw,
        rx,
    }
}

/// What [`authenticating_gateway`] started: the downstream side, the gateway's inbound
/// messages, the TLS listener's CA and the two ports.
struct AuthGateway {
    gw: Downstream,
    rx: mpsc::Receiver<DownstreamMessage>,
    ca: String,
    plain: u16,
    tls: u16,
}

/// A TLS client of `port` trusting `server_ca`, presenting `client` (chain PEM, key) if given.
fn tls_options(
    client_id: &str,
    port: u16,
    server_ca: &str,
    client: Option<(&str, &fleetgw::identity::PrivateKey)>,
) -> rumqttc::MqttOptions {
    let mut o = options(client_id, port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(
            fleetgw::identity::tls::client_config(server_ca, client).unwrap(),
        ),
    ));
    o
}

#[tokio::test]
async fn a_provisioned_device_proves_its_id_with_the_certificate_issued_to_it() {
    use fleetgw::admission::{AdmissionMode, AdmissionOptions};
    use fleetgw::identity::{CertificateAuthority, KeyType};
    use fleetgw::store::{DeviceRecord, DeviceState, Store, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    // The cloud issued sensor-p a certificate; the gateway stored it when provisioning.
    let cloud = CertificateAuthority::generate("cloud CA").unwrap();
    let (issued, issued_key) = cloud
        .issue_client("sensor-p", KeyType::EcdsaP256, 30)
        .unwrap();
    let now = fleetgw::clock::unix_ms();
    let mut rec = DeviceRecord::new(id("sensor-p"), "json", now);
    rec.state = DeviceState::Delivered;
    rec.provision.certificate_pem = Some(issued.clone());
    store.put_device(&rec).await.unwrap();
    let mut blocked = DeviceRecord::new(id("sensor-blocked"), "json", now);
    blocked.state = DeviceState::Blocked;
    store.put_device(&blocked).await.unwrap();

    let mut g = authenticating_gateway(
        AdmissionOptions {
            mode: AdmissionMode::Approve,
            ..AdmissionOptions::default()
        },
        &store,
    )
    .await;
    let (b, ca) = (g.gw.broker().unwrap(), g.ca.as_str());

    // Not provisioned yet (approve mode): it may connect to ask, unauthenticated.
    let mut new = TestClient::connect_ok(options("sensor-new", g.plain)).await;
    next_is_marker(&mut g.rx, &mut new, "sensor-new").await;
    assert!(!b.connections().facts("sensor-new").unwrap().authenticated);

    // Provisioned: without its certificate, or with another key's, it is refused.
    let (other, other_key) = cloud
        .issue_client("sensor-p", KeyType::EcdsaP256, 30)
        .unwrap();
    for (what, o) in [
        ("plain, no certificate", options("sensor-p", g.plain)),
        (
            "TLS, no certificate",
            tls_options("sensor-p", g.tls, ca, None),
        ),
        (
            "TLS, another certificate for the same id",
            tls_options("sensor-p", g.tls, ca, Some((&other, &other_key))),
        ),
        (
            "blocked",
            tls_options("sensor-blocked", g.tls, ca, Some((&issued, &issued_key))),
        ),
    ] {
        assert_refused(what, o, "NotAuthorized").await;
    }
    // Its own certificate proves it.
    let mut p = TestClient::connect_ok(tls_options(
        "sensor-p",
        g.tls,
        ca,
        Some((&issued, &issued_key)),
    ))
    .await;
    next_is_marker(&mut g.rx, &mut p, "sensor-p").await;
    let facts = b.connections().facts("sensor-p").unwrap();
    assert!(facts.authenticated && facts.tls, "{facts:?}");
    g.gw.shutdown(WAIT).await;
}

#[tokio::test]
async fn in_x509_mode_a_device_certificate_of_the_trusted_ca_proves_its_id() {
    use fleetgw::admission::{AdmissionMode, AdmissionOptions};
    use fleetgw::identity::{CertificateAuthority, KeyType};
    use fleetgw::store::{Store, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let fleet = CertificateAuthority::generate("fleet device CA").unwrap();
    let stranger = CertificateAuthority::generate("someone else's CA").unwrap();
    let mut g = authenticating_gateway(
        AdmissionOptions {
            mode: AdmissionMode::X509,
            trusted_ca_pem: Some(fleet.cert_pem().to_string()),
            ..AdmissionOptions::default()
        },
        &store,
    )
    .await;
    let (b, ca) = (g.gw.broker().unwrap(), g.ca.as_str());
    let (good, good_key) = fleet
        .issue_client("sensor-x", KeyType::EcdsaP256, 30)
        .unwrap();
    let (other_cn, other_cn_key) = fleet
        .issue_client("sensor-y", KeyType::EcdsaP256, 30)
        .unwrap();
    let (foreign, foreign_key) = stranger
        .issue_client("sensor-x", KeyType::EcdsaP256, 30)
        .unwrap();
    for (what, o) in [
        ("plain", options("sensor-x", g.plain)),
        ("no certificate", tls_options("sensor-x", g.tls, ca, None)),
        (
            "another device's certificate",
            tls_options("sensor-x", g.tls, ca, Some((&other_cn, &other_cn_key))),
        ),
        (
            "an untrusted CA",
            tls_options("sensor-x", g.tls, ca, Some((&foreign, &foreign_key))),
        ),
    ] {
        assert_refused(what, o, "NotAuthorized").await;
    }
    let mut x =
        TestClient::connect_ok(tls_options("sensor-x", g.tls, ca, Some((&good, &good_key)))).await;
    next_is_marker(&mut g.rx, &mut x, "sensor-x").await;
    assert!(b.connections().facts("sensor-x").unwrap().authenticated);
    g.gw.shutdown(WAIT).await;
}

/// A local application that reads device telemetry gets its own copy; its PUBACK frees only
/// its own copy. The device's PUBACK waits for the gateway's in-process session, which gives
/// it once the message is stored, and only then.
#[tokio::test]
async fn only_the_gateway_acknowledges_a_device_message_to_the_device() {
    let (gw, mut rx, port) =
        gateway_with_users(vec![user("reader", "r-secret", &[], &["fleetgw/#"])]).await;
    let mut reader = TestClient::connect_ok(as_user("dash-2", port, "reader", "r-secret")).await;
    reader.subscribe("fleetgw/#", QoS::AtLeastOnce).await;
    let mut dev = TestClient::connect_ok(options("sensor-c", port)).await;
    dev.publish_unacked(
        "fleetgw/sensor-c/telemetry",
        QoS::AtLeastOnce,
        false,
        b"reading",
    )
    .await;
    // The reader has its copy (and its client acknowledged it) ...
    next_received_is(&mut reader, "fleetgw/sensor-c/telemetry").await;
    let held = next_message(&mut rx).await;
    assert_eq!(&held.payload[..], b"reading");
    // ... but the device is not told the message was delivered while the gateway holds it.
    assert!(
        !dev.puback_within(std::time::Duration::from_millis(300))
            .await,
        "a PUBACK reached the device before the gateway acknowledged"
    );
    held.ack.ack();
    dev.expect_puback("after the gateway's ack").await;
    gw.shutdown(WAIT).await;
}

/// A shared subscription is judged by the filter inside it: a device cannot use one to read
/// another device's topics, nor a user outside its filters.
#[tokio::test]
async fn shared_subscriptions_obey_the_same_rights() {
    let (gw, _rx, port) =
        gateway_with_users(vec![user("reader", "r-secret", &[], &["plant/#"])]).await;
    let mut a = TestClient::connect_ok(options("sensor-a", port)).await;
    assert_filters_refused(
        &mut a,
        &[
            "$share/g/fleetgw/sensor-b/#",
            "$share/g/fleetgw/#",
            "$share/g/#",
        ],
    )
    .await;
    assert_eq!(
        a.subscribe("$share/g/fleetgw/sensor-a/commands/#", QoS::AtLeastOnce)
            .await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut reader = TestClient::connect_ok(as_user("dash-3", port, "reader", "r-secret")).await;
    assert_filters_refused(&mut reader, &["$share/g/fleetgw/+/telemetry", "$share/g/#"]).await;
    assert_eq!(
        reader
            .subscribe("$share/g/plant/line-1/#", QoS::AtLeastOnce)
            .await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    gw.shutdown(WAIT).await;
}
