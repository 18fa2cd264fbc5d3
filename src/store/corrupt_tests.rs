//! A truncated or corrupted state directory: `Store::open` returns an error naming the
//! directory, or opens what sled's recovery kept; it never panics (the release build aborts on
//! a panic, which systemd would restart into the same panic forever).

use std::collections::BTreeMap;
use std::path::Path;

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

/// A store with a few devices, secrets and outbox messages, closed.
async fn populated(dir: &Path) {
    let store = Store::open(dir, &opts()).unwrap();
    for i in 0..50 {
        let d = id(&format!("sensor-{i}"));
        let mut rec = DeviceRecord::new(d.clone(), "cbor", 10);
        rec.state = DeviceState::Registered {
            cloud_id: format!("thing-{i}"),
            endpoint: None,
            extras: BTreeMap::new(),
        };
        store.put_device(&rec).await.unwrap();
        store.put_secret(&d, &[i as u8; 300]).await.unwrap();
    }
    store.flush_blocking().unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

type Damage = fn(&Path);

fn truncate(path: &Path, keep: fn(u64) -> u64) {
    let len = std::fs::metadata(path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(keep(len)).unwrap();
}

fn scribble(path: &Path, every: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    for i in (every / 2..bytes.len()).step_by(every) {
        bytes[i] ^= 0x5a;
    }
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_or_corrupted_store_is_an_error_naming_the_directory_never_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    populated(&good).await;
    let cases: [(&str, Damage); 8] = [
        ("conf emptied", |d| truncate(&d.join("conf"), |_| 0)),
        ("conf garbage", |d| {
            std::fs::write(d.join("conf"), b"\xff\x00garbage").unwrap()
        }),
        ("db emptied", |d| truncate(&d.join("db"), |_| 0)),
        ("db cut in half", |d| truncate(&d.join("db"), |l| l / 2)),
        ("db cut to 100 bytes", |d| truncate(&d.join("db"), |_| 100)),
        ("db scribbled every 4 KiB", |d| {
            scribble(&d.join("db"), 4096)
        }),
        ("db scribbled every 97 bytes", |d| {
            scribble(&d.join("db"), 97)
        }),
        ("db replaced by a directory", |d| {
            std::fs::remove_file(d.join("db")).unwrap();
            std::fs::create_dir(d.join("db")).unwrap();
        }),
    ];
    for (name, damage) in cases {
        let dir = tmp.path().join(name.replace(' ', "-"));
        copy_dir(&good, &dir);
        damage(&dir);
        let result = std::panic::catch_unwind(|| Store::open(&dir, &opts()));
        match result {
            Err(_) => panic!("{name}: Store::open panicked"),
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(msg.contains(&dir.display().to_string()), "{name}: {msg}");
                eprintln!("{name}: {msg}");
            }
            Ok(Ok(store)) => {
                eprintln!("{name}: opened, {} devices", store.devices().count());
            }
        }
    }
}
