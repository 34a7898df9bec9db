//! Load balancing across a Service's endpoints: power of two choices over peak-EWMA
//! latency weighted by requests in flight (the algorithm of Finagle and Linkerd).
//!
//! The balancer knows endpoints, not protocols: each endpoint carries a `C` made for it
//! when it first appears (the outbound side's HTTP pools), which the balancer only
//! keeps.
//!
//! One `Balancer` per destination is shared by every connection to it, so its
//! statistics see all of the pod's traffic. It is a plain shared structure rather than
//! tower's `p2c::Balance`: that service needs a single owner (a `Buffer` task in front
//! of it) and would put a channel hop on every request; picking here is a few atomic
//! loads and one short lock.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{
    discovery::Endpoint,
    policy::{Algorithm, ServicePolicy},
};

mod endpoint;

pub use endpoint::{
    DECAY, EndpointState, FAILURE_PENALTY, InFlight, PROBE_TIMEOUT, Settle, SlotError,
};

/// Latency assumed for an endpoint before it has answered anything (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPick {
    /// The destination has no endpoints.
    NoEndpoints,
    /// Every endpoint is at its concurrency limit (`maxRequests`).
    AtCapacity,
}

/// The endpoint set the states were last synced to, and the states.
struct States<C> {
    synced_to: Arc<[Endpoint]>,
    by_addr: HashMap<SocketAddr, Arc<EndpointState<C>>>,
    /// What a pick chooses from.
    candidates: Vec<Arc<EndpointState<C>>>,
}

/// Makes what an endpoint carries.
type Make<C> = Box<dyn Fn(&Endpoint) -> C + Send + Sync>;

/// The endpoints of one destination and their state.
pub struct Balancer<C> {
    make: Make<C>,
    states: Mutex<States<C>>,
    /// Round-robin's position.
    next: AtomicUsize,
}

impl<C> std::fmt::Debug for Balancer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("endpoints", &self.states.lock().by_addr.len())
            .finish()
    }
}

impl<C> Balancer<C> {
    /// A balancer whose endpoints each carry what `make` makes for them.
    pub fn new(make: impl Fn(&Endpoint) -> C + Send + Sync + 'static) -> Self {
        Self {
            make: Box::new(make),
            states: Mutex::new(States {
                synced_to: Arc::from(Vec::new()),
                by_addr: HashMap::new(),
                candidates: Vec::new(),
            }),
            next: AtomicUsize::new(0),
        }
    }

    /// Picks an endpoint from `endpoints` (the current view) with the default policy.
    pub fn pick(&self, endpoints: &Arc<[Endpoint]>) -> Option<Arc<EndpointState<C>>> {
        self.pick_with(endpoints, &ServicePolicy::default()).ok()
    }

    /// Picks an endpoint from `endpoints` (the current view): ready ones first; among
    /// terminating ones only when nothing is ready. Ejected endpoints and those at the
    /// policy's concurrency limit are passed over; the algorithm chooses among the rest.
    pub fn pick_with(
        &self,
        endpoints: &Arc<[Endpoint]>,
        policy: &ServicePolicy,
    ) -> Result<Arc<EndpointState<C>>, NoPick> {
        self.pick_avoiding(endpoints, policy, None)
    }

