//! The user guide's Azure emulator session (docs/src/emulators.md, "The Azure emulator": the
//! seed 000 curl commands against the emulator's HTTPS endpoints) runs as written: the block
//! after the `doc-test: azure-session` marker is executed by bash with the built `fleetgw` first on PATH and `DIR` a temp dir, and
//! must register device-01 over X.509 and land its telemetry in the inspection API.

use std::path::Path;
use std::process::Command;

#[test]
fn the_guide_azure_session_runs() {
    let chapter = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/src/emulators.md");
    let guide = std::fs::read_to_string(&chapter).expect("docs/src/emulators.md");
    let marker = guide
        .find("<!-- doc-test: azure-session")
        .expect("the guide marks its Azure session");
    let block = &guide[marker..];
    let start = block.find("```sh\n").expect("a sh block after the marker") + "```sh\n".len();
    let end = block[start..].find("\n```").expect("the block ends") + start;
    // A step that fails stops the script before its `kill`: the trap stops the emulator then.
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
    // `timeout` bounds the run; a failed step fails the script (set -e).
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
            "{expected} missing from:\n{stdout}\n{stderr}"
        );
    }
}
