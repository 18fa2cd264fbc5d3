//! Symmetric-key admission: DPS-style shared access signature (SAS) tokens.
//!
//! A symmetric-key enrollment group has one group key; each device's key is derived from it the
//! way Azure DPS does, `base64(HMAC-SHA256(groupKey, registrationId))`, so a device only ever
//! holds its own key. The device proves it holds that key with a SAS token (seed 003):
//!
//! ```text
//! SharedAccessSignature sr={URL-encoded resourceURI}&sig={signature}&se={expiry}&skn=registration
//! signature = base64(HMAC-SHA256(deviceKey, URL-encoded(resourceURI) + "\n" + expiry))
//! ```
//!
//! What [`verify_sas`] accepts, precisely:
//! - resource URI `{anything}/registrations/{id}` (DPS form; the `{anything}` is normally the
//!   ID scope, is not checked, and must not contain `/`), `{anything}/devices/{id}` (IoT Hub
//!   form; `{anything}` is the hub host name, not checked either) or plain `{id}`. Callers that
//!   care which service a token is for (the Azure emulator) compare
//!   [`SasClaims::resource_uri`] themselves. The id is compared
//!   case-insensitively with the device id (registration ids are case-insensitive).
//! - token values are percent-decoded (`%XX`); `+` is kept literally rather than read as a
//!   space, so a base64 signature that a client forgot to encode still verifies.
//! - the signed string is the URL-encoded resource URI as Python's `quote_plus` (and the Azure
//!   SDKs) produce it: ASCII letters, digits and `-._~` as is, every other byte `%XX` with
//!   upper-case hex. Clients that encode differently (lower-case hex) sign the `sr` text exactly
//!   as they sent it, so that text is accepted too. Both checks are constant-time.
//! - `se` in unix seconds, in the future and at most `max_ttl_secs` ahead (tokens valid for
//!   years are a stolen-credential risk, not a convenience).
//! - `skn` absent or `registration` (the only policy name DPS uses for device registration).
//!
//! Device keys are derived from the canonical (lower-case) device id, [`DeviceId::as_str`].

use aws_lc_rs::hmac;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::device_id::DeviceId;

/// Prefix of every SAS token.
pub const SAS_PREFIX: &str = "SharedAccessSignature ";

/// The policy name (`skn`) DPS uses for device registration tokens.
pub const REGISTRATION_KEY_NAME: &str = "registration";

/// Longest token accepted; real tokens are well under 300 characters.
pub const MAX_SAS_LEN: usize = 2048;

/// Default cap on how far in the future a token may expire: one year.
pub const DEFAULT_MAX_TTL_SECS: u64 = 365 * 24 * 3600;

/// Bytes left unencoded in a resource URI: what Python's `quote_plus` keeps (RFC 3986
/// unreserved characters). Everything else, `/` and `:` included, becomes `%XX`.
const URI_ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a SAS token does not admit a device; [`SasError::error_code`] is what the device sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The token is not of the `SharedAccessSignature sr=..&sig=..&se=..` form.
    #[error("SAS token is malformed: {reason}")]
    Malformed {
        /// What is wrong with its syntax.
        reason: String,
    },

    /// The resource URI names a registration other than the requesting device.
    #[error("SAS token resource URI {resource_uri:?} is not for device {device_id:?} (expected \"{{idScope}}/registrations/{device_id}\" or \"{device_id}\")")]
    WrongResource {
        /// The decoded `sr` value (truncated when long).
        resource_uri: String,
        /// The requesting device.
        device_id: String,
    },

    /// `skn` names a policy other than `registration`.
    #[error("SAS token key name (skn) {key_name:?} is not accepted; use skn=registration or leave it out")]
    WrongKeyName {
        /// The `skn` value (truncated when long).
        key_name: String,
    },

    /// The token expired (`se` is not in the future).
    #[error("SAS token expired at {expiry} (unix seconds), {ago} s ago; issue a new token")]
    Expired {
        /// The token's `se`.
        expiry: i64,
        /// How long ago, in seconds.
        ago: i64,
    },

    /// The token expires further in the future than allowed.
    #[error("SAS token expires in {ttl} s, more than the accepted maximum of {max_ttl} s; issue a shorter-lived token")]
    TooLongLived {
        /// Seconds until `se`.
        ttl: i64,
        /// The configured cap.
        max_ttl: u64,
    },

    /// The signature was not made with this device's key over this resource URI and expiry.
    #[error("SAS token signature does not verify for device {device_id:?} (wrong device key, or the token was altered)")]
    BadSignature {
        /// The requesting device.
        device_id: String,
    },
}

