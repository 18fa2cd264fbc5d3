//! The device programs of the user guide (docs/src/devices.md) work as printed: the C device
//! is compiled against libmosquitto and provisions itself through a gateway running against
//! the AWS emulator, and its telemetry reaches the emulator; the Node-RED flow names the
//! device's topics. (The Python device runs in the interop suite, which has paho-mqtt:
//! tests/interop/test_docs_devices.py.)

mod docs_support;

use std::net::TcpListener;

use docs_support::{block_marked, run_bash};

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_c_device_provisions_and_sends_telemetry() {
    let source = block_marked("docs/src/devices.md", "c-device").text;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("device.c"), source).unwrap();
    let port = free_port();
    let script = format!(
        r#"
command -v cc >/dev/null || {{ echo "no C compiler (scripts/test installs gcc)" >&2; exit 1; }}
[ -f /usr/include/mosquitto.h ] || {{ echo "no libmosquitto-dev (scripts/test installs it)" >&2; exit 1; }}
cc -Wall -Werror -o device device.c -lmosquitto
fleetgw emulate aws --dir aws --mqtt 127.0.0.1:0 --api 127.0.0.1:0 &
until [ -f aws/emulator.json ]; do sleep 0.1; done
API=$(python3 -c 'import json; print(json.load(open("aws/emulator.json"))["api"])')
fleetgw run --config aws/gateway.toml --set downstream.listen=127.0.0.1:{port} &
until fleetgw status --socket aws/admin.sock >/dev/null 2>&1; do sleep 0.2; done
./device c-dev-1 127.0.0.1 {port}
python3 -c 'import json; a = json.load(open("answer.json")); assert a["thingName"] == "c-dev-1" and "BEGIN CERTIFICATE" in a["certificatePem"] and "PRIVATE KEY" in a["privateKey"], a'
until curl -s "$API/messages" | grep -q dt/c-dev-1/telemetry; do sleep 0.2; done
curl -s "$API/things" | grep -q '"c-dev-1"'
echo ok
"#
    );
    let out = run_bash(&script, dir.path(), 120);
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("provisioned; answer in answer.json"));
}

#[test]
fn the_node_red_flow_uses_the_device_contract() {
    let flow = docs_support::blocks(std::path::Path::new("docs/src/devices.md"))
        .into_iter()
        .find(|b| b.lang == "json" && b.text.contains("mqtt-broker"))
        .expect("the Node-RED flow");
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&flow.text).unwrap();
    let find = |kind: &str| {
        nodes
            .iter()
            .find(|n| n["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} node"))
    };
    let id = find("mqtt-broker")["clientid"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(fleetgw::device_id::DeviceId::parse(&id).is_ok(), "{id}");
    assert_eq!(
        find("mqtt out")["topic"],
        format!("fleetgw/{id}/provision/json")
    );
    assert_eq!(
        find("mqtt in")["topic"],
        format!("fleetgw/{id}/provision/json/+")
    );
    let request: serde_json::Value =
        serde_json::from_str(find("inject")["payload"].as_str().unwrap()).unwrap();
    assert_eq!(request["attestation"]["type"], "none");
}
