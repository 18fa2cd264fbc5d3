//! Store faults against the real daemon (`fleetgw run` built with `test-hooks`, the AWS IoT
//! emulator as the cloud, devices on the embedded broker).
//!
//! A failed fsync must never be followed by acknowledgements of the data it covered
//! ("fsyncgate"): the daemon withholds the PUBACK of the message whose flush failed, exits 74
//! (so systemd restarts it), and after the restart the device's republished message is
//! accepted and everything acknowledged before the fault reaches the cloud. The fault comes
//! from the `FLEETGW_TEST_FAIL_FLUSH_FILE` hook: every flush fails while the named file exists.
//!
//! A stalled disk (the `FLEETGW_TEST_STALL_FLUSH_FILE` hook holds every flush back while the
//! named file exists) holds back only the PUBACKs of messages the cloud has not acknowledged.
//!
//! Undecodable values: a garbage device record and a garbage outbox entry written into the
//! state directory of a stopped daemon are moved to quarantine when the restarted daemon
//! meets them, and neither the other devices' telemetry nor the device listing stalls.
//!
//! Needs the daemon's flush fault hook, which only `--features test-hooks` builds have.
#![cfg(feature = "test-hooks")]

#[path = "common/admin.rs"]
mod admin_common;
mod common;

use std::path::Path;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::Value;

use common::device::{connect_retrying, provision};
use common::free_port;
use common::messages;
use common::process::{EmulatorProcess, Fleetgw};
use common::wait::eventually_async;

const FAIL_FLUSH_FILE_ENV: &str = "FLEETGW_TEST_FAIL_FLUSH_FILE";
const STALL_FLUSH_FILE_ENV: &str = "FLEETGW_TEST_STALL_FLUSH_FILE";
const LIMIT: Duration = Duration::from_secs(60);

/// The daemon with a flush fault hook: `hook` is its environment variable and the file it
/// watches.
fn start_daemon(emu: &EmulatorProcess, state: &Path, port: u16, hook: (&str, &Path)) -> Fleetgw {
    Fleetgw::run(&emu.gateway_config(), state.with_extension("log"))
        .env(hook.0, hook.1)
        .embedded_open(state, &state.with_extension("sock"), port)
        .sets(["log.level=\"info\""])
        .spawn()
}

