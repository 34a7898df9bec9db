//! `remora diagnose endpoints|policy|proxy-metrics|config POD|ADDR`: one proxy's live
//! view, from its admin server (`/debug/targets`, `/debug/inbound`, `/metrics`,
//! `/config`), formatted for a terminal or passed through as JSON. The `/debug` pages
//! answer loopback clients only, so a pod is reached as `kubectl port-forward` reaches
//! it: through the API server to the pod's own loopback.

use std::{fmt::Write as _, time::Duration};

use anyhow::Context as _;
use serde_json::Value;

use crate::stat::{self, ADMIN_PORT};

/// Whose proxy to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An admin address, `host:port`.
    Admin(String),
    /// A pod, in the given namespace or the kubeconfig's.
    Pod {
        namespace: Option<String>,
        name: String,
    },
}

impl Target {
    /// `pod/NAME` (or `po/NAME`), or a bare name with a namespace given, is a pod;
    /// anything else is an admin address (`host[:port]`, port 4191 unless given).
    pub fn parse(arg: &str, namespace: Option<&str>) -> anyhow::Result<Self> {
        let pod = ["pod/", "pods/", "po/"]
            .iter()
            .find_map(|p| arg.strip_prefix(p))
            .or_else(|| {
                let address = arg.contains(':')
                    || arg
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse::<std::net::IpAddr>()
                        .is_ok();
                namespace.filter(|_| !address).map(|_| arg)
            });
        Ok(match pod {
            Some(name) => {
                anyhow::ensure!(
                    !name.is_empty() && !name.contains('/'),
                    "{arg}: not a pod name"
                );
                Self::Pod {
                    namespace: namespace.map(str::to_string),
                    name: name.to_string(),
                }
            }
            None => Self::Admin(stat::admin_addr(arg)),
        })
    }

    /// `GET path` from this proxy's admin server: the body of a 200, or an error that
    /// says which proxy and why.
    pub async fn get(&self, path: &str, timeout: Duration) -> anyhow::Result<String> {
        let got = async {
            match self {
                Self::Admin(addr) => stat::get(addr, path).await.with_context(|| addr.clone()),
                Self::Pod { namespace, name } => {
                    let client = kube::Client::try_default().await.context(
                        "no cluster: point KUBECONFIG (or ~/.kube/config) at it, or give the \
                         proxy's admin address",
                    )?;
                    let namespace = namespace
                        .clone()
                        .unwrap_or_else(|| client.default_namespace().to_string());
                    pod_get(client, &namespace, name, path)
                        .await
                        .with_context(|| format!("pod {namespace}/{name}"))
                }
            }
        };
        tokio::time::timeout(timeout, got)
            .await
            .map_err(|_| anyhow::anyhow!("{self}: no answer within {timeout:?}"))?
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Admin(addr) => f.write_str(addr),
            Self::Pod {
                namespace: Some(ns),
                name,
            } => write!(f, "pod {ns}/{name}"),
            Self::Pod { name, .. } => write!(f, "pod {name}"),
        }
    }
}

/// `GET path` from a meshed pod's proxy, port-forwarded to the pod's loopback through the
/// API server (a running pod with the mesh's label, or an error saying what it lacks).
async fn pod_get(
    client: kube::Client,
    namespace: &str,
    name: &str,
    path: &str,
) -> anyhow::Result<String> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client, namespace);
    let pod = pods
        .get_opt(name)
        .await
        .context("reading the pod")?
        .context("no such pod")?;
    let meshed = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("remora.io/meshed"))
        .is_some_and(|v| v == "true");
    anyhow::ensure!(
        meshed,
        "not meshed (no remora.io/meshed=true label): it has no proxy to ask"
    );
    let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
    anyhow::ensure!(phase == "Running", "not running (phase {phase:?})");
    let mut forward = pods
        .portforward(name, &[ADMIN_PORT])
        .await
        .with_context(|| format!("port-forwarding to port {ADMIN_PORT}"))?;
    let stream = forward
        .take_stream(ADMIN_PORT)
        .context("the port-forward has no stream")?;
    let error = forward.take_error(ADMIN_PORT);
    let got = stat::get_over(stream, &format!("localhost:{ADMIN_PORT}"), path).await;
    // The error channel is read before the forward is aborted: aborting first dropped a
    // message still on its way, and the user was told "connection closed" instead.
    let result = match (got, error) {
        (Ok(body), _) => Ok(body),
        // A connection the kubelet could not make is said on the error channel, and the
        // stream just ends: that message is the reason.
        (Err(e), Some(error)) => match tokio::time::timeout(Duration::from_secs(1), error).await {
            Ok(Some(message)) => Err(anyhow::anyhow!("{}", message.trim())),
            // The message can be lost on the way: kube's forwarder ends at the first
            // failure of the WebSocket (a reset, or the request written after the API
            // server's Close) before handing over what it had already received.
            _ => Err(e.context(format!(
                "the port-forward to port {ADMIN_PORT} ended before the proxy answered \
                 (is the proxy running and listening there?)"
            ))),
        },
        (Err(e), None) => Err(e),
    };
    forward.abort();
    result
}

