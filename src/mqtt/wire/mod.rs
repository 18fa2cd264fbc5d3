//! MQTT 3.1.1 and MQTT 5 on one connection type: decodes client packets with rumqttc's
//! codecs (`mqttbytes::v4` / `v5::mqttbytes::v5`) into the shapes our servers act on, and
//! encodes their answers in the protocol the client chose at CONNECT.
//!
//! No framing is written here: `Packet::read` frames (returning `InsufficientBytes` on a
//! partial frame) and `Packet::write` encodes. Packets larger than the caller's limit are
//! refused from their fixed header, before the body is buffered.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::{Error as V4Error, Protocol as V4Protocol, QoS as V4QoS};
use rumqttc::v5::mqttbytes::v5;

use crate::identity::Secret;
use crate::mqtt::props::MessageProperties;

mod encode;
pub use encode::write_packet;

/// The protocol a client connected with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.
    V5,
}

/// A client's last will.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    /// Topic the will is published to.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    /// Publish it retained.
    pub retain: bool,
    /// MQTT 5 properties it carries.
    pub properties: Option<MessageProperties>,
    /// MQTT 5 message expiry interval, seconds.
    pub expiry_secs: Option<u32>,
    /// MQTT 5 will delay interval, seconds (0: at once).
    pub delay_secs: u32,
}

/// The CONNECT fields the servers use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectInfo {
    /// Protocol level chosen by the client.
    pub protocol: Protocol,
    /// Client identifier (may be empty: the server assigns one or refuses).
    pub client_id: String,
    /// Keep-alive in seconds (0 = none requested).
    pub keep_alive: u16,
    /// Start from a fresh session (3.1.1 clean session, MQTT 5 clean start).
    pub clean_start: bool,
    /// Keep the session after the connection ends (3.1.1: not clean session; MQTT 5: a
    /// session expiry interval above 0).
    pub keep_session: bool,
    /// How long the client asks the session to be kept after the connection ends: MQTT 5's
    /// session expiry interval in seconds (`u32::MAX` = for ever); `None` for 3.1.1, which
    /// leaves it to the server.
    pub session_expiry_secs: Option<u32>,
    /// Last will, if any.
    pub will: Option<Will>,
    /// User name, if the client sent one.
    pub username: Option<String>,
    /// Password, if the client sent one (never logged).
    pub password: Option<Secret>,
    /// MQTT 5 Receive Maximum: QoS 1 and 2 publishes the client takes unacknowledged.
    pub receive_maximum: Option<u16>,
    /// MQTT 5 Maximum Packet Size: the largest packet the client accepts.
    pub max_packet_size: Option<u32>,
    /// MQTT 5 Request Problem Information (default 1): reason strings may be sent.
    pub problem_information: bool,
    /// MQTT 5 Authentication Method: the client asks for enhanced authentication (AUTH).
    pub authentication_method: Option<String>,
}

/// One filter of a SUBSCRIBE, with the MQTT 5 options (3.1.1 uses the defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionRequest {
    /// Topic filter.
    pub filter: String,
    /// Requested QoS.
    pub qos: u8,
    /// MQTT 5 No Local: do not send the client its own publications.
    pub no_local: bool,
    /// MQTT 5 Retain As Published: keep the retain flag on forwarded messages.
    pub retain_as_published: bool,
    /// MQTT 5 Retain Handling: 0 send retained on subscribe, 1 only for a new subscription,
    /// 2 never.
    pub retain_handling: u8,
    /// MQTT 5 Subscription Identifier of the SUBSCRIBE, sent with each matching message.
    pub id: Option<u32>,
}

impl SubscriptionRequest {
    /// A filter with 3.1.1 semantics.
    pub fn new(filter: impl Into<String>, qos: u8) -> Self {
        Self {
            filter: filter.into(),
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            id: None,
        }
    }
}

