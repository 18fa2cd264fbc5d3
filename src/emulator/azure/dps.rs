//! The emulated Device Provisioning Service, transport-neutral: the MQTT and HTTPS front ends
//! (`mqtt.rs`, `https.rs`) turn their requests into [`Dps::register`] and
//! [`Dps::operation_status`] calls and send back the [`DpsReply`] (status, JSON body,
//! `retry-after`).
//!
//! One ID scope, two enrollment groups (symmetric key; X.509 with the group CA), each device
//! assigned to the one emulated hub. A registration is an operation that stays `assigning` for
//! `--assigning-ms` and then turns `assigned`, so that clients must honour `retry-after`.
//!
//! Errors carry the `errorCode` numbers DPS documents (the HTTP status followed by three
//! digits): 400004 bad request (body, registration id), 401002 unauthorized (SAS or
//! certificate), 404001 unknown ID scope, 404002 unknown operation, 429001 throttled (with
//! `retry-after`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use super::auth::{self, Credential};
use super::registry::{Attestation, Registration, Registry};
use crate::clock;
use crate::cloud::rate::TokenBucket;
use crate::device_id::DeviceId;

/// Unknown scope.
pub const ERR_SCOPE_NOT_FOUND: u32 = 404_001;
/// Unknown operation id (or one of another registration).
pub const ERR_OPERATION_NOT_FOUND: u32 = 404_002;
/// Bad body or registration id.
pub const ERR_BAD_REQUEST: u32 = 400_004;
/// SAS or certificate not accepted.
pub const ERR_UNAUTHORIZED: u32 = 401_002;
/// Over the `--tps` rate.
pub const ERR_THROTTLED: u32 = 429_001;

/// The answer to a DPS request, for either transport.
#[derive(Clone, Debug, PartialEq)]
pub struct DpsReply {
    /// HTTP status (also the `{code}` of the MQTT response topic).
    pub status: u16,
    /// JSON body.
    pub body: Value,
    /// Seconds the client should wait before polling or retrying.
    pub retry_after: Option<u64>,
}

impl DpsReply {
    fn error(status: u16, code: u32, message: impl Into<String>, retry_after: Option<u64>) -> Self {
        Self {
            status,
            body: json!({
                "errorCode": code,
                "trackingId": tracking_id(),
                "message": message.into(),
                "timestampUtc": clock::rfc3339_millis(clock::unix_ms()),
            }),
            retry_after,
        }
    }
}

/// A pending or finished registration operation.
#[derive(Clone, Debug)]
struct Operation {
    /// Canonical (lower-case) registration id it belongs to.
    registration: String,
    /// The registration id as the device sent it (device id at the hub).
    registration_id: String,
    attestation: Attestation,
    group: String,
    ready_at_ms: u64,
}

/// Operations by id, and the current one of each registration.
#[derive(Default)]
struct Operations {
    by_id: HashMap<String, Operation>,
    by_registration: HashMap<String, String>,
}

impl Operations {
    fn start(&mut self, id: String, op: Operation) {
        if let Some(previous) = self
            .by_registration
            .insert(op.registration.clone(), id.clone())
        {
            self.by_id.remove(&previous);
        }
        self.by_id.insert(id, op);
    }
}

/// The DPS service state.
pub struct Dps {
    id_scope: String,
    hub_host: String,
    groups: Arc<auth::Groups>,
    registry: Arc<Registry>,
    assigning: Duration,
    /// Operations by id, at most one per registration (a new register replaces the previous
    /// operation, as a re-registration does at DPS), so only authenticated registrations,
    /// each once, take room.
    operations: Mutex<Operations>,
    /// `None` = unlimited.
    bucket: Mutex<Option<TokenBucket>>,
}

/// What a register request carried besides its credential.
pub struct RegisterRequest<'a> {
    /// ID scope from the username or URL path.
    pub id_scope: &'a str,
    /// Registration id from the username or URL path.
    pub registration_id: &'a str,
    /// The request body.
    pub body: &'a [u8],
}

impl Dps {
    /// A DPS with the given scope and groups, assigning to `hub_host` after `assigning`.
    pub fn new(
        id_scope: String,
        hub_host: String,
        groups: Arc<auth::Groups>,
        registry: Arc<Registry>,
        assigning: Duration,
        tps: Option<f64>,
    ) -> Self {
        let dps = Self {
            id_scope,
            hub_host,
            groups,
            registry,
            assigning,
            operations: Mutex::new(Operations::default()),
            bucket: Mutex::new(None),
        };
        dps.set_tps(tps);
        dps
    }

    /// Replaces the rate limit (`None` or 0 = unlimited).
    pub fn set_tps(&self, tps: Option<f64>) {
        *lock(&self.bucket) = tps
            .filter(|t| *t > 0.0)
            .map(|t| TokenBucket::new(t, t.max(1.0), tokio::time::Instant::now()));
    }

