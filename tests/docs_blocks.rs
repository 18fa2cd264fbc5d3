//! Everything a reader can copy from the documentation is tested or says why not: every
//! fenced block of README.md, docs/*.md and the user guide (docs/src) carries a
//! `<!-- doc-test: ... -->` marker (or is `text`: output and pictures), JSON blocks parse,
//! TOML blocks pass `fleetgw check-config`, and `run` blocks run against the emulators with
//! the built binary. The conventions are in docs/src/development.md.

mod docs_support;

use std::path::Path;
use std::process::Command;

use docs_support::{all_blocks, blocks, named_files, root, run_bash, Block};

/// Marker kinds and the test that handles each.
const KINDS: &[&str] = &[
    "run",                   // this file
    "check-config",          // this file (`check-config pending: WHY` expects a refusal)
    "file",  // this file (parsed; used by the chapter's run blocks) and tests/docs_aws.rs
    "needs", // a real cloud account: never run
    "not",   // `not run: REASON`
    "azure-session", // tests/readme_azure.rs
    "azure-gateway-session", // tests/readme_azure.rs
    "python-device", // tests/interop/test_docs_devices.py
    "c-device", // tests/docs_devices.rs
    "mosquitto-recipe", // tests/common/mosquitto.rs
];

#[test]
fn every_block_is_tested_or_marked() {
    let mut problems = Vec::new();
    let mut untested = Vec::new();
    for b in all_blocks() {
        if b.lang == "text" {
            continue;
        }
        match b.kind() {
            None => problems.push(format!(
                "{}: a ```{} block without a <!-- doc-test: ... --> marker (or make it ```text)",
                b.at(),
                b.lang
            )),
            Some(kind) if !KINDS.contains(&kind) => {
                problems.push(format!("{}: unknown doc-test marker {kind:?}", b.at()))
            }
            Some("needs") => {
                let m = b.marker.as_deref().unwrap();
                if !(m.contains("real AWS account") || m.contains("real Azure subscription")) {
                    problems.push(format!(
                        "{}: `needs` names a real AWS account or Azure subscription: {m}",
                        b.at()
                    ));
                }
            }
            Some("not") => {
                let m = b.marker.as_deref().unwrap();
                match m.strip_prefix("not run:") {
                    Some(reason) if !reason.trim().is_empty() => {
                        untested.push(format!("{}: {}", b.at(), reason.trim()))
                    }
                    _ => problems.push(format!("{}: write `not run: REASON`", b.at())),
                }
            }
            Some(_) => {}
        }
        if b.lang == "json" {
            if let Err(e) = serde_json::from_str::<serde_json::Value>(&b.text) {
                problems.push(format!("{}: JSON does not parse: {e}", b.at()));
            }
        }
        if b.kind() == Some("check-config") && b.lang != "toml" {
            problems.push(format!("{}: check-config on a ```{} block", b.at(), b.lang));
        }
    }
    // Shown with --nocapture: what a reader is told is not run, and why.
    eprintln!("blocks not run by a test:\n{}", untested.join("\n"));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `check-config` on a TOML block written as the main config of a scratch directory.
fn check_config(b: &Block) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, &b.text).unwrap();
    Command::new(docs_support::fleetgw())
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("fleetgw check-config runs")
}

#[test]
fn config_snippets_pass_check_config() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for b in all_blocks()
        .into_iter()
        .filter(|b| b.kind() == Some("check-config"))
    {
        let pending = b
            .marker
            .as_deref()
            .unwrap()
            .starts_with("check-config pending");
        let out = check_config(&b);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match (pending, out.status.success()) {
            (false, true) => checked += 1,
            (false, false) => problems.push(format!("{}: check-config refuses it: {stderr}", b.at())),
            (true, false) => {
                eprintln!("{}: pending, check-config says: {}", b.at(), stderr.trim())
            }
            (true, true) => problems.push(format!(
                "{}: check-config accepts this block now: change its marker to `doc-test: check-config`",
                b.at()
            )),
        }
    }
    assert!(checked >= 5, "only {checked} config snippets checked");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Free loopback ports for one run block: the gateway's broker, the emulator's API and its
