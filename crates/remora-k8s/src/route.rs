//! Gateway API `HTTPRoute` (from the `gateway-api` crate) as the mesh uses it: routes
//! whose `parentRefs` name a Service (the GAMMA convention) steer that Service's
//! clients. [`route_problems`] checks what the CRD's schema cannot, or what Remora does
//! not support, so the controller refuses a route with a reason instead of guessing.

pub use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefs,
    HttpRouteRulesFilters, HttpRouteRulesFiltersType, HttpRouteRulesMatches,
    HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesMethod, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType, HttpRouteSpec, HttpRouteStatus, HttpRouteStatusParents,
    HttpRouteStatusParentsParentRef,
};

use crate::parse_duration;

/// The `controllerName` Remora writes in an HTTPRoute's `status.parents`.
pub const CONTROLLER_NAME: &str = "policy.remora.io/controller";

/// Whether a backendRef with this group and kind names a core Service (a backendRef's
/// group defaults to core and its kind to Service).
pub fn is_service(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(group, None | Some("") | Some("core")) && matches!(kind, None | Some("Service"))
}

/// Whether a parentRef with this group and kind names a core Service. A parentRef's
/// group defaults to `gateway.networking.k8s.io` and its kind to `Gateway`, so a
/// Service parent says `group: ""` (or `core`) and `kind: Service`, as GAMMA has it.
pub fn is_service_parent(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(group, Some("") | Some("core")) && kind == Some("Service")
}

/// A route's regular expression as the proxy compiles it: matching the whole value.
pub fn full_match_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&remora_api::whole_value_pattern(pattern))
}

/// Whether `s` is a valid HTTP header name (an RFC 9110 token).
pub fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Why `s` does not compile as a route regular expression, exactly as the proxy
/// compiles it ([`full_match_regex`]).
pub fn regex_problem(s: &str) -> Option<String> {
    full_match_regex(s).err().map(|e| e.to_string())
}

/// Everything wrong with a route the mesh would serve: unsupported filters, regular
/// expressions that do not compile, header names that are not names, timeouts that
/// do not parse or contradict each other. Empty: the route can be compiled.
pub fn route_problems(spec: &HttpRouteSpec) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().flatten().enumerate() {
            match_problems(&format!("{at}.matches[{j}]"), m, &mut errors);
        }
        for (j, f) in rule.filters.iter().flatten().enumerate() {
            filter_problems(&format!("{at}.filters[{j}]"), f, &mut errors);
        }
        for (j, b) in rule.backend_refs.iter().flatten().enumerate() {
            if b.filters.as_ref().is_some_and(|f| !f.is_empty()) {
                errors.push(format!(
                    "{at}.backendRefs[{j}].filters: filters on a backend are not supported; \
                     put them on the rule"
                ));
            }
        }
        if let Some(t) = &rule.timeouts {
            let mut parsed =
                |field: &str, v: &Option<String>| match v.as_deref().map(parse_duration) {
                    Some(Err(e)) => {
                        errors.push(format!("{at}.timeouts.{field}: {e}"));
                        None
                    }
                    Some(Ok(d)) => Some(d),
                    None => None,
                };
            let request = parsed("request", &t.request);
            let backend = parsed("backendRequest", &t.backend_request);
            if let (Some(r), Some(b)) = (request, backend)
                && !r.is_zero()
                && b > r
            {
                errors.push(format!(
                    "{at}.timeouts.backendRequest: {b:?} is longer than request {r:?}"
                ));
            }
        }
    }
    errors
}

fn match_problems(at: &str, m: &HttpRouteRulesMatches, errors: &mut Vec<String>) {
    if let Some(p) = &m.path {
        let value = p.value.as_deref().unwrap_or("/");
        match p
            .r#type
            .clone()
            .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix)
        {
            HttpRouteRulesMatchesPathType::RegularExpression => {
                if let Some(e) = regex_problem(value) {
                    errors.push(format!("{at}.path.value: {e}"));
                }
            }
            _ if !value.starts_with('/') => {
                errors.push(format!("{at}.path.value: {value:?} does not start with /"))
            }
            _ => {}
        }
    }
    for (k, h) in m.headers.iter().flatten().enumerate() {
        if !is_header_name(&h.name) {
            errors.push(format!(
                "{at}.headers[{k}].name: {:?} is not a header name",
                h.name
            ));
        }
        if h.r#type == Some(HttpRouteRulesMatchesHeadersType::RegularExpression)
            && let Some(e) = regex_problem(&h.value)
        {
            errors.push(format!("{at}.headers[{k}].value: {e}"));
        }
    }
    for (k, q) in m.query_params.iter().flatten().enumerate() {
        if q.name.is_empty() {
            errors.push(format!("{at}.queryParams[{k}].name: required"));
        }
        if q.r#type == Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression)
            && let Some(e) = regex_problem(&q.value)
        {
            errors.push(format!("{at}.queryParams[{k}].value: {e}"));
        }
    }
}

/// What a RequestHeaderModifier or ResponseHeaderModifier filter changes (the two
/// filters' types differ in name only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderChanges<'a> {
    /// For the response rather than the request.
    pub response: bool,
    pub set: Vec<(&'a str, &'a str)>,
    pub add: Vec<(&'a str, &'a str)>,
    pub remove: &'a [String],
}

impl HeaderChanges<'_> {
    /// Every header name it touches.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let pairs = self.set.iter().chain(&self.add).map(|(name, _)| *name);
        pairs.chain(self.remove.iter().map(String::as_str))
    }
}

