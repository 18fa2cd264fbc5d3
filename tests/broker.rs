//! Conformance suite for the embedded downstream broker (`fleetgw::downstream::EmbeddedBroker`).
//!
//! Every test starts its own broker on 127.0.0.1 port 0 and drives it with real rumqttc clients
//! (MQTT 3.1.1, and MQTT 5 where noted), asserting only what the clients receive: routing of
//! exact and wildcard filters, QoS 1/2 handshakes and granted QoS, retained messages, persistent
//! sessions and redelivery, the in-flight window, client-id takeover, last will, keep-alive,
//! the packet size limit, unsubscribe and a 2,000-client connection storm. The suite pins the
//! broker's observable behaviour so its implementation can be swapped underneath it.
//!
//! "Nothing else arrives" is checked with a marker: the test publishes a marker after the
//! message that must not arrive, waits for the marker, then allows [`GRACE`] for stragglers
//! (MQTT orders messages per topic only, so a message on another topic may trail the marker).

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use common::WAIT;
use fleetgw::downstream::{EmbeddedBroker, EmbeddedBrokerOptions};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, LastWill, MqttOptions, Packet, Publish, QoS,
    SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

/// How long stragglers may trail a marker before "nothing else arrived" is concluded.
const GRACE: Duration = Duration::from_millis(300);

/// Starts a broker on 127.0.0.1 port 0 with default limits, adjusted by `tune`.
async fn start_broker(tune: impl FnOnce(&mut EmbeddedBrokerOptions)) -> EmbeddedBroker {
    let mut opts = EmbeddedBrokerOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..EmbeddedBrokerOptions::default()
    };
    tune(&mut opts);
    let broker = EmbeddedBroker::start(&opts)
        .await
        .expect("embedded broker starts");
    assert_ne!(
        broker.listen_addr().port(),
        0,
        "listen_addr resolves port 0"
    );
    assert!(!broker.is_tls());
    broker
}

/// Starts a broker with default limits.
async fn broker() -> EmbeddedBroker {
    start_broker(|_| {}).await
}

/// Clean-session client options: 10 s keep-alive, 1 MiB packets both ways.
fn options(client_id: &str, broker: &EmbeddedBroker) -> MqttOptions {
    let addr = broker.listen_addr();
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(10))
        .set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// Like [`options`] with clean_session = false.
fn persistent(client_id: &str, broker: &EmbeddedBroker) -> MqttOptions {
    let mut o = options(client_id, broker);
    o.set_clean_session(false);
    o
}

/// Like [`persistent`], leaving PUBACKs for incoming QoS 1 messages to the test.
fn persistent_manual_acks(client_id: &str, broker: &EmbeddedBroker) -> MqttOptions {
    let mut o = persistent(client_id, broker);
    o.set_manual_acks(true);
    o
}

