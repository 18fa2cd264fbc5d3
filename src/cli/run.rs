//! `fleetgw run`: the daemon. Loads the config, opens the store, starts downstream (the
//! embedded broker by default), the cloud provider, the provisioning engine and the telemetry
//! pipeline (the downstream messages are split between the two), then hands over to the
//! main loop ([`super::service`]: readiness, status, watchdog, reload), and on SIGTERM/SIGINT
//! shuts down cleanly: intake stops, steps in flight persist their result, upstream
//! connections close (unsent telemetry stays in the outbox), the store is flushed, exit 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{AdminOptions, AdminParts, AdminServer};
use crate::admission::{self, Admission, AdmissionOptions, EnrollmentSet, SharedAdmission};
use crate::cloud::Provider;
use crate::config::{self, BrokerMode, Config, DownstreamAuth};
use crate::downstream::device_auth::{DeviceConnectCheck, Proof};
use crate::downstream::{
    gateway_client_id, AccessRules, BrokerOptions, Downstream, DownstreamOptions,
    EmbeddedBrokerOptions, EmbeddedTls, ExternalBrokerOptions, Inbound, InboundQueues, LocalUser,
    TopicPrefix, UserRights,
};
use crate::identity::{self, PrivateKey, Sealer, Secret};
use crate::provision::{
    Engine, EngineOptions, EngineParts, EngineStats, KeyDelivery, RequestPolicy,
};
use crate::store::{Store, StoreOptions};
use crate::telemetry::{self, GatewayCredentials, Telemetry, TelemetryStats};

use super::cloud::{telemetry_options, ProviderPlan};
use super::service::{self, Signals};
use super::{logging, ConfigArgs, LogFormat, EX_CONFIG, EX_IOERR, EX_SOFTWARE};
use crate::systemd::Notifier;

/// Arguments of `fleetgw run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{key}: {reason}")]
    Config { key: &'static str, reason: String },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {source}")]
    Identity {
        key: &'static str,
        #[source]
        source: identity::IdentityError,
    },
    #[error("admission: {0}")]
    Admission(#[from] admission::AdmissionError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("downstream: {0}")]
    Downstream(#[from] crate::downstream::DownstreamError),
    #[error("telemetry: {0}")]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("admin API: {0}")]
    Admin(#[from] crate::admin::AdminError),
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// A store flush failed: the daemon stops at once (exit 74) so that systemd restarts it.
    #[error("store: state directory {dir}: flush to disk failed, exiting so that recovery replays the log: {message}")]
    StoreFailed { dir: PathBuf, message: String },
}

impl RunError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            RunError::Config { .. }
            | RunError::Identity { .. }
            | RunError::Admission(_)
            | RunError::Telemetry(_) => EX_CONFIG,
            RunError::Read { .. }
            | RunError::Store(_)
            | RunError::StoreFailed { .. }
            | RunError::Admin(_) => EX_IOERR,
            RunError::Downstream(_) | RunError::Runtime(_) | RunError::Signals(_) => EX_SOFTWARE,
        })
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
/// A write past the process's file size limit (`RLIMIT_FSIZE`, `LimitFSIZE=` in a unit) sends
/// SIGXFSZ, whose default action kills the process; ignored, the write fails with EFBIG
/// instead, which the store treats like a full disk (docs/src/reliability.md, "Disk full").
fn ignore_sigxfsz() {
    // SAFETY: setting a signal's disposition to SIG_IGN, before any other thread exists; no
    // handler runs.
    let previous = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    if previous == libc::SIG_ERR {
        tracing::warn!(
            "could not ignore SIGXFSZ: a write past the file size limit would kill the daemon"
        );
    }
}

/// The daemon's own allocations go to mimalloc (`fleetgw::allocator`), but glibc's malloc
/// still serves the C libraries: aws-lc during TLS handshakes and key generation, OpenSSL
/// when a key is imported. glibc gives every thread that allocates under contention an arena
/// of its own, up to eight per core, and memory freed in one arena is never reused by
/// another, so memory made on one worker thread and freed on another fragments the heap
/// across arenas. One arena per worker thread (tokio starts one per core) keeps allocation
/// uncontended and that waste small. `MALLOC_ARENA_MAX` in the environment still decides
/// when it is set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arenas = libc::c_int::try_from(workers.max(2)).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes an allocator tunable; called before any other thread
    // exists, it races with no allocation.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) } != 1 {
        tracing::debug!("mallopt(M_ARENA_MAX) refused; glibc's default arenas stay");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

pub fn run(args: Args, log_format: Option<LogFormat>) -> ExitCode {
    // Before any thread starts: it takes the systemd variables out of the environment.
    let notifier = Notifier::from_env();
    let cfg = match config::load(&args.config.config, &args.config.overrides) {
        Ok(cfg) => cfg,
        Err(e) => {
            logging::init(log_format, None);
            eprintln!("fleetgw: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let format = log_format.or(match cfg.log.format {
        config::LogFormat::Text => None,
        config::LogFormat::Json => Some(LogFormat::Json),
    });
    logging::init(format, Some(&log_filter(&cfg.log.level)));
    ignore_sigxfsz();
    limit_malloc_arenas();
    match crate::systemd::raise_fd_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!(before, after, "open-file limit raised to the hard limit");
        }
        Ok((_, now)) => tracing::debug!(limit = now, "open-file limit"),
        Err(e) => tracing::warn!(
            "open-file limit not raised ({e}): the daemon takes as many devices as the soft limit allows, about half of it"
        ),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fleetgw")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&RunError::Runtime(e)),
    };
    match runtime.block_on(daemon(cfg, &args.config, &notifier)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ RunError::StoreFailed { .. }) => {
            let code = fail(&e);
            // Tasks still waiting on the failed store are not waited for.
            runtime.shutdown_background();
            code
        }
        Err(e) => fail(&e),
    }
}

