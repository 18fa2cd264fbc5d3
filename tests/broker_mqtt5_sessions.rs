//! More MQTT 5 scenarios run side by side against mosquitto (see `tests/broker_mqtt5.rs`):
//! session and message expiry while a client is away, a QoS 2 PUBLISH repeated after a
//! reconnect, a CONNECT asking for enhanced authentication, and the reason codes of refusals under
//! an access policy (mosquitto with the ACL of docs/mosquitto.md, the embedded broker with its
//! trust boundary). Grouped by section of the MQTT 5 specification; where the specification
//! leaves a choice, the test says which one the embedded broker made.
//!
//! Expiry is about time itself: these scenarios sleep past an expiry interval of one second,
//! there is no event to wait for instead.

mod common;

use std::time::Duration;

use common::mosquitto::{Mosquitto, MosquittoConfig};
use common::mqtt5::{brokers, options, Client};
use common::raw_mqtt::{self, Raw};
use fleetgw::downstream::{AccessRules, EmbeddedBroker, EmbeddedBrokerOptions};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;

/// Past an expiry interval of one second, also for mosquitto, which counts in whole seconds.
const PAST_ONE_SECOND: Duration = Duration::from_millis(2600);

fn kept(id: &str, port: u16, expiry_secs: u32) -> MqttOptions {
    let mut o = options(id, port);
    o.set_clean_start(false)
        .set_session_expiry_interval(Some(expiry_secs));
    o
}

// §3.1.2.11.2, MQTT-3.1.2-23: a session is kept for its expiry interval after the connection
// closes, and not after: CONNACK says session present within it and not past it.
async fn session_expiry_scenario(port: u16) -> (bool, bool, bool) {
    let mut c = Client::connect(kept("se", port, 1)).await;
    let fresh = c.session_present;
    c.subscribe("se/#", QoS::AtLeastOnce, None).await;
    c.leave().await;
    let c = Client::connect(kept("se", port, 1)).await;
    let within = c.session_present;
    c.leave().await;
    tokio::time::sleep(PAST_ONE_SECOND).await;
    let c = Client::connect(kept("se", port, 1)).await;
    (fresh, within, c.session_present)
}

#[tokio::test]
async fn a_session_is_kept_for_its_expiry_interval_and_not_after() {
    let b = brokers().await;
    let ours = session_expiry_scenario(b.embedded_port).await;
    assert_eq!(ours, session_expiry_scenario(b.mosquitto_port).await);
    assert_eq!(ours, (false, true, false));
}

