//! Where a request goes: straight to the client's original destination (passthrough),
//! or to an endpoint of a Service picked per request by the balancer.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, header};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tracing::debug;

use super::{
    ClientBody, Upstream, UpstreamError, Version,
    pool::{EndpointClients, ReqBody, restore_orig_proto},
    replay::{MAX_REPLAY, Replay, Tee},
};
use crate::{
    addr::OrigDst,
    balance::{InFlight, NoPick, Settle, SlotError},
    discovery::{Endpoint, Target, View},
    policy::{
        Retry, RoutePolicy,
        routes::{Backend, Pick, Rule},
    },
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

impl RouteError {
    /// The status the client sees: 503 when there is nowhere to send, 502 otherwise.
    pub fn status(&self) -> StatusCode {
        match self {
            RouteError::NoEndpoints { .. } | RouteError::AtCapacity { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RouteError::Timeout { .. } | RouteError::PerTryTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            RouteError::ClientBody(_) => StatusCode::BAD_REQUEST,
            // As the Gateway API asks for a backend that is invalid or weighs nothing.
            RouteError::NoBackend { .. } => StatusCode::INTERNAL_SERVER_ERROR,
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
        counters: Counters,
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
        req: Request<ClientBody>,
    ) -> Result<(Response<Incoming>, Option<InFlight>), RouteError> {
        match self {
            Route::Passthrough(u) => Ok((u.send(req).await?, None)),
            Route::Local { clients, orig_dst } => {
                let mut req = req;
                let version = restore_orig_proto(&mut req);
                let req = absolute(req, *orig_dst).map(|b| Either::Left(Tee::plain(b)));
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
                counters,
            } => {
                let balanced = Balanced {
                    target,
                    service,
                    version: *version,
                    wait: *wait,
                    counters,
                };
                balanced.send(absolute(req, *orig_dst)).await
            }
        }
    }
}

/// Counters of the resilience a Service's policy adds.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub retries: Counter,
    pub budget_exhausted: Counter,
    pub ejections: Counter,
}

/// One request to a Service, under its outbound policy: the route that matches (if
/// any) picks a backend Service by weight and may change headers and limits; the request
/// timeout covers every attempt; an attempt that fails in a way the policy names is
/// tried again on another pick, after a jittered exponential backoff, while the retry
/// budget lasts and the body can be replayed; every outcome feeds the endpoint's circuit
/// breaker.
struct Balanced<'a> {
    target: &'a Arc<Target>,
    service: &'a Arc<str>,
    version: Version,
    wait: Duration,
    counters: &'a Counters,
}

/// Where a request's attempts go: a Service's endpoints, under that Service's own
/// balancing and circuit breaking.
struct Dest<'a> {
    target: &'a Arc<Target>,
    service: Arc<str>,
    policy: Arc<RoutePolicy>,
}

/// What bounds a request: the parent Service's policy, or the matching route's.
struct Limits<'a> {
    request_timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
    retry: Option<&'a Retry>,
}

/// How an attempt went.
enum Attempt {
    Response(Response<Incoming>, InFlight),
    Failed(RouteError),
}

