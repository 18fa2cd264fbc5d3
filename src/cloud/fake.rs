//! A scriptable, in-memory [`Provider`] for tests: the provisioning engine's state machine can
//! be driven through every cloud answer (success, a 4xx or 5xx rejection, throttling, a
//! timeout, a lost connection, a refused ownership token, a slow answer) without a network, an
//! emulator or a process. Built for the crate's own tests and with the `test-hooks` feature.
//!
//! Each call takes the next scripted [`Reply`] for its API, in the order they were scripted;
//! with none left it answers as a healthy cloud would. Every call is recorded ([`Call`]) before
//! its reply, so a test can assert what the engine asked and how often.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use super::{
    BoxFuture, CertificateSource, CloudError, IssuedCertificate, Provider, RegisterInput,
    RegisterOutcome, Registration, TelemetryProfile, UpstreamSpec, Upstreams,
    INVALID_OWNERSHIP_TOKEN,
};
use crate::clock;
use crate::device_id::DeviceId;
use crate::identity::Secret;

pub use super::Api;

/// What one call answers.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Answer as a healthy cloud would.
    Succeed,
    /// [`Api::CreateCertificate`] only: issue a certificate whose ownership token expires
    /// `ttl` after issue (zero: already expired when the engine looks at it).
    IssueWithTokenTtl(Duration),
    /// [`Api::Register`] and [`Api::Poll`]: answer that the registration is still running
    /// (operation `op-{device}`), to be polled after `retry_after`.
    Pending(Duration),
    /// Fail with this error.
    Fail(CloudError),
}

/// One scripted answer: an outcome, given after a delay.
#[derive(Clone, Debug)]
pub struct Reply {
    /// What the call returns.
    pub outcome: Outcome,
    /// How long the call takes before returning it.
    pub delay: Duration,
}

/// A call the provider received, in arrival order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// A CSR to exchange for a certificate.
    CreateCertificate {
        /// The device.
        device: DeviceId,
        /// The CSR as sent.
        csr_pem: String,
    },
    /// A registration with an issued certificate.
    Register {
        /// The device.
        device: DeviceId,
        /// The certificate being activated.
        certificate_id: String,
        /// The ownership token presented (text).
        ownership_token: String,
        /// The template parameters.
        parameters: BTreeMap<String, String>,
    },
    /// A poll of a pending registration.
    Poll {
        /// The device.
        device: DeviceId,
        /// The operation polled.
        operation: String,
    },
}

impl Call {
    /// Which API was called.
    pub fn api(&self) -> Api {
        match self {
            Call::CreateCertificate { .. } => Api::CreateCertificate,
            Call::Register { .. } => Api::Register,
            Call::Poll { .. } => Api::Poll,
        }
    }

    /// The device the call was for.
    pub fn device(&self) -> &DeviceId {
        match self {
            Call::CreateCertificate { device, .. }
            | Call::Register { device, .. }
            | Call::Poll { device, .. } => device,
        }
    }
}

#[derive(Default)]
struct State {
    create: VecDeque<Reply>,
    register: VecDeque<Reply>,
    poll: VecDeque<Reply>,
    calls: Vec<Call>,
    issued: u64,
}

/// The fake cloud. Share it as `Arc<FakeProvider>` and hand a clone to the engine as
/// `Arc<dyn Provider>`.
pub struct FakeProvider {
    state: Mutex<State>,
    token_ttl: Duration,
}

impl std::fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvider")
            .field("calls", &self.lock().calls.len())
            .finish_non_exhaustive()
    }
}

impl Default for FakeProvider {
    fn default() -> Self {
        Self::new()
    }
}

/// Ownership tokens of a healthy fake cloud live this long (AWS: 5 minutes).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

/// The thing name a successful [`Api::Register`] returns for `device`.
pub fn thing_name(device: &DeviceId) -> String {
    format!("thing-{device}")
}

impl FakeProvider {
    /// A provider that answers every call successfully until told otherwise.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            token_ttl: DEFAULT_TOKEN_TTL,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Test bookkeeping only; a panicking test thread must not hide the others' results.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `outcome` as the answer of the next not yet scripted call of `api`.
    pub fn script(&self, api: Api, outcome: Outcome) -> &Self {
        self.script_delayed(api, Duration::ZERO, outcome)
    }

    /// Like [`script`](Self::script), the call taking `delay` before it answers.
    pub fn script_delayed(&self, api: Api, delay: Duration, outcome: Outcome) -> &Self {
        let reply = Reply { outcome, delay };
        let mut st = self.lock();
        match api {
            Api::CreateCertificate => st.create.push_back(reply),
            Api::Register => st.register.push_back(reply),
            Api::Poll => st.poll.push_back(reply),
        }
        self
    }

