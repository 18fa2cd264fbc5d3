//! The claim session pool: N MQTT connections to AWS IoT Core authenticated with the claim
//! certificate, each carrying at most one fleet provisioning request at a time.
//!
//! AWS answers CreateCertificateFromCsr and RegisterThing on `/accepted` or `/rejected` with no
//! correlation id, and only to the connection that asked. So a session subscribes to the
//! response topics before it publishes anything, sends one request, and treats the next answer
//! on that API's topics as the answer to it. If no answer comes within the request timeout the
//! session drops its connection: a late answer must never be taken for the next request's.
//!
//! Each session is a task owning one connection of the gateway's own MQTT client
//! ([`mqtt::upstream`](crate::mqtt::upstream), MQTT 3.1.1, TLS with the claim certificate and
//! the config's session resumption cache), see [`session`] for how it batches its writes.
//! Sessions take requests from one shared queue, so a request goes to whichever session is
//! connected and idle. Connections are re-made with jittered exponential back-off; the
//! subscriptions are made afresh on every connection.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

use crate::cloud::codec::PayloadFormat;
use crate::cloud::CloudError;

mod session;
use session::ClaimSession;

/// The fleet provisioning calls a claim session makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimApi {
    /// `$aws/certificates/create-from-csr/{fmt}`
    CreateCertificateFromCsr,
    /// `$aws/provisioning-templates/{template}/provision/{fmt}`
    RegisterThing,
}

impl ClaimApi {
    /// The API name as AWS documents it (used in errors and logs).
    pub fn name(self) -> &'static str {
        match self {
            ClaimApi::CreateCertificateFromCsr => "CreateCertificateFromCsr",
            ClaimApi::RegisterThing => "RegisterThing",
        }
    }
}

/// How the pool connects and paces itself.
#[derive(Clone, Debug)]
pub struct ClaimOptions {
    /// AWS IoT endpoint host (also the TLS server name).
    pub host: String,
    /// MQTT over TLS port (8883).
    pub port: u16,
    /// TLS client config presenting the claim certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// Client ids are `{prefix}-{n}`.
    pub client_id_prefix: String,
    /// Number of sessions (connections).
    pub sessions: usize,
    /// Provisioning template for RegisterThing.
    pub template: String,
    /// Payload format (and topic suffix).
    pub format: PayloadFormat,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// How long one request may wait for its answer.
    pub request_timeout: Duration,
    /// TCP + TLS + CONNACK (and SUBACK) limit for one connection attempt.
    pub connect_timeout: Duration,
    /// First reconnect delay (jittered, doubled per failure).
    pub reconnect_min: Duration,
    /// Upper bound of the reconnect delay.
    pub reconnect_max: Duration,
    /// How long a call waits for a connected, idle session before giving up.
    pub queue_timeout: Duration,
    /// Largest MQTT packet in either direction (certificates are several KiB).
    pub max_packet_bytes: usize,
}

/// A response from the cloud: which topic it came on and its payload.
#[derive(Clone, Debug)]
pub enum ClaimResponse {
    /// Arrived on `/accepted`.
    Accepted(Bytes),
    /// Arrived on `/rejected`.
    Rejected(Bytes),
}

/// Checks that an `/accepted` payload answers the request it is taken for (e.g. that a
/// certificate carries the CSR's public key); `Err` says why not.
pub type ResponseCheck = Box<dyn FnOnce(&[u8]) -> Result<(), String> + Send>;

/// Where a session sends a request's outcome.
type Reply = oneshot::Sender<Result<ClaimResponse, CloudError>>;

/// Where a request stands, decided once by whoever gets there first: the session taking it
/// (`STARTED`) or the caller giving up at the queue timeout (`ABANDONED`). A flag rather than
/// a second channel: the caller is woken once per request, by its answer.
const WAITING: u8 = 0;
const STARTED: u8 = 1;
const ABANDONED: u8 = 2;

struct ClaimRequest {
    api: ClaimApi,
    payload: Vec<u8>,
    check: Option<ResponseCheck>,
    state: Arc<AtomicU8>,
    reply: Reply,
}

