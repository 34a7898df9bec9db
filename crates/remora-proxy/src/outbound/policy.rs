//! Outbound policy: what the controller's `Policy.WatchOutbound` says about a Service
//! (its HTTP routes, timeouts, retries and their budget, the balancing algorithm,
//! circuit breaking), in the form the data path uses.

use std::{sync::Arc, time::Duration};

use http::{Method, StatusCode};
use remora_api::v1 as api;

use super::routes::Routes;

/// The balancing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    #[default]
    PeakEwma,
    LeastRequest,
    RoundRobin,
}

/// When a failed attempt may be tried again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conditions {
    pub connect_failure: bool,
    pub reset: bool,
    pub refused_stream: bool,
    pub unavailable: bool,
    pub any_5xx: bool,
    pub gateway_error: bool,
    pub per_try_timeout: bool,
    pub statuses: Vec<u16>,
    pub grpc: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub max_retries: u32,
    pub on: Conditions,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub budget_ratio: f64,
    pub budget_min_per_second: u32,
    pub budget_window: Duration,
    pub non_idempotent: bool,
}

/// Per-endpoint ejection and concurrency limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Breaker {
    /// 0: no ejection.
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejection_percent: u32,
    /// 0: unlimited.
    pub max_requests: u32,
    /// HTTP/1 connections per endpoint (each carries one request at a time); 0:
    /// unlimited. Multiplexed connections (HTTP/2, everything between proxies) are one
    /// per endpoint anyway.
    pub max_connections: u32,
    /// Requests that may wait for one of those connections; beyond them, 503 at once.
    pub max_pending_requests: u32,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            consecutive_failures: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
            max_requests: 0,
            max_connections: 0,
            max_pending_requests: 0,
        }
    }
}

/// One Service's outbound policy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServicePolicy {
    /// Where it came from, for logs: `default` or `namespace/name`.
    pub name: Arc<str>,
    /// The controller's digest of the answer (`PolicyMetadata.revision`), for
    /// `/debug/targets`; empty for the proxy's own default.
    pub revision: Arc<str>,
    pub request_timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    /// Connecting to an endpoint (TCP and TLS); None: `REMORA_CONNECT_TIMEOUT`.
    pub connect_timeout: Option<Duration>,
    /// How long a pooled connection to an endpoint may sit unused; None: 90 s.
    pub idle_timeout: Option<Duration>,
    pub retry: Option<Retry>,
    pub algorithm: Algorithm,
    pub breaker: Breaker,
    /// The Service's HTTP routes; empty: every request goes to the Service itself.
    pub routes: Arc<Routes>,
}

fn duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    remora_api::duration(d?)
}

fn optional(d: Option<&api::OptionalDuration>) -> Option<Duration> {
    d?.limit()
}

impl ServicePolicy {
    /// The controller's answer; anything unreadable falls back to the default.
    pub fn from_api(p: &api::OutboundPolicy) -> Self {
        let name = match &p.metadata {
            Some(m) if !m.name.is_empty() => format!("{}/{}", m.namespace, m.name),
            _ => "default".to_string(),
        };
        let timeouts = p.timeouts.unwrap_or_default();
        let retry = p.retry.as_ref().filter(|r| r.max_retries > 0).map(|r| {
            let mut on = Conditions::default();
            for c in r.conditions.iter().filter_map(|c| c.kind.as_ref()) {
                match c {
                    api::retry_condition::Kind::StatusCode(s) => {
                        on.statuses.extend(u16::try_from(*s).ok())
                    }
                    api::retry_condition::Kind::GrpcCode(g) => on.grpc.push(*g),
                    api::retry_condition::Kind::On(o) => match api::RetryOn::try_from(*o) {
                        Ok(api::RetryOn::ConnectFailure) => on.connect_failure = true,
                        Ok(api::RetryOn::Reset) => on.reset = true,
                        Ok(api::RetryOn::RefusedStream) => on.refused_stream = true,
                        Ok(api::RetryOn::Unavailable) => on.unavailable = true,
                        Ok(api::RetryOn::RetryOn5xx) => on.any_5xx = true,
                        Ok(api::RetryOn::GatewayError) => on.gateway_error = true,
                        Ok(api::RetryOn::PerTryTimeout) => on.per_try_timeout = true,
                        _ => {}
                    },
                }
            }
            let budget = r.budget.unwrap_or_default();
            Retry {
                max_retries: r.max_retries.min(10),
                on,
                backoff_base: duration(r.backoff_base.as_ref())
                    .unwrap_or(Duration::from_millis(25)),
                backoff_max: duration(r.backoff_max.as_ref()).unwrap_or(Duration::from_millis(250)),
                budget_ratio: f64::from(budget.ratio).clamp(0.0, 1.0),
                budget_min_per_second: budget.min_per_second,
                budget_window: duration(budget.window.as_ref())
                    .filter(|w| !w.is_zero())
                    .unwrap_or(Duration::from_secs(10)),
                non_idempotent: r.non_idempotent,
            }
        });
        let algorithm = match p.load_balancer.as_ref().map(|l| l.algorithm()) {
            Some(api::LoadBalancerAlgorithm::LeastRequest) => Algorithm::LeastRequest,
            Some(api::LoadBalancerAlgorithm::RoundRobin) => Algorithm::RoundRobin,
            _ => Algorithm::PeakEwma,
        };
        let breaker = p
            .circuit_breaker
            .as_ref()
            .map(|c| Breaker {
                consecutive_failures: c.consecutive_failures,
                base_ejection: duration(c.base_ejection_time.as_ref())
                    .filter(|d| !d.is_zero())
                    .unwrap_or(Duration::from_secs(30)),
                max_ejection: duration(c.max_ejection_time.as_ref())
                    .filter(|d| !d.is_zero())
                    .unwrap_or(Duration::from_secs(300)),
                max_ejection_percent: c.max_ejection_percent.min(100),
                max_requests: c.max_requests,
                max_connections: c.max_connections,
                max_pending_requests: c.max_pending_requests,
            })
            .unwrap_or_default();
        Self {
            name: Arc::from(name),
            revision: Arc::from(p.metadata.as_ref().map_or("", |m| m.revision.as_str())),
            request_timeout: optional(timeouts.request.as_ref()),
            per_try_timeout: optional(timeouts.per_try.as_ref()),
            connect_timeout: optional(timeouts.connect.as_ref()),
            idle_timeout: optional(timeouts.idle.as_ref()),
            retry,
            algorithm,
            breaker,
            routes: Arc::new(Routes::from_api(&p.http_routes)),
        }
    }
}

