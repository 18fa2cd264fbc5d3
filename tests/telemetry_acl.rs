//! Issue 7: a device cannot get telemetry forwarded to the cloud under another device's
//! identity when mosquitto runs the per-device recipe of docs/mosquitto.md (own password per
//! device, `use_username_as_clientid true`, `pattern readwrite fleetgw/%u/#`).
//!
//! Real parts end to end: `fleetgw run` as a separate process with mosquitto as the external
//! downstream broker and the in-process AWS IoT emulator as the cloud. Two devices are
//! provisioned through the daemon with their own broker credentials; then B, logged in as B,
//! publishes telemetry on A's topic. The emulator's `GET /messages` must show A's and B's own
//! messages under their own thing names (the client ids of their upstream connections) and
//! never B's forged message.

mod common;

use std::path::Path;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::Value;
use tokio::time::Instant;

use fleetgw::emulator::aws::{self, AwsEmulatorHandle, AwsEmulatorOptions};

use common::http::http;
use common::messages;
use common::mosquitto::{Mosquitto, MosquittoConfig};
use common::mqtt_client::{self, ClientEvent, TestClient};
use common::process::Fleetgw;

/// Upper bound for provisioning and for a message to reach the emulator.
const LIMIT: Duration = Duration::from_secs(60);

const GATEWAY_PASSWORD: &str = "gw-secret";

