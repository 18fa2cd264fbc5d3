//! The admission rules in force as one shared, replaceable value: the provisioning engine and
//! the embedded broker's CONNECT check decide with the same rules, and a config reload
//! (`systemctl reload fleetgw`) swaps them for both at once.

use std::sync::Arc;

use super::Admission;

/// The admission rules in force, shared by the provisioning engine and the embedded broker's
/// CONNECT check and replaced as a whole when a config reload changes the enrollment keys
/// (group key, trusted CAs, x509 window). A decision uses the rules current when it starts.
#[derive(Clone, Debug)]
pub struct SharedAdmission(Arc<std::sync::RwLock<Arc<Admission>>>);

impl SharedAdmission {
    /// The rules in force now.
    pub fn current(&self) -> Arc<Admission> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `admission` in force for every decision that starts from now on.
    pub fn replace(&self, admission: Admission) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(admission);
    }
}

impl From<Admission> for SharedAdmission {
    fn from(admission: Admission) -> Self {
        SharedAdmission(Arc::new(std::sync::RwLock::new(Arc::new(admission))))
    }
}
