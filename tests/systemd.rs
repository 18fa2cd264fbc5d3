//! `fleetgw run` under a service manager played by the test: the daemon (the built binary,
//! with the AWS IoT emulator as its cloud) is started with `NOTIFY_SOCKET` naming a datagram
//! socket this test owns, and `WATCHDOG_USEC`/`WATCHDOG_PID` set as systemd sets them. The
//! test checks the notifications against what the daemon does: READY=1 only once the broker
//! listens and the admin socket answers, STATUS= lines with device counts, outbox and cloud link, WATCHDOG=1 at half the
//! timeout and none while the main loop hangs (the `test-hooks` SIGUSR1 hook),
//! RELOADING=1/READY=1 around SIGHUP (a new log level applied, a bad config refused, a
//! restart-only key named), STOPPING=1 on SIGTERM, exit 0 and a store that opens again.
//!
//! A second test gives the daemon a WATCHDOG_PID naming another process (as a parent that
//! execs a helper would leave it): the daemon must not ping for it.

mod common;

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::config::{drop_in_dir, user_toml};
use common::process::{EmulatorProcess, FLEETGW};
use common::{free_port, WAIT};

/// The watchdog timeout given to the daemon: it pings every 500 ms.
const WATCHDOG_USEC: u64 = 1_000_000;

/// The binary under test; `FLEETGW_BENCH_BIN` replaces it for the measurement (a release
/// build, while the tests themselves build in the dev profile).
fn binary() -> String {
    std::env::var("FLEETGW_BENCH_BIN").unwrap_or_else(|_| FLEETGW.to_string())
}

