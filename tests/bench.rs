//! `fleetgw bench`: a small run of each subcommand as a user would start it (the built binary,
//! which spawns the emulator and `fleetgw run` as separate processes), checking that `--json`
//! holds the fields of issue 22 with sane values, that `--plot` writes an SVG, and that
//! `benches/telemetry.sh` is valid shell that drives the command. No timing is asserted:
//! the figures are the benchmark's business, these tests check that it measures.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::process::{Fleetgw, FLEETGW};
use common::wait::{eventually, Lazy};

/// Upper bound for one small benchmark run (debug build, shared machine).
const RUN_LIMIT: Duration = Duration::from_secs(150);

/// Runs `fleetgw bench ARGS --json DIR/out.json --plot DIR/out.svg`; panics with its output if
/// it fails or outlives [`RUN_LIMIT`]; returns the JSON.
fn bench(dir: &Path, args: &[&str]) -> Value {
    let json = dir.join("out.json");
    let svg = dir.join("out.svg");
    let log = dir.join("bench.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(FLEETGW)
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "fleetgw bench {args:?} still running after {RUN_LIMIT:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "fleetgw bench {args:?}: {status}\n{output}"
    );
    assert!(
        output.contains("load average"),
        "no machine line:\n{output}"
    );
    let svg_text = std::fs::read_to_string(&svg).unwrap_or_default();
    assert!(
        svg_text.starts_with("<svg"),
        "no SVG plot written: {svg_text:.200}"
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

/// The number at `key`, which must be present, finite and >= 0.
fn num(v: &Value, key: &str) -> f64 {
    let n = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v}"));
    assert!(n.is_finite() && n >= 0.0, "{key} = {n} in {v}");
    n
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// The pinned interop venv scripts/interop builds, if it is there.
fn interop_venv() -> Option<PathBuf> {
    let target = Path::new(FLEETGW).parent()?.parent()?;
    let python = target.join("interop-venv/bin/python");
    python.is_file().then_some(python)
}

#[test]
fn provision_reports_the_issue_fields() {
    let dir = tempdir();
    // The SDK baseline needs the interop venv; without it the run skips the baseline and says so.
    let with_sdk = interop_venv().is_some();
    let mut args = vec!["provision", "--devices", "20", "--sessions", "4"];
    if with_sdk {
        args.extend(["--baseline-devices", "2", "--pool-devices", "4"]);
    } else {
        eprintln!("NOTICE: no target/interop-venv: the SDK baseline is not exercised");
        args.push("--no-baselines");
    }
    let v = bench(dir.path(), &args);
    assert_eq!(v["devices"], 20);
    assert_eq!(v["provisioned"], 20);
    assert_eq!(v["failed"], 0);
    assert!(num(&v, "seconds") > 0.0);
    assert!(num(&v, "devicesPerSecond") > 0.0);
    let (p50, p99, max) = (num(&v, "p50Ms"), num(&v, "p99Ms"), num(&v, "maxMs"));
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{v}");
    assert!(num(&v, "cpuMsPerDevice") > 0.0);
    assert!(num(&v, "peakRssMb") > 1.0);
    assert!(v.get("quotaShare").is_none(), "no quota, no share: {v}");
    let baselines = &v["baselines"];
    for b in ["sdkSequential", "sdkPool"] {
        if with_sdk {
            assert!(num(&baselines[b], "devicesPerSecond") > 0.0, "{b}: {v}");
        } else {
            assert!(baselines[b].is_null(), "{b}: {v}");
        }
    }
}

#[test]
fn provision_with_a_quota_reports_its_share() {
    let dir = tempdir();
    let args = [
        "provision",
        "--devices",
        "15",
        "--tps",
        "5",
        "--no-baselines",
    ];
    let v = bench(dir.path(), &args);
    assert_eq!(v["provisioned"], 15);
    // The quota admits 5 x (seconds + 1) devices: the run cannot beat it.
    let share = num(&v, "quotaShare");
    assert!(share > 0.0 && share <= 1.05, "quotaShare {share}: {v}");
    assert!(num(&v, "seconds") >= 1.5, "15 devices at 5 per second: {v}");
    num(&v, "throttled");
}

#[test]
fn telemetry_reports_fleetgw_and_the_bridge() {
    let dir = tempdir();
    let v = bench(
        dir.path(),
        &["telemetry", "--devices", "4", "--seconds", "1"],
    );
    assert_eq!(v["identity"], "device");
    assert!(num(&v, "messagesPerSecond") > 0.0);
    assert!(num(&v, "offeredPerSecond") > 0.0);
    assert!(num(&v, "messagesAcked") > 0.0);
    assert!(num(&v, "p50Ms") <= num(&v, "p99Ms"));
    for k in ["lost", "duplicates", "outOfOrder"] {
        assert_eq!(v[k], 0, "{k}: {v}");
    }
    let half = &v["halfRate"];
    assert!(num(half, "offeredPerSecond") > 0.0);
    assert!(num(half, "p50Ms") <= num(half, "p99Ms"));
    assert_eq!(half["lost"], 0, "{v}");
    // Where the latency went: the devices' wait for window slots and PUBACKs, and the time in
    // the daemon from its forward-delay histogram (a bucket bound, counted per phase).
    for phase in [&v, half] {
        num(phase, "windowWaitP99Ms");
        assert!(
            num(phase, "pubackP50Ms") <= num(phase, "pubackP99Ms"),
            "{v}"
        );
        assert!(num(phase, "pubackP50Ms") > 0.0, "{v}");
        let (p50, p99) = (num(phase, "inGatewayP50Ms"), num(phase, "inGatewayP99Ms"));
        assert!(p50 > 0.0 && p50 <= p99, "{v}");
    }
    // scripts/test installs mosquitto: the bridge baseline runs in the same run.
    let bridge = &v["baselines"]["mosquittoBridge"];
    assert!(bridge.is_object(), "no bridge baseline: {v}");
    assert!(num(bridge, "messagesPerSecond") > 0.0);
    num(bridge, "p50Ms");
    num(bridge, "p99Ms");
    num(bridge, "lost");
    let bridge_half = &bridge["halfRate"];
    assert!(num(bridge_half, "offeredPerSecond") > 0.0);
    num(bridge_half, "p99Ms");
    num(bridge_half, "lost");
    // fleetgw's half-rate phase is paced at half the bridge's no-loss rate.
    let expected = num(bridge, "messagesPerSecond") / 2.0;
    assert!(
        (num(half, "offeredPerSecond") - expected).abs() < 1.0,
        "{v}"
    );
}

#[test]
fn telemetry_with_gateway_identity_tells_devices_apart_by_topic() {
    let dir = tempdir();
    let v = bench(
        dir.path(),
        &[
            "telemetry",
            "--devices",
            "3",
            "--seconds",
            "1",
            "--rate",
            "60",
            "--identity",
            "gateway",
            "--no-baselines",
        ],
    );
    assert_eq!(v["identity"], "gateway");
    assert_eq!(num(&v, "offeredPerSecond"), 60.0);
    assert!(num(&v, "messagesAcked") > 0.0);
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["outOfOrder"], 0, "{v}");
    assert!(v["baselines"]["mosquittoBridge"].is_null());
}

#[test]
fn scale_reports_the_issue_fields() {
    let dir = tempdir();
    let v = bench(
        dir.path(),
        &["scale", "--devices", "10", "--rate", "5", "--seconds", "1"],
    );
    assert_eq!(v["devices"], 10);
    assert_eq!(num(&v, "ratePerDevice"), 5.0);
    assert!(num(&v, "rssMb") > 1.0);
    num(&v, "cpuCores");
    num(&v, "p99Ms");
    // One upstream connection per device (claim sessions may still be open besides).
    assert!(num(&v, "upstreamConnections") >= 10.0, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    // The devices connect before the phase, which then has each send rate x seconds at most.
    num(&v, "connectSeconds");
    let acked = num(&v, "messagesAcked");
    assert!(acked > 0.0 && acked <= 50.0, "{v}");
}

#[test]
fn footprint_reports_the_issue_fields() {
    let dir = tempdir();
    let v = bench(dir.path(), &["footprint", "--devices", "10"]);
    let idle = num(&v, "idleRssMb");
    assert!(idle > 1.0, "{v}");
    assert!(num(&v, "rss10kMb") > 1.0, "{v}");
    assert!(num(&v, "readyMs") > 0.0, "{v}");
    let binary = std::fs::metadata(FLEETGW).unwrap().len();
    assert_eq!(v["binaryBytes"], binary, "{v}");
    assert!(
        v.get("debBytes").is_some(),
        "debBytes (null when not packaged): {v}"
    );
    assert!(num(&v, "storeBytes") > 0.0, "{v}");
}

#[test]
fn bad_options_are_refused_with_a_clear_error() {
    for (args, needle) in [
        (
            &["telemetry", "--devices", "2", "--seconds", "0"][..],
            "seconds",
        ),
        (
            &["scale", "--devices", "2", "--rate=-1", "--seconds", "1"][..],
            "rate",
        ),
        (&["provision", "--devices", "0"][..], "devices"),
    ] {
        let out = Command::new(FLEETGW)
            .arg("bench")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn telemetry_script_is_valid_shell_and_drives_the_command() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/telemetry.sh");
    let out = Command::new("sh").arg("-n").arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "sh -n: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(
        text.contains("bench telemetry"),
        "not a wrapper over fleetgw bench telemetry"
    );
    // A tiny run through the wrapper with the built binary: it writes one JSON per identity.
    let dir = tempdir();
    let out = Command::new("sh")
        .arg(&script)
        .env("FLEETGW", FLEETGW)
        .env("FLEETGW_BENCH_DEVICES", "2")
        .env("FLEETGW_BENCH_SECONDS", "1")
        .env("FLEETGW_BENCH_OUT", dir.path())
        .env("FLEETGW_BENCH_ARGS", "--no-baselines")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for identity in ["device", "gateway"] {
        let path = dir.path().join(format!("telemetry-{identity}.json"));
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["identity"], identity);
        assert_eq!(v["lost"], 0, "{v}");
    }
}

/// Pids of the processes whose parent is `parent`, with their command lines.
fn children_of(parent: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so read after its last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// Kills the processes it holds when dropped: a failing test leaves no emulator or daemon
/// behind (bench itself is a [`Fleetgw`], killed on drop).
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: kill(2) with a pid this test read from /proc.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
    }
}

