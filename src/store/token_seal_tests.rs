//! Ownership tokens at rest: sealed in both places they are stored, bound to their device,
//! readable as before through the store, refused without the key, and clear tokens written
//! before a key was configured still read (and are sealed when written again).

use std::sync::Arc;

use super::*;
use crate::identity::Sealer;

const TOKEN: &str = "AWS-OWNERSHIP-TOKEN-eyJhbGciOi";

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn sealer() -> Arc<Sealer> {
    Arc::new(Sealer::from_key_bytes(&[7u8; 32]).unwrap())
}

fn issued(d: &str) -> DeviceRecord {
    let mut rec = DeviceRecord::new(id(d), "json", 1);
    rec.state = DeviceState::CertificateIssued {
        certificate_id: "cert-1".into(),
        certificate_pem: "-----BEGIN CERTIFICATE-----".into(),
        ownership_token: Some(OwnershipToken::new(TOKEN)),
        token_expires_at_ms: Some(99),
    };
    rec
}

fn token_record(d: &str) -> OwnershipTokenRecord {
    OwnershipTokenRecord {
        v: TOKEN_RECORD_VERSION,
        device: id(d),
        certificate_id: "cert-1".into(),
        token: OwnershipToken::new(TOKEN),
        expires_at_ms: 99,
    }
}

fn raw(tree: &sled::Tree, key: &str) -> String {
    String::from_utf8(tree.get(key).unwrap().unwrap().to_vec()).unwrap()
}

fn token_of(rec: &DeviceRecord) -> &str {
    match &rec.state {
        DeviceState::CertificateIssued {
            ownership_token, ..
        } => ownership_token.as_ref().map_or("", |t| t.expose()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn tokens_are_sealed_in_both_trees_and_read_back_in_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("s"), &StoreOptions::default()).unwrap();
    store.seal_tokens_with(sealer());
    store.put_device(&issued("dev-a")).await.unwrap();
    store.put_token(&token_record("dev-a")).await.unwrap();
    let mut batch = Batch::new();
    batch
        .put_device(issued("dev-b"))
        .put_token(token_record("dev-b"));
    store.apply(batch).await.unwrap();
    store
        .update_device(&id("dev-c"), None, |_| Some(issued("dev-c")))
        .await
        .unwrap();

    for d in ["dev-a", "dev-b"] {
        let on_disk =
            raw(&store.engine().unwrap().devices, d) + &raw(&store.engine().unwrap().tokens, d);
        assert!(!on_disk.contains(TOKEN), "{d}: token in clear: {on_disk}");
        assert!(on_disk.contains(token_seal::SEALED_PREFIX), "{on_disk}");
        assert_eq!(token_of(&store.device(&id(d)).unwrap().unwrap()), TOKEN);
        assert_eq!(store.token(&id(d)).unwrap().unwrap().token.expose(), TOKEN);
    }
    assert!(!raw(&store.engine().unwrap().devices, "dev-c").contains(TOKEN));
    let all: Vec<_> = store.tokens().collect::<Result<_, _>>().unwrap();
    assert!(all.iter().all(|t| t.token.expose() == TOKEN));
}

#[tokio::test]
async fn a_sealed_token_moved_to_another_device_or_read_without_the_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = Store::open(&dir, &StoreOptions::default()).unwrap();
    store.seal_tokens_with(sealer());
    store.put_token(&token_record("victim")).await.unwrap();
    store.put_token(&token_record("thief")).await.unwrap();
    // Swap the victim's sealed token into the thief's record (same JSON otherwise).
    let victim = raw(&store.engine().unwrap().tokens, "victim");
    let swapped = victim.replace("\"victim\"", "\"thief\"");
    store
        .engine()
        .unwrap()
        .tokens
        .insert("thief", swapped.as_bytes())
        .unwrap();
    let err = store.token(&id("thief")).unwrap_err();
    assert!(matches!(err, StoreError::Unseal { .. }), "{err}");
    assert_eq!(store.quarantined(), 0, "an unopenable token is not garbage");
    store.durable().await.unwrap();
    drop(store);

    let store = Store::open(&dir, &StoreOptions::default()).unwrap();
    let err = store.token(&id("victim")).unwrap_err();
    assert!(err.to_string().contains("no sealing key"), "{err}");
}

#[tokio::test]
async fn clear_tokens_from_before_the_key_still_read_and_are_sealed_when_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = Store::open(&dir, &StoreOptions::default()).unwrap();
    store.put_device(&issued("old")).await.unwrap();
    assert!(raw(&store.engine().unwrap().devices, "old").contains(TOKEN));
    drop(store);

    let store = Store::open(&dir, &StoreOptions::default()).unwrap();
    store.seal_tokens_with(sealer());
    let rec = store.device(&id("old")).unwrap().unwrap();
    assert_eq!(token_of(&rec), TOKEN);
    store
        .update_device(&id("old"), Some(rec.etag), |r| r)
        .await
        .unwrap();
    assert!(!raw(&store.engine().unwrap().devices, "old").contains(TOKEN));
    assert_eq!(token_of(&store.device(&id("old")).unwrap().unwrap()), TOKEN);
}

#[tokio::test]
async fn a_record_shared_with_its_batch_is_sealed_in_the_store_and_stays_clear_for_the_caller() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("s"), &StoreOptions::default()).unwrap();
    store.seal_tokens_with(sealer());
    store
        .put_device(&DeviceRecord::new(id("dev-a"), "json", 1))
        .await
        .unwrap();
    let mut next = issued("dev-a");
    next.etag = 2;
    let shared = Arc::new(next);
    let mut batch = Batch::new();
    batch.put_shared_device_if(Arc::clone(&shared), 1);
    store.apply(batch).await.unwrap();
    assert_eq!(token_of(&shared), TOKEN);
    assert!(!raw(&store.engine().unwrap().devices, "dev-a").contains(TOKEN));
    let read = store.device(&id("dev-a")).unwrap().unwrap();
    assert_eq!(read, *shared);
    // A stale etag changes nothing.
    let mut batch = Batch::new();
    batch.put_shared_device_if(Arc::clone(&shared), 1);
    assert!(matches!(
        store.apply(batch).await,
        Err(StoreError::Conflict { .. })
    ));
}
