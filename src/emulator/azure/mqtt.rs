//! DPS and IoT Hub over MQTT 3.1.1 on TLS, as the device SDKs use them (the embedded
//! broker's codec, `crate::mqtt::wire`; one task per connection).
//!
//! DPS: client id = registration id, username
//! `{idScope}/registrations/{registrationId}/api-version=...` (anything after the api-version,
//! like the SDK's `&ClientVersion=...`, is ignored), password a SAS token or a client
//! certificate; subscribe `$dps/registrations/res/#`; publish
//! `$dps/registrations/PUT/iotdps-register/?$rid={rid}` and
//! `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}`; answers on
//! `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`.
//!
//! Hub: client id = device id, username `{hubHost}/{deviceId}/?api-version={v}` (any supported
//! version), SAS password (`sr={hubHost}/devices/{id}`) or certificate; publish
//! `devices/{id}/messages/events/{properties}` (QoS 0/1, at most 256 KB); subscribe
//! `devices/{id}/messages/devicebound/#` for cloud-to-device messages. Anything touching
//! another device's topics closes the connection, as IoT Hub does.
//!
//! A bad credential, scope, username or client id gets CONNACK 5 (not authorized); the reason is
//! logged and kept in `/stats` `recentRefusals`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch, Notify};
use tokio::time::{timeout, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::auth::{self, Credential};
use super::dps::{DpsReply, RegisterRequest};
use super::hub::{self, CloudToDevice, Context, Counters, HubMessage, Transport};
use crate::clock;
use crate::identity::tls::peer_chain_ders;
use crate::mqtt::stream::{PacketStream, StreamError};
use crate::mqtt::wire::{
    self, ClientPacket, ConnectInfo, ConnectOutcome, ServerFeatures, ServerPacket,
    SubscriptionRequest,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// IoT Hub's maximum keep-alive (also used for 0).
const MAX_KEEP_ALIVE_SECS: u16 = 1177;
const READ_CHUNK: usize = 8 * 1024;
/// DPS request bodies are small JSON documents.
const MAX_DPS_BODY: usize = 64 * 1024;
/// Hub api-versions accepted in the username.
const HUB_API_VERSIONS: &[&str] = &[
    "2016-11-14",
    "2017-06-30",
    "2018-06-30",
    "2019-03-30",
    "2019-10-01",
    "2020-09-30",
    "2021-04-12",
];
const DPS_RESPONSE_FILTER: &str = "$dps/registrations/res/#";
const DPS_REGISTER: &str = "$dps/registrations/PUT/iotdps-register/?";
const DPS_POLL: &str = "$dps/registrations/GET/iotdps-get-operationstatus/?";

/// Which service a listener is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// DPS.
    Dps,
    /// IoT Hub.
    Hub,
}

impl Service {
    fn listener_name(self) -> &'static str {
        match self {
            Service::Dps => "dpsMqtt",
            Service::Hub => "hubMqtt",
        }
    }

    fn max_packet(self) -> usize {
        match self {
            Service::Dps => MAX_DPS_BODY + 1024,
            Service::Hub => hub::MAX_MESSAGE_BYTES + 2048,
        }
    }
}

fn connack(outcome: ConnectOutcome, service: Service) -> ServerPacket<'static> {
    ServerPacket::ConnAck {
        outcome,
        session_present: false,
        features: ServerFeatures::basic(false, service.max_packet() as u32),
        assigned_client_id: None,
        reason: None,
    }
}

/// Accepts connections until `shutdown` turns true.
pub async fn run_listener(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<Context>,
    service: Service,
    shutdown: watch::Receiver<bool>,
) {
    let stopping = shutdown.clone();
    super::accept_until_shutdown(listener, &ctx, "MQTT", stopping, |tcp, peer| {
        let _ = tcp.set_nodelay(true);
        let (ctx, acceptor, shutdown) = (ctx.clone(), acceptor.clone(), shutdown.clone());
        tokio::spawn(async move { serve(tcp, peer, acceptor, ctx, service, shutdown).await });
    })
    .await;
}

