//! Where an outbound HTTP connection's requests go: straight to the client's original
//! destination (passthrough), or each to an endpoint of a Service picked per request by
//! the balancer, under the Service's policy. This is the HTTP sequencing only; what to
//! retry, how long to pause and whether the budget pays are [`super::resilience`]'s
//! decisions.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

use super::{
    Destination, Destinations, InFlight,
    balance::{NoPick, Settle, SlotError},
    discovery::View,
    policy::{Retry, ServicePolicy},
    resilience::{self, Next, Outcome},
    routes::{Backend, Pick, Rule},
};
use crate::{
    addr::OrigDst,
    http::{
        ClientBody, Forward, ForwardError, Guard, Sent, Upstream, Version, absolute,
        pool::{EndpointClients, ReqBody},
        replay::{MAX_REPLAY, Replay, Tee},
        upgrade_requested,
    },
    metrics::{ResilienceCounters, Timeout},
};

/// Where one outbound HTTP connection's requests go.
pub enum Forwarder {
    /// One upstream connection per client connection, to the original destination.
    Passthrough(Upstream),
    /// A Service (or a meshed pod): each request to an endpoint the balancer picks.
    Balanced(Balanced),
}

impl Guard for InFlight {
    fn finish(&mut self, whole: bool) {
        self.settle(whole);
    }
}

impl Forward for Forwarder {
    type Guard = InFlight;

    fn version(&self) -> Version {
        match self {
            Forwarder::Passthrough(u) => u.version(),
            Forwarder::Balanced(b) => b.version,
        }
    }

    async fn send(
        &self,
        req: Request<ClientBody>,
        sent: &mut Sent,
    ) -> Result<(Response<Incoming>, Option<InFlight>), ForwardError> {
        match self {
            Forwarder::Passthrough(u) => Ok((u.send(req).await?, None)),
            Forwarder::Balanced(b) => b.send(absolute(req, b.orig_dst), sent).await,
        }
    }
}

/// One Service's requests from one client connection, under its outbound policy: the
/// route that matches (if any) picks a backend Service by weight and may change headers
/// and limits; the request timeout covers every attempt; an attempt that fails in a way
/// the policy names is tried again on another pick, after a jittered exponential
/// backoff, while the retry budget lasts and the body can be replayed; every outcome
/// feeds the endpoint's circuit breaker.
pub struct Balanced {
    pub destination: Arc<Destination>,
    /// Where a route's backends are looked up.
    pub destinations: Arc<Destinations>,
    /// The `target` label: `name.namespace:port`, or `passthrough` for a meshed pod.
    pub service: Arc<str>,
    pub version: Version,
    pub orig_dst: OrigDst,
    /// How long a request waits for endpoints to appear before a 503.
    pub wait: Duration,
    pub counters: ResilienceCounters,
}

/// The Service a request's attempts go to (the one asked for, or a route's backend),
/// under that Service's own balancing and circuit breaking.
struct Chosen {
    destination: Arc<Destination>,
    service: Arc<str>,
    policy: Arc<ServicePolicy>,
}

/// What bounds a request: the parent Service's policy, or the matching route's.
struct Limits<'a> {
    request_timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
    retry: Option<&'a Retry>,
}

/// How an attempt went, and what the client would get from it.
struct Tried {
    outcome: Outcome,
    result: Result<(Response<Incoming>, InFlight), ForwardError>,
    /// Where it went, for the next attempt to avoid.
    endpoint: Option<std::net::SocketAddr>,
}

impl Tried {
    /// Failed before reaching an endpoint.
    fn not_sent(error: ForwardError) -> Self {
        Self {
            outcome: Outcome::NotSent,
            result: Err(error),
            endpoint: None,
        }
    }

    fn into_result(self) -> Result<(Response<Incoming>, Option<InFlight>), ForwardError> {
        self.result.map(|(rsp, f)| (rsp, Some(f)))
    }
}

