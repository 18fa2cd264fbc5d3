//! The separate processes a benchmark measures: `fleetgw emulate aws` and `fleetgw run` (this
//! very binary, `current_exe`), and for the baseline a mosquitto bridge. Each is killed and
//! reaped when dropped, so an interrupted run leaves nothing behind; its output goes to a log
//! file in the run directory, quoted in errors.
//!
//! The daemon is started with `NOTIFY_SOCKET` pointing at a datagram socket of ours, so its
//! `READY=1` (sd_notify, sent once its listeners and admin API are up) is the readiness signal
//! and the exec-to-READY time is measured exactly as systemd would see it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::BenchError;
use crate::telemetry::delay::{DelaySnapshot, FORWARD_DELAY_METRIC};

/// Environment variable with a command line to run the daemon under (a profiler).
pub const DAEMON_PREFIX_ENV: &str = "FLEETGW_BENCH_DAEMON_PREFIX";
/// How long a process may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two looks while waiting for a process.
const POLL: Duration = Duration::from_millis(20);

/// A child process, SIGKILLed and reaped when dropped.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `program` with `args` (and `envs`), stdout and stderr to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, String)],
        log: PathBuf,
    ) -> Result<Self, BenchError> {
        let file = std::fs::File::create(&log).map_err(|e| BenchError::io(&log, e))?;
        let err = file.try_clone().map_err(|e| BenchError::io(&log, e))?;
        let mut cmd = Command::new(program);
        // Its own process group, signalled as a whole: a profiler in front of the daemon
        // (FLEETGW_BENCH_DAEMON_PREFIX) runs it as its child, which must not outlive the run.
        cmd.process_group(0);
        cmd.args(args).stdin(Stdio::null()).stdout(file).stderr(err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(|e| BenchError::Start {
            what: name.to_string(),
            reason: format!("{}: {e}", program.display()),
        })?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error when the process has exited, with the end of its log.
    pub fn check_running(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Start {
                what: self.name.clone(),
                reason: format!("exited with {status}; log:\n{}", self.log_tail()),
            }),
            Err(e) => Err(BenchError::Start {
                what: self.name.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// The last 30 lines of the log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, then SIGKILL if it has not exited within `within`.
    pub async fn stop(mut self, within: Duration) {
        self.signal_group(libc::SIGTERM);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Process {
    /// Sends `sig` to the process group the child leads (while it is not reaped, the group
    /// id is still ours to signal).
    fn signal_group(&self, sig: i32) {
        // SAFETY: kill(2) on the group of our own, not yet reaped child.
        unsafe {
            libc::kill(-(self.child.id() as i32), sig);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.signal_group(libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> Result<u16, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::io(Path::new("127.0.0.1:0"), e))?;
    Ok(l.local_addr()
        .map_err(|e| BenchError::io(Path::new("127.0.0.1:0"), e))?
        .port())
}

/// This binary (`fleetgw`), which the benchmark runs as emulator and daemon.
pub fn fleetgw_exe() -> Result<PathBuf, BenchError> {
    std::env::current_exe().map_err(|e| BenchError::Start {
        what: "fleetgw".into(),
        reason: format!("cannot find the running executable: {e}"),
    })
}

/// `fleetgw emulate aws` with its files in `dir`, MQTT and API on free loopback ports.
pub struct Emulator {
    /// The process.
    pub process: Process,
    /// Its `--dir`.
    pub dir: PathBuf,
    /// `http://127.0.0.1:PORT`.
    pub api: String,
    /// The MQTT/TLS address.
    pub mqtt: SocketAddr,
    /// The thing (client id) of `gateway.pem`.
    pub gateway_thing: String,
}

impl Emulator {
    /// Starts it; `extra` are further `emulate aws` arguments (`--tps`, `--max-messages`).
    pub async fn start(dir: &Path, extra: &[String]) -> Result<Self, BenchError> {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
        let mut args: Vec<String> = ["emulate", "aws", "--dir"].map(String::from).into();
        args.push(dir.display().to_string());
        args.extend(["--mqtt", "127.0.0.1:0", "--api", "127.0.0.1:0"].map(String::from));
        args.extend_from_slice(extra);
        let log = dir.with_extension("log");
        let envs = [("RUST_LOG", "warn".to_string())];
        let mut process =
            Process::spawn("fleetgw emulate aws", &fleetgw_exe()?, &args, &envs, log)?;
        let discovery = dir.join("emulator.json");
        let deadline = Instant::now() + START_TIMEOUT;
        let info: serde_json::Value = loop {
            process.check_running()?;
            if let Some(v) = std::fs::read(&discovery)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                break v;
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Start {
                    what: "fleetgw emulate aws".into(),
                    reason: format!("no {} within {START_TIMEOUT:?}", discovery.display()),
                });
            }
            tokio::time::sleep(POLL).await;
        };
        let field = |k: &str| info[k].as_str().unwrap_or_default().to_string();
        let mqtt = field("mqtt").parse().map_err(|e| BenchError::Start {
            what: "fleetgw emulate aws".into(),
            reason: format!("emulator.json mqtt {:?}: {e}", field("mqtt")),
        })?;
        Ok(Self {
            api: field("api").trim_end_matches('/').to_string(),
            mqtt,
            gateway_thing: field("gatewayThing"),
            dir: dir.to_path_buf(),
            process,
        })
    }

    /// `GET path` of the inspection API as JSON.
    pub async fn get(&self, path: &str) -> Result<serde_json::Value, BenchError> {
        let url = format!("{}{path}", self.api);
        let body =
            tokio::time::timeout(Duration::from_secs(30), crate::sim::arrival::http_get(&url))
                .await
                .map_err(|_| BenchError::Api {
                    url: url.clone(),
                    reason: "no answer within 30 s".into(),
                })?
                .map_err(|reason| BenchError::Api {
                    url: url.clone(),
                    reason,
                })?;
        serde_json::from_slice(&body).map_err(|e| BenchError::Api {
            url,
            reason: e.to_string(),
        })
    }

    /// The `/stats` counters.
    pub async fn stats(&self) -> Result<serde_json::Value, BenchError> {
        self.get("/stats").await
    }

    /// Messages the emulator has received (its `/stats` count).
    pub async fn messages(&self) -> Result<u64, BenchError> {
        Ok(self.stats().await?["messages"].as_u64().unwrap_or(0))
    }

    /// Waits until the emulator has received at least `count` messages, for at most `within`;
    /// whether it has.
    pub async fn wait_for_messages(
        &self,
        count: u64,
        within: Duration,
    ) -> Result<bool, BenchError> {
        let deadline = Instant::now() + within;
        loop {
            if self.messages().await? >= count {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The gateway's `cloud.aws.tps` unless a run sets its own (`bench provision --tps`): far
/// above what the emulator or this box can do, so it never paces. The default, AWS's quota of
/// 50 a second, made provisioning 10,000 devices take more than three minutes before what a
/// run measures.
const UNTHROTTLED_TPS: f64 = 100_000.0;

/// `fleetgw run` against an emulator, its device broker on a free loopback port.
pub struct Daemon {
    /// The process.
    pub process: Process,
    /// The embedded broker's address.
    pub broker: SocketAddr,
    /// Its state directory (the store lives below it).
    pub state_dir: PathBuf,
    /// Its admin socket.
    pub admin_socket: PathBuf,
    /// From exec to the `READY=1` notification.
    pub ready_after: Duration,
}

impl Daemon {
    /// Starts `fleetgw run --config EMULATOR/gateway.toml` with its state in `dir`, unthrottled
    /// provisioning ([`UNTHROTTLED_TPS`]) and `sets` as further `--set KEY=VALUE` overrides
    /// (the last of a key wins); returns once it sent `READY=1`.
    pub async fn start(emu: &Emulator, dir: &Path, sets: &[String]) -> Result<Self, BenchError> {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
        let notify_path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = tokio::net::UnixDatagram::bind(&notify_path)
            .map_err(|e| BenchError::io(&notify_path, e))?;
        let port = free_port()?;
        let state_dir = dir.join("state");
        let admin_socket = dir.join("admin.sock");
        let mut args: Vec<String> = vec!["run".into(), "--config".into()];
        args.push(emu.dir.join("gateway.toml").display().to_string());
        let mut all_sets = vec![
            format!("downstream.listen=\"127.0.0.1:{port}\""),
            format!("gateway.state_dir=\"{}\"", state_dir.display()),
            format!("admin.socket=\"{}\"", admin_socket.display()),
            "log.level=\"warn\"".to_string(),
            format!("cloud.aws.tps={UNTHROTTLED_TPS}"),
        ];
        all_sets.extend_from_slice(sets);
        for s in all_sets {
            args.push("--set".into());
            args.push(s);
        }
        let envs = [("NOTIFY_SOCKET", notify_path.display().to_string())];
        // A profiler to run the daemon under (`heaptrack`, `perf record -g --`, `valgrind
        // --tool=callgrind`): its /proc figures are then the profiler's, the profile is the point.
        let mut program = fleetgw_exe()?;
        if let Some(prefix) = std::env::var(DAEMON_PREFIX_ENV)
            .ok()
            .filter(|p| !p.trim().is_empty())
        {
            let mut words = prefix.split_whitespace().map(String::from);
            let first = words.next().unwrap_or_default();
            let mut wrapped: Vec<String> = words.collect();
            wrapped.push(program.display().to_string());
            wrapped.extend(args);
            args = wrapped;
            program = PathBuf::from(first);
        }
        let started = Instant::now();
        let mut process = Process::spawn(
            "fleetgw run",
            &program,
            &args,
            &envs,
            dir.join("daemon.log"),
        )?;
        let deadline = started + START_TIMEOUT;
        let mut buf = vec![0u8; 4096];
        loop {
            process.check_running()?;
            match tokio::time::timeout(Duration::from_millis(200), notify.recv(&mut buf)).await {
                Ok(Ok(n))
                    if String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .any(|l| l == "READY=1") =>
                {
                    break;
                }
                Ok(Err(e)) => return Err(BenchError::io(&notify_path, e)),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Start {
                    what: "fleetgw run".into(),
                    reason: format!(
                        "no READY=1 within {START_TIMEOUT:?}; log:\n{}",
                        process.log_tail()
                    ),
                });
            }
        }
        Ok(Self {
            ready_after: started.elapsed(),
            process,
            broker: SocketAddr::from(([127, 0, 0, 1], port)),
            state_dir,
            admin_socket,
        })
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Its `fleetgw_telemetry_forward_delay_seconds` histogram so far (admin `/metrics`).
    pub async fn forward_delay(&self) -> Result<DelaySnapshot, BenchError> {
        let failed = |reason: String| BenchError::Start {
            what: "fleetgw run (GET /metrics)".into(),
            reason,
        };
        let reply = crate::cli::admin_client::call(
            &self.admin_socket,
            hyper::Method::GET,
            "/metrics",
            None,
        )
        .await
        .and_then(|r| r.ok())
        .map_err(|e| failed(e.message))?;
        let text = String::from_utf8_lossy(&reply.body);
        DelaySnapshot::from_prometheus(&text, FORWARD_DELAY_METRIC)
            .ok_or_else(|| failed(format!("no {FORWARD_DELAY_METRIC} histogram in the answer")))
    }

    /// Stops it (SIGTERM, 20 s, then SIGKILL).
    pub async fn stop(self) {
        self.process.stop(Duration::from_secs(20)).await;
    }
}

/// The mosquitto binary: in PATH or /usr/sbin (Debian's place for it).
pub fn mosquitto_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// mosquitto on a free loopback port, bridging `PREFIX/+/telemetry` to the emulator with the
/// emulator's ready-made gateway certificate (`gateway.pem`/`gateway.key`, one connection, as
/// users set up the bridge), with unlimited queues so that nothing is dropped.
pub struct Bridge {
    /// The process.
    pub process: Process,
    /// Its listener port.
    pub port: u16,
}

impl Bridge {
    /// Writes `dir/mosquitto.conf` and starts mosquitto; returns once its listener accepts
    /// connections (the bridge connects upstream on its own schedule: see
    /// [`super::telemetry::wait_connected`]).
    pub async fn start(
        binary: &Path,
        emu: &Emulator,
        dir: &Path,
        prefix: &str,
    ) -> Result<Self, BenchError> {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
        let port = free_port()?;
        let mut conf = String::new();
        // As root mosquitto would switch to its own user, which cannot read our files.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            conf.push_str("user root\n");
        }
        let _ = writeln!(conf, "listener {port} 127.0.0.1");
        conf.push_str("allow_anonymous true\npersistence false\nlog_type error\n");
        conf.push_str("max_queued_messages 0\nmax_queued_bytes 0\n");
        let _ = writeln!(conf, "connection cloud");
        let _ = writeln!(conf, "address {}", emu.mqtt);
        let _ = writeln!(conf, "remote_clientid {}", emu.gateway_thing);
        conf.push_str("bridge_protocol_version mqttv311\ntry_private false\n");
        conf.push_str("notifications false\ncleansession true\n");
        for (key, file) in [
            ("bridge_cafile", "ca.pem"),
            ("bridge_certfile", "gateway.pem"),
            ("bridge_keyfile", "gateway.key"),
        ] {
            let _ = writeln!(conf, "{key} {}", emu.dir.join(file).display());
        }
        let _ = writeln!(conf, "topic {prefix}/+/telemetry out 1");
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf).map_err(|e| BenchError::io(&path, e))?;
        let args = vec!["-c".to_string(), path.display().to_string()];
        let mut process =
            Process::spawn("mosquitto", binary, &args, &[], dir.join("mosquitto.log"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            process.check_running()?;
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Self { process, port });
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Start {
                    what: "mosquitto".into(),
                    reason: format!("not listening on port {port} within {START_TIMEOUT:?}"),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
