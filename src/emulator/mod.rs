//! Cloud emulators and the simulated device fleet: stand-ins for the cloud and for the
//! downstream devices, so that tests, `fleetgw demo` and the benchmarks run the whole flow with
//! no cloud account and no hardware.

pub mod devices;
