//! Drives one device through the state machine, one persisted step at a time:
//!
//! ```text
//! Requested/Approved -> KeyReady(csr) -> CertificateIssued(cert, token?) -> [Registering(op)]
//!   -> Registered -> Delivered;  any -> Failed (permanent error or max_attempts)
//! ```
//!
//! Which steps a device takes depends on the provider: AWS issues the certificate from the
//! CSR (with an ownership token) and registers at once; Azure DPS X.509 has the gateway's
//! enrollment-group CA issue it (no token) and may answer `assigning`, persisted as
//! `Registering` before the first poll; Azure DPS symmetric key needs no key pair at all and
//! goes from `Approved` straight to the registration.
//!
//! Each step reads the device's durable record, does at most one network call, and writes the
//! next state (compare-and-swap on the etag) before the next step starts. A conflict (an
//! operator changed the device meanwhile) re-reads the record. Transient cloud errors keep the
//! state and retry later with jittered exponential back-off; throttling and an unreachable cloud
//! do not count as attempts. An expired or refused ownership token sends the device back to
//! `KeyReady` for a new certificate.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};

use crate::backoff::Backoff;
use crate::clock;
use crate::cloud::{
    Api, CertificateSource, CloudError, IssuedCertificate, RegisterInput, RegisterOutcome,
    Registration,
};
use crate::device_id::DeviceId;
use crate::downstream::contract::{
    self, AcceptedResponse, DeviceStatus, RejectedResponse, StatusReport,
};
use crate::downstream::PayloadFormat;
use crate::identity::{self, KeyType, PrivateKey, Secret};
use crate::store::{
    Batch, DeviceRecord, DeviceState, ErrorInfo, OwnershipToken, OwnershipTokenRecord, StoreError,
    TOKEN_RECORD_VERSION,
};

use super::Inner;

/// What a step leaves to do.
enum Step {
    /// The record changed; take the next step.
    Next,
    /// This step wrote the record as given (its etag the stored one); take the next step from
    /// it, unless the store holds a newer version by then.
    Committed(Box<DeviceRecord>),
    /// Nothing more to do now (final state, waiting for an operator, or shutting down).
    Done,
    /// Try again after this delay.
    RetryAfter(Duration),
}

/// States the engine moves on by itself.
pub(super) fn is_drivable(state: &DeviceState) -> bool {
    matches!(
        state,
        DeviceState::Requested
            | DeviceState::Approved
            | DeviceState::KeyReady { .. }
            | DeviceState::CertificateIssued { .. }
            | DeviceState::Registering { .. }
            | DeviceState::Registered { .. }
    )
}

/// One worker: takes queued devices and drives each until it is done or must wait.
pub(super) async fn worker(inner: Arc<Inner>, jobs: Arc<Mutex<mpsc::UnboundedReceiver<DeviceId>>>) {
    let mut stopping = inner.stopping.subscribe();
    loop {
        let device = tokio::select! {
            d = async { jobs.lock().await.recv().await } => match d {
                Some(d) => d,
                None => return,
            },
            _ = stopping.wait_for(|s| *s) => return,
        };
        loop {
            match drive(&inner, &device).await {
                Some(delay) => {
                    // The device stays active while it waits, so requests do not start it twice.
                    let inner = inner.clone();
                    let device = device.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        if !inner.is_stopping() {
                            let _ = inner.jobs.send(device);
                        }
                    });
                    break;
                }
                None => {
                    if !inner.finish_pass(&device) {
                        break;
                    }
                }
            }
        }
    }
}

