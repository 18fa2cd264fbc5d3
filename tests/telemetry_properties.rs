//! MQTT 5 message properties end to end with real processes (issue 18, item 2): a device
//! publishes over MQTT 5 to `fleetgw run`'s embedded broker with user properties, a content
//! type, correlation data and a payload format indicator; the AWS emulator's message log
//! (`GET /messages`) must show them on the message the gateway forwarded over its MQTT 5
//! upstream link, with the device identity and with the gateway identity. A command the cloud
//! publishes with properties (the data plane's Publish API with its `x-amz-mqtt5-*` headers)
//! must reach the device with them. With `cloud.aws.mqtt_version = 3` the link speaks 3.1.1
//! and the message arrives without properties.

mod common;

use std::cell::Cell;

use base64::Engine;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};

use common::http::{http, http_with_headers};
use common::mqtt5::{self, Client};
use common::process::Fleetgw;
use common::wait::{eventually_async, Lazy};
use common::{free_port, WAIT};

use fleetgw::emulator::aws::{self, AwsEmulatorHandle, AwsEmulatorOptions};

/// Connects an MQTT 5 device to the daemon's embedded broker, waiting for it to listen.
async fn device(daemon: &Fleetgw, id: &str, port: u16) -> Client {
    let what = Lazy(|| format!("the daemon's broker to listen:\n{}", daemon.log()));
    eventually_async(what, WAIT, || async {
        let open = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
        if open.is_err() {
            daemon.assert_running();
        }
        open.ok()
    })
    .await;
    Client::connect(mqtt5::options(id, port)).await
}

/// Provisions the connected device (the gateway makes its key); returns the thing name.
async fn provision(device: &mut Client, id: &str) -> String {
    device
        .subscribe(
            &format!("fleetgw/{id}/provision/json/+"),
            QoS::AtLeastOnce,
            None,
        )
        .await;
    device
        .publish(
            &format!("fleetgw/{id}/provision/json"),
            QoS::AtLeastOnce,
            false,
            json!({ "attestation": { "type": "none" } })
                .to_string()
                .as_bytes(),
            PublishProperties::default(),
        )
        .await;
    let answer = device.next_publish().await;
    let topic = String::from_utf8(answer.topic.to_vec()).unwrap();
    let v: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert!(topic.ends_with("/accepted"), "{id}: {topic} {v}");
    v["thingName"].as_str().unwrap().to_string()
}

fn telemetry_properties() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        correlation_data: Some(Bytes::from_static(b"req-42")),
        user_properties: vec![
            ("site".into(), "north".into()),
            ("unit".into(), "celsius".into()),
        ],
        ..Default::default()
    }
}

/// The emulator's record of the one message on `topic`, once it arrived.
async fn recorded(emu: &AwsEmulatorHandle, daemon: &Fleetgw, topic: &str) -> Value {
    let seen = &Cell::new(0);
    let what = Lazy(|| {
        format!(
            "a message on {topic} at the emulator ({} recorded); daemon log:\n{}",
            seen.get(),
            daemon.log()
        )
    });
    eventually_async(what, WAIT, || async {
        let (status, body) = http(emu.api_addr(), "GET", "/messages", None).await;
        assert_eq!(status, 200, "{body}");
        let all = body.as_array().unwrap().clone();
        seen.set(all.len());
        all.into_iter().find(|m| m["topic"] == topic)
    })
    .await
}

