//! Inbound authorization: the policy of each inbound port, as the controller compiled it
//! from AuthorizationPolicy objects and defaults (`Policy.WatchInboundWorkload`), and
//! the checks a connection or request must pass. Until the controller first answers (or
//! without one), the proxy's own default (`REMORA_DEFAULT_INBOUND_POLICY`) applies.

use std::{net::IpAddr, str::FromStr, sync::Arc};

use http::Method;
use ipnet::IpNet;
use remora_api::v1 as api;

/// The networks `cluster-authenticated` trusts when the controller has not said: the
/// private ranges pod networks are carved from.
pub const PRIVATE_NETWORKS: &[&str] = &[
    "10.0.0.0/8",
    "100.64.0.0/10",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fd00::/8",
];

/// The built-in defaults a pod's inbound side can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultPolicy {
    AllUnauthenticated,
    AllAuthenticated,
    ClusterAuthenticated,
    Deny,
}

impl DefaultPolicy {
    pub const NAMES: &'static str =
        "all-unauthenticated, all-authenticated, cluster-authenticated, deny";

    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::ClusterAuthenticated => "cluster-authenticated",
            DefaultPolicy::Deny => "deny",
        }
    }

    /// The policy this default stands for in `trust_domain`.
    pub fn policy(self, trust_domain: &str) -> Policy {
        let authz = match self {
            DefaultPolicy::AllUnauthenticated => vec![Authz {
                networks: Vec::new(),
                who: Who::Anyone,
            }],
            DefaultPolicy::AllAuthenticated => vec![Authz {
                networks: Vec::new(),
                who: Who::mesh_any(trust_domain),
            }],
            DefaultPolicy::ClusterAuthenticated => vec![Authz {
                networks: PRIVATE_NETWORKS
                    .iter()
                    .filter_map(|n| n.parse().ok())
                    .collect(),
                who: Who::mesh_any(trust_domain),
            }],
            DefaultPolicy::Deny => Vec::new(),
        };
        Policy {
            name: Arc::from(format!("default:{}", self.as_str())),
            revision: Arc::from(""),
            port: authz,
            routes: Vec::new(),
            probe_paths: Vec::new(),
        }
    }
}

impl FromStr for DefaultPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "all-unauthenticated" => DefaultPolicy::AllUnauthenticated,
            "all-authenticated" => DefaultPolicy::AllAuthenticated,
            "cluster-authenticated" => DefaultPolicy::ClusterAuthenticated,
            "deny" => DefaultPolicy::Deny,
            other => return Err(format!("{other:?} is not one of {}", Self::NAMES)),
        })
    }
}

/// Who is connecting.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub ip: IpAddr,
    /// The SPIFFE ID from the client's certificate, when it connected over mesh mTLS.
    pub identity: Option<&'a str>,
}

/// One grant.
#[derive(Debug, Clone, PartialEq)]
struct Authz {
    /// Client networks; empty is every network.
    networks: Vec<IpNet>,
    who: Who,
}

#[derive(Debug, Clone, PartialEq)]
enum Who {
    /// With or without TLS.
    Anyone,
    /// A verified mesh identity: exact, `*`-suffixed, or in one of the namespaces.
    Mesh {
        identities: Vec<String>,
        namespaces: Vec<String>,
    },
}

impl Who {
    /// Any identity of the trust domain (never another domain's, should anchors be shared).
    fn mesh_any(trust_domain: &str) -> Self {
        Who::Mesh {
            identities: vec![format!("spiffe://{trust_domain}/*")],
            namespaces: Vec::new(),
        }
    }
}

impl Authz {
    fn allows(&self, peer: &Peer<'_>) -> bool {
        if !self.networks.is_empty() && !self.networks.iter().any(|n| n.contains(&peer.ip)) {
            return false;
        }
        match &self.who {
            Who::Anyone => true,
            Who::Mesh {
                identities,
                namespaces,
            } => {
                let Some(id) = peer.identity else {
                    return false;
                };
                identities
                    .iter()
                    .any(|pattern| identity_matches(pattern, id))
                    || spiffe_namespace(id).is_some_and(|ns| namespaces.iter().any(|n| n == ns))
            }
        }
    }
}

/// `*` is any identity; `prefix*` a suffix wildcard; anything else exact.
fn identity_matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => pattern == id,
    }
}

