//! End-to-end acknowledgement in the embedded broker (`EmbeddedBrokerOptions::ack_after_client`):
//! a device's QoS 1 PUBLISH that the acknowledging client (the gateway's session) receives is
//! acknowledged to the device only after that client acknowledged it, in the order the device
//! published; publishes the acknowledging client does not receive are acknowledged at once.
//! Driven with real rumqttc clients on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::WAIT;
use fleetgw::downstream::{EmbeddedBroker, EmbeddedBrokerOptions};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// How long "no PUBACK yet" is watched for.
const QUIET: Duration = Duration::from_millis(300);

/// A client whose event loop runs in a task; incoming PUBLISHes and PUBACK packet ids come out
/// of the channel.
struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Packet>,
}

impl Client {
    async fn connect(id: &str, port: u16, manual_acks: bool) -> Self {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10))
            .set_manual_acks(manual_acks);
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let (tx, mut events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(p) = event {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
            }
        });
        let mut c = Self {
            client,
            events: mpsc::unbounded_channel().1,
        };
        match timeout(WAIT, events.recv()).await {
            Ok(Some(Packet::ConnAck(_))) => {}
            other => panic!("{id}: no CONNACK: {other:?}"),
        }
        c.events = events;
        c
    }

    async fn next(&mut self) -> Packet {
        timeout(WAIT, self.events.recv())
            .await
            .expect("an event within WAIT")
            .expect("the event loop is running")
    }

    async fn next_publish(&mut self) -> Publish {
        loop {
            if let Packet::Publish(p) = self.next().await {
                return p;
            }
        }
    }

    async fn next_puback(&mut self) -> u16 {
        loop {
            if let Packet::PubAck(a) = self.next().await {
                return a.pkid;
            }
        }
    }

    /// Asserts that the broker closes the connection (within [`WAIT`]) with no PUBACK before.
    async fn closes_without_a_puback(&mut self, why: &str) {
        loop {
            match timeout(WAIT, self.events.recv()).await {
                Ok(Some(Packet::PubAck(a))) => panic!("{why}, yet the device got {a:?}"),
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(_) => panic!("{why}, yet the device's connection stayed open"),
            }
        }
    }

    /// Asserts that no PUBACK arrives for [`QUIET`].
    async fn no_puback(&mut self, why: &str) {
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Ok(Some(p)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            assert!(!matches!(p, Packet::PubAck(_)), "{why}: got {p:?}");
        }
    }
}

async fn broker() -> EmbeddedBroker {
    broker_with(|_| {}).await
}

/// [`broker`] with options changed by `tweak`.
async fn broker_with(tweak: impl FnOnce(&mut EmbeddedBrokerOptions)) -> EmbeddedBroker {
    let mut opts = EmbeddedBrokerOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ack_after_client: Some("gw".into()),
        ..EmbeddedBrokerOptions::default()
    };
    tweak(&mut opts);
    EmbeddedBroker::start(&opts)
        .await
        .expect("embedded broker starts")
}

