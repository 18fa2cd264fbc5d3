fn main() -> std::process::ExitCode {
    fleetgw::cli::main()
}
