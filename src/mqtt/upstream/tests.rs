//! The client against a peer on 127.0.0.1 that speaks our server-side [`wire`] codec (and,
//! where a test needs what our servers never send, rumqttc's packet types directly), in both
//! protocol versions; and against hostile peers: refused CONNACK, garbage, an oversize packet,
//! acknowledgements for ids never used. Every failure must be a clean error.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5;
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::mqtt::props::MessageProperties;
use crate::mqtt::stream::PacketStream;
use crate::mqtt::wire::{
    self, ClientPacket, ConnectInfo, ConnectOutcome, Protocol, ServerFeatures, ServerPacket,
};

pub(super) const WAIT: Duration = Duration::from_secs(5);

struct Peer {
    listener: TcpListener,
}

pub(super) type PeerConn = PacketStream<TcpStream>;

impl Peer {
    async fn bind() -> Self {
        Self {
            listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        }
    }

    fn port(&self) -> u16 {
        self.listener.local_addr().expect("local addr").port()
    }

    /// Accepts one connection and reads its CONNECT (no answer yet).
    async fn accept(&self) -> (PeerConn, ConnectInfo) {
        let (socket, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("a connection in time")
            .expect("accept");
        let mut conn = PacketStream::new(socket, 1 << 20, 4096);
        let connect = tokio::time::timeout(WAIT, conn.read_connect())
            .await
            .expect("CONNECT in time")
            .expect("CONNECT");
        (conn, connect)
    }
}

fn options(version: MqttVersion) -> ConnectOptions {
    ConnectOptions {
        version,
        client_id: "thing-1".into(),
        login: Some(("user".into(), "token-1".into())),
        keep_alive: Duration::from_secs(30),
        connect_timeout: WAIT,
        write_timeout: WAIT,
        max_packet_in: 64 * 1024,
        receive_maximum: 10,
        attempts: None,
    }
}

async fn dial(port: u16, opts: ConnectOptions) -> Result<Connection, UpstreamError> {
    connect("127.0.0.1", port, &Transport::Tcp, &opts).await
}

pub(super) fn accepted(max_packet: u32) -> ServerPacket<'static> {
    ServerPacket::ConnAck {
        outcome: ConnectOutcome::Accepted,
        session_present: false,
        features: ServerFeatures::basic(false, max_packet),
        assigned_client_id: None,
        reason: None,
    }
}

pub(super) async fn send(conn: &mut PeerConn, packets: &[ServerPacket<'_>]) {
    for p in packets {
        conn.queue(p.clone()).expect("encode");
    }
    conn.flush(WAIT).await.expect("flush");
}

/// Writes raw bytes (a packet our servers never send, or garbage).
pub(super) async fn send_raw(socket: &mut PeerConn, bytes: &[u8]) {
    socket.write_raw(bytes).await.expect("write to the client");
}

pub(super) async fn next_packet(conn: &mut PeerConn) -> ClientPacket {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(p) = conn.next_packet().expect("decode") {
                return p;
            }
            conn.fill().await.expect("read from the client");
        }
    })
    .await
    .expect("a packet in time")
}

pub(super) async fn next_event(conn: &mut Connection) -> Result<ServerEvent, UpstreamError> {
    tokio::time::timeout(WAIT, conn.read_event())
        .await
        .expect("the client decides in time")
}

/// A connected pair: the peer accepted and answered with `connack`.
pub(super) async fn pair(
    version: MqttVersion,
    connack: &[u8],
) -> (Connection, PeerConn, ConnectInfo) {
    let peer = Peer::bind().await;
    let port = peer.port();
    let opts = options(version);
    let (client, server) = tokio::join!(dial(port, opts), async {
        let (mut conn, info) = peer.accept().await;
        send_raw(&mut conn, connack).await;
        (conn, info)
    });
    let (conn, info) = server;
    (client.expect("connected"), conn, info)
}

