//! `fleetgw demo`: the whole product in one command, with nothing installed and no cloud
//! account. In one process and a fresh temporary directory it starts a cloud emulator (AWS IoT,
//! `emulator::aws`, by default; Azure DPS and IoT Hub, `emulator::azure`, with
//! `--provider azure`), the gateway daemon configured against it (embedded broker,
//! provisioning engine, store), and the simulated device fleet (`sim`); shows a progress bar
//! while the devices provision, then a summary table: devices, provisioned, failed, wall time,
//! devices/s, p50/p99 per-device latency and the devices the emulator registered (things, or
//! DPS registrations).
//!
//! Then the telemetry phase (on by default, `--messages 0` turns it off): every provisioned
//! device whose key the gateway made publishes `--messages` sequence-numbered QoS 1 messages
//! on the same connection; the gateway stores and forwards them upstream under each device's
//! own certificate (`telemetry.identity = "device"`; devices that brought their own CSR sit
//! the phase out, since the gateway cannot connect as them). A second progress bar counts the
//! acknowledged messages; the demo then waits (at most `--drain-secs`) until the emulator has
//! every message and checks them with `sim::arrival`: the table gains messages,
//! messages/s, device-to-cloud p50/p99, lost and duplicates. Everything runs in one process,
//! so device send times and emulator arrival times come from one clock.
//!
//! `--json FILE` writes the summary for scripts and benchmarks; `--keep` leaves everything
//! running and prints how to query it until Ctrl-C. Logging defaults to `warn` (set in
//! `cli::main`) so the progress bar stays readable; `RUST_LOG` overrides it.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comfy_table::Table;

use crate::config;
use crate::emulator::aws::{self as aws_emulator, AwsEmulatorHandle, AwsEmulatorOptions};
use crate::emulator::azure::{self as azure_emulator, AzureEmulatorHandle, AzureEmulatorOptions};
use crate::sim::arrival::{self, TelemetryCheck};
use crate::sim::{self, FleetOptions, FleetReport, SimCloud, SimError};

use super::run::Gateway;
use super::simulate::{
    print_failures, summary_table, telemetry_json, telemetry_ok, telemetry_rows, write_json,
    FleetProgress, TelemetryArgs,
};
use super::{EX_CONFIG, EX_IOERR, EX_SOFTWARE};

