//! The unbuffered TLS stream against real TLS servers (rustls through `tokio_rustls`) on
//! 127.0.0.1, in TLS 1.2 and 1.3: handshake, round trips, records larger than a read,
//! resumption, clean close; and against hostile servers: garbage, a truncated record, an
//! oversize record, an alert, a certificate for another name. Every failure must be a clean
//! error, and an idle stream must hold no buffer.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, HandshakeKind, ProtocolVersion, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::tls::{connect, TlsStream};
use super::UpstreamError;
use crate::identity::tls::{client_config, server_config};
use crate::identity::CertificateAuthority;

const WAIT: Duration = Duration::from_secs(10);

struct Pki {
    ca: CertificateAuthority,
    /// Presents a certificate for localhost and 127.0.0.1.
    server: Arc<ServerConfig>,
}

fn pki() -> Pki {
    let ca = CertificateAuthority::generate("Test Root").unwrap();
    let (pem, key) = ca
        .issue_server(
            "upstream",
            &["localhost"],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            1,
        )
        .unwrap();
    let server = server_config(&pem, &key, None).unwrap();
    Pki { ca, server }
}

/// A client config trusting `ca`, limited to `version` if given, caching sessions if
/// `resume`.
fn client(
    ca: &CertificateAuthority,
    version: Option<&'static rustls::SupportedProtocolVersion>,
    resume: bool,
) -> Arc<ClientConfig> {
    let mut config = match version {
        None => Arc::unwrap_or_clone(client_config(ca.cert_pem(), None).unwrap()),
        Some(version) => {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from(ca.cert_der().to_vec()))
                .unwrap();
            ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
        }
    };
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

/// One listener on 127.0.0.1 and its port.
async fn listen() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

async fn accept_tcp(listener: &TcpListener) -> TcpStream {
    timeout(WAIT, listener.accept()).await.unwrap().unwrap().0
}

async fn accept_tls(
    listener: &TcpListener,
    config: &Arc<ServerConfig>,
) -> tokio_rustls::server::TlsStream<TcpStream> {
    let tcp = accept_tcp(listener).await;
    timeout(
        WAIT,
        tokio_rustls::TlsAcceptor::from(config.clone()).accept(tcp),
    )
    .await
    .unwrap()
    .expect("server handshake")
}

async fn dial(
    port: u16,
    config: Arc<ClientConfig>,
    name: &str,
) -> Result<TlsStream<TcpStream>, UpstreamError> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = ServerName::try_from(name.to_string()).unwrap();
    timeout(WAIT, connect(config, name, tcp))
        .await
        .expect("handshake in time")
}