impl SasError {
    /// The `errorCode` a rejected device receives.
    pub fn error_code(&self) -> &'static str {
        match self {
            SasError::Expired { .. } => "SasTokenExpired",
            SasError::BadSignature { .. } => "InvalidSignature",
            SasError::Malformed { .. }
            | SasError::WrongResource { .. }
            | SasError::WrongKeyName { .. }
            | SasError::TooLongLived { .. } => "InvalidSasToken",
        }
    }

    fn malformed(reason: impl Into<String>) -> Self {
        SasError::Malformed {
            reason: reason.into(),
        }
    }
}

/// What a verified token said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasClaims {
    /// The decoded resource URI (`sr`).
    pub resource_uri: String,
    /// Expiry, unix seconds (`se`).
    pub expiry: i64,
    /// The policy name (`skn`), when present.
    pub key_name: Option<String>,
}

/// A device's key, derived from its group's key as DPS does: `HMAC-SHA256(groupKey, id)`.
///
/// Both are raw bytes: `group_key` is the base64-decoded group key, the result is the raw
/// 32-byte device key (its base64 form is what DPS tools print as the device key). Pass the
/// canonical device id ([`DeviceId::as_str`]); fleetgw derives keys from that form.
pub fn derive_device_key(group_key: &[u8], id: &str) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, group_key);
    hmac::sign(&key, id.as_bytes()).as_ref().to_vec()
}

/// The DPS resource URI of a registration: `{id_scope}/registrations/{id}`.
pub fn registration_resource_uri(id_scope: &str, id: &DeviceId) -> String {
    format!("{id_scope}/registrations/{}", id.as_str())
}

/// Builds a SAS token for `resource_uri` signed with the raw device `key`, valid until
/// `expiry_unix`, with `skn={key_name}` when given: what a device (or the simulator) sends.
pub fn generate_sas(
    resource_uri: &str,
    key: &[u8],
    expiry_unix: i64,
    key_name: Option<&str>,
) -> String {
    let encoded_uri = encode_uri(resource_uri);
    let signature = sign(key, &encoded_uri, expiry_unix);
    let mut token = format!(
        "{SAS_PREFIX}sr={encoded_uri}&sig={}&se={expiry_unix}",
        utf8_percent_encode(&signature, URI_ENCODE_SET)
    );
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.extend(utf8_percent_encode(name, URI_ENCODE_SET));
    }
    token
}

/// Verifies that `token` was made with `device_key` (raw bytes) for `device_id`, is unexpired at
/// `now_unix` and expires at most `max_ttl_secs` later. See the module comment for the exact
/// rules.
pub fn verify_sas(
    token: &str,
    device_id: &DeviceId,
    device_key: &[u8],
    now_unix: i64,
    max_ttl_secs: u64,
) -> Result<SasClaims, SasError> {
    let parsed = ParsedToken::parse(token)?;

    let registration = registration_of(&parsed.resource_uri);
    if !registration.is_some_and(|r| r.eq_ignore_ascii_case(device_id.as_str())) {
        return Err(SasError::WrongResource {
            resource_uri: truncated(&parsed.resource_uri),
            device_id: device_id.as_str().to_string(),
        });
    }
    if let Some(name) = &parsed.key_name {
        if name != REGISTRATION_KEY_NAME {
            return Err(SasError::WrongKeyName {
                key_name: truncated(name),
            });
        }
    }

    if parsed.expiry <= now_unix {
        return Err(SasError::Expired {
            expiry: parsed.expiry,
            ago: now_unix.saturating_sub(parsed.expiry),
        });
    }
    let ttl = parsed.expiry.saturating_sub(now_unix);
    if u64::try_from(ttl).map_or(true, |ttl| ttl > max_ttl_secs) {
        return Err(SasError::TooLongLived {
            ttl,
            max_ttl: max_ttl_secs,
        });
    }

    let key = hmac::Key::new(hmac::HMAC_SHA256, device_key);
    let canonical = encode_uri(&parsed.resource_uri);
    let mut signed_forms = vec![canonical];
    if parsed.raw_resource_uri != signed_forms[0] {
        signed_forms.push(parsed.raw_resource_uri.to_string());
    }
    let verified = signed_forms.iter().any(|uri| {
        let message = string_to_sign(uri, parsed.expiry);
        hmac::verify(&key, message.as_bytes(), &parsed.signature).is_ok()
    });
    if !verified {
        return Err(SasError::BadSignature {
            device_id: device_id.as_str().to_string(),
        });
    }
    Ok(SasClaims {
        resource_uri: parsed.resource_uri,
        expiry: parsed.expiry,
        key_name: parsed.key_name,
    })
}

