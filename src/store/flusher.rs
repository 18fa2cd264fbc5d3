//! Group commit: one thread applies multi-tree batches and flushes sled; every writer waits for
//! "a flush that began after my write".
//!
//! sled's `flush_async()` hangs when many tasks await it at once (sled #1308), and a flush per
//! write costs one fsync per write. Instead a single dedicated OS thread (so fsync never blocks
//! the tokio runtime) performs every `Db::flush()`. A writer takes a ticket (a generation number)
//! after its write; the flusher starts a flush covering all tickets taken so far and, when it
//! ends, publishes the highest ticket it covered. N writers that arrive while a flush is running
//! are all covered by the next one: about one fsync for N writes.
//!
//! Batches ([`super::Batch`]) are handed to the same thread, which applies all that are waiting
//! in one sled transaction just before the flush. sled writes its log buffer out (and waits for
//! the disk) at every transaction, and wakes all of its I/O threads to do so; one transaction per
//! group instead of per batch is what keeps provisioning from being bound by that.
//!
//! Under load, flushes start at most every `min_interval`, so each covers more writes.
//!
//! sled 0.34's `flush()` makes its writes stable with `sync_file_range` on Linux, which
//! neither flushes the drive's write cache nor the file's size: enough for a killed process,
//! not for a power cut. So every flush ends with an `fdatasync` of sled's log file (`db` in
//! the store directory); only then are its tickets reported durable.
//!
//! Values sled writes outside its log (`blobs/`, one file per page too large for a quarter
//! of a log segment, see [`BLOB_THRESHOLD`]) are written with plain `write` and never synced
//! by sled 0.34 (`pagecache/blob_io.rs`). Every flush therefore also fsyncs the blob files
//! created since the last one, and the `blobs/` directory, before the log's `fdatasync`.
//!
//! A failed flush is fatal for the store ("fsyncgate": after a failed fsync the kernel may
//! have dropped the dirty pages and a later fsync can succeed without them). The failure
//! sticks: no later ticket is ever reported durable, no batch is applied any more, and
//! [`GroupCommit::failed`] resolves so that the daemon exits non-zero; systemd restarts it and
//! sled's recovery replays what really is on disk. With the `test-hooks` feature,
//! [`FAIL_FLUSH_FILE_ENV`] names a file whose existence makes every flush fail, and
//! [`STALL_FLUSH_FILE_ENV`] one whose existence holds every flush back.
//!
//! A flush that fails because the disk is full (ENOSPC, EDQUOT, EFBIG from sled's `pwrite`,
//! and the `fdatasync` of the log right after succeeds) is not fatal: the tickets it covered
//! fail with [`FlushError::Full`], this database accepts nothing more (sled's error is sticky
//! too), and the store reopens sled once space is back (`space.rs`).
//!
//! A writer that can afford to wait a little ([`GroupCommit::durable_within`], the outbox's
//! deletions) does not start a flush of its own: its ticket rides on the next flush another
//! writer asks for, or is flushed once its delay is up. Under load the telemetry intake's
//! appends flush continuously, so deletions cost no fsync of their own, and the intake no
//! longer alternates flushes with the remover (each append waited for two flushes).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::batch::{Batch, BatchTrees};
use super::space::{sled_no_space, Health};
use super::StoreError;

/// Environment variable of the `test-hooks` build naming a file: while it exists, every
/// store flush fails (fault injection for the fsync-failure tests). Release builds ignore it.
#[cfg(feature = "test-hooks")]
pub const FAIL_FLUSH_FILE_ENV: &str = "FLEETGW_TEST_FAIL_FLUSH_FILE";

/// Environment variable of the `test-hooks` build naming a file: while it exists, every store
/// flush waits before it starts (a disk that stops answering for a while, for the tests of
/// what a stalled flush may and may not hold back). Release builds ignore it.
#[cfg(feature = "test-hooks")]
pub const STALL_FLUSH_FILE_ENV: &str = "FLEETGW_TEST_STALL_FLUSH_FILE";

/// Size above which sled 0.34 writes a page to its own file under `blobs/` instead of the
/// log: `segment_size / MINIMUM_ITEMS_PER_SEGMENT - SEG_HEADER_LEN` with sled's defaults
/// (512 KiB segments, 4 items, 20 bytes), compared against the serialised page plus a 32-byte
/// message header. A page is a whole tree node (up to 17 entries before a split), not one
/// value, so values far below this can end up in a blob when their node is consolidated.
pub const BLOB_THRESHOLD: usize = 512 * 1024 / 4 - 20;

