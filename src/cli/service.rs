//! The daemon's main loop under systemd: signals (SIGTERM/SIGINT stop, SIGHUP reloads),
//! readiness, the `STATUS=` line and the watchdog, all through [`crate::systemd::Notifier`]
//! (a no-op outside systemd).
//!
//! The watchdog is fed from this loop and only after a health check passed (a store round
//! trip, the engine's and telemetry's loops alive), so a daemon whose main loop hangs, whose
//! store stopped answering or whose pipeline died stops feeding it and systemd restarts it.
//! See docs/architecture.md, "systemd".

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};

use super::reload;
use super::run::{Gateway, RunError};
use super::ConfigArgs;
use crate::config::Config;
use crate::store::Store;
use crate::systemd::{self, Notifier};

/// How often the `STATUS=` line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// How long READY=1 waits for the sockets it depends on.
const READY_SOCKET_WAIT: Duration = Duration::from_secs(30);
/// Longest a health check may take (capped by half the watchdog interval).
const HEALTH_CHECK_LIMIT: Duration = Duration::from_secs(5);
/// The per-status device count is redone at most every this many times the last count took,
/// so counting a large fleet costs at most ~5% of one core.
const COUNT_COST_FACTOR: u32 = 20;

/// Environment variable of the `test-hooks` build naming a file: on SIGUSR1 the main loop
/// hangs (blocks its thread, as a deadlock would) while that file exists, at most a minute,
/// so tests can see the watchdog go quiet and come back. Release builds have no such hook.
#[cfg(feature = "test-hooks")]
pub const HANG_FILE_ENV: &str = "FLEETGW_TEST_HANG_FILE";

/// The signals the daemon reacts to; installed before the gateway starts, so a SIGHUP
/// during startup no longer kills the process (its default action) without a flush.
pub(super) struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    #[cfg(feature = "test-hooks")]
    hang: Signal,
}

/// What a signal asks for.
enum Request {
    Stop(&'static str),
    Reload,
    #[cfg(feature = "test-hooks")]
    Hang,
}

impl Signals {
    pub(super) fn install() -> std::io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            #[cfg(feature = "test-hooks")]
            hang: signal(SignalKind::user_defined1())?,
        })
    }

    #[cfg(not(feature = "test-hooks"))]
    async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.term.recv() => Request::Stop("SIGTERM"),
            _ = self.int.recv() => Request::Stop("SIGINT"),
            _ = self.hup.recv() => Request::Reload,
        }
    }

    #[cfg(feature = "test-hooks")]
    async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.term.recv() => Request::Stop("SIGTERM"),
            _ = self.int.recv() => Request::Stop("SIGINT"),
            _ = self.hup.recv() => Request::Reload,
            _ = self.hang.recv() => Request::Hang,
        }
    }
}

/// Runs the started gateway until SIGTERM/SIGINT: READY=1 once the sockets in
/// `ready_sockets` accept connections, STATUS= every few seconds, WATCHDOG=1 after each
/// passed health check, RELOADING=1 ... READY=1 around a SIGHUP reload, STOPPING=1 before the
/// orderly shutdown. Returns the signal that stopped it.
pub(super) async fn serve(
    gateway: &Gateway,
    cfg: Config,
    args: &ConfigArgs,
    notifier: &Notifier,
    signals: &mut Signals,
    ready_sockets: &[PathBuf],
) -> Result<&'static str, RunError> {
    if let Err(path) = systemd::wait_for_sockets(ready_sockets, READY_SOCKET_WAIT).await {
        return Err(RunError::Config {
            key: "admin.socket",
            reason: format!(
                "{} does not accept connections {READY_SOCKET_WAIT:?} after start",
                path.display()
            ),
        });
    }
    notifier.ready();
    let counts = DeviceCounts::start(gateway.store().clone());
    let mut running = reload::Running::new(cfg);
    notifier.status(&gateway.status_line(&counts.get()));

    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watchdog_every = notifier.watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog_every.unwrap_or(Duration::MAX / 4));
    watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let health_limit =
        watchdog_every.map_or(HEALTH_CHECK_LIMIT, |w| (w / 2).min(HEALTH_CHECK_LIMIT));
    if let Some(every) = watchdog_every {
        tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog on");
    }

    let stop = loop {
        tokio::select! {
            request = signals.next() => match request {
                Request::Stop(signal) => break signal,
                Request::Reload => {
                    notifier.reloading();
                    running.reload(args, gateway).await;
                    notifier.reloaded();
                    // Shown only at debug level: tests see a changed log.level take effect.
                    tracing::debug!("reload finished");
                    notifier.status(&gateway.status_line(&counts.get()));
                }
                #[cfg(feature = "test-hooks")]
                Request::Hang => hang(),
            },
            message = gateway.store().failed() => {
                // fsyncgate: nothing after a failed flush may be acknowledged, and only a
                // restart (sled's recovery from what is really on disk) makes the store
                // trustworthy again. No orderly shutdown: it would try to flush once more.
                notifier.status(&format!("store failed: {message}"));
                counts.stop();
                return Err(RunError::StoreFailed {
                    dir: gateway.store().dir().to_owned(),
                    message,
                });
            }
            _ = status_tick.tick() => notifier.status(&gateway.status_line(&counts.get())),
            _ = watchdog_tick.tick(), if watchdog_every.is_some() => {
                match tokio::time::timeout(health_limit, gateway.health_check()).await {
                    Ok(Ok(())) => notifier.watchdog(),
                    Ok(Err(why)) => tracing::error!("health check failed: {why}; not feeding the systemd watchdog"),
                    Err(_) => tracing::error!(
                        limit_ms = health_limit.as_millis() as u64,
                        "health check did not finish in time; not feeding the systemd watchdog"
                    ),
                }
            }
        }
    };
    notifier.stopping();
    counts.stop();
    Ok(stop)
}

