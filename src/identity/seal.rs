//! [`Sealer`]: optional encryption of secrets at rest (private keys in the store).
//!
//! AES-256-GCM via aws-lc-rs with a random 96-bit nonce per message. The sealed blob is
//! `version (1 byte) || nonce (12 bytes) || ciphertext || tag (16 bytes)`. Version 2 binds the
//! blob to what it is and whose it is: the associated data is the version byte, the record kind
//! ([`SealedRecord`]) and the device id, so a blob copied under another device's key or into
//! another kind of record fails to open instead of handing one device another's key. Version 1
//! (written before that, associated data = the version byte alone) is still opened, so stores
//! sealed by earlier releases keep working; it is rewritten as version 2 whenever the record is
//! sealed again. The key comes from a file or a systemd credential (`LoadCredentialEncrypted=`
//! keeps it off the disk in clear).

use std::fmt;
use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::Engine as _;
use rand::RngCore as _;
use zeroize::Zeroizing;

use super::key::credential_path;
use super::{read_secret_file, IdentityError, Secret};

/// Blob format version written by [`Sealer::seal`]: bound to record kind and device id.
const VERSION: u8 = 2;
/// The first format: associated data is the version byte only (read, never written).
const VERSION_UNBOUND: u8 = 1;

/// What a sealed blob holds; part of the associated data of every version 2 blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedRecord {
    /// A device's private key (store tree `secrets`).
    DeviceKey,
    /// A device's ownership token (store tree `tokens`).
    OwnershipToken,
}

impl SealedRecord {
    fn as_str(self) -> &'static str {
        match self {
            SealedRecord::DeviceKey => "device-key",
            SealedRecord::OwnershipToken => "ownership-token",
        }
    }
}

/// `version || len(kind) || kind || device id`: lengths are fixed or prefixed, so no two
/// (kind, id) pairs give the same bytes.
fn bound_aad(kind: SealedRecord, device_id: &str) -> Vec<u8> {
    let kind = kind.as_str();
    let mut aad = Vec::with_capacity(2 + kind.len() + device_id.len());
    aad.push(VERSION);
    aad.push(kind.len() as u8);
    aad.extend_from_slice(kind.as_bytes());
    aad.extend_from_slice(device_id.as_bytes());
    aad
}
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// Seals and opens secrets with one AES-256-GCM key.
pub struct Sealer {
    key: LessSafeKey,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer([redacted])")
    }
}

impl Sealer {
    /// Reads the key from `path`: 32 raw bytes, or 64 hex characters, or base64 of 32 bytes
    /// (a trailing newline is fine).
    pub fn from_key_file(path: &Path) -> Result<Self, IdentityError> {
        let bytes = read_secret_file(path)?;
        Self::from_encoded_key(&bytes, &path.display().to_string())
    }

    /// Reads the key from the systemd credential `name` (`$CREDENTIALS_DIRECTORY/name`).
    pub fn from_credential(name: &str) -> Result<Self, IdentityError> {
        let path = credential_path(name)?;
        let bytes = read_secret_file(&path).map_err(|e| IdentityError::Credential {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        Self::from_encoded_key(&bytes, &format!("credential {name:?}"))
    }

    /// A sealer for 32 key bytes.
    pub fn from_key_bytes(key: &[u8]) -> Result<Self, IdentityError> {
        let unbound =
            UnboundKey::new(&AES_256_GCM, key).map_err(|_| IdentityError::SealingKey {
                source_name: "key".into(),
                reason: format!("must be {KEY_LEN} bytes, got {}", key.len()),
            })?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
        })
    }

    fn from_encoded_key(bytes: &[u8], source_name: &str) -> Result<Self, IdentityError> {
        let key = decode_key(bytes).ok_or_else(|| IdentityError::SealingKey {
            source_name: source_name.to_string(),
            reason: format!(
                "must be {KEY_LEN} raw bytes, {} hex characters or base64 of {KEY_LEN} bytes ({} bytes found)",
                KEY_LEN * 2,
                bytes.len()
            ),
        })?;
        Self::from_key_bytes(&key)
    }

