//! Inbound policy: compiles the AuthorizationPolicies that select a pod (or its
//! default, from the pod's annotation or the proxy's own setting) into the
//! `InboundWorkloadPolicy` a proxy enforces, one `InboundPolicy` per port the pod serves
//! or a policy names and one for every other port. `policy` serves it.

use ipnet::IpNet;
use remora_api::v1 as api;
use tracing::warn;

use crate::{
    core::{AuthzPolicy, AuthzSource, HttpMatch, NsName, Who},
    index::Index,
};

/// The defaults a pod's inbound side can have.
pub const DEFAULTS: &[&str] = &[
    "all-unauthenticated",
    "all-authenticated",
    "cluster-authenticated",
    "deny",
];

/// What one proxy asks about: its pod, with its configured default.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    pub pod: NsName,
    /// The proxy's REMORA_DEFAULT_INBOUND_POLICY.
    pub default: String,
}

/// Compiles the policy of every port of `key`'s pod from the index: each port the pod
/// declares, a selecting policy names or the kubelet probes gets its own policy; every
/// other port shares one.
pub fn workload(
    index: &Index,
    key: &WorkloadKey,
    cluster_networks: &[IpNet],
) -> api::InboundWorkloadPolicy {
    let pod = index.pod(&key.pod);
    let empty = Default::default();
    let labels = pod.map(|p| &p.labels).unwrap_or(&empty);
    let selecting: Vec<&AuthzPolicy> = index
        .authz_in(&key.pod.namespace)
        .into_iter()
        .filter(|a| a.selector.matches(labels))
        .collect();
    let mut ports: std::collections::BTreeSet<u16> = selecting
        .iter()
        .flat_map(|a| a.ports.iter().copied())
        .collect();
    if let Some(pod) = pod {
        ports.extend(pod.container_ports.iter().copied());
        ports.extend(pod.probe_paths.keys().copied());
    }
    let compile =
        |port| remora_api::with_revision(inbound(index, key, &selecting, port, cluster_networks));
    api::InboundWorkloadPolicy {
        ports: ports
            .into_iter()
            .map(|p| (u32::from(p), compile(Some(p))))
            .collect(),
        other: Some(compile(None)),
    }
}

/// Compiles the policy of one `port` (None: a port no policy names and no probe uses)
/// from the policies `selecting` the pod.
fn inbound(
    index: &Index,
    key: &WorkloadKey,
    selecting: &[&AuthzPolicy],
    port: Option<u16>,
    cluster_networks: &[IpNet],
) -> api::InboundPolicy {
    let td = index.domains().trust_domain.as_str();
    let pod = index.pod(&key.pod);
    let probe_paths = port
        .and_then(|port| pod.and_then(|p| p.probe_paths.get(&port)))
        .cloned()
        .unwrap_or_default();
    let selecting: Vec<&AuthzPolicy> = selecting
        .iter()
        .copied()
        .filter(|a| a.ports.is_empty() || port.is_some_and(|p| a.ports.contains(&p)))
        .collect();
    // The annotation overrides the proxy's setting; a bad value is logged and ignored.
    let annotated = pod.and_then(|p| p.default_inbound_policy.as_deref());
    let default = match annotated {
        Some(d) if DEFAULTS.contains(&d) => d,
        Some(d) => {
            warn!(pod = %key.pod, value = d, "ignoring an unknown remora.io/default-inbound-policy");
            key.default.as_str()
        }
        None => key.default.as_str(),
    };
    let default = if DEFAULTS.contains(&default) {
        default
    } else {
        "all-unauthenticated"
    };
    if selecting.is_empty() {
        return api::InboundPolicy {
            metadata: Some(metadata("default", default, "")),
            protocol: 0,
            authorizations: default_authorizations(default, cluster_networks, td),
            http_routes: Vec::new(),
            probe_paths,
            default_policy: default.to_string(),
        };
    }
    let names: Vec<&str> = selecting.iter().map(|a| a.id.name.as_str()).collect();
    let mut authorizations = Vec::new();
    let mut http_routes = Vec::new();
    for a in &selecting {
        let meta = metadata("AuthorizationPolicy", &a.id.name, &a.id.namespace);
        let grants: Vec<api::Authorization> = a
            .sources
            .iter()
            .map(|s| authorization(s, &meta, td))
            .collect();
        if a.http.is_empty() {
            authorizations.extend(grants);
        } else {
            http_routes.push(api::InboundHttpRoute {
                metadata: Some(meta.clone()),
                matches: a.http.iter().map(route_match).collect(),
                authorizations: grants,
            });
        }
    }
    api::InboundPolicy {
        metadata: Some(metadata(
            "AuthorizationPolicy",
            &names.join(","),
            &key.pod.namespace,
        )),
        protocol: 0,
        authorizations,
        http_routes,
        probe_paths,
        default_policy: default.to_string(),
    }
}