    /// The rate limit in force.
    pub fn tps(&self) -> Option<f64> {
        lock(&self.bucket).as_ref().map(TokenBucket::rate)
    }

    fn throttle(&self) -> Result<(), DpsReply> {
        let mut bucket = lock(&self.bucket);
        let Some(bucket) = bucket.as_mut() else {
            return Ok(());
        };
        bucket.try_take(tokio::time::Instant::now()).map_err(|wait| {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            DpsReply::error(
                429,
                ERR_THROTTLED,
                "Operations are being throttled by the service; retry after the retry-after interval",
                Some(secs),
            )
        })
    }

    /// Checks scope, registration id and credential, shared by both requests.
    fn admit(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
    ) -> Result<auth::Admitted, DpsReply> {
        self.check_scope(id_scope)?;
        check_registration_id(registration_id)?;
        auth::admit_registration(&self.groups, id_scope, registration_id, credential)
            .map_err(|e| DpsReply::error(401, ERR_UNAUTHORIZED, e.to_string(), None))
    }

    /// Whether `id_scope` is this DPS's scope (MQTT checks it at CONNECT).
    pub fn check_scope(&self, id_scope: &str) -> Result<(), DpsReply> {
        if id_scope != self.id_scope {
            return Err(DpsReply::error(
                404,
                ERR_SCOPE_NOT_FOUND,
                format!(
                    "ID scope {:?} does not exist (this DPS has {:?})",
                    short(id_scope),
                    self.id_scope
                ),
                None,
            ));
        }
        Ok(())
    }

    /// `PUT {scope}/registrations/{id}/register` / `iotdps-register`.
    pub fn register(&self, req: RegisterRequest<'_>, credential: &Credential) -> DpsReply {
        match self.try_register(req, credential) {
            Ok(r) | Err(r) => r,
        }
    }

    fn try_register(
        &self,
        req: RegisterRequest<'_>,
        credential: &Credential,
    ) -> Result<DpsReply, DpsReply> {
        self.throttle()?;
        let admitted = self.admit(req.id_scope, req.registration_id, credential)?;
        let body: Value = serde_json::from_slice(req.body).map_err(|e| {
            DpsReply::error(
                400,
                ERR_BAD_REQUEST,
                format!("the register body is not JSON: {e}"),
                None,
            )
        })?;
        match body.get("registrationId") {
            Some(Value::String(id)) if id.eq_ignore_ascii_case(req.registration_id) => {}
            Some(other) => {
                return Err(DpsReply::error(
                    400,
                    ERR_BAD_REQUEST,
                    format!(
                        "registrationId {} in the body does not match {:?} in the request",
                        short(&other.to_string()),
                        req.registration_id
                    ),
                    None,
                ))
            }
            None => {
                return Err(DpsReply::error(
                    400,
                    ERR_BAD_REQUEST,
                    "the register body has no registrationId",
                    None,
                ))
            }
        }
        let operation_id = new_operation_id();
        let now = clock::unix_ms();
        let ready_at_ms = now + u64::try_from(self.assigning.as_millis()).unwrap_or(u64::MAX);
        lock(&self.operations).start(
            operation_id.clone(),
            Operation {
                registration: req.registration_id.to_ascii_lowercase(),
                registration_id: req.registration_id.to_string(),
                attestation: admitted.attestation,
                group: admitted.group,
                ready_at_ms,
            },
        );
        Ok(DpsReply {
            status: 202,
            body: json!({ "operationId": operation_id, "status": "assigning" }),
            retry_after: Some(retry_secs(ready_at_ms.saturating_sub(now))),
        })
    }

    /// `GET {scope}/registrations/{id}/operations/{op}` / `iotdps-get-operationstatus`.
    pub fn operation_status(
        &self,
        id_scope: &str,
        registration_id: &str,
        operation_id: &str,
        credential: &Credential,
    ) -> DpsReply {
        match self.try_operation_status(id_scope, registration_id, operation_id, credential) {
            Ok(r) | Err(r) => r,
        }
    }

