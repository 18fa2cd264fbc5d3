//! Config loading as operators meet it: the real `fleetgw check-config` binary on real files,
//! plus checks that the sample `gateway.toml` documents every key with its default.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fleetgw::config::{self, Config};

/// Exit code for configuration errors (sysexits EX_CONFIG).
const EX_CONFIG: i32 = 78;

fn sample_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml")
}

fn check_config(config: &Path, sets: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetgw"));
    cmd.arg("check-config").arg("--config").arg(config);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.env_remove("RUST_LOG").output().expect("run fleetgw")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes `text` to `dir/name` (creating parents) and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

/// Like [`write`], for a key or credential file: private (0600), as the daemon requires.
fn write_secret(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The effective config printed by a successful check-config, parsed back.
fn effective(out: &Output) -> toml::Table {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(out));
    stdout(out).parse().expect("check-config output is TOML")
}

fn get<'a>(table: &'a toml::Table, key: &str) -> &'a toml::Value {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next().unwrap()).unwrap();
    for part in parts {
        value = value.get(part).unwrap_or_else(|| panic!("{key} missing"));
    }
    value
}

/// Every leaf key path of a TOML table; maps such as `provision.parameters` count as one key.
fn leaf_keys(
    table: &toml::Table,
    prefix: &str,
    known: &BTreeSet<String>,
    out: &mut BTreeSet<String>,
) {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) if !known.contains(&path) => leaf_keys(t, &path, known, out),
            _ => {
                out.insert(path);
            }
        }
    }
}

/// The sample with its `#key = value` lines (unset optional keys) uncommented.
fn sample_with_optional_keys() -> String {
    let text = std::fs::read_to_string(sample_path()).unwrap();
    text.lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn sample_parses_and_check_config_exits_0() {
    let out = check_config(&sample_path(), &[]);
    let eff = effective(&out);
    assert_eq!(get(&eff, "admission.mode").as_str(), Some("open"));
    assert_eq!(get(&eff, "cloud.aws.sessions").as_integer(), Some(4));
    // Relative paths are shown resolved against the directory of the config file.
    let ca = PathBuf::from(get(&eff, "cloud.aws.ca").as_str().unwrap());
    assert_eq!(ca, Path::new(env!("CARGO_MANIFEST_DIR")).join("ca.pem"));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn sample_documents_every_key_with_its_default() {
    let known: BTreeSet<String> = config::known_keys().into_iter().collect();

    // Every key of the Config structs appears in the sample (optional ones commented out).
    let full: toml::Table = sample_with_optional_keys().parse().unwrap();
    let mut in_sample = BTreeSet::new();
    leaf_keys(&full, "", &known, &mut in_sample);
    let missing: Vec<_> = known.difference(&in_sample).collect();
    assert!(
        missing.is_empty(),
        "keys missing from gateway.toml: {missing:?}"
    );
    let unknown: Vec<_> = in_sample.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "gateway.toml has keys Config lacks: {unknown:?}"
    );
    // The commented-out examples have the right types too.
    let _: Config = toml::from_str(&sample_with_optional_keys()).expect("examples deserialize");

    // The serialized default config has the same keys and values as the sample, except the
    // lab setting admission.mode = "open" (the built-in default is "approve").
    let mut defaults: toml::Table = toml::to_string(&Config::default())
        .unwrap()
        .parse()
        .unwrap();
    let mut sample: toml::Table = std::fs::read_to_string(sample_path())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(get(&defaults, "admission.mode").as_str(), Some("approve"));
    assert_eq!(get(&sample, "admission.mode").as_str(), Some("open"));
    for table in [&mut sample, &mut defaults] {
        table["admission"].as_table_mut().unwrap().remove("mode");
    }
    assert_eq!(
        sample, defaults,
        "gateway.toml values differ from Config::default()"
    );
}

/// The config the packages install as /etc/fleetgw/gateway.toml: production settings
/// (approval, devices proving their id on the TLS listener), check-config passes, and apart
/// from those it is the sample (same keys and values), so the two cannot drift apart.
#[test]
fn packaged_config_is_the_sample_with_production_settings() {
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/gateway.toml");
    let eff = effective(&check_config(&packaged, &[]));
    assert_eq!(get(&eff, "admission.mode").as_str(), Some("approve"));
    assert_eq!(get(&eff, "downstream.auth").as_str(), Some("device"));
    assert_eq!(
        get(&eff, "downstream.tls_listen").as_str(),
        Some("0.0.0.0:8883")
    );
    assert_eq!(
        get(&eff, "downstream.listen").as_str(),
        Some("127.0.0.1:1883")
    );

    // The production keys aside, the packaged file is the sample: every key the sample sets
    // with the same value, and optional keys commented out as there.
    let production = [
        "admission.mode",
        "downstream.auth",
        "downstream.tls_listen",
        "downstream.tls_cert",
        "downstream.tls_key",
    ];
    let leaves = |text: &str| -> std::collections::BTreeMap<String, toml::Value> {
        fn walk(
            prefix: &str,
            table: &toml::Table,
            out: &mut std::collections::BTreeMap<String, toml::Value>,
        ) {
            for (k, v) in table {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::Table(t) => walk(&path, t, out),
                    other => {
                        out.insert(path, other.clone());
                    }
                }
            }
        }
        let mut out = std::collections::BTreeMap::new();
        walk("", &text.parse().unwrap(), &mut out);
        out.retain(|k, _| !production.contains(&k.as_str()));
        out
    };
    let ours = leaves(&std::fs::read_to_string(&packaged).unwrap());
    let sample = leaves(&std::fs::read_to_string(sample_path()).unwrap());
    assert_eq!(
        ours, sample,
        "packaging/gateway.toml differs from the sample beyond {production:?}"
    );
}

