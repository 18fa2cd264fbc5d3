//! The Azure client library (`fleetgw::cloud::azure`) against the Azure emulator over real TLS:
//! DPS registration over MQTT and HTTPS with both attestations (polling honours retry-after),
//! resuming a stored operation, 429 back-off, refusals surfaced as errors, and IoT Hub
//! telemetry over MQTT and HTTPS plus cloud-to-device, checked at the inspection API.

mod azure_support;
mod common;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use tempfile::TempDir;
use tokio::time::Instant;

use common::http::http;

use fleetgw::cloud::azure::dps::{DpsClient, DpsConfig, DpsTransport, RegistrationStatus};
use fleetgw::cloud::azure::hub::{self, HubConfig, HubMqtt};
use fleetgw::cloud::azure::{device_key_from_group, AzureError, DeviceCredential, Endpoint};
use fleetgw::emulator::azure::{self, AzureEmulatorHandle, AzureEmulatorOptions};

const ASSIGNING: Duration = Duration::from_millis(300);

async fn start() -> (TempDir, AzureEmulatorHandle) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = AzureEmulatorOptions::ephemeral(dir.path());
    opts.assigning = ASSIGNING;
    let emu = azure::start(opts).await.unwrap();
    (dir, emu)
}

fn dps(emu: &AzureEmulatorHandle, transport: DpsTransport) -> DpsClient {
    let addr = match transport {
        DpsTransport::Mqtt => emu.endpoints().dps_mqtt,
        DpsTransport::Https => emu.endpoints().dps_https,
    };
    DpsClient::new(DpsConfig {
        endpoint: Endpoint {
            host: addr.ip().to_string(),
            connect: Some(addr),
        },
        id_scope: emu.id_scope().to_string(),
        ca_pem: emu.ca_pem().to_string(),
        transport,
        request_timeout: Duration::from_secs(10),
        max_polls: 20,
        max_throttled: 5,
    })
}

fn hub_config(emu: &AzureEmulatorHandle, assigned_hub: &str, mqtt: bool) -> HubConfig {
    let e = emu.endpoints();
    HubConfig {
        endpoint: Endpoint {
            host: assigned_hub.to_string(),
            connect: Some(if mqtt { e.hub_mqtt } else { e.hub_https }),
        },
        ca_pem: emu.ca_pem().to_string(),
        request_timeout: Duration::from_secs(10),
    }
}

fn symmetric(emu: &AzureEmulatorHandle, id: &str) -> DeviceCredential {
    let group = BASE64.decode(emu.primary_key()).unwrap();
    DeviceCredential::SymmetricKey {
        device_key: device_key_from_group(&group, id),
        sas_ttl: Duration::from_secs(600),
    }
}

fn x509(emu: &AzureEmulatorHandle, id: &str) -> DeviceCredential {
    let (chain_pem, key) = azure_support::device_cert(emu, id);
    DeviceCredential::X509 { chain_pem, key }
}

async fn messages(emu: &AzureEmulatorHandle) -> Vec<serde_json::Value> {
    let (_, list) = http(emu.endpoints().api, "GET", "/messages", None).await;
    list.as_array().unwrap().clone()
}

