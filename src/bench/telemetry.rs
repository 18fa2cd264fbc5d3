//! `fleetgw bench telemetry`: device-to-cloud messages through fleetgw (embedded broker,
//! durable outbox, upstream links) and through the mosquitto bridge users run instead, in one
//! run against one emulator.
//!
//! A run is made of timed phases ([`run_load`]): every device connects, and once all are
//! connected each publishes sequence-numbered QoS 1
//! messages (at most `window` unacknowledged) for T seconds, unpaced or paced at a total rate
//! split evenly over the devices; then the emulator's log is read and every device's messages
//! are checked for loss, duplicates and order, with the device-to-cloud latency of each
//! (`sim::arrival`). Rates run from the first send to the last arrival at the emulator.
//! Each phase uses its own range of sequence numbers, so phases on the same devices never mix.
//!
//! Order: the bridge first (unpaced: its no-loss rate with unlimited queues; then paced at half
//! of it), stopped before the daemon starts since both use the emulator's gateway identity;
//! then fleetgw: devices are provisioned through the daemon and send one warm-up message each
//! (so upstream connections are open when timing starts, as the bridge's is), then the unpaced
//! phase and the phase paced at half the bridge's no-loss rate.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::processes::{mosquitto_binary, Bridge, Daemon, Emulator};
use super::publisher::{micros_histogram, publish_sequence, Sequence, StartGate};
use super::{BenchError, Machine, Observer, Rig, Series};
use crate::clock;
use crate::sim::arrival::{self, fetch_arrivals_by, GroupBy, TelemetryCheck};
use crate::sim::{self, FleetEvent, FleetOptions, FleetReport, TelemetryPlan};
use crate::telemetry::delay::DelaySnapshot;

/// Payload size of the benchmark messages.
pub const PAYLOAD_BYTES: usize = 200;
/// Most unacknowledged messages per device (as a careful device, and the fleet simulator).
pub const WINDOW: u16 = 10;
/// Sequence numbers of phase k start at k x this.
const PHASE_SEQ: u64 = 1_000_000_000;
/// How long the emulator may take to receive what was acknowledged.
const DRAIN: Duration = Duration::from_secs(120);
/// The device broker's topic prefix (the emulator-written config's default).
pub const PREFIX: &str = "fleetgw";
/// Messages the emulator keeps for `GET /messages`.
pub const EMULATOR_MAX_MESSAGES: usize = 2_000_000;

/// The emulator's arguments for the telemetry runs (`telemetry`, `scale`): it keeps
/// [`EMULATOR_MAX_MESSAGES`].
pub fn telemetry_emulator_args() -> Vec<String> {
    vec!["--max-messages".into(), EMULATOR_MAX_MESSAGES.to_string()]
}

/// Whose identity carries telemetry upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// One upstream connection per device, with its own certificate.
    Device,
    /// One connection with the gateway's certificate.
    Gateway,
}

impl Identity {
    /// The config value of `telemetry.identity`.
    pub fn as_str(self) -> &'static str {
        match self {
            Identity::Device => "device",
            Identity::Gateway => "gateway",
        }
    }
}

/// One publishing device: who it is downstream and where its messages land upstream.
#[derive(Clone, Debug)]
pub struct Publisher {
    /// MQTT client id at the local broker.
    pub client_id: String,
    /// Topic it publishes on.
    pub topic: String,
    /// Topic its messages arrive on at the emulator.
    pub upstream_topic: String,
}

/// What a phase is to do.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Total offered msg/s, split evenly over the devices; 0 = unpaced.
    pub rate: f64,
    /// How long devices publish.
    pub seconds: f64,
    /// Phase number (its sequence number range).
    pub phase: u64,
}

