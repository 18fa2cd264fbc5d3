//! MQTT 5 features of the embedded broker, side by side with mosquitto: each scenario runs
//! against both brokers (mosquitto 2.x started on a free port, anonymous) and both must show
//! the same observations; where the specification leaves a choice, the test says which one
//! the embedded broker made. Grouped by section of the MQTT 5 specification.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::mqtt5::{brokers, options, Client};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;

/// Payload format, content type, response topic, correlation data, user properties and
/// subscription identifiers of a delivery.
type Carried = (
    Option<u8>,
    Option<String>,
    Option<String>,
    Option<Bytes>,
    Vec<(String, String)>,
    Vec<usize>,
);

/// The properties a message carries, as a comparable value (subscription ids sorted: their
/// order is not specified).
fn carried(p: &Publish) -> Carried {
    let props = p.properties.clone().unwrap_or_default();
    let mut ids = props.subscription_identifiers.clone();
    ids.sort_unstable();
    (
        props.payload_format_indicator,
        props.content_type,
        props.response_topic,
        props.correlation_data,
        props.user_properties,
        ids,
    )
}

fn request_properties() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("app/replies/7".into()),
        correlation_data: Some(Bytes::from_static(b"req-7")),
        user_properties: vec![
            ("site".into(), "plant-3".into()),
            ("line".into(), "2".into()),
            ("site".into(), "again".into()),
        ],
        ..PublishProperties::default()
    }
}

// §3.3.2.3: properties of an application message reach subscribers unchanged, live and
// retained, and the message expiry interval counts down.
async fn properties_scenario(port: u16) -> Vec<Carried> {
    let mut sub = Client::connect(options("sub", port)).await;
    sub.subscribe("req/#", QoS::AtLeastOnce, None).await;
    let publisher = Client::connect(options("pub", port)).await;
    let mut with_expiry = request_properties();
    with_expiry.message_expiry_interval = Some(3600);
    publisher
        .publish("req/a", QoS::AtLeastOnce, false, b"{}", with_expiry.clone())
        .await;
    publisher
        .publish("req/r", QoS::AtLeastOnce, true, b"{}", with_expiry)
        .await;
    let live = sub.publishes_until("req/r").await;
    let expiry = live[0]
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    assert!(
        expiry.is_some_and(|s| s > 3500 && s <= 3600),
        "expiry counts down: {expiry:?}"
    );
    let mut late = Client::connect(options("late", port)).await;
    late.subscribe("req/r", QoS::AtLeastOnce, None).await;
    let retained = late.next_publish().await;
    assert!(retained.retain);
    vec![carried(&live[0]), carried(&live[1]), carried(&retained)]
}

#[tokio::test]
async fn message_properties_travel_unchanged() {
    let b = brokers().await;
    let ours = properties_scenario(b.embedded_port).await;
    let theirs = properties_scenario(b.mosquitto_port).await;
    assert_eq!(ours, theirs, "embedded vs mosquitto");
    let want = carried(&Publish {
        properties: Some(request_properties()),
        ..Publish::new("x", QoS::AtMostOnce, Vec::new(), None)
    });
    assert!(ours.iter().all(|c| c == &want), "{ours:?}");
}

// §3.8.2.1.2, §3.3.4: subscription identifiers, one copy with every matching id.
async fn subscription_ids_scenario(port: u16) -> Vec<Vec<usize>> {
    let mut sub = Client::connect(options("ids", port)).await;
    sub.subscribe("s/+", QoS::AtLeastOnce, Some(7)).await;
    sub.subscribe("s/#", QoS::AtLeastOnce, Some(9)).await;
    sub.subscribe("t/x", QoS::AtLeastOnce, None).await;
    let publisher = Client::connect(options("pub-ids", port)).await;
    publisher
        .publish(
            "s/a",
            QoS::AtLeastOnce,
            false,
            b"1",
            PublishProperties::default(),
        )
        .await;
    publisher
        .publish(
            "t/x",
            QoS::AtLeastOnce,
            false,
            b"2",
            PublishProperties::default(),
        )
        .await;
    sub.publishes_until("t/x")
        .await
        .iter()
        .map(|p| carried(p).5)
        .collect()
}

#[tokio::test]
async fn subscription_identifiers_come_with_each_match() {
    let b = brokers().await;
    let ours = subscription_ids_scenario(b.embedded_port).await;
    let theirs = subscription_ids_scenario(b.mosquitto_port).await;
    // MQTT-3.3.4-2..4 allow one copy with every matching identifier or a copy per matching
    // subscription. Ours sends one copy (a device with overlapping filters gets a message
    // once); mosquitto sends a copy each. The same identifiers arrive either way.
    assert_eq!(ours, vec![vec![7, 9], vec![]]);
    assert_eq!(theirs, vec![vec![7], vec![9], vec![]]);
}