fn payload_str(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

fn payloads(ps: &[Publish]) -> Vec<String> {
    ps.iter().map(payload_str).collect()
}

/// (topic, payload) pairs, sorted: what a subscriber got when order across topics is free.
fn received_set(ps: &[Publish]) -> Vec<(String, String)> {
    let mut v: Vec<_> = ps
        .iter()
        .map(|p| (p.topic.clone(), payload_str(p)))
        .collect();
    v.sort();
    v
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = items
        .iter()
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect();
    v.sort();
    v
}

/// What a device's event loop reported.
#[derive(Debug)]
enum Seen {
    Packet(Packet),
    /// The connection failed or was closed; the event loop stops (no reconnect).
    Closed(String),
}

/// An MQTT 3.1.1 client whose event loop runs in a task and reports incoming packets.
struct Device {
    id: String,
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Seen>,
    buffered: VecDeque<Seen>,
    task: JoinHandle<()>,
    session_present: bool,
}

impl Device {
    /// Connects and asserts the broker accepted within [`WAIT`].
    async fn connect(opts: MqttOptions) -> Self {
        let id = opts.client_id();
        match Self::try_connect_within(opts, WAIT).await {
            Ok(d) => d,
            Err(e) => panic!("{id}: connect: {e}"),
        }
    }

    /// Connects; `Err` says why there is no accepted connection within `within`.
    async fn try_connect_within(opts: MqttOptions, within: Duration) -> Result<Self, String> {
        let id = opts.client_id();
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let mut net = eventloop.network_options();
        net.set_connection_timeout(within.as_secs().max(1));
        eventloop.set_network_options(net);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let seen = match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => Seen::Packet(p),
                    Ok(Event::Outgoing(_)) => continue,
                    Err(e) => Seen::Closed(e.to_string()),
                };
                let stop = matches!(seen, Seen::Closed(_));
                if tx.send(seen).is_err() || stop {
                    return;
                }
            }
        });
        let mut d = Self {
            id,
            client,
            events,
            buffered: VecDeque::new(),
            task,
            session_present: false,
        };
        let connack = d
            .next_matching(within, |s| {
                matches!(s, Seen::Packet(Packet::ConnAck(_)) | Seen::Closed(_))
            })
            .await;
        match connack {
            Some(Seen::Packet(Packet::ConnAck(a))) if a.code == ConnectReturnCode::Success => {
                d.session_present = a.session_present;
                Ok(d)
            }
            other => Err(format!("no accepting CONNACK: {other:?}")),
        }
    }

    /// The next event satisfying `pred` within `within`; other events stay buffered in order.
    async fn next_matching(
        &mut self,
        within: Duration,
        pred: impl Fn(&Seen) -> bool,
    ) -> Option<Seen> {
        if let Some(i) = self.buffered.iter().position(&pred) {
            return self.buffered.remove(i);
        }
        let deadline = Instant::now() + within;
        loop {
            match timeout_at(deadline, self.events.recv()).await {
                Ok(Some(s)) if pred(&s) => return Some(s),
                Ok(Some(s)) => self.buffered.push_back(s),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next packet satisfying `pred` within [`WAIT`]; panics naming `what` otherwise.
    async fn expect_packet(&mut self, what: &str, pred: impl Fn(&Packet) -> bool) -> Packet {
        let seen = self
            .next_matching(WAIT, |s| match s {
                Seen::Packet(p) => pred(p),
                Seen::Closed(_) => true,
            })
            .await;
        match seen {
            Some(Seen::Packet(p)) => p,
            Some(Seen::Closed(e)) => {
                panic!("{}: connection closed waiting for {what}: {e}", self.id)
            }
            None => panic!("{}: no {what} within {WAIT:?}", self.id),
        }
    }

    /// Subscribes and returns the SUBACK codes.
    async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("subscribe request");
        let what = format!("SUBACK for {filter}");
        match self
            .expect_packet(&what, |p| matches!(p, Packet::SubAck(_)))
            .await
        {
            Packet::SubAck(a) => a.return_codes,
            _ => unreachable!("expect_packet returns a SubAck"),
        }
    }

    /// Unsubscribes and waits for the UNSUBACK.
    async fn unsubscribe(&mut self, filter: &str) {
        self.client
            .unsubscribe(filter)
            .await
            .expect("unsubscribe request");
        let what = format!("UNSUBACK for {filter}");
        self.expect_packet(&what, |p| matches!(p, Packet::UnsubAck(_)))
            .await;
    }

    /// Publishes and waits for the broker's PUBACK (QoS 1) or PUBREC and PUBCOMP (QoS 2).
    async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .expect("publish request");
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let what = format!("PUBACK for {topic}");
                self.expect_packet(&what, |p| matches!(p, Packet::PubAck(_)))
                    .await;
            }
            QoS::ExactlyOnce => {
                let what = format!("PUBREC for {topic}");
                self.expect_packet(&what, |p| matches!(p, Packet::PubRec(_)))
                    .await;
                let what = format!("PUBCOMP for {topic}");
                self.expect_packet(&what, |p| matches!(p, Packet::PubComp(_)))
                    .await;
            }
        }
    }

    /// The next message received (any topic) within [`WAIT`].
    async fn next_publish(&mut self) -> Publish {
        match self
            .expect_packet("a message", |p| matches!(p, Packet::Publish(_)))
            .await
        {
            Packet::Publish(p) => p,
            _ => unreachable!("expect_packet returns a Publish"),
        }
    }

    /// Every message received until the one whose payload is `marker` (which must arrive
    /// within [`WAIT`]) plus those arriving within [`GRACE`] after it, the marker excluded
    /// (further copies of it included).
    async fn publishes_until(&mut self, marker: &str) -> Vec<Publish> {
        let mut got = Vec::new();
        loop {
            let p = self.next_publish().await;
            if p.payload.as_ref() == marker.as_bytes() {
                break;
            }
            got.push(p);
        }
        while let Some(Seen::Packet(Packet::Publish(p))) = self
            .next_matching(GRACE, |s| matches!(s, Seen::Packet(Packet::Publish(_))))
            .await
        {
            got.push(p);
        }
        got
    }

    /// Why the connection ended, if it did within `within`.
    async fn wait_closed(&mut self, within: Duration) -> Option<String> {
        match self
            .next_matching(within, |s| matches!(s, Seen::Closed(_)))
            .await
        {
            Some(Seen::Closed(e)) => Some(e),
            _ => None,
        }
    }

    /// Sends DISCONNECT and waits until the broker closes the connection.
    async fn disconnect(mut self) {
        self.client.disconnect().await.expect("disconnect request");
        let closed = self.wait_closed(WAIT).await;
        assert!(
            closed.is_some(),
            "{}: broker did not close the connection after DISCONNECT",
            self.id
        );
    }

    /// Closes the TCP connection without DISCONNECT (as a device losing power would).
    fn drop_connection(self) {
        drop(self);
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // The event loop owns the socket: ending the task closes the TCP connection.
        self.task.abort();
    }
}