/// The figures of one phase.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseFigures {
    /// Offered msg/s: the pace, or for an unpaced phase what the devices got out.
    pub offered_per_second: f64,
    /// Distinct messages delivered per second (first send to last arrival).
    pub messages_per_second: f64,
    /// Messages the local broker acknowledged.
    pub messages_acked: u64,
    /// Device-to-cloud latency, median.
    pub p50_ms: f64,
    /// ... 99th percentile.
    pub p99_ms: f64,
    /// ... largest.
    pub max_ms: f64,
    /// Sent messages that never arrived.
    pub lost: u64,
    /// Repeated arrivals.
    pub duplicates: u64,
    /// Arrivals after a higher sequence number of the same device.
    pub out_of_order: u64,
    /// How late the slowest paced device fell behind its schedule, ms.
    pub publisher_late_ms: f64,
    /// 99th percentile of a message's wait at its device for a free slot in the device's
    /// window (from being made to being written), ms: the part of the latency spent waiting
    /// for PUBACKs of earlier messages.
    pub queued_p99_ms: f64,
    /// Median time from a PUBLISH written to its PUBACK from the local broker, ms.
    pub puback_p50_ms: f64,
    /// ... 99th percentile.
    pub puback_p99_ms: f64,
    /// fleetgw only: how long the phase's messages spent in the daemon, from its broker's read
    /// to the upstream write (its `fleetgw_telemetry_forward_delay_seconds`, counted during
    /// the phase).
    #[serde(skip)]
    pub in_gateway: Option<DelaySnapshot>,
    /// How long the devices took to connect before the phase started (not part of it).
    pub connect_seconds: f64,
    /// Per second: messages arrived and their p99 latency.
    #[serde(skip)]
    pub series: Series,
}

