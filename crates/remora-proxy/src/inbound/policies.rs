//! The proxy's `Policy.WatchInboundWorkload` client: one stream for the whole pod,
//! reconnected with jittered backoff. Its last answer covers every port (those the pod
//! serves by name, and one policy for the rest) and stays in force while the controller
//! is away, so what a port scan costs is nothing and what it can widen is nothing. The
//! configured default applies only until the controller has answered once.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use remora_api::v1 as api;
use remora_config::PortRange;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{debug, error, info, warn};

use super::authz::{DefaultPolicy, Policy};
use crate::{control::ClientInfo, reconnect::Reconnected};

/// The controller's answer for the pod.
#[derive(Debug, PartialEq)]
pub struct WorkloadPolicy {
    /// The ports the pod serves or a policy names, each with its policy.
    ports: HashMap<u16, Arc<Policy>>,
    /// Every other port.
    other: Arc<Policy>,
}

impl WorkloadPolicy {
    pub fn from_api(w: api::InboundWorkloadPolicy) -> Self {
        Self {
            ports: w
                .ports
                .into_iter()
                .filter_map(|(port, p)| {
                    Some((u16::try_from(port).ok()?, Arc::new(Policy::from_api(p))))
                })
                .collect(),
            // A missing `other` grants nothing: never wider than what was said.
            other: Arc::new(
                w.other
                    .map(Policy::from_api)
                    .unwrap_or_else(Policy::deny_all),
            ),
        }
    }

    /// The policy of `port`.
    pub fn get(&self, port: u16) -> &Arc<Policy> {
        self.ports.get(&port).unwrap_or(&self.other)
    }
}

/// One inbound connection's view of its port's policy: the controller's latest answer,
/// or the configured default before its first.
#[derive(Debug, Clone)]
pub struct PortPolicy {
    rx: watch::Receiver<Option<Arc<WorkloadPolicy>>>,
    port: u16,
    default: Arc<Policy>,
    /// The port as metrics name it: the port the pod serves, or `other`.
    pub target: Arc<str>,
    /// What the policy decided on this port (or on every port the pod does not serve).
    pub stats: Arc<PortStats>,
}

/// What a port's policy decided, for `/debug/inbound`.
#[derive(Debug, Default)]
pub struct PortStats {
    pub connections_allowed: AtomicU64,
    pub connections_denied: AtomicU64,
    pub requests_allowed: AtomicU64,
    pub requests_denied: AtomicU64,
}

impl PortStats {
    /// Counts one decision.
    pub fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn debug(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "connections_allowed": get(&self.connections_allowed),
            "connections_denied": get(&self.connections_denied),
            "requests_allowed": get(&self.requests_allowed),
            "requests_denied": get(&self.requests_denied),
        })
    }
}

impl PortPolicy {
    pub fn current(&self) -> Arc<Policy> {
        match &*self.rx.borrow() {
            Some(w) => w.get(self.port).clone(),
            None => self.default.clone(),
        }
    }
}

/// Inbound policy for every port of the pod.
pub struct InboundPolicies {
    rx: watch::Receiver<Option<Arc<WorkloadPolicy>>>,
    has_controller: bool,
    default: DefaultPolicy,
    default_policy: Arc<Policy>,
    /// The configured default with the kubelet's probe paths, for the ports probed.
    probed_defaults: HashMap<u16, Arc<Policy>>,
    /// The ports the pod declares (`REMORA_INBOUND_PORTS`), named in metrics even before
    /// the controller answers.
    declared: Vec<PortRange>,
    wait: Duration,
    /// A connection waited the whole wait without an answer.
    waited_in_vain: AtomicBool,
    /// Connections judged by the configured default because the controller had not
    /// answered yet.
    fallbacks: Counter,
    /// What each served port's policy decided (and `other`'s).
    stats: parking_lot::Mutex<std::collections::BTreeMap<String, Arc<PortStats>>>,
}

impl std::fmt::Debug for InboundPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundPolicies")
            .field("default", &self.default)
            .field("answered", &self.rx.borrow().is_some())
            .finish()
    }
}

/// What the policy watch needs to run.
#[derive(Debug)]
pub struct InboundConfig {
    pub info: ClientInfo,
    pub default: DefaultPolicy,
    pub trust_domain: String,
    pub declared: Vec<PortRange>,
    /// The kubelet's probes (`REMORA_PROBE_PATHS`): the default allows them too, so a
    /// pod stays live while the controller has not answered.
    pub probe_paths: Vec<(u16, String)>,
    pub wait: Duration,
    pub reconnects: Counter,
    /// Shared with the other controller streams, to resubscribe together.
    pub reconnected: Reconnected,
    pub fallbacks: Counter,
}

