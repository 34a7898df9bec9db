//! HTTP proxying: serves a detected HTTP/1 or HTTP/2 client connection with hyper and
//! forwards each request upstream, streaming bodies and trailers, and continuing
//! upgraded (`101`) and `CONNECT` exchanges as raw byte streams.

mod body;
mod client_body;
mod forward;
pub mod headers;
pub mod pool;
pub mod replay;
mod upstream;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::{
    body::Incoming,
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use body::{MeteredBody, grpc_status};
pub use client_body::{BodyFailed, ClientBody};
pub use forward::{Forward, ForwardError, Guard, NoGuard, Sent, absolute};
pub use headers::{strip_hop_by_hop, upgrade_requested, wants_upgrade};
pub use upstream::{Upstream, UpstreamError, Version};

use crate::metrics::{HttpMetrics, RouteLabels};

/// The header that says why the proxy, not the application, produced a response.
pub const ERROR_HEADER: &str = "remora-error";

/// What a proxied response's body is: the upstream's stream, or the proxy's own message.
pub type ProxyBody<G> = MeteredBody<Either<Incoming, Full<Bytes>>, G>;

/// How one client connection is served.
#[derive(Debug)]
pub struct Served {
    pub metrics: HttpMetrics,
    /// Cancelled when the proxy drains: in-flight requests finish, then the connection
    /// closes.
    pub drain: CancellationToken,
    /// How long a connection may go with no request in flight (None: as long as the
    /// client keeps it): an HTTP/1 connection waiting for a request's headers, an
    /// HTTP/2 connection with no stream being answered (then closed with GOAWAY, its
    /// streams let finish). The app's own connections stay as long as it keeps them; a
    /// client from off the pod waiting for its next request counts as idle TCP does.
    pub idle_timeout: Option<std::time::Duration>,
    /// For tunnels (upgrades and `CONNECT`), which are opaque TCP once established.
    pub idle: crate::tcp::Idle,
}

/// Serves one client connection until it closes, or until the drain asks it to finish
/// its in-flight requests and close.
pub async fn serve<I, F>(io: I, fwd: F, served: Served)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Forward,
{
    let Served {
        metrics,
        drain,
        idle_timeout,
        idle,
    } = served;
    let fwd = Arc::new(fwd);
    let idle_closed = idle.closed.clone();
    let idle = Arc::new(idle);
    let version = fwd.version();
    let abuse = metrics.abuse();
    // Requests in flight are tracked only where an idle HTTP/2 connection is closed:
    // nothing is added to other connections' requests.
    let activity = (matches!(version, Version::Http2) && idle_timeout.is_some())
        .then(|| Arc::new(Activity::new()));
    let svc = {
        let activity = activity.clone();
        service_fn(move |req| {
            let (fwd, metrics, idle) = (fwd.clone(), metrics.clone(), idle.clone());
            let busy = activity.as_ref().map(Activity::begin);
            async move {
                let rsp = forward(req, &*fwd, metrics, idle).await;
                drop(busy);
                Ok::<_, Infallible>(rsp)
            }
        })
    };
    let io = TokioIo::new(io);
    let result = match version {
        Version::Http1 => {
            // A proxy adds no `Date` of its own: the upstream's, if any, passes through.
            // hyper's default closes a connection that waits 30 s for a request's headers,
            // idle keep-alive included, which races every client pool that keeps
            // connections longer (`idle_timeout` says how long instead).
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .auto_date_header(false)
                .header_read_timeout(idle_timeout)
                .serve_connection(io, svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = drain.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Version::Http2 => {
            // Nor in a trailers-only gRPC answer, where it would read as trailing metadata.
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .auto_date_header(false)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            loop {
                let watched = activity.as_deref().zip(idle_timeout);
                let idle_at = watched.map(|(a, t)| a.idle_deadline(t));
                tokio::select! {
                    r = conn.as_mut() => break r,
                    _ = drain.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        break conn.await;
                    }
                    _ = sleep_until(idle_at) => {
                        if watched.is_some_and(|(a, t)| a.idle_for(t)) {
                            idle_closed.inc();
                            debug!(timeout = ?idle_timeout, "HTTP/2 connection idle: GOAWAY");
                            conn.as_mut().graceful_shutdown();
                            break conn.await;
                        }
                    }
                }
            }
        }
    };
    if let Err(error) = result {
        if abused(&error) {
            // h2 ends a connection whose client resets or breaks streams faster than
            // it uses them (rapid reset, CVE-2023-44487): counted, and said once.
            abuse.inc();
            tracing::info!(%error, "HTTP/2 connection ended for abuse (GOAWAY ENHANCE_YOUR_CALM)");
        } else {
            debug!(%error, "HTTP connection ended with an error");
        }
    }
}

/// Requests in flight on a connection, and since when it has had none.
struct Activity {
    start: tokio::time::Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `start` to when the last request in flight ended.
    idle_since: AtomicU64,
}

/// One request in flight, until dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since
            .store(a.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Release);
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Acquire);
        Busy(self.clone())
    }

    /// When the connection will have been idle for `timeout`, as things stand: a
    /// timeout from now while a request is in flight.
    fn idle_deadline(&self, timeout: std::time::Duration) -> tokio::time::Instant {
        match self.in_flight.load(Ordering::Acquire) {
            0 => {
                self.start
                    + std::time::Duration::from_millis(self.idle_since.load(Ordering::Relaxed))
                    + timeout
            }
            _ => tokio::time::Instant::now() + timeout,
        }
    }

    /// Whether the connection has now gone `timeout` with no request in flight.
    fn idle_for(&self, timeout: std::time::Duration) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.idle_deadline(timeout) <= tokio::time::Instant::now()
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether a connection's error is the GOAWAY ENHANCE_YOUR_CALM the server side sent.
fn abused(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away()
                && !h2.is_remote()
                && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        source = e.source();
    }
    false
}

