//! Local MQTT towards the devices: the embedded broker, the gateway's own session to it (or to
//! an external broker such as mosquitto), and the device topic contract.
//!
//! Data flow: a device publishes to the broker -> the gateway session receives it, validates the
//! topic and hands a [`DownstreamMessage`] to the consumer (provisioning engine, telemetry) ->
//! the consumer persists it and acks it -> later the engine answers with `publish_accepted`,
//! `publish_rejected`, `publish_status` or `publish_command`.
//!
//! [`Downstream::start_routed`] has the session route each message to its consumer as it reads
//! it: provisioning requests to the engine's queue, telemetry to the pipeline's, each queue with
//! its own backpressure (see [`inbound`]).
//!
//! What the payloads look like is [`contract`]: the consumer decodes a request with
//! [`ProvisionRequest::decode`] and answers with [`AcceptedResponse`], [`RejectedResponse`] and
//! [`StatusReport`], encoded with the cloud codec in the format the device used.
//!
//! The CLI maps `[downstream]` of the config onto [`DownstreamOptions`] and calls
//! [`Downstream::start`]; when that returns, the broker (if embedded) listens and the session is
//! subscribed, so the daemon may report READY.

pub mod broker;
pub mod contract;
pub mod device_auth;
pub mod inbound;
pub mod session;
pub mod topics;

use std::time::Duration;

use tokio::sync::mpsc;

use inbound::Sink;

pub use broker::{
    AccessRules, BrokerConnections, BrokerError, ConnectionFacts, EmbeddedBroker,
    EmbeddedBrokerOptions, EmbeddedTls, LocalClient, LocalUser, UserRights,
};
pub use contract::{
    AcceptedResponse, Attestation, DeviceStatus, ProvisionRequest, RejectedResponse, StatusReport,
};
pub use inbound::InboundQueues;
pub use session::{
    gateway_client_id, AckHandle, AckOutcome, BrokerEndpoint, DownstreamMessage, DownstreamSession,
    Inbound, QoS, SessionError, SessionOptions, SessionStatus,
};
pub use topics::{DeviceTopic, PayloadFormat, TopicError, TopicPrefix};

use crate::identity::Secret;

/// Connection to an existing broker (`[downstream] broker = "external"`).
#[derive(Clone, Debug)]
pub struct ExternalBrokerOptions {
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (8883); `tcp://`,
    /// `ssl://` and `tls://` are accepted as synonyms.
    pub url: String,
    /// PEM CA certificate(s) to verify an `mqtts://` broker with (required for TLS).
    pub ca_pem: Option<String>,
    /// MQTT username of the gateway (e.g. `fleetgw-gateway` in the mosquitto recipe).
    pub username: Option<String>,
    /// MQTT password.
    pub password: Option<Secret>,
    /// Largest MQTT packet; keep the broker's `max_packet_size` at or below it.
    pub max_packet_bytes: usize,
}

impl ExternalBrokerOptions {
    /// Plain settings for `url` with no credentials and the default packet limit.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_pem: None,
            username: None,
            password: None,
            max_packet_bytes: 256 * 1024,
        }
    }
}

/// Which broker the devices use.
#[derive(Clone, Debug)]
// Built once at start-up and matched on by reference: boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum BrokerOptions {
    /// The broker inside the daemon (`broker`).
    Embedded(EmbeddedBrokerOptions),
    /// mosquitto or any MQTT 3.1.1 broker.
    External(ExternalBrokerOptions),
}

/// Everything [`Downstream::start`] needs; built by the CLI from the config.
#[derive(Clone, Debug)]
pub struct DownstreamOptions {
    /// Topic prefix (`[downstream] topic_prefix`, default `fleetgw`).
    pub topic_prefix: TopicPrefix,
    /// The gateway session's client id, see [`gateway_client_id`].
    pub client_id: String,
    /// The broker.
    pub broker: BrokerOptions,
    /// Which device messages to receive.
    pub inbound: Inbound,
    /// Largest provisioning request accepted (`[downstream] max_request_bytes`); larger ones are
    /// answered on `/rejected` with `PayloadTooLarge` and never reach the consumer. Above the
    /// codec's own limit (`cloud::codec::MAX_PAYLOAD_BYTES`, 128 KiB) decoding refuses anyway.
    pub max_request_bytes: usize,
    /// How long `start` waits for the embedded broker's session to be subscribed.
    pub startup_timeout: Duration,
}

