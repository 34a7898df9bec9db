//! One owner per destination in use: a Service (by ClusterIP, or by name as a route's
//! backend), a meshed pod, or an address passed through. It holds the destination's
//! discovery view, its outbound policy (TrafficPolicy and routes), its balancer with
//! the endpoints' pools, and its retry budget; every connection to the destination
//! shares it, so the balancer sees all of the pod's traffic. A route names its backends;
//! they are looked up here per request, never held by the route.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{sync::watch, task::AbortHandle, time::Instant};
use tracing::{debug, warn};

use super::{
    Balancer,
    discovery::{Discovery, Endpoint, Key, View},
    policy::ServicePolicy,
    resilience::RetryBudget,
};
use crate::{
    addr::OrigDst,
    connect::{Connector, DialLimits},
    http::pool::EndpointClients,
};

/// A destination: its view, policy, balancer and budget.
#[derive(Debug)]
pub struct Destination {
    pub views: watch::Receiver<View>,
    pub balancer: Arc<Balancer>,
    /// None until the controller has answered.
    pub policy: watch::Receiver<Option<Arc<ServicePolicy>>>,
    pub budget: RetryBudget,
}

impl Destination {
    /// The outbound policy, waiting up to `wait` for the controller's first answer (so
    /// a Service's first requests get its timeouts and retries); the default without one.
    pub async fn policy(&self, wait: Duration) -> Arc<ServicePolicy> {
        if let Some(p) = self.policy.borrow().clone() {
            return p;
        }
        // Only a Service has an outbound policy (a bare pod's address has none).
        if !matches!(*self.views.borrow(), View::Service { .. }) {
            return Arc::new(ServicePolicy::default());
        }
        let mut rx = self.policy.clone();
        match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(p)) => p.clone().unwrap_or_default(),
            _ => Arc::new(ServicePolicy::default()),
        }
    }

    /// The current endpoints, waiting up to `wait` for some to appear.
    pub async fn endpoints(&self, wait: Duration) -> Option<Arc<[Endpoint]>> {
        let mut views = self.views.clone();
        let deadline = Instant::now() + wait;
        loop {
            if let View::Service { endpoints, .. } | View::Pod { endpoints } =
                &*views.borrow_and_update()
                && !endpoints.is_empty()
            {
                return Some(endpoints.clone());
            }
            tokio::time::timeout_at(deadline, views.changed())
                .await
                .ok()?
                .ok()?;
        }
    }
}

/// A balancer whose endpoints' pools dial with `limits` (the destination's policy's).
fn balancer(connector: &Connector, limits: &Arc<DialLimits>) -> Arc<Balancer> {
    let mut connector = connector.clone();
    connector.limits = Some(limits.clone());
    Arc::new(Balancer::new(move |e: &Endpoint| {
        EndpointClients::new(e.addr, e.identity.clone(), connector.clone())
    }))
}

struct Entry {
    destination: Arc<Destination>,
    last_used: Instant,
    tasks: [AbortHandle; 2],
}

/// Destinations watched at most: each costs a stream here and in the controller, and
/// an app may connect to any number of addresses (a crawler, say).
pub const MAX_DESTINATIONS: usize = 4096;
/// How long a destination the controller does not know (passthrough) is kept unused:
/// such addresses are many and rarely come back.
pub const PASSTHROUGH_IDLE: Duration = Duration::from_secs(30);

/// Every destination in use, each watched through discovery.
pub struct Destinations {
    discovery: Arc<Discovery>,
    connector: Connector,
    by_key: Mutex<HashMap<Key, Entry>>,
}

impl std::fmt::Debug for Destinations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destinations")
            .field("in_use", &self.by_key.lock().len())
            .finish()
    }
}

impl Destinations {
    /// Destinations discovered through `discovery`, their endpoints dialled by
    /// `connector` (under each one's own policy limits).
    pub fn new(discovery: Arc<Discovery>, connector: Connector) -> Arc<Self> {
        Arc::new(Self {
            discovery,
            connector,
            by_key: Mutex::new(HashMap::new()),
        })
    }

    /// The shared destination for a connection's original destination, watched from
    /// its first use.
    pub fn get(&self, dst: OrigDst) -> Arc<Destination> {
        self.lookup(Key::Addr(dst))
    }

