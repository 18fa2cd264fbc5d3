//! Randomized fuzzing on the stable toolchain: every parser that reads untrusted bytes gets
//! random inputs and mutations of valid seeds (bit flips, byte changes, inserts, deletions,
//! truncation, splices, repeats) and must return, never panic; round-trippable formats must
//! round-trip what they accept.
//!
//! Targets: outbox entries (the store's binary layout), provisioning requests in JSON and CBOR,
//! device topics, device ids, the embedded broker's MQTT packet decoder (CONNECT, then v4 and v5
//! packets), the admin `$filter` and `$orderby` parsers, the config loader, CSR and
//! certificate parsing.
//!
//! `FLEETGW_FUZZ_ITERATIONS` (default 5000 per target; the config loader, which writes a file
//! per case, a tenth of it) and `FLEETGW_FUZZ_SEED` (default: from the clock, printed so a
//! failure can be rerun). A failing input is printed in hex; add it to `REGRESSIONS` below.
//! The targets themselves are in `fuzz_targets/` and shared with the coverage-guided AFL++
//! harness (`fuzz/afl`, `scripts/fuzz`), which is not part of the test suite.

mod common;
#[path = "fuzz_targets/mod.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::env_or;

/// Inputs that once broke a parser (none found so far): (target, hex).
const REGRESSIONS: &[(&str, &str)] = &[];

/// The run's seed: `FLEETGW_FUZZ_SEED`, or the clock (printed once).
fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let seed = std::env::var("FLEETGW_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(common::now_ms);
        eprintln!("FUZZ seed {seed} (FLEETGW_FUZZ_SEED={seed} reruns it)");
        seed
    })
}

/// A mutation of one of `seeds` (or random bytes, one time in ten).
fn mutate(rng: &mut StdRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.random_ratio(1, 10) {
        let len = rng.random_range(0..256);
        return (0..len).map(|_| rng.random()).collect();
    }
    let mut v = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..6) {
        let len = v.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = *[0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'/', b'+', b'#']
                    .get(rng.random_range(0..9))
                    .unwrap();
            }
            2 => {
                let i = rng.random_range(0..=len);
                v.insert(i, rng.random());
            }
            3 if len > 0 => {
                v.remove(rng.random_range(0..len));
            }
            4 if len > 0 => v.truncate(rng.random_range(0..len)),
            5 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                if !other.is_empty() {
                    let from = rng.random_range(0..other.len());
                    let at = rng.random_range(0..=len);
                    let piece: Vec<u8> = other[from..].to_vec();
                    v.splice(at..at, piece);
                }
            }
            6 if len > 0 => {
                let from = rng.random_range(0..len);
                let piece = v[from..].to_vec();
                for _ in 0..rng.random_range(1..8) {
                    v.extend_from_slice(&piece);
                }
            }
            _ => {
                let i = rng.random_range(0..=len);
                v.insert(i, rng.random_range(0x20..0x7f));
            }
        }
    }
    v
}

/// Runs `target` on the regressions for `name` and `iterations` mutated inputs; panics with
/// the input in hex on the first panic.
fn fuzz(name: &str, seeds: &[Vec<u8>], iterations: u64, target: impl Fn(&[u8])) {
    let mut rng = StdRng::seed_from_u64(seed() ^ fxhash(name));
    let regressions = REGRESSIONS
        .iter()
        .filter(|(t, _)| *t == name)
        .map(|(_, h)| hex::decode(h).unwrap());
    let inputs = seeds
        .iter()
        .cloned()
        .chain(regressions)
        .chain((0..iterations).map(|_| mutate(&mut rng, seeds)));
    let mut tried = 0u64;
    for input in inputs {
        tried += 1;
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            panic!(
                "fuzz target {name} panicked on input {} ({} bytes)",
                hex::encode(&input),
                input.len()
            );
        }
    }
    eprintln!("FUZZ {name}: {tried} inputs, no panic");
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn iterations() -> u64 {
    env_or("FLEETGW_FUZZ_ITERATIONS", 5000)
}

/// Runs the shared target `name` (`fuzz_targets`) on its seeds, regressions and `iterations`
/// mutations.
fn fuzz_target(name: &str, iterations: u64) {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("gateway.toml");
    fuzz(name, &targets::seeds(name, repo), iterations, |b| {
        targets::run(name, b, &scratch)
    });
}

#[test]
fn every_target_has_seeds() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in targets::TARGETS {
        assert!(!targets::seeds(name, repo).is_empty(), "{name}");
    }
}

#[test]
fn fuzz_outbox_entries() {
    fuzz_target("outbox", iterations());
}

#[test]
fn fuzz_provision_requests_json_and_cbor() {
    fuzz_target("provision-json", iterations());
    fuzz_target("provision-cbor", iterations());
}

#[test]
fn fuzz_device_topics_and_ids() {
    fuzz_target("device-topic", iterations());
    fuzz_target("device-id", iterations());
}

#[test]
fn fuzz_broker_packet_decoder() {
    for name in ["mqtt-connect", "mqtt-v4", "mqtt-v5"] {
        fuzz_target(name, iterations());
    }
}

#[test]
fn fuzz_admin_filter_and_orderby() {
    fuzz_target("filter", iterations());
    fuzz_target("orderby", iterations());
}

#[test]
fn fuzz_config_loader() {
    fuzz_target("config", iterations() / 10);
}

#[test]
fn fuzz_csr_and_certificate_parsing() {
    fuzz_target("csr", iterations());
    fuzz_target("certificate", iterations());
}