impl Balanced<'_> {
    async fn send(
        &self,
        req: Request<ClientBody>,
    ) -> Result<(Response<Incoming>, Option<InFlight>), RouteError> {
        let policy: Arc<RoutePolicy> = self.target.policy(self.wait).await;
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let rule = policy.routes.find(&parts);
        let mut dest = Dest {
            target: self.target,
            service: self.service.clone(),
            policy: policy.clone(),
        };
        if let Some(rule) = rule {
            match rule.pick(crate::rng::random()) {
                Pick::Parent => {}
                Pick::Nothing => return Err(no_backend(rule, "every backend has weight 0")),
                Pick::Backend(b) => dest = self.backend(rule, b).await?,
            }
            if let Some(m) = &rule.request_headers {
                m.apply(&mut parts.headers);
            }
        }
        let limits = Limits {
            request_timeout: rule
                .and_then(|r| r.request_timeout)
                .unwrap_or(policy.request_timeout),
            per_try_timeout: rule
                .and_then(|r| r.per_try_timeout)
                .unwrap_or(policy.per_try_timeout),
            retry: policy.retry.as_ref(),
        };
        let result = self.attempts(parts, body, &dest, &limits, started).await;
        match (result, rule.and_then(|r| r.response_headers.as_ref())) {
            (Ok((mut rsp, in_flight)), Some(m)) => {
                m.apply(rsp.headers_mut());
                Ok((rsp, in_flight))
            }
            (result, _) => result,
        }
    }

    /// Where a route's backend Service sends: its endpoints, under its own policy.
    async fn backend<'b>(&self, rule: &Rule, b: &'b Backend) -> Result<Dest<'b>, RouteError> {
        let Some(target) = &b.target else {
            return Err(no_backend(rule, "the controller refused the backend"));
        };
        let mut views = target.views.clone();
        let known =
            tokio::time::timeout(self.wait, views.wait_for(|v| !matches!(v, View::Pending)))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|v| v.clone());
        let service = match known {
            Some(View::Service { name, .. }) => name,
            Some(View::Passthrough) => {
                return Err(no_backend(rule, "the backend Service does not exist"));
            }
            Some(View::Pod { .. }) => b.name.clone(),
            // No answer yet (the controller is slow or away): nowhere to send.
            Some(View::Pending) | None => {
                return Err(RouteError::NoEndpoints {
                    service: b.name.clone(),
                });
            }
        };
        Ok(Dest {
            target,
            service,
            policy: target.policy(self.wait).await,
        })
    }

    /// Every attempt of one request to `dest`.
    async fn attempts(
        &self,
        parts: http::request::Parts,
        body: ClientBody,
        dest: &Dest<'_>,
        limits: &Limits<'_>,
        started: Instant,
    ) -> Result<(Response<Incoming>, Option<InFlight>), RouteError> {
        let deadline = limits.request_timeout.map(|t| started + t);
        let is_grpc = super::is_grpc(&parts.headers);
        // gRPC calls are POSTs: they are retried when the policy names gRPC codes, on
        // which alone a gRPC response is judged.
        let upgrade = super::headers::upgrade_requested(&parts.method, &parts.headers);
        let retry = limits.retry.filter(|r| {
            !upgrade
                && if is_grpc {
                    !r.on.grpc.is_empty() || r.on.unavailable
                } else {
                    r.method_allowed(&parts.method)
                }
        });
        let (mut parts, mut kept) = (Some(parts), None);
        // A body whose length is known to fit in 64 KiB is read first (small, it is
        // usually in already), so even an attempt that never sent it (a failed connect)
        // can be retried. Any other body streams with the first attempt while a copy of
        // up to 64 KiB is kept in case a retry follows.
        let mut replay: Option<Bytes> = None;
        let mut copy = None;
        let mut first = None;
        match retry {
            Some(_) if body.size_hint().exact().is_some_and(|n| n <= MAX_REPLAY) => {
                let collect = body.collect();
                let collected = match deadline {
                    Some(d) => tokio::time::timeout_at(d, collect).await.map_err(|_| {
                        RouteError::Timeout {
                            service: dest.service.clone(),
                            after: limits.request_timeout.unwrap_or_default(),
                        }
                    })?,
                    None => collect.await,
                };
                replay = Some(collected.map_err(RouteError::ClientBody)?.to_bytes());
            }
            Some(_) => {
                let (tee, c) = Tee::copying(body);
                first = Some(Either::Left(tee));
                copy = Some(c);
            }
            // No policy: a connect that fails takes nothing from the body, so the
            // stream is given back for another endpoint; nothing is copied.
            None => {
                let (tee, c) = Tee::returning(body);
                first = Some(Either::Left(tee));
                copy = Some(c);
            }
        }
        if let Some(r) = limits.retry {
            self.target.budget.request(r.budget_window);
        }
        let mut attempt = 0u32;
        let mut elsewhere = 0u32;
        let mut avoid = None;
        loop {
            let body = match (&replay, first.take()) {
                (Some(bytes), _) => Either::Right(Full::new(bytes.clone())),
                (None, Some(body)) => body,
                (None, None) => unreachable!("a retry has a replayed or resumed body"),
            };
            // Every attempt but the last possible one sends a copy of the request's
            // head: one whose connect fails may go to another endpoint.
            let taken = parts.take();
            let p = taken
                .as_ref()
                .or(kept.as_ref())
                .expect("the request's parts");
            let mut req = Request::new(body);
            *req.method_mut() = p.method.clone();
            *req.uri_mut() = p.uri.clone();
            *req.version_mut() = p.version;
            *req.headers_mut() = p.headers.clone();
            if let Some(taken) = taken {
                kept = Some(taken);
            }
            let tried = self
                .attempt(req, dest, limits, deadline, is_grpc, avoid)
                .await;
            avoid = tried.endpoint;
            let next = next(&tried, retry.map(|r| r.max_retries), attempt, elsewhere);
            let outcome = tried.outcome;
            if next == Next::Answer {
                return into_result(outcome);
            }
            // Sent again if the client had sent its whole body, within the limit, or if
            // the attempt gave the client's stream back with all it took copied.
            if replay.is_none() {
                replay = copy.as_ref().and_then(Replay::body);
                if replay.is_none() {
                    match copy.as_ref().and_then(Replay::resume) {
                        Some(resumed) => first = Some(Either::Left(resumed)),
                        None => {
                            debug!(service = %dest.service, "not retried: the body cannot be replayed");
                            return into_result(outcome);
                        }
                    }
                }
            }
            if next == Next::Elsewhere {
                // Nothing reached the endpoint: another one at once, outside the budget.
                elsewhere += 1;
                self.counters.retries.inc();
                debug!(service = %dest.service, "connect failed: trying another endpoint");
                drop(outcome);
                continue;
            }
            let retry = retry.expect("a policy retry has a policy");
            // Full jitter over an exponential ceiling; a Retry-After is honoured.
            let ceiling = retry
                .backoff_base
                .saturating_mul(1 << attempt.min(16))
                .min(retry.backoff_max);
            let mut pause = ceiling.mul_f64(crate::rng::fraction());
            if let Attempt::Response(rsp, _) = &outcome
                && let Some(after) = retry_after(rsp)
            {
                pause = pause.max(after);
            }
            // No time left for another attempt after the pause: the client gets the
            // answer it would have had.
            if deadline.is_some_and(|d| Instant::now() + pause >= d) {
                return into_result(outcome);
            }
            if !self.target.budget.try_retry(retry) {
                self.counters.budget_exhausted.inc();
                debug!(service = %dest.service, "retry budget exhausted");
                return into_result(outcome);
            }
            attempt += 1;
            self.counters.retries.inc();
            drop(outcome);
            tokio::time::sleep(pause).await;
        }
    }

    /// One attempt: pick, send within the per-try and request limits, classify.
    async fn attempt(
        &self,
        req: Request<ReqBody>,
        dest: &Dest<'_>,
        limits: &Limits<'_>,
        deadline: Option<Instant>,
        is_grpc: bool,
        avoid: Option<std::net::SocketAddr>,
    ) -> Tried {
        let service = dest.service.clone();
        let policy = &*dest.policy;
        let Some(endpoints) = endpoints(dest.target, self.wait).await else {
            return Tried::failed(RouteError::NoEndpoints { service });
        };
        let ep = match dest
            .target
            .balancer
            .pick_avoiding(&endpoints, policy, avoid)
        {
            Ok(ep) => ep,
            Err(NoPick::NoEndpoints) => {
                return Tried::failed(RouteError::NoEndpoints { service });
            }
            Err(NoPick::AtCapacity) => {
                return Tried::failed(RouteError::AtCapacity { service });
            }
        };
        // `maxConnections` bounds an endpoint's HTTP/1 connections, each busy with one
        // request; a multiplexed connection (HTTP/2, and every one between proxies) is
        // one per endpoint already.
        let breaker = &policy.breaker;
        let slot = if breaker.max_connections > 0 && !ep.clients.multiplexed(&req, self.version) {
            match ep
                .connection_slot(
                    breaker.max_connections,
                    breaker.max_pending_requests,
                    deadline,
                )
                .await
            {
                Ok(slot) => Some(slot),
                Err(SlotError::Full) => {
                    return Tried::failed(RouteError::AtCapacity { service });
                }
                Err(SlotError::Deadline) => {
                    let after = limits.request_timeout.unwrap_or_default();
                    return Tried::failed(RouteError::Timeout { service, after });
                }
            }
        } else {
            None
        };
        let mut in_flight = ep.start_with(slot);
        in_flight.settle_with(Settle {
            breaker: policy.breaker.clone(),
            balancer: dest.target.balancer.clone(),
            ejections: self.counters.ejections.clone(),
            service: service.clone(),
        });
        let now = Instant::now();
        let limit = match (limits.per_try_timeout, deadline) {
            (Some(t), Some(d)) => Some(t.min(d.saturating_duration_since(now))),
            (Some(t), None) => Some(t),
            (None, Some(d)) => Some(d.saturating_duration_since(now)),
            (None, None) => None,
        };
        let send = ep.clients.send(req, self.version);
        let result = match limit {
            Some(limit) => tokio::time::timeout(limit, send).await.ok(),
            None => Some(send.await),
        };
        let on = limits.retry.map(|r| &r.on);
        let mut nothing_sent = false;
        let (outcome, retriable) = match result {
            None if deadline.is_some_and(|d| Instant::now() >= d) => {
                in_flight.settle(false);
                let after = limits.request_timeout.unwrap_or_default();
                (
                    Attempt::Failed(RouteError::Timeout { service, after }),
                    false,
                )
            }
            None => {
                in_flight.settle(false);
                let error = RouteError::PerTryTimeout {
                    service,
                    addr: ep.addr,
                    after: limit.unwrap_or_default(),
                };
                (
                    Attempt::Failed(error),
                    on.is_some_and(|o| o.per_try_timeout),
                )
            }
            Some(Err(source)) => {
                let connect = source.is_connect();
                if connect {
                    ep.connect_failed();
                    nothing_sent = true;
                }
                in_flight.settle(false);
                let retriable = on.is_some_and(|o| {
                    if connect {
                        o.connect_failure
                    } else {
                        o.reset || o.refused_stream
                    }
                });
                let error = RouteError::Endpoint {
                    service,
                    addr: ep.addr,
                    source,
                };
                (Attempt::Failed(error), retriable)
            }
            Some(Ok(rsp)) => {
                ep.connected();
                let status = rsp.status();
                let grpc = super::grpc_status(rsp.headers());
                let retriable = limits
                    .retry
                    .is_some_and(|r| r.retriable_response(status, grpc, is_grpc));
                if let Some(after) = retry_after(&rsp) {
                    // The endpoint asked for a pause: the balancer sees it as slow.
                    ep.observe(after.min(Duration::from_secs(10)));
                }
                if status.is_server_error() {
                    // A fast 5xx must not look cheap.
                    in_flight.settle(false);
                } else {
                    // Judged when the response ends: one that breaks later fails then.
                    ep.observe(now.elapsed());
                    in_flight.answered();
                }
                (Attempt::Response(rsp, in_flight), retriable)
            }
        };
        Tried {
            outcome,
            retriable,
            nothing_sent,
            endpoint: Some(ep.addr),
        }
    }
}

