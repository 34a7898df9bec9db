//! Connection pools per endpoint: hyper-util's pooled client, one per endpoint and
//! HTTP version, whose connector always dials that endpoint. Requests keep their own
//! authority (`Host`, `:authority`); the pool keeps idle connections alive and reuses
//! HTTP/2 connections for many streams.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
    time::Duration,
};

use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpStream;

use super::Version;
use crate::{
    addr::OrigDst,
    connect::{ConnectError, connect},
};

/// How long an idle pooled connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

pub type PooledClient = Client<Dial, Incoming>;

/// Dials one endpoint, whatever the request's URI says.
#[derive(Debug, Clone, Copy)]
pub struct Dial {
    addr: SocketAddr,
    timeout: Duration,
}

impl tower_service::Service<http::Uri> for Dial {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, timeout) = (OrigDst(self.addr), self.timeout);
        Box::pin(async move { connect(addr, timeout).await.map(TokioIo::new) })
    }
}

/// The pooled clients of one endpoint, made on first use.
#[derive(Debug)]
pub struct EndpointClients {
    dial: Dial,
    http1: OnceLock<PooledClient>,
    http2: OnceLock<PooledClient>,
}

impl EndpointClients {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Self {
            dial: Dial { addr, timeout },
            http1: OnceLock::new(),
            http2: OnceLock::new(),
        }
    }

    pub fn get(&self, version: Version) -> &PooledClient {
        let cell = match version {
            Version::Http1 => &self.http1,
            Version::Http2 => &self.http2,
        };
        cell.get_or_init(|| {
            let mut b = Client::builder(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(IDLE_TIMEOUT)
                // The proxy forwards the client's Host header untouched.
                .set_host(false)
                .http2_only(version == Version::Http2);
            b.build(self.dial)
        })
    }
}