// §3.3.2.3.3, MQTT-3.3.2-5, -6: a message queued for an absent client is dropped once its
// expiry interval passed; the others go out with what is left of theirs.
async fn queued_expiry_scenario(port: u16) -> Vec<(String, Option<bool>)> {
    let mut c = Client::connect(kept("qe", port, 60)).await;
    c.subscribe("qe/#", QoS::AtLeastOnce, None).await;
    c.leave().await;
    let publisher = Client::connect(options("qe-pub", port)).await;
    let expiring = |secs| PublishProperties {
        message_expiry_interval: Some(secs),
        ..PublishProperties::default()
    };
    publisher
        .publish("qe/short", QoS::AtLeastOnce, false, b"s", expiring(1))
        .await;
    publisher
        .publish("qe/long", QoS::AtLeastOnce, false, b"l", expiring(60))
        .await;
    publisher
        .publish(
            "qe/end",
            QoS::AtLeastOnce,
            false,
            b"e",
            PublishProperties::default(),
        )
        .await;
    publisher.leave().await;
    tokio::time::sleep(PAST_ONE_SECOND).await;
    let mut c = Client::connect(kept("qe", port, 60)).await;
    c.publishes_until("qe/end")
        .await
        .iter()
        .map(|p| {
            let left = p
                .properties
                .as_ref()
                .and_then(|p| p.message_expiry_interval);
            (
                String::from_utf8_lossy(&p.topic).into_owned(),
                // Counted down while it waited: less than 60 left, and most of it.
                left.map(|s| s < 60 && s > 50),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_queued_message_expires_while_its_client_is_away() {
    let b = brokers().await;
    let ours = queued_expiry_scenario(b.embedded_port).await;
    assert_eq!(ours, queued_expiry_scenario(b.mosquitto_port).await);
    assert_eq!(
        ours,
        [
            ("qe/long".to_string(), Some(true)),
            ("qe/end".to_string(), None)
        ]
    );
}

// §3.9.3, §3.4.2.1: refusals under an access policy. A QoS 1 publish outside the device's
// rights gets PUBACK 0x87 (not authorized) from both brokers. A subscription outside its own
// topics is where the two differ, both within the specification: mosquitto grants it and
// filters what it delivers by its ACL (the subscriber reads nothing), the embedded broker
// refuses it with 0x87 so the client knows. The embedded broker also says why in a reason
// string (MQTT 5 §3.9.2.1.2, §3.4.2.2.2: optional; mosquitto sends none).
async fn refusals_scenario(
    opts: MqttOptions,
) -> (Vec<SubscribeReasonCode>, PubAckReason, (bool, bool)) {
    let mut d = Client::connect(opts).await;
    d.client
        .subscribe_many(vec![
            rumqttc::v5::mqttbytes::v5::Filter::new("fleetgw/sensor-2/#", QoS::AtLeastOnce),
            rumqttc::v5::mqttbytes::v5::Filter::new(
                "fleetgw/sensor-1/commands/#",
                QoS::AtLeastOnce,
            ),
        ])
        .await
        .unwrap();
    let Packet::SubAck(suback) = d.next_matching(|p| matches!(p, Packet::SubAck(_))).await else {
        unreachable!()
    };
    d.publish(
        "fleetgw/sensor-2/telemetry",
        QoS::AtLeastOnce,
        false,
        b"forged",
        PublishProperties::default(),
    )
    .await;
    let Packet::PubAck(puback) = d.next_matching(|p| matches!(p, Packet::PubAck(_))).await else {
        unreachable!()
    };
    let reason_strings = (
        suback
            .properties
            .as_ref()
            .is_some_and(|p| p.reason_string.is_some()),
        puback
            .properties
            .as_ref()
            .is_some_and(|p| p.reason_string.is_some()),
    );
    (suback.return_codes, puback.reason, reason_strings)
}

#[tokio::test]
async fn refusals_carry_not_authorized_and_a_reason() {
    let embedded = EmbeddedBroker::start(&EmbeddedBrokerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        rules: Some(AccessRules::new("fleetgw")),
        ..EmbeddedBrokerOptions::default()
    })
    .await
    .expect("embedded broker starts");
    let mosquitto = Mosquitto::start(&MosquittoConfig::recipe(
        "fleetgw",
        &[("sensor-1", "s1-secret")],
        "gw-secret",
    ));
    let ours = refusals_scenario(options("sensor-1", embedded.listen_addr().port())).await;
    let mut o = options("sensor-1", mosquitto.port());
    o.set_credentials("sensor-1", "s1-secret");
    let theirs = refusals_scenario(o).await;
    assert_eq!(ours.1, theirs.1, "PUBACK reason codes");
    assert_eq!(
        theirs.0,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ],
        "mosquitto grants and filters on delivery"
    );
    assert_eq!(
        ours.0,
        [
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ]
    );
    assert_eq!(ours.1, PubAckReason::NotAuthorized);
    assert_eq!(ours.2, (true, true), "the embedded broker says why");
    // MQTT-3.1.2-29: a client that turned Request Problem Information off gets no reason
    // strings on SUBACK or PUBACK, the same codes.
    let mut quiet = options("sensor-1", embedded.listen_addr().port());
    quiet.set_connect_properties(rumqttc::v5::mqttbytes::v5::ConnectProperties {
        request_problem_info: Some(0),
        ..rumqttc::v5::mqttbytes::v5::ConnectProperties::new()
    });
    let told = refusals_scenario(quiet).await;
    assert_eq!((&told.0, &told.1), (&ours.0, &ours.1));
    assert_eq!(
        told.2,
        (false, false),
        "reason strings despite Request Problem Information 0"
    );
}

// §4.3.3, MQTT-4.3.3-9 (3.1.1 §4.3.3 the same): the receiver of a QoS 2 PUBLISH keeps its
// packet id until PUBREL as session state, so a PUBLISH repeated (DUP) after a reconnect to
// the kept session is the same message and reaches subscribers once. Raw MQTT 3.1.1 packets
// (rumqttc would complete the exchange itself).
async fn qos2_repeat_scenario(port: u16) -> Vec<String> {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut sub = Client::connect(options("q2-sub", port)).await;
    sub.subscribe("q2/#", QoS::ExactlyOnce, None).await;
    let mut raw = Raw::connect(addr, "q2-pub", false).await;
    raw.send(&raw_mqtt::publish(7, "q2/x", b"once", 2, false))
        .await;
    assert_eq!(raw.read().await.0, 0x50, "PUBREC");
    drop(raw);
    let mut raw = Raw::connect(addr, "q2-pub", false).await;
    raw.send(&raw_mqtt::publish(7, "q2/x", b"once", 2, true))
        .await;
    assert_eq!(raw.read().await.0, 0x50, "PUBREC again");
    raw.send(&[0x62, 2, 0, 7]).await; // PUBREL
    assert_eq!(raw.read().await.0, 0x70, "PUBCOMP");
    raw.send(&raw_mqtt::publish(0, "q2/end", b"end", 0, false))
        .await;
    sub.publishes_until("q2/end")
        .await
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

#[tokio::test]
async fn a_qos2_publish_repeated_after_a_reconnect_is_delivered_once() {
    let b = brokers().await;
    let ours = qos2_repeat_scenario(b.embedded_port).await;
    assert_eq!(ours, qos2_repeat_scenario(b.mosquitto_port).await);
    assert_eq!(ours, ["once", "end"]);
}

// §4.12, MQTT-4.12.0-1: a server that does not support the client's authentication method
// refuses the CONNECT (0x8C bad authentication method) and closes. Neither broker supports
// enhanced authentication (mosquitto only with an auth plugin).
async fn auth_method_scenario(port: u16) -> Option<rumqttc::v5::mqttbytes::v5::ConnectReturnCode> {
    let mut o = options("scram", port);
    o.set_connect_properties(rumqttc::v5::mqttbytes::v5::ConnectProperties {
        authentication_method: Some("SCRAM-SHA-256".into()),
        authentication_data: Some(bytes::Bytes::from_static(b"n,,n=user,r=nonce")),
        ..rumqttc::v5::mqttbytes::v5::ConnectProperties::new()
    });
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 8);
    let outcome = tokio::time::timeout(common::WAIT, eventloop.poll())
        .await
        .expect("an answer to CONNECT");
    match outcome {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => Some(code),
        _ => None,
    }
}

#[tokio::test]
async fn enhanced_authentication_is_refused_with_bad_authentication_method() {
    let b = brokers().await;
    let ours = auth_method_scenario(b.embedded_port).await;
    assert_eq!(ours, auth_method_scenario(b.mosquitto_port).await);
    assert_eq!(
        ours,
        Some(rumqttc::v5::mqttbytes::v5::ConnectReturnCode::BadAuthenticationMethod)
    );
}
