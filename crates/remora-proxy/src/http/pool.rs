//! Connection pools per endpoint: hyper-util's pooled client, one per endpoint and
//! HTTP version, whose connector always dials that endpoint. Requests keep their own
//! authority (`Host`, `:authority`); the pool keeps idle connections alive and reuses
//! HTTP/2 connections for many streams.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Method, Request, Response, header};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};

use super::Version;
use crate::{
    addr::OrigDst,
    connect::{Conn, ConnectError, Connector},
    tls::{Alpn, PeerId},
};

/// How long an idle pooled connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Carries an HTTP/1 request's version across the HTTP/2 connection between proxies, so
/// the server's proxy hands the application HTTP/1 again.
pub const ORIG_PROTO: &str = "remora-orig-proto";

/// A request body sent to an endpoint: the client's stream (copied for a retry when
/// one may follow), or bytes kept for replay.
pub type ReqBody = http_body_util::Either<super::replay::Tee, http_body_util::Full<bytes::Bytes>>;

pub type PooledClient = Client<Dial, ReqBody>;

/// Dials one endpoint, whatever the request's URI says.
#[derive(Debug, Clone)]
pub struct Dial {
    addr: SocketAddr,
    peer: Option<PeerId>,
    alpn: Alpn,
    connector: Connector,
    /// The endpoint's connections open now, for `/debug/targets`.
    open: Arc<AtomicUsize>,
}

/// A pooled connection, counted while it is open.
#[derive(Debug)]
pub struct Counted {
    conn: Conn,
    open: Arc<AtomicUsize>,
}

impl Counted {
    fn new(conn: Conn, open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self { conn, open }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.conn).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.conn).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.conn.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.conn).poll_shutdown(cx)
    }
}

impl hyper_util::client::legacy::connect::Connection for Counted {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.conn.connected()
    }
}

impl tower_service::Service<http::Uri> for Dial {
    type Response = TokioIo<Counted>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let dial = self.clone();
        Box::pin(async move {
            dial.connector
                .connect(OrigDst(dial.addr), dial.peer.as_ref(), dial.alpn)
                .await
                .map(|conn| TokioIo::new(Counted::new(conn, dial.open.clone())))
        })
    }
}

/// The pooled clients of one endpoint, made on first use. To a meshed endpoint every
/// request rides one multiplexed mTLS HTTP/2 connection, HTTP/1 ones marked with
/// [`ORIG_PROTO`]; only upgrades and CONNECT, which HTTP/2 cannot carry as they are,
/// use HTTP/1 over mTLS.
#[derive(Debug)]
pub struct EndpointClients {
    addr: SocketAddr,
    identity: Option<PeerId>,
    connector: Connector,
    http1: OnceLock<PooledClient>,
    http2: OnceLock<PooledClient>,
    /// Connections open now, both versions.
    open: Arc<AtomicUsize>,
}

impl EndpointClients {
    pub fn new(addr: SocketAddr, identity: Option<PeerId>, connector: Connector) -> Self {
        Self {
            addr,
            identity,
            connector,
            http1: OnceLock::new(),
            http2: OnceLock::new(),
            open: Arc::default(),
        }
    }

    /// The connections to this endpoint open now (pooled, idle or busy).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn identity(&self) -> Option<&PeerId> {
        self.identity.as_ref()
    }

    /// Whether requests to this endpoint travel over mTLS.
    pub fn encrypted(&self) -> bool {
        self.connector.encrypts(self.identity.as_ref())
    }

    fn client(&self, version: Version) -> &PooledClient {
        let cell = match version {
            Version::Http1 => &self.http1,
            Version::Http2 => &self.http2,
        };
        cell.get_or_init(|| {
            let mut b = Client::builder(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(self.connector.idle_timeout().unwrap_or(IDLE_TIMEOUT))
                // The proxy forwards the client's Host header untouched.
                .set_host(false)
                .http2_only(version == Version::Http2);
            b.build(Dial {
                addr: self.addr,
                peer: self.identity.clone(),
                alpn: match version {
                    Version::Http1 => Alpn::Http1,
                    Version::Http2 => Alpn::H2,
                },
                connector: self.connector.clone(),
                open: self.open.clone(),
            })
        })
    }

    /// Whether `req`, which arrived as `version`, travels over a multiplexed HTTP/2
    /// connection: HTTP/2 requests, and HTTP/1 ones to a meshed endpoint (not tunnels).
    pub fn multiplexed<B>(&self, req: &Request<B>, version: Version) -> bool {
        let tunnel = req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE);
        version == Version::Http2 || (!tunnel && self.encrypted())
    }

    /// Sends a request that arrived as `version` (its URI absolute).
    pub async fn send(
        &self,
        mut req: Request<ReqBody>,
        version: Version,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        if version == Version::Http1 && self.multiplexed(&req, version) {
            let orig = req.version();
            let value = if orig == http::Version::HTTP_10 {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            };
            req.headers_mut()
                .insert(ORIG_PROTO, HeaderValue::from_static(value));
            *req.version_mut() = http::Version::HTTP_2;
            let mut rsp = self.client(Version::Http2).request(req).await?;
            *rsp.version_mut() = orig;
            return Ok(rsp);
        }
        self.client(version).request(req).await
    }
}

/// On the server's side: turns a request that crossed between proxies as HTTP/2 back
/// into the HTTP/1 request the client sent. Returns the version to forward it as.
pub fn restore_orig_proto<B>(req: &mut Request<B>) -> Version {
    let Some(orig) = req.headers_mut().remove(ORIG_PROTO) else {
        return match req.version() {
            http::Version::HTTP_2 => Version::Http2,
            _ => Version::Http1,
        };
    };
    *req.version_mut() = if orig.as_bytes() == b"HTTP/1.0" {
        http::Version::HTTP_10
    } else {
        http::Version::HTTP_11
    };
    if !req.headers().contains_key(header::HOST)
        && let Some(authority) = req.uri().authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    Version::Http1
}
