//! `/deviceGroups`: saved device filters (seed 001's device groups, with our `$filter`
//! language instead of IoT Central's query text), and `GET /deviceGroups/{id}/devices`, the
//! group's devices with the paging of `GET /devices`.
//!
//! A group's filter is checked when it is saved (400 naming the token and position), so a
//! stored group always lists. Groups live in the store's `device_groups` tree as versioned
//! JSON.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::devices::MAX_DISPLAY_NAME_CHARS;
use super::devices_list::{page_at, ListQuery, Page};
use super::error::ApiErrorBody;
use super::error::{ApiError, JsonBody};
use super::filter;
use super::view::{rfc3339_ms, DeviceView};
use super::AdminState;
use crate::clock;
use crate::device_id::DeviceId;
use crate::store::RecordTree;

/// A device group, as stored and shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceGroup {
    /// Record layout version.
    #[serde(default = "one")]
    pub v: u32,
    /// Group id.
    pub id: String,
    /// Its name.
    pub display_name: String,
    /// The `$filter` selecting its devices.
    pub filter: String,
    /// Creation time (RFC 3339 UTC).
    pub created_at: String,
    /// Last change (RFC 3339 UTC).
    pub updated_at: String,
}

fn one() -> u32 {
    1
}

/// `PUT` / `PATCH` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceGroupBody {
    /// Its name.
    pub display_name: Option<String>,
    /// The `$filter` selecting its devices.
    pub filter: Option<String>,
}

fn group_id(raw: &str) -> Result<String, ApiError> {
    DeviceId::parse(raw)
        .map(|id| id.to_string())
        .map_err(|e| ApiError::bad_request("InvalidId", format!("device group id {raw:?}: {e}")))
}

fn check(body: &DeviceGroupBody) -> Result<(), ApiError> {
    if let Some(name) = &body.display_name {
        if name.chars().count() > MAX_DISPLAY_NAME_CHARS || name.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "InvalidDisplayName",
                format!("displayName: at most {MAX_DISPLAY_NAME_CHARS} characters, no control characters"),
            ));
        }
    }
    if let Some(f) = &body.filter {
        filter::parse(f).map_err(|e| ApiError::bad_request("InvalidFilter", e.to_string()))?;
    }
    Ok(())
}

fn load(state: &AdminState, id: &str) -> Result<DeviceGroup, ApiError> {
    state
        .store
        .record(RecordTree::DeviceGroups, id)?
        .ok_or_else(|| ApiError::not_found("device group", id))
}

/// `GET /deviceGroups`
#[utoipa::path(get, path = "/deviceGroups", responses((status = 200, body = Page<DeviceGroup>)))]
pub async fn list_groups(
    State(state): State<AdminState>,
) -> Result<Json<Page<DeviceGroup>>, ApiError> {
    let value = state
        .store
        .records::<DeviceGroup>(RecordTree::DeviceGroups)
        .map(|r| r.map(|(_, g)| g))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Page {
        value,
        next_link: None,
    }))
}

/// `GET /deviceGroups/{id}`
#[utoipa::path(get, path = "/deviceGroups/{id}", params(("id" = String, Path)), responses((status = 200, body = DeviceGroup), (status = 404, body = ApiErrorBody)))]
pub async fn get_group(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceGroup>, ApiError> {
    Ok(Json(load(&state, &id)?))
}

/// `PUT /deviceGroups/{id}`: creates (201) or replaces (200); both fields required.
#[utoipa::path(put, path = "/deviceGroups/{id}", params(("id" = String, Path)), request_body = DeviceGroupBody, responses((status = 201, body = DeviceGroup), (status = 200, body = DeviceGroup), (status = 400, body = ApiErrorBody)))]
pub async fn put_group(
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    JsonBody(body): JsonBody<DeviceGroupBody>,
) -> Result<Response, ApiError> {
    let id = group_id(&raw)?;
    check(&body)?;
    let (Some(display_name), Some(filter)) = (body.display_name, body.filter) else {
        return Err(ApiError::bad_request(
            "InvalidBody",
            "a device group needs displayName and filter",
        ));
    };
    let now = rfc3339_ms(clock::unix_ms());
    let existing: Option<DeviceGroup> = state.store.record(RecordTree::DeviceGroups, &id)?;
    let group = DeviceGroup {
        v: 1,
        id: id.clone(),
        display_name,
        filter,
        created_at: existing
            .as_ref()
            .map_or(now.clone(), |g| g.created_at.clone()),
        updated_at: now,
    };
    state
        .store
        .put_record(RecordTree::DeviceGroups, &id, &group)
        .await?;
    let status = if existing.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(group)).into_response())
}

/// `PATCH /deviceGroups/{id}`
#[utoipa::path(patch, path = "/deviceGroups/{id}", params(("id" = String, Path)), request_body = DeviceGroupBody, responses((status = 200, body = DeviceGroup), (status = 404, body = ApiErrorBody)))]
pub async fn patch_group(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<DeviceGroupBody>,
) -> Result<Json<DeviceGroup>, ApiError> {
    check(&body)?;
    let mut group = load(&state, &id)?;
    if let Some(n) = body.display_name {
        group.display_name = n;
    }
    if let Some(f) = body.filter {
        group.filter = f;
    }
    group.updated_at = rfc3339_ms(clock::unix_ms());
    state
        .store
        .put_record(RecordTree::DeviceGroups, &group.id, &group)
        .await?;
    Ok(Json(group))
}

/// `DELETE /deviceGroups/{id}`: 204 whether or not it existed.
#[utoipa::path(delete, path = "/deviceGroups/{id}", params(("id" = String, Path)), responses((status = 204)))]
pub async fn delete_group(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if id.len() <= 128 {
        state
            .store
            .remove_record(RecordTree::DeviceGroups, &id)
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /deviceGroups/{id}/devices`: the group's devices, paged as `GET /devices`
/// (`$orderby`, `maxpagesize`, `nextLink`; the filter is the group's).
#[utoipa::path(get, path = "/deviceGroups/{id}/devices", params(("id" = String, Path), ("$orderby" = Option<String>, Query), ("maxpagesize" = Option<u32>, Query), ("$skiptoken" = Option<String>, Query)), responses((status = 200, body = Page<DeviceView>), (status = 404, body = ApiErrorBody)))]
pub async fn group_devices(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(mut q): Query<HashMap<String, String>>,
) -> Result<Json<Page<DeviceView>>, ApiError> {
    let group = load(&state, &id)?;
    q.remove("filter");
    q.insert("$filter".into(), group.filter.clone());
    let q = ListQuery::parse(&q)?;
    let path = format!("/deviceGroups/{}/devices", group.id);
    let page = tokio::task::spawn_blocking(move || page_at(&state, &q, &path, false))
        .await
        .map_err(|e| ApiError::internal("listing devices", &e))??;
    Ok(Json(page))
}
