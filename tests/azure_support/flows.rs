//! The Azure emulator tests' flows: starting an emulator, connecting to DPS and the hub as the
//! SDK does, registering over MQTT honouring retry-after, and reading the inspection API.

use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::*;
use crate::common::http::http;

use fleetgw::emulator::azure::{self, AzureEmulatorHandle, AzureEmulatorOptions};

pub const ASSIGNING: Duration = Duration::from_millis(300);

pub struct Fixture {
    pub _dir: TempDir,
    pub emu: AzureEmulatorHandle,
}

pub async fn start(tweak: impl FnOnce(&mut AzureEmulatorOptions)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = AzureEmulatorOptions::ephemeral(dir.path());
    opts.assigning = ASSIGNING;
    tweak(&mut opts);
    let emu = azure::start(opts).await.expect("emulator starts");
    Fixture { _dir: dir, emu }
}

pub async fn dps_mqtt(
    emu: &AzureEmulatorHandle,
    registration_id: &str,
    password: &str,
    cert: Option<&(String, fleetgw::identity::PrivateKey)>,
) -> Result<Mqtt, String> {
    Mqtt::connect(
        emu.endpoints().dps_mqtt,
        registration_id,
        &dps_username(emu.id_scope(), registration_id),
        password,
        tls(emu, cert),
    )
    .await
}

pub async fn hub_mqtt(
    emu: &AzureEmulatorHandle,
    device_id: &str,
    password: &str,
    cert: Option<&(String, fleetgw::identity::PrivateKey)>,
) -> Result<Mqtt, String> {
    Mqtt::connect(
        emu.endpoints().hub_mqtt,
        device_id,
        &hub_username(&emu.endpoints().hub_host, device_id),
        password,
        tls(emu, cert),
    )
    .await
}

/// Registers over MQTT as the SDK does and polls honouring retry-after; returns the final
/// answer and how many polls said "assigning".
pub async fn register_over_mqtt(conn: &mut Mqtt, registration_id: &str) -> (DpsAnswer, u32) {
    conn.subscribe("$dps/registrations/res/#").await;
    conn.publish(
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        format!(r#"{{"payload": null, "registrationId": "{registration_id}"}}"#),
    )
    .await;
    let (topic, payload) = conn.next_publish().await;
    let first = dps_answer(&topic, &payload);
    assert_eq!(first.status, 202, "{first:?}");
    assert_eq!(first.rid, "1");
    assert_eq!(first.body["status"], "assigning");
    let operation = first.body["operationId"].as_str().unwrap().to_string();
    let mut wait = Duration::from_secs(first.retry_after.expect("retry-after on 202"));
    let mut assigning_polls = 0;
    for rid in 2.. {
        assert!(rid < 20, "still assigning after {rid} polls");
        // The first poll goes out at once to see "assigning"; later ones honour retry-after.
        if rid > 2 {
            tokio::time::sleep(wait).await;
        }
        conn.publish(
            &format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation}"),
            " ",
        )
        .await;
        let (topic, payload) = conn.next_publish().await;
        let answer = dps_answer(&topic, &payload);
        assert_eq!(answer.rid, rid.to_string());
        if answer.status == 202 {
            assigning_polls += 1;
            assert_eq!(answer.body["status"], "assigning");
            wait = Duration::from_secs(answer.retry_after.expect("retry-after while assigning"));
            continue;
        }
        return (answer, assigning_polls);
    }
    unreachable!()
}

pub fn check_assigned(answer: &Value, emu: &AzureEmulatorHandle, id: &str, attestation: &str) {
    let state = &answer["registrationState"];
    assert_eq!(answer["status"], "assigned", "{answer}");
    assert_eq!(state["registrationId"], id);
    assert_eq!(state["deviceId"], id);
    assert_eq!(state["assignedHub"], emu.endpoints().hub_host.as_str());
    assert_eq!(state["status"], "assigned");
    assert_eq!(state["substatus"], "initialAssignment");
    for field in ["createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag"] {
        assert!(
            state[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field}: {state}"
        );
    }
    assert!(state[attestation].is_object(), "{state}");
}

pub async fn messages(emu: &AzureEmulatorHandle) -> Vec<Value> {
    let (status, list) = http(emu.endpoints().api, "GET", "/messages", None).await;
    assert_eq!(status, 200);
    list.as_array().unwrap().clone()
}

pub async fn refusals(emu: &AzureEmulatorHandle) -> String {
    let (_, stats) = http(emu.endpoints().api, "GET", "/stats", None).await;
    stats["recentRefusals"].to_string()
}

/// Registers `id` over MQTT with a SAS token and waits until it is assigned.
pub async fn assign(emu: &AzureEmulatorHandle, id: &str) {
    let sas = dps_sas(emu, id, now() + 600);
    let mut conn = dps_mqtt(emu, id, &sas, None).await.unwrap();
    let (answer, _) = register_over_mqtt(&mut conn, id).await;
    assert_eq!(answer.status, 200);
}
