//! The admin HTTP server: `/live`, `/ready`, `/metrics`, `/config`, and from loopback
//! only `/shutdown` and `/log-level`. Each request does a small, bounded amount of work,
//! so it can share a data path's runtime without taking from it — and a flood cannot
//! make it take more: each client address holds a few connections at most, the server
//! a bounded number, and `/metrics` is encoded at a bounded rate (what is refused is
//! counted in `<prefix>_admin_refused_total`).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::{exposition, log::LogLevel};

/// What must happen before the proxy is ready. Each guard names its reason; the proxy is
/// ready when every guard has been released and it is not draining.
#[derive(Debug, Default)]
pub struct Readiness {
    pending: Mutex<Vec<&'static str>>,
    draining: std::sync::atomic::AtomicBool,
}

impl Readiness {
    /// Holds readiness until [`Readiness::release`] is called with the same reason.
    pub fn hold(&self, reason: &'static str) {
        self.pending.lock().push(reason);
    }

    pub fn release(&self, reason: &'static str) {
        self.pending.lock().retain(|r| *r != reason);
    }

    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// `Ok` when ready, otherwise why not.
    pub fn check(&self) -> Result<(), String> {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("draining".into());
        }
        let pending = self.pending.lock();
        if pending.is_empty() {
            Ok(())
        } else {
            Err(format!("waiting for {}", pending.join(", ")))
        }
    }
}

/// Pages a binary adds under `/debug/`: its live state as JSON, for loopback clients
/// only (`kubectl port-forward` arrives there; the pod network does not).
pub trait DebugPages: Send + Sync + std::fmt::Debug {
    /// The pages there are.
    fn names(&self) -> &'static [&'static str];
    /// `/debug/<name>` as JSON text; None: no such page.
    fn page(&self, name: &str) -> Option<String>;
}

/// Everything the admin endpoints read or act on.
#[derive(Debug)]
pub struct Admin {
    pub registry: Registry,
    pub readiness: Arc<Readiness>,
    pub config_json: String,
    pub log: LogLevel,
    /// Cancelled by `POST /shutdown`.
    pub shutdown: CancellationToken,
    /// Set once what they show exists.
    pub debug: std::sync::OnceLock<Arc<dyn DebugPages>>,
    /// What `/metrics` may still encode this second.
    pub scrapes: ScrapeBudget,
}

/// Connections one client address may hold at once: a kubelet's probes, a Prometheus
/// scrape and a `remora` command together need a few.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 8;
/// Connections the admin server holds at once, all clients together.
pub const MAX_CONNECTIONS: usize = 128;
/// `/metrics` encodings a second (a burst of twice that): each costs the data path's
/// runtime a few milliseconds with many destinations; scrapers ask every 10 s or more.
pub const SCRAPES_PER_SECOND: f64 = 20.0;
/// How long a connection may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Admin connections and scrapes refused by the limits above, by reason; registered by
/// [`crate::register_common`] (one admin server per process).
pub(crate) static REFUSED: LazyLock<
    prometheus_client::metrics::family::Family<
        RefusedLabels,
        prometheus_client::metrics::counter::Counter,
    >,
> = LazyLock::new(Default::default);

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct RefusedLabels {
    /// `client_connections`, `connections` or `scrape_rate`.
    reason: &'static str,
}

fn refused(reason: &'static str) {
    REFUSED.get_or_create(&RefusedLabels { reason }).inc();
}

/// The connections each client address holds.
#[derive(Default)]
struct Held {
    by_client: HashMap<IpAddr, usize>,
    total: usize,
}

/// A held connection's slot, given back when it ends.
struct Slot {
    held: Arc<Mutex<Held>>,
    client: IpAddr,
}

impl Slot {
    /// A slot for `client`, or the reason there is none.
    fn take(held: &Arc<Mutex<Held>>, client: IpAddr) -> Result<Self, &'static str> {
        let mut h = held.lock();
        if h.total >= MAX_CONNECTIONS {
            return Err("connections");
        }
        let n = h.by_client.entry(client).or_default();
        if *n >= MAX_CONNECTIONS_PER_CLIENT {
            return Err("client_connections");
        }
        *n += 1;
        h.total += 1;
        Ok(Self {
            held: held.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut h = self.held.lock();
        h.total -= 1;
        if let Some(n) = h.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                h.by_client.remove(&self.client);
            }
        }
    }
}

