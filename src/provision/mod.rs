//! The provisioning engine: takes device requests from downstream, keeps each device's state
//! machine (docs/architecture.md, "Provisioning state machine") in the store and drives it through the cloud [`Provider`].
//!
//! Data flow: the gateway's downstream session hands over a request -> [`request`] checks it
//! (payload, CSR, admission, per-device rate) -> the `Requested` (or `WaitingApproval`) record
//! is made durable -> only then the request is acknowledged to the broker -> the device id is
//! queued -> one of a bounded set of workers drives it ([`machine`]): key and CSR, certificate,
//! registration, delivery on `/accepted`. Every transition is written (group commit) before
//! the next network step, so a crash at any point resumes from the last durable state and
//! never provisions a device twice. On start every unfinished device is queued again, by a
//! background scan of the store: decoding every record (tens of milliseconds per 10,000
//! devices) must not delay readiness, and a request arriving meanwhile only gives its device
//! another pass ([`Inner::schedule`] deduplicates), so nothing is lost or driven twice.

mod limit;
mod machine;
mod metrics;
pub mod request;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Mutex, Semaphore};
use tokio::task::JoinHandle;

use crate::admission::SharedAdmission;
use crate::clock;
use crate::cloud::Provider;
use crate::device_id::DeviceId;
use crate::downstream::contract::{DeviceStatus, RejectedResponse, StatusReport};
use crate::downstream::{
    BrokerConnections, DeviceTopic, DownstreamMessage, DownstreamSession, PayloadFormat,
};
use crate::identity::{KeyType, Sealer};
use crate::store::{DeviceRecord, DeviceState, Store, StoreError};

pub use limit::DeviceRateLimit;
pub use metrics::ProvisionMeasurements;
pub use request::{AdmittedRequest, RequestPolicy};

/// Environment variable naming a device state (`certificateIssued`, `registering`, `registered`, ...):
/// the process exits right after persisting a device in that state. Crash-safety tests use it
/// to stop the daemon at an exact point between two cloud calls. Only builds with the
/// `test-hooks` feature read it: a release binary cannot be told to exit this way.
#[cfg(feature = "test-hooks")]
pub const CRASH_AFTER_ENV: &str = "FLEETGW_TEST_CRASH_AFTER";

/// Exit status of the process when [`CRASH_AFTER_ENV`] fires.
#[cfg(feature = "test-hooks")]
pub const CRASH_EXIT_CODE: i32 = 86;

/// How the engine behaves (from `[provision]` and `[downstream]` of the config).
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Payload, CSR and parameter rules for device requests.
    pub policy: RequestPolicy,
    /// Key type generated for devices that send no CSR.
    pub key_type: KeyType,
    /// Counted failures (timeouts, 5xx, bad responses) before a device is marked failed.
    pub max_attempts: u32,
    /// First retry delay (jittered, doubled per attempt).
    pub retry_base: Duration,
    /// Upper bound of the retry delay.
    pub retry_max: Duration,
    /// Requests per minute one device may send.
    pub device_rate_per_minute: u32,
    /// Devices driven at once.
    pub workers: usize,
    /// Requests checked and recorded at once.
    pub intake_concurrency: usize,
    /// How long [`Engine::shutdown`] waits for steps in flight.
    pub shutdown_grace: Duration,
    /// Certificates requested but not yet persisted, at most (set it to the number of claim
    /// sessions): a crash can orphan only these, so at most this many per crash.
    pub certificates_in_flight: usize,
    /// Which connections may be sent a gateway-generated private key.
    pub key_delivery: KeyDelivery,
}

/// Which device connections may be sent a gateway-generated private key
/// (`[downstream] allow_plain_key_delivery`).
#[derive(Clone, Debug, Default)]
pub enum KeyDelivery {
    /// Whichever connection asks on the device's topics: an external broker authenticates
    /// devices itself (the mosquitto recipe), or `allow_plain_key_delivery = true`.
    #[default]
    Anywhere,
    /// Only a device connection of the embedded broker that is TLS, from this host, or
    /// authenticated: a key sent in clear over the local network is a key anyone on it has.
    Secure {
        /// What the embedded broker knows about each client's connection.
        connections: BrokerConnections,
        /// Whether a loopback connection counts as this host (tests play a LAN host with
        /// `false`).
        trust_loopback: bool,
    },
}