#[tokio::test]
async fn provisions_over_mqtt_and_https_with_both_attestations_then_sends_telemetry() {
    let (_dir, emu) = start().await;
    let cases = [
        ("mqtt-sym", DpsTransport::Mqtt, symmetric(&emu, "mqtt-sym")),
        ("mqtt-x509", DpsTransport::Mqtt, x509(&emu, "mqtt-x509")),
        (
            "https-sym",
            DpsTransport::Https,
            symmetric(&emu, "https-sym"),
        ),
        ("https-x509", DpsTransport::Https, x509(&emu, "https-x509")),
    ];
    for (i, (id, transport, credential)) in cases.iter().enumerate() {
        let started = Instant::now();
        let state = dps(&emu, *transport)
            .provision(id, credential, None)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        // assigning for ASSIGNING, and retry-after is whole seconds: at least one wait.
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{id}: did not wait for retry-after"
        );
        assert_eq!(state.status, "assigned");
        assert_eq!(state.device_id, *id);
        assert_eq!(state.assigned_hub, emu.endpoints().hub_host);

        let payload = format!(r#"{{"n":{i}}}"#);
        if i % 2 == 0 {
            let mut link =
                HubMqtt::connect(&hub_config(&emu, &state.assigned_hub, true), id, credential)
                    .await
                    .unwrap_or_else(|e| panic!("{id}: {e}"));
            link.send(
                payload.as_bytes(),
                &[("$.ct", "application/json"), ("zone", "a b/c")],
            )
            .await
            .unwrap();
            link.close().await;
        } else {
            hub::send_https(
                &hub_config(&emu, &state.assigned_hub, false),
                id,
                credential,
                payload.as_bytes(),
                &[("$.ct", "application/json"), ("zone", "a b/c")],
            )
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        }
        let list = messages(&emu).await;
        let m = list.last().unwrap();
        assert_eq!(m["deviceId"], *id);
        assert_eq!(m["transport"], if i % 2 == 0 { "mqtt" } else { "https" });
        assert_eq!(m["properties"]["zone"], "a b/c");
        assert_eq!(m["properties"]["$.ct"], "application/json");
    }
    let (_, regs) = http(emu.endpoints().api, "GET", "/registrations", None).await;
    assert_eq!(regs.as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn a_stored_operation_is_resumed_on_a_new_connection_without_registering_twice() {
    let (_dir, emu) = start().await;
    let client = dps(&emu, DpsTransport::Mqtt);
    let credential = symmetric(&emu, "resume-1");
    let RegistrationStatus::Assigning {
        operation_id,
        retry_after,
    } = client
        .register("resume-1", &credential, None)
        .await
        .unwrap()
    else {
        panic!("expected assigning");
    };
    tokio::time::sleep(retry_after).await;
    let status = client
        .poll("resume-1", &credential, &operation_id)
        .await
        .unwrap();
    let RegistrationStatus::Assigned(state) = status else {
        panic!("expected assigned, got {status:?}");
    };
    assert_eq!(state.device_id, "resume-1");
    let (_, stats) = http(emu.endpoints().api, "GET", "/stats", None).await;
    assert_eq!(stats["dps"]["registrations"], 1);
}

#[tokio::test]
async fn throttling_is_waited_out_and_refusals_are_clear_errors() {
    let (_dir, emu) = start().await;
    let (status, _) = http(
        emu.endpoints().api,
        "POST",
        "/faults",
        Some(r#"{"tps": 0.5}"#),
    )
    .await;
    assert_eq!(status, 200);
    // Register + polls exceed 0.5 request/s: the client waits out the 429s and still succeeds.
    let state = dps(&emu, DpsTransport::Https)
        .provision("slow-1", &symmetric(&emu, "slow-1"), None)
        .await
        .unwrap();
    assert_eq!(state.status, "assigned");
    let (_, stats) = http(emu.endpoints().api, "GET", "/stats", None).await;
    assert!(stats["dps"]["throttled"].as_u64().unwrap() >= 1, "{stats}");
    http(emu.endpoints().api, "DELETE", "/faults", None).await;

    // A key not derived from the group key: DPS's 401002 over HTTPS, a refused CONNECT over MQTT.
    let wrong = DeviceCredential::SymmetricKey {
        device_key: b"wrong".to_vec(),
        sas_ttl: Duration::from_secs(600),
    };
    let err = dps(&emu, DpsTransport::Https)
        .provision("bad-1", &wrong, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AzureError::Service {
                status: 401,
                error_code: 401_002,
                ..
            }
        ),
        "{err}"
    );
    let err = dps(&emu, DpsTransport::Mqtt)
        .provision("bad-1", &wrong, None)
        .await
        .unwrap_err();
    assert!(matches!(err, AzureError::Connect { .. }), "{err}");
    // An invalid registration id: 400004.
    let err = dps(&emu, DpsTransport::Https)
        .provision("bad.", &symmetric(&emu, "bad."), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AzureError::Service {
                error_code: 400_004,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn cloud_to_device_messages_reach_the_hub_client() {
    let (_dir, emu) = start().await;
    let credential = symmetric(&emu, "c2d-1");
    let state = dps(&emu, DpsTransport::Mqtt)
        .provision("c2d-1", &credential, None)
        .await
        .unwrap();
    let mut link = HubMqtt::connect(
        &hub_config(&emu, &state.assigned_hub, true),
        "c2d-1",
        &credential,
    )
    .await
    .unwrap();
    link.subscribe_cloud_to_device().await.unwrap();
    let (status, _) = http(
        emu.endpoints().api,
        "POST",
        "/devices/c2d-1/messages?cmd=set%20point",
        Some("42"),
    )
    .await;
    assert_eq!(status, 200);
    let message = link.next_cloud_to_device().await.unwrap();
    assert_eq!(&message.payload[..], b"42");
    assert_eq!(message.properties["cmd"], "set point");
    // A property name that is not an HTTP header token cannot go over HTTPS: a clear error.
    let err = hub::send_https(
        &hub_config(&emu, &state.assigned_hub, false),
        "c2d-1",
        &credential,
        b"{}",
        &[("a b", "c")],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("\"a b\""), "{err}");
    // Oversize telemetry is refused before it leaves.
    let err = link
        .send(&vec![0; hub::MAX_MESSAGE_BYTES + 1], &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
    link.close().await;
}