async fn read_exact(stream: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    timeout(WAIT, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf
}

/// Reads until the stream errors; the error (panics if it ends cleanly).
async fn read_error(stream: &mut TlsStream<TcpStream>) -> std::io::Error {
    let mut buf = [0u8; 512];
    loop {
        match timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("an answer in time")
        {
            Ok(0) => panic!("clean end of stream where an error was expected"),
            Ok(_) => {}
            Err(e) => return e,
        }
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

/// A server that echoes what it reads until the client's close_notify, then closes; returns
/// the protocol it negotiated and whether the client's close was clean.
fn echo_server(listener: TcpListener, config: Arc<ServerConfig>) -> JoinHandle<ProtocolVersion> {
    tokio::spawn(async move {
        let mut tls = accept_tls(&listener, &config).await;
        let version = tls.get_ref().1.protocol_version().unwrap();
        let mut buf = vec![0u8; 8192];
        loop {
            // rustls reports a socket closed without close_notify as an error.
            let n = timeout(WAIT, tls.read(&mut buf))
                .await
                .unwrap()
                .expect("the client closes with close_notify");
            if n == 0 {
                break;
            }
            tls.write_all(&buf[..n]).await.unwrap();
        }
        tls.shutdown().await.unwrap();
        version
    })
}

#[tokio::test]
async fn handshake_round_trip_and_clean_close_in_tls12_and_tls13() {
    let pki = pki();
    for (version, expected) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let (listener, port) = listen().await;
        let server = echo_server(listener, pki.server.clone());
        let mut tls = dial(port, client(&pki.ca, Some(version), false), "localhost")
            .await
            .unwrap();
        assert_eq!(tls.connection().protocol_version(), Some(expected));
        for message in [&b"hello"[..], b"MQTT publish", &pattern(3000)] {
            tls.write_all(message).await.unwrap();
            tls.flush().await.unwrap();
            assert_eq!(read_exact(&mut tls, message.len()).await, message);
        }
        tls.shutdown().await.unwrap();
        let mut rest = Vec::new();
        timeout(WAIT, tls.read_to_end(&mut rest))
            .await
            .unwrap()
            .expect("the server's close_notify ends the stream cleanly");
        assert!(rest.is_empty());
        assert_eq!(timeout(WAIT, server).await.unwrap().unwrap(), expected);
    }
}

/// The IP address works as a server name too (the link connects to the host it was given).
#[tokio::test]
async fn an_ip_address_is_a_server_name() {
    let pki = pki();
    let (listener, port) = listen().await;
    let server = echo_server(listener, pki.server.clone());
    let mut tls = dial(port, client(&pki.ca, None, false), "127.0.0.1")
        .await
        .unwrap();
    tls.write_all(b"ip").await.unwrap();
    tls.flush().await.unwrap();
    assert_eq!(read_exact(&mut tls, 2).await, b"ip");
    tls.shutdown().await.unwrap();
    timeout(WAIT, server).await.unwrap().unwrap();
}

/// Records of 16 KiB arrive over many socket reads, and the reader takes them through a
/// small buffer: every byte arrives in order, and the stream keeps nothing afterwards.
#[tokio::test]
async fn large_records_split_across_reads_and_small_read_buffers() {
    let pki = pki();
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let (listener, port) = listen().await;
        let big = pattern(200_000);
        let server_big = big.clone();
        let config = pki.server.clone();
        let server = tokio::spawn(async move {
            let mut tls = accept_tls(&listener, &config).await;
            let got = read_exact(&mut tls, server_big.len()).await;
            assert!(got == server_big, "the server received the client's bytes");
            tls.write_all(&server_big).await.unwrap();
            tls.flush().await.unwrap();
            // Hold the connection until the client has read everything.
            let mut byte = [0u8; 1];
            let _ = timeout(WAIT, tls.read(&mut byte)).await;
        });
        let mut tls = dial(port, client(&pki.ca, Some(version), false), "localhost")
            .await
            .unwrap();
        // One write of 200 KB: several poll_write calls, several records each.
        tls.write_all(&big).await.unwrap();
        tls.flush().await.unwrap();
        assert_eq!(tls.buffer_capacity(), 0, "written records are not kept");
        let mut got = Vec::with_capacity(big.len());
        let mut small = [0u8; 1000];
        while got.len() < big.len() {
            let n = timeout(WAIT, tls.read(&mut small)).await.unwrap().unwrap();
            assert!(n > 0, "the stream ended early at {}", got.len());
            got.extend_from_slice(&small[..n]);
        }
        assert!(got == big, "every byte in order");
        assert_eq!(tls.buffer_capacity(), 0, "nothing kept once all was read");
        tls.shutdown().await.unwrap();
        timeout(WAIT, server).await.unwrap().unwrap();
    }
}

/// After the handshake, a round trip and the server's session tickets, an idle stream holds
/// no buffer of its own: no ciphertext, no plaintext, no outgoing records.
#[tokio::test]
async fn an_idle_stream_holds_no_buffer_capacity() {
    let pki = pki();
    for resume in [false, true] {
        let (listener, port) = listen().await;
        let server = echo_server(listener, pki.server.clone());
        let mut tls = dial(port, client(&pki.ca, None, resume), "localhost")
            .await
            .unwrap();
        assert_eq!(tls.buffer_capacity(), 0, "after the handshake");
        tls.write_all(&pattern(5000)).await.unwrap();
        tls.flush().await.unwrap();
        // Read in two parts: the first leaves plaintext over, the second takes it.
        let first = read_exact(&mut tls, 100).await;
        assert!(tls.buffer_capacity() > 0, "a leftover is kept");
        let second = read_exact(&mut tls, 4900).await;
        assert_eq!([first, second].concat(), pattern(5000));
        assert_eq!(tls.buffer_capacity(), 0, "idle after a round trip");
        tls.shutdown().await.unwrap();
        timeout(WAIT, server).await.unwrap().unwrap();
    }
}

/// With a config that caches sessions the second connection resumes, in both versions;
/// without, it does a full handshake.
#[tokio::test]
async fn resumption_works_when_the_config_caches_sessions() {
    let pki = pki();
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        for resume in [true, false] {
            let config = client(&pki.ca, Some(version), resume);
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let (listener, port) = listen().await;
                let server = echo_server(listener, pki.server.clone());
                let mut tls = dial(port, config.clone(), "localhost").await.unwrap();
                // A round trip: TLS 1.3 tickets arrive after the handshake, before the echo.
                tls.write_all(b"ticket?").await.unwrap();
                tls.flush().await.unwrap();
                assert_eq!(read_exact(&mut tls, 7).await, b"ticket?");
                kinds.push(tls.connection().handshake_kind());
                tls.shutdown().await.unwrap();
                timeout(WAIT, server).await.unwrap().unwrap();
            }
            let second = if resume {
                HandshakeKind::Resumed
            } else {
                HandshakeKind::Full
            };
            assert_eq!(
                kinds,
                vec![Some(HandshakeKind::Full), Some(second)],
                "{version:?} resume={resume}"
            );
        }
    }
}

