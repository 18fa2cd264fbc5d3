//! Unit tests of the store: persistence across reopen, CAS, schema refusal, batches, outbox
//! accounting and directory modes.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use super::*;

pub(super) fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn opts() -> StoreOptions {
    StoreOptions {
        cache_capacity: 8 * 1024 * 1024,
        flush_interval_ms: None,
        ..StoreOptions::default()
    }
}

/// The sequence numbers of every message waiting in the outbox, in order.
fn waiting_seqs(store: &Store) -> Vec<u64> {
    store
        .outbox_scan(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

/// Every message waiting in the outbox as (sequence, payload), in order.
fn waiting_payloads(store: &Store) -> Vec<(u64, Vec<u8>)> {
    store
        .outbox_scan(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(s, m)| (s, m.payload))
        .collect()
}

pub(super) fn msg(device: &str, payload: &[u8]) -> OutboxMessage {
    OutboxMessage {
        device: id(device),
        topic: "t".into(),
        payload: payload.to_vec(),
        qos: 1,
        enqueued_at_ms: 1,
        properties: Vec::new(),
    }
}

#[tokio::test]
async fn reopen_after_drop_keeps_every_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let d = id("sensor-1");
    {
        let store = Store::open(&dir, &opts()).unwrap();
        let mut rec = DeviceRecord::new(d.clone(), "cbor", 10);
        rec.state = DeviceState::Registered {
            cloud_id: "thing-1".into(),
            endpoint: None,
            extras: BTreeMap::from([("k".into(), "v".into())]),
        };
        store.put_device(&rec).await.unwrap();
        store.put_secret(&d, b"sealed-key").await.unwrap();
        store
            .put_token(&OwnershipTokenRecord {
                v: TOKEN_RECORD_VERSION,
                device: d.clone(),
                certificate_id: "cert".into(),
                token: "tok".into(),
                expires_at_ms: 99,
            })
            .await
            .unwrap();
        store
            .put_record(
                RecordTree::DeviceGroups,
                "g1",
                &serde_json::json!({"filter": "x"}),
            )
            .await
            .unwrap();
        store.put_meta("gateway_id", b"gw-01").await.unwrap();
        store
            .outbox_append(&[msg("sensor-1", b"p1")])
            .await
            .unwrap();
    }
    let store = Store::open(&dir, &opts()).unwrap();
    let rec = store.device(&d).unwrap().unwrap();
    assert_eq!(rec.etag, 1);
    assert_eq!(rec.format, "cbor");
    assert_eq!(rec.state.name(), "registered");
    assert_eq!(
        store.secret(&d).unwrap().as_deref(),
        Some(&b"sealed-key"[..])
    );
    assert_eq!(store.token(&d).unwrap().unwrap().token.expose(), "tok");
    let group: serde_json::Value = store
        .record(RecordTree::DeviceGroups, "g1")
        .unwrap()
        .unwrap();
    assert_eq!(group["filter"], "x");
    assert_eq!(
        store.meta("gateway_id").unwrap().as_deref(),
        Some(&b"gw-01"[..])
    );
    assert_eq!(store.outbox_len(), 1);
    assert_eq!(store.outbox_scan(0, 10).unwrap()[0].1.payload, b"p1");
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
}

#[tokio::test]
async fn update_device_is_compare_and_swap() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), &opts()).unwrap();
    let d = id("dev-1");
    let created = store
        .update_device(&d, None, |cur| {
            assert!(cur.is_none());
            Some(DeviceRecord::new(d.clone(), "json", 1))
        })
        .await
        .unwrap();
    assert_eq!(created.etag, 1);

    let approved = store
        .update_device(&d, Some(1), |cur| {
            let mut r = cur.unwrap();
            r.state = DeviceState::Approved;
            Some(r)
        })
        .await
        .unwrap();
    assert_eq!(approved.etag, 2);

    // A writer holding the old etag loses, and the stored record is untouched.
    let err = store
        .update_device(&d, Some(1), |cur| {
            cur.map(|mut r| {
                r.state = DeviceState::Blocked;
                r
            })
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 1,
                found: Some(2),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "device dev-1: etag 1 does not match the stored etag 2"
    );
    let stored = store.device(&d).unwrap().unwrap();
    assert_eq!(stored.state, DeviceState::Approved);
    assert_eq!(stored.etag, 2);

    // An expected etag for a device that does not exist is a conflict too.
    let missing = store
        .update_device(&id("ghost"), Some(1), |_| None)
        .await
        .unwrap_err();
    assert!(
        matches!(missing, StoreError::Conflict { found: None, .. }),
        "{missing}"
    );
    let not_found = store
        .update_device(&id("ghost"), None, |_| None)
        .await
        .unwrap_err();
    assert!(
        matches!(not_found, StoreError::DeviceNotFound { .. }),
        "{not_found}"
    );
}

