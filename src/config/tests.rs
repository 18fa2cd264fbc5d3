//! Loading, merging, overrides and error messages, through [`load`] as the daemon calls it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::identity::KeyType;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn load_text(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "gateway.toml", text);
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    load(&path, &overrides)
}

#[test]
fn empty_file_gives_the_documented_defaults() {
    let c = load_text("", &[]).unwrap();
    assert_eq!(c.gateway.id, "gw-01");
    assert_eq!(c.admission.mode, AdmissionMode::Approve);
    assert_eq!(c.downstream.listen, Some("127.0.0.1:1883".parse().unwrap()));
    assert_eq!(c.cloud.aws.sessions, 4);
    assert_eq!(c.cloud.aws.tps, 50);
    assert_eq!(c.provision.key_type, KeyType::EcdsaP256);
    assert_eq!(c.provision.parameters["SerialNumber"], "{id}");
    assert_eq!(c.telemetry.when_full, WhenFull::Backpressure);
    assert_eq!(c.store.cache_capacity_bytes, 64 << 20);
}

#[test]
fn overrides_parse_as_toml_then_as_string() {
    let c = load_text(
        "",
        &[
            "cloud.aws.sessions=8",
            "gateway.id=gw-7",
            "provision.allowed_csr_key_types=[\"rsa-2048\"]",
            "provision.parameters={Region=\"eu\"}",
        ],
    )
    .unwrap();
    assert_eq!(c.cloud.aws.sessions, 8);
    assert_eq!(c.gateway.id, "gw-7");
    assert_eq!(c.provision.allowed_csr_key_types, vec![KeyType::Rsa2048]);
    // A table given anywhere replaces the built-in default map (only files merge).
    assert_eq!(
        c.provision.parameters,
        BTreeMap::from([("Region".to_string(), "eu".to_string())])
    );
}

#[test]
fn override_errors_name_the_override() {
    let e = load_text("", &["cloud.aws.sessions=four"]).unwrap_err();
    assert_eq!(e.key(), Some("cloud.aws.sessions"));
    assert_eq!(
        e.to_string(),
        "--set cloud.aws.sessions: invalid type: string \"four\", expected u32"
    );
    let e = load_text("", &["no-equals-sign"]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("--set no-equals-sign: expected KEY=VALUE"),
        "{e}"
    );
    let e = load_text("", &["gateway.id.x=1"]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--set gateway.id.x: gateway.id: invalid type: map, expected a string"
    );
    let e = load_text("[gateway]\nid = \"a\"\n", &["gateway.id.x=1"]).unwrap_err();
    assert!(e.to_string().contains("gateway.id is a value"), "{e}");
}

