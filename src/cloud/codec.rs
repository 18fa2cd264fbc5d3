//! JSON / CBOR payload codecs for the AWS IoT fleet provisioning MQTT API.
//!
//! The same typed payloads are used by the gateway's cloud client and by the AWS emulator, so
//! both sides agree on the wire form by construction: camelCase field names, unknown fields
//! ignored (AWS may add fields), JSON via serde_json and CBOR via ciborium. The payload format
//! is chosen by the topic suffix (`.../json` or `.../cbor`), see [`crate::cloud::aws::topics`].
//!
//! Decoding never trusts its input: payloads over [`MAX_PAYLOAD_BYTES`] are refused before any
//! parsing, and every error names the format and the field path that was wrong
//! (`invalid json payload: certificateSigningRequest: invalid type: ...`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Largest payload [`decode`] accepts; AWS IoT itself caps MQTT messages at 128 KiB.
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// Initial buffer size for [`encode`]: large enough for a CSR request or an error payload in one
/// allocation; certificate responses grow it once or twice.
const ENCODE_INITIAL_CAPACITY: usize = 1024;

/// Wire format of a provisioning payload, the last level of the request topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// JavaScript Object Notation (`.../json`).
    #[default]
    Json,
    /// Concise Binary Object Representation (`.../cbor`).
    Cbor,
}

impl PayloadFormat {
    /// The topic suffix / config spelling: `"json"` or `"cbor"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            PayloadFormat::Json => "json",
            PayloadFormat::Cbor => "cbor",
        }
    }
}

impl fmt::Display for PayloadFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PayloadFormat {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(PayloadFormat::Json),
            "cbor" => Ok(PayloadFormat::Cbor),
            other => Err(CodecError::UnknownFormat(other.to_owned())),
        }
    }
}

/// What went wrong while encoding or decoding a provisioning payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The payload is larger than [`MAX_PAYLOAD_BYTES`]; it was not parsed.
    #[error("{format} payload is {len} bytes; at most {limit} bytes are accepted")]
    TooLarge {
        format: PayloadFormat,
        len: usize,
        limit: usize,
    },
    /// The payload is not well-formed, or a field has the wrong type or is missing.
    /// `path` is the field path (`certificateSigningRequest`, `parameters.SerialNumber`), `.`
    /// for the payload as a whole.
    #[error("invalid {format} payload: {path}: {message}")]
    Invalid {
        format: PayloadFormat,
        path: String,
        message: String,
    },
    /// A complete value was decoded but more bytes follow it.
    #[error("invalid {format} payload: {trailing} unexpected bytes after the value")]
    TrailingBytes {
        format: PayloadFormat,
        trailing: usize,
    },
    /// The value could not be represented in the format (a programming error, e.g. a map with
    /// non-string keys in JSON).
    #[error("cannot encode {format} payload: {message}")]
    Encode {
        format: PayloadFormat,
        message: String,
    },
    /// A payload format name other than `json` or `cbor`.
    #[error("unknown payload format {0:?}; expected \"json\" or \"cbor\"")]
    UnknownFormat(String),
}

impl CodecError {
    fn invalid(format: PayloadFormat, path: impl ToString, message: impl ToString) -> Self {
        CodecError::Invalid {
            format,
            path: path.to_string(),
            message: message.to_string(),
        }
    }
}

/// Encodes `value` in `fmt`.
///
/// # Panics
/// Only if `T`'s `Serialize` implementation itself fails (e.g. a map with non-string keys in
/// JSON); the payload types of this module cannot fail. Use [`try_encode_into`] for foreign
/// types.
pub fn encode<T: Serialize>(fmt: PayloadFormat, value: &T) -> Vec<u8> {
    let mut buf = Vec::with_capacity(ENCODE_INITIAL_CAPACITY);
    if let Err(e) = try_encode_into(fmt, value, &mut buf) {
        panic!("{e}");
    }
    buf
}