/// URL-encodes a resource URI the way the signature is computed over it.
fn encode_uri(uri: &str) -> String {
    utf8_percent_encode(uri, URI_ENCODE_SET).to_string()
}

fn string_to_sign(encoded_uri: &str, expiry: i64) -> String {
    format!("{encoded_uri}\n{expiry}")
}

fn sign(key: &[u8], encoded_uri: &str, expiry: i64) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&key, string_to_sign(encoded_uri, expiry).as_bytes());
    BASE64.encode(tag.as_ref())
}

/// The registration id a resource URI names: `{scope}/registrations/{id}`,
/// `{hub}/devices/{id}` or `{id}`.
fn registration_of(uri: &str) -> Option<&str> {
    match uri.split('/').collect::<Vec<_>>().as_slice() {
        [id] if !id.is_empty() => Some(id),
        [scope, "registrations", id] if !scope.is_empty() && !id.is_empty() => Some(id),
        [hub, "devices", id] if !hub.is_empty() && !id.is_empty() => Some(id),
        _ => None,
    }
}

/// Echoed input is cut so a hostile token cannot bloat log lines and responses.
fn truncated(value: &str) -> String {
    const MAX: usize = 160;
    match value.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value.to_string(),
    }
}

/// The fields of a token, decoded but not yet checked.
struct ParsedToken<'a> {
    /// `sr` exactly as it appears in the token (still percent-encoded).
    raw_resource_uri: &'a str,
    resource_uri: String,
    signature: Vec<u8>,
    expiry: i64,
    key_name: Option<String>,
}

impl<'a> ParsedToken<'a> {
    fn parse(token: &'a str) -> Result<Self, SasError> {
        if token.len() > MAX_SAS_LEN {
            return Err(SasError::malformed(format!(
                "{} bytes long; at most {MAX_SAS_LEN} are accepted",
                token.len()
            )));
        }
        let fields = token.strip_prefix(SAS_PREFIX).ok_or_else(|| {
            SasError::malformed(format!(
                "it does not start with {:?}",
                SAS_PREFIX.trim_end()
            ))
        })?;

        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for field in fields.split('&') {
            let (name, value) = field.split_once('=').ok_or_else(|| {
                SasError::malformed(format!("field {:?} has no '='", truncated(field)))
            })?;
            let slot = match name {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                other => {
                    return Err(SasError::malformed(format!(
                        "unknown field {:?} (expected sr, sig, se and optionally skn)",
                        truncated(other)
                    )))
                }
            };
            if slot.replace(value).is_some() {
                return Err(SasError::malformed(format!("field {name} appears twice")));
            }
        }

        let raw_resource_uri = sr.ok_or_else(|| SasError::malformed("field sr is missing"))?;
        let resource_uri = decode("sr", raw_resource_uri)?;
        let sig = decode(
            "sig",
            sig.ok_or_else(|| SasError::malformed("field sig is missing"))?,
        )?;
        let signature = BASE64
            .decode(sig.as_bytes())
            .map_err(|e| SasError::malformed(format!("sig is not base64: {e}")))?;
        let se = se.ok_or_else(|| SasError::malformed("field se is missing"))?;
        let expiry = se
            .parse::<i64>()
            .ok()
            .filter(|_| !se.is_empty() && se.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                SasError::malformed(format!(
                    "se {:?} is not an expiry in unix seconds",
                    truncated(se)
                ))
            })?;
        let key_name = skn.map(|v| decode("skn", v)).transpose()?;
        Ok(Self {
            raw_resource_uri,
            resource_uri,
            signature,
            expiry,
            key_name,
        })
    }
}

