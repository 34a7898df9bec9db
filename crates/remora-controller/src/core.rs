//! The domain of discovery, free of kube and proto types: the objects the index keeps
//! and the answers it gives.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

/// A namespaced name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NsName {
    pub namespace: String,
    pub name: String,
}

impl NsName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for NsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a Service port forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    /// `appProtocol`, when set.
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub id: NsName,
    /// Empty for headless Services.
    pub cluster_ips: Vec<IpAddr>,
    pub headless: bool,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The pod behind the endpoint (`targetRef` of kind Pod).
    pub pod: Option<String>,
    pub zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub id: NsName,
    /// The Service it belongs to (`kubernetes.io/service-name`), in the same namespace.
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub id: NsName,
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    /// Carries `remora.io/meshed: "true"`: its proxy has an identity.
    pub meshed: bool,
    /// For AuthorizationPolicy selectors.
    pub labels: BTreeMap<String, String>,
    /// The `remora.io/default-inbound-policy` annotation, when set.
    pub default_inbound_policy: Option<String>,
    /// Container port → the kubelet's HTTP probe paths on it, always allowed inbound.
    pub probe_paths: BTreeMap<u16, Vec<String>>,
    /// The TCP ports its containers declare (`containerPort`): the ports it serves.
    pub container_ports: std::collections::BTreeSet<u16>,
    /// Ports its proxy does not intercept (the admin port, and the
    /// `remora.io/skip-inbound-ports` annotation): reached without mTLS.
    pub skip_inbound_ports: Vec<remora_config::PortRange>,
}

/// An AuthorizationPolicy, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzPolicy {
    pub id: NsName,
    pub selector: remora_k8s::LabelSelector,
    /// Empty: every port.
    pub ports: Vec<u16>,
    pub sources: Vec<AuthzSource>,
    pub http: Vec<HttpMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzSource {
    /// Empty: every network.
    pub networks: Vec<ipnet::IpNet>,
    pub who: Who,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    Anyone,
    Mesh {
        identities: Vec<String>,
        namespaces: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpMatch {
    /// (exact, value).
    pub path: Option<(bool, String)>,
    pub method: Option<String>,
}

/// A TrafficPolicy, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficPolicy {
    pub id: NsName,
    /// The Service it targets, in its namespace.
    pub service: String,
    /// Unset: every port of the Service.
    pub port: Option<u16>,
    pub spec: Box<remora_k8s::TrafficPolicySpec>,
}

/// An HTTPRoute, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRoute {
    pub id: NsName,
    /// `metadata.creationTimestamp` (RFC 3339), for precedence: the oldest route wins a
    /// tie. Unset (a `dir:` file) sorts after every set one.
    pub created: Option<String>,
    /// The Services it attaches to (its parentRefs of kind Service); empty: not a
    /// mesh route.
    pub parents: Vec<RouteParent>,
    pub spec: Box<remora_k8s::HttpRouteSpec>,
}

/// One Service an HTTPRoute attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteParent {
    pub service: NsName,
    /// Unset: every port of the Service.
    pub port: Option<u16>,
    /// A port's name (`sectionName`); unset: any.
    pub section: Option<String>,
}

/// Any object a source delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Service),
    Slice(EndpointSlice),
    Pod(Pod),
    Authz(AuthzPolicy),
    Traffic(TrafficPolicy),
    Route(HttpRoute),
    /// What the injector reads: its labels and annotations.
    Namespace(remora_k8s::inject::Namespace),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    Slice,
    Pod,
    Authz,
    Traffic,
    Route,
    Namespace,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Slice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Authz => "AuthorizationPolicy",
            Kind::Traffic => "TrafficPolicy",
            Kind::Route => "HTTPRoute",
            Kind::Namespace => "Namespace",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub id: NsName,
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Service(s) => ObjectKey {
                kind: Kind::Service,
                id: s.id.clone(),
            },
            Object::Slice(s) => ObjectKey {
                kind: Kind::Slice,
                id: s.id.clone(),
            },
            Object::Pod(p) => ObjectKey {
                kind: Kind::Pod,
                id: p.id.clone(),
            },
            Object::Authz(a) => ObjectKey {
                kind: Kind::Authz,
                id: a.id.clone(),
            },
            Object::Traffic(t) => ObjectKey {
                kind: Kind::Traffic,
                id: t.id.clone(),
            },
            Object::Route(r) => ObjectKey {
                kind: Kind::Route,
                id: r.id.clone(),
            },
            // Namespaces are not namespaced: the key's namespace is empty.
            Object::Namespace(n) => ObjectKey {
                kind: Kind::Namespace,
                id: NsName::new("", &n.name),
            },
        }
    }
}

