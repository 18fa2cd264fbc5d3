//! The Azure emulator driven over real TLS by rumqttc and hyper clients: DPS over MQTT and
//! HTTPS with both attestations (assigning -> assigned honouring retry-after), IoT Hub
//! telemetry over MQTT and HTTPS with the SDK's URL-encoded properties, cloud-to-device, the
//! documented errors, and hostile clients on every listener (another device's id, forged and
//! expired tokens, oversize payloads), checked through the wire and the inspection API.

mod azure_support;
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use azure_support::flows::*;
use azure_support::*;
use common::http::http;

use fleetgw::emulator::azure::{self, AzureEmulatorOptions};

#[tokio::test]
async fn discovery_file_has_exactly_the_documented_keys() {
    let f = start(|_| {}).await;
    let path = f.emu.dir().join("emulator.json");
    let text = std::fs::read_to_string(&path).unwrap();
    // It carries the group keys: owner-only, like azure.json and every key file.
    use std::os::unix::fs::PermissionsExt;
    for file in [
        "emulator.json",
        "azure.json",
        "ca.key",
        "server.key",
        "group-ca.key",
    ] {
        let mode = std::fs::metadata(f.emu.dir().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let keys: BTreeSet<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let want: BTreeSet<&str> = [
        "idScope", "dpsMqtt", "dpsHttps", "hubMqtt", "hubHttps", "hubHost", "api", "ca", "groups",
    ]
    .into();
    assert_eq!(keys, want);
    let sym: BTreeSet<&str> = json["groups"]["symmetricKey"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(sym, ["name", "primaryKey", "secondaryKey"].into());
    let x509: BTreeSet<&str> = json["groups"]["x509"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(x509, ["name", "caCert", "caKey"].into());
    assert_eq!(json["dpsMqtt"], f.emu.endpoints().dps_mqtt.to_string());
    assert_eq!(json["api"], f.emu.api_url());
    assert_eq!(json["idScope"], f.emu.id_scope());
    // gateway.toml is a valid fleetgw config naming this DPS; it holds the group key, so only
    // its owner may read it.
    let mode = std::fs::metadata(f.emu.gateway_config_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "gateway.toml mode {mode:o}");
    let config = fleetgw::config::load(&f.emu.gateway_config_path(), &[])
        .unwrap_or_else(|e| panic!("gateway.toml: {e}"));
    assert_eq!(
        config.cloud.azure.id_scope.as_deref(),
        Some(f.emu.id_scope())
    );
    assert_eq!(
        config.cloud.azure.dps_endpoint,
        f.emu.endpoints().dps_mqtt.to_string()
    );
}

#[tokio::test]
async fn symmetric_key_over_mqtt_then_hub_telemetry_and_cloud_to_device() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    let sas = dps_sas(emu, "sensor-1", now() + 3600);
    let mut dps = dps_mqtt(emu, "sensor-1", &sas, None).await.unwrap();
    let started = Instant::now();
    let (answer, assigning_polls) = register_over_mqtt(&mut dps, "sensor-1").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        assigning_polls >= 1,
        "the first immediate poll must see assigning"
    );
    assert!(started.elapsed() >= ASSIGNING);
    check_assigned(&answer.body, emu, "sensor-1", "symmetricKey");

    let (_, regs) = http(emu.endpoints().api, "GET", "/registrations", None).await;
    assert_eq!(
        regs,
        serde_json::json!([{"registrationId": "sensor-1", "deviceId": "sensor-1",
            "assignedHub": emu.endpoints().hub_host, "status": "assigned",
            "attestation": "symmetricKey"}])
    );

    let token = hub_sas(emu, "sensor-1", "sensor-1", now() + 3600);
    let mut hub = hub_mqtt(emu, "sensor-1", &token, None).await.unwrap();
    hub.publish(
        "devices/sensor-1/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&a%20b%2Fc=d",
        r#"{"t":21}"#,
    )
    .await;
    hub.puback().await;
    let list = messages(emu).await;
    assert_eq!(list.len(), 1);
    let m = &list[0];
    assert_eq!(m["deviceId"], "sensor-1");
    assert_eq!(m["clientId"], "sensor-1");
    assert_eq!(m["transport"], "mqtt");
    assert_eq!(m["payloadBase64"], "eyJ0IjoyMX0=");
    assert_eq!(
        m["properties"],
        serde_json::json!({"$.mid": "m-1", "$.ct": "application/json", "a b/c": "d"})
    );

    hub.subscribe("devices/sensor-1/messages/devicebound/#")
        .await;
    let (status, sent) = http(
        emu.endpoints().api,
        "POST",
        "/devices/sensor-1/messages?cmd=reboot",
        Some("now"),
    )
    .await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["connected"], true);
    let (topic, payload) = hub.next_publish().await;
    assert_eq!(topic, "devices/sensor-1/messages/devicebound/cmd=reboot");
    assert_eq!(&payload[..], b"now");
}

#[tokio::test]
async fn x509_over_https_follows_seed_000() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    let cert = device_cert(emu, "device-01");
    let dps = emu.endpoints().dps_https;
    let headers = [
        ("content-type", "application/json"),
        ("content-encoding", "utf-8"),
    ];
    let path = format!(
        "/{}/registrations/device-01/register?api-version=2021-06-01",
        emu.id_scope()
    );
    let put = https(
        dps,
        tls(emu, Some(&cert)),
        "PUT",
        &path,
        &headers,
        r#"{"registrationId": "device-01"}"#,
    )
    .await
    .unwrap();
    assert_eq!(put.status, 202, "{}", String::from_utf8_lossy(&put.body));
    let retry: u64 = put.header("retry-after").unwrap().parse().unwrap();
    let operation = put.json()["operationId"].as_str().unwrap().to_string();
    let poll_path = format!(
        "/{}/registrations/device-01/operations/{operation}?api-version=2021-06-01",
        emu.id_scope()
    );
    let mut wait = Duration::ZERO;
    let done = loop {
        tokio::time::sleep(wait).await;
        let get = https(dps, tls(emu, Some(&cert)), "GET", &poll_path, &headers, "")
            .await
            .unwrap();
        match get.status {
            202 => wait = Duration::from_secs(get.header("retry-after").unwrap().parse().unwrap()),
            200 => break get.json(),
            other => panic!(
                "poll answered {other}: {}",
                String::from_utf8_lossy(&get.body)
            ),
        }
    };
    assert!(retry >= 1);
    check_assigned(&done, emu, "device-01", "x509");

    let post = https(
        emu.endpoints().hub_https,
        tls(emu, Some(&cert)),
        "POST",
        "/devices/device-01/messages/events?api-version=2020-03-13",
        &[
            ("content-type", "application/json"),
            ("iothub-app-zone", "a b"),
            ("iothub-messageid", "m-9"),
        ],
        r#"{"temperature": 30}"#,
    )
    .await
    .unwrap();
    assert_eq!(post.status, 204);
    let list = messages(emu).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["transport"], "https");
    assert_eq!(list[0]["deviceId"], "device-01");
    assert_eq!(list[0]["properties"]["zone"], "a b");
    assert_eq!(list[0]["properties"]["$.mid"], "m-9");
    assert_eq!(list[0]["properties"]["$.ct"], "application/json");
}

