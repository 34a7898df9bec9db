//! The inbound data path: a connection to the pod, redirected to :4143. Its first
//! bytes decide: a TLS ClientHello naming this proxy's identity is terminated (mTLS,
//! the client's identity learnt from its certificate); any other TLS passes through
//! untouched; plaintext is detected as before. Then the port's policy decides, and the
//! traffic goes to the application at the original destination (the pod's own IP).

use std::{borrow::Cow, future::Future, sync::Arc, time::Duration};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::Instant,
};
use tracing::{debug, info};

use crate::{
    addr::{ClientAddr, OrigDst},
    authz::{Peer, PortPolicy},
    connect::{Conn, ConnectError, Connector, connect, reset},
    detect::Detection,
    http::{self, Admission, Route, Upstream, Version, pool::EndpointClients},
    io::{CountingIo, PrefixedIo},
    metrics::{DetectResult, Direction, TrafficLabels},
    proxy::{Ctx, detect},
    tcp,
    tls::{self, Alpn},
};

/// Serves one inbound connection.
pub async fn dispatch(ctx: &Ctx, orig_dst: OrigDst, client: ClientAddr, stream: TcpStream) {
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
    }) = detect(ctx, &mut io, connecting.as_mut(), Direction::Inbound, start).await
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
        let target = if ctx.policies.is_served(port) {
            Cow::Owned(port.to_string())
        } else {
            Cow::Borrowed("other")
        };
        TrafficLabels {
            direction: Direction::Inbound,
            target,
            tls,
            peer_identity: Cow::Owned(peer.unwrap_or_default().to_string()),
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
                return opaque(ctx, io, app, &policy, client, None, &labels).await;
            }
        };
        let admission = Admission {
            policy,
            ip: client.0.ip(),
            identity: None,
        };
        // The connection made during detection, if any; otherwise one on demand.
        let fresh = upstream.map(Ok);
        let route = Route::Passthrough(Upstream::new(orig_dst, version, fresh, timeout));
        return http::serve(io, route, served(ctx, labels, admission)).await;
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
    let route = match alpn {
        // Requests from another proxy, HTTP/1 ones marked with their version: each to
        // the application as the version its client spoke.
        Some(Alpn::H2) if !opaque_port => Route::Local {
            clients: Box::new(EndpointClients::new(
                orig_dst.0,
                None,
                Connector::plain(ctx.connect_timeout),
            )),
            orig_dst,
        },
        // Upgrades and CONNECT, which HTTP/2 between proxies cannot carry.
        Some(Alpn::Http1) if !opaque_port => Route::Passthrough(Upstream::new(
            orig_dst,
            Version::Http1,
            upstream.map(Ok),
            timeout,
        )),
        _ => {
            let peer = identity.as_deref();
            let app = app(upstream, orig_dst, timeout);
            return opaque(ctx, stream, app, &policy, client, peer, &labels).await;
        }
    };
    http::serve(stream, route, served(ctx, labels, admission)).await;
}

/// How an inbound HTTP connection is served: every request admitted by the policy.
fn served(ctx: &Ctx, labels: TrafficLabels, admission: Admission) -> http::Served {
    http::Served {
        metrics: ctx.metrics.http(labels),
        drain: ctx.drain_inbound.clone(),
        admission: Some(admission),
        idle: ctx.idle_inbound.clone(),
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

/// Forwards a connection that is not HTTP, if the port's policy allows the client.
async fn opaque<I>(
    ctx: &Ctx,
    io: I,
    upstream: impl Future<Output = Result<Conn, ConnectError>>,
    policy: &PortPolicy,
    client: ClientAddr,
    identity: Option<&str>,
    labels: &TrafficLabels,
) where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let current: Arc<_> = policy.current();
    let peer = Peer {
        ip: client.0.ip(),
        identity,
    };
    if !current.allows_connection(&peer) {
        ctx.metrics.denied(labels);
        info!(%client, who = identity.unwrap_or("an unauthenticated client"),
            policy = %current.name, "connection denied by inbound policy");
        return;
    }
    match upstream.await {
        Ok(upstream) => tcp::forward(io, upstream, &ctx.idle_inbound).await,
        Err(error) => {
            info!(%error, "closing the client connection: the application is unreachable")
        }
    }
}
