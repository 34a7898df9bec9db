//! Wiring: binds the listeners, then runs the data path and the admin server until
//! shutdown, which drains in-flight work within the grace period.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::registry::Registry;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use remora_admin::{Admin, LogLevel, Readiness};

use crate::{
    accept::{Detect, accept_loop},
    config::Config,
    connect::Connector,
    control::{self, Channels, ClientInfo},
    identity::{self, Identity},
    inbound::{Inbound, InboundConfig, InboundPolicies},
    metrics::{Direction, Metrics},
    outbound::{Destinations, Outbound, discovery::Discovery},
    reconnect::Reconnected,
    tcp,
    tls::{self, TlsContext},
};

/// How often idle destinations are looked for, and how long unused makes one idle.
const DISCOVERY_SWEEP: std::time::Duration = std::time::Duration::from_secs(30);
const DISCOVERY_IDLE: std::time::Duration = std::time::Duration::from_secs(300);
/// How often idle metric series are looked for.
const SERIES_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);
/// How often `remora_endpoints` is brought up to date.
const ENDPOINTS_SAMPLE: std::time::Duration = std::time::Duration::from_secs(2);

/// The proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "cannot listen on {addr} ({what}): {source}; is another proxy already running in this pod?"
    )]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("{0}")]
    Controller(String),
    #[error("identity: {0}")]
    Identity(String),
    #[error("cannot start the access log: {0}")]
    AccessLog(io::Error),
    #[error("none of the {what} addresses could be bound: {addrs:?}")]
    NoListener {
        what: &'static str,
        addrs: Vec<SocketAddr>,
    },
}

/// The two sides of the proxy, each with its own context.
struct Sides {
    inbound: Arc<Inbound>,
    outbound: Arc<Outbound>,
    metrics: Metrics,
}

/// A bound, not yet running proxy.
pub struct App {
    config: Config,
    inbound: Vec<TcpListener>,
    outbound: Vec<TcpListener>,
    admin_listeners: Vec<TcpListener>,
    admin: Arc<Admin>,
    sides: Sides,
    identity: Option<Arc<Identity>>,
    channels: Option<Channels>,
}