    /// The shared destination for a backend Service an HTTP route names. Its own routes
    /// do not apply again (a route's backend is that Service's endpoints); its
    /// TrafficPolicy's balancing, circuit breaking and connect timeout do.
    pub fn backend(&self, name: &Arc<str>) -> Arc<Destination> {
        self.lookup(Key::Name(name.clone()))
    }

    fn lookup(&self, key: Key) -> Arc<Destination> {
        let mut by_key = self.by_key.lock();
        let now = Instant::now();
        if let Some(e) = by_key.get_mut(&key) {
            e.last_used = now;
            return e.destination.clone();
        }
        if by_key.len() >= MAX_DESTINATIONS {
            make_room(&mut by_key);
        }
        let limits = Arc::new(DialLimits::default());
        if by_key.len() >= MAX_DESTINATIONS {
            // Every destination is in use: this one is not asked about (it costs a stream
            // here and in the controller) and goes as it came.
            warn!(%key, max = MAX_DESTINATIONS, "too many destinations in use: passing this one through");
            let (_, views) = watch::channel(View::Passthrough);
            let (_, policy) = watch::channel(Some(Arc::new(ServicePolicy::default())));
            return Arc::new(Destination {
                views,
                balancer: balancer(&self.connector, &limits),
                policy,
                budget: RetryBudget::default(),
            });
        }
        let (views, views_task) = self.discovery.views(key.clone());
        let dial = limits.clone();
        let (policy, policy_task) =
            self.discovery
                .policy(key.clone(), views.clone(), move |p: &ServicePolicy| {
                    dial.set(p.connect_timeout, p.idle_timeout)
                });
        let destination = Arc::new(Destination {
            views,
            balancer: balancer(&self.connector, &limits),
            policy,
            budget: RetryBudget::default(),
        });
        by_key.insert(
            key,
            Entry {
                destination: destination.clone(),
                last_used: now,
                tasks: [views_task, policy_task],
            },
        );
        destination
    }

    /// Every destination in use, as `/debug/targets` shows it: what discovery says it
    /// is, the policy in force and its routes, each endpoint's state as the balancer sees
    /// it, and what is left of the retry budget.
    pub fn debug(&self) -> serde_json::Value {
        let by_key = self.by_key.lock();
        let mut targets: Vec<(String, serde_json::Value)> = by_key
            .iter()
            .map(|(key, e)| {
                let d = &e.destination;
                let (kind, service) = match &*d.views.borrow() {
                    View::Pending => ("pending", None),
                    View::Passthrough => ("passthrough", None),
                    View::Service { name, .. } => ("service", Some(name.to_string())),
                    View::Pod { .. } => ("pod", None),
                };
                let policy = d.policy.borrow().clone();
                let budget = policy.as_ref().and_then(|p| p.retry.as_ref()).map(|r| {
                    let (requests, retries, left) = d.budget.debug(r);
                    serde_json::json!({"requests": requests, "retries": retries, "left": left})
                });
                let value = serde_json::json!({
                    "key": key.to_string(),
                    "kind": kind,
                    "service": service,
                    "policy": policy.as_ref().map(|p| p.name.to_string()),
                    "policy_revision": policy.as_ref().map(|p| p.revision.to_string()),
                    "routes": policy.as_ref().map(|p| p.routes.debug()).unwrap_or_default(),
                    "endpoints": d.balancer.debug(|c| {
                        serde_json::json!({"connections": c.open_connections()})
                    }),
                    "retry_budget": budget,
                    "idle_seconds": e.last_used.elapsed().as_secs(),
                });
                (key.to_string(), value)
            })
            .collect();
        targets.sort_by(|a, b| a.0.cmp(&b.0));
        serde_json::Value::Array(targets.into_iter().map(|(_, v)| v).collect())
    }