/// What a source tells the index.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Apply(Object),
    Delete(ObjectKey),
    /// Everything the source had at start has been delivered.
    Synced,
}

/// What a proxy asks about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `<name>.<namespace>.svc.<cluster-domain>:<port>`.
    Service { id: NsName, port: u16 },
    /// A ClusterIP or pod IP, and a port.
    Addr(SocketAddr),
}

impl Target {
    /// Parses a `GetDestination.target`.
    pub fn parse(target: &str, cluster_domain: &str) -> Result<Target, String> {
        if let Ok(addr) = target.parse::<SocketAddr>() {
            return Ok(Target::Addr(addr));
        }
        let (host, port) = target
            .rsplit_once(':')
            .ok_or_else(|| format!("target {target:?} has no port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("target {target:?} has a bad port"))?;
        if host.parse::<IpAddr>().is_ok() {
            return Err(format!("target {target:?}: put IPv6 addresses in brackets"));
        }
        let suffix = format!(".svc.{cluster_domain}");
        let rest = host
            .trim_end_matches('.')
            .strip_suffix(&suffix)
            .ok_or_else(|| format!("target {target:?} is not <name>.<namespace>{suffix}:<port>"))?;
        match rest.split_once('.') {
            Some((name, ns)) if !name.is_empty() && !ns.is_empty() && !ns.contains('.') => {
                Ok(Target::Service {
                    id: NsName::new(ns, name),
                    port,
                })
            }
            _ => Err(format!(
                "target {target:?} is not <name>.<namespace>{suffix}:<port>"
            )),
        }
    }
}

/// How to speak to a port, when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Unknown,
    Http1,
    Http2,
    Opaque,
}

/// The identity an endpoint's proxy proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub spiffe_id: String,
    pub server_name: String,
}

/// One endpoint of a resolved target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    pub addr: SocketAddr,
    pub identity: Option<Identity>,
    pub protocol: Protocol,
    /// False while terminating but still serving.
    pub ready: bool,
    pub zone: Option<String>,
    /// Bounded metric labels: pod, namespace, serviceaccount.
    pub labels: BTreeMap<String, String>,
}

/// The answer for one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Nothing known: the proxy forwards as-is.
    Unknown,
    Known {
        /// `<name>.<namespace>:<port>`; empty for a bare pod.
        service: String,
        protocol: Protocol,
        headless: bool,
        endpoints: BTreeMap<SocketAddr, EndpointView>,
    },
}

/// A published answer and when the change behind it entered the controller.
#[derive(Debug, Clone)]
pub struct Published {
    pub resolution: Resolution,
    /// When the earliest source event of the batch that produced it arrived.
    pub since: Option<std::time::Instant>,
}

pub type Shared = Arc<Published>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let svc = |ns: &str, name: &str, port| Target::Service {
            id: NsName::new(ns, name),
            port,
        };
        assert_eq!(
            Target::parse("web.shop.svc.cluster.local:80", "cluster.local"),
            Ok(svc("shop", "web", 80))
        );
        assert_eq!(
            Target::parse("web.shop.svc.cluster.local.:80", "cluster.local"),
            Ok(svc("shop", "web", 80))
        );
        assert_eq!(
            Target::parse("10.96.0.10:80", "cluster.local"),
            Ok(Target::Addr("10.96.0.10:80".parse().unwrap()))
        );
        assert_eq!(
            Target::parse("[fd00::1]:443", "cluster.local"),
            Ok(Target::Addr("[fd00::1]:443".parse().unwrap()))
        );
        for bad in [
            "web:80",
            "web.shop.svc.other.local:80",
            "fd00::1:80",
            "web.shop.svc.cluster.local",
            "a.b.c.svc.cluster.local:1",
        ] {
            assert!(Target::parse(bad, "cluster.local").is_err(), "{bad}");
        }
    }
}