impl App {
    /// Binds every listener. Nothing is served until [`App::run`].
    pub async fn build(config: Config, log: LogLevel) -> Result<Self, BuildError> {
        let inbound = bind_all("inbound", &config.inbound_addrs)?;
        let outbound = bind_all("outbound", &config.outbound_addrs)?;
        let admin_listeners = bind_all("admin", &config.admin_addrs)?;
        let mut registry = Registry::default();
        let mut metrics = Metrics::register(&mut registry);
        metrics.set_omit(config.metrics_omit_labels);
        if let Some(format) = config.access_log {
            let (log, _writer) = crate::access_log::AccessLog::start(
                format,
                std::io::stdout(),
                metrics.access_log_dropped.clone(),
            )
            .map_err(BuildError::AccessLog)?;
            metrics.set_access_log(log);
        }
        let readiness = Arc::new(Readiness::default());
        let (identity, tls) = match &config.identity {
            Some(ic) => {
                let bad = |e: &dyn std::fmt::Display| {
                    BuildError::Identity(format!("{}: {e}", ic.trust_anchors.describe()))
                };
                let anchors = ic.trust_anchors.read().map_err(BuildError::Identity)?;
                let roots = tls::roots(&anchors).map_err(|e| bad(&e))?;
                metrics.trust_anchors.set(roots.len() as i64);
                readiness.hold(identity::READY_REASON);
                let identity = Arc::new(
                    Identity::new(ic.clone()).map_err(|e| BuildError::Identity(e.to_string()))?,
                );
                let tls = TlsContext::spawn(
                    identity.credentials(),
                    roots,
                    ic.server_name(),
                    ic.spiffe_id(),
                );
                (Some(identity), Some(tls))
            }
            None => (None, None),
        };
        let admin = Arc::new(Admin {
            registry,
            readiness,
            config_json: remora_config::to_json(&config.effective),
            log,
            shutdown: CancellationToken::new(),
            debug: std::sync::OnceLock::new(),
            scrapes: Default::default(),
        });
        let connector = Connector {
            timeout: config.connect_timeout,
            limits: None,
            tls: tls.clone(),
            tls_failures: metrics.tls_failures(Direction::Outbound),
        };
        let info = ClientInfo {
            namespace: config.namespace.clone(),
            pod_name: config.pod_name.clone(),
            pod_ip: config.pod_ip.clone(),
        };
        let channels = match &config.controller_addr {
            Some(addr) => Some(
                control::channels(addr, &config.controller_name, tls.clone())
                    .map_err(BuildError::Controller)?,
            ),
            None => None,
        };
        // While the controller is away its port is probed, so every stream resubscribes
        // as soon as it is back.
        let reconnected =
            Reconnected::new(config.controller_addr.as_ref().map(|a| a.authority.clone()));
        let destinations = channels.as_ref().map(|c| {
            let discovery = Discovery::new(
                c.api.clone(),
                info.clone(),
                metrics.control_reconnects.clone(),
                reconnected.clone(),
            );
            Destinations::new(discovery, connector.clone())
        });
        let policies = InboundPolicies::new(
            channels.as_ref().map(|c| c.api.clone()),
            InboundConfig {
                info,
                default: config.default_inbound_policy,
                trust_domain: config.trust_domain.clone(),
                declared: config.inbound_ports.clone(),
                probe_paths: config.probe_paths.clone(),
                wait: config.discovery_wait,
                reconnects: metrics.control_reconnects.clone(),
                reconnected,
                fallbacks: metrics.authz_fallbacks.clone(),
            },
        );
        let _ = admin.debug.set(Arc::new(crate::debug::Pages {
            destinations: destinations.clone(),
            policies: policies.clone(),
        }));
        let idle = |direction| tcp::Idle {
            timeout: config.tcp_idle_timeout,
            closed: metrics.tcp_idle_closed(direction),
        };
        let detect = |direction| Detect {
            timeout: config.detect_timeout,
            metrics: metrics.clone(),
            direction,
        };
        let inbound_side = Arc::new(Inbound {
            opaque_ports: config.opaque_ports.clone(),
            detect: detect(Direction::Inbound),
            connect_timeout: config.connect_timeout,
            preconnect_delay: config.preconnect_delay,
            tls,
            policies,
            metrics: metrics.clone(),
            slots: Arc::new(Semaphore::new(config.inbound_max_connections)),
            idle: idle(Direction::Inbound),
            drain: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        let outbound_side = Arc::new(Outbound {
            opaque_ports: config.opaque_ports.clone(),
            detect: detect(Direction::Outbound),
            connect_timeout: config.connect_timeout,
            connector,
            metrics: metrics.clone(),
            destinations,
            discovery_wait: config.discovery_wait,
            preconnect_delay: config.preconnect_delay,
            idle: idle(Direction::Outbound),
            drain: CancellationToken::new(),
            tracker: TaskTracker::new(),
            accepted: AtomicU64::new(0),
        });
        let sides = Sides {
            inbound: inbound_side,
            outbound: outbound_side,
            metrics,
        };
        Ok(Self {
            config,
            inbound,
            outbound,
            admin_listeners,
            admin,
            sides,
            identity,
            channels,
        })
    }

    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        local_addrs(&self.inbound)
    }

    pub fn outbound_addrs(&self) -> Vec<SocketAddr> {
        local_addrs(&self.outbound)
    }

    pub fn admin_addrs(&self) -> Vec<SocketAddr> {
        local_addrs(&self.admin_listeners)
    }

    /// Serves until `shutdown` completes (or `POST /shutdown`), then stops accepting,
    /// gives in-flight connections the grace period, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            config,
            inbound,
            outbound,
            admin_listeners,
            admin,
            sides,
            identity,
            channels,
        } = self;
        if let (Some(identity), Some(channels)) = (identity, &channels) {
            let counted = identity::Counted {
                expiry: sides.metrics.cert_expiry.clone(),
                failures: sides.metrics.certify_failures.clone(),
                anchors: sides.metrics.trust_anchors.clone(),
                anchors_refused: sides.metrics.trust_anchors_refused.clone(),
            };
            tokio::spawn(identity.run(channels.identity.clone(), admin.readiness.clone(), counted));
        }
        for (e, source) in config.effective.iter().map(|e| (e, e.source)) {
            info!(target: "remora_proxy::config", "{}={} ({source})", e.env, e.value);
        }
        match &config.controller_addr {
            Some(controller) => info!(
                inbound = ?local_addrs(&inbound),
                outbound = ?local_addrs(&outbound),
                admin = ?local_addrs(&admin_listeners),
                %controller,
                identity = config.identity.as_ref().map(|i| i.spiffe_id()).unwrap_or_default(),
                default_inbound_policy = config.default_inbound_policy.as_str(),
                "remora-proxy {} running{}",
                env!("CARGO_PKG_VERSION"),
                if sides.inbound.tls.is_some() {
                    ""
                } else {
                    " WITHOUT an identity: traffic is NOT encrypted"
                },
            ),
            None => warn!(
                inbound = ?local_addrs(&inbound),
                outbound = ?local_addrs(&outbound),
                admin = ?local_addrs(&admin_listeners),
                "remora-proxy {} running WITHOUT a controller: every destination is passthrough \
                 and traffic is NOT encrypted",
                env!("CARGO_PKG_VERSION"),
            ),
        }
        let metrics = sides.metrics.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SERIES_SWEEP).await;
                metrics.expire_idle(crate::metrics::SERIES_IDLE);
            }
        });
        if let Some(destinations) = sides.outbound.destinations.clone() {
            let sweep = destinations.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(DISCOVERY_SWEEP).await;
                    sweep.evict_idle(DISCOVERY_IDLE);
                }
            });
            // `remora_endpoints{target, state}`, sampled: cheap, and never stale by more
            // than a few seconds.
            let metrics = sides.metrics.clone();
            tokio::spawn(async move {
                loop {
                    metrics.set_endpoints(&destinations.census());
                    tokio::time::sleep(ENDPOINTS_SAMPLE).await;
                }
            });
        }
        let admin_stop = CancellationToken::new();
        for l in admin_listeners {
            tokio::spawn(remora_admin::serve(l, admin.clone(), admin_stop.clone()));
        }
        let inbound_loops: Vec<_> = inbound
            .into_iter()
            .map(|l| tokio::spawn(accept_loop(l, sides.inbound.clone())))
            .collect();
        let outbound_loops: Vec<_> = outbound
            .into_iter()
            .map(|l| tokio::spawn(accept_loop(l, sides.outbound.clone())))
            .collect();

        tokio::select! {
            _ = shutdown => info!("shutdown signal received"),
            _ = admin.shutdown.cancelled() => {}
        }
        drain(&sides, &config, inbound_loops, outbound_loops).await;
        admin_stop.cancel();
        info!("shut down");
    }
}