/// The configured filter, with the MQTT client library's per-connection chatter kept to
/// warnings unless the filter names it itself.
pub(super) fn log_filter(level: &str) -> String {
    let mut filter = level.to_string();
    if !level.contains("rumqttc") {
        filter.push_str(",rumqttc=warn");
    }
    filter
}

fn fail(e: &RunError) -> ExitCode {
    tracing::error!("{e}");
    eprintln!("fleetgw: {e}");
    e.exit_code()
}

async fn daemon(cfg: Config, args: &ConfigArgs, notifier: &Notifier) -> Result<(), RunError> {
    // Installed first: from here on SIGHUP and SIGTERM no longer kill the process unflushed.
    let mut signals = Signals::install().map_err(RunError::Signals)?;
    let gateway = Gateway::start(&cfg).await?;
    tracing::info!(
        gateway = %cfg.gateway.id,
        admission = %cfg.admission.mode,
        sessions = cfg.cloud.aws.sessions,
        "fleetgw ready"
    );
    // READY=1 once the admin API answers (operators and ExecStartPost scripts use it at once);
    // an external broker is never waited for (the gateway session reconnects on its own).
    let ready_sockets: Vec<PathBuf> = vec![cfg.admin.socket.clone()];
    let served = service::serve(&gateway, cfg, args, notifier, &mut signals, &ready_sockets).await;
    let signal = match served {
        Ok(signal) => signal,
        Err(e @ RunError::StoreFailed { .. }) => {
            notifier.stopping();
            return Err(e);
        }
        Err(e) => {
            notifier.stopping();
            gateway.shutdown().await?;
            return Err(e);
        }
    };
    tracing::info!(
        signal,
        "shutting down: no new requests; finishing steps in flight"
    );
    let telemetry = gateway.telemetry_stats();
    let stats = gateway.shutdown().await?;
    tracing::info!(
        provisioned = stats.provisioned,
        failed = stats.failed,
        unfinished = stats.active,
        telemetry_forwarded = telemetry.forwarded,
        telemetry_in_outbox = telemetry.outbox_messages,
        "stopped; store flushed"
    );
    Ok(())
}

