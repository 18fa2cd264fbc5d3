//! The client side of the codec: encodes what a publish-and-command link or a claim session
//! sends (CONNECT, PUBLISH, PUBACK, SUBSCRIBE at QoS 0 or 1, PINGREQ, DISCONNECT) and decodes what a server answers, in
//! MQTT 3.1.1 or MQTT 5, with rumqttc's `mqttbytes` packet types (the same ones
//! [`wire`](crate::mqtt::wire) uses for the server side).
//!
//! Decoding refuses a packet larger than our limit from its fixed header, before its body is
//! buffered, and reduces every server packet to [`ServerEvent`]: the link never sees a protocol
//! version.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::{Error as V4Error, QoS as V4QoS};
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::{Error as V5Error, QoS as V5QoS};

use super::{MqttVersion, UpstreamError};
use crate::mqtt::props::MessageProperties;

/// What the CONNECT carries.
#[derive(Clone, Debug)]
pub struct ConnectPacket<'a> {
    /// Client identifier.
    pub client_id: &'a str,
    /// Keep-alive in seconds.
    pub keep_alive_secs: u16,
    /// User name and password, if any.
    pub login: Option<(&'a str, &'a str)>,
    /// MQTT 5: the largest packet we accept (announced so the server never sends more).
    pub max_packet_in: u32,
    /// MQTT 5: QoS 1 publishes we take unacknowledged at once.
    pub receive_maximum: u16,
}

/// A CONNACK's verdict and the server's limits (MQTT 5 §3.2.2.3; 3.1.1 has none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnAckInfo {
    /// Whether the server kept a session (we always ask for a clean one).
    pub session_present: bool,
    /// Unacknowledged QoS 1 publishes the server takes at once (default 65,535).
    pub receive_maximum: u16,
    /// The largest packet the server takes (`None`: only the protocol's limit).
    pub max_packet_size: Option<u32>,
    /// Topic aliases the server takes (we send none, so 0 and any other value are honoured).
    pub topic_alias_maximum: u16,
    /// Keep-alive the server imposes instead of ours, seconds (MQTT 5 Server Keep Alive).
    pub server_keep_alive: Option<u16>,
}

/// A server packet, reduced to what the link acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// CONNACK accepting the connection.
    ConnAck(ConnAckInfo),
    /// CONNACK refusing it, with the reason code and its name.
    Refused {
        /// 3.1.1 return code or MQTT 5 reason code.
        code: u8,
        /// What it means.
        reason: String,
    },
    /// PUBACK for one of our publishes.
    PubAck {
        /// Packet id.
        pkid: u16,
        /// MQTT 5 reason code (0x00 success, 0x10 no matching subscribers, >= 0x80 failure).
        reason: u8,
    },
    /// SUBACK; `refused` filters got a failure code.
    SubAck {
        /// Packet id.
        pkid: u16,
        /// Filters refused.
        refused: usize,
        /// Return codes in the SUBACK: one per filter of the SUBSCRIBE it answers
        /// (MQTT-3.8.4-5), which the caller checks against what it asked for.
        codes: usize,
    },
    /// A message from the cloud (a command).
    Publish {
        /// Topic name.
        topic: String,
        /// 0 or 1.
        qos: u8,
        /// Packet id (0 for QoS 0).
        pkid: u16,
        /// DUP: the server sent this message before (a redelivery).
        dup: bool,
        /// Payload.
        payload: Bytes,
        /// MQTT 5 properties the message carries.
        properties: Option<MessageProperties>,
    },
    /// PINGRESP.
    PingResp,
    /// MQTT 5 server DISCONNECT, with its reason code.
    Disconnect {
        /// Reason code.
        reason: u8,
    },
}

/// A PUBACK reason code at or above this is a failure (MQTT 5 §2.4).
pub const FAILURE: u8 = 0x80;

fn malformed(e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Protocol(format!("malformed packet from the server: {e}"))
}