#[test]
fn unknown_keys_get_a_hint_with_the_key_path() {
    let e = load_text("[cloud.aws]\nsesions = 4\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("cloud.aws.sesions"));
    assert!(
        e.to_string()
            .ends_with("cloud.aws.sesions: unknown key; did you mean `sessions`?"),
        "{e}"
    );
    let e = load_text("[cloud]\nsessions = 4\n", &[]).unwrap_err();
    assert!(
        e.to_string().contains("did you mean `cloud.aws.sessions`?"),
        "{e}"
    );
    let e = load_text("[log]\nzzz = 1\n", &[]).unwrap_err();
    assert!(
        e.to_string().contains("valid keys in [log]: level, format"),
        "{e}"
    );
    let e = load_text("[downstream]\nbroker = \"embeded\"\n", &[]).unwrap_err();
    assert!(e.to_string().contains("did you mean `embedded`?"), "{e}");
}

#[test]
fn hints_reach_array_elements_top_level_keys_and_overrides() {
    let e = load_text("[provision]\nallowed_csr_key_types = [\"rsa-2047\"]\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("provision.allowed_csr_key_types[0]"));
    assert!(
        e.to_string()
            .ends_with("unknown variant `rsa-2047`, expected one of `ecdsa-p256`, `ecdsa-p384`, `rsa-2048`, `rsa-3072`; did you mean `rsa-2048`?"),
        "{e}"
    );
    let e = load_text("zzz = 1\n", &[]).unwrap_err();
    assert!(
        e.to_string().ends_with(
            "zzz: unknown key; valid keys at the top level: gateway, admin, downstream, admission, provision, cloud, telemetry, store, log"
        ),
        "{e}"
    );
    let e = load_text("", &["log.zzz=1"]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--set log.zzz: unknown key; valid keys in [log]: level, format"
    );
    // A value that is not a string gets serde's message alone.
    let e = load_text("[downstream]\nbroker = 1\n", &[]).unwrap_err();
    assert!(!e.to_string().contains("did you mean"), "{e}");
}

#[test]
fn secrets_are_not_echoed_in_errors_or_output() {
    let e = load_text("[downstream]\npassword = 123456\n", &[]).unwrap_err();
    assert!(!e.to_string().contains("123456"), "{e}");
    let e = load_text(
        "[admission]\nmode = \"symmetric-key\"\ngroup_key = \"not base64!!\"\n",
        &[],
    )
    .unwrap_err();
    assert!(!e.to_string().contains("not base64!!"), "{e}");
    assert_eq!(e.key(), Some("admission.group_key"));
    let c = load_text(
        "[admission]\nmode = \"symmetric-key\"\ngroup_key = \"c2VjcmV0LWdyb3VwLWtleQ==\"\n",
        &[],
    )
    .unwrap();
    let out = c.to_redacted_toml();
    assert!(!out.contains("c2VjcmV0"), "{out}");
    assert!(out.contains("group_key = \"[redacted]\""), "{out}");
}

#[test]
fn semantic_errors_name_key_and_source() {
    let cases: [(&str, &str, &str); 18] = [
        (
            "[cloud.aws]\nmqtt_version = 4\n",
            "cloud.aws.mqtt_version",
            "must be 5 (MQTT 5) or 3 (MQTT 3.1.1), got 4",
        ),
        (
            "[cloud.aws]\nsessions = 0\n",
            "cloud.aws.sessions",
            "must be at least 1",
        ),
        (
            "[cloud.aws]\ntps = 0\n",
            "cloud.aws.tps",
            "must be at least 1",
        ),
        (
            "[downstream]\nlisten = \"localhost:1883\"\n",
            "downstream.listen",
            "not a socket address",
        ),
        (
            "[downstream]\nlisten = \"off\"\n",
            "downstream.listen",
            "needs downstream.tls_listen",
        ),
        (
            "[downstream]\nmax_topic_levels = 2000\n",
            "downstream.max_topic_levels",
            "outside 4 .. 1024",
        ),
        (
            "[downstream]\nmax_inbound_per_second = 0\n",
            "downstream.max_inbound_per_second",
            "must be at least 1",
        ),
        (
            "[downstream]\nauth = \"device\"\n",
            "downstream.auth",
            "needs downstream.tls_listen",
        ),
        (
            "[downstream]\nbroker = \"external\"\n",
            "downstream.broker",
            "needs downstream.url",
        ),
        (
            "[admission]\nmode = \"symmetric-key\"\n",
            "admission.mode",
            "needs admission.group_key",
        ),
        (
            "[admission]\nmode = \"x509\"\n",
            "admission.mode",
            "needs admission.trusted_ca",
        ),
        (
            "[downstream]\ntopic_prefix = \"a/+\"\n",
            "downstream.topic_prefix",
            "wildcard",
        ),
        ("[log]\nlevel = \"=:=\"\n", "log.level", "not a log filter"),
        (
            "[store]\nmin_commit_interval_us = 250000\n",
            "store.min_commit_interval_us",
            "more than 100000",
        ),
        (
            "[telemetry]\ngateway_inflight = 0\n",
            "telemetry.gateway_inflight",
            "between 1 and 65535",
        ),
        (
            "[admin]\nlisten = \"0.0.0.0:8470\"\ntoken_file = \"t\"\n",
            "admin.listen",
            "not a loopback address",
        ),
        (
            "[admin]\nlisten = \"192.168.1.5:8470\"\ntoken_file = \"t\"\n",
            "admin.listen",
            "not a loopback address",
        ),
        (
            "[admin]\nlisten = \"127.0.0.1:8470\"\n",
            "admin.listen",
            "needs admin.token_file",
        ),
    ];
    for (text, key, what) in cases {
        let e = load_text(text, &[]).unwrap_err();
        assert_eq!(e.key(), Some(key), "{text}: {e}");
        let s = e.to_string();
        assert!(
            s.contains("gateway.toml: ") && s.contains(what),
            "{text}: {s}"
        );
    }
}

/// `[cloud.azure]`: what Azure needs, and the AWS-only telemetry keys refused with it.
#[test]
fn azure_errors_name_key_and_source() {
    let azure =
        "[cloud]\nprovider = \"azure\"\n[cloud.azure]\nid_scope = \"0ne0\"\nca = \"ca.pem\"\n";
    let cases = [
        ("", "cloud.azure.attestation", "needs cloud.azure.group_key"),
        (
            "attestation = \"x509\"\n",
            "cloud.azure.attestation",
            "needs cloud.azure.group_ca_cert",
        ),
        (
            "group_key = \"a2V5\"\nkeep_alive_secs = 0\n",
            "cloud.azure.keep_alive_secs",
            "between 1 and 65535",
        ),
        (
            "group_key = \"a2V5\"\nsas_ttl_secs = 5\n",
            "cloud.azure.sas_ttl_secs",
            "between 60",
        ),
        (
            "group_key = \"not base64!\"\n",
            "cloud.azure.group_key",
            "not a non-empty base64",
        ),
        (
            "group_key = \"a2V5\"\nregistrations = 0\n",
            "cloud.azure.registrations",
            "at least 1",
        ),
        (
            "group_key = \"a2V5\"\n[telemetry]\nidentity = \"gateway\"\ngateway_cert = \"c\"\ngateway_key = \"k\"\n",
            "telemetry.identity",
            "IoT Hub",
        ),
        (
            "group_key = \"a2V5\"\n[telemetry]\ntopic = \"x/{deviceId}\"\n",
            "telemetry.topic",
            "AWS-only",
        ),
        (
            "group_key = \"a2V5\"\n[telemetry]\ncommands_topic = \"c/{thingName}/#\"\n",
            "telemetry.commands_topic",
            "AWS-only",
        ),
    ];
    for (rest, key, what) in cases {
        let text = format!("{azure}{rest}");
        let e = load_text(&text, &[]).unwrap_err();
        assert_eq!(e.key(), Some(key), "{text}: {e}");
        assert!(e.to_string().contains(what), "{text}: {e}");
    }
    let ok = load_text(&format!("{azure}group_key = \"a2V5\"\n"), &[]).unwrap();
    assert_eq!(ok.cloud.provider, CloudProvider::Azure);
    let without_ca =
        "[cloud]\nprovider = \"azure\"\n[cloud.azure]\nid_scope = \"0ne0\"\ngroup_key = \"a2V5\"\n";
    let e = load_text(without_ca, &[]).unwrap_err();
    assert!(e.to_string().contains("cloud.azure.ca"), "{e}");
}

#[test]
fn syntax_errors_give_line_and_column() {
    let e = load_text("[gateway]\nid = \"gw\n", &[]).unwrap_err();
    match &e {
        ConfigError::Syntax { line, .. } => assert_eq!(*line, 2, "{e}"),
        other => panic!("expected a syntax error, got {other}"),
    }
    assert!(
        e.to_string().contains("gateway.toml: line 2, column "),
        "{e}"
    );
}

#[test]
fn drop_ins_merge_in_name_order_and_errors_name_the_drop_in() {
    let tmp = tempfile::tempdir().unwrap();
    let main = write(
        tmp.path(),
        "gateway.toml",
        "[cloud.aws]\nsessions = 2\ntps = 7\n",
    );
    write(
        tmp.path(),
        "config.d/20-b.toml",
        "[cloud.aws]\nsessions = 6\n",
    );
    write(
        tmp.path(),
        "config.d/10-a.toml",
        "[cloud.aws]\nsessions = 5\n",
    );
    write(tmp.path(), "config.d/30-c.toml.dpkg-old", "garbage = [");
    let c = load(&main, &[]).unwrap();
    assert_eq!(c.cloud.aws.sessions, 6);
    assert_eq!(c.cloud.aws.tps, 7, "a drop-in must not wipe sibling keys");
    assert_eq!(c.sources().len(), 3);

    write(
        tmp.path(),
        "config.d/40-d.toml",
        "[cloud.aws]\ntps = \"fast\"\n",
    );
    let e = load(&main, &[]).unwrap_err();
    let drop_in = tmp.path().join("config.d/40-d.toml");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: cloud.aws.tps: invalid type: string \"fast\", expected u32",
            drop_in.display()
        )
    );
}

