//! `telemetry.identity = "gateway"` end to end with real processes: `fleetgw run` (a separate
//! process) uses the config the AWS emulator wrote, switched to the gateway identity with one
//! `--set`, and the emulator's ready-made gateway certificate. Devices provision through the
//! daemon's embedded broker (one with its own CSR, whose key the gateway never holds), publish
//! numbered telemetry, and the emulator's record must show every message on the device's own
//! topic `dt/{thing}/telemetry/...`, in order, received from the gateway's client id. A command
//! the cloud side publishes on `cmd/{thing}/...` (the emulator's data-plane Publish) reaches
//! the device on `fleetgw/{id}/commands/...` over that same one connection.

mod common;

use std::cell::Cell;
use std::collections::BTreeMap;

use rumqttc::QoS;
use serde_json::{json, Value};

use common::http::http;
use common::messages;
use common::mqtt_client::{self, TestClient};
use common::process::Fleetgw;
use common::wait::{eventually_async, Lazy};
use common::{free_port, WAIT};

use fleetgw::emulator::aws::{self, AwsEmulatorHandle, AwsEmulatorOptions};
use fleetgw::identity::{self, KeyType, PrivateKey};

/// Messages each device publishes.
const PER_DEVICE: u64 = 20;

/// Connects a device to the daemon's embedded broker, waiting for the daemon to listen.
async fn device(daemon: &Fleetgw, id: &str, port: u16) -> TestClient {
    let what = Lazy(|| format!("the daemon's broker to accept {id}:\n{}", daemon.log()));
    eventually_async(what, WAIT, || async {
        let client = TestClient::try_connect(mqtt_client::options(id, port)).await;
        if client.is_err() {
            daemon.assert_running();
        }
        client.ok()
    })
    .await
}

/// Provisions the connected `device` (`csr`: its own CSR, or the gateway makes the key);
/// returns the thing name.
async fn provision(
    device: &mut TestClient,
    id: &str,
    csr: Option<String>,
    daemon: &Fleetgw,
) -> String {
    device
        .subscribe(&format!("fleetgw/{id}/provision/json/+"), QoS::AtLeastOnce)
        .await;
    let mut request = json!({ "attestation": { "type": "none" } });
    if let Some(csr) = csr {
        request["csr"] = Value::String(csr);
    }
    device
        .publish(
            &format!("fleetgw/{id}/provision/json"),
            QoS::AtLeastOnce,
            false,
            request.to_string().as_bytes(),
        )
        .await;
    let answer = device.next_publish().await.unwrap_or_else(|| {
        panic!(
            "{id}: no provisioning answer; daemon log:\n{}",
            daemon.log()
        )
    });
    let v: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert!(
        answer.topic.ends_with("/accepted"),
        "{id}: {} {v}",
        answer.topic
    );
    v["thingName"].as_str().unwrap().to_string()
}

