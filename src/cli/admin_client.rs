//! The CLI's side of the admin API: one HTTP/1.1 request per call over the daemon's Unix
//! socket, and the mapping of what can go wrong to an exit code and one line that says what
//! to do (69: daemon not running, 77: permission denied, 70: anything else).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::ConfigArgs;

/// Exit code: the daemon is not running or its socket is missing (sysexits EX_UNAVAILABLE).
pub const EX_UNAVAILABLE: u8 = 69;
/// Exit code: permission denied (sysexits EX_NOPERM).
pub const EX_NOPERM: u8 = 77;

/// Exit code: a file to write exists already (sysexits EX_CANTCREAT).
pub const EX_CANTCREAT: u8 = 73;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the admin socket is: `--socket`, else `admin.socket` of the config.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArgs {
    /// The admin socket (default: admin.socket of the config).
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,

    #[command(flatten)]
    pub config: ConfigArgs,

    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A failed CLI call: its exit code and message.
#[derive(Debug)]
pub struct CliFailure {
    /// Exit code.
    pub code: u8,
    /// One line saying what went wrong and what to do.
    pub message: String,
}

impl CliFailure {
    /// A failure with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        CliFailure {
            code,
            message: message.into(),
        }
    }

    /// Prints the message and returns the exit code.
    pub fn exit(&self) -> ExitCode {
        eprintln!("fleetgw: {}", self.message);
        ExitCode::from(self.code)
    }
}

impl SocketArgs {
    /// The socket path to use.
    pub fn socket_path(&self) -> Result<PathBuf, CliFailure> {
        if let Some(p) = &self.socket {
            return Ok(p.clone());
        }
        if !self.config.config.exists() && self.config.overrides.is_empty() {
            return Ok(crate::config::Config::default().admin.socket);
        }
        crate::config::load(&self.config.config, &self.config.overrides)
            .map(|c| c.admin.socket)
            .map_err(|e| CliFailure::new(super::EX_CONFIG, format!("{e} (or pass --socket PATH)")))
    }
}

/// A response of the API.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (`null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// `Ok(self)` for 2xx; otherwise the API's error as a failure (403 -> 77, else 70).
    pub fn ok(self) -> Result<Self, CliFailure> {
        if self.status.is_success() {
            return Ok(self);
        }
        let v = self.json();
        let message = v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
        let code =
            if self.status == StatusCode::FORBIDDEN || self.status == StatusCode::UNAUTHORIZED {
                EX_NOPERM
            } else {
                super::EX_SOFTWARE
            };
        Err(CliFailure::new(
            code,
            format!("{} ({})", message, self.status.as_u16()),
        ))
    }
}

/// Sends one request to the daemon at `socket`.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<Reply, CliFailure> {
    tokio::time::timeout(REQUEST_TIMEOUT, call_inner(socket, method, path, body))
        .await
        .map_err(|_| {
            CliFailure::new(
                super::EX_SOFTWARE,
                format!(
                    "the daemon did not answer within {}s; check `systemctl status fleetgw`",
                    REQUEST_TIMEOUT.as_secs()
                ),
            )
        })?
}

async fn call_inner(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<Reply, CliFailure> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        let at = socket.display();
        match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => CliFailure::new(
                EX_UNAVAILABLE,
                format!("the fleetgw daemon is not running (nothing answers at {at}); start it (systemctl start fleetgw) or pass --socket PATH"),
            ),
            std::io::ErrorKind::PermissionDenied => CliFailure::new(
                EX_NOPERM,
                format!("permission denied on {at}; run as root or as a member of admin.group / admin.read_group"),
            ),
            _ => CliFailure::new(super::EX_SOFTWARE, format!("connecting to {at}: {e}")),
        }
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| CliFailure::new(super::EX_SOFTWARE, format!("admin socket: {e}")))?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost");
    let bytes = match body {
        Some(v) => {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(serde_json::to_vec(v).unwrap_or_default())
        }
        None => Bytes::new(),
    };
    let req = req
        .body(Full::new(bytes))
        .map_err(|e| CliFailure::new(super::EX_SOFTWARE, format!("building the request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| CliFailure::new(super::EX_SOFTWARE, format!("admin request failed: {e}")))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| CliFailure::new(super::EX_SOFTWARE, format!("reading the answer: {e}")))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        body,
    })
}
