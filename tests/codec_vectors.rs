//! CBOR test vectors written by another implementation (Python cbor2, see
//! `tests/data/cbor2/generate.py`) must decode with `fleetgw::cloud::codec` to the values the
//! generator put in: definite and indefinite-length items, unknown fields of every major type.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fleetgw::cloud::codec::{
    decode, decode_create_keys_request, encode, CreateCertificateFromCsrRequest,
    CreateCertificateFromCsrResponse, CreateKeysAndCertificateResponse, ErrorResponse,
    PayloadFormat, RegisterThingRequest, RegisterThingResponse,
};

const CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----\n\
MIHnMIGOAgEAMBMxETAPBgNVBAMMCHNlbnNvci0xMFkwEwYHKoZIzj0CAQYIKoZI\n\
-----END CERTIFICATE REQUEST-----\n";
const CERT: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBeTCCAR+gAwIBAgIUc2Vuc29yLTEgY2VydGlmaWNhdGUwCgYIKoZIzj0EAwIw\n\
-----END CERTIFICATE-----\n";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n\
-----END PRIVATE KEY-----\n";
const TOKEN: &str = "eyJ2ZXJzaW9uIjoiMjAxOS0xMS0yMCJ9.ownership-token";
const CERT_ID: &str = "8f3b2a7c0d1e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c";

fn vector(name: &str) -> Vec<u8> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/data/cbor2", name]
        .iter()
        .collect();
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn cbor<T: serde::de::DeserializeOwned>(name: &str) -> T {
    decode(PayloadFormat::Cbor, &vector(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn create_from_csr_request() {
    let req: CreateCertificateFromCsrRequest = cbor("create_from_csr_request.cbor");
    assert_eq!(req.certificate_signing_request, CSR);
}

#[test]
fn create_from_csr_request_with_indefinite_map_and_chunked_strings() {
    let bytes = vector("create_from_csr_request_indefinite.cbor");
    // Make sure the vector really is indefinite-length: map header 0xbf, break 0xff at the end.
    assert_eq!((bytes[0], bytes[bytes.len() - 1]), (0xbf, 0xff));
    let req: CreateCertificateFromCsrRequest = cbor("create_from_csr_request_indefinite.cbor");
    assert_eq!(req.certificate_signing_request, CSR);
}

#[test]
fn create_from_csr_response() {
    let resp: CreateCertificateFromCsrResponse = cbor("create_from_csr_response.cbor");
    assert_eq!(resp.certificate_ownership_token, TOKEN);
    assert_eq!(resp.certificate_id, CERT_ID);
    assert_eq!(resp.certificate_pem, CERT);
}

#[test]
fn create_keys_request_is_an_empty_map() {
    let bytes = vector("create_keys_request.cbor");
    assert_eq!(bytes, [0xa0]);
    assert_eq!(
        decode_create_keys_request(PayloadFormat::Cbor, &bytes),
        Ok(())
    );
}

#[test]
fn create_keys_response() {
    let resp: CreateKeysAndCertificateResponse = cbor("create_keys_response.cbor");
    assert_eq!(resp.certificate_id, CERT_ID);
    assert_eq!(resp.certificate_pem, CERT);
    assert_eq!(resp.private_key, KEY);
    assert_eq!(resp.certificate_ownership_token, TOKEN);
}

#[test]
fn register_thing_request() {
    let req: RegisterThingRequest = cbor("register_thing_request.cbor");
    assert_eq!(req.certificate_ownership_token, TOKEN);
    assert_eq!(
        req.parameters,
        map(&[("SerialNumber", "sensor-1"), ("DeviceLocation", "Kyōto")])
    );
}

#[test]
fn register_thing_request_with_nested_indefinite_maps() {
    let req: RegisterThingRequest = cbor("register_thing_request_indefinite.cbor");
    assert_eq!(req.certificate_ownership_token, TOKEN);
    assert_eq!(req.parameters, map(&[("SerialNumber", "sensor-1")]));
}

#[test]
fn register_thing_response() {
    let resp: RegisterThingResponse = cbor("register_thing_response.cbor");
    assert_eq!(resp.thing_name, "sensor-1");
    assert_eq!(
        resp.device_configuration,
        map(&[("Fallback", "true"), ("Region", "eu")])
    );
}

#[test]
fn register_thing_response_ignores_unknown_fields_of_every_type() {
    let resp: RegisterThingResponse = cbor("register_thing_response_unknown_fields.cbor");
    assert_eq!(resp.thing_name, "sensor-1");
    assert_eq!(resp.device_configuration, map(&[("Fallback", "true")]));
}

#[test]
fn error_response() {
    let err: ErrorResponse = cbor("error_response.cbor");
    assert_eq!(err.status_code, 400);
    assert_eq!(err.error_code, "InvalidPayload");
    assert_eq!(err.error_message, "bad CSR");
}

#[test]
fn our_encoding_of_a_vector_decodes_to_the_same_value() {
    // cbor2 and ciborium may order or size headers differently; equality is on values.
    let original: RegisterThingRequest = cbor("register_thing_request.cbor");
    let ours = encode(PayloadFormat::Cbor, &original);
    let again: RegisterThingRequest = decode(PayloadFormat::Cbor, &ours).unwrap();
    assert_eq!(again, original);
}