/// Every message the emulator recorded, in arrival order.
async fn recorded(emu: &AwsEmulatorHandle) -> Vec<Value> {
    let (status, body) = http(emu.api_addr(), "GET", "/messages", None).await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_identity_forwards_every_device_on_its_topic_over_one_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = aws::start(AwsEmulatorOptions::ephemeral(tmp.path().join("aws")))
        .await
        .expect("emulator starts");
    let port = free_port();
    let state = tmp.path().join("state");
    let sets = [
        "telemetry.identity=gateway".to_string(),
        format!("downstream.listen=\"127.0.0.1:{port}\""),
        format!("gateway.state_dir=\"{}\"", state.display()),
        format!(
            "admin.socket=\"{}\"",
            tmp.path().join("admin.sock").display()
        ),
        // The gateway's own id differs from its thing: the emulator's config names the thing.
        "gateway.id=plant-7".to_string(),
    ];
    let daemon = Fleetgw::run(&emu.gateway_config_path(), tmp.path().join("daemon.log"))
        .sets(&sets)
        .env_remove("RUST_LOG")
        .spawn();

    // Two devices get their key from the gateway; one brings its own CSR.
    let own_key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let ids = ["meter-1", "meter-2", "own-key-3"];
    let mut devices = Vec::new();
    let mut things = BTreeMap::new();
    for id in ids {
        let mut device = device(&daemon, id, port).await;
        let csr = (id == "own-key-3").then(|| identity::create_csr(id, &own_key).unwrap());
        let thing = provision(&mut device, id, csr, &daemon).await;
        things.insert(id, thing);
        devices.push(device);
    }

    for (device, id) in devices.iter_mut().zip(ids) {
        for seq in 0..PER_DEVICE {
            device
                .publish(
                    &format!("fleetgw/{id}/telemetry/sensor"),
                    QoS::AtLeastOnce,
                    false,
                    json!({ "seq": seq, "device": id }).to_string().as_bytes(),
                )
                .await;
        }
    }

    let total = PER_DEVICE as usize * ids.len();
    let seen = &Cell::new(0);
    let what = Lazy(|| {
        let log = daemon.log();
        format!(
            "{total} messages at the emulator (it has {}); daemon log:\n{log}",
            seen.get()
        )
    });
    let messages = eventually_async(what, WAIT, || async {
        let messages = recorded(&emu).await;
        seen.set(messages.len());
        (messages.len() >= total).then_some(messages)
    })
    .await;
    assert_eq!(messages.len(), total, "no duplicates on a clean run");
    let mut per_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in &messages {
        let v: Value = serde_json::from_slice(&messages::payload(m)).unwrap();
        let id = v["device"].as_str().unwrap();
        assert_eq!(
            m["clientId"], "gw-01",
            "sent with the gateway's identity, not {id}'s: {m}"
        );
        assert_eq!(
            m["topic"].as_str().unwrap(),
            format!("dt/{}/telemetry/sensor", things[id]),
            "{m}"
        );
        assert_eq!(m["qos"], 1);
        per_device
            .entry(id.to_string())
            .or_default()
            .push(v["seq"].as_u64().unwrap());
    }
    for id in ids {
        assert_eq!(
            per_device[id],
            (0..PER_DEVICE).collect::<Vec<_>>(),
            "{id}: every message, in order"
        );
    }
    // Only the gateway's connection carried telemetry: no device connected upstream.
    let (_, stats) = http(emu.api_addr(), "GET", "/stats", None).await;
    let clients: Vec<&String> = stats["clients"].as_object().unwrap().keys().collect();
    assert_eq!(clients, ["gw-01"], "{stats}");

    // A command for meter-2's thing reaches meter-2 through the gateway's one connection. Its
    // subscription to cmd/{thing}/# went out before meter-2's first telemetry on that link,
    // which the emulator has recorded, so the cloud's publish has a subscriber.
    let meter_2 = &mut devices[1];
    meter_2
        .subscribe("fleetgw/meter-2/commands/#", QoS::AtLeastOnce)
        .await;
    let (status, body) = http(
        emu.api_addr(),
        "POST",
        &format!("/topics/cmd/{}/valve/close?qos=1", things["meter-2"]),
        Some(r#"{"close":true}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let command = meter_2
        .next_publish()
        .await
        .unwrap_or_else(|| panic!("no command at meter-2; daemon log:\n{}", daemon.log()));
    assert_eq!(command.topic, "fleetgw/meter-2/commands/valve/close");
    assert_eq!(&command.payload[..], br#"{"close":true}"#);
    // And one for the device whose key the gateway never held (device mode cannot serve it).
    let own = &mut devices[2];
    own.subscribe("fleetgw/own-key-3/commands/#", QoS::AtLeastOnce)
        .await;
    let (status, _) = http(
        emu.api_addr(),
        "POST",
        &format!("/topics/cmd/{}?qos=1", things["own-key-3"]),
        Some("ping"),
    )
    .await;
    assert_eq!(status, 200);
    let command = own.next_publish().await.expect("own-key-3's command");
    assert_eq!(command.topic, "fleetgw/own-key-3/commands");
    assert_eq!(&command.payload[..], b"ping");
    emu.shutdown().await;
}
