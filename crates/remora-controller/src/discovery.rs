//! The single writer and the published answers. Events are applied to the index in
//! batches; every target some proxy watches has one `watch` channel, shared by all of
//! its streams, gets a new answer only when its answer changed, and is forgotten when
//! its last stream ends.

use std::{sync::Arc, time::Instant};

use parking_lot::RwLock;
use tokio::sync::{mpsc, watch};

use remora_api::v1 as api;

use crate::{
    core::{Event, Published, Shared, Target},
    inbound::{self, WorkloadKey},
    index::{Index, Touched},
    metrics::{Metrics, WatchEvent},
    watches::{Watched, Watches},
};

/// The most events applied before answers are recomputed: a burst is coalesced, and a
/// long one still publishes as it goes.
const MAX_BATCH: usize = 1024;

/// A Destination stream's view of its target.
pub type TargetWatch = Watched<Target, Shared>;
/// A `WatchOutbound` stream's view: the target and the client's namespace.
pub type OutboundWatch = Watched<(Target, String), Arc<api::OutboundPolicy>>;
/// A `WatchInboundWorkload` stream's view of its workload.
pub type InboundWatch = Watched<WorkloadKey, Arc<api::InboundWorkloadPolicy>>;

/// The namespace and ServiceAccount of a workload identity
/// (`spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`).
pub fn workload_of(identity: &str) -> Option<(&str, &str)> {
    let mut parts = identity.strip_prefix("spiffe://")?.split('/').skip(1);
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) if !ns.is_empty() && !sa.is_empty() => {
            Some((ns, sa))
        }
        _ => None,
    }
}

pub struct Discovery {
    index: RwLock<Index>,
    /// One channel per watched target. Lock order (for each set): the set, then `index`.
    subs: Arc<Watches<Target, Shared>>,
    /// One channel per watched workload (pod and the proxy's default).
    inbound: Arc<Watches<WorkloadKey, Arc<api::InboundWorkloadPolicy>>>,
    /// One channel per target whose outbound policy is watched, keyed by the target and
    /// the client's namespace (consumer routes differ by it).
    outbound: Arc<Watches<(Target, String), Arc<api::OutboundPolicy>>>,
    /// What `cluster-authenticated` trusts.
    cluster_networks: Vec<ipnet::IpNet>,
    /// True once the source has delivered its initial state.
    synced: watch::Sender<bool>,
    metrics: Metrics,
}

impl Discovery {
    pub fn new(index: Index, metrics: Metrics, cluster_networks: Vec<ipnet::IpNet>) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::new(index),
            subs: Watches::new(metrics.targets.clone()),
            inbound: Watches::new(metrics.policy_watches(crate::metrics::Direction::Inbound)),
            outbound: Watches::new(metrics.policy_watches(crate::metrics::Direction::Outbound)),
            cluster_networks,
            synced: watch::channel(false).0,
            metrics,
        })
    }

    /// The current outbound policy for `target` as a client in `client_ns` sees it, and
    /// every later one.
    pub fn subscribe_outbound(&self, target: Target, client_ns: String) -> OutboundWatch {
        self.outbound
            .subscribe((target, client_ns), |(target, ns)| {
                Arc::new(crate::outbound::outbound(&self.index.read(), target, ns))
            })
    }

    /// Whether the proxy proving `identity` may ask about `pod`'s inbound policy: the
    /// pod must be in the identity's namespace and, when known, run as its ServiceAccount.
    pub fn may_ask_about(&self, identity: &str, pod: &crate::core::NsName) -> Result<(), String> {
        let Some((ns, sa)) = workload_of(identity) else {
            return Err(format!("{identity} is not a workload identity"));
        };
        if ns != pod.namespace {
            return Err(format!(
                "{identity} may not ask about {pod}: another namespace"
            ));
        }
        match self.index.read().pod(pod) {
            Some(p) if p.service_account != sa => Err(format!(
                "{identity} may not ask about {pod}, which runs as {}",
                p.service_account
            )),
            _ => Ok(()),
        }
    }

    /// Resolves once the source has delivered its initial state: an inbound policy
    /// compiled before that could miss the AuthorizationPolicies that restrict a port.
    pub async fn synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// The current inbound policy of every port of `key`'s pod, and every later one.
    pub fn subscribe_inbound(&self, key: WorkloadKey) -> InboundWatch {
        self.inbound.subscribe(key, |key| {
            Arc::new(inbound::workload(
                &self.index.read(),
                key,
                &self.cluster_networks,
            ))
        })
    }

    /// A namespace's labels and annotations, for the injector.
    pub fn namespace(&self, name: &str) -> Option<remora_k8s::inject::Namespace> {
        self.index.read().namespace(name).cloned()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The current answer for `target`, and every later one.
    pub fn subscribe(&self, target: Target) -> TargetWatch {
        self.subs.subscribe(target, |target| {
            Arc::new(Published {
                resolution: self.index.read().resolve(target),
                since: None,
            })
        })
    }

    /// Applies events until the source ends; `on_synced` runs once the source has
    /// delivered its initial state.
    pub async fn run_writer(
        self: Arc<Self>,
        mut events: mpsc::Receiver<(Event, Instant)>,
        on_synced: impl FnOnce() + Send,
    ) {
        let mut on_synced = Some(on_synced);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while events.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let since = batch.iter().map(|(_, at)| *at).min();
            let mut touched = Touched::default();
            let mut synced = false;
            {
                let mut index = self.index.write();
                for (event, _) in batch.drain(..) {
                    match &event {
                        Event::Apply(o) => {
                            self.metrics.watch_event(o.key().kind, WatchEvent::Apply)
                        }
                        Event::Delete(k) => self.metrics.watch_event(k.kind, WatchEvent::Delete),
                        Event::Synced => synced = true,
                    }
                    index.apply(event, &mut touched);
                }
                self.metrics.set_objects(index.counts());
            }
            if !touched.is_empty() {
                self.publish(&touched, since);
            }
            if synced && let Some(f) = on_synced.take() {
                self.synced.send_replace(true);
                f();
            }
        }
    }

    fn publish(&self, touched: &Touched, since: Option<Instant>) {
        // Each set's lock is held while its answers are recomputed, so a stream that
        // subscribes meanwhile gets either the old answer and then the new one, or the new.
        self.outbound.each(|(target, client_ns), tx| {
            let index = self.index.read();
            if !index.affects(target, touched) {
                return;
            }
            let policy = crate::outbound::outbound(&index, target, client_ns);
            send_if_changed(tx, policy);
        });
        if !touched.policy_namespaces.is_empty() {
            self.inbound.each(|key, tx| {
                if !touched.policy_namespaces.contains(&key.pod.namespace) {
                    return;
                }
                let index = self.index.read();
                send_if_changed(tx, inbound::workload(&index, key, &self.cluster_networks));
            });
        }
        self.subs.each(|target, tx| {
            let index = self.index.read();
            if !index.affects(target, touched) {
                return;
            }
            let resolution = index.resolve(target);
            tx.send_if_modified(|current| {
                if current.resolution == resolution {
                    return false;
                }
                *current = Arc::new(Published { resolution, since });
                true
            });
        });
    }
}

/// Publishes `value` when it differs from the current answer.
fn send_if_changed<T: PartialEq>(tx: &watch::Sender<Arc<T>>, value: T) {
    tx.send_if_modified(|current| {
        if **current == value {
            return false;
        }
        *current = Arc::new(value);
        true
    });
}