/// A client packet, reduced to what the servers act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientPacket {
    /// PUBLISH.
    Publish {
        /// Topic name (MQTT 5: empty when `topic_alias` names it).
        topic: String,
        /// 0, 1 or 2.
        qos: u8,
        /// Packet id (0 for QoS 0).
        pkid: u16,
        /// Retain flag.
        retain: bool,
        /// Payload.
        payload: Bytes,
        /// MQTT 5 properties the message carries.
        properties: Option<Box<MessageProperties>>,
        /// MQTT 5 message expiry interval, seconds.
        expiry_secs: Option<u32>,
        /// MQTT 5 topic alias.
        topic_alias: Option<u16>,
    },
    /// PUBACK for one of our QoS 1 publishes.
    PubAck(u16),
    /// PUBREC for one of our QoS 2 publishes.
    PubRec(u16),
    /// PUBREL of a QoS 2 publish the client sent us.
    PubRel(u16),
    /// PUBCOMP for one of our QoS 2 publishes.
    PubComp(u16),
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        pkid: u16,
        /// Filters and options.
        filters: Vec<SubscriptionRequest>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        pkid: u16,
        /// Filters to remove.
        filters: Vec<String>,
    },
    /// PINGREQ.
    PingReq,
    /// DISCONNECT; `with_will` when an MQTT 5 client asks for its will to be sent anyway.
    Disconnect {
        /// MQTT 5 reason 0x04 (Disconnect with Will Message).
        with_will: bool,
    },
    /// Something a client must not send (a second CONNECT, PUBREC/PUBCOMP for messages we
    /// never sent at QoS 2, AUTH, server-to-client packets).
    Unexpected(&'static str),
}

/// Why bytes from the client could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not a valid MQTT packet (or an unsupported protocol level).
    #[error("malformed MQTT packet: {0}")]
    Malformed(String),
    /// A packet larger than the server's limit.
    #[error("packet of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Size the fixed header announced.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The first packet was not CONNECT.
    #[error("first packet was not CONNECT")]
    NotConnect,
}

fn v4_qos_u8(q: V4QoS) -> u8 {
    q as u8
}

/// Decodes the CONNECT at the start of `buf`, whichever protocol level it uses; `Ok(None)`
/// when more bytes are needed.
pub fn read_connect(
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<ConnectInfo>, WireError> {
    // A 3.1.1 decoder would misread an MQTT 5 CONNECT (it has properties before the client id),
    // so try 3.1.1 on a copy and keep it only if the client really asked for level 4.
    let mut probe = buf.clone();
    match v4::Packet::read(&mut probe, max_packet) {
        Ok(v4::Packet::Connect(c)) if c.protocol == V4Protocol::V4 => {
            *buf = probe;
            return Ok(Some(ConnectInfo {
                protocol: Protocol::V4,
                client_id: c.client_id,
                keep_alive: c.keep_alive,
                clean_start: c.clean_session,
                keep_session: !c.clean_session,
                session_expiry_secs: None,
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: w.message,
                    qos: v4_qos_u8(w.qos),
                    retain: w.retain,
                    properties: None,
                    expiry_secs: None,
                    delay_secs: 0,
                }),
                username: c.login.as_ref().map(|l| l.username.clone()),
                password: c.login.map(|l| Secret::from(l.password)),
                receive_maximum: None,
                max_packet_size: None,
                problem_information: true,
                authentication_method: None,
            }));
        }
        Ok(v4::Packet::Connect(_)) => {}
        Ok(_) => return Err(WireError::NotConnect),
        Err(V4Error::InsufficientBytes(_)) => return Ok(None),
        Err(V4Error::PayloadSizeLimitExceeded(size)) => {
            return Err(WireError::TooLarge {
                size,
                limit: max_packet,
            })
        }
        // Level 5 fields make the 3.1.1 decoder fail; the MQTT 5 decoder decides.
        Err(_) => {}
    }
    match v5::Packet::read(buf, Some(max_packet as u32)) {
        Ok(v5::Packet::Connect(c, will, login)) => {
            let expiry = c
                .properties
                .as_ref()
                .and_then(|p| p.session_expiry_interval)
                .unwrap_or(0);
            let will = match will {
                Some(w) => {
                    let (properties, expiry_secs, delay_secs) = match w.properties {
                        Some(p) => MessageProperties::from_will(p),
                        None => (None, None, 0),
                    };
                    Some(Will {
                        topic: String::from_utf8(w.topic.to_vec())
                            .map_err(|_| WireError::Malformed("will topic is not UTF-8".into()))?,
                        payload: w.message,
                        qos: w.qos as u8,
                        retain: w.retain,
                        properties,
                        expiry_secs,
                        delay_secs,
                    })
                }
                None => None,
            };
            let props = c.properties.as_ref();
            Ok(Some(ConnectInfo {
                protocol: Protocol::V5,
                client_id: c.client_id,
                keep_alive: c.keep_alive,
                clean_start: c.clean_start,
                keep_session: expiry > 0,
                session_expiry_secs: Some(expiry),
                will,
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.map(|l| Secret::from(l.password)),
                receive_maximum: props.and_then(|p| p.receive_maximum),
                max_packet_size: props.and_then(|p| p.max_packet_size),
                problem_information: props.and_then(|p| p.request_problem_info) != Some(0),
                authentication_method: props.and_then(|p| p.authentication_method.clone()),
            }))
        }
        Ok(_) => Err(WireError::NotConnect),
        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
            Err(WireError::TooLarge {
                size: pkt_size,
                limit: max_packet,
            })
        }
        Err(e) => Err(WireError::Malformed(e.to_string())),
    }
}

