//! A full disk against the real daemon (`fleetgw run`, the AWS IoT emulator as the cloud,
//! devices on the embedded broker), with the real errno: the running daemon's file size
//! (soft) limit is lowered with `prlimit --pid` (util-linux) to the size its store has, so sled's
//! next write fails with EFBIG (SIGXFSZ is ignored by the daemon), then raised again.
//!
//! While full (and the cloud away) the daemon acknowledges nothing it has not made durable
//! (telemetry PUBACKs are withheld, a provisioning request gets `/rejected` 503), keeps
//! answering the admin API and reports `store.state = "full"`; once the limit is raised it
//! resumes by itself, every message reaches the cloud exactly once, and a restart finds
//! everything in the store.

#[path = "common/admin.rs"]
mod admin_common;
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::Value;

use common::device::{connect_retrying, provision};
use common::free_port;
use common::messages;
use common::mqtt_client::ClientEvent;
use common::process::{EmulatorProcess, Fleetgw};
use common::wait::eventually_async;

const LIMIT: Duration = Duration::from_secs(60);

fn start_daemon(emu: &EmulatorProcess, state: &Path, port: u16) -> Fleetgw {
    Fleetgw::run(&emu.gateway_config(), state.with_extension("log"))
        .sets([
            format!(
                "admin.socket=\"{}\"",
                state.with_extension("sock").display()
            ),
            "admission.mode=\"open\"".to_string(),
            format!("gateway.state_dir=\"{}\"", state.display()),
            "downstream.broker=\"embedded\"".to_string(),
            format!("downstream.listen=\"127.0.0.1:{port}\""),
            "log.level=\"info\"".to_string(),
        ])
        .spawn()
}

/// Sets the soft file size limit of `pid` (the hard one stays: raising it again would need
/// CAP_SYS_RESOURCE).
fn prlimit_fsize(pid: u32, limit: &str) {
    let out = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--fsize={limit}:"))
        .output()
        .expect("prlimit (util-linux) must be installed");
    assert!(
        out.status.success(),
        "prlimit --fsize={limit}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn admin(socket: &Path, path: &str) -> (u16, Value) {
    let r = admin_common::unix_request(socket, "GET", path, &[], None).await;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status.as_u16(), v)
}

