//! `/enrollmentGroups`: who may provision besides what the config says (seed 001's
//! enrollment groups). A `symmetricKey` group holds a primary and a secondary group key
//! (generated when not given; `GET /enrollmentGroups/{id}/keys` shows them, to writers only);
//! a device admitted by it proves a SAS token made with base64(HMAC-SHA256(groupKey, id)). An
//! `x509` group holds CA certificates (`/certificates/primary|secondary`) that count only once
//! verified by proof of possession: `generateVerificationCode`, then `verify` with a
//! certificate the CA signed whose CN is that code.
//!
//! After every change the admission credentials are rebuilt from the stored groups of the
//! configured mode (enabled ones only) and swapped in ([`crate::admission::EnrollmentSet`]),
//! so a change applies to the next request without a restart. Group keys are kept in the
//! store's `enrollment_groups` tree (the state directory is 0700).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::auth::{Caller, Role};
use super::devices::MAX_DISPLAY_NAME_CHARS;
use super::devices_list::Page;
use super::error::ApiErrorBody;
use super::error::{ApiError, JsonBody};
use super::view::rfc3339_ms;
use super::AdminState;
use crate::admission::AdmissionMode;
use crate::clock;
use crate::device_id::DeviceId;
use crate::identity::{self, Secret};
use crate::store::RecordTree;

/// Shortest group key accepted, in bytes (as `admission.group_key`).
const MIN_KEY_BYTES: usize = 16;

/// A stored enrollment group.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    /// Record layout version.
    #[serde(default = "one")]
    pub v: u32,
    /// Group id.
    pub id: String,
    /// Its name.
    pub display_name: String,
    /// Whether it admits devices.
    pub enabled: bool,
    /// How devices prove membership.
    pub attestation: GroupAttestation,
    /// Creation time (RFC 3339 UTC).
    pub created_at: String,
    /// Last change (RFC 3339 UTC).
    pub updated_at: String,
}

fn one() -> u32 {
    1
}

/// `attestation` of a group.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum GroupAttestation {
    /// Group keys.
    SymmetricKey {
        /// The keys (redacted in group views).
        #[serde(rename = "symmetricKey")]
        keys: GroupKeys,
    },
    /// CA certificates.
    X509 {
        /// The CAs.
        #[serde(default)]
        x509: X509Entries,
    },
}

/// Primary and secondary group keys (base64).
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupKeys {
    /// Primary key.
    pub primary_key: String,
    /// Secondary key.
    pub secondary_key: String,
}

/// The CA entries of an x509 group.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct X509Entries {
    /// `primary` and `secondary`.
    #[serde(default)]
    pub signing_certificates: std::collections::BTreeMap<String, CaEntry>,
}

/// One CA certificate of an x509 group.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaEntry {
    /// Proof of possession done.
    pub verified: bool,
    /// `{"sha1Thumbprint"}`
    pub info: CaInfo,
    /// The CA certificate (PEM).
    pub certificate: String,
    /// The pending verification code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
}

/// `info` of a [`CaEntry`].
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaInfo {
    /// SHA-1 of the DER, upper-case hex (as IoT Central shows it).
    pub sha1_thumbprint: String,
}

impl EnrollmentGroup {
    /// The group as shown: keys redacted, pending codes hidden.
    fn view(&self) -> Self {
        let mut g = self.clone();
        match &mut g.attestation {
            GroupAttestation::SymmetricKey { keys } => {
                keys.primary_key = "[redacted]".into();
                keys.secondary_key = "[redacted]".into();
            }
            GroupAttestation::X509 { x509 } => {
                for e in x509.signing_certificates.values_mut() {
                    e.verification_code = None;
                }
            }
        }
        g
    }
}

/// `PUT` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupBody {
    /// Its name.
    pub display_name: String,
    /// Admits devices (default true).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Accepted and ignored (IoT Central's `iot` / `iotEdge`).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// `{"type":"symmetricKey","symmetricKey"?:{...}}` or `{"type":"x509"}`.
    pub attestation: AttestationBody,
}

/// `attestation` of a `PUT` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttestationBody {
    /// `symmetricKey` or `x509`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Keys to use; generated when absent.
    #[serde(default)]
    pub symmetric_key: Option<KeysBody>,
}

