//! A TCP relay on 127.0.0.1 in front of a broker: tests connect through it to cut every open
//! connection at once (as a network failure would, without DISCONNECT) and to count and time
//! connection attempts (reconnect backoff).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fleetgw::downstream::{
    BrokerOptions, DownstreamOptions, EmbeddedBroker, EmbeddedBrokerOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// A running relay; dropping it stops it.
pub struct Relay {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Instant>>>,
    open: Arc<Mutex<Vec<AbortHandle>>>,
    /// While true, bytes from the upstream side are not passed on (see [`Relay::hold_replies`]).
    held: watch::Sender<bool>,
    /// While true, new connections are closed at once (see [`Relay::refuse_new`]).
    refusing: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (acc, opn) = (accepted.clone(), open.clone());
        let (held, _) = watch::channel(false);
        let hold = held.clone();
        let refusing = Arc::new(AtomicBool::new(false));
        let refuse = refusing.clone();
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                acc.lock().unwrap().push(Instant::now());
                if refuse.load(Ordering::SeqCst) {
                    continue;
                }
                let hold = hold.subscribe();
                let conn = tokio::spawn(async move {
                    // Upstream down: closing `down` is what a refused connection looks like.
                    if let Ok(up) = TcpStream::connect(upstream).await {
                        let (mut down_rx, mut down_tx) = down.into_split();
                        let (mut up_rx, mut up_tx) = up.into_split();
                        // Each direction passes its end of stream on, as
                        // `copy_bidirectional` does.
                        let requests = async move {
                            let _ = tokio::io::copy(&mut down_rx, &mut up_tx).await;
                            let _ = up_tx.shutdown().await;
                        };
                        let replies = async move {
                            let mut hold = hold;
                            let mut buf = vec![0u8; 16 * 1024];
                            while let Ok(n @ 1..) = up_rx.read(&mut buf).await {
                                // Read, but not passed on while held.
                                let _ = hold.wait_for(|held| !*held).await;
                                if down_tx.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            let _ = down_tx.shutdown().await;
                        };
                        let _ = tokio::join!(requests, replies);
                    }
                });
                opn.lock().unwrap().push(conn.abort_handle());
            }
        });
        Self {
            addr,
            accepted,
            open,
            held,
            refusing,
            task,
        }
    }

    /// Closes (true) or relays again (false) every new connection, as a server that is down
    /// would; connections already open stay.
    pub fn refuse_new(&self, refuse: bool) {
        self.refusing.store(refuse, Ordering::SeqCst);
    }

    /// Stops (true) or resumes (false) passing on what the upstream side sends, on every
    /// connection: a cloud whose acknowledgements do not arrive.
    pub fn hold_replies(&self, hold: bool) {
        self.held.send_replace(hold);
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every relayed connection now (both sides see the sockets close).
    pub fn sever(&self) {
        for conn in self.open.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    /// When each connection was accepted, in order.
    pub fn accept_times(&self) -> Vec<Instant> {
        self.accepted.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.sever();
    }
}

/// An embedded broker on a free loopback port with `max_inflight` unacknowledged messages
/// towards each client, and a relay in front of its listener; the options name the
/// gateway `gateway_client_id` (sessions are made with `session_options(Some(relay.addr()))`).
pub async fn relayed_embedded_broker(
    max_inflight: usize,
    gateway_client_id: &str,
) -> (EmbeddedBroker, Relay, DownstreamOptions) {
    let broker_opts = EmbeddedBrokerOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_inflight,
        ..EmbeddedBrokerOptions::default()
    };
    let broker = EmbeddedBroker::start(&broker_opts)
        .await
        .expect("embedded broker starts");
    let relay = Relay::start(broker.listen_addr()).await;
    let dopts = DownstreamOptions::new(
        gateway_client_id.to_string(),
        BrokerOptions::Embedded(broker_opts),
    );
    (broker, relay, dopts)
}
