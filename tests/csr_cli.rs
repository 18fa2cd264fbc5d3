//! `fleetgw csr` as an operator runs it: the real binary, real files, checked with openssl.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn fleetgw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetgw"))
        .args(args)
        .output()
        .expect("run fleetgw")
}

/// `openssl ARGS`, or `None` (with a notice) when the binary is not installed.
fn openssl(args: &[&str]) -> Option<Output> {
    match Command::new("openssl").args(args).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("NOTICE: openssl binary not found; skipping the openssl checks");
            None
        }
        Err(e) => panic!("run openssl: {e}"),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn writes_a_private_key_and_a_verifiable_csr() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out"); // does not exist yet: csr creates it
    let out = fleetgw(&[
        "csr",
        "--id",
        "sensor-1",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let key = out_dir.join("sensor-1.key");
    let csr = out_dir.join("sensor-1.csr");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout, format!("{}\n{}\n", key.display(), csr.display()));
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&csr), 0o644);
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));

    let csr_path = csr.to_str().unwrap();
    let Some(verify) = openssl(&[
        "req", "-verify", "-in", csr_path, "-noout", "-subject", "-nameopt", "RFC2253",
    ]) else {
        return;
    };
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&verify.stdout).trim(),
        "subject=CN=sensor-1"
    );
    assert!(String::from_utf8_lossy(&verify.stderr).contains("verify OK"));

    // The key on disk is the key the CSR carries.
    let from_key = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]).unwrap();
    let from_csr = openssl(&["req", "-in", csr_path, "-noout", "-pubkey"]).unwrap();
    assert!(from_key.status.success() && from_csr.status.success());
    assert_eq!(from_key.stdout, from_csr.stdout);
}

#[test]
fn key_type_option_and_id_canonicalisation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = fleetgw(&[
        "csr",
        "--id",
        "PLC-7",
        "--key-type",
        "rsa-2048",
        "--out",
        dir,
    ]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csr = tmp.path().join("plc-7.csr");
    let Some(text) = openssl(&["req", "-in", csr.to_str().unwrap(), "-noout", "-text"]) else {
        return;
    };
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("Public-Key: (2048 bit)"), "{text}");
    assert!(
        text.contains("CN = plc-7") || text.contains("CN=plc-7"),
        "{text}"
    );
}

#[test]
fn an_invalid_id_exits_64_and_names_the_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let out = fleetgw(&["csr", "--id", "bad/id", "--out", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"bad/id\""), "{stderr}");
    assert!(!dir.exists(), "nothing may be written for an invalid id");

    // Valid as a device id (<= 128) but too long for a certificate CN (<= 64).
    let long = "a".repeat(65);
    let out = fleetgw(&["csr", "--id", &long, "--out", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at most 64"), "{stderr}");
    assert!(!dir.exists());
}

#[test]
fn an_existing_key_is_not_overwritten_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    assert!(fleetgw(&["csr", "--id", "dev-1", "--out", dir])
        .status
        .success());
    let key = tmp.path().join("dev-1.key");
    let first = std::fs::read(&key).unwrap();

    let out = fleetgw(&["csr", "--id", "dev-1", "--out", dir]);
    assert_eq!(out.status.code(), Some(73));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists; pass --force"));
    assert_eq!(std::fs::read(&key).unwrap(), first);

    assert!(fleetgw(&["csr", "--id", "dev-1", "--out", dir, "--force"])
        .status
        .success());
    assert_ne!(std::fs::read(&key).unwrap(), first);
    assert_eq!(mode(&key), 0o600);
}