/// Why a connection ended.
enum Close {
    ByClient,
    Violation(String),
    Ended(&'static str),
    Io(String),
}

impl From<StreamError> for Close {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Closed => Close::ByClient,
            StreamError::Io(e) => Close::Io(e.to_string()),
            other => Close::Violation(other.to_string()),
        }
    }
}

impl From<wire::WireError> for Close {
    fn from(e: wire::WireError) -> Self {
        Close::Violation(e.to_string())
    }
}

/// Who a connection is, once CONNECT was accepted.
struct Identity {
    /// DPS: scope; hub: unused.
    id_scope: String,
    /// Registration id (DPS) or device id (hub), as the client sent it.
    id: String,
    credential: Credential,
}

async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: Arc<Context>,
    service: Service,
    shutdown: watch::Receiver<bool>,
) {
    let listener = service.listener_name();
    let stream = match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return ctx.refuse(listener, peer, format!("TLS handshake failed: {e}")),
        Err(_) => return ctx.refuse(listener, peer, "TLS handshake timed out".into()),
    };
    let chain = peer_chain_ders(stream.get_ref().1);
    let mut io = PacketStream::new(stream, service.max_packet(), READ_CHUNK);
    let connect = match timeout(HANDSHAKE_TIMEOUT, io.read_connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return ctx.refuse(listener, peer, format!("no valid CONNECT: {e}")),
        Err(_) => return ctx.refuse(listener, peer, "no CONNECT in time".into()),
    };
    let identity = match authenticate(&ctx, service, &connect, &chain) {
        Ok(i) => i,
        Err(reason) => {
            ctx.refuse(listener, peer, reason);
            if io
                .queue(connack(ConnectOutcome::BadCredentials, service))
                .is_ok()
            {
                let _ = io.flush(WRITE_TIMEOUT).await;
            }
            io.shutdown().await;
            return;
        }
    };
    let number = ctx.connection_number();
    let close = Arc::new(Notify::new());
    if service == Service::Hub {
        ctx.take_over(&identity.id, number, close.clone());
    }
    let keep_alive = match connect.keep_alive {
        0 => MAX_KEEP_ALIVE_SECS,
        k => k.min(MAX_KEEP_ALIVE_SECS),
    };
    let mut conn = Connection {
        io,
        ctx: ctx.clone(),
        service,
        identity,
        subscriptions: Vec::new(),
        next_pkid: 0,
    };
    tracing::debug!(%peer, service = ?service, id = %conn.identity.id, "Azure emulator connection accepted");
    let result = conn
        .run(
            Duration::from_millis(u64::from(keep_alive) * 1500),
            close,
            shutdown,
        )
        .await;
    if service == Service::Hub {
        ctx.release(&conn.identity.id, number);
    }
    match result {
        Close::Violation(reason) => {
            Counters::bump(&ctx.counters.closed_by_policy);
            tracing::info!(%peer, id = %conn.identity.id, %reason, "Azure emulator closed a connection");
        }
        Close::Io(e) => tracing::debug!(%peer, error = %e, "Azure emulator connection failed"),
        Close::Ended(why) => tracing::debug!(%peer, why, "Azure emulator connection ended"),
        Close::ByClient => {}
    }
    conn.io.shutdown().await;
}

