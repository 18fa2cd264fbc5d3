//! `fleetgw bench provision|telemetry|scale|footprint`: the figures users choose a gateway on,
//! with the baselines they would use instead measured in the same run (see `bench` for how).
//!
//! Each subcommand shows a progress bar on stderr while it runs, then a table; `--json FILE`
//! writes the figures under the field names of issue 22 (scripts rely on them), `--plot
//! FILE.svg` draws throughput and latency over time. Exit 0 when the run completed cleanly,
//! 1 when fleetgw lost, reordered or failed something (the figures are still written).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::Table;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::bench::footprint::{self, FootprintOptions};
use crate::bench::provision::{self, ProvisionOptions};
use crate::bench::scale::{self, ScaleOptions};
use crate::bench::telemetry::{self, Identity, PhaseFigures, TelemetryOptions};
use crate::bench::{plot, BenchError, Machine, Observer, Series};
use crate::telemetry::delay;

use super::simulate::write_json;
use super::{EX_IOERR, EX_SOFTWARE, EX_USAGE};

/// Arguments of `fleetgw bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

/// Output options shared by every subcommand.
#[derive(Debug, Clone, clap::Args)]
struct Output {
    /// Write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE", global = true)]
    json: Option<PathBuf>,
    /// Draw throughput and latency over time to FILE.svg.
    #[arg(long, value_name = "FILE.svg", global = true)]
    plot: Option<PathBuf>,
    /// Keep the run's directory (emulator, daemon, logs) under the temp dir.
    #[arg(long, global = true)]
    keep: bool,
}

/// What to measure.
#[derive(Debug, clap::Subcommand)]
enum What {
    /// Devices/s end to end, per-device latency, daemon CPU per device and peak RSS; beside
    /// the official AWS SDK's per-device flow, sequential and pooled.
    Provision(ProvisionArgs),
    /// Messages/s, device-to-cloud latency, loss, duplicates and order; beside the mosquitto
    /// bridge.
    Telemetry(TelemetryArgs),
    /// N devices connected at once, each publishing R msg/s with device identity: daemon RSS,
    /// CPU, p99 latency, upstream connections, loss.
    Scale(ScaleArgs),
    /// Idle RSS, RSS and store size with 10,000 devices, exec-to-READY, binary and .deb size.
    Footprint(FootprintArgs),
}

#[derive(Debug, clap::Args)]
struct ProvisionArgs {
    /// Devices to provision.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    devices: u32,
    /// Cloud quota per provisioning API (the emulator throttles, the gateway is configured with
    /// it): shows the share of the quota used and the throttling seen.
    #[arg(long, value_name = "Q")]
    tps: Option<f64>,
    /// Claim sessions of the gateway (`cloud.aws.sessions`).
    #[arg(long, value_name = "S", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    sessions: u32,
    /// Devices of the sequential AWS SDK baseline.
    #[arg(long, value_name = "N", default_value_t = 50)]
    baseline_devices: u32,
    /// Devices of the pooled AWS SDK baseline (16 workers).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pool_devices: u32,
    /// Skip the baselines.
    #[arg(long)]
    no_baselines: bool,
    #[command(flatten)]
    out: Output,
}

#[derive(Debug, clap::Args)]
struct TelemetryArgs {
    /// Publishing devices.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    devices: u32,
    /// Seconds each phase publishes.
    #[arg(long, value_name = "T")]
    seconds: f64,
    /// Total offered msg/s of the top-level run, split over the devices (0 = unpaced).
    #[arg(long, value_name = "R", default_value_t = 0.0)]
    rate: f64,
    /// Upstream identity of fleetgw.
    #[arg(long, value_enum, value_name = "ID", default_value = "device")]
    identity: Identity,
    /// Skip the mosquitto bridge baseline.
    #[arg(long)]
    no_baselines: bool,
    #[command(flatten)]
    out: Output,
}

