//! Outbound policy: compiles the TrafficPolicy that targets a Service port into the
//! `OutboundPolicy` its clients' proxies apply (`Policy.WatchOutbound`). A target that is
//! not a Service port, or one no TrafficPolicy names, gets the defaults.

use std::time::Duration;

use remora_api::v1 as api;
use remora_k8s::{Algorithm, RetryOn, parse_duration, retry_on};

use crate::{core::Target, index::Index};

/// Defaults the issue of record names: connect 1 s; budget 20 % + 10/s over 10 s;
/// backoff 25 ms to 250 ms; ejection 30 s doubling to 300 s, at most 50 % ejected.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn optional(s: &Option<String>) -> Option<api::OptionalDuration> {
    s.as_deref()
        .and_then(|s| parse_duration(s).ok())
        .map(|d| api::OptionalDuration {
            value: Some(duration(d)),
        })
}

fn or(s: &Option<String>, default: Duration) -> prost_types::Duration {
    duration(
        s.as_deref()
            .and_then(|s| parse_duration(s).ok())
            .unwrap_or(default),
    )
}

/// The policy for `target`.
pub fn outbound(index: &Index, target: &Target) -> api::OutboundPolicy {
    let found = index
        .service_port(target)
        .and_then(|(svc, port)| index.traffic_for(&svc, port));
    let Some(tp) = found else {
        return api::OutboundPolicy {
            metadata: Some(api::PolicyMetadata {
                kind: "default".into(),
                ..Default::default()
            }),
            timeouts: Some(api::Timeouts {
                connect: Some(api::OptionalDuration {
                    value: Some(duration(CONNECT_TIMEOUT)),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
    };
    let spec = &tp.spec;
    let t = spec.timeouts.clone().unwrap_or_default();
    let timeouts = api::Timeouts {
        request: optional(&t.request),
        per_try: optional(&t.per_try),
        connect: Some(api::OptionalDuration {
            value: Some(or(&t.connect, CONNECT_TIMEOUT)),
        }),
        idle: optional(&t.idle),
    };
    let retry = spec.retries.as_ref().map(|r| {
        let backoff = r.backoff.clone().unwrap_or_default();
        let budget = r.budget.clone().unwrap_or_default();
        api::RetryPolicy {
            max_retries: r.attempts,
            conditions: r
                .on
                .iter()
                .filter_map(|c| retry_on(c).ok())
                .map(|c| api::RetryCondition {
                    kind: Some(match c {
                        RetryOn::Status(s) => api::retry_condition::Kind::StatusCode(s.into()),
                        RetryOn::Grpc(g) => api::retry_condition::Kind::GrpcCode(g),
                        RetryOn::Class(c) => api::retry_condition::Kind::On(
                            match c {
                                "connect-failure" => api::RetryOn::ConnectFailure,
                                "reset" => api::RetryOn::Reset,
                                "refused-stream" => api::RetryOn::RefusedStream,
                                "unavailable" => api::RetryOn::Unavailable,
                                "5xx" => api::RetryOn::RetryOn5xx,
                                "gateway-error" => api::RetryOn::GatewayError,
                                _ => api::RetryOn::PerTryTimeout,
                            }
                            .into(),
                        ),
                    }),
                })
                .collect(),
            backoff_base: Some(or(&backoff.base, Duration::from_millis(25))),
            backoff_max: Some(or(&backoff.max, Duration::from_millis(250))),
            budget: Some(api::RetryBudget {
                ratio: budget.ratio.unwrap_or(0.2) as f32,
                min_per_second: budget.min_per_second.unwrap_or(10),
                window: Some(or(&budget.window, Duration::from_secs(10))),
            }),
            non_idempotent: r.non_idempotent,
        }
    });
    let algorithm = match spec.load_balancer.as_ref().map(|l| l.algorithm) {
        None | Some(Algorithm::PeakEWMA) => api::LoadBalancerAlgorithm::PeakEwma,
        Some(Algorithm::LeastRequest) => api::LoadBalancerAlgorithm::LeastRequest,
        Some(Algorithm::RoundRobin) => api::LoadBalancerAlgorithm::RoundRobin,
    };
    let circuit_breaker = spec.circuit_breaker.as_ref().map(|c| api::CircuitBreaker {
        consecutive_failures: c.consecutive_failures.unwrap_or(0),
        base_ejection_time: Some(or(&c.base_ejection_time, Duration::from_secs(30))),
        max_ejection_time: Some(or(&c.max_ejection_time, Duration::from_secs(300))),
        max_ejection_percent: c.max_ejection_percent.unwrap_or(50),
        max_connections: c.max_connections.unwrap_or(0),
        max_pending_requests: c.max_pending_requests.unwrap_or(0),
        max_requests: c.max_requests.unwrap_or(0),
    });
    api::OutboundPolicy {
        metadata: Some(api::PolicyMetadata {
            kind: "TrafficPolicy".into(),
            name: tp.id.name.clone(),
            namespace: tp.id.namespace.clone(),
            revision: String::new(),
        }),
        protocol: 0,
        http_routes: Vec::new(),
        timeouts: Some(timeouts),
        retry,
        load_balancer: Some(api::LoadBalancer {
            algorithm: algorithm.into(),
        }),
        circuit_breaker,
        tcp_backends: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::NsName;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec: { clusterIP: 10.96.0.10, ports: [ { port: 80, targetPort: 8080 }, { port: 81 } ] }
---
apiVersion: policy.remora.io/v1alpha1
kind: TrafficPolicy
metadata: { name: web-all, namespace: shop }
spec:
  targetRef: { name: web }
  loadBalancer: { algorithm: RoundRobin }
---
apiVersion: policy.remora.io/v1alpha1
kind: TrafficPolicy
metadata: { name: web-80, namespace: shop }
spec:
  targetRef: { name: web, port: 80 }
  timeouts: { request: 2s }
  retries: { attempts: 2, on: [5xx, grpc-14], budget: { ratio: 0.5 } }
  circuitBreaker: { consecutiveFailures: 3, maxRequests: 10 }
"#;

    fn index() -> Index {
        Index::from_yaml(OBJECTS)
    }

    #[test]
    fn the_most_specific_policy_is_compiled_with_defaults_filled_in() {
        let index = index();
        let p = outbound(&index, &Target::Addr("10.96.0.10:80".parse().unwrap()));
        assert_eq!(p.metadata.unwrap().name, "web-80");
        let r = p.retry.unwrap();
        assert_eq!(r.max_retries, 2);
        assert_eq!(r.conditions.len(), 2);
        let budget = r.budget.unwrap();
        assert_eq!((budget.ratio, budget.min_per_second), (0.5, 10));
        assert_eq!(budget.window.unwrap().seconds, 10);
        assert_eq!(
            p.timeouts
                .as_ref()
                .unwrap()
                .request
                .unwrap()
                .value
                .unwrap()
                .seconds,
            2
        );
        assert_eq!(
            p.timeouts.unwrap().connect.unwrap().value.unwrap().seconds,
            1
        );
        let cb = p.circuit_breaker.unwrap();
        assert_eq!(
            (
                cb.consecutive_failures,
                cb.max_requests,
                cb.max_ejection_percent
            ),
            (3, 10, 50)
        );

        let svc = Target::Service {
            id: NsName::new("shop", "web"),
            port: 81,
        };
        let p = outbound(&index, &svc);
        assert_eq!(p.metadata.unwrap().name, "web-all");
        assert_eq!(
            p.load_balancer.unwrap().algorithm,
            i32::from(api::LoadBalancerAlgorithm::RoundRobin)
        );
        assert!(p.retry.is_none());
        let p = outbound(&index, &Target::Addr("10.0.0.9:80".parse().unwrap()));
        assert_eq!(p.metadata.unwrap().kind, "default");
    }
}