/// `fleetgw run` with the emulator's gateway.toml, pointed at mosquitto as the gateway user.
fn start_daemon(emu: &AwsEmulatorHandle, dir: &Path, broker_url: &str) -> Fleetgw {
    // As in the recipe: the gateway's broker password lives in a 0600 file.
    let password_file = dir.join("downstream.password");
    std::fs::write(&password_file, format!("{GATEWAY_PASSWORD}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    Fleetgw::run(&emu.gateway_config_path(), dir.join("fleetgw.log"))
        .sets([
            "downstream.broker=\"external\"".to_string(),
            format!("downstream.url=\"{broker_url}\""),
            "downstream.username=\"fleetgw-gateway\"".to_string(),
            format!("downstream.password_file=\"{}\"", password_file.display()),
            "admission.mode=\"open\"".to_string(),
            format!("gateway.state_dir=\"{}\"", dir.join("state").display()),
            "log.level=\"info\"".to_string(),
        ])
        .spawn()
}

/// A device logged in to mosquitto with its own username (= device id) and password.
async fn device(broker: &Mosquitto, id: &str, password: &str) -> TestClient {
    // The client id is overridden by the username (`use_username_as_clientid`).
    let mut o = mqtt_client::options(id, broker.port());
    o.set_credentials(id, password);
    TestClient::connect_ok(o).await
}

/// Provisions `id` through the daemon with the device's own credentials; returns its thing
/// name. The daemon may subscribe after the first request (mosquitto then drops it) and a
/// repeated request is answered from the store, so the device asks again until answered.
async fn provision(broker: &Mosquitto, id: &str, password: &str, daemon: &Fleetgw) -> String {
    let mut dev = device(broker, id, password).await;
    dev.subscribe(&format!("fleetgw/{id}/provision/json/+"), QoS::AtLeastOnce)
        .await;
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        dev.publish(
            &format!("fleetgw/{id}/provision/json"),
            QoS::AtLeastOnce,
            false,
            br#"{"attestation":{"type":"none"}}"#,
        )
        .await;
        let answer = dev
            .next_matching_within(Duration::from_secs(2), |e| {
                matches!(e, ClientEvent::Publish(_) | ClientEvent::Closed(_))
            })
            .await;
        match answer {
            Some(ClientEvent::Publish(p)) => {
                let v: Value = serde_json::from_slice(&p.payload).unwrap();
                assert_eq!(
                    p.topic,
                    format!("fleetgw/{id}/provision/json/accepted"),
                    "{id}: {v}"
                );
                return v["thingName"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{id}: no thingName in {v}"))
                    .to_string();
            }
            Some(other) => panic!("{id}: {other:?}; daemon log:\n{}", daemon.log()),
            None => {}
        }
    }
    panic!(
        "{id}: no provisioning answer within {LIMIT:?}; daemon log:\n{}",
        daemon.log()
    );
}

/// One message the emulator received.
#[derive(Debug)]
struct Received {
    client_id: String,
    topic: String,
    payload: String,
}

/// Everything the emulator received, from every client, in arrival order.
async fn all_messages(emu: &AwsEmulatorHandle) -> Vec<Received> {
    let (status, list) = http(emu.api_addr(), "GET", "/messages", None).await;
    assert_eq!(status, 200, "{list}");
    list.as_array()
        .unwrap_or_else(|| panic!("GET /messages is not a list: {list}"))
        .iter()
        .map(|m| Received {
            client_id: m["clientId"].as_str().unwrap().to_string(),
            topic: m["topic"].as_str().unwrap().to_string(),
            payload: String::from_utf8_lossy(&messages::payload(m)).into_owned(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_publish_telemetry_under_another_devices_identity() {
    let (a, b) = ("sensor-a", "sensor-b");
    let (pw_a, pw_b) = ("pw-a", "pw-b");
    let dir = tempfile::tempdir().unwrap();
    let emu = aws::start(AwsEmulatorOptions::ephemeral(dir.path().join("emu")))
        .await
        .expect("emulator starts");
    let broker = Mosquitto::start(&MosquittoConfig::recipe(
        "fleetgw",
        &[(a, pw_a), (b, pw_b)],
        GATEWAY_PASSWORD,
    ));
    let daemon = start_daemon(&emu, dir.path(), &broker.url());

    let thing_a = provision(&broker, a, pw_a, &daemon).await;
    let thing_b = provision(&broker, b, pw_b, &daemon).await;
    assert_ne!(thing_a, thing_b);

    let mut dev_a = device(&broker, a, pw_a).await;
    let mut dev_b = device(&broker, b, pw_b).await;
    // B, with its own valid credentials, publishes on A's telemetry topic. mosquitto acks it
    // (MQTT 3.1.1 cannot refuse a publish) and, by the ACL, drops it.
    let forged = r#"{"marker":"forged-by-b"}"#;
    dev_b
        .publish(
            &format!("fleetgw/{a}/telemetry"),
            QoS::AtLeastOnce,
            false,
            forged.as_bytes(),
        )
        .await;
    // Both markers are published after the forged message (which mosquitto has already
    // acked): had it got through, it would reach the gateway first, and per-device order is
    // kept on the way out, so A's marker arriving bounds when the forged one would have.
    let own_b = r#"{"marker":"own-of-b"}"#;
    dev_b
        .publish(
            &format!("fleetgw/{b}/telemetry"),
            QoS::AtLeastOnce,
            false,
            own_b.as_bytes(),
        )
        .await;
    let own_a = r#"{"marker":"own-of-a"}"#;
    dev_a
        .publish(
            &format!("fleetgw/{a}/telemetry"),
            QoS::AtLeastOnce,
            false,
            own_a.as_bytes(),
        )
        .await;

    let deadline = Instant::now() + LIMIT;
    let messages = loop {
        let messages = all_messages(&emu).await;
        let has = |p: &str| messages.iter().any(|m| m.payload == p);
        if has(own_a) && has(own_b) {
            break messages;
        }
        assert!(
            Instant::now() < deadline,
            "own messages not at the emulator within {LIMIT:?}: {messages:?}\ndaemon log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let from = |p: &str| -> Vec<(&str, &str)> {
        messages
            .iter()
            .filter(|m| m.payload == p)
            .map(|m| (m.client_id.as_str(), m.topic.as_str()))
            .collect()
    };
    // Each device's own message went upstream under its own identity (device mode: the
    // connection's client id is the thing name, topic `dt/{thingName}/telemetry`).
    let topic_a = format!("dt/{thing_a}/telemetry");
    let topic_b = format!("dt/{thing_b}/telemetry");
    assert_eq!(from(own_a), vec![(thing_a.as_str(), topic_a.as_str())]);
    assert_eq!(from(own_b), vec![(thing_b.as_str(), topic_b.as_str())]);
    // B's forged message reached the cloud under no identity at all.
    assert_eq!(
        from(forged),
        vec![],
        "B's publish on A's topic was forwarded; everything received: {messages:?}"
    );
    assert!(
        messages.iter().all(|m| !m.payload.contains("forged")),
        "{messages:?}"
    );
    // Nothing else reached the cloud under A's or B's identity.
    let under = |thing: &str| messages.iter().filter(|m| m.client_id == thing).count();
    assert_eq!(under(&thing_a), 1, "{messages:?}");
    assert_eq!(under(&thing_b), 1, "{messages:?}");
    assert!(!dev_a.saw_close() && !dev_b.saw_close());

    drop(daemon);
    emu.shutdown().await;
}
