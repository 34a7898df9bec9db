//! Where a request goes: straight to the client's original destination (passthrough),
//! or to an endpoint of a Service picked per request by the balancer.

use std::{sync::Arc, time::Duration};

use http::{Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::{
    Upstream, UpstreamError, Version,
    pool::{EndpointClients, restore_orig_proto},
};
use crate::{
    addr::OrigDst,
    balance::InFlight,
    discovery::{Endpoint, Target, View},
};

/// A request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: Arc<str> },
    #[error("request to the application at {addr} failed: {source}")]
    Local {
        addr: OrigDst,
        source: hyper_util::client::legacy::Error,
    },
    #[error("request to endpoint {addr} of service {service} failed: {source}")]
    Endpoint {
        service: Arc<str>,
        addr: std::net::SocketAddr,
        source: hyper_util::client::legacy::Error,
    },
}

impl RouteError {
    /// The status the client sees: 503 when there is nowhere to send, 502 otherwise.
    pub fn status(&self) -> StatusCode {
        match self {
            RouteError::NoEndpoints { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

pub enum Route {
    /// One upstream connection per client connection, to the original destination.
    Passthrough(Upstream),
    /// A Service: each request to an endpoint the balancer picks.
    Balanced {
        target: Arc<Target>,
        service: Arc<str>,
        version: Version,
        orig_dst: OrigDst,
        /// How long a request waits for endpoints to appear before a 503.
        wait: Duration,
    },
    /// Inbound from another proxy over HTTP/2: each request to the application at the
    /// original destination, as the HTTP version its client spoke.
    Local {
        clients: Box<EndpointClients>,
        orig_dst: OrigDst,
    },
}

impl Route {
    pub fn version(&self) -> Version {
        match self {
            Route::Passthrough(u) => u.version(),
            Route::Balanced { version, .. } => *version,
            Route::Local { .. } => Version::Http2,
        }
    }

    /// Sends `req`; the in-flight guard (for the balancer) lives as long as the response.
    pub async fn send(
        &self,
        req: Request<Incoming>,
    ) -> Result<(Response<Incoming>, Option<InFlight>), RouteError> {
        match self {
            Route::Passthrough(u) => Ok((u.send(req).await?, None)),
            Route::Local { clients, orig_dst } => {
                let mut req = req;
                let version = restore_orig_proto(&mut req);
                let req = absolute(req, *orig_dst);
                let rsp = clients
                    .send(req, version)
                    .await
                    .map_err(|source| RouteError::Local {
                        addr: *orig_dst,
                        source,
                    })?;
                Ok((rsp, None))
            }
            Route::Balanced {
                target,
                service,
                version,
                orig_dst,
                wait,
            } => {
                let endpoints =
                    endpoints(target, *wait)
                        .await
                        .ok_or_else(|| RouteError::NoEndpoints {
                            service: service.clone(),
                        })?;
                let ep =
                    target
                        .balancer
                        .pick(&endpoints)
                        .ok_or_else(|| RouteError::NoEndpoints {
                            service: service.clone(),
                        })?;
                let in_flight = ep.start();
                let req = absolute(req, *orig_dst);
                let start = Instant::now();
                let rsp = ep.clients.send(req, *version).await.map_err(|source| {
                    RouteError::Endpoint {
                        service: service.clone(),
                        addr: ep.addr,
                        source,
                    }
                })?;
                ep.observe(start.elapsed());
                Ok((rsp, Some(in_flight)))
            }
        }
    }
}

/// The target's current endpoints, waiting up to `wait` for some to appear.
pub async fn endpoints(target: &Target, wait: Duration) -> Option<Arc<[Endpoint]>> {
    let mut views = target.views.clone();
    let deadline = Instant::now() + wait;
    loop {
        if let View::Service { endpoints, .. } | View::Pod { endpoints } =
            &*views.borrow_and_update()
            && !endpoints.is_empty()
        {
            return Some(endpoints.clone());
        }
        tokio::time::timeout_at(deadline, views.changed())
            .await
            .ok()?
            .ok()?;
    }
}

/// The pooled client needs an absolute URI; HTTP/1 requests arrive in origin form. The
/// authority is the client's `Host` (what it meant), else the original destination.
fn absolute(mut req: Request<Incoming>, orig_dst: OrigDst) -> Request<Incoming> {
    if req.uri().authority().is_some() {
        return req;
    }
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .unwrap_or_else(|| {
            orig_dst
                .to_string()
                .parse()
                .expect("a socket address is an authority")
        });
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    req
}