/// Forwards one request and returns what the client should see.
async fn forward<F: Forward>(
    mut req: Request<Incoming>,
    fwd: &F,
    metrics: HttpMetrics,
    idle: Arc<crate::tcp::Idle>,
) -> Response<ProxyBody<F::Guard>> {
    metrics.requests.inc();
    let start = Instant::now();
    let grpc = is_grpc(req.headers());
    if !fwd.trusts_orig_proto() {
        req.headers_mut().remove(pool::ORIG_PROTO);
    }
    // What the access log says of the request, kept only when it is on.
    let head = metrics.access_log().map(|_| Head::of(&req));
    if let Some(reason) = fwd.admit(&req) {
        metrics.denied.inc();
        let rsp = error_response(StatusCode::FORBIDDEN, &reason, grpc).map(Either::Right);
        let request = metrics.routed(RouteLabels::default());
        request.answered_after(start.elapsed());
        if let Some(head) = head {
            log_request(request.http(), head, 403, start.elapsed(), &Sent::default());
        }
        let (parts, body) = rsp.into_parts();
        let body = MeteredBody::new(body, request, 403, &parts.headers, None);
        return Response::from_parts(parts, body);
    }
    let upgrade = wants_upgrade(&req);
    let connect = req.method() == Method::CONNECT;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    strip_hop_by_hop(req.headers_mut(), upgrade);

    let (parts, body) = req.into_parts();
    let (body, client_failed) = ClientBody::new(body);
    let req = Request::from_parts(parts, body);
    let mut sent = Sent::default();
    let result = fwd.send(req, &mut sent).await;
    // The access log tells the route even where the metrics omit it.
    let route = match &head {
        Some(_) => sent.route.clone(),
        None => std::mem::take(&mut sent.route),
    };
    let request = metrics.routed(route);
    let (response, in_flight) = match result {
        Ok((mut rsp, in_flight)) => {
            let switched = rsp.status() == StatusCode::SWITCHING_PROTOCOLS
                || (connect && rsp.status().is_success());
            strip_hop_by_hop(rsp.headers_mut(), switched);
            if let (true, Some(client_upgrade)) = (switched, client_upgrade) {
                let server_upgrade = hyper::upgrade::on(&mut rsp);
                tokio::spawn(tunnel(client_upgrade, server_upgrade, idle));
            }
            (rsp.map(Either::Left), in_flight)
        }
        // The client broke its own body (malformed chunks, cut short): its fault, not
        // the upstream's, whatever the upstream made of it.
        Err(error) if client_failed.get() => {
            debug!(%error, "the client's request body failed");
            let reason = "the request body was malformed or cut short";
            let rsp = error_response(StatusCode::BAD_REQUEST, reason, grpc);
            (rsp.map(Either::Right), None)
        }
        Err(error) => {
            debug!(%error, "request failed");
            let rsp = error_response(error.status(), &error.to_string(), grpc);
            (rsp.map(Either::Right), None)
        }
    };
    let elapsed = start.elapsed();
    request.answered_after(elapsed);
    let status = response.status().as_u16();
    if let Some(head) = head {
        log_request(request.http(), head, status, elapsed, &sent);
    }
    let (parts, body) = response.into_parts();
    let body = MeteredBody::new(body, request, status, &parts.headers, in_flight);
    Response::from_parts(parts, body)
}

