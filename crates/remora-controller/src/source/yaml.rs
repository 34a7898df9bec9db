//! Parsing `kubectl apply`-style YAML: several documents per file, `v1 List` too. Kinds
//! the index does not use are skipped; a malformed document is an error that names the
//! file, the line and the reason. A field the kind does not have is refused with its
//! path, as the API server's strict field validation refuses it: a misspelt field must
//! never be silently dropped (a misspelt `http:` would widen a policy).
//!
//! Scalars are read as kubectl reads them, YAML 1.1 (`sigs.k8s.io/yaml`): an unquoted
//! `yes`, `no`, `on`, `off`, `y` or `n` is a boolean and `0755` is octal, so a value a
//! cluster would refuse (a boolean where a string belongs) is refused here too, and one
//! it accepts means the same here. Duplicate keys are refused, as strict field
//! validation refuses them. (One difference is left: kubectl turns such a word used as
//! a *key* into `"true"`; here it stays the word. No field of ours is one of them, so
//! either way it is an unknown field, refused.)

use crate::{convert, core::Object};

/// A file that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct ParseError {
    pub file: String,
    pub reason: String,
}

/// The deepest nesting a file may have: flow collections (`[`, `{`) are refused deeper
/// than this before the file is parsed (`dir`'s scan, counted as `too_deep`), and the
/// parser is held to the same depth for any nesting. Real objects nest a few levels.
/// (The parser this replaced took time quadratic in it: a 392 KB file of brackets took
/// minutes.)
pub const MAX_FLOW_DEPTH: usize = 64;

/// The objects in one file's text. One bad document fails the whole file, so a
/// half-edited file never replaces the last good version of itself.
pub fn parse(file: &str, text: &str) -> Result<Vec<Object>, ParseError> {
    let err = |reason: String| ParseError {
        file: file.to_string(),
        reason,
    };
    let options = serde_saphyr::options! {
        legacy_octal_numbers: true,
        with_snippet: false,
        budget: Some(serde_saphyr::Budget {
            max_depth: MAX_FLOW_DEPTH,
            ..serde_saphyr::Budget::default()
        }),
    };
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| err(reason(&e)))?;
    let mut out = Vec::new();
    for (n, value) in documents.into_iter().enumerate() {
        if value.is_null() {
            continue;
        }
        objects(value, &mut out).map_err(|e| err(format!("document {}: {e}", n + 1)))?;
    }
    Ok(out)
}

/// Why the parser refused a file, in the user's terms (the parser's own advice for a
/// duplicate key is about its options, not the file).
fn reason(e: &serde_saphyr::Error) -> String {
    match e {
        serde_saphyr::Error::DuplicateMappingKey { key, location } => format!(
            "duplicate key {} at line {}, column {}: the API server refuses it",
            key.as_deref().unwrap_or("(not a scalar)"),
            location.line(),
            location.column()
        ),
        other => other.to_string(),
    }
}

fn objects(value: serde_json::Value, out: &mut Vec<Object>) -> Result<(), String> {
    let field = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            for item in items {
                objects(item, out)?;
            }
            return Ok(());
        }
        ("v1", "Service") => {
            let svc: k8s_openapi::api::core::v1::Service = from(value)?;
            Object::Service(convert::service(&svc).map_err(|e| e.to_string())?)
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: k8s_openapi::api::discovery::v1::EndpointSlice = from(value)?;
            Object::Slice(convert::endpoint_slice(&slice).map_err(|e| e.to_string())?)
        }
        ("v1", "Namespace") => {
            let ns: k8s_openapi::api::core::v1::Namespace = from(value)?;
            Object::Namespace(convert::namespace(&ns).map_err(|e| e.to_string())?)
        }
        ("v1", "Pod") => {
            let pod: k8s_openapi::api::core::v1::Pod = from(value)?;
            Object::Pod(convert::pod(&pod).map_err(|e| e.to_string())?)
        }
        ("policy.remora.io/v1alpha1", "AuthorizationPolicy") => {
            let p: remora_k8s::AuthorizationPolicy = from(value)?;
            Object::Authz(convert::authorization_policy(&p).map_err(|e| e.to_string())?)
        }
        ("policy.remora.io/v1alpha1", "TrafficPolicy") => {
            let p: remora_k8s::TrafficPolicy = from(value)?;
            Object::Traffic(convert::traffic_policy(&p).map_err(|e| e.to_string())?)
        }
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
            let r: remora_k8s::HttpRoute = from(value)?;
            Object::Route(convert::http_route(&r).map_err(|e| e.to_string())?)
        }
        ("", _) | (_, "") => return Err("apiVersion and kind are required".into()),
        _ => {
            tracing::debug!(%api_version, %kind, "skipping a kind discovery does not use");
            return Ok(());
        }
    };
    out.push(object);
    Ok(())
}

