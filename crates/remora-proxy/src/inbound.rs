//! The inbound data path: a connection to the pod, redirected to :4143. Its first
//! bytes decide: a TLS ClientHello naming this proxy's identity is terminated (mTLS,
//! the client's identity learnt from its certificate); any other TLS passes through
//! untouched; plaintext is detected as before. Then the port's policy decides, and the
//! traffic goes to the application at the original destination (the pod's own IP).
//!
//! The rooms: [`authz`] judges a peer and a request against a port's policy;
//! [`policies`] keeps every port's policy from the controller, never widening.

pub mod authz;
pub mod policies;

use std::{future::Future, net::IpAddr, sync::Arc, time::Duration};

use ::http::{Request, Response};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use tokio::{net::TcpStream, sync::Semaphore, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info};

use authz::Peer;
pub use policies::{InboundConfig, InboundPolicies, PortPolicy};

use crate::{
    accept::{Admit, Detect, Side},
    addr::{ClientAddr, OrigDst},
    connect::{Conn, ConnectError, Connector, connect, reset},
    detect::Detection,
    http::{
        self, ClientBody, Forward, ForwardError, NoGuard, Upstream, Version, absolute,
        pool::{EndpointClients, restore_orig_proto},
        replay::Tee,
        wants_upgrade,
    },
    io::{CountingIo, PrefixedIo},
    metrics::{DetectResult, Direction, Metrics, TrafficLabels, empty_label},
    tcp,
    tls::{self, Alpn, TlsContext},
};

/// What every inbound connection shares.
#[derive(Debug)]
pub struct Inbound {
    pub opaque_ports: Vec<remora_config::PortRange>,
    pub detect: Detect,
    pub connect_timeout: Duration,
    pub preconnect_delay: Duration,
    /// Present when the proxy has an identity.
    pub tls: Option<Arc<TlsContext>>,
    /// Authorization, per port.
    pub policies: Arc<InboundPolicies>,
    pub metrics: Metrics,
    /// Connections open at once, at most (`REMORA_INBOUND_MAX_CONNECTIONS`).
    pub slots: Arc<Semaphore>,
    /// When opaque connections (and HTTP/1 ones waiting for a request) count as idle.
    pub idle: tcp::Idle,
    /// Cancelled when the side drains, after the shutdown delay.
    pub drain: CancellationToken,
    pub tracker: TaskTracker,
}

impl Side for Inbound {
    const DIRECTION: Direction = Direction::Inbound;

    fn drain(&self) -> &CancellationToken {
        &self.drain
    }

    fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Any client can open inbound connections: past the limit they are reset at once,
    /// so none can exhaust memory or file descriptors.
    fn admit(&self, client: ClientAddr) -> Admit {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Admit::Serve(Some(slot)),
            Err(_) => {
                self.metrics.tcp_refused(Direction::Inbound).inc();
                debug!(%client, "inbound connection limit reached: connection reset");
                Admit::Refuse
            }
        }
    }

    async fn serve(self: Arc<Self>, stream: TcpStream, client: ClientAddr, orig_dst: OrigDst) {
        dispatch(&self, orig_dst, client, stream).await
    }
}

impl Inbound {
    fn is_opaque_port(&self, port: u16) -> bool {
        self.opaque_ports.iter().any(|r| r.contains(port))
    }
}

/// Who sends the requests of an inbound connection, and the policy that judges each.
#[derive(Debug)]
pub struct Admission {
    pub policy: PortPolicy,
    pub ip: IpAddr,
    /// The client's mesh identity, when it connected over mTLS.
    pub identity: Option<String>,
}

impl Admission {
    /// None when allowed; otherwise why not, for the `remora-error` header.
    fn check<B>(&self, req: &Request<B>) -> Option<String> {
        let policy = self.policy.current();
        let peer = Peer {
            ip: self.ip,
            identity: self.identity.as_deref(),
        };
        let tunnel = wants_upgrade(req);
        let stats = &self.policy.stats;
        if policy.allows_request(&peer, req.method(), req.uri().path(), tunnel) {
            stats.count(&stats.requests_allowed);
            return None;
        }
        stats.count(&stats.requests_denied);
        let who = self
            .identity
            .as_deref()
            .unwrap_or("an unauthenticated client");
        info!(client = %self.ip, %who, policy = %policy.name, method = %req.method(),
            path = req.uri().path(), "request denied by inbound policy");
        Some(format!(
            "unauthorized: {who} is not allowed by {}",
            policy.name
        ))
    }
}

