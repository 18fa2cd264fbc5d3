//! Polling until a condition holds or a deadline passes: the one way tests wait for something
//! they cannot be told about (a count at the emulator, a line in a log, a file appearing).

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Pause between two probes.
const EVERY: Duration = Duration::from_millis(20);

/// Probes until `probe` yields a value; panics with `what` once `within` has passed.
pub async fn eventually<T>(
    what: impl Display,
    within: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    eventually_async(what, within, || std::future::ready(probe())).await
}

/// [`eventually`] for a probe that has to wait itself (an HTTP request, a connect).
pub async fn eventually_async<T, F, Fut>(what: impl Display, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(EVERY).await;
    }
}

/// A description computed only when shown: for timeout messages that carry the state at the
/// time of failure (a daemon's log, a count so far).
pub struct Lazy<F>(pub F);

impl<F: Fn() -> String> Display for Lazy<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&(self.0)())
    }
}
