//! A full disk, ridden out in-process: telling "no space" from a failed fsync, the store's
//! health (`ok` / `full`), the probe for space coming back, and the recovery thread that
//! reopens sled and resumes acknowledging (docs/src/reliability.md, "Disk full").
//!
//! Why in-process: exiting on every ENOSPC would have systemd restart the daemon in a loop
//! until `StartLimitBurst` stops the unit for good, while the disk stays full.
//!
//! Why this is not fsyncgate: sled 0.34 writes its log buffers with `pwrite` (in its flush
//! path or an I/O thread) and makes them stable with `sync_file_range`. ENOSPC, EDQUOT and
//! EFBIG (the process's `RLIMIT_FSIZE`, with SIGXFSZ ignored) come from the `pwrite`: the
//! bytes never reached the page cache, so nothing dirty was dropped behind our back. A
//! writeback failure (`sync_file_range` can report ENOSPC on thin or network storage) is
//! told apart by an `fdatasync` of the log on the flusher's own descriptor right after: the
//! kernel reports a writeback error to every descriptor opened before it (errseq), so when
//! that `fdatasync` fails the failure stays fatal like any other failed fsync.
//!
//! What sled does after such a `pwrite` error: it records it as its global error, and every
//! later write (and every flush) fails with it; its in-memory pages still hold the writes that
//! never reached the disk. Both are why the store reopens: a fresh `sled::Db` reads back what
//! really is on disk and has no sticky error. The writes lost that way were never reported
//! durable, so their writers got an error and will write again, except the outbox: its
//! entries are visible to the dispatcher as soon as they are inserted, so the reopen carries
//! the outbox as the gateway knew it (the old database's in-memory tree, still readable) into
//! the new one; see `Store::reopen`.
//!
//! While full, every write is refused at once with [`StoreError::Full`] (so nothing new is
//! acknowledged), reads are served, and outbox deletions are kept in memory and applied at the
//! next reopen. The recovery thread probes for space every 1 s, backing off to 5 s, reopens,
//! and flushes; the first successful flush ends the episode.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use super::StoreError;

/// First wait between two probes for space, doubling up to [`PROBE_MAX`].
pub(super) const PROBE_MIN: Duration = Duration::from_secs(1);
/// Longest wait between two probes for space.
pub(super) const PROBE_MAX: Duration = Duration::from_secs(5);
/// Bytes the probe writes (and fsyncs, then deletes): two of sled's 512 KiB log segments, so
/// that the next segment the log needs fits.
const PROBE_BYTES: usize = 1024 * 1024;
/// Name of the probe file in the state directory.
pub(super) const PROBE_FILE: &str = "space-probe";

/// Whether `e` says the disk (or the quota, or the process's file size limit) has no room:
/// ENOSPC, EDQUOT or EFBIG. sled clones its sticky error keeping only the kind and the debug
/// text, so the kind is checked too.
pub(super) fn io_no_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    if let Some(code) = e.raw_os_error() {
        return matches!(code, libc::ENOSPC | libc::EDQUOT | libc::EFBIG);
    }
    matches!(
        e.kind(),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge
    )
}

/// [`io_no_space`] for a sled error.
pub(super) fn sled_no_space(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io_no_space(io))
}

/// The store's state as `GET /health`, `GET /status` and the metrics show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Set while the store is full: writes are refused, nothing new is acknowledged.
    pub full: Option<FullSince>,
    /// Disk-full episodes since start (metric `fleetgw_store_full_episodes_total`).
    pub full_episodes: u64,
    /// Times the store was reopened to recover from one (metric `fleetgw_store_reopens_total`).
    pub reopens: u64,
}

/// When and why the store became full.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullSince {
    /// Unix milliseconds when the episode began.
    pub since_ms: u64,
    /// The error that began it (the OS's message, with the errno).
    pub error: String,
}

#[derive(Default)]
struct State {
    health: StoreHealth,
    /// The current database must be replaced (it met a no-space error).
    reopen_wanted: bool,
    /// The store is being dropped: the recovery thread ends.
    closing: bool,
}

/// Shared by the store, its flusher thread and its recovery thread.
pub(super) struct Health {
    dir: PathBuf,
    state: Mutex<State>,
    changed: Condvar,
    /// The flush failure that stopped the store for good (fsyncgate), once one happened.
    fatal: watch::Sender<Option<String>>,
}