async fn metrics(socket: &Path) -> String {
    let r = admin_common::unix_request(socket, "GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    String::from_utf8(r.body.to_vec()).unwrap()
}

/// Payloads the emulator recorded for `thing`.
async fn recorded(emu: &EmulatorProcess, thing: &str) -> Vec<String> {
    messages::recorded_payloads(emu.api, thing, LIMIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_ridden_out_without_an_ack_that_is_not_durable_and_resumes_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start_in(tmp.path()).await;
    let state = tmp.path().join("state");
    let socket = state.with_extension("sock");
    let port = free_port();
    let daemon = start_daemon(&emu, &state, port);

    let id = "sensor-full";
    let thing = provision(port, id, LIMIT).await;
    let topic = format!("fleetgw/{id}/telemetry");
    let mut dev = connect_retrying(id, port, LIMIT).await;
    dev.publish(&topic, QoS::AtLeastOnce, false, br#"{"n":0}"#)
        .await;
    let (_, health) = admin(&socket, "/health").await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["store"]["state"], "ok", "{health}");

    // The cloud is away too: a message the cloud has acknowledged may be acknowledged to its
    // device before it is durable, so only without the cloud does the disk alone decide.
    let (thing_ref, emu_ref) = (&thing, &emu);
    eventually_async("the first message at the emulator", LIMIT, || async move {
        (recorded(emu_ref, thing_ref).await.len() == 1).then_some(())
    })
    .await;
    emu.faults(Some(r#"{"outageSeconds":600}"#)).await;

    // The disk fills: no file of the daemon may grow past what sled's log has now.
    let log_len = std::fs::metadata(state.join("db")).unwrap().len();
    prlimit_fsize(daemon.pid(), &log_len.to_string());
    let sent: Vec<String> = (1..=5).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    for p in &sent {
        dev.publish_unacked(&topic, QoS::AtLeastOnce, false, p.as_bytes())
            .await;
    }
    let socket_ref = &socket;
    eventually_async("the store reported full", LIMIT, || async move {
        let (status, v) = admin(socket_ref, "/health").await;
        (status == 200 && v["store"]["state"] == "full").then_some(())
    })
    .await;
    assert!(
        !dev.puback_within(Duration::from_millis(300)).await,
        "a message was acknowledged while the disk was full"
    );

    // The admin API answers, says why, and reads still work.
    let (status, health) = admin(&socket, "/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["store"]["path"], state.display().to_string());
    assert_eq!(health["store"]["fullEpisodes"], 1, "{health}");
    let error = health["store"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("File too large"), "the real EFBIG: {health}");
    let (status, st) = admin(&socket, "/status").await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["store"]["state"], "full", "{st}");
    let (status, list) = admin(&socket, "/devices").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["value"][0]["id"], id, "{list}");
    assert!(metrics(&socket).await.contains("\nfleetgw_store_full 1\n"));
    let socket_arg = socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_fleetgw"))
            .arg("status")
            .arg("--socket")
            .arg(&socket_arg)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("store full episodes") && table.contains("File too large"),
        "fleetgw status:\n{table}"
    );

    // A new device asking to be provisioned is told to come back later, not accepted.
    let newcomer = "sensor-late";
    let mut late = connect_retrying(newcomer, port, LIMIT).await;
    late.subscribe(
        &format!("fleetgw/{newcomer}/provision/json/+"),
        QoS::AtLeastOnce,
    )
    .await;
    late.client
        .publish(
            format!("fleetgw/{newcomer}/provision/json"),
            QoS::AtLeastOnce,
            false,
            br#"{"attestation":{"type":"none"}}"#.to_vec(),
        )
        .await
        .unwrap();
    let answer = late
        .next_matching_within(LIMIT, |e| matches!(e, ClientEvent::Publish(_)))
        .await;
    let Some(ClientEvent::Publish(answer)) = answer else {
        panic!("no answer to the provisioning request: {answer:?}")
    };
    assert!(answer.topic.ends_with("/rejected"), "{}", answer.topic);
    let v: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(v["statusCode"], 503, "{v}");
    drop(late);

    // Space returns: the daemon resumes by itself and acknowledges what was waiting.
    prlimit_fsize(daemon.pid(), "unlimited");
    eventually_async("the store writable again", LIMIT, || async move {
        let (_, v) = admin(socket_ref, "/health").await;
        (v["store"]["state"] == "ok").then_some(())
    })
    .await;
    for p in &sent {
        dev.expect_puback(p).await;
    }
    // Then the cloud comes back.
    emu.faults(None).await;
    let text = metrics(&socket).await;
    assert!(text.contains("\nfleetgw_store_full 0\n"), "{text}");
    assert!(
        text.contains("\nfleetgw_store_full_episodes_total 1\n"),
        "{text}"
    );
    let late_thing = provision(port, newcomer, LIMIT).await;

    let got = eventually_async("every message at the emulator", LIMIT, || async move {
        let got = recorded(emu_ref, thing_ref).await;
        (got.len() >= 6).then_some(got)
    })
    .await;
    let mut expected = vec![r#"{"n":0}"#.to_string()];
    expected.extend(sent.iter().cloned());
    assert_eq!(got, expected, "exactly once, in order");
    let log = daemon.log();
    assert_eq!(
        log.matches("store full: no space to write").count(),
        1,
        "logged once"
    );
    assert!(
        log.contains("store writable again"),
        "{}",
        daemon.log_tail()
    );

    // A restart finds everything: both devices, an empty outbox, nothing sent twice.
    daemon.signal(libc::SIGTERM);
    assert!(
        daemon.wait_exit(LIMIT).await.success(),
        "{}",
        daemon.log_tail()
    );
    daemon.restart();
    eventually_async("the restarted admin API", LIMIT, || async move {
        std::os::unix::net::UnixStream::connect(socket_ref)
            .ok()
            .map(drop)
    })
    .await;
    let (status, list) = admin(&socket, "/devices").await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(ids, [id, newcomer], "{list}");
    let (_, st) = admin(&socket, "/status").await;
    assert_eq!(st["outboxMessages"], 0, "{st}");
    assert_eq!(st["store"]["state"], "ok", "{st}");
    assert!(!late_thing.is_empty());
    assert_eq!(recorded(&emu, &thing).await, expected);
    daemon.assert_running();
}
