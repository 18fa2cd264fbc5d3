//! One test per assumption of `client_ext` about rumqttc's internals: a real rumqttc event
//! loop against a peer on 127.0.0.1 that speaks our own `wire` codec.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, Incoming, MqttOptions, Outgoing, PubAck, QoS, Subscribe,
};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::mqtt::stream::PacketStream;
use crate::mqtt::wire::{ClientPacket, ConnectOutcome, ServerFeatures, ServerPacket};

const WAIT: Duration = Duration::from_secs(5);

/// The broker side: accepts one connection at a time and answers its CONNECT.
struct Peer {
    listener: TcpListener,
}

type Connection = PacketStream<TcpStream>;

impl Peer {
    async fn bind() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self { listener }
    }

    fn port(&self) -> u16 {
        self.listener.local_addr().expect("local addr").port()
    }

    /// Accepts a connection and answers its CONNECT with a CONNACK.
    async fn accept(&self, session_present: bool) -> Connection {
        let (socket, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("a connection in time")
            .expect("accept");
        let mut conn = PacketStream::new(socket, 1 << 20, 4096);
        conn.read_connect().await.expect("CONNECT");
        send(
            &mut conn,
            &[ServerPacket::ConnAck {
                outcome: ConnectOutcome::Accepted,
                session_present,
                features: ServerFeatures::basic(true, 1 << 20),
                assigned_client_id: None,
                reason: None,
            }],
        )
        .await;
        conn
    }
}

async fn send(conn: &mut Connection, packets: &[ServerPacket<'_>]) {
    for packet in packets {
        conn.queue(packet.clone()).expect("encode");
    }
    conn.flush(WAIT).await.expect("flush to the client");
}

fn publish(pkid: u16) -> ServerPacket<'static> {
    ServerPacket::Publish {
        topic: "fleetgw/d/telemetry",
        qos: 1,
        pkid,
        retain: false,
        dup: false,
        payload: Bytes::from_static(b"m"),
        properties: None,
    }
}

async fn next_packet(conn: &mut Connection) -> ClientPacket {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(packet) = conn.next_packet().expect("decode") {
                return packet;
            }
            conn.fill().await.expect("read from the client");
        }
    })
    .await
    .expect("a packet from the client in time")
}

fn client(port: u16, inflight: u16) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new("client-ext-test", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(inflight);
    AsyncClient::new(opts, 16)
}

async fn poll(eventloop: &mut EventLoop) -> Result<Event, ConnectionError> {
    tokio::time::timeout(WAIT, eventloop.poll())
        .await
        .expect("the event loop answers in time")
}

/// Connects the event loop to `peer`; returns the peer's side of the connection.
async fn connect(peer: &Peer, eventloop: &mut EventLoop, session_present: bool) -> Connection {
    let (conn, connack) = tokio::join!(peer.accept(session_present), poll(eventloop));
    match connack {
        Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
            assert_eq!(ack.session_present, session_present)
        }
        other => panic!("expected a CONNACK, got {other:?}"),
    }
    conn
}

