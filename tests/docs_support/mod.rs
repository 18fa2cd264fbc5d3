//! Reading the user guide for the doc tests: which Markdown files make the documentation,
//! their fenced blocks with the `<!-- doc-test: ... -->` marker before each, and a scratch
//! directory with the built `fleetgw` first on PATH to run them in.
//!
//! The marker convention is described in docs/src/development.md ("The guide is tested").

#![allow(dead_code)] // each test file uses part of it

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every Markdown file of the documentation, relative to the root: README.md, docs/*.md and
/// docs/src/**/*.md, sorted.
pub fn doc_files() -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("README.md")];
    let mut walk = vec![root().join("docs")];
    while let Some(dir) = walk.pop() {
        for entry in std::fs::read_dir(&dir).expect("read docs dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                // docs/book is mdbook's output
                if path.file_name().is_some_and(|n| n != "book") {
                    walk.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path.strip_prefix(root()).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// One fenced code block.
#[derive(Debug, Clone)]
pub struct Block {
    /// The file, relative to the root.
    pub file: PathBuf,
    /// 1-based line of the opening fence.
    pub line: usize,
    /// The info string (`sh`, `toml`, `text`, ...).
    pub lang: String,
    /// What follows `doc-test:` in the marker right before the block, if there is one.
    pub marker: Option<String>,
    /// The block's text, with a final newline.
    pub text: String,
}

impl Block {
    /// `file:line`, for messages.
    pub fn at(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }

    /// The marker's first word (`run`, `check-config`, `file`, `needs`, `not`, ...).
    pub fn kind(&self) -> Option<&str> {
        self.marker
            .as_deref()
            .and_then(|m| m.split_whitespace().next())
    }
}

/// The fenced blocks of `file` (relative to the root).
pub fn blocks(file: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(root().join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut out = Vec::new();
    let mut last_nonblank: Option<&str> = None;
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        if let Some(info) = line.strip_prefix("```") {
            let lang = info.trim().to_string();
            let marker = last_nonblank
                .and_then(|l| l.trim().strip_prefix("<!-- doc-test:"))
                .and_then(|l| l.strip_suffix("-->"))
                .map(|m| m.trim().to_string());
            let mut body = String::new();
            for (_, l) in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            out.push(Block {
                file: file.to_path_buf(),
                line: i + 1,
                lang,
                marker,
                text: body,
            });
            last_nonblank = None;
            continue;
        }
        if !line.trim().is_empty() {
            last_nonblank = Some(line);
        }
    }
    out
}

/// Every block of the documentation.
pub fn all_blocks() -> Vec<Block> {
    doc_files().iter().flat_map(|f| blocks(f)).collect()
}

/// The built fleetgw binary.
pub fn fleetgw() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fleetgw"))
}

/// PATH with the built fleetgw's directory first.
pub fn path_with_fleetgw() -> String {
    format!(
        "{}:{}",
        fleetgw().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs `script` with `bash -euo pipefail` in `dir`, bounded by `timeout_secs` (then SIGTERM,
/// and SIGKILL 5 s later); background jobs the script leaves are killed when it ends.
pub fn run_bash(script: &str, dir: &Path, timeout_secs: u32) -> Output {
    let script = format!("trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{script}");
    Command::new("timeout")
        .args(["-k", "5", &timeout_secs.to_string()])
        .args(["bash", "-euo", "pipefail", "-c", &script])
        .current_dir(dir)
        .env("PATH", path_with_fleetgw())
        .output()
        .expect("bash runs")
}

/// The `file NAME` blocks of `file`: (NAME, contents).
pub fn named_files(file: &Path) -> Vec<(String, String)> {
    blocks(file)
        .into_iter()
        .filter_map(|b| {
            let name = b
                .marker
                .as_deref()?
                .strip_prefix("file ")?
                .trim()
                .to_string();
            Some((name, b.text))
        })
        .collect()
}

/// The one block of `file` whose marker starts with `marker`.
pub fn block_marked(file: &str, marker: &str) -> Block {
    let mut found: Vec<Block> = blocks(Path::new(file))
        .into_iter()
        .filter(|b| b.marker.as_deref().is_some_and(|m| m.starts_with(marker)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{file}: expected one block marked {marker:?}"
    );
    found.remove(0)
}
