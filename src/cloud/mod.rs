//! Cloud side of the gateway: the payload codecs shared by the cloud clients and the emulators,
//! and the per-cloud protocol modules.
//!
//! The `Provider` trait the provisioning engine talks to lives here too; it is added by the
//! provisioning work (see the contracts notes), this file only wires the submodules for now.

pub mod aws;
pub mod codec;