/// The gateway's session: manual acks, subscribed to every device's telemetry; the broker is
/// opened to devices once it is.
async fn gateway(broker: &EmbeddedBroker) -> Client {
    let mut gw = Client::connect("gw", broker.listen_addr().port(), true).await;
    gw.client
        .subscribe("fleetgw/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(gw.next().await, Packet::SubAck(_)));
    broker.open();
    gw
}

#[tokio::test]
async fn device_pubacks_follow_the_gateways_acks_in_publish_order() {
    let broker = broker().await;
    let port = broker.listen_addr().port();
    let mut gw = gateway(&broker).await;
    let mut dev = Client::connect("dev-1", port, false).await;
    for n in 0..3u8 {
        dev.client
            .publish("fleetgw/dev-1/telemetry", QoS::AtLeastOnce, false, vec![n])
            .await
            .unwrap();
    }
    let got = [
        gw.next_publish().await,
        gw.next_publish().await,
        gw.next_publish().await,
    ];
    assert_eq!(
        got.iter().map(|p| p.payload[0]).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    dev.no_puback("nothing is acknowledged before the gateway acks")
        .await;

    // The second acked first: the device still waits, PUBACKs go in publish order.
    gw.client.ack(&got[1]).await.unwrap();
    dev.no_puback("the first message is not acknowledged by the gateway yet")
        .await;
    gw.client.ack(&got[0]).await.unwrap();
    let (a, b) = (dev.next_puback().await, dev.next_puback().await);
    assert!(a < b, "PUBACKs in publish order: {a}, {b}");
    dev.no_puback("the third message is not acknowledged by the gateway yet")
        .await;
    gw.client.ack(&got[2]).await.unwrap();
    let c = dev.next_puback().await;
    assert!(b < c, "PUBACKs in publish order: {b}, {c}");
}

#[tokio::test]
async fn publishes_the_gateway_does_not_receive_are_acknowledged_at_once() {
    let broker = broker().await;
    let port = broker.listen_addr().port();
    // Connected and subscribed, but these topics are not the gateway's.
    let _gw = gateway(&broker).await;
    let mut dev = Client::connect("dev-2", port, false).await;
    // No subscriber at all, and a subscriber other than the gateway.
    let mut other = Client::connect("listener", port, true).await;
    other
        .client
        .subscribe("fleetgw/dev-2/status", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(other.next().await, Packet::SubAck(_)));
    dev.client
        .publish("fleetgw/dev-2/nobody", QoS::AtLeastOnce, false, vec![1])
        .await
        .unwrap();
    dev.next_puback().await;
    dev.client
        .publish("fleetgw/dev-2/status", QoS::AtLeastOnce, false, vec![2])
        .await
        .unwrap();
    dev.next_puback().await;
    assert_eq!(other.next_publish().await.payload[..], [2]);
}

#[tokio::test]
async fn a_message_the_gateway_session_lost_is_never_acknowledged_to_the_device() {
    let broker = broker().await;
    let port = broker.listen_addr().port();
    let mut gw = gateway(&broker).await;
    let mut dev = Client::connect("dev-3", port, false).await;
    dev.client
        .publish("fleetgw/dev-3/telemetry", QoS::AtLeastOnce, false, vec![3])
        .await
        .unwrap();
    gw.next_publish().await;
    dev.no_puback("the gateway has not acknowledged").await;
    // The gateway leaves with a clean session: its copy is gone unacknowledged, so the device
    // must not be told it was delivered; the broker closes its connection so that it resends.
    gw.client.disconnect().await.unwrap();
    dev.closes_without_a_puback("the gateway's session was discarded")
        .await;
}

#[tokio::test]
async fn a_message_dropped_from_the_gateways_full_queue_makes_the_device_resend() {
    let broker = broker_with(|o| {
        o.ack_after_inflight = 1;
        o.max_queued_bytes = 2048;
        o.max_packet_bytes = 1024;
    })
    .await;
    let port = broker.listen_addr().port();
    let mut gw = gateway(&broker).await;
    // The gateway takes one message and does not acknowledge it; the rest queue for it until
    // the queue overflows and drops its oldest.
    let mut dev = Client::connect("dev-4", port, false).await;
    for n in 0..8u8 {
        dev.client
            .publish(
                "fleetgw/dev-4/telemetry",
                QoS::AtLeastOnce,
                false,
                vec![n; 400],
            )
            .await
            .unwrap();
    }
    assert_eq!(gw.next_publish().await.payload[0], 0);
    dev.closes_without_a_puback("a message was dropped from the gateway's queue")
        .await;
    assert!(broker.dropped() > 0, "the gateway's queue overflowed");
}

#[tokio::test]
async fn devices_are_admitted_only_once_the_gateway_has_subscribed() {
    let broker = broker().await;
    let port = broker.listen_addr().port();
    // A device that connects first gets no CONNACK while the gateway is not subscribed:
    // otherwise its QoS 1 telemetry would match no filter, be acknowledged at once and be lost.
    let early = tokio::spawn(async move { Client::connect("dev-5", port, false).await });
    let mut gw = Client::connect("gw", port, true).await;
    gw.client
        .subscribe("fleetgw/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(gw.next().await, Packet::SubAck(_)));
    tokio::time::sleep(QUIET).await;
    assert!(
        !early.is_finished(),
        "a device was admitted before the gateway subscribed"
    );
    broker.open();
    let mut dev = timeout(WAIT, early)
        .await
        .expect("admitted once the broker is open")
        .expect("the device task");
    dev.client
        .publish("fleetgw/dev-5/telemetry", QoS::AtLeastOnce, false, vec![5])
        .await
        .unwrap();
    let p = gw.next_publish().await;
    dev.no_puback("the gateway has not acknowledged").await;
    gw.client.ack(&p).await.unwrap();
    dev.next_puback().await;
}

#[tokio::test]
async fn the_gateway_session_has_a_window_of_its_own() {
    // Every device's PUBACK waits in the gateway's window, so it is set apart from the window
    // of other clients (`max_inflight`): here the gateway may hold 5, a device session 2.
    let broker = broker_with(|o| {
        o.max_inflight = 2;
        o.ack_after_inflight = 5;
    })
    .await;
    let port = broker.listen_addr().port();
    let mut gw = gateway(&broker).await;
    let mut dev = Client::connect("dev-6", port, false).await;
    for n in 0..8u8 {
        dev.client
            .publish("fleetgw/dev-6/telemetry", QoS::AtLeastOnce, false, vec![n])
            .await
            .unwrap();
    }
    let mut held = Vec::new();
    for n in 0..5u8 {
        let p = gw.next_publish().await;
        assert_eq!(p.payload[..], [n]);
        held.push(p);
    }
    assert!(
        timeout(QUIET, gw.next_publish()).await.is_err(),
        "the gateway got more than its window of 5 unacknowledged"
    );
    gw.client.ack(&held[0]).await.unwrap();
    assert_eq!(gw.next_publish().await.payload[..], [5]);
    assert_eq!(dev.next_puback().await, 1, "the first message's PUBACK");
}