    /// Queues `n` failures with `error` for `api`.
    pub fn fail_times(&self, api: Api, n: usize, error: &CloudError) -> &Self {
        for _ in 0..n {
            self.script(api, Outcome::Fail(error.clone()));
        }
        self
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// How many calls of `api` arrived so far.
    pub fn count(&self, api: Api) -> usize {
        self.lock().calls.iter().filter(|c| c.api() == api).count()
    }

    /// Scripted replies not yet used, per API: `(create, register)`.
    pub fn pending(&self) -> (usize, usize) {
        let st = self.lock();
        (st.create.len(), st.register.len())
    }

    /// Records `call` and takes the next scripted reply of its API.
    fn take(&self, call: Call) -> Reply {
        let mut st = self.lock();
        let api = call.api();
        st.calls.push(call);
        let queue = match api {
            Api::CreateCertificate => &mut st.create,
            Api::Register => &mut st.register,
            Api::Poll => &mut st.poll,
        };
        queue.pop_front().unwrap_or(Reply {
            outcome: Outcome::Succeed,
            delay: Duration::ZERO,
        })
    }
}

impl Upstreams for FakeProvider {
    fn upstream(
        &self,
        device: &DeviceId,
        cloud_id: &str,
        endpoint: Option<&str>,
    ) -> Result<UpstreamSpec, CloudError> {
        // AWS's convention at a placeholder endpoint: the fake has no data plane.
        let aws = crate::telemetry::UpstreamEndpoint {
            host: "localhost".into(),
            port: 8883,
            ca_pem: String::new(),
        };
        aws.upstream(device, cloud_id, endpoint)
    }
}

impl Provider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn certificate_source(&self) -> CertificateSource {
        CertificateSource::Cloud
    }

    fn api_name(&self, api: Api) -> &'static str {
        api.name()
    }

    fn create_certificate<'a>(
        &'a self,
        device: &'a DeviceId,
        csr_pem: &'a str,
    ) -> BoxFuture<'a, Result<IssuedCertificate, CloudError>> {
        let reply = self.take(Call::CreateCertificate {
            device: device.clone(),
            csr_pem: csr_pem.to_string(),
        });
        Box::pin(async move {
            tokio::time::sleep(reply.delay).await;
            let ttl = match reply.outcome {
                Outcome::Fail(e) => return Err(e),
                Outcome::Succeed | Outcome::Pending(_) => self.token_ttl,
                Outcome::IssueWithTokenTtl(ttl) => ttl,
            };
            let n = {
                let mut st = self.lock();
                st.issued += 1;
                st.issued
            };
            Ok(IssuedCertificate {
                certificate_id: format!("cert-{n}"),
                certificate_pem: format!(
                    "-----BEGIN CERTIFICATE-----\nfake certificate {n} for {device}\n-----END CERTIFICATE-----\n"
                ),
                ownership_token: Some(Secret::from(format!("token-{n}"))),
                expires_at_ms: Some(clock::unix_ms() + ttl.as_millis() as u64),
            })
        })
    }

    fn register<'a>(
        &'a self,
        input: RegisterInput<'a>,
    ) -> BoxFuture<'a, Result<RegisterOutcome, CloudError>> {
        let issued = input.certificate;
        let reply = self.take(Call::Register {
            device: input.device.clone(),
            certificate_id: issued.map(|i| i.certificate_id.clone()).unwrap_or_default(),
            ownership_token: issued
                .and_then(|i| i.ownership_token.as_ref())
                .and_then(|t| t.expose_str())
                .unwrap_or_default()
                .to_string(),
            parameters: input.parameters.clone(),
        });
        Box::pin(async move { answer(reply, input).await })
    }

    fn poll<'a>(
        &'a self,
        input: RegisterInput<'a>,
        operation: &'a str,
    ) -> BoxFuture<'a, Result<RegisterOutcome, CloudError>> {
        let reply = self.take(Call::Poll {
            device: input.device.clone(),
            operation: operation.to_string(),
        });
        Box::pin(async move { answer(reply, input).await })
    }

    fn telemetry_profile(&self) -> TelemetryProfile {
        crate::cloud::aws::telemetry_profile(&crate::config::TelemetrySection::default())
            .unwrap_or_else(|_| unreachable!("the default telemetry topics parse"))
    }

    fn sessions(&self) -> (usize, usize) {
        (1, 1)
    }

    fn set_tps(&self, _tps: f64) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The registration's answer: the scripted one after its delay.
