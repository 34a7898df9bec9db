//! `remora-k8s`: the `policy.remora.io` custom resources (`AuthorizationPolicy`, and
//! `TrafficPolicy` in [`traffic`]). Their OpenAPI schemas (what
//! the API server validates on `kubectl apply`) come from these types, and
//! `cargo xtask codegen` writes the CRD manifests from them; [`AuthorizationPolicySpec::validate`]
//! checks what a schema cannot (CIDRs, SPIFFE IDs, wildcards), for the controller to
//! reject an object with a reason rather than guess.

pub mod inject;
pub mod pki;
mod route;
mod traffic;

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use route::*;
pub use traffic::*;

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

pub const GROUP: &str = "policy.remora.io";
pub const VERSION: &str = "v1alpha1";

/// Every Remora CRD, as `cargo xtask codegen` writes them and `remora check` expects
/// them installed.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![AuthorizationPolicy::crd(), TrafficPolicy::crd()]
}

/// What the controller made of a policy object: an `Accepted` condition, `True` when
/// it is in force, `False` with the reason when it was refused (the last valid version,
/// if any, stays in force).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A condition of `type_` for an object at `generation`: `Ok` is `True` with `reason`
/// `ok_reason`; `Err((reason, message))` is `False`. The transition time is carried over
/// from `previous` when the status did not change, so rewriting it is idempotent.
pub fn condition(
    type_: &str,
    generation: Option<i64>,
    outcome: Result<&str, (&str, &str)>,
    previous: &[Condition],
) -> Condition {
    let (status, reason, message) = match outcome {
        Ok(reason) => ("True", reason, ""),
        Err((reason, message)) => ("False", reason, message),
    };
    let old = previous.iter().find(|c| c.type_ == type_);
    let time = match old {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
        }
    };
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.chars().take(32_000).collect(),
        observed_generation: generation,
        last_transition_time: time,
    }
}

/// Who may connect to a workload's inbound ports. Policies are allow-lists: a port
/// selected by any AuthorizationPolicy admits only what one of them allows; a port
/// selected by none follows the pod's default inbound policy.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "policy.remora.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "authz",
    namespaced,
    status = "PolicyStatus",
    doc = "Who may connect to the selected pods' inbound ports."
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The pods (in the policy's namespace) it applies to; empty selects every pod.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// The pods' ports it applies to; empty means every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Who is allowed: a client allowed by any entry may connect.
    #[schemars(length(min = 1))]
    pub from: Vec<Source>,
    /// When set, the grant covers only HTTP requests matching one of these; other
    /// requests, and opaque TCP, need another grant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpMatch>,
}

/// One kind of allowed client. `identities` and `namespaces` need a verified mesh
/// identity (mTLS); `unauthenticated` admits anyone; `networks` narrows either to
/// clients from those CIDRs (alone, it admits anyone from them).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// SPIFFE IDs (`spiffe://cluster.local/ns/shop/sa/frontend`); a trailing `*` is a
    /// prefix wildcard (`spiffe://cluster.local/ns/shop/sa/*`), a lone `*` any identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Namespaces all of whose identities are allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Client networks in CIDR form (`10.0.0.0/8`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Any client, with or without mTLS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
}

/// A match on an HTTP request: every field set must hold.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The method, e.g. `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    /// Starts with `/`.
    pub value: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum PathMatchType {
    /// The path equals the value.
    Exact,
    /// The path starts with the value, on a segment boundary.
    #[default]
    PathPrefix,
}

/// Kubernetes' label selector: every `matchLabels` pair and every expression must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator {
                    SelectorOperator::In => value.is_some_and(|v| e.values.contains(v)),
                    SelectorOperator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

impl AuthorizationPolicySpec {
    /// Everything wrong with the spec, each naming its field; empty when valid.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.from.is_empty() {
            errors.push("spec.from: at least one source is required".to_string());
        }
        for (i, s) in self.from.iter().enumerate() {
            let at = format!("spec.from[{i}]");
            let mesh = !s.identities.is_empty() || !s.namespaces.is_empty();
            if s.unauthenticated && mesh {
                errors.push(format!(
                    "{at}: unauthenticated cannot be combined with identities or namespaces"
                ));
            }
            if !s.unauthenticated && !mesh && s.networks.is_empty() {
                errors.push(format!(
                    "{at}: names nobody; set identities, namespaces, networks or unauthenticated"
                ));
            }
            for id in &s.identities {
                if let Err(e) = check_identity(id) {
                    errors.push(format!("{at}.identities: {id:?} {e}"));
                }
            }
            for n in &s.networks {
                if n.parse::<ipnet::IpNet>().is_err() {
                    errors.push(format!(
                        "{at}.networks: {n:?} is not a CIDR like 10.0.0.0/8"
                    ));
                }
            }
            for ns in &s.namespaces {
                if ns.is_empty() || ns.contains('/') {
                    errors.push(format!("{at}.namespaces: {ns:?} is not a namespace name"));
                }
            }
        }
        for (i, m) in self.http.iter().enumerate() {
            let at = format!("spec.http[{i}]");
            if let Some(p) = &m.path
                && !p.value.starts_with('/')
            {
                errors.push(format!("{at}.path.value: {:?} must start with /", p.value));
            }
            if let Some(method) = &m.method
                && (method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()))
            {
                errors.push(format!("{at}.method: {method:?} is not a method like GET"));
            }
        }
        if self.ports.contains(&0) {
            errors.push("spec.ports: 0 is not a port".to_string());
        }
        errors
    }
}

