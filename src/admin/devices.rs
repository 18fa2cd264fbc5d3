//! `/devices/{id}`: GET, PATCH, DELETE with entity tags, and the operator's actions
//! `approve`, `block` and `unblock`.
//!
//! Preconditions follow the IoT Hub table (docs/architecture.md "Admin API"): `If-Match`
//! absent or `""` is unconditional, `"*"` needs the device to exist, an etag must equal the
//! stored one (else 412); `If-None-Match: "*"` fails with 412 when it exists. A DELETE of an
//! unknown device answers 204; of an existing one 200 with the device as it was. A PATCH
//! cannot create a device (a device comes into being by its own provisioning request), so a
//! PATCH of an unknown id is 404, or 412 when it carries `If-Match`, as the table's
//! "resource absent" column says. Writes are compare-and-swap on the etag the decision was
//! made on ([`crate::store::Store::update_device`]), so two operators cannot overwrite each
//! other unseen.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::error::ApiErrorBody;
use super::error::{ApiError, JsonBody};
use super::view::{etag_of, is_approved, DeviceView};
use super::AdminState;
use crate::admission::AdmissionMode;
use crate::clock;
use crate::device_id::DeviceId;
use crate::store::{DeviceRecord, DeviceState, StoreError};

/// Longest `displayName`, in characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 128;

/// A device id from the path; an id that breaks the rules cannot exist: 404.
pub(super) fn device_id(raw: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(raw).map_err(|_| ApiError::not_found("device", raw))
}

/// An `If-Match` / `If-None-Match` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Absent or `""`.
    None,
    /// `*`
    Any,
    /// A specific etag (its number; `None` when it is not one of ours, so it never matches).
    Tag(Option<u64>),
}

fn condition(headers: &HeaderMap, name: header::HeaderName) -> Condition {
    let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) else {
        return Condition::None;
    };
    let v = v.trim();
    if v.is_empty() || v == "\"\"" {
        return Condition::None;
    }
    if v == "*" || v == "\"*\"" {
        return Condition::Any;
    }
    let v = v.strip_prefix("W/").unwrap_or(v);
    Condition::Tag(v.trim_matches('"').parse().ok())
}

/// The preconditions of a request.
#[derive(Clone, Debug)]
pub struct Preconditions {
    if_match: Condition,
    if_none_match: Condition,
}

impl Preconditions {
    /// From the request headers.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Preconditions {
            if_match: condition(headers, header::IF_MATCH),
            if_none_match: condition(headers, header::IF_NONE_MATCH),
        }
    }

    /// Checks them against the stored record (or its absence) for a write; `Ok` carries the
    /// etag to compare-and-swap on.
    pub fn check_write(&self, current: Option<&DeviceRecord>) -> Result<(), ApiError> {
        match (&self.if_match, current) {
            (Condition::None, _) => {}
            (Condition::Any, Some(_)) => {}
            (Condition::Any, None) | (Condition::Tag(_), None) => {
                return Err(ApiError::precondition_failed(
                    "If-Match names a device that does not exist",
                ))
            }
            (Condition::Tag(t), Some(rec)) => {
                if *t != Some(rec.etag) {
                    return Err(ApiError::precondition_failed(format!(
                        "If-Match does not match the device's ETag {}; GET it again and retry",
                        etag_of(rec)
                    )));
                }
            }
        }
        if let (Condition::Any, Some(_)) = (&self.if_none_match, current) {
            return Err(ApiError::precondition_failed(
                "If-None-Match: * but the device exists",
            ));
        }
        if let (Condition::Tag(t), Some(rec)) = (&self.if_none_match, current) {
            if *t == Some(rec.etag) {
                return Err(ApiError::precondition_failed(
                    "If-None-Match matches the device's ETag",
                ));
            }
        }
        Ok(())
    }

    /// For a read: whether `If-None-Match` matches (answer 304).
    fn not_modified(&self, rec: &DeviceRecord) -> bool {
        match &self.if_none_match {
            Condition::Any => true,
            Condition::Tag(t) => *t == Some(rec.etag),
            Condition::None => false,
        }
    }
}