/// A raw MQTT 3.1.1 CONNECT (clean session, no credentials) for tests below rumqttc.
fn raw_connect(client_id: &str, keep_alive_secs: u16) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0b0000_0010];
    body.extend_from_slice(&keep_alive_secs.to_be_bytes());
    let id_len = u16::try_from(client_id.len()).expect("short client id");
    body.extend_from_slice(&id_len.to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let len = u8::try_from(body.len()).expect("CONNECT fits a one-byte length");
    assert!(len < 128, "CONNECT fits a one-byte remaining length");
    let mut packet = vec![0x10, len];
    packet.extend(body);
    packet
}

// Routing

#[tokio::test]
async fn exact_plus_and_hash_filters_route_to_matching_subscribers() {
    let b = broker().await;
    let mut exact = Device::connect(options("sub-exact", &b)).await;
    let mut plus = Device::connect(options("sub-plus", &b)).await;
    let mut hash = Device::connect(options("sub-hash", &b)).await;
    exact
        .subscribe("fleet/dev1/telemetry", QoS::AtLeastOnce)
        .await;
    plus.subscribe("fleet/+/telemetry", QoS::AtLeastOnce).await;
    hash.subscribe("fleet/#", QoS::AtLeastOnce).await;

    let mut publisher = Device::connect(options("pub", &b)).await;
    for (topic, payload) in [
        ("fleet/dev1/telemetry", "t1"),
        ("fleet/dev2/telemetry", "t2"),
        ("fleet/dev1/status", "s1"),
        ("fleet/dev1/telemetry/extra", "x1"),
        ("fleetx/dev1/telemetry", "no"),
        ("other/dev1/telemetry", "no"),
    ] {
        publisher
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes())
            .await;
    }
    // Matches all three filters, so it closes every subscriber's window.
    publisher
        .publish("fleet/dev1/telemetry", QoS::AtLeastOnce, false, b"end")
        .await;

    assert_eq!(
        received_set(&exact.publishes_until("end").await),
        pairs(&[("fleet/dev1/telemetry", "t1")])
    );
    assert_eq!(
        received_set(&plus.publishes_until("end").await),
        pairs(&[
            ("fleet/dev1/telemetry", "t1"),
            ("fleet/dev2/telemetry", "t2")
        ])
    );
    assert_eq!(
        received_set(&hash.publishes_until("end").await),
        pairs(&[
            ("fleet/dev1/telemetry", "t1"),
            ("fleet/dev2/telemetry", "t2"),
            ("fleet/dev1/status", "s1"),
            ("fleet/dev1/telemetry/extra", "x1"),
        ])
    );
}

#[tokio::test]
async fn hash_filter_matches_its_parent_level() {
    let b = broker().await;
    let mut sub = Device::connect(options("sub", &b)).await;
    sub.subscribe("lvl/#", QoS::AtLeastOnce).await;
    let mut publisher = Device::connect(options("pub", &b)).await;
    publisher
        .publish("lvl", QoS::AtLeastOnce, false, b"parent")
        .await;
    publisher
        .publish("lvl/x", QoS::AtLeastOnce, false, b"end")
        .await;
    assert_eq!(
        received_set(&sub.publishes_until("end").await),
        pairs(&[("lvl", "parent")]),
        "`lvl/#` also matches `lvl`"
    );
}

