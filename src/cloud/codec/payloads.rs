//! The typed payloads of the fleet provisioning API (CreateCertificateFromCsr,
//! CreateKeysAndCertificate, RegisterThing and the `.../rejected` error), with their wire
//! names and a `Debug` that keeps ownership tokens and private keys out of logs.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{decode, CodecError, PayloadFormat};

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
    use serde::de::DeserializeOwned;

    use super::super::cbor::decode_cbor_via_value;
    use super::super::encode;
    use super::super::test_util::{params, FORMATS};
    use super::*;

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
}