    /// Encrypts `plain`, the `kind` record of device `device_id`, into a version 2 blob with a
    /// fresh random nonce; only [`Sealer::open`] with the same kind and id opens it.
    pub fn seal(&self, kind: SealedRecord, device_id: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        // AES-GCM sealing fails only for messages beyond ~64 GiB; secrets are a few KiB.
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(bound_aad(kind, device_id)),
                &mut body,
            )
            .expect("AES-256-GCM seal of a secret-sized message");
        out.extend_from_slice(&body);
        out
    }

    /// Decrypts a blob made by [`Sealer::seal`] for the same `kind` and `device_id` (or an
    /// unbound version 1 blob); a wrong key, any altered byte, or a blob of another device or
    /// record kind is an error.
    pub fn open(
        &self,
        kind: SealedRecord,
        device_id: &str,
        sealed: &[u8],
    ) -> Result<Secret, IdentityError> {
        let Some((&version, rest)) = sealed.split_first() else {
            return Err(unseal_error("empty"));
        };
        let (aad, failure) = match version {
            VERSION => (
                bound_aad(kind, device_id),
                format!(
                    "authentication failed: wrong sealing key, tampered data, or a blob sealed \
                     for another device or record (expected the {} of {device_id:?})",
                    kind.as_str()
                ),
            ),
            VERSION_UNBOUND => (
                vec![VERSION_UNBOUND],
                "authentication failed: wrong sealing key or tampered data".to_string(),
            ),
            _ => {
                return Err(unseal_error(format!(
                    "unknown format version {version} (this build reads versions \
                     {VERSION_UNBOUND} and {VERSION})"
                )))
            }
        };
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(unseal_error(format!("truncated ({} bytes)", sealed.len())));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| unseal_error("bad nonce"))?;
        let mut body = Zeroizing::new(body.to_vec());
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut body)
            .map_err(|_| unseal_error(failure))?;
        Ok(Secret::new(plain.to_vec()))
    }
}

fn unseal_error(reason: impl Into<String>) -> IdentityError {
    IdentityError::Unseal {
        reason: reason.into(),
    }
}

