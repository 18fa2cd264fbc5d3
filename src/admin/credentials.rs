//! `GET /devices/{id}/credentials`: what a device authenticates with (seed 001's resource):
//! its issued certificate, and in symmetric-key mode its derived key (as DPS derives it from
//! the group key). Never the gateway's own secrets (claim key, group key, sealing key). A
//! gateway-generated private key only with `?includePrivateKey=true` and only for uid 0 on
//! the Unix socket: members of the admin group may steer devices, not impersonate them.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::Extension;
use axum::Json;
use base64::Engine as _;
use serde::Serialize;

use super::auth::Caller;
use super::devices::device_id;
use super::error::ApiError;
use super::error::ApiErrorBody;
use super::AdminState;
use crate::admission::sas;
use crate::identity::Secret;

/// The credentials of a device.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsView {
    /// The device.
    pub device_id: String,
    /// Its issued certificate, once issued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Credentials>,
    /// Its derived key (symmetric-key admission).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKey>,
    /// The gateway-generated private key (PEM), when asked for by root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

/// `x509` of [`CredentialsView`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct X509Credentials {
    /// Cloud certificate id.
    pub certificate_id: Option<String>,
    /// The certificate (PEM).
    pub certificate_pem: String,
    /// Thing name, once registered.
    pub thing_name: Option<String>,
    /// Whether the gateway holds the private key (it generated it).
    pub gateway_generated_key: bool,
}

/// `symmetricKey` of [`CredentialsView`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    /// base64(HMAC-SHA256(group key, device id)).
    pub primary_key: String,
}

/// `GET /devices/{id}/credentials[?includePrivateKey=true]`
#[utoipa::path(get, path = "/devices/{id}/credentials", params(("id" = String, Path), ("includePrivateKey" = Option<bool>, Query)), responses((status = 200, body = CredentialsView), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
pub async fn get_credentials(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<CredentialsView>, ApiError> {
    let id = device_id(&id)?;
    let include_key = match q.get("includePrivateKey").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "InvalidParameter",
                format!("includePrivateKey: {other:?} is not true or false"),
            ))
        }
    };
    if include_key && !caller.is_root() {
        return Err(ApiError::forbidden(
            "only root on the admin socket may read a device's private key; run with sudo",
        ));
    }
    let rec = state
        .store
        .device(&id)?
        .ok_or_else(|| ApiError::not_found("device", id.as_str()))?;
    let p = &rec.provision;
    let x509 = p.certificate_pem.as_ref().map(|pem| X509Credentials {
        certificate_id: p.certificate_id.clone(),
        certificate_pem: pem.clone(),
        thing_name: p.thing_name.clone(),
        gateway_generated_key: p.gateway_key,
    });
    let symmetric_key = state.group_key.as_ref().map(|k| SymmetricKey {
        primary_key: base64::engine::general_purpose::STANDARD
            .encode(sas::derive_device_key(k.expose(), id.as_str())),
    });
    let private_key = if include_key && p.gateway_key {
        let stored = state.store.secret(&id)?.ok_or_else(|| {
            ApiError::conflict(
                "NoPrivateKey",
                format!("device {id} has no key in the store yet"),
            )
        })?;
        let plain = match &state.sealer {
            Some(s) => s
                .open(
                    crate::identity::SealedRecord::DeviceKey,
                    id.as_str(),
                    &stored,
                )
                .map_err(|e| ApiError::internal("unsealing the device key", &e))?,
            None => Secret::new(stored),
        };
        let pem = plain.expose_str().ok_or_else(|| {
            ApiError::internal(
                "reading the device key",
                &"the stored key is not PEM text (sealed, but no sealing key configured?)",
            )
        })?;
        Some(pem.to_string())
    } else {
        None
    };
    Ok(Json(CredentialsView {
        device_id: id.to_string(),
        x509,
        symmetric_key,
        private_key,
    }))
}