fn decode(field: &str, value: &str) -> Result<String, SasError> {
    percent_decode_str(value)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| SasError::malformed(format!("{field} is not UTF-8 after URL decoding")))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known answer computed with Python (hmac, hashlib, base64, urllib.parse.quote_plus and
    // urlencode), the same steps the Azure IoT SDKs take:
    //   group = b64decode(GROUP_KEY_B64); dev = b64encode(hmac(group, b"sensor-01", sha256))
    //   sig = b64encode(hmac(b64decode(dev), quote_plus(URI) + "\n" + "1893456000", sha256))
    //   "SharedAccessSignature " + urlencode({sr: URI, sig, se, skn: "registration"})
    const GROUP_KEY_B64: &str = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVowMTIzNDU2Nzg5YWJjZGVmZ2hpamts";
    const DEVICE_KEY_B64: &str = "XOYnsi26k3LzASX5xjcpjKOUlctaJeK3eIaCZB3DZD8=";
    const URI: &str = "0ne00ABC123/registrations/sensor-01";
    const EXPIRY: i64 = 1_893_456_000;
    const TOKEN: &str = "SharedAccessSignature sr=0ne00ABC123%2Fregistrations%2Fsensor-01&sig=cB3InJYqVqnMp156%2BhO%2BwXVR1HMXLLOK7ghy5r05GSA%3D&se=1893456000&skn=registration";
    const NOW: i64 = EXPIRY - 3600;

    fn id(raw: &str) -> DeviceId {
        DeviceId::parse(raw).unwrap()
    }

    fn device_key() -> Vec<u8> {
        derive_device_key(&BASE64.decode(GROUP_KEY_B64).unwrap(), "sensor-01")
    }

    fn verify(token: &str, device: &str, key: &[u8]) -> Result<SasClaims, SasError> {
        verify_sas(token, &id(device), key, NOW, DEFAULT_MAX_TTL_SECS)
    }

    #[test]
    fn derives_the_device_key_and_token_python_and_the_azure_sdks_derive() {
        let key = device_key();
        assert_eq!(BASE64.encode(&key), DEVICE_KEY_B64);
        assert_eq!(
            generate_sas(URI, &key, EXPIRY, Some(REGISTRATION_KEY_NAME)),
            TOKEN
        );
        let claims = verify(TOKEN, "sensor-01", &key).unwrap();
        assert_eq!(
            claims,
            SasClaims {
                resource_uri: URI.to_string(),
                expiry: EXPIRY,
                key_name: Some("registration".into()),
            }
        );
    }

    #[test]
    fn verifies_a_token_made_like_the_azure_iot_device_sdk() {
        // Python, as azure-iot-device's SasToken does it: uri = quote(URI, safe=""),
        // sig = quote(b64encode(hmac(b64decode(deviceKey), uri + "\n" + se, sha256))).
        // The id uses every special character registration ids allow; ':' must be %3A in the
        // signed string and '~' must stay as is.
        let token = "SharedAccessSignature sr=scope~1%2Fregistrations%2Fplc%3Aline-1.cell_2&sig=ceNzePeI0tqIJqNZpBUdXBvwzoAIAi92SXlmHAQnrHk%3D&se=1893456000&skn=registration";
        let group = BASE64.decode(GROUP_KEY_B64).unwrap();
        let key = derive_device_key(&group, "plc:line-1.cell_2");
        assert_eq!(
            BASE64.encode(&key),
            "fPxI/qFOhJGi1RkugPG4LJ+68k/akr5RK1lUua5bfrY="
        );
        let claims = verify(token, "PLC:line-1.cell_2", &key).unwrap();
        assert_eq!(
            claims.resource_uri,
            "scope~1/registrations/plc:line-1.cell_2"
        );
        assert_eq!(
            generate_sas(&claims.resource_uri, &key, EXPIRY, Some("registration")),
            token
        );
    }

    #[test]
    fn accepts_plain_id_uris_mixed_case_ids_no_skn_and_unencoded_signatures() {
        let key = device_key();
        let plain = generate_sas("sensor-01", &key, EXPIRY, None);
        let claims = verify(&plain, "sensor-01", &key).unwrap();
        assert_eq!(claims.resource_uri, "sensor-01");
        assert_eq!(claims.key_name, None);

        // Registration ids are case-insensitive; the signature covers the URI as sent.
        let mixed = generate_sas("scope/registrations/Sensor-01", &key, EXPIRY, None);
        assert_eq!(
            verify(&mixed, "SENSOR-01", &key).unwrap().resource_uri,
            "scope/registrations/Sensor-01"
        );

        // A client that does not percent-encode the base64 signature ('+', '=') still verifies.
        let raw_sig = TOKEN
            .replace("%2B", "+")
            .replace("%3D", "=")
            .replace("&skn=registration", "");
        assert!(raw_sig.contains("sig=cB3InJYqVqnMp156+hO+"));
        assert!(verify(&raw_sig, "sensor-01", &key).is_ok());

        // A client that encodes with lower-case hex signed its own text; that text verifies.
        let lower_sr = "0ne00ABC123%2fregistrations%2fsensor-01";
        let sig = sign(&key, lower_sr, EXPIRY);
        let lower = format!(
            "{SAS_PREFIX}sr={lower_sr}&sig={}&se={EXPIRY}",
            utf8_percent_encode(&sig, URI_ENCODE_SET)
        );
        assert_eq!(verify(&lower, "sensor-01", &key).unwrap().resource_uri, URI);
    }

    #[test]
    fn rejects_a_token_made_with_another_key() {
        let other_group = derive_device_key(b"another group key of enough bytes", "sensor-01");
        let err = verify(TOKEN, "sensor-01", &other_group).unwrap_err();
        assert_eq!(
            err,
            SasError::BadSignature {
                device_id: "sensor-01".into()
            }
        );
        assert_eq!(err.error_code(), "InvalidSignature");
        assert_eq!(
            err.to_string(),
            "SAS token signature does not verify for device \"sensor-01\" (wrong device key, or the token was altered)"
        );
    }

    #[test]
    fn rejects_expired_and_too_long_lived_tokens() {
        let key = device_key();
        let err = verify_sas(TOKEN, &id("sensor-01"), &key, EXPIRY + 10, 3600).unwrap_err();
        assert_eq!(
            err,
            SasError::Expired {
                expiry: EXPIRY,
                ago: 10
            }
        );
        assert_eq!(err.error_code(), "SasTokenExpired");
        // Expiring exactly now is expired.
        let err = verify_sas(TOKEN, &id("sensor-01"), &key, EXPIRY, 3600).unwrap_err();
        assert_eq!(err.error_code(), "SasTokenExpired");

        let err = verify_sas(TOKEN, &id("sensor-01"), &key, EXPIRY - 7200, 3600).unwrap_err();
        assert_eq!(
            err,
            SasError::TooLongLived {
                ttl: 7200,
                max_ttl: 3600
            }
        );
        assert_eq!(err.error_code(), "InvalidSasToken");
        assert!(verify_sas(TOKEN, &id("sensor-01"), &key, EXPIRY - 3600, 3600).is_ok());
    }

    #[test]
    fn accepts_the_iot_hub_form_signed_over_sr_as_sent() {
        let key = device_key();
        let token = generate_sas("hub.example.net/devices/sensor-01", &key, EXPIRY, None);
        let claims = verify(&token, "Sensor-01", &key).unwrap();
        assert_eq!(claims.resource_uri, "hub.example.net/devices/sensor-01");
        // A client that percent-encodes with lower-case hex signs its own text: still valid.
        let lower = token.replace("%2F", "%2f");
        let message = format!("hub.example.net%2fdevices%2fsensor-01\n{EXPIRY}");
        let sig = BASE64.encode(
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), message.as_bytes()).as_ref(),
        );
        let lower = format!(
            "{}&sig={}&se={EXPIRY}",
            lower.split("&sig=").next().unwrap(),
            utf8_percent_encode(&sig, URI_ENCODE_SET)
        );
        assert!(verify(&lower, "sensor-01", &key).is_ok());
    }

    #[test]
    fn rejects_a_token_for_another_device_even_when_signed_with_that_devices_key() {
        let group = BASE64.decode(GROUP_KEY_B64).unwrap();
        // The token is genuinely sensor-01's; sensor-02 must not be able to use it.
        let err = verify(TOKEN, "sensor-02", &derive_device_key(&group, "sensor-02")).unwrap_err();
        assert_eq!(
            err,
            SasError::WrongResource {
                resource_uri: URI.into(),
                device_id: "sensor-02".into()
            }
        );
        assert_eq!(err.error_code(), "InvalidSasToken");

        for uri in [
            "hub/devices/sensor-02",
            "hub/devices/",
            "hub/devices/sensor-01/messages",
            "a/b/registrations/sensor-01",
            "/registrations/sensor-01",
            "scope/registrations/",
            "",
        ] {
            let token = generate_sas(uri, &device_key(), EXPIRY, None);
            let err = verify(&token, "sensor-01", &device_key()).unwrap_err();
            assert!(
                matches!(err, SasError::WrongResource { .. }),
                "{uri:?}: {err:?}"
            );
        }
    }

    #[test]
    fn rejects_tampered_signature_expiry_and_uri() {
        let key = device_key();
        let tampered_sig = TOKEN.replace("sig=cB3I", "sig=dB3I");
        assert_eq!(
            verify(&tampered_sig, "sensor-01", &key)
                .unwrap_err()
                .error_code(),
            "InvalidSignature"
        );
        // A longer validity than was signed.
        let tampered_se = TOKEN.replace("se=1893456000", "se=1893457000");
        assert!(matches!(
            verify(&tampered_se, "sensor-01", &key),
            Err(SasError::BadSignature { .. })
        ));
        let tampered_scope = TOKEN.replace("0ne00ABC123", "0ne00ABC124");
        assert!(matches!(
            verify(&tampered_scope, "sensor-01", &key),
            Err(SasError::BadSignature { .. })
        ));
    }

    #[test]
    fn explains_malformed_tokens() {
        let key = device_key();
        let cases = [
            (
                "sr=a&sig=b&se=1",
                "it does not start with \"SharedAccessSignature\"",
            ),
            (
                "SharedAccessSignature sig=AAAA&se=1893456000",
                "field sr is missing",
            ),
            (
                "SharedAccessSignature sr=sensor-01&se=1893456000",
                "field sig is missing",
            ),
            (
                "SharedAccessSignature sr=sensor-01&sig=AAAA",
                "field se is missing",
            ),
            (
                "SharedAccessSignature sr=sensor-01&sig=AAAA&se=-5",
                "se \"-5\" is not an expiry in unix seconds",
            ),
            (
                "SharedAccessSignature sr=sensor-01&sig=AAAA&se=soon",
                "se \"soon\" is not an expiry in unix seconds",
            ),
            (
                "SharedAccessSignature sr=sensor-01&sig=!!&se=1893456000",
                "sig is not base64",
            ),
            (
                "SharedAccessSignature sr=sensor-01&sr=sensor-01&sig=AAAA&se=1893456000",
                "field sr appears twice",
            ),
            (
                "SharedAccessSignature sr=sensor-01&sig=AAAA&se=1893456000&foo=1",
                "unknown field \"foo\"",
            ),
            (
                "SharedAccessSignature sr=sensor-01&sig",
                "field \"sig\" has no '='",
            ),
            (
                "SharedAccessSignature sr=%FF&sig=AAAA&se=1893456000",
                "sr is not UTF-8 after URL decoding",
            ),
        ];
        for (token, expected) in cases {
            let err = verify(token, "sensor-01", &key).unwrap_err();
            assert_eq!(err.error_code(), "InvalidSasToken", "{token}");
            let message = err.to_string();
            assert!(
                message.starts_with("SAS token is malformed: ") && message.contains(expected),
                "{token}: {message}"
            );
        }
        let long = format!("{SAS_PREFIX}sr={}", "a".repeat(MAX_SAS_LEN));
        assert!(verify(&long, "sensor-01", &key)
            .unwrap_err()
            .to_string()
            .contains("at most 2048"));
    }

    #[test]
    fn rejects_key_names_other_than_registration() {
        let token = generate_sas(URI, &device_key(), EXPIRY, Some("iothubowner"));
        let err = verify(&token, "sensor-01", &device_key()).unwrap_err();
        assert_eq!(
            err,
            SasError::WrongKeyName {
                key_name: "iothubowner".into()
            }
        );
        assert_eq!(err.error_code(), "InvalidSasToken");
    }

    #[test]
    fn echoed_values_are_truncated() {
        let long = "x".repeat(500);
        assert_eq!(truncated(&long).len(), 163);
        assert_eq!(truncated("short"), "short");
    }
}
