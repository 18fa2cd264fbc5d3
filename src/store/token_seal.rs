//! Ownership tokens sealed at rest, like device keys: when a sealing key is configured
//! ([`Store::seal_tokens_with`]), every token the store writes (the `tokens` tree record and
//! the copy inside a `certificateIssued` device record) is stored as
//! `sealed:<base64 of a Sealer blob>`, the blob bound to [`SealedRecord::OwnershipToken`] and
//! the device id (AEAD associated data), so a token copied to another device's record fails to
//! open. Reads open them again, so everything above the store sees the token itself.
//!
//! Tokens written in clear (before a key was configured) are still read and are sealed when
//! the record is written again. A sealed token without the key, or one that does not open, is
//! an error of that record ([`StoreError::Unseal`]), never quarantined: the key may come back.
//!
//! Sealing lives here and not in [`OwnershipToken`]'s serde code because it needs the sealer
//! and the device id, which serialisation does not carry.

use std::sync::Arc;

use base64::Engine as _;

use super::{DeviceRecord, OwnershipToken, OwnershipTokenRecord, Store, StoreError};
use crate::identity::{SealedRecord, Sealer};

/// Prefix of a sealed token as stored.
pub(super) const SEALED_PREFIX: &str = "sealed:";

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn seal_one(sealer: &Sealer, device: &str, token: &mut OwnershipToken) {
    if token.expose().starts_with(SEALED_PREFIX) {
        return;
    }
    let blob = sealer.seal(
        SealedRecord::OwnershipToken,
        device,
        token.expose().as_bytes(),
    );
    *token = OwnershipToken::new(format!("{SEALED_PREFIX}{}", b64().encode(blob)));
}

fn open_one(
    sealer: Option<&Sealer>,
    tree: &'static str,
    device: &str,
    token: &mut OwnershipToken,
) -> Result<(), StoreError> {
    let Some(encoded) = token.expose().strip_prefix(SEALED_PREFIX) else {
        return Ok(());
    };
    let fail = |reason: String| StoreError::Unseal {
        tree,
        key: device.to_owned(),
        reason,
    };
    let sealer = sealer.ok_or_else(|| {
        fail("the ownership token is sealed and no sealing key is configured".into())
    })?;
    let blob = b64()
        .decode(encoded)
        .map_err(|e| fail(format!("sealed ownership token is not base64: {e}")))?;
    let plain = sealer
        .open(SealedRecord::OwnershipToken, device, &blob)
        .map_err(|e| fail(e.to_string()))?;
    let text = std::str::from_utf8(plain.expose())
        .map_err(|_| fail("the opened ownership token is not UTF-8".into()))?;
    *token = OwnershipToken::new(text);
    Ok(())
}

impl Store {
    /// Seals ownership tokens with `sealer` from now on (the daemon calls it right after
    /// opening the store when `provision.sealing_key_file` or `provision.sealing_credential`
    /// is set). A second call is ignored: the key does not change while the store is open.
    pub fn seal_tokens_with(&self, sealer: Arc<Sealer>) {
        let _ = self.inner.sealer.set(sealer);
    }

    pub(super) fn sealer(&self) -> Option<&Sealer> {
        self.inner.sealer.get().map(|s| s.as_ref())
    }

    /// The device record as it is stored: its token sealed when a key is configured.
    pub(super) fn seal_device(&self, rec: &mut DeviceRecord) {
        if let Some(sealer) = self.sealer() {
            let id = rec.id.as_str().to_owned();
            if let Some(token) = rec.state.ownership_token_mut() {
                seal_one(sealer, &id, token);
            }
        }
    }

    /// The token record as it is stored: sealed when a key is configured.
    pub(super) fn seal_token_record(&self, rec: &mut OwnershipTokenRecord) {
        if let Some(sealer) = self.sealer() {
            let id = rec.device.as_str().to_owned();
            seal_one(sealer, &id, &mut rec.token);
        }
    }

    /// A device record as read: its token opened.
    pub(super) fn open_device(&self, mut rec: DeviceRecord) -> Result<DeviceRecord, StoreError> {
        let id = rec.id.as_str().to_owned();
        if let Some(token) = rec.state.ownership_token_mut() {
            open_one(self.sealer(), super::DEVICES, &id, token)?;
        }
        Ok(rec)
    }

    /// A token record as read: its token opened.
    pub(super) fn open_token_record(
        &self,
        mut rec: OwnershipTokenRecord,
    ) -> Result<OwnershipTokenRecord, StoreError> {
        let id = rec.device.as_str().to_owned();
        open_one(self.sealer(), super::TOKENS, &id, &mut rec.token)?;
        Ok(rec)
    }
}