impl KeyDelivery {
    /// Whether `device`'s current connection may be sent its private key.
    pub fn permits(&self, device: &DeviceId) -> bool {
        match self {
            KeyDelivery::Anywhere => true,
            KeyDelivery::Secure {
                connections,
                trust_loopback,
            } => connections.facts(device.as_str()).is_some_and(|f| {
                f.tls || f.authenticated || (*trust_loopback && f.peer.ip().is_loopback())
            }),
        }
    }
}

impl EngineOptions {
    /// Defaults matching the config defaults.
    pub fn new(policy: RequestPolicy) -> Self {
        EngineOptions {
            policy,
            key_type: KeyType::EcdsaP256,
            max_attempts: 10,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            device_rate_per_minute: 30,
            workers: 256,
            intake_concurrency: 1024,
            shutdown_grace: Duration::from_secs(15),
            certificates_in_flight: 4,
            key_delivery: KeyDelivery::Anywhere,
        }
    }
}

/// Counters of the engine, for logs, the admin API and the demo.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Devices that reached `Delivered` since start.
    pub provisioned: u64,
    /// Devices that reached `Failed` since start.
    pub failed: u64,
    /// Requests refused on `/rejected` without being stored.
    pub rejected_requests: u64,
    /// Repeated requests answered from the store.
    pub answered_from_store: u64,
    /// Devices resumed from the store at start (so far, while the resume scan runs).
    pub resumed: u64,
    /// Devices currently queued, in progress or waiting for a retry.
    pub active: u64,
}

#[derive(Debug, Default)]
struct Counters {
    provisioned: AtomicU64,
    failed: AtomicU64,
    rejected_requests: AtomicU64,
    answered_from_store: AtomicU64,
    resumed: AtomicU64,
}

/// The parts the engine works with.
pub struct EngineParts {
    /// The state store.
    pub store: Store,
    /// The cloud.
    pub provider: Arc<dyn Provider>,
    /// Where responses to devices go.
    pub downstream: Arc<DownstreamSession>,
    /// Who may provision.
    pub admission: SharedAdmission,
    /// Seals generated private keys at rest, when configured.
    pub sealer: Option<Sealer>,
}

pub(crate) struct Inner {
    store: Store,
    provider: Arc<dyn Provider>,
    downstream: Arc<DownstreamSession>,
    admission: SharedAdmission,
    sealer: Option<Sealer>,
    opts: EngineOptions,
    /// Devices queued or being driven; the flag asks for another pass when the current one ends.
    active: std::sync::Mutex<HashMap<DeviceId, bool>>,
    jobs: mpsc::UnboundedSender<DeviceId>,
    limit: std::sync::Mutex<DeviceRateLimit>,
    stopping: watch::Sender<bool>,
    /// Becomes true when the resume scan has queued every unfinished device.
    resume_done: watch::Sender<bool>,
    counters: Counters,
    metrics: metrics::ProvisionMetrics,
    /// The state named by [`CRASH_AFTER_ENV`], if set.
    #[cfg(feature = "test-hooks")]
    crash_after: Option<String>,
    /// Held from CreateCertificateFromCsr until its result is durable.
    certificate_permits: Semaphore,
}

/// The running engine.
pub struct Engine {
    inner: Arc<Inner>,
    resume: std::sync::Mutex<Option<JoinHandle<()>>>,
    intake: std::sync::Mutex<Option<JoinHandle<()>>>,
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("stats", &self.stats())
            .finish()
    }
}

/// What to tell a device after its request was acknowledged.
enum FollowUp {
    Nothing,
    Reject(PayloadFormat, RejectedResponse),
    Accepted(PayloadFormat, Vec<u8>),
    Status(StatusReport),
}

impl Engine {
    /// Starts the workers and the intake of `requests`, and queues every unfinished device
    /// from the store in the background (see [`Engine::resumed`]).
    pub fn start(
        parts: EngineParts,
        opts: EngineOptions,
        requests: mpsc::Receiver<DownstreamMessage>,
    ) -> Self {
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let (stopping, _) = watch::channel(false);
        let (resume_done, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            store: parts.store,
            provider: parts.provider,
            downstream: parts.downstream,
            admission: parts.admission,
            sealer: parts.sealer,
            limit: std::sync::Mutex::new(DeviceRateLimit::new(opts.device_rate_per_minute)),
            certificate_permits: Semaphore::new(opts.certificates_in_flight.max(1)),
            opts,
            active: std::sync::Mutex::new(HashMap::new()),
            jobs,
            stopping,
            resume_done,
            counters: Counters::default(),
            metrics: metrics::ProvisionMetrics::default(),
            #[cfg(feature = "test-hooks")]
            crash_after: std::env::var(CRASH_AFTER_ENV)
                .ok()
                .filter(|s| !s.is_empty()),
        });