impl DownstreamOptions {
    /// Options with the default prefix and subscriptions.
    pub fn new(client_id: String, broker: BrokerOptions) -> Self {
        Self {
            topic_prefix: TopicPrefix::default(),
            client_id,
            broker,
            inbound: Inbound::default(),
            max_request_bytes: session::DEFAULT_MAX_REQUEST_BYTES,
            startup_timeout: Duration::from_secs(10),
        }
    }

    /// The session options `start` derives; adjust them and call [`Downstream::start_with`]
    /// for non-default keep-alive, backoff or channel sizes.
    pub fn session_options(
        &self,
        embedded_addr: Option<std::net::SocketAddr>,
    ) -> Result<SessionOptions, DownstreamError> {
        let (endpoint, max_packet_bytes) = match (&self.broker, embedded_addr) {
            (BrokerOptions::Embedded(e), Some(addr)) => (
                BrokerEndpoint {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    tls: None,
                    username: None,
                    password: None,
                },
                e.max_packet_bytes,
            ),
            (BrokerOptions::Embedded(_), None) => {
                return Err(DownstreamError::Url {
                    url: String::new(),
                    reason: "the embedded broker's address is not known before it starts",
                })
            }
            (BrokerOptions::External(x), _) => (external_endpoint(x)?, x.max_packet_bytes),
        };
        let mut opts =
            SessionOptions::new(self.client_id.clone(), endpoint, self.topic_prefix.clone());
        opts.inbound = self.inbound;
        opts.max_packet_bytes = max_packet_bytes;
        opts.max_request_bytes = self.max_request_bytes;
        Ok(opts)
    }
}

/// Why downstream did not start.
#[derive(Debug, thiserror::Error)]
pub enum DownstreamError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("downstream broker CA: {0}")]
    Tls(#[from] crate::identity::IdentityError),
    #[error("downstream url {url:?}: {reason}")]
    Url { url: String, reason: &'static str },
    #[error(
        "the embedded broker was started without an in-process client id for the gateway session"
    )]
    NoInProcessSession,
}

/// The running downstream side: the embedded broker (if any) and the gateway session.
#[derive(Debug)]
pub struct Downstream {
    broker: Option<EmbeddedBroker>,
    session: std::sync::Arc<DownstreamSession>,
    /// What the gateway session was started with, to start it again.
    session_opts: SessionOptions,
}

impl Downstream {
    /// Starts the broker (embedded) and the gateway session with default session settings.
    ///
    /// Embedded: returns once the broker listens and the session is subscribed. External:
    /// returns at once; the session connects in the background (see
    /// [`DownstreamSession::wait_subscribed`]), so a broker that is down at boot does not stop
    /// the daemon.
    pub async fn start(
        opts: &DownstreamOptions,
    ) -> Result<(Self, mpsc::Receiver<DownstreamMessage>), DownstreamError> {
        Self::start_with(opts, |_| {}).await
    }

    /// Like [`start`](Self::start), letting `tune` adjust the derived [`SessionOptions`].
    pub async fn start_with(
        opts: &DownstreamOptions,
        tune: impl FnOnce(&mut SessionOptions),
    ) -> Result<(Self, mpsc::Receiver<DownstreamMessage>), DownstreamError> {
        Self::launch(opts, tune, Sink::one).await
    }

    /// Like [`start_with`](Self::start_with), with the session routing each device message as
    /// it reads it: provisioning requests to one queue, telemetry to another, each of
    /// [`SessionOptions::inbound_capacity`] messages and with its own backpressure (see
    /// [`inbound`]). The daemon's way to start.
    pub async fn start_routed(
        opts: &DownstreamOptions,
        tune: impl FnOnce(&mut SessionOptions),
    ) -> Result<(Self, InboundQueues), DownstreamError> {
        Self::launch(opts, tune, Sink::routed).await
    }