// §3.1.2.11.4, §4.9: the client's Receive Maximum bounds unacknowledged deliveries.
async fn receive_maximum_scenario(port: u16) -> (usize, bool) {
    let mut o = options("slow", port);
    o.set_receive_maximum(Some(5)).set_manual_acks(true);
    let mut sub = Client::connect(o).await;
    sub.subscribe("rm/#", QoS::AtLeastOnce, None).await;
    let publisher = Client::connect(options("fast", port)).await;
    for n in 0..20u8 {
        publisher
            .publish(
                "rm/x",
                QoS::AtLeastOnce,
                false,
                &[n],
                PublishProperties::default(),
            )
            .await;
    }
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(sub.next_publish().await);
    }
    // A sixth before any PUBACK would break MQTT-3.3.4-9.
    let sixth_early = tokio::time::timeout(Duration::from_millis(300), sub.packets.recv())
        .await
        .is_ok_and(|p| matches!(p, Some(Packet::Publish(_))));
    sub.client.ack(&held[0]).await.unwrap();
    let next = sub.next_publish().await;
    assert_eq!(&next.payload[..], &[5u8]);
    (held.len(), sixth_early)
}

#[tokio::test]
async fn receive_maximum_of_the_client_is_honoured() {
    let b = brokers().await;
    let ours = receive_maximum_scenario(b.embedded_port).await;
    assert_eq!(ours, receive_maximum_scenario(b.mosquitto_port).await);
    assert_eq!(ours, (5, false));
}

// §3.1.2.11.5: nothing larger than the client's Maximum Packet Size is sent; such a message
// is discarded for that client (MQTT-3.1.2-25), the others still get it.
async fn max_packet_scenario(port: u16) -> (Vec<usize>, Vec<usize>) {
    let mut o = options("small", port);
    o.set_max_packet_size(Some(1024));
    let mut small = Client::connect(o).await;
    small.subscribe("mp/#", QoS::AtLeastOnce, None).await;
    let mut big = Client::connect(options("big", port)).await;
    big.subscribe("mp/#", QoS::AtLeastOnce, None).await;
    let publisher = Client::connect(options("pub-mp", port)).await;
    publisher
        .publish(
            "mp/x",
            QoS::AtLeastOnce,
            false,
            &[7u8; 2048],
            PublishProperties::default(),
        )
        .await;
    publisher
        .publish(
            "mp/end",
            QoS::AtLeastOnce,
            false,
            b"e",
            PublishProperties::default(),
        )
        .await;
    let sizes = |ps: Vec<Publish>| ps.iter().map(|p| p.payload.len()).collect::<Vec<_>>();
    (
        sizes(small.publishes_until("mp/end").await),
        sizes(big.publishes_until("mp/end").await),
    )
}

#[tokio::test]
async fn maximum_packet_size_of_the_client_is_honoured() {
    let b = brokers().await;
    let ours = max_packet_scenario(b.embedded_port).await;
    assert_eq!(ours, max_packet_scenario(b.mosquitto_port).await);
    assert_eq!(ours, (vec![1], vec![2048, 1]));
}

// §3.3.2.3.4: topic aliases from the client.
async fn topic_alias_scenario(port: u16) -> Vec<String> {
    let mut sub = Client::connect(options("alias-sub", port)).await;
    sub.subscribe("ta/#", QoS::AtLeastOnce, None).await;
    let publisher = Client::connect(options("alias-pub", port)).await;
    let granted = publisher
        .connack
        .as_ref()
        .and_then(|c| c.topic_alias_max)
        .unwrap_or(0);
    assert!(granted >= 1, "topic aliases granted: {granted}");
    let alias = |a| PublishProperties {
        topic_alias: Some(a),
        ..PublishProperties::default()
    };
    publisher
        .publish(
            "ta/long/topic/name",
            QoS::AtLeastOnce,
            false,
            b"1",
            alias(1),
        )
        .await;
    publisher
        .publish("", QoS::AtLeastOnce, false, b"2", alias(1))
        .await;
    publisher
        .publish(
            "ta/end",
            QoS::AtLeastOnce,
            false,
            b"3",
            PublishProperties::default(),
        )
        .await;
    sub.publishes_until("ta/end")
        .await
        .iter()
        .map(|p| String::from_utf8(p.topic.to_vec()).unwrap())
        .collect()
}

#[tokio::test]
async fn topic_aliases_from_the_client_are_resolved() {
    let b = brokers().await;
    let ours = topic_alias_scenario(b.embedded_port).await;
    assert_eq!(ours, topic_alias_scenario(b.mosquitto_port).await);
    assert_eq!(ours, ["ta/long/topic/name", "ta/long/topic/name", "ta/end"]);
}

