//! `remora-controller`: the control plane. This version parses its configuration and
//! serves its admin port; discovery, policy and identity are added behind it.

use std::{future::Future, io, net::SocketAddr, sync::Arc};

use prometheus_client::{encoding::EncodeLabelSet, metrics::info::Info, registry::Registry};
use remora_admin::{Admin, LogFormat, LogLevel, ProcessCollector, Readiness};
use remora_config::{ConfigError, Effective, Knob, Loader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub const ADMIN_ADDR: Knob = Knob::value(
    "admin-addr",
    "REMORA_ADMIN_ADDR",
    Some("0.0.0.0:9990"),
    "Admin listener: /metrics, /live, /ready, /config",
);
pub const LOG: Knob = Knob::value(
    "log",
    "REMORA_LOG",
    Some("info"),
    "Log filter (tracing EnvFilter syntax)",
);
pub const LOG_FORMAT: Knob = Knob::value(
    "log-format",
    "REMORA_LOG_FORMAT",
    Some("plain"),
    "Log format: plain or json",
);

pub const KNOBS: &[Knob] = &[ADMIN_ADDR, LOG, LOG_FORMAT];

/// The controller's validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub admin_addr: SocketAddr,
    pub log: String,
    pub log_format: LogFormat,
    pub effective: Vec<Effective>,
}

impl Config {
    pub fn load(
        args: impl IntoIterator<Item = String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let cmd = remora_config::command(
            "remora-controller",
            "The Remora control plane: discovery, policy and identity for the proxies.",
            KNOBS,
        );
        let mut l = Loader::new(cmd, args, env)?;
        let admin_addr = l.get(&ADMIN_ADDR, |s| {
            s.parse::<SocketAddr>()
                .map_err(|_| "expected IP:port".into())
        });
        let log = l.get(&LOG, remora_admin::log::parse_filter);
        let log_format = l.get(&LOG_FORMAT, LogFormat::parse);
        let effective = l.finish()?;
        let missing = || ConfigError::Invalid(vec!["internal: a knob without a value".into()]);
        Ok(Self {
            admin_addr: admin_addr.ok_or_else(missing)?,
            log: log.ok_or_else(missing)?,
            log_format: log_format.ok_or_else(missing)?,
            effective,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot listen on {addr} (admin): {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// A bound, not yet running controller.
pub struct App {
    admin_listener: TcpListener,
    admin: Arc<Admin>,
}

impl App {
    pub async fn build(config: Config, log: LogLevel) -> Result<Self, BuildError> {
        let admin_listener = TcpListener::bind(config.admin_addr)
            .await
            .map_err(|source| BuildError::Bind {
                addr: config.admin_addr,
                source,
            })?;
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        registry
            .sub_registry_with_prefix("remora_controller")
            .register(
                "build",
                "Remora build information",
                Info::new(BuildLabels {
                    version: env!("CARGO_PKG_VERSION"),
                }),
            );
        let admin = Arc::new(Admin {
            registry,
            readiness: Arc::new(Readiness::default()),
            config_json: remora_config::to_json(&config.effective),
            log,
            shutdown: CancellationToken::new(),
        });
        Ok(Self {
            admin_listener,
            admin,
        })
    }

    pub fn admin_addr(&self) -> io::Result<SocketAddr> {
        self.admin_listener.local_addr()
    }

    /// Serves until `shutdown` completes or `POST /shutdown`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop = CancellationToken::new();
        info!(admin = ?self.admin_listener.local_addr().ok(), "remora-controller {} running", env!("CARGO_PKG_VERSION"));
        let server = tokio::spawn(remora_admin::serve(
            self.admin_listener,
            self.admin.clone(),
            stop.clone(),
        ));
        tokio::select! {
            _ = shutdown => {}
            _ = self.admin.shutdown.cancelled() => {}
        }
        stop.cancel();
        let _ = server.await;
        info!("shut down");
    }
}