impl Balanced {
    async fn send(
        &self,
        req: Request<ClientBody>,
        sent: &mut Sent,
    ) -> Result<(Response<Incoming>, Option<InFlight>), ForwardError> {
        let policy: Arc<ServicePolicy> = self.destination.policy(self.wait).await;
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let rule = policy.routes.find(&parts);
        let mut chosen = Chosen {
            destination: self.destination.clone(),
            service: self.service.clone(),
            policy: policy.clone(),
        };
        sent.route.backend = self.service.clone();
        if let Some(rule) = rule {
            sent.rule = Some(rule.route.clone());
            let route = &mut sent.route;
            route.route_name = rule.name.clone();
            route.route_namespace = rule.namespace.clone();
            match rule.pick(crate::rng::random()) {
                Pick::Parent => {}
                Pick::Nothing => return Err(no_backend(rule, "every backend has weight 0")),
                Pick::Backend(b) => {
                    // Named before it is looked up: a backend that cannot be reached
                    // still counts under its own name.
                    route.backend = b.label.clone();
                    chosen = self.backend(rule, b).await?;
                }
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
        let result = self
            .attempts(parts, body, &chosen, &limits, started, sent)
            .await;
        // Whichever step ran out of the request's time (reading a body to replay,
        // waiting for a connection slot, an attempt), the client gets 504: count it once.
        if let Err(ForwardError::Timeout { .. }) = &result {
            self.counters.timed_out(&sent.route, Timeout::Request);
        }
        match (result, rule.and_then(|r| r.response_headers.as_ref())) {
            (Ok((mut rsp, in_flight)), Some(m)) => {
                m.apply(rsp.headers_mut());
                Ok((rsp, in_flight))
            }
            (result, _) => result,
        }
    }

    /// Where a route's backend Service sends: its endpoints, under its own policy.
    async fn backend(&self, rule: &Rule, b: &Backend) -> Result<Chosen, ForwardError> {
        if b.name.is_empty() {
            return Err(no_backend(rule, "the controller refused the backend"));
        }
        let destination = self.destinations.backend(&b.name);
        let mut views = destination.views.clone();
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
                return Err(ForwardError::NoEndpoints {
                    service: b.name.clone(),
                });
            }
        };
        let policy = destination.policy(self.wait).await;
        Ok(Chosen {
            destination,
            service,
            policy,
        })
    }

