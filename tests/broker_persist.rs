//! Retained messages and kept sessions of the embedded broker across a restart, through the
//! store (`downstream/broker/persist.rs`): a clean shutdown saves everything, a broker that
//! goes away without one keeps what its write-behind saved, expired state is not restored,
//! and a hostile client cannot grow the persisted state past the broker's limits. The real
//! daemon (`fleetgw run`, clean stop and kill -9) is in `tests/broker_persist_daemon.rs`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::mqtt_client::TestClient;
use common::raw_mqtt::{packet_id_of, packet_id_of_ack, payload_of, subscribe, Raw};
use common::wait::eventually;
use common::WAIT;
use fleetgw::downstream::{
    AccessRules, EmbeddedBroker, EmbeddedBrokerOptions, LocalUser, UserRights,
};
use fleetgw::store::broker_state::{
    KeptSessionRecord, RetainedRecord, StoredDelivery, StoredMessage, StoredOwner,
    StoredSubscription, BROKER_RECORD_VERSION,
};
use fleetgw::store::{Store, StoreOptions};
use rumqttc::{ConnectReturnCode, MqttOptions, QoS};

fn open_store(dir: &Path) -> Store {
    Store::open(dir, &StoreOptions::default()).expect("store opens")
}

async fn start(store: &Store, tune: impl FnOnce(&mut EmbeddedBrokerOptions)) -> EmbeddedBroker {
    let mut opts = EmbeddedBrokerOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        store: Some(store.clone()),
        ..EmbeddedBrokerOptions::default()
    };
    tune(&mut opts);
    EmbeddedBroker::start(&opts)
        .await
        .expect("embedded broker starts")
}

fn opts(id: &str, broker: &EmbeddedBroker, clean: bool) -> MqttOptions {
    let mut o = common::mqtt_client::options(id, broker.listen_addr().port());
    o.set_clean_session(clean);
    o
}

/// Connects (resuming a kept session when `clean` is false).
async fn connect(id: &str, broker: &EmbeddedBroker, clean: bool) -> TestClient {
    TestClient::connect_ok(opts(id, broker, clean)).await
}

/// Waits until `broker` holds `n` kept sessions of absent clients.
async fn kept(broker: &EmbeddedBroker, n: usize) {
    eventually(format!("{n} kept sessions"), WAIT, || {
        (broker.kept_sessions() == n).then_some(())
    })
    .await;
}

/// Publishes `payloads` on `topic` at QoS 1 from a throwaway client.
async fn publish_all(broker: &EmbeddedBroker, topic: &str, retain: bool, payloads: &[&str]) {
    TestClient::connect_ok(opts("publisher", broker, true))
        .await
        .publish_each_and_leave(topic, retain, payloads)
        .await;
}

/// A client that subscribed with a kept session and left.
async fn leave_a_kept_session(broker: &EmbeddedBroker, id: &str, filter: &str) {
    let mut c = TestClient::connect_ok(opts(id, broker, false)).await;
    c.subscribe(filter, QoS::AtLeastOnce).await;
    c.client.disconnect().await.unwrap();
}

/// What the restart tests start from: a retained "up" on `plant/status` and the kept session
/// "keeper" (on `plant/cmd/#`), away while `commands` were queued for it.
async fn retained_status_and_queued_commands(broker: &EmbeddedBroker, commands: &[&str]) {
    publish_all(broker, "plant/status", true, &["up"]).await;
    leave_a_kept_session(broker, "keeper", "plant/cmd/#").await;
    kept(broker, 1).await;
    publish_all(broker, "plant/cmd/valve", false, commands).await;
}

#[tokio::test]
async fn retained_messages_and_kept_sessions_survive_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let broker = start(&store, |_| {}).await;
    retained_status_and_queued_commands(&broker, &["c1", "c2", "c3"]).await;
    broker.shutdown().await;

    let broker = start(&store, |_| {}).await;
    assert_eq!((broker.retained(), broker.kept_sessions()), (1, 1));
    let mut keeper = connect("keeper", &broker, false).await;
    assert_eq!(keeper.next_payloads(3).await, ["c1", "c2", "c3"]);
    // The subscription came back too: a new message reaches it.
    publish_all(&broker, "plant/cmd/valve", false, &["c4"]).await;
    assert_eq!(keeper.next_payloads(1).await, ["c4"]);
    let mut late = TestClient::connect_ok(opts("late", &broker, true)).await;
    late.subscribe("plant/#", QoS::AtLeastOnce).await;
    let p = late.next_publish().await.expect("the retained message");
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        ("plant/status", &b"up"[..], true)
    );
}

