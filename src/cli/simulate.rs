//! `fleetgw simulate`: a fleet of simulated downstream devices provisioning themselves through
//! a running gateway, in its own process (see `sim` for what each device does).
//!
//! Prints a summary table (and with `--json FILE` a machine-readable summary); exits 0 when
//! every device holds a verified certificate, 1 when any failed, listing the first failures
//! with their reasons. `fleetgw demo` reuses the table and the progress bar from here.
//!
//! With `--messages N` each provisioned device then publishes N sequence-numbered telemetry
//! messages (see [`TelemetryArgs`]); with `--emulator-api URL` the run ends by checking what
//! the cloud emulator received (`sim::arrival`: lost, duplicates, order,
//! device-to-cloud latency) and exits 1 when anything was lost or reordered.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, Table};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::admission;
use crate::downstream::{parse_broker_url, BrokerUrl};
use crate::identity::{CertificateAuthority, KeyType, Secret};
use crate::sim::arrival::TelemetryCheck;
use crate::sim::{
    self, FleetEvent, FleetOptions, FleetReport, SimAttestation, SimCloud, TelemetryPlan,
    TelemetryReport,
};

use super::{EX_IOERR, EX_SOFTWARE, EX_USAGE};

/// How many failures the summary lists (all of them are in `--json`).
const FAILURES_SHOWN: usize = 10;

/// The telemetry options shared by `fleetgw simulate` and `fleetgw demo` (whose defaults for
/// `--messages` differ: 0 here, a short phase in the demo).
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Telemetry messages each provisioned device publishes after provisioning (QoS 1 on
    /// PREFIX/ID/telemetry, payload {"seq":n,"t":sendMs,"pad":...}); 0 disables the phase.
    #[arg(long, value_name = "N")]
    pub messages: Option<u32>,

    /// Telemetry messages per second per device (0 = as fast as --message-window allows).
    #[arg(long, value_name = "R", default_value_t = 0.0)]
    pub message_rate: f64,

    /// Most unacknowledged telemetry messages per device.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    pub message_window: u16,

    /// Telemetry payload size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 200)]
    pub payload_bytes: usize,

    /// Devices that sent their own CSR publish telemetry too (needs the gateway's
    /// `telemetry.identity = "gateway"`; with "device" the gateway holds no key to forward
    /// them, so by default they skip the phase).
    #[arg(long)]
    pub telemetry_own_csr: bool,

    /// Start telemetry right after /accepted instead of waiting for the retained status to
    /// say "provisioned" (the gateway refuses telemetry until it has recorded the delivery).
    #[arg(long)]
    pub telemetry_on_accepted: bool,

    /// Let each device start its telemetry as soon as it is provisioned, instead of once the
    /// whole fleet is (the phases then overlap and share the machine, mixing their figures).
    #[arg(long)]
    pub telemetry_overlap: bool,

    /// Seconds each device may take for its telemetry phase (status wait included).
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub telemetry_timeout: u64,

    /// Seconds to wait, after the fleet is done, for the cloud emulator to receive every
    /// message (with --emulator-api, and in the demo).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub drain_secs: u64,
}

impl TelemetryArgs {
    /// The telemetry plan, with `default_messages` when `--messages` was not given; `None`
    /// when the phase is off.
    pub(crate) fn plan(&self, default_messages: u32) -> Option<TelemetryPlan> {
        let messages = self.messages.unwrap_or(default_messages);
        (messages > 0).then(|| TelemetryPlan {
            messages_per_device: messages,
            rate: self.message_rate,
            payload_bytes: self.payload_bytes,
            window: self.message_window,
            own_csr_devices: self.telemetry_own_csr,
            await_status: !self.telemetry_on_accepted,
            after_fleet: !self.telemetry_overlap,
            timeout: Duration::from_secs(self.telemetry_timeout),
        })
    }
}

/// How simulated devices attest (must match the gateway's `[admission] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttestationKind {
    /// `{"type":"none"}`: for `open` mode (or approval).
    None,
    /// SAS tokens from keys derived from `--group-key-file`.
    SymmetricKey,
    /// Certificates issued by `--x509-ca-cert`/`--x509-ca-key` plus a fresh signature.
    X509,
}

