//! The emulators' listeners and the tasks serving them: binding (the error names what the
//! listener is for), the address reported to clients, the accept loop, the inspection API's
//! task and stopping the tasks at shutdown. Shared by the emulators; what they serve on the listeners differs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::emulator::EmulatorError;

/// How long `shutdown` waits for each task.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr`; `what` names the listener in the error ("MQTT", "API", ...).
pub async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, EmulatorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| EmulatorError::Bind { what, addr, source })
}

/// The address clients reach `listener` at (see [`reachable`]); an error names `dir`.
pub fn local(listener: &TcpListener, dir: &Path) -> Result<SocketAddr, EmulatorError> {
    let addr = listener.local_addr().map_err(|source| EmulatorError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(reachable(addr))
}

/// A wildcard bind address is reported as 127.0.0.1 so clients can use it as is.
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
    }
}

/// Accepts connections on `listener` until `shutdown` changes, handing each to `serve`. A
/// failed accept (EMFILE and friends) is logged as "`label` accept failed" and retried after a
/// short pause instead of spinning.
pub async fn accept_until_shutdown(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    label: &str,
    mut serve: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((tcp, peer)) => serve(tcp, peer),
            Err(e) => {
                tracing::warn!(error = %e, "{label} accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves the inspection API `router` on `listener` until `shutdown` changes; `who` names the
/// emulator in the log line of a failure.
pub fn spawn_api(
    listener: TcpListener,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
    who: &'static str,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "{who} API stopped");
        }
    })
}

/// Waits for each of `tasks` (told to stop already) for up to [`SHUTDOWN_TIMEOUT`], aborting
/// the ones that do not end by then.
pub async fn stop(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, task).await.is_err() {
            abort.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_address_is_reported_as_loopback_and_others_as_they_are() {
        let any: SocketAddr = "0.0.0.0:8883".parse().unwrap();
        assert_eq!(reachable(any), "127.0.0.1:8883".parse().unwrap());
        let given: SocketAddr = "127.0.0.2:8443".parse().unwrap();
        assert_eq!(reachable(given), given);
    }
}