fn metadata(kind: &str, name: &str, namespace: &str) -> api::PolicyMetadata {
    api::PolicyMetadata {
        kind: kind.into(),
        name: name.into(),
        namespace: namespace.into(),
        revision: String::new(),
    }
}

fn networks(nets: &[IpNet]) -> Vec<api::IpNetwork> {
    nets.iter()
        .map(|n| api::IpNetwork {
            ip: match n.network() {
                std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
            },
            prefix_len: n.prefix_len().into(),
        })
        .collect()
}

fn anyone() -> Option<api::authorization::Authentication> {
    Some(api::authorization::Authentication::Unauthenticated(
        api::Unauthenticated {},
    ))
}

fn mesh(
    identities: Vec<String>,
    namespaces: Vec<String>,
) -> Option<api::authorization::Authentication> {
    Some(api::authorization::Authentication::Identities(
        api::MeshIdentities {
            identities,
            namespaces,
        },
    ))
}

/// Any identity of the trust domain: `*` never admits another domain's certificates
/// (possible when trust anchors are shared).
fn any_identity(td: &str) -> Vec<String> {
    vec![format!("spiffe://{td}/*")]
}

fn default_authorizations(
    default: &str,
    cluster_networks: &[IpNet],
    td: &str,
) -> Vec<api::Authorization> {
    let meta = Some(metadata("default", default, ""));
    let grant = |networks, authentication| api::Authorization {
        metadata: meta.clone(),
        networks,
        authentication,
    };
    match default {
        "all-unauthenticated" => vec![grant(Vec::new(), anyone())],
        "all-authenticated" => vec![grant(Vec::new(), mesh(any_identity(td), Vec::new()))],
        "cluster-authenticated" => vec![grant(
            networks(cluster_networks),
            mesh(any_identity(td), Vec::new()),
        )],
        _ => Vec::new(),
    }
}

/// One grant. Namespaces and `*` are compiled into identity patterns of the trust
/// domain, so the proxy's matching is exact or prefix only.
fn authorization(s: &AuthzSource, meta: &api::PolicyMetadata, td: &str) -> api::Authorization {
    api::Authorization {
        metadata: Some(meta.clone()),
        networks: networks(&s.networks),
        authentication: match &s.who {
            Who::Anyone => anyone(),
            Who::Mesh {
                identities,
                namespaces,
            } => {
                let mut patterns: Vec<String> = identities
                    .iter()
                    .map(|i| match i.as_str() {
                        "*" => format!("spiffe://{td}/*"),
                        other => other.to_string(),
                    })
                    .collect();
                patterns.extend(
                    namespaces
                        .iter()
                        .map(|ns| format!("spiffe://{td}/ns/{ns}/sa/*")),
                );
                mesh(patterns, Vec::new())
            }
        },
    }
}

fn route_match(m: &HttpMatch) -> api::HttpRouteMatch {
    api::HttpRouteMatch {
        path: m.path.as_ref().map(|(exact, value)| api::PathMatch {
            kind: Some(if *exact {
                api::path_match::Kind::Exact(value.clone())
            } else {
                api::path_match::Kind::Prefix(value.clone())
            }),
        }),
        headers: Vec::new(),
        query_params: Vec::new(),
        method: m.method.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::yaml;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Pod
metadata: { name: web-1, namespace: shop, labels: { app: web } }
spec:
  serviceAccountName: web
  containers:
    - name: app
      ports: [ { name: http, containerPort: 8080 } ]
      livenessProbe: { httpGet: { path: /live, port: http } }
      readinessProbe: { httpGet: { path: /ready, port: 8080 } }
status: { podIP: 10.0.0.1 }
---
apiVersion: v1
kind: Pod
metadata:
  name: db-1
  namespace: shop
  labels: { app: db }
  annotations: { remora.io/default-inbound-policy: deny }
spec: { containers: [] }
status: { podIP: 10.0.0.2 }
---
apiVersion: policy.remora.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: web-from-frontend, namespace: shop }
spec:
  podSelector: { matchLabels: { app: web } }
  ports: [8080]
  from:
    - identities: ["spiffe://cluster.local/ns/shop/sa/frontend"]
      networks: [10.0.0.0/8]
---
apiVersion: policy.remora.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: web-public, namespace: shop }
spec:
  podSelector: { matchLabels: { app: web } }
  from: [ { unauthenticated: true } ]
  http: [ { path: { type: PathPrefix, value: /public }, method: GET } ]