/// Arguments of `fleetgw simulate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The gateway's device broker: HOST:PORT, mqtt://HOST[:PORT] or mqtts://HOST[:PORT].
    #[arg(long, value_name = "ADDR")]
    pub broker: String,

    /// Number of devices.
    #[arg(long, value_name = "N")]
    pub devices: u32,

    /// Devices started per second (0 = as fast as --max-in-flight allows).
    #[arg(long, value_name = "R", default_value_t = 0.0)]
    pub rate: f64,

    /// Most devices between connect and verified answer at once.
    #[arg(long, value_name = "N", default_value_t = 500)]
    pub max_in_flight: usize,

    /// Share of devices (0..1) that send CBOR instead of JSON.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub cbor_share: f64,

    /// Share of devices (0..1) that send their own CSR instead of letting the gateway make
    /// the key.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub own_csr_share: f64,

    /// Key type of the devices' own CSRs: ecdsa-p256, ecdsa-p384, rsa-2048 or rsa-3072.
    #[arg(long, value_name = "TYPE", default_value = "ecdsa-p256")]
    pub csr_key_type: KeyType,

    /// Topic prefix of the gateway (`[downstream] topic_prefix`).
    #[arg(long, value_name = "PREFIX", default_value = "fleetgw")]
    pub prefix: String,

    /// Device ids are ID_PREFIX-RUN-N.
    #[arg(long, value_name = "ID_PREFIX", default_value = "sim")]
    pub id_prefix: String,

    /// Run label in the device ids (default: the current time in hex, so every run provisions
    /// new devices). Repeating a label re-requests the same devices (stored results come back;
    /// own-CSR devices have new keys then and fail the key check).
    #[arg(long, value_name = "LABEL")]
    pub run: Option<String>,

    /// The cloud's CA certificate (PEM): every issued certificate must chain to it (with
    /// `--cloud azure` and X.509, the enrollment group's CA).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// The cloud behind the gateway: `aws` answers carry a certificate and a thing name;
    /// `azure` answers name the assigned hub with status `assigned`, and a certificate only
    /// with X.509 attestation.
    #[arg(long, value_enum, value_name = "CLOUD", default_value = "aws")]
    pub cloud: SimCloud,

    /// CA certificate of the broker's TLS certificate (implies TLS).
    #[arg(long, value_name = "FILE")]
    pub broker_ca: Option<PathBuf>,

    /// MQTT username; `{id}` is replaced by the device id.
    #[arg(long, value_name = "USER")]
    pub username: Option<String>,

    /// File holding the MQTT password (trailing newline ignored); `{id}` in it is replaced by
    /// the device id.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// How devices attest: none, symmetric-key or x509.
    #[arg(long, value_enum, value_name = "KIND", default_value = "none")]
    pub attestation: AttestationKind,

    /// symmetric-key: file with the base64 group key (the gateway's `admission.group_key`).
    #[arg(long, value_name = "FILE")]
    pub group_key_file: Option<PathBuf>,

    /// symmetric-key: the ID scope in the tokens' resource URI.
    #[arg(long, value_name = "SCOPE", default_value = "fleetgw")]
    pub id_scope: String,

    /// x509: CA certificate that issues the devices' attestation certificates (the gateway's
    /// `admission.trusted_ca` must contain it).
    #[arg(long, value_name = "FILE")]
    pub x509_ca_cert: Option<PathBuf>,

    /// x509: that CA's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub x509_ca_key: Option<PathBuf>,

    /// RegisterThing parameter sent by every device (repeatable), e.g. `--param Site=north`.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub parameters: Vec<String>,

    /// Write the summary as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Also subscribe to each device's retained status topic, so timeouts report the
    /// gateway's last status (e.g. waitingApproval); adds broker work with many devices.
    #[arg(long)]
    pub watch_status: bool,

    /// Seconds without an answer after which a device sends its request again (0 = never).
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    pub resend_secs: u64,

    /// Seconds each device may take from its first connect to the verified answer.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    /// The cloud emulator's HTTP API (`http://HOST:PORT`, `fleetgw emulate aws --api`): after
    /// the telemetry phase, check that it received every message in per-device order.
    #[arg(long, value_name = "URL")]
    pub emulator_api: Option<String>,
}