impl InboundPolicies {
    /// Starts watching the pod's policy on `channel`; without one (no controller) every
    /// port has the configured default.
    pub fn new(channel: Option<Channel>, config: InboundConfig) -> Arc<Self> {
        let (tx, rx) = watch::channel(None);
        // The controller answers about a pod it can name: without the pod's namespace and
        // name there is nothing to ask, and the configured default is all there is.
        let channel = channel.filter(|_| {
            let named = !config.info.namespace.is_empty() && !config.info.pod_name.is_empty();
            if !named {
                warn!(
                    default = config.default.as_str(),
                    "REMORA_NAMESPACE and REMORA_POD_NAME are not both set: inbound policy \
                     cannot be asked for, the configured default applies to every port"
                );
            }
            named
        });
        let has_controller = channel.is_some();
        if let Some(channel) = channel {
            let client = api::policy_client::PolicyClient::new(channel);
            let req = api::InboundPolicyRequest {
                workload: format!("{}:{}", config.info.namespace, config.info.pod_name),
                client: Some(config.info.to_api()),
                default_policy: config.default.as_str().to_string(),
            };
            let backoff = config.reconnected.backoff(0x9e37_79b9);
            tokio::spawn(watch_workload(
                client,
                req,
                tx,
                config.reconnects.clone(),
                backoff,
            ));
        }
        let default_policy = config.default.policy(&config.trust_domain);
        let mut probed: HashMap<u16, Policy> = HashMap::new();
        for (port, path) in config.probe_paths {
            let p = probed.entry(port).or_insert_with(|| default_policy.clone());
            p.probe_paths.push(path);
        }
        Arc::new(Self {
            rx,
            has_controller,
            default: config.default,
            default_policy: Arc::new(default_policy),
            probed_defaults: probed.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            declared: config.declared,
            wait: config.wait,
            waited_in_vain: AtomicBool::new(false),
            fallbacks: config.fallbacks,
            stats: Default::default(),
        })
    }

    /// The policy of `port`. Until the controller's first answer a connection waits up
    /// to the discovery wait for it, so early clients are judged by the real policy;
    /// past that the configured default judges it, and is counted. Once one connection
    /// has waited in vain, the next ones do not wait: waiting again would only delay them.
    pub async fn port(&self, port: u16) -> PortPolicy {
        if self.has_controller && self.rx.borrow().is_none() {
            let answered = match self.waited_in_vain.load(Ordering::Relaxed) {
                true => false,
                false => {
                    let mut waiting = self.rx.clone();
                    let wait = waiting.wait_for(Option::is_some);
                    let answered = tokio::time::timeout(self.wait, wait).await.is_ok();
                    self.waited_in_vain.store(!answered, Ordering::Relaxed);
                    answered
                }
            };
            if !answered {
                self.fallbacks.inc();
                debug!(
                    port,
                    default = self.default.as_str(),
                    "no inbound policy from the controller yet: the configured default applies"
                );
            }
        }
        // Counted by the port the pod serves, or all together as `other`: clients pick
        // ports, so the table must not grow with them.
        let target: Arc<str> = match self.is_served(port) {
            true => Arc::from(port.to_string()),
            false => Arc::from("other"),
        };
        let stats = self
            .stats
            .lock()
            .entry(target.to_string())
            .or_default()
            .clone();
        PortPolicy {
            target,
            stats,
            rx: self.rx.clone(),
            port,
            default: self
                .probed_defaults
                .get(&port)
                .unwrap_or(&self.default_policy)
                .clone(),
        }
    }

    /// Each port's policy, for `/debug/inbound`: the controller's answer (its ports and
    /// the policy of every other port), or the configured default before one; and what
    /// each port's policy decided so far.
    pub fn debug(&self) -> serde_json::Value {
        let answer = self.rx.borrow().clone();
        let describe = |p: &Policy| p.debug();
        let decided: serde_json::Map<_, _> = self
            .stats
            .lock()
            .iter()
            .map(|(port, s)| (port.clone(), s.debug()))
            .collect();
        match answer {
            Some(w) => {
                let mut ports: Vec<_> = w.ports.iter().collect();
                ports.sort_by_key(|(port, _)| **port);
                serde_json::json!({
                    "answered": true,
                    "decided": decided,
                    "ports": ports
                        .into_iter()
                        .map(|(port, p)| (port.to_string(), describe(p)))
                        .collect::<serde_json::Map<_, _>>(),
                    "other": describe(&w.other),
                })
            }
            None => serde_json::json!({
                "answered": false,
                "decided": decided,
                "has_controller": self.has_controller,
                "default": describe(&self.default_policy),
            }),
        }
    }

    /// Whether metrics name `port` (one the pod serves or a policy names) rather than
    /// folding it into `other`: clients choose ports, so labels must not follow them.
    pub fn is_served(&self, port: u16) -> bool {
        self.declared.iter().any(|r| r.contains(port))
            || self
                .rx
                .borrow()
                .as_ref()
                .is_some_and(|w| w.ports.contains_key(&port))
    }
}