async fn answer(reply: Reply, input: RegisterInput<'_>) -> Result<RegisterOutcome, CloudError> {
    tokio::time::sleep(reply.delay).await;
    match reply.outcome {
        Outcome::Fail(e) => Err(e),
        Outcome::Pending(retry_after) => Ok(RegisterOutcome::Pending {
            operation: format!("op-{}", input.device),
            retry_after,
        }),
        Outcome::Succeed | Outcome::IssueWithTokenTtl(_) => {
            Ok(RegisterOutcome::Done(Registration {
                cloud_id: thing_name(input.device),
                endpoint: None,
                extras: input.parameters.clone(),
            }))
        }
    }
}

/// The cloud refused the call with `status_code` and `error_code` (4xx: permanent, 5xx:
/// transient; 429 or a throttling code is classified as throttling, as the real clients do).
pub fn rejected(api: Api, status_code: u16, error_code: &str) -> CloudError {
    CloudError::from_response(
        api.name(),
        status_code,
        error_code.to_string(),
        format!("scripted {status_code} {error_code}"),
    )
}

/// The cloud asked to slow down (429 `Throttling`).
pub fn throttled(api: Api) -> CloudError {
    rejected(api, 429, "Throttling")
}

/// No answer within the request timeout.
pub fn timeout(api: Api) -> CloudError {
    CloudError::Timeout {
        api: api.name(),
        after_ms: 10_000,
    }
}

/// The connection to the cloud dropped before the answer.
pub fn connection_lost(api: Api) -> CloudError {
    CloudError::Disconnected {
        api: api.name(),
        reason: "scripted connection loss".into(),
    }
}

/// RegisterThing refused the ownership token (unknown, expired or already used).
pub fn invalid_token() -> CloudError {
    rejected(Api::Register, 400, INVALID_OWNERSHIP_TOKEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str) -> DeviceId {
        DeviceId::parse(id).expect("a valid test device id")
    }

    #[tokio::test]
    async fn answers_in_script_order_then_succeeds_and_records_every_call() {
        let fake = FakeProvider::new();
        fake.script(
            Api::CreateCertificate,
            Outcome::Fail(throttled(Api::CreateCertificate)),
        )
        .script(
            Api::CreateCertificate,
            Outcome::Fail(timeout(Api::CreateCertificate)),
        );
        let d = device("dev-1");
        let first = fake.create_certificate(&d, "csr").await.unwrap_err();
        assert!(first.is_throttling());
        let second = fake.create_certificate(&d, "csr").await.unwrap_err();
        assert!(matches!(second, CloudError::Timeout { .. }));
        let issued = fake.create_certificate(&d, "csr").await.unwrap();
        assert_eq!(issued.certificate_id, "cert-1");
        assert!(issued.expires_at_ms > Some(clock::unix_ms()));

        let params = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let reg = fake
            .register(RegisterInput {
                device: &d,
                certificate: Some(&issued),
                key_pem: None,
                parameters: &params,
            })
            .await
            .unwrap();
        let RegisterOutcome::Done(reg) = reg else {
            panic!("expected a registration, got {reg:?}")
        };
        assert_eq!(reg.cloud_id, thing_name(&d));
        assert_eq!(fake.count(Api::CreateCertificate), 3);
        assert_eq!(
            fake.calls().last(),
            Some(&Call::Register {
                device: d.clone(),
                certificate_id: "cert-1".into(),
                ownership_token: "token-1".into(),
                parameters: params,
            })
        );
        assert_eq!(fake.pending(), (0, 0));
    }

    #[tokio::test]
    async fn a_delayed_reply_takes_its_time() {
        let fake = FakeProvider::new();
        let delay = Duration::from_millis(50);
        fake.script_delayed(Api::CreateCertificate, delay, Outcome::Succeed);
        let d = device("dev-2");
        let started = tokio::time::Instant::now();
        fake.create_certificate(&d, "csr").await.unwrap();
        assert!(started.elapsed() >= delay);
    }

    #[test]
    fn error_helpers_classify_like_the_real_clients() {
        assert!(!rejected(Api::Register, 404, "ResourceNotFound").is_transient());
        assert!(rejected(Api::Register, 503, "ServiceUnavailable").is_transient());
        assert!(throttled(Api::Register).is_throttling());
        assert!(connection_lost(Api::Register).is_transient());
        assert!(invalid_token().is_token_invalid());
    }
}