/// Runs `fleetgw simulate`.
pub fn run(args: Args) -> ExitCode {
    let opts = match fleet_options(&args) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("fleetgw simulate: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetgw simulate: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let report = runtime.block_on(async {
        let progress = FleetProgress::new(&opts);
        let run = sim::run_fleet(opts, |event| progress.on_event(&event));
        tokio::select! {
            report = run => { progress.finish(); Some(report) }
            _ = tokio::signal::ctrl_c() => { progress.abandon(); None }
        }
    });
    let report = match report {
        None => {
            eprintln!("fleetgw simulate: interrupted");
            return ExitCode::from(130);
        }
        Some(Err(e)) => {
            eprintln!("fleetgw simulate: {e}");
            return ExitCode::from(EX_USAGE);
        }
        Some(Ok(report)) => report,
    };
    let check = match (&report.telemetry, &args.emulator_api) {
        (Some(telemetry), Some(api)) => {
            let within = Duration::from_secs(args.telemetry.drain_secs);
            match runtime.block_on(sim::wait_for_delivery(api, telemetry, within)) {
                Ok(check) => Some(check),
                Err(e) => {
                    eprintln!("fleetgw simulate: --emulator-api: {e}");
                    return ExitCode::from(EX_SOFTWARE);
                }
            }
        }
        _ => None,
    };
    let extra = report
        .telemetry
        .as_ref()
        .map(|t| telemetry_rows(t, check.as_ref()))
        .unwrap_or_default();
    println!("{}", summary_table(&report, &extra));
    print_failures(&report);
    let telemetry_ok = report
        .telemetry
        .as_ref()
        .is_none_or(|t| telemetry_ok(t, check.as_ref()));
    if let Some(path) = &args.json {
        let mut json = report.to_json();
        if let (Some(t), serde_json::Value::Object(map)) = (&report.telemetry, &mut json) {
            map.extend(telemetry_json(t, check.as_ref()));
        }
        if let Err(e) = write_json(path, &json) {
            eprintln!("fleetgw simulate: {e}");
            return ExitCode::from(EX_IOERR);
        }
    }
    if report.all_provisioned() && telemetry_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Every device got every PUBACK and, when checked, the cloud has every message in order;
/// prints what is wrong otherwise.
pub(crate) fn telemetry_ok(report: &TelemetryReport, check: Option<&TelemetryCheck>) -> bool {
    let mut ok = true;
    for device in report.incomplete().take(FAILURES_SHOWN) {
        ok = false;
        eprintln!(
            "telemetry: {}: {} of {} messages acknowledged: {}",
            device.id,
            device.acked,
            device.published,
            device
                .error
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        );
    }
    if report.incomplete().next().is_some() {
        ok = false;
    }
    if let Some(check) = check {
        for (device, c) in check.incomplete.iter().take(FAILURES_SHOWN) {
            eprintln!(
                "telemetry: {device}: {} lost (first {:?}), {} out of order, {} unexpected",
                c.lost, c.lost_seqs, c.out_of_order, c.unexpected
            );
        }
        ok &= check.is_clean();
    }
    ok
}

/// Summary rows of the telemetry phase; the cloud-side figures need the check.
pub(crate) fn telemetry_rows(
    report: &TelemetryReport,
    check: Option<&TelemetryCheck>,
) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        (
            "telemetry messages",
            format!(
                "{} ({} devices x {})",
                report.published, report.devices, report.messages_per_device
            ),
        ),
        ("telemetry acked by the gateway", report.acked.to_string()),
        ("telemetry reconnects", report.reconnects.to_string()),
    ];
    match check {
        Some(c) => {
            let latency = c.latency();
            rows.extend([
                ("messages/s", format!("{:.0}", c.messages_per_second())),
                (
                    "device-to-cloud p50 / p99",
                    format!("{:.1} ms / {:.1} ms", latency.p50_ms, latency.p99_ms),
                ),
                ("lost", c.lost.to_string()),
                ("duplicates", c.duplicates.to_string()),
                ("out of order", c.out_of_order.to_string()),
            ]);
        }
        None => rows.push((
            "messages/s (acked)",
            format!("{:.0}", report.acked_per_second()),
        )),
    }
    rows
}

/// The telemetry keys of the `--json` summaries: `"messages"`, `"messagesAcked"`,
/// `"telemetryDevices"`, `"telemetryReconnects"` and, with the cloud-side check, `"messagesPerSecond"`,
/// `"telemetryP50Ms"`, `"telemetryP99Ms"`, `"lost"`, `"duplicates"`, `"outOfOrder"`,
/// `"telemetryLatency"`.
pub(crate) fn telemetry_json(
    report: &TelemetryReport,
    check: Option<&TelemetryCheck>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        map.insert(k.to_string(), v);
    };
    put("messages", report.published.into());
    put("messagesAcked", report.acked.into());
    put("telemetryDevices", report.devices.into());
    put("telemetryReconnects", report.reconnects.into());
    match check {
        Some(c) => {
            let latency = c.latency();
            put("messagesPerSecond", c.messages_per_second().into());
            put("telemetryP50Ms", latency.p50_ms.into());
            put("telemetryP99Ms", latency.p99_ms.into());
            put("lost", c.lost.into());
            put("duplicates", c.duplicates.into());
            put("outOfOrder", c.out_of_order.into());
            put("telemetryLatency", serde_json::json!(latency));
        }
        None => put("messagesPerSecond", report.acked_per_second().into()),
    }
    map
}

