//! `fleetgw bench provision`: devices provisioned per second end to end through a `fleetgw run`
//! process, per-device latency, the daemon's CPU time per device and peak RSS (/proc), and with
//! a cloud quota (`--tps`) the share of it used and the throttling the emulator counted.
//!
//! Baseline in the same run against the same emulator: the per-device flow users script today
//! with the official AWS IoT Device SDK for Python (`benches/baselines/aws_sdk_per_device.py`,
//! from the pinned interop venv `target/interop-venv` that `scripts/interop` builds): one claim
//! connection per device, CreateCertificateFromCsr then RegisterThing, one device after another
//! and from a pool of workers.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::processes::{fleetgw_exe, Daemon, Emulator};
use super::procfs;
use super::telemetry::read;
use super::{BenchError, Machine, Observer, Rig, Series};
use crate::sim::{self, FleetEvent, FleetOptions};

/// The benchmark's fleet checks one device's answer in this many in full (the returned key
/// parsed and matched to the certificate, the chain verified) and the others' form only:
/// the fleet shares the machine with the daemon it measures, and full checks of every answer
/// cost it about a third of the daemon's CPU per device. Tests that run the fleet check all.
const FULL_CHECK_EVERY: u32 = 10;

/// Worker threads of the pooled SDK baseline.
pub const SDK_POOL_WORKERS: usize = 16;
/// The baseline script, relative to the source tree.
pub const SDK_SCRIPT: &str = "benches/baselines/aws_sdk_per_device.py";
/// The pinned interop venv's interpreter, relative to the target directory.
pub const SDK_VENV_PYTHON: &str = "interop-venv/bin/python";

/// Options of `fleetgw bench provision`.
#[derive(Clone, Debug)]
pub struct ProvisionOptions {
    /// Devices.
    pub devices: u32,
    /// Cloud quota per provisioning API (emulator and gateway alike); `None` = unthrottled.
    pub tps: Option<f64>,
    /// Claim sessions of the gateway (`cloud.aws.sessions`).
    pub sessions: u32,
    /// Devices of the sequential SDK baseline (0 = skip the baselines).
    pub baseline_devices: u32,
    /// Devices of the pooled SDK baseline.
    pub pool_devices: u32,
    /// Keep the work directory.
    pub keep: bool,
}

/// One SDK baseline run.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SdkFigures {
    /// Devices.
    pub devices: u64,
    /// Provisioned per second of wall time.
    pub devices_per_second: f64,
    /// Devices that failed.
    pub failed: u64,
    /// Worker threads.
    pub workers: u64,
}

/// The result of `fleetgw bench provision`.
#[derive(Clone, Debug)]
pub struct ProvisionResult {
    /// Devices.
    pub devices: u32,
    /// Provisioned.
    pub provisioned: u32,
    /// Failed.
    pub failed: u32,
    /// Wall time.
    pub seconds: f64,
    /// Devices per second.
    pub devices_per_second: f64,
    /// Per-device latency.
    pub p50_ms: f64,
    /// ...
    pub p99_ms: f64,
    /// ...
    pub max_ms: f64,
    /// Daemon CPU time per device, ms.
    pub cpu_ms_per_device: f64,
    /// Daemon VmHWM, MB.
    pub peak_rss_mb: f64,
    /// The quota, when throttled.
    pub tps: Option<f64>,
    /// Throttling rejections the emulator counted.
    pub throttled: u64,
    /// Sequential SDK baseline, or why it did not run.
    pub sdk_sequential: Result<SdkFigures, String>,
    /// Pooled SDK baseline, or why it did not run.
    pub sdk_pool: Result<SdkFigures, String>,
    /// Devices per second over time.
    pub series: Series,
    /// The machine.
    pub machine: Machine,
}

