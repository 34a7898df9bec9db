//! `remora-controller`: the control plane. A source (`dir:` today) feeds one index;
//! `Destination.Get` streams each target's endpoints to the proxies; the admin port
//! reports readiness after the first full sync, and metrics.

pub mod access;
pub mod config;
pub mod convert;
pub mod core;
pub mod discovery;
pub mod grpc;
pub mod identity;
pub mod inbound;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod reread;
pub mod source;
pub mod watches;
pub mod webhook;

use std::{future::Future, io, net::SocketAddr, sync::Arc};

use prometheus_client::registry::Registry;
use remora_admin::{Admin, LogLevel, Readiness};
use remora_api::v1::{
    destination_server::DestinationServer, identity_server::IdentityServer,
    policy_server::PolicyServer,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{Config, IssuerSource, KNOBS, SourceKind, TokenSource};

use crate::{
    access::{Access, StreamLimits},
    discovery::Discovery,
    grpc::DestinationService,
    identity::{
        Ca, CaFiles, Rotation, ServiceAccount, TokenValidator,
        grpc::IdentityService,
        serving,
        token::{CachedTokens, KubeTokens, StaticTokens},
    },
    index::{Domains, Index},
    metrics::Metrics,
    policy::PolicyService,
    source::Source,
};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error(
        "cannot use the Kubernetes API: {0}; in a pod, is the ServiceAccount token mounted? elsewhere, is KUBECONFIG set?"
    )]
    Kube(String),
    #[error("--source dir:{}: {reason}", path.display())]
    Dir {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "--token-validator kube (the default) checks proxies' tokens with the Kubernetes API, which cannot be used: {0}; outside a cluster give --token-validator static:FILE"
    )]
    TokenReview(String),
    #[error("identity: {0}")]
    Ca(#[from] identity::CaError),
    #[error("identity: {0}")]
    Tokens(String),
    #[error("the gRPC port's own certificate: {0}")]
    GrpcTls(String),
    #[error("the webhook: {0}")]
    Webhook(String),
}

/// Readiness waits for this until the source's first full sync.
const INITIAL_SYNC: &str = "initial sync of the source";

/// A bound, not yet running controller.
pub struct App {
    config: Config,
    admin_listener: TcpListener,
    grpc_listener: TcpListener,
    admin: Arc<Admin>,
    discovery: Arc<Discovery>,
    source: Box<dyn Source>,
    identity: IdentityService,
    /// TLS for the gRPC port, when a CA is configured.
    grpc_tls: Option<Arc<serving::GrpcTls>>,
    /// Follows the issuer files, when a CA is configured.
    rotation: Option<Arc<Rotation>>,
    /// The admission webhook, when its certificate is configured.
    webhook: Option<WebhookParts>,
    /// Who writes statuses, with the kube source.
    leader: Option<leader::Leader>,
}

struct WebhookParts {
    listener: TcpListener,
    cert: Arc<webhook::ServingCert>,
    injector: Arc<webhook::Injector>,
}

impl App {
    /// Binds the listeners and connects the configured source.
    pub async fn build(config: Config, log: LogLevel) -> Result<Self, BuildError> {
        match &config.source {
            SourceKind::Dir(path) => {
                // A folder that is not there would make a ready controller that serves
                // nothing: refuse it at start instead.
                let reason = match std::fs::metadata(path) {
                    Ok(m) if m.is_dir() => None,
                    Ok(_) => Some("not a directory".to_string()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        Some("no such directory".to_string())
                    }
                    Err(e) => Some(e.to_string()),
                };
                if let Some(reason) = reason {
                    return Err(BuildError::Dir {
                        path: path.clone(),
                        reason,
                    });
                }
                let source = Box::new(source::dir::Dir::new(path.clone()));
                Self::with_source(config, log, source).await
            }
            SourceKind::Kube => {
                let client = ::kube::Client::try_default()
                    .await
                    .map_err(|e| BuildError::Kube(e.to_string()))?;
                Self::with_kube_client(config, log, client).await
            }
        }
    }

    /// The kube source over `client`, with leader election for status writes: the
    /// `remora-controller` Lease in `--namespace`, held as `--pod-name`.
    pub async fn with_kube_client(
        config: Config,
        log: LogLevel,
        client: ::kube::Client,
    ) -> Result<Self, BuildError> {
        let leader = leader::Leader::new(
            client.clone(),
            &config.namespace,
            config.pod_name.clone(),
            config.lease_duration,
        );
        let source = source::kube::KubeSource::new(client).with_leader(leader.leading());
        let mut app = Self::with_source(config, log, Box::new(source)).await?;
        app.leader = Some(leader);
        Ok(app)
    }

