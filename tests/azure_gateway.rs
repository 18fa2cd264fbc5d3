//! fleetgw end to end with Azure: the real daemon (`fleetgw run`, a separate process that can be
//! SIGKILLed) against the Azure emulator (DPS and IoT Hub over MQTT and HTTPS), with simulated
//! devices on the embedded broker. Each test checks what the emulator recorded (registrations,
//! their attestation and hub, every telemetry message in order) and what the devices got.
//!
//! - symmetric key, DPS and hub over MQTT, telemetry through a hub outage: nothing lost;
//! - X.509 (the gateway signs each device's certificate with the group CA), DPS and hub over
//!   HTTPS;
//! - SIGKILL while DPS is still `assigning`: the restarted daemon polls the stored operation and
//!   never registers the device twice;
//! - bad input: a wrong enrollment group key fails the devices with DPS's error code and the
//!   daemon keeps serving.

mod common;

use std::path::Path;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::Value;

use fleetgw::emulator::azure::{self, AzureEmulatorHandle, AzureEmulatorOptions};
use fleetgw::sim::{self, FleetOptions, FleetReport, SimCloud, TelemetryPlan};

use common::free_port;
use common::http::http;
use common::mqtt_client::{self, TestClient};
use common::process::Fleetgw;
use common::wait::eventually_async;

/// Bound of each fleet run.
const FLEET_LIMIT: Duration = Duration::from_secs(120);

struct Fixture {
    dir: tempfile::TempDir,
    emu: AzureEmulatorHandle,
}

impl Fixture {
    async fn start(assigning: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = AzureEmulatorOptions::ephemeral(dir.path().join("cloud"));
        opts.assigning = assigning;
        let emu = azure::start(opts).await.expect("the Azure emulator starts");
        Self { dir, emu }
    }

    fn api(&self) -> std::net::SocketAddr {
        self.emu.endpoints().api
    }

    /// `fleetgw run` with the emulator's gateway.toml, the device broker on `port` and `sets`.
    async fn gateway(&self, port: u16, sets: &[String], env: &[(&str, &str)], n: u32) -> Fleetgw {
        let log = self.dir.path().join(format!("gateway-{n}.log"));
        let mut launch = Fleetgw::run(&self.emu.gateway_config_path(), log)
            .sets([
                format!("downstream.listen=\"127.0.0.1:{port}\""),
                format!(
                    "admin.socket=\"{}\"",
                    self.dir.path().join("admin.sock").display()
                ),
                "cloud.azure.tps=1000".to_string(),
            ])
            .sets(sets.iter().cloned());
        for (k, v) in env {
            launch = launch.env(k, v);
        }
        let gw = launch.spawn();
        gw.wait_for_log("ready", Duration::from_secs(30)).await;
        gw
    }

    /// A gateway with one device (`{prefix}-…-1`) provisioned through it: the gateway, its
    /// device broker port and the device id.
    async fn provisioned_device(&self, prefix: &str) -> (Fleetgw, u16, String) {
        let port = free_port();
        let gw = self.gateway(port, &[], &[], 1).await;
        let opts = fleet(port, prefix, 1, 0);
        let id = opts.device_id(1).unwrap().to_string();
        let report = run(opts).await;
        assert_all_provisioned(&report, &gw);
        (gw, port, id)
    }

    async fn registrations(&self) -> Vec<Value> {
        let (status, body) = http(self.api(), "GET", "/registrations", None).await;
        assert_eq!(status, 200, "{body}");
        body.as_array().cloned().unwrap_or_default()
    }

    async fn stats(&self) -> Value {
        http(self.api(), "GET", "/stats", None).await.1
    }
}

fn fleet(port: u16, prefix: &str, devices: u32, messages: u32) -> FleetOptions {
    let mut opts = FleetOptions::new("127.0.0.1", port, devices);
    opts.id_prefix = prefix.to_string();
    opts.cloud = SimCloud::Azure;
    opts.timeout = Duration::from_secs(90);
    opts.resend_after = Some(Duration::from_secs(3));
    if messages > 0 {
        opts.telemetry = Some(TelemetryPlan {
            messages_per_device: messages,
            own_csr_devices: true,
            ..TelemetryPlan::default()
        });
    }
    opts
}