/// Decodes the next packet of a connected client; `Ok(None)` when more bytes are needed.
pub fn read_packet(
    protocol: Protocol,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<ClientPacket>, WireError> {
    match protocol {
        Protocol::V4 => read_v4(buf, max_packet),
        Protocol::V5 => read_v5(buf, max_packet),
    }
}

fn read_v4(buf: &mut BytesMut, max_packet: usize) -> Result<Option<ClientPacket>, WireError> {
    let packet = match v4::Packet::read(buf, max_packet) {
        Ok(p) => p,
        Err(V4Error::InsufficientBytes(_)) => return Ok(None),
        Err(V4Error::PayloadSizeLimitExceeded(size)) => {
            return Err(WireError::TooLarge {
                size,
                limit: max_packet,
            })
        }
        Err(e) => return Err(WireError::Malformed(e.to_string())),
    };
    Ok(Some(match packet {
        v4::Packet::Publish(p) => ClientPacket::Publish {
            topic: p.topic,
            qos: v4_qos_u8(p.qos),
            pkid: p.pkid,
            retain: p.retain,
            payload: p.payload,
            properties: None,
            expiry_secs: None,
            topic_alias: None,
        },
        v4::Packet::PubAck(a) => ClientPacket::PubAck(a.pkid),
        v4::Packet::PubRec(r) => ClientPacket::PubRec(r.pkid),
        v4::Packet::PubRel(r) => ClientPacket::PubRel(r.pkid),
        v4::Packet::PubComp(c) => ClientPacket::PubComp(c.pkid),
        v4::Packet::Subscribe(s) => ClientPacket::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubscriptionRequest::new(f.path, v4_qos_u8(f.qos)))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => ClientPacket::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => ClientPacket::PingReq,
        v4::Packet::Disconnect => ClientPacket::Disconnect { with_will: false },
        v4::Packet::Connect(_) => ClientPacket::Unexpected("second CONNECT"),
        v4::Packet::ConnAck(_)
        | v4::Packet::SubAck(_)
        | v4::Packet::UnsubAck(_)
        | v4::Packet::PingResp => ClientPacket::Unexpected("server-to-client packet"),
    }))
}