#[tokio::test]
async fn session_present_is_set_for_a_restored_session() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let broker = start(&store, |_| {}).await;
    leave_a_kept_session(&broker, "keeper", "a/#").await;
    kept(&broker, 1).await;
    broker.shutdown().await;
    let broker = start(&store, |_| {}).await;
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts("keeper", &broker, false), 8);
    let ack = tokio::time::timeout(WAIT, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)) =
                eventloop.poll().await.expect("connects")
            {
                return a;
            }
        }
    })
    .await
    .expect("CONNACK");
    assert_eq!(
        (ack.code, ack.session_present),
        (ConnectReturnCode::Success, true)
    );
    drop(client);
}

#[tokio::test]
async fn what_the_write_behind_saved_survives_a_broker_that_never_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let broker = start(&store, |_| {}).await;
    retained_status_and_queued_commands(&broker, &["c1", "c2"]).await;
    // What is in the store (and flushed) without any shutdown: the batch after the changes.
    eventually(
        "the kept session with 2 queued messages saved",
        WAIT,
        || {
            let sessions: Vec<KeptSessionRecord> =
                store.broker_sessions().filter_map(Result::ok).collect();
            let retained = store.broker_retained().filter_map(Result::ok).count();
            (sessions.len() == 1 && sessions[0].queue.len() == 2 && retained == 1).then_some(())
        },
    )
    .await;
    drop(broker);

    let broker = start(&store, |_| {}).await;
    let mut keeper = connect("keeper", &broker, false).await;
    assert_eq!(keeper.next_payloads(2).await, ["c1", "c2"]);
    assert_eq!(broker.retained(), 1);
}

/// A QoS 2 delivery whose PUBREC came before the restart is completed with PUBREL, not sent
/// again (MQTT-4.4.0-1), and an unacknowledged QoS 1 delivery comes again with DUP.
#[tokio::test]
async fn qos2_and_unacknowledged_qos1_state_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let broker = start(&store, |_| {}).await;
    let mut raw = Raw::connect(broker.listen_addr(), "raw-keeper", false).await;
    raw.send(&subscribe(1, "q/#", 2)).await;
    assert_eq!(raw.read().await.0 >> 4, 9, "SUBACK");
    publish_all(&broker, "q/one", false, &["one"]).await;
    let p2 = TestClient::connect_ok(opts("publisher2", &broker, true)).await;
    p2.client
        .publish("q/two", QoS::ExactlyOnce, false, b"two".to_vec())
        .await
        .unwrap();
    // The QoS 1 message arrives first (published first); leave it unacknowledged.
    let (h1, b1) = raw.read().await;
    assert_eq!(h1 >> 4, 3, "PUBLISH");
    assert_eq!(h1 & 0x06, 0x02, "QoS 1");
    let (h2, b2) = raw.read().await;
    assert_eq!((h2 >> 4, h2 & 0x06), (3, 0x04), "QoS 2 PUBLISH");
    let pkid2 = packet_id_of(&b2);
    raw.send(&[0x50, 2, (pkid2 >> 8) as u8, pkid2 as u8]).await; // PUBREC
    let (h, b) = raw.read().await;
    assert_eq!((h, packet_id_of_ack(&b)), (0x62, pkid2), "PUBREL");
    drop(raw);
    kept(&broker, 1).await;
    broker.shutdown().await;

    let broker = start(&store, |_| {}).await;
    let mut raw = Raw::connect(broker.listen_addr(), "raw-keeper", false).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(raw.read().await);
    }
    let pubrel = seen.iter().find(|(h, _)| *h == 0x62).expect("PUBREL again");
    assert_eq!(packet_id_of_ack(&pubrel.1), pkid2);
    let again = seen.iter().find(|(h, _)| h >> 4 == 3).expect("QoS 1 again");
    assert_eq!(again.0 & 0x08, 0x08, "DUP set");
    assert_eq!(payload_of(&again.1, 1), payload_of(&b1, 1));
    assert!(!seen
        .iter()
        .any(|(h, b)| h >> 4 == 3 && payload_of(b, 2) == b"two"));
}

