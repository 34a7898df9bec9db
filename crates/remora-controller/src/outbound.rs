//! Outbound policy: compiles the TrafficPolicy that targets a Service port into the
//! `OutboundPolicy` its clients' proxies apply (`Policy.WatchOutbound`). A target that is
//! not a Service port, or one no TrafficPolicy names, gets the defaults.

use std::time::Duration;

use remora_api::v1 as api;
use remora_k8s::{Algorithm, RetryOn, parse_duration, retry_on};

use crate::{
    core::{HttpRoute, NsName, Target},
    index::Index,
};

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

/// The policy for `target`, as a client in `client_ns` sees it.
pub fn outbound(index: &Index, target: &Target, client_ns: &str) -> api::OutboundPolicy {
    let service = index.service_port(target);
    let http_routes = match &service {
        Some((svc, port)) => index
            .routes_for(svc, *port, client_ns)
            .into_iter()
            .map(|r| http_route(r, &index.domains().cluster_domain))
            .collect(),
        None => Vec::new(),
    };
    let mut policy = traffic(index, service);
    policy.http_routes = http_routes;
    remora_api::with_revision(policy)
}

/// The TrafficPolicy part: everything but the routes.
fn traffic(index: &Index, service: Option<(NsName, u16)>) -> api::OutboundPolicy {
    let found = service.and_then(|(svc, port)| index.traffic_for(&svc, port));
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
                .retry_on
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

/// One HTTPRoute as the proxy applies it. A backend that is not a Service port in the
/// route's namespace gets an empty target: its share of requests is answered 500.
fn http_route(r: &HttpRoute, cluster_domain: &str) -> api::HttpRoute {
    use remora_k8s::{
        HttpRouteRulesMatchesHeadersType as HeaderType, HttpRouteRulesMatchesPathType as PathType,
        HttpRouteRulesMatchesQueryParamsType as QueryType,
    };
    let exact_or_regex_header = |regex: bool, v: &str| {
        if regex {
            api::header_match::Value::Regex(v.to_string())
        } else {
            api::header_match::Value::Exact(v.to_string())
        }
    };
    let rules = r
        .spec
        .rules
        .iter()
        .flatten()
        .map(|rule| {
            let matches = rule
                .matches
                .iter()
                .flatten()
                .map(|m| api::HttpRouteMatch {
                    path: m.path.as_ref().map(|p| {
                        let value = p.value.clone().unwrap_or_else(|| "/".into());
                        api::PathMatch {
                            kind: Some(match p.r#type.clone().unwrap_or(PathType::PathPrefix) {
                                PathType::Exact => api::path_match::Kind::Exact(value),
                                PathType::PathPrefix => api::path_match::Kind::Prefix(value),
                                PathType::RegularExpression => api::path_match::Kind::Regex(value),
                            }),
                        }
                    }),
                    headers: m
                        .headers
                        .iter()
                        .flatten()
                        .map(|h| api::HeaderMatch {
                            name: h.name.to_ascii_lowercase(),
                            value: Some(exact_or_regex_header(
                                h.r#type == Some(HeaderType::RegularExpression),
                                &h.value,
                            )),
                        })
                        .collect(),
                    query_params: m
                        .query_params
                        .iter()
                        .flatten()
                        .map(|q| api::QueryParamMatch {
                            name: q.name.clone(),
                            value: Some(if q.r#type == Some(QueryType::RegularExpression) {
                                api::query_param_match::Value::Regex(q.value.clone())
                            } else {
                                api::query_param_match::Value::Exact(q.value.clone())
                            }),
                        })
                        .collect(),
                    method: m.method.as_ref().map(method).unwrap_or_default().into(),
                })
                .collect();
            let backends = rule
                .backend_refs
                .iter()
                .flatten()
                .map(|b| {
                    let target = match (remora_k8s::backend_problem(&r.id.namespace, b), b.port) {
                        (None, Some(port)) => {
                            format!("{}.{}.svc.{cluster_domain}:{port}", b.name, r.id.namespace)
                        }
                        _ => String::new(),
                    };
                    api::WeightedBackend {
                        target,
                        weight: b.weight.unwrap_or(1).max(0) as u32,
                    }
                })
                .collect();
            let (mut request, mut response) = (None, None);
            // Other filters are refused when the route is converted.
            for c in rule
                .filters
                .iter()
                .flatten()
                .filter_map(remora_k8s::header_changes)
            {
                let lower = |v: &[(&str, &str)]| {
                    v.iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                        .collect()
                };
                let m = api::HeaderModifier {
                    set: lower(&c.set),
                    add: lower(&c.add),
                    remove: c.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
                };
                if c.response {
                    response = Some(m);
                } else {
                    request = Some(m);
                }
            }
            api::HttpRouteRule {
                matches,
                backends,
                request_header_modifier: request,
                response_header_modifier: response,
                timeouts: rule.timeouts.as_ref().map(|t| api::Timeouts {
                    request: optional(&t.request),
                    per_try: optional(&t.backend_request),
                    connect: None,
                    idle: None,
                }),
                retry: None,
            }
        })
        .collect();
    api::HttpRoute {
        metadata: Some(api::PolicyMetadata {
            kind: "HTTPRoute".into(),
            name: r.id.name.clone(),
            namespace: r.id.namespace.clone(),
            revision: String::new(),
        }),
        rules,
    }
}

