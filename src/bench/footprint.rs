//! `fleetgw bench footprint`: what the daemon costs the gateway box. Idle RSS right after
//! start; RSS and store size once 10,000 devices (by default) are provisioned; exec-to-READY
//! (the `READY=1` systemd would see); the size of this binary and of the .deb that
//! `scripts/package` built next to it (`target/packages/`), if any.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::processes::{fleetgw_exe, Daemon};
use super::procfs;
use super::telemetry::{read, require_all};
use super::{BenchError, Machine, Observer, Rig};
use crate::sim::{self, FleetOptions};

/// How long idle RSS may take to settle.
const SETTLE: Duration = Duration::from_secs(10);

/// Options of `fleetgw bench footprint`.
#[derive(Clone, Debug)]
pub struct FootprintOptions {
    /// Devices provisioned for the loaded figures (10,000 for `rss10kMb`).
    pub devices: u32,
    /// Keep the work directory.
    pub keep: bool,
}

/// The result of `fleetgw bench footprint`.
#[derive(Clone, Debug)]
pub struct FootprintResult {
    /// RSS after READY, settled, MB.
    pub idle_rss_mb: f64,
    /// Devices provisioned for the next two.
    pub devices: u32,
    /// RSS with them provisioned, MB.
    pub rss_10k_mb: f64,
    /// Store (state directory) size with them, bytes.
    pub store_bytes: u64,
    /// Exec to READY=1, ms.
    pub ready_ms: f64,
    /// This binary, bytes.
    pub binary_bytes: u64,
    /// The newest .deb in `target/packages/`, bytes.
    pub deb_bytes: Option<u64>,
    /// The machine.
    pub machine: Machine,
}

/// Runs `fleetgw bench footprint`.
pub async fn run(
    opts: &FootprintOptions,
    observer: &dyn Observer,
) -> Result<FootprintResult, BenchError> {
    if opts.devices == 0 {
        return Err(BenchError::Usage {
            option: "--devices",
            reason: "need at least 1 device".into(),
        });
    }
    let Rig {
        mut machine,
        work,
        emu,
    } = Rig::start(opts.keep, &[]).await?;
    observer.phase("starting the daemon", 1);
    let daemon = Daemon::start(
        &emu,
        &work.path().join("daemon"),
        &["cloud.aws.sessions=16".into()],
    )
    .await?;
    let pid = daemon.pid();
    let idle = settled_rss(pid).await;
    let mut fleet = FleetOptions::new("127.0.0.1", daemon.broker.port(), opts.devices);
    fleet.id_prefix = "bench".into();
    fleet.cloud_ca_pem = Some(read(&emu.dir.join("ca.pem"))?);
    fleet.timeout = Duration::from_secs(600);
    observer.phase("provisioning", u64::from(opts.devices));
    let done = std::cell::Cell::new(0u64);
    let report = sim::run_fleet(fleet, |_| {
        done.set(done.get() + 1);
        observer.position(done.get());
    })
    .await?;
    require_all(&report)?;
    let loaded = settled_rss(pid).await;
    let store_bytes = dir_size(&daemon.state_dir);
    let ready_ms = daemon.ready_after.as_secs_f64() * 1000.0;
    daemon.stop().await;
    emu.process.stop(Duration::from_secs(10)).await;
    let exe = fleetgw_exe()?;
    let binary_bytes = std::fs::metadata(&exe)
        .map_err(|e| BenchError::io(&exe, e))?
        .len();
    machine.finish();
    Ok(FootprintResult {
        idle_rss_mb: procfs::kib_to_mb(idle),
        devices: opts.devices,
        rss_10k_mb: procfs::kib_to_mb(loaded),
        store_bytes,
        ready_ms,
        binary_bytes,
        deb_bytes: newest_deb(&exe),
        machine,
    })
}

/// VmRSS once two samples 200 ms apart differ by less than 1% (or after [`SETTLE`]).
async fn settled_rss(pid: u32) -> u64 {
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut last = procfs::rss_kib(pid).unwrap_or(0);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = procfs::rss_kib(pid).unwrap_or(0);
        if now.abs_diff(last) * 100 < last.max(1) || tokio::time::Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// Bytes of the regular files below `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// The newest `fleetgw*.deb` in `target/packages/` (this binary is `target/PROFILE/fleetgw`).
fn newest_deb(exe: &Path) -> Option<u64> {
    let packages: PathBuf = exe.parent()?.parent()?.join("packages");
    std::fs::read_dir(packages)
        .ok()?
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("fleetgw") && name.ends_with(".deb")
        })
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .max()
        .map(|(_, len)| len)
}

impl FootprintResult {
    /// The `--json` document (field names as issue 22 gives them).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "idleRssMb": self.idle_rss_mb,
            "rss10kMb": self.rss_10k_mb,
            "readyMs": self.ready_ms,
            "binaryBytes": self.binary_bytes,
            "debBytes": self.deb_bytes,
            "devices": self.devices,
            "storeBytes": self.store_bytes,
            "machine": self.machine,
        })
    }
}