/// One daemon run: provision `sensor-a`, publish with properties, check the emulator's log
/// (`properties` expected there), then a command with properties back down.
async fn run(
    sets: &[&str],
    client_id: Option<&str>,
    telemetry: PublishProperties,
    properties_expected: Value,
) {
    let tmp = tempfile::tempdir().unwrap();
    let emu = aws::start(AwsEmulatorOptions::ephemeral(tmp.path().join("aws")))
        .await
        .expect("emulator starts");
    let port = free_port();
    let mut all_sets = vec![
        format!("downstream.listen=\"127.0.0.1:{port}\""),
        format!(
            "gateway.state_dir=\"{}\"",
            tmp.path().join("state").display()
        ),
        format!(
            "admin.socket=\"{}\"",
            tmp.path().join("admin.sock").display()
        ),
    ];
    all_sets.extend(sets.iter().map(|s| s.to_string()));
    let daemon = Fleetgw::run(&emu.gateway_config_path(), tmp.path().join("daemon.log"))
        .sets(&all_sets)
        .env_remove("RUST_LOG")
        .spawn();

    let id = "sensor-a";
    let mut device = device(&daemon, id, port).await;
    let thing = provision(&mut device, id).await;
    device
        .subscribe(&format!("fleetgw/{id}/commands/#"), QoS::AtLeastOnce, None)
        .await;
    device
        .publish(
            &format!("fleetgw/{id}/telemetry/env"),
            QoS::AtLeastOnce,
            false,
            br#"{"t":21.5}"#,
            telemetry,
        )
        .await;
    let topic = format!("dt/{thing}/telemetry/env");
    let m = recorded(&emu, &daemon, &topic).await;
    assert_eq!(
        m["clientId"].as_str(),
        Some(client_id.unwrap_or(&thing)),
        "{m}"
    );
    assert_eq!(m["properties"], properties_expected, "{m}");

    // A command with properties, published by the cloud side after the link's command
    // subscription (it went out before the telemetry the emulator recorded).
    let users = base64::engine::general_purpose::STANDARD
        .encode(json!([{ "reason": "firmware" }, { "batch": "7" }]).to_string());
    let correlation = base64::engine::general_purpose::STANDARD.encode("cmd-1");
    let (status, body) = http_with_headers(
        emu.api_addr(),
        "POST",
        &format!("/topics/cmd/{thing}/reboot?qos=1&contentType=text%2Fplain"),
        &[
            ("x-amz-mqtt5-user-properties", users),
            ("x-amz-mqtt5-correlation-data", correlation),
            ("x-amz-mqtt5-payload-format-indicator", "UTF8_DATA".into()),
        ],
        b"now",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let command = device.next_publish().await;
    assert_eq!(
        &command.topic[..],
        format!("fleetgw/{id}/commands/reboot").as_bytes()
    );
    assert_eq!(&command.payload[..], b"now");
    let p = command.properties.unwrap_or_default();
    if properties_expected
        .as_object()
        .is_some_and(|o| !o.is_empty())
    {
        assert_eq!(
            p.user_properties,
            vec![
                ("reason".to_string(), "firmware".to_string()),
                ("batch".to_string(), "7".to_string())
            ],
            "the command's user properties, in order"
        );
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"cmd-1"[..]));
        assert_eq!(p.payload_format_indicator, Some(1));
    } else {
        assert!(
            p.user_properties.is_empty() && p.content_type.is_none(),
            "MQTT 3.1.1 carries no properties: {p:?}"
        );
    }
    emu.shutdown().await;
}

fn expected_properties() -> Value {
    json!({
        "site": "north",
        "unit": "celsius",
        "$.ct": "application/json",
        "$.cid": "req-42",
        "$.ce": "utf-8",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_reach_aws_and_commands_keep_theirs_with_device_identity() {
    run(&[], None, telemetry_properties(), expected_properties()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_reach_aws_and_commands_keep_theirs_with_gateway_identity() {
    // Correlation data that is not UTF-8 arrives as the same bytes (the emulator logs them
    // as base64 under `$.cidb64`).
    let binary = PublishProperties {
        correlation_data: Some(Bytes::from_static(&[0x00, 0xff])),
        ..telemetry_properties()
    };
    let mut expected = expected_properties();
    let fields = expected.as_object_mut().unwrap();
    fields.remove("$.cid");
    fields.insert("$.cidb64".into(), json!("AP8="));
    run(
        &["telemetry.identity=gateway"],
        Some("gw-01"),
        binary,
        expected,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_version_3_links_speak_3_1_1_without_properties() {
    run(
        &["cloud.aws.mqtt_version=3"],
        None,
        telemetry_properties(),
        json!({}),
    )
    .await;
}