/// `*`, a full SPIFFE ID, or a SPIFFE ID prefix ending in `*`.
fn check_identity(id: &str) -> Result<(), &'static str> {
    if id == "*" {
        return Ok(());
    }
    let body = id.strip_suffix('*').unwrap_or(id);
    if !body.starts_with("spiffe://") || body.len() <= "spiffe://".len() {
        return Err("is not a SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>) or *");
    }
    if body.contains('*') {
        return Err("may hold * only at its end");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn spec(yaml: &str) -> AuthorizationPolicySpec {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn a_valid_policy_parses_and_validates() {
        let s = spec(
            r#"
podSelector: {matchLabels: {app: web}}
ports: [8080]
from:
  - identities: ["spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/ops/sa/*"]
  - namespaces: [monitoring]
    networks: [10.0.0.0/8]
  - unauthenticated: true
http:
  - path: {type: Exact, value: /healthz}
    method: GET
"#,
        );
        assert_eq!(s.validate(), Vec::<String>::new());
        assert_eq!(s.http[0].path.as_ref().unwrap().kind, PathMatchType::Exact);
    }

    #[test]
    fn every_mistake_is_named() {
        let s = spec(
            r#"
from:
  - identities: ["frontend", "spiffe://a/*/b"]
    unauthenticated: true
  - {}
  - networks: [10.0.0.0/33]
http:
  - path: {value: api}
    method: get
"#,
        );
        let errors = s.validate().join("\n");
        for needle in [
            "spec.from[0]: unauthenticated cannot be combined",
            "\"frontend\" is not a SPIFFE ID",
            "\"spiffe://a/*/b\" may hold * only at its end",
            "spec.from[1]: names nobody",
            "\"10.0.0.0/33\" is not a CIDR",
            "spec.http[0].path.value",
            "spec.http[0].method",
        ] {
            assert!(errors.contains(needle), "missing {needle:?} in:\n{errors}");
        }
        assert!(
            spec("from: []")
                .validate()
                .join("")
                .contains("at least one")
        );
    }

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())]
            .into_iter()
            .collect();
        let s = |yaml: &str| serde_yaml_ng::from_str::<LabelSelector>(yaml).unwrap();
        assert!(s("{}").matches(&labels));
        assert!(s("matchLabels: {app: web}").matches(&labels));
        assert!(!s("matchLabels: {app: db}").matches(&labels));
        assert!(
            s("matchExpressions: [{key: app, operator: In, values: [web, api]}]").matches(&labels)
        );
        assert!(
            !s("matchExpressions: [{key: app, operator: NotIn, values: [web]}]").matches(&labels)
        );
        assert!(s("matchExpressions: [{key: tier, operator: DoesNotExist}]").matches(&labels));
        assert!(!s("matchExpressions: [{key: tier, operator: Exists}]").matches(&labels));
    }

    #[test]
    fn the_crd_is_namespaced_and_has_a_schema() {
        let crd = AuthorizationPolicy::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, VERSION);
        let schema = serde_json::to_string(&v.schema).unwrap();
        assert!(schema.contains("\"minItems\":1"), "{schema}");
        assert!(schema.contains("PathPrefix"), "{schema}");
    }

    /// Issue 13: kubectl reads keys as YAML 1.1, where these words are booleans: a field
    /// named `on` arrives as `"true"` (the TrafficPolicy's `retries.on` could not be
    /// written). No field of any CRD may be one of them.
    #[test]
    fn no_crd_field_is_a_yaml_1_1_boolean() {
        const BOOLEAN_WORDS: &[&str] = &[
            "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "true", "True", "TRUE",
            "false", "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF",
        ];
        fn fields(v: &serde_json::Value, path: &str, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(map) => {
                    if let Some(serde_json::Value::Object(props)) = map.get("properties") {
                        for (name, schema) in props {
                            let here = format!("{path}.{name}");
                            out.push(here.clone());
                            fields(schema, &here, out);
                        }
                    }
                    for (k, child) in map {
                        if k != "properties" {
                            fields(child, path, out);
                        }
                    }
                }
                serde_json::Value::Array(items) => {
                    for item in items {
                        fields(item, path, out);
                    }
                }
                _ => {}
            }
        }
        for crd in [AuthorizationPolicy::crd(), TrafficPolicy::crd()] {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            let mut all = Vec::new();
            fields(&schema, &crd.spec.names.kind, &mut all);
            assert!(all.iter().any(|f| f.ends_with(".spec")), "{all:?}");
            for field in &all {
                let name = field.rsplit('.').next().unwrap();
                assert!(
                    !BOOLEAN_WORDS.contains(&name),
                    "{field} reads as a boolean in kubectl"
                );
            }
        }
    }

    /// Issue 11: the API server must prune or refuse fields a schema does not declare;
    /// a schema that preserved them would let a misspelt field pass silently.
    #[test]
    fn no_crd_preserves_unknown_fields() {
        for crd in [AuthorizationPolicy::crd(), TrafficPolicy::crd()] {
            let text = serde_json::to_string(&crd).unwrap();
            assert!(
                !text.contains("x-kubernetes-preserve-unknown-fields"),
                "{}: {text}",
                crd.spec.names.kind
            );
            for v in &crd.spec.versions {
                let schema = v
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref());
                let schema = schema.expect("a structural schema");
                assert_eq!(schema.type_.as_deref(), Some("object"));
                assert!(
                    schema
                        .properties
                        .as_ref()
                        .is_some_and(|p| p.contains_key("spec"))
                );
            }
        }
    }
}