/// A command-line problem, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
enum ArgsError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ArgsError {
    fn exit_code(&self) -> u8 {
        match self {
            ArgsError::Usage(_) => EX_USAGE,
            ArgsError::Read { .. } => EX_IOERR,
        }
    }
}

fn read_text(path: &Path) -> Result<String, ArgsError> {
    std::fs::read_to_string(path).map_err(|source| ArgsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn fleet_options(args: &Args) -> Result<FleetOptions, ArgsError> {
    let broker = parse_broker(&args.broker).map_err(ArgsError::Usage)?;
    let mut opts = FleetOptions::new(broker.host, broker.port, args.devices);
    opts.broker_ca_pem = args.broker_ca.as_deref().map(read_text).transpose()?;
    if broker.tls && opts.broker_ca_pem.is_none() {
        return Err(ArgsError::Usage(format!(
            "--broker {}: TLS needs --broker-ca FILE (the CA of the broker's certificate)",
            args.broker
        )));
    }
    opts.username = args.username.clone();
    if let Some(path) = &args.password_file {
        if opts.username.is_none() {
            return Err(ArgsError::Usage(
                "--password-file needs --username (MQTT sends no password without a username)"
                    .into(),
            ));
        }
        let text = read_text(path)?;
        opts.password = Some(Secret::from(
            text.trim_end_matches(['\r', '\n']).to_string(),
        ));
    }
    opts.topic_prefix = args.prefix.clone();
    opts.id_prefix = args.id_prefix.clone();
    if let Some(run) = &args.run {
        opts.run = run.clone();
    }
    opts.rate = args.rate;
    opts.max_in_flight = args.max_in_flight;
    opts.cbor_share = args.cbor_share;
    opts.own_csr_share = args.own_csr_share;
    opts.csr_key_type = args.csr_key_type;
    opts.cloud_ca_pem = args.ca.as_deref().map(read_text).transpose()?;
    opts.cloud = args.cloud;
    opts.timeout = Duration::from_secs(args.timeout);
    opts.resend_after = (args.resend_secs > 0).then(|| Duration::from_secs(args.resend_secs));
    opts.watch_status = args.watch_status;
    opts.parameters = parse_parameters(&args.parameters).map_err(ArgsError::Usage)?;
    opts.attestation = attestation(args)?;
    opts.telemetry = args.telemetry.plan(0);
    if args.emulator_api.is_some() && opts.telemetry.is_none() {
        return Err(ArgsError::Usage(
            "--emulator-api checks telemetry: it needs --messages N (N > 0)".into(),
        ));
    }
    if let Some(api) = &args.emulator_api {
        if !api.starts_with("http://") {
            return Err(ArgsError::Usage(format!(
                "--emulator-api {api:?}: expected http://HOST:PORT"
            )));
        }
    }
    Ok(opts)
}

fn attestation(args: &Args) -> Result<SimAttestation, ArgsError> {
    match args.attestation {
        AttestationKind::None => Ok(SimAttestation::None),
        AttestationKind::SymmetricKey => {
            let path = args.group_key_file.as_deref().ok_or_else(|| {
                ArgsError::Usage("--attestation symmetric-key needs --group-key-file FILE".into())
            })?;
            let text = Secret::from(read_text(path)?);
            let group_key = admission::decode_group_key(&text, &path.display().to_string())
                .map_err(|e| ArgsError::Usage(e.to_string()))?;
            Ok(SimAttestation::SymmetricKey {
                group_key,
                id_scope: args.id_scope.clone(),
            })
        }
        AttestationKind::X509 => {
            let (Some(cert), Some(key)) = (&args.x509_ca_cert, &args.x509_ca_key) else {
                return Err(ArgsError::Usage(
                    "--attestation x509 needs --x509-ca-cert FILE and --x509-ca-key FILE".into(),
                ));
            };
            let ca = CertificateAuthority::from_pem(&read_text(cert)?, &read_text(key)?).map_err(
                |e| {
                    ArgsError::Usage(format!(
                        "--x509-ca-cert {} / --x509-ca-key {}: {e}",
                        cert.display(),
                        key.display()
                    ))
                },
            )?;
            Ok(SimAttestation::X509 { ca: Arc::new(ca) })
        }
    }
}

fn parse_parameters(raw: &[String]) -> Result<BTreeMap<String, String>, String> {
    raw.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("--param {kv:?}: expected KEY=VALUE")),
        })
        .collect()
}