#[derive(Debug, clap::Args)]
struct ScaleArgs {
    /// Devices connected at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    devices: u32,
    /// msg/s each device sends.
    #[arg(long, value_name = "R")]
    rate: f64,
    /// Seconds of publishing.
    #[arg(long, value_name = "T")]
    seconds: f64,
    #[command(flatten)]
    out: Output,
}

#[derive(Debug, clap::Args)]
struct FootprintArgs {
    /// Devices provisioned for the loaded figures (`rss10kMb` is taken with this many).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    devices: u32,
    #[command(flatten)]
    out: Output,
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
struct Bar(ProgressBar);

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {msg:32} [{bar:40}] {pos}/{len}  {elapsed}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Self(bar)
    }
}

impl Observer for Bar {
    fn phase(&self, name: &str, len: u64) {
        self.0.set_length(len);
        self.0.set_position(0);
        self.0.set_message(name.to_string());
    }
    fn position(&self, pos: u64) {
        self.0.set_position(pos);
    }
}

/// Runs `fleetgw bench`.
pub fn run(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetgw bench: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let bar = Bar::new();
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = measure(&args.what, &bar) => Some(r),
            // SIGTERM as well as Ctrl-C: either way the emulator, the daemon and the
            // baselines are stopped (dropped) before bench exits.
            r = super::wait_for_signal() => match r {
                Ok(()) => None,
                Err(e) => Some(Err(BenchError::Start {
                    what: "the signal handlers".into(),
                    reason: e.to_string(),
                })),
            },
        }
    });
    bar.0.finish_and_clear();
    let (out, report) = match outcome {
        None => {
            eprintln!("fleetgw bench: interrupted");
            return ExitCode::from(130);
        }
        Some(Err(e)) => {
            eprintln!("fleetgw bench: {e}");
            let code = match e {
                BenchError::Usage { .. } => EX_USAGE,
                BenchError::Io { .. } => EX_IOERR,
                _ => EX_SOFTWARE,
            };
            return ExitCode::from(code);
        }
        Some(Ok(r)) => r,
    };
    println!("{}", report.table);
    println!("{}", machine_line(&report.machine));
    for w in &report.warnings {
        eprintln!("fleetgw bench: {w}");
    }
    if let Some(path) = &out.json {
        if let Err(e) = write_json(path, &report.json) {
            eprintln!("fleetgw bench: {e}");
            return ExitCode::from(EX_IOERR);
        }
    }
    if let Some(path) = &out.plot {
        if let Err(e) = plot::draw(path, &report.title, &report.unit, &report.series) {
            eprintln!("fleetgw bench: {e}");
            return ExitCode::from(EX_IOERR);
        }
    }
    if report.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// What a subcommand hands back for output.
struct Report {
    table: Table,
    json: serde_json::Value,
    title: String,
    unit: String,
    series: Vec<Series>,
    machine: Machine,
    warnings: Vec<String>,
    clean: bool,
}