/// What to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Outbound destinations, their policies and routes, and their endpoints' state.
    Endpoints,
    /// Inbound authorization, port by port.
    Policy,
    /// The exposition, as scraped.
    ProxyMetrics,
    /// The effective configuration.
    Config,
}

impl View {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "endpoints" => Self::Endpoints,
            "policy" => Self::Policy,
            "proxy-metrics" => Self::ProxyMetrics,
            "config" => Self::Config,
            _ => return None,
        })
    }

    /// The admin path it reads.
    pub fn path(self) -> &'static str {
        match self {
            Self::Endpoints => "/debug/targets",
            Self::Policy => "/debug/inbound",
            Self::ProxyMetrics => "/metrics",
            Self::Config => "/config",
        }
    }
}

/// `body` (what `view`'s path answered) for a terminal; `json` passes JSON through.
pub fn render(view: View, body: &str, json: bool) -> anyhow::Result<String> {
    if view == View::ProxyMetrics || json {
        return Ok(body.to_string());
    }
    let v: Value = serde_json::from_str(body)?;
    Ok(match view {
        View::Endpoints => endpoints(&v),
        View::Policy => policy(&v),
        View::Config => config(&v),
        View::ProxyMetrics => unreachable!("passed through"),
    })
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn endpoints(v: &Value) -> String {
    let mut out = String::new();
    let targets = v.as_array().map(Vec::as_slice).unwrap_or_default();
    if targets.is_empty() {
        out.push_str("no outbound destinations in use\n");
    }
    for t in targets {
        let _ = writeln!(
            out,
            "{} {} (policy {}{}, idle {}s)",
            s(&t["kind"]),
            match &t["service"] {
                Value::String(name) => format!("{name} [{}]", s(&t["key"])),
                _ => s(&t["key"]),
            },
            s(&t["policy"]),
            match &t["policy_revision"] {
                Value::String(r) if !r.is_empty() => format!(" @{r}"),
                _ => String::new(),
            },
            s(&t["idle_seconds"]),
        );
        for r in t["routes"].as_array().into_iter().flatten() {
            let backends: Vec<String> = r["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| format!("{} ×{}", s(&b["backend"]), s(&b["weight"])))
                .collect();
            let _ = writeln!(out, "  route {} -> {}", s(&r["route"]), backends.join(", "));
        }
        if let Value::Object(b) = &t["retry_budget"] {
            let _ = writeln!(
                out,
                "  retry budget: {} left ({} retries for {} requests in the window)",
                s(&b["left"]),
                s(&b["retries"]),
                s(&b["requests"])
            );
        }
        for e in t["endpoints"].as_array().into_iter().flatten() {
            let state = match (e["ejected"].as_bool(), e["ready"].as_bool()) {
                (Some(true), _) => "ejected",
                (_, Some(false)) => "terminating",
                _ => "ready",
            };
            let _ = writeln!(
                out,
                "  {:<22} {:<11} {:>9}ms {:>3} in flight {:>3} connections  {}",
                s(&e["addr"]),
                state,
                s(&e["latency_ms"]),
                s(&e["in_flight"]),
                s(&e["pool"]["connections"]),
                s(&e["identity"]),
            );
        }
    }
    out
}

fn grant(p: &Value) -> String {
    format!(
        "{} ({} connection grants, {} route grants)",
        s(&p["name"]),
        s(&p["connection_grants"]),
        s(&p["route_grants"])
    )
}

fn policy(v: &Value) -> String {
    let mut out = String::new();
    for (port, d) in v["decided"].as_object().into_iter().flatten() {
        let _ = writeln!(
            out,
            "decided on {port}: {} connections allowed, {} denied; {} requests allowed, {} denied",
            s(&d["connections_allowed"]),
            s(&d["connections_denied"]),
            s(&d["requests_allowed"]),
            s(&d["requests_denied"]),
        );
    }
    if v["answered"].as_bool() == Some(true) {
        for (port, p) in v["ports"].as_object().into_iter().flatten() {
            let _ = writeln!(out, "port {port}: {}", grant(p));
        }
        let _ = writeln!(out, "every other port: {}", grant(&v["other"]));
    } else {
        let _ = writeln!(
            out,
            "no answer from the controller yet{}: every port gets the default, {}",
            if v["has_controller"].as_bool() == Some(false) {
                " (none configured)"
            } else {
                ""
            },
            grant(&v["default"])
        );
    }
    out
}

fn config(v: &Value) -> String {
    let mut out = String::new();
    for (name, e) in v.as_object().into_iter().flatten() {
        let _ = writeln!(out, "{name}={} ({})", s(&e["value"]), s(&e["source"]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_show_routes_budget_and_each_endpoints_state() {
        let body = r#"[{"key":"10.96.0.10:80","kind":"service","service":"web.shop:80",
            "policy":"shop/web","policy_revision":"9f2c4e1a0b3d5f60","idle_seconds":0,
            "routes":[{"route":"shop/split","backends":[{"backend":"web.shop:80","weight":1},{"backend":"web-v2.shop:80","weight":3}]}],
            "retry_budget":{"requests":10,"retries":1,"left":11},
            "endpoints":[{"addr":"10.0.0.1:8080","ready":true,"identity":"spiffe://x/web","latency_ms":1.5,"in_flight":0,"ejected":false,"pool":{"connections":2}},
                         {"addr":"10.0.0.2:8080","ready":true,"identity":null,"latency_ms":null,"in_flight":null,"ejected":true}]}]"#;
        let text = render(View::Endpoints, body, false).unwrap();
        for want in [
            "service web.shop:80 [10.96.0.10:80] (policy shop/web @9f2c4e1a0b3d5f60, idle 0s)",
            "route shop/split -> web.shop:80 ×1, web-v2.shop:80 ×3",
            "retry budget: 11 left (1 retries for 10 requests in the window)",
            "10.0.0.1:8080",
            "  2 connections  spiffe://x/web",
            "ejected",
        ] {
            assert!(text.contains(want), "{want} in:\n{text}");
        }
        assert_eq!(render(View::Endpoints, body, true).unwrap(), body);
        assert!(render(View::Endpoints, "not json", false).is_err());
    }

    #[test]
    fn a_target_is_a_pod_when_named_as_one_else_an_admin_address() {
        let pod = |ns: Option<&str>, name: &str| Target::Pod {
            namespace: ns.map(str::to_string),
            name: name.into(),
        };
        let admin = |a: &str| Target::Admin(a.into());
        for (arg, ns, want) in [
            ("pod/web-1", None, pod(None, "web-1")),
            ("po/web-1", Some("shop"), pod(Some("shop"), "web-1")),
            ("web-1", Some("shop"), pod(Some("shop"), "web-1")),
            ("web-1", None, admin("web-1:4191")),
            ("10.0.0.7", Some("shop"), admin("10.0.0.7:4191")),
            ("[fd00::7]", None, admin("[fd00::7]:4191")),
            ("localhost:9000", Some("shop"), admin("localhost:9000")),
        ] {
            assert_eq!(Target::parse(arg, ns).unwrap(), want, "{arg} -n {ns:?}");
        }
        assert!(Target::parse("pod/", None).is_err());
        assert!(Target::parse("pod/a/b", None).is_err());
        assert_eq!(pod(Some("shop"), "web-1").to_string(), "pod shop/web-1");
    }

    #[test]
    fn policy_before_and_after_an_answer() {
        let before = r#"{"answered":false,"has_controller":true,"default":{"name":"default:all-unauthenticated","connection_grants":1,"route_grants":0}}"#;
        assert!(
            render(View::Policy, before, false)
                .unwrap()
                .contains("no answer from the controller yet: every port gets the default, default:all-unauthenticated")
        );
        let after = r#"{"answered":true,"decided":{"8080":{"connections_allowed":0,"connections_denied":1,"requests_allowed":7,"requests_denied":2}},"ports":{"8080":{"name":"shop/web-callers","connection_grants":1,"route_grants":2}},"other":{"name":"default:deny","connection_grants":0,"route_grants":0}}"#;
        let text = render(View::Policy, after, false).unwrap();
        assert!(
            text.contains("port 8080: shop/web-callers (1 connection grants, 2 route grants)"),
            "{text}"
        );
        assert!(text.contains("every other port: default:deny"), "{text}");
        assert!(
            text.contains(
                "decided on 8080: 0 connections allowed, 1 denied; 7 requests allowed, 2 denied"
            ),
            "{text}"
        );
    }
}