/// Takes steps until the device is done (`None`) or must retry after a delay.
async fn drive(inner: &Inner, device: &DeviceId) -> Option<Duration> {
    // The record the last step wrote: read back only when the stored etag moved on, which
    // spares each step decoding the record it has just encoded.
    let mut known: Option<DeviceRecord> = None;
    loop {
        if inner.is_stopping() {
            return None;
        }
        let read = match known.take() {
            Some(known) => inner.store.device_since(known),
            None => inner.store.device(device),
        };
        let rec = match read {
            Ok(Some(rec)) => rec,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(%device, "store: {e}");
                return Some(inner.opts.retry_max);
            }
        };
        let step = match rec.state.clone() {
            DeviceState::Requested | DeviceState::Approved => {
                match inner.provider.certificate_source() {
                    CertificateSource::None => register(inner, rec, None).await,
                    CertificateSource::Cloud | CertificateSource::Gateway => {
                        prepare_key(inner, rec).await
                    }
                }
            }
            DeviceState::KeyReady { csr, .. } => create_certificate(inner, rec, &csr).await,
            DeviceState::CertificateIssued {
                certificate_id,
                certificate_pem,
                ownership_token,
                token_expires_at_ms,
            } => {
                let issued = IssuedCertificate {
                    certificate_id,
                    certificate_pem,
                    ownership_token: ownership_token.map(|t| Secret::from(t.expose())),
                    expires_at_ms: token_expires_at_ms,
                };
                register(inner, rec, Some(issued)).await
            }
            DeviceState::Registering { operation_id, .. } => poll(inner, rec, &operation_id).await,
            DeviceState::Registered { .. } => deliver(inner, rec).await,
            _ => Step::Done,
        };
        match step {
            Step::Next => continue,
            Step::Committed(rec) => {
                known = Some(*rec);
                continue;
            }
            Step::Done => return None,
            Step::RetryAfter(d) => return Some(d),
        }
    }
}

/// Writes `next` (and the batch's other changes) if the record is still `prev`'s version.
async fn commit(
    inner: &Inner,
    prev: &DeviceRecord,
    mut next: DeviceRecord,
    mut batch: Batch,
) -> Step {
    next.updated_at_ms = clock::unix_ms();
    #[cfg(feature = "test-hooks")]
    let state = next.state.name();
    // The record as a read would return it once the batch is in: unsealed, etag bumped. The
    // batch shares it (the store copies it only to seal a token).
    next.etag = prev.etag + 1;
    let committed = std::sync::Arc::new(next);
    batch.put_shared_device_if(std::sync::Arc::clone(&committed), prev.etag);
    match inner.store.apply(batch).await {
        Ok(()) => {
            #[cfg(feature = "test-hooks")]
            if inner.crash_after.as_deref() == Some(state) {
                tracing::warn!(device = %prev.id, state, "{}: exiting as asked", super::CRASH_AFTER_ENV);
                std::process::exit(super::CRASH_EXIT_CODE);
            }
            Step::Committed(Box::new(std::sync::Arc::unwrap_or_clone(committed)))
        }
        // Changed meanwhile (e.g. blocked by an operator): look again.
        Err(StoreError::Conflict { .. }) => Step::Next,
        Err(e) => {
            tracing::error!(device = %prev.id, "store: {e}");
            Step::RetryAfter(inner.opts.retry_max)
        }
    }
}

async fn prepare_key(inner: &Inner, rec: DeviceRecord) -> Step {
    // Refused before anything is issued: the registration would need the device's key.
    if rec.provision.own_csr.is_some() && inner.provider.needs_device_key() {
        let error = device_key_required(inner, &rec);
        return fail(inner, rec, error).await;
    }
    let mut next = rec.clone();
    let mut batch = Batch::new();
    let csr = match rec.provision.own_csr.clone() {
        Some(own) => {
            next.provision.gateway_key = false;
            own
        }
        None => {
            let kt = inner.opts.key_type;
            let cn = rec.id.as_str().to_string();
            let make = move || {
                let key = PrivateKey::generate(kt)?;
                let csr = identity::create_csr(&cn, &key)?;
                Ok::<_, identity::IdentityError>((key.to_pkcs8_pem(), csr))
            };
            // RSA key generation takes long enough to stall a runtime thread. An ECDSA key and
            // its CSR take about 0.1 ms, less than handing them to the blocking pool and back
            // costs (two thread wake-ups per device), so they are made in place.
            let made = match kt {
                KeyType::EcdsaP256 | KeyType::EcdsaP384 => Ok(make()),
                KeyType::Rsa2048 | KeyType::Rsa3072 => tokio::task::spawn_blocking(make).await,
            };
            let (key_pem, csr) = match made {
                Ok(Ok(made)) => made,
                Ok(Err(e)) => {
                    let error = ErrorInfo {
                        status_code: 500,
                        error_code: "KeyGenerationFailed".into(),
                        error_message: format!("generating a {kt} key for device {}: {e}", rec.id),
                    };
                    return fail(inner, rec, error).await;
                }
                Err(e) => {
                    tracing::error!(device = %rec.id, "key generation task: {e}");
                    return Step::RetryAfter(inner.opts.retry_base);
                }
            };
            let stored = match &inner.sealer {
                Some(sealer) => sealer.seal(
                    identity::SealedRecord::DeviceKey,
                    rec.id.as_str(),
                    key_pem.expose(),
                ),
                None => key_pem.expose().to_vec(),
            };
            batch.put_secret(&rec.id, &stored);
            next.provision.gateway_key = true;
            csr
        }
    };
    next.provision.csr = Some(csr.clone());
    next.state = DeviceState::KeyReady {
        own_csr: rec.provision.own_csr.clone(),
        csr,
    };
    commit(inner, &rec, next, batch).await
}

