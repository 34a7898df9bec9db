//! Load balancing across a Service's endpoints: power of two choices over peak-EWMA
//! latency weighted by requests in flight (the algorithm of Finagle and Linkerd).
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
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::{connect::Connector, discovery::Endpoint, http::pool::EndpointClients};

/// Latency assumed for an endpoint before it has answered anything (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast a latency observation fades.
pub const DECAY: Duration = Duration::from_secs(10);

/// Statistics and connection pools of one endpoint.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    in_flight: AtomicUsize,
    ewma: Mutex<Ewma>,
    pub clients: EndpointClients,
}

#[derive(Debug, Clone, Copy)]
struct Ewma {
    /// Seconds.
    value: f64,
    at: Instant,
}

impl EndpointState {
    fn new(e: &Endpoint, connector: &Connector, rtt: f64) -> Self {
        Self {
            addr: e.addr,
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new(Ewma {
                value: rtt,
                at: Instant::now(),
            }),
            clients: EndpointClients::new(e.addr, e.identity.clone(), connector.clone()),
        }
    }

    /// The latency estimate now, faded toward zero since the last observation (so an
    /// endpoint left alone is tried again).
    fn latency(&self, now: Instant) -> f64 {
        let e = *self.ewma.lock();
        e.value * decay_weight(now.saturating_duration_since(e.at))
    }

    /// Latency × (requests in flight + 1): lower is better.
    fn cost(&self, now: Instant) -> f64 {
        self.latency(now) * (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    /// Records one response's latency: a slower one is taken at once (the peak), a
    /// faster one is blended in as the old value fades.
    pub fn observe(&self, rtt: Duration) {
        let now = Instant::now();
        let rtt = rtt.as_secs_f64();
        let mut e = self.ewma.lock();
        if rtt > e.value {
            e.value = rtt;
        } else {
            let w = decay_weight(now.saturating_duration_since(e.at));
            e.value = e.value * w + rtt * (1.0 - w);
        }
        e.at = now;
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

fn decay_weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

/// A request in flight to an endpoint.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl InFlight {
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoint set the states were last synced to, and the states.
#[derive(Debug)]
struct States {
    synced_to: Arc<[Endpoint]>,
    by_addr: HashMap<SocketAddr, Arc<EndpointState>>,
    /// What a pick chooses from.
    candidates: Vec<Arc<EndpointState>>,
}

/// The endpoints of one destination and their state.
#[derive(Debug)]
pub struct Balancer {
    connector: Connector,
    states: Mutex<States>,
    seed: AtomicU64,
}

impl Balancer {
    pub fn new(connector: Connector) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9)
            | 1;
        Self {
            connector,
            states: Mutex::new(States {
                synced_to: Arc::from(Vec::new()),
                by_addr: HashMap::new(),
                candidates: Vec::new(),
            }),
            seed: AtomicU64::new(seed),
        }
    }

    fn random(&self) -> u64 {
        let x = crate::discovery::xorshift(self.seed.load(Ordering::Relaxed));
        self.seed.store(x, Ordering::Relaxed);
        x
    }

    /// Picks an endpoint from `endpoints` (the current view): ready ones first; among
    /// terminating ones only when nothing is ready. None when there are none.
    pub fn pick(&self, endpoints: &Arc<[Endpoint]>) -> Option<Arc<EndpointState>> {
        // Two candidates chosen under the lock; their costs are read outside it. The
        // candidate list is rebuilt only when the endpoint set changes, so a pick
        // allocates nothing.
        let r = self.random();
        let (ea, eb) = {
            let mut guard = self.states.lock();
            if !Arc::ptr_eq(&guard.synced_to, endpoints) {
                *guard = self.sync(&guard, endpoints);
            }
            let pool = &guard.candidates;
            match pool.len() {
                0 => return None,
                1 => return Some(pool[0].clone()),
                n => {
                    let a = (r % n as u64) as usize;
                    let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                    (pool[a].clone(), pool[b].clone())
                }
            }
        };
        let now = Instant::now();
        let (ca, cb) = (ea.cost(now), eb.cost(now));
        // Costs within 1 % are a tie: a coin decides, so equal endpoints share.
        let first = if (ca - cb).abs() <= 0.01 * ca.max(cb) {
            r & 1 == 0
        } else {
            ca < cb
        };
        Some(if first { ea } else { eb })
    }

    /// The states for a new endpoint set: those of endpoints still present are kept, the
    /// rest dropped (in-flight requests hold their own reference and finish). A new
    /// endpoint starts at the others' average latency: a pessimistic default would
    /// starve it behind fast peers, an optimistic one would stampede it.
    fn sync(&self, old: &States, endpoints: &Arc<[Endpoint]>) -> States {
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
                .filter(|s| s.clients.identity() == e.identity.as_ref())
                .cloned()
                .unwrap_or_else(|| Arc::new(EndpointState::new(e, &self.connector, initial)));
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
mod tests {
    use super::*;

    fn endpoints(n: u8) -> Arc<[Endpoint]> {
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
        let b = Balancer::new(Connector::plain(Duration::from_secs(1)));
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
        let b = Balancer::new(Connector::plain(Duration::from_secs(1)));
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
        let b = Balancer::new(Connector::plain(Duration::from_secs(1)));
        let busy = b.pick(&eps).unwrap();
        let _held: Vec<InFlight> = (0..5).map(|_| busy.start()).collect();
        let picks = (0..1000)
            .filter(|_| b.pick(&eps).unwrap().addr == busy.addr)
            .count();
        assert_eq!(picks, 0);
    }

    #[tokio::test]
    async fn removed_endpoints_are_not_picked_and_terminating_ones_only_as_a_last_resort() {
        let b = Balancer::new(Connector::plain(Duration::from_secs(1)));
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
        let b = Balancer::new(Connector::plain(Duration::from_secs(1)));
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
}
