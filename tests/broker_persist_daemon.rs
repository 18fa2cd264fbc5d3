//! The embedded broker's retained messages and kept sessions across restarts of the real
//! daemon: `fleetgw run` (with the AWS IoT emulator as its cloud) is stopped cleanly (SIGTERM)
//! and later killed (SIGKILL) while a local application's kept session has QoS 1 messages
//! queued; after each restart the application, reconnecting with its kept session, gets
//! them, and a new subscriber gets the retained message. Before the kill the test waits for
//! the broker's save of that state (the debug line the write-behind logs after its flush):
//! what a SIGKILL can lose is what changed since that save (docs/src/broker.md).

mod common;

use std::path::Path;
use std::time::Duration;

use common::config::{drop_in_dir, user_toml};
use common::free_port;
use common::mqtt_client::{options, ClientEvent, TestClient};
use common::process::{EmulatorProcess, Fleetgw};
use common::wait::eventually_async;
use rumqttc::{MqttOptions, QoS};

/// How long the daemon may take to start, stop or save.
const DAEMON: Duration = Duration::from_secs(60);

const USER: &str = "historian";
const PASSWORD: &str = "historian-secret";

fn as_user(id: &str, port: u16, clean: bool) -> MqttOptions {
    let mut o = options(id, port);
    o.set_credentials(USER, PASSWORD).set_clean_session(clean);
    o
}

/// Connects once the broker takes connections (it opens once the gateway session is up).
async fn connect(id: &str, port: u16, clean: bool) -> TestClient {
    eventually_async(format!("{id} connects"), DAEMON, || async {
        TestClient::try_connect(as_user(id, port, clean)).await.ok()
    })
    .await
}

/// Publishes QoS 1 messages (PUBACKed: routed into the kept session's queue).
async fn publish(port: u16, topic: &str, retain: bool, payloads: &[&str]) {
    connect("app-publisher", port, true)
        .await
        .publish_each_and_leave(topic, retain, payloads)
        .await;
}

/// Sends DISCONNECT and waits until the broker closed the connection: the broker ends the
/// session's attachment before it closes the socket, so the session is then kept and absent.
async fn leave(mut client: TestClient) {
    client.client.disconnect().await.unwrap();
    let closed = client
        .next_matching(|e| matches!(e, ClientEvent::Closed(_)))
        .await;
    assert!(
        closed.is_some(),
        "the broker did not close after DISCONNECT"
    );
}

/// A new subscriber to `plant/#` gets the retained status.
async fn retained_status(port: u16) -> (String, bool) {
    let mut c = connect("app-late", port, true).await;
    c.subscribe("plant/status", QoS::AtLeastOnce).await;
    let p = c.next_publish().await.expect("the retained status");
    c.client.disconnect().await.unwrap();
    (String::from_utf8_lossy(&p.payload).into_owned(), p.retain)
}

fn write_users(config: &Path) {
    let rights = "publish = [\"plant/#\"]\nsubscribe = [\"plant/#\"]\n";
    std::fs::write(
        drop_in_dir(config).join("50-users.toml"),
        user_toml(USER, PASSWORD, rights),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_and_kept_sessions_survive_a_clean_stop_and_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start(
        &dir.path().join("aws"),
        dir.path().join("emulator.log"),
        |l| l,
    )
    .await;
    let config = emu.gateway_config();
    write_users(&config);
    let port = free_port();
    let daemon = Fleetgw::run(&config, dir.path().join("daemon.log"))
        .sets([
            format!(
                "gateway.state_dir=\"{}\"",
                dir.path().join("state").display()
            ),
            format!("downstream.listen=\"127.0.0.1:{port}\""),
            "admission.mode=\"open\"".to_string(),
            "log.level=\"info,fleetgw::downstream::broker::persist=debug\"".to_string(),
            "log.format=\"json\"".to_string(),
        ])
        .spawn();

    // A retained status, and a kept session that is away while commands queue for it.
    publish(port, "plant/status", true, &["up"]).await;
    let mut keeper = connect("app-keeper", port, false).await;
    keeper.subscribe("plant/cmd/#", QoS::AtLeastOnce).await;
    leave(keeper).await;
    publish(port, "plant/cmd/valve", false, &["c1", "c2"]).await;

    // 1. A clean stop saves everything.
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(DAEMON).await;
    assert!(status.success(), "{status}: {}", daemon.log_tail());
    daemon.restart();
    let mut keeper = connect("app-keeper", port, false).await;
    assert_eq!(
        keeper.next_payloads(2).await,
        ["c1", "c2"],
        "{}",
        daemon.log_tail()
    );
    assert_eq!(retained_status(port).await, ("up".to_string(), true));
    leave(keeper).await;

    // 2. A kill -9 after the write-behind saved the queued messages loses none of them.
    publish(port, "plant/cmd/valve", false, &["c3", "c4", "c5"]).await;
    daemon
        .wait_for_log(r#""sessions":1,"queued":3"#, DAEMON)
        .await;
    daemon.kill9();
    daemon.restart();
    let mut keeper = connect("app-keeper", port, false).await;
    assert_eq!(
        keeper.next_payloads(3).await,
        ["c3", "c4", "c5"],
        "{}",
        daemon.log_tail()
    );
    assert_eq!(retained_status(port).await, ("up".to_string(), true));
    // Nothing more was kept: the messages delivered before the kill do not come again.
    let again = keeper.next_publish_within(Duration::from_millis(300)).await;
    assert!(again.is_none(), "delivered again: {again:?}");
}
