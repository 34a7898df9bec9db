//! The admin side every Remora binary shares: an HTTP server for `/live`, `/ready`,
//! `/metrics` and `/config` (plus loopback-only `/shutdown` and `/log-level`), readiness
//! guards, a reloadable log filter and the `process_*` metrics.

pub mod exposition;
pub mod log;
mod process;
pub mod server;
pub mod time;

pub use log::{LogFormat, LogLevel};
pub use process::{ProcessCollector, Stat, TICKS_PER_SECOND, kib_field, rss_kib};
pub use server::{Admin, Readiness, ScrapeBudget, serve};

use std::process::ExitCode;

use prometheus_client::{encoding::EncodeLabelSet, metrics::info::Info, registry::Registry};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Registers `<prefix>_build_info{version}` and the `process_*` family: what every
/// Remora binary's `/metrics` starts with.
pub fn register_common(registry: &mut Registry, prefix: &str) {
    registry.register_collector(Box::new(ProcessCollector));
    let sub = registry.sub_registry_with_prefix(prefix);
    sub.register(
        "build",
        "Remora build information",
        Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
        }),
    );
    sub.register(
        "admin_refused",
        "Admin connections closed at once and scrapes answered 429 because a client or the server was at its limit (client_connections, connections, scrape_rate)",
        server::REFUSED.clone(),
    );
}

/// Latency buckets, in seconds, for every duration histogram the proxy and the
/// controller keep: 100 µs (a proxy's own hop) to 30 s (a slow upstream at a long
/// timeout), 1-2.5-5 per decade, so one dashboard query reads either.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// What a binary's `main` does before its app runs: start logging with `filter` and
/// `format`, and build the runtime: one thread (`threads` = 1) runs everything on the
/// main thread with no hand-offs between workers — a sidecar's usual size, as Linkerd's
/// proxy defaults to one core — more builds a multi-threaded runtime with that many
/// workers (`None`: one per core). On failure the reason is printed and the exit code
/// returned.
pub fn start(
    binary: &str,
    filter: &str,
    format: LogFormat,
    threads: Option<usize>,
) -> Result<(LogLevel, tokio::runtime::Runtime), ExitCode> {
    let log = LogLevel::init(filter, format).map_err(|e| {
        eprintln!("{binary}: cannot start logging: {e}");
        ExitCode::from(2)
    })?;
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = builder
        .thread_name(binary)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("{binary}: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })?;
    Ok((log, runtime))
}

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
