//! The upstream side of one client connection's HTTP traffic in passthrough: requests
//! go to the original destination over a connection of the client's HTTP version. The
//! first connection is the one opened during detection; later ones are made on demand
//! when the server closes it.

use std::time::Duration;

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::ClientBody;
use crate::{
    addr::OrigDst,
    connect::{Conn, ConnectError, connect},
};

/// The HTTP version spoken on both sides of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// A request could not be sent upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake { addr: OrigDst, source: hyper::Error },
    #[error("request to {addr} failed: {source}")]
    Request { addr: OrigDst, source: hyper::Error },
}

enum Sender {
    Http1(http1::SendRequest<ClientBody>),
    Http2(http2::SendRequest<ClientBody>),
}

struct State {
    /// The outcome of the connect made during detection, not yet used.
    fresh: Option<Result<Conn, ConnectError>>,
    sender: Option<Sender>,
}

/// Sends one client connection's requests to its original destination.
pub struct Upstream {
    addr: OrigDst,
    version: Version,
    connect_timeout: Duration,
    state: tokio::sync::Mutex<State>,
}

impl Upstream {
    pub fn new(
        addr: OrigDst,
        version: Version,
        fresh: Option<Result<Conn, ConnectError>>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            addr,
            version,
            connect_timeout,
            state: tokio::sync::Mutex::new(State {
                fresh,
                sender: None,
            }),
        }
    }

    pub fn addr(&self) -> OrigDst {
        self.addr
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Sends `req`, connecting first when there is no open connection.
    pub async fn send(
        &self,
        req: Request<ClientBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let addr = self.addr;
        let map = move |source| UpstreamError::Request { addr, source };
        let mut state = self.state.lock().await;
        let closed = match &state.sender {
            Some(Sender::Http1(s)) => s.is_closed(),
            Some(Sender::Http2(s)) => s.is_closed(),
            None => true,
        };
        if closed {
            let io = match state.fresh.take() {
                Some(connected) => connected?,
                None => Conn::Plain(connect(addr, self.connect_timeout).await?),
            };
            state.sender = Some(self.handshake(io).await?);
        }
        match state.sender.as_mut() {
            Some(Sender::Http1(s)) => {
                // HTTP/1 carries one request at a time: the lock is held until this one is sent.
                s.ready().await.map_err(map)?;
                let response = s.send_request(req);
                drop(state);
                response.await.map_err(map)
            }
            Some(Sender::Http2(s)) => {
                let mut s = s.clone();
                drop(state);
                s.ready().await.map_err(map)?;
                s.send_request(req).await.map_err(map)
            }
            None => unreachable!("a sender was just made"),
        }
    }

    async fn handshake(&self, io: Conn) -> Result<Sender, UpstreamError> {
        let addr = self.addr;
        let io = TokioIo::new(io);
        let err = move |source| UpstreamError::Handshake { addr, source };
        match self.version {
            Version::Http1 => {
                let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(err)?;
                tokio::spawn(async move {
                    if let Err(error) = conn.with_upgrades().await {
                        debug!(%addr, %error, "upstream HTTP/1 connection failed");
                    }
                });
                Ok(Sender::Http1(sender))
            }
            Version::Http2 => {
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .map_err(err)?;
                tokio::spawn(async move {
                    if let Err(error) = conn.await {
                        debug!(%addr, %error, "upstream HTTP/2 connection failed");
                    }
                });
                Ok(Sender::Http2(sender))
            }
        }
    }
}

impl super::Forward for Upstream {
    type Guard = super::NoGuard;

    fn version(&self) -> Version {
        self.version
    }

    async fn send(
        &self,
        req: Request<ClientBody>,
        _sent: &mut super::Sent,
    ) -> Result<(Response<Incoming>, Option<super::NoGuard>), super::ForwardError> {
        Ok((Upstream::send(self, req).await?, None))
    }
}