impl Health {
    pub(super) fn new(dir: &Path) -> Self {
        Health {
            dir: dir.to_owned(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            fatal: watch::channel(None).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write or flush met "no space": the store is full (logged once per episode) and the
    /// database must be reopened.
    pub(super) fn no_space(&self, error: &str) {
        let mut st = self.lock();
        if st.health.full.is_none() {
            st.health.full_episodes += 1;
            st.health.full = Some(FullSince {
                since_ms: crate::clock::unix_ms(),
                error: error.to_owned(),
            });
            tracing::error!(
                dir = %self.dir.display(),
                error,
                "store full: no space to write; refusing writes and acknowledging nothing new until space returns (checked every 1-5 s)"
            );
        }
        st.reopen_wanted = true;
        drop(st);
        self.changed.notify_all();
    }

    /// The first successful flush after a reopen: the episode is over.
    pub(super) fn recovered(&self) {
        let mut st = self.lock();
        if let Some(full) = st.health.full.take() {
            let secs = crate::clock::unix_ms().saturating_sub(full.since_ms) / 1000;
            tracing::warn!(
                dir = %self.dir.display(),
                full_for_s = secs,
                reopens = st.health.reopens,
                "store writable again: space is back, the store was reopened and acknowledges writes again"
            );
        }
        st.reopen_wanted = false;
    }

    pub(super) fn reopened(&self) {
        let mut st = self.lock();
        st.health.reopens += 1;
        st.reopen_wanted = false;
    }

    /// A flush failed for another reason than space: fatal for the store.
    pub(super) fn fatal(&self, message: &str) {
        self.fatal.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(message.to_owned());
                true
            } else {
                false
            }
        });
        self.changed.notify_all();
    }

    pub(super) fn fatal_error(&self) -> Option<String> {
        self.fatal.borrow().clone()
    }

    pub(super) async fn failed(&self) -> String {
        let mut rx = self.fatal.subscribe();
        let fatal = rx
            .wait_for(|f| f.is_some())
            .await
            .ok()
            .and_then(|f| f.clone());
        match fatal {
            Some(message) => message,
            None => std::future::pending().await,
        }
    }

    pub(super) fn snapshot(&self) -> StoreHealth {
        self.lock().health.clone()
    }

    /// The error every write gets while the store is full.
    pub(super) fn refuse(&self) -> Result<(), StoreError> {
        match &self.lock().health.full {
            None => Ok(()),
            Some(full) => Err(StoreError::Full {
                dir: self.dir.clone(),
                message: full.error.clone(),
            }),
        }
    }

    pub(super) fn close(&self) {
        self.lock().closing = true;
        self.changed.notify_all();
    }

    /// Blocks until the store is full (or closing, `false`).
    pub(super) fn wait_full(&self) -> bool {
        let mut st = self.lock();
        loop {
            if st.closing {
                return false;
            }
            if st.health.full.is_some() && self.fatal.borrow().is_none() {
                return true;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Sleeps `d` unless the store closes meanwhile (`false`).
    pub(super) fn sleep(&self, d: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .changed
            .wait_timeout_while(st, d, |s| !s.closing)
            .unwrap_or_else(|p| p.into_inner());
        !st.closing
    }

    pub(super) fn reopen_wanted(&self) -> bool {
        self.lock().reopen_wanted
    }

    pub(super) fn is_full(&self) -> bool {
        self.lock().health.full.is_some()
    }
}

/// Whether there is room again in `dir` for the store to write: the process's file size
/// limit leaves room beyond sled's log (`db`) for another segment, and a probe file of
/// [`PROBE_BYTES`] can be written and fsynced (then it is deleted). `Err` says why not.
pub(super) fn probe(dir: &Path) -> Result<(), String> {
    let log = dir.join("db");
    let log_len = std::fs::metadata(&log).map(|m| m.size()).unwrap_or(0);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) } == 0
        && limit.rlim_cur != libc::RLIM_INFINITY
        && limit.rlim_cur < log_len + PROBE_BYTES as u64
    {
        return Err(format!(
            "the file size limit (RLIMIT_FSIZE, {} bytes) leaves no room after {} ({log_len} bytes)",
            limit.rlim_cur,
            log.display()
        ));
    }
    let path = dir.join(PROBE_FILE);
    let written = (|| {
        let mut f = File::create(&path)?;
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    written.map_err(|e| format!("writing {} bytes to {}: {e}", PROBE_BYTES, path.display()))
}