#[test]
fn relative_paths_resolve_against_the_config_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let main = write(
        tmp.path(),
        "etc/gateway.toml",
        "[gateway]\nstate_dir = \"state\"\n[cloud.aws]\nclaim_key = \"/abs/claim.key\"\n",
    );
    let c = load(&main, &[]).unwrap();
    let dir = tmp.path().join("etc");
    assert_eq!(c.gateway.state_dir, dir.join("state"));
    assert_eq!(c.cloud.aws.ca, dir.join("ca.pem"));
    assert_eq!(c.cloud.aws.claim_key, Path::new("/abs/claim.key"));
    assert_eq!(c.resolve_path(Path::new("x/y.pem")), dir.join("x/y.pem"));
}

#[test]
fn redacted_toml_parses_back_to_the_same_values() {
    let c = load_text(
        "[cloud.aws]\nsessions = 9\n[downstream]\nurl = \"mqtt://h:1\"\n",
        &[],
    )
    .unwrap();
    let again: Config = toml::from_str(&c.to_redacted_toml()).unwrap();
    assert_eq!(again.cloud.aws.sessions, 9);
    assert_eq!(again.downstream.url.as_deref(), Some("mqtt://h:1"));
    assert_eq!(again.gateway.state_dir, c.gateway.state_dir);
}

