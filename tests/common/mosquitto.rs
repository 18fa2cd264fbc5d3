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

    /// The recipe of docs/mosquitto.md, read from that file: its mosquitto settings and its
    /// ACL (with `prefix` for `fleetgw`), one user per device (username = device id) and the
    /// gateway user `fleetgw-gateway`. The listener, certificate, password-file, ACL-file and
    /// persistence lines are the test's own (a free loopback port, a temp dir).
    pub fn recipe(prefix: &str, devices: &[(&str, &str)], gateway_password: &str) -> Self {
        let doc = include_str!("../../docs/mosquitto.md");
        let conf = code_block_after(doc, "`/etc/mosquitto/conf.d/fleetgw.conf`:");
        let acl = code_block_after(doc, "`/etc/mosquitto/fleetgw.acl`:");
        // What isolation rests on must stay in the documented recipe.
        for needed in ["use_username_as_clientid true", "allow_anonymous false"] {
            assert!(
                conf.lines().any(|l| l.trim() == needed),
                "recipe lacks {needed}"
            );
        }
        assert!(
            acl.contains("pattern readwrite fleetgw/%u/#"),
            "recipe ACL: {acl}"
        );
        const TEST_OWN: [&str; 7] = [
            "listener",
            "certfile",
            "keyfile",
            "password_file",
            "acl_file",
            "persistence",
            "allow_anonymous",
        ];
        let extra = conf
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter(|l| {
                let directive = l.split_whitespace().next().unwrap_or_default();
                !TEST_OWN.contains(&directive) && directive != "use_username_as_clientid"
            })
            .map(str::to_string)
            .collect();
        let mut users = vec![("fleetgw-gateway".to_string(), gateway_password.to_string())];
        users.extend(devices.iter().map(|(u, p)| (u.to_string(), p.to_string())));
        Self {
            users,
            acl: Some(acl.replace("fleetgw/", &format!("{prefix}/"))),
            use_username_as_clientid: true,
            extra,
        }
    }

    /// The same with the listener on TLS (PEM server certificate and key), as the recipe's
    /// device listener is.
    pub fn with_tls(mut self, dir: &Path, cert_pem: &str, key_pem: &str) -> Self {
        let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
        std::fs::write(&cert, cert_pem).expect("write server.pem");
        std::fs::write(&key, key_pem).expect("write server.key");
        self.extra.push(format!("certfile {}", cert.display()));
        self.extra.push(format!("keyfile {}", key.display()));
        self
    }
}

/// The fenced code block that follows the line containing `title` in a Markdown text.
fn code_block_after(doc: &str, title: &str) -> String {
    let after = &doc[doc
        .find(title)
        .unwrap_or_else(|| panic!("no {title} in the doc"))..];
    let mut lines = after.lines().skip_while(|l| !l.starts_with("```")).skip(1);
    let block: Vec<&str> = lines
        .by_ref()
        .take_while(|l| !l.starts_with("```"))
        .collect();
    block.join("\n") + "\n"
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