/// A device view with its `ETag` header.
pub(super) fn device_response(
    state: &AdminState,
    rec: &DeviceRecord,
    status: StatusCode,
) -> Response {
    let view = DeviceView::new(rec, state.connection(rec.id.as_str()));
    let mut resp = (status, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&etag_of(rec)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

fn load(state: &AdminState, id: &DeviceId) -> Result<DeviceRecord, ApiError> {
    state
        .store
        .device(id)?
        .ok_or_else(|| ApiError::not_found("device", id.as_str()))
}

/// `GET /devices/{id}`
#[utoipa::path(get, path = "/devices/{id}", params(("id" = String, Path)), responses((status = 200, body = DeviceView), (status = 304), (status = 404, body = ApiErrorBody)))]
pub async fn get_device(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = device_id(&id)?;
    let rec = load(&state, &id)?;
    if Preconditions::from_headers(&headers).not_modified(&rec) {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        if let Ok(v) = HeaderValue::from_str(&etag_of(&rec)) {
            resp.headers_mut().insert(header::ETAG, v);
        }
        return Ok(resp);
    }
    Ok(device_response(&state, &rec, StatusCode::OK))
}

/// `PATCH /devices/{id}` body: the fields an operator may change.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DevicePatch {
    /// New display name; `null` removes it.
    #[serde(default, deserialize_with = "some_nullable")]
    pub display_name: Option<Option<String>>,
    /// Enable or disable telemetry.
    pub enabled: Option<bool>,
    /// `true` approves a device waiting for approval.
    pub approved: Option<bool>,
}

fn some_nullable<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// `PATCH /devices/{id}`
#[utoipa::path(patch, path = "/devices/{id}", params(("id" = String, Path)), request_body = DevicePatch, responses((status = 200, body = DeviceView), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 412, body = ApiErrorBody)))]
pub async fn patch_device(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(patch): JsonBody<DevicePatch>,
) -> Result<Response, ApiError> {
    let pre = Preconditions::from_headers(&headers);
    let id = match DeviceId::parse(&id) {
        Ok(id) => id,
        Err(_) => {
            pre.check_write(None)?;
            return Err(ApiError::not_found("device", &id));
        }
    };
    if let Some(Some(name)) = &patch.display_name {
        if name.chars().count() > MAX_DISPLAY_NAME_CHARS || name.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "InvalidDisplayName",
                format!("displayName: at most {MAX_DISPLAY_NAME_CHARS} characters, no control characters"),
            ));
        }
    }
    let current = state.store.device(&id)?;
    pre.check_write(current.as_ref())?;
    let Some(current) = current else {
        return Err(ApiError::not_found("device", id.as_str()));
    };
    let mut next = current.clone();
    let mut approve = false;
    if let Some(name) = &patch.display_name {
        next.display_name = name.clone();
    }
    if let Some(enabled) = patch.enabled {
        next.enabled = enabled;
    }
    match (patch.approved, &current.state) {
        (Some(true), DeviceState::WaitingApproval) => {
            next.state = DeviceState::Approved;
            approve = true;
        }
        (Some(true), DeviceState::Blocked) => {
            return Err(ApiError::conflict(
                "DeviceBlocked",
                format!("device {id} is blocked; unblock it first"),
            ))
        }
        (Some(false), s) if is_approved(s) => {
            return Err(ApiError::conflict(
                "CannotUnapprove",
                format!("device {id} is already approved; block it instead"),
            ))
        }
        _ => {}
    }
    if next == current {
        return Ok(device_response(&state, &current, StatusCode::OK));
    }
    next.updated_at_ms = clock::unix_ms();
    let rec = swap(&state, &id, current.etag, next).await?;
    if approve {
        tracing::info!(device = %id, "device approved by an operator");
        state.schedule(&id);
    }
    Ok(device_response(&state, &rec, StatusCode::OK))
}

/// Compare-and-swap `next` over the record whose etag was `etag`; 412 if it changed since.
async fn swap(
    state: &AdminState,
    id: &DeviceId,
    etag: u64,
    next: DeviceRecord,
) -> Result<DeviceRecord, ApiError> {
    match state
        .store
        .update_device(id, Some(etag), |_| Some(next))
        .await
    {
        Ok(rec) => Ok(rec),
        Err(StoreError::Conflict { .. }) => Err(ApiError::precondition_failed(
            "the device changed while this request was handled; GET it again and retry",
        )),
        Err(e) => Err(e.into()),
    }
}