#[test]
fn newer_schema_is_refused_with_the_directory_named() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = Store::open(tmp.path(), &opts()).unwrap();
        // Simulate a future release having written the store.
        insert(
            &store.engine().unwrap().meta,
            META,
            SCHEMA_VERSION_KEY,
            (SCHEMA_VERSION + 1).to_be_bytes().to_vec(),
        )
        .unwrap();
        store.flush_blocking().unwrap();
    }
    let err = Store::open(tmp.path(), &opts()).unwrap_err();
    match &err {
        StoreError::NewerSchema {
            dir,
            found,
            supported,
        } => {
            assert_eq!(dir, tmp.path());
            assert_eq!(*found, SCHEMA_VERSION + 1);
            assert_eq!(*supported, SCHEMA_VERSION);
        }
        other => panic!("expected NewerSchema, got {other}"),
    }
    let text = err.to_string();
    assert!(text.contains(&tmp.path().display().to_string()), "{text}");
    assert!(
        text.contains("schema version 2") && text.contains("supports up to 1"),
        "{text}"
    );
}

#[tokio::test]
async fn schema_key_is_reserved() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), &opts()).unwrap();
    let err = store.put_meta(SCHEMA_VERSION_KEY, b"x").await.unwrap_err();
    assert!(matches!(err, StoreError::ReservedMetaKey { .. }), "{err}");
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
}

