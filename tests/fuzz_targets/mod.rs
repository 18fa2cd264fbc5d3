//! The fuzz targets, written once: `tests/fuzz.rs` runs them as randomized tests on every
//! `cargo test`, and `fuzz/afl` (driven by `scripts/fuzz`) runs them coverage-guided under
//! AFL++ (`cargo afl`, stable toolchain). A target returns for any input and panics only on a
//! bug (a round trip that does not hold, or a panic inside the parser).

use std::path::Path;

use bytes::BytesMut;

use fleetgw::admin::filter;
use fleetgw::cloud::codec::PayloadFormat;
use fleetgw::device_id::DeviceId;
use fleetgw::downstream::contract::ProvisionRequest;
use fleetgw::downstream::topics::{DeviceTopic, TopicPrefix};
use fleetgw::identity::{create_csr, parse_certificates, parse_csr, KeyType, PrivateKey};
use fleetgw::mqtt::wire::{read_connect, read_packet, Protocol};
use fleetgw::store::OutboxMessage;

/// Every target's name.
pub const TARGETS: &[&str] = &[
    "outbox",
    "provision-json",
    "provision-cbor",
    "device-topic",
    "device-id",
    "mqtt-connect",
    "mqtt-v4",
    "mqtt-v5",
    "filter",
    "orderby",
    "config",
    "csr",
    "certificate",
];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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

fn lines(list: &[&str]) -> Vec<Vec<u8>> {
    list.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// Valid inputs of `target` to start from; `repo` is the repository root (for the sample
/// `gateway.toml`).
pub fn seeds(target: &str, repo: &Path) -> Vec<Vec<u8>> {
    match target {
        "outbox" => {
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
            vec![msg.encode(), with_properties.encode()]
        }
        "provision-json" | "provision-cbor" => {
            let json = br#"{"attestation":{"type":"none"},"parameters":{"SerialNumber":"1"},"csr":"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----"}"#.to_vec();
            if target == "provision-json" {
                return vec![json];
            }
            let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
            let mut cbor = Vec::new();
            ciborium::into_writer(&value, &mut cbor).unwrap();
            vec![cbor]
        }
        "device-topic" | "device-id" => lines(&[
            "fleetgw/sensor-1/provision/json",
            "fleetgw/sensor-1/provision/cbor",
            "fleetgw/sensor-1/telemetry",
            "fleetgw/sensor-1/telemetry/a/b",
            "fleetgw/+/telemetry/#",
        ]),
        "mqtt-connect" => vec![connect_v4(), connect_v5()],
        "mqtt-v4" | "mqtt-v5" => vec![packets_v4()],
        "filter" | "orderby" => lines(&[
            "status eq 'provisioned' and (enabled eq true or attempts gt 3)",
            "startswith(id,'sensor-') and not (state eq 'failed')",
            "contains(displayName,'hall')",
            "updatedAt ge '2026-01-01T00:00:00Z'",
            "id desc",
            "createdAt asc",
        ]),
        "config" => vec![std::fs::read(repo.join("gateway.toml")).unwrap()],
        "csr" | "certificate" => {
            let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
            let csr = create_csr("sensor-1", &key).unwrap();
            if target == "csr" {
                return vec![csr.into_bytes()];
            }
            let cert = rcgen::generate_simple_self_signed(vec!["sensor-1".to_string()])
                .unwrap()
                .cert
                .pem();
            vec![cert.into_bytes(), csr.into_bytes()]
        }
        other => panic!("no fuzz target {other:?}; the targets: {TARGETS:?}"),
    }
}

/// Feeds `data` to `target`. The config loader reads a file: `scratch` is the path it may
/// write.
pub fn run(target: &str, data: &[u8], scratch: &Path) {
    match target {
        "outbox" => {
            if let Ok(m) = OutboxMessage::decode(data) {
                assert_eq!(OutboxMessage::decode(&m.encode()).unwrap(), m);
            }
        }
        "provision-json" => {
            let _ = ProvisionRequest::decode(PayloadFormat::Json, data);
        }
        "provision-cbor" => {
            let _ = ProvisionRequest::decode(PayloadFormat::Cbor, data);
        }
        "device-topic" => {
            let _ = DeviceTopic::parse(&TopicPrefix::default(), &text(data));
        }
        "device-id" => {
            if let Ok(id) = DeviceId::parse(&text(data)) {
                assert_eq!(DeviceId::parse(id.as_str()).unwrap(), id);
            }
        }
        "mqtt-connect" => {
            let mut buf = BytesMut::from(data);
            let _ = read_connect(&mut buf, 4096);
        }
        "mqtt-v4" | "mqtt-v5" => {
            let protocol = if target == "mqtt-v4" {
                Protocol::V4
            } else {
                Protocol::V5
            };
            let mut buf = BytesMut::from(data);
            // Decode packet after packet, as a connection does, until it needs more bytes.
            for _ in 0..64 {
                match read_packet(protocol, &mut buf, 4096) {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        "filter" => {
            let _ = filter::parse(&text(data));
        }
        "orderby" => {
            let _ = filter::parse_orderby(&text(data));
        }
        "config" => {
            std::fs::write(scratch, data).unwrap();
            let _ = fleetgw::config::load(scratch, &[]);
        }
        "csr" => {
            let _ = parse_csr(&text(data));
        }
        "certificate" => {
            let _ = parse_certificates(&text(data));
        }
        other => panic!("no fuzz target {other:?}; the targets: {TARGETS:?}"),
    }
}