/// Runs `fleetgw bench provision`.
pub async fn run(
    opts: &ProvisionOptions,
    observer: &dyn Observer,
) -> Result<ProvisionResult, BenchError> {
    if opts.devices == 0 || opts.sessions == 0 || opts.tps.is_some_and(|t| !super::positive(t)) {
        return Err(BenchError::Usage {
            option: "--devices/--sessions/--tps",
            reason: "need at least 1 device and 1 session, and --tps > 0".into(),
        });
    }
    let emu_args = match opts.tps {
        Some(t) => vec!["--tps".to_string(), t.to_string()],
        None => vec![],
    };
    let Rig {
        mut machine,
        work,
        emu,
    } = Rig::start(opts.keep, &emu_args).await?;
    let mut sets = vec![format!("cloud.aws.sessions={}", opts.sessions)];
    if let Some(tps) = opts.tps {
        sets.push(format!("cloud.aws.tps={tps}"));
    }
    let daemon = Daemon::start(&emu, &work.path().join("daemon"), &sets).await?;
    let mut fleet = FleetOptions::new("127.0.0.1", daemon.broker.port(), opts.devices);
    fleet.id_prefix = "bench".into();
    fleet.cloud_ca_pem = Some(read(&emu.dir.join("ca.pem"))?);
    fleet.full_check_every = FULL_CHECK_EVERY;
    fleet.timeout = Duration::from_secs(600);
    let pid = daemon.pid();
    let cpu_before = procfs::cpu_time(pid).map_err(|e| BenchError::io(Path::new("/proc"), e))?;
    observer.phase("provisioning", u64::from(opts.devices));
    let started = Instant::now();
    let samples = std::cell::RefCell::new(Vec::new());
    let done = std::cell::Cell::new(0u64);
    let report = sim::run_fleet(fleet, |e| {
        if let FleetEvent::Provisioned { latency, .. } = &e {
            let t = started.elapsed().as_secs_f64();
            samples
                .borrow_mut()
                .push((t, latency.as_secs_f64() * 1000.0));
        }
        done.set(done.get() + 1);
        observer.position(done.get());
    })
    .await?;
    let cpu =
        procfs::cpu_time(pid).map_err(|e| BenchError::io(Path::new("/proc"), e))? - cpu_before;
    let peak_rss_mb = procfs::kib_to_mb(procfs::peak_rss_kib(pid).unwrap_or(0));
    let throttled = emu.stats().await?["requests"]["throttled"]
        .as_u64()
        .unwrap_or(0);
    daemon.stop().await;

    let (sdk_sequential, sdk_pool) = if opts.baseline_devices == 0 {
        let off = Err("baselines off (--no-baselines)".to_string());
        (off.clone(), off)
    } else {
        match sdk_paths() {
            Ok((python, script)) => {
                observer.phase("AWS SDK baseline, sequential", 1);
                let seq =
                    sdk_baseline(&python, &script, &emu, opts.baseline_devices, 1, "seq").await;
                observer.phase("AWS SDK baseline, worker pool", 1);
                let pool = sdk_baseline(
                    &python,
                    &script,
                    &emu,
                    opts.pool_devices,
                    SDK_POOL_WORKERS,
                    "pool",
                )
                .await;
                (seq, pool)
            }
            Err(why) => (Err(why.clone()), Err(why)),
        }
    };
    emu.process.stop(Duration::from_secs(10)).await;
    machine.finish();
    let n = f64::from(report.devices.max(1));
    Ok(ProvisionResult {
        devices: report.devices,
        provisioned: report.provisioned,
        failed: report.failed,
        seconds: report.elapsed.as_secs_f64(),
        devices_per_second: report.devices_per_second(),
        p50_ms: report.latency.p50_ms,
        p99_ms: report.latency.p99_ms,
        max_ms: report.latency.max_ms,
        cpu_ms_per_device: cpu.as_secs_f64() * 1000.0 / n,
        peak_rss_mb,
        tps: opts.tps,
        throttled,
        sdk_sequential,
        sdk_pool,
        series: Series::from_samples("fleetgw", samples.into_inner()),
        machine,
    })
}