#[tokio::test]
async fn dps_https_answers_bad_requests_with_documented_error_codes() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    let dps = emu.endpoints().dps_https;
    let scope = emu.id_scope().to_string();
    let put = |scope: String, id: String, auth: String, body: String| async move {
        let path = format!("/{scope}/registrations/{id}/register?api-version=2019-03-31");
        https(
            dps,
            tls(emu, None),
            "PUT",
            &path,
            &[("authorization", &auth)],
            body,
        )
        .await
        .unwrap()
    };
    let body = |id: &str| format!(r#"{{"registrationId": "{id}"}}"#);

    // Wrong scope: 404001.
    let a = put(
        "0neWRONG".into(),
        "dev-1".into(),
        dps_sas(emu, "dev-1", now() + 60),
        body("dev-1"),
    )
    .await;
    assert_eq!(
        (a.status, a.json()["errorCode"].as_u64()),
        (404, Some(404_001))
    );
    // Registration ids breaking the seed 000 rules: 400004.
    for bad in ["dev.", "dev%21x", &"x".repeat(129)] {
        let a = put(
            scope.clone(),
            bad.into(),
            "SharedAccessSignature sr=x&sig=y&se=1".into(),
            body(bad),
        )
        .await;
        assert_eq!(
            (a.status, a.json()["errorCode"].as_u64()),
            (400, Some(400_004)),
            "{bad}"
        );
    }
    // Bad SAS (signed with another key), expired SAS: 401002 with the reason.
    let forged = fleetgw::admission::sas::generate_sas(
        &format!("{scope}/registrations/dev-1"),
        b"not the device key",
        now() + 60,
        None,
    );
    let a = put(scope.clone(), "dev-1".into(), forged, body("dev-1")).await;
    assert_eq!(
        (a.status, a.json()["errorCode"].as_u64()),
        (401, Some(401_002))
    );
    assert!(a.json()["message"].as_str().unwrap().contains("signature"));
    let a = put(
        scope.clone(),
        "dev-1".into(),
        dps_sas(emu, "dev-1", now() - 5),
        body("dev-1"),
    )
    .await;
    assert_eq!(a.status, 401);
    assert!(
        a.json()["message"].as_str().unwrap().contains("expired"),
        "{}",
        a.json()
    );
    // Body naming another registration: 400004.
    let a = put(
        scope.clone(),
        "dev-1".into(),
        dps_sas(emu, "dev-1", now() + 60),
        body("dev-2"),
    )
    .await;
    assert_eq!(
        (a.status, a.json()["errorCode"].as_u64()),
        (400, Some(400_004))
    );
    // Wrong CN over X.509: 401002.
    let cert = device_cert(emu, "dev-9");
    let path = format!("/{scope}/registrations/dev-1/register?api-version=2019-03-31");
    let a = https(dps, tls(emu, Some(&cert)), "PUT", &path, &[], body("dev-1"))
        .await
        .unwrap();
    assert_eq!(
        (a.status, a.json()["errorCode"].as_u64()),
        (401, Some(401_002))
    );
    assert!(
        a.json()["message"].as_str().unwrap().contains("CN"),
        "{}",
        a.json()
    );
    // A certificate from outside the group CA: 401002.
    let stranger = fleetgw::identity::CertificateAuthority::generate("stranger").unwrap();
    let (pem, key) = stranger
        .issue_client("dev-1", fleetgw::identity::KeyType::EcdsaP256, 1)
        .unwrap();
    let a = https(
        dps,
        tls(emu, Some(&(pem, key))),
        "PUT",
        &path,
        &[],
        body("dev-1"),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 401);
    // Oversize body: 413, nothing registered.
    let a = put(
        scope.clone(),
        "dev-1".into(),
        dps_sas(emu, "dev-1", now() + 60),
        "x".repeat(70_000),
    )
    .await;
    assert_eq!(a.status, 413);
    let (_, regs) = http(emu.endpoints().api, "GET", "/registrations", None).await;
    assert_eq!(regs, serde_json::json!([]));
}

