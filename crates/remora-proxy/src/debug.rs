//! The proxy's `/debug/*` pages (loopback only): why it sends a request where it does.
//!
//! - `/debug/targets`: every outbound destination in use — what discovery says it is,
//!   the policy in force and its routes, each endpoint's latency estimate, requests in
//!   flight and ejection, and the retry budget left.
//! - `/debug/inbound`: each port's authorization policy, or the default before the
//!   controller's first answer.

use std::sync::Arc;

use crate::{inbound::policies::InboundPolicies, outbound::destination::Destinations};

/// What the pages read.
#[derive(Debug)]
pub struct Pages {
    /// None without a controller: nothing is discovered.
    pub destinations: Option<Arc<Destinations>>,
    pub policies: Arc<InboundPolicies>,
}

impl remora_admin::server::DebugPages for Pages {
    fn names(&self) -> &'static [&'static str] {
        &["targets", "inbound"]
    }

    fn page(&self, name: &str) -> Option<String> {
        let value = match name {
            "targets" => self
                .destinations
                .as_ref()
                .map_or(serde_json::json!([]), |d| d.debug()),
            "inbound" => self.policies.debug(),
            _ => return None,
        };
        serde_json::to_string_pretty(&value).ok()
    }
}
