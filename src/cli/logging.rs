//! Process-wide logging: tracing-subscriber to stderr (text or JSON), filtered by `RUST_LOG`
//! or the configured level; the systemd journal when running under systemd.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

pub use crate::config::LogFormat;

static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs the global subscriber once. `RUST_LOG` wins over `level` (default `info`).
/// Under systemd (`JOURNAL_STREAM` set) logs go to the journal with structured fields.
pub fn init(format: Option<LogFormat>, level: Option<&str>) {
    if INSTALLED.set(()).is_err() {
        return;
    }
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level.unwrap_or("info")));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let journald = if under_journal && format.is_none() {
        tracing_journald::layer().ok()
    } else {
        None
    };
    let registry = tracing_subscriber::registry().with(filter);
    if let Some(journald) = journald {
        registry.with(journald).init();
        return;
    }
    let stderr = match format.unwrap_or_default() {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    registry.with(stderr).init();
}