fn from<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let object = serde_ignored::deserialize(value, |path| {
        // Checked already; the custom resources' types do not keep them.
        let path = field_path(&path);
        if path != "apiVersion" && path != "kind" {
            unknown.push(path);
        }
    })
    .map_err(|e| e.to_string())?;
    match unknown.as_slice() {
        [] => Ok(object),
        [one] => Err(format!(
            "unknown field {one:?}: the API server would refuse it"
        )),
        many => Err(format!(
            "unknown fields {}: the API server would refuse them",
            many.iter()
                .map(|f| format!("{f:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// A field's path as the API server writes it: `spec.from[0].identites`.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11: a misspelt `htpp:` was dropped, and the policy it was meant to narrow
    /// opened the port's other paths to unauthenticated clients.
    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let cases = [
            (
                "apiVersion: policy.remora.io/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {name: web, namespace: shop}\n\
                 spec:\n  from: [{unauthenticated: true}]\n  htpp: [{path: {value: /public}}]\n",
                "spec.htpp",
            ),
            (
                "apiVersion: policy.remora.io/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {name: web, namespace: shop}\n\
                 spec:\n  from: [{identites: [\"spiffe://cluster.local/ns/a/sa/b\"]}]\n",
                "spec.from[0].identites",
            ),
            (
                "apiVersion: policy.remora.io/v1alpha1\nkind: TrafficPolicy\n\
                 metadata: {name: web, namespace: shop}\n\
                 spec: {targetRef: {name: web}, retries: {attempts: 3, perTryTimout: 1s}}\n",
                "spec.retries.perTryTimout",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, lables: {a: b}}\n\
                 spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n",
                "metadata.lables",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop}\n\
                 spec: {containers: [{name: app, port: [{containerPort: 80}]}]}\n",
                "spec.containers[0].port",
            ),
            (
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                 metadata: {name: web, namespace: shop}\n\
                 spec: {parentRefs: [{name: web, kind: Service, group: \"\"}], rule: []}\n",
                "spec.rule",
            ),
        ];
        for (yaml, path) in cases {
            let err = parse("objects.yaml", yaml).unwrap_err().to_string();
            assert!(
                err.contains(&format!("unknown field {path:?}")),
                "{path}: {err}"
            );
            assert!(err.starts_with("objects.yaml: document 1"), "{err}");
        }
        // Every known field is still read.
        let ok = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {a: b}}\n\
                  spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}\n";
        assert_eq!(parse("ok.yaml", ok).unwrap().len(), 1);
    }

    /// kubectl reads YAML 1.1; so does `dir:`, or a file the cluster refuses would work
    /// here (and the other way round).
    #[test]
    fn scalars_are_read_as_kubectl_reads_them() {
        let ns = |value: &str| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{remora.io/inject: {value}}}}}\n"
            )
        };
        // A boolean where a string belongs: the API server refuses it, and so does dir:.
        for word in ["yes", "on", "y", "No", "OFF"] {
            let err = parse("ns.yaml", &ns(word)).unwrap_err().to_string();
            assert!(err.contains("boolean"), "{word}: {err}");
        }
        // Quoted, it is the string.
        let [Object::Namespace(quoted)] = &parse("ns.yaml", &ns("\"yes\"")).unwrap()[..] else {
            panic!("one namespace");
        };
        assert_eq!(quoted.labels["remora.io/inject"], "yes");
        // A boolean written as YAML 1.1 writes it.
        let authz = "apiVersion: policy.remora.io/v1alpha1\nkind: AuthorizationPolicy\n\
                     metadata: {name: web, namespace: shop}\n\
                     spec: {podSelector: {}, from: [{unauthenticated: yes}]}\n";
        let [Object::Authz(policy)] = &parse("authz.yaml", authz).unwrap()[..] else {
            panic!("one policy");
        };
        assert!(
            matches!(
                policy.sources[..],
                [crate::core::AuthzSource {
                    who: crate::core::Who::Anyone,
                    ..
                }]
            ),
            "{policy:?}"
        );
        // A leading zero is octal: 0120 is port 80.
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                   spec: {clusterIP: 10.96.0.10, ports: [{port: 0120, targetPort: 8080}]}\n";
        let [Object::Service(svc)] = &parse("svc.yaml", svc).unwrap()[..] else {
            panic!("one service");
        };
        assert_eq!(svc.ports[0].port, 80);
        // A key given twice is refused, not resolved one way or the other.
        let twice = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, name: other}\n";
        let err = parse("twice.yaml", twice).unwrap_err().to_string();
        assert_eq!(
            err,
            "twice.yaml: duplicate key name at line 3, column 24: the API server refuses it"
        );
        // Nesting of any kind (block style here) is held to the pre-parse scan's depth.
        let nested = |levels: usize| {
            (0..levels)
                .map(|i| format!("{}k:\n", "  ".repeat(i)))
                .collect::<String>()
        };
        let limit = MAX_FLOW_DEPTH;
        let err = parse("deep.yaml", &nested(limit + 2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("depth"), "{err}");
        let err = parse("deep.yaml", &nested(limit - 2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("apiVersion and kind are required"), "{err}");
        // A malformed file names its line.
        let broken = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop\n";
        let err = parse("broken.yaml", broken).unwrap_err().to_string();
        assert!(err.contains("line"), "{err}");
    }
}
