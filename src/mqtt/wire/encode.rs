//! Encoding of the servers' packets in the protocol the client chose at CONNECT.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS as V4QoS;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as V5QoS;

use super::{
    ConnectOutcome, DisconnectReason, Protocol, ServerFeatures, ServerPacket, SubRefusal,
    WireError, PUBLISH_REFUSED_REASON,
};

fn v4_qos(q: u8) -> V4QoS {
    match q {
        0 => V4QoS::AtMostOnce,
        1 => V4QoS::AtLeastOnce,
        _ => V4QoS::ExactlyOnce,
    }
}

fn v5_qos(q: u8) -> V5QoS {
    match q {
        0 => V5QoS::AtMostOnce,
        1 => V5QoS::AtLeastOnce,
        _ => V5QoS::ExactlyOnce,
    }
}

/// Appends `packet`, encoded for `protocol`, to `out`.
pub fn write_packet(
    protocol: Protocol,
    packet: ServerPacket<'_>,
    out: &mut BytesMut,
) -> Result<(), WireError> {
    let result = match protocol {
        // MQTT 3.1.1 has no server DISCONNECT: the server just closes.
        Protocol::V4 if matches!(packet, ServerPacket::Disconnect { .. }) => Ok(0),
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
        ServerPacket::ConnAck {
            outcome,
            session_present,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(
            match outcome {
                ConnectOutcome::Accepted => v4::ConnectReturnCode::Success,
                ConnectOutcome::NotAuthorized | ConnectOutcome::BadCredentials => {
                    v4::ConnectReturnCode::NotAuthorized
                }
                ConnectOutcome::BadClientId => v4::ConnectReturnCode::BadClientId,
                ConnectOutcome::ServerUnavailable => v4::ConnectReturnCode::ServiceUnavailable,
                ConnectOutcome::BadAuthenticationMethod => v4::ConnectReturnCode::NotAuthorized,
            },
            session_present && outcome == ConnectOutcome::Accepted,
        )),
        ServerPacket::SubAck { pkid, granted, .. } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            granted
                .iter()
                .map(|g| match g {
                    Ok(q) => v4::SubscribeReasonCode::Success(v4_qos(*q)),
                    Err(_) => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        ServerPacket::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        ServerPacket::PubAck(pkid) | ServerPacket::PubAckRefused { pkid, .. } => {
            v4::Packet::PubAck(v4::PubAck::new(pkid))
        }
        ServerPacket::PubRec(pkid) | ServerPacket::PubRecRefused { pkid, .. } => {
            v4::Packet::PubRec(v4::PubRec::new(pkid))
        }
        ServerPacket::PubComp(pkid) => v4::Packet::PubComp(v4::PubComp::new(pkid)),
        ServerPacket::PubRel(pkid) => v4::Packet::PubRel(v4::PubRel::new(pkid)),
        ServerPacket::Publish {
            topic,
            qos,
            pkid,
            retain,
            dup,
            payload,
            ..
        } => {
            let mut p = v4::Publish::from_bytes(topic, v4_qos(qos), payload);
            p.pkid = if qos == 0 { 0 } else { pkid };
            p.retain = retain;
            p.dup = dup && qos > 0;
            v4::Packet::Publish(p)
        }
        ServerPacket::PingResp => v4::Packet::PingResp,
        // Never encoded for 3.1.1 (see `write_packet`); a PINGRESP is harmless if it were.
        ServerPacket::Disconnect { .. } => v4::Packet::PingResp,
    }
}

fn v5_packet(packet: ServerPacket<'_>) -> v5::Packet {
    match packet {
        ServerPacket::ConnAck {
            outcome,
            session_present,
            features,
            assigned_client_id,
            reason,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present: session_present && outcome == ConnectOutcome::Accepted,
            code: match outcome {
                ConnectOutcome::Accepted => v5::ConnectReturnCode::Success,
                ConnectOutcome::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                ConnectOutcome::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                ConnectOutcome::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                ConnectOutcome::ServerUnavailable => v5::ConnectReturnCode::ServerUnavailable,
                ConnectOutcome::BadAuthenticationMethod => {
                    v5::ConnectReturnCode::BadAuthenticationMethod
                }
            },
            properties: if outcome == ConnectOutcome::Accepted {
                Some(v5_connack_properties(features, assigned_client_id))
            } else {
                reason.map(|r| v5::ConnAckProperties {
                    reason_string: Some(r.to_string()),
                    ..v5_connack_properties(features, None)
                })
            },
        }),
        ServerPacket::SubAck {
            pkid,
            granted,
            reason,
        } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: granted
                .iter()
                .map(|g| match g {
                    Ok(q) => v5::SubscribeReasonCode::Success(v5_qos(*q)),
                    Err(SubRefusal::NotAuthorized) => v5::SubscribeReasonCode::NotAuthorized,
                    Err(SubRefusal::InvalidFilter) => v5::SubscribeReasonCode::TopicFilterInvalid,
                    Err(SubRefusal::QuotaExceeded) => v5::SubscribeReasonCode::QuotaExceeded,
                })
                .collect(),
            properties: reason.map(|r| v5::SubAckProperties {
                reason_string: Some(r.to_string()),
                user_properties: Vec::new(),
            }),
        }),
        ServerPacket::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::Success; count],
            properties: None,
        }),
        ServerPacket::PubAck(pkid) => v5::Packet::PubAck(v5::PubAck::new(pkid, None)),
        ServerPacket::PubAckRefused { pkid, say_why } => {
            let mut ack = v5::PubAck::new(
                pkid,
                say_why.then(|| v5::PubAckProperties {
                    reason_string: Some(PUBLISH_REFUSED_REASON.to_string()),
                    user_properties: Vec::new(),
                }),
            );
            ack.reason = v5::PubAckReason::NotAuthorized;
            v5::Packet::PubAck(ack)
        }
        ServerPacket::PubRec(pkid) => v5::Packet::PubRec(v5::PubRec::new(pkid, None)),
        ServerPacket::PubRecRefused { pkid, say_why } => {
            let mut rec = v5::PubRec::new(
                pkid,
                say_why.then(|| v5::PubRecProperties {
                    reason_string: Some(PUBLISH_REFUSED_REASON.to_string()),
                    user_properties: Vec::new(),
                }),
            );
            rec.reason = v5::PubRecReason::NotAuthorized;
            v5::Packet::PubRec(rec)
        }
        ServerPacket::PubComp(pkid) => v5::Packet::PubComp(v5::PubComp::new(pkid, None)),
        ServerPacket::PubRel(pkid) => v5::Packet::PubRel(v5::PubRel::new(pkid, None)),
        ServerPacket::Publish {
            topic,
            qos,
            pkid,
            retain,
            dup,
            payload,
            properties,
        } => {
            let mut p = v5::Publish::new(topic, v5_qos(qos), payload, properties);
            p.pkid = if qos == 0 { 0 } else { pkid };
            p.retain = retain;
            p.dup = dup && qos > 0;
            v5::Packet::Publish(p)
        }
        ServerPacket::PingResp => v5::Packet::PingResp(v5::PingResp),
        ServerPacket::Disconnect {
            reason,
            reason_string,
        } => {
            use v5::DisconnectReasonCode as C;
            let code = match reason {
                DisconnectReason::MalformedPacket => C::MalformedPacket,
                DisconnectReason::ProtocolError => C::ProtocolError,
                DisconnectReason::NotAuthorized => C::NotAuthorized,
                DisconnectReason::ServerShuttingDown => C::ServerShuttingDown,
                DisconnectReason::KeepAliveTimeout => C::KeepAliveTimeout,
                DisconnectReason::SessionTakenOver => C::SessionTakenOver,
                DisconnectReason::TopicNameInvalid => C::TopicNameInvalid,
                DisconnectReason::TopicAliasInvalid => C::TopicAliasInvalid,
                DisconnectReason::PacketTooLarge => C::PacketTooLarge,
                DisconnectReason::QuotaExceeded => C::QuotaExceeded,
                DisconnectReason::UnspecifiedError => C::UnspecifiedError,
            };
            v5::Packet::Disconnect(v5::Disconnect {
                reason_code: code,
                properties: reason_string.map(|r| v5::DisconnectProperties {
                    session_expiry_interval: None,
                    reason_string: Some(r),
                    user_properties: Vec::new(),
                    server_reference: None,
                }),
            })
        }
    }
}

/// The server's limits and features, as `features` says.
fn v5_connack_properties(
    features: ServerFeatures,
    assigned_client_id: Option<&str>,
) -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        // Absent means 2 (MQTT 5 §3.2.2.3.4).
        max_qos: (features.max_qos < 2).then_some(features.max_qos),
        retain_available: (!features.retain).then_some(0),
        max_packet_size: Some(features.max_packet),
        assigned_client_identifier: assigned_client_id.map(str::to_string),
        topic_alias_max: (features.topic_alias_max > 0).then_some(features.topic_alias_max),
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: (!features.subscription_identifiers).then_some(0),
        shared_subscription_available: (!features.shared_subscriptions).then_some(0),
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}