async fn measure<'a>(what: &'a What, bar: &Bar) -> Result<(&'a Output, Report), BenchError> {
    match what {
        What::Provision(a) => {
            let opts = ProvisionOptions {
                devices: a.devices,
                tps: a.tps,
                sessions: a.sessions,
                baseline_devices: if a.no_baselines {
                    0
                } else {
                    a.baseline_devices.max(1)
                },
                pool_devices: a.pool_devices.max(1),
                keep: a.out.keep,
            };
            let r = provision::run(&opts, bar).await?;
            Ok((&a.out, provision_report(&r)))
        }
        What::Telemetry(a) => {
            let opts = TelemetryOptions {
                devices: a.devices,
                seconds: a.seconds,
                rate: a.rate,
                identity: a.identity,
                baselines: !a.no_baselines,
                keep: a.out.keep,
            };
            let r = telemetry::run(&opts, bar).await?;
            Ok((&a.out, telemetry_report(&r)))
        }
        What::Scale(a) => {
            let opts = ScaleOptions {
                devices: a.devices,
                rate: a.rate,
                seconds: a.seconds,
                keep: a.out.keep,
            };
            let r = scale::run(&opts, bar).await?;
            let mut table = new_table(&["metric", "fleetgw"]);
            let p = &r.phase;
            for (k, v) in [
                (
                    "devices x msg/s",
                    format!("{} x {}", r.devices, r.rate_per_device),
                ),
                ("delivered msg/s", format!("{:.0}", p.messages_per_second)),
                ("daemon RSS (peak)", format!("{:.1} MB", r.rss_mb)),
                ("daemon CPU", format!("{:.2} cores", r.cpu_cores)),
                ("p50 / p99", format!("{:.1} / {:.1} ms", p.p50_ms, p.p99_ms)),
                ("upstream connections", r.upstream_connections.to_string()),
                (
                    "devices connected in (before the phase)",
                    format!("{:.1} s", p.connect_seconds),
                ),
                (
                    "lost / dup / out of order",
                    format!("{} / {} / {}", p.lost, p.duplicates, p.out_of_order),
                ),
            ] {
                table.add_row(vec![k.to_string(), v]);
            }
            Ok((
                &a.out,
                Report {
                    table,
                    json: r.to_json(),
                    title: format!(
                        "fleetgw bench scale: {} devices x {} msg/s",
                        r.devices, r.rate_per_device
                    ),
                    unit: "messages".into(),
                    series: r.series(),
                    machine: r.machine.clone(),
                    warnings: vec![],
                    clean: p.lost == 0 && p.out_of_order == 0,
                },
            ))
        }
        What::Footprint(a) => {
            let r = footprint::run(
                &FootprintOptions {
                    devices: a.devices,
                    keep: a.out.keep,
                },
                bar,
            )
            .await?;
            let mut table = new_table(&["metric", "fleetgw"]);
            for (k, v) in [
                ("idle RSS".to_string(), format!("{:.1} MB", r.idle_rss_mb)),
                (
                    format!("RSS with {} devices", r.devices),
                    format!("{:.1} MB", r.rss_10k_mb),
                ),
                (
                    format!("store with {} devices", r.devices),
                    format!("{:.1} MB", r.store_bytes as f64 / 1e6),
                ),
                ("exec to READY".into(), format!("{:.0} ms", r.ready_ms)),
                (
                    "binary".into(),
                    format!("{:.1} MB", r.binary_bytes as f64 / 1e6),
                ),
                (
                    "package (.deb)".into(),
                    r.deb_bytes
                        .map_or("not built (scripts/package)".into(), |b| {
                            format!("{:.1} MB", b as f64 / 1e6)
                        }),
                ),
            ] {
                table.add_row(vec![k, v]);
            }
            Ok((
                &a.out,
                Report {
                    table,
                    json: r.to_json(),
                    title: "fleetgw bench footprint".into(),
                    unit: "devices".into(),
                    series: vec![],
                    machine: r.machine.clone(),
                    warnings: vec![],
                    clean: true,
                },
            ))
        }
    }
}

fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(header.to_vec());
    table
}

fn machine_line(m: &Machine) -> String {
    format!(
        "machine: {} x {}, kernel {}, {} build; load average {:.2} {:.2} {:.2} before, {:.2} {:.2} {:.2} after",
        m.cpus,
        m.cpu_model,
        m.kernel,
        if m.debug_build { "debug (figures several times lower than release)" } else { "release" },
        m.load_before[0], m.load_before[1], m.load_before[2],
        m.load_after[0], m.load_after[1], m.load_after[2],
    )
}

