//! A small MQTT 3.1.1 test client (a "device") on rumqttc: connects once (no reconnect, so a
//! broker closing the connection shows up as an event), and offers waits with deadlines for
//! CONNACK, SUBACK, PUBACK and incoming publishes.

use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::WAIT;

/// What the client saw.
#[derive(Debug)]
pub enum ClientEvent {
    ConnAck(ConnectReturnCode, bool),
    SubAck(Vec<SubscribeReasonCode>),
    PubAck(u16),
    Publish(Publish),
    /// The connection failed or was closed; the client stops.
    Closed(String),
}

/// A connected test client.
pub struct TestClient {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<ClientEvent>,
    buffered: VecDeque<ClientEvent>,
    task: JoinHandle<()>,
}

/// Options for a plain client to 127.0.0.1:`port` with a 10 s keep-alive and 1 MiB packets.
pub fn options(client_id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10))
        .set_max_packet_size(1 << 20, 1 << 20);
    o
}

impl TestClient {
    /// Connects; `Err` says why there is no accepted connection (refusal code or failure).
    pub async fn try_connect(opts: MqttOptions) -> Result<Self, String> {
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => {
                        ClientEvent::ConnAck(a.code, a.session_present)
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => ClientEvent::SubAck(a.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(a))) => ClientEvent::PubAck(a.pkid),
                    Ok(Event::Incoming(Packet::Publish(p))) => ClientEvent::Publish(p),
                    Ok(_) => continue,
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        let _ = tx.send(ClientEvent::ConnAck(code, false));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(ClientEvent::Closed(e.to_string()));
                        return;
                    }
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        let mut c = Self {
            client,
            events,
            buffered: VecDeque::new(),
            task,
        };
        match c
            .next_matching(|e| matches!(e, ClientEvent::ConnAck(..) | ClientEvent::Closed(_)))
            .await
        {
            Some(ClientEvent::ConnAck(ConnectReturnCode::Success, _)) => Ok(c),
            Some(ClientEvent::ConnAck(code, _)) => Err(format!("refused: {code:?}")),
            other => Err(format!("no CONNACK: {other:?}")),
        }
    }

    /// Connects and asserts the broker accepted.
    pub async fn connect_ok(opts: MqttOptions) -> Self {
        match Self::try_connect(opts).await {
            Ok(c) => c,
            Err(e) => panic!("connect: {e}"),
        }
    }

    /// The next event satisfying `pred` within [`WAIT`]; other events stay buffered in order.
    pub async fn next_matching(
        &mut self,
        pred: impl Fn(&ClientEvent) -> bool,
    ) -> Option<ClientEvent> {
        self.next_matching_within(WAIT, pred).await
    }

    /// Like [`next_matching`](Self::next_matching) with an explicit limit.
    pub async fn next_matching_within(
        &mut self,
        within: Duration,
        pred: impl Fn(&ClientEvent) -> bool,
    ) -> Option<ClientEvent> {
        if let Some(i) = self.buffered.iter().position(&pred) {
            return self.buffered.remove(i);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) if pred(&ev) => return Some(ev),
                Ok(Some(ev)) => self.buffered.push_back(ev),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Subscribes and returns the SUBACK codes.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        match self
            .next_matching(|e| matches!(e, ClientEvent::SubAck(_) | ClientEvent::Closed(_)))
            .await
        {
            Some(ClientEvent::SubAck(codes)) => codes,
            other => panic!("no SUBACK for {filter}: {other:?}"),
        }
    }

    /// Publishes and, for QoS 1, waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .expect("publish");
        if qos != QoS::AtMostOnce {
            let ev = self
                .next_matching(|e| matches!(e, ClientEvent::PubAck(_) | ClientEvent::Closed(_)))
                .await;
            assert!(
                matches!(ev, Some(ClientEvent::PubAck(_))),
                "no PUBACK for {topic}: {ev:?}"
            );
        }
    }

    /// Publishes without waiting for the PUBACK: the embedded broker acknowledges a message the
    /// gateway receives only once the gateway acknowledged it (end-to-end acks), so the test
    /// plays the gateway first and then calls [`expect_puback`](Self::expect_puback).
    pub async fn publish_unacked(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .expect("publish");
    }

    /// Waits (at most [`WAIT`]) for the next PUBACK; `what` names the message in the failure.
    pub async fn expect_puback(&mut self, what: &str) {
        let ev = self
            .next_matching(|e| matches!(e, ClientEvent::PubAck(_) | ClientEvent::Closed(_)))
            .await;
        assert!(
            matches!(ev, Some(ClientEvent::PubAck(_))),
            "no PUBACK for {what}: {ev:?}"
        );
    }

    /// Whether a PUBACK arrives within `within` (for asserting that one is withheld).
    pub async fn puback_within(&mut self, within: Duration) -> bool {
        matches!(
            self.next_matching_within(within, |e| matches!(e, ClientEvent::PubAck(_)))
                .await,
            Some(ClientEvent::PubAck(_))
        )
    }

    /// The next publish received (any topic) within [`WAIT`].
    pub async fn next_publish(&mut self) -> Option<Publish> {
        match self
            .next_matching(|e| matches!(e, ClientEvent::Publish(_) | ClientEvent::Closed(_)))
            .await
        {
            Some(ClientEvent::Publish(p)) => Some(p),
            _ => None,
        }
    }

    /// The payloads (as text) of the next `n` publishes received; fewer if the connection
    /// closes or [`WAIT`] passes first.
    pub async fn next_payloads(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            match self.next_publish().await {
                Some(p) => out.push(String::from_utf8_lossy(&p.payload).into_owned()),
                None => break,
            }
        }
        out
    }

    /// A publish received within `within`, if any (for asserting that none comes).
    pub async fn next_publish_within(&mut self, within: Duration) -> Option<ClientEvent> {
        self.next_matching_within(within, |e| matches!(e, ClientEvent::Publish(_)))
            .await
    }

    /// Publishes each of `payloads` on `topic` at QoS 1, each PUBACKed, and disconnects.
    pub async fn publish_each_and_leave(mut self, topic: &str, retain: bool, payloads: &[&str]) {
        for body in payloads {
            self.publish(topic, QoS::AtLeastOnce, retain, body.as_bytes())
                .await;
        }
        self.client.disconnect().await.unwrap();
    }

    /// True if the connection was closed by the broker (an event already received says so).
    pub fn saw_close(&self) -> bool {
        self.buffered
            .iter()
            .any(|e| matches!(e, ClientEvent::Closed(_)))
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
