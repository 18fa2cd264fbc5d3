//! The AFL++ harness: `FLEETGW_AFL_TARGET=<target> cargo afl fuzz ... fleetgw-afl` fuzzes one
//! of the targets of `tests/fuzz_targets/` coverage-guided; `fleetgw-afl seeds <target>
//! <dir>` writes the target's seeds as AFL's first corpus. `scripts/fuzz` does both.

#[path = "../../../tests/fuzz_targets/mod.rs"]
mod targets;

use std::path::{Path, PathBuf};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [cmd, target, dir] = args.as_slice() {
        if cmd == "seeds" {
            std::fs::create_dir_all(dir).expect("creating the seed directory");
            for (i, seed) in targets::seeds(target, repo()).iter().enumerate() {
                std::fs::write(Path::new(dir).join(format!("seed-{i}")), seed)
                    .expect("writing a seed");
            }
            return;
        }
    }
    let target = std::env::var("FLEETGW_AFL_TARGET").unwrap_or_default();
    if !targets::TARGETS.contains(&target.as_str()) {
        eprintln!(
            "fleetgw-afl: set FLEETGW_AFL_TARGET to one of {:?}, or run `fleetgw-afl seeds TARGET DIR`",
            targets::TARGETS
        );
        std::process::exit(64);
    }
    let scratch: PathBuf =
        std::env::temp_dir().join(format!("fleetgw-afl-{}.toml", std::process::id()));
    afl::fuzz!(|data: &[u8]| {
        targets::run(&target, data, &scratch);
    });
}