    /// Starts the broker (embedded) and the session, handing device messages to the sink
    /// `queues` makes for the session's inbound capacity.
    async fn launch<Q>(
        opts: &DownstreamOptions,
        tune: impl FnOnce(&mut SessionOptions),
        queues: impl FnOnce(usize) -> (Sink, Q),
    ) -> Result<(Self, Q), DownstreamError> {
        match &opts.broker {
            BrokerOptions::Embedded(e) => {
                // End to end: a device's QoS 1 PUBACK waits for the gateway session's ack, which
                // the telemetry intake gives once the message is durable in the outbox. Without
                // it a daemon crash would lose what the broker had acknowledged but not handed
                // on. The session is in-process, its client id reserved: no network client can
                // take it over. The trust boundary is always on: devices get their own topics.
                let mut e = e.clone();
                e.ack_after_client = Some(opts.client_id.clone());
                e.in_process_client = Some(opts.client_id.clone());
                e.rules
                    .get_or_insert_with(|| AccessRules::new(opts.topic_prefix.as_str()));
                let broker = EmbeddedBroker::start(&e).await?;
                let mut session_opts = opts.session_options(Some(broker.listen_addr()))?;
                tune(&mut session_opts);
                let (sink, rx) = queues(session_opts.inbound_capacity);
                let session = start_in_process(&broker, &session_opts, sink)?;
                broker.open();
                Ok((
                    Self {
                        broker: Some(broker),
                        session: std::sync::Arc::new(session),
                        session_opts,
                    },
                    rx,
                ))
            }
            BrokerOptions::External(_) => {
                let mut session_opts = opts.session_options(None)?;
                tune(&mut session_opts);
                let (sink, rx) = queues(session_opts.inbound_capacity);
                let session = DownstreamSession::start_into(session_opts.clone(), sink)?;
                Ok((
                    Self {
                        broker: None,
                        session: std::sync::Arc::new(session),
                        session_opts,
                    },
                    rx,
                ))
            }
        }
    }

    /// Starts the gateway session again with the options it was started with, after the old
    /// one was shut down (a daemon restart without restarting the broker, for tests of what
    /// the broker keeps). The broker kept what the old session had not acknowledged; the new
    /// one gets it again.
    pub fn restart_session(
        &mut self,
    ) -> Result<
        (
            std::sync::Arc<DownstreamSession>,
            mpsc::Receiver<DownstreamMessage>,
        ),
        DownstreamError,
    > {
        let (sink, rx) = Sink::one(self.session_opts.inbound_capacity);
        let session = match &self.broker {
            Some(broker) => start_in_process(broker, &self.session_opts, sink)?,
            None => DownstreamSession::start_into(self.session_opts.clone(), sink)?,
        };
        self.session = std::sync::Arc::new(session);
        Ok((self.session.clone(), rx))
    }

    /// The gateway session (shared by the provisioning engine and telemetry).
    pub fn session(&self) -> &std::sync::Arc<DownstreamSession> {
        &self.session
    }

    /// The embedded broker, when `broker = "embedded"`.
    pub fn broker(&self) -> Option<&EmbeddedBroker> {
        self.broker.as_ref()
    }

    /// Disconnects the session (waiting at most `within`), then stops the embedded broker.
    pub async fn shutdown(self, within: Duration) {
        self.session.shutdown(within).await;
        if let Some(broker) = self.broker {
            broker.shutdown().await;
        }
    }
}

/// The in-process session on `broker`, handing device messages to `sink`.
fn start_in_process(
    broker: &EmbeddedBroker,
    opts: &SessionOptions,
    sink: Sink,
) -> Result<DownstreamSession, DownstreamError> {
    let client = broker
        .attach_local()
        .ok_or(DownstreamError::NoInProcessSession)?;
    Ok(DownstreamSession::start_in_process(opts, client, sink)?)
}

/// Host, port and TLS flag of a broker URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port (scheme default when absent).
    pub port: u16,
    /// `mqtts://` (or `ssl://`, `tls://`).
    pub tls: bool,
}