/// Runs one phase on `publishers` against the broker at 127.0.0.1:`port` and judges it at
/// the emulator.
pub async fn run_load(
    emu: &Emulator,
    port: u16,
    publishers: &[Publisher],
    load: Load,
    label: &str,
    observer: &dyn Observer,
) -> Result<PhaseFigures, BenchError> {
    let before = emu.messages().await?;
    let n = publishers.len().max(1);
    let first = load.phase * PHASE_SEQ;
    // Every device connects first; the phase starts once all are connected.
    let base = Instant::now();
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::unbounded_channel();
    let (open_tx, open_rx) = tokio::sync::watch::channel(None);
    let until = base + Duration::from_secs_f64(load.seconds);
    let every = (load.rate > 0.0).then(|| Duration::from_secs_f64(n as f64 / load.rate));
    let mut tasks = Vec::with_capacity(publishers.len());
    for (i, p) in publishers.iter().enumerate() {
        let mut seq = Sequence::new(
            p.client_id.clone(),
            p.topic.clone(),
            first..first + PHASE_SEQ,
            DRAIN,
        );
        seq.window = WINDOW;
        seq.keep_alive = Duration::from_secs(60);
        seq.until = Some(until);
        seq.linger = false;
        // Paced devices start staggered over one interval: a smooth load, not bursts.
        seq.pace = every.map(|e| (base + e.mul_f64(i as f64 / n as f64), e));
        seq.gate = Some(StartGate {
            base,
            connected: connected_tx.clone(),
            open: open_rx.clone(),
        });
        tasks.push(tokio::spawn(publish_sequence(port, seq, move |s| {
            arrival::payload(s, clock::unix_us(), PAYLOAD_BYTES)
        })));
    }
    drop(connected_tx);
    observer.phase(&format!("{label}: connecting"), n as u64);
    let mut up = 0u64;
    let deadline = Instant::now() + DRAIN;
    while up < n as u64 {
        match tokio::time::timeout_at(deadline, connected_rx.recv()).await {
            Ok(Some(())) => {
                up += 1;
                observer.position(up);
            }
            // A publisher that ended before its CONNACK says why below.
            Ok(None) | Err(_) => break,
        }
        if up % 64 == 0 && tasks.iter().any(|t| t.is_finished()) {
            break;
        }
    }
    let connect_seconds = base.elapsed().as_secs_f64();
    let started = Instant::now();
    let start_us = clock::unix_us();
    let _ = open_tx.send(Some(started));
    observer.phase(label, load.seconds.ceil() as u64);
    let mut sent = Vec::with_capacity(tasks.len());
    let mut late = Duration::ZERO;
    let (mut queued, mut puback) = (micros_histogram(), micros_histogram());
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    for t in tasks {
        let mut t = t;
        let published = loop {
            tokio::select! {
                r = &mut t => break r,
                _ = ticker.tick() => observer.position(started.elapsed().as_secs().min(load.seconds as u64)),
            }
        };
        let published = published.map_err(|e| BenchError::Start {
            what: "publisher".into(),
            reason: e.to_string(),
        })??;
        late = late.max(published.late);
        sent.push(published.sent);
        // Same bounds on both sides, so adding cannot fail.
        let _ = queued.add(&published.queued_us);
        let _ = puback.add(&published.puback_us);
    }
    let total: u64 = sent.iter().sum();
    // The local broker acknowledged everything; now wait until the cloud has it all (what
    // is still missing after DRAIN is counted lost below).
    emu.wait_for_messages(before + total, DRAIN).await?;
    let arrivals =
        fetch_arrivals_by(&emu.api, Duration::from_secs(60), before, GroupBy::Topic).await?;
    let mut check = TelemetryCheck::new();
    let mut samples = Vec::new();
    let empty = Vec::new();
    for (p, &count) in publishers.iter().zip(&sent) {
        let range = first..first + count;
        let mine: Vec<_> = arrivals
            .get(&p.upstream_topic)
            .unwrap_or(&empty)
            .iter()
            .filter(|a| a.seq >= first && a.seq < first + PHASE_SEQ)
            .copied()
            .collect();
        for a in &mine {
            if let Some(sent_us) = a.sent_us {
                let t = a.received_us.saturating_sub(start_us) as f64 / 1e6;
                samples.push((t, us_to_ms(a.received_us.saturating_sub(sent_us))));
            }
        }
        check.add_device(&p.client_id, &mine, range);
    }
    let latency = check.latency();
    let offered = if load.rate > 0.0 {
        load.rate
    } else {
        total as f64 / load.seconds.max(0.001)
    };
    Ok(PhaseFigures {
        offered_per_second: offered,
        messages_per_second: check.messages_per_second(),
        messages_acked: total,
        p50_ms: latency.p50_ms,
        p99_ms: latency.p99_ms,
        max_ms: latency.max_ms,
        lost: check.lost,
        duplicates: check.duplicates,
        out_of_order: check.out_of_order,
        publisher_late_ms: late.as_secs_f64() * 1000.0,
        queued_p99_ms: us_to_ms(queued.value_at_quantile(0.99)),
        puback_p50_ms: us_to_ms(puback.value_at_quantile(0.50)),
        puback_p99_ms: us_to_ms(puback.value_at_quantile(0.99)),
        in_gateway: None,
        connect_seconds,
        series: Series::from_samples(label, samples),
    })
}