fn read_v5(buf: &mut BytesMut, max_packet: usize) -> Result<Option<ClientPacket>, WireError> {
    use rumqttc::v5::mqttbytes::Error as V5Error;
    // A DISCONNECT may leave out its reason code (0x00 then) and its property length
    // (MQTT-3.14.2.1, 3.14.2.2.1); rumqttc's decoder wants both, and would wait for them.
    match buf.get(..2) {
        Some([0xE0, 0x00]) => {
            let _ = buf.split_to(2);
            return Ok(Some(ClientPacket::Disconnect { with_will: false }));
        }
        Some([0xE0, 0x01]) if buf.len() >= 3 => {
            let reason = buf[2];
            let _ = buf.split_to(3);
            return Ok(Some(ClientPacket::Disconnect {
                with_will: reason == 0x04,
            }));
        }
        _ => {}
    }
    let packet = match v5::Packet::read(buf, Some(max_packet as u32)) {
        Ok(p) => p,
        Err(V5Error::InsufficientBytes(_)) => return Ok(None),
        Err(V5Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
            return Err(WireError::TooLarge {
                size: pkt_size,
                limit: max_packet,
            })
        }
        Err(e) => return Err(WireError::Malformed(e.to_string())),
    };
    Ok(Some(match packet {
        v5::Packet::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| WireError::Malformed("topic is not UTF-8".into()))?;
            let (properties, expiry_secs, topic_alias) = match p.properties {
                Some(props) => MessageProperties::from_publish(props),
                None => (None, None, None),
            };
            ClientPacket::Publish {
                topic,
                qos: p.qos as u8,
                pkid: p.pkid,
                retain: p.retain,
                payload: p.payload,
                properties: properties.map(Box::new),
                expiry_secs,
                topic_alias,
            }
        }
        v5::Packet::PubAck(a) => ClientPacket::PubAck(a.pkid),
        v5::Packet::PubRec(r) => ClientPacket::PubRec(r.pkid),
        v5::Packet::PubRel(r) => ClientPacket::PubRel(r.pkid),
        v5::Packet::PubComp(c) => ClientPacket::PubComp(c.pkid),
        v5::Packet::Subscribe(s) => {
            let id = s
                .properties
                .as_ref()
                .and_then(|p| p.id)
                .and_then(|i| u32::try_from(i).ok());
            ClientPacket::Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| SubscriptionRequest {
                        filter: f.path,
                        qos: f.qos as u8,
                        no_local: f.nolocal,
                        retain_as_published: f.preserve_retain,
                        retain_handling: match f.retain_forward_rule {
                            v5::RetainForwardRule::OnEverySubscribe => 0,
                            v5::RetainForwardRule::OnNewSubscribe => 1,
                            v5::RetainForwardRule::Never => 2,
                        },
                        id,
                    })
                    .collect(),
            }
        }
        v5::Packet::Unsubscribe(u) => ClientPacket::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => ClientPacket::PingReq,
        v5::Packet::Disconnect(d) => ClientPacket::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        v5::Packet::Connect(..) => ClientPacket::Unexpected("second CONNECT"),
        v5::Packet::Auth(_) => ClientPacket::Unexpected("AUTH (enhanced authentication)"),
        v5::Packet::ConnAck(_)
        | v5::Packet::SubAck(_)
        | v5::Packet::UnsubAck(_)
        | v5::Packet::PingResp(_) => ClientPacket::Unexpected("server-to-client packet"),
    }))
}

/// Why a subscription filter was refused: its MQTT 5 SUBACK reason code (MQTT 3.1.1 has
/// only 0x80 failure for all of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubRefusal {
    /// 0x87: outside the client's rights.
    NotAuthorized,
    /// 0x8F: not a valid filter, over the topic size or depth limit, or No Local on a shared
    /// subscription.
    InvalidFilter,
    /// 0x97: the client holds its maximum of subscriptions.
    QuotaExceeded,
}

impl SubRefusal {
    /// The words for a reason string.
    pub fn describe(self) -> &'static str {
        match self {
            SubRefusal::NotAuthorized => "not authorized (outside the client's rights)",
            SubRefusal::InvalidFilter => "invalid topic filter (or over the size or depth limit)",
            SubRefusal::QuotaExceeded => "subscription limit reached",
        }
    }
}

/// The MQTT 5 reason string of a SUBACK that refuses filters: the first refused filter and
/// why, and how many more (kept short: it must not push the SUBACK past the client's maximum
/// packet size). `None` when nothing was refused.
pub fn subscribe_refusal_reason(
    filters: &[String],
    granted: &[Result<u8, SubRefusal>],
) -> Option<String> {
    let mut refused = filters
        .iter()
        .zip(granted)
        .filter_map(|(f, g)| g.err().map(|why| (f, why)));
    let (first, why) = refused.next()?;
    let shown: String = first.chars().take(64).collect();
    let more = refused.count();
    Some(match more {
        0 => format!("{shown}: {}", why.describe()),
        n => format!("{shown}: {}; {n} more refused", why.describe()),
    })
}

/// What a refused PUBLISH is told (MQTT 5 reason string of PUBACK or PUBREC 0x87).
pub const PUBLISH_REFUSED_REASON: &str = "not authorized: the topic is outside the client's rights";

/// How a CONNECT is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// Accepted.
    Accepted,
    /// Refused: the certificate or client id is not authorized.
    NotAuthorized,
    /// Refused: the client id is not acceptable (empty with a persistent session).
    BadClientId,
    /// Refused: the user name or password is missing or wrong (3.1.1: not authorized, 5;
    /// MQTT 5: bad user name or password, 0x86).
    BadCredentials,
    /// Refused: the server is at its connection limit.
    ServerUnavailable,
    /// Refused: the client asked for enhanced authentication, which is not supported
    /// (MQTT 5 0x8C; 3.1.1 has no such request).
    BadAuthenticationMethod,
}