/// A server whose certificate names another host is refused, and it learns why (an alert).
#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let pki = pki();
    let (pem, key) = pki
        .ca
        .issue_server("elsewhere", &["other.example"], &[], 1)
        .unwrap();
    let other = server_config(&pem, &key, None).unwrap();
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let tcp = accept_tcp(&listener).await;
        tokio_rustls::TlsAcceptor::from(other).accept(tcp).await
    });
    match dial(port, client(&pki.ca, None, false), "localhost").await {
        Err(UpstreamError::Tls(e)) => assert!(e.contains("not valid for name"), "{e}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    let seen = timeout(WAIT, server).await.unwrap().unwrap();
    let e = seen.expect_err("the server's handshake fails too");
    assert!(e.to_string().contains("BadCertificate"), "{e}");
    // And a certificate of another CA.
    let stranger = CertificateAuthority::generate("Stranger").unwrap();
    let (listener, port) = listen().await;
    let server = echo_server(listener, pki.server.clone());
    match dial(port, client(&stranger, None, false), "localhost").await {
        Err(UpstreamError::Tls(e)) => assert!(e.contains("invalid peer certificate"), "{e}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    server.abort();
}

/// Servers that answer the ClientHello with something other than TLS: the handshake fails
/// with a TLS error, promptly.
#[tokio::test]
async fn hostile_handshakes_fail_cleanly() {
    let pki = pki();
    let cases: [(&str, &[u8]); 4] = [
        ("garbage", b"HTTP/1.1 400 Bad Request\r\n\r\n"),
        // A fatal handshake_failure alert in the clear.
        ("alert", &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]),
        // A handshake record announcing 40,000 bytes (over the TLS limit).
        ("oversize", &[0x16, 0x03, 0x03, 0x9c, 0x40, 0x02]),
        // Half a record, then the socket closes.
        ("truncated", &[0x16, 0x03, 0x03, 0x01, 0x00, 0x02, 0x00]),
    ];
    for (what, reply) in cases {
        let (listener, port) = listen().await;
        let server = tokio::spawn(async move {
            let mut tcp = accept_tcp(&listener).await;
            let mut hello = [0u8; 5];
            tcp.read_exact(&mut hello).await.unwrap();
            assert_eq!(hello[0], 0x16, "a ClientHello record");
            tcp.write_all(reply).await.unwrap();
            tcp.shutdown().await.unwrap();
            // Keep reading until the client goes: it may send an alert.
            let mut sink = Vec::new();
            let _ = timeout(WAIT, tcp.read_to_end(&mut sink)).await;
        });
        match dial(port, client(&pki.ca, None, false), "localhost").await {
            Err(UpstreamError::Tls(e)) => {
                if what == "alert" {
                    assert!(e.contains("HandshakeFailure"), "{what}: {e}");
                }
            }
            other => panic!("{what}: expected a TLS error, got {other:?}"),
        }
        timeout(WAIT, server).await.unwrap().unwrap();
    }
}

/// After a good handshake the server's socket sends raw bytes: garbage, an oversize record, a
/// truncated record, or closes without close_notify. Each is an error for the reader (the
/// same error again on the next call), never a panic or an unbounded buffer; a clean
/// close_notify is the end of the stream.
#[tokio::test]
async fn hostile_records_after_the_handshake_are_errors() {
    let pki = pki();
    let cases: [(&str, &[u8], std::io::ErrorKind); 5] = [
        (
            "garbage",
            b"\x00\x01garbage that is no TLS record at all",
            std::io::ErrorKind::InvalidData,
        ),
        // Application data announcing 40,000 bytes, then some.
        (
            "oversize",
            &[0x17, 0x03, 0x03, 0x9c, 0x40, 1, 2, 3],
            std::io::ErrorKind::InvalidData,
        ),
        // A record whose authentication fails.
        (
            "forged",
            &[
                0x17, 0x03, 0x03, 0x00, 0x20, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
                7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
            ],
            std::io::ErrorKind::InvalidData,
        ),
        // 10 bytes of a 256-byte record, then the socket closes.
        (
            "truncated",
            &[0x17, 0x03, 0x03, 0x01, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            std::io::ErrorKind::UnexpectedEof,
        ),
        ("no close_notify", b"", std::io::ErrorKind::UnexpectedEof),
    ];
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        for (what, raw, kind) in cases {
            let (listener, port) = listen().await;
            let config = pki.server.clone();
            let server = tokio::spawn(async move {
                let mut tls = accept_tls(&listener, &config).await;
                // After the client's first record, so the raw bytes come after the handshake.
                assert_eq!(read_exact(&mut tls, 2).await, b"go");
                tls.write_all(b"ok").await.unwrap();
                tls.flush().await.unwrap();
                let tcp = tls.get_mut().0;
                tcp.write_all(raw).await.unwrap();
                tcp.shutdown().await.unwrap();
                let mut sink = Vec::new();
                let _ = timeout(WAIT, tcp.read_to_end(&mut sink)).await;
            });
            let mut tls = dial(port, client(&pki.ca, Some(version), false), "localhost")
                .await
                .unwrap();
            tls.write_all(b"go").await.unwrap();
            tls.flush().await.unwrap();
            assert_eq!(read_exact(&mut tls, 2).await, b"ok");
            let e = read_error(&mut tls).await;
            assert_eq!(e.kind(), kind, "{version:?} {what}: {e}");
            assert!(tls.buffer_capacity() < 32 * 1024, "{what}: bounded buffers");
            if kind == std::io::ErrorKind::InvalidData {
                let again = read_error(&mut tls).await;
                assert_eq!(again.kind(), kind, "{what}: the error stays");
                assert!(
                    tls.write_all(b"more").await.is_err(),
                    "{what}: no writes after it"
                );
            }
            let _ = tls.shutdown().await;
            timeout(WAIT, server).await.unwrap().unwrap();
        }
    }
}

/// A server that sends a fatal alert after the handshake (here: it requires a client
/// certificate the client does not have; in TLS 1.3 the client learns it at its first read).
#[tokio::test]
async fn an_alert_from_the_server_is_an_error_naming_it() {
    let pki = pki();
    let (pem, key) = pki
        .ca
        .issue_server("upstream", &["localhost"], &[], 1)
        .unwrap();
    let strict = server_config(&pem, &key, Some(pki.ca.cert_pem())).unwrap();
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let tcp = accept_tcp(&listener).await;
        tokio_rustls::TlsAcceptor::from(strict)
            .accept(tcp)
            .await
            .is_err()
    });
    let outcome = match dial(port, client(&pki.ca, None, false), "localhost").await {
        Err(UpstreamError::Tls(e)) => e,
        Err(e) => panic!("expected a TLS error, got {e}"),
        Ok(mut tls) => {
            let _ = tls.write_all(b"hello").await;
            let _ = tls.flush().await;
            let e = read_error(&mut tls).await;
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
            e.to_string()
        }
    };
    assert!(outcome.contains("CertificateRequired"), "{outcome}");
    assert!(
        timeout(WAIT, server).await.unwrap().unwrap(),
        "the server refused"
    );
}

