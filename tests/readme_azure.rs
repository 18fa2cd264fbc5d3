//! The user guide's Azure sessions run as written: each block after its marker is executed by
//! bash with the built `fleetgw` first on PATH and `DIR` a temp dir.
//! - docs/src/emulators.md, `doc-test: azure-session`: the seed 000 curl commands against the
//!   emulator's HTTPS endpoints must register device-01 over X.509 and land its telemetry in
//!   the inspection API;
//! - docs/src/azure-setup.md, `doc-test: azure-gateway-session`: the daemon against the
//!   emulator must register ten simulated devices in DPS, with their telemetry checked at the
//!   hub.

use std::path::Path;
use std::process::Command;

#[test]
fn the_guide_azure_session_runs() {
    let stdout = run_block("docs/src/emulators.md", "<!-- doc-test: azure-session");
    for expected in [
        "HTTP/1.1 202 Accepted",
        "\"status\":\"assigning\"",
        "HTTP/1.1 200 OK",
        "\"status\":\"assigned\"",
        "\"substatus\":\"initialAssignment\"",
        "HTTP/1.1 204 No Content",
        "\"attestation\":\"x509\"",
        "\"transport\":\"https\"",
        "eyJ0ZW1wZXJhdHVyZSI6IDMwfQ==",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected} missing from:\n{stdout}"
        );
    }
}

#[test]
fn the_guide_azure_gateway_session_runs() {
    let stdout = run_block(
        "docs/src/azure-setup.md",
        "<!-- doc-test: azure-gateway-session",
    );
    for expected in [
        "\"attestation\":\"symmetricKey\"",
        "\"status\":\"assigned\"",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected} missing from:\n{stdout}"
        );
    }
    assert_eq!(
        stdout.matches("\"registrationId\"").count(),
        10,
        "one registration per device:\n{stdout}"
    );
}

/// Runs the `sh` block after `marker` in `chapter` (set -euo pipefail, bounded by `timeout`);
/// returns its output once it succeeded.
fn run_block(chapter: &str, marker: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(chapter);
    let guide = std::fs::read_to_string(&path).expect(chapter);
    let at = guide
        .find(marker)
        .unwrap_or_else(|| panic!("{chapter} has no block marked {marker:?}"));
    let block = &guide[at..];
    let start = block.find("```sh\n").expect("a sh block after the marker") + "```sh\n".len();
    let end = block[start..].find("\n```").expect("the block ends") + start;
    // A step that fails stops the script before its `kill`: the trap stops what it started.
    let script = format!(
        "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{}",
        &block[start..end]
    );
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_fleetgw"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("timeout")
        .args(["-k", "5", "120", "bash", "-euo", "pipefail", "-c", &script])
        .env("PATH", path)
        .env("DIR", dir.path().join("azure"))
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the session failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout.into_owned()
}