/// The daemon as the test's service manager started it; killed when dropped.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    /// Starts `fleetgw run` through `sh -c 'exec ...'` so that `WATCHDOG_PID=$$` is the
    /// daemon's own pid, as systemd sets it.
    fn start(config: &Path, sets: &[String], envs: &[(&str, String)], log: &Path) -> Self {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(
                "if [ -n \"$SOFT_NOFILE\" ]; then ulimit -Sn \"$SOFT_NOFILE\" || exit 99; fi; \
                 WATCHDOG_PID=${WATCHDOG_PID_OVERRIDE:-$$}; export WATCHDOG_PID; exec \"$@\"",
            )
            .arg("sh")
            .arg(binary())
            .arg("run")
            .arg("--config")
            .arg(config);
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        let out = std::fs::File::create(log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Service {
            child: cmd.spawn().expect("start fleetgw run"),
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first notification is READY=1.
    fn expect_ready(&self, notify: &NotifySocket) {
        assert_eq!(
            notify.recv(WAIT * 2).as_deref(),
            Some("READY=1\n"),
            "{}",
            self.log()
        );
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_log(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(needle) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("exited ({status}) before {needle:?}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service manager's end of `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path }
    }

    /// The next datagram, or `None` when none comes within `within`.
    fn recv(&self, within: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = vec![0u8; 65536];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8(buf[..n].to_vec()).expect("UTF-8 notification")),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// Reads datagrams until one satisfies `want` (returned) or `within` passes (panic);
    /// every datagram read on the way is passed to `seen`.
    fn until(
        &self,
        what: &str,
        within: Duration,
        mut seen: impl FnMut(&str),
        mut want: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} within {within:?}");
            if let Some(msg) = self.recv(left) {
                seen(&msg);
                if want(&msg) {
                    return msg;
                }
            }
        }
    }

    /// Drops whatever is queued now.
    fn drain(&self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(m) = self.recv(Duration::from_millis(1)) {
            out.push(m);
        }
        out
    }
}

fn sets(state: &Path, broker_port: u16) -> Vec<String> {
    vec![
        format!("gateway.state_dir=\"{}\"", state.display()),
        format!("downstream.listen=\"127.0.0.1:{broker_port}\""),
        "admission.mode=\"open\"".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_speaks_sd_notify_through_start_watchdog_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let emu_dir = dir.path().join("aws");
    let emu = EmulatorProcess::start(&emu_dir, dir.path().join("emulator.log"), |l| l).await;
    let config = emu.gateway_config();
    let state = dir.path().join("state");
    let notify = NotifySocket::bind(dir.path());
    let hang_file = dir.path().join("hang");
    let port = free_port();
    let mut daemon = Service::start(
        &config,
        &sets(&state, port),
        &[
            ("NOTIFY_SOCKET", notify.path.display().to_string()),
            ("WATCHDOG_USEC", WATCHDOG_USEC.to_string()),
            ("FLEETGW_TEST_HANG_FILE", hang_file.display().to_string()),
        ],
        &dir.path().join("daemon.log"),
    );

    // READY=1 first, and only once devices can connect.
    let first = notify
        .recv(WAIT * 2)
        .unwrap_or_else(|| panic!("no READY=1:\n{}", daemon.log()));
    assert_eq!(first, "READY=1\n", "{}", daemon.log());
    TcpStream::connect(("127.0.0.1", port)).expect("the broker listens at READY=1");
    // The emulator's config puts the admin socket in its directory.
    std::os::unix::net::UnixStream::connect(emu_dir.join("admin.sock"))
        .expect("the admin API answers at READY=1");

    // STATUS= with devices, outbox and the cloud link; WATCHDOG=1 every half timeout.
    let mut watchdogs = Vec::new();
    let status = notify.until(
        "STATUS=",
        WAIT,
        |m| {
            if m == "WATCHDOG=1\n" {
                watchdogs.push(Instant::now());
            }
        },
        |m| m.starts_with("STATUS="),
    );
    assert!(
        status.contains("devices: ")
            && status.contains("outbox: 0 messages")
            && status.contains("claim sessions"),
        "{status}"
    );
    let later_status = notify.until(
        "a STATUS= with the cloud up",
        WAIT,
        |_| {},
        |m| m.starts_with("STATUS=devices: none;") && m.contains("cloud up"),
    );
    assert!(
        later_status.ends_with("upstream connections\n"),
        "{later_status}"
    );
    let mut count = 0;
    notify.until(
        "three WATCHDOG=1",
        WAIT,
        |_| {},
        |m| {
            count += usize::from(m == "WATCHDOG=1\n");
            count == 3
        },
    );

    // The main loop hangs: no WATCHDOG=1 for three intervals; it comes back afterwards.
    std::fs::write(&hang_file, b"").unwrap();
    daemon.signal(libc::SIGUSR1);
    daemon.wait_log("test hook: the main loop hangs", WAIT);
    notify.drain(); // sent before the hang began
    let quiet = Instant::now() + Duration::from_micros(WATCHDOG_USEC * 3 / 2);
    while let Some(m) = notify.recv(quiet.saturating_duration_since(Instant::now())) {
        assert_ne!(
            m, "WATCHDOG=1\n",
            "a watchdog ping while the main loop hangs"
        );
    }
    std::fs::remove_file(&hang_file).unwrap();
    notify.until(
        "WATCHDOG=1 after the hang",
        WAIT,
        |_| {},
        |m| m == "WATCHDOG=1\n",
    );

    // SIGHUP with a new log level: RELOADING=1 (with MONOTONIC_USEC), then READY=1.
    let drop_in = drop_in_dir(&config);
    std::fs::write(drop_in.join("90-test.toml"), "[log]\nlevel = \"debug\"\n").unwrap();
    reload_and_expect_ready(&daemon, &notify);
    daemon.wait_log("reload: log.level applied", WAIT);
    daemon.wait_log("reload finished", WAIT); // a debug line: the new level is in force

    // A key that needs a restart is named; a config that does not load changes nothing.
    std::fs::write(
        drop_in.join("90-test.toml"),
        "[log]\nlevel = \"debug\"\n[downstream]\nmax_connections = 77\n",
    )
    .unwrap();
    reload_and_expect_ready(&daemon, &notify);
    daemon.wait_log(
        "needs a restart (systemctl restart fleetgw): downstream.max_connections",
        WAIT,
    );
    std::fs::write(
        drop_in.join("90-test.toml"),
        "[downstream]\nmax_conections = 1\n",
    )
    .unwrap();
    reload_and_expect_ready(&daemon, &notify);
    daemon.wait_log("the running config stays in force", WAIT);
    TcpStream::connect(("127.0.0.1", port)).expect("the broker still listens");

    // SIGTERM: STOPPING=1, an orderly exit 0, a store that opens again.
    daemon.signal(libc::SIGTERM);
    notify.until("STOPPING=1", WAIT, |_| {}, |m| m == "STOPPING=1\n");
    let status = daemon.wait_exit(WAIT * 2);
    assert!(status.success(), "{status}:\n{}", daemon.log());
    assert!(
        daemon.log().contains("stopped; store flushed"),
        "{}",
        daemon.log()
    );
    let store = fleetgw::store::Store::open(&state, &fleetgw::store::StoreOptions::default())
        .expect("the store opens after the stop");
    assert_eq!(store.device_count(), 0);
}

fn reload_and_expect_ready(daemon: &Service, notify: &NotifySocket) {
    notify.drain();
    daemon.signal(libc::SIGHUP);
    let reloading = notify.until(
        "RELOADING=1",
        WAIT,
        |_| {},
        |m| m.starts_with("RELOADING=1\n"),
    );
    let usec: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|r| r.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("{reloading:?}"));
    assert!(usec > 0);
    notify.until(
        "READY=1 after the reload",
        WAIT,
        |m| {
            assert!(!m.starts_with("STOPPING"), "{m}");
        },
        |m| m == "READY=1\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watchdog_for_another_pid_is_not_fed() {
    let dir = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start_in(dir.path()).await;
    let notify = NotifySocket::bind(dir.path());
    let port = free_port();
    let mut daemon = Service::start(
        &emu.gateway_config(),
        &sets(&dir.path().join("state"), port),
        &[
            ("NOTIFY_SOCKET", notify.path.display().to_string()),
            ("WATCHDOG_USEC", WATCHDOG_USEC.to_string()),
            // systemd's watchdog is for pid 1 here, not for us: we must not ping for it.
            ("WATCHDOG_PID_OVERRIDE", "1".to_string()),
        ],
        &dir.path().join("daemon.log"),
    );
    daemon.expect_ready(&notify);
    let mut seen = Vec::new();
    notify.until(
        "two STATUS= lines",
        WAIT * 2,
        |m| seen.push(m.to_string()),
        {
            let mut n = 0;
            move |m: &str| {
                n += usize::from(m.starts_with("STATUS="));
                n == 2
            }
        },
    );
    assert!(!seen.iter().any(|m| m == "WATCHDOG=1\n"), "{seen:?}");
    TcpStream::connect(("127.0.0.1", port)).expect("the daemon still runs");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT * 2).success(), "{}", daemon.log());
}

/// systemd starts services with a soft open-file limit of 1,024: the daemon raises it to the
/// hard limit, so devices beyond the soft limit still connect. Started with a soft limit of
/// 200 here, it takes 300 devices at once (each holds a descriptor) and reports the raise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start_in(dir.path()).await;
    let notify = NotifySocket::bind(dir.path());
    let port = free_port();
    let mut with_info = sets(&dir.path().join("state"), port);
    with_info.push("log.level=\"info\"".into());
    let mut daemon = Service::start(
        &emu.gateway_config(),
        &with_info,
        &[
            ("NOTIFY_SOCKET", notify.path.display().to_string()),
            ("SOFT_NOFILE", "200".to_string()),
        ],
        &dir.path().join("daemon.log"),
    );
    daemon.expect_ready(&notify);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3], fields[4], "soft = hard: {line}");
    assert_ne!(fields[3], "200", "{line}");
    daemon.wait_log("open-file limit raised to the hard limit", WAIT);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut devices = Vec::new();
    for i in 0..300 {
        devices.push(common::raw_mqtt::Raw::connect(addr, &format!("nofile-{i}"), true).await);
    }
    assert_eq!(devices.len(), 300);
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT * 2).success(), "{}", daemon.log());
}