impl ClaimRequest {
    /// Claims the request for sending; false when its caller gave up on it (or left).
    fn start(&self) -> bool {
        !self.reply.is_closed()
            && self
                .state
                .compare_exchange(WAITING, STARTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

#[derive(Debug, Default)]
struct PoolCounters {
    connected: AtomicUsize,
}

/// The running pool of claim sessions.
#[derive(Debug)]
pub struct ClaimPool {
    queue: mpsc::Sender<ClaimRequest>,
    shutdown: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<PoolCounters>,
    opts: Arc<ClaimOptions>,
}

impl std::fmt::Debug for ClaimRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimRequest")
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

impl ClaimPool {
    /// Starts `opts.sessions` sessions; they connect in the background.
    pub fn start(opts: ClaimOptions) -> Self {
        let opts = Arc::new(opts);
        let sessions = opts.sessions.max(1);
        let (queue, rx) = mpsc::channel(sessions);
        let rx = Arc::new(Mutex::new(rx));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let counters = Arc::new(PoolCounters::default());
        let tasks = (0..sessions)
            .map(|n| {
                let session = ClaimSession {
                    client_id: format!("{}-{}", opts.client_id_prefix, n + 1),
                    opts: opts.clone(),
                    queue: rx.clone(),
                    shutdown: shutdown_rx.clone(),
                    counters: counters.clone(),
                    last_answer: None,
                };
                tokio::spawn(session.run())
            })
            .collect();
        ClaimPool {
            queue,
            shutdown,
            tasks: std::sync::Mutex::new(tasks),
            counters,
            opts,
        }
    }

    /// Sessions currently connected and subscribed.
    pub fn connected_sessions(&self) -> usize {
        self.counters.connected.load(Ordering::Relaxed)
    }

    /// Sends one request on the next idle session and returns the cloud's answer.
    ///
    /// Fails with [`CloudError::Disconnected`] when no session takes the request within the
    /// queue timeout (the cloud is unreachable), [`CloudError::Timeout`] when the request was
    /// sent but not answered in time, [`CloudError::Protocol`] when `check` refuses the
    /// accepted answer (the session then reconnects: its answers cannot be trusted to line up).
    pub async fn call(
        &self,
        api: ClaimApi,
        payload: Vec<u8>,
        check: Option<ResponseCheck>,
    ) -> Result<ClaimResponse, CloudError> {
        let state = Arc::new(AtomicU8::new(WAITING));
        let (reply_tx, mut reply_rx) = oneshot::channel();
        let request = ClaimRequest {
            api,
            payload,
            check,
            state: state.clone(),
            reply: reply_tx,
        };
        let unavailable = |reason: String| CloudError::Disconnected {
            api: api.name(),
            reason,
        };
        let deadline = Instant::now() + self.opts.queue_timeout;
        match timeout_at(deadline, self.queue.send(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(CloudError::ShuttingDown { api: api.name() }),
            Err(_) => {
                return Err(unavailable(format!(
                    "no claim session was free within {} ms",
                    self.opts.queue_timeout.as_millis()
                )))
            }
        }
        let stopped = |state: &AtomicU8| match state.load(Ordering::Acquire) {
            WAITING => CloudError::ShuttingDown { api: api.name() },
            _ => unavailable("the claim session stopped".into()),
        };
        match timeout_at(deadline, &mut reply_rx).await {
            Ok(Ok(result)) => return result,
            Ok(Err(_)) => return Err(stopped(&state)),
            Err(_) => {}
        }
        // The queue timeout passed without an answer: either no session took the request (it
        // is given up, and a session picking it later skips it), or one is sending it.
        if state
            .compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Err(unavailable(format!(
                "no claim session connected within {} ms",
                self.opts.queue_timeout.as_millis()
            )));
        }
        // The session answers within the request timeout; the margin covers scheduling only.
        let limit = self.opts.request_timeout + Duration::from_secs(2);
        match timeout(limit, reply_rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(stopped(&state)),
            Err(_) => Err(CloudError::Timeout {
                api: api.name(),
                after_ms: limit.as_millis() as u64,
            }),
        }
    }

    /// Stops taking requests, lets requests in flight finish (each is bounded by the request
    /// timeout) and closes the connections.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let tasks = match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        let limit = self.opts.request_timeout + Duration::from_secs(1);
        for task in tasks {
            if timeout(limit, task).await.is_err() {
                tracing::warn!("a claim session did not stop in time");
            }
        }
    }
}

impl Drop for ClaimPool {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

#[cfg(test)]
mod tests;