/// The venv interpreter and the baseline script: `FLEETGW_BENCH_PYTHON` and
/// `FLEETGW_BENCH_SDK_SCRIPT` when set, else found from the current directory (a source tree)
/// or from this binary's place in `target/{debug,release}/`.
fn sdk_paths() -> Result<(PathBuf, PathBuf), String> {
    let exe = fleetgw_exe().map_err(|e| e.to_string())?;
    // target/<profile>/fleetgw -> target/ and the source tree above it.
    let target = exe.parent().and_then(Path::parent).map(Path::to_path_buf);
    let tree = target
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let python = std::env::var_os("FLEETGW_BENCH_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(target.map(|t| t.join(SDK_VENV_PYTHON)))
        .chain([Path::new("target").join(SDK_VENV_PYTHON)])
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "the interop venv (target/interop-venv) is missing: run `scripts/interop \
             target/debug/fleetgw --suite aws -k emulator_files` once, or set FLEETGW_BENCH_PYTHON"
                .to_string()
        })?;
    let script = std::env::var_os("FLEETGW_BENCH_SDK_SCRIPT")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(SDK_SCRIPT)])
        .chain(tree.map(|t| t.join(SDK_SCRIPT)))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{SDK_SCRIPT} not found (run from the source tree)"))?;
    Ok((python, script))
}

async fn sdk_baseline(
    python: &Path,
    script: &Path,
    emu: &Emulator,
    devices: u32,
    workers: usize,
    run: &str,
) -> Result<SdkFigures, String> {
    let path = |f: &str| emu.dir.join(f).display().to_string();
    let out = tokio::process::Command::new(python)
        .arg(script)
        .args(["--port", &emu.mqtt.port().to_string()])
        .args(["--ca", &path("ca.pem")])
        .args(["--claim-cert", &path("claim.pem")])
        .args(["--claim-key", &path("claim.key")])
        .args(["--devices", &devices.to_string()])
        .args(["--workers", &workers.to_string()])
        .args(["--run", run])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{}: {e}", python.display()))?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "{} printed no result ({e}); stderr:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let n = |k: &str| json[k].as_u64().unwrap_or(0);
    if n("provisioned") == 0 {
        return Err(format!("no device provisioned: {}", json["firstError"]));
    }
    Ok(SdkFigures {
        devices: n("devices"),
        devices_per_second: json["devicesPerSecond"].as_f64().unwrap_or(0.0),
        failed: n("failed"),
        workers: n("workers"),
    })
}

impl ProvisionResult {
    /// Share of the quota used: devices provisioned over the most the quota admits in the
    /// run's wall time. Each device needs one call of each API, and the emulator's bucket
    /// starts full (one second of quota), so T seconds admit at most `tps x (T + 1)` devices.
    pub fn quota_share(&self) -> Option<f64> {
        self.tps
            .map(|t| f64::from(self.provisioned) / (t * (self.seconds + 1.0)))
    }

    /// The `--json` document (field names as issue 22 gives them).
    pub fn to_json(&self) -> serde_json::Value {
        let sdk = |r: &Result<SdkFigures, String>| match r {
            Ok(f) => serde_json::json!({
                "devicesPerSecond": f.devices_per_second,
                "devices": f.devices,
                "failed": f.failed,
                "workers": f.workers,
            }),
            Err(_) => serde_json::Value::Null,
        };
        let mut json = serde_json::json!({
            "devices": self.devices,
            "provisioned": self.provisioned,
            "failed": self.failed,
            "seconds": self.seconds,
            "devicesPerSecond": self.devices_per_second,
            "p50Ms": self.p50_ms,
            "p99Ms": self.p99_ms,
            "maxMs": self.max_ms,
            "cpuMsPerDevice": self.cpu_ms_per_device,
            "peakRssMb": self.peak_rss_mb,
            "baselines": {
                "sdkSequential": sdk(&self.sdk_sequential),
                "sdkPool": sdk(&self.sdk_pool),
            },
            "baselineSkipped": self.sdk_sequential.as_ref().err().or(self.sdk_pool.as_ref().err()),
            "machine": self.machine,
        });
        if let (Some(share), Some(map)) = (self.quota_share(), json.as_object_mut()) {
            map.insert("quotaShare".into(), share.into());
            map.insert("tps".into(), self.tps.into());
            map.insert("throttled".into(), self.throttled.into());
        }
        json
    }
}
