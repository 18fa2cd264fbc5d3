//! What the benchmarks read about a process from /proc: CPU time (user + system), resident set
//! size now (`VmRSS`) and at its peak (`VmHWM`), and the machine's load average. Linux only,
//! as the daemon is.

use std::io;
use std::time::Duration;

/// CPU time (user + system) process `pid` used so far.
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: {stat}"),
        )
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .get(stat.rfind(')').ok_or_else(bad)? + 2..)
        .ok_or_else(bad)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> io::Result<u64> {
        fields.get(i).and_then(|v| v.parse().ok()).ok_or_else(bad)
    };
    let ticks = field(11)? + field(12)?;
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / per_sec))
}

/// A `/proc/PID/status` memory line (`VmRSS`, `VmHWM`, ...) in KiB.
fn status_kib(pid: u32, key: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/proc/{pid}/status has no {key}"),
            )
        })
}

/// Resident set size now, in KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// Peak resident set size (high-water mark), in KiB.
pub fn peak_rss_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmHWM")
}

/// The 1-, 5- and 15-minute load averages (zeros if /proc/loadavg cannot be read).
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
    [
        v.next().unwrap_or(0.0),
        v.next().unwrap_or(0.0),
        v.next().unwrap_or(0.0),
    ]
}

/// KiB to MB (10^6 bytes), as the figures are published.
pub fn kib_to_mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures_are_read() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(peak_rss_kib(pid).unwrap() >= rss_kib(pid).unwrap() / 2);
        cpu_time(pid).unwrap();
        assert!(rss_kib(u32::MAX).is_err());
    }
}
