//! The generated reference pages of the user guide (docs/src/reference) are what the code
//! generates now, and the code tables they come from (`fleetgw::codes`) match the source: a
//! code the source sends and the table lacks, or one the table lists and the source no longer
//! sends, fails here. Regenerate with `cargo run --example generate -- docs docs/src/reference`.

mod docs_support;

#[path = "../examples/generate/reference.rs"]
mod reference;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use docs_support::root;

#[test]
fn reference_pages_are_up_to_date() {
    let sample = std::fs::read_to_string(root().join("gateway.toml")).unwrap();
    let mut stale = Vec::new();
    for (name, want) in reference::pages(&sample) {
        let path = root().join("docs/src/reference").join(name);
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "stale reference pages {stale:?}: run `cargo run --example generate -- docs docs/src/reference` and commit them"
    );
}

#[test]
fn every_config_key_has_an_explanation_in_the_reference() {
    let page = std::fs::read_to_string(root().join("docs/src/reference/config.md")).unwrap();
    // (section, key) -> its row
    let mut rows = BTreeMap::new();
    let mut section = String::new();
    for line in page.lines() {
        if let Some(name) = line
            .strip_prefix("## `[")
            .and_then(|l| l.strip_suffix("]`"))
        {
            section = name.to_string();
        } else if let Some(rest) = line.strip_prefix("| `") {
            let key = rest.split('`').next().unwrap();
            rows.insert(format!("{section}.{key}"), line.to_string());
        }
    }
    for key in fleetgw::config::known_keys() {
        let row = rows.get(&key).unwrap_or_else(|| panic!("{key} has no row"));
        assert!(
            !row.ends_with("|  |"),
            "{key}: no explanation (comment it in gateway.toml)"
        );
    }
}

/// Non-test Rust source of `dir` (a file or a directory), as (path, text) pairs: files named
/// `tests.rs`/`*_tests.rs` are skipped and a file's `#[cfg(test)] mod tests` is cut off.
fn source(dir: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut walk = vec![root().join(dir)];
    while let Some(p) = walk.pop() {
        if p.is_dir() {
            walk.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".rs") || name == "tests.rs" || name.ends_with("_tests.rs") {
            continue;
        }
        let mut text = std::fs::read_to_string(&p).unwrap();
        if let Some(i) = text.find("#[cfg(test)]\nmod tests") {
            text.truncate(i);
        }
        out.push((p.strip_prefix(root()).unwrap().display().to_string(), text));
    }
    out
}

/// String literals that look like an errorCode (`"UpperCamelCase"`, or one of the one-word
/// codes), with where each is.
fn code_literals(files: &[(String, String)]) -> BTreeMap<String, String> {
    let one_word: BTreeSet<&str> = ["Forbidden", "Unauthorized", "Error"].into();
    let mut out = BTreeMap::new();
    for (path, text) in files {
        for (n, line) in text.lines().enumerate() {
            if line.contains("debug_struct")
                || line.contains("write_str")
                || line.trim_start().starts_with("//")
            {
                continue;
            }
            for (i, lit) in line.split('"').enumerate() {
                // odd pieces are inside quotes
                if i % 2 == 0 || lit.is_empty() {
                    continue;
                }
                let camel = lit.chars().next().unwrap().is_ascii_uppercase()
                    && lit.chars().all(|c| c.is_ascii_alphanumeric())
                    && lit.chars().filter(char::is_ascii_uppercase).count() >= 2
                    && lit.chars().any(|c| c.is_ascii_lowercase());
                if camel || one_word.contains(lit) {
                    out.entry(lit.to_string())
                        .or_insert(format!("{path}:{}", n + 1));
                }
            }
        }
    }
    out
}

/// Literals of the scanned code that are names, not error codes.
const NOT_ERROR_CODES: &[&str] = &[
    "CreateCertificateFromCsr",
    "RegisterThing",
    "GetOperationStatus",
    "SerialNumber",
    "FleetTemplate",
    "SharedAccessSignature",
    "ThingName",
    "AcceptedResponse",
];

#[test]
fn the_error_code_table_matches_the_source() {
    let mut files = Vec::new();
    for dir in [
        "src/admission",
        "src/provision",
        "src/downstream",
        "src/telemetry",
        "src/admin",
        "src/cloud/mod.rs",
    ] {
        files.extend(source(dir));
    }
    let used = code_literals(&files);
    let table: BTreeSet<&str> = fleetgw::codes::ERROR_CODES.iter().map(|e| e.code).collect();
    assert_eq!(
        table.len(),
        fleetgw::codes::ERROR_CODES.len(),
        "a code is listed twice in src/codes.rs"
    );
    let missing: Vec<String> = used
        .iter()
        .filter(|(c, _)| !table.contains(c.as_str()) && !NOT_ERROR_CODES.contains(&c.as_str()))
        .map(|(c, at)| format!("{c} ({at})"))
        .collect();
    assert!(
        missing.is_empty(),
        "error codes sent by the source but not documented in src/codes.rs ERROR_CODES: {missing:?}"
    );
    let gone: Vec<&&str> = table.iter().filter(|c| !used.contains_key(**c)).collect();
    assert!(
        gone.is_empty(),
        "src/codes.rs documents codes the source no longer sends: {gone:?}"
    );
}

/// Exit statuses the commands use: `const EX_...: u8 = N`, `ExitCode::from(N)` and `=> N,`
/// arms of the exit-code mappings, in src/cli and src/main.rs.
fn exit_statuses() -> BTreeMap<u8, String> {
    let mut files = source("src/cli");
    files.extend(source("src/main.rs"));
    let mut out = BTreeMap::new();
    for (path, text) in &files {
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            let number = if let Some(rest) = line.split_once(": u8 = ").map(|(_, r)| r) {
                rest.trim_end_matches(';').parse::<u8>().ok()
            } else if let Some(rest) = line.split_once("ExitCode::from(").map(|(_, r)| r) {
                rest.split(')').next().and_then(|n| n.parse::<u8>().ok())
            } else if let Some(rest) = line.split_once("=> ").map(|(_, r)| r) {
                rest.strip_suffix(',').and_then(|n| n.parse::<u8>().ok())
            } else {
                None
            };
            if let Some(code) = number {
                out.entry(code).or_insert(format!("{path}:{}", n + 1));
            }
        }
    }
    out
}

#[test]
fn the_exit_code_table_matches_the_source() {
    let used = exit_statuses();
    let table: BTreeSet<u8> = fleetgw::codes::EXIT_CODES.iter().map(|x| x.code).collect();
    let missing: Vec<String> = used
        .iter()
        .filter(|(c, _)| !table.contains(c))
        .map(|(c, at)| format!("{c} ({at})"))
        .collect();
    assert!(
        missing.is_empty(),
        "exit codes not in src/codes.rs EXIT_CODES: {missing:?}"
    );
    // 0 is ExitCode::SUCCESS, never a literal
    let gone: Vec<&u8> = table
        .iter()
        .filter(|c| **c != 0 && !used.contains_key(c))
        .collect();
    assert!(
        gone.is_empty(),
        "src/codes.rs lists exit codes the commands no longer use: {gone:?}"
    );
    assert!(Path::new(&root().join("docs/src/reference/exit-codes.md")).exists());
}