/// Keys given in a `PUT` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeysBody {
    /// base64 key.
    pub primary_key: Option<String>,
    /// base64 key.
    pub secondary_key: Option<String>,
}

fn generated_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

fn decode_key(field: &str, text: &str) -> Result<Secret, ApiError> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| ApiError::bad_request("InvalidKey", format!("{field}: not base64 ({e})")))?;
    if raw.len() < MIN_KEY_BYTES {
        return Err(ApiError::bad_request(
            "InvalidKey",
            format!(
                "{field}: {} bytes; at least {MIN_KEY_BYTES} are required",
                raw.len()
            ),
        ));
    }
    Ok(Secret::new(raw))
}

fn load(state: &AdminState, id: &str) -> Result<EnrollmentGroup, ApiError> {
    state
        .store
        .record(RecordTree::EnrollmentGroups, id)?
        .ok_or_else(|| ApiError::not_found("enrollment group", id))
}

/// Rebuilds admission's enrollment credentials from the stored groups of the configured mode.
pub fn refresh(state: &AdminState) -> Result<(), ApiError> {
    let Some(set) = &state.enrollments else {
        return Ok(());
    };
    let (mut keys, mut cas) = (Vec::new(), Vec::new());
    for entry in state
        .store
        .records::<EnrollmentGroup>(RecordTree::EnrollmentGroups)
    {
        let (_, g) = entry?;
        if !g.enabled {
            continue;
        }
        match (&g.attestation, state.mode) {
            (GroupAttestation::SymmetricKey { keys: k }, AdmissionMode::SymmetricKey) => {
                for (field, text) in [
                    ("primaryKey", &k.primary_key),
                    ("secondaryKey", &k.secondary_key),
                ] {
                    match decode_key(field, text) {
                        Ok(key) => keys.push(key),
                        Err(e) => {
                            tracing::warn!(group = %g.id, "enrollment group key unusable: {}", e.message)
                        }
                    }
                }
            }
            (GroupAttestation::X509 { x509 }, AdmissionMode::X509) => {
                cas.extend(
                    x509.signing_certificates
                        .values()
                        .filter(|e| e.verified)
                        .map(|e| e.certificate.clone()),
                );
            }
            _ => {}
        }
    }
    set.replace(keys, cas);
    Ok(())
}

async fn save(state: &AdminState, g: &EnrollmentGroup) -> Result<(), ApiError> {
    state
        .store
        .put_record(RecordTree::EnrollmentGroups, &g.id, g)
        .await?;
    refresh(state)
}

/// `GET /enrollmentGroups`
#[utoipa::path(get, path = "/enrollmentGroups", responses((status = 200, body = Page<EnrollmentGroup>)))]
pub async fn list_groups(
    State(state): State<AdminState>,
) -> Result<Json<Page<EnrollmentGroup>>, ApiError> {
    let value = state
        .store
        .records::<EnrollmentGroup>(RecordTree::EnrollmentGroups)
        .map(|r| r.map(|(_, g)| g.view()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Page {
        value,
        next_link: None,
    }))
}

