//! Ownership tokens at rest, against the real daemon: with a sealing key configured, the
//! daemon stopped right after it stored `certificateIssued` (the `test-hooks` crash point)
//! leaves no token in clear in the state directory (neither the `tokens` record nor the copy in
//! the device record), and the restarted daemon opens the sealed token and completes
//! RegisterThing with it.
#![cfg(feature = "test-hooks")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::Value;

use common::device::provision;
use common::free_port;
use common::process::{EmulatorProcess, Fleetgw};

const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_tokens_are_sealed_on_disk_and_opened_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start_in(tmp.path()).await;
    let key = tmp.path().join("sealing.key");
    std::fs::write(&key, "cd".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let state = tmp.path().join("state");
    let port = free_port();
    let socket = tmp.path().join("admin.sock");
    let sealing = format!("provision.sealing_key_file=\"{}\"", key.display());
    let daemon = Fleetgw::run(&emu.gateway_config(), tmp.path().join("gw.log"))
        .env("FLEETGW_TEST_CRASH_AFTER", "certificateIssued")
        .embedded_open(&state, &socket, port)
        .sets([sealing.as_str()])
        .spawn();
    let id = "sensor-sealed";
    let device = tokio::spawn(provision(port, id, LIMIT));
    let status = daemon.wait_exit(LIMIT).await;
    assert_eq!(status.code(), Some(86), "{}", daemon.log_tail());

    {
        let db = sled::open(&state).unwrap();
        let read = |tree: &str| -> Value {
            let raw = db.open_tree(tree).unwrap().get(id).unwrap().unwrap();
            serde_json::from_slice(&raw).unwrap()
        };
        let token = read("tokens");
        let record = read("devices");
        assert_eq!(record["state"], "certificateIssued", "{record}");
        for (what, t) in [
            ("tokens record", &token["token"]),
            ("device record", &record["ownership_token"]),
        ] {
            let t = t
                .as_str()
                .unwrap_or_else(|| panic!("{what}: {token} {record}"));
            assert!(t.starts_with("sealed:"), "{what}: token in clear: {t}");
        }
    }

    // Restarted without the crash point: the token opens and RegisterThing completes.
    let daemon = Fleetgw::run(&emu.gateway_config(), tmp.path().join("gw2.log"))
        .embedded_open(&state, &socket, port)
        .sets([sealing.as_str()])
        .spawn();
    let thing = tokio::time::timeout(LIMIT, device)
        .await
        .expect("provisioned after the restart")
        .unwrap();
    assert_eq!(thing, id);
    daemon.assert_running();
}