/// A request's method, authority and path, for the access log.
struct Head {
    method: Method,
    authority: String,
    path: String,
}

impl Head {
    fn of<B>(req: &Request<B>) -> Self {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            })
            .unwrap_or_default();
        Self {
            method: req.method().clone(),
            authority,
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
        }
    }
}

/// Writes the request's access log line (the log is on: `head` was kept).
fn log_request(
    metrics: &HttpMetrics,
    head: Head,
    status: u16,
    duration: std::time::Duration,
    sent: &Sent,
) {
    let Some(log) = metrics.access_log() else {
        return;
    };
    let labels = metrics.labels();
    log.record(&crate::access_log::Record {
        direction: labels.direction.as_str(),
        method: head.method.as_str(),
        authority: &head.authority,
        path: &head.path,
        status,
        duration,
        retries: sent.retries,
        route: sent.rule.as_deref().unwrap_or(""),
        backend: &sent.route.backend,
        endpoint: sent.endpoint,
        peer_identity: metrics.peer_identity(),
        target: &labels.target,
    });
}

/// Copies bytes between an upgraded client connection and its upgraded upstream.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    server: hyper::upgrade::OnUpgrade,
    idle: Arc<crate::tcp::Idle>,
) {
    match tokio::try_join!(client, server) {
        Ok((client, server)) => {
            crate::tcp::forward(TokioIo::new(client), TokioIo::new(server), &idle).await
        }
        Err(error) => debug!(%error, "upgrade did not complete"),
    }
}

pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A response made by the proxy. gRPC clients get a trailers-only response with
/// `PERMISSION_DENIED` (7) for a 403 and `UNAVAILABLE` (14) otherwise, which their
/// libraries understand; others get `status`.
pub fn error_response(status: StatusCode, reason: &str, grpc: bool) -> Response<Full<Bytes>> {
    let reason_value =
        HeaderValue::from_str(reason).unwrap_or(HeaderValue::from_static("proxy error"));
    let mut rsp = Response::new(Full::new(Bytes::new()));
    if grpc {
        let h = rsp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let code = if status == StatusCode::FORBIDDEN {
            "7"
        } else {
            "14"
        };
        h.insert("grpc-status", HeaderValue::from_static(code));
        h.insert("grpc-message", reason_value.clone());
    } else {
        *rsp.status_mut() = status;
        *rsp.body_mut() = Full::new(Bytes::from(format!("{reason}\n")));
        rsp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    rsp.headers_mut().insert(ERROR_HEADER, reason_value);
    rsp
}

#[cfg(test)]
mod keep_alive_tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use hyper::client::conn::http1 as client;

    use super::*;
    use crate::{
        addr::OrigDst,
        metrics::{Direction, Metrics, TrafficLabels},
    };

    /// An app answering every request `200 ok`, on a real socket.
    async fn app() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
            }
        });
        addr
    }

    /// Issue 12: the proxy closed an app's idle keep-alive connection after 30 s
    /// (hyper's header-read timer), exposing the app to the keep-alive race.
    #[tokio::test(start_paused = true)]
    async fn an_apps_idle_keep_alive_connection_stays_open() {
        let upstream = app().await;
        let (app_side, proxy_side) = tokio::io::duplex(64 * 1024);
        let fwd = Upstream::new(
            OrigDst(upstream),
            Version::Http1,
            None,
            Duration::from_secs(3600),
        );
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let served = Served {
            metrics: metrics.http(TrafficLabels {
                direction: Direction::Outbound,
                target: Arc::from("passthrough"),
                tls: false,
                peer_identity: Arc::from(""),
                authz_name: Arc::from(""),
            }),
            drain: CancellationToken::new(),
            idle_timeout: None,
            idle: crate::tcp::Idle::default(),
        };
        tokio::spawn(serve(proxy_side, fwd, served));
        let (mut sender, conn) = client::handshake(TokioIo::new(app_side)).await.unwrap();
        let conn = tokio::spawn(conn);
        for _ in 0..3 {
            sender.ready().await.expect("the connection is still open");
            let req = Request::get("/")
                .header("host", "app")
                .body(Full::new(Bytes::new()));
            let rsp = sender.send_request(req.unwrap()).await.unwrap();
            assert_eq!(rsp.status(), 200);
            rsp.into_body().collect().await.unwrap();
            // Longer than hyper's 30 s, as client pools keep connections (Go's 90 s).
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
        assert!(!conn.is_finished(), "the proxy closed the idle connection");
    }
}