/// Share of demo devices that send CBOR (the rest JSON).
const CBOR_SHARE: f64 = 0.25;
/// Share of demo devices that send their own CSR (the rest get a gateway-generated key).
const OWN_CSR_SHARE: f64 = 0.5;
/// Per-device time budget in the demo.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one request to the emulator's API may take.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Telemetry messages per device when `--messages` is not given: enough for steady-state
/// figures, few enough that the default demo stays well under half a minute.
const DEFAULT_MESSAGES: u32 = 20;
/// How long stopping the gateway and the emulator may take.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Arguments of `fleetgw demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of simulated devices.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub devices: u32,

    /// The cloud to provision into: the AWS IoT emulator (fleet provisioning by claim) or the
    /// Azure one (DPS with a symmetric-key enrollment group, telemetry to IoT Hub).
    #[arg(long, value_enum, value_name = "CLOUD", default_value = "aws")]
    pub provider: SimCloud,

    /// Write the summary as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Leave the emulator and the gateway running (and their directory in place) after the
    /// run, and print how to query them; stop with Ctrl-C.
    #[arg(long)]
    pub keep: bool,

    /// The telemetry phase (`--messages` defaults to 20 here).
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error("cannot create the demo directory {path}: {source}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cloud emulator: {0}")]
    Emulator(#[from] crate::emulator::EmulatorError),
    #[error("gateway config: {0}")]
    Config(#[from] config::ConfigError),
    #[error("gateway: {0}")]
    Gateway(#[from] super::run::RunError),
    #[error("gateway: the device broker is not the embedded one")]
    NoEmbeddedBroker,
    #[error("simulator: {0}")]
    Simulator(#[from] SimError),
    #[error("emulator API {url}: {reason}")]
    Api { url: String, reason: String },
    #[error("emulator API: {0}")]
    Fetch(#[from] arrival::FetchError),
    #[error("{0}")]
    Output(String),
    #[error("interrupted")]
    Interrupted,
}

impl DemoError {
    fn exit_code(&self) -> u8 {
        match self {
            DemoError::Config(_) => EX_CONFIG,
            DemoError::WorkDir { .. } | DemoError::Write { .. } | DemoError::Output(_) => EX_IOERR,
            DemoError::Interrupted => 130,
            _ => EX_SOFTWARE,
        }
    }
}

/// Runs `fleetgw demo`.
pub fn run(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetgw demo: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    match runtime.block_on(demo(&args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("fleetgw demo: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The emulator the demo runs against.
enum Cloud {
    Aws(AwsEmulatorHandle),
    Azure(Box<AzureEmulatorHandle>),
}

impl Cloud {
    async fn start(provider: SimCloud, dir: &Path) -> Result<Self, DemoError> {
        let dir = dir.join("cloud");
        Ok(match provider {
            SimCloud::Aws => {
                Cloud::Aws(aws_emulator::start(AwsEmulatorOptions::ephemeral(dir)).await?)
            }
            SimCloud::Azure => {
                let mut opts = AzureEmulatorOptions::ephemeral(dir);
                // A short assigning phase: every registration is polled at least once.
                opts.assigning = Duration::from_millis(200);
                Cloud::Azure(Box::new(azure_emulator::start(opts).await?))
            }
        })
    }

    fn config_path(&self) -> PathBuf {
        match self {
            Cloud::Aws(e) => e.gateway_config_path(),
            Cloud::Azure(e) => e.gateway_config_path(),
        }
    }

    fn api_url(&self) -> String {
        match self {
            Cloud::Aws(e) => e.api_url(),
            Cloud::Azure(e) => e.api_url(),
        }
    }

    /// What registered devices are called in the table, and where the emulator lists them.
    fn registered(&self) -> (&'static str, &'static str) {
        match self {
            Cloud::Aws(_) => ("things in the emulator", "/things"),
            Cloud::Azure(_) => ("DPS registrations", "/registrations"),
        }
    }

    /// The config the demo adds to the emulator's `gateway.toml`.
    fn dropin(&self) -> &'static str {
        match self {
            Cloud::Aws(_) => {
                "# Written by `fleetgw demo`: the device broker on a free port, and cloud limits\n\
                # that let a local run go as fast as the machine allows: no TPS cap, and 16\n\
                # claim sessions, since each carries one request at a time and the emulator's\n\
                # round trip, not a quota, would otherwise set the pace.\n\n\
                [downstream]\nlisten = \"127.0.0.1:0\"\n\n\
                [cloud.aws]\ntps = 100000\nsessions = 16\n\n\
                # Each device's telemetry goes upstream under its own certificate.\n\
                [telemetry]\nidentity = \"device\"\n"
            }
            Cloud::Azure(_) => {
                "# Written by `fleetgw demo --provider azure`: the device broker on a free\n\
                # port, and DPS limits that let a local run go as fast as the machine allows.\n\n\
                [downstream]\nlisten = \"127.0.0.1:0\"\n\n\
                [cloud.azure]\ntps = 100000\nregistrations = 64\n"
            }
        }
    }

    async fn shutdown(self) {
        match self {
            Cloud::Aws(e) => e.shutdown().await,
            Cloud::Azure(e) => e.shutdown().await,
        }
    }
}

/// The whole demo; `Ok(true)` when every device was provisioned and the emulator has one
/// registration per device.
async fn demo(args: &Args) -> Result<bool, DemoError> {
    let workdir = WorkDir::create(args.keep)?;
    let emulator = Cloud::start(args.provider, workdir.path()).await?;
    let config_path = emulator.config_path();
    let mut dropin = emulator.dropin().to_string();
    // The gateway runs in this process, its admin socket in the demo's private directory: the
    // caller's own group is its admin group (the packaged default, "fleetgw", may not exist).
    if let Some(group) = crate::admin::auth::own_group_name() {
        dropin.push_str(&format!("\n[admin]\ngroup = {:?}\n", group));
    }
    write_demo_dropin(&config_path, &dropin)?;
    let config = config::load(&config_path, &[])?;
    let gateway = Gateway::start(&config).await?;
    let broker = gateway.broker_addr().ok_or(DemoError::NoEmbeddedBroker)?;

    let mut opts = FleetOptions::new(broker.ip().to_string(), broker.port(), args.devices);
    opts.run = "demo".to_string();
    opts.cbor_share = CBOR_SHARE;
    opts.own_csr_share = OWN_CSR_SHARE;
    opts.cloud = args.provider;
    if let Cloud::Aws(aws) = &emulator {
        opts.cloud_ca_pem = Some(aws.ca_pem().to_string());
    }
    opts.timeout = DEVICE_TIMEOUT;
    opts.telemetry = args.telemetry.plan(DEFAULT_MESSAGES);
    if let (Cloud::Azure(_), Some(t)) = (&emulator, &mut opts.telemetry) {
        // Symmetric-key devices connect upstream with SAS tokens: the gateway needs no key of
        // theirs, so the devices that brought a CSR send telemetry too.
        t.own_csr_devices = true;
    }
    let progress = FleetProgress::new(&opts);
    let report = tokio::select! {
        report = sim::run_fleet(opts, |event| progress.on_event(&event)) => report?,
        _ = tokio::signal::ctrl_c() => {
            progress.abandon();
            return Err(DemoError::Interrupted);
        }
    };
    progress.finish();

    let (label, path) = emulator.registered();
    let things = registered_count(&emulator.api_url(), path).await?;
    let check = match &report.telemetry {
        Some(t) => {
            let within = Duration::from_secs(args.telemetry.drain_secs);
            Some(sim::wait_for_delivery(&emulator.api_url(), t, within).await?)
        }
        None => None,
    };
    println!("{}", demo_table(&report, label, things, check.as_ref()));
    print_failures(&report);
    let telemetry_ok = report
        .telemetry
        .as_ref()
        .is_none_or(|t| telemetry_ok(t, check.as_ref()));
    if let Some(path) = &args.json {
        write_json(path, &demo_json(&report, things, check.as_ref())).map_err(DemoError::Output)?;
    }
    let ok = report.all_provisioned() && things == u64::from(report.devices) && telemetry_ok;
    if report.all_provisioned() && things != u64::from(report.devices) {
        eprintln!(
            "fleetgw demo: the emulator has {things} {label} for {} devices",
            report.devices
        );
    }

    if args.keep {
        print_keep_instructions(&workdir, &emulator, &config_path, broker);
        // Ctrl-C ends the wait; an error installing the handler ends it too.
        let _ = tokio::signal::ctrl_c().await;
    }
    match tokio::time::timeout(SHUTDOWN_TIMEOUT, gateway.shutdown()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("fleetgw demo: stopping the gateway: {e}"),
        Err(_) => eprintln!("fleetgw demo: the gateway did not stop within {SHUTDOWN_TIMEOUT:?}"),
    }
    let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, emulator.shutdown()).await;
    drop(workdir);
    Ok(ok)
}

/// The config drop-in (`text`) that turns the emulator-written `gateway.toml` into the demo's
/// gateway.
fn write_demo_dropin(config_path: &Path, text: &str) -> Result<(), DemoError> {
    let dir = config_path
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("config.d");
    std::fs::create_dir_all(&dir).map_err(|source| DemoError::Write {
        path: dir.clone(),
        source,
    })?;
    let path = dir.join("50-demo.toml");
    std::fs::write(&path, text).map_err(|source| DemoError::Write { path, source })
}

fn demo_table(
    report: &FleetReport,
    label: &'static str,
    things: u64,
    check: Option<&TelemetryCheck>,
) -> Table {
    let mut rows = vec![(label, things.to_string())];
    if let Some(t) = &report.telemetry {
        rows.extend(telemetry_rows(t, check));
    }
    summary_table(report, &rows)
}

/// `{"devices","provisioned","failed","seconds","devicesPerSecond","p50Ms","p99Ms","things"}`
/// plus the telemetry keys of `simulate::telemetry_json` (`"messages"` is 0 without the
/// telemetry phase).
fn demo_json(
    report: &FleetReport,
    things: u64,
    check: Option<&TelemetryCheck>,
) -> serde_json::Value {
    let mut json = serde_json::json!({
        "devices": report.devices,
        "provisioned": report.provisioned,
        "failed": report.failed,
        "seconds": report.elapsed.as_secs_f64(),
        "devicesPerSecond": report.devices_per_second(),
        "p50Ms": report.latency.p50_ms,
        "p99Ms": report.latency.p99_ms,
        "things": things,
        "messages": 0,
    });
    if let (Some(t), serde_json::Value::Object(map)) = (&report.telemetry, &mut json) {
        map.extend(telemetry_json(t, check));
    }
    json
}

fn print_keep_instructions(
    workdir: &WorkDir,
    emulator: &Cloud,
    config_path: &Path,
    broker: std::net::SocketAddr,
) {
    let api = emulator.api_url();
    println!();
    println!("Everything keeps running until Ctrl-C. Try:");
    match emulator {
        Cloud::Aws(aws) => {
            println!("  curl {api}/things            # things the emulator registered");
            println!("  curl {api}/certificates      # certificates and their status");
            println!("  curl {api}/stats             # request, connection and message counters");
            println!(
                "  curl '{api}/messages?limit=5' # telemetry the devices sent (base64 payloads)"
            );
            println!(
                "  fleetgw simulate --broker {broker} --devices 10 --ca {}",
                aws.ca_path().display()
            );
        }
        Cloud::Azure(_) => {
            println!("  curl {api}/registrations     # DPS registrations and their hubs");
            println!("  curl {api}/stats             # request, connection and message counters");
            println!(
                "  curl '{api}/messages?limit=5' # telemetry the devices sent (base64 payloads)"
            );
            println!("  fleetgw simulate --broker {broker} --devices 10 --cloud azure");
        }
    }
    println!("gateway config: {} (+ config.d/)", config_path.display());
    println!("device broker:  mqtt://{broker}");
    println!("emulator API:   {api}");
    println!("files:          {} (kept)", workdir.path().display());
}

/// Number of devices the emulator registered: the length of `GET {path}`.
async fn registered_count(api_url: &str, path: &str) -> Result<u64, DemoError> {
    let url = format!("{api_url}{path}");
    let body = tokio::time::timeout(API_TIMEOUT, arrival::http_get(&url))
        .await
        .map_err(|_| DemoError::Api {
            url: url.clone(),
            reason: format!("no answer within {API_TIMEOUT:?}"),
        })?
        .map_err(|reason| DemoError::Api {
            url: url.clone(),
            reason,
        })?;
    let listed: Vec<serde_json::Value> =
        serde_json::from_slice(&body).map_err(|e| DemoError::Api {
            url,
            reason: format!("not a JSON array: {e}"),
        })?;
    Ok(listed.len() as u64)
}

/// The demo's private directory under the system temp dir (mode 0700), removed when dropped
/// unless it is to be kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn create(keep: bool) -> Result<Self, DemoError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("fleetgw-demo-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| DemoError::WorkDir {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path, keep })
    }

    fn path(&self) -> &Path {
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
