//! A real mosquitto for tests: generated config, password and ACL files in a temp dir, a free
//! 127.0.0.1 port, start / SIGKILL / restart on the same port. Needs the `mosquitto` package
//! (`scripts/test` installs it).

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// What the generated mosquitto.conf contains.
#[derive(Clone, Debug, Default)]
pub struct MosquittoConfig {
    /// (username, password) pairs for the password file; empty = anonymous access.
    pub users: Vec<(String, String)>,
    /// Contents of the ACL file, if any.
    pub acl: Option<String>,
    /// `use_username_as_clientid true`.
    pub use_username_as_clientid: bool,
    /// Further config lines.
    pub extra: Vec<String>,
}

impl MosquittoConfig {
    /// Anyone may connect, no ACL.
    pub fn anonymous() -> Self {
        Self::default()
    }

    /// The recipe of docs/mosquitto.md: one user per device (username = device id), the
    /// gateway user `fleetgw-gateway`, `use_username_as_clientid`, `%u` ACL.
    pub fn recipe(prefix: &str, devices: &[(&str, &str)], gateway_password: &str) -> Self {
        let mut users = vec![("fleetgw-gateway".to_string(), gateway_password.to_string())];
        users.extend(devices.iter().map(|(u, p)| (u.to_string(), p.to_string())));
        Self {
            users,
            acl: Some(format!(
                "pattern readwrite {prefix}/%u/#\n\nuser fleetgw-gateway\ntopic readwrite {prefix}/#\n"
            )),
            use_username_as_clientid: true,
            // As in the recipe: at or below the gateway's max_packet_bytes (default 256 KiB).
            extra: vec!["max_packet_size 262144".to_string()],
        }
    }
}

/// A running (or killed) mosquitto process.
pub struct Mosquitto {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

fn binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "this test needs a real mosquitto, but `{name}` is not in PATH, /usr/sbin, \
                 /usr/local/sbin or /usr/bin: install the Debian package `mosquitto` \
                 (scripts/test does) and run the test again"
            )
        })
}

impl Mosquitto {
    /// Writes the config and starts mosquitto on a free loopback port; panics with its log if
    /// it does not come up.
    pub fn start(cfg: &MosquittoConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        write_files(dir.path(), cfg);
        let mut m = Self {
            dir,
            port: 0,
            child: None,
        };
        for _ in 0..8 {
            m.port = super::free_port();
            if m.spawn_and_wait() {
                return m;
            }
            // The picked port was taken in between: try another one.
        }
        panic!(
            "mosquitto did not start on any free port; log:\n{}",
            m.log()
        );
    }

    /// Starts mosquitto on `self.port`; true once it accepts TCP connections.
    fn spawn_and_wait(&mut self) -> bool {
        let base = std::fs::read_to_string(self.dir.path().join("base.conf")).expect("base.conf");
        let conf = format!("listener {} 127.0.0.1\n{base}", self.port);
        let conf_path = self.dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
        let child = Command::new(binary("mosquitto"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + super::WAIT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "mosquitto not listening on {addr} after {:?}; log:\n{}",
            super::WAIT,
            self.log()
        );
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:{port}`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:{port}`
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILLs it (no clean shutdown, in-memory sessions are lost).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and waits until it listens.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn_and_wait(),
            "mosquitto could not listen on port {} again; log:\n{}",
            self.port,
            self.log()
        );
    }

    /// Its log file so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn write_files(dir: &Path, cfg: &MosquittoConfig) {
    let mut conf = String::new();
    // Running as root, mosquitto would switch to the `mosquitto` user, which cannot read the
    // temp dir; stay root instead. As any other user this line is ignored.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        conf.push_str("user root\n");
    }
    let _ = writeln!(
        conf,
        "log_dest file {}",
        dir.join("mosquitto.log").display()
    );
    conf.push_str("log_type error\nlog_type warning\nlog_type notice\nlog_type information\n");
    conf.push_str("connection_messages true\npersistence false\n");
    if cfg.users.is_empty() {
        conf.push_str("allow_anonymous true\n");
    } else {
        let passwd = dir.join("fleetgw.passwd");
        let plain: String = cfg
            .users
            .iter()
            .map(|(u, p)| format!("{u}:{p}\n"))
            .collect();
        std::fs::write(&passwd, plain).expect("write password file");
        let status = Command::new(binary("mosquitto_passwd"))
            .arg("-U")
            .arg(&passwd)
            .status()
            .expect("run mosquitto_passwd");
        assert!(status.success(), "mosquitto_passwd -U failed");
        conf.push_str("allow_anonymous false\n");
        let _ = writeln!(conf, "password_file {}", passwd.display());
    }
    if let Some(acl) = &cfg.acl {
        let path = dir.join("fleetgw.acl");
        std::fs::write(&path, acl).expect("write acl file");
        let _ = writeln!(conf, "acl_file {}", path.display());
    }
    if cfg.use_username_as_clientid {
        conf.push_str("use_username_as_clientid true\n");
    }
    for line in &cfg.extra {
        conf.push_str(line);
        conf.push('\n');
    }
    std::fs::write(dir.join("base.conf"), conf).expect("write base.conf");
}