/// Why a ticket is not durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FlushError {
    /// No space to write: this database takes nothing more; the store reopens it.
    Full(String),
    /// Any other failure, fatal for the store.
    Failed(String),
}

/// What the flusher has finished, published to async waiters.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// Highest ticket covered by a finished flush (successful or not).
    done: u64,
    /// Highest ticket covered by a successful flush. It stops advancing at the first failure
    /// ([`Progress::fatal`]): a later fsync could succeed without the pages the failed one
    /// lost.
    ok_through: u64,
    /// Message of the last failed flush.
    last_error: Option<String>,
    /// Set by the first failed flush and never cleared: the store acknowledges nothing more.
    fatal: Option<String>,
    /// Set by the first flush that found no space and never cleared: this database takes
    /// nothing more (the store replaces it).
    full: Option<String>,
}

impl Progress {
    fn outcome(&self, ticket: u64) -> Option<Result<(), FlushError>> {
        if let Some(fatal) = &self.fatal {
            if self.ok_through < ticket {
                return Some(Err(FlushError::Failed(format!(
                    "the store failed to flush earlier and accepts no more writes: {fatal}"
                ))));
            }
        }
        if let Some(full) = &self.full {
            if self.ok_through < ticket {
                return Some(Err(FlushError::Full(full.clone())));
            }
        }
        if self.ok_through >= ticket {
            Some(Ok(()))
        } else if self.done >= ticket {
            Some(Err(FlushError::Failed(
                self.last_error
                    .clone()
                    .unwrap_or_else(|| "flush failed".into()),
            )))
        } else {
            None
        }
    }
}

#[derive(Default)]
struct State {
    /// Last ticket handed out.
    issued: u64,
    /// Last ticket whose writer wants a flush at once.
    eager: u64,
    /// When the oldest ticket that waits for a flush without asking for one must be flushed.
    lazy_deadline: Option<Instant>,
    /// Highest ticket a started flush covers.
    started: u64,
    progress: Progress,
    /// Flushes finished, for metrics and the group-commit benchmark.
    flushes: u64,
    /// Blob files fsynced, for the blob test and metrics.
    blobs_synced: u64,
    shutdown: bool,
    /// The flusher is waiting for work it may start at once (an eager ticket, a batch).
    flusher_idle: bool,
    /// Batches to apply in the next group transaction.
    batches: Vec<(Batch, oneshot::Sender<Result<(), StoreError>>)>,
}

impl State {
    fn has_work(&self) -> bool {
        self.started != self.issued || !self.batches.is_empty()
    }

