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
//! This is not coverage-guided: `cargo fuzz` (libFuzzer) needs a nightly toolchain, and only
//! stable is installed where this was written.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::env_or;
use fleetgw::admin::filter;
use fleetgw::cloud::codec::PayloadFormat;
use fleetgw::device_id::DeviceId;
use fleetgw::downstream::contract::ProvisionRequest;
use fleetgw::downstream::topics::{DeviceTopic, TopicPrefix};
use fleetgw::identity::{create_csr, parse_certificates, parse_csr, KeyType, PrivateKey};
use fleetgw::mqtt::wire::{read_connect, read_packet, Protocol};
use fleetgw::store::OutboxMessage;

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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn fuzz_outbox_entries() {
    let msg = OutboxMessage {
        device: DeviceId::parse("sensor-1").unwrap(),
        topic: "fleetgw/sensor-1/telemetry".into(),
        payload: b"{\"t\":21.5}".to_vec(),
        qos: 1,
        enqueued_at_ms: 1_700_000_000_000,
        properties: Vec::new(),
    };
    // Both layouts: without properties (1) and with them (2).
    let with_properties = OutboxMessage {
        properties: vec![
            ("$.ct".into(), "application/json".into()),
            ("site".into(), "north".into()),
        ],
        ..msg.clone()
    };
    let seeds = [msg.encode(), with_properties.encode()];
    fuzz("outbox", &seeds, iterations(), |b| {
        if let Ok(m) = OutboxMessage::decode(b) {
            assert_eq!(OutboxMessage::decode(&m.encode()).unwrap(), m);
        }
    });
}

#[test]
fn fuzz_provision_requests_json_and_cbor() {
    let json = br#"{"attestation":{"type":"none"},"parameters":{"SerialNumber":"1"},"csr":"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----"}"#.to_vec();
    let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let mut cbor = Vec::new();
    ciborium::into_writer(&value, &mut cbor).unwrap();
    fuzz("provision-json", &[json], iterations(), |b| {
        let _ = ProvisionRequest::decode(PayloadFormat::Json, b);
    });
    fuzz("provision-cbor", &[cbor], iterations(), |b| {
        let _ = ProvisionRequest::decode(PayloadFormat::Cbor, b);
    });
}

#[test]
fn fuzz_device_topics_and_ids() {
    let prefix = TopicPrefix::default();
    let seeds: Vec<Vec<u8>> = [
        "fleetgw/sensor-1/provision/json",
        "fleetgw/sensor-1/provision/cbor",
        "fleetgw/sensor-1/telemetry",
        "fleetgw/sensor-1/telemetry/a/b",
        "fleetgw/+/telemetry/#",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("device-topic", &seeds, iterations(), |b| {
        let _ = DeviceTopic::parse(&prefix, &text(b));
    });
    fuzz("device-id", &seeds, iterations(), |b| {
        if let Ok(id) = DeviceId::parse(&text(b)) {
            assert_eq!(DeviceId::parse(id.as_str()).unwrap(), id);
        }
    });
}

/// MQTT 3.1.1 CONNECT (client id `abc`, clean session, keep-alive 60).
fn connect_v4() -> Vec<u8> {
    let mut v = vec![0x10, 15, 0, 4];
    v.extend_from_slice(b"MQTT");
    v.extend_from_slice(&[4, 0x02, 0, 60, 0, 3]);
    v.extend_from_slice(b"abc");
    v
}

/// MQTT 5 CONNECT (no properties).
fn connect_v5() -> Vec<u8> {
    let mut v = vec![0x10, 16, 0, 4];
    v.extend_from_slice(b"MQTT");
    v.extend_from_slice(&[5, 0x02, 0, 60, 0, 0, 3]);
    v.extend_from_slice(b"abc");
    v
}

/// QoS 1 PUBLISH to `a/b` with packet id 1 (v4), then a PINGREQ, SUBSCRIBE and DISCONNECT.
fn packets_v4() -> Vec<u8> {
    let mut v = vec![0x32, 10, 0, 3];
    v.extend_from_slice(b"a/b");
    v.extend_from_slice(&[0, 1]);
    v.extend_from_slice(b"hi!");
    v.extend_from_slice(&[0xc0, 0]);
    v.extend_from_slice(&[0x82, 8, 0, 2, 0, 3]);
    v.extend_from_slice(b"a/#");
    v.push(1);
    v.extend_from_slice(&[0xe0, 0]);
    v
}

#[test]
fn fuzz_broker_packet_decoder() {
    fuzz(
        "mqtt-connect",
        &[connect_v4(), connect_v5()],
        iterations(),
        |b| {
            let mut buf = BytesMut::from(b);
            let _ = read_connect(&mut buf, 4096);
        },
    );
    for (name, protocol) in [("mqtt-v4", Protocol::V4), ("mqtt-v5", Protocol::V5)] {
        fuzz(name, &[packets_v4()], iterations(), |b| {
            let mut buf = BytesMut::from(b);
            // Decode packet after packet, as a connection does, until it needs more bytes.
            for _ in 0..64 {
                match read_packet(protocol, &mut buf, 4096) {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        });
    }
}

#[test]
fn fuzz_admin_filter_and_orderby() {
    let seeds: Vec<Vec<u8>> = [
        "status eq 'provisioned' and (enabled eq true or attempts gt 3)",
        "startswith(id,'sensor-') and not (state eq 'failed')",
        "contains(displayName,'hall')",
        "updatedAt ge '2026-01-01T00:00:00Z'",
        "id desc",
        "createdAt asc",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("filter", &seeds, iterations(), |b| {
        let _ = filter::parse(&text(b));
    });
    fuzz("orderby", &seeds, iterations(), |b| {
        let _ = filter::parse_orderby(&text(b));
    });
}

#[test]
fn fuzz_config_loader() {
    let sample = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    fuzz("config", &[sample], iterations() / 10, |b| {
        std::fs::write(&path, b).unwrap();
        let _ = fleetgw::config::load(&path, &[]);
    });
}

#[test]
fn fuzz_csr_and_certificate_parsing() {
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = create_csr("sensor-1", &key).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["sensor-1".to_string()])
        .unwrap()
        .cert
        .pem();
    fuzz("csr", &[csr.clone().into_bytes()], iterations(), |b| {
        let _ = parse_csr(&text(b));
    });
    fuzz(
        "certificate",
        &[cert.into_bytes(), csr.into_bytes()],
        iterations(),
        |b| {
            let _ = parse_certificates(&text(b));
        },
    );
}
