//! The bad-input corpus (`tests/corpus/`) against a running daemon: every provisioning case of
//! `provision.toml` is published by its device and must be answered on `/rejected` with its
//! documented `errorCode`; every hostile admin request of `admin.toml` must get its status and
//! error body; every broken config in `config/` must be refused by `fleetgw check-config` with
//! exit 78 and a message naming what `# expect:` says (the key, or the file). After each case
//! the daemon must still run, and at the end a good device still provisions. Prints
//! `CORPUS tried=N passed=N` per part. Add a case by adding a table or a file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rumqttc::QoS;
use serde::Deserialize;
use serde_json::Value;

use common::device::{connect_retrying, provision};
use common::free_port;
use common::mqtt_client::ClientEvent;
use common::process::{EmulatorProcess, Fleetgw, FLEETGW};

const LIMIT: Duration = Duration::from_secs(60);

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

#[derive(Deserialize)]
struct Cases<T> {
    case: Vec<T>,
}

#[derive(Deserialize)]
struct ProvisionCase {
    name: String,
    id: String,
    format: String,
    payload: Option<String>,
    payload_hex: Option<String>,
    fill: Option<String>,
    count: Option<usize>,
    csr: Option<String>,
    expect: String,
}

impl ProvisionCase {
    fn bytes(&self) -> Vec<u8> {
        if let Some(p) = &self.payload {
            return p.as_bytes().to_vec();
        }
        if let Some(h) = &self.payload_hex {
            return hex::decode(h).unwrap_or_else(|e| panic!("{}: payload_hex: {e}", self.name));
        }
        if let (Some(f), Some(n)) = (&self.fill, self.count) {
            return f.as_bytes().repeat(n);
        }
        if let Some(csr) = &self.csr {
            let pem = std::fs::read_to_string(corpus().join("csr").join(csr)).unwrap();
            return serde_json::json!({"attestation": {"type": "none"}, "csr": pem})
                .to_string()
                .into_bytes();
        }
        panic!("{}: no payload", self.name)
    }
}

#[derive(Deserialize)]
struct AdminCase {
    name: String,
    method: String,
    path: String,
    body: Option<String>,
    content_type: Option<String>,
    fill: Option<String>,
    count: Option<usize>,
    status: u16,
    code: Option<String>,
}

fn load<T: serde::de::DeserializeOwned>(file: &str) -> Vec<T> {
    let text = std::fs::read_to_string(corpus().join(file)).unwrap();
    toml::from_str::<Cases<T>>(&text)
        .unwrap_or_else(|e| panic!("tests/corpus/{file}: {e}"))
        .case
}

