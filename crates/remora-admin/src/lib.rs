//! The admin side every Remora binary shares: an HTTP server for `/live`, `/ready`,
//! `/metrics` and `/config` (plus loopback-only `/shutdown` and `/log-level`), readiness
//! guards, a reloadable log filter and the `process_*` metrics.

pub mod log;
mod process;
pub mod server;

pub use log::{LogFormat, LogLevel};
pub use process::ProcessCollector;
pub use server::{Admin, Readiness, serve};

/// Completes on SIGTERM (what Kubernetes sends) or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the process with POST /shutdown");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