async fn run(opts: FleetOptions) -> FleetReport {
    tokio::time::timeout(FLEET_LIMIT, sim::run_fleet(opts, |_| {}))
        .await
        .expect("the fleet finishes in time")
        .expect("the fleet runs")
}

fn assert_all_provisioned(report: &FleetReport, gw: &Fleetgw) {
    assert!(
        report.all_provisioned(),
        "failures: {:?}\n{}",
        report.failures,
        gw.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn symmetric_key_over_mqtt_provisions_and_loses_no_telemetry_through_a_hub_outage() {
    let f = Fixture::start(Duration::from_millis(300)).await;
    let port = free_port();
    let gw = f.gateway(port, &[], &[], 1).await;

    // Half the devices bring their own CSR: with symmetric key the gateway needs no key of
    // theirs, so every device sends telemetry.
    let mut opts = fleet(port, "sym", 12, 60);
    opts.own_csr_share = 0.5;
    opts.cbor_share = 0.25;
    let api = f.api();
    let outage = tokio::spawn(async move {
        // Once the hub has some messages, it drops every connection for two seconds.
        eventually_async("the first messages at the hub", FLEET_LIMIT, || async {
            let stats = http(api, "GET", "/stats", None).await.1;
            (stats["messages"].as_u64().unwrap_or(0) > 50).then_some(())
        })
        .await;
        let (status, body) = http(api, "POST", "/faults", Some(r#"{"outageSeconds":2}"#)).await;
        assert_eq!(status, 200, "{body}");
    });
    let report = run(opts).await;
    assert_all_provisioned(&report, &gw);
    outage.await.unwrap();
    let telemetry = report.telemetry.as_ref().expect("a telemetry phase");
    let check = sim::wait_for_delivery(&f.emu.api_url(), telemetry, Duration::from_secs(60))
        .await
        .expect("the emulator's message log reads");
    assert_eq!(check.lost, 0, "{check:?}\n{}", gw.log_tail());
    assert_eq!(check.out_of_order, 0, "{check:?}");
    assert_eq!(check.expected, 12 * 60);

    // One registration per device, symmetric key, assigned to the emulated hub, which every
    // message reached over MQTT under the device's own identity.
    let regs = f.registrations().await;
    assert_eq!(regs.len(), 12, "{regs:?}");
    let hub = &f.emu.endpoints().hub_host;
    for r in &regs {
        assert_eq!(r["status"], "assigned", "{r}");
        assert_eq!(r["attestation"], "symmetricKey", "{r}");
        assert_eq!(r["assignedHub"].as_str(), Some(hub.as_str()), "{r}");
    }
    let (_, messages) = http(f.api(), "GET", "/messages?limit=5", None).await;
    for m in messages.as_array().unwrap() {
        assert_eq!(m["transport"], "mqtt", "{m}");
        assert_eq!(m["clientId"], m["deviceId"], "{m}");
    }
    let stats = f.stats().await;
    assert_eq!(stats["dps"]["registrations"], 12, "{stats}");
    gw.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn x509_over_https_issues_group_certificates_and_posts_telemetry() {
    let f = Fixture::start(Duration::from_millis(100)).await;
    let port = free_port();
    let e = f.emu.endpoints().clone();
    let sets = vec![
        "cloud.azure.attestation=\"x509\"".to_string(),
        format!(
            "cloud.azure.group_ca_cert=\"{}\"",
            f.emu.group_ca_cert_path().display()
        ),
        format!(
            "cloud.azure.group_ca_key=\"{}\"",
            f.emu.group_ca_key_path().display()
        ),
        "cloud.azure.transport=\"https\"".to_string(),
        format!("cloud.azure.dps_endpoint=\"{}\"", e.dps_https),
        "cloud.azure.hub_transport=\"https\"".to_string(),
        format!("cloud.azure.hub_connect=\"{}\"", e.hub_https),
    ];
    let gw = f.gateway(port, &sets, &[], 1).await;
    let mut opts = fleet(port, "x509", 6, 20);
    // Every device's certificate must chain to the enrollment group's CA.
    opts.cloud_ca_pem = Some(std::fs::read_to_string(f.emu.group_ca_cert_path()).unwrap());
    let report = run(opts).await;
    assert_all_provisioned(&report, &gw);
    let telemetry = report.telemetry.as_ref().expect("a telemetry phase");
    let check = sim::wait_for_delivery(&f.emu.api_url(), telemetry, Duration::from_secs(60))
        .await
        .expect("the emulator's message log reads");
    assert_eq!(check.lost, 0, "{check:?}\n{}", gw.log_tail());
    assert_eq!(check.out_of_order, 0, "{check:?}");

    let regs = f.registrations().await;
    assert_eq!(regs.len(), 6, "{regs:?}");
    for r in &regs {
        assert_eq!(r["attestation"], "x509", "{r}");
        assert_eq!(r["status"], "assigned", "{r}");
    }

    // A device that brings its own CSR is refused before any certificate is issued: DPS and
    // the hub would authenticate it with a key the gateway does not hold.
    let mut own = fleet(port, "x509own", 1, 0);
    own.own_csr_share = 1.0;
    own.timeout = Duration::from_secs(30);
    let refused = run(own).await;
    assert_eq!(refused.provisioned, 0, "{refused:?}");
    let text = refused.failures[0].reason.to_string();
    assert!(text.contains("DeviceKeyRequired"), "{text}");
    assert_eq!(f.registrations().await.len(), 6);
    let (_, messages) = http(f.api(), "GET", "/messages?limit=5", None).await;
    for m in messages.as_array().unwrap() {
        assert_eq!(m["transport"], "https", "{m}");
    }
    gw.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_assigning_resumes_the_stored_operation_and_registers_once() {
    // Long enough that the daemon is killed, restarted and polls while DPS still assigns.
    let f = Fixture::start(Duration::from_secs(4)).await;
    let port = free_port();
    let crash = [("FLEETGW_TEST_CRASH_AFTER", "registering")];
    let first = f.gateway(port, &[], &crash, 1).await;
    let fleet_task = tokio::spawn(run(fleet(port, "assigning", 1, 0)));

    // The daemon stops right after persisting Registering (the operation id), before any poll.
    let status = first.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(86), "{}", first.log_tail());
    assert_eq!(f.stats().await["dps"]["registrations"], 1);
    first.kill9();

    let second = f.gateway(port, &[], &[], 2).await;
    let report = fleet_task.await.unwrap();
    assert_all_provisioned(&report, &second);
    let stats = f.stats().await;
    assert_eq!(
        stats["dps"]["registrations"], 1,
        "the restarted daemon must poll, not register again: {stats}"
    );
    assert!(stats["dps"]["polls"].as_u64().unwrap_or(0) >= 1, "{stats}");
    assert_eq!(f.registrations().await.len(), 1);
    second.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_group_key_fails_the_devices_with_dps_error_and_the_daemon_stays_up() {
    let f = Fixture::start(Duration::from_millis(100)).await;
    let port = free_port();
    // A valid base64 key that is not the group's: DPS refuses every SAS token made from it.
    let sets = vec!["cloud.azure.group_key=\"d3Jvbmcta2V5LXdyb25nLWtleQ==\"".to_string()];
    let gw = f.gateway(port, &sets, &[], 1).await;
    let mut opts = fleet(port, "badkey", 2, 0);
    opts.timeout = Duration::from_secs(30);
    let report = run(opts).await;
    assert_eq!(report.provisioned, 0, "{report:?}");
    assert_eq!(report.failures.len(), 2);
    for failure in &report.failures {
        let text = failure.reason.to_string();
        assert!(text.contains("401002"), "{text}");
    }
    assert!(f.registrations().await.is_empty());
    gw.assert_running();
    check_admin_alive(f.dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloud_to_device_messages_reach_the_device_with_their_properties() {
    let f = Fixture::start(Duration::from_millis(100)).await;
    let (gw, port, id) = f.provisioned_device("c2d").await;

    let mut device = TestClient::connect_ok(mqtt_client::options(&id, port)).await;
    device
        .subscribe(&format!("fleetgw/{id}/commands/#"), QoS::AtLeastOnce)
        .await;
    // The first message opens the device's hub link, which subscribes to its C2D topic.
    device
        .publish(
            &format!("fleetgw/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            b"{\"seq\":0}",
        )
        .await;
    let api = f.api();
    eventually_async("the telemetry at the hub", FLEET_LIMIT, || async {
        let (_, m) = http(api, "GET", "/messages", None).await;
        (m.as_array().map_or(0, Vec::len) == 1).then_some(())
    })
    .await;
    let path = format!("/devices/{id}/messages?valve=close");
    let c2d = eventually_async(
        "the C2D message to reach a subscribed link",
        FLEET_LIMIT,
        || {
            let path = path.clone();
            async move {
                let (status, body) = http(api, "POST", &path, Some("reboot")).await;
                (status == 200 && body["connected"] == true).then_some(body)
            }
        },
    )
    .await;
    let cmd = device
        .next_publish()
        .await
        .unwrap_or_else(|| panic!("no command at the device after {c2d}"));
    let prefix = format!("fleetgw/{id}/commands/");
    assert!(cmd.topic.starts_with(&prefix), "{}", cmd.topic);
    assert!(cmd.topic.contains("valve=close"), "{}", cmd.topic);
    assert_eq!(&cmd.payload[..], b"reboot");
    gw.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_id_scope_fails_the_devices_with_dps_error_and_the_daemon_stays_up() {
    let f = Fixture::start(Duration::from_millis(100)).await;
    let port = free_port();
    for (n, transport, endpoint) in [
        (1, "mqtt", f.emu.endpoints().dps_mqtt),
        (2, "https", f.emu.endpoints().dps_https),
    ] {
        let sets = vec![
            "cloud.azure.id_scope=\"0ne00B0GU5\"".to_string(),
            format!("cloud.azure.transport=\"{transport}\""),
            format!("cloud.azure.dps_endpoint=\"{endpoint}\""),
        ];
        let gw = f.gateway(port, &sets, &[], n).await;
        let mut opts = fleet(port, &format!("scope{n}"), 1, 0);
        opts.timeout = Duration::from_secs(30);
        let report = run(opts).await;
        assert_eq!(report.provisioned, 0, "{transport}: {report:?}");
        let text = report.failures[0].reason.to_string();
        assert!(
            text.contains("404001") || text.contains("401002"),
            "{transport}: {text}\n{}",
            gw.log_tail()
        );
        gw.assert_running();
        gw.kill9();
    }
    assert!(f.registrations().await.is_empty());
}

/// MQTT 5 properties travel from the device to IoT Hub: user properties, content type,
/// correlation data and the UTF-8 payload marker arrive as the message's properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_properties_of_device_telemetry_reach_the_hub() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let f = Fixture::start(Duration::from_millis(100)).await;
    let (gw, port, id) = f.provisioned_device("props").await;

    let (client, mut events) = AsyncClient::new(MqttOptions::new(&id, "127.0.0.1", port), 8);
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"req-42")),
        user_properties: vec![
            ("site".into(), "north hall".into()),
            ("line".into(), "2/b".into()),
        ],
        ..PublishProperties::default()
    };
    client
        .publish_with_properties(
            format!("fleetgw/{id}/telemetry/temp"),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            b"{\"seq\":0}".to_vec(),
            props,
        )
        .await
        .unwrap();
    tokio::time::timeout(FLEET_LIMIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = events.poll().await {
                break;
            }
        }
    })
    .await
    .expect("the gateway acknowledges the message");

    let api = f.api();
    let message = eventually_async("the message at the hub", FLEET_LIMIT, || async {
        let (_, m) = http(api, "GET", "/messages", None).await;
        m.as_array().and_then(|a| a.first().cloned())
    })
    .await;
    let p = &message["properties"];
    assert_eq!(p["site"], "north hall", "{message}");
    assert_eq!(p["line"], "2/b", "{message}");
    assert_eq!(p["subtopic"], "temp", "{message}");
    assert_eq!(p["$.ct"], "application/json", "{message}");
    assert_eq!(p["$.cid"], "req-42", "{message}");
    assert_eq!(p["$.ce"], "utf-8", "{message}");
    gw.assert_running();
}

/// The admin socket still answers (the daemon serves the other devices).
async fn check_admin_alive(dir: &Path) {
    let socket = dir.join("admin.sock");
    assert!(socket.exists(), "admin socket {}", socket.display());
}
