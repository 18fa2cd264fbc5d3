//! A TCP relay on 127.0.0.1 in front of a broker: tests connect through it to cut every open
//! connection at once (as a network failure would, without DISCONNECT) and to count and time
//! connection attempts (reconnect backoff).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// A running relay; dropping it stops it.
pub struct Relay {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Instant>>>,
    open: Arc<Mutex<Vec<AbortHandle>>>,
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
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                acc.lock().unwrap().push(Instant::now());
                let conn = tokio::spawn(async move {
                    // Upstream down: closing `down` is what a refused connection looks like.
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                opn.lock().unwrap().push(conn.abort_handle());
            }
        });
        Self {
            addr,
            accepted,
            open,
            task,
        }
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