/// The stream is what `Box<dyn Io>` needs.
#[test]
fn the_stream_is_an_io() {
    fn io<T: super::connection::Io>() {}
    io::<TlsStream<TcpStream>>();
    fn write<T: AsyncWrite>() {}
    write::<TlsStream<TcpStream>>();
}

/// The server updates its keys (TLS 1.3 KeyUpdate, asking for ours too) between records:
/// the client reads on, answers with its own update, and its later records decrypt under
/// the server's new keys.
#[tokio::test]
async fn key_updates_after_the_handshake_are_followed() {
    let pki = pki();
    let (listener, port) = listen().await;
    let config = pki.server.clone();
    let server = tokio::spawn(async move {
        let mut tls = accept_tls(&listener, &config).await;
        for round in 0..3u8 {
            tls.get_mut().1.refresh_traffic_keys().unwrap();
            tls.write_all(&[round; 300]).await.unwrap();
            tls.flush().await.unwrap();
            assert_eq!(read_exact(&mut tls, 300).await, vec![round + 10; 300]);
        }
        tls.shutdown().await.unwrap();
    });
    let mut tls = dial(
        port,
        client(&pki.ca, Some(&rustls::version::TLS13), false),
        "localhost",
    )
    .await
    .unwrap();
    for round in 0..3u8 {
        assert_eq!(read_exact(&mut tls, 300).await, vec![round; 300]);
        tls.write_all(&[round + 10; 300]).await.unwrap();
        tls.flush().await.unwrap();
    }
    let mut rest = Vec::new();
    timeout(WAIT, tls.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(tls.buffer_capacity(), 0);
    timeout(WAIT, server).await.unwrap().unwrap();
}
