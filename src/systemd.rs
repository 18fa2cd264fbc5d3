//! The service manager's side of the daemon: the `sd_notify` protocol (READY, STATUS,
//! WATCHDOG, RELOADING, STOPPING), the watchdog settings systemd hands over, whether stderr is
//! the journal, and the open-file limit ([`raise_fd_limit`]).
//!
//! The protocol is a datagram of `KEY=VALUE` lines sent to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract socket when it starts with `@`), as
//! sd_notify(3) documents; it is small enough to speak directly, which also gives abstract
//! sockets (the sd-notify crate connects by path only) and one socket opened once. Outside
//! systemd (`NOTIFY_SOCKET` unset) every call does nothing. See docs/architecture.md,
//! "systemd".

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable naming the service manager's notification socket.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// Environment variable with the watchdog timeout in microseconds.
pub const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";
/// Environment variable with the pid the watchdog applies to.
pub const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";

/// Sends notifications to the service manager; does nothing outside systemd.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<UnixDatagram>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, connects to the socket and
    /// removes the three variables from the environment, so processes started later (none
    /// today) do not talk to systemd in our name. Call it before any other thread starts.
    pub fn from_env() -> Self {
        let notifier = Notifier::new(
            std::env::var_os(NOTIFY_SOCKET_ENV).as_deref(),
            std::env::var(WATCHDOG_USEC_ENV).ok().as_deref(),
            std::env::var(WATCHDOG_PID_ENV).ok().as_deref(),
            std::process::id(),
        );
        for var in [NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV] {
            std::env::remove_var(var);
        }
        notifier
    }

    /// A notifier for the given values of the three variables (see [`Notifier::from_env`]).
    /// A socket that cannot be reached is logged and notifications are off.
    pub fn new(
        socket: Option<&std::ffi::OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        pid: u32,
    ) -> Self {
        let socket = socket
            .filter(|s| !s.is_empty())
            .and_then(|s| match connect(s) {
                Ok(sock) => Some(sock),
                Err(e) => {
                    tracing::warn!(
                        "{NOTIFY_SOCKET_ENV}={}: {e}; not telling systemd our state",
                        s.to_string_lossy()
                    );
                    None
                }
            });
        Notifier {
            watchdog: watchdog_timeout(watchdog_usec, watchdog_pid, pid),
            socket,
        }
    }

    /// A notifier that sends nothing (outside systemd, in-process gateways).
    pub fn disabled() -> Self {
        Notifier {
            socket: None,
            watchdog: None,
        }
    }

    /// Whether notifications go anywhere.
    pub fn is_active(&self) -> bool {
        self.socket.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the watchdog timeout, as sd_watchdog_enabled(3)
    /// recommends; `None` when systemd set no watchdog for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
            .filter(|_| self.is_active())
            .map(|timeout| timeout / 2)
    }

    /// Startup finished: `READY=1`.
    pub fn ready(&self) {
        self.send("READY=1\n");
    }

    /// Reload finished (or failed and the running config stays): `READY=1`.
    pub fn reloaded(&self) {
        self.send("READY=1\n");
    }

    /// A reload starts: `RELOADING=1` with the `MONOTONIC_USEC` that systemd 253 and later
    /// (`Type=notify-reload`) want next to it.
    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\n",
            monotonic_usec()
        ));
    }

    /// The orderly shutdown starts: `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1\n");
    }

    /// The daemon is healthy: `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1\n");
    }

    /// One line for `systemctl status`: `STATUS=...` (newlines become spaces).
    pub fn status(&self, text: &str) {
        self.send(&format!("STATUS={}\n", text.replace('\n', " ")));
    }

    fn send(&self, message: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        match socket.send(message.as_bytes()) {
            Ok(n) if n == message.len() => {}
            Ok(n) => tracing::warn!(
                "systemd notification cut short ({n} of {} bytes)",
                message.len()
            ),
            Err(e) => tracing::warn!("systemd notification {:?} not sent: {e}", message.trim()),
        }
    }
}

/// Connects an unbound datagram socket to `$NOTIFY_SOCKET`: a path, or `@name` for the
/// abstract namespace (Linux).
fn connect(addr: &std::ffi::OsStr) -> io::Result<UnixDatagram> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    // A full queue on the manager's side must never stall the main loop (and with it the
    // watchdog): such a notification is dropped and logged; the next one says it again.
    socket.set_nonblocking(true)?;
    let bytes = addr.as_bytes();
    match bytes.split_first() {
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.connect_addr(&addr)?;
        }
        _ => socket.connect(Path::new(addr))?,
    }
    Ok(socket)
}

