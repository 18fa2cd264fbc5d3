//! The admin API and CLI against a real `fleetgw run` (approve mode) and the AWS emulator:
//! a real MQTT device waits for approval, the operator finds it with `fleetgw devices list`,
//! approves it with `fleetgw devices approve`, and the device receives its certificate.
//! Also the CLI's exit codes when the daemon is absent or the command line is wrong.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

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