#[tokio::test]
async fn a_device_cannot_poll_or_take_another_devices_registration() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    let dps = emu.endpoints().dps_https;
    let scope = emu.id_scope().to_string();
    let a_auth = dps_sas(emu, "dev-a", now() + 60);
    let path = format!("/{scope}/registrations/dev-a/register?api-version=2019-03-31");
    let put = https(
        dps,
        tls(emu, None),
        "PUT",
        &path,
        &[("authorization", &a_auth)],
        r#"{"registrationId":"dev-a"}"#,
    )
    .await
    .unwrap();
    let operation = put.json()["operationId"].as_str().unwrap().to_string();
    // dev-b, with its own valid token, asks for dev-a's operation under its own id: 404002.
    let b_auth = dps_sas(emu, "dev-b", now() + 60);
    let poll =
        format!("/{scope}/registrations/dev-b/operations/{operation}?api-version=2019-03-31");
    let a = https(
        dps,
        tls(emu, None),
        "GET",
        &poll,
        &[("authorization", &b_auth)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(
        (a.status, a.json()["errorCode"].as_u64()),
        (404, Some(404_002))
    );
    // ... and under dev-a's id with its own token: 401002.
    let poll =
        format!("/{scope}/registrations/dev-a/operations/{operation}?api-version=2019-03-31");
    let a = https(
        dps,
        tls(emu, None),
        "GET",
        &poll,
        &[("authorization", &b_auth)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(
        (a.status, a.json()["errorCode"].as_u64()),
        (401, Some(401_002))
    );
}

#[tokio::test]
async fn dps_mqtt_refuses_wrong_scope_bad_expired_and_borrowed_tokens_with_connack_5() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    let addr = emu.endpoints().dps_mqtt;
    let good = dps_sas(emu, "dev-1", now() + 600);
    let cases = [
        (
            "wrong scope",
            dps_username("0neWRONG", "dev-1"),
            "dev-1",
            good.clone(),
        ),
        (
            "forged",
            dps_username(emu.id_scope(), "dev-1"),
            "dev-1",
            fleetgw::admission::sas::generate_sas(
                &format!("{}/registrations/dev-1", emu.id_scope()),
                b"guess",
                now() + 600,
                None,
            ),
        ),
        (
            "expired replay",
            dps_username(emu.id_scope(), "dev-1"),
            "dev-1",
            dps_sas(emu, "dev-1", now() - 1),
        ),
        (
            "another device's token",
            dps_username(emu.id_scope(), "dev-2"),
            "dev-2",
            good.clone(),
        ),
        (
            "client id not the registration id",
            dps_username(emu.id_scope(), "dev-1"),
            "dev-2",
            good.clone(),
        ),
        (
            "bad registration id",
            dps_username(emu.id_scope(), "dev."),
            "dev.",
            good.clone(),
        ),
    ];
    for (what, username, client_id, password) in cases {
        let err = Mqtt::connect(addr, client_id, &username, &password, tls(emu, None))
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: connected"));
        assert!(
            err.contains("NotAuthorized")
                || err.contains("BadUserNamePassword")
                || err.contains("5"),
            "{what}: {err}"
        );
    }
    let reasons = refusals(emu).await;
    for needle in [
        "does not exist",
        "signature",
        "expired",
        "dev-2",
        "client id",
        "invalid id",
    ] {
        assert!(reasons.contains(needle), "{needle} not in {reasons}");
    }
    // The genuine device still gets in.
    dps_mqtt(emu, "dev-1", &good, None).await.unwrap();
}

#[tokio::test]
async fn dps_answers_429_with_retry_after_under_a_rate_fault() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    let (status, _) = http(
        emu.endpoints().api,
        "POST",
        "/faults",
        Some(r#"{"tps": 0.2}"#),
    )
    .await;
    assert_eq!(status, 200);
    let sas = dps_sas(emu, "dev-1", now() + 600);
    let mut conn = dps_mqtt(emu, "dev-1", &sas, None).await.unwrap();
    conn.subscribe("$dps/registrations/res/#").await;
    let mut statuses = Vec::new();
    for rid in 1..=3 {
        conn.publish(
            &format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"),
            r#"{"payload": null, "registrationId": "dev-1"}"#,
        )
        .await;
        let (topic, payload) = conn.next_publish().await;
        let a = dps_answer(&topic, &payload);
        if a.status == 429 {
            assert_eq!(a.body["errorCode"], 429_001);
            assert!(a.retry_after.is_some_and(|s| s >= 1), "{topic}");
        }
        statuses.push(a.status);
    }
    assert_eq!(statuses[0], 202);
    assert!(statuses.contains(&429), "{statuses:?}");
    let (_, stats) = http(emu.endpoints().api, "GET", "/stats", None).await;
    assert!(stats["dps"]["throttled"].as_u64().unwrap() >= 1);
    // HTTPS says it with a Retry-After header.
    let path = format!(
        "/{}/registrations/dev-1/register?api-version=2019-03-31",
        emu.id_scope()
    );
    let a = https(
        emu.endpoints().dps_https,
        tls(emu, None),
        "PUT",
        &path,
        &[("authorization", &sas)],
        r#"{"registrationId":"dev-1"}"#,
    )
    .await
    .unwrap();
    assert_eq!(a.status, 429);
    assert!(a.header("retry-after").is_some());
}

#[tokio::test]
async fn hub_mqtt_refuses_forged_expired_and_unregistered_devices_and_closes_trespassers() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    assign(emu, "dev-a").await;
    assign(emu, "dev-b").await;
    // dev-a signs a token for dev-b's resource with its own key: refused.
    let forged = hub_sas(emu, "dev-b", "dev-a", now() + 600);
    assert!(hub_mqtt(emu, "dev-b", &forged, None).await.is_err());
    // Replaying dev-b's own expired token: refused.
    assert!(hub_mqtt(
        emu,
        "dev-b",
        &hub_sas(emu, "dev-b", "dev-b", now() - 1),
        None
    )
    .await
    .is_err());
    // A DPS token is not a hub token.
    assert!(
        hub_mqtt(emu, "dev-b", &dps_sas(emu, "dev-b", now() + 600), None)
            .await
            .is_err()
    );
    // A device DPS never assigned: refused even with a correctly derived key.
    assert!(hub_mqtt(
        emu,
        "dev-c",
        &hub_sas(emu, "dev-c", "dev-c", now() + 600),
        None
    )
    .await
    .is_err());
    // X.509 for a symmetric-key device: refused.
    let cert = device_cert(emu, "dev-b");
    assert!(hub_mqtt(emu, "dev-b", "", Some(&cert)).await.is_err());
    let reasons = refusals(emu).await;
    assert!(reasons.contains("not registered"), "{reasons}");

    // dev-a publishing as dev-b is closed and nothing is recorded.
    let token = hub_sas(emu, "dev-a", "dev-a", now() + 600);
    let mut a = hub_mqtt(emu, "dev-a", &token, None).await.unwrap();
    a.publish("devices/dev-b/messages/events/", "spoof").await;
    a.closed().await;
    // Subscribing to dev-b's cloud-to-device messages is closed too.
    let mut a = hub_mqtt(emu, "dev-a", &token, None).await.unwrap();
    a.client
        .subscribe(
            "devices/dev-b/messages/devicebound/#",
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    a.closed().await;
    // An oversize message (over 256 KB) is closed, not recorded.
    let mut a = hub_mqtt(emu, "dev-a", &token, None).await.unwrap();
    a.publish(
        "devices/dev-a/messages/events/",
        vec![b'x'; azure::MAX_MESSAGE_BYTES + 1],
    )
    .await;
    a.closed().await;
    assert!(messages(emu).await.is_empty());
    let (_, stats) = http(emu.endpoints().api, "GET", "/stats", None).await;
    assert!(
        stats["connections"]["closedByPolicy"].as_u64().unwrap() >= 3,
        "{stats}"
    );
}

#[tokio::test]
async fn hub_https_refuses_forged_expired_foreign_and_oversize_messages() {
    let f = start(|_| {}).await;
    let emu = &f.emu;
    assign(emu, "dev-a").await;
    assign(emu, "dev-b").await;
    let hub = emu.endpoints().hub_https;
    let post = |id: &'static str, auth: String, body: Vec<u8>| async move {
        https(
            hub,
            tls(emu, None),
            "POST",
            &format!("/devices/{id}/messages/events?api-version=2020-03-13"),
            &[("authorization", &auth)],
            body,
        )
        .await
        .unwrap()
    };
    let ok = post(
        "dev-a",
        hub_sas(emu, "dev-a", "dev-a", now() + 600),
        b"1".to_vec(),
    )
    .await;
    assert_eq!(ok.status, 204);
    let forged = post(
        "dev-b",
        hub_sas(emu, "dev-b", "dev-a", now() + 600),
        b"2".to_vec(),
    )
    .await;
    assert_eq!(
        (forged.status, forged.json()["errorCode"].as_u64()),
        (401, Some(401_002))
    );
    let foreign = post(
        "dev-b",
        hub_sas(emu, "dev-a", "dev-a", now() + 600),
        b"3".to_vec(),
    )
    .await;
    assert_eq!(foreign.status, 401);
    let expired = post(
        "dev-a",
        hub_sas(emu, "dev-a", "dev-a", now() - 1),
        b"4".to_vec(),
    )
    .await;
    assert_eq!(expired.status, 401);
    let big = post(
        "dev-a",
        hub_sas(emu, "dev-a", "dev-a", now() + 600),
        vec![b'x'; azure::MAX_MESSAGE_BYTES + 1],
    )
    .await;
    assert_eq!(big.status, 413);
    let list = messages(emu).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["payloadBase64"], "MQ==");
}