/// MQTT-4.7.2-1: `#` and `+` filters never match topics starting with `$`. A broker SHOULD
/// also keep clients from exchanging messages on `$` topics, so the `$` publish may be refused
/// (connection closed) or dropped; either way no wildcard subscriber may see it.
#[tokio::test]
async fn wildcards_do_not_match_topics_starting_with_dollar() {
    let b = broker().await;
    let mut hash = Device::connect(options("sub-hash", &b)).await;
    let mut plus = Device::connect(options("sub-plus", &b)).await;
    hash.subscribe("#", QoS::AtLeastOnce).await;
    plus.subscribe("+/x", QoS::AtLeastOnce).await;

    let mut dollar = Device::connect(options("pub-dollar", &b)).await;
    dollar
        .client
        .publish("$fleet/x", QoS::AtLeastOnce, false, b"dollar".to_vec())
        .await
        .expect("publish request");
    // PUBACK (routed or dropped) or a closed connection (refused): the broker has decided.
    let outcome = dollar
        .next_matching(WAIT, |s| {
            matches!(s, Seen::Packet(Packet::PubAck(_)) | Seen::Closed(_))
        })
        .await;
    assert!(
        outcome.is_some(),
        "the broker neither acked nor refused the `$fleet/x` publish"
    );
    println!("publish to $fleet/x: {outcome:?}");

    let mut publisher = Device::connect(options("pub", &b)).await;
    publisher
        .publish("m/x", QoS::AtLeastOnce, false, b"end")
        .await;
    let got = hash.publishes_until("end").await;
    assert!(
        got.is_empty(),
        "`#` must not match `$fleet/x`: {:?}",
        received_set(&got)
    );
    let got = plus.publishes_until("end").await;
    assert!(
        got.is_empty(),
        "`+/x` must not match `$fleet/x`: {:?}",
        received_set(&got)
    );
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
    let b = broker().await;
    let mut sub = Device::connect(options("sub", &b)).await;
    sub.subscribe("o/+", QoS::AtMostOnce).await;
    sub.subscribe("o/#", QoS::AtLeastOnce).await;
    let mut publisher = Device::connect(options("pub", &b)).await;
    publisher
        .publish("o/x", QoS::AtLeastOnce, false, b"one")
        .await;
    publisher
        .publish("o/x", QoS::AtLeastOnce, false, b"end")
        .await;

    let got = sub.publishes_until("end").await;
    assert_eq!(payloads(&got), ["one"], "one copy per client, marker once");
    assert_eq!(got[0].qos, QoS::AtLeastOnce, "delivered at the higher QoS");
}

// QoS

#[tokio::test]
async fn suback_grants_the_requested_qos() {
    let b = broker().await;
    let mut sub = Device::connect(options("sub", &b)).await;
    assert_eq!(
        sub.subscribe("q/0", QoS::AtMostOnce).await,
        [SubscribeReasonCode::Success(QoS::AtMostOnce)]
    );
    assert_eq!(
        sub.subscribe("q/1", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    assert_eq!(
        sub.subscribe("q/2", QoS::ExactlyOnce).await,
        [SubscribeReasonCode::Success(QoS::ExactlyOnce)],
        "QoS 2 is granted, and delivered at QoS 2 (see qos2_end_to_end)"
    );
}

#[tokio::test]
async fn qos1_end_to_end_with_pubacks_and_downgrade_to_granted_qos() {
    let b = broker().await;
    let mut sub = Device::connect(options("sub", &b)).await;
    sub.subscribe("q/1", QoS::AtLeastOnce).await;
    sub.subscribe("q/0", QoS::AtMostOnce).await;
    let mut publisher = Device::connect(options("pub", &b)).await;

    // `publish` asserts the broker's PUBACK; rumqttc acks the delivery to the subscriber.
    publisher
        .publish("q/1", QoS::AtLeastOnce, false, b"one")
        .await;
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), payload_str(&p).as_str(), p.qos),
        ("q/1", "one", QoS::AtLeastOnce)
    );

    publisher
        .publish("q/0", QoS::AtLeastOnce, false, b"zero")
        .await;
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), payload_str(&p).as_str(), p.qos),
        ("q/0", "zero", QoS::AtMostOnce),
        "delivered at min(published QoS, granted QoS)"
    );
}

#[tokio::test]
async fn qos2_publish_is_completed_and_delivered_once() {
    let b = broker().await;
    let mut sub = Device::connect(options("sub", &b)).await;
    sub.subscribe("q/2", QoS::AtLeastOnce).await;
    let mut publisher = Device::connect(options("pub", &b)).await;
    // Asserts PUBREC and PUBCOMP; rumqttc sends the PUBREL in between.
    publisher
        .publish("q/2", QoS::ExactlyOnce, false, b"two")
        .await;
    publisher
        .publish("q/2", QoS::AtLeastOnce, false, b"end")
        .await;
    let got = sub.publishes_until("end").await;
    assert_eq!(payloads(&got), ["two"], "the QoS 2 message arrives once");
    assert_eq!(got[0].qos, QoS::AtLeastOnce, "at the subscription's QoS 1");
}

#[tokio::test]
async fn qos2_end_to_end_to_a_qos2_subscriber() {
    // A window of one: the second message goes out only once the first one's PUBREC, PUBREL
    // and PUBCOMP exchange is complete.
    let b = start_broker(|o| o.max_inflight = 1).await;
    let mut sub = Device::connect(options("sub", &b)).await;
    sub.subscribe("q/2", QoS::ExactlyOnce).await;
    let mut publisher = Device::connect(options("pub", &b)).await;
    for payload in [&b"first"[..], b"second"] {
        publisher
            .publish("q/2", QoS::ExactlyOnce, false, payload)
            .await;
    }
    publisher
        .publish("q/2", QoS::AtLeastOnce, false, b"end")
        .await;
    // rumqttc answers each QoS 2 delivery with PUBREC and the broker's PUBREL with PUBCOMP.
    let got = sub.publishes_until("end").await;
    assert_eq!(payloads(&got), ["first", "second"]);
    assert!(got.iter().all(|p| p.qos == QoS::ExactlyOnce), "{got:?}");
}

