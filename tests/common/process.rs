//! `fleetgw` child processes (`fleetgw run`, `fleetgw emulate aws`) as the tests drive them:
//! the built binary with its output in a log file, waits for readiness, signals, kill -9 and
//! restart, and a kill on drop so that no test leaves a daemon behind.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;

use super::wait::{eventually, Lazy};

/// The binary under test.
pub const FLEETGW: &str = env!("CARGO_BIN_EXE_fleetgw");

/// Environment variable naming another `fleetgw` binary to test (`scripts/chaos` points it
/// at the release build); the one cargo built for the tests otherwise.
pub const BINARY_ENV: &str = "FLEETGW_TEST_BINARY";

fn binary() -> OsString {
    std::env::var_os(BINARY_ENV)
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| FLEETGW.into())
}

/// What to start: arguments, environment and the log file that takes stdout and stderr.
#[derive(Clone, Debug)]
pub struct Launch {
    name: String,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    log: PathBuf,
}

impl Launch {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// `--set KEY=VALUE` for each of `sets` (a config override of `fleetgw run`).
    pub fn sets<S: AsRef<OsStr>>(mut self, sets: impl IntoIterator<Item = S>) -> Self {
        for s in sets {
            self = self.arg("--set").arg(s);
        }
        self
    }

    /// The overrides the daemon tests share: open admission, the store in `state`, the admin
    /// socket at `socket` and the embedded broker on `127.0.0.1:port`.
    pub fn embedded_open(self, state: &Path, socket: &Path, port: u16) -> Self {
        self.sets([
            "admission.mode=\"open\"".to_string(),
            format!("gateway.state_dir=\"{}\"", state.display()),
            format!("admin.socket=\"{}\"", socket.display()),
            "downstream.broker=\"embedded\"".to_string(),
            format!("downstream.listen=\"127.0.0.1:{port}\""),
        ])
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        let value = Some(value.as_ref().to_os_string());
        self.envs.push((key.as_ref().to_os_string(), value));
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.as_ref().to_os_string(), None));
        self
    }

    /// Starts the process; the log file starts empty.
    pub fn spawn(self) -> Fleetgw {
        let child = self.start(false);
        Fleetgw {
            launch: self,
            child: Mutex::new(Some(child)),
        }
    }

    fn start(&self, append: bool) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("{}: {e}", self.log.display()));
        let mut cmd = Command::new(binary());
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log);
        for (key, value) in &self.envs {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name))
    }
}

/// A running (or killed) `fleetgw` process; killed (SIGKILL) and reaped when dropped.
pub struct Fleetgw {
    launch: Launch,
    child: Mutex<Option<Child>>,
}

impl Fleetgw {
    /// A `fleetgw` command named `name` (for messages) logging to `log`.
    pub fn command(name: &str, log: impl Into<PathBuf>) -> Launch {
        Launch {
            name: name.to_string(),
            args: Vec::new(),
            envs: Vec::new(),
            log: log.into(),
        }
    }