/// `GET /enrollmentGroups/{id}`
#[utoipa::path(get, path = "/enrollmentGroups/{id}", params(("id" = String, Path)), responses((status = 200, body = EnrollmentGroup), (status = 404, body = ApiErrorBody)))]
pub async fn get_group(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<EnrollmentGroup>, ApiError> {
    Ok(Json(load(&state, &id)?.view()))
}

/// `PUT /enrollmentGroups/{id}`: creates (201) or replaces (200).
#[utoipa::path(put, path = "/enrollmentGroups/{id}", params(("id" = String, Path)), request_body = GroupBody, responses((status = 201, body = EnrollmentGroup), (status = 200, body = EnrollmentGroup), (status = 400, body = ApiErrorBody)))]
pub async fn put_group(
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    JsonBody(body): JsonBody<GroupBody>,
) -> Result<Response, ApiError> {
    let id = DeviceId::parse(&raw)
        .map(|id| id.to_string())
        .map_err(|e| {
            ApiError::bad_request("InvalidId", format!("enrollment group id {raw:?}: {e}"))
        })?;
    if body.display_name.chars().count() > MAX_DISPLAY_NAME_CHARS {
        return Err(ApiError::bad_request(
            "InvalidDisplayName",
            format!("displayName: at most {MAX_DISPLAY_NAME_CHARS} characters"),
        ));
    }
    let existing: Option<EnrollmentGroup> =
        state.store.record(RecordTree::EnrollmentGroups, &id)?;
    let attestation = match body.attestation.kind.as_str() {
        "symmetricKey" => {
            let given = body.attestation.symmetric_key.as_ref();
            let pick = |field: &str, v: Option<&String>| -> Result<String, ApiError> {
                match v {
                    Some(text) => decode_key(field, text).map(|_| text.trim().to_string()),
                    None => Ok(generated_key()),
                }
            };
            GroupAttestation::SymmetricKey {
                keys: GroupKeys {
                    primary_key: pick(
                        "attestation.symmetricKey.primaryKey",
                        given.and_then(|k| k.primary_key.as_ref()),
                    )?,
                    secondary_key: pick(
                        "attestation.symmetricKey.secondaryKey",
                        given.and_then(|k| k.secondary_key.as_ref()),
                    )?,
                },
            }
        }
        "x509" => match existing.as_ref().map(|g| &g.attestation) {
            // Replacing the group keeps its certificates.
            Some(GroupAttestation::X509 { x509 }) => GroupAttestation::X509 { x509: x509.clone() },
            _ => GroupAttestation::X509 {
                x509: X509Entries::default(),
            },
        },
        other => {
            return Err(ApiError::bad_request(
                "InvalidAttestation",
                format!("attestation.type {other:?}: use \"symmetricKey\" or \"x509\""),
            ))
        }
    };
    let now = rfc3339_ms(clock::unix_ms());
    let g = EnrollmentGroup {
        v: 1,
        id: id.clone(),
        display_name: body.display_name,
        enabled: body.enabled.unwrap_or(true),
        attestation,
        created_at: existing
            .as_ref()
            .map_or(now.clone(), |g| g.created_at.clone()),
        updated_at: now,
    };
    save(&state, &g).await?;
    let status = if existing.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(g.view())).into_response())
}

/// `PATCH /enrollmentGroups/{id}` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupPatch {
    /// New name.
    pub display_name: Option<String>,
    /// Enable or disable.
    pub enabled: Option<bool>,
}

/// `PATCH /enrollmentGroups/{id}`
#[utoipa::path(patch, path = "/enrollmentGroups/{id}", params(("id" = String, Path)), request_body = GroupPatch, responses((status = 200, body = EnrollmentGroup), (status = 404, body = ApiErrorBody)))]
pub async fn patch_group(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<GroupPatch>,
) -> Result<Json<EnrollmentGroup>, ApiError> {
    let mut g = load(&state, &id)?;
    if let Some(n) = body.display_name {
        g.display_name = n;
    }
    if let Some(e) = body.enabled {
        g.enabled = e;
    }
    g.updated_at = rfc3339_ms(clock::unix_ms());
    save(&state, &g).await?;
    Ok(Json(g.view()))
}

/// `DELETE /enrollmentGroups/{id}`: 204 whether or not it existed.
#[utoipa::path(delete, path = "/enrollmentGroups/{id}", params(("id" = String, Path)), responses((status = 204)))]
pub async fn delete_group(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if id.len() <= 128 {
        state
            .store
            .remove_record(RecordTree::EnrollmentGroups, &id)
            .await?;
        refresh(&state)?;
    }
    Ok(StatusCode::NO_CONTENT)
}

fn may_write(caller: &Caller) -> bool {
    match caller {
        Caller::Local { role, .. } => *role == Role::Write,
        // The authorization layer let it through: its token was right.
        Caller::Tcp { .. } => true,
    }
}

