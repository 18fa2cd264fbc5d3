//! The admin API and CLI against a real `fleetgw run` (approve mode) and the AWS emulator:
//! a real MQTT device waits for approval, the operator finds it with `fleetgw devices list`,
//! approves it with `fleetgw devices approve`, and the device receives its certificate.
//! Also the CLI's exit codes when the daemon is absent or the command line is wrong.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

#[path = "common/admin.rs"]
mod admin_common;
mod common;

use common::free_port;
use common::process::{EmulatorProcess, Fleetgw};
use common::wait::{eventually, Lazy};

fn cli(socket: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fleetgw"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

async fn cli_async(socket: &Path, args: &[&str]) -> Output {
    let socket = socket.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&socket, &args)
    })
    .await
    .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_approves_a_waiting_device_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start(&dir.path().join("emu"), dir.path().join("emu.log"), |l| {
        l.env("RUST_LOG", "info,rumqttc=warn")
    })
    .await;
    let port = free_port();
    let socket = dir.path().join("run/admin.sock");
    let proc = Fleetgw::run(&emu.gateway_config(), dir.path().join("gw.log"))
        .env("RUST_LOG", "info,rumqttc=warn")
        .sets([
            "admission.mode=\"approve\"".to_string(),
            format!("downstream.listen=\"127.0.0.1:{port}\""),
            format!(
                "gateway.state_dir=\"{}\"",
                dir.path().join("state").display()
            ),
            format!("admin.socket=\"{}\"", socket.display()),
        ])
        .spawn();
    eventually(
        Lazy(|| format!("fleetgw ready; log:\n{}", proc.log_tail())),
        Duration::from_secs(30),
        || {
            proc.assert_running();
            proc.log().contains("fleetgw ready").then_some(())
        },
    )
    .await;

    // The device asks and is told to wait.
    let mut opts = MqttOptions::new("sensor-7", "127.0.0.1", port);
    opts.set_max_packet_size(512 * 1024, 512 * 1024);
    let (client, mut ev) = AsyncClient::new(opts, 16);
    let base = "fleetgw/sensor-7/provision/json";
    for t in [
        format!("{base}/accepted"),
        "fleetgw/sensor-7/status".to_string(),
    ] {
        client.subscribe(t, QoS::AtLeastOnce).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut subacks = 0;
    let mut approved = false;
    let accepted: Value = loop {
        let Ok(polled) = tokio::time::timeout_at(deadline, ev.poll()).await else {
            panic!("no certificate after approval; log:\n{}", proc.log_tail());
        };
        match polled.unwrap() {
            Event::Incoming(Packet::SubAck(_)) => {
                subacks += 1;
                if subacks == 2 {
                    client
                        .publish(
                            base,
                            QoS::AtLeastOnce,
                            false,
                            br#"{"attestation":{"type":"none"}}"#.to_vec(),
                        )
                        .await
                        .unwrap();
                }
            }
            Event::Incoming(Packet::Publish(p)) if p.topic.ends_with("/status") => {
                let s: Value = serde_json::from_slice(&p.payload).unwrap();
                if s["status"] == "waitingApproval" && !approved {
                    approved = true;
                    // The operator lists what waits, sees where it connects from, approves.
                    let out = cli_async(
                        &socket,
                        &[
                            "devices",
                            "list",
                            "--filter",
                            "status eq 'waitingApproval'",
                            "--json",
                        ],
                    )
                    .await;
                    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
                    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
                    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
                    assert_eq!(list[0]["id"], "sensor-7");
                    assert!(list[0]["connection"]["remoteAddress"]
                        .as_str()
                        .unwrap()
                        .starts_with("127.0.0.1:"));
                    let table = cli_async(&socket, &["devices", "list"]).await;
                    assert!(String::from_utf8_lossy(&table.stdout).contains("sensor-7"));
                    let out = cli_async(&socket, &["devices", "approve", "sensor-7"]).await;
                    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
                }
            }
            Event::Incoming(Packet::Publish(p)) if p.topic.ends_with("/accepted") => {
                break serde_json::from_slice(&p.payload).unwrap();
            }
            _ => {}
        }
    };
    assert!(approved, "the certificate came only after approval");
    assert!(accepted["certificatePem"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(accepted["privateKey"].as_str().is_some());

    let out = cli_async(&socket, &["devices", "show", "sensor-7", "--json"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["provisioned"].as_bool()),
        (Some("provisioned"), Some(true))
    );
    let out = cli_async(&socket, &["status", "--json"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["devices"]["provisioned"], 1, "{v}");
    // The device was just provisioned through a claim session, so at least one is up.
    let configured = v["cloudSessions"].as_u64().expect("cloudSessions");
    let connected = v["cloudSessionsConnected"]
        .as_u64()
        .expect("cloudSessionsConnected");
    assert!(connected >= 1 && connected <= configured, "{v}");
    // Metrics of the live daemon parse as Prometheus text and count what happened.
    // The engine records the latency just after it stored `delivered`: poll briefly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let r = admin_common::unix_request(&socket, "GET", "/metrics", &[], None).await;
        let text = String::from_utf8(r.body.to_vec()).unwrap();
        if text.contains("fleetgw_provision_latency_seconds_count 1") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery latency recorded:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text");
    let value = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    for api in ["CreateCertificateFromCsr", "RegisterThing"] {
        assert_eq!(
            value(
                "fleetgw_provision_cloud_requests_total",
                &[("api", api), ("result", "ok")]
            ),
            Some(1.0),
            "{text}"
        );
    }
    assert_eq!(
        value("fleetgw_devices", &[("status", "provisioned")]),
        Some(1.0)
    );
    assert_eq!(value("fleetgw_provision_throttled_total", &[]), Some(0.0));
    assert!(
        text.contains("fleetgw_provision_latency_seconds_count 1"),
        "{text}"
    );
    assert!(value("fleetgw_broker_refused_total", &[("kind", "connect")]).is_some());

    // Unknown device: 70 with the API's message.
    let out = cli_async(&socket, &["devices", "show", "nope"]).await;
    assert_eq!(out.status.code(), Some(70));
    assert!(stderr(&out).contains("no device"), "{}", stderr(&out));

    proc.signal(libc::SIGTERM);
    assert!(proc.wait_exit(Duration::from_secs(30)).await.success());
    assert!(!socket.exists(), "the socket is removed at shutdown");
    // Daemon gone: 69 and what to do.
    let out = cli(&socket, &["status"]);
    assert_eq!(out.status.code(), Some(69));
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));
}

#[test]
fn usage_errors_exit_64() {
    let out = cli(Path::new("/nonexistent.sock"), &["devices", "frobnicate"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let out = cli(Path::new("/nonexistent.sock"), &["devices", "show"]);
    assert_eq!(out.status.code(), Some(64));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetgw"))
        .args(["devices", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

/// Connects `id` over TLS to `port` presenting `cert`/`key`; `Ok` on CONNACK 0, else the
/// refusal.
async fn tls_connect(
    port: u16,
    server_ca: &str,
    id: &str,
    cert: &str,
    key_pem: &str,
) -> Result<(), String> {
    let key = fleetgw::identity::PrivateKey::from_pem(key_pem).unwrap();
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(
            fleetgw::identity::tls::client_config(server_ca, Some((cert, &key))).unwrap(),
        ),
    ));
    let (client, mut ev) = AsyncClient::new(o, 4);
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .expect("CONNACK or refusal within 10 s");
    let _ = client.disconnect().await;
    r
}

/// As [`tls_connect`], and while connected, the device as `fleetgw devices show` sees it.
async fn tls_connect_and_show(
    port: u16,
    server_ca: &str,
    id: &str,
    cert: &str,
    key_pem: &str,
    socket: &Path,
) -> Value {
    let key = fleetgw::identity::PrivateKey::from_pem(key_pem).unwrap();
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(
            fleetgw::identity::tls::client_config(server_ca, Some((cert, &key))).unwrap(),
        ),
    ));
    let (client, mut ev) = AsyncClient::new(o, 4);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = ev.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .expect("CONNACK within 10 s");
    let out = cli_async(socket, &["devices", "show", id, "--json"]).await;
    let _ = client.disconnect().await;
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Reprovisioning through the CLI: the operation ends with a new certificate, the local TLS
/// listener accepts the new one and refuses the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprovision_gives_a_new_certificate_and_the_old_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start(&dir.path().join("emu"), dir.path().join("emu.log"), |l| {
        l.env("RUST_LOG", "info,rumqttc=warn")
    })
    .await;
    let server_ca = fleetgw::identity::CertificateAuthority::generate("gateway TLS CA").unwrap();
    let (server_cert, server_key) = server_ca
        .issue_server("127.0.0.1", &[], &["127.0.0.1".parse().unwrap()], 1)
        .unwrap();
    std::fs::write(dir.path().join("tls.crt"), &server_cert).unwrap();
    // Key files must be private (the daemon refuses others with exit 78).
    fleetgw::identity::write_file_atomic(
        &dir.path().join("tls.key"),
        server_key.to_pkcs8_pem().expose(),
        0o600,
    )
    .unwrap();
    let (port, tls_port) = (free_port(), free_port());
    let socket = dir.path().join("admin.sock");
    let proc = Fleetgw::run(&emu.gateway_config(), dir.path().join("gw.log"))
        .env("RUST_LOG", "info,rumqttc=warn")
        .sets([
            "admission.mode=\"open\"".to_string(),
            "downstream.auth=\"device\"".to_string(),
            format!("downstream.listen=\"127.0.0.1:{port}\""),
            format!("downstream.tls_listen=\"127.0.0.1:{tls_port}\""),
            format!(
                "downstream.tls_cert=\"{}\"",
                dir.path().join("tls.crt").display()
            ),
            format!(
                "downstream.tls_key=\"{}\"",
                dir.path().join("tls.key").display()
            ),
            format!(
                "gateway.state_dir=\"{}\"",
                dir.path().join("state").display()
            ),
            format!("admin.socket=\"{}\"", socket.display()),
        ])
        .spawn();
    eventually(
        Lazy(|| format!("fleetgw ready; log:\n{}", proc.log_tail())),
        Duration::from_secs(30),
        || {
            proc.assert_running();
            proc.log().contains("fleetgw ready").then_some(())
        },
    )
    .await;

    // Provision over plain MQTT from this host (open mode: no approval needed).
    let mut opts = MqttOptions::new("meter-1", "127.0.0.1", port);
    opts.set_max_packet_size(512 * 1024, 512 * 1024);
    let (client, mut ev) = AsyncClient::new(opts, 16);
    let base = "fleetgw/meter-1/provision/json";
    client
        .subscribe(format!("{base}/accepted"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let first: Value = loop {
        let Ok(polled) = tokio::time::timeout_at(deadline, ev.poll()).await else {
            panic!("not provisioned; log:\n{}", proc.log_tail());
        };
        match polled.unwrap() {
            Event::Incoming(Packet::SubAck(_)) => {
                client
                    .publish(
                        base,
                        QoS::AtLeastOnce,
                        false,
                        br#"{"attestation":{"type":"none"}}"#.to_vec(),
                    )
                    .await
                    .unwrap();
            }
            Event::Incoming(Packet::Publish(p)) => {
                break serde_json::from_slice(&p.payload).unwrap()
            }
            _ => {}
        }
    };
    let _ = client.disconnect().await;
    let (old_cert, old_key) = (
        first["certificatePem"].as_str().unwrap().to_string(),
        first["privateKey"].as_str().unwrap().to_string(),
    );
    let ca = server_ca.cert_pem().to_string();
    tls_connect(tls_port, &ca, "meter-1", &old_cert, &old_key)
        .await
        .expect("the issued certificate proves the device");

    let out = cli_async(
        &socket,
        &["devices", "reprovision", "meter-1", "--wait", "--json"],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stderr(&out),
        proc.log_tail()
    );
    let op: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(op["status"], "Succeeded", "{op}");
    assert_eq!(op["previousCertificateId"], first["certificateId"]);
    assert_ne!(op["certificateId"], first["certificateId"]);
    let out = cli_async(
        &socket,
        &["ops", "show", op["id"].as_str().unwrap(), "--json"],
    )
    .await;
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["status"],
        "Succeeded"
    );

    // The old certificate is refused by the local TLS listener; the new one is accepted.
    let refused = tls_connect(tls_port, &ca, "meter-1", &old_cert, &old_key).await;
    assert!(refused.is_err(), "the old certificate still connects");
    let out = cli_async(
        &socket,
        &[
            "devices",
            "export",
            "meter-1",
            "--out",
            dir.path().to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let new_cert = std::fs::read_to_string(dir.path().join("meter-1.crt")).unwrap();
    let new_key = std::fs::read_to_string(dir.path().join("meter-1.key")).unwrap();
    assert_ne!(new_cert, old_cert);
    assert_ne!(new_key, old_key, "the gateway made a new key too");
    let shown = tls_connect_and_show(tls_port, &ca, "meter-1", &new_cert, &new_key, &socket).await;
    let fingerprint =
        &fleetgw::identity::parse_certificates(&new_cert).unwrap()[0].fingerprint_sha256_hex;
    let c = &shown["connection"];
    assert_eq!(
        c["clientCertificateSha256"].as_str(),
        Some(fingerprint.as_str()),
        "{shown}"
    );
    assert_eq!(
        (c["tls"].as_bool(), c["authenticated"].as_bool()),
        (Some(true), Some(true))
    );

    // Unknown operation: 70 with a message.
    let out = cli_async(&socket, &["ops", "show", "nope"]).await;
    assert_eq!(out.status.code(), Some(70));
    proc.signal(libc::SIGTERM);
    assert!(proc.wait_exit(Duration::from_secs(30)).await.success());
}