/// Appends the CONNECT (clean session / clean start, no will).
pub fn write_connect(
    version: MqttVersion,
    c: &ConnectPacket<'_>,
    out: &mut BytesMut,
) -> Result<(), UpstreamError> {
    match version {
        MqttVersion::V4 => {
            let mut connect = v4::Connect::new(c.client_id);
            connect.keep_alive = c.keep_alive_secs;
            connect.clean_session = true;
            connect.login = c.login.map(|(u, p)| v4::Login::new(u, p));
            v4::Packet::Connect(connect)
                .write(out, usize::MAX)
                .map_err(malformed)?;
        }
        MqttVersion::V5 => {
            let props = v5::ConnectProperties {
                session_expiry_interval: None,
                receive_maximum: Some(c.receive_maximum.max(1)),
                max_packet_size: Some(c.max_packet_in),
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: Vec::new(),
                authentication_method: None,
                authentication_data: None,
            };
            let connect = v5::Connect {
                keep_alive: c.keep_alive_secs,
                client_id: c.client_id.to_string(),
                clean_start: true,
                properties: Some(props),
            };
            let login = c.login.map(|(u, p)| v5::Login::new(u, p));
            v5::Packet::Connect(connect, None, login)
                .write(out, None)
                .map_err(malformed)?;
        }
    }
    Ok(())
}

/// Appends a QoS 1 PUBLISH; returns its encoded size.
pub fn write_publish(
    version: MqttVersion,
    pkid: u16,
    topic: &str,
    payload: &Bytes,
    properties: Option<&MessageProperties>,
    out: &mut BytesMut,
) -> Result<usize, UpstreamError> {
    match version {
        MqttVersion::V4 => {
            let mut p = v4::Publish::from_bytes(topic, V4QoS::AtLeastOnce, payload.clone());
            p.pkid = pkid;
            v4::Packet::Publish(p)
                .write(out, usize::MAX)
                .map_err(malformed)
        }
        MqttVersion::V5 => {
            let props = MessageProperties::to_publish(properties, None, &[]);
            let mut p = v5::Publish::new(topic, V5QoS::AtLeastOnce, payload.clone(), props);
            p.pkid = pkid;
            v5::Packet::Publish(p).write(out, None).map_err(malformed)
        }
    }
}

/// Appends the PUBACK of a message the server sent us.
pub fn write_puback(version: MqttVersion, pkid: u16, out: &mut BytesMut) {
    // Packets of fixed shape: encoding cannot fail.
    match version {
        MqttVersion::V4 => {
            let _ = v4::Packet::PubAck(v4::PubAck::new(pkid)).write(out, usize::MAX);
        }
        MqttVersion::V5 => {
            let _ = v5::Packet::PubAck(v5::PubAck::new(pkid, None)).write(out, None);
        }
    }
}

/// Appends a SUBSCRIBE of `filters` at `qos` (0 or 1: the gateway takes no QoS 2 messages).
pub fn write_subscribe(
    version: MqttVersion,
    pkid: u16,
    filters: &[String],
    qos: u8,
    out: &mut BytesMut,
) -> Result<(), UpstreamError> {
    let (v4_qos, v5_qos) = match qos {
        0 => (V4QoS::AtMostOnce, V5QoS::AtMostOnce),
        1 => (V4QoS::AtLeastOnce, V5QoS::AtLeastOnce),
        other => {
            return Err(UpstreamError::Protocol(format!(
                "SUBSCRIBE at QoS {other}: only QoS 0 and 1 are supported"
            )))
        }
    };
    if filters.is_empty() {
        // MQTT-3.8.3-3: a SUBSCRIBE carries at least one filter.
        return Err(UpstreamError::Protocol(
            "SUBSCRIBE with no topic filter".into(),
        ));
    }
    match version {
        MqttVersion::V4 => {
            let mut s = v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|f| v4::SubscribeFilter::new(f.clone(), v4_qos)),
            );
            s.pkid = pkid;
            v4::Packet::Subscribe(s)
                .write(out, usize::MAX)
                .map_err(malformed)?;
        }
        MqttVersion::V5 => {
            let mut s = v5::Subscribe::new_many(
                filters.iter().map(|f| v5::Filter::new(f.clone(), v5_qos)),
                None,
            );
            s.pkid = pkid;
            v5::Packet::Subscribe(s)
                .write(out, None)
                .map_err(malformed)?;
        }
    }
    Ok(())
}