fn provision_report(r: &provision::ProvisionResult) -> Report {
    let mut table = new_table(&[
        "setup",
        "devices",
        "devices/s",
        "p50 / p99 / max",
        "CPU / device",
        "peak RSS",
    ]);
    table.add_row(vec![
        "fleetgw".to_string(),
        format!("{} ({} failed)", r.devices, r.failed),
        format!("{:.0}", r.devices_per_second),
        format!("{:.1} / {:.1} / {:.1} ms", r.p50_ms, r.p99_ms, r.max_ms),
        format!("{:.2} ms", r.cpu_ms_per_device),
        format!("{:.1} MB", r.peak_rss_mb),
    ]);
    let mut warnings = Vec::new();
    for (name, b) in [
        ("AWS SDK, sequential", &r.sdk_sequential),
        ("AWS SDK, 16 workers", &r.sdk_pool),
    ] {
        match b {
            Ok(f) => {
                table.add_row(vec![
                    name.to_string(),
                    format!("{} ({} failed)", f.devices, f.failed),
                    format!("{:.1}", f.devices_per_second),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
            }
            Err(why) => warnings.push(format!("{name} baseline not run: {why}")),
        }
    }
    if let Some(share) = r.quota_share() {
        table.add_row(vec![
            format!("quota {} tps", r.tps.unwrap_or(0.0)),
            format!("{:.1}% used", share * 100.0),
            format!("{} throttled", r.throttled),
        ]);
    }
    Report {
        table,
        json: r.to_json(),
        title: format!("fleetgw bench provision: {} devices", r.devices),
        unit: "devices".into(),
        series: vec![r.series.clone()],
        machine: r.machine.clone(),
        warnings,
        clean: r.failed == 0,
    }
}

/// The daemon's forward delay of a phase as bucket bounds ("-" for the bridge).
fn in_gateway_cell(p: &PhaseFigures) -> String {
    let Some(h) = &p.in_gateway else {
        return "-".into();
    };
    if h.count() == 0 {
        return "none counted".into();
    }
    // Above the largest bucket the histogram only says "more than".
    let largest_ms = delay::BOUNDS_US[delay::BOUNDS_US.len() - 1] as f64 / 1000.0;
    let bound = |q| {
        p.in_gateway_ms(q)
            .map_or_else(|| format!("> {largest_ms}"), |ms| format!("<= {ms}"))
    };
    format!("{} / {}", bound(0.50), bound(0.99))
}

fn telemetry_report(r: &telemetry::TelemetryResult) -> Report {
    let mut table = new_table(&[
        "setup",
        "offered/s",
        "delivered/s",
        "acked",
        "p50 / p99 ms",
        "window wait p99 ms",
        "PUBACK p50 / p99 ms",
        "in gateway p50 / p99 ms",
        "lost",
        "dup",
        "out of order",
    ]);
    let mut row = |name: String, p: &PhaseFigures| {
        table.add_row(vec![
            name,
            format!("{:.0}", p.offered_per_second),
            format!("{:.0}", p.messages_per_second),
            p.messages_acked.to_string(),
            format!("{:.1} / {:.1}", p.p50_ms, p.p99_ms),
            format!("{:.1}", p.queued_p99_ms),
            format!("{:.1} / {:.1}", p.puback_p50_ms, p.puback_p99_ms),
            in_gateway_cell(p),
            p.lost.to_string(),
            p.duplicates.to_string(),
            p.out_of_order.to_string(),
        ]);
    };
    let id = r.identity.as_str();
    let mut warnings = Vec::new();
    match &r.bridge {
        Ok(b) => {
            row("mosquitto bridge, unpaced".into(), &b.unpaced);
            row("mosquitto bridge, half rate".into(), &b.half_rate);
        }
        Err(why) => warnings.push(format!("mosquitto bridge baseline not run: {why}")),
    }
    row(format!("fleetgw ({id} identity)"), &r.top);
    row(format!("fleetgw ({id} identity), half rate"), &r.half_rate);
    let clean = [&r.top, &r.half_rate]
        .iter()
        .all(|p| p.lost == 0 && p.out_of_order == 0);
    if !clean {
        warnings.push("fleetgw lost or reordered messages (see the table)".into());
    }
    Report {
        table,
        json: r.to_json(),
        title: format!(
            "fleetgw bench telemetry: {} devices, {id} identity",
            r.devices
        ),
        unit: "messages".into(),
        series: r.series(),
        machine: r.machine.clone(),
        warnings,
        clean,
    }
}