#[tokio::test]
async fn expired_sessions_and_messages_are_not_restored() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let now = common::now_ms();
    let message = |topic: &str, body: &str, expires: Option<u64>| StoredMessage {
        topic: topic.into(),
        payload: body.as_bytes().to_vec(),
        qos: 1,
        retain: false,
        expires_at_ms: expires,
        properties: None,
    };
    let retained = |m: StoredMessage| RetainedRecord {
        v: BROKER_RECORD_VERSION,
        message: StoredMessage { retain: true, ..m },
    };
    store
        .put_broker_retained(
            "r/old",
            &retained(message("r/old", "old", Some(now - 1000))),
        )
        .unwrap();
    store
        .put_broker_retained(
            "r/live",
            &retained(message("r/live", "live", Some(now + 600_000))),
        )
        .unwrap();
    let queued = |m: StoredMessage| StoredDelivery {
        packet_id: 0,
        message: m,
        qos: 1,
        retain: false,
        dup: false,
        subscription_ids: Vec::new(),
        released: false,
    };
    let session = |id: &str, expires_at_ms: u64, queue: Vec<StoredDelivery>| KeptSessionRecord {
        v: BROKER_RECORD_VERSION,
        client_id: id.into(),
        owner: StoredOwner::Anyone,
        expires_at_ms,
        keep_secs: 3600,
        subscriptions: vec![StoredSubscription {
            filter: "s/#".into(),
            qos: 1,
            no_local: false,
            retain_as_published: false,
            id: None,
        }],
        inflight: Vec::new(),
        queue,
        last_packet_id: 0,
        awaiting_release: Vec::new(),
    };
    store
        .put_broker_session(&session(
            "gone",
            now - 1,
            vec![queued(message("s/a", "x", None))],
        ))
        .unwrap();
    store
        .put_broker_session(&session(
            "alive",
            now + 600_000,
            vec![
                queued(message("s/a", "stale", Some(now - 1))),
                queued(message("s/a", "fresh", Some(now + 600_000))),
            ],
        ))
        .unwrap();
    store.durable().await.unwrap();

    let broker = start(&store, |_| {}).await;
    assert_eq!((broker.retained(), broker.kept_sessions()), (1, 1));
    let (r, _, s, _) = store.broker_state_size().unwrap();
    assert_eq!((r, s), (1, 1), "what was not restored left the store");
    let mut alive = TestClient::connect_ok(opts("alive", &broker, false)).await;
    assert_eq!(alive.next_payloads(1).await, ["fresh"]);
    let mut gone = TestClient::connect_ok(opts("gone", &broker, false)).await;
    let nothing = gone.next_publish_within(Duration::from_millis(300)).await;
    assert!(
        nothing.is_none(),
        "an expired session delivered {nothing:?}"
    );
}

/// A hostile client fills retained topics, opens kept sessions and floods them while away;
/// what the store holds afterwards stays within the broker's limits, and a store forged (or
/// written under higher limits) past them is cut back to them on restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_cannot_grow_the_persisted_state_past_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let limits = |o: &mut EmbeddedBrokerOptions| {
        o.max_retained = 3;
        o.max_retained_bytes = 4096;
        o.max_kept_sessions = 2;
        o.max_subscriptions = 2;
        o.max_packet_bytes = 1024;
        o.max_queued_bytes = 2048;
    };
    let broker = start(&store, limits).await;
    let mut hostile = TestClient::connect_ok(opts("hostile", &broker, true)).await;
    for i in 0..20 {
        hostile
            .publish(&format!("junk/{i}"), QoS::AtLeastOnce, true, &[b'x'; 600])
            .await;
    }
    for i in 0..5 {
        let mut c = TestClient::connect_ok(opts(&format!("squat-{i}"), &broker, false)).await;
        for f in ["junk/#", "more/#", "other/#", "x/#"] {
            c.subscribe(f, QoS::AtLeastOnce).await;
        }
        c.client.disconnect().await.unwrap();
    }
    kept(&broker, 2).await;
    for _ in 0..50 {
        hostile
            .publish("junk/flood", QoS::AtLeastOnce, false, &[b'y'; 500])
            .await;
    }
    broker.shutdown().await;
    let (retained, retained_bytes, sessions, session_bytes) = store.broker_state_size().unwrap();
    assert!(retained <= 3, "{retained} retained messages stored");
    assert!(
        retained_bytes <= 3 * 2048,
        "{retained_bytes} bytes of retained"
    );
    assert!(
        sessions <= 2 + 1,
        "{sessions} sessions stored (2 kept + the hostile one at most)"
    );
    // A queue is cut at 2048 bytes of messages; base64 and JSON add about half again.
    assert!(
        session_bytes <= sessions as u64 * 6 * 1024,
        "{session_bytes} bytes of sessions"
    );
    for rec in store.broker_sessions() {
        assert!(rec.unwrap().subscriptions.len() <= 2);
    }

    // Forged records past every limit: restored only within them, the rest deleted.
    let now = common::now_ms();
    for i in 0..10 {
        let id = format!("forged-{i}");
        let big = StoredDelivery {
            packet_id: 0,
            message: StoredMessage {
                topic: "junk/f".into(),
                payload: vec![b'z'; 900],
                qos: 1,
                retain: false,
                expires_at_ms: None,
                properties: None,
            },
            qos: 1,
            retain: false,
            dup: false,
            subscription_ids: Vec::new(),
            released: false,
        };
        store
            .put_broker_session(&KeptSessionRecord {
                v: BROKER_RECORD_VERSION,
                client_id: id,
                owner: StoredOwner::Anyone,
                expires_at_ms: now + 3_600_000,
                keep_secs: 3600,
                subscriptions: (0..50)
                    .map(|n| StoredSubscription {
                        filter: format!("f/{n}"),
                        qos: 1,
                        no_local: false,
                        retain_as_published: false,
                        id: None,
                    })
                    .collect(),
                inflight: Vec::new(),
                queue: vec![big; 40],
                last_packet_id: 0,
                awaiting_release: Vec::new(),
            })
            .unwrap();
    }
    for i in 0..10 {
        let topic = format!("forged/{i}");
        store
            .put_broker_retained(
                &topic,
                &RetainedRecord {
                    v: BROKER_RECORD_VERSION,
                    message: StoredMessage {
                        topic: topic.clone(),
                        payload: vec![b'r'; 100],
                        qos: 0,
                        retain: true,
                        expires_at_ms: None,
                        properties: None,
                    },
                },
            )
            .unwrap();
    }
    store.durable().await.unwrap();
    let broker = start(&store, limits).await;
    assert!(
        broker.kept_sessions() <= 2,
        "{} kept",
        broker.kept_sessions()
    );
    assert!(broker.retained() <= 3, "{} retained", broker.retained());
    broker.shutdown().await;
    let (retained, _, sessions, session_bytes) = store.broker_state_size().unwrap();
    assert!(
        retained <= 3 && sessions <= 2,
        "{retained} retained, {sessions} sessions"
    );
    assert!(
        session_bytes <= 2 * 6 * 1024,
        "{session_bytes} bytes of sessions"
    );
    for rec in store.broker_sessions() {
        assert!(rec.unwrap().subscriptions.len() <= 2);
    }
}

