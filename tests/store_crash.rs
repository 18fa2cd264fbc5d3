//! Crash safety of the store: a child process writes concurrently and reports every write the
//! store acknowledged as durable; the parent kills it with SIGKILL at a random point, reopens the
//! store and checks that every acknowledged write is there.
//!
//! The child is this test binary itself, re-executed with `--exact crash_child --ignored` and
//! `FLEETGW_CRASH_CHILD_DIR` set, so no extra binary or example is needed.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fleetgw::device_id::DeviceId;
use fleetgw::store::{Batch, DeviceRecord, OutboxMessage, Store, StoreOptions};

const CHILD_ENV: &str = "FLEETGW_CRASH_CHILD_DIR";
const RUNS: usize = 20;
const WRITERS: usize = 32;

fn options() -> StoreOptions {
    StoreOptions {
        cache_capacity: 16 * 1024 * 1024,
        flush_interval_ms: None,
        ..StoreOptions::default()
    }
}

/// One acknowledged write, as printed by the child: `ACK <kind> <writer> <index> END`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ack {
    Device(usize, u32),
    Batch(usize, u32),
    Outbox(usize, u32),
}

impl Ack {
    fn parse(line: &str) -> Option<Ack> {
        // Only complete lines count: the kill may cut the last one short.
        let body = line.strip_prefix("ACK ")?.strip_suffix(" END\n")?;
        let mut parts = body.split(' ');
        let kind = parts.next()?;
        let w = parts.next()?.parse().ok()?;
        let i = parts.next()?.parse().ok()?;
        match kind {
            "device" => Some(Ack::Device(w, i)),
            "batch" => Some(Ack::Batch(w, i)),
            "outbox" => Some(Ack::Outbox(w, i)),
            _ => None,
        }
    }
}

fn device_id(w: usize, i: u32) -> DeviceId {
    DeviceId::parse(&format!("w{w}-{i}")).unwrap()
}

fn secret_of(w: usize, i: u32) -> Vec<u8> {
    format!("secret-{w}-{i}").into_bytes()
}

fn payload_of(w: usize, i: u32) -> Vec<u8> {
    format!("payload-{w}-{i}").into_bytes()
}

/// Child mode: write forever from many tasks, print each durable write. Does nothing when run
/// by a plain `cargo test -- --ignored` (no directory given).
#[test]
#[ignore = "child process of acknowledged_writes_survive_sigkill"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = Store::open(Path::new(&dir), &options()).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let store = store.clone();
            tasks.spawn(async move {
                for i in 0u32.. {
                    let id = device_id(w, i);
                    let mut rec = DeviceRecord::new(id.clone(), "json", u64::from(i));
                    rec.attempts = i;
                    let kind = match i % 3 {
                        0 => {
                            store.put_device(&rec).await.unwrap();
                            "device"
                        }
                        1 => {
                            let mut batch = Batch::new();
                            batch.put_device(rec).put_secret(&id, &secret_of(w, i));
                            store.apply(batch).await.unwrap();
                            "batch"
                        }
                        _ => {
                            let msg = OutboxMessage {
                                device: id,
                                topic: "t".into(),
                                payload: payload_of(w, i),
                                qos: 1,
                                enqueued_at_ms: u64::from(i),
                                properties: Vec::new(),
                            };
                            store.outbox_append(&[msg]).await.unwrap();
                            "outbox"
                        }
                    };
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {kind} {w} {i} END").unwrap();
                    out.flush().unwrap();
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    });
}

/// Runs one child, kills it after `kill_after` acknowledgements, returns every acknowledgement
/// it printed (including those printed between the decision to kill and the kill).
fn run_child(dir: &Path, kill_after: usize) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if let Some(ack) = Ack::parse(&line) {
                        if tx.send(ack).is_err() {
                            break;
                        }
                    }
                }
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut acks = Vec::new();
    while acks.len() < kill_after {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ack) => acks.push(ack),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "child stopped acknowledging after {} writes: {e:?}",
                    acks.len()
                );
            }
        }
    }
    // std's kill() is SIGKILL on Unix: no destructor, no final flush.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "child must die from the kill, got {status}"
    );
    reader.join().unwrap();
    acks.extend(rx.try_iter());
    acks
}

fn verify(dir: &Path, acks: &[Ack]) {
    let store = Store::open(dir, &options()).unwrap_or_else(|e| panic!("reopen after kill: {e}"));
    // Opening cleanly includes every stored record still decoding.
    let devices: Vec<DeviceRecord> = store
        .devices()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("device records after kill: {e}"));
    assert!(
        devices.len()
            >= acks
                .iter()
                .filter(|a| !matches!(a, Ack::Outbox(..)))
                .count()
    );
    let outbox = store
        .outbox_scan(0, usize::MAX)
        .unwrap_or_else(|e| panic!("outbox after kill: {e}"));
    assert_eq!(store.outbox_len(), outbox.len() as u64);
    let payloads: HashSet<Vec<u8>> = outbox.into_iter().map(|(_, m)| m.payload).collect();

    for ack in acks {
        match *ack {
            Ack::Device(w, i) | Ack::Batch(w, i) => {
                let id = device_id(w, i);
                let rec = store
                    .device(&id)
                    .unwrap()
                    .unwrap_or_else(|| panic!("acknowledged device {id} is missing"));
                assert_eq!(rec.attempts, i, "device {id}");
                assert_eq!(rec.created_at_ms, u64::from(i), "device {id}");
                if matches!(ack, Ack::Batch(..)) {
                    assert_eq!(
                        store.secret(&id).unwrap(),
                        Some(secret_of(w, i)),
                        "secret of batch-written device {id}"
                    );
                }
            }
            Ack::Outbox(w, i) => {
                assert!(
                    payloads.contains(&payload_of(w, i)),
                    "acknowledged outbox message {w}-{i} is missing"
                );
            }
        }
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let mut total = 0;
    for run in 0..RUNS {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        // Vary the kill point: early (during the first flushes) to well into the run.
        let kill_after = rand::random_range(1..600);
        let acks = run_child(&dir, kill_after);
        assert!(acks.len() >= kill_after);
        verify(&dir, &acks);
        eprintln!(
            "run {run}: killed after {kill_after} acks, {} verified",
            acks.len()
        );
        total += acks.len();
    }
    eprintln!("{RUNS} kill -9 runs, {total} acknowledged writes, all present after reopen");
}