/// Raw, hex or base64 key -> 32 bytes.
fn decode_key(bytes: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if bytes.len() == KEY_LEN {
        return Some(Zeroizing::new(bytes.to_vec()));
    }
    let text = std::str::from_utf8(bytes)
        .ok()?
        .trim_end_matches(['\n', '\r'])
        .trim();
    if text.len() == KEY_LEN * 2 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return hex::decode(text).ok().map(Zeroizing::new);
    }
    let decoded = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?,
    );
    (decoded.len() == KEY_LEN).then_some(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_private(path: &Path, content: impl AsRef<[u8]>) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(path, content).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    const K: SealedRecord = SealedRecord::DeviceKey;
    const ID: &str = "sensor-1";

    fn sealer(byte: u8) -> Sealer {
        Sealer::from_key_bytes(&[byte; KEY_LEN]).unwrap()
    }

    #[test]
    fn seals_and_opens() {
        let s = sealer(1);
        let plain = b"-----BEGIN PRIVATE KEY-----\nsecret\n";
        let blob = s.seal(K, ID, plain);
        assert_eq!(blob[0], VERSION);
        assert_eq!(blob.len(), 1 + NONCE_LEN + plain.len() + TAG_LEN);
        assert!(
            !blob.windows(6).any(|w| w == b"secret"),
            "plaintext visible in the blob"
        );
        assert_eq!(s.open(K, ID, &blob).unwrap().expose(), plain);
        // A fresh nonce every time: the same plaintext never seals to the same blob.
        assert_ne!(s.seal(K, ID, plain), blob);
        assert_eq!(s.open(K, ID, &s.seal(K, ID, b"")).unwrap().expose(), b"");
    }

    #[test]
    fn a_wrong_key_or_any_altered_byte_is_refused() {
        let s = sealer(1);
        let blob = s.seal(K, ID, b"device key");
        let err = sealer(2).open(K, ID, &blob).unwrap_err().to_string();
        assert_eq!(
            err,
            "sealed secret: authentication failed: wrong sealing key, tampered data, or a blob \
             sealed for another device or record (expected the device-key of \"sensor-1\")"
        );
        for i in 1..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x80;
            assert!(s.open(K, ID, &bad).is_err(), "byte {i} altered but opened");
        }
        let mut bad = blob.clone();
        bad[0] = 9;
        assert!(s
            .open(K, ID, &bad)
            .unwrap_err()
            .to_string()
            .contains("unknown format version 9 (this build reads versions 1 and 2)"));
        assert!(s
            .open(K, ID, &blob[..10])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(s.open(K, ID, &[]).is_err());
    }

    #[test]
    fn reads_raw_hex_and_base64_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let key: Vec<u8> = (0u8..32).collect();
        let reference = Sealer::from_key_bytes(&key).unwrap();
        let hex = hex::encode(&key);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&key);
        let forms: [(&str, Vec<u8>); 5] = [
            ("raw", key.clone()),
            ("hex", hex.clone().into_bytes()),
            ("hex-nl", format!("{hex}\n").into_bytes()),
            (
                "hex-upper",
                format!("{}\r\n", hex.to_uppercase()).into_bytes(),
            ),
            ("b64-nl", format!("{b64}\n").into_bytes()),
        ];
        for (name, content) in forms {
            let path = dir.path().join(name);
            write_private(&path, content);
            let s = Sealer::from_key_file(&path).unwrap();
            assert_eq!(
                reference
                    .open(K, ID, &s.seal(K, ID, b"x"))
                    .unwrap()
                    .expose(),
                b"x",
                "{name}"
            );
        }

        let short = dir.path().join("short");
        write_private(&short, "abcd\n");
        let err = Sealer::from_key_file(&short).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "sealing key {}: must be 32 raw bytes, 64 hex characters or base64 of 32 bytes (5 bytes found)",
                short.display()
            )
        );
        let missing = dir.path().join("missing");
        assert!(Sealer::from_key_file(&missing)
            .unwrap_err()
            .to_string()
            .starts_with(&missing.display().to_string()));
        assert_eq!(format!("{reference:?}"), "Sealer([redacted])");
    }

    #[test]
    fn a_blob_moved_to_another_device_or_record_kind_does_not_open() {
        let s = sealer(1);
        let blob = s.seal(K, ID, b"sensor-1's key");
        let err = s.open(K, "sensor-2", &blob).unwrap_err().to_string();
        assert!(
            err.ends_with("(expected the device-key of \"sensor-2\")"),
            "{err}"
        );
        assert!(s.open(SealedRecord::OwnershipToken, ID, &blob).is_err());
        // A prefix or suffix of the id is another id.
        assert!(s.open(K, "sensor-", &blob).is_err());
        assert!(s.open(K, "sensor-10", &blob).is_err());
        assert_eq!(s.open(K, ID, &blob).unwrap().expose(), b"sensor-1's key");
    }

    /// A version 1 blob as the previous release wrote it (AES-256-GCM, key = 32 bytes of 1,
    /// nonce 00..0b, associated data = the version byte only): stores sealed before the
    /// binding still open, for any device id and kind (the old format carries neither).
    #[test]
    fn opens_unbound_version_1_blobs_written_by_the_previous_release() {
        let blob = hex::decode(
            "01000102030405060708090a0bd7c3f2474387261d9b1c8ea74549a3c6d7c91f6968c15abd9fbaadfcb8e3d43478",
        )
        .unwrap();
        let s = sealer(1);
        assert_eq!(s.open(K, ID, &blob).unwrap().expose(), b"legacy device key");
        let mut bad = blob.clone();
        bad[20] ^= 1;
        assert_eq!(
            s.open(K, ID, &bad).unwrap_err().to_string(),
            "sealed secret: authentication failed: wrong sealing key or tampered data"
        );
        // Sealing again writes version 2.
        assert_eq!(s.seal(K, ID, b"legacy device key")[0], 2);
    }
}