// Retained messages

#[tokio::test]
async fn retained_message_reaches_later_exact_and_wildcard_subscribers() {
    let b = broker().await;
    let mut publisher = Device::connect(options("pub", &b)).await;
    publisher
        .publish("ret/a", QoS::AtLeastOnce, true, b"v1")
        .await;

    for (id, filter) in [
        ("sub-exact", "ret/a"),
        ("sub-plus", "ret/+"),
        ("sub-hash", "ret/#"),
    ] {
        let mut sub = Device::connect(options(id, &b)).await;
        sub.subscribe(filter, QoS::AtLeastOnce).await;
        let p = sub.next_publish().await;
        assert_eq!(
            (p.topic.as_str(), payload_str(&p).as_str(), p.retain),
            ("ret/a", "v1", true),
            "{filter}: the retained message with the retain flag"
        );
    }
}

#[tokio::test]
async fn newer_retained_message_replaces_the_older() {
    let b = broker().await;
    let mut publisher = Device::connect(options("pub", &b)).await;
    publisher
        .publish("ret/a", QoS::AtLeastOnce, true, b"v1")
        .await;
    publisher
        .publish("ret/a", QoS::AtLeastOnce, true, b"v2")
        .await;

    let mut sub = Device::connect(options("sub", &b)).await;
    sub.subscribe("ret/#", QoS::AtLeastOnce).await;
    publisher
        .publish("ret/a", QoS::AtLeastOnce, false, b"end")
        .await;
    let got = sub.publishes_until("end").await;
    assert_eq!(payloads(&got), ["v2"], "only the newest retained message");
    assert!(got[0].retain);
}

#[tokio::test]
async fn empty_retained_payload_clears_the_retained_message() {
    let b = broker().await;
    let mut publisher = Device::connect(options("pub", &b)).await;
    publisher
        .publish("ret/a", QoS::AtLeastOnce, true, b"v1")
        .await;
    publisher
        .publish("ret/a", QoS::AtLeastOnce, true, b"")
        .await;

    let mut sub = Device::connect(options("sub", &b)).await;
    sub.subscribe("ret/a", QoS::AtLeastOnce).await;
    publisher
        .publish("ret/a", QoS::AtLeastOnce, false, b"end")
        .await;
    let got = sub.publishes_until("end").await;
    assert!(
        got.is_empty(),
        "nothing retained after an empty retained publish: {:?}",
        payloads(&got)
    );
}

// Sessions