/// Appends the encoding of `value` to `buf`; lets a hot loop reuse one buffer.
pub fn try_encode_into<T: Serialize>(
    fmt: PayloadFormat,
    value: &T,
    buf: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let encode_error = |message: String| CodecError::Encode {
        format: fmt,
        message,
    };
    match fmt {
        PayloadFormat::Json => {
            serde_json::to_writer(&mut *buf, value).map_err(|e| encode_error(e.to_string()))
        }
        PayloadFormat::Cbor => ciborium::ser::into_writer(value, &mut *buf).map_err(|e| match e {
            ciborium::ser::Error::Io(io) => encode_error(io.to_string()),
            ciborium::ser::Error::Value(msg) => encode_error(msg),
        }),
    }
}

/// Decodes a `fmt` payload into `T`. Unknown fields are ignored; errors name the field path.
pub fn decode<T: DeserializeOwned>(fmt: PayloadFormat, bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(CodecError::TooLarge {
            format: fmt,
            len: bytes.len(),
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    refuse_sequences(fmt, bytes)?;
    match fmt {
        PayloadFormat::Json => decode_json(bytes),
        PayloadFormat::Cbor => decode_cbor(bytes),
    }
}

/// Every payload of the API is a map. serde's derived structs also accept a sequence of the
/// fields in order, which would let `["..."]` through as a request; refuse it up front.
fn refuse_sequences(fmt: PayloadFormat, bytes: &[u8]) -> Result<(), CodecError> {
    // Anything else that is not a map fails in serde with a type error of its own.
    let is_sequence = match fmt {
        PayloadFormat::Json => bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'['),
        // Major type 4 (array), definite or indefinite length.
        PayloadFormat::Cbor => bytes.first().is_some_and(|b| b >> 5 == 4),
    };
    if is_sequence {
        Err(CodecError::invalid(
            fmt,
            ".",
            "expected a map (object) payload, found an array",
        ))
    } else {
        Ok(())
    }
}

fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let fmt = PayloadFormat::Json;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| CodecError::invalid(fmt, e.path(), e.inner()))?;
    // `end` only fails on non-whitespace after the value.
    de.end().map_err(|e| CodecError::invalid(fmt, ".", e))?;
    Ok(value)
}

thread_local! {
    /// Field path of the last failed CBOR decode on this thread; see [`Tracked`].
    static CBOR_ERROR_PATH: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records the field path of a decode failure. ciborium does not expose its deserializer type,
/// so serde_path_to_error cannot wrap it from the outside; this wrapper does it from the
/// inside and hands the path out through a thread-local (decoding is synchronous, so the
/// value is read back on the same thread right after the failure).
struct Tracked<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Tracked<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut track = serde_path_to_error::Track::new();
        let result = T::deserialize(serde_path_to_error::Deserializer::new(
            deserializer,
            &mut track,
        ));
        match result {
            Ok(value) => Ok(Tracked(value)),
            Err(e) => {
                let path = track.path().to_string();
                CBOR_ERROR_PATH.with(|cell| *cell.borrow_mut() = Some(path));
                Err(e)
            }
        }
    }
}

fn take_cbor_error_path() -> String {
    CBOR_ERROR_PATH
        .with(|cell| cell.borrow_mut().take())
        .unwrap_or_else(|| ".".to_owned())
}

fn decode_cbor<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    // Fast path: ciborium's streaming deserializer decodes straight into `T`, which covers what
    // ciborium, cbor2 and the AWS SDKs write by default.
    let mut rest = bytes;
    if let Ok(value) = ciborium::de::from_reader::<T, _>(&mut rest) {
        if rest.is_empty() {
            return Ok(value);
        }
    }
    decode_cbor_via_value(bytes)
}