/// `HOST:PORT` or a broker URL (`mqtt://HOST[:PORT]`, `mqtts://HOST[:PORT]`, IPv6 in
/// brackets), parsed the way the gateway parses `[downstream] url`.
fn parse_broker(raw: &str) -> Result<BrokerUrl, String> {
    let url = if raw.contains("://") {
        raw.to_string()
    } else {
        // Without a scheme the port is required: 1883 vs 8883 would be a guess.
        let has_port = raw.rsplit_once(':').is_some_and(|(host, port)| {
            !port.is_empty() && (!host.contains(':') || host.ends_with(']'))
        });
        if !has_port {
            return Err(format!(
                "--broker {raw:?}: expected HOST:PORT or mqtt[s]://HOST[:PORT]"
            ));
        }
        format!("mqtt://{raw}")
    };
    let parsed = parse_broker_url(&url).map_err(|e| format!("--broker {raw:?}: {e}"))?;
    if parsed.port == 0 {
        return Err(format!("--broker {raw:?}: port 0 is not a broker port"));
    }
    Ok(parsed)
}

/// Progress bars on stderr (hidden when stderr is not a terminal): devices provisioned, with
/// the failures counted in its message, and with a telemetry phase the messages acknowledged.
pub(crate) struct FleetProgress {
    bar: ProgressBar,
    failed: Cell<u64>,
    telemetry: Option<TelemetryProgress>,
}

struct TelemetryProgress {
    bar: ProgressBar,
    per_device: u64,
    /// Devices that will publish once provisioned (a failed one shortens the bar).
    publishers: HashSet<u32>,
    incomplete: Cell<u64>,
}

impl FleetProgress {
    /// Bars for the fleet of `opts`, ticking while nothing finishes.
    pub(crate) fn new(opts: &FleetOptions) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let bar = multi.add(ProgressBar::new(u64::from(opts.devices)));
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} provisioning [{bar:40}] {pos}/{len} devices  {per_sec}  {elapsed}  {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        let telemetry = opts.telemetry.as_ref().map(|t| {
            let publishers: HashSet<u32> = (1..=opts.devices)
                .filter(|&n| opts.plan(n).is_ok_and(|plan| t.publishes(&plan)))
                .collect();
            let per_device = u64::from(t.messages_per_device);
            let bar = multi.add(ProgressBar::new(publishers.len() as u64 * per_device));
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} telemetry    [{bar:40}] {pos}/{len} messages {per_sec}  {elapsed}  {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            TelemetryProgress {
                bar,
                per_device,
                publishers,
                incomplete: Cell::new(0),
            }
        });
        Self {
            bar,
            failed: Cell::new(0),
            telemetry,
        }
    }

    /// Advances the bars by one device event.
    pub(crate) fn on_event(&self, event: &FleetEvent) {
        match event {
            FleetEvent::Provisioned { .. } => self.bar.inc(1),
            FleetEvent::Failed(failure) => {
                self.failed.set(self.failed.get() + 1);
                self.bar
                    .set_message(format!("{} failed", self.failed.get()));
                tracing::debug!(device = %failure.id, reason = %failure.reason, "simulated device failed");
                self.bar.inc(1);
                if let Some(t) = &self.telemetry {
                    if t.publishers.contains(&failure.n) {
                        let len = t.bar.length().unwrap_or(0);
                        t.bar.set_length(len.saturating_sub(t.per_device));
                    }
                }
            }
            FleetEvent::Telemetry(device) => {
                if let Some(t) = &self.telemetry {
                    t.bar.inc(device.acked);
                    if let Some(reason) = &device.error {
                        t.incomplete.set(t.incomplete.get() + 1);
                        t.bar
                            .set_message(format!("{} devices incomplete", t.incomplete.get()));
                        let len = t.bar.length().unwrap_or(0);
                        t.bar.set_length(
                            len.saturating_sub(t.per_device - device.acked.min(t.per_device)),
                        );
                        tracing::debug!(device = %device.id, %reason, "simulated device telemetry incomplete");
                    }
                }
            }
        }
    }

    /// Removes the bars (the summary follows).
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
        if let Some(t) = &self.telemetry {
            t.bar.finish_and_clear();
        }
    }

    /// Leaves the bars as they are (interrupted).
    pub(crate) fn abandon(&self) {
        self.bar.abandon();
        if let Some(t) = &self.telemetry {
            t.bar.abandon();
        }
    }
}

