//! HTTP routes (GAMMA HTTPRoutes attached to a Service), compiled for the data path:
//! every match of every rule, sorted once by Gateway API precedence, so a request is
//! routed by the first match that holds; then a backend picked by weight, header
//! changes and the rule's timeouts.

use std::{cmp::Reverse, sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, Method, request::Parts};
use remora_api::v1 as api;
use tracing::warn;

/// The routes of one Service, as one list of matches in precedence order.
#[derive(Debug, Default)]
pub struct Routes {
    matches: Vec<Entry>,
    rules: Vec<Rule>,
    /// As the controller sent them, to tell whether they changed.
    source: Vec<api::HttpRoute>,
}

#[derive(Debug)]
struct Entry {
    m: Match,
    rule: usize,
}

/// One route rule: where its requests go and what changes on the way.
#[derive(Debug)]
pub struct Rule {
    /// The route it came from, as `namespace/name`, for logs and errors.
    pub route: Arc<str>,
    /// The route's name and namespace apart, for metrics.
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// Empty: the Service itself.
    pub backends: Vec<Backend>,
    total_weight: u64,
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    /// Set: replaces the policy's (`Some(None)`: no limit).
    pub request_timeout: Option<Option<Duration>>,
    pub per_try_timeout: Option<Option<Duration>>,
}

/// A backend Service, by name (looked up per request among the destinations in use),
/// and its share.
#[derive(Debug)]
pub struct Backend {
    /// `name.namespace.svc.cluster-domain:port`; empty: a backend the controller refused.
    pub name: Arc<str>,
    /// `name.namespace:port`, as the `target` and `backend` labels name a Service.
    pub label: Arc<str>,
    pub weight: u32,
}

/// `name.namespace:port` of `name.namespace.svc.cluster-domain:port`, as the metrics
/// name a Service; anything else as it is.
fn service_label(target: &str) -> Arc<str> {
    let short = target.rsplit_once(':').and_then(|(host, port)| {
        let mut labels = host.splitn(3, '.');
        let (name, namespace, rest) = (labels.next()?, labels.next()?, labels.next()?);
        rest.starts_with("svc.")
            .then(|| format!("{name}.{namespace}:{port}"))
    });
    Arc::from(short.as_deref().unwrap_or(target))
}

/// Where a rule sends one request.
#[derive(Debug)]
pub enum Pick<'a> {
    /// The Service the client asked for.
    Parent,
    Backend(&'a Backend),
    /// Every backend has weight 0: answered 500, as the Gateway API asks.
    Nothing,
}

#[derive(Debug, Clone)]
struct Match {
    path: Option<PathMatch>,
    method: Option<Method>,
    headers: Vec<(HeaderName, Value)>,
    query: Vec<(String, Value)>,
}

#[derive(Debug, Clone)]
enum PathMatch {
    Exact(String),
    /// Without trailing slashes: `/api` matches `/api`, `/api/` and `/api/x`, not `/apix`.
    Prefix(String),
    /// The expression, its length (for precedence), and a literal every matching path
    /// starts with: checked first, it spares most paths the expression.
    Regex(regex::Regex, usize, String),
}

/// The literal a pattern's every match starts with: its leading plain characters, less
/// one a quantifier makes optional. Empty when an alternation could start elsewhere.
fn literal_prefix(pattern: &str) -> String {
    if pattern.contains('|') {
        return String::new();
    }
    let mut out: String = pattern
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '~' | '%'))
        .collect();
    if matches!(pattern[out.len()..].chars().next(), Some('?' | '*' | '{')) {
        out.pop();
    }
    out
}

#[derive(Debug, Clone)]
enum Value {
    Exact(String),
    Regex(regex::Regex),
}

impl Value {
    fn matches(&self, v: &str) -> bool {
        match self {
            Value::Exact(e) => e == v,
            Value::Regex(r) => r.is_match(v),
        }
    }
}

/// A regular expression that must match the whole value.
fn full(pattern: &str) -> Option<regex::Regex> {
    match regex::Regex::new(&remora_api::whole_value_pattern(pattern)) {
        Ok(r) => Some(r),
        Err(error) => {
            warn!(%pattern, %error, "a route's regular expression does not compile; its match is dropped");
            None
        }
    }
}

