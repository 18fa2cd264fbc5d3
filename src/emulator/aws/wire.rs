//! MQTT 3.1.1 and MQTT 5 on one connection type: decodes client packets with rumqttc's
//! codecs (`mqttbytes::v4` / `v5::mqttbytes::v5`) into the few shapes the emulator acts on,
//! and encodes its answers in the protocol the client chose at CONNECT.
//!
//! No framing is written here: `Packet::read` frames (returning `InsufficientBytes` on a
//! partial frame) and `Packet::write` encodes. The session logic in `server.rs` never sees a
//! protocol version.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::{Error as V4Error, Protocol as V4Protocol, QoS as V4QoS};
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as V5QoS;

/// The largest packet a client may send: a 128 KB payload plus room for topic and
/// properties. Anything larger is refused while still in the buffer.
pub const MAX_INCOMING_PACKET: usize = 128 * 1024 + 2048;

/// The protocol a client connected with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.
    V5,
}

/// The CONNECT fields the emulator uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectInfo {
    /// Protocol level chosen by the client.
    pub protocol: Protocol,
    /// Client identifier.
    pub client_id: String,
    /// Keep-alive in seconds (0 = none requested).
    pub keep_alive: u16,
}

/// A client packet, reduced to what the emulator acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientPacket {
    /// PUBLISH.
    Publish {
        /// Topic name (never empty: MQTT 5 topic aliases are not granted).
        topic: String,
        /// 0, 1 or 2.
        qos: u8,
        /// Packet id (0 for QoS 0).
        pkid: u16,
        /// Payload.
        payload: Bytes,
    },
    /// PUBACK for one of our QoS 1 publishes.
    PubAck,
    /// SUBSCRIBE with (filter, requested QoS) pairs.
    Subscribe {
        /// Packet id.
        pkid: u16,
        /// Filters and requested QoS.
        filters: Vec<(String, u8)>,
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
    /// DISCONNECT.
    Disconnect,
    /// Something a client must not send (a second CONNECT, QoS 2 flow packets, AUTH, ...).
    Unexpected(&'static str),
}

/// Why bytes from the client could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not a valid MQTT packet (or an unsupported protocol level).
    #[error("malformed MQTT packet: {0}")]
    Malformed(String),
    /// A packet larger than [`MAX_INCOMING_PACKET`].
    #[error("packet of {0} bytes exceeds the {MAX_INCOMING_PACKET}-byte limit")]
    TooLarge(usize),
    /// The first packet was not CONNECT.
    #[error("first packet was not CONNECT")]
    NotConnect,
}

/// Decodes the CONNECT at the start of `buf`, whichever protocol level it uses; `Ok(None)`
/// when more bytes are needed.
pub fn read_connect(buf: &mut BytesMut) -> Result<Option<ConnectInfo>, WireError> {
    // A 3.1.1 decoder would misread an MQTT 5 CONNECT (it has properties before the client id),
    // so try 3.1.1 on a copy and keep it only if the client really asked for level 4.
    let mut probe = buf.clone();
    match v4::Packet::read(&mut probe, MAX_INCOMING_PACKET) {
        Ok(v4::Packet::Connect(c)) if c.protocol == V4Protocol::V4 => {
            *buf = probe;
            return Ok(Some(ConnectInfo {
                protocol: Protocol::V4,
                client_id: c.client_id,
                keep_alive: c.keep_alive,
            }));
        }
        Ok(v4::Packet::Connect(_)) => {}
        Ok(_) => return Err(WireError::NotConnect),
        Err(V4Error::InsufficientBytes(_)) => return Ok(None),
        Err(V4Error::PayloadSizeLimitExceeded(n)) => return Err(WireError::TooLarge(n)),
        // Level 5 fields make the 3.1.1 decoder fail; the MQTT 5 decoder decides.
        Err(_) => {}
    }
    match v5::Packet::read(buf, Some(MAX_INCOMING_PACKET as u32)) {
        Ok(v5::Packet::Connect(c, _, _)) => Ok(Some(ConnectInfo {
            protocol: Protocol::V5,
            client_id: c.client_id,
            keep_alive: c.keep_alive,
        })),
        Ok(_) => Err(WireError::NotConnect),
        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
            Err(WireError::TooLarge(pkt_size))
        }
        Err(e) => Err(WireError::Malformed(e.to_string())),
    }
}