/// Appends a PINGREQ.
pub fn write_pingreq(version: MqttVersion, out: &mut BytesMut) {
    match version {
        MqttVersion::V4 => {
            let _ = v4::Packet::PingReq.write(out, usize::MAX);
        }
        MqttVersion::V5 => {
            let _ = v5::Packet::PingReq(v5::PingReq).write(out, None);
        }
    }
}

/// Appends a DISCONNECT (normal disconnection).
pub fn write_disconnect(version: MqttVersion, out: &mut BytesMut) {
    match version {
        MqttVersion::V4 => {
            let _ = v4::Packet::Disconnect.write(out, usize::MAX);
        }
        // Normal disconnection needs no reason code (MQTT-3.14.2.1); rumqttc would write a
        // form its own decoder does not take back.
        MqttVersion::V5 => out.extend_from_slice(&[0xE0, 0x00]),
    }
}

/// Decodes the next server packet in `buf`; `Ok(None)` when more bytes are needed.
pub fn read_event(
    version: MqttVersion,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<ServerEvent>, UpstreamError> {
    match version {
        MqttVersion::V4 => read_v4(buf, max_packet),
        MqttVersion::V5 => read_v5(buf, max_packet),
    }
}

fn read_v4(buf: &mut BytesMut, max_packet: usize) -> Result<Option<ServerEvent>, UpstreamError> {
    let packet = match v4::Packet::read(buf, max_packet) {
        Ok(p) => p,
        Err(V4Error::InsufficientBytes(_)) => return Ok(None),
        Err(V4Error::PayloadSizeLimitExceeded(size)) => {
            return Err(UpstreamError::TooLarge {
                size,
                limit: max_packet,
            })
        }
        Err(e) => return Err(malformed(e)),
    };
    Ok(Some(match packet {
        v4::Packet::ConnAck(c) => match c.code {
            v4::ConnectReturnCode::Success => ServerEvent::ConnAck(ConnAckInfo {
                session_present: c.session_present,
                receive_maximum: u16::MAX,
                max_packet_size: None,
                topic_alias_maximum: 0,
                server_keep_alive: None,
            }),
            code => ServerEvent::Refused {
                code: code as u8,
                reason: format!("{code:?}"),
            },
        },
        v4::Packet::PubAck(a) => ServerEvent::PubAck {
            pkid: a.pkid,
            reason: 0,
        },
        v4::Packet::SubAck(s) => ServerEvent::SubAck {
            pkid: s.pkid,
            refused: s
                .return_codes
                .iter()
                .filter(|c| matches!(c, v4::SubscribeReasonCode::Failure))
                .count(),
            codes: s.return_codes.len(),
        },
        v4::Packet::Publish(p) => ServerEvent::Publish {
            topic: p.topic,
            qos: p.qos as u8,
            pkid: p.pkid,
            dup: p.dup,
            payload: p.payload,
            properties: None,
        },
        v4::Packet::PingResp => ServerEvent::PingResp,
        other => {
            return Err(UpstreamError::Protocol(format!(
                "the server sent {} (not a server-to-client packet here)",
                v4_name(&other)
            )))
        }
    }))
}

fn v4_name(p: &v4::Packet) -> &'static str {
    match p {
        v4::Packet::Connect(_) => "CONNECT",
        v4::Packet::PubRec(_) => "PUBREC",
        v4::Packet::PubRel(_) => "PUBREL",
        v4::Packet::PubComp(_) => "PUBCOMP",
        v4::Packet::Subscribe(_) => "SUBSCRIBE",
        v4::Packet::UnsubAck(_) => "UNSUBACK",
        v4::Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        v4::Packet::PingReq => "PINGREQ",
        v4::Packet::Disconnect => "DISCONNECT",
        _ => "an unexpected packet",
    }
}

