//! The admin API: HTTP/1.1 + JSON on a Unix socket (and optionally on a loopback TCP port),
//! for the `fleetgw` CLI and operators' tools (docs/architecture.md, "Admin API").
//!
//! One file per resource: [`devices`] (one device and its actions), [`credentials`],
//! [`devices_list`], [`operations`] (reprovisioning, `/operations/{id}`), [`device_groups`],
//! [`enrollment_groups`] (credentials admission consults besides the config's)
//! (`GET /devices` with filters and paging), [`status`] (`/status`, `/metrics`). Around them:
//! [`auth`] decides per connection who the caller is and what it may do, [`error`] gives every
//! response a request id and every error one JSON shape, and [`filter`] parses `$filter`.
//!
//! The accept loops are our own rather than `axum::serve`: each connection's peer credentials
//! are read at accept and attached to its requests, the number of connections is capped, and
//! hyper reads headers with a timeout, so a local process cannot hold the API with idle or
//! slow connections.

pub mod auth;
pub mod credentials;
pub mod device_groups;
pub mod devices;
pub mod devices_list;
pub mod enrollment_groups;
pub mod error;
pub mod filter;
pub mod health;
pub mod openapi;
pub mod operations;
pub mod status;
pub mod view;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tower::ServiceExt as _;

use crate::admission::{AdmissionMode, EnrollmentSet};
use crate::device_id::DeviceId;
use crate::downstream::{BrokerConnections, ConnectionFacts};
use crate::identity::{Sealer, Secret};
use crate::provision::{Engine, EngineStats};
use crate::store::Store;
use crate::telemetry::TelemetryStats;
use auth::{AccessPolicy, BearerToken, Caller};

/// Connections served at once per listener; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections one local user (other than root and the daemon's user) may hold at once; more
/// are closed at accept, so one user cannot take every slot.
pub const MAX_CONNECTIONS_PER_UID: usize = 8;
/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a request may take, body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Closes a device's upstream telemetry link.
pub type LinkCloser = Arc<dyn Fn(&DeviceId) + Send + Sync>;

/// Counters of the gateway's parts, read for `/status` and `/metrics`.
pub type StatsSource<T> = Arc<dyn Fn() -> T + Send + Sync>;

/// What the admin API works on.
#[derive(Clone)]
pub struct AdminParts {
    /// The state store.
    pub store: Store,
    /// The configured admission mode (unblock goes back to waitingApproval in approve mode).
    pub mode: AdmissionMode,
    /// The provisioning engine, to drive approved devices (absent in tests of the API alone).
    pub engine: Option<Arc<Engine>>,
    /// The embedded broker's connections (absent with an external broker).
    pub broker: Option<BrokerConnections>,
    /// Telemetry counters.
    pub telemetry: Option<StatsSource<TelemetryStats>>,
    /// The symmetric-key group key, to show a device its derived key (symmetric-key mode).
    pub group_key: Option<Secret>,
    /// Opens sealed device keys (root's `includePrivateKey`).
    pub sealer: Option<Arc<Sealer>>,
    /// Closes a device's upstream telemetry connection (its certificate was replaced).
    pub close_upstream: Option<LinkCloser>,
    /// Admission's enrollment-group credentials, rebuilt when groups change.
    pub enrollments: Option<EnrollmentSet>,
    /// Cloud sessions connected and configured (AWS: the claim sessions).
    pub cloud_sessions: Option<StatsSource<(usize, usize)>>,
}