/// `GET /enrollmentGroups/{id}/keys`: the group keys, to writers only (readers could
/// provision any device with them).
#[utoipa::path(get, path = "/enrollmentGroups/{id}/keys", params(("id" = String, Path)), responses((status = 200, body = GroupKeys), (status = 403, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub async fn get_keys(
    State(state): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<GroupKeys>, ApiError> {
    if !may_write(&caller) {
        return Err(ApiError::forbidden(
            "group keys are for members of admin.group only",
        ));
    }
    match load(&state, &id)?.attestation {
        GroupAttestation::SymmetricKey { keys } => Ok(Json(keys)),
        GroupAttestation::X509 { .. } => Err(ApiError::conflict(
            "NotSymmetricKey",
            format!("enrollment group {id} is an x509 group; it has certificates, not keys"),
        )),
    }
}

fn entry_name(raw: &str) -> Result<&'static str, ApiError> {
    match raw {
        "primary" => Ok("primary"),
        "secondary" => Ok("secondary"),
        _ => Err(ApiError::not_found("certificate entry", raw)),
    }
}

fn x509_entries(g: &mut EnrollmentGroup) -> Result<&mut X509Entries, ApiError> {
    match &mut g.attestation {
        GroupAttestation::X509 { x509 } => Ok(x509),
        GroupAttestation::SymmetricKey { .. } => Err(ApiError::conflict(
            "NotX509",
            format!("enrollment group {} is a symmetricKey group", g.id),
        )),
    }
}

/// Accepts a certificate as PEM or as base64 of PEM or DER (IoT Central sends base64).
fn certificate_pem(text: &str) -> Result<String, ApiError> {
    let bad = |e: String| ApiError::bad_request("InvalidCertificate", format!("certificate: {e}"));
    let pem = if text.contains("-----BEGIN") {
        text.to_string()
    } else {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| bad(format!("neither PEM nor base64 ({e})")))?;
        match String::from_utf8(raw.clone()) {
            Ok(s) if s.contains("-----BEGIN") => s,
            _ => pem::encode(&pem::Pem::new("CERTIFICATE", raw)),
        }
    };
    identity::parse_certificates(&pem).map_err(|e| bad(e.to_string()))?;
    Ok(pem)
}

/// `PUT /enrollmentGroups/{id}/certificates/{entry}` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateBody {
    /// The CA certificate (PEM, or base64 of PEM or DER).
    pub certificate: String,
    /// Ignored: a certificate is verified only by proof of possession.
    #[serde(default)]
    pub verified: Option<bool>,
}

/// `PUT /enrollmentGroups/{id}/certificates/{entry}`: sets a CA, unverified.
#[utoipa::path(put, path = "/enrollmentGroups/{id}/certificates/{entry}", params(("id" = String, Path), ("entry" = String, Path, description = "primary or secondary")), request_body = CertificateBody, responses((status = 200, body = CaEntry), (status = 400, body = ApiErrorBody)))]
pub async fn put_certificate(
    State(state): State<AdminState>,
    Path((id, entry)): Path<(String, String)>,
    JsonBody(body): JsonBody<CertificateBody>,
) -> Result<Json<CaEntry>, ApiError> {
    let entry = entry_name(&entry)?;
    let mut g = load(&state, &id)?;
    let pem = certificate_pem(&body.certificate)?;
    let info = identity::parse_certificates(&pem)
        .map_err(|e| ApiError::bad_request("InvalidCertificate", e.to_string()))?;
    let first = &info[0];
    if !first.is_ca {
        return Err(ApiError::bad_request(
            "InvalidCertificate",
            "certificate: not a CA certificate (basicConstraints CA=true missing)",
        ));
    }
    let sha1 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &first.der);
    let ca = CaEntry {
        verified: false,
        info: CaInfo {
            sha1_thumbprint: hex::encode_upper(sha1.as_ref()),
        },
        certificate: pem,
        verification_code: None,
    };
    x509_entries(&mut g)?
        .signing_certificates
        .insert(entry.to_string(), ca.clone());
    g.updated_at = rfc3339_ms(clock::unix_ms());
    save(&state, &g).await?;
    Ok(Json(CaEntry {
        verification_code: None,
        ..ca
    }))
}

fn ca_entry<'a>(g: &'a mut EnrollmentGroup, entry: &str) -> Result<&'a mut CaEntry, ApiError> {
    let id = g.id.clone();
    x509_entries(g)?
        .signing_certificates
        .get_mut(entry)
        .ok_or_else(|| ApiError::not_found("certificate", &format!("{id}/{entry}")))
}

