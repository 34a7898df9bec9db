//! Parsing `kubectl apply`-style YAML: several documents per file, `v1 List` too. Kinds
//! the index does not use are skipped; a malformed document is an error that names the
//! file, the line and the reason.

use serde::Deserialize;

use crate::{convert, core::Object};

/// A file that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct ParseError {
    pub file: String,
    pub reason: String,
}

/// The objects in one file's text. One bad document fails the whole file, so a
/// half-edited file never replaces the last good version of itself.
pub fn parse(file: &str, text: &str) -> Result<Vec<Object>, ParseError> {
    let err = |reason: String| ParseError {
        file: file.to_string(),
        reason,
    };
    let mut out = Vec::new();
    for (n, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(doc)
            .map_err(|e| err(format!("document {}: {e}", n + 1)))?;
        if value.is_null() {
            continue;
        }
        objects(value, &mut out).map_err(|e| err(format!("document {}: {e}", n + 1)))?;
    }
    Ok(out)
}

fn objects(value: serde_yaml_ng::Value, out: &mut Vec<Object>) -> Result<(), String> {
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
                .and_then(|i| i.as_sequence())
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

fn from<T: serde::de::DeserializeOwned>(value: serde_yaml_ng::Value) -> Result<T, String> {
    serde_yaml_ng::from_value(value).map_err(|e| e.to_string())
}
