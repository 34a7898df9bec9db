//! What a served HTTP connection hands each request to: a [`Forward`], the one seam
//! between the HTTP server and where requests go (outbound: the original destination or
//! a Service's endpoints; inbound: the application).

use std::{future::Future, sync::Arc, time::Duration};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{ClientBody, UpstreamError, Version};
use crate::{addr::OrigDst, metrics::RouteLabels};

/// Where one connection's requests go.
pub trait Forward: Send + Sync + 'static {
    /// Kept while a response streams and told, when it ends, whether it was whole (the
    /// balancer's request in flight).
    type Guard: Guard;

    /// The version the client speaks.
    fn version(&self) -> Version;

    /// Whether a request's `remora-orig-proto` header is believed: only a peer proxy's,
    /// over mTLS, may say what version its client spoke.
    fn trusts_orig_proto(&self) -> bool {
        false
    }

    /// Why the request is refused (a 403), if it is.
    fn admit(&self, _req: &Request<Incoming>) -> Option<String> {
        None
    }

    /// Sends `req`; the guard lives as long as the response. A forwarder that routes
    /// says in `sent` where the request went, whether or not it got a response.
    fn send(
        &self,
        req: Request<ClientBody>,
        sent: &mut Sent,
    ) -> impl Future<Output = Result<(Response<Incoming>, Option<Self::Guard>), ForwardError>> + Send;
}

/// Where a request went, as a routing forwarder tells it: the route and backend its
/// metrics are labelled with, and for the access log the retries made and the endpoint
/// that answered last.
#[derive(Debug, Default)]
pub struct Sent {
    pub route: RouteLabels,
    /// The HTTPRoute rule's route as `namespace/name`, when one matched.
    pub rule: Option<Arc<str>>,
    pub retries: u32,
    pub endpoint: Option<std::net::SocketAddr>,
}

/// What a forwarder learns when a response ends.
pub trait Guard: Send + 'static {
    fn finish(&mut self, whole: bool);
}

/// For forwarders with nothing to learn.
#[derive(Debug)]
pub enum NoGuard {}

impl Guard for NoGuard {
    fn finish(&mut self, _: bool) {
        match *self {}
    }
}

/// A request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("service {service} has no endpoints")]
    NoEndpoints { service: Arc<str> },
    #[error("request to the application at {addr} failed: {source}")]
    Local {
        addr: OrigDst,
        source: hyper_util::client::legacy::Error,
    },
    #[error("service {service} did not answer within its request timeout of {after:?}")]
    Timeout { service: Arc<str>, after: Duration },
    #[error(
        "endpoint {addr} of service {service} did not answer within the per-try timeout of {after:?}"
    )]
    PerTryTimeout {
        service: Arc<str>,
        addr: std::net::SocketAddr,
        after: Duration,
    },
    #[error(
        "every endpoint of service {service} is at its concurrency limit (maxRequests, or maxConnections and maxPendingRequests)"
    )]
    AtCapacity { service: Arc<str> },
    #[error("route {route} has no backend to send this request to: {why}")]
    NoBackend { route: Arc<str>, why: &'static str },
    #[error("the request body could not be read: {0}")]
    ClientBody(hyper::Error),
    #[error("request to endpoint {addr} of service {service} failed: {source}")]
    Endpoint {
        service: Arc<str>,
        addr: std::net::SocketAddr,
        source: hyper_util::client::legacy::Error,
    },
}

impl ForwardError {
    /// The status the client sees: 503 when there is nowhere to send, 502 otherwise.
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::NoEndpoints { .. } | ForwardError::AtCapacity { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ForwardError::Timeout { .. } | ForwardError::PerTryTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ForwardError::ClientBody(_) => StatusCode::BAD_REQUEST,
            // As the Gateway API asks for a backend that is invalid or weighs nothing.
            ForwardError::NoBackend { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// The pooled client needs an absolute URI; HTTP/1 requests arrive in origin form. The
/// authority is the client's `Host` (what it meant), else the original destination.
pub fn absolute<B>(mut req: Request<B>, orig_dst: OrigDst) -> Request<B> {
    if req.uri().authority().is_some() {
        return req;
    }
    let authority = req
        .headers()
        .get(http::header::HOST)
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
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    req
}