/// Slow path, taken for indefinite-length map keys (which ciborium's streaming deserializer
/// refuses) and for every error, whose field path and message it works out.
fn decode_cbor_via_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let fmt = PayloadFormat::Cbor;
    // ciborium's `Value` decoder accepts every indefinite-length form (maps, arrays, chunked
    // strings, as keys too); the typed value is then read from the tree.
    let mut rest = bytes;
    let value: ciborium::Value = ciborium::de::from_reader(&mut rest).map_err(|e| match e {
        ciborium::de::Error::Io(_) => CodecError::invalid(
            fmt,
            ".",
            format!(
                "truncated: the payload ends inside a value ({} bytes)",
                bytes.len()
            ),
        ),
        ciborium::de::Error::Syntax(offset) => {
            CodecError::invalid(fmt, ".", format!("malformed CBOR at byte {offset}"))
        }
        ciborium::de::Error::Semantic(offset, msg) => match offset {
            Some(offset) => CodecError::invalid(fmt, ".", format!("{msg} (at byte {offset})")),
            None => CodecError::invalid(fmt, ".", msg),
        },
        ciborium::de::Error::RecursionLimitExceeded => {
            CodecError::invalid(fmt, ".", "values nested too deeply")
        }
    })?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes {
            format: fmt,
            trailing: rest.len(),
        });
    }
    CBOR_ERROR_PATH.with(|cell| *cell.borrow_mut() = None);
    match value.deserialized::<Tracked<T>>() {
        Ok(Tracked(v)) => Ok(v),
        Err(ciborium::value::Error::Custom(msg)) => {
            Err(CodecError::invalid(fmt, take_cbor_error_path(), msg))
        }
    }
}

/// Decodes a CreateKeysAndCertificate request: AWS documents an empty payload, SDKs send an
/// empty map; both are accepted, as is a map with (ignored) fields.
pub fn decode_create_keys_request(fmt: PayloadFormat, bytes: &[u8]) -> Result<(), CodecError> {
    let blank = match fmt {
        PayloadFormat::Json => bytes.iter().all(u8::is_ascii_whitespace),
        PayloadFormat::Cbor => bytes.is_empty(),
    };
    if blank {
        return Ok(());
    }
    decode::<CreateKeysAndCertificateRequest>(fmt, bytes).map(|_| ())
}

/// `$aws/certificates/create-from-csr/{fmt}` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateCertificateFromCsrRequest {
    /// The device's CSR, PEM.
    pub certificate_signing_request: String,
}

/// `$aws/certificates/create-from-csr/{fmt}/accepted` response.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateCertificateFromCsrResponse {
    /// Proves ownership of the new certificate to RegisterThing; valid for one hour.
    pub certificate_ownership_token: String,
    /// Certificate id used by certificate management operations.
    pub certificate_id: String,
    /// The issued certificate, PEM.
    pub certificate_pem: String,
}

/// `$aws/certificates/create/{fmt}` request: carries no fields; encodes as an empty map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreateKeysAndCertificateRequest;

impl Serialize for CreateKeysAndCertificateRequest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        serializer.serialize_map(Some(0))?.end()
    }
}

impl<'de> Deserialize<'de> for CreateKeysAndCertificateRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AnyMap;
        impl<'de> Visitor<'de> for AnyMap {
            type Value = CreateKeysAndCertificateRequest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an empty payload or a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(CreateKeysAndCertificateRequest)
            }
        }
        deserializer.deserialize_map(AnyMap)
    }
}

/// `$aws/certificates/create/{fmt}/accepted` response.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateKeysAndCertificateResponse {
    /// Certificate id used by certificate management operations.
    pub certificate_id: String,
    /// The issued certificate, PEM.
    pub certificate_pem: String,
    /// The private key AWS generated for the certificate, PEM.
    pub private_key: String,
    /// Proves ownership of the new certificate to RegisterThing; valid for one hour.
    pub certificate_ownership_token: String,
}

/// `$aws/provisioning-templates/{template}/provision/{fmt}` request.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterThingRequest {
    /// Token from CreateCertificateFromCsr / CreateKeysAndCertificate.
    pub certificate_ownership_token: String,
    /// Template parameters (and input of a pre-provisioning hook); optional on the wire.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub parameters: BTreeMap<String, String>,
}