#[tokio::test]
async fn batch_is_all_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), &opts()).unwrap();
    let a = id("a");
    let b = id("b");
    store
        .put_device(&DeviceRecord::new(a.clone(), "json", 1))
        .await
        .unwrap();

    // Second op carries a stale etag: nothing of the batch may land.
    let mut bad = Batch::new();
    bad.put_device(DeviceRecord::new(b.clone(), "json", 2))
        .put_secret(&b, b"key-b")
        .put_device_if(DeviceRecord::new(a.clone(), "cbor", 2), 7);
    bad.put_record(RecordTree::Operations, "op-1", &serde_json::json!({"s": 1}))
        .unwrap();
    let err = store.apply(bad).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 7,
                found: Some(1),
                ..
            }
        ),
        "{err}"
    );
    assert!(store.device(&b).unwrap().is_none());
    assert!(store.secret(&b).unwrap().is_none());
    assert!(store
        .record::<serde_json::Value>(RecordTree::Operations, "op-1")
        .unwrap()
        .is_none());
    assert_eq!(store.device(&a).unwrap().unwrap().format, "json");

    let mut good = Batch::new();
    good.put_device(DeviceRecord::new(b.clone(), "json", 2))
        .put_secret(&b, b"key-b")
        .put_device_if(DeviceRecord::new(a.clone(), "cbor", 2), 1)
        .put_token(OwnershipTokenRecord {
            v: TOKEN_RECORD_VERSION,
            device: b.clone(),
            certificate_id: "c".into(),
            token: "t".into(),
            expires_at_ms: 5,
        });
    good.put_meta("k", b"v").unwrap();
    assert_eq!(good.len(), 5);
    store.apply(good).await.unwrap();
    assert_eq!(store.device(&b).unwrap().unwrap().etag, 1);
    assert_eq!(store.secret(&b).unwrap().as_deref(), Some(&b"key-b"[..]));
    let a_rec = store.device(&a).unwrap().unwrap();
    assert_eq!((a_rec.format.as_str(), a_rec.etag), ("cbor", 2));
    assert_eq!(store.tokens().count(), 1);

    assert!(store.remove_device(&b).await.unwrap());
    assert!(store.device(&b).unwrap().is_none());
    assert!(store.secret(&b).unwrap().is_none());
    assert!(store.token(&b).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_share_transactions_and_fail_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), &opts()).unwrap();
    let stale = id("stale");
    store
        .put_device(&DeviceRecord::new(stale.clone(), "json", 1))
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..64 {
        let store = store.clone();
        let stale = stale.clone();
        tasks.spawn(async move {
            let d = id(&format!("d{w}"));
            let mut batch = Batch::new();
            // Two writes of one device in one batch: the second etag check sees the first.
            batch
                .put_device(DeviceRecord::new(d.clone(), "json", 2))
                .put_secret(&d, d.as_str().as_bytes())
                .put_device_if(DeviceRecord::new(d.clone(), "cbor", 3), 1);
            if w % 8 == 0 {
                // A stale etag fails this batch, and only this one.
                batch.put_device_if(DeviceRecord::new(stale, "cbor", 3), 9);
            }
            (w, store.apply(batch).await)
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (w, outcome) = r.unwrap();
        let d = id(&format!("d{w}"));
        if w % 8 == 0 {
            let err = outcome.unwrap_err();
            assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
            assert!(
                store.device(&d).unwrap().is_none(),
                "batch {w} half applied"
            );
            assert!(
                store.secret(&d).unwrap().is_none(),
                "batch {w} half applied"
            );
        } else {
            outcome.unwrap();
            let rec = store.device(&d).unwrap().unwrap();
            assert_eq!((rec.format.as_str(), rec.etag), ("cbor", 2));
            assert_eq!(
                store.secret(&d).unwrap().as_deref(),
                Some(d.as_str().as_bytes())
            );
        }
    }
    assert_eq!(store.device(&stale).unwrap().unwrap().etag, 1);
    assert!(
        store.flush_count() < 64,
        "64 concurrent batches took {} flushes",
        store.flush_count()
    );
    // Everything acknowledged survives a reopen.
    drop(store);
    let store = Store::open(tmp.path(), &opts()).unwrap();
    assert_eq!(store.device_count(), 1 + 56);
}

#[tokio::test]
async fn outbox_keeps_order_and_accounts_count_and_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let msgs: Vec<_> = (0..5u8)
        .map(|i| msg("d", &vec![i; 10 + i as usize]))
        .collect();
    let expected_bytes: u64 = msgs.iter().map(|m| m.encode().len() as u64).sum();
    let seqs = {
        let store = Store::open(tmp.path(), &opts()).unwrap();
        let seqs = store.outbox_append(&msgs).await.unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert_eq!(store.outbox_len(), 5);
        assert_eq!(store.outbox_bytes(), expected_bytes);

        let all = store.outbox_scan(0, 100).unwrap();
        assert_eq!(all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), seqs);
        assert_eq!(all.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(), msgs);
        let page = store.outbox_scan(seqs[2], 2).unwrap();
        assert_eq!(
            page.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            &seqs[2..4]
        );

        assert_eq!(
            store
                .outbox_remove(&[seqs[0], seqs[3], seqs[3]])
                .await
                .unwrap(),
            2
        );
        seqs
    };
    // Counters are rebuilt from disk on open. The five messages share a chunk: the two sent
    // were marked so in memory only, and come back after the restart (duplicates, never a
    // loss) with their sequence numbers.
    let store = Store::open(tmp.path(), &opts()).unwrap();
    assert_eq!(store.outbox_len(), 5);
    assert_eq!(store.outbox_bytes(), expected_bytes);
    let all = waiting_seqs(&store);
    assert_eq!(all, seqs);
    // New sequence numbers continue after the old ones, so order survives restarts.
    let more = store.outbox_append(&[msg("d", b"x")]).await.unwrap();
    assert!(more[0] > seqs[4]);
    // Once none of a chunk's messages waits, the chunk is gone for good.
    assert_eq!(store.outbox_remove(&seqs).await.unwrap(), 5);
    assert_eq!(store.outbox_len(), 1);
    drop(store);
    let store = Store::open(tmp.path(), &opts()).unwrap();
    assert_eq!(store.outbox_len(), 1);
    let left = waiting_seqs(&store);
    assert_eq!(left, more);
}