/// `kill` (SIGTERM) of `fleetgw bench` stops the emulator and the daemon it started, as
/// Ctrl-C does. They run in process groups of their own, so neither signal reaches them
/// directly: bench must stop them before it exits, or they run on with no one to stop them.
#[tokio::test]
async fn sigterm_stops_the_processes_bench_started() {
    let dir = tempdir();
    let bench = Fleetgw::command("fleetgw bench", dir.path().join("bench.log"))
        .args(["bench", "telemetry", "--devices", "2", "--seconds", "120"])
        .args(["--no-baselines", "--rate", "10"])
        .spawn();
    let pid = bench.pid();
    let what = Lazy(|| {
        format!(
            "bench to start the emulator and the daemon: {:?}",
            children_of(pid)
        )
    });
    let children = eventually(what, RUN_LIMIT, || {
        bench.assert_running();
        let children = children_of(pid);
        let emulator = children.iter().any(|(_, c)| c.contains(" emulate "));
        let daemon = children.iter().any(|(_, c)| c.contains(" run "));
        (emulator && daemon).then_some(children)
    })
    .await;
    let _guard = KillOnDrop(children.iter().map(|(p, _)| *p).collect());

    bench.signal(libc::SIGTERM);
    let status = bench.wait_exit(Duration::from_secs(30)).await;
    let output = bench.log();
    assert_eq!(status.code(), Some(130), "{output}");
    assert!(output.contains("interrupted"), "{output}");
    // bench reaps what it started before it exits, so nothing of it is left.
    let alive: Vec<_> = children
        .iter()
        .filter(|(p, _)| Path::new(&format!("/proc/{p}")).exists())
        .collect();
    assert!(
        alive.is_empty(),
        "still running after bench ended: {alive:?}"
    );
}
