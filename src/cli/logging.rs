//! Process-wide logging: tracing-subscriber to stderr (text or JSON), filtered by `RUST_LOG`
//! or the configured level; the systemd journal when stderr is the journal stream systemd
//! set up. The level filter sits behind a reload handle so SIGHUP can change `log.level`
//! without a restart.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer, Registry};

pub use crate::config::LogFormat;

static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs the global subscriber once. `RUST_LOG` wins over `level` (default `info`).
/// Under systemd (stderr is `JOURNAL_STREAM`) logs go to the journal with structured fields.
pub fn init(format: Option<LogFormat>, level: Option<&str>) {
    if INSTALLED.set(()).is_err() {
        return;
    }
    let from_env = EnvFilter::try_from_default_env().ok();
    let filter = from_env
        .clone()
        .unwrap_or_else(|| EnvFilter::new(level.unwrap_or("info")));
    let (filter, handle) = reload::Layer::new(filter);
    let journald = if format.is_none() && crate::systemd::stderr_is_journal() {
        tracing_journald::layer().ok()
    } else {
        None
    };
    let registry = tracing_subscriber::registry().with(filter);
    if let Some(journald) = journald {
        registry.with(journald).init();
    } else {
        let stderr = match format.unwrap_or_default() {
            LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
            LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
        };
        registry.with(stderr).init();
    }
    if from_env.is_none() {
        RELOAD.get_or_init(|| handle);
    }
}

/// The reload handle, set only when the level came from the config (`RUST_LOG` unset).
static RELOAD: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// What [`set_level`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum LevelChange {
    /// The new filter is in force.
    Applied,
    /// `RUST_LOG` is set (it wins over `log.level`), or logging was set up without a config.
    Ignored,
}

/// Replaces the level filter (`log.level` on reload). An invalid filter is an error naming
/// what is wrong; the old filter then stays.
pub fn set_level(level: &str) -> Result<LevelChange, String> {
    let Some(handle) = RELOAD.get() else {
        return Ok(LevelChange::Ignored);
    };
    let filter = EnvFilter::try_new(level).map_err(|e| format!("{level:?}: {e}"))?;
    handle
        .reload(filter)
        .map_err(|e| format!("reloading the log filter: {e}"))?;
    Ok(LevelChange::Applied)
}
