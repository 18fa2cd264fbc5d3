//! Configuration the daemon tests add beside the emulator's `gateway.toml`: the drop-in
//! directory (`config.d/`, read after the main file) and `[[downstream.users]]` entries.

use std::path::{Path, PathBuf};

/// The drop-in directory beside `config` (`config.d/`), created if missing.
pub fn drop_in_dir(config: &Path) -> PathBuf {
    let drop_in = config
        .parent()
        .expect("config has a directory")
        .join("config.d");
    std::fs::create_dir_all(&drop_in).unwrap();
    drop_in
}

/// One `[[downstream.users]]` entry: `name`, the hash of `password`, then `rights` (TOML
/// lines such as `subscribe = ["a/#"]\n`).
pub fn user_toml(name: &str, password: &str, rights: &str) -> String {
    let hash = fleetgw::identity::hash_password(password.as_bytes()).unwrap();
    format!("[[downstream.users]]\nname = \"{name}\"\npassword_hash = '{hash}'\n{rights}")
}
