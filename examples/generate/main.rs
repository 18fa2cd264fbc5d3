//! Generates the man pages and shell completions the packages ship, from the clap
//! definitions of the `fleetgw` command line (so they cannot drift from `--help`):
//!
//! ```sh
//! cargo run --example generate -- man DIR          # DIR/fleetgw.1, DIR/fleetgw-run.1, ...
//! cargo run --example generate -- completions DIR  # DIR/fleetgw.bash, DIR/_fleetgw, DIR/fleetgw.fish
//! cargo run --example generate -- docs docs/src/reference   # the user guide's reference pages
//! ```
//!
//! An example rather than a subcommand: the generators stay out of the daemon's binary.
//! `scripts/package` runs it for the man pages and completions; the reference pages are
//! committed, and `tests/docs_reference.rs` fails when they differ from what `reference.rs`
//! renders now.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;

mod reference;
use clap_complete::Shell;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (what, dir) = match args.as_slice() {
        [what, dir] => (what.as_str(), PathBuf::from(dir)),
        _ => {
            eprintln!("usage: generate man|completions|docs DIR");
            return ExitCode::from(64);
        }
    };
    let result = std::fs::create_dir_all(&dir).and_then(|()| match what {
        "man" => man_pages(&dir),
        "completions" => completions(&dir),
        "docs" => reference_pages(&dir),
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{other:?}: expected man, completions or docs"),
        )),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("generate {what} {}: {e}", dir.display());
            ExitCode::from(74)
        }
    }
}

/// `fleetgw.1` and one page per subcommand (`fleetgw-run.1`, ...).
fn man_pages(dir: &Path) -> std::io::Result<()> {
    let cmd = fleetgw::cli::Cli::command();
    clap_mangen::generate_to(cmd, dir)
}

fn completions(dir: &Path) -> std::io::Result<()> {
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = fleetgw::cli::Cli::command();
        clap_complete::generate_to(shell, &mut cmd, "fleetgw", dir)?;
    }
    Ok(())
}

/// The user guide's reference pages (`docs/src/reference/*.md`).
fn reference_pages(dir: &Path) -> std::io::Result<()> {
    let sample =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml"))?;
    for (name, text) in reference::pages(&sample) {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}