    /// As [`Balancer::pick_with`], passing over `avoid` (the endpoint a retry's previous
    /// attempt failed on) while there is another to choose.
    pub fn pick_avoiding(
        &self,
        endpoints: &Arc<[Endpoint]>,
        policy: &ServicePolicy,
        avoid: Option<SocketAddr>,
    ) -> Result<Arc<EndpointState<C>>, NoPick> {
        // The candidate list is rebuilt only when the endpoint set changes, so a pick
        // allocates nothing.
        let r = crate::rng::random();
        let now = Instant::now();
        let max = policy.breaker.max_requests as usize;
        let guard = {
            let mut guard = self.states.lock();
            if !Arc::ptr_eq(&guard.synced_to, endpoints) {
                *guard = self.sync(&guard, endpoints);
            }
            guard
        };
        let pool = &guard.candidates;
        let n = pool.len();
        if n == 0 {
            return Err(NoPick::NoEndpoints);
        }
        let breaking = policy.breaker.consecutive_failures > 0;
        // An endpoint whose connects fail is left alone for its backoff, breaker or not.
        let usable = |s: &EndpointState<C>| {
            (max == 0 || s.in_flight() < max)
                && (!breaking || s.available(now))
                && !s.backing_off(now)
        };
        let avoid = avoid.filter(|a| pool.iter().any(|s| s.addr != *a && usable(s)));
        let eligible = |s: &EndpointState<C>| usable(s) && Some(s.addr) != avoid;
        // The first eligible candidate at or after `from`, wrapping, other than `not`.
        let find = |from: usize, not: Option<usize>| {
            (0..n)
                .map(|i| (from + i) % n)
                .find(|&i| Some(i) != not && eligible(&pool[i]))
        };
        let chosen = match policy.algorithm {
            Algorithm::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                find(start % n, None)
            }
            Algorithm::PeakEwma | Algorithm::LeastRequest => {
                let a = find((r % n as u64) as usize, None);
                let b =
                    a.and_then(|a| find((a + 1 + ((r >> 32) as usize % n.max(2))) % n, Some(a)));
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let cost = |s: &EndpointState<C>| match policy.algorithm {
                            Algorithm::LeastRequest => s.in_flight() as f64,
                            _ => s.cost(now),
                        };
                        let (ca, cb) = (cost(&pool[a]), cost(&pool[b]));
                        // Costs within 1 % are a tie: a coin decides, so equal endpoints share.
                        let first = if (ca - cb).abs() <= 0.01 * ca.max(cb) {
                            r >> 63 == 0
                        } else {
                            ca < cb
                        };
                        Some(if first { a } else { b })
                    }
                    (a, _) => a,
                }
            }
        };
        match chosen {
            Some(i) => {
                let s = pool[i].clone();
                if breaking {
                    s.claim_probe(now);
                }
                Ok(s)
            }
            None if pool.iter().all(|s| max != 0 && s.in_flight() >= max) => {
                Err(NoPick::AtCapacity)
            }
            // Everything left is ejected, probing or backing off: rather than fail, take
            // the least loaded under the limit (the ejection cap normally keeps this from
            // happening).
            None => pool
                .iter()
                .filter(|s| max == 0 || s.in_flight() < max)
                .min_by_key(|s| s.in_flight())
                .cloned()
                .ok_or(NoPick::AtCapacity),
        }
    }

    /// The endpoints last picked from: ready, terminating, ejected (or half-open).
    pub fn census(&self) -> [usize; 3] {
        let guard = self.states.lock();
        let mut counts = [0; 3];
        for e in guard.synced_to.iter() {
            let out = guard.by_addr.get(&e.addr).is_some_and(|s| s.out());
            let i = match (out, e.ready) {
                (true, _) => 2,
                (false, true) => 0,
                (false, false) => 1,
            };
            counts[i] += 1;
        }
        counts
    }

    /// Each endpoint last picked from, for `/debug/targets`: address, readiness,
    /// identity, latency estimate (ms), requests in flight, whether it is ejected, and
    /// what `conn` tells of what it carries.
    pub fn debug(&self, conn: impl Fn(&C) -> serde_json::Value) -> Vec<serde_json::Value> {
        let guard = self.states.lock();
        let now = Instant::now();
        guard
            .synced_to
            .iter()
            .map(|e| {
                let state = guard.by_addr.get(&e.addr);
                serde_json::json!({
                    "addr": e.addr.to_string(),
                    "ready": e.ready,
                    "identity": e.identity.as_ref().map(|i| i.spiffe_id.to_string()),
                    "latency_ms": state.map(|s| (s.latency(now) * 1e6).round() / 1e3),
                    "in_flight": state.map(|s| s.in_flight()),
                    "ejected": state.is_some_and(|s| s.out()),
                    "pool": state.map(|s| conn(&s.conn)),
                })
            })
            .collect()
    }

    /// Whether one more endpoint may be ejected without exceeding `max_percent` of them.
    pub fn may_eject(&self, max_percent: u32) -> bool {
        let guard = self.states.lock();
        let n = guard.candidates.len();
        let ejected = guard.candidates.iter().filter(|s| s.out()).count();
        (ejected + 1) * 100 <= max_percent as usize * n
    }

    /// The states for a new endpoint set: those of endpoints still present are kept, the
    /// rest dropped (in-flight requests hold their own reference and finish). A new
    /// endpoint starts at the others' average latency: a pessimistic default would
    /// starve it behind fast peers, an optimistic one would stampede it.
    fn sync(&self, old: &States<C>, endpoints: &Arc<[Endpoint]>) -> States<C> {
        let now = Instant::now();
        let known: Vec<f64> = old.by_addr.values().map(|s| s.latency(now)).collect();
        let initial = if known.is_empty() {
            DEFAULT_RTT.as_secs_f64()
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let mut by_addr = HashMap::with_capacity(endpoints.len());
        for e in endpoints.iter() {
            // A new pod at an old address may be someone else: its pools are not reused.
            let state = old
                .by_addr
                .get(&e.addr)
                .filter(|s| s.identity == e.identity)
                .cloned()
                .unwrap_or_else(|| Arc::new(EndpointState::new(e, (self.make)(e), initial)));
            by_addr.insert(e.addr, state);
        }
        // Ready endpoints; terminating ones only when nothing is ready.
        let any_ready = endpoints.iter().any(|e| e.ready);
        let candidates = endpoints
            .iter()
            .filter(|e| e.ready || !any_ready)
            .filter_map(|e| by_addr.get(&e.addr).cloned())
            .collect();
        States {
            synced_to: endpoints.clone(),
            by_addr,
            candidates,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A balancer whose endpoints carry nothing: picking needs no connections.
    pub(crate) fn balancer() -> Balancer<()> {
        Balancer::new(|_: &Endpoint| ())
    }

    /// `n` ready endpoints, 10.0.0.1:80 onwards.
    pub(crate) fn endpoints(n: u8) -> Arc<[Endpoint]> {
        (1..=n)
            .map(|i| Endpoint {
                addr: SocketAddr::from(([10, 0, 0, i], 80)),
                identity: None,
                ready: true,
            })
            .collect::<Vec<_>>()
            .into()
    }

    #[tokio::test]
    async fn spreads_over_equal_endpoints() {
        let b = balancer();
        let eps = endpoints(3);
        let mut counts = HashMap::new();
        for _ in 0..3000 {
            *counts.entry(b.pick(&eps).unwrap().addr).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3, "{counts:?}");
        assert!(counts.values().all(|&c| c > 600), "{counts:?}");
    }

    #[tokio::test]
    async fn avoids_the_slow_and_the_busy() {
        let b = balancer();
        let eps = endpoints(2);
        let slow = b.pick(&eps).unwrap();
        slow.observe(Duration::from_millis(500));
        let picks = (0..1000)
            .filter(|_| b.pick(&eps).unwrap().addr == slow.addr)
            .count();
        assert_eq!(
            picks, 0,
            "with two endpoints P2C compares both: the slow one never wins"
        );
        // Requests in flight weigh on an endpoint's cost too.
        let b = balancer();
        let busy = b.pick(&eps).unwrap();
        let _held: Vec<InFlight<()>> = (0..5).map(|_| busy.start()).collect();
        let picks = (0..1000)
            .filter(|_| b.pick(&eps).unwrap().addr == busy.addr)
            .count();
        assert_eq!(picks, 0);
    }

    #[tokio::test]
    async fn removed_endpoints_are_not_picked_and_terminating_ones_only_as_a_last_resort() {
        let b = balancer();
        let all = endpoints(3);
        let held = b.pick(&all).unwrap().start();
        let fewer: Arc<[Endpoint]> = all
            .iter()
            .filter(|e| e.addr != held.endpoint().addr)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        for _ in 0..200 {
            assert_ne!(b.pick(&fewer).unwrap().addr, held.endpoint().addr);
        }
        drop(held);
        // An endpoint that joins later is tried, though its peers are fast.
        let b = balancer();
        let two = endpoints(2);
        for _ in 0..10 {
            b.pick(&two).unwrap().observe(Duration::from_micros(300));
        }
        let three = endpoints(3);
        let newcomer = three[2].addr;
        let picks = (0..600)
            .filter(|_| b.pick(&three).unwrap().addr == newcomer)
            .count();
        assert!(picks > 100, "the new endpoint got {picks} of 600");
        let mut mixed: Vec<Endpoint> = endpoints(2).to_vec();
        mixed[0].ready = false;
        let mixed: Arc<[Endpoint]> = mixed.into();
        for _ in 0..100 {
            assert_eq!(b.pick(&mixed).unwrap().addr, mixed[1].addr);
        }
        let none: Arc<[Endpoint]> = Vec::new().into();
        assert!(b.pick(&none).is_none());
    }

    fn policy(f: impl FnOnce(&mut ServicePolicy)) -> ServicePolicy {
        let mut p = ServicePolicy::default();
        f(&mut p);
        p
    }

    #[tokio::test]
    async fn round_robin_and_least_request() {
        let b = balancer();
        let eps = endpoints(3);
        let rr = policy(|p| p.algorithm = Algorithm::RoundRobin);
        let order: Vec<SocketAddr> = (0..6)
            .map(|_| b.pick_with(&eps, &rr).unwrap().addr)
            .collect();
        assert_eq!(order[..3], order[3..], "each in turn: {order:?}");
        assert_eq!(
            order[..3]
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            3
        );
        let lr = policy(|p| p.algorithm = Algorithm::LeastRequest);
        let busy = b.pick_with(&eps, &lr).unwrap();
        let _held: Vec<InFlight<()>> = (0..3).map(|_| busy.start()).collect();
        // The slow estimate is ignored: only requests in flight count.
        let picks = (0..300)
            .filter(|_| b.pick_with(&eps, &lr).unwrap().addr == busy.addr)
            .count();
        assert_eq!(picks, 0);
    }

    #[tokio::test]
    async fn a_concurrency_limit_fails_fast_when_every_endpoint_is_full() {
        let b = balancer();
        let eps = endpoints(2);
        let limited = policy(|p| p.breaker.max_requests = 2);
        let held: Vec<InFlight<()>> = (0..4)
            .map(|_| b.pick_with(&eps, &limited).unwrap().start())
            .collect();
        assert_eq!(b.pick_with(&eps, &limited).unwrap_err(), NoPick::AtCapacity);
        drop(held);
        assert!(b.pick_with(&eps, &limited).is_ok());
    }

    #[tokio::test]
    async fn consecutive_failures_eject_within_the_cap_and_a_probe_restores() {
        let b = balancer();
        let eps = endpoints(3);
        let p = policy(|p| {
            p.algorithm = Algorithm::RoundRobin;
            p.breaker.consecutive_failures = 2;
            p.breaker.base_ejection = Duration::from_millis(200);
            p.breaker.max_ejection_percent = 50;
        });
        let first = b.pick_with(&eps, &p).unwrap();
        let second = b.pick_with(&eps, &p).unwrap();
        assert!(!first.record(false, &p.breaker, || b.may_eject(50)));
        assert!(
            first.record(false, &p.breaker, || b.may_eject(50)),
            "ejected"
        );
        for _ in 0..30 {
            assert_ne!(b.pick_with(&eps, &p).unwrap().addr, first.addr);
        }
        // 50 % of 3: a second endpoint is not ejected however often it fails.
        for _ in 0..5 {
            assert!(!second.record(false, &p.breaker, || b.may_eject(50)));
        }
        // After the ejection time one request probes; its success restores the endpoint.
        tokio::time::sleep(Duration::from_millis(260)).await;
        let probes = (0..30)
            .filter(|_| b.pick_with(&eps, &p).unwrap().addr == first.addr)
            .count();
        assert_eq!(probes, 1, "half-open: a single probe");
        first.record(true, &p.breaker, || b.may_eject(50));
        let back = (0..30)
            .filter(|_| b.pick_with(&eps, &p).unwrap().addr == first.addr)
            .count();
        assert_eq!(back, 10, "in turn again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_reports_back_frees_the_endpoint_later() {
        let b = balancer();
        let eps = endpoints(2);
        let p = policy(|p| {
            p.algorithm = Algorithm::RoundRobin;
            p.breaker.consecutive_failures = 1;
            p.breaker.base_ejection = Duration::from_secs(1);
            p.breaker.max_ejection_percent = 50;
        });
        let first = b.pick_with(&eps, &p).unwrap();
        assert!(first.record(false, &p.breaker, || b.may_eject(50)));
        tokio::time::advance(Duration::from_millis(1200)).await;
        let probes = |b: &Balancer<()>| {
            (0..10)
                .filter(|_| b.pick_with(&eps, &p).unwrap().addr == first.addr)
                .count()
        };
        assert_eq!(probes(&b), 1, "one probe, whose request then went away");
        assert_eq!(probes(&b), 0, "still claimed");
        tokio::time::advance(PROBE_TIMEOUT).await;
        assert_eq!(probes(&b), 1, "claimable again");
    }

    #[tokio::test]
    async fn least_request_shares_ties_between_two() {
        let b = balancer();
        let eps = endpoints(2);
        let lr = policy(|p| p.algorithm = Algorithm::LeastRequest);
        let first = (0..1000)
            .filter(|_| b.pick_with(&eps, &lr).unwrap().addr == eps[0].addr)
            .count();
        assert!((300..=700).contains(&first), "{first} of 1000 to the first");
    }

    #[tokio::test(start_paused = true)]
    async fn connection_slots_let_a_few_wait_and_refuse_the_rest() {
        let b = balancer();
        let eps = endpoints(1);
        let ep = b.pick(&eps).unwrap();
        let held = ep.connection_slot(1, 1, None).await.unwrap();
        // The slot is taken: one request may wait, the next is refused at once.
        let waiter = {
            let ep = ep.clone();
            tokio::spawn(async move { ep.connection_slot(1, 1, None).await.map(drop) })
        };
        tokio::task::yield_now().await;
        assert_eq!(
            ep.connection_slot(1, 1, None).await.err(),
            Some(SlotError::Full)
        );
        drop(held);
        assert_eq!(
            waiter.await.unwrap(),
            Ok(()),
            "the waiter got the freed slot"
        );
        // A waiter whose deadline passes gives up.
        let held = ep.connection_slot(1, 1, None).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        assert_eq!(
            ep.connection_slot(1, 1, Some(deadline)).await.err(),
            Some(SlotError::Deadline)
        );
        drop(held);
    }
}
