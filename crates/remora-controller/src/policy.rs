//! Inbound policy: compiles the AuthorizationPolicies that select a pod (or its
//! default, from the pod's annotation or the proxy's own setting) into the
//! `InboundWorkloadPolicy` a proxy enforces, one `InboundPolicy` per port the pod serves
//! or a policy names and one for every other port, and serves `Policy`.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use ipnet::IpNet;
use remora_api::v1 as api;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::{
    access::{Access, Caller, StreamPermit},
    core::{AuthzPolicy, AuthzSource, HttpMatch, NsName, Who},
    discovery::Discovery,
    index::Index,
    metrics::Refusal,
    watches::Watched,
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
    let compile = |port| inbound(index, key, &selecting, port, cluster_networks);
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

/// `Policy`: `WatchInboundWorkload` streams a workload's inbound policy and
/// `WatchOutbound` a target's, each sent again whenever it changes; nothing is answered
/// before the source's first sync.
pub struct PolicyService {
    discovery: Arc<Discovery>,
    cluster_domain: String,
    shutdown: CancellationToken,
    access: Arc<Access>,
}

impl PolicyService {
    pub fn new(
        discovery: Arc<Discovery>,
        cluster_domain: String,
        shutdown: CancellationToken,
        access: Arc<Access>,
    ) -> Self {
        Self {
            discovery,
            cluster_domain,
            shutdown,
            access,
        }
    }

    async fn synced(&self) -> Result<(), Status> {
        tokio::select! {
            _ = self.discovery.synced() => Ok(()),
            _ = self.shutdown.cancelled() => Err(Status::unavailable("shutting down")),
        }
    }
}

/// Streams the watch's current value, then each change, until shutdown. The permit
/// and the watch are released when the stream ends.
fn stream_of<K, T>(
    watched: Watched<K, Arc<T>>,
    permit: StreamPermit,
    shutdown: CancellationToken,
) -> Streamed<T>
where
    K: Eq + std::hash::Hash + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    let state = (watched, permit, true);
    let stream = futures_util::stream::unfold(state, move |(mut w, permit, first)| {
        let shutdown = shutdown.clone();
        async move {
            if !first {
                tokio::select! {
                    r = w.rx().changed() => if r.is_err() { return None },
                    _ = shutdown.cancelled() => return None,
                }
            }
            let value: Arc<T> = w.rx().borrow_and_update().clone();
            Some((Ok((*value).clone()), (w, permit, false)))
        }
    });
    Box::pin(stream)
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl api::policy_server::Policy for PolicyService {
    type WatchOutboundStream = Streamed<api::OutboundPolicy>;
    type WatchInboundWorkloadStream = Streamed<api::InboundWorkloadPolicy>;

    async fn watch_outbound(
        &self,
        req: Request<api::OutboundPolicyRequest>,
    ) -> Result<Response<Self::WatchOutboundStream>, Status> {
        let target = crate::grpc::parse_target(&req.get_ref().target, &self.cluster_domain)
            .map_err(Status::invalid_argument)?;
        let caller = req.extensions().get::<Caller>().cloned();
        // Consumer routes follow the client's namespace: the one its certificate proves.
        // Over plaintext (local use) the one it says counts.
        let proven = caller
            .as_ref()
            .and_then(|c| c.identity.as_deref())
            .and_then(crate::discovery::workload_of)
            .map(|(ns, _)| ns);
        let client_ns = match proven {
            Some(ns) => ns.to_string(),
            None => req
                .get_ref()
                .client
                .as_ref()
                .map(|c| c.namespace.clone())
                .unwrap_or_default(),
        };
        let permit = self
            .access
            .streams
            .acquire(caller.as_ref(), &self.access.metrics)?;
        self.synced().await?;
        let watched = self.discovery.subscribe_outbound(target, client_ns);
        Ok(Response::new(stream_of(
            watched,
            permit,
            self.shutdown.clone(),
        )))
    }

    async fn watch_inbound_workload(
        &self,
        req: Request<api::InboundPolicyRequest>,
    ) -> Result<Response<Self::WatchInboundWorkloadStream>, Status> {
        let caller = req.extensions().get::<Caller>().cloned();
        let req = req.into_inner();
        let (namespace, pod) = req
            .workload
            .split_once(':')
            .filter(|(ns, pod)| !ns.is_empty() && !pod.is_empty())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "workload {:?} is not <namespace>:<pod-name>; set REMORA_NAMESPACE and \
                     REMORA_POD_NAME on the proxy",
                    req.workload
                ))
            })?;
        let default = if req.default_policy.is_empty() {
            "all-unauthenticated".to_string()
        } else if DEFAULTS.contains(&req.default_policy.as_str()) {
            req.default_policy
        } else {
            return Err(Status::invalid_argument(format!(
                "default policy {:?} is not one of {}",
                req.default_policy,
                DEFAULTS.join(", ")
            )));
        };
        let key = WorkloadKey {
            pod: NsName::new(namespace, pod),
            default,
        };
        // A proxy that proved its identity asks only about its own workload.
        if let Some(id) = caller.as_ref().and_then(|c| c.identity.as_deref())
            && let Err(why) = self.discovery.may_ask_about(id, &key.pod)
        {
            self.access.metrics.refused(Refusal::PermissionDenied);
            return Err(Status::permission_denied(why));
        }
        let permit = self
            .access
            .streams
            .acquire(caller.as_ref(), &self.access.metrics)?;
        // Nothing is answered before the source's first sync: a port's real policy
        // must not be preceded by its default.
        self.synced().await?;
        let watched = self.discovery.subscribe_inbound(key);
        Ok(Response::new(stream_of(
            watched,
            permit,
            self.shutdown.clone(),
        )))
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

#[cfg(test)]
mod meshed_tests {
    use super::*;
    use crate::core::{Resolution, Target};

    const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: { remora.io/meshed: "true" }
  annotations: { remora.io/skip-inbound-ports: "9000-9001" }
spec: { serviceAccountName: web, containers: [] }
status: { podIP: 10.0.0.1 }
"#;

    fn index() -> Index {
        Index::from_yaml(POD)
    }

    fn has_identity(index: &Index, port: u16) -> bool {
        let addr = std::net::SocketAddr::from(([10, 0, 0, 1], port));
        match index.resolve(&Target::Addr(addr)) {
            Resolution::Known { endpoints, .. } => endpoints[&addr].identity.is_some(),
            Resolution::Unknown => panic!("the pod is known"),
        }
    }

    #[test]
    fn ports_the_proxy_does_not_intercept_get_no_identity() {
        let index = index();
        assert!(has_identity(&index, 8080));
        assert!(
            !has_identity(&index, 4191),
            "the admin port is never intercepted"
        );
        assert!(!has_identity(&index, 9000));
        assert!(!has_identity(&index, 9001));
    }

    #[test]
    fn a_proxy_asks_only_about_its_own_workload() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = crate::metrics::Metrics::register(&mut registry);
        let d = Discovery::new(index(), metrics, Vec::new());
        let web = NsName::new("shop", "web-1");
        assert!(
            d.may_ask_about("spiffe://cluster.local/ns/shop/sa/web", &web)
                .is_ok()
        );
        let other_sa = d.may_ask_about("spiffe://cluster.local/ns/shop/sa/other", &web);
        assert!(other_sa.unwrap_err().contains("runs as web"));
        let other_ns = d.may_ask_about("spiffe://cluster.local/ns/ops/sa/web", &web);
        assert!(other_ns.unwrap_err().contains("another namespace"));
        assert!(d.may_ask_about("spiffe://cluster.local/x", &web).is_err());
    }
}
