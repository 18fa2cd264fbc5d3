//! `fleetgw bench`: provisioning, telemetry, scale and footprint figures of fleetgw measured
//! beside the baselines users would pick instead, in the same run on the same machine.
//!
//! Everything is measured across process boundaries, as a user would deploy it: the AWS IoT
//! emulator (`fleetgw emulate aws`) and the daemon (`fleetgw run`) are separate processes of
//! this same binary ([`processes`]); this process is the device fleet (`sim` for
//! provisioning, [`publisher`] for timed telemetry load). Daemon figures come from /proc
//! ([`procfs`]), cloud-side figures (arrivals, latency, loss, connections, throttling) from the
//! emulator's inspection API, so nothing is taken from fleetgw's own word.
//!
//! Layout: [`procfs`] and [`publisher`] are leaves; [`processes`] starts the parts;
//! [`telemetry`] runs timed publishing phases and judges them at the emulator (it also hosts
//! the mosquitto bridge baseline); [`provision`] (with the AWS SDK baseline script),
//! [`scale`] and [`footprint`] are the other subcommands; [`plot`] draws `--plot`. The CLI
//! (`cli::bench`) adds the table, the progress bar and `--json`.

pub mod footprint;
pub mod plot;
pub mod processes;
pub mod procfs;
pub mod provision;
pub mod publisher;
pub mod scale;
pub mod telemetry;

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or socket operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or address.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A process did not start or died.
    #[error("{what}: {reason}")]
    Start {
        /// Which process.
        what: String,
        /// Why.
        reason: String,
    },
    /// The emulator's inspection API did not answer as expected.
    #[error("emulator API {url}: {reason}")]
    Api {
        /// The URL asked for.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The simulated fleet could not run.
    #[error("simulator: {0}")]
    Simulator(#[from] crate::sim::SimError),
    /// Devices failed to provision where the benchmark needs all of them.
    #[error("{failed} of {devices} devices failed to provision (first: {first})")]
    Provisioning {
        /// Devices that failed.
        failed: u32,
        /// Devices in the run.
        devices: u32,
        /// The first failure.
        first: String,
    },
    /// A publisher failed.
    #[error("publisher: {0}")]
    Publish(#[from] publisher::PublishError),
    /// The emulator's message log could not be read.
    #[error("emulator API: {0}")]
    Fetch(#[from] crate::sim::arrival::FetchError),
    /// A baseline could not run.
    #[error("baseline {what}: {reason}")]
    Baseline {
        /// Which baseline.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// An option is out of range.
    #[error("{option}: {reason}")]
    Usage {
        /// The option.
        option: &'static str,
        /// Why.
        reason: String,
    },
}

impl BenchError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        BenchError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Progress of a run, shown by the CLI as a progress bar (or nothing).
pub trait Observer: Sync {
    /// A new phase of `len` steps (devices, seconds) begins.
    fn phase(&self, name: &str, len: u64);
    /// Steps done so far in the current phase.
    fn position(&self, pos: u64);
}

/// An observer that shows nothing.
pub struct Quiet;

impl Observer for Quiet {
    fn phase(&self, _name: &str, _len: u64) {}
    fn position(&self, _pos: u64) {}
}

/// One second of a run, for `--plot`: what completed in it and the p99 latency of those.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    /// Seconds since the phase started.
    pub t: f64,
    /// Completions (devices, messages) in that second.
    pub per_second: f64,
    /// p99 latency of those completions, in ms.
    pub p99_ms: f64,
}

/// A named time series (one line of the plot).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// One point per second.
    pub points: Vec<Point>,
}

impl Series {
    /// Buckets `(completed at seconds since start, latency ms)` samples per second.
    pub fn from_samples(label: &str, samples: impl IntoIterator<Item = (f64, f64)>) -> Self {
        let mut buckets: Vec<Vec<f64>> = Vec::new();
        for (t, lat) in samples {
            if !(t.is_finite() && t >= 0.0) {
                continue;
            }
            let i = t as usize;
            if buckets.len() <= i {
                buckets.resize(i + 1, Vec::new());
            }
            buckets[i].push(lat);
        }
        let points = buckets
            .into_iter()
            .enumerate()
            .map(|(i, mut lats)| {
                lats.sort_by(f64::total_cmp);
                let p99 = if lats.is_empty() {
                    0.0
                } else {
                    lats[((lats.len() as f64 * 0.99).ceil() as usize).clamp(1, lats.len()) - 1]
                };
                Point {
                    t: i as f64,
                    per_second: lats.len() as f64,
                    p99_ms: p99,
                }
            })
            .collect();
        Self {
            label: label.to_string(),
            points,
        }
    }
}

/// The machine a run was taken on, written with every result.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    /// CPUs online.
    pub cpus: usize,
    /// `/proc/cpuinfo` model name.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// 1/5/15-minute load average at the start.
    pub load_before: [f64; 3],
    /// ... and at the end.
    pub load_after: [f64; 3],
    /// Whether this binary is a debug build (figures several times lower).
    pub debug_build: bool,
}

impl Machine {
    /// The machine now (`load_after` is filled by [`Machine::finish`]).
    pub fn now() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let load = procfs::load_average();
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            load_before: load,
            load_after: load,
            debug_build: cfg!(debug_assertions),
        }
    }

    /// Records the load average at the end.
    pub fn finish(&mut self) {
        self.load_after = procfs::load_average();
    }
}