    /// Binds the listeners, with `source` in place of the configured one.
    pub async fn with_source(
        config: Config,
        log: LogLevel,
        source: Box<dyn Source>,
    ) -> Result<Self, BuildError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BuildError::Bind { what, addr, source })
        };
        let admin_listener = bind("admin", config.admin_addr).await?;
        let grpc_listener = bind("gRPC", config.grpc_addr).await?;
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let readiness = Arc::new(Readiness::default());
        readiness.hold(INITIAL_SYNC);
        let admin = Arc::new(Admin {
            registry,
            readiness,
            config_json: remora_config::to_json(&config.effective),
            log,
            shutdown: CancellationToken::new(),
            debug: std::sync::OnceLock::new(),
            scrapes: Default::default(),
        });
        let domains = Domains {
            trust_domain: config.trust_domain.clone(),
            cluster_domain: config.cluster_domain.clone(),
        };
        let discovery = Discovery::new(
            Index::new(domains),
            metrics.clone(),
            config.cluster_networks.clone(),
        );
        let (identity, rotation) = identity_service(&config, metrics.clone()).await?;
        let webhook = match &config.webhook_tls {
            Some((cert, key)) => {
                let ca = rotation.as_ref().map(|r| r.current());
                let settings = inject_settings(&config, ca.as_deref())?;
                let cert = webhook::ServingCert::load(cert, key).map_err(BuildError::Webhook)?;
                Some(WebhookParts {
                    listener: bind("webhook", config.webhook_addr).await?,
                    cert,
                    injector: Arc::new(webhook::Injector {
                        settings,
                        ca: rotation.as_ref().map(|r| r.handle()),
                        discovery: discovery.clone(),
                        metrics: metrics.clone(),
                    }),
                })
            }
            None => None,
        };
        let grpc_tls = match &rotation {
            Some(rotation) => {
                let sa = ServiceAccount {
                    namespace: config.namespace.clone(),
                    name: config.service_account.clone(),
                };
                Some(serving::grpc_tls(rotation.handle(), sa).map_err(BuildError::GrpcTls)?)
            }
            None => None,
        };
        Ok(Self {
            config,
            admin_listener,
            grpc_listener,
            admin,
            discovery,
            source,
            identity,
            grpc_tls,
            rotation,
            webhook,
            leader: None,
        })
    }

    /// The webhook's address, when it is served.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook
            .as_ref()
            .and_then(|w| w.listener.local_addr().ok())
    }

    pub fn admin_addr(&self) -> io::Result<SocketAddr> {
        self.admin_listener.local_addr()
    }

    pub fn grpc_addr(&self) -> io::Result<SocketAddr> {
        self.grpc_listener.local_addr()
    }

    /// Serves until `shutdown` completes or `POST /shutdown`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            config,
            admin_listener,
            grpc_listener,
            admin,
            discovery,
            source,
            identity,
            grpc_tls,
            rotation,
            webhook,
            leader,
        } = self;
        for e in &config.effective {
            info!(target: "remora_controller::config", "{}={} ({})", e.env, e.value, e.source);
        }
        info!(
            admin = ?admin_listener.local_addr().ok(),
            grpc = ?grpc_listener.local_addr().ok(),
            "remora-controller {} running",
            env!("CARGO_PKG_VERSION")
        );
        let stop = CancellationToken::new();
        let webhook_task = match webhook {
            Some(w) => {
                info!(addr = ?w.listener.local_addr().ok(), "admission webhook serving /inject");
                Some(tokio::spawn(webhook::serve(
                    w.listener,
                    w.cert,
                    w.injector,
                    stop.clone(),
                )))
            }
            None => {
                info!("no --webhook-cert/--webhook-key: the admission webhook is off");
                None
            }
        };
        let admin_task = tokio::spawn(remora_admin::serve(
            admin_listener,
            admin.clone(),
            stop.clone(),
        ));

        if let Some(rotation) = rotation {
            tokio::spawn(rotation.run(discovery.metrics().clone(), stop.clone()));
        }
        let leader_task =
            leader.map(|l| tokio::spawn(l.run(discovery.metrics().clone(), stop.clone())));
        let (events_tx, events_rx) = mpsc::channel(4096);
        let source_task = tokio::spawn(source.run(events_tx, discovery.metrics().clone()));
        let readiness = admin.readiness.clone();
        let writer = tokio::spawn(discovery.clone().run_writer(events_rx, move || {
            info!("source synced: ready");
            readiness.release(INITIAL_SYNC);
        }));

        let access = Arc::new(Access {
            plaintext: config.grpc_plaintext,
            streams: StreamLimits::new(config.max_streams_per_client as usize),
            metrics: discovery.metrics().clone(),
        });
        if config.grpc_plaintext {
            warn!(
                "--grpc-plaintext: gRPC is also served without TLS, to anyone who can reach \
                 the port; use it only locally"
            );
        }
        let routes = grpc::Router {
            destination: DestinationServer::new(DestinationService::new(
                discovery.clone(),
                config.cluster_domain.clone(),
                stop.clone(),
                access.clone(),
            )),
            identity: IdentityServer::new(identity),
            policy: PolicyServer::new(PolicyService::new(
                discovery,
                config.cluster_domain.clone(),
                stop.clone(),
                access.clone(),
            )),
            access,
        };
        let grpc_stop = stop.clone();
        let max_streams = config.max_streams_per_client;
        let grpc = tokio::spawn(async move {
            let incoming = serving::incoming(grpc_listener, grpc_tls, grpc_stop.clone());
            let result = tonic::transport::Server::builder()
                .max_concurrent_streams(max_streams)
                .serve_with_incoming_shutdown(routes, incoming, grpc_stop.cancelled())
                .await;
            if let Err(error) = result {
                warn!(%error, "gRPC server failed");
            }
        });

        tokio::select! {
            _ = shutdown => {}
            _ = admin.shutdown.cancelled() => {}
        }
        info!("shutting down");
        admin.readiness.set_draining();
        stop.cancel();
        source_task.abort();
        let _ = grpc.await;
        let _ = writer.await;
        if let Some(task) = webhook_task {
            let _ = task.await;
        }
        if let Some(task) = leader_task {
            let _ = task.await;
        }
        let _ = admin_task.await;
        info!("shut down");
    }
}