/// What the server tells MQTT 5 clients in its CONNACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerFeatures {
    /// Whether retained messages are supported.
    pub retain: bool,
    /// Largest packet the server accepts.
    pub max_packet: u32,
    /// Highest QoS the server supports (1 or 2).
    pub max_qos: u8,
    /// Topic aliases the server accepts from the client (0: none).
    pub topic_alias_max: u16,
    /// Shared subscriptions (`$share/{group}/{filter}`) are supported.
    pub shared_subscriptions: bool,
    /// Subscription identifiers are supported.
    pub subscription_identifiers: bool,
}

impl ServerFeatures {
    /// QoS 1 at most, no topic aliases, no shared subscriptions or subscription identifiers.
    pub fn basic(retain: bool, max_packet: u32) -> Self {
        Self {
            retain,
            max_packet,
            max_qos: 1,
            topic_alias_max: 0,
            shared_subscriptions: false,
            subscription_identifiers: false,
        }
    }
}

/// Why the server closes an MQTT 5 connection (its DISCONNECT reason code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// 0x81
    MalformedPacket,
    /// 0x82
    ProtocolError,
    /// 0x87
    NotAuthorized,
    /// 0x8B
    ServerShuttingDown,
    /// 0x8D
    KeepAliveTimeout,
    /// 0x8E
    SessionTakenOver,
    /// 0x90
    TopicNameInvalid,
    /// 0x94
    TopicAliasInvalid,
    /// 0x95
    PacketTooLarge,
    /// 0x97
    QuotaExceeded,
    /// 0x80
    UnspecifiedError,
}

/// A server packet to encode.
#[derive(Clone, Debug)]
pub enum ServerPacket<'a> {
    /// CONNACK.
    ConnAck {
        /// The answer.
        outcome: ConnectOutcome,
        /// A stored session was resumed.
        session_present: bool,
        /// What an MQTT 5 client is told about the server.
        features: ServerFeatures,
        /// Client id the server chose for an empty one (MQTT 5 only; 3.1.1 has no field).
        assigned_client_id: Option<&'a str>,
        /// Why it was refused (MQTT 5 reason string; 3.1.1 has no field).
        reason: Option<&'a str>,
    },
    /// SUBACK: granted QoS per filter, or why it was refused.
    SubAck {
        /// Packet id.
        pkid: u16,
        /// Granted QoS per filter.
        granted: &'a [Result<u8, SubRefusal>],
        /// MQTT 5 reason string saying why filters were refused.
        reason: Option<&'a str>,
    },
    /// UNSUBACK for `count` filters.
    UnsubAck {
        /// Packet id.
        pkid: u16,
        /// Number of filters.
        count: usize,
    },
    /// PUBACK.
    PubAck(u16),
    /// PUBACK for a PUBLISH the client was not authorized to make: MQTT 5 says so (reason
    /// 0x87); MQTT 3.1.1 has no way to, so it is a plain PUBACK (the message is dropped).
    PubAckRefused {
        /// Packet id.
        pkid: u16,
        /// Add the reason string (the client did not turn Request Problem Information off).
        say_why: bool,
    },
    /// PUBREC (first answer to a QoS 2 publish).
    PubRec(u16),
    /// PUBREC for a refused QoS 2 PUBLISH (reason 0x87 in MQTT 5).
    PubRecRefused {
        /// Packet id.
        pkid: u16,
        /// Add the reason string.
        say_why: bool,
    },
    /// PUBCOMP (answer to PUBREL).
    PubComp(u16),
    /// PUBREL (answer to the client's PUBREC for our QoS 2 PUBLISH).
    PubRel(u16),
    /// PUBLISH.
    Publish {
        /// Topic.
        topic: &'a str,
        /// 0, 1 or 2.
        qos: u8,
        /// Packet id (ignored for QoS 0).
        pkid: u16,
        /// Retain flag.
        retain: bool,
        /// Redelivery of a message sent before.
        dup: bool,
        /// Payload.
        payload: Bytes,
        /// MQTT 5 properties (and the delivery's expiry and subscription identifiers).
        properties: Option<v5::PublishProperties>,
    },
    /// PINGRESP.
    PingResp,
    /// DISCONNECT from the server (MQTT 5 only; a 3.1.1 server just closes).
    Disconnect {
        /// The reason code.
        reason: DisconnectReason,
        /// A reason string, if the client accepts them.
        reason_string: Option<String>,
    },
}

/// MQTT topic-filter matching, `$`-aware: a filter starting with a wildcard does not match
/// topics starting with `$` (MQTT 3.1.1 §4.7.2), but `$aws/...` filters match `$aws/...`
/// topics (rumqttc's `matches` refuses every `$` topic, which would hide AWS responses).
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    if topic == filter {
        return true;
    }
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// Whether `filter` is a syntactically valid MQTT topic filter.
pub fn valid_filter(filter: &str) -> bool {
    !filter.is_empty() && rumqttc::mqttbytes::valid_filter(filter)
}