fn app_user(name: &str, password: &str) -> LocalUser {
    LocalUser {
        rights: std::sync::Arc::new(UserRights {
            name: name.into(),
            publish: vec!["plant/#".into()],
            subscribe: vec!["plant/#".into()],
        }),
        password_hash: fleetgw::identity::hash_password(password.as_bytes()).unwrap(),
    }
}

/// Restored sessions keep their owner and their rights: a device reusing the client id of a
/// local application's restored session gets a session of its own (none of the application's
/// queued messages), and a user removed from the config before the restart loses its session.
#[tokio::test]
async fn a_restored_session_cannot_be_taken_over_and_follows_todays_users() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let rules = |users: Vec<LocalUser>| {
        move |o: &mut EmbeddedBrokerOptions| {
            let mut r = AccessRules::new("fleetgw");
            r.users = users;
            o.rules = Some(r);
        }
    };
    let broker = start(
        &store,
        rules(vec![app_user("app", "s1"), app_user("old", "s2")]),
    )
    .await;
    for (id, name, password) in [("sensor-z", "app", "s1"), ("old-app", "old", "s2")] {
        let mut o = opts(id, &broker, false);
        o.set_credentials(name, password);
        let mut c = TestClient::connect_ok(o).await;
        c.subscribe("plant/#", QoS::AtLeastOnce).await;
        c.client.disconnect().await.unwrap();
    }
    kept(&broker, 2).await;
    let mut p = opts("publisher", &broker, true);
    p.set_credentials("app", "s1");
    let mut p = TestClient::connect_ok(p).await;
    p.publish("plant/secret", QoS::AtLeastOnce, false, b"for the app only")
        .await;
    broker.shutdown().await;

    // "old" is no longer a user: its session is not restored and leaves the store.
    let broker = start(&store, rules(vec![app_user("app", "s1")])).await;
    assert_eq!(broker.kept_sessions(), 1);
    let (_, _, sessions, _) = store.broker_state_size().unwrap();
    assert_eq!(sessions, 1);
    // A device with the application's client id: a new session, nothing of the app's.
    let mut device = TestClient::connect_ok(opts("sensor-z", &broker, false)).await;
    let got = device.next_publish_within(Duration::from_millis(300)).await;
    assert!(
        got.is_none(),
        "the device got the application's message: {got:?}"
    );
}