// §3.8.3.1: subscription options no local, retain as published and retain handling.
async fn subscription_options_scenario(port: u16) -> Vec<(String, bool)> {
    let mut me = Client::connect(options("opts", port)).await;
    let publisher = Client::connect(options("opts-pub", port)).await;
    publisher
        .publish(
            "so/kept",
            QoS::AtLeastOnce,
            true,
            b"r",
            PublishProperties::default(),
        )
        .await;
    let sub = |filter: &str, no_local, rap, rh| {
        let mut f = Filter::new(filter, QoS::AtLeastOnce);
        f.nolocal = no_local;
        f.preserve_retain = rap;
        f.retain_forward_rule = rh;
        f
    };
    use rumqttc::v5::mqttbytes::v5::RetainForwardRule as R;
    me.client
        .subscribe_many(vec![
            sub("so/mine", true, false, R::OnEverySubscribe),
            sub("so/kept", false, true, R::Never),
            sub("so/end", false, false, R::OnEverySubscribe),
        ])
        .await
        .unwrap();
    me.next_matching(|p| matches!(p, Packet::SubAck(_))).await;
    me.publish(
        "so/mine",
        QoS::AtLeastOnce,
        false,
        b"own",
        PublishProperties::default(),
    )
    .await;
    publisher
        .publish(
            "so/kept",
            QoS::AtLeastOnce,
            true,
            b"live",
            PublishProperties::default(),
        )
        .await;
    publisher
        .publish(
            "so/end",
            QoS::AtLeastOnce,
            false,
            b"e",
            PublishProperties::default(),
        )
        .await;
    me.publishes_until("so/end")
        .await
        .iter()
        .map(|p| (String::from_utf8(p.payload.to_vec()).unwrap(), p.retain))
        .collect()
}

#[tokio::test]
async fn subscription_options_are_applied() {
    let b = brokers().await;
    let ours = subscription_options_scenario(b.embedded_port).await;
    assert_eq!(ours, subscription_options_scenario(b.mosquitto_port).await);
    // No own message (no local), no retained replay (handling 2), the live retained message
    // keeps its flag (retain as published).
    assert_eq!(ours, [("live".to_string(), true), ("e".to_string(), false)]);
}

// §3.2.2.3: what the embedded broker announces in CONNACK (choices of ours, not compared).
#[tokio::test]
async fn connack_announces_the_brokers_features() {
    let b = brokers().await;
    let c = Client::connect(options("features", b.embedded_port)).await;
    let p = c.connack.clone().expect("CONNACK properties");
    assert_eq!(p.max_qos, None, "absent = QoS 2 supported");
    assert_eq!(
        p.retain_available, None,
        "absent = retained messages supported"
    );
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(
        p.subscription_identifiers_available, None,
        "absent = supported"
    );
    assert_eq!(p.topic_alias_max, Some(64));
    assert_eq!(p.max_packet_size, Some(256 * 1024));
}

// §4.8.2: shared subscriptions: each message goes to one member of the group; the members
// take turns. §3.3.1.3 sends retained messages to new non-shared subscriptions only: ours
// sends none to a shared one; mosquitto 2.0 does send them (not compared).
async fn shared_scenario(port: u16) -> (usize, usize, Vec<Vec<u8>>, bool) {
    let publisher = Client::connect(options("share-pub", port)).await;
    let plain = PublishProperties::default;
    publisher
        .publish("sh/kept", QoS::AtLeastOnce, true, b"old", plain())
        .await;
    let mut m1 = Client::connect(options("member-1", port)).await;
    let mut m2 = Client::connect(options("member-2", port)).await;
    // Each member also holds an ordinary subscription to the marker, which every subscriber
    // gets: once it arrives, everything published before it has been routed.
    for m in [&mut m1, &mut m2] {
        m.subscribe("end", QoS::AtLeastOnce, None).await;
        m.subscribe("$share/g/sh/#", QoS::AtLeastOnce, None).await;
    }
    for n in 0..10u8 {
        publisher
            .publish("sh/x", QoS::AtLeastOnce, false, &[n], plain())
            .await;
    }
    publisher
        .publish("end", QoS::AtLeastOnce, false, b"e", plain())
        .await;
    let mut all = Vec::new();
    let mut counts = Vec::new();
    let mut retained = false;
    for m in [&mut m1, &mut m2] {
        let got = m.publishes_until("end").await;
        retained |= got.iter().any(|p| p.retain);
        let live: Vec<Vec<u8>> = got
            .iter()
            .filter(|p| p.topic == "sh/x".as_bytes())
            .map(|p| p.payload.to_vec())
            .collect();
        counts.push(live.len());
        all.extend(live);
    }
    all.sort();
    (counts[0], counts[1], all, retained)
}

