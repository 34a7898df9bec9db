//! The proxy's discovery client: one `Destination.Get` stream per original destination
//! in use (and per backend Service an HTTP route names), shared by every connection to
//! it, reconnected with jittered backoff, and forgotten when idle. While the controller
//! is unreachable the last known endpoints stay in use, so traffic keeps flowing.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use remora_api::v1 as api;
use tokio::{sync::watch, task::AbortHandle, time::Instant};
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::{
    addr::OrigDst,
    balance::Balancer,
    connect::Connector,
    policy::{RetryBudget, RoutePolicy},
    tls::PeerId,
};

/// One endpoint as the proxy uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The identity its proxy proves: set when the endpoint is meshed, and then traffic
    /// to it is mTLS.
    pub identity: Option<PeerId>,
    pub ready: bool,
}

/// What is known about one original destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// No answer yet.
    Pending,
    /// The controller does not know it: forward as-is.
    Passthrough,
    /// A Service port.
    Service {
        /// `name.namespace:port`, the `target` metric label.
        name: Arc<str>,
        headless: bool,
        endpoints: Arc<[Endpoint]>,
    },
    /// A bare pod (a pod IP, as headless Services give): forwarded to the address
    /// asked for, over mTLS when the pod is meshed.
    Pod { endpoints: Arc<[Endpoint]> },
}

/// A destination's stream of views, and what every connection to it shares: the
/// balancer, the outbound policy (for a Service) and its retry budget.
#[derive(Debug)]
pub struct Target {
    pub views: watch::Receiver<View>,
    pub balancer: Arc<Balancer>,
    /// None until the controller has answered.
    pub policy: watch::Receiver<Option<Arc<RoutePolicy>>>,
    pub budget: RetryBudget,
}

impl Target {
    /// The outbound policy, waiting up to `wait` for the controller's first answer (so
    /// a Service's first requests get its timeouts and retries); the default without one.
    pub async fn policy(&self, wait: Duration) -> Arc<RoutePolicy> {
        if let Some(p) = self.policy.borrow().clone() {
            return p;
        }
        // Only a Service has an outbound policy (a bare pod's address has none).
        if !matches!(*self.views.borrow(), View::Service { .. }) {
            return Arc::new(RoutePolicy::default());
        }
        let mut rx = self.policy.clone();
        match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(p)) => p.clone().unwrap_or_default(),
            _ => Arc::new(RoutePolicy::default()),
        }
    }
}

/// What a target is looked up by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Dst {
    /// A connection's original destination.
    Addr(OrigDst),
    /// A backend Service an HTTP route names (`name.namespace.svc.domain:port`).
    Name(Arc<str>),
}

impl std::fmt::Display for Dst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dst::Addr(a) => a.fmt(f),
            Dst::Name(n) => n.fmt(f),
        }
    }
}

struct Entry {
    target: Arc<Target>,
    last_used: Instant,
    tasks: [AbortHandle; 2],
}

/// Destinations watched at most: each costs a stream here and in the controller, and
/// an app may connect to any number of addresses (a crawler, say).
pub const MAX_DESTINATIONS: usize = 4096;
/// How long a destination the controller does not know (passthrough) is kept unused:
/// such addresses are many and rarely come back.
pub const PASSTHROUGH_IDLE: Duration = Duration::from_secs(30);

/// Frees a tenth of the destinations, those no connection uses, least recently used
/// first and passthrough ones before the rest.
fn make_room(targets: &mut HashMap<Dst, Entry>) {
    let mut unused: Vec<(bool, Instant, Dst)> = targets
        .iter()
        .filter(|(_, e)| Arc::strong_count(&e.target) == 1)
        .map(|(dst, e)| {
            let known = !matches!(&*e.target.views.borrow(), View::Passthrough);
            (known, e.last_used, dst.clone())
        })
        .collect();
    unused.sort_by_key(|(known, used, _)| (*known, *used));
    for (_, _, dst) in unused.into_iter().take(MAX_DESTINATIONS / 10) {
        if let Some(e) = targets.remove(&dst) {
            debug!(%dst, "forgetting a destination to make room");
            e.tasks.iter().for_each(AbortHandle::abort);
        }
    }
}

/// Who is asking, sent with every request.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub namespace: String,
    pub pod_name: String,
    pub pod_ip: String,
}

