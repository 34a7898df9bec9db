//! The proxy's `Policy.WatchInbound` client: one stream per inbound port in use,
//! reconnected with jittered backoff; the last answer stays in force while the
//! controller is away.

use std::{collections::HashMap, sync::Arc, time::Duration};

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use remora_api::v1 as api;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::{DefaultPolicy, Policy};
use crate::discovery::{Backoff, ClientInfo};

/// Ports watched at once, before those no connection uses are forgotten: any client can
/// pick a port, so the streams are bounded.
const MAX_PORTS: usize = 256;

/// One port's policy: the controller's latest answer, or the default before one.
#[derive(Debug, Clone)]
pub struct PortPolicy {
    rx: watch::Receiver<Option<Arc<Policy>>>,
    default: Arc<Policy>,
    /// Counts the connections using the port's stream.
    _users: Arc<()>,
}

struct Entry {
    rx: watch::Receiver<Option<Arc<Policy>>>,
    users: Arc<()>,
    task: Option<tokio::task::AbortHandle>,
}

impl PortPolicy {
    pub fn current(&self) -> Arc<Policy> {
        self.rx
            .borrow()
            .clone()
            .unwrap_or_else(|| self.default.clone())
    }
}

pub struct InboundPolicies {
    client: Option<api::policy_client::PolicyClient<Channel>>,
    info: ClientInfo,
    default: DefaultPolicy,
    default_policy: Arc<Policy>,
    wait: Duration,
    ports: Mutex<HashMap<u16, Entry>>,
    reconnects: Counter,
}

impl std::fmt::Debug for InboundPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundPolicies")
            .field("default", &self.default)
            .field("ports", &self.ports.lock().len())
            .finish()
    }
}

impl InboundPolicies {
    /// Without a channel (no controller) every port has the default policy.
    pub fn new(
        channel: Option<Channel>,
        info: ClientInfo,
        default: DefaultPolicy,
        trust_domain: &str,
        wait: Duration,
        reconnects: Counter,
    ) -> Arc<Self> {
        Arc::new(Self {
            client: channel.map(api::policy_client::PolicyClient::new),
            info,
            default,
            default_policy: Arc::new(default.policy(trust_domain)),
            wait,
            ports: Mutex::new(HashMap::new()),
            reconnects,
        })
    }

    /// The policy of `port`. The first connection to a port waits up to the discovery
    /// wait for the controller's answer, so a port's first clients are judged by its
    /// real policy rather than the default.
    pub async fn port(self: &Arc<Self>, port: u16) -> PortPolicy {
        let (rx, users) = {
            let mut ports = self.ports.lock();
            if !ports.contains_key(&port) && ports.len() >= MAX_PORTS {
                // Forget ports no connection uses; their streams end.
                ports.retain(|_, e| {
                    let used = Arc::strong_count(&e.users) > 1;
                    if !used && let Some(task) = &e.task {
                        task.abort();
                    }
                    used
                });
            }
            let entry = ports.entry(port).or_insert_with(|| {
                let (tx, rx) = watch::channel(None);
                let task = self.client.clone().map(|client| {
                    tokio::spawn(self.clone().watch(client, port, tx)).abort_handle()
                });
                Entry {
                    rx,
                    users: Arc::new(()),
                    task,
                }
            });
            (entry.rx.clone(), entry.users.clone())
        };
        if self.client.is_some() && rx.borrow().is_none() {
            let mut waiting = rx.clone();
            let answered = tokio::time::timeout(self.wait, waiting.wait_for(Option::is_some));
            if answered.await.is_err() {
                debug!(
                    port,
                    "no inbound policy from the controller yet: the default applies"
                );
            }
        }
        PortPolicy {
            rx,
            default: self.default_policy.clone(),
            _users: users,
        }
    }

    async fn watch(
        self: Arc<Self>,
        mut client: api::policy_client::PolicyClient<Channel>,
        port: u16,
        tx: watch::Sender<Option<Arc<Policy>>>,
    ) {
        let mut backoff = Backoff::new((port as u64) << 17);
        loop {
            let started = tokio::time::Instant::now();
            let req = api::InboundPolicyRequest {
                workload: format!("{}:{}", self.info.namespace, self.info.pod_name),
                port: port.into(),
                client: Some(self.info.to_api()),
                default_policy: self.default.as_str().to_string(),
            };
            let result = async {
                let mut stream = client.watch_inbound(req).await?.into_inner();
                while let Some(p) = stream.message().await? {
                    let policy = Arc::new(Policy::from_api(p));
                    if tx.borrow().as_ref() != Some(&policy) {
                        info!(port, policy = %policy.name, "inbound policy");
                    }
                    tx.send_replace(Some(policy));
                }
                Ok::<_, tonic::Status>(())
            }
            .await;
            if let Err(status) = result {
                warn!(port, %status, "inbound policy stream failed; the last policy stays in force");
            }
            if tx.is_closed() {
                return;
            }
            self.reconnects.inc();
            backoff.pause(started).await;
        }
    }
}
