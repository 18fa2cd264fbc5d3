//! fleetgw: a fleet provisioning gateway daemon.
//!
//! Downstream devices talk to the gateway over local MQTT; the gateway provisions each of them
//! with the cloud (AWS IoT fleet provisioning, Azure DPS), keeps every step in a crash-safe
//! store and then forwards their telemetry upstream. See `docs/architecture.md` for the map.

pub mod admin;
pub mod admission;
pub mod allocator;
pub mod backoff;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod cloud;
pub mod codes;
pub mod config;
pub mod device_id;
pub mod downstream;
pub mod emulator;
pub mod identity;
pub mod mqtt;
pub mod provision;
pub mod sim;
pub mod store;
pub mod systemd;
pub mod telemetry;
