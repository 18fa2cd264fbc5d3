//! Store integrity under faults: a failed flush is final (nothing acknowledged after it, and
//! the store says so), and sled's out-of-log blob files are fsynced before a write is
//! reported durable. The threshold tests pin down when sled 0.34 writes blobs at all.

use super::*;

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn opts() -> StoreOptions {
    StoreOptions {
        cache_capacity: 8 * 1024 * 1024,
        flush_interval_ms: None,
        ..StoreOptions::default()
    }
}

fn msg(device: &str, payload: Vec<u8>) -> OutboxMessage {
    OutboxMessage {
        device: id(device),
        topic: "t".into(),
        payload,
        qos: 1,
        enqueued_at_ms: 1,
        properties: Vec::new(),
    }
}

fn blob_files(dir: &Path) -> usize {
    fs::read_dir(dir.join("blobs")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_is_final_and_nothing_after_it_is_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let fault = tmp.path().join("fail-flush");
    let store = Store::open_failing_while(&dir, &opts(), &fault).unwrap();

    store
        .put_device(&DeviceRecord::new(id("before"), "json", 1))
        .await
        .unwrap();
    assert_eq!(store.fatal_error(), None);

    fs::write(&fault, b"").unwrap();
    let err = store
        .put_device(&DeviceRecord::new(id("during"), "json", 2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Flush { .. }),
        "a flush error, got {err}"
    );
    let fatal = store.fatal_error().expect("the store reports its failure");
    assert!(fatal.contains("injected flush failure"), "{fatal}");
    // Whoever watches the store (the daemon's main loop) is told.
    let told = tokio::time::timeout(std::time::Duration::from_secs(5), store.failed())
        .await
        .expect("failed() resolves once a flush failed");
    assert_eq!(told, fatal);

    // The fault is gone, but a later fsync proves nothing about the pages the failed one lost:
    // no write, batch or outbox append is acknowledged any more.
    fs::remove_file(&fault).unwrap();
    let after = store
        .put_device(&DeviceRecord::new(id("after"), "json", 3))
        .await
        .unwrap_err();
    assert!(
        after.to_string().contains("failed to flush earlier"),
        "{after}"
    );
    let mut batch = Batch::new();
    batch.put_secret(&id("after"), b"sealed");
    assert!(store.apply(batch).await.is_err());
    assert!(store
        .outbox_append(&[msg("after", b"x".to_vec())])
        .await
        .is_err());
    assert!(store.flush_blocking().is_err());
    // The batch was refused, not applied.
    assert_eq!(store.secret(&id("after")).unwrap(), None);
    drop(store);

    // A restart (what systemd does after the daemon exits) opens a healthy store with the
    // acknowledged write in it.
    let store = Store::open(&dir, &opts()).unwrap();
    assert_eq!(store.fatal_error(), None);
    assert!(store.device(&id("before")).unwrap().is_some());
    store
        .put_device(&DeviceRecord::new(id("later"), "json", 4))
        .await
        .unwrap();
}

/// A value above sled's threshold goes to `blobs/`, and the flush that reports it durable has
/// fsynced the blob file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_files_are_fsynced_before_the_write_is_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let store = Store::open(&dir, &opts()).unwrap();
    assert_eq!(blob_files(&dir), 0);
    let big = vec![0x5a; BLOB_THRESHOLD + 1024];
    store
        .outbox_append(&[msg("big", big.clone())])
        .await
        .unwrap();
    assert!(blob_files(&dir) >= 1, "sled wrote the value to blobs/");
    assert!(
        store.blobs_synced() >= 1,
        "the flush fsynced {} blob files",
        store.blobs_synced()
    );
    drop(store);
    let store = Store::open(&dir, &opts()).unwrap();
    let got = store.outbox_scan(0, 10).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.payload, big);
}

/// The threshold is per page (a whole node of up to 17 entries), not per value: a lone value
/// just under [`BLOB_THRESHOLD`] stays in the log, 1 KiB values never leave it, but values of
/// an eighth of it reach `blobs/` once a node of them is consolidated. So capping value sizes
/// could not keep sled from writing blobs short of a cap of a few KiB (too small for
/// telemetry); fsyncing the blobs is the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_writes_blobs_per_node_not_per_value() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str| tmp.path().join(name);

    let dir = run("lone");
    let store = Store::open(&dir, &opts()).unwrap();
    store
        .outbox_append(&[msg("lone", vec![1; BLOB_THRESHOLD - 200])])
        .await
        .unwrap();
    assert_eq!(
        blob_files(&dir),
        0,
        "a lone value under the threshold stays in the log"
    );
    drop(store);

    let dir = run("tiny");
    let store = Store::open(&dir, &opts()).unwrap();
    for _ in 0..20 {
        let msgs: Vec<_> = (0..50).map(|_| msg("tiny", vec![1; 1024])).collect();
        store.outbox_append(&msgs).await.unwrap();
    }
    assert_eq!(store.blobs_synced(), 0, "1 KiB values never make a blob");
    assert_eq!(blob_files(&dir), 0);
    drop(store);

    let dir = run("node");
    let store = Store::open(&dir, &opts()).unwrap();
    let each = BLOB_THRESHOLD / 8;
    for _ in 0..64 {
        store
            .outbox_append(&[msg("node", vec![2; each])])
            .await
            .unwrap();
    }
    assert!(
        store.blobs_synced() > 0,
        "values of {each} bytes (threshold {BLOB_THRESHOLD}) reach blobs/ once their node grows, \
         and each was fsynced"
    );
}

