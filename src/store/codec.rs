//! Low-level helpers of the store: sled reads and writes with the tree named in errors, and
//! the JSON encoding of records with their version check (a record written by a newer fleetgw
//! is refused, never misread).

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    DeviceRecord, OwnershipTokenRecord, StoreError, DEVICES, DEVICE_RECORD_VERSION, TOKENS,
    TOKEN_RECORD_VERSION,
};

pub(super) fn get(
    tree: &sled::Tree,
    name: &'static str,
    key: &str,
) -> Result<Option<sled::IVec>, StoreError> {
    tree.get(key).map_err(|source| StoreError::Sled {
        tree: name,
        op: "get",
        source,
    })
}

pub(super) fn insert(
    tree: &sled::Tree,
    name: &'static str,
    key: &str,
    value: Vec<u8>,
) -> Result<(), StoreError> {
    tree.insert(key, value).map_err(|source| StoreError::Sled {
        tree: name,
        op: "insert",
        source,
    })?;
    Ok(())
}

pub(super) fn remove(tree: &sled::Tree, name: &'static str, key: &str) -> Result<bool, StoreError> {
    tree.remove(key)
        .map(|old| old.is_some())
        .map_err(|source| StoreError::Sled {
            tree: name,
            op: "remove",
            source,
        })
}

pub(super) fn encode<T: Serialize>(
    tree: &'static str,
    key: &str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    // A device record with its PEM texts is a few KiB: sized once instead of growing from
    // serde_json's 128 bytes by doubling (five reallocations and copies per record). Other
    // records are small; the buffer only lives until sled copies it.
    let capacity = if tree == DEVICES {
        DEVICE_ENCODE_CAPACITY
    } else {
        256
    };
    let mut out = Vec::with_capacity(capacity);
    serde_json::to_writer(&mut out, value).map_err(|source| StoreError::Encode {
        tree,
        key: key.to_owned(),
        source,
    })?;
    Ok(out)
}

/// What [`encode`] reserves for a device record.
const DEVICE_ENCODE_CAPACITY: usize = 4096;

pub(super) fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        tree,
        key: key.to_owned(),
        source,
    })
}

/// Decodes a record whose version (`version_of`) must not exceed what this build writes. The
/// version is only probed separately when decoding fails, so the common path decodes once.
pub(super) fn decode_versioned<T: DeserializeOwned>(
    tree: &'static str,
    key: &str,
    bytes: &[u8],
    supported: u32,
    version_of: fn(&T) -> u32,
) -> Result<T, StoreError> {
    #[derive(serde::Deserialize)]
    struct Version {
        #[serde(default)]
        v: u32,
    }
    let newer = |found: u32| StoreError::NewerRecord {
        tree,
        key: key.to_owned(),
        found,
        supported,
    };
    match decode::<T>(tree, key, bytes) {
        Ok(rec) if version_of(&rec) > supported => Err(newer(version_of(&rec))),
        Ok(rec) => Ok(rec),
        Err(e) => match serde_json::from_slice::<Version>(bytes) {
            Ok(probe) if probe.v > supported => Err(newer(probe.v)),
            _ => Err(e),
        },
    }
}

pub(super) fn decode_device(key: &str, bytes: &[u8]) -> Result<DeviceRecord, StoreError> {
    decode_versioned(DEVICES, key, bytes, DEVICE_RECORD_VERSION, |r| r.v)
}

/// The etag of a stored device record: read from the record's first bytes where this build
/// wrote it (`{"v":1,"etag":7,...`), else by decoding only the record's version and etag (a
/// record written before the etag came second, or by another writer).
pub(super) fn stored_etag(key: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    #[derive(serde::Deserialize)]
    struct Head {
        v: u32,
        etag: u64,
    }
    let head = match head_prefix(bytes) {
        Some((v, etag)) => Head { v, etag },
        None => decode(DEVICES, key, bytes)?,
    };
    if head.v > DEVICE_RECORD_VERSION {
        return Err(StoreError::NewerRecord {
            tree: DEVICES,
            key: key.to_owned(),
            found: head.v,
            supported: DEVICE_RECORD_VERSION,
        });
    }
    Ok(head.etag)
}