/// MQTT listener.
struct Ports {
    broker: u16,
    api: u16,
    mqtt: u16,
}

impl Ports {
    fn free() -> Self {
        let bound: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let port = |i: usize| bound[i].local_addr().unwrap().port();
        Ports {
            broker: port(0),
            api: port(1),
            mqtt: port(2),
        }
    }
}

/// A `run` block as the test runs it: `/tmp/` is the scratch directory, `cargo run --release --`
/// the built binary, `lines=N` in the marker runs the first N lines only, and the default
/// ports the guide uses (broker 1883, emulator API 8480 and MQTT 8883) are free ports, so that
/// a broker already running on the machine (Debian's mosquitto service) does not matter.
fn script_of(b: &Block, scratch: &Path, ports: &Ports) -> String {
    let marker = b.marker.as_deref().unwrap_or_default();
    let lines: Option<usize> = marker
        .split_whitespace()
        .find_map(|w| w.strip_prefix("lines="))
        .map(|n| n.parse().expect("lines=N"));
    let text: String = match lines {
        Some(n) => b.text.lines().take(n).map(|l| format!("{l}\n")).collect(),
        None => b.text.clone(),
    };
    let Ports { broker, api, mqtt } = ports;
    text.replace("/tmp/", &format!("{}/", scratch.display()))
        .replace("cargo run --release -- ", "fleetgw ")
        .replace(
            "fleetgw emulate aws ",
            &format!("fleetgw emulate aws --mqtt 127.0.0.1:{mqtt} --api 127.0.0.1:{api} "),
        )
        .replace(
            "fleetgw run --config ",
            &format!("fleetgw run --set downstream.listen=127.0.0.1:{broker} --config "),
        )
        .replace("127.0.0.1:1883", &format!("127.0.0.1:{broker}"))
        .replace("-p 1883", &format!("-p {broker}"))
        .replace("127.0.0.1:8480", &format!("127.0.0.1:{api}"))
        .replace("-p 8883", &format!("-p {mqtt}"))
}

#[test]
fn run_blocks_run() {
    let runs: Vec<Block> = all_blocks()
        .into_iter()
        .filter(|b| b.kind() == Some("run"))
        .collect();
    assert!(runs.len() >= 8, "only {} run blocks found", runs.len());
    // One after the other, to keep the machine's load (and the time) of each bounded.
    let mut failures = Vec::new();
    for b in &runs {
        let scratch = tempfile::tempdir().unwrap();
        // The chapter's named files, and the repository's sample config, as a reader has them.
        for (name, text) in named_files(&b.file) {
            std::fs::write(scratch.path().join(name), text).unwrap();
        }
        std::fs::copy(
            root().join("gateway.toml"),
            scratch.path().join("gateway.toml"),
        )
        .unwrap();
        let script = script_of(b, scratch.path(), &Ports::free());
        let started = std::time::Instant::now();
        let out = run_bash(&script, scratch.path(), 240);
        eprintln!(
            "{}: {} in {:.1} s",
            b.at(),
            out.status,
            started.elapsed().as_secs_f64()
        );
        if !out.status.success() {
            failures.push(format!(
                "{} ({}):\n--- script\n{script}--- stdout\n{}--- stderr\n{}",
                b.at(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_aws_chapter_declares_its_files() {
    // The run block of the AWS chapter loads template.json into the emulator; the policies are
    // checked by tests/docs_aws.rs. All must stay declared as files.
    let names: Vec<String> = named_files(Path::new("docs/src/aws-setup.md"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for needed in ["template.json", "claim-policy.json", "device-policy.json"] {
        assert!(
            names.iter().any(|n| n == needed),
            "{needed} missing: {names:?}"
        );
    }
    assert!(blocks(Path::new("docs/src/aws-setup.md"))
        .iter()
        .any(|b| b.kind() == Some("run") && b.text.contains("--templates templates.json")));
}