#[tokio::test]
async fn an_intake_batch_is_a_few_chunks_not_one_entry_per_message() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), &opts()).unwrap();
    let msgs: Vec<_> = (0..600u32).map(|i| msg("d", &i.to_be_bytes())).collect();
    let seqs = store.outbox_append(&msgs).await.unwrap();
    assert_eq!(seqs.len(), 600);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let per_chunk = super::chunk::CHUNK_BYTES / msgs[0].encoded_len();
    assert!(per_chunk > 100, "{per_chunk}");
    let chunks = 600usize.div_ceil(per_chunk);
    assert_eq!(store.engine().unwrap().outbox.len(), chunks);
    // A scan may start inside a chunk and end inside another.
    let page = store.outbox_scan(seqs[250], 10).unwrap();
    let got: Vec<(u64, Vec<u8>)> = page.into_iter().map(|(s, m)| (s, m.payload)).collect();
    let want: Vec<(u64, Vec<u8>)> = (250..260u32)
        .map(|i| (seqs[i as usize], i.to_be_bytes().to_vec()))
        .collect();
    assert_eq!(got, want);
    // Sent messages are skipped by scans at once, before their chunk is gone.
    store.outbox_remove(&seqs[..300]).await.unwrap();
    assert_eq!(store.outbox_len(), 300);
    let first = store.outbox_scan(0, 1).unwrap();
    assert_eq!(first[0].0, seqs[300]);
    assert_eq!(
        store.engine().unwrap().outbox.len(),
        chunks - 300 / per_chunk,
        "the chunks with no message left are deleted"
    );
}

#[tokio::test]
async fn a_partly_sent_chunk_is_written_again_without_its_sent_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let seqs = {
        let store = Store::open(tmp.path(), &opts()).unwrap();
        store.outbox_indexed(|ix| ix.set_compact_after(std::time::Duration::ZERO));
        let msgs: Vec<_> = (0..4u8).map(|i| msg("d", &[i])).collect();
        let seqs = store.outbox_append(&msgs).await.unwrap();
        // One sent of four: not yet worth a rewrite.
        store.outbox_remove(&seqs[..1]).await.unwrap();
        // Two of four: the chunk is rewritten with the two left, durably.
        store.outbox_remove(&seqs[1..2]).await.unwrap();
        seqs
    };
    let store = Store::open(tmp.path(), &opts()).unwrap();
    let left = waiting_payloads(&store);
    assert_eq!(left, vec![(seqs[2], vec![2]), (seqs[3], vec![3])]);
    assert_eq!(store.outbox_len(), 2);
    assert_eq!(store.outbox_remove(&seqs).await.unwrap(), 2);
    assert_eq!(store.outbox_len(), 0);
}

#[tokio::test]
async fn single_message_entries_of_an_earlier_release_are_read_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let old = msg("old-dev", b"from before chunks");
    let old_seq = {
        let store = Store::open(tmp.path(), &opts()).unwrap();
        let eng = store.engine().unwrap();
        let seq = eng.db.generate_id().unwrap();
        eng.outbox.insert(seq.to_be_bytes(), old.encode()).unwrap();
        store.durable().await.unwrap();
        seq
    };
    let store = Store::open(tmp.path(), &opts()).unwrap();
    assert_eq!(store.outbox_len(), 1);
    assert_eq!(store.outbox_bytes(), old.encode().len() as u64);
    let new = store.outbox_append(&[msg("d", b"new")]).await.unwrap();
    assert!(new[0] > old_seq, "chunks sort after the earlier entries");
    let all = store.outbox_scan(0, 10).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], (old_seq, old));
    assert_eq!(all[1].0, new[0]);
    assert_eq!(store.outbox_remove(&[old_seq]).await.unwrap(), 1);
    drop(store);
    let store = Store::open(tmp.path(), &opts()).unwrap();
    let left = waiting_seqs(&store);
    assert_eq!(left, new);
}