/// `rec` encoded as stored with `etag` as its etag: the record as the caller has it, encoded
/// once, with the etag's digits at the head replaced (no copy of the record made for the
/// one field the store sets).
pub(super) fn encode_device_with_etag(
    key: &str,
    rec: &DeviceRecord,
    etag: u64,
) -> Result<Vec<u8>, StoreError> {
    let mut bytes = encode(DEVICES, key, rec)?;
    let start = br#"{"v":"#.len() + decimal_len(u64::from(rec.v)) + br#","etag":"#.len();
    match head_prefix(&bytes) {
        Some((_, old)) if old == rec.etag => {
            let digits = etag.to_string();
            bytes.splice(start..start + decimal_len(old), digits.bytes());
            Ok(bytes)
        }
        _ => {
            let mut next = rec.clone();
            next.etag = etag;
            encode(DEVICES, key, &next)
        }
    }
}

fn decimal_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// `(v, etag)` from a record that starts `{"v":<u32>,"etag":<u64>` followed by `,` or `}`
/// (serde_json's compact output of [`DeviceRecord`]); `None` for anything else. The JSON is
/// still decoded whole wherever the record is read, so a record this accepts and serde would
/// refuse is refused there.
fn head_prefix(bytes: &[u8]) -> Option<(u32, u64)> {
    let rest = bytes.strip_prefix(br#"{"v":"#)?;
    let (v, rest) = leading_number(rest)?;
    let rest = rest.strip_prefix(br#","etag":"#)?;
    let (etag, rest) = leading_number(rest)?;
    match rest.first() {
        Some(b',' | b'}') => Some((u32::try_from(v).ok()?, etag)),
        _ => None,
    }
}

/// A JSON unsigned integer at the start of `bytes` (no leading zeros, fits a u64) and the rest.
fn leading_number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || (digits > 1 && bytes[0] == b'0') {
        return None;
    }
    let mut n: u64 = 0;
    for &b in &bytes[..digits] {
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some((n, &bytes[digits..]))
}

pub(super) fn decode_token(key: &str, bytes: &[u8]) -> Result<OwnershipTokenRecord, StoreError> {
    decode_versioned(TOKENS, key, bytes, TOKEN_RECORD_VERSION, |r| r.v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etag_is_read_from_the_head_this_build_writes_and_decoded_otherwise() {
        let written = br#"{"v":1,"etag":42,"id":"d","state":"requested"}"#;
        assert_eq!(head_prefix(written), Some((1, 42)));
        assert_eq!(stored_etag("d", written).unwrap(), 42);
        // Records from before the etag came second: the slow path, same answer.
        let older = br#"{"v":1,"id":"d","state":"requested","etag":42,"format":"json"}"#;
        assert_eq!(head_prefix(older), None);
        assert_eq!(stored_etag("d", older).unwrap(), 42);
        // Anything not exactly the compact head is decoded.
        for odd in [
            &br#"{"v":1,"etag":042,"id":"d"}"#[..],
            br#"{"v":1,"etag":4.5,"id":"d"}"#,
            br#"{"v":1,"etag":-4,"id":"d"}"#,
            br#"{"v":1,"etag":99999999999999999999,"id":"d"}"#,
            br#"{"v":4294967296,"etag":1}"#,
            br#"{"v":1,"etag":4"#,
        ] {
            assert_eq!(head_prefix(odd), None, "{}", String::from_utf8_lossy(odd));
            assert!(
                stored_etag("d", odd).is_err(),
                "{}",
                String::from_utf8_lossy(odd)
            );
        }
        let spaced = br#"{ "v":1,"etag":4,"id":"d"}"#;
        assert_eq!(head_prefix(spaced), None);
        assert_eq!(stored_etag("d", spaced).unwrap(), 4);
        // What the store writes always has the head.
        let mut rec = DeviceRecord::new("sensor-1".parse().unwrap(), "json", 1);
        rec.etag = 7;
        let bytes = encode(DEVICES, "sensor-1", &rec).unwrap();
        assert_eq!(head_prefix(&bytes), Some((DEVICE_RECORD_VERSION, 7)));
        // The etag the store sets is spliced into the encoded head, whatever its width.
        for (old, new) in [(7, 8), (9, 10), (0, 1), (99, 100), (12345, 7)] {
            rec.etag = old;
            let spliced = encode_device_with_etag("sensor-1", &rec, new).unwrap();
            let mut expected = rec.clone();
            expected.etag = new;
            assert_eq!(spliced, encode(DEVICES, "sensor-1", &expected).unwrap());
            assert_eq!(decode_device("sensor-1", &spliced).unwrap(), expected);
        }
        // A newer record is refused on either path.
        let newer = format!(r#"{{"v":{},"etag":1,"id":"d"}}"#, DEVICE_RECORD_VERSION + 1);
        assert!(matches!(
            stored_etag("d", newer.as_bytes()),
            Err(StoreError::NewerRecord { .. })
        ));
    }
}