    /// Work that must not wait for a lazy ticket's deadline.
    fn has_urgent_work(&self) -> bool {
        self.eager > self.started || !self.batches.is_empty()
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the flusher (new ticket, shutdown) and blocking waiters (flush finished).
    changed: Condvar,
    progress_tx: watch::Sender<Progress>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere while holding it; the counters stay
        // consistent because every update is a single assignment.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ticket covering every write made so far; `within` = None asks for a flush at once,
    /// `Some(d)` lets the ticket wait up to `d` for a flush someone else asks for.
    fn take_ticket(&self, within: Option<Duration>) -> u64 {
        let mut st = self.lock();
        st.issued += 1;
        let t = st.issued;
        match within {
            None => st.eager = t,
            Some(d) => {
                let due = Instant::now() + d;
                st.lazy_deadline = Some(st.lazy_deadline.map_or(due, |old| old.min(due)));
            }
        }
        self.wake_if_idle(st);
        t
    }

    /// Only an idle flusher needs waking: a busy one takes all work queued before its next
    /// flush starts. Skipping the notification saves a futex call per write.
    fn wake_if_idle(&self, st: MutexGuard<'_, State>) {
        let wake = st.flusher_idle;
        drop(st);
        if wake {
            self.changed.notify_all();
        }
    }
}

/// Handle to the flusher thread; dropping it flushes what is pending and joins the thread.
pub(crate) struct GroupCommit {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl GroupCommit {
    /// Starts the flusher thread for `db`, opened at `dir` (its log file is `dir/db`).
    pub(crate) fn start(
        db: sled::Db,
        trees: BatchTrees,
        dir: PathBuf,
        min_interval: Duration,
        faults: FlushFaults,
        health: Arc<Health>,
    ) -> std::io::Result<Self> {
        let path = dir.join("db");
        let log = File::open(&path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("opening sled's log {}: {e}", path.display()),
            )
        })?;
        let (progress_tx, _) = watch::channel(Progress::default());
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            progress_tx,
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("fleetgw-store-flush".into())
            .spawn(move || {
                run(
                    worker,
                    Flusher {
                        db,
                        log,
                        trees,
                        dir,
                        min_interval,
                        faults,
                        health,
                    },
                )
            })?;
        Ok(GroupCommit {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Resolves when a flush that began after this call has finished; the error is sled's
    /// message when that flush (and none after it) failed.
    pub(crate) async fn durable(&self) -> Result<(), FlushError> {
        self.wait_for_ticket(None).await
    }

    /// Like [`GroupCommit::durable`], but starts no flush of its own for up to `within`: it is
    /// covered by the next flush another writer asks for, or by one started when `within` is up.
    pub(crate) async fn durable_within(&self, within: Duration) -> Result<(), FlushError> {
        self.wait_for_ticket(Some(within)).await
    }

    async fn wait_for_ticket(&self, within: Option<Duration>) -> Result<(), FlushError> {
        let ticket = self.shared.take_ticket(within);
        self.wait(ticket).await
    }

    /// A ticket covering every write made so far, with a flush asked for at once; await it
    /// with [`GroupCommit::wait`]. Lets a writer go on while its writes are being flushed.
    pub(crate) fn ticket(&self) -> u64 {
        self.shared.take_ticket(None)
    }

    /// Resolves when a flush covering `ticket` has finished; the error is sled's message when
    /// that flush (and none after it) failed.
    pub(crate) async fn wait(&self, ticket: u64) -> Result<(), FlushError> {
        // `wait_for` checks the current value first, so a flush that finished before this
        // subscription is not missed.
        let mut rx = self.shared.progress_tx.subscribe();
        let progress = rx
            .wait_for(|p| p.outcome(ticket).is_some())
            .await
            .map_err(|_| FlushError::Failed("the store flusher thread has stopped".into()))?;
        progress.outcome(ticket).unwrap_or(Ok(()))
    }

    /// Applies `batch` in the next group transaction; resolves once it is durable (or with the
    /// batch's own failure, which changed nothing).
    pub(crate) async fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if st.shutdown {
                return Err(StoreError::Transaction {
                    message: "the store is closing".into(),
                });
            }
            st.batches.push((batch, tx));
            self.shared.wake_if_idle(st);
        }
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Transaction {
                message: "the store commit thread has stopped".into(),
            })
        })
    }

    /// Blocking form of [`GroupCommit::durable`], for threads outside the async runtime.
    pub(crate) fn durable_blocking(&self) -> Result<(), FlushError> {
        let ticket = self.shared.take_ticket(None);
        let mut st = self.shared.lock();
        loop {
            if let Some(outcome) = st.progress.outcome(ticket) {
                return outcome;
            }
            if st.shutdown && st.started < ticket {
                return Err(FlushError::Failed(
                    "the store flusher thread has stopped".into(),
                ));
            }
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Flushes (fsyncs) performed so far.
    pub(crate) fn flushes(&self) -> u64 {
        self.shared.lock().flushes
    }

    /// Blob files (`blobs/`) fsynced so far.
    pub(crate) fn blobs_synced(&self) -> u64 {
        self.shared.lock().blobs_synced
    }

    /// The outcome for `ticket` if its flush has finished (or the database has stopped).
    pub(crate) fn outcome(&self, ticket: u64) -> Option<Result<(), FlushError>> {
        self.shared.progress_tx.borrow().outcome(ticket)
    }

    /// Tickets issued and the highest ticket covered by a finished flush.
    #[cfg(test)]
    pub(crate) fn counters(&self) -> (u64, u64) {
        let st = self.shared.lock();
        (st.issued, st.progress.done)
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            // The thread owns a `Db` handle; joining it releases sled's file lock so that the
            // same directory can be reopened right after the store is dropped.
            if handle.join().is_err() {
                tracing::error!("the store flusher thread panicked");
            }
        }
    }
}

/// What the flusher thread owns.
struct Flusher {
    db: sled::Db,
    log: File,
    trees: BatchTrees,
    dir: PathBuf,
    min_interval: Duration,
    faults: FlushFaults,
    health: Arc<Health>,
}

