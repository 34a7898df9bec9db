//! `TrafficPolicy`: how clients of a Service send it traffic — load balancing,
//! timeouts, retries with a budget, and circuit breaking.

use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How every client proxy of the target Service sends it traffic.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "policy.remora.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    shortname = "tp",
    namespaced,
    status = "crate::PolicyStatus",
    doc = "How clients send traffic to a Service: balancing, timeouts, retries, circuit breaking."
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Service (in the policy's namespace) it applies to.
    pub target_ref: TargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Only `Service`.
    #[serde(default = "service_kind")]
    pub kind: String,
    pub name: String,
    /// One port of the Service; unset: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

fn service_kind() -> String {
    "Service".into()
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: Algorithm,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency weighted by requests in flight.
    #[default]
    PeakEWMA,
    /// Power of two choices over requests in flight.
    LeastRequest,
    /// Each endpoint in turn.
    RoundRobin,
}

/// Durations in the Gateway API form: `1h`, `30s`, `500ms`, `1m30s`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// The whole request, across retries, until its response headers: then 504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// One attempt, until its response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try: Option<String>,
    /// Connecting to an endpoint (TCP and TLS); default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    /// A connection or stream silent this long is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Attempts after the first.
    pub attempts: u32,
    /// What is retried: `connect-failure`, `reset`, `refused-stream`, `unavailable`,
    /// `5xx`, `gateway-error`, `per-try-timeout`, an HTTP status (`"503"`), or a gRPC
    /// status as `grpc-<code>` (`grpc-14`). gRPC calls are retried only on gRPC codes.
    /// (`retryOn`, not `on`: kubectl reads the key `on` as the boolean `true`.)
    #[serde(default)]
    pub retry_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Retry POST, PATCH and CONNECT too (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub non_idempotent: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// Default 25ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Default 250ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// Retries may add at most this fraction of requests (default 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Retries always allowed per second (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
    /// The window requests and retries are counted over (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Consecutive failures that eject an endpoint; 0 or unset: no ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// The first ejection's length (default 30s); it doubles, with jitter, each time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// Default 300s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<String>,
    /// At most this share of endpoints is ejected at once (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// Per endpoint: open connections at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Per endpoint: requests waiting for a connection at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Per endpoint: requests in flight at most; beyond, a request fails fast with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

/// The retry conditions that name a class of failure.
pub const RETRY_CLASSES: &[&str] = &[
    "connect-failure",
    "reset",
    "refused-stream",
    "unavailable",
    "5xx",
    "gateway-error",
    "per-try-timeout",
];

/// One parsed retry condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryOn {
    Class(&'static str),
    Status(u16),
    Grpc(u32),
}

/// Parses a retry condition.
pub fn retry_on(s: &str) -> Result<RetryOn, String> {
    if let Some(c) = RETRY_CLASSES.iter().find(|c| **c == s) {
        return Ok(RetryOn::Class(c));
    }
    if let Some(code) = s.strip_prefix("grpc-") {
        return match code.parse::<u32>() {
            Ok(c @ 0..=16) => Ok(RetryOn::Grpc(c)),
            _ => Err(format!("{s:?}: a gRPC code is grpc-0 to grpc-16")),
        };
    }
    match s.parse::<u16>() {
        Ok(c @ 100..=599) => Ok(RetryOn::Status(c)),
        _ => Err(format!(
            "{s:?} is not one of {}, an HTTP status or grpc-<code>",
            RETRY_CLASSES.join(", ")
        )),
    }
}

/// A Gateway API duration (GEP-2257): one or more `<number><unit>` with units `h`,
/// `m`, `s`, `ms`, such as `1h30m` or `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 500ms, 10s, 1m30s or 1h");
    if s.is_empty() || s.len() > 32 {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        total += unit * n as u32;
        rest = &rest[len..];
    }
    Ok(total)
}

impl TrafficPolicySpec {
    /// Everything wrong with the spec, each naming its field; empty when valid.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut duration = |field: &str, v: &Option<String>, positive: bool| {
            if let Some(v) = v {
                match parse_duration(v) {
                    Ok(d) if positive && d.is_zero() => {
                        errors.push(format!("{field}: must be more than 0"))
                    }
                    Ok(_) => {}
                    Err(e) => errors.push(format!("{field}: {e}")),
                }
            }
        };
        if let Some(t) = &self.timeouts {
            duration("spec.timeouts.request", &t.request, true);
            duration("spec.timeouts.perTry", &t.per_try, true);
            duration("spec.timeouts.connect", &t.connect, true);
            duration("spec.timeouts.idle", &t.idle, true);
        }
        if let Some(r) = &self.retries {
            if let Some(b) = &r.backoff {
                duration("spec.retries.backoff.base", &b.base, false);
                duration("spec.retries.backoff.max", &b.max, false);
            }
            if let Some(b) = &r.budget {
                duration("spec.retries.budget.window", &b.window, true);
            }
        }
        if let Some(c) = &self.circuit_breaker {
            duration(
                "spec.circuitBreaker.baseEjectionTime",
                &c.base_ejection_time,
                true,
            );
            duration(
                "spec.circuitBreaker.maxEjectionTime",
                &c.max_ejection_time,
                true,
            );
        }
        if self.target_ref.kind != "Service" {
            errors.push(format!(
                "spec.targetRef.kind: {:?}; only Service is supported",
                self.target_ref.kind
            ));
        }
        if self.target_ref.name.is_empty() {
            errors.push("spec.targetRef.name: required".into());
        }
        if self.target_ref.port == Some(0) {
            errors.push("spec.targetRef.port: 0 is not a port".into());
        }
        if let Some(r) = &self.retries {
            if r.attempts > 10 {
                errors.push(format!(
                    "spec.retries.attempts: {} is more than 10",
                    r.attempts
                ));
            }
            if r.attempts > 0 && r.retry_on.is_empty() {
                errors.push("spec.retries.retryOn: name at least one condition to retry".into());
            }
            for c in &r.retry_on {
                if let Err(e) = retry_on(c) {
                    errors.push(format!("spec.retries.retryOn: {e}"));
                }
            }
            if let Some(ratio) = r.budget.as_ref().and_then(|b| b.ratio)
                && !(0.0..=1.0).contains(&ratio)
            {
                errors.push(format!(
                    "spec.retries.budget.ratio: {ratio} is not between 0 and 1"
                ));
            }
        }
        if let Some(p) = self
            .circuit_breaker
            .as_ref()
            .and_then(|c| c.max_ejection_percent)
            && p > 100
        {
            errors.push(format!(
                "spec.circuitBreaker.maxEjectionPercent: {p} is over 100"
            ));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (s, ms) in [
            ("500ms", 500),
            ("10s", 10_000),
            ("1m30s", 90_000),
            ("1h", 3_600_000),
            ("0s", 0),
        ] {
            assert_eq!(parse_duration(s).unwrap(), Duration::from_millis(ms), "{s}");
        }
        for bad in ["", "10", "s", "1.5s", "-1s", "1d", "10 s", "1s2"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_full_policy_validates_and_mistakes_are_named() {
        let ok: TrafficPolicySpec = serde_yaml_ng::from_str(
            r#"
targetRef: {name: web, port: 80}
loadBalancer: {algorithm: LeastRequest}
timeouts: {request: 2s, perTry: 500ms}
retries:
  attempts: 2
  retryOn: [5xx, connect-failure, "503", grpc-14]
  backoff: {base: 25ms, max: 250ms}
  budget: {ratio: 0.2, minPerSecond: 10, window: 10s}
circuitBreaker: {consecutiveFailures: 5, baseEjectionTime: 30s, maxRequests: 100}
"#,
        )
        .unwrap();
        assert_eq!(ok.validate(), Vec::<String>::new());
        assert_eq!(ok.target_ref.kind, "Service");
        let bad: TrafficPolicySpec = serde_yaml_ng::from_str(
            r#"
targetRef: {kind: Deployment, name: ""}
timeouts: {request: soon}
retries: {attempts: 50, retryOn: [sometimes, grpc-99], budget: {ratio: 2}}
circuitBreaker: {maxEjectionPercent: 150}
"#,
        )
        .unwrap();
        let errors = bad.validate().join("\n");
        for needle in [
            "spec.targetRef.kind",
            "spec.targetRef.name",
            "spec.timeouts.request",
            "spec.retries.attempts: 50",
            "\"sometimes\"",
            "grpc-0 to grpc-16",
            "spec.retries.budget.ratio",
            "spec.circuitBreaker.maxEjectionPercent",
        ] {
            assert!(errors.contains(needle), "missing {needle:?} in:\n{errors}");
        }
    }
}