fn method(m: &remora_k8s::HttpRouteRulesMatchesMethod) -> &'static str {
    use remora_k8s::HttpRouteRulesMatchesMethod as M;
    match m {
        M::Get => "GET",
        M::Head => "HEAD",
        M::Post => "POST",
        M::Put => "PUT",
        M::Delete => "DELETE",
        M::Connect => "CONNECT",
        M::Options => "OPTIONS",
        M::Trace => "TRACE",
        M::Patch => "PATCH",
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
  retries: { attempts: 2, retryOn: [5xx, grpc-14], budget: { ratio: 0.5 } }
  circuitBreaker: { consecutiveFailures: 3, maxRequests: 10 }
"#;

    fn index() -> Index {
        Index::from_yaml(OBJECTS)
    }

    /// `PolicyMetadata.revision` is a digest of the whole answer: the same when another
    /// index (another replica) compiles the same objects, another when anything in the
    /// answer changes, routes and their header maps included.
    #[test]
    fn the_revision_follows_the_answer_and_nothing_else() {
        let at = |addr: &str| Target::Addr(addr.parse().unwrap());
        let rev = |yaml: &str, addr: &str| {
            outbound(&Index::from_yaml(yaml), &at(addr), "shop")
                .metadata
                .unwrap()
                .revision
        };
        // Eight headers set: in a HashMap, two compilations would encode them in two
        // orders almost every time.
        let headers: Vec<String> = (0..8)
            .map(|i| format!("{{ name: X-H{i}, value: v{i} }}"))
            .collect();
        let routes = ROUTES.replace(
            "set: [{ name: X-Route, value: canary }]",
            &format!("set: [{}]", headers.join(", ")),
        );
        let compiled = outbound(&Index::from_yaml(&routes), &at("10.96.0.10:80"), "shop");
        let set = &compiled.http_routes[1].rules[0]
            .request_header_modifier
            .as_ref()
            .unwrap()
            .set;
        assert_eq!(set.len(), 8, "{set:?}");
        let first = rev(OBJECTS, "10.96.0.10:80");
        assert_eq!(first.len(), 16, "{first}");
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()), "{first}");
        for _ in 0..20 {
            assert_eq!(rev(OBJECTS, "10.96.0.10:80"), first);
            assert_eq!(
                rev(&routes, "10.96.0.10:80"),
                rev(&routes, "10.96.0.10:80"),
                "maps encode in one order"
            );
        }
        assert_ne!(
            rev(
                &OBJECTS.replace("request: 2s", "request: 3s"),
                "10.96.0.10:80"
            ),
            first
        );
        assert_ne!(
            rev(OBJECTS, "10.96.0.10:81"),
            first,
            "another port's answer"
        );
        assert_ne!(rev(ROUTES, "10.96.0.10:80"), rev(OBJECTS, "10.96.0.10:80"));
    }

    #[test]
    fn the_most_specific_policy_is_compiled_with_defaults_filled_in() {
        let index = index();
        let p = outbound(
            &index,
            &Target::Addr("10.96.0.10:80".parse().unwrap()),
            "shop",
        );
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
        let p = outbound(&index, &svc, "shop");
        assert_eq!(p.metadata.unwrap().name, "web-all");
        assert_eq!(
            p.load_balancer.unwrap().algorithm,
            i32::from(api::LoadBalancerAlgorithm::RoundRobin)
        );
        assert!(p.retry.is_none());
        let p = outbound(
            &index,
            &Target::Addr("10.0.0.9:80".parse().unwrap()),
            "shop",
        );
        assert_eq!(p.metadata.unwrap().kind, "default");
    }

    const ROUTES: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec: { clusterIP: 10.96.0.10, ports: [ { name: http, port: 80 }, { name: admin, port: 81 } ] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: canary, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z" }
spec:
  parentRefs: [{ kind: Service, group: "", name: web, port: 80 }]
  rules:
    - matches: [{ path: { type: PathPrefix, value: /api }, headers: [{ name: X-Canary, value: "yes" }], method: GET }]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: { set: [{ name: X-Route, value: canary }], remove: [X-Debug] }
      backendRefs: [{ name: web-v2, port: 8080 }]
      timeouts: { request: 3s, backendRequest: "0s" }
    - backendRefs:
        - { name: web, port: 80, weight: 90 }
        - { name: web-v2, port: 8080, weight: 10 }
        - { name: elsewhere, namespace: other, port: 80 }
        - { name: no-port }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: older, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z" }
spec:
  parentRefs: [{ group: core, kind: Service, name: web, sectionName: http }]
  rules: [{ matches: [{ path: { type: Exact, value: /old } }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: gateway-only, namespace: shop }
spec:
  parentRefs: [{ group: gateway.networking.k8s.io, kind: Gateway, name: public }]
  rules: [{ backendRefs: [{ name: web, port: 80 }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: mine, namespace: client }
spec:
  parentRefs: [{ group: "", kind: Service, name: web, namespace: shop }]
  rules: [{ backendRefs: [{ name: local-web, port: 80 }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: defaults-to-a-gateway, namespace: shop }
spec:
  parentRefs: [{ name: web }]
  rules: [{ backendRefs: [{ name: web, port: 80 }] }]
"#;

    #[test]
    fn routes_attach_by_port_and_section_oldest_first_and_compile_whole() {
        let index = Index::from_yaml(ROUTES);
        let web80 = Target::Addr("10.96.0.10:80".parse().unwrap());
        let p = outbound(&index, &web80, "shop");
        let names: Vec<_> = p
            .http_routes
            .iter()
            .map(|r| r.metadata.as_ref().unwrap().name.as_str())
            .collect();
        assert_eq!(
            names,
            ["older", "canary"],
            "oldest first; gateway routes ignored"
        );
        let canary = &p.http_routes[1];
        let m = &canary.rules[0].matches[0];
        assert_eq!(m.method, "GET");
        assert_eq!(m.headers[0].name, "x-canary");
        assert_eq!(
            m.path.as_ref().unwrap().kind,
            Some(api::path_match::Kind::Prefix("/api".into()))
        );
        let h = canary.rules[0].request_header_modifier.as_ref().unwrap();
        assert_eq!(h.set.get("x-route").map(String::as_str), Some("canary"));
        assert_eq!(h.remove, ["x-debug"]);
        let t = canary.rules[0].timeouts.unwrap();
        assert_eq!(t.request.unwrap().value.unwrap().seconds, 3);
        assert_eq!(
            t.per_try.unwrap().value.unwrap(),
            prost_types::Duration::default()
        );
        let backends: Vec<_> = canary.rules[1]
            .backends
            .iter()
            .map(|b| (b.target.as_str(), b.weight))
            .collect();
        assert_eq!(
            backends,
            [
                ("web.shop.svc.cluster.local:80", 90),
                ("web-v2.shop.svc.cluster.local:8080", 10),
                ("", 1),
                ("", 1)
            ]
        );

        // Port 81 is "admin": the route bound to the "http" section does not attach,
        // nor does the one bound to port 80.
        let web81 = Target::Addr("10.96.0.10:81".parse().unwrap());
        assert!(outbound(&index, &web81, "shop").http_routes.is_empty());

        // A client in "client" has a consumer route: it replaces the producer routes.
        let p = outbound(&index, &web80, "client");
        let names: Vec<_> = p
            .http_routes
            .iter()
            .map(|r| r.metadata.as_ref().unwrap().name.as_str())
            .collect();
        assert_eq!(names, ["mine"]);
        assert_eq!(
            p.http_routes[0].rules[0].backends[0].target,
            "local-web.client.svc.cluster.local:80"
        );
        // A client elsewhere follows the producer's routes.
        assert_eq!(outbound(&index, &web80, "third").http_routes.len(), 2);
    }
}
