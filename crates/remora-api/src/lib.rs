//! The one contract between `remora-proxy` and `remora-controller`: message types and
//! tonic clients/servers generated from `proto/remora/v1/*.proto`.

/// Version 1 of the Remora control-plane API.
pub mod v1 {
    #![allow(clippy::all, missing_docs, rust_2018_idioms, unreachable_pub)]
    tonic::include_proto!("remora.v1");
}

/// A wire duration as a `std` one; `None` if either part is negative (prost's own
/// `TryFrom` would normalise `1 s, -5 ns` into a positive duration: the proxies refuse it).
pub fn duration(d: &prost_types::Duration) -> Option<std::time::Duration> {
    let (seconds, nanos) = (u64::try_from(d.seconds).ok()?, u32::try_from(d.nanos).ok()?);
    Some(std::time::Duration::new(seconds, nanos))
}

impl v1::OptionalDuration {
    /// The limit it sets: `None` for zero (no limit), an unset value or a negative one.
    pub fn limit(&self) -> Option<std::time::Duration> {
        duration(self.value.as_ref()?).filter(|d| !d.is_zero())
    }
}

/// Whether an HTTP route may not change header `name` (either case): hop-by-hop and
/// framing fields (the proxies and hyper own them), `host` (a rewrite's job), and the
/// proxies' own `remora-*` fields. The controller refuses a route that tries; the proxy
/// ignores such a change.
pub fn is_protected_header(name: &str) -> bool {
    const PROTECTED: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "host",
    ];
    PROTECTED.iter().any(|p| name.eq_ignore_ascii_case(p))
        || name
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("remora-"))
}

/// A policy answer headed by a `PolicyMetadata`.
pub trait Revised: prost::Message {
    fn metadata_mut(&mut self) -> Option<&mut v1::PolicyMetadata>;
}

impl Revised for v1::OutboundPolicy {
    fn metadata_mut(&mut self) -> Option<&mut v1::PolicyMetadata> {
        self.metadata.as_mut()
    }
}

impl Revised for v1::InboundPolicy {
    fn metadata_mut(&mut self) -> Option<&mut v1::PolicyMetadata> {
        self.metadata.as_mut()
    }
}

/// `answer` with `PolicyMetadata.revision` set: a digest of the answer as encoded with
/// the revision empty (FNV-1a, 64 bits, in hex). Maps encode in key order, so every
/// controller replica computes the same revision for the same answer, and it changes
/// exactly when the answer does: an operator compares it across proxies to see which
/// ones have the policy in force.
pub fn with_revision<M: Revised>(mut answer: M) -> M {
    if let Some(m) = answer.metadata_mut() {
        m.revision.clear();
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in answer.encode_to_vec() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    if let Some(m) = answer.metadata_mut() {
        m.revision = format!("{hash:016x}");
    }
    answer
}

/// A route's regular expression (path, header or query value) as both sides compile
/// it: it must match the whole value.
pub fn whole_value_pattern(pattern: &str) -> String {
    format!("^(?:{pattern})$")
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_optional_duration_is_a_limit_or_none() {
        use std::time::Duration;
        let limit = |value: Option<(i64, i32)>| {
            super::v1::OptionalDuration {
                value: value.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
            }
            .limit()
        };
        assert_eq!(
            limit(Some((3, 500_000_000))),
            Some(Duration::from_millis(3500))
        );
        assert_eq!(limit(Some((0, 0))), None, "zero: no limit");
        assert_eq!(limit(None), None, "unset");
        assert_eq!(limit(Some((-1, 0))), None, "negative seconds");
        assert_eq!(limit(Some((1, -5))), None, "negative nanoseconds");
    }

    #[test]
    fn protected_headers() {
        for name in [
            "Content-Length",
            "host",
            "TE",
            "remora-orig-proto",
            "Remora-Error",
        ] {
            assert!(super::is_protected_header(name), "{name}");
        }
        for name in ["x-route", "remora", "hostname", "content-type"] {
            assert!(!super::is_protected_header(name), "{name}");
        }
    }
}