/// The header changes of a filter; None for other filters, or one without the field
/// its type names.
pub fn header_changes(f: &HttpRouteRulesFilters) -> Option<HeaderChanges<'_>> {
    macro_rules! changes {
        ($m:expr, $response:expr) => {
            $m.as_ref().map(|m| HeaderChanges {
                response: $response,
                set: m
                    .set
                    .iter()
                    .flatten()
                    .map(|h| (&*h.name, &*h.value))
                    .collect(),
                add: m
                    .add
                    .iter()
                    .flatten()
                    .map(|h| (&*h.name, &*h.value))
                    .collect(),
                remove: m.remove.as_deref().unwrap_or_default(),
            })
        };
    }
    match f.r#type {
        HttpRouteRulesFiltersType::RequestHeaderModifier => {
            changes!(f.request_header_modifier, false)
        }
        HttpRouteRulesFiltersType::ResponseHeaderModifier => {
            changes!(f.response_header_modifier, true)
        }
        _ => None,
    }
}

/// Why the mesh cannot send to a backendRef of a route in `namespace`, as a status
/// reason and a message; None when it can.
pub fn backend_problem(
    namespace: &str,
    b: &HttpRouteRulesBackendRefs,
) -> Option<(&'static str, &'static str)> {
    if !is_service(b.group.as_deref(), b.kind.as_deref()) {
        return Some(("InvalidKind", "only Services are supported"));
    }
    if b.namespace.as_deref().is_some_and(|n| n != namespace) {
        return Some((
            "RefNotPermitted",
            "a Service in another namespace is not supported",
        ));
    }
    if b.port.is_none() {
        return Some(("UnsupportedValue", "port is required"));
    }
    None
}

fn filter_problems(at: &str, f: &HttpRouteRulesFilters, errors: &mut Vec<String>) {
    let field = match f.r#type {
        HttpRouteRulesFiltersType::RequestHeaderModifier => "requestHeaderModifier",
        HttpRouteRulesFiltersType::ResponseHeaderModifier => "responseHeaderModifier",
        ref other => {
            errors.push(format!(
                "{at}.type: {other:?} is not supported (only RequestHeaderModifier and \
                 ResponseHeaderModifier are)"
            ));
            return;
        }
    };
    let Some(changes) = header_changes(f) else {
        errors.push(format!("{at}.{field}: required by its type"));
        return;
    };
    let kind = if changes.response {
        "response"
    } else {
        "request"
    };
    for name in changes.names() {
        if !is_header_name(name) {
            errors.push(format!("{at}: {name:?} is not a {kind} header name"));
        } else if remora_api::is_protected_header(name) {
            errors.push(format!(
                "{at}: the {kind} header {name:?} may not be changed by a route"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> HttpRouteSpec {
        serde_yaml_ng::from_str(yaml).expect("a route spec")
    }

    #[test]
    fn a_supported_route_has_no_problems() {
        let s = spec(
            r#"
parentRefs: [{ kind: Service, name: web, port: 80 }]
rules:
  - matches:
      - path: { type: PathPrefix, value: /api }
        headers: [{ name: x-canary, value: "true" }]
        queryParams: [{ type: RegularExpression, name: v, value: "[0-9]+" }]
        method: GET
    filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: { set: [{ name: x-route, value: api }], remove: [x-debug] }
    backendRefs: [{ name: web-v2, port: 80, weight: 10 }, { name: web, port: 80, weight: 90 }]
    timeouts: { request: 2s, backendRequest: 500ms }
"#,
        );
        assert_eq!(route_problems(&s), Vec::<String>::new());
    }

    #[test]
    fn every_problem_is_named() {
        let s = spec(
            r#"
parentRefs: [{ kind: Service, name: web }]
rules:
  - matches:
      - path: { type: RegularExpression, value: "/(unclosed" }
      - path: { type: RegularExpression, value: "(?x)/api # a comment swallows the anchor" }
        headers: [{ name: "bad header", value: x }]
      - path: { type: Exact, value: "relative" }
    filters:
      - type: RequestRedirect
        requestRedirect: { hostname: example.com }
      - type: RequestHeaderModifier
        requestHeaderModifier: { add: [{ name: "x:y", value: z }], set: [{ name: Remora-Orig-Proto, value: HTTP/1.1 }] }
      - type: ResponseHeaderModifier
        responseHeaderModifier: { remove: [content-length] }
    backendRefs:
      - name: web
        port: 80
        filters: [{ type: RequestHeaderModifier, requestHeaderModifier: {} }]
    timeouts: { request: 1s, backendRequest: 2s }
  - timeouts: { request: soon }
"#,
        );
        let problems = route_problems(&s);
        let expect = [
            "spec.rules[0].matches[0].path.value",
            "spec.rules[0].matches[1].path.value",
            "spec.rules[0].matches[1].headers[0].name",
            "spec.rules[0].matches[2].path.value: \"relative\"",
            "spec.rules[0].filters[0].type: RequestRedirect is not supported",
            "spec.rules[0].filters[1]: the request header \"Remora-Orig-Proto\" may not be changed",
            "spec.rules[0].filters[1]: \"x:y\" is not a request header name",
            "spec.rules[0].filters[2]: the response header \"content-length\" may not",
            "spec.rules[0].backendRefs[0].filters",
            "spec.rules[0].timeouts.backendRequest",
            "spec.rules[1].timeouts.request",
        ];
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
        for (p, e) in problems.iter().zip(expect) {
            assert!(p.starts_with(e), "{p:?} should start with {e:?}");
        }
    }

    #[test]
    fn service_refs() {
        assert!(is_service(None, None));
        assert!(is_service(Some(""), Some("Service")));
        assert!(is_service(Some("core"), Some("Service")));
        assert!(!is_service(
            Some("gateway.networking.k8s.io"),
            Some("Gateway")
        ));
        assert!(!is_service(None, Some("ServiceImport")));
    }
}