    /// Each Service in use, with its balancer's census. A Service reached both by its
    /// ClusterIP and as a route's backend has two balancers over the same endpoints:
    /// the ClusterIP's counts, so the endpoints are not counted twice.
    pub fn census(&self) -> Vec<(String, [usize; 3])> {
        let by_key = self.by_key.lock();
        let mut out: BTreeMap<String, (bool, [usize; 3])> = BTreeMap::new();
        for (key, e) in by_key.iter() {
            if let View::Service { name, .. } = &*e.destination.views.borrow() {
                let by_addr = matches!(key, Key::Addr(_));
                let entry = out.entry(name.to_string()).or_insert((false, [0; 3]));
                if by_addr || !entry.0 {
                    *entry = (by_addr, e.destination.balancer.census());
                }
            }
        }
        out.into_iter().map(|(name, (_, c))| (name, c)).collect()
    }

    /// Forgets destinations unused for `idle` (their streams end), and those the
    /// controller does not know unused for [`PASSTHROUGH_IDLE`]. Returns how many remain.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let mut by_key = self.by_key.lock();
        by_key.retain(|key, e| {
            let idle = match &*e.destination.views.borrow() {
                View::Passthrough => idle.min(PASSTHROUGH_IDLE),
                _ => idle,
            };
            // In use by a connection right now, or recently: keep.
            let keep = Arc::strong_count(&e.destination) > 1 || e.last_used.elapsed() < idle;
            if !keep {
                debug!(%key, "forgetting an idle destination");
                e.tasks.iter().for_each(AbortHandle::abort);
            }
            keep
        });
        by_key.len()
    }
}

/// Frees a tenth of the destinations, those no connection uses, least recently used
/// first and passthrough ones before the rest.
fn make_room(by_key: &mut HashMap<Key, Entry>) {
    let mut unused: Vec<(bool, Instant, Key)> = by_key
        .iter()
        .filter(|(_, e)| Arc::strong_count(&e.destination) == 1)
        .map(|(key, e)| {
            let known = !matches!(&*e.destination.views.borrow(), View::Passthrough);
            (known, e.last_used, key.clone())
        })
        .collect();
    unused.sort_by_key(|(known, used, _)| (*known, *used));
    for (_, _, key) in unused.into_iter().take(MAX_DESTINATIONS / 10) {
        if let Some(e) = by_key.remove(&key) {
            debug!(%key, "forgetting a destination to make room");
            e.tasks.iter().for_each(AbortHandle::abort);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use prometheus_client::metrics::counter::Counter;

    use super::*;
    use crate::{control::ClientInfo, reconnect::Reconnected};

    /// Issue 12: each distinct passthrough destination cost a stream here and in the
    /// controller for five minutes, with no bound.
    #[tokio::test]
    async fn destinations_are_bounded_and_unknown_ones_forgotten_sooner() {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let discovery = Discovery::new(
            channel,
            ClientInfo::default(),
            Counter::default(),
            Reconnected::default(),
        );
        let d = Destinations::new(discovery, Connector::plain(Duration::from_secs(1)));
        let addr = |i: usize| {
            OrigDst(SocketAddr::from((
                [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                80,
            )))
        };
        // Many destinations, each used once and let go: the oldest make room.
        for i in 0..MAX_DESTINATIONS + 500 {
            drop(d.get(addr(i)));
        }
        assert!(d.by_key.lock().len() <= MAX_DESTINATIONS);
        // All in use: one more is not watched, and goes as it came.
        let held: Vec<Arc<Destination>> = (0..MAX_DESTINATIONS).map(|i| d.get(addr(i))).collect();
        let extra = d.get(addr(MAX_DESTINATIONS + 1000));
        assert_eq!(*extra.views.borrow(), View::Passthrough);
        assert_eq!(d.by_key.lock().len(), MAX_DESTINATIONS);
        drop((held, extra));
        // The controller never answers: each destination goes through as it came, and
        // one unused for 30 s is forgotten (a known one stays for `idle`).
        let mut views = d.get(addr(0)).views.clone();
        let passthrough = views.wait_for(|v| *v == View::Passthrough);
        tokio::time::timeout(Duration::from_secs(10), passthrough)
            .await
            .expect("passthrough once the controller is found unreachable")
            .unwrap();
        tokio::time::pause();
        tokio::time::advance(PASSTHROUGH_IDLE + Duration::from_secs(1)).await;
        let left = d.evict_idle(Duration::from_secs(300));
        assert!(left < MAX_DESTINATIONS, "{left} left");
        assert!(!d.by_key.lock().contains_key(&Key::Addr(addr(0))));
    }
}
