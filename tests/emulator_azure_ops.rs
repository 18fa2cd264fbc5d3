//! The Azure emulator's operations side: a restart in the same DIR keeps the ID scope, group
//! keys and registrations; an outage fault drops and refuses connections; a second hub
//! connection of a device takes over; DPS connections may only use DPS topics; and the
//! inspection API refuses what would forge or flood (cloud-to-device for unknown devices,
//! oversize messages, bad fault requests).

mod azure_support;
mod common;

use std::time::Duration;

use azure_support::flows::*;
use azure_support::*;
use common::http::http;
use common::wait::eventually_async;

use fleetgw::emulator::azure::{self, AzureEmulatorOptions};

#[tokio::test]
async fn a_restart_keeps_scope_keys_and_registrations() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = AzureEmulatorOptions::ephemeral(dir.path());
    opts.assigning = ASSIGNING;
    let emu = azure::start(opts.clone()).await.unwrap();
    assign(&emu, "keeper-1").await;
    let (scope, key) = (emu.id_scope().to_string(), emu.primary_key().to_string());
    let ca = emu.ca_pem().to_string();
    emu.shutdown().await;

    let emu = azure::start(opts).await.unwrap();
    assert_eq!(emu.id_scope(), scope);
    assert_eq!(emu.primary_key(), key);
    assert_eq!(emu.ca_pem(), ca);
    let (_, regs) = http(emu.endpoints().api, "GET", "/registrations", None).await;
    assert_eq!(regs[0]["registrationId"], "keeper-1");
    // The device goes straight to the hub with its derived key.
    let token = hub_sas(&emu, "keeper-1", "keeper-1", now() + 600);
    let mut hub = hub_mqtt(&emu, "keeper-1", &token, None).await.unwrap();
    hub.publish("devices/keeper-1/messages/events/", "after restart")
        .await;
    hub.puback().await;
    assert_eq!(messages(&emu).await.len(), 1);
    emu.shutdown().await;
}

#[tokio::test]
async fn an_outage_drops_and_refuses_connections_until_cleared() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    assign(emu, "dev-o").await;
    let token = hub_sas(emu, "dev-o", "dev-o", now() + 600);
    let mut hub = hub_mqtt(emu, "dev-o", &token, None).await.unwrap();
    let (status, _) = http(
        emu.endpoints().api,
        "POST",
        "/faults",
        Some(r#"{"outageSeconds": 60}"#),
    )
    .await;
    assert_eq!(status, 200);
    hub.closed().await;
    assert!(hub_mqtt(emu, "dev-o", &token, None).await.is_err());
    http(emu.endpoints().api, "DELETE", "/faults", None).await;
    hub_mqtt(emu, "dev-o", &token, None).await.unwrap();
}

#[tokio::test]
async fn a_second_hub_connection_of_a_device_takes_over() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    assign(emu, "dev-t").await;
    let token = hub_sas(emu, "dev-t", "dev-t", now() + 600);
    let mut first = hub_mqtt(emu, "dev-t", &token, None).await.unwrap();
    let mut second = hub_mqtt(emu, "dev-t", &token, None).await.unwrap();
    first.closed().await;
    second
        .publish("devices/dev-t/messages/events/", "still here")
        .await;
    second.puback().await;
    let (_, stats) = http(emu.endpoints().api, "GET", "/stats", None).await;
    assert_eq!(stats["connections"]["hubSessions"], 1);
}

#[tokio::test]
async fn dps_connections_may_only_use_dps_topics() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    let sas = dps_sas(emu, "dev-d", now() + 600);
    let mut conn = dps_mqtt(emu, "dev-d", &sas, None).await.unwrap();
    let codes = conn.subscribe("devices/dev-d/messages/devicebound/#").await;
    assert_eq!(codes, [rumqttc::SubscribeReasonCode::Failure]);
    conn.publish("devices/dev-d/messages/events/", "not DPS")
        .await;
    conn.closed().await;
    // A register without $rid closes too: DPS could not answer it.
    let mut conn = dps_mqtt(emu, "dev-d", &sas, None).await.unwrap();
    conn.publish("$dps/registrations/PUT/iotdps-register/?", "{}")
        .await;
    conn.closed().await;
    // A register body far over DPS's size closes the connection before it is parsed.
    let mut conn = dps_mqtt(emu, "dev-d", &sas, None).await.unwrap();
    conn.publish(
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        vec![b' '; 200 * 1024],
    )
    .await;
    conn.closed().await;
    assert!(messages(emu).await.is_empty());
    let (_, stats) = http(emu.endpoints().api, "GET", "/stats", None).await;
    assert_eq!(stats["dps"]["registrations"], 0, "{stats}");
}

#[tokio::test]
async fn the_api_refuses_messages_for_unknown_devices_oversize_ones_and_bad_faults() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    let api = emu.endpoints().api;
    let (status, body) = http(api, "POST", "/devices/nobody/messages", Some("x")).await;
    assert_eq!(status, 404, "{body}");
    assign(emu, "dev-x").await;
    let big = "x".repeat(azure::MAX_MESSAGE_BYTES + 1);
    let (status, body) = http(api, "POST", "/devices/dev-x/messages", Some(&big)).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = http(api, "POST", "/faults", Some(r#"{"dropResponses": 3}"#)).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("dropResponses"));
    let (status, body) = http(api, "POST", "/faults", Some(r#"{"unknown": 1}"#)).await;
    assert_eq!(status, 400, "{body}");
    let (_, faults) = http(api, "GET", "/faults", None).await;
    assert_eq!(faults["dropResponses"], 0.0);
    // Registration still works: nothing was changed by the refused requests.
    let sas = dps_sas(emu, "dev-y", now() + 600);
    let mut conn = dps_mqtt(emu, "dev-y", &sas, None).await.unwrap();
    let (answer, _) = register_over_mqtt(&mut conn, "dev-y").await;
    assert_eq!(answer.status, 200);
    eventually_async("two registrations", Duration::from_secs(5), || async {
        let (_, regs) = http(api, "GET", "/registrations", None).await;
        (regs.as_array().map(Vec::len) == Some(2)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn silent_connections_are_closed_on_every_listener() {
    use tokio::io::AsyncReadExt;
    let f = start(|_| {}).await;
    let e = f.emu.endpoints().clone();
    // A client that opens TCP and never speaks holds a task and a socket: each listener must
    // close it (TLS handshake bound: 10 s), all four at once.
    let mut waits = Vec::new();
    for addr in [e.dps_mqtt, e.dps_https, e.hub_mqtt, e.hub_https] {
        waits.push(tokio::spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf)).await;
            assert!(
                matches!(read, Ok(Ok(0)) | Ok(Err(_))),
                "{addr}: still open: {read:?}"
            );
        }));
    }
    for w in waits {
        w.await.unwrap();
    }
    let (_, stats) = http(e.api, "GET", "/stats", None).await;
    assert!(
        stats["recentRefusals"].to_string().contains("timed out"),
        "{stats}"
    );
}