/// The shutdown protocol. Kubernetes removes a terminating pod's endpoint about when it
/// sends SIGTERM, and clients hear of it a moment later: for the shutdown delay every
/// connection is still accepted and served. Then the inbound side drains: its
/// listeners close, HTTP/2 connections get GOAWAY and HTTP/1 ones close after their
/// request in flight. The outbound side stays open for the app, which may still be
/// finishing its own work (with a native sidecar it has exited already): the proxy
/// exits once no connection of either side is left, or when the grace period, counted
/// from the signal, is over.
async fn drain(
    sides: &Sides,
    config: &Config,
    inbound_loops: Vec<tokio::task::JoinHandle<()>>,
    outbound_loops: Vec<tokio::task::JoinHandle<()>>,
) {
    let (inbound, outbound) = (&sides.inbound, &sides.outbound);
    let deadline = tokio::time::Instant::now() + config.shutdown_grace_period;
    info!(delay = ?config.shutdown_delay, grace = ?config.shutdown_grace_period,
        "draining: still accepting for the shutdown delay");
    tokio::time::sleep(config.shutdown_delay).await;
    inbound.drain.cancel();
    for task in inbound_loops {
        let _ = task.await;
    }
    inbound.tracker.close();
    info!(
        inbound = inbound.tracker.len(),
        outbound = outbound.tracker.len(),
        "stopped accepting inbound connections; waiting for the open ones"
    );
    let drained = async {
        inbound.tracker.wait().await;
        // The app's own connections: once it has had none open, nor opened one, for a
        // while, it is done (or gone).
        let mut quiet_since = tokio::time::Instant::now();
        let mut seen = outbound.accepted.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(OUTBOUND_POLL).await;
            let accepted = outbound.accepted.load(Ordering::Relaxed);
            if accepted != seen || !outbound.tracker.is_empty() {
                (seen, quiet_since) = (accepted, tokio::time::Instant::now());
            } else if quiet_since.elapsed() >= OUTBOUND_QUIET {
                break;
            }
        }
    };
    if tokio::time::timeout_at(deadline, drained).await.is_err() {
        warn!(
            inbound = inbound.tracker.len(),
            outbound = outbound.tracker.len(),
            "grace period over: closing the remaining connections"
        );
    }
    outbound.drain.cancel();
    for task in outbound_loops {
        let _ = task.await;
    }
}

/// How often a draining proxy looks whether the app still uses its outbound side.
const OUTBOUND_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// How long the app's outbound side must go unused before a draining proxy takes the
/// app to be done: long enough for the calls it makes while it winds down.
const OUTBOUND_QUIET: std::time::Duration = std::time::Duration::from_secs(1);

fn local_addrs(listeners: &[TcpListener]) -> Vec<SocketAddr> {
    listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect()
}

/// Binds every address; an IPv6 address the pod cannot use (IPv6 disabled) is skipped,
/// as long as one address is bound.
fn bind_all(what: &'static str, addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, BuildError> {
    let mut out = Vec::new();
    for &addr in addrs {
        match bind(addr) {
            Ok(l) => out.push(l),
            Err(e) if addr.is_ipv6() && ipv6_unavailable(&e) => {
                warn!(%addr, error = %e, "IPv6 is not available: not listening on {what} address");
            }
            Err(source) => return Err(BuildError::Bind { what, addr, source }),
        }
    }
    if out.is_empty() {
        return Err(BuildError::NoListener {
            what,
            addrs: addrs.to_vec(),
        });
    }
    Ok(out)
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    // EAFNOSUPPORT (97) or EADDRNOTAVAIL (99): no IPv6 stack, or no such address.
    matches!(e.raw_os_error(), Some(97 | 99))
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // So [::]:port and 0.0.0.0:port can both be bound.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