fn run(shared: Arc<Shared>, f: Flusher) {
    let Flusher {
        db,
        log,
        trees,
        dir,
        min_interval,
        faults,
        health,
    } = f;
    let mut blobs = BlobSync::new(&dir);
    let mut last_start: Option<Instant> = None;
    loop {
        let (target, batches) = {
            let mut st = shared.lock();
            loop {
                if !st.has_work() {
                    if st.shutdown {
                        // Nothing pending; sled flushes once more when the last `Db` handle
                        // drops.
                        return;
                    }
                    st.flusher_idle = true;
                    st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                    st.flusher_idle = false;
                    continue;
                }
                if st.has_urgent_work() || st.shutdown {
                    break;
                }
                // Only tickets that may wait: until someone asks for a flush, or the first of
                // them is due.
                let now = Instant::now();
                match st.lazy_deadline {
                    Some(due) if due > now => {
                        st.flusher_idle = true;
                        st = shared
                            .changed
                            .wait_timeout(st, due - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                        st.flusher_idle = false;
                    }
                    _ => break,
                }
            }
            // Under load, space flushes by `min_interval` so that each covers more writes: a
            // flush costs an fsync plus a wake-up of every sled I/O thread, whatever it covers.
            // After a quiet spell the first write is flushed at once.
            if let Some(start) = last_start {
                let due = start + min_interval;
                while !st.shutdown {
                    let now = Instant::now();
                    if now >= due {
                        break;
                    }
                    st = shared
                        .changed
                        .wait_timeout(st, due - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            st.started = st.issued;
            st.lazy_deadline = None;
            (st.issued, std::mem::take(&mut st.batches))
        };
        last_start = Some(Instant::now());
        let stopped = {
            let st = shared.lock();
            match (&st.progress.fatal, &st.progress.full) {
                (Some(fatal), _) => Some(FlushError::Failed(fatal.clone())),
                (None, Some(full)) => Some(FlushError::Full(full.clone())),
                (None, None) => None,
            }
        };
        let (outcomes, result) = match stopped {
            // After a failed flush nothing is applied or flushed any more (module docs); after
            // one that found no space, nothing more on this database.
            Some(stop) => {
                let refused = batches
                    .iter()
                    .map(|_| Err(batch_error(&dir, &stop, true)))
                    .collect();
                (refused, Err(stop))
            }
            None => {
                let outcomes = if batches.is_empty() {
                    Vec::new()
                } else {
                    let refs: Vec<&Batch> = batches.iter().map(|(b, _)| b).collect();
                    trees.apply_group(&refs)
                };
                let result = flush(&db, &log, &mut blobs, &faults);
                (outcomes, result)
            }
        };
        let progress = {
            let mut st = shared.lock();
            st.progress.done = target;
            st.flushes += 1;
            st.blobs_synced = blobs.synced;
            match &result {
                Ok(_) => st.progress.ok_through = target,
                Err(FlushError::Full(e)) => {
                    if st.progress.full.is_none() && st.progress.fatal.is_none() {
                        st.progress.full = Some(e.clone());
                        health.no_space(e);
                    }
                    st.progress.last_error = Some(e.clone());
                }
                Err(FlushError::Failed(e)) => {
                    if st.progress.fatal.is_none() {
                        tracing::error!(
                            error = %e,
                            dir = %dir.display(),
                            "store flush failed: the store stops acknowledging writes"
                        );
                        st.progress.fatal = Some(e.clone());
                        health.fatal(e);
                    }
                    st.progress.last_error = Some(e.clone());
                }
            }
            st.progress.clone()
        };
        shared.changed.notify_all();
        shared.progress_tx.send_replace(progress);
        for ((batch, reply), outcome) in batches.into_iter().zip(outcomes) {
            // Released before the answer: a caller that shares a record with its batch
            // (`Batch::put_shared_device_if`) then holds the only reference and keeps it
            // without a copy.
            drop(batch);
            let outcome = match (&result, outcome) {
                (Err(e), Ok(())) => Err(batch_error(&dir, e, false)),
                // sled's own error for the group transaction, when the disk is full.
                (Err(e @ FlushError::Full(_)), Err(_)) => Err(batch_error(&dir, e, false)),
                (_, outcome) => outcome,
            };
            // The waiter may have gone away (its task was cancelled); the batch stands anyway.
            let _ = reply.send(outcome);
        }
    }
}

/// The error a batch gets when its group's flush failed (`earlier`: the database had stopped
/// before the batch was even applied).
fn batch_error(dir: &Path, e: &FlushError, earlier: bool) -> StoreError {
    match e {
        FlushError::Full(message) => StoreError::Full {
            dir: dir.to_owned(),
            message: message.clone(),
        },
        FlushError::Failed(message) if earlier => StoreError::Flush {
            dir: dir.to_owned(),
            message: format!("the store failed to flush earlier: {message}"),
        },
        FlushError::Failed(message) => StoreError::Flush {
            dir: dir.to_owned(),
            message: message.clone(),
        },
    }
}

/// One flush: sled's own, then the new blob files and the log made stable.
///
/// "No space" from sled's flush (its `pwrite` of the log buffer) is [`FlushError::Full`] only
/// if an `fdatasync` of the log on this thread's own descriptor then succeeds: a writeback
/// error (fsyncgate) would be reported to it, and stays fatal. Any error of our own fsyncs is
/// fatal, whatever its errno.
fn flush(
    db: &sled::Db,
    log: &File,
    blobs: &mut BlobSync,
    faults: &FlushFaults,
) -> Result<(), FlushError> {
    faults.stall();
    if let Some(full) = faults.no_space() {
        return Err(FlushError::Full(full));
    }
    faults.check().map_err(FlushError::Failed)?;
    if let Err(e) = db.flush() {
        if !sled_no_space(&e) {
            return Err(FlushError::Failed(e.to_string()));
        }
        return match log.sync_data() {
            Ok(()) => Err(FlushError::Full(e.to_string())),
            Err(sync) => Err(FlushError::Failed(format!(
                "{e}, and the fdatasync of db that followed failed too: {sync}"
            ))),
        };
    }
    blobs.sync_new().map_err(FlushError::Failed)?;
    log.sync_data()
        .map_err(|e| FlushError::Failed(format!("fdatasync of db: {e}")))
}

/// Fsyncs the files sled created under `blobs/` (named by their LSN, increasing) that no
/// earlier flush synced, then the directory itself so that their names are stable too.
struct BlobSync {
    dir: PathBuf,
    /// Highest blob LSN already synced.
    through: Option<u64>,
    /// Blob files synced since open.
    synced: u64,
}

impl BlobSync {
    fn new(store_dir: &Path) -> Self {
        BlobSync {
            dir: store_dir.join("blobs"),
            through: None,
            synced: 0,
        }
    }

    fn sync_new(&mut self) -> Result<(), String> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("reading {}: {e}", self.dir.display())),
        };
        let mut newest = self.through;
        let mut any = false;
        for entry in entries {
            let entry = entry.map_err(|e| format!("reading {}: {e}", self.dir.display()))?;
            let Some(lsn) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if self.through.is_some_and(|t| lsn <= t) {
                continue;
            }
            let path = entry.path();
            match File::open(&path) {
                Ok(f) => f
                    .sync_all()
                    .map_err(|e| format!("fsync of {}: {e}", path.display()))?,
                // sled removed it meanwhile (a newer page replaced it).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("opening {}: {e}", path.display())),
            }
            self.synced += 1;
            any = true;
            newest = Some(newest.map_or(lsn, |n| n.max(lsn)));
        }
        if any {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("fsync of {}: {e}", self.dir.display()))?;
        }
        self.through = newest;
        Ok(())
    }
}