impl ClientInfo {
    /// As every request to the controller carries it.
    pub fn to_api(&self) -> api::ClientInfo {
        api::ClientInfo {
            namespace: self.namespace.clone(),
            pod_name: self.pod_name.clone(),
            pod_ip: self.pod_ip.clone(),
            zone: String::new(),
            proxy_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

pub use crate::reconnect::{Backoff, Reconnected};

pub struct Discovery {
    client: api::destination_client::DestinationClient<Channel>,
    channel: Channel,
    info: ClientInfo,
    targets: Mutex<HashMap<Dst, Entry>>,
    reconnects: Counter,
    reconnected: Reconnected,
    connector: Connector,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("targets", &self.targets.lock().len())
            .finish()
    }
}

impl Discovery {
    /// A client over `channel` to the controller.
    pub fn new(
        channel: Channel,
        info: ClientInfo,
        reconnects: Counter,
        reconnected: Reconnected,
        connector: Connector,
    ) -> Arc<Self> {
        Arc::new(Self {
            client: api::destination_client::DestinationClient::new(channel.clone()),
            channel,
            info,
            targets: Mutex::new(HashMap::new()),
            reconnects,
            reconnected,
            connector,
        })
    }

    /// The shared target for `dst`, starting its stream on first use.
    pub fn target(self: &Arc<Self>, dst: OrigDst) -> Arc<Target> {
        self.lookup(Dst::Addr(dst))
    }

    /// The shared target for a backend Service an HTTP route names. Its own routes do
    /// not apply again (a route's backend is that Service's endpoints); its
    /// TrafficPolicy's balancing, circuit breaking and connect timeout do.
    pub fn backend(self: &Arc<Self>, name: &str) -> Arc<Target> {
        self.lookup(Dst::Name(Arc::from(name)))
    }

    fn lookup(self: &Arc<Self>, dst: Dst) -> Arc<Target> {
        let mut targets = self.targets.lock();
        let now = Instant::now();
        if let Some(e) = targets.get_mut(&dst) {
            e.last_used = now;
            return e.target.clone();
        }
        if targets.len() >= MAX_DESTINATIONS {
            make_room(&mut targets);
        }
        if targets.len() >= MAX_DESTINATIONS {
            // Every destination is in use: this one is not asked about (it costs a stream
            // here and in the controller) and goes as it came.
            warn!(%dst, max = MAX_DESTINATIONS, "too many destinations in use: passing this one through");
            let (_, views) = watch::channel(View::Passthrough);
            let (_, policy) = watch::channel(Some(Arc::new(RoutePolicy::default())));
            return Arc::new(Target {
                views,
                balancer: Arc::new(Balancer::new(self.connector.clone())),
                policy,
                budget: RetryBudget::default(),
            });
        }
        let (tx, rx) = watch::channel(View::Pending);
        let (policy_tx, policy) = watch::channel(None);
        let target = Arc::new(Target {
            views: rx.clone(),
            balancer: Arc::new(Balancer::new(self.connector.clone())),
            policy,
            budget: RetryBudget::default(),
        });
        let task = tokio::spawn(self.clone().watch(dst.clone(), tx)).abort_handle();
        let policy_task = tokio::spawn(self.clone().watch_policy(
            dst.clone(),
            rx,
            policy_tx,
            target.balancer.clone(),
        ))
        .abort_handle();
        targets.insert(
            dst,
            Entry {
                target: target.clone(),
                last_used: now,
                tasks: [task, policy_task],
            },
        );
        target
    }

    /// Each Service in use, with its balancer's census. A Service reached both by its
    /// ClusterIP and as a route's backend has two balancers over the same endpoints:
    /// the ClusterIP's counts, so the endpoints are not counted twice.
    pub fn census(&self) -> Vec<(String, [usize; 3])> {
        let targets = self.targets.lock();
        let mut out: BTreeMap<String, (bool, [usize; 3])> = BTreeMap::new();
        for (dst, e) in targets.iter() {
            if let View::Service { name, .. } = &*e.target.views.borrow() {
                let by_addr = matches!(dst, Dst::Addr(_));
                let entry = out.entry(name.to_string()).or_insert((false, [0; 3]));
                if by_addr || !entry.0 {
                    *entry = (by_addr, e.target.balancer.census());
                }
            }
        }
        out.into_iter().map(|(name, (_, c))| (name, c)).collect()
    }

    /// Forgets targets unused for `idle` (their streams end), and destinations the
    /// controller does not know unused for [`PASSTHROUGH_IDLE`]. Returns how many remain.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let mut targets = self.targets.lock();
        targets.retain(|dst, e| {
            let idle = match &*e.target.views.borrow() {
                View::Passthrough => idle.min(PASSTHROUGH_IDLE),
                _ => idle,
            };
            // In use by a connection right now, or recently: keep.
            let keep = Arc::strong_count(&e.target) > 1 || e.last_used.elapsed() < idle;
            if !keep {
                debug!(%dst, "forgetting an idle destination");
                e.tasks.iter().for_each(AbortHandle::abort);
            }
            keep
        });
        targets.len()
    }

    /// Keeps `tx` up to date for `dst` for as long as the target is in use.
    async fn watch(self: Arc<Self>, dst: Dst, tx: watch::Sender<View>) {
        let mut backoff = self.reconnected.backoff(crate::rng::random());
        loop {
            let started = Instant::now();
            match self.stream(&dst, &tx, &mut backoff).await {
                Ok(()) => debug!(%dst, "destination stream ended"),
                Err(status) => debug!(%dst, %status, "destination stream failed"),
            }
            self.reconnects.inc();
            // A route's backend has no original destination to pass through to: it stays
            // pending, and its requests find no endpoints.
            if *tx.borrow() == View::Pending && matches!(dst, Dst::Addr(_)) {
                // Never answered: connections waiting on it pass through rather than stall.
                tx.send_replace(View::Passthrough);
                warn!(%dst, "controller unreachable: passing this destination through until it answers");
            }
            backoff.pause(started).await;
        }
    }

    /// Keeps the outbound policy of a Service destination up to date: nothing is asked
    /// until discovery says the destination is a Service; the last policy stays in force
    /// while the controller is away.
    async fn watch_policy(
        self: Arc<Self>,
        dst: Dst,
        mut views: watch::Receiver<View>,
        tx: watch::Sender<Option<Arc<RoutePolicy>>>,
        balancer: Arc<Balancer>,
    ) {
        if views
            .wait_for(|v| matches!(v, View::Service { .. }))
            .await
            .is_err()
        {
            return;
        }
        let mut client = api::policy_client::PolicyClient::new(self.channel.clone());
        let mut backoff = self.reconnected.backoff(crate::rng::random());
        loop {
            let started = Instant::now();
            let req = api::OutboundPolicyRequest {
                target: dst.to_string(),
                client: Some(self.info.to_api()),
            };
            let result = async {
                let mut stream = client.watch_outbound(req).await?.into_inner();
                while let Some(p) = stream.message().await? {
                    backoff.answered();
                    let policy = Arc::new(self.resolve(&dst, &p));
                    if tx.borrow().as_deref() != Some(&*policy) {
                        info!(%dst, policy = %policy.name, "outbound policy");
                    }
                    balancer.set_limits(policy.connect_timeout, policy.idle_timeout);
                    tx.send_replace(Some(policy));
                }
                Ok::<_, tonic::Status>(())
            }
            .await;
            if let Err(status) = result {
                debug!(%dst, %status, "outbound policy stream failed; the last policy stays");
            }
            // Never answered: requests stop waiting for a policy and use the default.
            if tx.borrow().is_none() {
                tx.send_replace(Some(Arc::new(RoutePolicy::default())));
            }
            backoff.pause(started).await;
        }
    }

    /// The controller's policy for `dst`, with its routes' backends resolved (a
    /// backend's own routes are dropped: routes apply once).
    fn resolve(self: &Arc<Self>, dst: &Dst, p: &api::OutboundPolicy) -> RoutePolicy {
        let mut policy = RoutePolicy::from_api(p);
        match dst {
            Dst::Name(_) => policy.routes = Arc::default(),
            Dst::Addr(_) => {
                if let Some(routes) = Arc::get_mut(&mut policy.routes) {
                    for b in routes.backends_mut().filter(|b| !b.name.is_empty()) {
                        b.target = Some(self.backend(&b.name));
                    }
                }
            }
        }
        policy
    }

    async fn stream(
        &self,
        dst: &Dst,
        tx: &watch::Sender<View>,
        backoff: &mut Backoff,
    ) -> Result<(), tonic::Status> {
        let req = api::GetDestination {
            target: dst.to_string(),
            client: Some(self.info.to_api()),
        };
        let mut stream = self.client.clone().get(req).await?.into_inner();
        let mut state = State::default();
        while let Some(update) = stream.message().await? {
            backoff.answered();
            if let Some(view) = state.apply(update) {
                tx.send_if_modified(|v| {
                    let changed = *v != view;
                    *v = view;
                    changed
                });
            }
        }
        info!(%dst, "controller closed the destination stream");
        Ok(())
    }
}

/// The endpoints of one stream, rebuilt from snapshot and deltas.
#[derive(Default)]
struct State {
    info: Option<api::TargetInfo>,
    endpoints: BTreeMap<SocketAddr, Endpoint>,
    exists: Option<bool>,
}

impl State {
    /// Applies an update; the new view, or None if the update was malformed.
    fn apply(&mut self, u: api::Update) -> Option<View> {
        if u.reset {
            self.endpoints.clear();
        }
        if let Some(info) = u.target {
            self.info = Some(info);
        }
        match u.kind? {
            api::update::Kind::Add(add) => {
                self.exists = Some(true);
                for e in add.endpoints {
                    let Some(addr) = e.address.as_ref().and_then(socket_addr) else {
                        continue;
                    };
                    let identity = e
                        .identity
                        .filter(|i| !i.spiffe_id.is_empty() && !i.server_name.is_empty())
                        .map(|i| PeerId {
                            spiffe_id: Arc::from(i.spiffe_id),
                            server_name: Arc::from(i.server_name),
                        });
                    self.endpoints.insert(
                        addr,
                        Endpoint {
                            addr,
                            identity,
                            ready: e.ready,
                        },
                    );
                }
            }
            api::update::Kind::Remove(rm) => {
                for a in rm.addresses.iter().filter_map(socket_addr) {
                    self.endpoints.remove(&a);
                }
            }
            api::update::Kind::NoEndpoints(n) => {
                self.endpoints.clear();
                self.exists = Some(n.exists);
            }
        }
        Some(self.view())
    }

