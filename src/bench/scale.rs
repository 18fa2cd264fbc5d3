//! `fleetgw bench scale`: N provisioned devices connected at once, each publishing R msg/s for
//! T seconds with the default device identity (one upstream connection per active device, so
//! `telemetry.max_upstream_connections` is raised to N when N is above its default 1,000).
//! While they publish, the daemon's RSS (/proc) and the emulator's open connections are
//! sampled; the figures are the peaks, the daemon's CPU share over the phase (cores), the p99
//! device-to-cloud latency and the messages lost. The devices all connect to the local broker
//! before the phase starts (how long that took is reported apart, `connectSeconds`): the
//! latency is that of a connected fleet, not of a storm of CONNECTs, whose first messages
//! would wait behind the others' connection set-up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::processes::Daemon;
use super::procfs;
use super::telemetry::{
    provision_publishers, run_load, telemetry_emulator_args, Load, PhaseFigures,
};
use super::{BenchError, Machine, Observer, Rig, Series};

/// How often RSS and connections are sampled.
const SAMPLE: Duration = Duration::from_millis(500);

/// Options of `fleetgw bench scale`.
#[derive(Clone, Debug)]
pub struct ScaleOptions {
    /// Devices connected at once.
    pub devices: u32,
    /// msg/s per device.
    pub rate: f64,
    /// Seconds of publishing.
    pub seconds: f64,
    /// Keep the work directory.
    pub keep: bool,
}

/// The result of `fleetgw bench scale`.
#[derive(Clone, Debug)]
pub struct ScaleResult {
    /// Devices.
    pub devices: u32,
    /// msg/s per device.
    pub rate_per_device: f64,
    /// Daemon peak VmRSS while publishing, MB.
    pub rss_mb: f64,
    /// Daemon CPU time over wall time of the phase (1.0 = one core).
    pub cpu_cores: f64,
    /// Most upstream connections open at the emulator.
    pub upstream_connections: u64,
    /// The publishing phase.
    pub phase: PhaseFigures,
    /// The machine.
    pub machine: Machine,
}

/// Runs `fleetgw bench scale`.
pub async fn run(opts: &ScaleOptions, observer: &dyn Observer) -> Result<ScaleResult, BenchError> {
    if opts.devices == 0 || !super::positive(opts.rate) || !super::positive(opts.seconds) {
        return Err(BenchError::Usage {
            option: "--devices/--rate/--seconds",
            reason: "need at least 1 device, rate > 0 and seconds > 0".into(),
        });
    }
    let Rig {
        mut machine,
        work,
        emu,
    } = Rig::start(opts.keep, &telemetry_emulator_args()).await?;
    // One upstream connection per active device: the default cap (1,000) would park the
    // rest of a larger fleet behind it.
    let sets = vec![
        "telemetry.identity=\"device\"".to_string(),
        format!(
            "telemetry.max_upstream_connections={}",
            opts.devices.max(1000)
        ),
    ];
    let daemon = Daemon::start(&emu, &work.path().join("daemon"), &sets).await?;
    let (_, publishers) = provision_publishers(&daemon, &emu, opts.devices, "s", observer).await?;

    let pid = daemon.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let peak_rss = Arc::new(AtomicU64::new(procfs::rss_kib(pid).unwrap_or(0)));
    let peak_conns = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak_rss, peak_conns) = (stop.clone(), peak_rss.clone(), peak_conns.clone());
        let stats_url = format!("{}/stats", emu.api);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(kib) = procfs::rss_kib(pid) {
                    peak_rss.fetch_max(kib, Ordering::Relaxed);
                }
                let open = crate::sim::arrival::http_get(&stats_url)
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["connections"]["open"].as_u64());
                if let Some(open) = open {
                    peak_conns.fetch_max(open, Ordering::Relaxed);
                }
                tokio::time::sleep(SAMPLE).await;
            }
        })
    };
    let cpu_before = procfs::cpu_time(pid).unwrap_or_default();
    let started = Instant::now();
    let load = Load {
        rate: opts.rate * f64::from(opts.devices),
        seconds: opts.seconds,
        phase: 1,
    };
    let phase = run_load(
        &emu,
        daemon.broker.port(),
        &publishers,
        load,
        "fleetgw",
        observer,
    )
    .await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = procfs::cpu_time(pid)
        .unwrap_or_default()
        .saturating_sub(cpu_before);
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let phase = phase?;
    daemon.stop().await;
    emu.process.stop(Duration::from_secs(10)).await;
    machine.finish();
    Ok(ScaleResult {
        devices: opts.devices,
        rate_per_device: opts.rate,
        rss_mb: procfs::kib_to_mb(peak_rss.load(Ordering::Relaxed)),
        cpu_cores: cpu.as_secs_f64() / wall.max(0.001),
        upstream_connections: peak_conns.load(Ordering::Relaxed),
        phase,
        machine,
    })
}

impl ScaleResult {
    /// The `--json` document (field names as issue 22 gives them).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "devices": self.devices,
            "ratePerDevice": self.rate_per_device,
            "rssMb": self.rss_mb,
            "cpuCores": self.cpu_cores,
            "p99Ms": self.phase.p99_ms,
            "upstreamConnections": self.upstream_connections,
            "lost": self.phase.lost,
            "p50Ms": self.phase.p50_ms,
            "messagesPerSecond": self.phase.messages_per_second,
            "messagesAcked": self.phase.messages_acked,
            "duplicates": self.phase.duplicates,
            "outOfOrder": self.phase.out_of_order,
            "connectSeconds": self.phase.connect_seconds,
            "machine": self.machine,
        })
    }

    /// The series for `--plot`.
    pub fn series(&self) -> Vec<Series> {
        vec![self.phase.series.clone()]
    }
}