/// The running gateway: store, downstream (broker and session), cloud provider,
/// provisioning engine and telemetry pipeline. `fleetgw run` wraps it with signals and systemd readiness; `fleetgw
/// demo` runs it in-process next to the emulator and the simulated devices.
pub struct Gateway {
    store: Store,
    downstream: Downstream,
    provider: Arc<dyn Provider>,
    engine: Arc<Engine>,
    telemetry: Telemetry,
    admin: AdminServer,
    admission: SharedAdmission,
    /// The enrollment groups every admission decision consults (config plus the admin API's
    /// stored groups); a reload builds the new rules over the same set.
    enrollments: EnrollmentSet,
}

impl Gateway {
    /// Opens the store, starts downstream (the embedded broker listens and the session is
    /// subscribed when this returns), the cloud provider, the engine and telemetry.
    pub async fn start(cfg: &Config) -> Result<Self, RunError> {
        // One set of enrollment-group credentials for every admission check, replaced by the
        // admin API when groups change; the rules themselves are swapped whole on reload.
        let enrollments = EnrollmentSet::default();
        let admission =
            SharedAdmission::from(Admission::new(admission_options(cfg, &enrollments)?)?);
        // The engine owns its sealer; telemetry opens device keys with its own copy.
        let telemetry_sealer = sealer(cfg)?.map(Arc::new);
        let admin_sealer = telemetry_sealer.clone();
        let group_key = match cfg.admission.mode {
            config::AdmissionMode::SymmetricKey => admission_options(cfg, &enrollments)?.group_key,
            _ => None,
        };
        let sealer = sealer(cfg)?;
        let plan = ProviderPlan::from_config(cfg)?;
        let telemetry_opts = telemetry_options(cfg, plan.profile())?;

        let store = Store::open(
            &cfg.gateway.state_dir,
            &StoreOptions {
                cache_capacity: cfg.store.cache_capacity_bytes,
                flush_interval_ms: (cfg.store.flush_interval_ms > 0)
                    .then_some(cfg.store.flush_interval_ms),
                min_commit_interval: Duration::from_micros(cfg.store.min_commit_interval_us),
            },
        )?;
        // Ownership tokens are sealed with the same key as device keys.
        if let Some(sealer) = &telemetry_sealer {
            store.seal_tokens_with(Arc::clone(sealer));
        }
        // No device count here: sled counts by scanning every record (the STATUS= line counts
        // them in the background after READY).
        tracing::info!(dir = %cfg.gateway.state_dir.display(), "store open");

        let downstream_opts = downstream_options(cfg, &store, &admission)?;
        let max_request_bytes = cfg.downstream.max_request_bytes as usize;
        // Provisioning requests to the engine, telemetry to the pipeline, each queue with its
        // own backpressure, routed by the session as it reads them. Acks still leave in arrival
        // order (downstream session), so each consumer acks once it has persisted.
        let (
            downstream,
            InboundQueues {
                provisioning: requests,
                telemetry: telemetry_rx,
            },
        ) = Downstream::start_routed(&downstream_opts, |s| {
            s.max_request_bytes = max_request_bytes;
        })
        .await?;
        if let Some(broker) = downstream.broker() {
            tracing::info!(listen = %broker.listen_addr(), tls = broker.is_tls(), "embedded broker listening");
        }

        let provider = plan.start();
        let engine = Engine::start(
            EngineParts {
                store: store.clone(),
                provider: provider.clone(),
                downstream: downstream.session().clone(),
                admission: admission.clone(),
                sealer,
            },
            {
                let mut opts = engine_options(cfg);
                // With the embedded broker the gateway knows each device's connection, so a
                // generated key goes only where it cannot be read off the local network.
                if let (Some(broker), false) =
                    (downstream.broker(), cfg.downstream.allow_plain_key_delivery)
                {
                    opts.key_delivery = KeyDelivery::Secure {
                        connections: broker.connections(),
                        trust_loopback: true,
                    };
                }
                opts
            },
            requests,
        );
        let engine = Arc::new(engine);
        let mut telemetry_opts = telemetry_opts;
        telemetry_opts.upstreams = provider.clone();
        let telemetry = Telemetry::start(
            telemetry_opts,
            store.clone(),
            downstream.session().clone(),
            telemetry_sealer,
            telemetry_rx,
        )?;
        let admin = AdminServer::start(
            &AdminOptions {
                socket: cfg.admin.socket.clone(),
                group: cfg.admin.group.clone(),
                read_group: cfg.admin.read_group.clone(),
                listen: cfg.admin.listen,
                token_file: cfg.admin.token_file.clone(),
            },
            AdminParts {
                store: store.clone(),
                mode: cfg.admission.mode,
                engine: Some(engine.clone()),
                broker: downstream.broker().map(|b| b.connections()),
                telemetry: Some(telemetry.stats_source()),
                group_key,
                sealer: admin_sealer,
                close_upstream: Some(telemetry.link_closer()),
                enrollments: Some(enrollments.clone()),
                cloud_sessions: Some({
                    let provider = provider.clone();
                    Arc::new(move || provider.sessions())
                }),
            },
        )
        .await?;
        Ok(Self {
            store,
            downstream,
            provider,
            engine,
            telemetry,
            admin,
            admission,
            enrollments,
        })
    }