        let resume = {
            let inner = inner.clone();
            tokio::task::spawn_blocking(move || inner.resume_from_store())
        };

        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let workers = (0..inner.opts.workers.max(1))
            .map(|_| tokio::spawn(machine::worker(inner.clone(), jobs_rx.clone())))
            .collect();
        let intake = tokio::spawn(intake(inner.clone(), requests));
        Engine {
            inner,
            resume: std::sync::Mutex::new(Some(resume)),
            intake: std::sync::Mutex::new(Some(intake)),
            workers: std::sync::Mutex::new(workers),
        }
    }

    /// Queues `device` to be driven (e.g. after an operator approved it).
    pub fn schedule(&self, device: &DeviceId) {
        self.inner.schedule(device);
    }

    /// Waits until the resume scan has queued every unfinished device from the store, and
    /// returns how many it queued.
    pub async fn resumed(&self) -> u64 {
        let mut done = self.inner.resume_done.subscribe();
        let _ = done.wait_for(|d| *d).await;
        self.inner.counters.resumed.load(Ordering::Relaxed)
    }

    /// Changes the requests one device may send per minute
    /// (`downstream.device_rate_per_minute`, on reload).
    pub fn set_device_rate_per_minute(&self, per_minute: u32) {
        lock(&self.inner.limit).set_per_minute(per_minute, tokio::time::Instant::now());
    }

    /// Whether the intake and at least one worker are still running (the watchdog's health
    /// check): a panicked or ended loop means requests are no longer handled.
    pub fn is_alive(&self) -> bool {
        let intake_alive = lock(&self.intake)
            .as_ref()
            .is_some_and(|h| !h.is_finished());
        let worker_alive = lock(&self.workers).iter().any(|h| !h.is_finished());
        intake_alive && worker_alive
    }

    /// Current counters.
    pub fn stats(&self) -> EngineStats {
        let c = &self.inner.counters;
        EngineStats {
            provisioned: c.provisioned.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            rejected_requests: c.rejected_requests.load(Ordering::Relaxed),
            answered_from_store: c.answered_from_store.load(Ordering::Relaxed),
            resumed: c.resumed.load(Ordering::Relaxed),
            active: lock(&self.inner.active).len() as u64,
        }
    }

    /// Cloud calls by API and outcome, and request -> delivered latency, since start.
    pub fn measurements(&self) -> ProvisionMeasurements {
        self.inner.metrics.snapshot()
    }

    /// Stops taking requests, lets every step in flight persist its result (bounded by the
    /// shutdown grace), then returns. The caller flushes the store afterwards.
    pub async fn shutdown(&self) {
        let _ = self.inner.stopping.send(true);
        let resume = lock(&self.resume).take();
        let intake = lock(&self.intake).take();
        let workers = std::mem::take(&mut *lock(&self.workers));
        let grace = self.inner.opts.shutdown_grace;
        let all = async {
            // The scan stops at the next record once stopping is set; what it did not reach
            // is still unfinished in the store and resumes on the next start.
            if let Some(resume) = resume {
                let _ = resume.await;
            }
            if let Some(intake) = intake {
                let _ = intake.await;
            }
            for w in workers {
                let _ = w.await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "provisioning steps still running at shutdown; they resume on the next start"
            );
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these maps leaves them consistent (single inserts/removes).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads device requests until shutdown; each is handled in its own task (bounded), so many
/// `Requested` writes share one flush.
async fn intake(inner: Arc<Inner>, mut requests: mpsc::Receiver<DownstreamMessage>) {
    let limit = Arc::new(Semaphore::new(inner.opts.intake_concurrency.max(1)));
    let mut stopping = inner.stopping.subscribe();
    loop {
        let msg = tokio::select! {
            m = requests.recv() => match m {
                Some(m) => m,
                None => break,
            },
            _ = stopping.wait_for(|s| *s) => break,
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            inner.handle_message(msg).await;
            drop(permit);
        });
    }
    // Requests already taken finish recording (and are acknowledged) before shutdown goes on.
    let total = inner.opts.intake_concurrency.max(1) as u32;
    let _ = limit.acquire_many(total).await;
}

impl Inner {
    /// Queues every drivable device of the store (run once, on a blocking thread, at start).
    /// A record that cannot be decoded is logged and left in the store as it is.
    fn resume_from_store(&self) {
        let started = std::time::Instant::now();
        let mut unreadable = 0u64;
        for rec in self.store.devices() {
            if self.is_stopping() {
                break;
            }
            match rec {
                Ok(rec) if machine::is_drivable(&rec.state) => {
                    self.schedule(&rec.id);
                    self.counters.resumed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    unreadable += 1;
                    tracing::error!(
                        "resuming unfinished devices: {e}; the record is left as it is"
                    );
                }
            }
        }
        let resumed = self.counters.resumed.load(Ordering::Relaxed);
        if resumed > 0 || unreadable > 0 {
            tracing::info!(
                devices = resumed,
                unreadable,
                scan_ms = started.elapsed().as_millis() as u64,
                "resuming unfinished devices from the store"
            );
        }
        // send_replace: the value must stick even while nobody is subscribed yet.
        self.resume_done.send_replace(true);
    }

    /// Queues `device` unless it is already queued or being driven (then it gets another pass).
    pub(crate) fn schedule(&self, device: &DeviceId) {
        let mut active = lock(&self.active);
        match active.get_mut(device) {
            Some(again) => *again = true,
            None => {
                active.insert(device.clone(), false);
                // The receiver lives as long as the workers; after shutdown nothing is driven.
                let _ = self.jobs.send(device.clone());
            }
        }
    }

    /// Called when a pass over `device` ended; true if another pass was asked for meanwhile.
    pub(crate) fn finish_pass(&self, device: &DeviceId) -> bool {
        let mut active = lock(&self.active);
        match active.get_mut(device) {
            Some(again) if *again => {
                *again = false;
                true
            }
            _ => {
                active.remove(device);
                false
            }
        }
    }

    pub(crate) fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    async fn handle_message(self: &Arc<Self>, msg: DownstreamMessage) {
        let DownstreamMessage {
            topic,
            payload,
            ack,
            ..
        } = msg;
        let (device, format) = match topic {
            DeviceTopic::ProvisionRequest { device, format } => (device, format),
            other => {
                tracing::debug!(device = %other.device(), "not a provisioning request; ignored by the engine");
                ack.ack();
                return;
            }
        };
        let follow_up = self.handle_request(&device, format, &payload).await;
        // Acknowledged only now: whatever the request changed is durable.
        ack.ack();
        self.send_follow_up(&device, follow_up).await;
    }

    async fn send_follow_up(&self, device: &DeviceId, follow_up: FollowUp) {
        let result = match follow_up {
            FollowUp::Nothing => Ok(()),
            FollowUp::Reject(fmt, rejected) => {
                // A flooding device must not flood the log as well.
                if rejected.status_code == 429 {
                    tracing::debug!(%device, "request refused: {}", rejected.error_message);
                } else {
                    tracing::info!(%device, code = %rejected.error_code, "request refused: {}", rejected.error_message);
                }
                self.counters
                    .rejected_requests
                    .fetch_add(1, Ordering::Relaxed);
                self.downstream.reject(device, fmt, &rejected).await
            }
            FollowUp::Accepted(fmt, body) => {
                self.counters
                    .answered_from_store
                    .fetch_add(1, Ordering::Relaxed);
                self.downstream.publish_accepted(device, fmt, body).await
            }
            FollowUp::Status(report) => self.downstream.publish_status(device, &report).await,
        };
        if let Err(e) = result {
            tracing::warn!(%device, "answering the device failed: {e}");
        }
    }

    async fn handle_request(
        &self,
        device: &DeviceId,
        format: PayloadFormat,
        payload: &[u8],
    ) -> FollowUp {
        if !lock(&self.limit).allow(device, tokio::time::Instant::now()) {
            return FollowUp::Reject(
                format,
                RejectedResponse::new(
                    429,
                    request::error_code::TOO_MANY_REQUESTS,
                    format!(
                        "device {device} sent more than {} requests per minute; wait and retry",
                        self.opts.device_rate_per_minute
                    ),
                ),
            );
        }
        let now_unix = (clock::unix_ms() / 1000) as i64;
        let admitted = match request::check_request(
            &self.opts.policy,
            &self.admission.current(),
            device,
            format,
            payload,
            now_unix,
        ) {
            Ok(a) => a,
            Err(rejected) => return FollowUp::Reject(format, rejected),
        };
        if admitted.own_csr.is_none() && !self.opts.key_delivery.permits(device) {
            return FollowUp::Reject(
                format,
                RejectedResponse::new(
                    403,
                    request::error_code::PLAIN_KEY_DELIVERY_REFUSED,
                    "this gateway sends a generated private key only over TLS, to a device on \
                     its own host, or to an authenticated device: send your own CSR (\"csr\") \
                     or connect to the TLS listener",
                ),
            );
        }
        let existing = match self.store.device(device) {
            Ok(r) => r,
            Err(e) => return store_unavailable(format, device, &e),
        };
        if let Some(rec) = &existing {
            if let Some(answer) = self.answer_existing(rec, format) {
                return answer;
            }
        }
        self.record_request(device, format, admitted).await
    }

    /// The answer for a device the store already knows, or `None` to start it (again).
    fn answer_existing(&self, rec: &DeviceRecord, format: PayloadFormat) -> Option<FollowUp> {
        match &rec.state {
            DeviceState::Delivered => Some(match machine::accepted_payload(self, rec, format) {
                Ok(body) => FollowUp::Accepted(format, body),
                Err(rejected) => FollowUp::Reject(format, rejected),
            }),
            DeviceState::Blocked => Some(FollowUp::Reject(
                format,
                RejectedResponse::new(
                    403,
                    request::error_code::DEVICE_BLOCKED,
                    format!("device {} is blocked by the gateway operator", rec.id),
                ),
            )),
            DeviceState::WaitingApproval => Some(FollowUp::Status(StatusReport::new(
                DeviceStatus::WaitingApproval,
                rec.updated_at_ms,
            ))),
            DeviceState::Failed { .. } => None,
            _ => {
                // In progress: its worker answers when done; make sure one is on it.
                self.schedule(&rec.id);
                Some(FollowUp::Status(StatusReport::new(
                    DeviceStatus::Provisioning,
                    rec.updated_at_ms,
                )))
            }
        }
    }

    /// Makes the request durable as a new `Requested`/`WaitingApproval` record (also over a
    /// failed one, starting again), unless another request of the device got there first.
    async fn record_request(
        &self,
        device: &DeviceId,
        format: PayloadFormat,
        admitted: AdmittedRequest,
    ) -> FollowUp {
        let now = clock::unix_ms();
        let mut created = None;
        let result = self
            .store
            .update_device(device, None, |current| {
                let mut rec = match current {
                    None => DeviceRecord::new(device.clone(), format.as_str(), now),
                    Some(cur) if matches!(cur.state, DeviceState::Failed { .. }) => {
                        let mut rec = DeviceRecord::new(device.clone(), format.as_str(), now);
                        rec.created_at_ms = cur.created_at_ms;
                        rec.last_error = cur.last_error;
                        rec.enabled = cur.enabled;
                        rec
                    }
                    Some(_) => return None,
                };
                rec.state = if admitted.needs_approval {
                    DeviceState::WaitingApproval
                } else {
                    DeviceState::Requested
                };
                rec.provision.own_csr = admitted.own_csr.clone();
                rec.provision.parameters = admitted.parameters.clone();
                created = Some(rec.state.clone());
                Some(rec)
            })
            .await;
        let rec = match result {
            Ok(rec) => rec,
            Err(e) => return store_unavailable(format, device, &e),
        };
        match created {
            Some(DeviceState::WaitingApproval) => {
                tracing::info!(%device, "device waits for an operator's approval");
                FollowUp::Status(StatusReport::new(
                    DeviceStatus::WaitingApproval,
                    rec.updated_at_ms,
                ))
            }
            Some(_) => {
                tracing::debug!(%device, own_csr = admitted.own_csr.is_some(), "provisioning request recorded");
                self.schedule(device);
                FollowUp::Status(StatusReport::new(
                    DeviceStatus::Provisioning,
                    rec.updated_at_ms,
                ))
            }
            // A concurrent request of the same device recorded it first.
            None => self
                .answer_existing(&rec, format)
                .unwrap_or(FollowUp::Nothing),
        }
    }
}

fn store_unavailable(format: PayloadFormat, device: &DeviceId, e: &StoreError) -> FollowUp {
    tracing::error!(%device, "store: {e}");
    FollowUp::Reject(
        format,
        RejectedResponse::new(
            503,
            request::error_code::GATEWAY_UNAVAILABLE,
            "the gateway cannot record requests right now; retry later",
        ),
    )
}

#[cfg(test)]
mod key_delivery_tests;