---
apiVersion: policy.remora.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: elsewhere, namespace: other }
spec:
  from: [ { unauthenticated: true } ]
"#;

    fn index() -> Index {
        Index::from_yaml(OBJECTS)
    }

    /// The policy a proxy of `pod` with `default` enforces on `port`.
    fn inbound(
        index: &Index,
        &(pod, port, default): &(&str, u16, &str),
        nets: &[IpNet],
    ) -> api::InboundPolicy {
        let key = WorkloadKey {
            pod: NsName::new("shop", pod),
            default: default.into(),
        };
        let mut w = workload(index, &key, nets);
        w.ports
            .remove(&u32::from(port))
            .or(w.other)
            .expect("a policy for every port")
    }

    fn key<'a>(pod: &'a str, port: u16, default: &'static str) -> (&'a str, u16, &'static str) {
        (pod, port, default)
    }

    fn nets() -> Vec<IpNet> {
        vec!["10.0.0.0/8".parse().unwrap()]
    }

    #[test]
    fn selected_ports_get_the_policies_and_probe_paths() {
        let p = inbound(
            &index(),
            &key("web-1", 8080, "all-unauthenticated"),
            &nets(),
        );
        let meta = p.metadata.unwrap();
        assert_eq!(meta.kind, "AuthorizationPolicy");
        assert_eq!(meta.name, "web-from-frontend,web-public");
        assert_eq!(p.authorizations.len(), 1);
        let a = &p.authorizations[0];
        assert_eq!(a.networks[0].ip, vec![10, 0, 0, 0]);
        assert_eq!(a.networks[0].prefix_len, 8);
        match &a.authentication {
            Some(api::authorization::Authentication::Identities(m)) => {
                assert_eq!(m.identities, ["spiffe://cluster.local/ns/shop/sa/frontend"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.http_routes.len(), 1);
        assert_eq!(p.http_routes[0].matches[0].method, "GET");
        assert_eq!(p.probe_paths, ["/live", "/ready"]);
    }

    #[test]
    fn other_ports_and_pods_fall_back_to_defaults() {
        let index = index();
        // Port 9090 is selected only by the route-level policy: no port-level grant.
        let p = inbound(&index, &key("web-1", 9090, "all-unauthenticated"), &nets());
        assert!(p.authorizations.is_empty());
        assert_eq!(p.http_routes.len(), 1);
        // No policy selects db-1: its annotation beats the proxy's setting.
        let p = inbound(&index, &key("db-1", 5432, "all-unauthenticated"), &nets());
        assert_eq!(p.default_policy, "deny");
        assert!(p.authorizations.is_empty());
        // An unknown pod gets the proxy's default, compiled.
        let p = inbound(&index, &key("ghost", 80, "cluster-authenticated"), &nets());
        assert_eq!(p.default_policy, "cluster-authenticated");
        assert_eq!(p.metadata.unwrap().kind, "default");
        assert_eq!(p.authorizations[0].networks.len(), 1);
        let p = inbound(&index, &key("ghost", 80, "all-unauthenticated"), &nets());
        assert!(matches!(
            p.authorizations[0].authentication,
            Some(api::authorization::Authentication::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_workload_lists_the_ports_it_serves_and_shares_one_policy_for_the_rest() {
        let index = index();
        let key = WorkloadKey {
            pod: NsName::new("shop", "web-1"),
            default: "deny".into(),
        };
        let w = workload(&index, &key, &nets());
        // 8080: declared, named by web-from-frontend, and probed.
        assert_eq!(w.ports.keys().copied().collect::<Vec<_>>(), [8080]);
        let other = w.other.expect("other ports");
        // Only the route-level policy selects every port; the default stays `deny`.
        assert!(other.authorizations.is_empty());
        assert_eq!(other.http_routes.len(), 1);
        assert!(other.probe_paths.is_empty());
        // A port the attacker picks gets exactly what `other` says, with nothing to keep.
        assert_eq!(inbound(&index, &key_for("web-1", 31337), &nets()), other);
    }

    fn key_for(pod: &str, port: u16) -> (&str, u16, &'static str) {
        (pod, port, "deny")
    }

    #[test]
    fn an_invalid_policy_is_refused_with_its_reasons() {
        let bad = r#"
apiVersion: policy.remora.io/v1alpha1
kind: AuthorizationPolicy
metadata: { name: broken, namespace: shop }
spec:
  from: [ { identities: [frontend] } ]
"#;
        let err = yaml::parse("bad.yaml", bad).unwrap_err().to_string();
        assert!(err.contains("bad.yaml"), "{err}");
        assert!(err.contains("AuthorizationPolicy shop/broken"), "{err}");
        assert!(err.contains("is not a SPIFFE ID"), "{err}");
    }
}