/// Decodes the next packet of a connected client; `Ok(None)` when more bytes are needed.
pub fn read_packet(
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<Option<ClientPacket>, WireError> {
    match protocol {
        Protocol::V4 => read_v4(buf),
        Protocol::V5 => read_v5(buf),
    }
}

fn read_v4(buf: &mut BytesMut) -> Result<Option<ClientPacket>, WireError> {
    let packet = match v4::Packet::read(buf, MAX_INCOMING_PACKET) {
        Ok(p) => p,
        Err(V4Error::InsufficientBytes(_)) => return Ok(None),
        Err(V4Error::PayloadSizeLimitExceeded(n)) => return Err(WireError::TooLarge(n)),
        Err(e) => return Err(WireError::Malformed(e.to_string())),
    };
    Ok(Some(match packet {
        v4::Packet::Publish(p) => ClientPacket::Publish {
            topic: p.topic,
            qos: p.qos as u8,
            pkid: p.pkid,
            payload: p.payload,
        },
        v4::Packet::PubAck(_) => ClientPacket::PubAck,
        v4::Packet::Subscribe(s) => ClientPacket::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => ClientPacket::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => ClientPacket::PingReq,
        v4::Packet::Disconnect => ClientPacket::Disconnect,
        v4::Packet::Connect(_) => ClientPacket::Unexpected("second CONNECT"),
        v4::Packet::PubRec(_) | v4::Packet::PubRel(_) | v4::Packet::PubComp(_) => {
            ClientPacket::Unexpected("QoS 2 flow packet (QoS 2 is not supported)")
        }
        v4::Packet::ConnAck(_)
        | v4::Packet::SubAck(_)
        | v4::Packet::UnsubAck(_)
        | v4::Packet::PingResp => ClientPacket::Unexpected("server-to-client packet"),
    }))
}

fn read_v5(buf: &mut BytesMut) -> Result<Option<ClientPacket>, WireError> {
    use rumqttc::v5::mqttbytes::Error as V5Error;
    let packet = match v5::Packet::read(buf, Some(MAX_INCOMING_PACKET as u32)) {
        Ok(p) => p,
        Err(V5Error::InsufficientBytes(_)) => return Ok(None),
        Err(V5Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
            return Err(WireError::TooLarge(pkt_size))
        }
        Err(e) => return Err(WireError::Malformed(e.to_string())),
    };
    Ok(Some(match packet {
        v5::Packet::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| WireError::Malformed("topic is not UTF-8".into()))?;
            if topic.is_empty() {
                // We advertise no topic aliases, so an empty topic is a protocol error.
                return Ok(Some(ClientPacket::Unexpected(
                    "PUBLISH without a topic name",
                )));
            }
            ClientPacket::Publish {
                topic,
                qos: p.qos as u8,
                pkid: p.pkid,
                payload: p.payload,
            }
        }
        v5::Packet::PubAck(_) => ClientPacket::PubAck,
        v5::Packet::Subscribe(s) => ClientPacket::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => ClientPacket::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => ClientPacket::PingReq,
        v5::Packet::Disconnect(_) => ClientPacket::Disconnect,
        v5::Packet::Connect(..) => ClientPacket::Unexpected("second CONNECT"),
        v5::Packet::Auth(_) => ClientPacket::Unexpected("AUTH (enhanced authentication)"),
        v5::Packet::PubRec(_) | v5::Packet::PubRel(_) | v5::Packet::PubComp(_) => {
            ClientPacket::Unexpected("QoS 2 flow packet (QoS 2 is not supported)")
        }
        v5::Packet::ConnAck(_)
        | v5::Packet::SubAck(_)
        | v5::Packet::UnsubAck(_)
        | v5::Packet::PingResp(_) => ClientPacket::Unexpected("server-to-client packet"),
    }))
}

/// How a CONNECT is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// Accepted.
    Accepted,
    /// Refused: the certificate or client id is not authorized.
    NotAuthorized,
}

/// A server packet to encode.
#[derive(Clone, Debug)]
pub enum ServerPacket<'a> {
    /// CONNACK.
    ConnAck(ConnectOutcome),
    /// SUBACK: granted QoS per filter, `None` = refused.
    SubAck {
        /// Packet id.
        pkid: u16,
        /// Granted QoS per filter.
        granted: &'a [Option<u8>],
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
    /// PUBLISH (QoS 0 or 1).
    Publish {
        /// Topic.
        topic: &'a str,
        /// 0 or 1.
        qos: u8,
        /// Packet id (ignored for QoS 0).
        pkid: u16,
        /// Payload.
        payload: Bytes,
    },
    /// PINGRESP.
    PingResp,
}