/// `$aws/provisioning-templates/{template}/provision/{fmt}/accepted` response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterThingResponse {
    /// Device configuration defined in the template.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub device_configuration: BTreeMap<String, String>,
    /// Name of the IoT thing created or updated by the template.
    pub thing_name: String,
}

/// Payload of every `.../rejected` topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResponse {
    /// HTTP-like status code (400, 403, 429, 500, ...).
    pub status_code: u16,
    /// Machine-readable error code (`InvalidPayload`, `Throttling`, ...).
    pub error_code: String,
    /// Human-readable explanation.
    pub error_message: String,
}

/// Some encoders write `null` for an absent optional map; treat it as empty.
fn null_as_empty<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::<BTreeMap<String, String>>::deserialize(deserializer)?.unwrap_or_default())
}

/// Prints a secret field as its length only: ownership tokens and private keys must not reach
/// logs through `{:?}`.
struct Redacted<'a>(&'a str);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[redacted; {} bytes]", self.0.len())
    }
}

impl fmt::Debug for CreateCertificateFromCsrResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateCertificateFromCsrResponse")
            .field(
                "certificate_ownership_token",
                &Redacted(&self.certificate_ownership_token),
            )
            .field("certificate_id", &self.certificate_id)
            .field("certificate_pem", &self.certificate_pem)
            .finish()
    }
}

impl fmt::Debug for CreateKeysAndCertificateResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateKeysAndCertificateResponse")
            .field("certificate_id", &self.certificate_id)
            .field("certificate_pem", &self.certificate_pem)
            .field("private_key", &Redacted(&self.private_key))
            .field(
                "certificate_ownership_token",
                &Redacted(&self.certificate_ownership_token),
            )
            .finish()
    }
}