/// Where an inbound HTTP connection's requests go, each admitted by the port's policy.
pub struct Forwarder {
    admission: Admission,
    to: ToApp,
}

enum ToApp {
    /// The client's own connection, to the application at the original destination.
    Passthrough(Upstream),
    /// Another proxy's requests over HTTP/2: each to the application as the HTTP
    /// version its client spoke.
    Local {
        clients: Box<EndpointClients>,
        orig_dst: OrigDst,
    },
}

impl Forward for Forwarder {
    type Guard = NoGuard;

    fn version(&self) -> Version {
        match &self.to {
            ToApp::Passthrough(u) => u.version(),
            ToApp::Local { .. } => Version::Http2,
        }
    }

    fn trusts_orig_proto(&self) -> bool {
        matches!(self.to, ToApp::Local { .. })
    }

    fn admit(&self, req: &Request<Incoming>) -> Option<String> {
        self.admission.check(req)
    }

    async fn send(
        &self,
        req: Request<ClientBody>,
        _sent: &mut http::Sent,
    ) -> Result<(Response<Incoming>, Option<NoGuard>), ForwardError> {
        match &self.to {
            ToApp::Passthrough(u) => Ok((u.send(req).await?, None)),
            ToApp::Local { clients, orig_dst } => {
                let mut req = req;
                let version = restore_orig_proto(&mut req);
                let req =
                    absolute(req, *orig_dst).map(|b| http_body_util::Either::Left(Tee::plain(b)));
                let rsp =
                    clients
                        .send(req, version)
                        .await
                        .map_err(|source| ForwardError::Local {
                            addr: *orig_dst,
                            source,
                        })?;
                Ok((rsp, None))
            }
        }
    }
}

/// Serves one inbound connection.
async fn dispatch(ctx: &Inbound, orig_dst: OrigDst, client: ClientAddr, stream: TcpStream) {
    let port = orig_dst.0.port();
    let policy = ctx.policies.port(port).await;
    // Counted into the connection's own series once its labels (TLS, peer) are known.
    let mut io = CountingIo::new(stream, Counter::default(), Counter::default());
    let start = Instant::now();
    let opaque_port = ctx.is_opaque_port(port);
    // The app is connected to ahead only for a client that stays silent a moment (it may
    // wait for a server that speaks first). Clients that speak at once (TLS, HTTP) are
    // authorized before the app sees a connection.
    let delay = ctx.preconnect_delay;
    let mut connecting = Box::pin(async move {
        tokio::time::sleep(delay).await;
        connect(orig_dst, ctx.connect_timeout)
            .await
            .map(Conn::Plain)
    });
    let Some(Detection {
        result,
        prefix,
        upstream,
    }) = ctx.detect.run(&mut io, connecting.as_mut(), start).await
    else {
        return;
    };
    drop(connecting);
    let timeout = ctx.connect_timeout;
    let ours = result == DetectResult::Tls
        && ctx
            .tls
            .as_ref()
            .is_some_and(|t| tls::client_hello_sni(&prefix).is_some_and(|sni| sni == t.local_name));
    let labels = |tls: bool, peer: Option<&str>| {
        let span = tracing::Span::current();
        span.record("tls", tls);
        if let Some(peer) = peer {
            span.record("peer", peer);
        }
        // Clients pick ports: only the ones the pod serves (or a policy names) get a
        // series of their own.
        let target = policy.target.clone();
        TrafficLabels {
            direction: Direction::Inbound,
            target,
            tls,
            peer_identity: peer.map_or_else(empty_label, Arc::from),
            authz_name: policy.current().name.clone(),
        }
    };

    if !ours {
        // Plaintext, or TLS meant for the application itself: no client identity.
        let labels = labels(false, None);
        let conn = ctx.metrics.connection(&labels);
        io.retarget(conn.read.clone(), conn.written.clone());
        let io = PrefixedIo::new(prefix, io);
        let version = match result {
            DetectResult::Http1 if !opaque_port => Version::Http1,
            DetectResult::Http2 if !opaque_port => Version::Http2,
            _ => {
                let app = app(upstream, orig_dst, timeout);
                if let Some(app) = opaque(ctx, app, &policy, client, None, &labels).await {
                    // Plaintext both ways: spliced inside the kernel.
                    tcp::forward_client(io, app, &ctx.idle).await;
                }
                return;
            }
        };
        let admission = Admission {
            policy,
            ip: client.0.ip(),
            identity: None,
        };
        // The connection made during detection, if any; otherwise one on demand.
        let fresh = upstream.map(Ok);
        let to = ToApp::Passthrough(Upstream::new(orig_dst, version, fresh, timeout));
        let fwd = Forwarder { admission, to };
        return http::serve(io, fwd, served(ctx, labels)).await;
    }

    let Some(configs) = ctx.tls.as_ref().and_then(|t| t.current()) else {
        info!("refusing mTLS: this proxy has no certificate yet");
        return reset(io.get_ref());
    };
    let handshake = tls::accept(PrefixedIo::new(prefix, io), configs.server.clone());
    let (mut stream, identity) = match tokio::time::timeout(ctx.connect_timeout, handshake).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(error)) => {
            ctx.metrics.tls_failures(Direction::Inbound).inc();
            return info!(%error, "inbound mTLS handshake failed");
        }
        Err(_) => {
            ctx.metrics.tls_failures(Direction::Inbound).inc();
            return info!("inbound mTLS handshake timed out");
        }
    };
    let alpn = stream
        .get_ref()
        .1
        .alpn_protocol()
        .and_then(Alpn::from_bytes);
    let labels = labels(true, identity.as_deref());
    let conn = ctx.metrics.connection(&labels);
    stream
        .get_mut()
        .0
        .get_mut()
        .retarget(conn.read.clone(), conn.written.clone());
    debug!(
        peer = identity.as_deref().unwrap_or(""),
        ?alpn,
        "mTLS accepted"
    );
    let admission = Admission {
        policy: policy.clone(),
        ip: client.0.ip(),
        identity: identity.clone(),
    };
    let to = match alpn {
        // Requests from another proxy, HTTP/1 ones marked with their version: each to
        // the application as the version its client spoke.
        Some(Alpn::H2) if !opaque_port => ToApp::Local {
            clients: Box::new(EndpointClients::new(
                orig_dst.0,
                None,
                Connector::plain(ctx.connect_timeout),
            )),
            orig_dst,
        },
        // Upgrades and CONNECT, which HTTP/2 between proxies cannot carry.
        Some(Alpn::Http1) if !opaque_port => ToApp::Passthrough(Upstream::new(
            orig_dst,
            Version::Http1,
            upstream.map(Ok),
            timeout,
        )),
        _ => {
            let peer = identity.as_deref();
            let app = app(upstream, orig_dst, timeout);
            if let Some(app) = opaque(ctx, app, &policy, client, peer, &labels).await {
                tcp::forward(stream, app, &ctx.idle).await;
            }
            return;
        }
    };
    let fwd = Forwarder { admission, to };
    http::serve(stream, fwd, served(ctx, labels)).await;
}