fn read_v5(buf: &mut BytesMut, max_packet: usize) -> Result<Option<ServerEvent>, UpstreamError> {
    let limit = u32::try_from(max_packet).unwrap_or(u32::MAX);
    // A DISCONNECT may leave out its reason code and property length (MQTT-3.14.2.1), which
    // rumqttc's decoder does not take.
    match buf.get(..2) {
        Some([0xE0, 0x00]) => {
            let _ = buf.split_to(2);
            return Ok(Some(ServerEvent::Disconnect { reason: 0 }));
        }
        Some([0xE0, 0x01]) if buf.len() >= 3 => {
            let reason = buf[2];
            let _ = buf.split_to(3);
            return Ok(Some(ServerEvent::Disconnect { reason }));
        }
        _ => {}
    }
    let packet = match v5::Packet::read(buf, Some(limit)) {
        Ok(p) => p,
        Err(V5Error::InsufficientBytes(_)) => return Ok(None),
        Err(V5Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
            return Err(UpstreamError::TooLarge {
                size: pkt_size,
                limit: max_packet,
            })
        }
        Err(e) => return Err(malformed(e)),
    };
    Ok(Some(match packet {
        v5::Packet::ConnAck(c) => match c.code {
            v5::ConnectReturnCode::Success => {
                let p = c.properties.as_ref();
                let receive_max = p.and_then(|p| p.receive_max);
                let max_packet_size = p.and_then(|p| p.max_packet_size);
                if receive_max == Some(0) || max_packet_size == Some(0) {
                    // MQTT-3.2.2.3.3 / -3.2.2.3.6: zero is a protocol error.
                    return Err(UpstreamError::Protocol(
                        "CONNACK with a Receive Maximum or Maximum Packet Size of 0".into(),
                    ));
                }
                ServerEvent::ConnAck(ConnAckInfo {
                    session_present: c.session_present,
                    receive_maximum: receive_max.unwrap_or(u16::MAX),
                    max_packet_size,
                    topic_alias_maximum: p.and_then(|p| p.topic_alias_max).unwrap_or(0),
                    server_keep_alive: p.and_then(|p| p.server_keep_alive),
                })
            }
            code => ServerEvent::Refused {
                code: v5_connack_code(code),
                reason: format!("{code:?}"),
            },
        },
        v5::Packet::PubAck(a) => ServerEvent::PubAck {
            pkid: a.pkid,
            reason: puback_code(a.reason),
        },
        v5::Packet::SubAck(s) => ServerEvent::SubAck {
            pkid: s.pkid,
            refused: s
                .return_codes
                .iter()
                .filter(|c| !matches!(c, v5::SubscribeReasonCode::Success(_)))
                .count(),
            codes: s.return_codes.len(),
        },
        v5::Packet::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| malformed("topic is not UTF-8"))?;
            let (properties, _expiry, alias) = match p.properties {
                Some(props) => MessageProperties::from_publish(props),
                None => (None, None, None),
            };
            if alias.is_some() {
                // We announce no Topic Alias Maximum, so the server may not use one
                // (MQTT-3.3.2-9).
                return Err(UpstreamError::Protocol(
                    "PUBLISH with a topic alias we never allowed".into(),
                ));
            }
            ServerEvent::Publish {
                topic,
                qos: p.qos as u8,
                pkid: p.pkid,
                dup: p.dup,
                payload: p.payload,
                properties,
            }
        }
        v5::Packet::PingResp(_) => ServerEvent::PingResp,
        v5::Packet::Disconnect(d) => ServerEvent::Disconnect {
            reason: d.reason_code as u8,
        },
        _ => {
            return Err(UpstreamError::Protocol(
                "the server sent a packet only a client sends (or AUTH, PUBREC, PUBREL, PUBCOMP, UNSUBACK we never asked for)".into(),
            ))
        }
    }))
}

fn puback_code(r: v5::PubAckReason) -> u8 {
    use v5::PubAckReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn v5_connack_code(c: v5::ConnectReturnCode) -> u8 {
    use v5::ConnectReturnCode as C;
    match c {
        C::Success => 0x00,
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => 0x84,
        C::BadClientId | C::ClientIdentifierNotValid => 0x85,
        C::ServiceUnavailable | C::ServerUnavailable => 0x88,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

/// A PUBACK failure the link retries (after a reconnect with backoff) rather than drops: the
/// server may take the same message later (throttling, a passing fault). Refusals about the
/// message itself (not authorized, topic name invalid, payload format invalid) would come back
/// every time. Packet id in use (0x91) is the server's bookkeeping, not the message's.
pub fn is_transient_refusal(reason: u8) -> bool {
    matches!(reason, 0x80 | 0x83 | 0x91 | 0x97)
}
