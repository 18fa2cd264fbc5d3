//! The claim pool against a fake AWS IoT Core on 127.0.0.1: real TLS with client
//! certificates (a test CA), our server-side [`wire`] codec, one packet at a time so every
//! test controls exactly what the session sees. Hostile servers (a refused or malformed
//! SUBACK, answers on the wrong topic, replays, garbage, an oversize packet, QoS 2, no answer)
//! must fail the request they hit (never hand it a wrong answer) and make the session start
//! afresh on a new connection.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::cloud::aws::topics;
use crate::identity::{self, CertificateAuthority, KeyType};
use crate::mqtt::stream::PacketStream;
use crate::mqtt::wire::{
    ClientPacket, ConnectInfo, ConnectOutcome, Protocol, ServerFeatures, ServerPacket, SubRefusal,
};

const WAIT: Duration = Duration::from_secs(10);
const MAX_PACKET: usize = 4096;

type Peer = PacketStream<TlsStream<TcpStream>>;
/// A SUBACK's verdict on one filter.
type Granted = Result<u8, SubRefusal>;

/// A fake AWS IoT Core endpoint requiring the claim certificate.
struct FakeCloud {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    client_tls: Arc<rustls::ClientConfig>,
}

impl FakeCloud {
    async fn start() -> Self {
        let ca = CertificateAuthority::generate("fake cloud CA").expect("CA");
        let (server_pem, server_key) = ca
            .issue_server(
                "fake-iot",
                &["localhost"],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                1,
            )
            .expect("server certificate");
        let (claim_pem, claim_key) = ca
            .issue_client("claim", KeyType::EcdsaP256, 1)
            .expect("claim certificate");
        let server = identity::tls::server_config(&server_pem, &server_key, Some(ca.cert_pem()))
            .expect("server config");
        let client_tls =
            identity::tls::client_config(ca.cert_pem(), Some((&claim_pem, &claim_key)))
                .expect("client config");
        FakeCloud {
            listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            acceptor: TlsAcceptor::from(server),
            client_tls,
        }
    }

    fn options(&self) -> ClaimOptions {
        ClaimOptions {
            host: "127.0.0.1".into(),
            port: self.listener.local_addr().expect("addr").port(),
            tls: self.client_tls.clone(),
            client_id_prefix: "gw-claim".into(),
            sessions: 1,
            template: "tmpl".into(),
            format: PayloadFormat::Json,
            keep_alive: Duration::from_secs(30),
            request_timeout: WAIT,
            connect_timeout: WAIT,
            reconnect_min: Duration::from_millis(10),
            reconnect_max: Duration::from_millis(50),
            queue_timeout: WAIT,
            max_packet_bytes: MAX_PACKET,
        }
    }

    /// Accepts the next connection: TCP, TLS (returned: whether the session was resumed) and
    /// its CONNECT, answered with an accepting CONNACK.
    async fn accept(&self) -> (Peer, ConnectInfo, bool) {
        timeout(WAIT, async {
            let (tcp, _) = self.listener.accept().await.expect("accept");
            let tls = self.acceptor.accept(tcp).await.expect("TLS handshake");
            let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            let mut peer = PacketStream::new(tls, 1 << 20, 4096);
            let info = peer.read_connect().await.expect("CONNECT");
            send(
                &mut peer,
                &[ServerPacket::ConnAck {
                    outcome: ConnectOutcome::Accepted,
                    session_present: false,
                    features: ServerFeatures::basic(false, 1 << 20),
                    assigned_client_id: None,
                    reason: None,
                }],
            )
            .await;
            (peer, info, resumed)
        })
        .await
        .expect("a claim connection in time")
    }

    /// Accepts a connection, checks its SUBSCRIBE and answers it with a SUBACK granting QoS 1.
    async fn accept_subscribed(&self) -> Peer {
        let (mut peer, _, _) = self.accept().await;
        let pkid = expect_subscribe(&mut peer).await;
        send(
            &mut peer,
            &[ServerPacket::SubAck {
                pkid,
                granted: &[Ok(1), Ok(1), Ok(1), Ok(1)],
                reason: None,
            }],
        )
        .await;
        peer
    }
}

fn create_topic() -> String {
    topics::create_from_csr(PayloadFormat::Json)
}

fn register_topic() -> String {
    topics::register_thing("tmpl", PayloadFormat::Json)
}

