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
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        tree,
        key: key.to_owned(),
        source,
    })
}

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

/// The etag of a stored device record, decoding only the record's head (version and etag).
pub(super) fn stored_etag(key: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    #[derive(serde::Deserialize)]
    struct Head {
        v: u32,
        etag: u64,
    }
    let head: Head = decode(DEVICES, key, bytes)?;
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

pub(super) fn decode_token(key: &str, bytes: &[u8]) -> Result<OwnershipTokenRecord, StoreError> {
    decode_versioned(TOKENS, key, bytes, TOKEN_RECORD_VERSION, |r| r.v)
}
