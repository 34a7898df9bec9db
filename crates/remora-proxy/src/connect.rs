//! Connecting to destinations (plain, or mTLS to a meshed endpoint's proxy), and
//! learning where an intercepted connection was going.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::client::legacy::connect::{Connected, Connection};
use prometheus_client::metrics::counter::Counter;
use socket2::SockRef;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::warn;

use crate::{
    addr::OrigDst,
    tls::{self, Alpn, PeerId, TlsContext, TlsError},
};

/// A connection to a destination could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout { addr: OrigDst, timeout: Duration },
    #[error("connecting to {addr} failed: {source}")]
    Io { addr: OrigDst, source: io::Error },
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: std::sync::Arc<str> },
    #[error("mTLS to {addr} failed: {source}")]
    Tls { addr: OrigDst, source: TlsError },
    #[error("mTLS to {addr} timed out after {timeout:?}")]
    TlsTimeout { addr: OrigDst, timeout: Duration },
    #[error(
        "no certificate yet for mTLS to {addr}: is the controller's Identity service reachable?"
    )]
    NoCertificate { addr: OrigDst },
}

/// A connection to an upstream: plain TCP, or mTLS to a meshed endpoint's proxy.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    /// Resolves when the peer has sent something (or closed), without consuming it.
    pub async fn readable(&self) -> io::Result<()> {
        self.tcp().readable().await
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, b),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// A destination's limits from its policy, in milliseconds; 0 means unset.
#[derive(Debug, Default)]
pub struct DialLimits {
    pub connect_ms: std::sync::atomic::AtomicU64,
    pub idle_ms: std::sync::atomic::AtomicU64,
}

impl DialLimits {
    fn get(ms: &std::sync::atomic::AtomicU64) -> Option<Duration> {
        match ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Sets both from a policy (None: unset).
    pub fn set(&self, connect: Option<Duration>, idle: Option<Duration>) {
        let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis().max(1) as u64);
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        self.connect_ms.store(ms(connect), relaxed);
        self.idle_ms.store(ms(idle), relaxed);
    }
}

/// Makes upstream connections: mTLS when the endpoint has an identity and this proxy
/// has one too, plain otherwise.
#[derive(Debug, Clone)]
pub struct Connector {
    pub timeout: Duration,
    /// A destination's own limits (its TrafficPolicy's); None for the proxy's own.
    pub limits: Option<Arc<DialLimits>>,
    pub tls: Option<Arc<TlsContext>>,
    /// Handshakes with endpoints that failed.
    pub tls_failures: Counter,
}

impl Connector {
    pub fn plain(timeout: Duration) -> Self {
        Self {
            timeout,
            limits: None,
            tls: None,
            tls_failures: Counter::default(),
        }
    }

    /// The connect (and TLS handshake) timeout in force now.
    pub fn timeout(&self) -> Duration {
        self.limits
            .as_ref()
            .and_then(|l| DialLimits::get(&l.connect_ms))
            .unwrap_or(self.timeout)
    }

    /// How long a pooled connection may sit idle, when the destination's policy says.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.limits
            .as_ref()
            .and_then(|l| DialLimits::get(&l.idle_ms))
    }

    /// Whether a connection to an endpoint with identity `peer` is encrypted.
    pub fn encrypts(&self, peer: Option<&PeerId>) -> bool {
        peer.is_some() && self.tls.is_some()
    }

    pub async fn connect(
        &self,
        addr: OrigDst,
        peer: Option<&PeerId>,
        alpn: Alpn,
    ) -> Result<Conn, ConnectError> {
        let timeout = self.timeout();
        let (Some(peer), Some(tls)) = (peer, &self.tls) else {
            return connect(addr, timeout).await.map(Conn::Plain);
        };
        let (tcp, configs) = tokio::join!(connect(addr, timeout), tls.wait(timeout));
        let tcp = tcp?;
        let configs = configs.ok_or(ConnectError::NoCertificate { addr })?;
        let handshake = tls::connect(
            tcp,
            configs.client(alpn),
            &peer.server_name,
            &peer.spiffe_id,
        );
        match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(s)) => Ok(Conn::Tls(Box::new(s))),
            Ok(Err(source)) => {
                self.tls_failures.inc();
                warn!(%addr, local = %tls.local_id, expected = %peer.spiffe_id, error = %source,
                    "mTLS handshake with an endpoint failed");
                Err(ConnectError::Tls { addr, source })
            }
            Err(_) => {
                self.tls_failures.inc();
                Err(ConnectError::TlsTimeout { addr, timeout })
            }
        }
    }
}

/// Connects to `addr` within `timeout`, with Nagle off: the proxy writes whole messages.
pub async fn connect(addr: OrigDst, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr.0))
        .await
        .map_err(|_| ConnectError::Timeout { addr, timeout })?
        .map_err(|source| ConnectError::Io { addr, source })?;
    // Only fails on a socket that is already broken; the first write reports that.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The destination the client dialled, from the connection's NAT entry
/// (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`). A connection that was not redirected
/// reports its own local address.
pub fn orig_dst(stream: &TcpStream) -> io::Result<OrigDst> {
    let sock = SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().map(OrigDst).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// Closes `stream` with a TCP reset, as a refused connection would look to the client.
pub fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
