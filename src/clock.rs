//! Wall-clock time as the store, the wire formats and the emulators record it.
//!
//! Records, ownership-token expiries and SAS tokens carry Unix times; this is the one place
//! that reads the system clock for them. Durations and deadlines inside the process use
//! `tokio::time::Instant` instead, which a clock step cannot disturb.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds now (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Unix seconds now (0 if the clock is before 1970).
pub fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_and_seconds_agree() {
        let ms = unix_ms();
        let s = unix_secs();
        // Both read the same clock within a second or so of each other.
        assert!((ms / 1000).abs_diff(s as u64) <= 1, "{ms} ms vs {s} s");
        // After 2020-01-01: the clock is read, not defaulted.
        assert!(s > 1_577_836_800);
    }
}
