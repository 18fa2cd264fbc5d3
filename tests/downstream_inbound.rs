//! The inbound dispatch against the embedded broker and against mosquitto, with a rumqttc
//! client playing the device: a provisioning queue the engine does not read neither holds back
//! telemetry nor leaves a device waiting: the request that overflows it gets a retryable
//! `/rejected` answer.

mod common;

use std::time::Duration;

use common::mosquitto::{Mosquitto, MosquittoConfig};
use common::mqtt_client::{options, TestClient};
use common::WAIT;
use fleetgw::downstream::{
    contract, BrokerOptions, DeviceTopic, Downstream, DownstreamMessage, DownstreamOptions,
    EmbeddedBrokerOptions, ExternalBrokerOptions, InboundQueues, PayloadFormat, RejectedResponse,
};
use fleetgw::identity::Secret;
use rumqttc::QoS;
use tokio::sync::mpsc;

async fn next_message(rx: &mut mpsc::Receiver<DownstreamMessage>) -> DownstreamMessage {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("gateway received nothing in time")
        .expect("queue closed")
}

/// Starts the gateway with queues of one message each: one request fills the provisioning
/// queue, which the engine does not read.
async fn gateway(opts: &DownstreamOptions) -> (Downstream, InboundQueues) {
    let (gw, queues) = Downstream::start_routed(opts, |s| s.inbound_capacity = 1)
        .await
        .expect("start downstream");
    gw.session()
        .wait_subscribed(WAIT)
        .await
        .expect("gateway subscribed");
    (gw, queues)
}

#[tokio::test]
async fn a_full_provisioning_queue_refuses_requests_and_lets_telemetry_through() {
    let broker = EmbeddedBrokerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..EmbeddedBrokerOptions::default()
    };
    let opts = DownstreamOptions::new("fleetgw-gw-test".into(), BrokerOptions::Embedded(broker));
    let (gw, queues) = gateway(&opts).await;
    let port = gw.broker().expect("embedded").listen_addr().port();
    let dev = TestClient::connect_ok(options("sensor-1", port)).await;
    refuses_requests_and_lets_telemetry_through(gw, queues, dev).await;
}

/// The same with mosquitto (the recipe of docs/mosquitto.md) and the gateway's MQTT session,
/// whose event loop routes the messages.
#[tokio::test]
async fn a_full_provisioning_queue_refuses_requests_on_an_external_broker_too() {
    let broker = Mosquitto::start(&MosquittoConfig::recipe(
        "fleetgw",
        &[("sensor-1", "pw-1")],
        "gw-secret",
    ));
    let mut x = ExternalBrokerOptions::new(broker.url());
    x.username = Some("fleetgw-gateway".into());
    x.password = Some(Secret::from("gw-secret"));
    let opts = DownstreamOptions::new("fleetgw-gw-test".into(), BrokerOptions::External(x));
    let (gw, queues) = gateway(&opts).await;
    let mut o = options("sensor-1", broker.port());
    o.set_credentials("sensor-1", "pw-1");
    let dev = TestClient::connect_ok(o).await;
    refuses_requests_and_lets_telemetry_through(gw, queues, dev).await;
}

async fn refuses_requests_and_lets_telemetry_through(
    gw: Downstream,
    mut queues: InboundQueues,
    mut dev: TestClient,
) {
    dev.subscribe("fleetgw/sensor-1/provision/json/rejected", QoS::AtLeastOnce)
        .await;
    let request = br#"{"attestation":{"type":"none"}}"#;
    let topic = "fleetgw/sensor-1/provision/json";
    for _ in 0..2 {
        dev.publish_unacked(topic, QoS::AtLeastOnce, false, request)
            .await;
    }
    for n in 0..3 {
        dev.publish_unacked(
            "fleetgw/sensor-1/telemetry",
            QoS::AtLeastOnce,
            false,
            format!("{{\"n\":{n}}}").as_bytes(),
        )
        .await;
    }

    // Telemetry reaches its consumer while the provisioning queue stays full.
    let mut telemetry = Vec::new();
    for n in 0..3 {
        let m = next_message(&mut queues.telemetry).await;
        assert!(matches!(m.topic, DeviceTopic::Telemetry { .. }));
        assert_eq!(m.payload.as_ref(), format!("{{\"n\":{n}}}").as_bytes());
        telemetry.push(m);
    }
    // The second request is answered, retryably. (Over MQTT the answer leaves once the
    // session's event loop no longer waits for room in the telemetry queue of one.)
    let answer = dev.next_publish().await.expect("device got /rejected");
    assert_eq!(answer.topic, "fleetgw/sensor-1/provision/json/rejected");
    let rejected: RejectedResponse = contract::decode(PayloadFormat::Json, &answer.payload)
        .expect("rejection decodes as the contract says");
    assert_eq!(rejected.status_code, 503);
    assert_eq!(rejected.error_code, contract::error_code::GATEWAY_BUSY);
    assert!(
        rejected.error_message.contains("retry"),
        "{}",
        rejected.error_message
    );

    assert_eq!(gw.session().busy_requests(), 1);

    // The engine catches up: the queued request, then every PUBACK goes out in order (the
    // refused request was acknowledged by the session).
    let queued = next_message(&mut queues.provisioning).await;
    assert!(matches!(queued.topic, DeviceTopic::ProvisionRequest { .. }));
    // The session routed the refused request before the telemetry that came after it.
    assert!(
        queues.provisioning.try_recv().is_err(),
        "the refused request must not reach the engine"
    );
    queued.ack.ack();
    for m in telemetry {
        m.ack.ack();
    }
    for what in [
        "request",
        "refused request",
        "telemetry 0",
        "telemetry 1",
        "telemetry 2",
    ] {
        dev.expect_puback(what).await;
    }
    gw.shutdown(Duration::from_secs(2)).await;
}