fn v4_qos(q: u8) -> V4QoS {
    if q == 0 {
        V4QoS::AtMostOnce
    } else {
        V4QoS::AtLeastOnce
    }
}

fn v5_qos(q: u8) -> V5QoS {
    if q == 0 {
        V5QoS::AtMostOnce
    } else {
        V5QoS::AtLeastOnce
    }
}

/// Appends `packet`, encoded for `protocol`, to `out`.
pub fn write_packet(
    protocol: Protocol,
    packet: ServerPacket<'_>,
    out: &mut BytesMut,
) -> Result<(), WireError> {
    let result = match protocol {
        Protocol::V4 => v4_packet(packet)
            .write(out, usize::MAX)
            .map_err(|e| e.to_string()),
        Protocol::V5 => v5_packet(packet)
            .write(out, None)
            .map_err(|e| e.to_string()),
    };
    result
        .map(|_| ())
        .map_err(|e| WireError::Malformed(format!("cannot encode: {e}")))
}

fn v4_packet(packet: ServerPacket<'_>) -> v4::Packet {
    match packet {
        ServerPacket::ConnAck(outcome) => v4::Packet::ConnAck(v4::ConnAck::new(
            match outcome {
                ConnectOutcome::Accepted => v4::ConnectReturnCode::Success,
                ConnectOutcome::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
            },
            false,
        )),
        ServerPacket::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            granted
                .iter()
                .map(|g| match g {
                    Some(q) => v4::SubscribeReasonCode::Success(v4_qos(*q)),
                    None => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        ServerPacket::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        ServerPacket::PubAck(pkid) => v4::Packet::PubAck(v4::PubAck::new(pkid)),
        ServerPacket::Publish {
            topic,
            qos,
            pkid,
            payload,
        } => {
            let mut p = v4::Publish::from_bytes(topic, v4_qos(qos), payload);
            p.pkid = if qos == 0 { 0 } else { pkid };
            v4::Packet::Publish(p)
        }
        ServerPacket::PingResp => v4::Packet::PingResp,
    }
}

fn v5_packet(packet: ServerPacket<'_>) -> v5::Packet {
    match packet {
        ServerPacket::ConnAck(outcome) => v5::Packet::ConnAck(v5::ConnAck {
            session_present: false,
            code: match outcome {
                ConnectOutcome::Accepted => v5::ConnectReturnCode::Success,
                ConnectOutcome::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
            },
            properties: (outcome == ConnectOutcome::Accepted).then(v5_connack_properties),
        }),
        ServerPacket::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: granted
                .iter()
                .map(|g| match g {
                    Some(q) => v5::SubscribeReasonCode::Success(v5_qos(*q)),
                    None => v5::SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: None,
        }),
        ServerPacket::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::Success; count],
            properties: None,
        }),
        ServerPacket::PubAck(pkid) => v5::Packet::PubAck(v5::PubAck::new(pkid, None)),
        ServerPacket::Publish {
            topic,
            qos,
            pkid,
            payload,
        } => {
            let mut p = v5::Publish::new(topic, v5_qos(qos), payload, None);
            p.pkid = if qos == 0 { 0 } else { pkid };
            v5::Packet::Publish(p)
        }
        ServerPacket::PingResp => v5::Packet::PingResp(v5::PingResp),
    }
}

/// What the emulator tells MQTT 5 clients about itself: QoS 1 at most (as AWS IoT Core), no
/// topic aliases, no shared subscriptions or subscription identifiers.
fn v5_connack_properties() -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: Some(1),
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(0),
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(read_connect(&mut head).unwrap().is_none());
        let mut whole = partial;
        whole.extend_from_slice(&buf);
        let info = read_connect(&mut whole).unwrap().unwrap();
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
        let info = read_connect(&mut buf).unwrap().unwrap();
        assert_eq!(info.protocol, Protocol::V5);
        assert_eq!(info.client_id, "sdk-5");
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_packets_are_refused_before_buffering_them() {
        let mut buf = BytesMut::new();
        let mut p = v4::Publish::new("t", V4QoS::AtLeastOnce, vec![0u8; MAX_INCOMING_PACKET]);
        p.pkid = 1;
        v4::Packet::Publish(p).write(&mut buf, usize::MAX).unwrap();
        let mut head = buf.split_to(16);
        assert!(matches!(
            read_packet(Protocol::V4, &mut head),
            Err(WireError::TooLarge(_))
        ));
    }
}