#[tokio::test]
async fn persistent_session_receives_messages_published_while_offline() {
    let b = broker().await;
    let mut sub = Device::connect(persistent("sess-1", &b)).await;
    assert!(!sub.session_present, "a new client id has no session");
    sub.subscribe("sess/x", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let mut publisher = Device::connect(options("pub", &b)).await;
    for m in ["m1", "m2", "m3"] {
        publisher
            .publish("sess/x", QoS::AtLeastOnce, false, m.as_bytes())
            .await;
    }

    let mut sub = Device::connect(persistent("sess-1", &b)).await;
    assert!(sub.session_present, "CONNACK says the session was kept");
    // No new SUBSCRIBE: the subscription is part of the session.
    publisher
        .publish("sess/x", QoS::AtLeastOnce, false, b"end")
        .await;
    assert_eq!(
        payloads(&sub.publishes_until("end").await),
        ["m1", "m2", "m3"]
    );
}

#[tokio::test]
async fn clean_session_does_not_keep_messages_or_subscriptions() {
    let b = broker().await;
    let mut sub = Device::connect(options("clean-1", &b)).await;
    sub.subscribe("sess/y", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let mut publisher = Device::connect(options("pub", &b)).await;
    publisher
        .publish("sess/y", QoS::AtLeastOnce, false, b"lost")
        .await;

    let mut sub = Device::connect(options("clean-1", &b)).await;
    assert!(!sub.session_present, "clean session: no session present");
    sub.subscribe("sess/y", QoS::AtLeastOnce).await;
    publisher
        .publish("sess/y", QoS::AtLeastOnce, false, b"end")
        .await;
    let got = sub.publishes_until("end").await;
    assert!(
        got.is_empty(),
        "messages published while a clean session was offline are dropped: {:?}",
        payloads(&got)
    );
}

#[tokio::test]
async fn unacknowledged_qos1_messages_are_redelivered_with_dup_after_reconnect() {
    let b = broker().await;
    let mut sub = Device::connect(persistent_manual_acks("redeliver-1", &b)).await;
    sub.subscribe("rd/x", QoS::AtLeastOnce).await;
    let mut publisher = Device::connect(options("pub", &b)).await;
    for m in ["r1", "r2", "r3"] {
        publisher
            .publish("rd/x", QoS::AtLeastOnce, false, m.as_bytes())
            .await;
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(sub.next_publish().await);
    }
    assert_eq!(payloads(&first), ["r1", "r2", "r3"]);
    assert!(first.iter().all(|p| !p.dup), "first delivery has DUP=0");
    sub.drop_connection();

    let mut sub = Device::connect(persistent_manual_acks("redeliver-1", &b)).await;
    assert!(sub.session_present);
    let mut again = Vec::new();
    for _ in 0..3 {
        again.push(sub.next_publish().await);
    }
    assert_eq!(payloads(&again), ["r1", "r2", "r3"], "same messages again");
    for p in &again {
        sub.client.ack(p).await.expect("ack request");
    }

    // Acknowledged now: a further reconnect gets nothing but the marker.
    sub.disconnect().await;
    let mut sub = Device::connect(persistent("redeliver-1", &b)).await;
    assert!(sub.session_present);
    publisher
        .publish("rd/x", QoS::AtLeastOnce, false, b"end")
        .await;
    let got = sub.publishes_until("end").await;
    assert!(
        got.is_empty(),
        "acknowledged messages are not redelivered: {:?}",
        payloads(&got)
    );

    assert!(
        again.iter().all(|p| p.dup),
        "a redelivered PUBLISH carries DUP=1: {:?}",
        again.iter().map(|p| p.dup).collect::<Vec<_>>()
    );
}

// In-flight window

#[tokio::test]
async fn inflight_window_holds_back_messages_until_acked() {
    const WINDOW: usize = 5;
    const SENT: usize = 12;
    let b = start_broker(|o| o.max_inflight = WINDOW).await;
    let mut opts = options("slow", &b);
    opts.set_manual_acks(true);
    let mut sub = Device::connect(opts).await;
    sub.subscribe("if/x", QoS::AtLeastOnce).await;
    let mut publisher = Device::connect(options("pub", &b)).await;
    for i in 0..SENT {
        publisher
            .publish("if/x", QoS::AtLeastOnce, false, i.to_string().as_bytes())
            .await;
    }

    let mut got = Vec::new();
    for _ in 0..WINDOW {
        got.push(sub.next_publish().await);
    }
    // The window is full: a sixth message must wait for an ack.
    let extra = sub
        .next_matching(GRACE * 2, |s| matches!(s, Seen::Packet(Packet::Publish(_))))
        .await;
    assert!(
        extra.is_none(),
        "more than {WINDOW} unacknowledged messages in flight: {extra:?}"
    );

    sub.client.ack(&got[0]).await.expect("ack request");
    got.push(sub.next_publish().await);
    let mut acked = 1;
    while got.len() < SENT {
        while acked < got.len() {
            sub.client.ack(&got[acked]).await.expect("ack request");
            acked += 1;
        }
        got.push(sub.next_publish().await);
    }
    let expected: Vec<String> = (0..SENT).map(|i| i.to_string()).collect();
    assert_eq!(payloads(&got), expected, "all delivered, in order");
}

// Takeover

#[tokio::test]
async fn second_connection_with_the_same_client_id_takes_over() {
    let b = broker().await;
    let mut first = Device::connect(options("twin", &b)).await;
    first.subscribe("tw/x", QoS::AtLeastOnce).await;
    let mut second = Device::connect(options("twin", &b)).await;
    assert!(
        first.wait_closed(WAIT).await.is_some(),
        "the first connection is closed by the takeover"
    );
    second.subscribe("tw/x", QoS::AtLeastOnce).await;
    second
        .publish("tw/x", QoS::AtLeastOnce, false, b"hello")
        .await;
    assert_eq!(payload_str(&second.next_publish().await), "hello");
}

// Last will

#[tokio::test]
async fn will_is_published_when_the_connection_drops() {
    let b = broker().await;
    let mut sub = Device::connect(options("watcher", &b)).await;
    sub.subscribe("will/#", QoS::AtLeastOnce).await;
    let mut opts = options("mortal", &b);
    opts.set_last_will(LastWill::new(
        "will/mortal",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let device = Device::connect(opts).await;
    device.drop_connection();
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), payload_str(&p).as_str()),
        ("will/mortal", "gone")
    );
}

#[tokio::test]
async fn will_is_not_published_after_disconnect() {
    let b = broker().await;
    let mut sub = Device::connect(options("watcher", &b)).await;
    sub.subscribe("will/#", QoS::AtLeastOnce).await;
    let mut opts = options("polite", &b);
    opts.set_last_will(LastWill::new(
        "will/polite",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    Device::connect(opts).await.disconnect().await;
    let mut publisher = Device::connect(options("pub", &b)).await;
    publisher
        .publish("will/marker", QoS::AtLeastOnce, false, b"end")
        .await;
    let got = sub.publishes_until("end").await;
    assert!(
        got.is_empty(),
        "no will after DISCONNECT: {:?}",
        received_set(&got)
    );
}

// Keep-alive

#[tokio::test]
async fn silent_client_is_disconnected_after_its_keep_alive() {
    let b = broker().await;
    let mut stream = timeout(WAIT, TcpStream::connect(b.listen_addr()))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect");
    timeout(WAIT, stream.write_all(&raw_connect("silent", 1)))
        .await
        .expect("CONNECT written in time")
        .expect("write CONNECT");
    let mut connack = [0u8; 4];
    timeout(WAIT, stream.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("read CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "accepting CONNACK");

    let start = Instant::now();
    let deadline = start + Duration::from_secs(5);
    let mut buf = [0u8; 64];
    let closed = loop {
        match timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => continue,
            Err(_) => break false,
        }
    };
    let elapsed = start.elapsed();
    assert!(
        closed,
        "a client silent past 1.5 x keep-alive (1 s) is still connected after 5 s"
    );
    // The client is entitled to its keep-alive period of silence.
    assert!(
        elapsed >= Duration::from_millis(900),
        "disconnected after {elapsed:?}, before the 1 s keep-alive ran out"
    );
    println!("keep-alive 1 s: disconnected after {elapsed:?}");
}

// Packet size limit

#[tokio::test]
async fn oversize_publish_closes_only_that_connection() {
    const LIMIT: usize = 4096;
    let b = start_broker(|o| o.max_packet_bytes = LIMIT).await;
    let mut sub = Device::connect(options("sub", &b)).await;
    sub.subscribe("big/#", QoS::AtLeastOnce).await;
    let mut offender = Device::connect(options("offender", &b)).await;
    offender
        .client
        .publish("big/x", QoS::AtLeastOnce, false, vec![b'x'; 2 * LIMIT])
        .await
        .expect("publish request");
    let outcome = offender
        .next_matching(WAIT, |s| {
            matches!(s, Seen::Packet(Packet::PubAck(_)) | Seen::Closed(_))
        })
        .await;
    assert!(
        matches!(outcome, Some(Seen::Closed(_))),
        "a {} byte publish over the {LIMIT} byte limit closes the connection, got {outcome:?}",
        2 * LIMIT
    );

    let mut publisher = Device::connect(options("pub", &b)).await;
    publisher
        .publish("big/x", QoS::AtLeastOnce, false, b"small")
        .await;
    let got = sub.publishes_until("small").await;
    assert!(
        got.is_empty(),
        "the oversize message is not delivered: {} messages",
        got.len()
    );
}

// Connection storm

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_storm_of_2000_clients_all_connect_and_subscribe() {
    let clients = usize::try_from(common::env_or("BROKER_STORM_CLIENTS", 2000)).unwrap_or(2000);
    let limit = Duration::from_secs(60);
    let b = start_broker(|o| o.max_connections = clients + 10).await;
    let addr = b.listen_addr();
    let start = Instant::now();
    let deadline = start + limit;

    let tasks: Vec<JoinHandle<Result<Device, String>>> = (0..clients)
        .map(|i| {
            let mut opts =
                MqttOptions::new(format!("storm-{i}"), addr.ip().to_string(), addr.port());
            opts.set_keep_alive(Duration::from_secs(60));
            tokio::spawn(async move {
                let mut d = Device::try_connect_within(opts, limit).await?;
                d.client
                    .subscribe(format!("storm/{i}"), QoS::AtLeastOnce)
                    .await
                    .map_err(|e| format!("subscribe request: {e}"))?;
                let left = deadline.saturating_duration_since(Instant::now());
                match d
                    .next_matching(left, |s| {
                        matches!(s, Seen::Packet(Packet::SubAck(_)) | Seen::Closed(_))
                    })
                    .await
                {
                    Some(Seen::Packet(Packet::SubAck(a)))
                        if a.return_codes == [SubscribeReasonCode::Success(QoS::AtLeastOnce)] =>
                    {
                        Ok(d)
                    }
                    other => Err(format!("no granting SUBACK: {other:?}")),
                }
            })
        })
        .collect();

    let mut devices = Vec::with_capacity(clients);
    let mut failures = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match timeout_at(deadline, task).await {
            Ok(Ok(Ok(d))) => devices.push(d),
            Ok(Ok(Err(e))) => failures.push(format!("storm-{i}: {e}")),
            Ok(Err(e)) => failures.push(format!("storm-{i}: task failed: {e}")),
            Err(_) => failures.push(format!("storm-{i}: not done within {limit:?}")),
        }
    }
    let elapsed = start.elapsed();
    println!(
        "connection storm: {} of {clients} clients connected and subscribed in {elapsed:?}",
        devices.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {clients} clients failed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // With every connection still open, routing still reaches the last subscriber.
    let last = clients - 1;
    let topic = format!("storm/{last}");
    devices[0]
        .publish(&topic, QoS::AtLeastOnce, false, b"ping")
        .await;
    assert_eq!(payload_str(&devices[last].next_publish().await), "ping");
}

// Unsubscribe

#[tokio::test]
async fn unsubscribe_is_acknowledged_and_stops_delivery() {
    let b = broker().await;
    let mut sub = Device::connect(options("sub", &b)).await;
    sub.subscribe("un/x", QoS::AtLeastOnce).await;
    sub.subscribe("un/marker", QoS::AtLeastOnce).await;
    let mut publisher = Device::connect(options("pub", &b)).await;
    publisher
        .publish("un/x", QoS::AtLeastOnce, false, b"before")
        .await;
    assert_eq!(payload_str(&sub.next_publish().await), "before");

    sub.unsubscribe("un/x").await;
    publisher
        .publish("un/x", QoS::AtLeastOnce, false, b"after")
        .await;
    publisher
        .publish("un/marker", QoS::AtLeastOnce, false, b"end")
        .await;
    let got = sub.publishes_until("end").await;
    assert!(
        got.is_empty(),
        "nothing after UNSUBSCRIBE: {:?}",
        received_set(&got)
    );
}

// MQTT 5

#[tokio::test]
async fn mqtt5_client_connects_subscribes_and_receives_qos1() {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as V5SubCode;
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as V5Code, Packet as V5Packet};
    use rumqttc::v5::mqttbytes::QoS as V5QoS;
    use rumqttc::v5::{
        AsyncClient as V5Client, Event as V5Event, EventLoop, MqttOptions as V5Opts,
    };

    /// Polls until a packet satisfies `pred`, within [`WAIT`].
    async fn next_v5(
        eventloop: &mut EventLoop,
        what: &str,
        pred: impl Fn(&V5Packet) -> bool,
    ) -> V5Packet {
        let deadline = Instant::now() + WAIT;
        loop {
            match timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(V5Event::Incoming(p))) if pred(&p) => return p,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("MQTT 5 client: connection failed waiting for {what}: {e}"),
                Err(_) => panic!("MQTT 5 client: no {what} within {WAIT:?}"),
            }
        }
    }

    let b = broker().await;
    let addr = b.listen_addr();
    let mut opts = V5Opts::new("v5-device", addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = V5Client::new(opts, 16);

    match next_v5(&mut eventloop, "CONNACK", |p| {
        matches!(p, V5Packet::ConnAck(_))
    })
    .await
    {
        V5Packet::ConnAck(a) => assert_eq!(a.code, V5Code::Success, "CONNACK accepts"),
        _ => unreachable!("filtered to ConnAck"),
    }

    client
        .subscribe("v5/x", V5QoS::AtLeastOnce)
        .await
        .expect("subscribe request");
    match next_v5(&mut eventloop, "SUBACK", |p| {
        matches!(p, V5Packet::SubAck(_))
    })
    .await
    {
        V5Packet::SubAck(a) => {
            assert_eq!(a.return_codes, [V5SubCode::Success(V5QoS::AtLeastOnce)])
        }
        _ => unreachable!("filtered to SubAck"),
    }

    client
        .publish("v5/x", V5QoS::AtLeastOnce, false, b"hello v5".to_vec())
        .await
        .expect("publish request");
    let (mut puback, mut received) = (false, None);
    while !puback || received.is_none() {
        match next_v5(&mut eventloop, "PUBACK and the message", |p| {
            matches!(p, V5Packet::PubAck(_) | V5Packet::Publish(_))
        })
        .await
        {
            V5Packet::PubAck(_) => puback = true,
            V5Packet::Publish(p) => received = Some(p),
            _ => unreachable!("filtered to PubAck or Publish"),
        }
    }
    let p = received.expect("loop ends with a message");
    assert_eq!(
        (p.topic.as_ref(), p.payload.as_ref(), p.qos),
        (&b"v5/x"[..], &b"hello v5"[..], V5QoS::AtLeastOnce)
    );
}