    /// Where devices connect to the embedded broker (port 0 in the config resolved); `None`
    /// with an external broker.
    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.downstream.broker().map(|b| b.listen_addr())
    }

    /// Telemetry counters (messages accepted, forwarded, refused, in the outbox, ...).
    pub fn telemetry_stats(&self) -> TelemetryStats {
        self.telemetry.stats()
    }

    /// The state store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The cloud provider (its rate can change on reload).
    pub fn provider(&self) -> &dyn Provider {
        self.provider.as_ref()
    }

    /// The provisioning engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The enrollment groups every admission decision consults.
    pub fn enrollments(&self) -> &EnrollmentSet {
        &self.enrollments
    }

    /// The admission rules shared by the engine and the broker's CONNECT check (replaced by a
    /// reload).
    pub fn admission(&self) -> &SharedAdmission {
        &self.admission
    }

    /// Puts `cfg`'s `[[downstream.users]]` in force in the embedded broker; false with an
    /// external broker (whose users are its own business).
    pub fn set_users(&self, cfg: &Config) -> bool {
        match self.downstream.broker() {
            Some(broker) => {
                broker.set_users(local_users(cfg));
                true
            }
            None => false,
        }
    }

    /// The one-line state for `systemctl status`, with the per-state device counts given.
    pub fn status_line(
        &self,
        counts: &Option<std::collections::BTreeMap<&'static str, u64>>,
    ) -> String {
        let telemetry = self.telemetry.stats();
        service::status_text(
            counts,
            telemetry.outbox_messages,
            self.provider.sessions(),
            telemetry.open_connections,
        )
    }

    /// The watchdog's health check: a write and read back through the store (flushed), and
    /// the engine's and telemetry's loops alive.
    pub async fn health_check(&self) -> Result<(), String> {
        if let Some(e) = self.store.fatal_error() {
            return Err(format!("the store failed to flush: {e}"));
        }
        if !self.engine.is_alive() {
            return Err("the provisioning engine's loops have stopped".into());
        }
        if !self.telemetry.is_alive() {
            return Err("the telemetry pipeline's loops have stopped".into());
        }
        // A full disk is ridden out in-process (the store reopens by itself once space is
        // back); a restart by the watchdog would not make room.
        if self.store.health().full.is_some() {
            return Ok(());
        }
        let stamp = crate::clock::unix_ms().to_be_bytes();
        self.store
            .put_meta(HEALTH_KEY, &stamp)
            .await
            .map_err(|e| format!("store write: {e}"))?;
        match self.store.meta(HEALTH_KEY) {
            Ok(Some(read)) if read == stamp => Ok(()),
            Ok(_) => Err("store read back a different value than written".into()),
            Err(e) => Err(format!("store read: {e}")),
        }
    }

    /// Stops intake, lets steps in flight persist their result, closes the cloud, upstream
    /// telemetry and downstream sessions and flushes the store.
    pub async fn shutdown(self) -> Result<EngineStats, RunError> {
        self.admin.shutdown().await;
        self.engine.shutdown().await;
        self.provider.shutdown().await;
        self.telemetry.shutdown(Duration::from_secs(5)).await;
        self.downstream.shutdown(Duration::from_secs(2)).await;
        self.store.flush_blocking()?;
        Ok(self.engine.stats())
    }
}