/// Fault injection: the `test-hooks` build's [`FAIL_FLUSH_FILE_ENV`] and
/// [`STALL_FLUSH_FILE_ENV`], or files the crate's own tests name; empty (never failing or
/// stalling) in release builds.
#[derive(Clone, Debug, Default)]
pub(crate) struct FlushFaults {
    #[cfg(any(test, feature = "test-hooks"))]
    file: Option<PathBuf>,
    /// Every flush waits while this file exists.
    #[cfg(any(test, feature = "test-hooks"))]
    stall_file: Option<PathBuf>,
    /// The crate's own tests: every flush finds "no space" while this file exists.
    #[cfg(test)]
    no_space_file: Option<PathBuf>,
}

impl FlushFaults {
    /// From [`FAIL_FLUSH_FILE_ENV`] and [`STALL_FLUSH_FILE_ENV`] in `test-hooks` builds; none
    /// otherwise.
    pub(crate) fn from_env() -> Self {
        /// The file a hook's variable names, if set and not empty.
        #[cfg(feature = "test-hooks")]
        fn named_by(var: &str) -> Option<PathBuf> {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        }
        FlushFaults {
            #[cfg(feature = "test-hooks")]
            file: named_by(FAIL_FLUSH_FILE_ENV),
            #[cfg(all(test, not(feature = "test-hooks")))]
            file: None,
            #[cfg(feature = "test-hooks")]
            stall_file: named_by(STALL_FLUSH_FILE_ENV),
            #[cfg(all(test, not(feature = "test-hooks")))]
            stall_file: None,
            #[cfg(test)]
            no_space_file: None,
        }
    }