#[tokio::test]
async fn outbox_insert_is_visible_at_once_and_durable_once_its_ticket_resolves() {
    let tmp = tempfile::tempdir().unwrap();
    let (seqs, later) = {
        let store = Store::open(tmp.path(), &opts()).unwrap();
        let flushes = store.flush_count();
        let (seqs, ticket) = store
            .outbox_insert(&[msg("d", b"a"), msg("d", b"b")])
            .unwrap();
        // Scans and removals see the messages while their flush runs.
        assert_eq!(store.outbox_len(), 2);
        let scanned: Vec<u64> = store
            .outbox_scan(0, 10)
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(scanned, seqs);
        let (later, later_ticket) = store.outbox_insert(&[msg("d", b"c")]).unwrap();
        assert!(later[0] > seqs[1]);
        store.wait_durable(ticket).await.unwrap();
        assert!(
            store.flush_count() > flushes,
            "the ticket resolved without a flush"
        );
        store.wait_durable(later_ticket).await.unwrap();
        (seqs, later)
    };
    let store = Store::open(tmp.path(), &opts()).unwrap();
    let left = waiting_payloads(&store);
    assert_eq!(
        left,
        vec![
            (seqs[0], b"a".to_vec()),
            (seqs[1], b"b".to_vec()),
            (later[0], b"c".to_vec())
        ]
    );
}

#[tokio::test]
async fn state_dir_is_created_0700_and_tightened() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("a/b/state");
    drop(Store::open(&fresh, &opts()).unwrap());
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    let loose = tmp.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(Store::open(&loose, &opts()).unwrap());
    let mode = std::fs::metadata(&loose).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[tokio::test]
async fn newer_device_record_is_reported_not_misread() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), &opts()).unwrap();
    let future = serde_json::json!({"v": 9, "id": "x", "state": "quantumEntangled"});
    insert(
        &store.engine().unwrap().devices,
        DEVICES,
        "x",
        serde_json::to_vec(&future).unwrap(),
    )
    .unwrap();
    let err = store.device(&id("x")).unwrap_err();
    assert!(
        matches!(err, StoreError::NewerRecord { found: 9, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("tree devices, key x"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_fsyncs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), &opts()).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..32 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in 0..10 {
                let d = id(&format!("w{w}-{i}"));
                store.put_secret(&d, d.as_str().as_bytes()).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(store.engine().unwrap().secrets.len(), 320);
    assert!(
        store.flush_count() < 320,
        "320 writes from 32 writers took {} flushes",
        store.flush_count()
    );
}

#[test]
fn flush_blocking_works_outside_a_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), &opts()).unwrap();
    insert(&store.engine().unwrap().meta, META, "k", b"v".to_vec()).unwrap();
    store.flush_blocking().unwrap();
    assert!(store.flush_count() >= 1);
}

/// The group-commit figure for the issue: `cargo test --lib store::tests::group_commit_figure
/// -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark; prints durable writes/s with 1 and 64 writers"]
async fn group_commit_figure() {
    // Shows the benchmark's own log line (writes, flushes, seconds).
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    for (writers, total) in [(1usize, 1_000usize), (64, 20_000)] {
        let tmp = tempfile::tempdir().unwrap();
        let rate = bench_group_commit(tmp.path(), writers, total)
            .await
            .unwrap();
        let store = Store::open(tmp.path(), &opts()).unwrap();
        assert_eq!(store.device_count(), total.div_ceil(writers) * writers);
        eprintln!("group commit: {writers:>2} writers, {total} durable writes: {rate:.0} writes/s");
    }
}