/// `meta` key the watchdog's health check writes and reads back.
const HEALTH_KEY: &str = "health_check";

pub(super) fn read_text(path: &Path) -> Result<String, RunError> {
    std::fs::read_to_string(path).map_err(|source| RunError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A base64 group key given inline (config key `key`) or in a file (`{key}_file`), decoded;
/// `None` when neither is set.
pub(super) fn read_group_key(
    inline: Option<&Secret>,
    file: Option<&Path>,
    key: &str,
) -> Result<Option<Secret>, RunError> {
    Ok(match (inline, file) {
        (Some(text), _) => Some(admission::decode_group_key(text, key)?),
        (None, Some(path)) => {
            let text = Secret::from(read_text(path)?);
            Some(admission::decode_group_key(
                &text,
                &format!("{key}_file {}", path.display()),
            )?)
        }
        (None, None) => None,
    })
}

pub(super) fn admission_options(
    cfg: &Config,
    enrollments: &EnrollmentSet,
) -> Result<AdmissionOptions, RunError> {
    let a = &cfg.admission;
    let group_key = read_group_key(
        a.group_key.as_ref(),
        a.group_key_file.as_deref(),
        "admission.group_key",
    )?;
    let trusted_ca_pem = a.trusted_ca.as_deref().map(read_text).transpose()?;
    Ok(AdmissionOptions {
        mode: a.mode,
        group_key,
        trusted_ca_pem,
        x509_window_secs: a.x509_window_secs,
        enrollments: enrollments.clone(),
        ..AdmissionOptions::default()
    })
}

fn sealer(cfg: &Config) -> Result<Option<Sealer>, RunError> {
    let p = &cfg.provision;
    let sealer = match (&p.sealing_key_file, &p.sealing_credential) {
        (Some(path), _) => {
            Some(
                Sealer::from_key_file(path).map_err(|source| RunError::Identity {
                    key: "provision.sealing_key_file",
                    source,
                })?,
            )
        }
        (None, Some(name)) => {
            Some(
                Sealer::from_credential(name).map_err(|source| RunError::Identity {
                    key: "provision.sealing_credential",
                    source,
                })?,
            )
        }
        (None, None) => None,
    };
    Ok(sealer)
}

/// The gateway's own upstream identity (`identity = "gateway"`): certificate chain, key
/// (decrypted with its passphrase if any) and client id, with the key checked against the
/// certificate so a mismatch is a config error at start rather than a TLS failure later.
pub(super) fn gateway_credentials(cfg: &Config) -> Result<GatewayCredentials, RunError> {
    let t = &cfg.telemetry;
    // config::load refuses identity = "gateway" without both paths; this is defence in depth.
    let (Some(cert_path), Some(key_path)) = (&t.gateway_cert, &t.gateway_key) else {
        return Err(RunError::Config {
            key: "telemetry.identity",
            reason: "\"gateway\" needs telemetry.gateway_cert and telemetry.gateway_key".into(),
        });
    };
    let cert_pem = read_text(cert_path)?;
    let bad_cert = |e: identity::IdentityError| RunError::Config {
        key: "telemetry.gateway_cert",
        reason: format!("{}: {e}", cert_path.display()),
    };
    identity::parse_certificates(&cert_pem).map_err(bad_cert)?;
    let passphrase = identity::read_passphrase(
        t.gateway_key_passphrase_file.as_deref(),
        t.gateway_key_passphrase_credential.as_deref(),
    )
    .map_err(|source| RunError::Identity {
        key: if t.gateway_key_passphrase_file.is_some() {
            "telemetry.gateway_key_passphrase_file"
        } else {
            "telemetry.gateway_key_passphrase_credential"
        },
        source,
    })?;
    let key = PrivateKey::import_file(key_path, passphrase.as_ref()).map_err(|source| {
        RunError::Identity {
            key: "telemetry.gateway_key",
            source,
        }
    })?;
    if !identity::cert_matches_key(&cert_pem, &key).map_err(bad_cert)? {
        return Err(RunError::Config {
            key: "telemetry.gateway_key",
            reason: format!(
                "{} does not belong to the certificate in {} (telemetry.gateway_cert)",
                key_path.display(),
                cert_path.display()
            ),
        });
    }
    Ok(GatewayCredentials {
        client_id: cfg.gateway_upstream_client_id().to_string(),
        cert_pem,
        key: Arc::new(key),
    })
}

fn local_users(cfg: &Config) -> Vec<LocalUser> {
    cfg.downstream
        .users
        .iter()
        .map(|u| LocalUser {
            rights: Arc::new(UserRights {
                name: u.name.clone(),
                publish: u.publish.clone(),
                subscribe: u.subscribe.clone(),
            }),
            password_hash: u.password_hash.clone(),
        })
        .collect()
}

fn downstream_options(
    cfg: &Config,
    store: &Store,
    admission: &SharedAdmission,
) -> Result<DownstreamOptions, RunError> {
    let d = &cfg.downstream;
    let broker = match d.broker {
        BrokerMode::Embedded => {
            let mut rules = AccessRules::new(d.topic_prefix.as_str());
            if d.auth == DownstreamAuth::Device {
                let check = DeviceConnectCheck::new(admission.clone(), store.clone());
                rules.device_auth = Some(Arc::new(move |id, username, password, chain| {
                    check
                        .check(id, username, password, chain, crate::clock::unix_secs())
                        .map(|proof| proof == Proof::Authenticated)
                }));
            }
            rules.users = local_users(cfg);
            let mut e = EmbeddedBrokerOptions {
                max_packet_bytes: d.max_packet_bytes as usize,
                rules: Some(rules),
                max_connections: d.max_connections as usize,
                max_connections_per_address: d.max_connections_per_address as usize,
                max_topic_bytes: d.max_topic_bytes as usize,
                max_topic_levels: d.max_topic_levels as usize,
                max_subscriptions: d.max_subscriptions_per_client as usize,
                max_retained: d.max_retained_messages as usize,
                max_retained_bytes: usize::try_from(d.max_retained_bytes).unwrap_or(usize::MAX),
                max_kept_sessions: d.max_kept_sessions as usize,
                kept_session_expiry: Duration::from_secs(d.kept_session_expiry_secs),
                max_inbound_per_second: d.max_inbound_per_second,
                connect_timeout: Duration::from_secs(u64::from(d.connect_timeout_secs)),
                // Retained messages and kept sessions survive a restart (broker/persist.rs).
                store: Some(store.clone()),
                ..EmbeddedBrokerOptions::default()
            };
            match d.listen {
                Some(listen) => e.listen = listen,
                None => e.plain_listener = false,
            }
            if let Some(tls_listen) = d.tls_listen {
                let (Some(cert), Some(key)) = (&d.tls_cert, &d.tls_key) else {
                    return Err(RunError::Config {
                        key: "downstream.tls_listen",
                        reason: "needs downstream.tls_cert and downstream.tls_key".into(),
                    });
                };
                e.tls_listen = Some(tls_listen);
                e.tls = Some(EmbeddedTls {
                    cert_chain_pem: read_text(cert)?,
                    key_pem: Secret::from(read_text(key)?),
                });
            }
            BrokerOptions::Embedded(e)
        }
        BrokerMode::External => {
            let url = d.url.clone().ok_or_else(|| RunError::Config {
                key: "downstream.url",
                reason: "broker = \"external\" needs the broker URL".into(),
            })?;
            let password = match (&d.password, &d.password_file) {
                (Some(p), _) => Some(p.clone()),
                (None, Some(path)) => Some(Secret::from(
                    read_text(path)?.trim_end_matches(['\r', '\n']).to_string(),
                )),
                (None, None) => None,
            };
            BrokerOptions::External(ExternalBrokerOptions {
                url,
                ca_pem: d.ca.as_deref().map(read_text).transpose()?,
                username: d.username.clone(),
                password,
                max_packet_bytes: d.max_packet_bytes as usize,
            })
        }
    };
    let mut opts = DownstreamOptions::new(gateway_client_id(&cfg.gateway.id), broker);
    opts.topic_prefix = TopicPrefix::new(&d.topic_prefix).map_err(|e| RunError::Config {
        key: "downstream.topic_prefix",
        reason: e.to_string(),
    })?;
    opts.inbound = Inbound {
        provision: true,
        telemetry: true,
    };
    Ok(opts)
}

fn engine_options(cfg: &Config) -> EngineOptions {
    let p = &cfg.provision;
    let mut opts = EngineOptions::new(RequestPolicy {
        max_request_bytes: cfg.downstream.max_request_bytes as usize,
        allowed_csr_key_types: p.allowed_csr_key_types.clone(),
        default_parameters: p.parameters.clone(),
    });
    opts.key_type = p.key_type;
    opts.max_attempts = p.max_attempts.max(1);
    opts.retry_base = Duration::from_millis(p.retry_base_ms.max(1));
    opts.retry_max = Duration::from_millis(p.retry_max_ms.max(p.retry_base_ms).max(1));
    opts.device_rate_per_minute = cfg.downstream.device_rate_per_minute;
    opts.shutdown_grace = Duration::from_millis(p.request_timeout_ms) + Duration::from_secs(5);
    opts.certificates_in_flight = cfg.cloud.aws.sessions.max(1) as usize;
    opts
}

#[cfg(test)]
mod tests {
    use super::super::cloud::split_endpoint;
    use super::*;

    #[test]
    fn log_filter_quiets_mqtt_libraries_unless_named() {
        assert_eq!(log_filter("info"), "info,rumqttc=warn");
        assert_eq!(log_filter("debug,rumqttc=info"), "debug,rumqttc=info");
    }

    #[test]
    fn endpoints_split_into_host_and_port() {
        assert_eq!(
            split_endpoint("localhost:8883").unwrap(),
            ("localhost".into(), 8883)
        );
        assert_eq!(
            split_endpoint("iot.example.com").unwrap(),
            ("iot.example.com".into(), 8883)
        );
        assert_eq!(
            split_endpoint("127.0.0.1:18883").unwrap(),
            ("127.0.0.1".into(), 18883)
        );
        assert_eq!(split_endpoint("[::1]:9").unwrap(), ("::1".into(), 9));
        let e = split_endpoint("host:http").unwrap_err().to_string();
        assert!(
            e.contains("cloud.aws.endpoint") && e.contains("host:http"),
            "{e}"
        );
    }
}