/// Checks CONNECT: username shape, client id, scope or hub, and the credential.
fn authenticate(
    ctx: &Context,
    service: Service,
    connect: &ConnectInfo,
    chain: &[Vec<u8>],
) -> Result<Identity, String> {
    let username = connect.username.as_deref().unwrap_or("");
    let sas = connect
        .password
        .as_ref()
        .map(|p| String::from_utf8_lossy(p.expose()).into_owned())
        .filter(|p| !p.is_empty());
    let credential = Credential::from_parts(sas, chain);
    let short = super::dps::short;
    match service {
        Service::Dps => {
            let parts: Vec<&str> = username.splitn(4, '/').collect();
            let [scope, "registrations", registration_id, rest] = parts[..] else {
                return Err(format!("username {:?} is not {{idScope}}/registrations/{{registrationId}}/api-version=...", short(username)));
            };
            if !rest.starts_with("api-version=") {
                return Err(format!("username {:?} has no api-version", short(username)));
            }
            if registration_id != connect.client_id {
                return Err(format!(
                    "client id {:?} is not the registration id {:?} of the username",
                    short(&connect.client_id),
                    short(registration_id)
                ));
            }
            ctx.dps.check_scope(scope).map_err(|r| reply_message(&r))?;
            auth::admit_registration(&ctx.groups, scope, registration_id, &credential)
                .map_err(|e| e.to_string())?;
            Ok(Identity {
                id_scope: scope.to_string(),
                id: registration_id.to_string(),
                credential,
            })
        }
        Service::Hub => {
            let parts: Vec<&str> = username.splitn(3, '/').collect();
            let [host, device_id, query] = parts[..] else {
                return Err(format!(
                    "username {:?} is not {{hubHost}}/{{deviceId}}/?api-version=...",
                    short(username)
                ));
            };
            if !host.eq_ignore_ascii_case(&ctx.hub_host) {
                return Err(format!(
                    "hub {:?} is not this hub ({:?})",
                    short(host),
                    ctx.hub_host
                ));
            }
            let version = query
                .strip_prefix('?')
                .unwrap_or(query)
                .split('&')
                .find_map(|kv| kv.strip_prefix("api-version="));
            if !version.is_some_and(|v| HUB_API_VERSIONS.contains(&v)) {
                return Err(format!(
                    "username {:?} has no supported api-version (one of {})",
                    short(username),
                    HUB_API_VERSIONS.join(", ")
                ));
            }
            if device_id != connect.client_id {
                return Err(format!(
                    "client id {:?} is not the device id {:?} of the username",
                    short(&connect.client_id),
                    short(device_id)
                ));
            }
            auth::admit_device(
                &ctx.groups,
                &ctx.registry,
                &ctx.hub_host,
                device_id,
                &credential,
            )
            .map_err(|e| e.to_string())?;
            Ok(Identity {
                id_scope: String::new(),
                id: device_id.to_string(),
                credential,
            })
        }
    }
}

fn reply_message(reply: &DpsReply) -> String {
    reply.body["message"]
        .as_str()
        .unwrap_or("refused")
        .to_string()
}

struct Connection {
    io: PacketStream<TlsStream<TcpStream>>,
    ctx: Arc<Context>,
    service: Service,
    identity: Identity,
    subscriptions: Vec<(String, u8)>,
    next_pkid: u16,
}

impl Connection {
    async fn run(
        &mut self,
        idle_limit: Duration,
        close: Arc<Notify>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Close {
        let mut outage = self.ctx.faults.outage_watch();
        outage.mark_unchanged();
        let mut c2d = self.ctx.c2d_receiver();
        if let Err(e) = self
            .io
            .queue(connack(ConnectOutcome::Accepted, self.service))
        {
            return e.into();
        }
        let mut deadline = Instant::now() + idle_limit;
        loop {
            if let Err(c) = self.process_buffer().await {
                return c;
            }
            if let Err(e) = self.io.flush(WRITE_TIMEOUT).await {
                return e.into();
            }
            tokio::select! {
                filled = tokio::time::timeout_at(deadline, self.io.fill()) => match filled {
                    Ok(Ok(())) => deadline = Instant::now() + idle_limit,
                    Ok(Err(e)) => return e.into(),
                    Err(_) => return Close::Ended("keep-alive expired"),
                },
                message = c2d.recv() => match message {
                    Ok(m) => if let Err(c) = self.deliver(&m) { return c; },
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(id = %self.identity.id, missed, "cloud-to-device messages missed by a slow connection");
                    }
                    Err(broadcast::error::RecvError::Closed) => return Close::Ended("emulator stopped"),
                },
                _ = close.notified() => return Close::Ended("taken over by a newer connection of the device"),
                _ = outage.changed() => return Close::Ended("outage fault"),
                _ = shutdown.changed() => return Close::Ended("emulator stopped"),
            }
        }
    }