async fn create_certificate(inner: &Inner, rec: DeviceRecord, csr: &str) -> Step {
    // Bounds the certificates a crash can orphan: a permit is held until the result is durable.
    let Ok(_permit) = inner.certificate_permits.acquire().await else {
        return Step::Done;
    };
    if inner.is_stopping() {
        return Step::Done;
    }
    let result = inner.provider.create_certificate(&rec.id, csr).await;
    inner
        .metrics
        .cloud_call(inner.provider.api_name(Api::CreateCertificate), &result);
    match result {
        Ok(issued) => {
            let token = match &issued.ownership_token {
                None => None,
                Some(t) => match t.expose_str() {
                    Some(t) => Some(OwnershipToken::new(t)),
                    None => {
                        let e = CloudError::Protocol {
                            api: inner.provider.api_name(Api::CreateCertificate),
                            reason: "the ownership token is not text".into(),
                        };
                        return cloud_error(inner, rec, e).await;
                    }
                },
            };
            let mut next = rec.clone();
            next.provision.certificate_id = Some(issued.certificate_id.clone());
            next.provision.certificate_pem = Some(issued.certificate_pem.clone());
            next.state = DeviceState::CertificateIssued {
                certificate_id: issued.certificate_id.clone(),
                certificate_pem: issued.certificate_pem,
                ownership_token: token.clone(),
                token_expires_at_ms: issued.expires_at_ms,
            };
            let mut batch = Batch::new();
            if let Some(token) = token {
                batch.put_token(OwnershipTokenRecord {
                    v: TOKEN_RECORD_VERSION,
                    device: rec.id.clone(),
                    certificate_id: issued.certificate_id,
                    token,
                    expires_at_ms: issued.expires_at_ms.unwrap_or(0),
                });
            }
            tracing::debug!(device = %rec.id, "certificate issued");
            commit(inner, &rec, next, batch).await
        }
        Err(e) => cloud_error(inner, rec, e).await,
    }
}

/// Registers the device (with its certificate, where the provider issued one).
async fn register(inner: &Inner, rec: DeviceRecord, issued: Option<IssuedCertificate>) -> Step {
    if let Some(expires_at_ms) = issued
        .as_ref()
        .filter(|i| i.ownership_token.is_some())
        .and_then(|i| i.expires_at_ms)
    {
        if clock::unix_ms() >= expires_at_ms {
            return new_certificate(
                inner,
                rec,
                "the ownership token expired before RegisterThing",
            )
            .await;
        }
    }
    let result = match registration_call(inner, &rec, issued.as_ref(), None).await {
        Ok(result) => result,
        Err(error) => return fail(inner, rec, error).await,
    };
    match result {
        Ok(RegisterOutcome::Done(reg)) => registered(inner, rec, reg).await,
        Ok(RegisterOutcome::Pending {
            operation,
            retry_after,
        }) => {
            // Durable before the first poll: after a crash the device polls this operation
            // instead of registering again.
            let mut next = rec.clone();
            next.state = DeviceState::Registering {
                operation_id: operation,
                retry_after_ms: retry_after.as_millis() as u64,
            };
            tracing::debug!(device = %rec.id, ?retry_after, "registration pending");
            match commit(inner, &rec, next, Batch::new()).await {
                Step::Next | Step::Committed(_) => Step::RetryAfter(retry_after),
                other => other,
            }
        }
        Err(e) if e.is_token_invalid() => {
            let reason = e.to_string();
            new_certificate(inner, rec, &reason).await
        }
        Err(e) => cloud_error(inner, rec, e).await,
    }
}

