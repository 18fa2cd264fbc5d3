//! MQTT 5 clients for the side-by-side tests of the embedded broker and mosquitto: both
//! brokers on loopback ports, and a rumqttc v5 client whose event loop reports every packet
//! that arrives.

use std::time::Duration;

use fleetgw::downstream::{EmbeddedBroker, EmbeddedBrokerOptions};
use rumqttc::v5::mqttbytes::v5::{
    ConnAckProperties, Packet, Publish, PublishProperties, SubscribeProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::mosquitto::{Mosquitto, MosquittoConfig};
use super::WAIT;

/// The two brokers, on loopback ports.
pub struct Brokers {
    pub _embedded: EmbeddedBroker,
    pub embedded_port: u16,
    pub _mosquitto: Mosquitto,
    pub mosquitto_port: u16,
}

pub async fn brokers() -> Brokers {
    let embedded = EmbeddedBroker::start(&EmbeddedBrokerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..EmbeddedBrokerOptions::default()
    })
    .await
    .expect("embedded broker starts");
    let mosquitto = Mosquitto::start(&MosquittoConfig::anonymous());
    Brokers {
        embedded_port: embedded.listen_addr().port(),
        _embedded: embedded,
        mosquitto_port: mosquitto.port(),
        _mosquitto: mosquitto,
    }
}

/// An MQTT 5 client whose event loop reports what arrives.
pub struct Client {
    pub client: AsyncClient,
    pub packets: mpsc::UnboundedReceiver<Packet>,
    pub connack: Option<ConnAckProperties>,
    /// CONNACK's session present flag.
    pub session_present: bool,
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    pub async fn connect(opts: MqttOptions) -> Self {
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let (tx, mut packets) = mpsc::unbounded_channel();
        let task = tokio::spawn(pump(eventloop, tx));
        let (connack, session_present) = match tokio::time::timeout(WAIT, packets.recv()).await {
            Ok(Some(Packet::ConnAck(c))) => (c.properties, c.session_present),
            other => panic!("no CONNACK: {other:?}"),
        };
        Self {
            client,
            packets,
            connack,
            session_present,
            task,
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS, id: Option<usize>) {
        let props = SubscribeProperties {
            id,
            user_properties: Vec::new(),
        };
        self.client
            .subscribe_with_properties(filter, qos, props)
            .await
            .unwrap();
        self.next_matching(|p| matches!(p, Packet::SubAck(_))).await;
    }

    pub async fn publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: &[u8],
        props: PublishProperties,
    ) {
        self.client
            .publish_with_properties(topic, qos, retain, payload.to_vec(), props)
            .await
            .unwrap();
    }

    pub async fn next_matching(&mut self, want: impl Fn(&Packet) -> bool) -> Packet {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.packets.recv()).await {
                Ok(Some(p)) if want(&p) => return p,
                Ok(Some(_)) => {}
                other => panic!("nothing matching within {WAIT:?}: {other:?}"),
            }
        }
    }

    /// Waits until the broker closed the connection (the event loop ended).
    pub async fn closed(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.packets.recv()).await {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(_) => panic!("the connection was not closed within {WAIT:?}"),
            }
        }
    }

    /// Sends DISCONNECT and waits until the broker closed the connection.
    pub async fn leave(mut self) {
        self.client.disconnect().await.unwrap();
        self.closed().await;
    }

    pub async fn next_publish(&mut self) -> Publish {
        match self
            .next_matching(|p| matches!(p, Packet::Publish(_)))
            .await
        {
            Packet::Publish(p) => p,
            _ => unreachable!(),
        }
    }

    /// The publishes up to and including the one on `marker`.
    pub async fn publishes_until(&mut self, marker: &str) -> Vec<Publish> {
        let mut seen = Vec::new();
        loop {
            let p = self.next_publish().await;
            let done = p.topic == marker.as_bytes();
            seen.push(p);
            if done {
                return seen;
            }
        }
    }
}

async fn pump(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Packet>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(p)) => {
                if tx.send(p).is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(_)) => {}
            Err(_) => return,
        }
    }
}

pub fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    o
}