    async fn process_buffer(&mut self) -> Result<(), Close> {
        while let Some(packet) = self.io.next_packet()? {
            match packet {
                ClientPacket::Publish {
                    topic,
                    qos,
                    pkid,
                    payload,
                    ..
                } => {
                    if qos > 1 {
                        return Err(Close::Violation(format!("QoS {qos} publish to {topic}")));
                    }
                    match self.service {
                        Service::Dps => self.on_dps_publish(&topic, &payload).await?,
                        Service::Hub => self.on_hub_publish(&topic, payload)?,
                    }
                    if qos == 1 {
                        self.io.queue(ServerPacket::PubAck(pkid))?;
                    }
                }
                ClientPacket::Subscribe { pkid, filters } => self.on_subscribe(pkid, filters)?,
                ClientPacket::Unsubscribe { pkid, filters } => {
                    self.subscriptions
                        .retain(|(f, _)| !filters.iter().any(|u| u == f));
                    self.io.queue(ServerPacket::UnsubAck {
                        pkid,
                        count: filters.len(),
                    })?;
                }
                ClientPacket::PubAck(_) => {}
                ClientPacket::PingReq => self.io.queue(ServerPacket::PingResp)?,
                ClientPacket::Disconnect { .. } => return Err(Close::ByClient),
                ClientPacket::PubRel(_) => {
                    return Err(Close::Violation("PUBREL (QoS 2 is not supported)".into()))
                }
                ClientPacket::PubRec(_) | ClientPacket::PubComp(_) => {
                    return Err(Close::Violation(
                        "PUBREC/PUBCOMP (IoT Hub never sends QoS 2)".into(),
                    ))
                }
                ClientPacket::Unexpected(what) => return Err(Close::Violation(what.into())),
            }
        }
        Ok(())
    }

    fn allowed_filter(&self, filter: &str) -> bool {
        match self.service {
            Service::Dps => filter == DPS_RESPONSE_FILTER,
            Service::Hub => {
                let own = format!("devices/{}/messages/devicebound/", self.identity.id);
                let lower = filter.to_ascii_lowercase();
                (lower.starts_with(&own.to_ascii_lowercase()) && filter.ends_with('#'))
                    || [
                        "$iothub/twin/res/#",
                        "$iothub/methods/POST/#",
                        "$iothub/twin/PATCH/properties/desired/#",
                    ]
                    .contains(&filter)
            }
        }
    }

    fn on_subscribe(&mut self, pkid: u16, filters: Vec<SubscriptionRequest>) -> Result<(), Close> {
        let mut granted = Vec::with_capacity(filters.len());
        for SubscriptionRequest { filter, qos, .. } in filters {
            if !self.allowed_filter(&filter) {
                if self.service == Service::Hub && filter.starts_with("devices/") {
                    return Err(Close::Violation(format!(
                        "device {} may not subscribe to {}",
                        self.identity.id,
                        super::dps::short(&filter)
                    )));
                }
                // Encoded as before: 0x80 (3.1.1), 0x87 (5).
                granted.push(Err(wire::SubRefusal::NotAuthorized));
                continue;
            }
            let qos = qos.min(1);
            match self.subscriptions.iter_mut().find(|(f, _)| *f == filter) {
                Some(existing) => existing.1 = qos,
                None => self.subscriptions.push((filter, qos)),
            }
            granted.push(Ok(qos));
        }
        self.io.queue(ServerPacket::SubAck {
            pkid,
            granted: &granted,
            reason: None,
        })?;
        Ok(())
    }