/// Asks the cloud where the stored registration `operation` stands.
async fn poll(inner: &Inner, rec: DeviceRecord, operation: &str) -> Step {
    let issued = match (
        &rec.provision.certificate_id,
        &rec.provision.certificate_pem,
    ) {
        (Some(id), Some(pem)) => Some(IssuedCertificate {
            certificate_id: id.clone(),
            certificate_pem: pem.clone(),
            ownership_token: None,
            expires_at_ms: None,
        }),
        _ => None,
    };
    let result = match registration_call(inner, &rec, issued.as_ref(), Some(operation)).await {
        Ok(result) => result,
        Err(error) => return fail(inner, rec, error).await,
    };
    match result {
        Ok(RegisterOutcome::Done(reg)) => registered(inner, rec, reg).await,
        Ok(RegisterOutcome::Pending { retry_after, .. }) => Step::RetryAfter(retry_after),
        // The cloud no longer knows the operation (DPS forgets finished ones): register again,
        // which DPS answers for the same registration id.
        Err(CloudError::Rejected {
            status_code: 404, ..
        }) => {
            tracing::info!(device = %rec.id, operation, "the cloud no longer knows the registration operation; registering again");
            let mut next = rec.clone();
            next.state = match issued {
                Some(i) => DeviceState::CertificateIssued {
                    certificate_id: i.certificate_id,
                    certificate_pem: i.certificate_pem,
                    ownership_token: None,
                    token_expires_at_ms: None,
                },
                None => DeviceState::Approved,
            };
            commit(inner, &rec, next, Batch::new()).await
        }
        Err(e) => cloud_error(inner, rec, e).await,
    }
}

/// One registration call (`operation` set: a poll of it), with the device's key where the
/// provider needs it, counted in the metrics. `Err` when the key cannot be had: the device
/// fails.
async fn registration_call(
    inner: &Inner,
    rec: &DeviceRecord,
    certificate: Option<&IssuedCertificate>,
    operation: Option<&str>,
) -> Result<Result<RegisterOutcome, CloudError>, ErrorInfo> {
    let key = registration_key(inner, rec)?;
    let input = RegisterInput {
        device: &rec.id,
        certificate,
        key_pem: key.as_ref(),
        parameters: &rec.provision.parameters,
    };
    let (api, result) = match operation {
        None => (
            inner.provider.api_name(Api::Register),
            inner.provider.register(input).await,
        ),
        Some(op) => (
            inner.provider.api_name(Api::Poll),
            inner.provider.poll(input, op).await,
        ),
    };
    inner.metrics.cloud_call(api, &result);
    Ok(result)
}

/// The device's key for the registration call, when the provider authenticates as the device.
fn registration_key(inner: &Inner, rec: &DeviceRecord) -> Result<Option<Secret>, ErrorInfo> {
    if !inner.provider.needs_device_key() {
        return Ok(None);
    }
    if !rec.provision.gateway_key {
        return Err(device_key_required(inner, rec));
    }
    let internal = |what: String| ErrorInfo {
        status_code: 500,
        error_code: "GatewayError".into(),
        error_message: format!("device {}: {what}", rec.id),
    };
    let stored = inner
        .store
        .secret(&rec.id)
        .map_err(|e| internal(format!("reading its key: {e}")))?
        .ok_or_else(|| internal("its generated key is missing from the store".into()))?;
    match &inner.sealer {
        Some(sealer) => sealer
            .open(identity::SealedRecord::DeviceKey, rec.id.as_str(), &stored)
            .map(Some)
            .map_err(|e| internal(format!("unsealing its key: {e}"))),
        None => Ok(Some(Secret::new(stored))),
    }
}

/// The refusal of a device that brought its own CSR to a provider that authenticates the
/// device with its key (which the gateway then does not hold).
fn device_key_required(inner: &Inner, rec: &DeviceRecord) -> ErrorInfo {
    ErrorInfo {
        status_code: 400,
        error_code: "DeviceKeyRequired".into(),
        error_message: format!(
            "{} authenticates device {} with its own key, which the gateway does not hold: the device brought its own CSR; let the gateway generate the key",
            inner.provider.name(),
            rec.id
        ),
    }
}

