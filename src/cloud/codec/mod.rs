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
//!
//! This file holds the format, the error and the entry points ([`encode`], [`decode`], JSON
//! decoding); `cbor` decodes CBOR with field paths, `payloads` defines the typed requests and
//! responses of the API.

mod cbor;
mod payloads;

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use payloads::{
    decode_create_keys_request, CreateCertificateFromCsrRequest, CreateCertificateFromCsrResponse,
    CreateKeysAndCertificateRequest, CreateKeysAndCertificateResponse, ErrorResponse,
    RegisterThingRequest, RegisterThingResponse,
};

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
        PayloadFormat::Cbor => cbor::decode_cbor(bytes),
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

#[cfg(test)]
pub(crate) mod test_util {
    //! Helpers for tests of the payloads and of their users (the emulator's templates).

    use std::collections::BTreeMap;

    use super::PayloadFormat;

    /// Both wire formats, for tests that run once per format.
    pub(crate) const FORMATS: [PayloadFormat; 2] = [PayloadFormat::Json, PayloadFormat::Cbor];

    /// A parameter map (RegisterThing `parameters`, template parameters) from `(name, value)`
    /// pairs.
    pub(crate) fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::test_util::{params, FORMATS};
    use super::*;

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
