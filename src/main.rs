/// mimalloc rather than glibc's malloc: the daemon spends less CPU per device provisioned and
/// per device connected (docs/benchmarks.md, 2026-12-08). Its tuning is in `fleetgw::allocator`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The allocator's tuning has to be in place before its first arena is reserved, and the Rust
/// runtime allocates before `main` (the main thread's name). A constructor with a priority runs
/// before the runtime's start and before the constructors without one, mimalloc's own among
/// them. `tests/systemd.rs::the_allocator_is_tuned_before_its_first_arena` checks that the first
/// arena is already the tuned one.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array.00101"]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

#[cfg(target_os = "linux")]
extern "C" fn tune_allocator() {
    fleetgw::allocator::tune();
}

fn main() -> std::process::ExitCode {
    #[cfg(not(target_os = "linux"))]
    fleetgw::allocator::tune();
    fleetgw::cli::main()
}