fn publish_ids(events: &[Event]) -> Vec<u16> {
    events
        .iter()
        .map(|e| match e {
            Event::Incoming(Incoming::Publish(p)) => p.pkid,
            other => panic!("expected a buffered PUBLISH, got {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn one_read_buffers_its_packets_and_poll_hands_out_one() {
    let peer = Peer::bind().await;
    let (_client, mut eventloop) = client(peer.port(), 10);
    let mut conn = connect(&peer, &mut eventloop, false).await;
    send(&mut conn, &[publish(1), publish(2), publish(3)]).await;
    match poll(&mut eventloop).await {
        Ok(Event::Incoming(Incoming::Publish(p))) => assert_eq!(p.pkid, 1),
        other => panic!("expected the first PUBLISH, got {other:?}"),
    }
    assert_eq!(publish_ids(&take_buffered_events(&mut eventloop)), [2, 3]);
}

#[tokio::test]
async fn a_read_that_ends_in_an_error_leaves_its_packets_buffered() {
    let peer = Peer::bind().await;
    let (_client, mut eventloop) = client(peer.port(), 10);
    let mut conn = connect(&peer, &mut eventloop, false).await;
    // Packets and the close are in the client's socket before it reads: one read takes both.
    send(&mut conn, &[publish(1), publish(2), publish(3)]).await;
    conn.shutdown().await;
    let polled = poll(&mut eventloop).await;
    assert!(polled.is_err(), "the read ends in an error: {polled:?}");
    assert_eq!(
        publish_ids(&take_buffered_events(&mut eventloop)),
        [1, 2, 3]
    );
}

#[tokio::test]
async fn a_request_sent_first_is_the_first_packet_after_the_connack() {
    let peer = Peer::bind().await;
    let (client, mut eventloop) = client(peer.port(), 10);
    client
        .try_publish("queued", QoS::AtLeastOnce, false, b"x".to_vec())
        .expect("queue a publish");
    let mut conn = connect(&peer, &mut eventloop, false).await;
    send_first(
        &mut eventloop,
        Request::Subscribe(Subscribe::new("first", QoS::AtLeastOnce)),
    );
    for _ in 0..2 {
        assert!(matches!(poll(&mut eventloop).await, Ok(Event::Outgoing(_))));
    }
    assert!(matches!(
        next_packet(&mut conn).await,
        ClientPacket::Subscribe { .. }
    ));
    assert!(matches!(
        next_packet(&mut conn).await,
        ClientPacket::Publish { topic, .. } if topic == "queued"
    ));
}

fn pending_topics(eventloop: &EventLoop) -> Vec<String> {
    eventloop
        .pending
        .iter()
        .map(|r| match r {
            Request::Publish(p) => p.topic.clone(),
            other => panic!("expected only publishes pending, got {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn a_lost_connection_moves_publishes_to_pending_but_not_acks() {
    let peer = Peer::bind().await;
    let (client, mut eventloop) = client(peer.port(), 10);
    let mut conn = connect(&peer, &mut eventloop, false).await;
    client
        .try_publish("a", QoS::AtLeastOnce, false, b"x".to_vec())
        .expect("queue a publish");
    assert!(matches!(
        poll(&mut eventloop).await,
        Ok(Event::Outgoing(Outgoing::Publish(1)))
    ));
    assert!(matches!(
        next_packet(&mut conn).await,
        ClientPacket::Publish { .. }
    ));
    drop(conn);
    assert!(poll(&mut eventloop).await.is_err());
    // An ack and a publish that reach the channel after the loss.
    client
        .try_publish("b", QoS::AtLeastOnce, false, b"x".to_vec())
        .expect("queue a publish");
    let mut inbound = rumqttc::Publish::new("t", QoS::AtLeastOnce, Vec::new());
    inbound.pkid = 9;
    client.try_ack(&inbound).expect("queue an ack");
    move_requests_to_pending(&mut eventloop);
    assert_eq!(pending_topics(&eventloop), ["a", "b"]);

    // A resumed session sends them first, in order.
    let mut conn = connect(&peer, &mut eventloop, true).await;
    for _ in 0..2 {
        assert!(matches!(
            poll(&mut eventloop).await,
            Ok(Event::Outgoing(Outgoing::Publish(_)))
        ));
    }
    for topic in ["a", "b"] {
        match next_packet(&mut conn).await {
            ClientPacket::Publish { topic: t, .. } => assert_eq!(t, topic),
            other => panic!("expected a PUBLISH to {topic}, got {other:?}"),
        }
    }

    // A new session clears them.
    drop(conn);
    assert!(poll(&mut eventloop).await.is_err());
    assert_eq!(pending_topics(&eventloop), ["a", "b"]);
    let _conn = connect(&peer, &mut eventloop, false).await;
    assert!(eventloop.pending.is_empty());
}

#[tokio::test]
async fn packets_written_directly_reach_the_peer_only_while_connected() {
    let peer = Peer::bind().await;
    let (_client, mut eventloop) = client(peer.port(), 10);
    assert!(direct_writer(&mut eventloop).is_none(), "not connected yet");
    let mut conn = connect(&peer, &mut eventloop, false).await;
    let mut writer = direct_writer(&mut eventloop).expect("connected");
    writer
        .write(Packet::PubAck(PubAck::new(7)))
        .await
        .expect("write");
    writer.write(Packet::PingReq).await.expect("write");
    writer.flush().await.expect("flush");
    assert_eq!(next_packet(&mut conn).await, ClientPacket::PubAck(7));
    assert_eq!(next_packet(&mut conn).await, ClientPacket::PingReq);
    // The answer to a ping rumqttc did not send is taken like one to its own.
    send(&mut conn, &[ServerPacket::PingResp]).await;
    assert_eq!(
        poll(&mut eventloop).await.ok(),
        Some(Event::Incoming(Incoming::PingResp))
    );
    drop(conn);
    assert!(poll(&mut eventloop).await.is_err());
    assert!(direct_writer(&mut eventloop).is_none(), "connection lost");
}

#[tokio::test]
async fn the_network_timeout_bounds_a_connection_attempt() {
    let peer = Peer::bind().await;
    let (_client, mut eventloop) = client(peer.port(), 10);
    set_connect_timeout(&mut eventloop, Duration::from_millis(300));
    assert_eq!(network_timeout(&eventloop), Duration::from_secs(1));
    // The peer accepts the TCP connection but never answers the CONNECT.
    let (accepted, polled) = tokio::join!(peer.listener.accept(), poll(&mut eventloop));
    assert!(accepted.is_ok());
    assert!(matches!(polled, Err(ConnectionError::NetworkTimeout)));
}