/// Header changes, parsed once.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HeaderModifier {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderModifier {
    fn from_api(m: &api::HeaderModifier) -> Self {
        // In name order (the map's, as decoded).
        let pairs = |map: &std::collections::BTreeMap<String, String>| {
            let v: Vec<(HeaderName, HeaderValue)> = map
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::try_from(k).ok()?,
                        HeaderValue::try_from(v).ok()?,
                    ))
                })
                .filter(|(k, _)| !remora_api::is_protected_header(k.as_str()))
                .collect();
            v
        };
        Self {
            set: pairs(&m.set),
            add: pairs(&m.add),
            remove: m
                .remove
                .iter()
                .filter_map(|n| HeaderName::try_from(n).ok())
                .filter(|n| !remora_api::is_protected_header(n.as_str()))
                .collect(),
        }
    }

    /// Applies the changes: set replaces, add appends, remove drops.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            headers.append(k.clone(), v.clone());
        }
        for k in &self.remove {
            headers.remove(k);
        }
    }
}

impl Match {
    fn from_api(m: &api::HttpRouteMatch) -> Option<Self> {
        let path = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
            None => None,
            Some(api::path_match::Kind::Exact(p)) => Some(PathMatch::Exact(p.clone())),
            Some(api::path_match::Kind::Prefix(p)) => {
                Some(PathMatch::Prefix(p.trim_end_matches('/').to_string()))
            }
            Some(api::path_match::Kind::Regex(r)) => {
                Some(PathMatch::Regex(full(r)?, r.len(), literal_prefix(r)))
            }
        };
        let method = match m.method.as_str() {
            "" => None,
            s => Some(Method::from_bytes(s.as_bytes()).ok()?),
        };
        let mut headers = Vec::new();
        for h in &m.headers {
            let v = match &h.value {
                Some(api::header_match::Value::Exact(e)) => Value::Exact(e.clone()),
                Some(api::header_match::Value::Regex(r)) => Value::Regex(full(r)?),
                None => return None,
            };
            headers.push((HeaderName::try_from(&h.name).ok()?, v));
        }
        let mut query = Vec::new();
        for q in &m.query_params {
            let v = match &q.value {
                Some(api::query_param_match::Value::Exact(e)) => Value::Exact(e.clone()),
                Some(api::query_param_match::Value::Regex(r)) => Value::Regex(full(r)?),
                None => return None,
            };
            query.push((q.name.clone(), v));
        }
        Some(Self {
            path,
            method,
            headers,
            query,
        })
    }

    /// Gateway API precedence, most specific first: an exact path, then the longest
    /// regular expression, then the longest prefix (no path is the prefix `/`), then a
    /// method, then the most header matches, then the most query matches.
    fn precedence(&self) -> (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>) {
        let (rank, len) = match &self.path {
            Some(PathMatch::Exact(p)) => (0, p.len()),
            Some(PathMatch::Regex(_, n, _)) => (1, *n),
            Some(PathMatch::Prefix(p)) => (2, p.len() + 1),
            None => (2, 1),
        };
        (
            rank,
            Reverse(len),
            self.method.is_none(),
            Reverse(self.headers.len()),
            Reverse(self.query.len()),
        )
    }

    fn matches(&self, parts: &Parts) -> bool {
        let path = parts.uri.path();
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => path == p,
            Some(PathMatch::Prefix(p)) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            Some(PathMatch::Regex(r, _, literal)) => {
                path.starts_with(literal.as_str()) && r.is_match(path)
            }
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| *m == parts.method)
            && self.headers.iter().all(|(name, v)| {
                parts
                    .headers
                    .get_all(name)
                    .iter()
                    .any(|h| h.to_str().is_ok_and(|h| v.matches(h)))
            })
            && self.query.iter().all(|(name, v)| {
                parts.uri.query().is_some_and(|q| {
                    // The first value of a repeated parameter counts, as the Gateway
                    // API recommends; values are compared as sent.
                    q.split('&')
                        .find_map(|kv| {
                            let (k, val) = kv.split_once('=').unwrap_or((kv, ""));
                            (k == name).then_some(val)
                        })
                        .is_some_and(|val| v.matches(val))
                })
            })
    }
}