/// The SUBSCRIBE every connection starts with: the four response topics at QoS 1.
async fn expect_subscribe(peer: &mut Peer) -> u16 {
    match next_packet(peer).await {
        ClientPacket::Subscribe { pkid, filters } => {
            let got: Vec<(String, u8)> = filters.into_iter().map(|f| (f.filter, f.qos)).collect();
            let want: Vec<(String, u8)> = [create_topic(), register_topic()]
                .iter()
                .flat_map(|t| [topics::accepted(t), topics::rejected(t)])
                .map(|t| (t, 1))
                .collect();
            assert_eq!(got, want);
            pkid
        }
        other => panic!("expected SUBSCRIBE before anything else, got {other:?}"),
    }
}

async fn send(peer: &mut Peer, packets: &[ServerPacket<'_>]) {
    for p in packets {
        peer.queue(p.clone()).expect("encode");
    }
    peer.flush(WAIT).await.expect("flush");
}

fn answer<'a>(topic: &'a str, pkid: u16, payload: &'static [u8]) -> ServerPacket<'a> {
    ServerPacket::Publish {
        topic,
        qos: 1,
        pkid,
        retain: false,
        dup: false,
        payload: Bytes::from_static(payload),
        properties: None,
    }
}

fn encode(packet: ServerPacket<'_>) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    crate::mqtt::wire::write_packet(Protocol::V4, packet, &mut out).expect("encode");
    out.to_vec()
}

async fn next_packet(peer: &mut Peer) -> ClientPacket {
    timeout(WAIT, async {
        loop {
            if let Some(p) = peer.next_packet().expect("decode") {
                return p;
            }
            peer.fill().await.expect("read from the session");
        }
    })
    .await
    .expect("a packet in time")
}

/// The request PUBLISH the session sends next: (topic, packet id, payload).
async fn expect_request(peer: &mut Peer) -> (String, u16, Bytes) {
    match next_packet(peer).await {
        ClientPacket::Publish {
            topic,
            qos,
            pkid,
            payload,
            ..
        } => {
            assert_eq!(qos, 1, "requests go at QoS 1");
            (topic, pkid, payload)
        }
        other => panic!("expected the request PUBLISH, got {other:?}"),
    }
}

/// The session closed the connection (after any packets still in the buffer).
async fn expect_closed(peer: &mut Peer) {
    timeout(WAIT, async {
        loop {
            match peer.next_packet() {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(_) => return,
            }
            if peer.fill().await.is_err() {
                return;
            }
        }
    })
    .await
    .expect("the session closes the connection in time")
}

async fn wait_connected(pool: &ClaimPool, n: usize) {
    timeout(WAIT, async {
        while pool.connected_sessions() != n {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("sessions connected in time")
}

fn call(
    pool: &Arc<ClaimPool>,
    api: ClaimApi,
    body: &'static [u8],
) -> tokio::task::JoinHandle<Result<ClaimResponse, CloudError>> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.call(api, body.to_vec(), None).await })
}

async fn outcome(
    handle: tokio::task::JoinHandle<Result<ClaimResponse, CloudError>>,
) -> Result<ClaimResponse, CloudError> {
    timeout(WAIT, handle)
        .await
        .expect("the call ends in time")
        .expect("the call's task")
}

fn accepted_body(r: Result<ClaimResponse, CloudError>) -> Bytes {
    match r {
        Ok(ClaimResponse::Accepted(body)) => body,
        other => panic!("expected an accepted answer, got {other:?}"),
    }
}

#[tokio::test]
async fn answers_go_to_their_request_and_every_message_is_acknowledged() {
    let cloud = FakeCloud::start().await;
    let pool = Arc::new(ClaimPool::start(cloud.options()));
    let (mut peer, info, _) = cloud.accept().await;
    assert_eq!(info.protocol, Protocol::V4);
    assert_eq!(info.client_id, "gw-claim-1");
    assert!(info.clean_start, "a fresh session on every connection");
    assert_eq!(info.keep_alive, 30);
    let pkid = expect_subscribe(&mut peer).await;
    assert_eq!(pool.connected_sessions(), 0, "not usable before its SUBACK");
    send(
        &mut peer,
        &[ServerPacket::SubAck {
            pkid,
            granted: &[Ok(1), Ok(1), Ok(0), Ok(1)],
            reason: None,
        }],
    )
    .await;
    wait_connected(&pool, 1).await;

    // CreateCertificateFromCsr: an answer for the other API and one on a topic nobody asked
    // for come first; neither is taken for it.
    let first = call(&pool, ClaimApi::CreateCertificateFromCsr, b"csr-1");
    let (topic, req, payload) = expect_request(&mut peer).await;
    assert_eq!((topic, &payload[..]), (create_topic(), &b"csr-1"[..]));
    let other_api = topics::accepted(&register_topic());
    let create_accepted = topics::accepted(&create_topic());
    send(
        &mut peer,
        &[
            answer(&other_api, 7, b"not yours"),
            answer("$aws/things/x/shadow/update/accepted", 8, b"noise"),
            ServerPacket::PubAck(req),
            answer(&create_accepted, 9, b"cert-1"),
        ],
    )
    .await;
    assert_eq!(&accepted_body(outcome(first).await)[..], b"cert-1");

    // The next request goes out after the PUBACKs of all three messages.
    let second = call(&pool, ClaimApi::RegisterThing, b"token-1");
    let mut acked = Vec::new();
    let (topic, req, _) = loop {
        match next_packet(&mut peer).await {
            ClientPacket::PubAck(id) => acked.push(id),
            ClientPacket::Publish {
                topic,
                pkid,
                payload,
                ..
            } => break (topic, pkid, payload),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(acked, vec![7, 8, 9]);
    assert_eq!(topic, register_topic());
    let register_rejected = topics::rejected(&register_topic());
    send(
        &mut peer,
        &[
            ServerPacket::PubAck(req),
            answer(&register_rejected, 10, b"{\"statusCode\":400}"),
        ],
    )
    .await;
    match outcome(second).await {
        Ok(ClaimResponse::Rejected(body)) => assert_eq!(&body[..], b"{\"statusCode\":400}"),
        other => panic!("expected the rejection, got {other:?}"),
    }
    assert_eq!(next_packet(&mut peer).await, ClientPacket::PubAck(10));

    // A replayed answer while nothing is asked is acknowledged and dropped: the next request
    // gets its own answer.
    send(&mut peer, &[answer(&create_accepted, 9, b"cert-1")]).await;
    assert_eq!(next_packet(&mut peer).await, ClientPacket::PubAck(9));
    let third = call(&pool, ClaimApi::CreateCertificateFromCsr, b"csr-3");
    let (_, req, payload) = expect_request(&mut peer).await;
    assert_eq!(&payload[..], b"csr-3");
    send(
        &mut peer,
        &[
            ServerPacket::PubAck(req),
            answer(&create_accepted, 11, b"cert-3"),
        ],
    )
    .await;
    assert_eq!(&accepted_body(outcome(third).await)[..], b"cert-3");
    assert_eq!(next_packet(&mut peer).await, ClientPacket::PubAck(11));

    // The cloud sends that answer again (DUP, same packet id) while the next request is out:
    // a redelivery, not the next request's answer.
    let fourth = call(&pool, ClaimApi::CreateCertificateFromCsr, b"csr-4");
    let (_, req, payload) = expect_request(&mut peer).await;
    assert_eq!(&payload[..], b"csr-4");
    let mut again = answer(&create_accepted, 11, b"cert-3");
    if let ServerPacket::Publish { dup, .. } = &mut again {
        *dup = true;
    }
    send(
        &mut peer,
        &[
            again,
            ServerPacket::PubAck(req),
            answer(&create_accepted, 12, b"cert-4"),
        ],
    )
    .await;
    assert_eq!(&accepted_body(outcome(fourth).await)[..], b"cert-4");
    assert_eq!(next_packet(&mut peer).await, ClientPacket::PubAck(11));
    assert_eq!(next_packet(&mut peer).await, ClientPacket::PubAck(12));

    // A flood of messages nobody asked for is acknowledged, one by one, and changes nothing.
    for id in 100..300u16 {
        peer.queue(answer("$aws/things/x/jobs/notify", id, b"x"))
            .expect("encode");
    }
    peer.flush(WAIT).await.expect("flush");
    for id in 100..300u16 {
        assert_eq!(next_packet(&mut peer).await, ClientPacket::PubAck(id));
    }
    assert_eq!(pool.connected_sessions(), 1);

    // Shutdown says goodbye.
    pool.shutdown().await;
    assert_eq!(
        next_packet(&mut peer).await,
        ClientPacket::Disconnect { with_will: false }
    );
}

#[tokio::test]
async fn a_refused_or_malformed_suback_makes_the_session_start_afresh() {
    let cloud = FakeCloud::start().await;
    let pool = Arc::new(ClaimPool::start(cloud.options()));
    let refused = [Ok(1), Err(SubRefusal::NotAuthorized), Ok(1), Ok(1)];
    let cases: [(&str, &[Granted], u16); 3] = [
        ("a refused filter", &refused, 0),
        ("three codes for four filters", &[Ok(1), Ok(1), Ok(1)], 0),
        ("a SUBACK for another packet id", &[Ok(1); 4], 77),
    ];
    for (case, granted, other_id) in cases {
        let (mut peer, _, _) = cloud.accept().await;
        let pkid = expect_subscribe(&mut peer).await;
        let pkid = if other_id == 0 { pkid } else { other_id };
        send(
            &mut peer,
            &[ServerPacket::SubAck {
                pkid,
                granted,
                reason: None,
            }],
        )
        .await;
        expect_closed(&mut peer).await;
        assert_eq!(pool.connected_sessions(), 0, "{case}: never usable");
    }
    // The next connection subscribes afresh, resumes the TLS session, and is used.
    let (mut peer, _, resumed) = cloud.accept().await;
    assert!(resumed, "claim connections resume their TLS session");
    let pkid = expect_subscribe(&mut peer).await;
    send(
        &mut peer,
        &[ServerPacket::SubAck {
            pkid,
            granted: &[Ok(1); 4],
            reason: None,
        }],
    )
    .await;
    wait_connected(&pool, 1).await;
}

#[tokio::test]
async fn a_hostile_answer_fails_its_request_and_the_session_reconnects() {
    let cloud = FakeCloud::start().await;
    let pool = Arc::new(ClaimPool::start(cloud.options()));
    let create_accepted = topics::accepted(&create_topic());
    let qos2 = ServerPacket::Publish {
        topic: &create_accepted,
        qos: 2,
        pkid: 5,
        retain: false,
        dup: false,
        payload: Bytes::from_static(b"cert"),
        properties: None,
    };
    let cases: [(&str, Vec<u8>); 4] = [
        ("garbage", vec![0xF0, 0x02, 0xFF, 0xFF]),
        // A PUBLISH announcing 1 MiB, over the session's 4 KiB limit.
        ("an oversize packet", vec![0x30, 0x80, 0x80, 0x40]),
        ("a QoS 2 answer", encode(qos2)),
        (
            "a PUBACK for an id never used",
            vec![0x40, 0x02, 0x12, 0x34],
        ),
    ];
    for (case, bytes) in cases {
        let mut peer = cloud.accept_subscribed().await;
        wait_connected(&pool, 1).await;
        let request = call(&pool, ClaimApi::CreateCertificateFromCsr, b"csr");
        expect_request(&mut peer).await;
        peer.write_raw(&bytes).await.expect("write");
        match outcome(request).await {
            Err(CloudError::Disconnected { .. }) => {}
            other => panic!("{case}: expected the request to fail, got {other:?}"),
        }
        expect_closed(&mut peer).await;
        wait_connected(&pool, 0).await;
    }
    // An answer that does not fit its request is refused, and the session starts afresh.
    let mut peer = cloud.accept_subscribed().await;
    wait_connected(&pool, 1).await;
    let checked = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let check: ResponseCheck = Box::new(|body: &[u8]| match body {
                b"cert-for-me" => Ok(()),
                _ => Err("the certificate is for another key".into()),
            });
            pool.call(
                ClaimApi::CreateCertificateFromCsr,
                b"csr".to_vec(),
                Some(check),
            )
            .await
        })
    };
    let (_, req, _) = expect_request(&mut peer).await;
    send(
        &mut peer,
        &[
            ServerPacket::PubAck(req),
            answer(&create_accepted, 3, b"cert-for-another"),
        ],
    )
    .await;
    match outcome(checked).await {
        Err(CloudError::Protocol { reason, .. }) => assert!(reason.contains("another key")),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    expect_closed(&mut peer).await;
    // Still usable afterwards.
    let mut peer = cloud.accept_subscribed().await;
    let request = call(&pool, ClaimApi::CreateCertificateFromCsr, b"csr");
    let (_, req, _) = expect_request(&mut peer).await;
    send(
        &mut peer,
        &[
            ServerPacket::PubAck(req),
            answer(&create_accepted, 4, b"cert-ok"),
        ],
    )
    .await;
    assert_eq!(&accepted_body(outcome(request).await)[..], b"cert-ok");
}

#[tokio::test]
async fn an_unanswered_request_times_out_and_its_late_answer_is_never_taken() {
    let cloud = FakeCloud::start().await;
    let mut options = cloud.options();
    options.request_timeout = Duration::from_millis(300);
    let pool = Arc::new(ClaimPool::start(options));
    let create_accepted = topics::accepted(&create_topic());

    // No answer at all.
    let mut peer = cloud.accept_subscribed().await;
    let request = call(&pool, ClaimApi::CreateCertificateFromCsr, b"csr-1");
    let (_, req, _) = expect_request(&mut peer).await;
    match outcome(request).await {
        Err(CloudError::Timeout { after_ms, .. }) => assert_eq!(after_ms, 300),
        other => panic!("expected a timeout, got {other:?}"),
    }
    expect_closed(&mut peer).await;
    // Its answer, late, reaches a connection the session has left.
    let _ = peer
        .write_raw(&encode(answer(&create_accepted, req, b"cert-1-late")))
        .await;

    // The answer without the request's PUBACK: the reply is given, the connection is not
    // trusted for the next request.
    let mut peer = cloud.accept_subscribed().await;
    let request = call(&pool, ClaimApi::CreateCertificateFromCsr, b"csr-2");
    let (_, _, payload) = expect_request(&mut peer).await;
    assert_eq!(
        &payload[..],
        b"csr-2",
        "the timed-out request is not sent again"
    );
    send(&mut peer, &[answer(&create_accepted, 1, b"cert-2")]).await;
    assert_eq!(&accepted_body(outcome(request).await)[..], b"cert-2");
    assert_eq!(next_packet(&mut peer).await, ClientPacket::PubAck(1));
    expect_closed(&mut peer).await;

    // On the next connection the first request's late answer arrives before the new request
    // is sent: acknowledged and dropped, and the new request gets its own.
    let mut peer = cloud.accept_subscribed().await;
    send(&mut peer, &[answer(&create_accepted, 2, b"cert-1-late")]).await;
    assert_eq!(next_packet(&mut peer).await, ClientPacket::PubAck(2));
    let request = call(&pool, ClaimApi::CreateCertificateFromCsr, b"csr-3");
    let (_, new_req, _) = expect_request(&mut peer).await;
    assert_eq!(new_req, req, "packet ids start over on a new connection");
    send(
        &mut peer,
        &[
            ServerPacket::PubAck(new_req),
            answer(&create_accepted, 3, b"cert-3"),
        ],
    )
    .await;
    assert_eq!(&accepted_body(outcome(request).await)[..], b"cert-3");
}

#[tokio::test]
async fn a_request_no_session_took_in_time_fails_and_is_never_sent() {
    let cloud = FakeCloud::start().await;
    let mut options = cloud.options();
    options.queue_timeout = Duration::from_millis(300);
    let pool = Arc::new(ClaimPool::start(options));
    // The cloud does not answer the handshake yet: the session is still connecting.
    match outcome(call(&pool, ClaimApi::CreateCertificateFromCsr, b"too-late")).await {
        Err(CloudError::Disconnected { reason, .. }) => {
            assert!(reason.contains("no claim session"), "{reason}")
        }
        other => panic!("expected the call to give up, got {other:?}"),
    }
    // Once connected, the session skips the abandoned request and sends only the next one.
    let mut peer = cloud.accept_subscribed().await;
    let request = call(&pool, ClaimApi::CreateCertificateFromCsr, b"in-time");
    let (_, req, payload) = expect_request(&mut peer).await;
    assert_eq!(&payload[..], b"in-time");
    let create_accepted = topics::accepted(&create_topic());
    send(
        &mut peer,
        &[
            ServerPacket::PubAck(req),
            answer(&create_accepted, 1, b"cert"),
        ],
    )
    .await;
    assert_eq!(&accepted_body(outcome(request).await)[..], b"cert");
}