/// Parses `mqtt[s]://host[:port][/]`.
pub fn parse_broker_url(url: &str) -> Result<BrokerUrl, DownstreamError> {
    let err = |reason| DownstreamError::Url {
        url: url.to_string(),
        reason,
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| err("expected mqtt://host[:port] or mqtts://host[:port]"))?;
    let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => (false, 1883),
        "mqtts" | "ssl" | "tls" => (true, 8883),
        _ => return Err(err("unknown scheme; use mqtt:// or mqtts://")),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(err("a broker URL has no path, query or fragment"));
    }
    if authority.contains('@') {
        return Err(err(
            "credentials do not belong in the URL; set username and password",
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| err("unterminated '[' in IPv6 address"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| err("expected ':' after the IPv6 address"))?,
                ),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(err("the host is empty"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err("the port must be a number from 1 to 65535"))?,
    };
    Ok(BrokerUrl {
        host: host.to_string(),
        port,
        tls,
    })
}

fn external_endpoint(x: &ExternalBrokerOptions) -> Result<BrokerEndpoint, DownstreamError> {
    let url = parse_broker_url(&x.url)?;
    let tls = match (url.tls, &x.ca_pem) {
        (true, Some(ca)) => Some(crate::identity::tls::client_config(ca, None)?),
        (true, None) => {
            return Err(DownstreamError::Url {
                url: x.url.clone(),
                reason: "mqtts:// needs the broker's CA certificate (downstream ca)",
            })
        }
        (false, _) => None,
    };
    Ok(BrokerEndpoint {
        host: url.host,
        port: url.port,
        tls,
        username: x.username.clone(),
        password: x.password.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        let u = parse_broker_url("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!(
            u,
            BrokerUrl {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(parse_broker_url("mqtts://broker.lan").unwrap().port, 8883);
        assert!(parse_broker_url("ssl://broker.lan/").unwrap().tls);
        assert_eq!(parse_broker_url("tcp://h").unwrap().port, 1883);
        let v6 = parse_broker_url("mqtt://[::1]:1999").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 1999));
        assert_eq!(parse_broker_url("mqtt://[::1]").unwrap().port, 1883);
    }

    #[test]
    fn rejects_bad_urls_naming_the_url() {
        for (url, needle) in [
            ("localhost:1883", "expected mqtt://"),
            ("http://h", "unknown scheme"),
            ("mqtt://u:p@h", "credentials"),
            ("mqtt://h/x", "no path"),
            ("mqtt://h:0", "port"),
            ("mqtt://h:99999", "port"),
            ("mqtt://:1883", "host is empty"),
            ("mqtt://[::1", "unterminated"),
        ] {
            let msg = parse_broker_url(url).unwrap_err().to_string();
            assert!(msg.contains(needle) && msg.contains(url), "{url}: {msg}");
        }
    }

    #[test]
    fn mqtts_without_ca_is_refused() {
        let opts = DownstreamOptions::new(
            "gw".into(),
            BrokerOptions::External(ExternalBrokerOptions::new("mqtts://h")),
        );
        let msg = opts.session_options(None).unwrap_err().to_string();
        assert!(msg.contains("CA certificate"), "{msg}");
    }

    #[test]
    fn external_session_options_carry_credentials_and_limits() {
        let mut x = ExternalBrokerOptions::new("mqtt://10.0.0.5:1999");
        x.username = Some("fleetgw-gateway".into());
        x.password = Some(Secret::from("pw"));
        x.max_packet_bytes = 512 * 1024;
        let opts = DownstreamOptions::new("fleetgw-gw-1".into(), BrokerOptions::External(x));
        let s = opts.session_options(None).unwrap();
        assert_eq!(s.endpoint.host, "10.0.0.5");
        assert_eq!(s.endpoint.port, 1999);
        assert_eq!(s.endpoint.username.as_deref(), Some("fleetgw-gateway"));
        assert_eq!(
            s.endpoint.password.as_ref().and_then(|p| p.expose_str()),
            Some("pw")
        );
        assert_eq!(s.max_packet_bytes, 512 * 1024);
        assert_eq!(s.client_id, "fleetgw-gw-1");
        assert!(format!("{:?}", s.endpoint).contains("[redacted]"));
    }
}
