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

/// Unix microseconds now (0 if the clock is before 1970): arrival and send times of benchmark
/// telemetry, whose latencies are a few milliseconds.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Unix seconds now (0 if the clock is before 1970).
pub fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `unix_ms` as an RFC 3339 UTC timestamp with milliseconds, `2022-08-27T17:53:19.514Z`: the
/// form the Azure services put in `createdDateTimeUtc` and friends.
pub fn rfc3339_millis(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_renders_known_instants() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_661_622_799_514),
            "2022-08-27T17:53:19.514Z"
        );
        assert_eq!(rfc3339_millis(951_782_400_007), "2000-02-29T00:00:00.007Z");
    }

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