    fn try_operation_status(
        &self,
        id_scope: &str,
        registration_id: &str,
        operation_id: &str,
        credential: &Credential,
    ) -> Result<DpsReply, DpsReply> {
        self.throttle()?;
        self.admit(id_scope, registration_id, credential)?;
        let not_found = || {
            DpsReply::error(
                404,
                ERR_OPERATION_NOT_FOUND,
                format!(
                    "operation {:?} does not exist for registration {:?}",
                    short(operation_id),
                    registration_id
                ),
                None,
            )
        };
        let op = lock(&self.operations)
            .by_id
            .get(operation_id)
            .cloned()
            .ok_or_else(not_found)?;
        // Another device's operation id is as unknown as a made-up one.
        if op.registration != registration_id.to_ascii_lowercase() {
            return Err(not_found());
        }
        let now = clock::unix_ms();
        if now < op.ready_at_ms {
            return Ok(DpsReply {
                status: 202,
                body: json!({
                    "operationId": operation_id,
                    "status": "assigning",
                    "registrationState": {
                        "registrationId": op.registration_id,
                        "status": "assigning",
                    },
                }),
                retry_after: Some(retry_secs(op.ready_at_ms - now)),
            });
        }
        let registration = self.registry.assign(Registration {
            registration_id: op.registration_id.clone(),
            device_id: op.registration_id.clone(),
            assigned_hub: self.hub_host.clone(),
            status: "assigned".into(),
            substatus: "initialAssignment".into(),
            attestation: op.attestation,
            enrollment_group: op.group.clone(),
            created_ms: now,
            updated_ms: now,
            etag: String::new(),
        });
        Ok(DpsReply {
            status: 200,
            body: json!({
                "operationId": operation_id,
                "status": "assigned",
                "registrationState": registration_state(&registration),
            }),
            retry_after: None,
        })
    }
}

/// The `registrationState` object of an assigned registration.
fn registration_state(r: &Registration) -> Value {
    let mut state = json!({
        "registrationId": r.registration_id,
        "createdDateTimeUtc": clock::rfc3339_millis(r.created_ms),
        "assignedHub": r.assigned_hub,
        "deviceId": r.device_id,
        "status": r.status,
        "substatus": r.substatus,
        "lastUpdatedDateTimeUtc": clock::rfc3339_millis(r.updated_ms),
        "etag": r.etag,
    });
    let attestation = match r.attestation {
        Attestation::SymmetricKey => "symmetricKey",
        Attestation::X509 => "x509",
    };
    state[attestation] = json!({ "enrollmentGroupId": r.enrollment_group });
    state
}

/// The seed 000 registration-id rules, with the error a device sees.
fn check_registration_id(registration_id: &str) -> Result<(), DpsReply> {
    DeviceId::parse(registration_id).map(drop).map_err(|e| {
        DpsReply::error(
            400,
            ERR_BAD_REQUEST,
            format!("invalid registration id: {e}"),
            None,
        )
    })
}

/// Whole seconds to wait, at least 1 (DPS never says 0).
fn retry_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// An operation id shaped like DPS's: `5.{16 hex}.{uuid}`.
fn new_operation_id() -> String {
    let bytes: [u8; 24] = rand::random();
    let h = hex::encode(bytes);
    format!(
        "5.{}.{}-{}-{}-{}-{}",
        &h[..16],
        &h[16..24],
        &h[24..28],
        &h[28..32],
        &h[32..36],
        &h[36..48]
    )
}

fn tracking_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// A new etag: base64 of a quoted random id, as DPS's look.
pub fn new_etag() -> String {
    let id = hex::encode(rand::random::<[u8; 12]>());
    base64::engine::general_purpose::STANDARD.encode(format!("\"{id}\""))
}

/// Echoed client input is cut so a hostile client cannot bloat answers and logs.
pub fn short(value: &str) -> String {
    const MAX: usize = 140;
    match value.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        assert_eq!(retry_secs(0), 1);
        assert_eq!(retry_secs(1), 1);
        assert_eq!(retry_secs(1000), 1);
        assert_eq!(retry_secs(1001), 2);
    }

    #[test]
    fn a_new_registration_replaces_the_previous_operation() {
        let op = |reg: &str| Operation {
            registration: reg.into(),
            registration_id: reg.into(),
            attestation: Attestation::SymmetricKey,
            group: "g".into(),
            ready_at_ms: 0,
        };
        let mut ops = Operations::default();
        ops.start("1".into(), op("a"));
        ops.start("2".into(), op("b"));
        ops.start("3".into(), op("a"));
        assert_eq!(ops.by_id.len(), 2);
        assert!(!ops.by_id.contains_key("1"));
        assert_eq!(ops.by_registration["a"], "3");
    }

    #[test]
    fn operation_ids_look_like_dps_ones() {
        let id = new_operation_id();
        assert!(id.starts_with("5."), "{id}");
        assert_eq!(id.split('.').count(), 3);
        assert_eq!(id.split('-').count(), 5);
    }

    #[test]
    fn bad_registration_ids_are_400004() {
        for bad in ["", "a/b", "dev.", "x".repeat(129).as_str()] {
            let err = check_registration_id(bad).unwrap_err();
            assert_eq!(err.status, 400);
            assert_eq!(err.body["errorCode"], ERR_BAD_REQUEST);
        }
        assert!(check_registration_id("Dev-1:a_b.c-").is_ok());
    }
}