/// The allocator's tuning (`fleetgw::allocator`) is in place before its first arena is
/// reserved: the Rust runtime allocates before `main`, so tuning it there would leave the
/// first arena at mimalloc's default of 1 GiB, committed at once. mimalloc's verbose output
/// names each arena's size as it reserves it. A `MIMALLOC_` variable set in the environment
/// still wins over the tuning.
#[test]
fn the_allocator_is_tuned_before_its_first_arena() {
    let reserved = |env: &[(&str, &str)]| -> (String, Vec<String>) {
        let out = Command::new(binary())
            .arg("--version")
            .env("MIMALLOC_VERBOSE", "1")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let arenas = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("mimalloc: reserved "))
            .map(str::to_string)
            .collect();
        (stderr, arenas)
    };

    let (stderr, arenas) = reserved(&[]);
    assert_eq!(arenas, ["65536 KiB memory"], "{stderr}");
    for option in [
        "option 'arena_eager_commit': 0 ",
        "option 'purge_delay': 0 ",
        "option 'arena_reserve': 65536 KiB",
    ] {
        assert!(
            stderr.lines().any(|l| l == option),
            "{option:?} in {stderr}"
        );
    }

    let (stderr, arenas) = reserved(&[("MIMALLOC_ARENA_RESERVE", "128MiB")]);
    assert_eq!(arenas, ["131072 KiB memory"], "{stderr}");
}