    /// `fleetgw run --config CONFIG`; add `--set` overrides with [`Launch::sets`].
    pub fn run(config: &Path, log: impl Into<PathBuf>) -> Launch {
        Self::command("fleetgw run", log)
            .arg("run")
            .arg("--config")
            .arg(config)
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything the process (and its earlier runs) wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.launch.log).unwrap_or_default()
    }

    /// The last 40 lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child().as_ref().expect("process running").id()
    }

    /// The exit status once the process has exited (`None` while it runs).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child()
            .as_mut()
            .and_then(|c| c.try_wait().expect("wait for the child"))
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&self) {
        if let Some(status) = self.exit_status() {
            panic!("{} exited with {status}:\n{}", self.launch.name, self.log());
        }
    }

    /// Waits until the log contains `needle`; panics (with the log) if the process exits
    /// first or `within` passes.
    pub async fn wait_for_log(&self, needle: &str, within: Duration) {
        let what = Lazy(|| format!("\"{needle}\" in the log:\n{}", self.log_tail()));
        eventually(what, within, || {
            if self.log().contains(needle) {
                return Some(());
            }
            // Read the log again: it may have written the line just before it exited.
            if self.exit_status().is_some() && !self.log().contains(needle) {
                self.assert_running();
            }
            None
        })
        .await;
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&self, within: Duration) -> ExitStatus {
        let what = Lazy(|| format!("{} to exit; log:\n{}", self.launch.name, self.log_tail()));
        eventually(what, within, || self.exit_status()).await
    }

    /// SIGKILL (no shutdown path runs) and reap.
    pub fn kill9(&self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the same command again (after [`Fleetgw::kill9`] or an exit), appending to the
    /// log.
    pub fn restart(&self) {
        self.kill9();
        *self.child() = Some(self.launch.start(true));
    }

    /// CPU time (user + system) the process used so far.
    pub fn cpu(&self) -> Duration {
        fleetgw::bench::procfs::cpu_time(self.pid()).unwrap()
    }

    /// Resident set size in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        fleetgw::bench::procfs::rss_kib(self.pid()).unwrap()
    }
}

impl Drop for Fleetgw {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `fleetgw emulate aws` in its own process, with MQTT and API on free ports, started once its
/// discovery file (`emulator.json`) is written.
pub struct EmulatorProcess {
    pub process: Fleetgw,
    /// The emulator's `--dir`: CA, claim credentials, gateway.toml.
    pub dir: PathBuf,
    pub api: SocketAddr,
    pub mqtt: SocketAddr,
    pub ca_pem: String,
}

impl EmulatorProcess {
    /// Starts the emulator with its files in `dir` and its output in `log`; `tune` adds
    /// arguments (after the defaults) or environment.
    pub async fn start(dir: &Path, log: PathBuf, tune: impl FnOnce(Launch) -> Launch) -> Self {
        let discovery = dir.join("emulator.json");
        let _ = std::fs::remove_file(&discovery);
        let launch = Fleetgw::command("fleetgw emulate aws", log)
            .args(["emulate", "aws", "--dir"])
            .arg(dir)
            .args(["--mqtt", "127.0.0.1:0", "--api", "127.0.0.1:0"]);
        let process = tune(launch).spawn();
        let info: Value = eventually("emulator.json", Duration::from_secs(30), || {
            process.assert_running();
            let text = std::fs::read_to_string(&discovery).ok()?;
            serde_json::from_str(&text).ok()
        })
        .await;
        let addr = |key: &str| -> SocketAddr {
            let text = info[key]
                .as_str()
                .unwrap_or_else(|| panic!("{key} in {info}"));
            text.trim_start_matches("http://")
                .parse()
                .unwrap_or_else(|e| panic!("{key} {text}: {e}"))
        };
        Self {
            api: addr("api"),
            mqtt: addr("mqtt"),
            ca_pem: std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
            dir: dir.to_path_buf(),
            process,
        }
    }

    /// Starts the emulator with its files in `tmp/emu` (created here) and its output in
    /// `tmp/emu.log`, with the default arguments.
    pub async fn start_in(tmp: &Path) -> Self {
        let dir = tmp.join("emu");
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Self::start(&dir, tmp.join("emu.log"), |l| l).await
    }

    /// The gateway configuration the emulator wrote for `fleetgw run`.
    pub fn gateway_config(&self) -> PathBuf {
        self.dir.join("gateway.toml")
    }

    /// `POST /faults` with `body` (`Some`) or `DELETE /faults` (`None`) on the emulator's API;
    /// panics unless it answers 200.
    pub async fn faults(&self, body: Option<&str>) {
        let method = if body.is_some() { "POST" } else { "DELETE" };
        let (status, view) = super::http::http(self.api, method, "/faults", body).await;
        assert_eq!(status, 200, "{method} /faults: {view}");
    }
}
