//! The single writer and the published answers. Events are applied to the index in
//! batches; every target some proxy watches has one `watch` channel, shared by all of
//! its streams, and gets a new answer only when its answer changed.

use std::{collections::HashMap, sync::Arc, time::Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch};

use remora_api::v1 as api;

use crate::{
    core::{Event, Published, Shared, Target},
    index::{Index, Touched},
    metrics::Metrics,
    policy::{self, InboundKey, InboundRx},
};

/// The most events applied before answers are recomputed: a burst is coalesced, and a
/// long one still publishes as it goes.
const MAX_BATCH: usize = 1024;

type OutboundTx = watch::Sender<Arc<api::OutboundPolicy>>;

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
    /// One channel per watched target. Lock order: `subs`, then `index`.
    subs: Mutex<HashMap<Target, watch::Sender<Shared>>>,
    /// One channel per watched inbound port. Lock order: `inbound`, then `index`.
    inbound: Mutex<HashMap<InboundKey, watch::Sender<Arc<api::InboundPolicy>>>>,
    /// One channel per target whose outbound policy is watched. Lock order: `outbound`,
    /// then `index`.
    /// Keyed by the target and the client's namespace (consumer routes differ by it).
    outbound: Mutex<HashMap<(Target, String), OutboundTx>>,
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
            subs: Mutex::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
            outbound: Mutex::new(HashMap::new()),
            cluster_networks,
            synced: watch::channel(false).0,
            metrics,
        })
    }

    /// The current outbound policy for `target` as a client in `client_ns` sees it, and
    /// every later one.
    pub fn subscribe_outbound(
        &self,
        target: Target,
        client_ns: String,
    ) -> watch::Receiver<Arc<api::OutboundPolicy>> {
        let mut subs = self.outbound.lock();
        let key = (target, client_ns);
        if let Some(tx) = subs.get(&key) {
            return tx.subscribe();
        }
        let policy = crate::outbound::outbound(&self.index.read(), &key.0, &key.1);
        let (tx, rx) = watch::channel(Arc::new(policy));
        subs.insert(key, tx);
        rx
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

    /// The current inbound policy for `key`, and every later one.
    pub fn subscribe_inbound(&self, key: InboundKey) -> InboundRx {
        let mut subs = self.inbound.lock();
        if let Some(tx) = subs.get(&key) {
            return tx.subscribe();
        }
        let policy = policy::inbound(&self.index.read(), &key, &self.cluster_networks);
        let (tx, rx) = watch::channel(Arc::new(policy));
        subs.insert(key, tx);
        rx
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The current answer for `target`, and every later one.
    pub fn subscribe(&self, target: Target) -> watch::Receiver<Shared> {
        let mut subs = self.subs.lock();
        if let Some(tx) = subs.get(&target) {
            return tx.subscribe();
        }
        let resolution = self.index.read().resolve(&target);
        let (tx, rx) = watch::channel(Arc::new(Published {
            resolution,
            since: None,
        }));
        subs.insert(target, tx);
        rx
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
                    synced |= event == Event::Synced;
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
        {
            let mut outbound = self.outbound.lock();
            outbound.retain(|_, tx| tx.receiver_count() > 0);
            let index = self.index.read();
            for ((target, client_ns), tx) in outbound.iter() {
                if !index.affects(target, touched) {
                    continue;
                }
                let policy = crate::outbound::outbound(&index, target, client_ns);
                tx.send_if_modified(|current| {
                    if **current == policy {
                        return false;
                    }
                    *current = Arc::new(policy);
                    true
                });
            }
        }
        if !touched.policy_namespaces.is_empty() {
            let mut inbound = self.inbound.lock();
            inbound.retain(|_, tx| tx.receiver_count() > 0);
            let index = self.index.read();
            for (key, tx) in inbound.iter() {
                if !touched.policy_namespaces.contains(&key.pod.namespace) {
                    continue;
                }
                let policy = policy::inbound(&index, key, &self.cluster_networks);
                tx.send_if_modified(|current| {
                    if **current == policy {
                        return false;
                    }
                    *current = Arc::new(policy);
                    true
                });
            }
        }
        let mut subs = self.subs.lock();
        // Targets nobody watches any more are forgotten.
        subs.retain(|_, tx| tx.receiver_count() > 0);
        let index = self.index.read();
        for (target, tx) in subs.iter() {
            if !index.affects(target, touched) {
                continue;
            }
            let resolution = index.resolve(target);
            tx.send_if_modified(|current| {
                if current.resolution == resolution {
                    return false;
                }
                *current = Arc::new(Published { resolution, since });
                true
            });
        }
        self.metrics.set_targets(subs.len());
    }
}