impl AdminParts {
    /// Parts over `store` in admission `mode`, with nothing else attached.
    pub fn new(store: Store, mode: AdmissionMode) -> Self {
        AdminParts {
            store,
            mode,
            engine: None,
            broker: None,
            telemetry: None,
            group_key: None,
            sealer: None,
            close_upstream: None,
            enrollments: None,
            cloud_sessions: None,
        }
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AdminState(Arc<StateInner>);

/// The inside of [`AdminState`].
pub struct StateInner {
    parts: AdminParts,
    started: Instant,
    stopping: std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for AdminState {
    type Target = AdminParts;
    fn deref(&self) -> &AdminParts {
        &self.0.parts
    }
}

impl AdminState {
    /// State over `parts`, started now.
    pub fn new(parts: AdminParts) -> Self {
        AdminState(Arc::new(StateInner {
            parts,
            started: Instant::now(),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The device's current broker connection, if the embedded broker has one.
    pub fn connection(&self, id: &str) -> Option<ConnectionFacts> {
        self.broker.as_ref().and_then(|b| b.facts(id))
    }

    /// Closes the device's broker connection and discards its session.
    pub fn disconnect(&self, id: &str) -> bool {
        self.broker.as_ref().is_some_and(|b| b.disconnect(id))
    }

    /// Closes the device's upstream telemetry connection, if telemetry has one.
    pub fn close_upstream(&self, id: &DeviceId) {
        if let Some(close) = &self.close_upstream {
            close(id);
        }
    }

    /// Whether the server is shutting down (background watchers stop).
    pub fn stopping(&self) -> bool {
        self.0.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues the device for the engine.
    pub fn schedule(&self, id: &DeviceId) {
        if let Some(e) = &self.engine {
            e.schedule(id);
        }
    }

    /// Engine counters (zero without an engine).
    pub fn engine_stats(&self) -> EngineStats {
        self.engine.as_ref().map(|e| e.stats()).unwrap_or_default()
    }

    /// Seconds since the API started.
    pub fn uptime(&self) -> Duration {
        self.0.started.elapsed()
    }
}

/// The API's routes over `state`, with the request-id, authorization and body-limit layers.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/devices", get(devices_list::list_devices))
        .route(
            "/devices/{id}",
            get(devices::get_device)
                .patch(devices::patch_device)
                .delete(devices::delete_device),
        )
        .route(
            "/devices/{id}/credentials",
            get(credentials::get_credentials),
        )
        .route("/devices/{id}/approve", post(devices::approve))
        .route("/devices/{id}/block", post(devices::block))
        .route("/devices/{id}/unblock", post(devices::unblock))
        .route("/devices/{id}/reprovision", post(operations::reprovision))
        .route("/operations/{id}", get(operations::get_operation))
        .route("/deviceGroups", get(device_groups::list_groups))
        .route(
            "/deviceGroups/{id}",
            get(device_groups::get_group)
                .put(device_groups::put_group)
                .patch(device_groups::patch_group)
                .delete(device_groups::delete_group),
        )
        .route(
            "/deviceGroups/{id}/devices",
            get(device_groups::group_devices),
        )
        .route("/enrollmentGroups", get(enrollment_groups::list_groups))
        .route(
            "/enrollmentGroups/{id}",
            get(enrollment_groups::get_group)
                .put(enrollment_groups::put_group)
                .patch(enrollment_groups::patch_group)
                .delete(enrollment_groups::delete_group),
        )
        .route(
            "/enrollmentGroups/{id}/keys",
            get(enrollment_groups::get_keys),
        )
        .route(
            "/enrollmentGroups/{id}/certificates/{entry}",
            get(enrollment_groups::get_certificate)
                .put(enrollment_groups::put_certificate)
                .delete(enrollment_groups::delete_certificate),
        )
        .route(
            "/enrollmentGroups/{id}/certificates/{entry}/generateVerificationCode",
            post(enrollment_groups::generate_verification_code),
        )
        .route(
            "/enrollmentGroups/{id}/certificates/{entry}/verify",
            post(enrollment_groups::verify),
        )
        .route("/health", get(health::get_health))
        .route("/status", get(status::get_status))
        .route("/metrics", get(status::get_metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .layer(DefaultBodyLimit::max(error::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(auth::authorize))
        .layer(axum::middleware::from_fn(error::request_id))
        .with_state(state)
}

/// Where and how the API listens (`[admin]` of the config).
#[derive(Clone, Debug)]
pub struct AdminOptions {
    /// The Unix socket.
    pub socket: PathBuf,
    /// `admin.group`
    pub group: String,
    /// `admin.read_group`
    pub read_group: String,
    /// `admin.listen`
    pub listen: Option<std::net::SocketAddr>,
    /// `admin.token_file`
    pub token_file: Option<PathBuf>,
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The socket path is taken by a live server or by something that is not a socket.
    #[error("admin.socket {path}: {reason}")]
    SocketInUse {
        /// The path.
        path: PathBuf,
        /// What is there.
        reason: String,
    },
    /// Binding, chmod or chown failed.
    #[error("{key} {what}: {source}")]
    Io {
        /// The config key.
        key: &'static str,
        /// What was being done, and where.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The token file is unusable.
    #[error(transparent)]
    Token(#[from] auth::TokenError),
}

/// The running API; [`AdminServer::shutdown`] stops it and removes the socket.
pub struct AdminServer {
    state: AdminState,
    socket: PathBuf,
    tcp_addr: Option<std::net::SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl AdminServer {
    /// Binds the socket (0660, group `admin.group`) and the TCP listener if configured, and
    /// serves `parts` until shutdown.
    pub async fn start(opts: &AdminOptions, parts: AdminParts) -> Result<Self, AdminError> {
        let policy = Arc::new(AccessPolicy::resolve(&opts.group, &opts.read_group));
        let token = match (&opts.listen, &opts.token_file) {
            (Some(_), Some(path)) => Some(BearerToken::from_file(path)?),
            _ => None,
        };
        let unix = bind_socket(&opts.socket, policy.write_gid())?;
        let tcp = match opts.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| AdminError::Io {
                        key: "admin.listen",
                        what: format!("binding {addr}"),
                        source,
                    })?,
            ),
            None => None,
        };
        let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
        let state = AdminState::new(parts);
        operations::resume(&state);
        if let Err(e) = enrollment_groups::refresh(&state) {
            tracing::warn!("admin: loading enrollment groups: {}", e.message);
        }
        let app = router(state.clone());
        let (stop, _) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(serve_unix(
            unix,
            policy,
            app.clone(),
            stop.subscribe(),
        ))];
        if let (Some(tcp), Some(token)) = (tcp, token) {
            tasks.push(tokio::spawn(serve_tcp(tcp, token, app, stop.subscribe())));
        }
        tracing::info!(socket = %opts.socket.display(), tcp = ?tcp_addr, "admin API listening");
        Ok(AdminServer {
            state,
            socket: opts.socket.clone(),
            tcp_addr,
            stop,
            tasks,
        })
    }

    /// The bound address of the TCP listener (port 0 resolved), if any.
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp_addr
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops accepting, ends the accept loops and removes the socket file.
    pub async fn shutdown(self) {
        self.state
            .0
            .stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Binds the Unix socket: an existing socket nobody answers on is stale and replaced; a live
/// one or a non-socket file is an error. Then mode 0660 and the admin group, explicitly: the
/// unit's UMask=0077 would otherwise leave it 0600 (too tight) and a wider umask too loose.
fn bind_socket(path: &Path, gid: Option<u32>) -> Result<UnixListener, AdminError> {
    let io = |what: String| {
        move |source| AdminError::Io {
            key: "admin.socket",
            what,
            source,
        }
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AdminError::SocketInUse {
                    path: path.to_owned(),
                    reason: "another process serves it (is fleetgw already running?)".into(),
                });
            }
            std::fs::remove_file(path).map_err(io(format!("removing stale {}", path.display())))?;
        }
        Ok(_) => {
            return Err(AdminError::SocketInUse {
                path: path.to_owned(),
                reason: "exists and is not a socket; remove it or choose another path".into(),
            })
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io(format!("chmod 0660 {}", path.display())))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(io(format!("chown to group {gid} {}", path.display())))?;
    }
    Ok(listener)
}

/// One connection of a local user, counted until it ends.
struct UidSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>,
    uid: u32,
}

impl UidSlot {
    /// A slot for `uid`, or `None` when it holds [`MAX_CONNECTIONS_PER_UID`] already.
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>,
        uid: u32,
    ) -> Option<Self> {
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.entry(uid).or_default();
        if *n >= MAX_CONNECTIONS_PER_UID {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            counts: counts.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.uid);
            }
        }
    }
}

/// Serves one connection with `caller` attached to each of its requests; `held` (the
/// connection's slots) is released when it ends.
fn serve_connection<S, H>(
    io: S,
    caller: Caller,
    token: Option<BearerToken>,
    app: Router,
    held: H,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Send + 'static,
{
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(caller.clone());
            if let Some(t) = &token {
                req.extensions_mut().insert(t.clone());
            }
            let app = app.clone();
            async move {
                let req = req.map(axum::body::Body::new);
                match tokio::time::timeout(REQUEST_TIMEOUT, app.oneshot(req)).await {
                    Ok(resp) => resp,
                    Err(_) => {
                        let e = error::ApiError::new(
                            axum::http::StatusCode::REQUEST_TIMEOUT,
                            "RequestTimeout",
                            "the request took too long",
                        );
                        Ok(error::finish(
                            axum::response::IntoResponse::into_response(e),
                            &error::new_request_id(),
                        ))
                    }
                }
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("admin connection: {e}");
                }
            }
            _ = stopped(&mut stop) => {}
        }
        drop(held);
    });
}

/// Resolves once shutdown is asked for.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn accept_backoff(e: &std::io::Error) {
    // EMFILE and friends: wait rather than spin.
    tracing::warn!("admin API: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn serve_unix(
    listener: UnixListener,
    policy: Arc<AccessPolicy>,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_uid = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stopped(&mut stop) => return,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { accept_backoff(&e).await; continue; }
            },
            _ = stopped(&mut stop) => return,
        };
        let caller = match stream.peer_cred() {
            Ok(cred) => Caller::Local {
                uid: cred.uid(),
                gid: cred.gid(),
                role: policy.role_of(cred.uid(), cred.gid()),
            },
            Err(e) => {
                tracing::warn!("admin API: no peer credentials ({e}); connection closed");
                continue;
            }
        };
        let uid_slot = match &caller {
            Caller::Local { uid, .. } if !policy.is_privileged(*uid) => {
                match UidSlot::take(&per_uid, *uid) {
                    Some(slot) => Some(slot),
                    None => {
                        tracing::debug!(
                            uid,
                            "admin API: too many connections from this user; closed"
                        );
                        continue;
                    }
                }
            }
            _ => None,
        };
        serve_connection(
            stream,
            caller,
            None,
            app.clone(),
            (permit, uid_slot),
            stop.clone(),
        );
    }
}

async fn serve_tcp(
    listener: TcpListener,
    token: BearerToken,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stopped(&mut stop) => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => { accept_backoff(&e).await; continue; }
            },
            _ = stopped(&mut stop) => return,
        };
        serve_connection(
            stream,
            Caller::Tcp { peer },
            Some(token.clone()),
            app.clone(),
            permit,
            stop.clone(),
        );
    }
}