    /// Every attempt of one request to `chosen`.
    async fn attempts(
        &self,
        parts: http::request::Parts,
        body: ClientBody,
        chosen: &Chosen,
        limits: &Limits<'_>,
        started: Instant,
        sent: &mut Sent,
    ) -> Result<(Response<Incoming>, Option<InFlight>), ForwardError> {
        let deadline = limits.request_timeout.map(|t| started + t);
        let is_grpc = crate::http::is_grpc(&parts.headers);
        let upgrade = upgrade_requested(&parts.method, &parts.headers);
        let retry = limits
            .retry
            .filter(|r| resilience::eligible(r, &parts.method, is_grpc, upgrade));
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
                        ForwardError::Timeout {
                            service: chosen.service.clone(),
                            after: limits.request_timeout.unwrap_or_default(),
                        }
                    })?,
                    None => collect.await,
                };
                replay = Some(collected.map_err(ForwardError::ClientBody)?.to_bytes());
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
            chosen.destination.budget.request(r.budget_window);
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
            let tried = self.attempt(req, chosen, limits, deadline, avoid).await;
            if tried.outcome == Outcome::PerTryTimeout {
                self.counters.timed_out(&sent.route, Timeout::PerTry);
            }
            avoid = tried.endpoint;
            sent.endpoint = tried.endpoint.or(sent.endpoint);
            let retriable = resilience::retriable(tried.outcome, retry, is_grpc);
            let next = resilience::next(
                tried.outcome,
                retriable,
                retry.map(|r| r.max_retries),
                attempt,
                elsewhere,
            );
            if next == Next::Answer {
                return tried.into_result();
            }
            // Sent again if the client had sent its whole body, within the limit, or if
            // the attempt gave the client's stream back with all it took copied.
            if replay.is_none() {
                replay = copy.as_ref().and_then(Replay::body);
                if replay.is_none() {
                    match copy.as_ref().and_then(Replay::resume) {
                        Some(resumed) => first = Some(Either::Left(resumed)),
                        None => {
                            debug!(service = %chosen.service, "not retried: the body cannot be replayed");
                            return tried.into_result();
                        }
                    }
                }
            }
            if next == Next::Elsewhere {
                // Nothing reached the endpoint: another one at once, outside the budget.
                elsewhere += 1;
                self.counters.retried(&sent.route);
                sent.retries += 1;
                debug!(service = %chosen.service, "connect failed: trying another endpoint");
                continue;
            }
            let retry = retry.expect("a policy retry has a policy");
            let asked = match &tried.result {
                Ok((rsp, _)) => resilience::retry_after(rsp.status(), rsp.headers()),
                Err(_) => None,
            };
            let pause = resilience::backoff(retry, attempt, crate::rng::fraction(), asked);
            // No time left for another attempt after the pause: the client gets the
            // answer it would have had.
            if !resilience::fits(Instant::now(), pause, deadline) {
                return tried.into_result();
            }
            if !chosen.destination.budget.try_retry(retry) {
                self.counters.budget_exhausted(&sent.route);
                debug!(service = %chosen.service, "retry budget exhausted");
                return tried.into_result();
            }
            attempt += 1;
            self.counters.retried(&sent.route);
            sent.retries += 1;
            drop(tried);
            tokio::time::sleep(pause).await;
        }
    }

    /// One attempt: pick, send within the per-try and request limits, classify.
    async fn attempt(
        &self,
        req: Request<ReqBody>,
        chosen: &Chosen,
        limits: &Limits<'_>,
        deadline: Option<Instant>,
        avoid: Option<std::net::SocketAddr>,
    ) -> Tried {
        let service = chosen.service.clone();
        let policy = &*chosen.policy;
        let destination = &chosen.destination;
        let Some(endpoints) = destination.endpoints(self.wait).await else {
            return Tried::not_sent(ForwardError::NoEndpoints { service });
        };
        let ep = match destination
            .balancer
            .pick_avoiding(&endpoints, policy, avoid)
        {
            Ok(ep) => ep,
            Err(NoPick::NoEndpoints) => {
                return Tried::not_sent(ForwardError::NoEndpoints { service });
            }
            Err(NoPick::AtCapacity) => {
                return Tried::not_sent(ForwardError::AtCapacity { service });
            }
        };
        // `maxConnections` bounds an endpoint's HTTP/1 connections, each busy with one
        // request; a multiplexed connection (HTTP/2, and every one between proxies) is
        // one per endpoint already.
        let breaker = &policy.breaker;
        let clients: &EndpointClients = &ep.conn;
        let slot = if breaker.max_connections > 0 && !clients.multiplexed(&req, self.version) {
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
                    return Tried::not_sent(ForwardError::AtCapacity { service });
                }
                Err(SlotError::Deadline) => {
                    let after = limits.request_timeout.unwrap_or_default();
                    return Tried::not_sent(ForwardError::Timeout { service, after });
                }
            }
        } else {
            None
        };
        let mut in_flight = ep.start_with(slot);
        in_flight.settle_with(Settle {
            breaker: policy.breaker.clone(),
            balancer: destination.balancer.clone(),
            ejections: self.counters.ejections.clone(),
            service: service.clone(),
        });
        let now = Instant::now();
        let limit = resilience::attempt_limit(limits.per_try_timeout, deadline, now);
        let send = clients.send(req, self.version);
        let result = match limit {
            Some(limit) => tokio::time::timeout(limit, send).await.ok(),
            None => Some(send.await),
        };
        let (outcome, result) = match result {
            None if deadline.is_some_and(|d| Instant::now() >= d) => {
                in_flight.settle(false);
                let after = limits.request_timeout.unwrap_or_default();
                (
                    Outcome::RequestTimeout,
                    Err(ForwardError::Timeout { service, after }),
                )
            }
            None => {
                in_flight.settle(false);
                let error = ForwardError::PerTryTimeout {
                    service,
                    addr: ep.addr,
                    after: limit.unwrap_or_default(),
                };
                (Outcome::PerTryTimeout, Err(error))
            }
            Some(Err(source)) => {
                let outcome = if source.is_connect() {
                    ep.connect_failed();
                    Outcome::ConnectFailed
                } else {
                    Outcome::Broken
                };
                in_flight.settle(false);
                let error = ForwardError::Endpoint {
                    service,
                    addr: ep.addr,
                    source,
                };
                (outcome, Err(error))
            }
            Some(Ok(rsp)) => {
                ep.connected();
                let status = rsp.status();
                if let Some(after) = resilience::retry_after(status, rsp.headers()) {
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
                let grpc = crate::http::grpc_status(rsp.headers());
                (Outcome::Answered { status, grpc }, Ok((rsp, in_flight)))
            }
        };
        Tried {
            outcome,
            result,
            endpoint: Some(ep.addr),
        }
    }
}

fn no_backend(rule: &Rule, why: &'static str) -> ForwardError {
    ForwardError::NoBackend {
        route: rule.route.clone(),
        why,
    }
}