    async fn on_dps_publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), Close> {
        let (query, register) = if let Some(q) = topic.strip_prefix(DPS_REGISTER) {
            (q, true)
        } else if let Some(q) = topic.strip_prefix(DPS_POLL) {
            (q, false)
        } else {
            return Err(Close::Violation(format!(
                "{} is not a DPS request topic",
                super::dps::short(topic)
            )));
        };
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_string)
        };
        let Some(rid) = param("$rid").filter(|r| !r.is_empty() && r.len() <= 128) else {
            return Err(Close::Violation(format!(
                "DPS request {} has no $rid",
                super::dps::short(topic)
            )));
        };
        let dps = &self.ctx.dps;
        let reply = if register {
            Counters::bump(&self.ctx.counters.registrations);
            dps.register(
                RegisterRequest {
                    id_scope: &self.identity.id_scope,
                    registration_id: &self.identity.id,
                    body: payload,
                },
                &self.identity.credential,
            )
        } else {
            Counters::bump(&self.ctx.counters.polls);
            let operation = param("operationId").unwrap_or_default();
            dps.operation_status(
                &self.identity.id_scope,
                &self.identity.id,
                &operation,
                &self.identity.credential,
            )
        };
        if reply.status == 429 {
            Counters::bump(&self.ctx.counters.throttled);
        }
        let mut response_topic = format!("$dps/registrations/res/{}/?$rid={rid}", reply.status);
        if let Some(secs) = reply.retry_after {
            response_topic.push_str(&format!("&retry-after={secs}"));
        }
        let (delay, drop) = self.ctx.faults.response_plan();
        if drop {
            Counters::bump(&self.ctx.counters.dropped_responses);
            return Ok(());
        }
        if !delay.is_zero() {
            self.io.flush(WRITE_TIMEOUT).await?;
            tokio::time::sleep(delay).await;
        }
        let body = serde_json::to_vec(&reply.body).unwrap_or_default();
        self.publish(&response_topic, 1, Bytes::from(body))?;
        Ok(())
    }

    fn on_hub_publish(&mut self, topic: &str, payload: Bytes) -> Result<(), Close> {
        let prefix = format!("devices/{}/messages/events/", self.identity.id);
        let properties = match topic.get(..prefix.len()) {
            Some(head) if head.eq_ignore_ascii_case(&prefix) => &topic[prefix.len()..],
            _ if topic.eq_ignore_ascii_case(prefix.trim_end_matches('/')) => "",
            _ => {
                return Err(Close::Violation(format!(
                    "device {} may not publish to {}",
                    self.identity.id,
                    super::dps::short(topic)
                )))
            }
        };
        if payload.len() > hub::MAX_MESSAGE_BYTES {
            return Err(Close::Violation(format!(
                "message of {} bytes exceeds IoT Hub's {} bytes",
                payload.len(),
                hub::MAX_MESSAGE_BYTES
            )));
        }
        let properties = hub::parse_properties(properties).map_err(Close::Violation)?;
        let device_id = self
            .ctx
            .registry
            .get(&self.identity.id)
            .map_or_else(|| self.identity.id.clone(), |r| r.device_id);
        self.ctx.messages.record(
            &self.identity.id,
            vec![HubMessage {
                device_id,
                transport: Transport::Mqtt,
                payload,
                properties,
            }],
            clock::unix_us(),
        );
        Ok(())
    }

    fn deliver(&mut self, message: &CloudToDevice) -> Result<(), Close> {
        if self.service != Service::Hub || message.device != self.identity.id.to_ascii_lowercase() {
            return Ok(());
        }
        if self.publish(&message.topic, 1, message.payload.clone())? {
            Counters::bump(&self.ctx.counters.c2d_delivered);
        }
        Ok(())
    }

    /// Sends to this client if it subscribed to a matching filter; says whether it did.
    fn publish(&mut self, topic: &str, max_qos: u8, payload: Bytes) -> Result<bool, Close> {
        let Some(qos) = self
            .subscriptions
            .iter()
            .filter(|(f, _)| topic_matches_ci(topic, f))
            .map(|(_, q)| (*q).min(max_qos))
            .max()
        else {
            return Ok(false);
        };
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.io.queue(ServerPacket::Publish {
            topic,
            qos,
            pkid: self.next_pkid,
            retain: false,
            dup: false,
            payload,
            properties: None,
        })?;
        Ok(true)
    }
}

/// Device ids are case-insensitive: a subscription in one case matches a topic in another.
fn topic_matches_ci(topic: &str, filter: &str) -> bool {
    wire::topic_matches(&topic.to_ascii_lowercase(), &filter.to_ascii_lowercase())
}
