//! The AWS emulator's counters behind `GET /stats`: connections and provisioning requests.
//! Lock-free so that connection tasks bump them on every packet without contention.

use std::sync::atomic::{AtomicU64, Ordering};

/// Emulator-wide counters (lock-free; read by `GET /stats`).
#[derive(Default)]
pub struct Counters {
    /// TLS connections accepted in total.
    pub connections_total: AtomicU64,
    /// Connections currently open (past the TLS handshake).
    pub connections_open: AtomicU64,
    /// Connections refused (TLS failure, not authorized, outage).
    pub connections_refused: AtomicU64,
    /// Connections closed by the emulator for a policy or protocol violation.
    pub connections_closed_by_policy: AtomicU64,
    /// CreateCertificateFromCsr requests.
    pub create_from_csr: AtomicU64,
    /// CreateKeysAndCertificate requests.
    pub create_keys: AtomicU64,
    /// RegisterThing requests.
    pub register_thing: AtomicU64,
    /// Requests answered on `/accepted`.
    pub accepted: AtomicU64,
    /// Requests answered on `/rejected`.
    pub rejected: AtomicU64,
    /// Requests rejected with 429.
    pub throttled: AtomicU64,
    /// Responses dropped by the `dropResponses` fault.
    pub dropped_responses: AtomicU64,
}

impl Counters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
