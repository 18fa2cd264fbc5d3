//! `[downstream] auth = "device"`: how the embedded broker decides that a CONNECT is really
//! device X (see docs/architecture.md, "Local trust boundary").
//!
//! In order:
//! 1. a blocked device is refused;
//! 2. on the TLS listener, the certificate the gateway obtained for X (as stored now: a
//!    re-provisioned device's old certificate no longer matches) proves X, in every mode;
//! 3. otherwise the admission mode's own credentials: the SAS token in `symmetric-key` mode,
//!    a client certificate chaining to `trusted_ca` (CN = X) in `x509` mode;
//! 4. in `approve` and `open` modes, which have no device credentials, a device that is not
//!    provisioned yet connects unauthenticated (so it can ask to be); once it has a
//!    certificate it must present it.

use crate::admission::{AdmissionMode, SharedAdmission};
use crate::device_id::DeviceId;
use crate::store::{DeviceState, Store};

/// Checks devices' CONNECT credentials against admission and the store.
pub struct DeviceConnectCheck {
    admission: SharedAdmission,
    store: Store,
}

/// What a device proved at CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// It proved its id.
    Authenticated,
    /// Nothing to prove yet (approve/open mode, not provisioned).
    Unauthenticated,
}

impl DeviceConnectCheck {
    /// A check with these admission rules and this store.
    pub fn new(admission: SharedAdmission, store: Store) -> Self {
        Self { admission, store }
    }

    /// Decides about device `id`'s CONNECT: user name, password and the TLS client
    /// certificate chain (DER, leaf first; empty without one). `Err` says what is wrong.
    pub fn check(
        &self,
        id: &DeviceId,
        username: Option<&str>,
        password: Option<&[u8]>,
        client_chain: &[Vec<u8>],
        now_unix: i64,
    ) -> Result<Proof, String> {
        let record = self
            .store
            .device(id)
            .map_err(|e| format!("the gateway cannot read its store: {e}"))?;
        if record
            .as_ref()
            .is_some_and(|r| matches!(r.state, DeviceState::Blocked))
        {
            return Err("the device is blocked by the gateway operator".into());
        }
        let issued = record
            .as_ref()
            .and_then(|r| r.provision.certificate_pem.as_deref());
        if let (Some(leaf), Some(issued)) = (client_chain.first(), issued) {
            if pem::parse(issued).is_ok_and(|p| p.contents() == leaf.as_slice()) {
                return Ok(Proof::Authenticated);
            }
        }
        let admission = self.admission.current();
        match admission.mode() {
            AdmissionMode::Approve | AdmissionMode::Open => {
                if issued.is_some() {
                    Err(
                        "the device is provisioned: connect to the TLS listener with the \
                         certificate issued to it"
                            .into(),
                    )
                } else {
                    Ok(Proof::Unauthenticated)
                }
            }
            AdmissionMode::SymmetricKey | AdmissionMode::X509 => {
                let chain_pem = (!client_chain.is_empty()).then(|| {
                    client_chain
                        .iter()
                        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
                        .collect::<String>()
                });
                admission
                    .authenticate_connect(id, username, password, chain_pem.as_deref(), now_unix)
                    .map(|()| Proof::Authenticated)
            }
        }
    }
}