/// One attempt's result, and what decides whether another follows.
struct Tried {
    outcome: Attempt,
    /// The policy names this failure as retriable.
    retriable: bool,
    /// The endpoint's connect failed: it received nothing.
    nothing_sent: bool,
    /// Where it went, for the next attempt to avoid.
    endpoint: Option<std::net::SocketAddr>,
}

impl Tried {
    /// Failed before reaching an endpoint.
    fn failed(error: RouteError) -> Self {
        Self {
            outcome: Attempt::Failed(error),
            retriable: false,
            nothing_sent: false,
            endpoint: None,
        }
    }
}

/// How many other endpoints a request whose connect failed may try, policy or not.
pub const CONNECT_RETRIES: u32 = 2;

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The client gets this attempt's outcome.
    Answer,
    /// Nothing reached the endpoint: another at once, with no backoff and no budget,
    /// whatever the policy (nothing was sent, so it is always safe).
    Elsewhere,
    /// The policy retries it, after its backoff and if its budget allows.
    Retry,
}

/// The decision after attempt number `attempt` (0 first) of policy retries, when
/// `elsewhere` connect-failure retries were made already.
fn next(tried: &Tried, max_retries: Option<u32>, attempt: u32, elsewhere: u32) -> Next {
    if tried.nothing_sent && elsewhere < CONNECT_RETRIES {
        return Next::Elsewhere;
    }
    match max_retries {
        Some(max) if tried.retriable && attempt < max => Next::Retry,
        _ => Next::Answer,
    }
}

