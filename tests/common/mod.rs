//! Helpers shared by the integration tests: `fleetgw` child processes and the config they add
//! (drop-ins, local users), a real mosquitto on a free loopback port, a TCP relay that can cut connections, a small MQTT test client, a
//! sequence publisher, an HTTP client for the emulators' API and polling with a deadline. Each
//! test binary uses a subset, hence `dead_code` is allowed here.
#![allow(dead_code)]

pub mod config;
pub mod device;
pub mod http;
pub mod messages;
pub mod mosquitto;
pub mod mqtt5;
pub mod mqtt_client;
pub mod process;
pub mod publisher;
pub mod raw_mqtt;
pub mod relay;
pub mod wait;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Upper bound for anything a test waits for on loopback.
pub const WAIT: Duration = Duration::from_secs(15);

/// Sends the library's log lines (the embedded broker's reasons for closing a connection, the
/// gateway's warnings) to the test's captured output, so a failing test shows them; `RUST_LOG`
/// overrides the default (info, and debug for the embedded broker). Once per test binary.
pub fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("fleetgw=info,fleetgw::downstream::broker=debug")
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// A free TCP port on 127.0.0.1 (bound, read, released; callers retry if it gets taken).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Wall-clock milliseconds since the Unix epoch (send times carried in test payloads).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Wall-clock seconds since the Unix epoch (certificate validity checks).
pub fn unix_now() -> i64 {
    (now_ms() / 1000) as i64
}

/// A benchmark size from the environment, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
