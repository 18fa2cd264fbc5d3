//! The device as the admin API shows it: a camelCase view built from the stored record, never
//! the record itself (which holds CSRs, ownership tokens and engine bookkeeping, and whose
//! layout is the store's business).

use std::borrow::Cow;

use serde::Serialize;

use super::filter::{Field, Fields, Value};
use crate::downstream::contract::DeviceStatus;
use crate::downstream::ConnectionFacts;
use crate::store::{DeviceRecord, DeviceState};

/// A device in API responses.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView {
    /// Device id.
    pub id: String,
    /// Operator-given name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Stored state name (`waitingApproval`, `keyReady`, `delivered`, ...).
    pub state: &'static str,
    /// Device-facing status: waitingApproval | provisioning | provisioned | failed | blocked.
    pub status: DeviceStatus,
    /// May send telemetry.
    pub enabled: bool,
    /// Admitted by an operator or the admission policy.
    pub approved: bool,
    /// Provisioned (the result was delivered).
    pub provisioned: bool,
    /// The cloud's name for the device once registered (AWS thing name, IoT Hub device id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thing_name: Option<String>,
    /// The IoT Hub DPS assigned the device to (Azure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    /// Cloud certificate id once issued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
    /// The most recent error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
    /// Provisioning attempts.
    pub attempts: u32,
    /// Payload format the device speaks (`json`/`cbor`).
    pub format: String,
    /// Creation time (RFC 3339, UTC).
    pub created_at: String,
    /// Last change (RFC 3339, UTC).
    pub updated_at: String,
    /// The entity tag (also the `ETag` header).
    pub etag: String,
    /// The device's current connection to the embedded broker, when connected: what an
    /// operator looks at before approving.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionView>,
}

/// `lastError` of a device.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastError {
    /// HTTP-like status code.
    pub status_code: u16,
    /// Machine-readable code.
    pub error_code: String,
    /// Explanation.
    pub error_message: String,
}

/// `connection` of a device.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionView {
    /// Where it connects from.
    pub remote_address: String,
    /// Over the TLS listener.
    pub tls: bool,
    /// Proved its identity (certificate, SAS token or password).
    pub authenticated: bool,
    /// SHA-256 of the client certificate it presented (lower-case hex), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_certificate_sha256: Option<String>,
}

impl From<ConnectionFacts> for ConnectionView {
    fn from(f: ConnectionFacts) -> Self {
        ConnectionView {
            remote_address: f.peer.to_string(),
            tls: f.tls,
            authenticated: f.authenticated,
            client_certificate_sha256: f.client_cert_sha256.map(hex::encode),
        }
    }
}

/// The `ETag` of a record: its etag number, quoted.
pub fn etag_of(rec: &DeviceRecord) -> String {
    format!("\"{}\"", rec.etag)
}

/// Whether the device got past the approval gate.
pub fn is_approved(state: &DeviceState) -> bool {
    matches!(
        state,
        DeviceState::Approved
            | DeviceState::KeyReady { .. }
            | DeviceState::CertificateIssued { .. }
            | DeviceState::Registering { .. }
            | DeviceState::Registered { .. }
            | DeviceState::Delivered
            | DeviceState::Failed { .. }
    )
}

impl DeviceView {
    /// The view of `rec`, with its connection facts if connected.
    pub fn new(rec: &DeviceRecord, connection: Option<ConnectionFacts>) -> Self {
        let status = DeviceStatus::of(&rec.state);
        DeviceView {
            id: rec.id.to_string(),
            display_name: rec.display_name.clone(),
            state: rec.state.name(),
            status,
            enabled: rec.enabled,
            approved: is_approved(&rec.state),
            provisioned: status == DeviceStatus::Provisioned,
            thing_name: rec.provision.thing_name.clone(),
            assigned_hub: rec.provision.endpoint.clone(),
            certificate_id: rec.provision.certificate_id.clone(),
            last_error: rec.last_error.as_ref().map(|e| LastError {
                status_code: e.status_code,
                error_code: e.error_code.clone(),
                error_message: e.error_message.clone(),
            }),
            attempts: rec.attempts,
            format: rec.format.clone(),
            created_at: rfc3339_ms(rec.created_at_ms),
            updated_at: rfc3339_ms(rec.updated_at_ms),
            etag: etag_of(rec),
            connection: connection.map(ConnectionView::from),
        }
    }
}

impl Fields for DeviceView {
    fn field(&self, field: Field) -> Value<'_> {
        fn s(v: &str) -> Value<'_> {
            Value::Str(Cow::Borrowed(v))
        }
        fn opt(v: &Option<String>) -> Value<'_> {
            v.as_deref().map_or(Value::Null, s)
        }
        match field {
            Field::Id => s(&self.id),
            Field::DisplayName => opt(&self.display_name),
            Field::State => s(self.state),
            Field::Status => s(self.status.as_str()),
            Field::Enabled => Value::Bool(self.enabled),
            Field::Approved => Value::Bool(self.approved),
            Field::Provisioned => Value::Bool(self.provisioned),
            Field::ThingName => opt(&self.thing_name),
            Field::LastErrorCode => self
                .last_error
                .as_ref()
                .map_or(Value::Null, |e| s(&e.error_code)),
            Field::CreatedAt => s(&self.created_at),
            Field::UpdatedAt => s(&self.updated_at),
        }
    }
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds (`2026-12-06T17:46:27.123Z`): fixed
/// width, so text order is time order and filters can compare them as strings.
pub fn rfc3339_ms(ms: u64) -> String {
    crate::clock::rfc3339_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(rfc3339_ms(1_796_579_187_123), "2026-12-06T17:46:27.123Z");
    }

    #[test]
    fn old_records_without_display_name_read() {
        let old = r#"{"v":1,"id":"dev-1","state":"waitingApproval","etag":3,"created_at_ms":1,"updated_at_ms":2,"format":"json"}"#;
        let rec: DeviceRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.display_name, None);
        let v = DeviceView::new(&rec, None);
        assert_eq!(v.status, DeviceStatus::WaitingApproval);
        assert!(!v.approved && !v.provisioned && v.enabled);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["status"], "waitingApproval");
        assert_eq!(json["etag"], "\"3\"");
        assert!(json.get("displayName").is_none());
    }
}
