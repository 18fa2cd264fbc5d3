//! The tuning of the global allocator, mimalloc (declared in `src/main.rs`).
//!
//! mimalloc's defaults suit a process that has the machine to itself; a gateway daemon shares
//! a small box. By default mimalloc reserves its first arena as 1 GiB, commits it at once
//! and asks the kernel for transparent huge pages on it, so every page the heap touches
//! brings in 2 MiB: the daemon held 70 MB idle (glibc: 20 MB) and 109 MB at its peak
//! provisioning 2,000 devices (glibc: 39 MB). Three options:
//! - `arena_eager_commit` 0: an arena's memory is committed as its pages are used, so huge
//!   pages are not made of memory the heap has not asked for. This one brings the RSS down.
//! - `arena_reserve` 64 MiB (the smallest arena mimalloc makes) rather than 1 GiB.
//! - `purge_delay` 0: memory freed goes back to the OS at once rather than a second later.
//!
//! Figures with and without in docs/benchmarks.md (2026-12-08). A `MIMALLOC_<OPTION>`
//! environment variable still wins: [`tune`] sets defaults only (`mi_option_set_default`),
//! which mimalloc's reading of the environment at process start overrides, whichever of the
//! two runs first.

use std::ffi::c_long;

use libmimalloc_sys as ffi;

/// mimalloc's number for an option (`mi_option_t` in mimalloc.h, v3). libmimalloc-sys names
/// only some of them; `the_numbers_name_the_options_meant_and_tune_sets_them` checks these
/// against the defaults mimalloc documents.
const ARENA_EAGER_COMMIT: ffi::mi_option_t = 4;
const PURGE_DELAY: ffi::mi_option_t = 15;
const ARENA_RESERVE: ffi::mi_option_t = 23;

/// The options [`tune`] sets: number, environment variable, value (`arena_reserve` in KiB).
const TUNING: [(ffi::mi_option_t, &str, c_long); 3] = [
    (ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT", 0),
    (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 0),
    (ARENA_RESERVE, "MIMALLOC_ARENA_RESERVE", 64 * 1024),
];

/// Sets the options above unless the environment set them. It has to run before the first
/// allocation (an arena is tuned when it is reserved) and before another thread exists:
/// `src/main.rs` calls it from a constructor.
pub fn tune() {
    for (option, _, value) in TUNING {
        // SAFETY: mi_option_set_default writes one entry of mimalloc's option table, and
        // leaves it as it is when the environment set it. It is not safe against a concurrent
        // option call; it runs before any other thread exists.
        unsafe { ffi::mi_option_set_default(option, value) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(option: ffi::mi_option_t) -> c_long {
        // SAFETY: reads one entry of the option table; no other test touches it.
        unsafe { ffi::mi_option_get(option) }
    }

    /// One test, so that nothing else reads or writes the option table meanwhile. If a new
    /// mimalloc numbered its options differently, the defaults read here would be another
    /// option's and the test fails, rather than `tune` silently setting the wrong ones.
    #[test]
    fn the_numbers_name_the_options_meant_and_tune_sets_them() {
        if TUNING
            .iter()
            .any(|(_, var, _)| std::env::var_os(var).is_some())
        {
            eprintln!("a MIMALLOC_ variable is set in this environment; skipped");
            return;
        }
        // mimalloc.h (v3): arena_eager_commit 2 (eager where the OS overcommits), purge_delay
        // 1,000 ms, arena_reserve 1 GiB (in KiB).
        assert_eq!(get(ARENA_EAGER_COMMIT), 2);
        assert_eq!(get(PURGE_DELAY), 1000);
        assert_eq!(get(ARENA_RESERVE), 1024 * 1024);

        tune();
        for (option, var, value) in TUNING {
            assert_eq!(get(option), value, "{var}");
        }
    }
}
