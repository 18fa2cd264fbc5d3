//! The disk-full seam (`space.rs`, `reopen.rs`): a store that finds no space refuses writes at
//! once, serves reads, reopens sled by itself with the outbox carried over, and becomes
//! writable again once space returns. The "no space" comes from the flusher's fault hook
//! (every flush fails as sled's `pwrite` would while a file exists); the real errno path
//! (`prlimit --fsize` on the running daemon) is `tests/disk_full.rs`.

use std::time::{Duration, Instant};

use super::space::{io_no_space, sled_no_space};
use super::tests::{id, msg};
use super::*;

const LIMIT: Duration = Duration::from_secs(30);

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn payloads(store: &Store) -> Vec<Vec<u8>> {
    store
        .outbox_scan(0, 100)
        .unwrap()
        .into_iter()
        .map(|(_, m)| m.payload)
        .collect()
}

#[test]
fn no_space_is_enospc_edquot_and_efbig_also_as_sled_clones_them() {
    for code in [libc::ENOSPC, libc::EDQUOT, libc::EFBIG] {
        let e = std::io::Error::from_raw_os_error(code);
        assert!(io_no_space(&e), "{e}");
        // sled's sticky error is a clone that keeps only the kind and the text.
        let cloned = sled::Error::Io(e).clone();
        assert!(sled_no_space(&cloned), "{cloned:?}");
    }
    for code in [libc::EIO, libc::EACCES, libc::EROFS] {
        let e = std::io::Error::from_raw_os_error(code);
        assert!(!io_no_space(&e), "{e}");
        assert!(!sled_no_space(&sled::Error::Io(e).clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_writes_serves_reads_and_recovers_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let full = tmp.path().join("full");
    let store = Store::open_no_space_while(&dir, &StoreOptions::default(), &full).unwrap();
    store
        .put_device(&DeviceRecord::new(id("before"), "json", 0))
        .await
        .unwrap();
    let durable = store.outbox_append(&[msg("before", b"1")]).await.unwrap();

    // The disk fills: a message goes into the outbox (the dispatcher sees it at once), but
    // its flush finds no space.
    std::fs::write(&full, b"").unwrap();
    let (seqs, ticket) = store.outbox_insert(&[msg("before", b"2")]).unwrap();
    let e = store.wait_durable(ticket).await.unwrap_err();
    assert!(e.is_full(), "{e}");
    let health = store.health();
    assert!(health.full.is_some(), "{health:?}");
    assert_eq!(health.full_episodes, 1);
    assert!(health.full.unwrap().error.contains("No space left"));

    // Writes are refused at once; nothing is reported durable.
    let e = store
        .put_device(&DeviceRecord::new(id("during"), "json", 0))
        .await
        .unwrap_err();
    assert!(e.is_full(), "{e}");
    assert!(store.put_meta("k", b"v").await.unwrap_err().is_full());
    assert!(store
        .outbox_insert(&[msg("before", b"3")])
        .unwrap_err()
        .is_full());
    assert!(store.durable().await.unwrap_err().is_full());

    // Reads go on, and the outbox is the one the gateway knew, unflushed entry and all.
    assert!(store.device(&id("before")).unwrap().is_some());
    assert_eq!(store.devices().count(), store.device_count());
    assert_eq!(payloads(&store), [b"1".to_vec(), b"2".to_vec()]);
    // A ticket of the replaced database is never reported durable.
    assert!(store.wait_durable(ticket).await.unwrap_err().is_full());
    // The cloud took the first message meanwhile: its deletion is kept for later.
    assert_eq!(store.outbox_remove(&durable).await.unwrap(), 1);
    assert_eq!(payloads(&store), [b"2".to_vec()]);

    // Space returns: the store probes, flushes and takes writes again by itself.
    std::fs::remove_file(&full).unwrap();
    until("the recovery", || store.health().full.is_none()).await;
    let health = store.health();
    assert_eq!(health.full_episodes, 1);
    assert!(health.reopens >= 1);
    let ticket = store.write_ticket();
    store.wait_durable(ticket).await.unwrap();
    store
        .put_device(&DeviceRecord::new(id("after"), "json", 0))
        .await
        .unwrap();
    assert_eq!(store.outbox_len(), 1);
    drop(store);

    // Everything is on disk: the entry whose flush had failed, the deletion, the later write.
    let store = Store::open(&dir, &StoreOptions::default()).unwrap();
    assert_eq!(payloads(&store), [b"2".to_vec()]);
    assert_eq!(
        store.outbox_scan(0, 10).unwrap()[0].0,
        seqs[0],
        "carried under its own key"
    );
    assert!(store.device(&id("before")).unwrap().is_some());
    assert!(store.device(&id("after")).unwrap().is_some());
    assert_eq!(store.health(), StoreHealth::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_dropped_while_full_closes_and_reopens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let full = tmp.path().join("full");
    let store = Store::open_no_space_while(&dir, &StoreOptions::default(), &full).unwrap();
    store
        .put_device(&DeviceRecord::new(id("kept"), "json", 0))
        .await
        .unwrap();
    std::fs::write(&full, b"").unwrap();
    let _ = store.put_meta("k", b"v").await;
    until("full", || store.health().full.is_some()).await;
    // Dropping it stops the recovery thread and releases sled's lock.
    drop(store);
    let store = Store::open(&dir, &StoreOptions::default()).unwrap();
    assert!(store.device(&id("kept")).unwrap().is_some());
}