/// One admin server's budget for `/metrics`: a token bucket of `SCRAPES_PER_SECOND`, a
/// burst of twice that.
#[derive(Debug)]
pub struct ScrapeBudget(Mutex<(Instant, f64)>);

impl Default for ScrapeBudget {
    fn default() -> Self {
        Self(Mutex::new((Instant::now(), 2.0 * SCRAPES_PER_SECOND)))
    }
}

impl ScrapeBudget {
    /// Takes a token if there is one.
    fn take(&self) -> bool {
        let mut bucket = self.0.lock();
        let now = Instant::now();
        let refill = now.duration_since(bucket.0).as_secs_f64() * SCRAPES_PER_SECOND;
        *bucket = (now, (bucket.1 + refill).min(2.0 * SCRAPES_PER_SECOND));
        if bucket.1 >= 1.0 {
            bucket.1 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Serves admin requests on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    let held = Arc::new(Mutex::new(Held::default()));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match Slot::take(&held, peer.ip().to_canonical()) {
            Ok(slot) => slot,
            Err(reason) => {
                // Closed at once: a flood costs an accept and a close.
                refused(reason);
                drop(stream);
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(&admin, peer, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(error) = conn.await {
                debug!(%error, "admin connection failed");
            }
        });
    }
}

/// Routes one admin request.
pub async fn handle(
    admin: &Admin,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let loopback = peer.ip().to_canonical().is_loopback();
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => match admin.readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        (&Method::GET, "/metrics") => {
            if !admin.scrapes.take() {
                refused("scrape_rate");
                let mut rsp = text(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many scrapes: try again in a second\n",
                );
                rsp.headers_mut()
                    .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                return rsp;
            }
            let mut body = String::with_capacity(16 * 1024);
            if prometheus_client::encoding::text::encode(&mut body, &admin.registry).is_err() {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics encoding failed\n",
                );
            }
            let accept = req.headers().get(header::ACCEPT);
            let (body, content_type) =
                if exposition::wants_openmetrics(accept.and_then(|a| a.to_str().ok())) {
                    (body, exposition::OPENMETRICS)
                } else {
                    (
                        exposition::prometheus_text(&body),
                        exposition::PROMETHEUS_TEXT,
                    )
                };
            let mut rsp = text(StatusCode::OK, body);
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            rsp
        }
        (&Method::GET, "/config") => {
            let mut rsp = text(StatusCode::OK, admin.config_json.clone());
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                "application/json".parse().expect("valid"),
            );
            rsp
        }
        (_, "/shutdown" | "/log-level") if !loopback => {
            text(StatusCode::FORBIDDEN, "only allowed from loopback\n")
        }
        (_, path) if path.starts_with("/debug/") && !loopback => {
            text(StatusCode::FORBIDDEN, "only allowed from loopback\n")
        }
        (&Method::GET, path) if path.starts_with("/debug/") => {
            let name = &path["/debug/".len()..];
            let pages = admin.debug.get();
            match pages.and_then(|p| p.page(name)) {
                Some(json) => {
                    let mut rsp = text(StatusCode::OK, json);
                    rsp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    rsp
                }
                None => {
                    let names = pages.map_or(&[][..], |p| p.names());
                    let list: Vec<String> = names.iter().map(|n| format!("/debug/{n}")).collect();
                    text(
                        StatusCode::NOT_FOUND,
                        format!("no such page: try {}\n", list.join(", ")),
                    )
                }
            }
        }
        (&Method::POST, "/shutdown") => {
            info!("shutdown requested through the admin server");
            admin.shutdown.cancel();
            text(StatusCode::ACCEPTED, "shutting down\n")
        }
        (&Method::GET, "/log-level") => text(StatusCode::OK, format!("{}\n", admin.log.get())),
        (&Method::PUT, "/log-level") => {
            let body = match Limited::new(req.into_body(), 4096).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::BAD_REQUEST, "body too large or unreadable\n"),
            };
            let filter = String::from_utf8_lossy(&body).trim().to_string();
            match admin.log.set(&filter) {
                Ok(()) => {
                    info!(%filter, "log filter changed");
                    text(StatusCode::OK, format!("{filter}\n"))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (_, "/live" | "/ready" | "/metrics" | "/config" | "/shutdown" | "/log-level") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live, /ready, /metrics or /config\n",
        ),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(body.into()));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("valid"),
    );
    rsp
}