#[test]
fn gateway_client_id_defaults_to_the_gateway_id() {
    let c = load_text("[gateway]\nid = \"plant-7\"\n", &[]).unwrap();
    assert_eq!(c.gateway_upstream_client_id(), "plant-7");
    let c = load_text(
        "[gateway]\nid = \"plant-7\"\n[telemetry]\ngateway_client_id = \"gw-thing\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.gateway_upstream_client_id(), "gw-thing");
    let e = load_text("[telemetry]\nidentity = \"gateway\"\n", &[]).unwrap_err();
    assert_eq!(e.key(), Some("telemetry.identity"));
    assert!(
        e.to_string()
            .contains("needs telemetry.gateway_cert and telemetry.gateway_key"),
        "{e}"
    );
}

#[test]
fn missing_main_file_is_named() {
    let e = load(Path::new("/nonexistent/fleetgw/gateway.toml"), &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/fleetgw/gateway.toml: cannot read config file"),
        "{e}"
    );
}

#[test]
fn admin_keys_default_off_and_accept_a_loopback_listener() {
    let c = load_text("", &[]).unwrap();
    assert_eq!(c.admin.read_group, "");
    assert_eq!(c.admin.listen, None);
    assert_eq!(c.admin.token_file, None);
    let c = load_text(
        "[admin]\nread_group = \"audit\"\nlisten = \"[::1]:8470\"\ntoken_file = \"admin.token\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.admin.read_group, "audit");
    assert_eq!(c.admin.listen, Some("[::1]:8470".parse().unwrap()));
    // Relative to the config file, as every path.
    assert!(c.admin.token_file.unwrap().is_absolute());
}