/// The startup figure: exec of `fleetgw run` to READY=1 with 100,000 devices in the store
/// (delivered, as after a fleet rollout; the resume scan runs after READY). A measurement, not
/// a check of this machine's speed: `FLEETGW_BENCH_BIN=target/release/fleetgw cargo test
/// --features test-hooks --test systemd -- --ignored --nocapture` prints it for the release
/// binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it by name"]
async fn exec_to_ready_with_100000_devices() {
    use fleetgw::device_id::DeviceId;
    use fleetgw::store::{Batch, DeviceRecord, DeviceState, Store, StoreOptions};
    let devices: u32 = common::env_or("FLEETGW_BENCH_DEVICES", 100_000) as u32;
    let dir = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start_in(dir.path()).await;
    let state = dir.path().join("state");
    {
        let store = Store::open(&state, &StoreOptions::default()).unwrap();
        let now = fleetgw::clock::unix_ms();
        for chunk in (0..devices).collect::<Vec<_>>().chunks(5_000) {
            let mut batch = Batch::new();
            for n in chunk {
                let id = DeviceId::parse(&format!("sensor-{n:06}")).unwrap();
                let mut rec = DeviceRecord::new(id, "json", now);
                rec.state = DeviceState::Delivered;
                batch.put_device(rec);
            }
            store.apply(batch).await.unwrap();
        }
        store.flush_blocking().unwrap();
        assert_eq!(store.device_count(), devices as usize);
    }
    let notify = NotifySocket::bind(dir.path());
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let mut daemon = Service::start(
            &emu.gateway_config(),
            &sets(&state, free_port()),
            &[("NOTIFY_SOCKET", notify.path.display().to_string())],
            &dir.path().join("daemon.log"),
        );
        notify.until("READY=1", WAIT * 4, |_| {}, |m| m == "READY=1\n");
        let took = started.elapsed();
        best = best.min(took);
        let rss = std::fs::read_to_string(format!("/proc/{}/status", daemon.child.id()))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .to_string();
        println!("exec to READY=1 with {devices} devices: {took:?} ({rss} at READY)");
        daemon.signal(libc::SIGTERM);
        assert!(daemon.wait_exit(WAIT * 2).success(), "{}", daemon.log());
        notify.drain();
    }
    println!("best of 3: {best:?}");
}

/// A local application removed from `[[downstream.users]]` by a reload loses its rights (its
/// name is then no user's, and a client with it is held to a device's own topics), the one
/// added gets them, a wrong password gets nothing: the reload replaces the users, it does not
/// only log it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_removed_by_a_reload_loses_its_rights_and_an_added_one_gets_them() {
    use common::mqtt_client::{options, TestClient};
    use rumqttc::{QoS, SubscribeReasonCode};
    let dir = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start_in(dir.path()).await;
    let config = emu.gateway_config();
    let drop_in = drop_in_dir(&config);
    let user_toml = |name: &str, password: &str| {
        user_toml(name, password, "subscribe = [\"fleetgw/+/status\"]\n")
    };
    std::fs::write(
        drop_in.join("50-users.toml"),
        user_toml("historian", "old-secret"),
    )
    .unwrap();
    let notify = NotifySocket::bind(dir.path());
    let port = free_port();
    let daemon = Service::start(
        &config,
        &sets(&dir.path().join("state"), port),
        &[("NOTIFY_SOCKET", notify.path.display().to_string())],
        &dir.path().join("daemon.log"),
    );
    daemon.expect_ready(&notify);
    let as_user = |name: &str, password: &str| {
        let mut o = options(&format!("app-{name}"), port);
        o.set_credentials(name, password);
        o
    };
    // A user's rights, seen from the outside: may it read every device's status?
    let may_read_statuses = |name: &'static str, password: &'static str| {
        let opts = as_user(name, password);
        async move {
            let Ok(mut client) = TestClient::try_connect(opts).await else {
                return false;
            };
            let granted = client.subscribe("fleetgw/+/status", QoS::AtLeastOnce).await;
            !granted.contains(&SubscribeReasonCode::Failure)
        }
    };
    assert!(
        may_read_statuses("historian", "old-secret").await,
        "{}",
        daemon.log()
    );
    assert!(!may_read_statuses("dashboard", "new-secret").await);

    std::fs::write(
        drop_in.join("50-users.toml"),
        user_toml("dashboard", "new-secret"),
    )
    .unwrap();
    reload_and_expect_ready(&daemon, &notify);
    // The removed user's name is now just a name (a device may send any); its old rights are gone.
    assert!(
        !may_read_statuses("historian", "old-secret").await,
        "a removed user keeps its rights:\n{}",
        daemon.log()
    );
    assert!(
        may_read_statuses("dashboard", "new-secret").await,
        "the added user lacks its rights:\n{}",
        daemon.log()
    );
    assert!(
        !may_read_statuses("dashboard", "old-secret").await,
        "a wrong password is accepted"
    );
}
