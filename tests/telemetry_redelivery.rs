//! Duplicates after a downstream reconnect: the gateway session must not turn one lost
//! connection into a redelivery storm.
//!
//! The embedded broker sends the gateway session up to `max_inflight` (100) unacknowledged
//! telemetry messages. When that connection drops while some of them are still unread in the
//! socket, rumqttc parses them in the same read that hits the end of the stream and used to hand
//! them out only after the *next* CONNACK. Those messages belong to the dead connection: the
//! broker redelivers them (rumqttd, the embedded broker when this was found, with new packet ids
//! and DUP=0), and a PUBACK carrying their old packet id on the new connection was an
//! out-of-order ack to rumqttd, which dropped the connection again, with more messages in
//! flight, and so on. Each round appended the same messages to the outbox once more; in one
//! benchmark run a single device got 15,841 duplicates that way.
//!
//! Two tests force the condition:
//! - a scripted broker on a raw socket sends three PUBLISHes and a server DISCONNECT in one
//!   write (deterministic: rumqttc parses all four in one read), then, on the resumed session,
//!   redelivers the three as rumqttd did (new packet ids, DUP=0). Only PUBACKs for packet ids
//!   of the new connection may come back, and each message reaches the consumer at most twice;
//! - against the real embedded broker behind a TCP relay, a 4-message consumer channel that
//!   nobody reads keeps the session from draining its socket, the connection is cut, then
//!   everything is consumed and acknowledged. Repeated cuts: each must cost one reconnect and
//!   at most one redelivery per message, never a storm. Its shutdown, right behind a burst
//!   of acks that fills rumqttc's request channel, must still stop the session by itself.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::mqtt_client::{options, TestClient};
use common::relay::relayed_embedded_broker;
use common::wait::eventually;
use common::WAIT;
use fleetgw::downstream::{
    AckOutcome, BrokerEndpoint, DeviceTopic, DownstreamSession, Inbound, QoS, SessionOptions,
    TopicPrefix,
};
use tokio::time::{timeout, Instant};

/// The embedded broker's in-flight window towards one client.
const BROKER_WINDOW: usize = 100;
/// Messages the device publishes per round (more than a broker window).
const PER_ROUND: u64 = 150;
/// Connection cuts.
const ROUNDS: u64 = 5;