    fn view(&self) -> View {
        let endpoints = || self.endpoints.values().cloned().collect::<Vec<_>>().into();
        let Some(info) = &self.info else {
            return if self.exists == Some(true) {
                View::Pod {
                    endpoints: endpoints(),
                }
            } else {
                View::Passthrough
            };
        };
        if info.service.is_empty() {
            return View::Pod {
                endpoints: endpoints(),
            };
        }
        View::Service {
            name: Arc::from(info.service.as_str()),
            headless: info.headless,
            endpoints: endpoints(),
        }
    }
}

fn socket_addr(a: &api::SocketAddress) -> Option<SocketAddr> {
    let ip: IpAddr = match a.ip.len() {
        4 => <[u8; 4]>::try_from(a.ip.as_slice()).ok()?.into(),
        16 => <[u8; 16]>::try_from(a.ip.as_slice()).ok()?.into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16::try_from(a.port).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12: each distinct passthrough destination cost a stream here and in the
    /// controller for five minutes, with no bound.
    #[tokio::test]
    async fn destinations_are_bounded_and_unknown_ones_forgotten_sooner() {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let d = Discovery::new(
            channel,
            ClientInfo::default(),
            Counter::default(),
            Reconnected::default(),
            Connector::plain(Duration::from_secs(1)),
        );
        let addr = |i: usize| {
            OrigDst(SocketAddr::from((
                [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                80,
            )))
        };
        // Many destinations, each used once and let go: the oldest make room.
        for i in 0..MAX_DESTINATIONS + 500 {
            drop(d.target(addr(i)));
        }
        assert!(d.targets.lock().len() <= MAX_DESTINATIONS);
        // All in use: one more is not watched, and goes as it came.
        let held: Vec<Arc<Target>> = (0..MAX_DESTINATIONS).map(|i| d.target(addr(i))).collect();
        let extra = d.target(addr(MAX_DESTINATIONS + 1000));
        assert_eq!(*extra.views.borrow(), View::Passthrough);
        assert_eq!(d.targets.lock().len(), MAX_DESTINATIONS);
        drop((held, extra));
        // The controller never answers: each destination goes through as it came, and
        // one unused for 30 s is forgotten (a known one stays for `idle`).
        let mut views = d.target(addr(0)).views.clone();
        let passthrough = views.wait_for(|v| *v == View::Passthrough);
        tokio::time::timeout(Duration::from_secs(10), passthrough)
            .await
            .expect("passthrough once the controller is found unreachable")
            .unwrap();
        tokio::time::pause();
        tokio::time::advance(PASSTHROUGH_IDLE + Duration::from_secs(1)).await;
        let left = d.evict_idle(Duration::from_secs(300));
        assert!(left < MAX_DESTINATIONS, "{left} left");
        assert!(!d.targets.lock().contains_key(&Dst::Addr(addr(0))));
    }

    fn ep(ip: [u8; 4], port: u32, ready: bool) -> api::Endpoint {
        api::Endpoint {
            address: Some(api::SocketAddress {
                ip: ip.to_vec(),
                port,
            }),
            weight: 10_000,
            ready,
            ..Default::default()
        }
    }

    fn info(service: &str) -> Option<api::TargetInfo> {
        Some(api::TargetInfo {
            service: service.into(),
            protocol: 0,
            headless: false,
        })
    }

    fn addrs(v: &View) -> Vec<String> {
        match v {
            View::Service { endpoints, .. } => {
                endpoints.iter().map(|e| e.addr.to_string()).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn snapshot_then_deltas() {
        let mut s = State::default();
        let add = |eps| Some(api::update::Kind::Add(api::AddEndpoints { endpoints: eps }));
        let v = s
            .apply(api::Update {
                kind: add(vec![
                    ep([10, 0, 0, 1], 80, true),
                    ep([10, 0, 0, 2], 80, true),
                ]),
                reset: true,
                target: info("web.shop:80"),
            })
            .unwrap();
        assert_eq!(addrs(&v), ["10.0.0.1:80", "10.0.0.2:80"]);
        let rm = api::RemoveEndpoints {
            addresses: vec![api::SocketAddress {
                ip: vec![10, 0, 0, 1],
                port: 80,
            }],
        };
        let v = s
            .apply(api::Update {
                kind: Some(api::update::Kind::Remove(rm)),
                reset: false,
                target: None,
            })
            .unwrap();
        assert_eq!(addrs(&v), ["10.0.0.2:80"]);
        let v = s
            .apply(api::Update {
                kind: add(vec![ep([10, 0, 0, 3], 80, false)]),
                reset: false,
                target: None,
            })
            .unwrap();
        assert_eq!(addrs(&v), ["10.0.0.2:80", "10.0.0.3:80"]);
        // A new snapshot replaces everything.
        let v = s
            .apply(api::Update {
                kind: add(vec![ep([10, 0, 0, 9], 80, true)]),
                reset: true,
                target: info("web.shop:80"),
            })
            .unwrap();
        assert_eq!(addrs(&v), ["10.0.0.9:80"]);
        let none = api::update::Kind::NoEndpoints(api::NoEndpoints { exists: true });
        let v = s
            .apply(api::Update {
                kind: Some(none),
                reset: true,
                target: info("web.shop:80"),
            })
            .unwrap();
        assert!(addrs(&v).is_empty());
    }

    #[test]
    fn unknown_and_pod_targets() {
        let mut s = State::default();
        let unknown = api::update::Kind::NoEndpoints(api::NoEndpoints { exists: false });
        assert_eq!(
            s.apply(api::Update {
                kind: Some(unknown),
                reset: true,
                target: None
            }),
            Some(View::Passthrough)
        );
        let mut s = State::default();
        let add = api::update::Kind::Add(api::AddEndpoints {
            endpoints: vec![ep([10, 0, 0, 4], 8080, true)],
        });
        let Some(View::Pod { endpoints }) = s.apply(api::Update {
            kind: Some(add),
            reset: true,
            target: info(""),
        }) else {
            panic!("a pod target")
        };
        assert_eq!(endpoints[0].addr, SocketAddr::from(([10, 0, 0, 4], 8080)));
        let mut s = State::default();
        assert_eq!(
            s.apply(api::Update {
                kind: None,
                reset: true,
                target: None
            }),
            None,
            "malformed"
        );
    }
}