impl fmt::Debug for RegisterThingRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterThingRequest")
            .field(
                "certificate_ownership_token",
                &Redacted(&self.certificate_ownership_token),
            )
            .field("parameters", &self.parameters)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMATS: [PayloadFormat; 2] = [PayloadFormat::Json, PayloadFormat::Cbor];
    const PEM: &str = "-----BEGIN CERTIFICATE REQUEST-----\nMIIBszCCAVkCAQAw\n-----END CERTIFICATE REQUEST-----\n";

    fn round_trip<T>(value: &T)
    where
        T: Serialize + DeserializeOwned + PartialEq + fmt::Debug,
    {
        for fmt in FORMATS {
            let bytes = encode(fmt, value);
            let back: T = decode(fmt, &bytes).unwrap_or_else(|e| panic!("{fmt}: {e}"));
            assert_eq!(&back, value, "{fmt}");
        }
        // The CBOR slow path (taken for indefinite-length keys and errors) agrees with the fast one.
        let cbor = encode(PayloadFormat::Cbor, value);
        assert_eq!(&decode_cbor_via_value::<T>(&cbor).unwrap(), value);
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_payload_type_round_trips_in_both_formats() {
        round_trip(&CreateCertificateFromCsrRequest {
            certificate_signing_request: PEM.into(),
        });
        round_trip(&CreateCertificateFromCsrResponse {
            certificate_ownership_token: "tok-ü".into(),
            certificate_id: "c0ffee".into(),
            certificate_pem: PEM.into(),
        });
        round_trip(&CreateKeysAndCertificateRequest);
        round_trip(&CreateKeysAndCertificateResponse {
            certificate_id: "id".into(),
            certificate_pem: PEM.into(),
            private_key: "-----BEGIN PRIVATE KEY-----\n...".into(),
            certificate_ownership_token: "tok".into(),
        });
        round_trip(&RegisterThingRequest {
            certificate_ownership_token: "tok".into(),
            parameters: params(&[("SerialNumber", "sensor-1"), ("Model", "x")]),
        });
        round_trip(&RegisterThingRequest {
            certificate_ownership_token: "tok".into(),
            parameters: BTreeMap::new(),
        });
        round_trip(&RegisterThingResponse {
            device_configuration: params(&[("Fallback", "true")]),
            thing_name: "sensor-1".into(),
        });
        round_trip(&ErrorResponse {
            status_code: 400,
            error_code: "InvalidPayload".into(),
            error_message: "bad CSR".into(),
        });
    }

    #[test]
    fn json_wire_form_is_camel_case() {
        let bytes = encode(
            PayloadFormat::Json,
            &RegisterThingRequest {
                certificate_ownership_token: "t".into(),
                parameters: params(&[("SerialNumber", "s")]),
            },
        );
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"certificateOwnershipToken":"t","parameters":{"SerialNumber":"s"}}"#
        );
        let bytes = encode(
            PayloadFormat::Json,
            &ErrorResponse {
                status_code: 429,
                error_code: "Throttling".into(),
                error_message: "slow down".into(),
            },
        );
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"statusCode":429,"errorCode":"Throttling","errorMessage":"slow down"}"#
        );
        assert_eq!(
            encode(PayloadFormat::Json, &CreateKeysAndCertificateRequest),
            b"{}"
        );
        assert_eq!(
            encode(PayloadFormat::Cbor, &CreateKeysAndCertificateRequest),
            [0xa0]
        );
    }

    #[test]
    fn unknown_fields_and_missing_optional_maps_are_accepted() {
        let json = br#"{"thingName":"t1","extra":{"nested":[1,2,{"x":null}]},"n":5}"#;
        let resp: RegisterThingResponse = decode(PayloadFormat::Json, json).unwrap();
        assert_eq!(resp.thing_name, "t1");
        assert!(resp.device_configuration.is_empty());

        let json = br#"{"certificateOwnershipToken":"tok","parameters":null}"#;
        let req: RegisterThingRequest = decode(PayloadFormat::Json, json).unwrap();
        assert_eq!(req.certificate_ownership_token, "tok");
        assert!(req.parameters.is_empty());
    }

    #[test]
    fn wrong_field_type_names_the_field_and_format() {
        let err = decode::<CreateCertificateFromCsrRequest>(
            PayloadFormat::Json,
            br#"{"certificateSigningRequest":5}"#,
        )
        .unwrap_err();
        let CodecError::Invalid {
            format,
            path,
            message,
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(*format, PayloadFormat::Json);
        assert_eq!(path, "certificateSigningRequest");
        assert!(message.contains("invalid type: integer"), "{message}");
        assert!(
            err.to_string()
                .starts_with("invalid json payload: certificateSigningRequest: invalid type"),
            "{err}"
        );

        // Same in CBOR: {"certificateSigningRequest": 5}
        let mut cbor = vec![0xa1, 0x78, 25];
        cbor.extend_from_slice(b"certificateSigningRequest");
        cbor.push(0x05);
        let err =
            decode::<CreateCertificateFromCsrRequest>(PayloadFormat::Cbor, &cbor).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid cbor payload: certificateSigningRequest: invalid type: integer `5`, expected str"
        );
    }

    #[test]
    fn nested_field_errors_carry_the_full_path() {
        let json = br#"{"certificateOwnershipToken":"t","parameters":{"SerialNumber":7}}"#;
        let err = decode::<RegisterThingRequest>(PayloadFormat::Json, json).unwrap_err();
        assert!(
            matches!(&err, CodecError::Invalid { path, .. } if path == "parameters.SerialNumber"),
            "{err}"
        );
        let value = serde_json::from_slice::<serde_json::Value>(json).unwrap();
        let cbor = encode(PayloadFormat::Cbor, &value);
        let err = decode::<RegisterThingRequest>(PayloadFormat::Cbor, &cbor).unwrap_err();
        assert!(
            matches!(&err, CodecError::Invalid { path, .. } if path == "parameters.SerialNumber"),
            "{err}"
        );
    }

    #[test]
    fn missing_required_field_is_named() {
        for fmt in FORMATS {
            let bytes = encode(fmt, &params(&[("thingName", "t")]));
            let err = decode::<ErrorResponse>(fmt, &bytes).unwrap_err();
            assert!(
                err.to_string().contains("missing field `statusCode`"),
                "{err}"
            );
        }
    }

    #[test]
    fn malformed_and_truncated_input_is_an_error_not_a_panic() {
        let json_cases: [&[u8]; 5] = [b"", b"{", b"[]", b"{\"thingName\":", b"{} x"];
        for bytes in json_cases {
            let err = decode::<RegisterThingResponse>(PayloadFormat::Json, bytes).unwrap_err();
            assert!(err.to_string().starts_with("invalid json payload"), "{err}");
        }
        let good = encode(
            PayloadFormat::Cbor,
            &RegisterThingResponse {
                device_configuration: BTreeMap::new(),
                thing_name: "thing".into(),
            },
        );
        for cut in 0..good.len() {
            let err =
                decode::<RegisterThingResponse>(PayloadFormat::Cbor, &good[..cut]).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid cbor payload"),
                "{cut}: {err}"
            );
        }
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0xa0, 0xa0]);
        assert_eq!(
            decode::<RegisterThingResponse>(PayloadFormat::Cbor, &trailing).unwrap_err(),
            CodecError::TrailingBytes {
                format: PayloadFormat::Cbor,
                trailing: 2
            }
        );
        // 0x1c is a reserved additional-info value: not well-formed CBOR.
        let err = decode::<RegisterThingResponse>(PayloadFormat::Cbor, &[0x1c]).unwrap_err();
        assert!(
            err.to_string().contains("malformed CBOR at byte 0"),
            "{err}"
        );
    }

    #[test]
    fn cbor_indefinite_length_maps_and_strings_decode() {
        // {_ "certificateSigningRequest": (_ "-----BEGIN", " CSR-----"), "extra": [_ 1] }
        // with the key itself chunked as well.
        let mut b = vec![0xbf, 0x7f];
        b.push(0x60 + 11);
        b.extend_from_slice(b"certificate");
        b.push(0x60 + 14);
        b.extend_from_slice(b"SigningRequest");
        b.push(0xff);
        b.push(0x7f);
        b.push(0x60 + 10);
        b.extend_from_slice(b"-----BEGIN");
        b.push(0x60 + 9);
        b.extend_from_slice(b" CSR-----");
        b.push(0xff);
        b.push(0x65);
        b.extend_from_slice(b"extra");
        b.extend_from_slice(&[0x9f, 0x01, 0xff]);
        b.push(0xff);
        let req: CreateCertificateFromCsrRequest = decode(PayloadFormat::Cbor, &b).unwrap();
        assert_eq!(req.certificate_signing_request, "-----BEGIN CSR-----");
    }

    #[test]
    fn create_keys_request_accepts_empty_and_maps_only() {
        for fmt in FORMATS {
            assert_eq!(decode_create_keys_request(fmt, b""), Ok(()));
            let empty_map = encode(fmt, &CreateKeysAndCertificateRequest);
            assert_eq!(decode_create_keys_request(fmt, &empty_map), Ok(()));
            let map = encode(fmt, &params(&[("foo", "bar")]));
            assert_eq!(decode_create_keys_request(fmt, &map), Ok(()));
            let not_a_map = encode(fmt, &vec![1u8, 2]);
            let err = decode_create_keys_request(fmt, &not_a_map).unwrap_err();
            // serde_json uses our `expecting` text, ciborium's value decoder its own.
            assert!(
                matches!(&err, CodecError::Invalid { path, message, .. }
                    if path == "." && message.contains("expected") && message.contains("map")),
                "{err}"
            );
        }
        assert_eq!(
            decode_create_keys_request(PayloadFormat::Json, b" \n"),
            Ok(())
        );
        assert_eq!(
            decode_create_keys_request(PayloadFormat::Cbor, &[0xbf, 0xff]),
            Ok(())
        );
    }

    #[test]
    fn oversized_payloads_are_refused_before_parsing() {
        let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        for fmt in FORMATS {
            let err = decode::<ErrorResponse>(fmt, &big).unwrap_err();
            assert_eq!(
                err,
                CodecError::TooLarge {
                    format: fmt,
                    len: MAX_PAYLOAD_BYTES + 1,
                    limit: MAX_PAYLOAD_BYTES
                }
            );
            assert_eq!(
                err.to_string(),
                format!("{fmt} payload is 131073 bytes; at most 131072 bytes are accepted")
            );
        }
        // Exactly at the limit is parsed (and here fails only for content).
        let mut at_limit = br#"{"certificateSigningRequest":""#.to_vec();
        at_limit.resize(MAX_PAYLOAD_BYTES - 2, b'A');
        at_limit.extend_from_slice(b"\"}");
        let req: CreateCertificateFromCsrRequest = decode(PayloadFormat::Json, &at_limit).unwrap();
        assert_eq!(
            req.certificate_signing_request.len(),
            MAX_PAYLOAD_BYTES - 32
        );
    }

    #[test]
    fn payload_format_parses_and_prints() {
        for fmt in FORMATS {
            assert_eq!(fmt.as_str().parse::<PayloadFormat>(), Ok(fmt));
            assert_eq!(fmt.to_string(), fmt.as_str());
        }
        assert_eq!(
            "xml".parse::<PayloadFormat>().unwrap_err().to_string(),
            "unknown payload format \"xml\"; expected \"json\" or \"cbor\""
        );
        assert_eq!(PayloadFormat::default(), PayloadFormat::Json);
    }

    #[test]
    fn debug_output_redacts_keys_and_tokens() {
        let resp = CreateKeysAndCertificateResponse {
            certificate_id: "cid".into(),
            certificate_pem: "pem".into(),
            private_key: "SECRET-KEY".into(),
            certificate_ownership_token: "SECRET-TOKEN".into(),
        };
        let req = RegisterThingRequest {
            certificate_ownership_token: "SECRET-TOKEN".into(),
            parameters: BTreeMap::new(),
        };
        let csr = CreateCertificateFromCsrResponse {
            certificate_ownership_token: "SECRET-TOKEN".into(),
            certificate_id: "cid".into(),
            certificate_pem: "pem".into(),
        };
        for printed in [format!("{resp:?}"), format!("{req:?}"), format!("{csr:?}")] {
            assert!(!printed.contains("SECRET"), "{printed}");
            assert!(printed.contains("[redacted; "), "{printed}");
        }
        assert!(format!("{resp:?}").contains("cid"));
    }

    #[test]
    fn try_encode_into_appends_and_reports_unencodable_values() {
        let mut buf = b"x".to_vec();
        try_encode_into(
            PayloadFormat::Json,
            &CreateKeysAndCertificateRequest,
            &mut buf,
        )
        .unwrap();
        assert_eq!(buf, b"x{}");
        let mut bad = BTreeMap::new();
        bad.insert(vec![1u8], 1u8);
        let err = try_encode_into(PayloadFormat::Json, &bad, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::Encode {
                    format: PayloadFormat::Json,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_sequence_is_not_a_request() {
        let json = decode::<CreateCertificateFromCsrRequest>(
            PayloadFormat::Json,
            br#"["-----BEGIN CERTIFICATE REQUEST-----"]"#,
        )
        .unwrap_err();
        assert_eq!(
            json.to_string(),
            "invalid json payload: .: expected a map (object) payload, found an array"
        );
        let cbor_array = encode(PayloadFormat::Cbor, &vec!["csr"]);
        let cbor = decode::<CreateCertificateFromCsrRequest>(PayloadFormat::Cbor, &cbor_array)
            .unwrap_err();
        assert!(
            matches!(cbor, CodecError::Invalid { ref path, .. } if path == "."),
            "{cbor}"
        );
        assert!(decode::<RegisterThingRequest>(PayloadFormat::Json, b"").is_err());
    }
}