    /// Every flush finds no space (as if sled's `pwrite` had failed with ENOSPC) while `file`
    /// exists.
    #[cfg(test)]
    pub(crate) fn no_space_while_exists(file: &Path) -> Self {
        FlushFaults {
            no_space_file: Some(file.to_owned()),
            ..FlushFaults::default()
        }
    }

    #[cfg(test)]
    fn no_space(&self) -> Option<String> {
        self.no_space_file.as_ref().filter(|f| f.exists()).map(|f| {
            format!(
                "No space left on device (os error 28) (test hook: {} exists)",
                f.display()
            )
        })
    }

    #[cfg(not(test))]
    fn no_space(&self) -> Option<String> {
        None
    }

    /// Every flush fails while `file` exists.
    #[cfg(test)]
    pub(crate) fn while_exists(file: &Path) -> Self {
        FlushFaults {
            file: Some(file.to_owned()),
            ..FlushFaults::default()
        }
    }

    /// Every flush waits while `file` exists.
    #[cfg(test)]
    pub(crate) fn stalled_while_exists(file: &Path) -> Self {
        FlushFaults {
            stall_file: Some(file.to_owned()),
            ..FlushFaults::default()
        }
    }

    /// Waits while the stall file exists (polled: a test hook, not a hot path).
    #[cfg(any(test, feature = "test-hooks"))]
    fn stall(&self) {
        if let Some(file) = &self.stall_file {
            while file.exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    #[cfg(not(any(test, feature = "test-hooks")))]
    fn stall(&self) {}

    #[cfg(any(test, feature = "test-hooks"))]
    fn check(&self) -> Result<(), String> {
        match &self.file {
            Some(file) if file.exists() => Err(format!(
                "injected flush failure (test hook: {} exists)",
                file.display()
            )),
            _ => Ok(()),
        }
    }

    #[cfg(not(any(test, feature = "test-hooks")))]
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(db: &sled::Db, dir: &std::path::Path) -> GroupCommit {
        let tree = |name: &str| db.open_tree(name).unwrap();
        let trees = BatchTrees {
            devices: tree("devices"),
            secrets: tree("secrets"),
            tokens: tree("tokens"),
            operations: tree("operations"),
            enrollment_groups: tree("enrollment_groups"),
            device_groups: tree("device_groups"),
            meta: tree("meta"),
            device_writes: Arc::new(Mutex::new(())),
        };
        GroupCommit::start(
            db.clone(),
            trees,
            dir.to_owned(),
            Duration::from_millis(1),
            FlushFaults::default(),
            Arc::new(Health::new(dir)),
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_waiters_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let gc = Arc::new(start(&db, dir.path()));
        let mut tasks = Vec::new();
        for i in 0..64u32 {
            let gc = Arc::clone(&gc);
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                db.insert(i.to_be_bytes(), &b"x"[..]).unwrap();
                gc.durable().await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(()));
        }
        let (issued, done) = gc.counters();
        assert_eq!(issued, 64);
        assert_eq!(done, 64, "every ticket is covered by a finished flush");
        assert!(
            gc.flushes() <= 64,
            "flushes are shared, never more than writers"
        );
        assert_eq!(gc.durable_blocking(), Ok(()));
        assert_eq!(gc.counters(), (65, 65));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_ticket_rides_on_the_next_flush_or_is_flushed_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let gc = Arc::new(start(&db, dir.path()));
        // Alone, it is flushed once its delay is up.
        db.insert(b"a", &b"1"[..]).unwrap();
        assert_eq!(gc.durable_within(Duration::from_millis(50)).await, Ok(()));
        assert_eq!(gc.flushes(), 1);
        assert_eq!(gc.counters(), (1, 1));
        // With a long delay, an eager writer's flush covers it.
        db.insert(b"b", &b"2"[..]).unwrap();
        let lazy = {
            let gc = Arc::clone(&gc);
            tokio::spawn(async move { gc.durable_within(Duration::from_secs(3600)).await })
        };
        while gc.counters().0 < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(gc.durable().await, Ok(()));
        assert_eq!(lazy.await.unwrap(), Ok(()));
        assert_eq!(gc.counters(), (3, 3));
        assert_eq!(gc.flushes(), 2, "one flush for both tickets");
    }
}