/// The injector's settings: `--inject-config` (or the defaults), with the controller's
/// own trust domain, which it must not contradict, and trust anchors, which win (the
/// settings' copy may lag behind a rotation).
fn inject_settings(
    config: &Config,
    ca: Option<&Ca>,
) -> Result<remora_k8s::inject::Settings, BuildError> {
    let mut settings = match &config.inject_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| BuildError::Webhook(format!("{}: {e}", path.display())))?;
            serde_yaml_ng::from_str(&text)
                .map_err(|e| BuildError::Webhook(format!("{}: {e}", path.display())))?
        }
        None => remora_k8s::inject::Settings::default(),
    };
    let ours = ca.map(|ca| ca.trust_anchors_pem().trim().to_string());
    match (settings.trust_anchors.trim(), ours) {
        ("", Some(anchors)) => settings.trust_anchors = anchors,
        (theirs, Some(anchors)) if theirs != anchors => {
            warn!(
                "--inject-config's trustAnchors differ from the controller's (a rotation not \
                 yet everywhere?): pods are injected with the controller's"
            );
            settings.trust_anchors = anchors;
        }
        _ => {}
    }
    if settings.trust_domain != config.trust_domain {
        return Err(BuildError::Webhook(format!(
            "--inject-config's trustDomain {:?} is not the controller's --trust-domain {:?}",
            settings.trust_domain, config.trust_domain
        )));
    }
    settings.validate().map_err(|e| {
        let from = config
            .inject_config
            .as_ref()
            .map_or("the built-in settings".into(), |p| p.display().to_string());
        BuildError::Webhook(format!("{from}: {e}"))
    })?;
    Ok(settings)
}

/// The CA (followed through its files as they rotate) and token validator the
/// configuration asks for; without a CA, `Certify` answers UNAVAILABLE and says what to
/// configure.
async fn identity_service(
    config: &Config,
    metrics: Metrics,
) -> Result<(IdentityService, Option<Arc<Rotation>>), BuildError> {
    let files = match &config.issuer {
        IssuerSource::None => None,
        IssuerSource::Dev(dir) => Some(CaFiles::dev_made(dir, &config.trust_domain)?),
        IssuerSource::Files { cert, key, anchors } => Some(CaFiles {
            cert: cert.clone(),
            key: key.clone(),
            anchors: anchors.clone(),
        }),
    };
    let ca = match files {
        Some(files) => Some(Rotation::load(
            files,
            &config.trust_domain,
            config.cert_lifetime,
        )?),
        None => None,
    };
    if let Some(rotation) = &ca {
        let ca = rotation.current();
        metrics.set_ca(ca.anchors().len(), ca.issuer_cert().not_after);
    }
    let tokens: Option<Arc<dyn TokenValidator>> = match (&ca, &config.tokens) {
        (None, _) => None,
        (Some(_), TokenSource::Static(path)) => Some(Arc::new(
            StaticTokens::load(path).map_err(BuildError::Tokens)?,
        )),
        (Some(_), TokenSource::Kube) => {
            let client = ::kube::Client::try_default()
                .await
                .map_err(|e| BuildError::TokenReview(e.to_string()))?;
            // Certify repeated with one token costs one TokenReview a minute.
            Some(Arc::new(CachedTokens::new(Arc::new(KubeTokens::new(
                client,
            )))))
        }
    };
    if ca.is_none() {
        warn!(
            "identity is not configured (--dev-ca or --issuer-*): proxies cannot get certificates"
        );
    }
    Ok((
        IdentityService::new(
            ca.as_ref().map(|r| r.handle()),
            tokens,
            config.trust_domain.clone(),
            metrics,
        ),
        ca,
    ))
}