/// Payloads the emulator recorded for `thing`.
async fn recorded(emu: &EmulatorProcess, thing: &str) -> Vec<String> {
    messages::recorded_payloads(emu.api, thing, LIMIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_withholds_the_ack_exits_74_and_the_restart_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start_in(tmp.path()).await;
    let state = tmp.path().join("state");
    let fault = tmp.path().join("fail-flush");
    let port = free_port();
    let daemon = start_daemon(&emu, &state, port, (FAIL_FLUSH_FILE_ENV, &fault));

    let id = "sensor-fsync";
    let thing = provision(port, id, LIMIT).await;
    let topic = format!("fleetgw/{id}/telemetry");
    let mut dev = connect_retrying(id, port, LIMIT).await;
    dev.publish(&topic, QoS::AtLeastOnce, false, br#"{"n":1}"#)
        .await;

    // The cloud goes away (a message the cloud acknowledged may be acknowledged to its device
    // before its flush ends), then the disk starts failing: the next message's flush fails.
    emu.faults(Some(r#"{"outageSeconds":600}"#)).await;
    std::fs::write(&fault, b"").unwrap();
    dev.publish_unacked(&topic, QoS::AtLeastOnce, false, br#"{"n":2}"#)
        .await;
    let status = daemon.wait_exit(LIMIT).await;
    assert_eq!(
        status.code(),
        Some(74),
        "exit status; log:\n{}",
        daemon.log_tail()
    );
    assert!(
        !dev.puback_within(Duration::from_millis(200)).await,
        "a message whose flush failed was acknowledged"
    );
    let log = daemon.log();
    assert!(log.contains("store flush failed"), "{log}");
    assert!(log.contains("injected flush failure"), "{log}");

    // The disk and the cloud are back; systemd would restart the daemon now.
    std::fs::remove_file(&fault).unwrap();
    emu.faults(None).await;
    daemon.restart();
    let mut dev = connect_retrying(id, port, LIMIT).await;
    // The device republishes what was not acknowledged; the daemon still knows it as
    // provisioned (it refuses telemetry otherwise) and acknowledges it now.
    dev.publish(&topic, QoS::AtLeastOnce, false, br#"{"n":2}"#)
        .await;
    let got = eventually_async("both messages at the emulator", LIMIT, || async {
        let got = recorded(&emu, &thing).await;
        let has = |p: &str| got.iter().any(|g| g == p);
        (has(r#"{"n":1}"#) && has(r#"{"n":2}"#)).then_some(got)
    })
    .await;
    // At least once, with a bounded number of copies. n=1: its deletion from the outbox may
    // have been covered by the failed flush, so it is sent again after the restart (2). n=2:
    // the intake hands a message to its link while its flush runs, so it may have reached the
    // cloud before the daemon exited; it may also be in the outbox after the restart (the
    // failure is injected after sled wrote it), and the device republishes it because it was
    // never acknowledged (3).
    let count = |p: &str| got.iter().filter(|g| *g == p).count();
    assert!(count(r#"{"n":1}"#) <= 2, "n=1 at most twice: {got:?}");
    assert!(count(r#"{"n":2}"#) <= 3, "n=2 at most three times: {got:?}");
    assert_eq!(
        got.len(),
        count(r#"{"n":1}"#) + count(r#"{"n":2}"#),
        "{got:?}"
    );
    daemon.assert_running();
}

/// A disk that stops answering for a while (every flush held back) does not hold a device
/// back while the cloud takes its messages: the cloud's acknowledgement is as good as a flush.
/// Without the cloud, a message that is not durable is not acknowledged until the disk answers.
/// A kill -9 afterwards loses nothing and sends again at most what the cloud had acknowledged
/// while the disk stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_holds_back_only_the_messages_the_cloud_has_not_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start_in(tmp.path()).await;
    let state = tmp.path().join("state");
    let stall = tmp.path().join("stall-flush");
    let port = free_port();
    let daemon = start_daemon(&emu, &state, port, (STALL_FLUSH_FILE_ENV, &stall));

    let id = "sensor-stall";
    let thing = provision(port, id, LIMIT).await;
    let topic = format!("fleetgw/{id}/telemetry");
    let mut dev = connect_retrying(id, port, LIMIT).await;
    dev.publish(&topic, QoS::AtLeastOnce, false, br#"{"n":1}"#)
        .await;

    // The disk stalls. The cloud takes the next message, so the device gets its PUBACK
    // though no flush can end.
    std::fs::write(&stall, b"").unwrap();
    dev.publish_unacked(&topic, QoS::AtLeastOnce, false, br#"{"n":2}"#)
        .await;
    assert!(
        dev.puback_within(LIMIT).await,
        "no PUBACK while the cloud has the message; log:\n{}",
        daemon.log_tail()
    );
    let got = recorded(&emu, &thing).await;
    assert!(got.iter().any(|g| g == r#"{"n":2}"#), "{got:?}");

    // The cloud goes away: the next message is neither durable nor in the cloud.
    emu.faults(Some(r#"{"outageSeconds":600}"#)).await;
    dev.publish_unacked(&topic, QoS::AtLeastOnce, false, br#"{"n":3}"#)
        .await;
    assert!(
        !dev.puback_within(Duration::from_millis(300)).await,
        "a message neither durable nor in the cloud was acknowledged"
    );
    // The disk answers again: it is durable now, and acknowledged.
    std::fs::remove_file(&stall).unwrap();
    dev.expect_puback("the message made durable once the disk answered")
        .await;

    // A crash, then the cloud is back: every message, in order. n=2 may come twice: the
    // remover deletes one batch at a time, so its deletion waited for n=1's, which waited for
    // the disk; written only once the disk answered, it may not be durable by the kill (the
    // documented bound: one in-flight window per connection). n=1's deletion and n=3 were.
    daemon.kill9();
    emu.faults(None).await;
    daemon.restart();
    let want = [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#];
    let got = eventually_async("every message at the emulator", LIMIT, || async {
        let got = recorded(&emu, &thing).await;
        got.iter().any(|g| g == want[2]).then_some(got)
    })
    .await;
    let count = |p: &str| got.iter().filter(|g| *g == p).count();
    assert_eq!(count(want[0]), 1, "n=1 once: {got:?}");
    assert!(count(want[1]) <= 2, "n=2 at most twice: {got:?}");
    assert_eq!(count(want[2]), 1, "n=3 once: {got:?}");
    let mut firsts = got.clone();
    firsts.dedup();
    assert_eq!(firsts, want, "in order");
    daemon.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_store_is_quarantined_and_never_stalls_the_other_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start_in(tmp.path()).await;
    let state = tmp.path().join("state");
    let socket = state.with_extension("sock");
    let unused = tmp.path().join("no-fault");
    let port = free_port();
    let daemon = start_daemon(&emu, &state, port, (FAIL_FLUSH_FILE_ENV, &unused));
    let id = "sensor-good";
    let thing = provision(port, id, LIMIT).await;
    daemon.signal(libc::SIGTERM);
    assert!(
        daemon.wait_exit(LIMIT).await.success(),
        "{}",
        daemon.log_tail()
    );

    // What a bit flip or a buggy release could leave behind.
    {
        let db = sled::open(&state).unwrap();
        db.open_tree("devices")
            .unwrap()
            .insert("sensor-bad", &b"{\"v\":1,garbage"[..])
            .unwrap();
        let seq = db.generate_id().unwrap();
        db.open_tree("outbox")
            .unwrap()
            .insert(seq.to_be_bytes(), &[1u8, 0, 0, 0][..])
            .unwrap();
        db.flush().unwrap();
    }

    daemon.restart();
    let topic = format!("fleetgw/{id}/telemetry");
    let mut dev = connect_retrying(id, port, LIMIT).await;
    dev.publish(&topic, QoS::AtLeastOnce, false, br#"{"n":1}"#)
        .await;
    eventually_async(
        "the good device's telemetry at the emulator",
        LIMIT,
        || async {
            recorded(&emu, &thing)
                .await
                .iter()
                .any(|p| p == r#"{"n":1}"#)
                .then_some(())
        },
    )
    .await;
    let r = admin_common::unix_request(&socket, "GET", "/devices", &[], None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let ids: Vec<String> = r.json()["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids, [id], "{}", r.json());
    let r = admin_common::unix_request(&socket, "GET", "/metrics", &[], None).await;
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(
        text.contains("fleetgw_store_quarantined_total 2"),
        "both values quarantined:\n{text}"
    );
    let log = daemon.log();
    assert_eq!(
        log.matches("undecodable store value moved to the quarantine tree")
            .count(),
        2,
        "{log}"
    );
    daemon.assert_running();
}

/// A small tmpfs mounted for the disk-full test; unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    /// Mounts a tmpfs of `size` at `dir`; `None` when this process may not mount (not root,
    /// or no mount permission in this container).
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallFs(dir.to_owned()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = f.sync_all();
    written
}

/// Disk full, on a 4 MiB tmpfs (root only; skipped otherwise), with the real ENOSPC: the
/// message that finds no space is not acknowledged, the daemon stays up and reports the store
/// full on `GET /health`; once space is back it resumes by itself, acknowledges the waiting
/// message without the device sending it again, and delivers everything exactly once.
/// (`tests/disk_full.rs` does the same with EFBIG from `prlimit --fsize`, for everyone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_withholds_the_ack_keeps_the_daemon_up_and_it_resumes_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(small) = SmallFs::mount(&tmp.path().join("small"), "4m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let emu = EmulatorProcess::start_in(tmp.path()).await;
    let state = small.0.join("state");
    let socket = tmp.path().join("admin.sock");
    let port = free_port();
    let daemon = Fleetgw::run(&emu.gateway_config(), tmp.path().join("gw.log"))
        .embedded_open(&state, &socket, port)
        .spawn();
    let id = "sensor-full";
    let thing = provision(port, id, LIMIT).await;
    let topic = format!("fleetgw/{id}/telemetry");
    let mut dev = connect_retrying(id, port, LIMIT).await;
    dev.publish(&topic, QoS::AtLeastOnce, false, br#"{"n":1}"#)
        .await;

    let filler = small.0.join("filler");
    fill(&filler);
    // Messages until one finds the disk full (sled's log has some room left in its segment).
    let mut sent = 1u64;
    loop {
        sent += 1;
        assert!(
            sent < 10_000,
            "the disk never filled up:\n{}",
            daemon.log_tail()
        );
        let payload = format!(r#"{{"n":{sent},"pad":"{}"}}"#, "x".repeat(4000));
        dev.publish_unacked(&topic, QoS::AtLeastOnce, false, payload.as_bytes())
            .await;
        if !dev.puback_within(Duration::from_secs(10)).await {
            break;
        }
    }
    let r = admin_common::unix_request(&socket, "GET", "/health", &[], None).await;
    assert_eq!(r.status, 200);
    let health = r.json();
    assert_eq!(health["store"]["state"], "full", "{health}");
    let error = health["store"]["error"].as_str().unwrap_or_default();
    eprintln!("DISKFULL after {sent} messages: {error}");
    assert!(error.contains("No space left on device"), "{health}");
    daemon.assert_running();

    // Space returns: the daemon resumes by itself and acknowledges the waiting message.
    std::fs::remove_file(&filler).unwrap();
    dev.expect_puback("the message that found the disk full")
        .await;
    let r = admin_common::unix_request(&socket, "GET", "/health", &[], None).await;
    assert_eq!(r.json()["store"]["state"], "ok", "{}", r.json());
    let got = eventually_async("every message at the emulator", LIMIT, || async {
        let got = recorded(&emu, &thing).await;
        (got.len() as u64 >= sent).then_some(got)
    })
    .await;
    let seen: Vec<u64> = got
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok()?["n"].as_u64())
        .collect();
    assert_eq!(
        seen,
        (1..=sent).collect::<Vec<_>>(),
        "exactly once, in order"
    );
    daemon.assert_running();
    drop(daemon);
    drop(emu);
}