/// `DELETE /devices/{id}`: removes the record, its secret and token, and closes its broker
/// connection and upstream telemetry link.
#[utoipa::path(delete, path = "/devices/{id}", params(("id" = String, Path)), responses((status = 200, body = DeviceView), (status = 204), (status = 412, body = ApiErrorBody)))]
pub async fn delete_device(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pre = Preconditions::from_headers(&headers);
    let Ok(id) = DeviceId::parse(&id) else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let Some(current) = state.store.device(&id)? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    // "*" and a matching etag delete; only a different etag is refused (the table's DELETE
    // rows), and If-None-Match does not apply to DELETE.
    if let Condition::Tag(t) = &pre.if_match {
        if *t != Some(current.etag) {
            return Err(ApiError::precondition_failed(format!(
                "If-Match does not match the device's ETag {}; GET it again and retry",
                etag_of(&current)
            )));
        }
    }
    state.store.remove_device(&id).await?;
    state.disconnect(id.as_str());
    state.close_upstream(&id);
    tracing::info!(device = %id, "device deleted by an operator");
    let view = DeviceView::new(&current, None);
    Ok((StatusCode::OK, Json(view)).into_response())
}

/// What an action does to a device's state.
enum Action {
    Approve,
    Block,
    Unblock,
}

async fn act(state: &AdminState, raw: &str, action: Action) -> Result<Response, ApiError> {
    let id = device_id(raw)?;
    // A few tries: the engine may move the device between our read and our swap.
    for _ in 0..5 {
        let current = load(state, &id)?;
        let target = match (&action, &current.state) {
            (Action::Approve, DeviceState::WaitingApproval) => DeviceState::Approved,
            (Action::Approve, DeviceState::Blocked) => {
                return Err(ApiError::conflict(
                    "DeviceBlocked",
                    format!("device {id} is blocked; unblock it first"),
                ))
            }
            (Action::Approve, s) if is_approved(s) => {
                return Ok(device_response(state, &current, StatusCode::OK))
            }
            (Action::Approve, s) => {
                return Err(ApiError::conflict(
                    "NotWaitingApproval",
                    format!("device {id} is {}, not waiting for approval", s.name()),
                ))
            }
            (Action::Block, DeviceState::Blocked) => {
                return Ok(device_response(state, &current, StatusCode::OK))
            }
            (Action::Block, _) => DeviceState::Blocked,
            (Action::Unblock, DeviceState::Blocked) => {
                if state.mode == AdmissionMode::Approve {
                    DeviceState::WaitingApproval
                } else {
                    DeviceState::Requested
                }
            }
            (Action::Unblock, s) => {
                return Err(ApiError::conflict(
                    "NotBlocked",
                    format!("device {id} is {}, not blocked", s.name()),
                ))
            }
        };
        let mut next = current.clone();
        next.state = target.clone();
        next.updated_at_ms = clock::unix_ms();
        match state
            .store
            .update_device(&id, Some(current.etag), |_| Some(next))
            .await
        {
            Ok(rec) => {
                match target {
                    DeviceState::Approved | DeviceState::Requested => state.schedule(&id),
                    DeviceState::Blocked => {
                        state.disconnect(id.as_str());
                        state.close_upstream(&id);
                    }
                    _ => {}
                }
                tracing::info!(device = %id, state = rec.state.name(), "device state set by an operator");
                return Ok(device_response(state, &rec, StatusCode::OK));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(
        "Busy",
        format!("device {id} keeps changing; retry"),
    ))
}

/// `POST /devices/{id}/approve`: `waitingApproval` -> `approved`, then provisioning starts.
#[utoipa::path(post, path = "/devices/{id}/approve", params(("id" = String, Path)), responses((status = 200, body = DeviceView), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn approve(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    act(&state, &id, Action::Approve).await
}

/// `POST /devices/{id}/block`: any state -> `blocked`; its connections are closed.
#[utoipa::path(post, path = "/devices/{id}/block", params(("id" = String, Path)), responses((status = 200, body = DeviceView), (status = 404, body = ApiErrorBody)))]
pub async fn block(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    act(&state, &id, Action::Block).await
}

/// `POST /devices/{id}/unblock`: `blocked` -> `waitingApproval` (approve mode) or
/// `requested` (provisioning starts again).
#[utoipa::path(post, path = "/devices/{id}/unblock", params(("id" = String, Path)), responses((status = 200, body = DeviceView), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn unblock(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    act(&state, &id, Action::Unblock).await
}
