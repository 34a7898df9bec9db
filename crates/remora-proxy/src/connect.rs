//! Connecting to destinations, and learning where an intercepted connection was going.

use std::{io, net::SocketAddr, time::Duration};

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::addr::OrigDst;

/// A connection to a destination could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout { addr: OrigDst, timeout: Duration },
    #[error("connecting to {addr} failed: {source}")]
    Io { addr: OrigDst, source: io::Error },
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: std::sync::Arc<str> },
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