fn no_backend(rule: &Rule, why: &'static str) -> RouteError {
    RouteError::NoBackend {
        route: rule.route.clone(),
        why,
    }
}

fn into_result(a: Attempt) -> Result<(Response<Incoming>, Option<InFlight>), RouteError> {
    match a {
        Attempt::Response(rsp, in_flight) => Ok((rsp, Some(in_flight))),
        Attempt::Failed(e) => Err(e),
    }
}

/// `Retry-After` in seconds on a 429 or 503.
fn retry_after(rsp: &Response<Incoming>) -> Option<Duration> {
    if !matches!(rsp.status().as_u16(), 429 | 503) {
        return None;
    }
    let secs: u64 = rsp
        .headers()
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(60)))
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
fn absolute<B>(mut req: Request<B>, orig_dst: OrigDst) -> Request<B> {
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

#[cfg(test)]
mod decision_tests {
    use super::*;

    fn tried(retriable: bool, nothing_sent: bool) -> Tried {
        Tried {
            outcome: Attempt::Failed(RouteError::NoEndpoints {
                service: Arc::from("web.shop:80"),
            }),
            retriable,
            nothing_sent,
            endpoint: None,
        }
    }

    /// What follows an attempt: a failed connect goes elsewhere at once (twice), policy
    /// or not; the policy's retries follow its count.
    #[test]
    fn what_follows_an_attempt() {
        let cases = [
            // (retriable, nothing sent, max retries, attempt, elsewhere) -> next
            ((false, false, None, 0, 0), Next::Answer),
            ((false, true, None, 0, 0), Next::Elsewhere),
            ((false, true, None, 0, 1), Next::Elsewhere),
            ((false, true, None, 0, 2), Next::Answer),
            ((true, true, Some(2), 0, 2), Next::Retry),
            ((true, false, Some(2), 0, 0), Next::Retry),
            ((true, false, Some(2), 2, 0), Next::Answer),
            ((true, false, None, 0, 0), Next::Answer),
            ((false, false, Some(2), 0, 0), Next::Answer),
        ];
        for ((retriable, sent, max, attempt, elsewhere), want) in cases {
            let t = tried(retriable, sent);
            assert_eq!(
                next(&t, max, attempt, elsewhere),
                want,
                "{retriable} {sent} {max:?} {attempt} {elsewhere}"
            );
        }
    }
}
