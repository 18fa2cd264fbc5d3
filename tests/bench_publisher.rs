//! The benchmarks' publisher (`fleetgw::bench::publisher`) behind a start gate: publishers that
//! start together connect first and publish nothing before the gate opens, so a phase of
//! `fleetgw bench` measures a connected fleet rather than a storm of CONNECTs.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::WAIT;
use fleetgw::bench::publisher::{publish_sequence, Sequence, StartGate};
use fleetgw::downstream::{EmbeddedBroker, EmbeddedBrokerOptions};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout_at, Instant};

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gated_publishers_send_nothing_before_the_gate_opens() {
    let broker = EmbeddedBroker::start(&EmbeddedBrokerOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..EmbeddedBrokerOptions::default()
    })
    .await
    .expect("embedded broker starts");
    let port = broker.listen_addr().port();

    // A subscriber records every payload: the instant (unix ms) the publisher made it.
    let mut o = MqttOptions::new("watcher", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    let (watcher, mut events) = AsyncClient::new(o, 100);
    watcher
        .subscribe("gate/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe queued");
    let (made_tx, mut made_rx) = mpsc::unbounded_channel::<u64>();
    let (subscribed_tx, mut subscribed_rx) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    let _ = subscribed_tx.send(()).await;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let made = std::str::from_utf8(&p.payload)
                        .expect("utf-8 payload")
                        .parse()
                        .expect("a unix ms payload");
                    let _ = made_tx.send(made);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, subscribed_rx.recv())
        .await
        .expect("SUBACK within the limit");

    const PUBLISHERS: usize = 3;
    const MESSAGES: u64 = 4;
    let base = Instant::now();
    let (connected_tx, mut connected_rx) = mpsc::unbounded_channel();
    let (open_tx, open_rx) = watch::channel(None);
    let mut tasks = Vec::new();
    for i in 0..PUBLISHERS {
        let mut seq = Sequence::new(format!("gated-{i}"), format!("gate/{i}"), 0..MESSAGES, WAIT);
        seq.linger = false;
        seq.gate = Some(StartGate {
            base,
            connected: connected_tx.clone(),
            open: open_rx.clone(),
        });
        tasks.push(tokio::spawn(publish_sequence(port, seq, |_| {
            unix_ms().to_string().into_bytes()
        })));
    }
    drop(connected_tx);
    let deadline = Instant::now() + WAIT;
    for _ in 0..PUBLISHERS {
        timeout_at(deadline, connected_rx.recv())
            .await
            .expect("every publisher connects within the limit")
            .expect("a publisher reports its connection");
    }
    // Every publisher is connected and none may have made a message yet: each one made after
    // this instant proves it waited for the gate.
    let connected_ms = unix_ms();
    while unix_ms() == connected_ms {
        tokio::task::yield_now().await;
    }
    let opened_ms = unix_ms();
    open_tx
        .send(Some(Instant::now()))
        .expect("publishers listen");
    for t in tasks {
        let published = t.await.expect("publisher task").expect("every PUBACK came");
        assert_eq!(published.sent, MESSAGES);
    }
    let mut made = Vec::new();
    while made.len() < PUBLISHERS * MESSAGES as usize {
        let m = timeout_at(deadline, made_rx.recv())
            .await
            .expect("the subscriber gets every message within the limit")
            .expect("subscriber running");
        made.push(m);
    }
    assert!(
        made.iter().all(|&m| m >= opened_ms),
        "a message was made before the gate opened at {opened_ms}: {made:?}"
    );
}
