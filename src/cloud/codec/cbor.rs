//! CBOR decoding with ciborium that names the field path of a failure, as serde_path_to_error
//! does for JSON, and accepts the indefinite-length forms other encoders write.

use std::cell::RefCell;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::{CodecError, PayloadFormat};

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

pub(super) fn decode_cbor<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
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
pub(super) fn decode_cbor_via_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::codec::{decode, CreateCertificateFromCsrRequest};

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
}
