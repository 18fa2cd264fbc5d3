//! Every relative link of the documentation leads somewhere: README.md, docs/*.md and the user
//! guide's chapters (with their `{{#include}}`s expanded, as mdBook renders them) link to files
//! that exist and to headings those files have; SUMMARY.md lists every chapter file and every
//! chapter it lists exists. External links (http, https, mailto) are not fetched.

mod docs_support;

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use docs_support::{doc_files, root};

/// A file's text with mdBook's `{{#include PATH}}` lines replaced by the file they name.
fn expanded(file: &Path) -> String {
    let text = std::fs::read_to_string(root().join(file)).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        match line
            .trim()
            .strip_prefix("{{#include ")
            .and_then(|l| l.strip_suffix("}}"))
        {
            Some(inc) => {
                let path = normalize(&file.parent().unwrap().join(inc.trim()));
                out.push_str(&expanded(&path));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The anchor mdBook (and GitHub) give a heading: lower case, spaces to `-`, only
/// alphanumerics, `-` and `_` kept.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a text's headings (outside code blocks).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

/// The `](target)` links of a text outside code blocks and inline code.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        // drop inline code spans
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = prose.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

/// Whether the doc `file` is rendered as part of the book (its links resolve from docs/src).
fn in_book(file: &Path) -> bool {
    file.starts_with("docs/src")
}

#[test]
fn relative_links_and_anchors_resolve() {
    let mut broken = Vec::new();
    for file in doc_files() {
        // docs/mosquitto.md and docs/benchmarks.md are chapters of the book through an
        // include: their links are checked there.
        let included = ["docs/mosquitto.md", "docs/benchmarks.md"];
        if included.iter().any(|i| file == Path::new(i)) {
            continue;
        }
        let text = if in_book(&file) {
            expanded(&file)
        } else {
            std::fs::read_to_string(root().join(&file)).unwrap()
        };
        for link in links(&text) {
            if link.starts_with("http://")
                || link.starts_with("https://")
                || link.starts_with("mailto:")
            {
                continue;
            }
            let (path, frag) = match link.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                file.clone()
            } else {
                normalize(&file.parent().unwrap().join(path))
            };
            if !root().join(&target).exists() {
                broken.push(format!(
                    "{}: {link}: {} does not exist",
                    file.display(),
                    target.display()
                ));
                continue;
            }
            if let Some(frag) = frag {
                let target_text = if in_book(&target) {
                    expanded(&target)
                } else {
                    std::fs::read_to_string(root().join(&target)).unwrap_or_default()
                };
                if !anchors(&target_text).contains(frag) {
                    broken.push(format!(
                        "{}: {link}: no heading #{frag} in {}",
                        file.display(),
                        target.display()
                    ));
                }
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn summary_lists_every_chapter() {
    let summary = std::fs::read_to_string(root().join("docs/src/SUMMARY.md")).unwrap();
    let listed: BTreeSet<PathBuf> = links(&summary)
        .into_iter()
        .map(|l| PathBuf::from("docs/src").join(l))
        .collect();
    let files: BTreeSet<PathBuf> = doc_files()
        .into_iter()
        .filter(|f| f.starts_with("docs/src") && f != Path::new("docs/src/SUMMARY.md"))
        .collect();
    let unlisted: Vec<_> = files.difference(&listed).collect();
    let missing: Vec<_> = listed.difference(&files).collect();
    assert!(
        unlisted.is_empty(),
        "chapters not in SUMMARY.md: {unlisted:?}"
    );
    assert!(
        missing.is_empty(),
        "SUMMARY.md lists missing files: {missing:?}"
    );
    for needed in ["broker.md", "reliability.md", "benchmarks.md"] {
        assert!(
            listed.contains(&PathBuf::from("docs/src").join(needed)),
            "{needed} not listed"
        );
    }
}

#[test]
fn the_readme_is_the_front_door() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.lines().count() < 150,
        "README.md has {} lines",
        readme.lines().count()
    );
    // It starts with the two commands.
    let first_block = docs_support::blocks(Path::new("README.md")).remove(0);
    let commands: Vec<&str> = first_block.text.lines().collect();
    assert!(
        commands[0].starts_with("cargo run --release -- demo"),
        "{commands:?}"
    );
    assert!(commands[1].starts_with("scripts/test"), "{commands:?}");
}