impl Retry {
    /// Whether requests with `method` may be retried at all.
    pub fn method_allowed(&self, method: &Method) -> bool {
        self.non_idempotent
            || matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::PUT
                    | Method::DELETE
                    | Method::TRACE
            )
    }

    /// Whether a response is a retriable failure. A gRPC call is retried only on the
    /// gRPC codes named (its status is in the headers of a trailers-only response).
    pub fn retriable_response(&self, status: StatusCode, grpc: Option<u32>, is_grpc: bool) -> bool {
        if is_grpc {
            return grpc.is_some_and(|g| self.on.grpc.contains(&g))
                || (self.on.unavailable && grpc == Some(14));
        }
        let code = status.as_u16();
        self.on.statuses.contains(&code)
            || (self.on.any_5xx && status.is_server_error())
            || (self.on.gateway_error && matches!(code, 502..=504))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(ratio: f64, min_per_second: u32) -> Retry {
        Retry {
            max_retries: 3,
            on: Conditions {
                any_5xx: true,
                ..Default::default()
            },
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_ratio: ratio,
            budget_min_per_second: min_per_second,
            budget_window: Duration::from_secs(10),
            non_idempotent: false,
        }
    }

    #[test]
    fn methods_and_responses() {
        let r = retry(0.2, 10);
        assert!(r.method_allowed(&Method::GET) && r.method_allowed(&Method::PUT));
        assert!(!r.method_allowed(&Method::POST));
        assert!(r.retriable_response(StatusCode::SERVICE_UNAVAILABLE, None, false));
        assert!(!r.retriable_response(StatusCode::NOT_FOUND, None, false));
        // gRPC only on named gRPC codes.
        assert!(!r.retriable_response(StatusCode::SERVICE_UNAVAILABLE, Some(14), true));
        let mut g = r.clone();
        g.on.grpc = vec![14];
        assert!(g.retriable_response(StatusCode::OK, Some(14), true));
        assert!(!g.retriable_response(StatusCode::OK, Some(0), true));
    }

    #[test]
    fn the_controllers_answer_is_read_with_defaults() {
        let p = ServicePolicy::from_api(&api::OutboundPolicy {
            retry: Some(api::RetryPolicy {
                max_retries: 2,
                conditions: vec![api::RetryCondition {
                    kind: Some(api::retry_condition::Kind::StatusCode(503)),
                }],
                ..Default::default()
            }),
            load_balancer: Some(api::LoadBalancer {
                algorithm: api::LoadBalancerAlgorithm::RoundRobin.into(),
            }),
            ..Default::default()
        });
        let r = p.retry.unwrap();
        assert_eq!(r.on.statuses, [503]);
        assert_eq!(r.budget_window, Duration::from_secs(10));
        assert_eq!(p.algorithm, Algorithm::RoundRobin);
        assert_eq!(p.breaker, Breaker::default());
        assert_eq!(&*p.name, "default");
    }
}