#[test]
fn wrong_type_exits_78_naming_the_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(
        tmp.path(),
        "gateway.toml",
        "[cloud.aws]\nsessions = \"four\"\n",
    );
    let out = check_config(&path, &[]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert_eq!(
        stderr(&out),
        format!(
            "{}: cloud.aws.sessions: invalid type: string \"four\", expected u32\n",
            path.display()
        )
    );
    assert!(stdout(&out).is_empty());
}

#[test]
fn unknown_key_gets_a_did_you_mean_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "gateway.toml", "[telemetry]\nmax_byte = 1024\n");
    let out = check_config(&path, &[]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert_eq!(
        stderr(&out),
        format!(
            "{}: telemetry.max_byte: unknown key; did you mean `max_bytes`?\n",
            path.display()
        )
    );
}

#[test]
fn broken_toml_names_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(
        tmp.path(),
        "gateway.toml",
        "[gateway]\nid = \"gw-01\"\n\n[cloud.aws\nsessions = 4\n",
    );
    let out = check_config(&path, &[]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("{}: line 4, column ", path.display())),
        "{err}"
    );
}

#[test]
fn unreadable_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.toml");
    let out = check_config(&missing, &[]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert!(
        stderr(&out).starts_with(&format!("{}: cannot read config file: ", missing.display())),
        "{}",
        stderr(&out)
    );

    let binary = tmp.path().join("binary.toml");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let out = check_config(&binary, &[]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert!(
        stderr(&out).starts_with(&format!("{}: cannot read config file: ", binary.display())),
        "{}",
        stderr(&out)
    );

    // A drop-in that cannot be read stops the load too (a directory named like a drop-in).
    let main = write(tmp.path(), "gateway.toml", "");
    std::fs::create_dir_all(tmp.path().join("config.d/50-dir.toml")).unwrap();
    let out = check_config(&main, &[]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    let drop_in = tmp.path().join("config.d/50-dir.toml");
    assert!(
        stderr(&out).starts_with(&format!("{}: cannot read config file: ", drop_in.display())),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_default_config_is_named() {
    if Path::new(config::DEFAULT_CONFIG_PATH).exists() {
        eprintln!(
            "NOTICE: {} exists here; skipping",
            config::DEFAULT_CONFIG_PATH
        );
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgw"))
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert!(
        stderr(&out).starts_with("/etc/fleetgw/gateway.toml: cannot read config file: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn drop_ins_merge_in_name_order_over_the_main_file() {
    let tmp = tempfile::tempdir().unwrap();
    let main = write(
        tmp.path(),
        "gateway.toml",
        "[cloud.aws]\nsessions = 2\ntps = 7\n[gateway]\nid = \"main\"\n",
    );
    let a = write(
        tmp.path(),
        "config.d/10-a.toml",
        "[cloud.aws]\nsessions = 5\n",
    );
    let b = write(
        tmp.path(),
        "config.d/20-b.toml",
        "[cloud.aws]\nsessions = 6\n",
    );
    write(tmp.path(), "config.d/README", "not toml at all [");
    let out = check_config(&main, &[]);
    let eff = effective(&out);
    assert_eq!(get(&eff, "cloud.aws.sessions").as_integer(), Some(6));
    assert_eq!(get(&eff, "cloud.aws.tps").as_integer(), Some(7));
    assert_eq!(get(&eff, "gateway.id").as_str(), Some("main"));
    let text = stdout(&out);
    let sources: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# from "))
        .collect();
    assert_eq!(
        sources,
        [
            main.display().to_string(),
            a.display().to_string(),
            b.display().to_string()
        ]
    );

    // An error in a drop-in names the drop-in, not the main file.
    let c = write(
        tmp.path(),
        "config.d/30-c.toml",
        "[downstream]\nlisten = \"localhost\"\n",
    );
    let out = check_config(&main, &[]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert!(
        stderr(&out).starts_with(&format!("{}: downstream.listen: ", c.display())),
        "{}",
        stderr(&out)
    );
}

#[test]
fn set_overrides_win_and_are_typed() {
    let tmp = tempfile::tempdir().unwrap();
    let main = write(tmp.path(), "gateway.toml", "[cloud.aws]\nsessions = 2\n");
    write(
        tmp.path(),
        "config.d/10-a.toml",
        "[cloud.aws]\nsessions = 5\n",
    );
    let out = check_config(
        &main,
        &[
            "cloud.aws.sessions=8",
            "gateway.id=gw-7",
            "cloud.aws.format=cbor",
        ],
    );
    let eff = effective(&out);
    assert_eq!(get(&eff, "cloud.aws.sessions").as_integer(), Some(8));
    assert_eq!(get(&eff, "gateway.id").as_str(), Some("gw-7"));
    assert_eq!(get(&eff, "cloud.aws.format").as_str(), Some("cbor"));

    let out = check_config(&main, &["cloud.aws.sessions=four"]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert_eq!(
        stderr(&out),
        "--set cloud.aws.sessions: invalid type: string \"four\", expected u32\n"
    );
    let out = check_config(&main, &["cloud.aws.sessions=0"]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert_eq!(
        stderr(&out),
        "--set cloud.aws.sessions: must be at least 1, got 0\n"
    );
}

#[test]
fn secrets_are_redacted_in_the_output() {
    let tmp = tempfile::tempdir().unwrap();
    let main = write(
        tmp.path(),
        "gateway.toml",
        "[downstream]\nusername = \"gw\"\npassword = \"hunter2-broker\"\n\
         [admission]\nmode = \"symmetric-key\"\ngroup_key = \"Z3JvdXAta2V5LXNlY3JldA==\"\n",
    );
    let out = check_config(&main, &[]);
    let text = stdout(&out);
    let eff = effective(&out);
    assert!(!text.contains("hunter2-broker"), "{text}");
    assert!(!text.contains("Z3JvdXAta2V5LXNlY3JldA=="), "{text}");
    assert_eq!(
        get(&eff, "downstream.password").as_str(),
        Some("[redacted]")
    );
    assert_eq!(
        get(&eff, "admission.group_key").as_str(),
        Some("[redacted]")
    );
    assert_eq!(get(&eff, "downstream.username").as_str(), Some("gw"));

    // A secret given with --set is not echoed back in an error either.
    let out = check_config(&main, &["admission.group_key=not*base64"]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert!(!stderr(&out).contains("not*base64"), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("--set admission.group_key: "),
        "{}",
        stderr(&out)
    );
}

/// `identity = "gateway"` without the gateway's own certificate or key is refused by
/// check-config and by the daemon alike, naming the file that chose the mode and what is
/// missing.
#[test]
fn gateway_identity_without_its_certificate_exits_78_naming_key_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(
        tmp.path(),
        "gateway.toml",
        "[telemetry]\nidentity = \"gateway\"\ngateway_key = \"gw.key\"\n",
    );
    let out = check_config(&path, &[]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert_eq!(
        stderr(&out),
        format!(
            "{}: telemetry.identity: \"gateway\" needs telemetry.gateway_cert (the gateway's own \
             certificate chain and key for its upstream connection)\n",
            path.display()
        )
    );

    // Chosen in a drop-in with neither key: the drop-in is named, and both keys.
    let main = write(tmp.path(), "gateway.toml", "");
    let drop_in = write(
        tmp.path(),
        "config.d/50-gw.toml",
        "[telemetry]\nidentity = \"gateway\"\n",
    );
    let out = check_config(&main, &[]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert!(
        stderr(&out).starts_with(&format!(
            "{}: telemetry.identity: \"gateway\" needs telemetry.gateway_cert and telemetry.gateway_key",
            drop_in.display()
        )),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(&drop_in).unwrap();

    // The same through --set, and `fleetgw run` exits 78 with the same line.
    let out = check_config(&main, &["telemetry.identity=gateway"]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert!(
        stderr(&out).starts_with("--set telemetry.identity: \"gateway\" needs telemetry.gateway_cert and telemetry.gateway_key"),
        "{}",
        stderr(&out)
    );
    let run = run_daemon(&main, &["telemetry.identity=gateway"]);
    assert_eq!(run.status.code(), Some(EX_CONFIG), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("--set telemetry.identity: \"gateway\" needs telemetry.gateway_cert"),
        "{}",
        stderr(&run)
    );
}

#[test]
fn gateway_identity_keys_resolve_relative_paths_and_validate() {
    let tmp = tempfile::tempdir().unwrap();
    let main = write(
        tmp.path(),
        "gateway.toml",
        "[telemetry]\nidentity = \"gateway\"\ngateway_cert = \"gw/gateway.pem\"\n\
         gateway_key = \"gw/gateway.key\"\ngateway_key_passphrase_file = \"gw/pass\"\n",
    );
    let eff = effective(&check_config(&main, &[]));
    assert_eq!(get(&eff, "telemetry.identity").as_str(), Some("gateway"));
    for (key, file) in [
        ("telemetry.gateway_cert", "gw/gateway.pem"),
        ("telemetry.gateway_key", "gw/gateway.key"),
        ("telemetry.gateway_key_passphrase_file", "gw/pass"),
    ] {
        assert_eq!(
            PathBuf::from(get(&eff, key).as_str().unwrap()),
            tmp.path().join(file),
            "{key}"
        );
    }

    let out = check_config(
        &main,
        &["telemetry.gateway_key_passphrase_credential=gw-pass"],
    );
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert!(
        stderr(&out).ends_with(
            "telemetry.gateway_key_passphrase_file: set either telemetry.gateway_key_passphrase_file or telemetry.gateway_key_passphrase_credential, not both\n"
        ),
        "{}",
        stderr(&out)
    );
    let out = check_config(&main, &["telemetry.gateway_client_id=gw/+"]);
    assert_eq!(out.status.code(), Some(EX_CONFIG));
    assert_eq!(
        stderr(&out),
        "--set telemetry.gateway_client_id: \"gw/+\" is not an MQTT client id (1-128 bytes, no '+', '#' or '/')\n"
    );
}

/// `fleetgw run ARGS` with the config and overrides; returns once it exits.
fn run_daemon(config: &Path, sets: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetgw"));
    cmd.arg("run").arg("--config").arg(config);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd.env_remove("RUST_LOG").output().expect("run fleetgw")
}

/// Writes into `dir` a config whose cloud credentials are real (so the daemon gets as far as
/// telemetry) with `identity = "gateway"`: `gateway.pem`, its key `gateway.key` encrypted with
/// the passphrase in `gateway.pass`, and `other.key` (another certificate's key).
fn gateway_identity_config(dir: &Path) -> PathBuf {
    use fleetgw::identity::{CertificateAuthority, KeyType};
    let ca = CertificateAuthority::generate("test cloud CA").unwrap();
    let (claim, claim_key) = ca.issue_client("claim", KeyType::EcdsaP256, 30).unwrap();
    write(dir, "ca.pem", ca.cert_pem());
    write(dir, "claim.pem", &claim);
    write_secret(
        dir,
        "claim.key",
        claim_key.to_pkcs8_pem().expose_str().unwrap(),
    );
    let (gw, gw_key) = ca.issue_client("gw-01", KeyType::EcdsaP256, 30).unwrap();
    write(dir, "gateway.pem", &gw);
    // Encrypted, as an operator may keep it: openssl's PKCS#8 with AES-256.
    let pkey = openssl::pkey::PKey::private_key_from_pem(gw_key.to_pkcs8_pem().expose()).unwrap();
    let encrypted = pkey
        .private_key_to_pem_pkcs8_passphrase(openssl::symm::Cipher::aes_256_cbc(), b"gw-secret")
        .unwrap();
    write_secret(dir, "gateway.key", encrypted);
    write_secret(dir, "gateway.pass", "gw-secret\n");
    let (_, other_key) = ca.issue_client("other", KeyType::EcdsaP256, 30).unwrap();
    write_secret(
        dir,
        "other.key",
        other_key.to_pkcs8_pem().expose_str().unwrap(),
    );
    write(
        dir,
        "gateway.toml",
        "[gateway]\nstate_dir = \"state\"\n[admin]\nsocket = \"admin.sock\"\n\
         [downstream]\nlisten = \"127.0.0.1:0\"\n\
         [cloud.aws]\nendpoint = \"127.0.0.1:1\"\n\
         [telemetry]\nidentity = \"gateway\"\ngateway_cert = \"gateway.pem\"\n\
         gateway_key = \"gateway.key\"\ngateway_key_passphrase_file = \"gateway.pass\"\n",
    )
}

/// The daemon imports the gateway key with its passphrase and checks it against the
/// certificate before it opens anything: a wrong passphrase or a key of another certificate
/// is a config error (78) naming the key and the files.
#[test]
fn gateway_key_must_decrypt_and_match_its_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let config = gateway_identity_config(tmp.path());

    write_secret(tmp.path(), "wrong.pass", "not-it\n");
    let wrong = format!(
        "telemetry.gateway_key_passphrase_file={}",
        tmp.path().join("wrong.pass").display()
    );
    let out = run_daemon(&config, &[&wrong]);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("telemetry.gateway_key: ") && err.contains("gateway.key"),
        "{err}"
    );

    // The right passphrase decrypts it, but the certificate is another key's.
    let other = format!(
        "telemetry.gateway_cert={}",
        write(tmp.path(), "other.pem", &{
            use fleetgw::identity::{CertificateAuthority, KeyType};
            CertificateAuthority::generate("x")
                .unwrap()
                .issue_client("gw-01", KeyType::EcdsaP256, 30)
                .unwrap()
                .0
        })
        .display()
    );
    let out = run_daemon(&config, &[&other]);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "telemetry.gateway_key: {} does not belong to the certificate in {} (telemetry.gateway_cert)",
            tmp.path().join("gateway.key").display(),
            tmp.path().join("other.pem").display()
        )),
        "{err}"
    );

    // An unencrypted key of another certificate: the same check.
    let out = run_daemon(
        &config,
        &[&format!(
            "telemetry.gateway_key={}",
            tmp.path().join("other.key").display()
        )],
    );
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("other.key does not belong to the certificate in"),
        "{}",
        stderr(&out)
    );
    // Nothing was opened: the store directory was never created.
    assert!(!tmp.path().join("state").exists());
}

/// A gateway certificate file without a certificate in it is named with the key.
#[test]
fn gateway_cert_that_is_not_a_certificate_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let config = gateway_identity_config(tmp.path());
    let not_cert = write(tmp.path(), "not-a-cert.pem", "hello\n");
    let out = run_daemon(
        &config,
        &[&format!("telemetry.gateway_cert={}", not_cert.display())],
    );
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("telemetry.gateway_cert: {}: ", not_cert.display())),
        "{}",
        stderr(&out)
    );
}

/// `[[downstream.users]]`: a hash from `fleetgw passwd` is accepted (in a drop-in, as an
/// operator would add one); a plain-text password, a duplicate name or a bad filter exits 78
/// naming the key and the file.
#[test]
fn downstream_users_are_checked_and_passwd_makes_their_hash() {
    let mut passwd = std::process::Command::new(env!("CARGO_BIN_EXE_fleetgw"))
        .arg("passwd")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    passwd
        .stdin
        .take()
        .unwrap()
        .write_all(b"historian-secret\n")
        .unwrap();
    let out = passwd.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let hash = stdout(&out).trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(fleetgw::identity::verify_password(
        &hash,
        b"historian-secret"
    ));
    assert!(!fleetgw::identity::verify_password(
        &hash,
        b"historian-secret\n"
    ));

    let tmp = tempfile::tempdir().unwrap();
    let main = write(tmp.path(), "gateway.toml", "[gateway]\nid = \"gw-1\"\n");
    let user = |name: &str, hash: &str, subscribe: &str| {
        format!(
            "[[downstream.users]]\nname = \"{name}\"\npassword_hash = '{hash}'\nsubscribe = [\"{subscribe}\"]\n"
        )
    };
    let drop_in = write(
        &tmp.path().join("config.d"),
        "10-users.toml",
        &user("historian", &hash, "fleetgw/+/status"),
    );
    let out = check_config(&main, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("historian"), "{}", stdout(&out));

    for (text, key, says) in [
        (
            user("historian", "plain-text", "fleetgw/+/status"),
            "downstream.users[0].password_hash",
            "fleetgw passwd",
        ),
        (
            user("historian", &hash, "fleetgw/#/status"),
            "downstream.users[0].subscribe",
            "not a valid MQTT topic filter",
        ),
        (
            user("a", &hash, "x") + &user("a", &hash, "y"),
            "downstream.users[1].name",
            "listed twice",
        ),
    ] {
        std::fs::write(&drop_in, text).unwrap();
        let out = check_config(&main, &[]);
        assert_eq!(out.status.code(), Some(EX_CONFIG), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!("{}: {key}: ", drop_in.display())) && err.contains(says),
            "{err}"
        );
    }

    // No password on standard input: a clear usage error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetgw"))
        .arg("passwd")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("no password"), "{}", stderr(&out));
}

/// A sealing key file that does not exist: `run` never creates one (it would seal secrets with
/// a key nobody has a copy of) and refuses to start, so `check-config` refuses it too, both
/// with exit 78 naming the key, where it was set and the file. Nothing is created.
#[test]
fn a_missing_sealing_key_file_is_refused_by_check_config_and_run_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let config = gateway_identity_config(tmp.path());
    let missing = tmp.path().join("no-such.key");
    let set = format!("provision.sealing_key_file={}", missing.display());
    for out in [check_config(&config, &[&set]), run_daemon(&config, &[&set])] {
        assert_eq!(out.status.code(), Some(EX_CONFIG), "{}", stderr(&out));
        let expected = format!(
            "--set provision.sealing_key_file: {} does not exist; fleetgw run refuses to start \
             without its sealing key",
            missing.display()
        );
        assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    }
    assert!(!missing.exists(), "no key is made up");
    assert!(!tmp.path().join("state").exists());
}

/// Key and credential files that other users can read are refused by `check-config` and
/// `run` alike, with exit 78 naming the key, the file that set it and the key file; the
/// daemon's own group may read them (root:fleetgw 0640). Nothing is opened on refusal.
#[test]
fn group_or_world_readable_key_files_are_refused_with_exit_78() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let config = gateway_identity_config(tmp.path());
    let sealing = write_secret(tmp.path(), "sealing.key", "ab".repeat(32));
    let sealing_set = format!("provision.sealing_key_file={}", sealing.display());
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    // Private files (0600, and 0640 of our own group) pass check-config.
    chmod(&sealing, 0o640);
    let out = check_config(&config, &[&sealing_set]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let cases: [(&str, PathBuf, Option<&str>); 4] = [
        (
            "provision.sealing_key_file",
            sealing.clone(),
            Some(&sealing_set),
        ),
        ("cloud.aws.claim_key", tmp.path().join("claim.key"), None),
        (
            "telemetry.gateway_key",
            tmp.path().join("gateway.key"),
            None,
        ),
        (
            "telemetry.gateway_key_passphrase_file",
            tmp.path().join("gateway.pass"),
            None,
        ),
    ];
    for (key, file, set) in &cases {
        let sets: Vec<&str> = set.iter().copied().collect();
        for mode in [0o644, 0o604] {
            chmod(file, mode);
            for out in [check_config(&config, &sets), run_daemon(&config, &sets)] {
                assert_eq!(out.status.code(), Some(EX_CONFIG), "{key} {mode:o}");
                let origin = match set {
                    Some(_) => format!("--set {key}"),
                    None => format!("{}: {key}", config.display()),
                };
                let expected = format!(
                    "{origin}: {}: is accessible by other users (mode {mode:04o}); a key \
                     or credential file must be private: chmod 600 it, or chmod 640 with the \
                     daemon's group\n",
                    file.display()
                );
                assert!(stderr(&out).ends_with(&expected), "{}", stderr(&out));
            }
        }
        chmod(file, 0o600);
    }
    let out = check_config(&config, &[&sealing_set]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!tmp.path().join("state").exists());
}