/// A shared subscription `$share/{group}/{filter}` (MQTT 5 §4.8.2): `None` for any other
/// filter, `Some(Err(()))` for a malformed one (empty group, a wildcard or `/` in the group,
/// an invalid inner filter), else the group and the inner filter.
#[allow(clippy::result_unit_err)]
pub fn shared_subscription(filter: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = filter.strip_prefix("$share/")?;
    Some(match rest.split_once('/') {
        Some((group, inner))
            if !group.is_empty() && !group.contains(['+', '#']) && valid_filter(inner) =>
        {
            Ok((group, inner))
        }
        _ => Err(()),
    })
}

/// Whether `topic` may be published to: not empty, no wildcards, no NUL.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 128 * 1024;

    #[test]
    fn an_mqtt5_disconnect_may_leave_out_reason_code_and_properties() {
        let mut buf = BytesMut::from(&[0xE0, 0x00, 0xE0, 0x01, 0x04, 0xC0, 0x00][..]);
        assert_eq!(
            read_packet(Protocol::V5, &mut buf, LIMIT).unwrap(),
            Some(ClientPacket::Disconnect { with_will: false })
        );
        assert_eq!(
            read_packet(Protocol::V5, &mut buf, LIMIT).unwrap(),
            Some(ClientPacket::Disconnect { with_will: true }),
            "a reason code without property length"
        );
        assert_eq!(
            read_packet(Protocol::V5, &mut buf, LIMIT).unwrap(),
            Some(ClientPacket::PingReq),
            "the next packet is read as usual"
        );
    }

    #[test]
    fn dollar_topics_match_only_explicit_filters() {
        let t = "$aws/certificates/create-from-csr/json/accepted";
        assert!(topic_matches(t, t));
        assert!(topic_matches(t, "$aws/certificates/create-from-csr/json/+"));
        assert!(topic_matches(t, "$aws/certificates/#"));
        assert!(!topic_matches(t, "#"));
        assert!(!topic_matches(
            t,
            "+/certificates/create-from-csr/json/accepted"
        ));
        assert!(topic_matches("a/b", "a/#"));
        assert!(topic_matches("a", "a/#"));
        assert!(!topic_matches("a/b/c", "a/+"));
        assert!(!topic_matches("a", "a/b"));
    }

    #[test]
    fn connect_is_decoded_for_both_protocols() {
        let mut buf = BytesMut::new();
        let mut c = v4::Connect::new("dev-1");
        c.keep_alive = 30;
        v4::Packet::Connect(c).write(&mut buf, usize::MAX).unwrap();
        let partial = buf.split_to(5);
        let mut head = partial.clone();
        assert!(read_connect(&mut head, LIMIT).unwrap().is_none());
        let mut whole = partial;
        whole.extend_from_slice(&buf);
        let info = read_connect(&mut whole, LIMIT).unwrap().unwrap();
        assert_eq!(info.protocol, Protocol::V4);
        assert_eq!(info.client_id, "dev-1");
        assert_eq!(info.keep_alive, 30);
        assert!(whole.is_empty());

        let mut buf = BytesMut::new();
        let c = v5::Connect {
            keep_alive: 1200,
            client_id: "sdk-5".into(),
            clean_start: false,
            properties: None,
        };
        let login = Some(v5::Login {
            username: "?SDK=IoTDeviceSDK/Python".into(),
            password: String::new(),
        });
        v5::Packet::Connect(c, None, login)
            .write(&mut buf, None)
            .unwrap();
        let info = read_connect(&mut buf, LIMIT).unwrap().unwrap();
        assert_eq!(info.protocol, Protocol::V5);
        assert_eq!(info.client_id, "sdk-5");
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_packets_are_refused_before_buffering_them() {
        let mut buf = BytesMut::new();
        let mut p = v4::Publish::new("t", V4QoS::AtLeastOnce, vec![0u8; LIMIT]);
        p.pkid = 1;
        v4::Packet::Publish(p).write(&mut buf, usize::MAX).unwrap();
        let mut head = buf.split_to(16);
        assert!(matches!(
            read_packet(Protocol::V4, &mut head, LIMIT),
            Err(WireError::TooLarge { .. })
        ));
    }
}