impl Routes {
    /// Each rule's route and backends, for `/debug/targets`.
    pub fn debug(&self) -> Vec<serde_json::Value> {
        self.rules
            .iter()
            .map(|r| {
                let backends: Vec<_> = r
                    .backends
                    .iter()
                    .map(|b| serde_json::json!({"backend": &*b.label, "weight": b.weight}))
                    .collect();
                serde_json::json!({"route": &*r.route, "backends": backends})
            })
            .collect()
    }

    /// The controller's routes; a match that cannot be used (a regular expression that
    /// does not compile, a header name that is not one) is dropped, not the route.
    pub fn from_api(routes: &[api::HttpRoute]) -> Self {
        let mut rules = Vec::new();
        let mut entries: Vec<(Entry, usize)> = Vec::new();
        for (order, route) in routes.iter().enumerate() {
            let (name, namespace): (Arc<str>, Arc<str>) = match &route.metadata {
                Some(m) => (Arc::from(m.name.as_str()), Arc::from(m.namespace.as_str())),
                None => (Arc::from("unnamed"), Arc::from("")),
            };
            let qualified: Arc<str> = match &route.metadata {
                Some(_) => Arc::from(format!("{namespace}/{name}")),
                None => name.clone(),
            };
            for r in &route.rules {
                let index = rules.len();
                let timeouts = r.timeouts.unwrap_or_default();
                let backends: Vec<Backend> = r
                    .backends
                    .iter()
                    .map(|b| Backend {
                        name: Arc::from(b.target.as_str()),
                        label: service_label(&b.target),
                        weight: b.weight,
                    })
                    .collect();
                rules.push(Rule {
                    route: qualified.clone(),
                    name: name.clone(),
                    namespace: namespace.clone(),
                    total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
                    backends,
                    request_headers: r
                        .request_header_modifier
                        .as_ref()
                        .map(HeaderModifier::from_api),
                    response_headers: r
                        .response_header_modifier
                        .as_ref()
                        .map(HeaderModifier::from_api),
                    request_timeout: timeouts.request.as_ref().map(api::OptionalDuration::limit),
                    per_try_timeout: timeouts.per_try.as_ref().map(api::OptionalDuration::limit),
                });
                let all = [api::HttpRouteMatch::default()];
                let matches = if r.matches.is_empty() {
                    &all[..]
                } else {
                    &r.matches
                };
                for m in matches.iter().filter_map(Match::from_api) {
                    entries.push((Entry { m, rule: index }, order));
                }
            }
        }
        // Stable: ties keep route order (oldest first), then rule order.
        entries.sort_by_key(|(e, order)| (e.m.precedence(), *order));
        Self {
            matches: entries.into_iter().map(|(e, _)| e).collect(),
            rules,
            source: routes.to_vec(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule for a request; None: no route matches, the Service itself serves it.
    pub fn find(&self, parts: &Parts) -> Option<&Rule> {
        self.matches
            .iter()
            .find(|e| e.m.matches(parts))
            .map(|e| &self.rules[e.rule])
    }
}

impl Rule {
    /// A backend by weight; `seed` is a fresh random number.
    pub fn pick(&self, seed: u64) -> Pick<'_> {
        if self.backends.is_empty() {
            return Pick::Parent;
        }
        if self.total_weight == 0 {
            return Pick::Nothing;
        }
        let mut at = seed % self.total_weight;
        for b in &self.backends {
            if at < u64::from(b.weight) {
                return Pick::Backend(b);
            }
            at -= u64::from(b.weight);
        }
        Pick::Nothing
    }
}

impl PartialEq for Routes {
    /// The same routes as the controller sent them.
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn path(kind: api::path_match::Kind) -> Option<api::PathMatch> {
        Some(api::PathMatch { kind: Some(kind) })
    }

    fn rule(matches: Vec<api::HttpRouteMatch>, backend: &str) -> api::HttpRouteRule {
        api::HttpRouteRule {
            matches,
            backends: vec![api::WeightedBackend {
                target: backend.into(),
                weight: 1,
            }],
            ..Default::default()
        }
    }

    fn route(name: &str, rules: Vec<api::HttpRouteRule>) -> api::HttpRoute {
        api::HttpRoute {
            metadata: Some(api::PolicyMetadata {
                kind: "HTTPRoute".into(),
                name: name.into(),
                namespace: "shop".into(),
                revision: String::new(),
            }),
            rules,
        }
    }

    fn routed_to(routes: &Routes, p: &Parts) -> Option<String> {
        match routes.find(p)?.pick(0) {
            Pick::Backend(b) => Some(b.name.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    #[test]
    fn gateway_api_precedence_across_routes() {
        use api::path_match::Kind::*;
        let m = |p, method: &str, headers: Vec<api::HeaderMatch>| api::HttpRouteMatch {
            path: path(p),
            method: method.into(),
            headers,
            query_params: vec![],
        };
        let canary = || {
            vec![api::HeaderMatch {
                name: "x-canary".into(),
                value: Some(api::header_match::Value::Exact("true".into())),
            }]
        };
        let routes = Routes::from_api(&[
            // The older route: its rules win ties.
            route(
                "a",
                vec![
                    rule(vec![m(Prefix("/".into()), "", vec![])], "root"),
                    rule(vec![m(Prefix("/api/".into()), "", vec![])], "api"),
                ],
            ),
            route(
                "b",
                vec![
                    rule(vec![m(Prefix("/api".into()), "", vec![])], "api-late"),
                    rule(vec![m(Prefix("/api".into()), "", canary())], "api-canary"),
                    rule(vec![m(Prefix("/api".into()), "POST", vec![])], "api-post"),
                    rule(vec![m(Exact("/api/health".into()), "", vec![])], "health"),
                    rule(
                        vec![m(Regex("/api/v[0-9]+/.*".into()), "", vec![])],
                        "versioned",
                    ),
                ],
            ),
        ]);
        let to = |method, uri, headers: &[(&str, &str)]| {
            routed_to(&routes, &parts(method, uri, headers)).unwrap()
        };
        assert_eq!(to("GET", "/", &[]), "root");
        assert_eq!(
            to("GET", "/apix", &[]),
            "root",
            "prefixes match whole segments"
        );
        assert_eq!(
            to("GET", "/api", &[]),
            "api",
            "a trailing / in a prefix is ignored"
        );
        assert_eq!(
            to("GET", "/api/x?y=1", &[]),
            "api",
            "ties go to the older route"
        );
        assert_eq!(to("POST", "/api/x", &[]), "api-post", "a method beats none");
        assert_eq!(
            to("POST", "/api/x", &[("x-canary", "true")]),
            "api-post",
            "a method beats headers"
        );
        assert_eq!(to("GET", "/api/x", &[("x-canary", "true")]), "api-canary");
        assert_eq!(to("GET", "/api/x", &[("x-canary", "no")]), "api");
        assert_eq!(to("GET", "/api/health", &[]), "health", "exact beats all");
        assert_eq!(
            to("GET", "/api/v2/x", &[]),
            "versioned",
            "a regex beats prefixes"
        );
        assert_eq!(
            to("GET", "/api/v2", &[]),
            "api",
            "a regex matches the whole path"
        );
    }

    #[test]
    fn query_and_regex_header_matches() {
        let routes = Routes::from_api(&[route(
            "q",
            vec![rule(
                vec![api::HttpRouteMatch {
                    query_params: vec![api::QueryParamMatch {
                        name: "v".into(),
                        value: Some(api::query_param_match::Value::Exact("2".into())),
                    }],
                    headers: vec![api::HeaderMatch {
                        name: "user-agent".into(),
                        value: Some(api::header_match::Value::Regex("curl/.*".into())),
                    }],
                    ..Default::default()
                }],
                "v2",
            )],
        )]);
        let ua = [("user-agent", "curl/8.0")];
        assert!(routes.find(&parts("GET", "/x?a=1&v=2", &ua)).is_some());
        assert!(routes.find(&parts("GET", "/x?v=2&v=3", &ua)).is_some());
        assert!(routes.find(&parts("GET", "/x?v=3&v=2", &ua)).is_none());
        assert!(routes.find(&parts("GET", "/x?v=22", &ua)).is_none());
        assert!(
            routes
                .find(&parts("GET", "/x?v=2", &[("user-agent", "xcurl/8")]))
                .is_none()
        );
        assert!(routes.find(&parts("GET", "/x", &ua)).is_none());
    }

    #[test]
    fn a_rule_without_matches_takes_everything_and_weights_split() {
        let mut r = rule(vec![], "stable");
        r.backends[0].weight = 90;
        r.backends.push(api::WeightedBackend {
            target: "canary".into(),
            weight: 10,
        });
        let routes = Routes::from_api(&[route("split", vec![r])]);
        let rule = routes.find(&parts("DELETE", "/anything", &[])).unwrap();
        let canary = (0..1000u64)
            .filter(|s| matches!(rule.pick(*s), Pick::Backend(b) if &*b.name == "canary"))
            .count();
        assert_eq!(canary, 100);

        let mut zero = rule_with_weights(&[0, 0]);
        assert!(matches!(zero.pick(7), Pick::Nothing));
        zero.backends.clear();
        assert!(matches!(zero.pick(7), Pick::Parent));
    }

    fn rule_with_weights(w: &[u32]) -> Rule {
        let backends: Vec<Backend> = w
            .iter()
            .map(|w| Backend {
                name: Arc::from("b"),
                label: Arc::from("b"),
                weight: *w,
            })
            .collect();
        Rule {
            route: Arc::from("r"),
            name: Arc::from("r"),
            namespace: Arc::from(""),
            total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
            backends,
            request_headers: None,
            response_headers: None,
            request_timeout: None,
            per_try_timeout: None,
        }
    }

    #[test]
    fn backends_are_labelled_as_the_target_label_names_a_service() {
        for (target, label) in [
            ("web-v2.shop.svc.cluster.local:80", "web-v2.shop:80"),
            ("web.shop.svc.example.org:8080", "web.shop:8080"),
            ("10.0.0.1:80", "10.0.0.1:80"),
            ("web.shop:80", "web.shop:80"),
            ("", ""),
        ] {
            assert_eq!(&*service_label(target), label, "{target}");
        }
    }

    #[test]
    fn literal_prefixes_of_patterns() {
        assert_eq!(literal_prefix("/api/v[0-9]+/.*"), "/api/v");
        assert_eq!(literal_prefix("/ab?c"), "/a");
        assert_eq!(literal_prefix("/a{2}"), "/");
        assert_eq!(literal_prefix("/x|/y"), "");
        assert_eq!(literal_prefix(".*"), "");
        assert_eq!(literal_prefix("(?i)/api"), "");
    }

    #[test]
    fn header_modifiers_set_add_remove() {
        let m = HeaderModifier::from_api(&api::HeaderModifier {
            set: [("x-route".to_string(), "a".to_string())].into(),
            add: [("x-tag".to_string(), "b".to_string())].into(),
            remove: vec!["x-debug".into()],
        });
        let guarded = HeaderModifier::from_api(&api::HeaderModifier {
            set: [("remora-orig-proto".to_string(), "HTTP/1.1".to_string())].into(),
            add: [("content-length".to_string(), "0".to_string())].into(),
            remove: vec!["connection".into(), "host".into()],
        });
        assert_eq!(
            guarded,
            HeaderModifier::default(),
            "protected headers are left alone"
        );
        let mut h = HeaderMap::new();
        h.insert("x-route", HeaderValue::from_static("old"));
        h.insert("x-tag", HeaderValue::from_static("first"));
        h.insert("x-debug", HeaderValue::from_static("1"));
        m.apply(&mut h);
        assert_eq!(h.get("x-route").unwrap(), "a");
        assert_eq!(h.get_all("x-tag").iter().count(), 2);
        assert!(h.get("x-debug").is_none());
    }

    #[test]
    fn a_bad_regex_drops_its_match_only() {
        let routes = Routes::from_api(&[route(
            "bad",
            vec![rule(
                vec![
                    api::HttpRouteMatch {
                        path: path(api::path_match::Kind::Regex("(".into())),
                        ..Default::default()
                    },
                    api::HttpRouteMatch {
                        path: path(api::path_match::Kind::Exact("/ok".into())),
                        ..Default::default()
                    },
                ],
                "b",
            )],
        )]);
        assert!(routes.find(&parts("GET", "/ok", &[])).is_some());
        assert!(routes.find(&parts("GET", "/(", &[])).is_none());
    }
}