impl PhaseFigures {
    /// Upper bound of the daemon's forward-delay bucket holding quantile `q`, ms (fleetgw
    /// phases that forwarded something; `None` above the largest bucket too).
    pub fn in_gateway_ms(&self, q: f64) -> Option<f64> {
        self.in_gateway.as_ref()?.quantile_bound_us(q).map(us_to_ms)
    }
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Provisions `devices` devices through `daemon` (gateway-made keys, so the daemon can forward
/// as each device; the devices trust `emu`'s CA) and has each send one warm-up message; returns
/// the fleet report and the devices as publishers (their upstream topic carries the thing
/// name).
pub async fn provision_publishers(
    daemon: &Daemon,
    emu: &Emulator,
    devices: u32,
    run: &str,
    observer: &dyn Observer,
) -> Result<(FleetReport, Vec<Publisher>), BenchError> {
    let mut opts = FleetOptions::new("127.0.0.1", daemon.broker.port(), devices);
    opts.run = run.to_string();
    opts.id_prefix = "bench".into();
    opts.cloud_ca_pem = Some(read(&emu.dir.join("ca.pem"))?);
    opts.timeout = Duration::from_secs(600);
    opts.telemetry = Some(TelemetryPlan {
        messages_per_device: 1,
        rate: 0.0,
        payload_bytes: PAYLOAD_BYTES,
        window: WINDOW,
        own_csr_devices: false,
        await_status: true,
        after_fleet: true,
        timeout: Duration::from_secs(600),
    });
    observer.phase("provisioning + warm-up", u64::from(devices));
    let before = emu.messages().await?;
    let done = std::cell::Cell::new(0u64);
    let report = sim::run_fleet(opts, |e| {
        if matches!(e, FleetEvent::Provisioned { .. } | FleetEvent::Failed(_)) {
            done.set(done.get() + 1);
            observer.position(done.get());
        }
    })
    .await?;
    require_all(&report)?;
    let t = report.telemetry.as_ref();
    let publishers = t
        .map(|t| t.per_device.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|d| Publisher {
            client_id: d.id.as_str().to_string(),
            topic: format!("{PREFIX}/{}/telemetry", d.id.as_str()),
            upstream_topic: format!("dt/{}/telemetry", d.thing_name),
        })
        .collect::<Vec<_>>();
    if let Some(bad) = t.and_then(|t| t.incomplete().next()) {
        return Err(BenchError::Start {
            what: "warm-up".into(),
            reason: format!(
                "device {} did not get its warm-up message acknowledged",
                bad.id
            ),
        });
    }
    // The warm-up messages must be at the cloud before a phase counts its arrivals there: one
    // still on its way would stand in for a phase message that has not arrived yet.
    if !emu
        .wait_for_messages(before + u64::from(devices), DRAIN)
        .await?
    {
        return Err(BenchError::Start {
            what: "warm-up".into(),
            reason: format!("the warm-up messages did not all reach the cloud within {DRAIN:?}"),
        });
    }
    Ok((report, publishers))
}

/// An error unless every device of `report` was provisioned.
pub fn require_all(report: &FleetReport) -> Result<(), BenchError> {
    if report.all_provisioned() {
        return Ok(());
    }
    Err(BenchError::Provisioning {
        failed: report.failed,
        devices: report.devices,
        first: report
            .failures
            .first()
            .map(|f| format!("{}: {}", f.id, f.reason))
            .unwrap_or_default(),
    })
}

/// Waits until the emulator has more than `before` connections open (the bridge connected).
pub async fn wait_connected(
    emu: &Emulator,
    before: u64,
    bridge: &mut Bridge,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        bridge.process.check_running()?;
        if emu.stats().await?["connections"]["open"]
            .as_u64()
            .unwrap_or(0)
            > before
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Baseline {
                what: "mosquitto bridge",
                reason: format!(
                    "not connected to the emulator within 30 s; log:\n{}",
                    bridge.process.log_tail()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Options of `fleetgw bench telemetry`.
#[derive(Clone, Debug)]
pub struct TelemetryOptions {
    /// Publishing devices.
    pub devices: u32,
    /// Seconds each phase publishes.
    pub seconds: f64,
    /// Total offered msg/s of the top-level phase (0 = unpaced).
    pub rate: f64,
    /// Upstream identity of fleetgw.
    pub identity: Identity,
    /// Run the mosquitto bridge baseline.
    pub baselines: bool,
    /// Keep the work directory.
    pub keep: bool,
}

/// The bridge's figures.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeFigures {
    /// Unpaced, unlimited queues.
    pub unpaced: PhaseFigures,
    /// Paced at half of its no-loss rate.
    pub half_rate: PhaseFigures,
}

/// The result of `fleetgw bench telemetry`.
#[derive(Clone, Debug)]
pub struct TelemetryResult {
    /// The options.
    pub identity: Identity,
    /// Devices.
    pub devices: u32,
    /// fleetgw, the top-level phase (unpaced unless `--rate`).
    pub top: PhaseFigures,
    /// fleetgw paced at half the bridge's no-loss rate (or half its own without the bridge).
    pub half_rate: PhaseFigures,
    /// The bridge (`None` without mosquitto or with baselines off), or why it did not run.
    pub bridge: Result<BridgeFigures, String>,
    /// Daemon peak RSS, MB.
    pub daemon_peak_rss_mb: f64,
    /// The machine.
    pub machine: Machine,
}

/// Runs `fleetgw bench telemetry`.
pub async fn run(
    opts: &TelemetryOptions,
    observer: &dyn Observer,
) -> Result<TelemetryResult, BenchError> {
    if opts.devices == 0
        || !super::positive(opts.seconds)
        || !(opts.rate == 0.0 || super::positive(opts.rate))
    {
        return Err(BenchError::Usage {
            option: "--devices/--seconds/--rate",
            reason: "need at least 1 device, seconds > 0 and rate >= 0".into(),
        });
    }
    let Rig {
        mut machine,
        work,
        emu,
    } = Rig::start(opts.keep, &telemetry_emulator_args()).await?;
    let bridge = if !opts.baselines {
        Err("baselines off (--no-baselines)".to_string())
    } else if let Some(binary) = mosquitto_binary() {
        Ok(run_bridge(&emu, &binary, work.path(), opts, observer).await?)
    } else {
        Err("mosquitto not found in PATH or /usr/sbin (install the `mosquitto` package)".into())
    };
    let sets = vec![format!("telemetry.identity=\"{}\"", opts.identity.as_str())];
    let daemon = Daemon::start(&emu, &work.path().join("daemon"), &sets).await?;
    let (_, publishers) = provision_publishers(&daemon, &emu, opts.devices, "t", observer).await?;
    let before_top = daemon.forward_delay().await?;
    let port = daemon.broker.port();
    let top_load = Load {
        rate: opts.rate,
        seconds: opts.seconds,
        phase: 1,
    };
    let mut top = run_load(&emu, port, &publishers, top_load, "fleetgw", observer).await?;
    let after_top = daemon.forward_delay().await?;
    top.in_gateway = Some(after_top.since(&before_top));
    let half = match &bridge {
        Ok(b) => b.unpaced.messages_per_second / 2.0,
        Err(_) => top.messages_per_second / 2.0,
    }
    .max(1.0);
    let half_load = Load {
        rate: half,
        seconds: opts.seconds,
        phase: 2,
    };
    let mut half_rate = run_load(
        &emu,
        port,
        &publishers,
        half_load,
        "fleetgw half rate",
        observer,
    )
    .await?;
    half_rate.in_gateway = Some(daemon.forward_delay().await?.since(&after_top));
    let daemon_peak_rss_mb =
        super::procfs::kib_to_mb(super::procfs::peak_rss_kib(daemon.pid()).unwrap_or(0));
    daemon.stop().await;
    emu.process.stop(Duration::from_secs(10)).await;
    machine.finish();
    Ok(TelemetryResult {
        identity: opts.identity,
        devices: opts.devices,
        top,
        half_rate,
        bridge,
        daemon_peak_rss_mb,
        machine,
    })
}

async fn run_bridge(
    emu: &Emulator,
    binary: &Path,
    work: &Path,
    opts: &TelemetryOptions,
    observer: &dyn Observer,
) -> Result<BridgeFigures, BenchError> {
    let open_before = emu.stats().await?["connections"]["open"]
        .as_u64()
        .unwrap_or(0);
    let mut bridge = Bridge::start(binary, emu, &work.join("bridge"), PREFIX).await?;
    wait_connected(emu, open_before, &mut bridge).await?;
    // The bridge forwards topics unchanged under its one connection.
    let publishers: Vec<Publisher> = (1..=opts.devices)
        .map(|i| {
            let topic = format!("{PREFIX}/bridge-{i}/telemetry");
            Publisher {
                client_id: format!("bridge-{i}"),
                upstream_topic: topic.clone(),
                topic,
            }
        })
        .collect();
    let load = Load {
        rate: 0.0,
        seconds: opts.seconds,
        phase: 1,
    };
    let unpaced = run_load(emu, bridge.port, &publishers, load, "bridge", observer).await?;
    let half = Load {
        rate: (unpaced.messages_per_second / 2.0).max(1.0),
        seconds: opts.seconds,
        phase: 2,
    };
    let half_rate = run_load(
        emu,
        bridge.port,
        &publishers,
        half,
        "bridge half rate",
        observer,
    )
    .await?;
    bridge.process.stop(Duration::from_secs(10)).await;
    // Its connection must be gone before the daemon uses the same gateway identity.
    let deadline = Instant::now() + Duration::from_secs(10);
    while emu.stats().await?["connections"]["open"]
        .as_u64()
        .unwrap_or(0)
        > open_before
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(BridgeFigures { unpaced, half_rate })
}

/// Reads a text file.
pub(crate) fn read(path: &Path) -> Result<String, BenchError> {
    std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))
}

impl TelemetryResult {
    /// The `--json` document (field names as issue 22 gives them).
    pub fn to_json(&self) -> serde_json::Value {
        let half = |p: &PhaseFigures| {
            serde_json::json!({
                "offeredPerSecond": p.offered_per_second,
                "p50Ms": p.p50_ms,
                "p99Ms": p.p99_ms,
                "lost": p.lost,
                "windowWaitP99Ms": p.queued_p99_ms,
                "pubackP50Ms": p.puback_p50_ms,
                "pubackP99Ms": p.puback_p99_ms,
                "inGatewayP50Ms": p.in_gateway_ms(0.50),
                "inGatewayP99Ms": p.in_gateway_ms(0.99),
            })
        };
        let bridge = match &self.bridge {
            Ok(b) => serde_json::json!({
                "messagesPerSecond": b.unpaced.messages_per_second,
                "p50Ms": b.unpaced.p50_ms,
                "p99Ms": b.unpaced.p99_ms,
                "lost": b.unpaced.lost,
                "halfRate": half(&b.half_rate),
            }),
            Err(_) => serde_json::Value::Null,
        };
        let t = &self.top;
        serde_json::json!({
            "identity": self.identity,
            "devices": self.devices,
            "messagesPerSecond": t.messages_per_second,
            "offeredPerSecond": t.offered_per_second,
            "messagesAcked": t.messages_acked,
            "p50Ms": t.p50_ms,
            "p99Ms": t.p99_ms,
            "lost": t.lost,
            "duplicates": t.duplicates,
            "outOfOrder": t.out_of_order,
            "windowWaitP99Ms": t.queued_p99_ms,
            "pubackP50Ms": t.puback_p50_ms,
            "pubackP99Ms": t.puback_p99_ms,
            "inGatewayP50Ms": t.in_gateway_ms(0.50),
            "inGatewayP99Ms": t.in_gateway_ms(0.99),
            "halfRate": half(&self.half_rate),
            "baselines": { "mosquittoBridge": bridge },
            "baselineSkipped": self.bridge.as_ref().err(),
            "daemonPeakRssMb": self.daemon_peak_rss_mb,
            "machine": self.machine,
        })
    }

    /// The series for `--plot`.
    pub fn series(&self) -> Vec<Series> {
        let mut s = vec![self.top.series.clone(), self.half_rate.series.clone()];
        if let Ok(b) = &self.bridge {
            s.push(b.unpaced.series.clone());
            s.push(b.half_rate.series.clone());
        }
        s
    }
}
