//! The data path: accept loops for the inbound and outbound listeners, and the
//! per-connection pipeline accept → original destination → detect → forward.

use std::{borrow::Cow, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    addr::{ClientAddr, OrigDst},
    authz::InboundPolicies,
    connect::{Conn, ConnectError, Connector, connect, orig_dst, reset},
    detect::{Detection, RaceError, race},
    discovery::{Discovery, Endpoint, Target, View},
    http::{self, Route, Upstream, Version},
    inbound,
    io::{CountingIo, PrefixedIo},
    metrics::{DetectResult, Direction, Metrics, TrafficLabels},
    tcp,
    tls::{Alpn, TlsContext},
};

/// What every connection task shares.
#[derive(Debug)]
pub struct Ctx {
    pub opaque_ports: Vec<remora_config::PortRange>,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    /// Outbound connections: mTLS to meshed endpoints once the proxy has a certificate.
    pub connector: Connector,
    /// Present when the proxy has an identity.
    pub tls: Option<Arc<TlsContext>>,
    /// Inbound authorization, per port.
    pub policies: Arc<InboundPolicies>,
    pub metrics: Metrics,
    /// Present when a controller is configured.
    pub discovery: Option<Arc<Discovery>>,
    pub discovery_wait: Duration,
    pub preconnect_delay: Duration,
    /// Inbound connections open at once, at most (`REMORA_INBOUND_MAX_CONNECTIONS`).
    pub inbound_slots: Arc<Semaphore>,
    /// When opaque connections count as idle, for each direction.
    pub idle_inbound: tcp::Idle,
    pub idle_outbound: tcp::Idle,
    /// Cancelled when the inbound side drains (after the shutdown delay), and when
    /// the outbound side does (as the proxy exits).
    pub drain_inbound: CancellationToken,
    pub drain_outbound: CancellationToken,
    /// Every connection task of each side, so shutdown can wait for them.
    pub tracker_inbound: TaskTracker,
    pub tracker_outbound: TaskTracker,
    /// Outbound connections accepted so far: a draining proxy watches the app's use.
    pub outbound_accepted: std::sync::atomic::AtomicU64,
}

/// An accepted connection and where it was going.
#[derive(Debug, Clone, Copy)]
struct Accept {
    direction: Direction,
    orig_dst: OrigDst,
}

impl Ctx {
    pub fn is_opaque_port(&self, port: u16) -> bool {
        self.opaque_ports.iter().any(|r| r.contains(port))
    }

    /// What tells `direction`'s connections to finish and its listeners to stop.
    pub fn drain(&self, direction: Direction) -> &CancellationToken {
        match direction {
            Direction::Inbound => &self.drain_inbound,
            Direction::Outbound => &self.drain_outbound,
        }
    }

    /// `direction`'s connection tasks.
    pub fn tracker(&self, direction: Direction) -> &TaskTracker {
        match direction {
            Direction::Inbound => &self.tracker_inbound,
            Direction::Outbound => &self.tracker_outbound,
        }
    }

    pub fn idle(&self, direction: Direction) -> &tcp::Idle {
        match direction {
            Direction::Inbound => &self.idle_inbound,
            Direction::Outbound => &self.idle_outbound,
        }
    }
}