/// The watchdog timeout from `WATCHDOG_USEC`, unless `WATCHDOG_PID` names another process.
fn watchdog_timeout(usec: Option<&str>, watchdog_pid: Option<&str>, pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    match watchdog_pid {
        Some(p) if p.trim().parse::<u32>().ok() != Some(pid) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM=dev:ino` equal to
/// stderr's device and inode, as systemd.exec(5) says to check): a variable inherited by a
/// process whose stderr was redirected elsewhere does not count.
pub fn stderr_is_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM")
        .is_some_and(|v| stream_matches(&v.to_string_lossy(), libc::STDERR_FILENO))
}

/// Whether `fd` is the file `journal_stream` (`dev:ino`) names.
fn stream_matches(journal_stream: &str, fd: std::os::fd::RawFd) -> bool {
    let Some((dev, ino)) = parse_journal_stream(journal_stream) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the stat buffer for a valid fd or fails; we read it only on success.
    let st = unsafe {
        if libc::fstat(fd, st.as_mut_ptr()) != 0 {
            return false;
        }
        st.assume_init()
    };
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// `dev:ino` (decimal) as systemd writes `JOURNAL_STREAM`.
fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// Waits until every path in `sockets` is a Unix socket that accepts a connection (the admin
/// API's socket before READY=1), polling every 10 ms for at most `within`.
pub async fn wait_for_sockets(sockets: &[PathBuf], within: Duration) -> Result<(), PathBuf> {
    let deadline = tokio::time::Instant::now() + within;
    for path in sockets {
        loop {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(path.clone());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit; returns (before, after).
///
/// systemd starts services with a soft limit of 1,024 (kept for programs that still use
/// `select(2)`) and a hard limit far above it, and asks programs that need more to raise the
/// soft limit themselves (systemd.exec(5), `LimitNOFILE=`). The daemon holds a descriptor
/// per downstream connection and, with device identity, another per upstream link: at the
/// soft limit of 1,024 it would stop accepting devices at about 500. A unit's
/// `LimitNOFILE=` still bounds it, as the hard limit.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit with a valid pointer to a local struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn receiver() -> (tempfile::TempDir, PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (dir, path, sock)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let (_dir, path, sock) = receiver();
        let n = Notifier::new(Some(path.as_os_str()), None, None, 1);
        assert!(n.is_active());
        n.ready();
        assert_eq!(recv(&sock), "READY=1\n");
        n.status("devices: 3\nprovisioned");
        assert_eq!(recv(&sock), "STATUS=devices: 3 provisioned\n");
        n.reloading();
        let msg = recv(&sock);
        let usec: u64 = msg
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|r| r.strip_suffix('\n'))
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("{msg:?}"));
        assert!(usec > 0 && usec <= monotonic_usec());
        n.stopping();
        assert_eq!(recv(&sock), "STOPPING=1\n");
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "fleetgw-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let env = format!("@{name}");
        let n = Notifier::new(Some(OsStr::new(&env)), None, None, 1);
        n.watchdog();
        assert_eq!(recv(&sock), "WATCHDOG=1\n");
    }

    #[test]
    fn outside_systemd_nothing_is_sent_and_nothing_fails() {
        let n = Notifier::new(None, Some("1000000"), None, 1);
        assert!(!n.is_active());
        assert_eq!(n.watchdog_interval(), None);
        n.ready();
        n.watchdog();
        let unreachable = Notifier::new(Some(OsStr::new("/nonexistent/notify")), None, None, 1);
        assert!(!unreachable.is_active());
    }

    #[test]
    fn the_watchdog_is_half_the_timeout_and_only_for_our_pid() {
        assert_eq!(
            watchdog_timeout(Some("30000000"), Some("42"), 42),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_timeout(Some("30000000"), None, 42),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_timeout(Some("30000000"), Some("43"), 42), None);
        assert_eq!(watchdog_timeout(Some("0"), None, 42), None);
        assert_eq!(watchdog_timeout(Some("x"), None, 42), None);
        assert_eq!(watchdog_timeout(None, Some("42"), 42), None);
        let (_dir, path, _sock) = receiver();
        let n = Notifier::new(Some(path.as_os_str()), Some("2000000"), Some("7"), 7);
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(1)));
    }

    #[test]
    fn journal_stream_is_parsed_as_dev_colon_ino() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:"), None);
        assert_eq!(parse_journal_stream("junk"), None);
    }

    #[test]
    fn only_the_stream_journal_stream_names_counts_as_the_journal() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let file = tempfile::tempfile().unwrap();
        let other = tempfile::tempfile().unwrap();
        let meta = file.metadata().unwrap();
        let value = format!("{}:{}", meta.dev(), meta.ino());
        assert!(stream_matches(&value, file.as_raw_fd()));
        assert!(!stream_matches(&value, other.as_raw_fd()));
        assert!(!stream_matches("garbage", file.as_raw_fd()));
    }

    #[tokio::test]
    async fn ready_waits_for_a_socket_that_appears_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let missing =
            wait_for_sockets(std::slice::from_ref(&path), Duration::from_millis(50)).await;
        assert_eq!(missing, Err(path.clone()));
        let bind_path = path.clone();
        let binder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tokio::net::UnixListener::bind(&bind_path).unwrap()
        });
        wait_for_sockets(std::slice::from_ref(&path), Duration::from_secs(10))
            .await
            .unwrap();
        // It returned only once the listener existed.
        let _listener = binder.await.unwrap();
        assert!(path.exists());
    }
}