fn v5_connack(props: Option<v5::ConnAckProperties>) -> Vec<u8> {
    let mut out = BytesMut::new();
    v5::Packet::ConnAck(v5::ConnAck {
        session_present: false,
        code: v5::ConnectReturnCode::Success,
        properties: props,
    })
    .write(&mut out, None)
    .expect("encode");
    out.to_vec()
}

fn v5_limits(receive_max: Option<u16>, max_packet: Option<u32>) -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max,
        max_qos: None,
        retain_available: None,
        max_packet_size: max_packet,
        assigned_client_identifier: None,
        topic_alias_max: Some(8),
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

pub(super) fn encoded(protocol: Protocol, packet: ServerPacket<'_>) -> Vec<u8> {
    let mut out = BytesMut::new();
    wire::write_packet(protocol, packet, &mut out).expect("encode");
    out.to_vec()
}

fn props() -> MessageProperties {
    MessageProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: None,
        correlation_data: Some(Bytes::from_static(b"req-1")),
        user_properties: vec![("site".into(), "north".into()), ("a".into(), "1".into())],
    }
}

#[tokio::test]
async fn connects_and_keeps_publish_order_in_both_versions() {
    for (version, protocol) in [
        (MqttVersion::V4, Protocol::V4),
        (MqttVersion::V5, Protocol::V5),
    ] {
        let connack = encoded(protocol, accepted(1 << 20));
        let (mut client, mut peer, info) = pair(version, &connack).await;
        assert_eq!(info.protocol, protocol);
        assert_eq!(info.client_id, "thing-1");
        assert_eq!(info.username.as_deref(), Some("user"));
        assert!(info.clean_start, "a clean session every time");
        assert_eq!(info.keep_alive, 30);
        if version == MqttVersion::V5 {
            assert_eq!(info.receive_maximum, Some(10));
            assert_eq!(info.max_packet_size, Some(64 * 1024));
        }
        let payloads: Vec<Bytes> = (0..3).map(|i| Bytes::from(format!("m{i}"))).collect();
        let p = props();
        for (i, payload) in payloads.iter().enumerate() {
            let q = client
                .queue_publish(i as u16 + 1, "dt/thing-1/telemetry", payload, Some(&p))
                .expect("encode");
            assert_eq!(q, Queued::Yes);
        }
        client.flush().await.expect("flush");
        for (i, payload) in payloads.iter().enumerate() {
            match next_packet(&mut peer).await {
                ClientPacket::Publish {
                    topic,
                    qos,
                    pkid,
                    payload: got,
                    properties,
                    ..
                } => {
                    assert_eq!(
                        (topic.as_str(), qos, pkid),
                        ("dt/thing-1/telemetry", 1, i as u16 + 1)
                    );
                    assert_eq!(&got, payload);
                    match version {
                        MqttVersion::V5 => assert_eq!(properties.as_deref(), Some(&p)),
                        MqttVersion::V4 => assert_eq!(properties, None),
                    }
                }
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
        send(
            &mut peer,
            &[ServerPacket::PubAck(2), ServerPacket::PubAck(1)],
        )
        .await;
        assert_eq!(
            next_event(&mut client).await.unwrap(),
            ServerEvent::PubAck { pkid: 2, reason: 0 }
        );
        assert_eq!(
            next_event(&mut client).await.unwrap(),
            ServerEvent::PubAck { pkid: 1, reason: 0 }
        );
        client.disconnect().await;
        assert_eq!(
            next_packet(&mut peer).await,
            ClientPacket::Disconnect { with_will: false }
        );
    }
}

#[tokio::test]
async fn server_limits_are_kept_from_the_connack() {
    let connack = v5_connack(Some(v5_limits(Some(3), Some(200))));
    let (mut client, _peer, _) = pair(MqttVersion::V5, &connack).await;
    assert_eq!(client.server().receive_maximum, 3);
    assert_eq!(client.server().max_packet_size, Some(200));
    // A message whose packet exceeds the server's limit is not sent; a smaller one is.
    let big = Bytes::from(vec![b'x'; 300]);
    match client.queue_publish(1, "t", &big, None).unwrap() {
        Queued::TooLarge { size, limit } => assert!(size > 300 && limit == 200),
        Queued::Yes => panic!("a packet over the server's maximum was queued"),
    }
    let small = Bytes::from_static(b"ok");
    assert_eq!(
        client.queue_publish(1, "t", &small, None).unwrap(),
        Queued::Yes
    );
    // MQTT 3.1.1 has no limits to announce: the protocol's own.
    let connack = encoded(Protocol::V4, accepted(1 << 20));
    let (client, _peer, _) = pair(MqttVersion::V4, &connack).await;
    assert_eq!(client.server().receive_maximum, u16::MAX);
    assert_eq!(client.server().max_packet_size, None);
}

#[tokio::test]
async fn puback_failure_reason_codes_reach_the_link() {
    let connack = v5_connack(None);
    let (mut client, mut peer, _) = pair(MqttVersion::V5, &connack).await;
    let mut out = BytesMut::new();
    let mut refused = v5::PubAck::new(7, None);
    refused.reason = v5::PubAckReason::NotAuthorized;
    v5::Packet::PubAck(refused).write(&mut out, None).unwrap();
    let mut throttled = v5::PubAck::new(8, None);
    throttled.reason = v5::PubAckReason::QuotaExceeded;
    v5::Packet::PubAck(throttled).write(&mut out, None).unwrap();
    send_raw(&mut peer, &out).await;
    assert_eq!(
        next_event(&mut client).await.unwrap(),
        ServerEvent::PubAck {
            pkid: 7,
            reason: 0x87
        }
    );
    assert_eq!(
        next_event(&mut client).await.unwrap(),
        ServerEvent::PubAck {
            pkid: 8,
            reason: 0x97
        }
    );
    assert!(
        !is_transient_refusal(0x87),
        "not authorized comes back every time"
    );
    assert!(is_transient_refusal(0x97), "quota exceeded may pass");
}

#[tokio::test]
async fn acknowledgements_for_ids_never_used_fail_the_connection() {
    for (version, protocol) in [
        (MqttVersion::V4, Protocol::V4),
        (MqttVersion::V5, Protocol::V5),
    ] {
        let connack = encoded(protocol, accepted(1 << 20));
        let (mut client, mut peer, _) = pair(version, &connack).await;
        let mut window: Inflight<&str> = Inflight::default();
        let pkid = window.next_free().unwrap();
        client
            .queue_publish(pkid, "t", &Bytes::from_static(b"m"), None)
            .unwrap();
        window.insert(pkid, "m");
        client.flush().await.unwrap();
        assert!(matches!(
            next_packet(&mut peer).await,
            ClientPacket::Publish { .. }
        ));
        // The server acknowledges an id we never sent, then ours twice, then a SUBACK.
        send(
            &mut peer,
            &[
                ServerPacket::PubAck(pkid + 40),
                ServerPacket::PubAck(pkid),
                ServerPacket::PubAck(pkid),
                ServerPacket::SubAck {
                    pkid: 9,
                    granted: &[Ok(1)],
                    reason: None,
                },
            ],
        )
        .await;
        let mut verdicts = Vec::new();
        for _ in 0..4 {
            verdicts.push(match next_event(&mut client).await.unwrap() {
                ServerEvent::PubAck { pkid, .. } => window.ack(pkid).map(|_| ()),
                ServerEvent::SubAck { pkid, .. } => window.suback(pkid),
                other => panic!("{other:?}"),
            });
        }
        assert!(
            matches!(verdicts[0], Err(UpstreamError::Protocol(_))),
            "never sent"
        );
        assert!(verdicts[1].is_ok(), "ours");
        assert!(
            matches!(verdicts[2], Err(UpstreamError::Protocol(_))),
            "acknowledged twice"
        );
        assert!(
            matches!(verdicts[3], Err(UpstreamError::Protocol(_))),
            "no such SUBSCRIBE"
        );
        assert!(window.is_empty());
    }
}

#[tokio::test]
async fn keep_alive_pings_and_a_missing_pingresp_declares_the_connection_lost() {
    let peer = Peer::bind().await;
    let port = peer.port();
    let mut opts = options(MqttVersion::V5);
    opts.keep_alive = Duration::from_secs(1);
    let (client, server) = tokio::join!(dial(port, opts), async {
        let (mut conn, _) = peer.accept().await;
        send(&mut conn, &[accepted(1 << 20)]).await;
        conn
    });
    let (mut client, mut server) = (client.expect("connected"), server);
    // Drive the client as the link does: timers and reads until it gives up.
    let lost = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let at = client.next_timer().expect("a keep-alive timer");
            tokio::select! {
                e = client.read_event() => return e.err(),
                _ = tokio::time::sleep_until(at) => {
                    if let Err(e) = client.on_timer(tokio::time::Instant::now()) {
                        return Some(e);
                    }
                    client.flush().await.expect("flush");
                }
            }
        }
    })
    .await
    .expect("the client declares the loss within two keep-alives");
    assert!(
        matches!(lost, Some(UpstreamError::KeepAliveTimeout(_))),
        "{lost:?}"
    );
    assert_eq!(next_packet(&mut server).await, ClientPacket::PingReq);
}

