//! Long-running operations (the IoT Hub async pattern, seed 004): `POST
//! /devices/{id}/reprovision` answers 202 with `Operation-Location` and `Retry-After`, and
//! `GET /operations/{id}` tells `Running`, `Succeeded` (with the new certificate id) or
//! `Failed` (with the error).
//!
//! Reprovisioning sends a provisioned (or failed) device back to `approved` with its
//! certificate forgotten: from that moment the local TLS listener refuses the old certificate
//! (device authentication checks the stored one, `downstream/device_auth.rs`), its broker
//! connection is closed, and the engine makes a new key (unless the device brought its own
//! CSR) and gets a new certificate and registration. A watcher follows the device in the store
//! and settles the operation; operations still running when the daemon stops are watched
//! again at the next start, since the engine resumes the device too.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::devices::device_id;
use super::error::ApiError;
use super::error::ApiErrorBody;
use super::view::rfc3339_ms;
use super::AdminState;
use crate::clock;
use crate::device_id::DeviceId;
use crate::store::{DeviceState, RecordTree, StoreError};

/// How often a watcher looks at its device.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// How long a reprovisioning may take before its operation fails.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// `Retry-After` of a running operation, in seconds.
const RETRY_AFTER_SECS: u64 = 1;

/// Where an operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum OperationStatus {
    /// Still going.
    Running,
    /// Done.
    Succeeded,
    /// Ended without success; `error` says why.
    Failed,
}

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OperationError {
    /// Machine-readable code.
    pub code: String,
    /// What happened.
    pub message: String,
}

/// An operation, as stored (tree `operations`) and shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Record layout version.
    #[serde(default = "one")]
    pub v: u32,
    /// Operation id.
    pub id: String,
    /// What it does (`reprovision`).
    pub kind: String,
    /// The device.
    pub device_id: String,
    /// Where it is.
    pub status: OperationStatus,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<OperationError>,
    /// The certificate it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_certificate_id: Option<String>,
    /// The new certificate, once issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
    /// Start (RFC 3339 UTC).
    pub created_at: String,
    /// Last change (RFC 3339 UTC).
    pub updated_at: String,
    /// Start, unix milliseconds (for the timeout across restarts).
    #[serde(default)]
    pub created_at_ms: u64,
}

fn one() -> u32 {
    1
}