/// Accepts connections until the drain starts.
pub async fn accept_loop(listener: TcpListener, direction: Direction, ctx: Arc<Ctx>) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.drain(direction).cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, client)) => {
                // Any client can open inbound connections: past the limit they are reset
                // at once, so none can exhaust memory or file descriptors.
                let slot = match direction {
                    Direction::Inbound => match ctx.inbound_slots.clone().try_acquire_owned() {
                        Ok(slot) => Some(slot),
                        Err(_) => {
                            ctx.metrics.tcp_refused(direction).inc();
                            debug!(%client, "inbound connection limit reached: connection reset");
                            reset(&stream);
                            continue;
                        }
                    },
                    Direction::Outbound => {
                        ctx.outbound_accepted
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        None
                    }
                };
                let ctx2 = ctx.clone();
                ctx.tracker(direction).spawn(async move {
                    serve_connection(ctx2, direction, stream, ClientAddr(client)).await;
                    drop(slot);
                });
            }
            Err(error) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(%error, direction = direction.as_str(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(
    ctx: Arc<Ctx>,
    direction: Direction,
    stream: TcpStream,
    client: ClientAddr,
) {
    let _ = stream.set_nodelay(true);
    let orig_dst = match orig_dst(&stream) {
        Ok(dst) if stream.local_addr().ok() != Some(dst.0) => dst,
        Ok(dst) => {
            // Not redirected by iptables: forwarding would connect back to ourselves.
            warn!(%client, %dst, direction = direction.as_str(),
                "refusing a connection made to the proxy's own port rather than redirected to it");
            reset(&stream);
            return;
        }
        Err(error) => {
            warn!(%client, %error, "refusing a connection without an original destination \
                (is conntrack available in this network namespace?)");
            reset(&stream);
            return;
        }
    };
    let accept = Accept {
        direction,
        orig_dst,
    };
    // `tls` and `peer` are recorded once known, so every log line of the connection
    // carries them.
    let span = info_span!(
        "conn",
        dir = direction.as_str(),
        client = %client,
        dst = %orig_dst,
        tls = tracing::field::Empty,
        peer = tracing::field::Empty,
    );
    match direction {
        Direction::Outbound => {
            Box::pin(dispatch(&ctx, accept, stream))
                .instrument(span)
                .await
        }
        Direction::Inbound => {
            Box::pin(inbound::dispatch(&ctx, orig_dst, client, stream))
                .instrument(span)
                .await
        }
    }
}

/// Where a connection goes, as discovery says.
enum Dest {
    /// The original destination, as-is.
    Passthrough,
    /// A Service's endpoints, balanced; or a meshed pod's one endpoint (its `name` is
    /// then `passthrough`), so its traffic gets mTLS and pooled HTTP/2 the same way.
    Service { target: Arc<Target>, name: Arc<str> },
}

/// Asks discovery about an outbound connection's destination. Anything not known to
/// be a Service or a meshed pod (an unknown address, an unmeshed pod, or no answer
/// within the wait) is passthrough.
async fn resolve(ctx: &Ctx, accept: &Accept) -> Dest {
    let (Some(discovery), Direction::Outbound) = (&ctx.discovery, accept.direction) else {
        return Dest::Passthrough;
    };
    let target = discovery.target(accept.orig_dst);
    let mut views = target.views.clone();
    let view =
        match tokio::time::timeout(ctx.discovery_wait, views.wait_for(|v| *v != View::Pending))
            .await
        {
            Ok(Ok(v)) => v.clone(),
            _ => {
                debug!("no answer from discovery in time: passthrough");
                return Dest::Passthrough;
            }
        };
    match view {
        View::Service {
            name,
            headless: false,
            ..
        } => Dest::Service { target, name },
        View::Pod { endpoints } if endpoints.iter().any(|e| e.identity.is_some()) => {
            Dest::Service {
                target,
                name: Arc::from("passthrough"),
            }
        }
        _ => Dest::Passthrough,
    }
}

/// The `tls` and `peer_identity` labels of an outbound connection: encrypted when every
/// endpoint is meshed and this proxy has an identity; the peer is named when all of
/// them prove the same identity (one Service, one ServiceAccount, as usual).
fn peer_labels(ctx: &Ctx, dest: &Dest) -> (bool, Cow<'static, str>) {
    let Dest::Service { target, .. } = dest else {
        return (false, Cow::Borrowed(""));
    };
    let view = target.views.borrow();
    let endpoints: &[Endpoint] = match &*view {
        View::Service { endpoints, .. } | View::Pod { endpoints } => endpoints,
        _ => &[],
    };
    let encrypted = !endpoints.is_empty()
        && endpoints
            .iter()
            .all(|e| ctx.connector.encrypts(e.identity.as_ref()));
    if !encrypted {
        return (false, Cow::Borrowed(""));
    }
    let first = endpoints[0].identity.as_ref().map(|i| &i.spiffe_id);
    let same = endpoints
        .iter()
        .all(|e| e.identity.as_ref().map(|i| &i.spiffe_id) == first);
    match (same, first) {
        (true, Some(id)) => (true, Cow::Owned(id.to_string())),
        _ => (true, Cow::Borrowed("")),
    }
}

/// Connects for opaque TCP: to the original destination, or to a balanced endpoint
/// (over mTLS when it is meshed).
async fn connect_dest(ctx: &Ctx, dest: &Dest, orig_dst: OrigDst) -> Result<Conn, ConnectError> {
    match dest {
        Dest::Passthrough => connect(orig_dst, ctx.connect_timeout)
            .await
            .map(Conn::Plain),
        Dest::Service { target, name } => {
            let no_endpoints = || ConnectError::NoEndpoints {
                service: name.clone(),
            };
            let endpoints = http::route::endpoints(target, ctx.discovery_wait)
                .await
                .ok_or_else(no_endpoints)?;
            // The policy's algorithm; a connection's outcome is not a request's, so the
            // circuit breaker (and its probes) are left to HTTP.
            let algorithm = target.policy(ctx.discovery_wait).await.algorithm;
            let policy = crate::policy::RoutePolicy {
                algorithm,
                ..Default::default()
            };
            // A connect that fails sent nothing: another endpoint is tried at once.
            let mut avoid = None;
            let mut tries = 0;
            loop {
                let ep = target
                    .balancer
                    .pick_avoiding(&endpoints, &policy, avoid)
                    .map_err(|_| no_endpoints())?;
                let mut in_flight = ep.start();
                match ctx
                    .connector
                    .connect(OrigDst(ep.addr), ep.clients.identity(), Alpn::Opaque)
                    .await
                {
                    Ok(conn) => {
                        ep.connected();
                        in_flight.answered();
                        return Ok(conn);
                    }
                    Err(error) => {
                        ep.connect_failed();
                        in_flight.settle(false);
                        if tries >= crate::http::route::CONNECT_RETRIES {
                            return Err(error);
                        }
                        debug!(%error, endpoint = %ep.addr, "connect failed: trying another endpoint");
                        tries += 1;
                        avoid = Some(ep.addr);
                    }
                }
            }
        }
    }
}

/// An outbound connection: resolves the destination, detects the protocol while
/// connecting upstream, then forwards.
async fn dispatch(ctx: &Ctx, accept: Accept, stream: TcpStream) {
    let dest = resolve(ctx, &accept).await;
    if let Dest::Service { target, .. } = &dest {
        // The labels say whether the endpoints are meshed: a Service whose endpoints are
        // not known yet gets the moment its first request would wait for them anyway.
        let _ = http::route::endpoints(target, ctx.discovery_wait).await;
    }
    let (tls, peer_identity) = peer_labels(ctx, &dest);
    let labels = TrafficLabels {
        direction: accept.direction,
        target: match &dest {
            Dest::Service { name, .. } => Cow::Owned(name.to_string()),
            Dest::Passthrough => Cow::Borrowed("passthrough"),
        },
        tls,
        peer_identity,
    };
    let span = tracing::Span::current();
    span.record("tls", labels.tls);
    if !labels.peer_identity.is_empty() {
        span.record("peer", &*labels.peer_identity);
    }
    let conn = ctx.metrics.connection(&labels);
    let mut io = CountingIo::new(stream, conn.read.clone(), conn.written.clone());
    let port = accept.orig_dst.0.port();
    let start = Instant::now();

    if ctx.is_opaque_port(port) {
        ctx.metrics
            .detected(accept.direction, DetectResult::OpaquePort, start.elapsed());
        match connect_dest(ctx, &dest, accept.orig_dst).await {
            Ok(upstream) => tcp::forward(io, upstream, ctx.idle(accept.direction)).await,
            Err(error) => refuse(io.get_ref(), &error),
        }
        return;
    }

    // Connecting ahead lets a server that speaks first be heard. For a Service it waits
    // a moment: an HTTP client speaks at once, and its requests are balanced over
    // pooled connections instead.
    let delay = match dest {
        Dest::Passthrough => Duration::ZERO,
        Dest::Service { .. } => ctx.preconnect_delay,
    };
    let mut connecting = Box::pin(async {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        connect_dest(ctx, &dest, accept.orig_dst).await
    });
    let Some(Detection {
        result,
        prefix,
        upstream,
    }) = detect(ctx, &mut io, connecting.as_mut(), accept.direction, start).await
    else {
        return;
    };
    debug!(
        result = result.as_str(),
        bytes = prefix.len(),
        "protocol detected"
    );
    let io = PrefixedIo::new(prefix, io);

    let version = match result {
        DetectResult::Http1 => Version::Http1,
        DetectResult::Http2 => Version::Http2,
        _ => {
            let upstream = match upstream {
                Some(s) => s,
                None => match connecting.await {
                    Ok(s) => s,
                    Err(error) => return refuse(io.into_parts().1.get_ref(), &error),
                },
            };
            return tcp::forward(io, upstream, ctx.idle(accept.direction)).await;
        }
    };
    let route = match &dest {
        Dest::Service { target, name } => {
            // A connection made ahead for a slow client is not needed: requests are pooled.
            drop((upstream, connecting));
            Route::Balanced {
                target: target.clone(),
                service: name.clone(),
                version,
                orig_dst: accept.orig_dst,
                wait: ctx.discovery_wait,
                counters: ctx.metrics.counters(&labels),
            }
        }
        Dest::Passthrough => {
            // An HTTP client whose destination cannot be reached gets a 502 that says why.
            let fresh = match upstream {
                Some(s) => Ok(s),
                None => connecting.await,
            };
            Route::Passthrough(Upstream::new(
                accept.orig_dst,
                version,
                Some(fresh),
                ctx.connect_timeout,
            ))
        }
    };
    let served = http::Served {
        metrics: ctx.metrics.http(labels),
        drain: ctx.drain_outbound.clone(),
        admission: None,
        idle: ctx.idle(accept.direction).clone(),
    };
    http::serve(io, route, served).await;
}

/// The destination cannot be reached: the client sees a reset, as if it had been refused.
/// Detects the protocol while `connecting` goes on (see [`race`]) and records it. None
/// when the client went away (logged) or the connection ahead failed (the client is
/// refused).
pub(crate) async fn detect(
    ctx: &Ctx,
    io: &mut CountingIo<TcpStream>,
    connecting: std::pin::Pin<&mut (impl Future<Output = Result<Conn, ConnectError>> + ?Sized)>,
    direction: Direction,
    start: Instant,
) -> Option<Detection> {
    match race(io, connecting, ctx.detect_timeout).await {
        Ok(d) => {
            ctx.metrics.detected(direction, d.result, start.elapsed());
            Some(d)
        }
        Err(RaceError::Client(error)) => {
            debug!(%error, "client connection failed during detection");
            None
        }
        Err(RaceError::Connect(error)) => {
            refuse(io.get_ref(), &error);
            None
        }
    }
}

pub(crate) fn refuse(client: &TcpStream, error: &ConnectError) {
    info!(%error, "closing the client connection: its destination is unreachable");
    reset(client);
}