/// Keeps the pod's policy current until every connection's view is gone.
async fn watch_workload(
    mut client: api::policy_client::PolicyClient<Channel>,
    req: api::InboundPolicyRequest,
    tx: watch::Sender<Option<Arc<WorkloadPolicy>>>,
    reconnects: Counter,
    mut backoff: crate::reconnect::Backoff,
) {
    loop {
        let started = tokio::time::Instant::now();
        let result = async {
            let mut stream = client
                .watch_inbound_workload(req.clone())
                .await?
                .into_inner();
            while let Some(w) = stream.message().await? {
                backoff.answered();
                let policy = Arc::new(WorkloadPolicy::from_api(w));
                if tx.borrow().as_ref() != Some(&policy) {
                    info!(
                        ports = policy.ports.len(),
                        other = %policy.other.name,
                        "inbound policy"
                    );
                }
                tx.send_replace(Some(policy));
            }
            Ok::<_, tonic::Status>(())
        }
        .await;
        match result {
            Err(status) if status.code() == tonic::Code::Unimplemented => error!(
                %status,
                "the controller does not serve WatchInboundWorkload: it is older than this \
                 proxy; upgrade the controller first. The last policy stays in force"
            ),
            Err(status) => {
                warn!(%status, "inbound policy stream failed; the last policy stays in force")
            }
            Ok(()) => {}
        }
        if tx.is_closed() {
            return;
        }
        reconnects.inc();
        backoff.pause(started).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(default: DefaultPolicy, fallbacks: &Counter) -> InboundConfig {
        InboundConfig {
            info: ClientInfo {
                namespace: "shop".into(),
                pod_name: "web-1".into(),
                pod_ip: String::new(),
            },
            default,
            trust_domain: "cluster.local".into(),
            declared: remora_config::parse_port_ranges("8080,9000-9001").unwrap(),
            probe_paths: vec![(8080, "/live".into())],
            wait: Duration::from_millis(200),
            reconnects: Counter::default(),
            reconnected: Reconnected::default(),
            fallbacks: fallbacks.clone(),
        }
    }

    fn peer() -> super::super::authz::Peer<'static> {
        super::super::authz::Peer {
            ip: "10.0.0.9".parse().unwrap(),
            identity: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn before_any_answer_the_configured_default_applies_and_is_counted() {
        // A controller nobody answers at.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9")
            .connect_timeout(Duration::from_millis(50))
            .connect_lazy();
        let fallbacks = Counter::default();
        let policies = InboundPolicies::new(Some(channel), config(DefaultPolicy::Deny, &fallbacks));
        let policy = policies.port(8080).await;
        assert!(!policy.current().allows_connection(&peer()));
        assert_eq!(fallbacks.get(), 1);
        // The kubelet's probe of that port passes the deny default; nothing else does.
        let get = &http::Method::GET;
        assert!(
            policy
                .current()
                .allows_request(&peer(), get, "/live", false)
        );
        assert!(
            !policy
                .current()
                .allows_request(&peer(), get, "/admin", false)
        );
        assert!(
            !policy
                .current()
                .allows_request(&peer(), &http::Method::POST, "/live", false)
        );
        // The next connection does not wait again (paused time moves only by waits),
        // and is counted too.
        let started = tokio::time::Instant::now();
        let policy = policies.port(8081).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(!policy.current().allows_connection(&peer()));
        assert!(
            !policy
                .current()
                .allows_request(&peer(), get, "/live", false)
        );
        assert_eq!(fallbacks.get(), 2);
        // Declared ports are named in metrics from the start; others are not.
        assert!(policies.is_served(8080) && policies.is_served(9001));
        assert!(!policies.is_served(31337));

        // Without a controller the default is the design, not a fallback.
        let fallbacks = Counter::default();
        let standalone =
            InboundPolicies::new(None, config(DefaultPolicy::AllUnauthenticated, &fallbacks));
        assert!(
            standalone
                .port(80)
                .await
                .current()
                .allows_connection(&peer())
        );
        assert_eq!(fallbacks.get(), 0);
    }

    #[test]
    fn an_answer_covers_every_port_and_an_unreadable_one_grants_nothing() {
        let open = api::InboundPolicy {
            authorizations: vec![api::Authorization {
                metadata: None,
                networks: Vec::new(),
                authentication: Some(api::authorization::Authentication::Unauthenticated(
                    api::Unauthenticated {},
                )),
            }],
            ..Default::default()
        };
        let w = WorkloadPolicy::from_api(api::InboundWorkloadPolicy {
            ports: [(8080, open)].into(),
            other: Some(api::InboundPolicy::default()),
        });
        assert!(w.get(8080).allows_connection(&peer()));
        for port in [1, 8081, 65535] {
            assert!(!w.get(port).allows_connection(&peer()), "{port}");
        }
        // No `other`: the rest of the ports are closed, not opened.
        let w = WorkloadPolicy::from_api(api::InboundWorkloadPolicy {
            ports: Default::default(),
            other: None,
        });
        assert!(!w.get(80).allows_connection(&peer()));
    }
}