/// Publishes `payload` as device `id` and returns the `/rejected` answer (panics on
/// `/accepted` or silence).
async fn rejected(port: u16, id: &str, format: &str, payload: Vec<u8>) -> Value {
    let topic = format!("fleetgw/{id}/provision/{format}");
    let mut dev = connect_retrying(id, port, LIMIT).await;
    dev.subscribe(&format!("{topic}/+"), QoS::AtLeastOnce).await;
    dev.client
        .publish(&topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    let ev = dev
        .next_matching_within(LIMIT, |e| {
            matches!(e, ClientEvent::Publish(_) | ClientEvent::Closed(_))
        })
        .await;
    let Some(ClientEvent::Publish(p)) = ev else {
        panic!("{topic}: no answer: {ev:?}");
    };
    assert!(
        p.topic.ends_with("/rejected"),
        "{topic}: answered on {}",
        p.topic
    );
    let fmt = if format == "cbor" {
        fleetgw::cloud::codec::PayloadFormat::Cbor
    } else {
        fleetgw::cloud::codec::PayloadFormat::Json
    };
    fleetgw::cloud::codec::decode(fmt, &p.payload).unwrap()
}

/// One HTTP/1.1 request on the admin socket, written by hand: the server may answer (413) and
/// close before a hostile body is fully written, which an HTTP client library reports as a
/// broken pipe instead of the answer. Returns the status and the JSON body.
async fn raw_request(
    socket: &Path,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let body = body.unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    if !body.is_empty() {
        req.push_str(&format!(
            "content-type: {content_type}\r\ncontent-length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(&body);
    // A write cut short by the server's answer is fine: the answer is what is checked.
    let _ = stream.write_all(&bytes).await;
    let mut answer = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut answer))
        .await
        .expect("the admin API answers")
        .ok();
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line in {text:?}"));
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let json = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // size line, data, ..., 0
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        rest.to_string()
    };
    (status, serde_json::from_str(&json).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_corpus_case_gets_its_documented_error_and_the_daemon_stays_up() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = EmulatorProcess::start_in(tmp.path()).await;
    let socket = tmp.path().join("admin.sock");
    let port = free_port();
    let daemon = Fleetgw::run(&emu.gateway_config(), tmp.path().join("gw.log"))
        .embedded_open(&tmp.path().join("state"), &socket, port)
        .sets(["provision.allowed_csr_key_types=[\"ecdsa-p256\"]"])
        .spawn();
    // Up and provisioning before the corpus starts.
    provision(port, "corpus-before", LIMIT).await;

    let mut failures = Vec::new();
    let cases: Vec<ProvisionCase> = load("provision.toml");
    let (mut tried, mut passed) = (0, 0);
    for case in &cases {
        tried += 1;
        let r = rejected(port, &case.id, &case.format, case.bytes()).await;
        let code = r["errorCode"].as_str().unwrap_or_default();
        let status = r["statusCode"].as_u64().unwrap_or_default();
        let message = r["errorMessage"].as_str().unwrap_or_default();
        if code == case.expect && status >= 400 && !message.is_empty() {
            passed += 1;
        } else {
            failures.push(format!(
                "provision {}: expected {}, got {r}",
                case.name, case.expect
            ));
        }
        daemon.assert_running();
    }
    eprintln!("CORPUS provision tried={tried} passed={passed}");

    let cases: Vec<AdminCase> = load("admin.toml");
    let (mut tried, mut passed) = (0, 0);
    for case in &cases {
        tried += 1;
        let mut path = case.path.clone();
        let mut body = case.body.clone().map(String::into_bytes);
        if let (Some(f), Some(n)) = (&case.fill, case.count) {
            let filler = f.repeat(n);
            if case.method == "GET" {
                path.push_str(&filler);
            } else {
                body = Some(filler.into_bytes());
            }
        }
        let ct = case.content_type.as_deref().unwrap_or("application/json");
        let (status, v) = raw_request(&socket, &case.method, &path, ct, body).await;
        let ok_status = status == case.status;
        let ok_code = match &case.code {
            Some(code) => v["error"]["code"].as_str() == Some(code.as_str()),
            None => v["error"]["code"].as_str().is_some_and(|c| !c.is_empty()),
        };
        if ok_status && ok_code {
            passed += 1;
        } else {
            failures.push(format!(
                "admin {}: expected {} {:?}, got {} {v}",
                case.name, case.status, case.code, status
            ));
        }
        daemon.assert_running();
    }
    eprintln!("CORPUS admin tried={tried} passed={passed}");

    let mut configs: Vec<PathBuf> = std::fs::read_dir(corpus().join("config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    configs.sort();
    let (mut tried, mut passed) = (0, 0);
    for file in &configs {
        tried += 1;
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no # expect: line", file.display()))
            .trim()
            .to_string();
        let out = Command::new(FLEETGW)
            .args(["check-config", "--config"])
            .arg(file)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        if out.status.code() == Some(78) && said.contains(&expect) {
            passed += 1;
        } else {
            failures.push(format!(
                "config {}: expected exit 78 naming {expect}, got {} {said}",
                file.display(),
                out.status
            ));
        }
    }
    eprintln!("CORPUS config tried={tried} passed={passed}");

    // Still serving: a good device provisions after all of it.
    provision(port, "corpus-after", LIMIT).await;
    daemon.assert_running();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