/// The test hook: blocks the main loop's thread while the file named by [`HANG_FILE_ENV`]
/// exists.
#[cfg(feature = "test-hooks")]
fn hang() {
    let Some(file) = std::env::var_os(HANG_FILE_ENV).map(PathBuf::from) else {
        tracing::warn!("SIGUSR1 without {HANG_FILE_ENV}: ignored");
        return;
    };
    tracing::warn!(file = %file.display(), "test hook: the main loop hangs");
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while file.exists() && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!("test hook: the main loop goes on");
}

/// Devices per state (`delivered`, `waitingApproval`, ...), counted in the background: the
/// count decodes every record, so it is redone no more often than [`STATUS_EVERY`] and
/// [`COUNT_COST_FACTOR`] times its own duration.
pub(super) struct DeviceCounts {
    latest: Arc<Mutex<Option<BTreeMap<&'static str, u64>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DeviceCounts {
    fn start(store: Store) -> Self {
        let latest = Arc::new(Mutex::new(None));
        let shared = latest.clone();
        let task = tokio::spawn(async move {
            loop {
                let store = store.clone();
                let started = std::time::Instant::now();
                let counted = tokio::task::spawn_blocking(move || count_states(&store)).await;
                let took = started.elapsed();
                if let Ok(counts) = counted {
                    *shared.lock().unwrap_or_else(|p| p.into_inner()) = Some(counts);
                }
                tokio::time::sleep(STATUS_EVERY.max(took * COUNT_COST_FACTOR)).await;
            }
        });
        DeviceCounts { latest, task }
    }

    /// The last count; `None` until the first one finished.
    fn get(&self) -> Option<BTreeMap<&'static str, u64>> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn stop(self) {
        self.task.abort();
    }
}

fn count_states(store: &Store) -> BTreeMap<&'static str, u64> {
    let mut counts = BTreeMap::new();
    for rec in store.devices() {
        let name = match rec {
            Ok(rec) => rec.state.name(),
            Err(_) => "unreadable",
        };
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// The `STATUS=` text: devices per state, outbox depth, cloud link state.
pub(super) fn status_text(
    counts: &Option<BTreeMap<&'static str, u64>>,
    outbox_messages: u64,
    claim_sessions: (usize, usize),
    upstream_connections: u64,
) -> String {
    let devices = match counts {
        None => "devices: counting".to_string(),
        Some(c) if c.is_empty() => "devices: none".to_string(),
        Some(c) => {
            let parts: Vec<String> = c.iter().map(|(state, n)| format!("{n} {state}")).collect();
            format!("devices: {}", parts.join(", "))
        }
    };
    let (connected, sessions) = claim_sessions;
    let cloud = if connected == 0 {
        "down"
    } else if connected < sessions {
        "degraded"
    } else {
        "up"
    };
    format!(
        "{devices}; outbox: {outbox_messages} messages; cloud {cloud}: {connected}/{sessions} claim sessions, {upstream_connections} upstream connections"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_names_counts_outbox_and_link() {
        let mut c = BTreeMap::new();
        c.insert("delivered", 3);
        c.insert("waitingApproval", 1);
        assert_eq!(
            status_text(&Some(c), 12, (4, 4), 2),
            "devices: 3 delivered, 1 waitingApproval; outbox: 12 messages; cloud up: 4/4 claim sessions, 2 upstream connections"
        );
        assert_eq!(
            status_text(&None, 0, (0, 4), 0),
            "devices: counting; outbox: 0 messages; cloud down: 0/4 claim sessions, 0 upstream connections"
        );
        assert!(status_text(&Some(BTreeMap::new()), 0, (1, 4), 0).starts_with("devices: none; "));
        assert!(status_text(&None, 0, (1, 4), 0).contains("cloud degraded"));
    }
}