#[tokio::test]
async fn a_pingresp_keeps_the_connection() {
    let peer = Peer::bind().await;
    let port = peer.port();
    let mut opts = options(MqttVersion::V4);
    opts.keep_alive = Duration::from_secs(1);
    let (client, server) = tokio::join!(dial(port, opts), async {
        let (mut conn, _) = peer.accept().await;
        send(&mut conn, &[accepted(1 << 20)]).await;
        conn
    });
    let (mut client, mut server) = (client.expect("connected"), server);
    let start = tokio::time::Instant::now();
    // Three keep-alive periods, each ping answered: the connection stays.
    let mut pings = 0;
    while pings < 3 {
        let at = client.next_timer().expect("timer");
        tokio::select! {
            e = client.read_event() => panic!("unexpected {e:?}"),
            _ = tokio::time::sleep_until(at) => {
                client.on_timer(tokio::time::Instant::now()).expect("no timeout");
                client.flush().await.expect("flush");
                if next_packet(&mut server).await == ClientPacket::PingReq {
                    pings += 1;
                    send(&mut server, &[ServerPacket::PingResp]).await;
                }
            }
        }
        assert!(start.elapsed() < Duration::from_secs(20), "bounded");
    }
}

#[tokio::test]
async fn a_refused_connack_is_an_error_with_its_reason_code() {
    for (protocol, version, code) in [
        (Protocol::V4, MqttVersion::V4, 5u8),
        (Protocol::V5, MqttVersion::V5, 0x87u8),
    ] {
        let peer = Peer::bind().await;
        let port = peer.port();
        let refused = encoded(
            protocol,
            ServerPacket::ConnAck {
                outcome: ConnectOutcome::NotAuthorized,
                session_present: false,
                features: ServerFeatures::basic(false, 1024),
                assigned_client_id: None,
                reason: None,
            },
        );
        let (result, _conn) = tokio::join!(dial(port, options(version)), async {
            let (mut conn, _) = peer.accept().await;
            send_raw(&mut conn, &refused).await;
            conn
        });
        match result {
            Err(UpstreamError::Refused { code: got, .. }) => assert_eq!(got, code),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn hostile_servers_end_the_connection_cleanly() {
    // Garbage instead of a CONNACK.
    let peer = Peer::bind().await;
    let port = peer.port();
    let (result, _c) = tokio::join!(dial(port, options(MqttVersion::V5)), async {
        let (mut conn, _) = peer.accept().await;
        send_raw(&mut conn, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
        conn
    });
    assert!(
        matches!(result, Err(UpstreamError::Protocol(_))),
        "{result:?}"
    );

    // A server that never answers: the attempt ends at the connect timeout.
    let peer = Peer::bind().await;
    let port = peer.port();
    let mut opts = options(MqttVersion::V4);
    opts.connect_timeout = Duration::from_millis(300);
    let (result, _c) = tokio::join!(dial(port, opts), peer.accept());
    assert!(
        matches!(result, Err(UpstreamError::ConnectTimeout(_))),
        "{result:?}"
    );

    for version in [MqttVersion::V4, MqttVersion::V5] {
        let protocol = match version {
            MqttVersion::V4 => Protocol::V4,
            MqttVersion::V5 => Protocol::V5,
        };
        let connack = encoded(protocol, accepted(1 << 20));

        // Garbage after the CONNACK.
        let (mut client, mut peer, _) = pair(version, &connack).await;
        send_raw(&mut peer, &[0x00, 0x00, 0x13, 0x37]).await;
        assert!(matches!(
            next_event(&mut client).await,
            Err(UpstreamError::Protocol(_))
        ));

        // A packet announced far over our limit: refused from its fixed header, before the
        // body is buffered.
        let (mut client, mut peer, _) = pair(version, &connack).await;
        // PUBLISH QoS 0, remaining length 200 MB (varint 0x80 0x80 0xe8 0x5f).
        send_raw(&mut peer, &[0x30, 0x80, 0x80, 0xe8, 0x5f, 0x00, 0x01, b't']).await;
        match next_event(&mut client).await {
            Err(UpstreamError::TooLarge { size, limit }) => {
                assert!(size > 100_000_000);
                assert_eq!(limit, 64 * 1024);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(
            client.buffer_capacity() <= 64 * 1024,
            "nothing was allocated for the announced size"
        );

        // A packet over our limit sent for real: refused too.
        let (mut client, mut peer, _) = pair(version, &connack).await;
        let big = Bytes::from(vec![b'x'; 70 * 1024]);
        let publish = encoded(
            protocol,
            ServerPacket::Publish {
                topic: "cmd/thing-1",
                qos: 0,
                pkid: 0,
                retain: false,
                dup: false,
                payload: big,
                properties: None,
            },
        );
        let writer = tokio::spawn(async move {
            let _ = peer.write_raw(&publish).await;
            peer
        });
        assert!(matches!(
            next_event(&mut client).await,
            Err(UpstreamError::TooLarge { .. })
        ));
        drop(writer);

        // The server closes: a clean `Closed`.
        let (mut client, mut peer, _) = pair(version, &connack).await;
        peer.shutdown().await;
        drop(peer);
        assert!(matches!(
            next_event(&mut client).await,
            Err(UpstreamError::Closed) | Err(UpstreamError::Io(_))
        ));

        // A second CONNACK is decoded as such; the link treats it as a violation.
        let (mut client, mut peer, _) = pair(version, &connack).await;
        send_raw(&mut peer, &connack).await;
        assert!(matches!(
            next_event(&mut client).await,
            Ok(ServerEvent::ConnAck(_))
        ));
    }

    // MQTT 5: a topic alias we never allowed.
    let connack = v5_connack(None);
    let (mut client, mut peer, _) = pair(MqttVersion::V5, &connack).await;
    let mut out = BytesMut::new();
    let mut p = v5::Publish::new(
        "cmd/thing-1",
        rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        Bytes::from_static(b"x"),
        Some(v5::PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        }),
    );
    p.pkid = 0;
    v5::Packet::Publish(p).write(&mut out, None).unwrap();
    send_raw(&mut peer, &out).await;
    assert!(matches!(
        next_event(&mut client).await,
        Err(UpstreamError::Protocol(_))
    ));

    // MQTT 5: a CONNACK with Receive Maximum 0 is a protocol error.
    let peer = Peer::bind().await;
    let port = peer.port();
    let zero = v5_connack(Some(v5_limits(Some(0), None)));
    let (result, _c) = tokio::join!(dial(port, options(MqttVersion::V5)), async {
        let (mut conn, _) = peer.accept().await;
        send_raw(&mut conn, &zero).await;
        conn
    });
    assert!(
        matches!(result, Err(UpstreamError::Protocol(_))),
        "{result:?}"
    );
}

/// An idle link holds no buffer: not after its CONNACK, not after a large packet passed
/// (sent in parts, so the read buffer had to grow), not after a flush.
#[tokio::test]
async fn idle_links_hold_no_buffers_and_large_packets_are_given_back() {
    let connack = encoded(Protocol::V5, accepted(1 << 20));
    let (mut client, mut peer, _) = pair(MqttVersion::V5, &connack).await;
    assert_eq!(
        client.buffer_capacity(),
        0,
        "nothing held after the CONNACK"
    );
    let big = Bytes::from(vec![b'c'; 48 * 1024]);
    let publish = encoded(
        Protocol::V5,
        ServerPacket::Publish {
            topic: "cmd/thing-1",
            qos: 1,
            pkid: 9,
            retain: false,
            dup: false,
            payload: big.clone(),
            properties: None,
        },
    );
    let writer = tokio::spawn(async move {
        for part in publish.chunks(1000) {
            peer.write_raw(part).await.expect("write to the client");
        }
        peer
    });
    match next_event(&mut client).await.unwrap() {
        ServerEvent::Publish { payload, pkid, .. } => {
            assert_eq!(pkid, 9);
            assert_eq!(payload, big);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client.buffer_capacity(),
        0,
        "given back after the large packet"
    );
    let mut peer = writer.await.unwrap();
    // Our answer goes out and its buffer with it.
    client.queue_puback(9);
    assert!(client.buffer_capacity() > 0);
    client.flush().await.unwrap();
    assert_eq!(client.buffer_capacity(), 0, "given back after the flush");
    assert!(matches!(
        next_packet(&mut peer).await,
        ClientPacket::PubAck(9)
    ));
}

/// A connection storm respects the bound: with 4 permits, 12 links dialling at once reach
/// the server at most 4 at a time, and every one connects as earlier attempts end.
#[tokio::test]
async fn connection_attempts_wait_for_a_permit() {
    const AT_ONCE: usize = 4;
    const LINKS: usize = 12;
    let peer = Peer::bind().await;
    let port = peer.port();
    let attempts = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let mut opts = options(MqttVersion::V4);
    opts.attempts = Some(attempts.clone());
    let dialling: Vec<_> = (0..LINKS)
        .map(|_| tokio::spawn(dial(port, opts.clone())))
        .collect();
    let connack = encoded(Protocol::V4, accepted(1 << 20));
    let mut answered = Vec::new();
    while answered.len() < LINKS {
        let batch = AT_ONCE.min(LINKS - answered.len());
        let mut waiting = Vec::new();
        while waiting.len() < batch {
            waiting.push(peer.accept().await.0);
        }
        assert_eq!(attempts.available_permits(), 0, "all permits held");
        // Nothing more reaches the server while these attempts hold the permits.
        let more = tokio::time::timeout(Duration::from_millis(200), peer.listener.accept()).await;
        assert!(
            more.is_err(),
            "an attempt beyond the bound reached the server"
        );
        for mut conn in waiting {
            send_raw(&mut conn, &connack).await;
            answered.push(conn);
        }
    }
    for d in dialling {
        d.await.unwrap().expect("connected once a permit was free");
    }
    assert_eq!(attempts.available_permits(), AT_ONCE, "permits given back");
}