/// The summary table; `extra` rows are appended (the demo adds the emulator's thing count).
pub(crate) fn summary_table(report: &FleetReport, extra: &[(&str, String)]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(vec!["metric", "value"]);
    let ms = |v: f64| format!("{v:.1} ms");
    let rows: Vec<(&str, String)> = vec![
        ("devices", report.devices.to_string()),
        ("provisioned", report.provisioned.to_string()),
        ("failed", report.failed.to_string()),
        (
            "wall time",
            format!("{:.2} s", report.elapsed.as_secs_f64()),
        ),
        ("devices/s", format!("{:.0}", report.devices_per_second())),
        ("latency p50", ms(report.latency.p50_ms)),
        ("latency p90", ms(report.latency.p90_ms)),
        ("latency p99", ms(report.latency.p99_ms)),
        ("latency max", ms(report.latency.max_ms)),
        (
            "connect p50 / p99",
            format!(
                "{} / {}",
                ms(report.connect.p50_ms),
                ms(report.connect.p99_ms)
            ),
        ),
        (
            "json / cbor / own CSR",
            format!(
                "{} / {} / {}",
                report.json_devices, report.cbor_devices, report.own_csr_devices
            ),
        ),
        (
            "reconnects / resent requests",
            format!("{} / {}", report.reconnects, report.resent_requests),
        ),
    ];
    for (name, value) in rows.into_iter().chain(extra.iter().cloned()) {
        table.add_row(vec![name.to_string(), value]);
    }
    if let Some(column) = table.column_mut(1) {
        column.set_cell_alignment(CellAlignment::Right);
    }
    table
}

/// Lists the first failures on stderr.
pub(crate) fn print_failures(report: &FleetReport) {
    if report.failures.is_empty() {
        return;
    }
    eprintln!("first failures:");
    for failure in report.failures.iter().take(FAILURES_SHOWN) {
        eprintln!("  {failure}");
    }
    if report.failures.len() > FAILURES_SHOWN {
        eprintln!(
            "  ... and {} more (all of them with --json FILE)",
            report.failures.len() - FAILURES_SHOWN
        );
    }
}

/// Writes `value` as pretty JSON to `path`.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), String> {
    let mut bytes =
        serde_json::to_vec_pretty(value).map_err(|e| format!("{}: {e}", path.display()))?;
    bytes.push(b'\n');
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_in_every_accepted_form() {
        let cases = [
            ("127.0.0.1:1883", "127.0.0.1", 1883, false),
            ("mqtt://localhost", "localhost", 1883, false),
            ("mqtts://gw.local:8884/", "gw.local", 8884, true),
            ("ssl://gw.local", "gw.local", 8883, true),
            ("[::1]:1884", "::1", 1884, false),
            ("mqtt://[::1]", "::1", 1883, false),
        ];
        for (raw, host, port, tls) in cases {
            let b = parse_broker(raw).unwrap();
            assert_eq!((b.host.as_str(), b.port, b.tls), (host, port, tls), "{raw}");
        }
        for raw in [
            "localhost",
            "http://x:1",
            "x:0",
            "x:99999",
            ":1883",
            "mqtt://a/b",
        ] {
            let err = parse_broker(raw)
                .err()
                .unwrap_or_else(|| panic!("{raw} accepted"));
            assert!(err.contains(raw), "{err}");
        }
    }

    #[test]
    fn parameters_are_key_value_pairs() {
        let p = parse_parameters(&["Site=north".into(), "Empty=".into()]).unwrap();
        assert_eq!(p.get("Site").map(String::as_str), Some("north"));
        assert_eq!(p.get("Empty").map(String::as_str), Some(""));
        assert!(parse_parameters(&["=x".into()])
            .unwrap_err()
            .contains("KEY=VALUE"));
        assert!(parse_parameters(&["nokey".into()]).is_err());
    }
}