/// How an inbound HTTP connection is served: a client from off the pod waiting for its
/// next request counts as idle TCP does.
fn served(ctx: &Inbound, labels: TrafficLabels) -> http::Served {
    http::Served {
        metrics: ctx.metrics.http(labels),
        drain: ctx.drain.clone(),
        idle_timeout: ctx.idle.timeout,
        idle: ctx.idle.clone(),
    }
}

/// The connection to the app: the one made during detection, or a new one.
async fn app(
    made: Option<Conn>,
    orig_dst: OrigDst,
    timeout: Duration,
) -> Result<Conn, ConnectError> {
    match made {
        Some(conn) => Ok(conn),
        None => connect(orig_dst, timeout).await.map(Conn::Plain),
    }
}

/// The application's connection for a client that is not HTTP, once the port's policy
/// allows the client; None (logged, counted) when it does not or the app cannot be
/// reached. The caller forwards.
async fn opaque(
    ctx: &Inbound,
    upstream: impl Future<Output = Result<Conn, ConnectError>>,
    policy: &PortPolicy,
    client: ClientAddr,
    identity: Option<&str>,
    labels: &TrafficLabels,
) -> Option<Conn> {
    let current: Arc<_> = policy.current();
    let peer = Peer {
        ip: client.0.ip(),
        identity,
    };
    let stats = &policy.stats;
    if !current.allows_connection(&peer) {
        stats.count(&stats.connections_denied);
        ctx.metrics.denied(labels);
        info!(%client, who = identity.unwrap_or("an unauthenticated client"),
            policy = %current.name, "connection denied by inbound policy");
        return None;
    }
    stats.count(&stats.connections_allowed);
    upstream
        .await
        .inspect_err(
            |error| info!(%error, "closing the client connection: the application is unreachable"),
        )
        .ok()
}