/// The namespace of `spiffe://<td>/ns/<ns>/sa/<sa>`.
fn spiffe_namespace(id: &str) -> Option<&str> {
    let path = id.strip_prefix("spiffe://")?;
    let mut parts = path.split('/').skip(1);
    match (parts.next(), parts.next(), parts.next()) {
        (Some("ns"), Some(ns), Some("sa")) => Some(ns),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq)]
struct RouteMatch {
    path: Option<PathMatch>,
    method: Option<Method>,
}

impl RouteMatch {
    fn matches(&self, method: &Method, path: &str) -> bool {
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => path == p,
            Some(PathMatch::Prefix(p)) => {
                let p = p.trim_end_matches('/');
                path.starts_with('/')
                    && path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        };
        path_ok && self.method.as_ref().is_none_or(|m| m == method)
    }
}

/// Whether `path` could mean another path to an application that normalises or
/// decodes it: a route grant matches only a path in normal form, so none can reach past
/// the prefix it grants. Refused forms: not starting with `/`; empty, `.` or `..`
/// segments; backslashes; `;` (servlet containers read `/public/..;/admin` as
/// `/admin`); a percent-encoded `.`, `/`, `\`, `;`, `%` (double encoding), `?`, `#`,
/// control character or byte never valid in UTF-8 (overlong `%c0%ae`); a malformed escape.
pub fn ambiguous(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') || path.contains("//") || path.contains(['\\', ';']) {
        return true;
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return true;
    }
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let decoded = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok());
                match decoded {
                    None => return true,
                    Some(b'.' | b'/' | b'\\' | b';' | b'%' | b'?' | b'#' | 0xc0 | 0xc1) => {
                        return true;
                    }
                    Some(b) if b < 0x20 || b == 0x7f => return true,
                    Some(_) => i += 3,
                }
            }
            b if b < 0x20 || b == 0x7f => return true,
            _ => i += 1,
        }
    }
    false
}

#[derive(Debug, Clone, PartialEq)]
struct RouteAuthz {
    matches: Vec<RouteMatch>,
    authz: Vec<Authz>,
}

/// The policy of one inbound port.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Where it came from, for logs: `default:<name>` or the AuthorizationPolicy names.
    pub name: Arc<str>,
    /// The controller's digest of this port's answer (`PolicyMetadata.revision`);
    /// empty for the proxy's own.
    revision: Arc<str>,
    port: Vec<Authz>,
    routes: Vec<RouteAuthz>,
    pub(super) probe_paths: Vec<String>,
}

impl Policy {
    /// Allows nobody: what an answer the proxy cannot read stands for.
    pub fn deny_all() -> Self {
        Self {
            name: Arc::from("deny:unreadable-answer"),
            revision: Arc::from(""),
            port: Vec::new(),
            routes: Vec::new(),
            probe_paths: Vec::new(),
        }
    }

    /// What `/debug/inbound` shows of it: its name and how many grants it holds.
    pub fn debug(&self) -> serde_json::Value {
        serde_json::json!({
            "name": &*self.name,
            "revision": &*self.revision,
            "connection_grants": self.port.len(),
            "route_grants": self.routes.len(),
            "probe_paths": &self.probe_paths,
        })
    }

    /// May this client open a TCP connection that is not HTTP?
    pub fn allows_connection(&self, peer: &Peer<'_>) -> bool {
        self.port.iter().any(|a| a.allows(peer))
    }

    /// May this client send this request? The kubelet's probe paths are always allowed
    /// for GET; otherwise the port's grants, or those of a route the request matches. A
    /// request that becomes a byte stream (an upgrade, `CONNECT`) needs the port's grant:
    /// a route grant covers requests, not what a tunnel carries afterwards. A path that
    /// an application might read differently (dot segments, encoded slashes or dots,
    /// backslashes, empty segments) matches no route, so it cannot slip past one.
    pub fn allows_request(
        &self,
        peer: &Peer<'_>,
        method: &Method,
        path: &str,
        tunnel: bool,
    ) -> bool {
        if !tunnel && method == Method::GET && self.probe_paths.iter().any(|p| p == path) {
            return true;
        }
        if self.allows_connection(peer) {
            return true;
        }
        !tunnel
            && !ambiguous(path)
            && self.routes.iter().any(|r| {
                r.matches.iter().any(|m| m.matches(method, path))
                    && r.authz.iter().any(|a| a.allows(peer))
            })
    }