/// Records the registration: the answer can now be delivered.
async fn registered(inner: &Inner, rec: DeviceRecord, reg: Registration) -> Step {
    let mut next = rec.clone();
    next.provision.thing_name = Some(reg.cloud_id.clone());
    next.provision.endpoint = reg.endpoint.clone();
    next.provision.device_configuration = reg.extras.clone();
    next.state = DeviceState::Registered {
        cloud_id: reg.cloud_id,
        endpoint: reg.endpoint,
        extras: reg.extras,
    };
    let mut batch = Batch::new();
    batch.remove_token(&rec.id);
    tracing::debug!(device = %rec.id, "registered");
    commit(inner, &rec, next, batch).await
}

/// Back to `KeyReady` with the same CSR: the certificate of a refused token is useless.
async fn new_certificate(inner: &Inner, rec: DeviceRecord, reason: &str) -> Step {
    tracing::info!(device = %rec.id, "requesting a new certificate: {reason}");
    let error = ErrorInfo {
        status_code: 400,
        error_code: crate::cloud::INVALID_OWNERSHIP_TOKEN.into(),
        error_message: reason.to_string(),
    };
    let mut next = rec.clone();
    next.attempts = next.attempts.saturating_add(1);
    next.last_error = Some(error.clone());
    if next.attempts >= inner.opts.max_attempts {
        return fail(inner, next, error).await;
    }
    next.provision.certificate_id = None;
    next.provision.certificate_pem = None;
    next.state = match rec.provision.csr.clone() {
        Some(csr) => DeviceState::KeyReady {
            own_csr: rec.provision.own_csr.clone(),
            csr,
        },
        None => DeviceState::Requested,
    };
    let mut batch = Batch::new();
    batch.remove_token(&rec.id);
    commit(inner, &rec, next, batch).await
}

async fn deliver(inner: &Inner, rec: DeviceRecord) -> Step {
    let format = device_format(&rec);
    let body = match accepted_payload(inner, &rec, format) {
        Ok(body) => body,
        Err(rejected) => {
            let error = ErrorInfo {
                status_code: rejected.status_code,
                error_code: rejected.error_code,
                error_message: rejected.error_message,
            };
            return fail(inner, rec, error).await;
        }
    };
    if let Err(e) = inner
        .downstream
        .publish_accepted(&rec.id, format, body)
        .await
    {
        tracing::warn!(device = %rec.id, "publishing the result failed, will retry: {e}");
        return Step::RetryAfter(inner.opts.retry_base);
    }
    let mut next = rec.clone();
    next.state = DeviceState::Delivered;
    let step = commit(inner, &rec, next, Batch::new()).await;
    if matches!(step, Step::Next | Step::Committed(_)) {
        inner.counters.provisioned.fetch_add(1, Ordering::Relaxed);
        inner
            .metrics
            .delivered(clock::unix_ms().saturating_sub(rec.created_at_ms));
        tracing::info!(device = %rec.id, thing = rec.provision.thing_name.as_deref().unwrap_or(""), "device provisioned");
        let report = StatusReport::new(DeviceStatus::Provisioned, clock::unix_ms());
        if let Err(e) = inner.downstream.publish_status(&rec.id, &report).await {
            tracing::warn!(device = %rec.id, "publishing the status failed: {e}");
        }
    }
    step
}

/// Handles a failed cloud call: retry later, or fail the device for good.
async fn cloud_error(inner: &Inner, rec: DeviceRecord, e: CloudError) -> Step {
    if matches!(e, CloudError::ShuttingDown { .. }) {
        return Step::Done;
    }
    let (status_code, error_code, error_message) = e.to_parts();
    let error = ErrorInfo {
        status_code,
        error_code,
        error_message,
    };
    if !e.is_transient() {
        return fail(inner, rec, error).await;
    }
    let backoff = Backoff::new(inner.opts.retry_base, inner.opts.retry_max);
    // Throttling and an unreachable cloud say nothing about this device: not counted.
    if let CloudError::Throttled {
        retry_after: Some(wait),
        ..
    } = &e
    {
        tracing::debug!(device = %rec.id, ?wait, "cloud busy, retrying when it said: {e}");
        return Step::RetryAfter(*wait);
    }
    // The provider's token bucket already paces the retry of a throttled call (and cut its
    // rate if the cloud keeps throttling), so it waits the first back-off step only: a device
    // throttled near the end of a burst would otherwise hold the whole batch up by a second.
    if e.is_throttling() {
        tracing::debug!(device = %rec.id, "cloud busy, retrying: {e}");
        return Step::RetryAfter(backoff.delay_for(0));
    }
    if matches!(e, CloudError::Disconnected { .. }) {
        tracing::debug!(device = %rec.id, "cloud unreachable, retrying: {e}");
        return Step::RetryAfter(backoff.delay_for(1));
    }
    let attempts = rec.attempts.saturating_add(1);
    if attempts >= inner.opts.max_attempts {
        let mut rec = rec;
        rec.attempts = attempts;
        return fail(inner, rec, error).await;
    }
    tracing::info!(device = %rec.id, attempts, "transient cloud error, retrying: {e}");
    let mut next = rec.clone();
    next.attempts = attempts;
    next.last_error = Some(error);
    match commit(inner, &rec, next, Batch::new()).await {
        Step::Next | Step::Committed(_) => Step::RetryAfter(backoff.delay_for(attempts - 1)),
        other => other,
    }
}