#[tokio::test]
async fn server_certificate_covers_the_listen_ips_and_hub_host_and_is_reissued_when_they_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = AzureEmulatorOptions::ephemeral(dir.path());
    opts.hub_mqtt = "127.0.0.3:0".parse().unwrap();
    let emu = azure::start(opts.clone()).await.unwrap();
    assert_eq!(emu.endpoints().hub_host, "127.0.0.3");
    // A TLS client verifying the IP (no SNI) accepts it on 127.0.0.3.
    let probe = https(
        emu.endpoints().hub_mqtt,
        tls(&emu, None),
        "GET",
        "/",
        &[],
        "",
    )
    .await;
    assert!(
        !probe.as_ref().err().is_some_and(|e| e.starts_with("TLS")),
        "{:?}",
        probe.err()
    );
    emu.shutdown().await;
    let sans = std::fs::read_to_string(dir.path().join("server.sans")).unwrap();
    assert!(
        sans.contains("IP:127.0.0.3") && sans.contains("IP:127.0.0.1"),
        "{sans}"
    );

    opts.hub_host = Some("hub.fleetgw.test".into());
    let emu = azure::start(opts).await.unwrap();
    let reissued = std::fs::read_to_string(dir.path().join("server.sans")).unwrap();
    assert!(reissued.contains("DNS:hub.fleetgw.test"), "{reissued}");
    let certs = fleetgw::identity::parse_certificates(
        &std::fs::read_to_string(dir.path().join("server.pem")).unwrap(),
    )
    .unwrap();
    assert!(fleetgw::identity::verify_chain(
        &certs
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.der.clone())))
            .collect::<String>(),
        emu.ca_pem(),
        now()
    )
    .is_ok());
    emu.shutdown().await;
}