fn seq_of(payload: &[u8]) -> u64 {
    std::str::from_utf8(payload).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cut_of_the_embedded_broker_connection_costs_one_reconnect_and_one_redelivery_at_most()
{
    let (broker, relay, mut dopts) =
        relayed_embedded_broker(BROKER_WINDOW, "fleetgw-redelivery-test").await;
    dopts.inbound = Inbound {
        provision: false,
        telemetry: true,
    };
    let mut sopts = dopts.session_options(Some(relay.addr())).unwrap();
    // Far below the broker's window: the session stops reading its socket while the broker
    // still has messages on the way, so some are unread when the connection is cut.
    sopts.inbound_capacity = 4;
    sopts.reconnect_min = Duration::from_millis(20);
    sopts.reconnect_max = Duration::from_millis(100);
    let (session, mut rx) = DownstreamSession::start(sopts).unwrap();
    session.wait_subscribed(WAIT).await.unwrap();
    let mut status = session.watch_status();

    let port = broker.listen_addr().port();
    let mut device = TestClient::connect_ok(options("dev-sensor-1", port)).await;
    let topic = "fleetgw/sensor-1/telemetry";
    let mut deliveries: HashMap<u64, usize> = HashMap::new();
    for round in 0..ROUNDS {
        let range = round * PER_ROUND..(round + 1) * PER_ROUND;
        for n in range.clone() {
            device
                .publish(topic, QoS::AtLeastOnce, false, n.to_string().as_bytes())
                .await;
        }
        // Every message is with the broker; the consumer channel is full.
        eventually("the consumer channel to fill", WAIT, || {
            (rx.len() >= 4).then_some(())
        })
        .await;
        let before = session.status().connections;
        relay.sever();
        // Read on without acking until the session noticed the loss, so nothing is written to
        // the dead socket and the loss shows up in a read (as when a broker drops a client).
        let mut held = Vec::new();
        let deadline = Instant::now() + WAIT;
        while status.borrow().connected && status.borrow().connections == before {
            tokio::select! {
                m = rx.recv() => held.push(m.expect("session running")),
                _ = status.changed() => {}
                _ = tokio::time::sleep_until(deadline) => panic!("the cut was not noticed"),
            }
        }
        for m in held {
            *deliveries.entry(seq_of(&m.payload)).or_default() += 1;
            m.ack.ack();
        }
        // Consume and ack everything as it comes (as the intake does once it is durable), up
        // to an end marker published after this round's messages.
        let marker = format!("end-{round}");
        device
            .publish(topic, QoS::AtLeastOnce, false, marker.as_bytes())
            .await;
        loop {
            let m = timeout(Duration::from_secs(30), rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "round {round}: no end marker; {} connections",
                        session.status().connections
                    )
                })
                .expect("session running");
            let end = m.payload[..] == *marker.as_bytes();
            if !end && !m.payload.starts_with(b"end-") {
                *deliveries.entry(seq_of(&m.payload)).or_default() += 1;
            }
            m.ack.ack();
            if end {
                break;
            }
        }
        let round_dups: usize = range
            .clone()
            .map(|n| deliveries.get(&n).copied().unwrap_or(0).saturating_sub(1))
            .sum();
        let connections = session.status().connections;
        eprintln!("round {round}: duplicates={round_dups} connections={connections}");
        for n in range {
            let d = deliveries.get(&n).copied().unwrap_or(0);
            assert!(
                (1..=2).contains(&d),
                "round {round}: message {n} delivered {d} times ({connections} connections)"
            );
        }
        assert_eq!(
            connections,
            before + 1,
            "round {round}: one cut must cost one reconnect ({round_dups} duplicates)"
        );
        assert!(
            round_dups <= BROKER_WINDOW,
            "round {round}: {round_dups} duplicates exceed the broker's window {BROKER_WINDOW}"
        );
    }
    // Right behind a burst of acks: the DISCONNECT must still get through, so the session
    // stops by itself instead of being aborted after the wait.
    let stopping = Instant::now();
    session.shutdown(WAIT).await;
    assert!(
        stopping.elapsed() < WAIT && !session.status().connected,
        "the session did not stop by itself: {:?}",
        session.status()
    );
    // Nothing was redelivered late: every copy came before the last end marker.
    if let Ok(m) = rx.try_recv() {
        panic!(
            "{:?} delivered after the last end marker",
            String::from_utf8_lossy(&m.payload)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A scripted MQTT 3.1.1 broker on a raw socket.

/// Reads one MQTT packet: (first header byte, body).
async fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let first = s.read_u8().await.ok()?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await.ok()?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.ok()?;
    Some((first, body))
}

/// Reads packets until one of type `kind` (high nibble) comes; answers PINGREQs on the way.
async fn expect_packet(s: &mut TcpStream, kind: u8) -> Vec<u8> {
    loop {
        let (first, body) = timeout(WAIT, read_packet(s))
            .await
            .expect("packet from the gateway in time")
            .expect("gateway connection open");
        match first >> 4 {
            k if k == kind => return body,
            12 => s.write_all(&[0xd0, 0x00]).await.unwrap(),
            other => panic!("expected packet type {kind}, got {other} ({body:?})"),
        }
    }
}

fn publish_packet(topic: &str, pkid: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
    let len = 2 + topic.len() + 2 + payload.len();
    assert!(len < 128, "one length byte");
    let mut p = vec![0x32 | if dup { 0x08 } else { 0 }, len as u8];
    p.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    p.extend_from_slice(topic.as_bytes());
    p.extend_from_slice(&pkid.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// CONNECT -> CONNACK(session_present) -> SUBSCRIBE -> SUBACK (one granted filter).
async fn accept_session(listener: &TcpListener, session_present: bool) -> TcpStream {
    let (mut s, _) = timeout(WAIT, listener.accept())
        .await
        .expect("gateway connects in time")
        .unwrap();
    expect_packet(&mut s, 1).await;
    s.write_all(&[0x20, 0x02, u8::from(session_present), 0x00])
        .await
        .unwrap();
    let sub = expect_packet(&mut s, 8).await;
    s.write_all(&[0x90, 0x03, sub[0], sub[1], 0x01])
        .await
        .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_read_with_the_connection_loss_are_not_acknowledged_on_the_next_connection() {
    const TOPIC: &str = "fleetgw/sensor-1/telemetry";
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let endpoint = BrokerEndpoint {
        host: addr.ip().to_string(),
        port: addr.port(),
        tls: None,
        username: None,
        password: None,
    };
    let mut sopts =
        SessionOptions::new("fleetgw-scripted".into(), endpoint, TopicPrefix::default());
    sopts.inbound = Inbound {
        provision: false,
        telemetry: true,
    };
    sopts.reconnect_min = Duration::from_millis(20);
    sopts.reconnect_max = Duration::from_millis(100);
    let (session, mut rx) = DownstreamSession::start(sopts).unwrap();

    // Connection 1: three messages, then the broker ends the connection right behind them, in
    // the same write, so rumqttc parses all of it in one read that ends in an error.
    let mut first = accept_session(&listener, false).await;
    let mut burst = Vec::new();
    for (pkid, n) in [(41u16, b"0"), (42, b"1"), (43, b"2")] {
        burst.extend(publish_packet(TOPIC, pkid, false, n));
    }
    burst.extend_from_slice(&[0xe0, 0x00]);
    first.write_all(&burst).await.unwrap();
    drop(first);

    // Connection 2: the session is resumed and the broker redelivers what was not acked, with
    // new packet ids and DUP=0 (rumqttd's way).
    let mut second = accept_session(&listener, true).await;
    let mut redelivery = Vec::new();
    for (pkid, n) in [(1u16, b"0"), (2, b"1"), (3, b"2")] {
        redelivery.extend(publish_packet(TOPIC, pkid, false, n));
    }
    second.write_all(&redelivery).await.unwrap();

    let mut deliveries: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut outcomes = Vec::new();
    let mut acked = Vec::new();
    // The consumer acks everything it gets; the broker reads PUBACKs until it has one for each
    // redelivered message (those go out in order, after any earlier ones).
    while acked.len() < 3 {
        tokio::select! {
            m = rx.recv() => {
                let m = m.expect("session running");
                assert!(matches!(m.topic, DeviceTopic::Telemetry { .. }));
                *deliveries.entry(m.payload.to_vec()).or_default() += 1;
                outcomes.push(m.ack.ack());
            }
            p = timeout(WAIT, expect_packet(&mut second, 4)) => {
                let body = p.expect("PUBACKs for the redelivered messages");
                acked.push(u16::from_be_bytes([body[0], body[1]]));
            }
        }
    }
    assert_eq!(
        acked,
        [1, 2, 3],
        "PUBACKs on the new connection must name its own packet ids (outcomes {outcomes:?})"
    );
    assert_eq!(
        session.status().connections,
        2,
        "no reconnect after the first loss"
    );
    for n in [b"0", b"1", b"2"] {
        let d = deliveries.get(&n[..]).copied().unwrap_or(0);
        assert!(
            (1..=2).contains(&d),
            "message {:?} delivered {d} times",
            std::str::from_utf8(n).unwrap()
        );
    }
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == AckOutcome::Accepted)
            .count(),
        3,
        "only the redelivered copies are acknowledged: {outcomes:?}"
    );
    session.shutdown(WAIT).await;
}