/// Marks the device failed for good and tells it why.
async fn fail(inner: &Inner, rec: DeviceRecord, error: ErrorInfo) -> Step {
    tracing::warn!(device = %rec.id, code = %error.error_code, "provisioning failed: {}", error.error_message);
    let mut next = rec.clone();
    next.last_error = Some(error.clone());
    next.state = DeviceState::Failed {
        error: error.clone(),
        next_attempt_at_ms: None,
    };
    let mut batch = Batch::new();
    batch.remove_token(&rec.id);
    let step = commit(inner, &rec, next, batch).await;
    if matches!(step, Step::Next | Step::Committed(_)) {
        inner.counters.failed.fetch_add(1, Ordering::Relaxed);
        let rejected =
            RejectedResponse::new(error.status_code, error.error_code, error.error_message);
        let format = device_format(&rec);
        if let Err(e) = inner.downstream.reject(&rec.id, format, &rejected).await {
            tracing::warn!(device = %rec.id, "publishing the failure failed: {e}");
        }
        let report = StatusReport {
            error: Some(rejected),
            ..StatusReport::new(DeviceStatus::Failed, clock::unix_ms())
        };
        if let Err(e) = inner.downstream.publish_status(&rec.id, &report).await {
            tracing::warn!(device = %rec.id, "publishing the status failed: {e}");
        }
    }
    step
}

fn device_format(rec: &DeviceRecord) -> PayloadFormat {
    rec.format.parse().unwrap_or_default()
}

/// The `/accepted` payload for a registered device, in `format`; the private key is included
/// when the gateway generated it.
pub(super) fn accepted_payload(
    inner: &Inner,
    rec: &DeviceRecord,
    format: PayloadFormat,
) -> Result<Vec<u8>, RejectedResponse> {
    let internal = |what: &str| {
        tracing::error!(device = %rec.id, "cannot build the result: {what}");
        RejectedResponse::new(
            500,
            "GatewayError",
            format!("the gateway cannot build the result: {what}"),
        )
    };
    let p = &rec.provision;
    let Some(thing_name) = &p.thing_name else {
        return Err(internal("the stored record has no cloud registration"));
    };
    // Symmetric-key registrations have no certificate; every other one has.
    let needs_certificate = inner.provider.certificate_source() != CertificateSource::None;
    if needs_certificate && (p.certificate_id.is_none() || p.certificate_pem.is_none()) {
        return Err(internal("the stored record has no certificate"));
    }
    let private_key = if p.gateway_key {
        let stored = match inner.store.secret(&rec.id) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err(internal("the generated key is missing from the store")),
            Err(e) => return Err(internal(&format!("reading the key: {e}"))),
        };
        let plain = match &inner.sealer {
            Some(sealer) => sealer
                .open(identity::SealedRecord::DeviceKey, rec.id.as_str(), &stored)
                .map_err(|e| internal(&format!("unsealing the key: {e}")))?,
            None => Secret::new(stored),
        };
        let pem = plain
            .expose_str()
            .ok_or_else(|| internal("the stored key is not PEM text"))?
            .to_string();
        Some(pem)
    } else {
        None
    };
    let response = AcceptedResponse {
        device_id: rec.id.clone(),
        certificate_id: p.certificate_id.clone().unwrap_or_default(),
        certificate_pem: p.certificate_pem.clone().unwrap_or_default(),
        private_key,
        thing_name: thing_name.clone(),
        device_configuration: p.device_configuration.clone(),
        assigned_hub: p.endpoint.clone(),
    };
    Ok(contract::encode(format, &response))
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