#[tokio::test]
async fn shared_subscriptions_deliver_each_message_to_one_member() {
    let b = brokers().await;
    let ours = shared_scenario(b.embedded_port).await;
    let theirs = shared_scenario(b.mosquitto_port).await;
    let every: Vec<Vec<u8>> = (0..10u8).map(|n| vec![n]).collect();
    assert_eq!(ours.2, every, "each message once");
    assert_eq!(theirs.2, every);
    // Both take turns.
    assert_eq!((ours.0, ours.1), (5, 5));
    assert_eq!((theirs.0, theirs.1), (5, 5));
    assert!(!ours.3, "no retained message for a shared subscription");
}

// §4.9 and §3.1.2.11.5 under load: 50 publishers; the slow client never has more than its
// Receive Maximum unacknowledged, and never gets a packet over its Maximum Packet Size.
#[tokio::test]
async fn flow_control_holds_under_load() {
    let b = brokers().await;
    let port = b.embedded_port;
    let mut o = options("slow-reader", port);
    o.set_receive_maximum(Some(5))
        .set_max_packet_size(Some(1024))
        .set_manual_acks(true);
    let mut slow = Client::connect(o).await;
    slow.subscribe("load/#", QoS::AtLeastOnce, None).await;
    let mut publishers = Vec::new();
    for n in 0..50 {
        publishers.push(tokio::spawn(async move {
            let c = Client::connect(options(&format!("load-{n}"), port)).await;
            for i in 0..20u32 {
                // Every tenth message is too large for the slow reader.
                let size = if i % 10 == 9 { 2048 } else { 100 };
                c.publish(
                    &format!("load/{n}"),
                    QoS::AtLeastOnce,
                    false,
                    &vec![1u8; size],
                    PublishProperties::default(),
                )
                .await;
            }
            c
        }));
    }
    let mut outstanding: Vec<Publish> = Vec::new();
    let mut received = 0;
    let mut max_outstanding = 0;
    // 50 x 18 small messages reach the reader; the large ones never do.
    while received < 50 * 18 {
        let p = slow.next_publish().await;
        assert!(
            p.payload.len() <= 1024,
            "a {}-byte payload",
            p.payload.len()
        );
        received += 1;
        outstanding.push(p);
        max_outstanding = max_outstanding.max(outstanding.len());
        assert!(
            outstanding.len() <= 5,
            "{} unacknowledged",
            outstanding.len()
        );
        // Acknowledge in bursts, so the window is full now and then.
        if outstanding.len() == 5 {
            for p in outstanding.drain(..) {
                slow.client.ack(&p).await.unwrap();
            }
        }
    }
    assert_eq!(max_outstanding, 5);
    for p in publishers {
        p.await.unwrap();
    }
}

// §3.1.3.2.2: a will with a delay is published once the delay has passed, and at once when
// the session ends at disconnect.
#[tokio::test]
async fn a_delayed_will_is_published_after_its_delay() {
    use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties};
    let b = brokers().await;
    let port = b.embedded_port;
    let mut watcher = Client::connect(options("will-watcher", port)).await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce, None).await;
    let mut o = options("mortal", port);
    // The delay applies while the session lives: a session that ends at disconnect (expiry 0)
    // sends its will at once (§3.1.2.5).
    o.set_session_expiry_interval(Some(60));
    let props = LastWillProperties {
        delay_interval: Some(1),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![("why".into(), "gone".into())],
    };
    o.set_last_will(LastWill::new(
        "wills/mortal",
        "bye",
        QoS::AtLeastOnce,
        false,
        Some(props),
    ));
    let mortal = Client::connect(o).await;
    let asked = tokio::time::Instant::now();
    drop(mortal); // the connection drops without DISCONNECT
    let will = watcher.next_publish().await;
    assert_eq!(will.topic, "wills/mortal".as_bytes());
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "delay honoured"
    );
    assert_eq!(
        will.properties.unwrap().user_properties,
        vec![("why".to_string(), "gone".to_string())]
    );

    // No kept session: an hour's delay does not hold the will back (nor a timer for an hour).
    let mut o = options("brief", port);
    let props = LastWillProperties {
        delay_interval: Some(3600),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    o.set_last_will(LastWill::new(
        "wills/brief",
        "bye",
        QoS::AtLeastOnce,
        false,
        Some(props),
    ));
    drop(Client::connect(o).await);
    let will = watcher.next_publish().await;
    assert_eq!(will.topic, "wills/brief".as_bytes());
}