/// One garbage device record and one garbage outbox entry (as a bit flip or a buggy release
/// would leave them) are moved to quarantine, bytes unchanged, and never hide the good records
/// and messages around them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_values_are_quarantined_and_the_rest_proceeds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let store = Store::open(&dir, &opts()).unwrap();
    for d in ["a-good", "c-good"] {
        store
            .put_device(&DeviceRecord::new(id(d), "json", 1))
            .await
            .unwrap();
    }
    store
        .engine()
        .unwrap()
        .devices
        .insert("b-bad", &b"{not json"[..])
        .unwrap();
    // A truncated entry between two good ones, and one with a key of the wrong length.
    store
        .outbox_append(&[msg("a-good", b"1".to_vec())])
        .await
        .unwrap();
    let between = store.engine().unwrap().db.generate_id().unwrap();
    store
        .engine()
        .unwrap()
        .outbox
        .insert(between.to_be_bytes(), &[1u8, 0, 0][..])
        .unwrap();
    store
        .outbox_append(&[msg("c-good", b"2".to_vec())])
        .await
        .unwrap();
    store
        .engine()
        .unwrap()
        .outbox
        .insert(b"short", &b"x"[..])
        .unwrap();
    store.durable().await.unwrap();
    // Reopened, as the daemon finds such a store: the counters include the garbage.
    drop(store);
    let store = Store::open(&dir, &opts()).unwrap();
    assert_eq!(store.outbox_len(), 4);

    let listed: Vec<String> = store
        .devices()
        .map(|r| r.unwrap().id.as_str().to_string())
        .collect();
    assert_eq!(listed, ["a-good", "c-good"]);
    assert_eq!(store.device(&id("b-bad")).unwrap(), None);

    let page = store.outbox_scan(0, 2).unwrap();
    let payloads: Vec<&[u8]> = page.iter().map(|(_, m)| m.payload.as_slice()).collect();
    assert_eq!(
        payloads,
        [b"1".as_slice(), b"2".as_slice()],
        "a full page past the garbage"
    );
    assert_eq!(store.outbox_scan(0, 10).unwrap().len(), 2);
    assert_eq!(store.outbox_len(), 2, "the counters follow the move");

    assert_eq!(store.quarantined(), 3);
    let entries = store.quarantine_entries().unwrap();
    let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.contains(&"devices/b-bad"), "{keys:?}");
    assert!(keys.contains(&"outbox/short"), "{keys:?}");
    assert!(entries.iter().any(|(_, v)| v.as_slice() == b"{not json"));
    assert!(entries.iter().any(|(_, v)| v.as_slice() == [1u8, 0, 0]));

    // The move is durable: after a reopen the garbage is still in quarantine, not back.
    store.durable().await.unwrap();
    drop(store);
    let store = Store::open(&dir, &opts()).unwrap();
    assert_eq!(store.devices().count(), 2);
    assert_eq!(store.quarantine_entries().unwrap().len(), 3);
    assert_eq!(store.quarantined(), 0, "the metric counts moves since open");
}

/// A record written by a newer fleetgw is not garbage: it stays where it is, with its error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_records_are_never_quarantined() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("state"), &opts()).unwrap();
    let newer = format!(r#"{{"v":{},"etag":1}}"#, DEVICE_RECORD_VERSION + 1);
    store
        .engine()
        .unwrap()
        .devices
        .insert("future", newer.as_bytes())
        .unwrap();
    assert!(matches!(
        store.device(&id("future")),
        Err(StoreError::NewerRecord { .. })
    ));
    assert_eq!(store.quarantined(), 0);
    assert!(store
        .engine()
        .unwrap()
        .devices
        .get("future")
        .unwrap()
        .is_some());
}

/// Voluntary context switches of sled's I/O threads (`sled-io-N`) in this process so far.
fn sled_io_switches() -> (usize, u64) {
    let mut threads = 0;
    let mut switches = 0;
    for task in fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("sled-io-") {
            continue;
        }
        let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let n = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .map(|v| v.trim().parse::<u64>().unwrap());
        if let Some(n) = n {
            threads += 1;
            switches += n;
        }
    }
    (threads, switches)
}

/// The vendored sled (vendor/README.md) wakes one of its idle I/O threads per log write;
/// the published 0.34.7 woke all seven for each, one per flush. Each append below waits for
/// its own flush, so every one of them is a log write: with all seven woken that came to eight
/// switches per flush, with one it is about two (the woken thread's wait for the task, and
/// its wait for the disk in the write). Counts, not times, so a loaded machine does not move
/// them. sled's thread pool is shared by every store of the process, so the count runs in a
/// process of its own: this test binary again, running only this test.
#[test]
fn one_log_write_wakes_one_sled_io_thread_not_all() {
    const ALONE: &str = "FLEETGW_TEST_SLED_POOL_ALONE";
    if std::env::var_os(ALONE).is_none() {
        let name = "store::integrity_tests::one_log_write_wakes_one_sled_io_thread_not_all";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(ALONE, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("1 passed"),
            "the test ran in its own process: {text}"
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("state"), &opts()).unwrap();
        store
            .outbox_append(&[msg("warm", vec![1; 64])])
            .await
            .unwrap();
        let (threads, before) = sled_io_switches();
        assert!(
            threads >= 7,
            "sled's pool keeps seven idle threads, found {threads}"
        );
        let flushes_before = store.flush_count();
        for i in 0..200u8 {
            store
                .outbox_append(&[msg("dev", vec![i; 64])])
                .await
                .unwrap();
        }
        let flushes = store.flush_count() - flushes_before;
        let (_, after) = sled_io_switches();
        let switches = after - before;
        assert!(
            flushes >= 200,
            "each append waited for a flush of its own: {flushes}"
        );
        assert!(
            switches < 4 * flushes,
            "{switches} voluntary switches of sled's I/O threads over {flushes} flushes: the \
             pool wakes every idle thread per task again"
        );
    });
}
