//! SUBSCRIBE at QoS 0 and 1 with the SUBACK's codes counted, QoS 1 messages from the server
//! acknowledged, and what one read brought taken without waiting: what the claim sessions
//! (`cloud::aws::claim`) need beyond the telemetry links, in both protocol versions.

use bytes::Bytes;

use super::tests::{accepted, encoded, next_event, next_packet, pair, send, send_raw};
use super::*;
use crate::mqtt::wire::{ClientPacket, Protocol, ServerPacket, SubRefusal};

fn versions() -> [(MqttVersion, Protocol); 2] {
    [
        (MqttVersion::V4, Protocol::V4),
        (MqttVersion::V5, Protocol::V5),
    ]
}

fn message<'a>(topic: &'a str, qos: u8, pkid: u16, payload: &'static [u8]) -> ServerPacket<'a> {
    ServerPacket::Publish {
        topic,
        qos,
        pkid,
        retain: false,
        dup: false,
        payload: Bytes::from_static(payload),
        properties: None,
    }
}

#[tokio::test]
async fn subscribes_at_qos_0_or_1_and_counts_the_subacks_codes() {
    for (version, protocol) in versions() {
        let connack = encoded(protocol, accepted(1 << 20));
        let (mut client, mut peer, _) = pair(version, &connack).await;
        // What cannot be sent is refused before anything is queued.
        assert!(matches!(
            client.queue_subscribe(1, &["a".into()], 2),
            Err(UpstreamError::Protocol(_))
        ));
        assert!(matches!(
            client.queue_subscribe(1, &[], 1),
            Err(UpstreamError::Protocol(_))
        ));
        assert!(!client.has_queued());

        let mut ids: Inflight<()> = Inflight::default();
        let first = ids.subscribe_id().unwrap();
        let second = ids.subscribe_id().unwrap();
        client
            .queue_subscribe(first, &["a/accepted".into(), "a/rejected".into()], 0)
            .unwrap();
        client
            .queue_subscribe(second, &["b/accepted".into()], 1)
            .unwrap();
        assert!(client.has_queued());
        client.flush().await.unwrap();
        assert!(!client.has_queued());
        for (pkid, want) in [
            (first, vec![("a/accepted", 0), ("a/rejected", 0)]),
            (second, vec![("b/accepted", 1)]),
        ] {
            match next_packet(&mut peer).await {
                ClientPacket::Subscribe { pkid: got, filters } => {
                    assert_eq!(got, pkid);
                    let filters: Vec<(&str, u8)> =
                        filters.iter().map(|f| (f.filter.as_str(), f.qos)).collect();
                    assert_eq!(filters, want, "{version:?}");
                }
                other => panic!("expected SUBSCRIBE, got {other:?}"),
            }
        }
        send(
            &mut peer,
            &[
                ServerPacket::SubAck {
                    pkid: first,
                    granted: &[Ok(0), Err(SubRefusal::NotAuthorized)],
                    reason: None,
                },
                ServerPacket::SubAck {
                    pkid: second,
                    granted: &[Ok(1)],
                    reason: None,
                },
            ],
        )
        .await;
        assert_eq!(
            next_event(&mut client).await.unwrap(),
            ServerEvent::SubAck {
                pkid: first,
                refused: 1,
                codes: 2
            }
        );
        assert_eq!(
            next_event(&mut client).await.unwrap(),
            ServerEvent::SubAck {
                pkid: second,
                refused: 0,
                codes: 1
            }
        );
        ids.suback(first).unwrap();
        ids.suback(second).unwrap();
        assert!(ids.suback(second).is_err(), "a replayed SUBACK is refused");
    }
}

#[tokio::test]
async fn messages_from_the_server_are_acknowledged_and_one_read_is_taken_in_one_go() {
    for (version, protocol) in versions() {
        let connack = encoded(protocol, accepted(1 << 20));
        let (mut client, mut peer, _) = pair(version, &connack).await;
        assert_eq!(client.buffered_event().unwrap(), None, "nothing read yet");
        // One write: a QoS 1 answer, a QoS 0 message and a PUBACK.
        let mut bytes = encoded(protocol, message("x/accepted", 1, 5, b"answer"));
        bytes.extend(encoded(protocol, message("y/accepted", 0, 0, b"noise")));
        bytes.extend(encoded(protocol, ServerPacket::PubAck(3)));
        send_raw(&mut peer, &bytes).await;
        let mut events = vec![next_event(&mut client).await.unwrap()];
        // The rest of that read, without reading again (a segment split on loopback would
        // leave the last ones to a further read).
        while let Some(event) = client.buffered_event().unwrap() {
            events.push(event);
        }
        while events.len() < 3 {
            events.push(next_event(&mut client).await.unwrap());
        }
        assert_eq!(client.buffered_event().unwrap(), None);
        match &events[0] {
            ServerEvent::Publish {
                topic,
                qos,
                pkid,
                payload,
                ..
            } => assert_eq!(
                (topic.as_str(), *qos, *pkid, &payload[..]),
                ("x/accepted", 1, 5, &b"answer"[..])
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(&events[1], ServerEvent::Publish { qos: 0, .. }));
        assert!(matches!(events[2], ServerEvent::PubAck { pkid: 3, .. }));
        // The PUBACK waits in the buffer until the caller flushes, with what it sends next.
        client.queue_puback(5);
        client
            .queue_publish(9, "x", &Bytes::from_static(b"next request"), None)
            .unwrap();
        client.flush().await.unwrap();
        assert_eq!(next_packet(&mut peer).await, ClientPacket::PubAck(5));
        assert!(matches!(
            next_packet(&mut peer).await,
            ClientPacket::Publish { pkid: 9, .. }
        ));
    }
}