/// `GET /enrollmentGroups/{id}/certificates/{entry}`
#[utoipa::path(get, path = "/enrollmentGroups/{id}/certificates/{entry}", params(("id" = String, Path), ("entry" = String, Path)), responses((status = 200, body = CaEntry), (status = 404, body = ApiErrorBody)))]
pub async fn get_certificate(
    State(state): State<AdminState>,
    Path((id, entry)): Path<(String, String)>,
) -> Result<Json<CaEntry>, ApiError> {
    let entry = entry_name(&entry)?;
    let mut g = load(&state, &id)?;
    let mut e = ca_entry(&mut g, entry)?.clone();
    e.verification_code = None;
    Ok(Json(e))
}

/// `DELETE /enrollmentGroups/{id}/certificates/{entry}`
#[utoipa::path(delete, path = "/enrollmentGroups/{id}/certificates/{entry}", params(("id" = String, Path), ("entry" = String, Path)), responses((status = 204)))]
pub async fn delete_certificate(
    State(state): State<AdminState>,
    Path((id, entry)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let entry = entry_name(&entry)?;
    let mut g = load(&state, &id)?;
    x509_entries(&mut g)?.signing_certificates.remove(entry);
    save(&state, &g).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /enrollmentGroups/{id}/certificates/{entry}/generateVerificationCode`
#[utoipa::path(post, path = "/enrollmentGroups/{id}/certificates/{entry}/generateVerificationCode", params(("id" = String, Path), ("entry" = String, Path)), responses((status = 200, description = "{\"verificationCode\"}")))]
pub async fn generate_verification_code(
    State(state): State<AdminState>,
    Path((id, entry)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let entry = entry_name(&entry)?;
    let mut g = load(&state, &id)?;
    let code = hex::encode_upper(rand::random::<[u8; 16]>());
    ca_entry(&mut g, entry)?.verification_code = Some(code.clone());
    save(&state, &g).await?;
    Ok(Json(serde_json::json!({ "verificationCode": code })))
}

/// `POST /enrollmentGroups/{id}/certificates/{entry}/verify` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifyBody {
    /// A certificate signed by the CA with CN = the verification code.
    pub certificate: String,
}

/// `POST /enrollmentGroups/{id}/certificates/{entry}/verify`: proof of possession of the CA's
/// key; the entry becomes `verified` and admits devices.
#[utoipa::path(post, path = "/enrollmentGroups/{id}/certificates/{entry}/verify", params(("id" = String, Path), ("entry" = String, Path)), request_body = VerifyBody, responses((status = 200, body = CaEntry), (status = 400, body = ApiErrorBody)))]
pub async fn verify(
    State(state): State<AdminState>,
    Path((id, entry)): Path<(String, String)>,
    JsonBody(body): JsonBody<VerifyBody>,
) -> Result<Json<CaEntry>, ApiError> {
    let entry = entry_name(&entry)?;
    let mut g = load(&state, &id)?;
    let proof = certificate_pem(&body.certificate)?;
    let ca = ca_entry(&mut g, entry)?;
    let Some(code) = ca.verification_code.clone() else {
        return Err(ApiError::conflict(
            "NoVerificationCode",
            "call generateVerificationCode first",
        ));
    };
    let info = identity::parse_certificates(&proof)
        .map_err(|e| ApiError::bad_request("InvalidCertificate", e.to_string()))?;
    if info[0].subject_cn.as_deref() != Some(code.as_str()) {
        return Err(ApiError::bad_request(
            "VerificationFailed",
            "the certificate's CN is not the verification code",
        ));
    }
    identity::verify_chain(&proof, &ca.certificate, clock::unix_secs()).map_err(|e| {
        ApiError::bad_request(
            "VerificationFailed",
            format!("the certificate is not signed by this CA: {e}"),
        )
    })?;
    ca.verified = true;
    ca.verification_code = None;
    let out = ca.clone();
    g.updated_at = rfc3339_ms(clock::unix_ms());
    save(&state, &g).await?;
    Ok(Json(out))
}
