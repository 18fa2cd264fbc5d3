//! The inbound dispatch against the embedded broker, with a rumqttc client playing the device:
//! a provisioning queue the engine does not read neither holds back telemetry nor leaves a
//! device waiting: the request that overflows it gets a retryable `/rejected` answer.

mod common;

use std::time::Duration;

use common::mqtt_client::{options, TestClient};
use common::WAIT;
use fleetgw::downstream::{
    contract, dispatch_inbound, BrokerOptions, DeviceTopic, Downstream, DownstreamMessage,
    DownstreamOptions, EmbeddedBrokerOptions, PayloadFormat, RejectedResponse,
};
use rumqttc::QoS;
use tokio::sync::mpsc;

async fn next_message(rx: &mut mpsc::Receiver<DownstreamMessage>) -> DownstreamMessage {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("gateway received nothing in time")
        .expect("queue closed")
}

#[tokio::test]
async fn a_full_provisioning_queue_refuses_requests_and_lets_telemetry_through() {
    let broker = EmbeddedBrokerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..EmbeddedBrokerOptions::default()
    };
    let opts = DownstreamOptions::new("fleetgw-gw-test".into(), BrokerOptions::Embedded(broker));
    let (gw, inbound) = Downstream::start(&opts).await.expect("start downstream");
    let port = gw.broker().expect("embedded").listen_addr().port();
    // One request fills the provisioning queue; the engine does not read it.
    let mut queues = dispatch_inbound(gw.session().clone(), inbound, 1);

    let mut dev = TestClient::connect_ok(options("sensor-1", port)).await;
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

    // The second request is answered at once, retryably.
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

    // Telemetry reaches its consumer while the provisioning queue stays full.
    let mut telemetry = Vec::new();
    for n in 0..3 {
        let m = next_message(&mut queues.telemetry).await;
        assert!(matches!(m.topic, DeviceTopic::Telemetry { .. }));
        assert_eq!(m.payload.as_ref(), format!("{{\"n\":{n}}}").as_bytes());
        telemetry.push(m);
    }
    assert_eq!(gw.session().busy_requests(), 1);

    // The engine catches up: the queued request, then every PUBACK goes out in order (the
    // refused request was acknowledged by the dispatch).
    let queued = next_message(&mut queues.provisioning).await;
    assert!(matches!(queued.topic, DeviceTopic::ProvisionRequest { .. }));
    // The dispatch routed the refused request before the telemetry that came after it.
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