    /// The controller's answer. Parts the proxy cannot read (a malformed network, an
    /// unknown match kind) grant nothing: a policy is never widened by a bad entry.
    pub fn from_api(p: api::InboundPolicy) -> Self {
        let name = match &p.metadata {
            Some(m) if m.kind == "default" || m.name.is_empty() => {
                format!("default:{}", p.default_policy)
            }
            Some(m) => format!("{}/{}", m.namespace, m.name),
            None => format!("default:{}", p.default_policy),
        };
        Self {
            name: Arc::from(name),
            revision: Arc::from(p.metadata.as_ref().map_or("", |m| m.revision.as_str())),
            port: p.authorizations.into_iter().filter_map(authz).collect(),
            routes: p
                .http_routes
                .into_iter()
                .map(|r| RouteAuthz {
                    matches: r.matches.into_iter().filter_map(route_match).collect(),
                    authz: r.authorizations.into_iter().filter_map(authz).collect(),
                })
                .collect(),
            probe_paths: p.probe_paths,
        }
    }
}

fn authz(a: api::Authorization) -> Option<Authz> {
    let mut networks = Vec::with_capacity(a.networks.len());
    for n in &a.networks {
        let ip: IpAddr = match n.ip.len() {
            4 => <[u8; 4]>::try_from(n.ip.as_slice()).ok()?.into(),
            16 => <[u8; 16]>::try_from(n.ip.as_slice()).ok()?.into(),
            _ => return None,
        };
        networks.push(IpNet::new(ip, u8::try_from(n.prefix_len).ok()?).ok()?);
    }
    let who = match a.authentication? {
        api::authorization::Authentication::Unauthenticated(_) => Who::Anyone,
        api::authorization::Authentication::Identities(m) => Who::Mesh {
            identities: m.identities,
            namespaces: m.namespaces,
        },
    };
    Some(Authz { networks, who })
}