/// `POST /devices/{id}/reprovision`
#[utoipa::path(post, path = "/devices/{id}/reprovision", params(("id" = String, Path)), responses((status = 202, body = Operation), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn reprovision(
    State(state): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = device_id(&raw)?;
    let current = state
        .store
        .device(&id)?
        .ok_or_else(|| ApiError::not_found("device", id.as_str()))?;
    if !matches!(
        current.state,
        DeviceState::Delivered | DeviceState::Registered { .. } | DeviceState::Failed { .. }
    ) {
        return Err(ApiError::conflict(
            "NotProvisioned",
            format!(
                "device {id} is {}; only a provisioned or failed device can be reprovisioned",
                current.state.name()
            ),
        ));
    }
    let now = clock::unix_ms();
    let op = Operation {
        v: 1,
        id: format!("{:032x}", rand::random::<u128>()),
        kind: "reprovision".into(),
        device_id: id.to_string(),
        status: OperationStatus::Running,
        error: None,
        previous_certificate_id: current.provision.certificate_id.clone(),
        certificate_id: None,
        created_at: rfc3339_ms(now),
        updated_at: rfc3339_ms(now),
        created_at_ms: now,
    };
    let mut next = current.clone();
    next.state = DeviceState::Approved;
    next.attempts = 0;
    next.provision.certificate_id = None;
    next.provision.certificate_pem = None;
    next.provision.csr = None;
    next.updated_at_ms = now;
    state
        .store
        .put_record(RecordTree::Operations, &op.id, &op)
        .await?;
    match state
        .store
        .update_device(&id, Some(current.etag), |_| Some(next))
        .await
    {
        Ok(_) => {}
        Err(StoreError::Conflict { .. }) => {
            state
                .store
                .remove_record(RecordTree::Operations, &op.id)
                .await?;
            return Err(ApiError::conflict(
                "Busy",
                format!("device {id} changed while this request was handled; retry"),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    // The old certificate is no longer the stored one: refused locally from now on. Close
    // what still runs on it.
    state.disconnect(id.as_str());
    state.close_upstream(&id);
    state.schedule(&id);
    tracing::info!(device = %id, operation = %op.id, "reprovisioning requested by an operator");
    tokio::spawn(watch(state.clone(), op.clone()));
    let mut resp = (StatusCode::ACCEPTED, Json(op.clone())).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/operations/{}", op.id)) {
        h.insert("operation-location", v);
    }
    h.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    Ok(resp)
}

/// `GET /operations/{id}`
#[utoipa::path(get, path = "/operations/{id}", params(("id" = String, Path)), responses((status = 200, body = Operation), (status = 404, body = ApiErrorBody)))]
pub async fn get_operation(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if id.len() > 64 {
        return Err(ApiError::not_found("operation", &id));
    }
    let op: Operation = state
        .store
        .record(RecordTree::Operations, &id)?
        .ok_or_else(|| ApiError::not_found("operation", &id))?;
    let mut resp = Json(op.clone()).into_response();
    if op.status == OperationStatus::Running {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    Ok(resp)
}

/// Watches operations left running by a previous run of the daemon.
pub fn resume(state: &AdminState) {
    for entry in state.store.records::<Operation>(RecordTree::Operations) {
        match entry {
            Ok((_, op)) if op.status == OperationStatus::Running => {
                tokio::spawn(watch(state.clone(), op));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("admin: reading an operation: {e}"),
        }
    }
}

/// What the device's record says about the operation, if it is over.
fn outcome(state: &AdminState, op: &Operation) -> Option<Result<Option<String>, OperationError>> {
    let id = DeviceId::parse(&op.device_id).ok()?;
    let rec = match state.store.device(&id) {
        Ok(Some(rec)) => rec,
        Ok(None) => {
            return Some(Err(OperationError {
                code: "DeviceDeleted".into(),
                message: format!("device {id} was deleted"),
            }))
        }
        Err(e) => {
            tracing::warn!("admin: reading device {id}: {e}");
            return None;
        }
    };
    match &rec.state {
        DeviceState::Registered { .. } | DeviceState::Delivered
            if rec.provision.certificate_id.is_some()
                && rec.provision.certificate_id != op.previous_certificate_id =>
        {
            Some(Ok(rec.provision.certificate_id.clone()))
        }
        DeviceState::Failed {
            error,
            next_attempt_at_ms: None,
        } => Some(Err(OperationError {
            code: error.error_code.clone(),
            message: error.error_message.clone(),
        })),
        DeviceState::Blocked => Some(Err(OperationError {
            code: "DeviceBlocked".into(),
            message: format!("device {id} was blocked"),
        })),
        _ => None,
    }
}

async fn watch(state: AdminState, mut op: Operation) {
    let deadline = op.created_at_ms + OPERATION_TIMEOUT.as_millis() as u64;
    let result = loop {
        if let Some(r) = outcome(&state, &op) {
            break r;
        }
        if clock::unix_ms() > deadline {
            break Err(OperationError {
                code: "Timeout".into(),
                message: format!(
                    "no new certificate within {} minutes; see the device's lastError",
                    OPERATION_TIMEOUT.as_secs() / 60
                ),
            });
        }
        if state.stopping() {
            // Settled by the watcher of the next start.
            return;
        }
        tokio::time::sleep(WATCH_EVERY).await;
    };
    match result {
        Ok(cert) => {
            op.status = OperationStatus::Succeeded;
            op.certificate_id = cert;
        }
        Err(e) => {
            op.status = OperationStatus::Failed;
            op.error = Some(e);
        }
    }
    op.updated_at = rfc3339_ms(clock::unix_ms());
    if let Err(e) = state
        .store
        .put_record(RecordTree::Operations, &op.id, &op)
        .await
    {
        tracing::warn!(operation = %op.id, "admin: recording the operation's end: {e}");
    }
    tracing::info!(operation = %op.id, device = %op.device_id, status = ?op.status, "operation finished");
}