/// A fresh private working directory (0700) for one run's processes and files; removed when
/// dropped unless `keep`.
pub struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    /// Creates `fleetgw-bench-PID-NANOS` under the system temp dir.
    pub fn create(keep: bool) -> Result<Self, BenchError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("fleetgw-bench-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| BenchError::io(&path, e))?;
        Ok(Self { path, keep })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// What every bench subcommand starts from, in this order: the open-file limit raised, the
/// machine noted, a fresh work directory and the AWS emulator in its `cloud/` (started with
/// `emulator_args`). Taken apart by the caller, which starts its daemon next to it.
pub(crate) struct Rig {
    pub(crate) machine: Machine,
    pub(crate) work: WorkDir,
    pub(crate) emu: processes::Emulator,
}

impl Rig {
    /// Sets the rig up (see [`Rig`]).
    pub(crate) async fn start(keep: bool, emulator_args: &[String]) -> Result<Self, BenchError> {
        // A run with thousands of devices holds a socket per device here and twice that in
        // the daemon (children inherit the limit). Best effort: a run that needs more than the
        // limit fails with its own error.
        let _ = crate::systemd::raise_fd_limit();
        let machine = Machine::now();
        let work = WorkDir::create(keep)?;
        let emu = processes::Emulator::start(&work.path().join("cloud"), emulator_args).await?;
        Ok(Self { machine, work, emu })
    }
}

/// A finite number above zero (an option that must be positive).
pub(crate) fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_directory_is_private_and_removed() {
        use std::os::unix::fs::PermissionsExt as _;
        // The daemon's notify socket, admin socket and keys live here: other users must not
        // reach them (a forged READY=1, a stolen key).
        let dir = WorkDir::create(false).unwrap();
        let path = dir.path().to_path_buf();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{path:?}");
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn samples_are_bucketed_per_second_with_their_p99() {
        let s = Series::from_samples(
            "x",
            [
                (0.1, 1.0),
                (0.9, 3.0),
                (2.5, 10.0),
                (f64::NAN, 1.0),
                (-1.0, 1.0),
            ],
        );
        assert_eq!(s.points.len(), 3);
        assert_eq!(s.points[0].per_second, 2.0);
        assert_eq!(s.points[0].p99_ms, 3.0);
        assert_eq!(s.points[1].per_second, 0.0);
        assert_eq!(s.points[2].p99_ms, 10.0);
    }
}