fn route_match(m: api::HttpRouteMatch) -> Option<RouteMatch> {
    // Header and query matches are not part of inbound routes: a match naming them is
    // not understood, so it matches nothing.
    if !m.headers.is_empty() || !m.query_params.is_empty() {
        return None;
    }
    let path = match m.path.and_then(|p| p.kind) {
        None => None,
        Some(api::path_match::Kind::Exact(p)) => Some(PathMatch::Exact(p)),
        Some(api::path_match::Kind::Prefix(p)) => Some(PathMatch::Prefix(p)),
        Some(api::path_match::Kind::Regex(_)) => return None,
    };
    let method = match m.method.as_str() {
        "" => None,
        s => Some(Method::from_bytes(s.as_bytes()).ok()?),
    };
    Some(RouteMatch { path, method })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";
    const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";
    const MONITOR: &str = "spiffe://cluster.local/ns/monitoring/sa/prometheus";

    fn peer(ip: &str, identity: Option<&'static str>) -> Peer<'static> {
        Peer {
            ip: ip.parse().unwrap(),
            identity,
        }
    }

    fn mesh(identities: &[&str], namespaces: &[&str]) -> api::Authorization {
        api::Authorization {
            metadata: None,
            networks: Vec::new(),
            authentication: Some(api::authorization::Authentication::Identities(
                api::MeshIdentities {
                    identities: identities.iter().map(|s| s.to_string()).collect(),
                    namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
                },
            )),
        }
    }

    #[test]
    fn defaults() {
        let anon = peer("10.1.2.3", None);
        let authed = peer("10.1.2.3", Some(FRONTEND));
        let outside = peer("203.0.113.9", Some(FRONTEND));
        let foreign = peer(
            "10.1.2.3",
            Some("spiffe://elsewhere.example/ns/shop/sa/frontend"),
        );
        let p = DefaultPolicy::AllUnauthenticated.policy(TD);
        assert!(p.allows_connection(&anon) && p.allows_connection(&outside));
        let p = DefaultPolicy::AllAuthenticated.policy(TD);
        assert!(!p.allows_connection(&anon));
        assert!(p.allows_connection(&authed) && p.allows_connection(&outside));
        assert!(!p.allows_connection(&foreign), "another trust domain");
        let p = DefaultPolicy::ClusterAuthenticated.policy(TD);
        assert!(!p.allows_connection(&anon));
        assert!(p.allows_connection(&authed));
        assert!(!p.allows_connection(&outside));
        let p = DefaultPolicy::Deny.policy(TD);
        assert!(!p.allows_connection(&authed));
        assert!("sometimes".parse::<DefaultPolicy>().is_err());
    }

    #[test]
    fn identities_wildcards_namespaces_and_networks() {
        let mut net = mesh(
            &["spiffe://cluster.local/ns/shop/sa/front*"],
            &["monitoring"],
        );
        net.networks = vec![api::IpNetwork {
            ip: vec![10, 0, 0, 0],
            prefix_len: 8,
        }];
        let p = Policy::from_api(api::InboundPolicy {
            authorizations: vec![net],
            ..Default::default()
        });
        assert!(p.allows_connection(&peer("10.9.9.9", Some(FRONTEND))));
        assert!(p.allows_connection(&peer("10.9.9.9", Some(MONITOR))));
        assert!(!p.allows_connection(&peer("10.9.9.9", Some(OTHER))));
        assert!(!p.allows_connection(&peer("10.9.9.9", None)));
        assert!(!p.allows_connection(&peer("192.168.1.1", Some(FRONTEND))));
    }

    #[test]
    fn a_malformed_grant_grants_nothing() {
        let mut bad = mesh(&["*"], &[]);
        bad.networks = vec![api::IpNetwork {
            ip: vec![10, 0, 0],
            prefix_len: 8,
        }];
        let p = Policy::from_api(api::InboundPolicy {
            authorizations: vec![bad],
            ..Default::default()
        });
        assert!(!p.allows_connection(&peer("10.0.0.1", Some(FRONTEND))));
    }

    #[test]
    fn routes_and_probe_paths() {
        let public = api::InboundHttpRoute {
            metadata: None,
            matches: vec![api::HttpRouteMatch {
                path: Some(api::PathMatch {
                    kind: Some(api::path_match::Kind::Prefix("/public".into())),
                }),
                method: "GET".into(),
                ..Default::default()
            }],
            authorizations: vec![api::Authorization {
                metadata: None,
                networks: Vec::new(),
                authentication: Some(api::authorization::Authentication::Unauthenticated(
                    api::Unauthenticated {},
                )),
            }],
        };
        let p = Policy::from_api(api::InboundPolicy {
            authorizations: vec![mesh(&[FRONTEND], &[])],
            http_routes: vec![public],
            probe_paths: vec!["/healthz".into()],
            ..Default::default()
        });
        let anon = peer("10.0.0.1", None);
        let front = peer("10.0.0.1", Some(FRONTEND));
        let req = |peer, method: &Method, path| p.allows_request(peer, method, path, false);
        assert!(req(&anon, &Method::GET, "/public"));
        assert!(req(&anon, &Method::GET, "/public/x"));
        assert!(!req(&anon, &Method::GET, "/publicity"));
        assert!(!req(&anon, &Method::POST, "/public"));
        assert!(!req(&anon, &Method::GET, "/private"));
        assert!(req(&front, &Method::POST, "/private"));
        assert!(req(&anon, &Method::GET, "/healthz"));
        assert!(!req(&anon, &Method::POST, "/healthz"));
        // Paths an app could normalise into another one never match a route.
        for sneaky in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/..%2Fadmin",
            "/public//x",
            "/public\\..\\admin",
            "/public/./x",
            // Issue 11: servlet path parameters and double encoding.
            "/public/..;/admin",
            "/public/.;/admin",
            "/public/..%3b/admin",
            "/public/..%3B/admin",
            "/public/%252e%252e/admin",
            "/public;x=1/../admin",
            "/public/%c0%ae%c0%ae/admin",
            "/public/%2",
            "/public/%zz",
            "/public/%00",
            "/public/a%3fb",
        ] {
            assert!(!req(&anon, &Method::GET, sneaky), "{sneaky}");
            assert!(
                req(&front, &Method::GET, sneaky),
                "port grants still apply: {sneaky}"
            );
        }
        // Ordinary escapes stay matchable.
        assert!(req(&anon, &Method::GET, "/public/a%20b"));
        assert!(req(&anon, &Method::GET, "/public/caf%C3%A9"));
        // A tunnel needs the port's grant, whatever route it names.
        assert!(!p.allows_request(&anon, &Method::GET, "/public", true));
        assert!(!p.allows_request(&anon, &Method::CONNECT, "", true));
        assert!(p.allows_request(&front, &Method::CONNECT, "", true));
        // Routes are for HTTP: an opaque connection needs the port's grant.
        assert!(!p.allows_connection(&anon));
    }
}
