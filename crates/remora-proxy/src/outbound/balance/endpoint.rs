//! One endpoint's state for the balancer: its latency estimate (peak-EWMA, floored by
//! the age of the requests it has not answered yet), its circuit breaker, its backoff
//! after failed connects, its HTTP/1 connection slots and its pools.
//!
//! A failure costs: a refused or reset connection, a timeout and a 5xx count as at
//! least [`FAILURE_PENALTY`] of latency, so the estimate of a failing endpoint rises
//! instead of decaying toward zero (which made power of two choices prefer it); a
//! connect failure also keeps the endpoint out of picks for a growing backoff, breaker
//! or not; and a request outcome is settled when its response ends, so a response that
//! breaks after its headers counts as the failure it is.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tracing::info;

use super::Balancer;
use crate::{
    outbound::{
        discovery::Endpoint,
        policy::Breaker,
        resilience::{BreakerState, Verdict, connect_backoff},
    },
    tls::PeerId,
};

/// How fast a latency observation fades.
pub const DECAY: Duration = Duration::from_secs(10);
/// How long a half-open probe may take before another request may probe instead.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The least latency a failure counts as: far above any healthy answer, so an endpoint
/// that refuses, resets or answers 5xx loses every comparison for a while (its fading
/// takes about a minute to reach a healthy peer's milliseconds).
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Statistics, circuit-breaker state and what one endpoint carries.
#[derive(Debug)]
pub struct EndpointState<C> {
    pub addr: SocketAddr,
    /// The identity its proxy proves: a new pod at an old address may be someone else.
    pub identity: Option<PeerId>,
    in_flight: AtomicUsize,
    /// Where the endpoint's clock starts: pending requests' start times count from it.
    epoch: Instant,
    /// The sum of the start times (nanoseconds after `epoch`) of requests in flight:
    /// with their number, their mean age.
    pending_starts: AtomicU64,
    /// `maxConnections` slots for HTTP/1, made when a limit is first in force.
    slots: Mutex<Option<(u32, Arc<tokio::sync::Semaphore>)>>,
    /// Requests waiting for a slot (`maxPendingRequests`).
    waiting: AtomicUsize,
    ewma: Mutex<Ewma>,
    health: Mutex<BreakerState>,
    /// Connect failures in a row, and until when (nanoseconds after `epoch`, 0: not
    /// at all) the endpoint is left alone: read on every pick, so lock-free.
    connect_failures: AtomicU32,
    backoff_until: AtomicU64,
    /// What the endpoint carries (its connection pools).
    pub conn: C,
}

#[derive(Debug, Clone, Copy)]
struct Ewma {
    /// Seconds.
    value: f64,
    at: Instant,
}

impl<C> EndpointState<C> {
    pub(super) fn new(e: &Endpoint, conn: C, rtt: f64) -> Self {
        let now = Instant::now();
        Self {
            addr: e.addr,
            identity: e.identity.clone(),
            in_flight: AtomicUsize::new(0),
            epoch: now,
            pending_starts: AtomicU64::new(0),
            slots: Mutex::new(None),
            waiting: AtomicUsize::new(0),
            ewma: Mutex::new(Ewma {
                value: rtt,
                at: now,
            }),
            health: Mutex::new(BreakerState::default()),
            connect_failures: AtomicU32::new(0),
            backoff_until: AtomicU64::new(0),
            conn,
        }
    }

    /// The latency estimate now: the last observations, faded toward zero since (so an
    /// endpoint left alone is tried again), but never below the mean age of the
    /// requests it has not answered yet (so a hung endpoint looks as slow as it is).
    pub(super) fn latency(&self, now: Instant) -> f64 {
        let e = *self.ewma.lock();
        let faded = e.value * decay_weight(now.saturating_duration_since(e.at));
        faded.max(self.pending_age(now))
    }

    /// The mean age of the requests in flight, in seconds (0 without any).
    fn pending_age(&self, now: Instant) -> f64 {
        let n = self.in_flight.load(Ordering::Relaxed) as u64;
        if n == 0 {
            return 0.0;
        }
        let mean_start = self.pending_starts.load(Ordering::Relaxed) / n;
        let elapsed = nanos(now.saturating_duration_since(self.epoch));
        elapsed.saturating_sub(mean_start) as f64 / 1e9
    }

    /// Latency × (requests in flight + 1): lower is better.
    pub(super) fn cost(&self, now: Instant) -> f64 {
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

    /// Records a failure that took `took`: it counts as at least [`FAILURE_PENALTY`].
    pub fn penalize(&self, took: Duration) {
        self.observe(took.max(FAILURE_PENALTY));
    }

    /// A connect to the endpoint failed: it is left alone for a growing backoff.
    pub fn connect_failed(&self) {
        let failures = self.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let length = connect_backoff(failures);
        let until = nanos((Instant::now() + length).saturating_duration_since(self.epoch));
        self.backoff_until.store(until.max(1), Ordering::Relaxed);
    }

    /// The endpoint answered: any connect backoff is over.
    pub fn connected(&self) {
        if self.connect_failures.load(Ordering::Relaxed) > 0 {
            self.connect_failures.store(0, Ordering::Relaxed);
            self.backoff_until.store(0, Ordering::Relaxed);
        }
    }

    /// Whether a recent connect failure keeps the endpoint out of picks now.
    pub(super) fn backing_off(&self, now: Instant) -> bool {
        let until = self.backoff_until.load(Ordering::Relaxed);
        until != 0 && nanos(now.saturating_duration_since(self.epoch)) < until
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the breaker lets a request through now: not ejected, or half-open with
    /// no probe yet in flight.
    pub(super) fn available(&self, now: Instant) -> bool {
        self.health.lock().available(now)
    }

    /// Ejected, or half-open and not yet proven healthy: counts against the ejection cap.
    pub(super) fn out(&self) -> bool {
        self.health.lock().ejected_until.is_some()
    }

    /// Marks the half-open probe as sent, so no other request goes with it (for at most
    /// `PROBE_TIMEOUT`).
    pub(super) fn claim_probe(&self, now: Instant) {
        let mut h = self.health.lock();
        if h.ejected_until.is_some_and(|u| now >= u) {
            h.probing = Some(now + PROBE_TIMEOUT);
        }
    }

    /// Records an attempt's outcome for the circuit breaker. After `consecutive_failures`
    /// failures the endpoint is ejected for an exponentially growing, jittered time
    /// (unless `may_eject` says too many are out already); a failed probe ejects it again
    /// at once, a successful one restores it. Returns whether it was ejected now.
    pub fn record(&self, ok: bool, breaker: &Breaker, may_eject: impl FnOnce() -> bool) -> bool {
        let now = Instant::now();
        let mut h = self.health.lock();
        match h.record(ok, breaker, now) {
            Verdict::Keep => return false,
            Verdict::Eject => {}
            Verdict::EjectIfAllowed => {
                // The cap looks at every endpoint's breaker, this one's included: ask it
                // without holding this lock.
                drop(h);
                let allowed = may_eject();
                h = self.health.lock();
                // Another failure may have ejected it meanwhile: once is enough.
                if !allowed || h.ejected_until.is_some() {
                    return false;
                }
            }
        }
        h.eject(breaker, now, crate::rng::fraction());
        true
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight<C> {
        self.start_with(None)
    }

    /// A request in flight that holds one of the endpoint's HTTP/1 connection slots.
    pub fn start_with(
        self: &Arc<Self>,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> InFlight<C> {
        let started = Instant::now();
        let start = nanos(started.saturating_duration_since(self.epoch));
        self.pending_starts.fetch_add(start, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            started,
            start,
            answered: false,
            settled: false,
            settle: None,
            _slot: slot,
        }
    }

    /// One of the endpoint's `max_connections` HTTP/1 connections for a request: at
    /// once when one is free; else, when fewer than `max_pending` requests wait, after
    /// waiting for one (until `deadline`). Nothing queues beyond that.
    pub async fn connection_slot(
        &self,
        max_connections: u32,
        max_pending: u32,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, SlotError> {
        let semaphore = {
            let mut slots = self.slots.lock();
            match &*slots {
                Some((n, s)) if *n == max_connections => s.clone(),
                // A new limit: requests holding the old one's slots finish on them.
                _ => {
                    let s = Arc::new(tokio::sync::Semaphore::new(max_connections as usize));
                    *slots = Some((max_connections, s.clone()));
                    s
                }
            }
        };
        if let Ok(permit) = semaphore.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= max_pending as usize {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(SlotError::Full);
        }
        let acquire = semaphore.acquire_owned();
        let acquired = match deadline {
            Some(d) => tokio::time::timeout_at(d, acquire).await.ok(),
            None => Some(acquire.await),
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        match acquired {
            Some(Ok(permit)) => Ok(permit),
            Some(Err(_)) => Err(SlotError::Full),
            None => Err(SlotError::Deadline),
        }
    }
}

/// Why a request got no connection slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotError {
    /// Every slot is taken and `maxPendingRequests` requests already wait.
    Full,
    /// The request's deadline passed while it waited.
    Deadline,
}

fn decay_weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What settling a request's outcome needs: the breaker in force, the balancer (for
/// the ejection cap) and the counter of ejections.
#[derive(Debug)]
pub struct Settle<C> {
    pub breaker: Breaker,
    pub balancer: Arc<Balancer<C>>,
    pub ejections: Counter,
    pub service: Arc<str>,
}

/// A request in flight to an endpoint (and the connection slot it holds, if any). Its
/// outcome, once known, is settled with [`InFlight::settle`]; dropped unsettled (the
/// client went away), it judges nothing, but an answer never received costs the time
/// waited for it.
#[derive(Debug)]
pub struct InFlight<C> {
    endpoint: Arc<EndpointState<C>>,
    started: Instant,
    /// `started`, in nanoseconds after the endpoint's epoch.
    start: u64,
    answered: bool,
    settled: bool,
    settle: Option<Settle<C>>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<C> InFlight<C> {
    pub fn endpoint(&self) -> &Arc<EndpointState<C>> {
        &self.endpoint
    }

    /// What settling this request's outcome reports to the breaker.
    pub fn settle_with(&mut self, settle: Settle<C>) {
        self.settle = Some(settle);
    }

    /// The endpoint answered (its response headers arrived); the outcome is settled
    /// when the response ends.
    pub fn answered(&mut self) {
        self.answered = true;
    }

    /// The request's outcome: a failure costs latency, and either counts for the
    /// breaker. Only the first call counts.
    pub fn settle(&mut self, ok: bool) {
        if self.settled {
            return;
        }
        self.settled = true;
        self.answered = true;
        let ep = &self.endpoint;
        if !ok {
            ep.penalize(self.started.elapsed());
        }
        let Some(s) = self.settle.take() else {
            return;
        };
        let percent = s.breaker.max_ejection_percent;
        if ep.record(ok, &s.breaker, || s.balancer.may_eject(percent)) {
            s.ejections.inc();
            info!(service = %s.service, endpoint = %ep.addr, "endpoint ejected after consecutive failures");
        }
    }
}

impl<C> Drop for InFlight<C> {
    fn drop(&mut self) {
        let ep = &self.endpoint;
        ep.pending_starts.fetch_sub(self.start, Ordering::Relaxed);
        ep.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.answered {
            // Given up on without an answer (a hung endpoint, a client that left): what
            // it waited is what the endpoint cost.
            ep.observe(self.started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{
        balance::tests::{self, endpoints},
        policy::ServicePolicy,
        resilience::CONNECT_BACKOFF,
    };

    fn balancer() -> Arc<Balancer<()>> {
        Arc::new(tests::balancer())
    }

    /// How many of `n` picks land on `addr`, each answered at once with `rtt`.
    fn share(b: &Balancer<()>, eps: &Arc<[Endpoint]>, addr: SocketAddr, n: usize) -> usize {
        (0..n)
            .filter(|_| {
                let ep = b.pick(eps).unwrap();
                let hit = ep.addr == addr;
                if !hit {
                    ep.observe(Duration::from_millis(1));
                }
                hit
            })
            .count()
    }

    /// Issue 12: a refused connect recorded nothing, so a dead endpoint's estimate faded
    /// toward zero and power of two choices picked it whenever it was sampled (≈ 65 % of
    /// requests failed with 3 endpoints).
    #[tokio::test(start_paused = true)]
    async fn a_refusing_endpoint_backs_off_and_costs() {
        let (b, eps) = (balancer(), endpoints(3));
        let dead = b.pick(&eps).unwrap();
        let mut f = dead.start();
        dead.connect_failed();
        f.settle(false);
        drop(f);
        assert_eq!(
            share(&b, &eps, dead.addr, 300),
            0,
            "left alone during its backoff"
        );
        // Past the backoff it is tried again, but it still costs its failure's penalty:
        // two healthy peers win every comparison.
        tokio::time::advance(CONNECT_BACKOFF).await;
        assert_eq!(share(&b, &eps, dead.addr, 300), 0);
        // Each further failure doubles the backoff; an answer resets it.
        dead.connect_failed();
        tokio::time::advance(CONNECT_BACKOFF).await;
        assert!(dead.backing_off(Instant::now()), "second backoff is longer");
        dead.connected();
        assert!(!dead.backing_off(Instant::now()));
    }

    /// Issue 12: a hung endpoint's estimate decayed while its requests waited, so it took
    /// most first attempts.
    #[tokio::test(start_paused = true)]
    async fn a_hung_endpoint_looks_as_slow_as_its_oldest_requests() {
        let (b, eps) = (balancer(), endpoints(3));
        let hung = b.pick(&eps).unwrap();
        hung.observe(Duration::from_micros(100));
        let waiting: Vec<InFlight<()>> = (0..2).map(|_| hung.start()).collect();
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(hung.latency(Instant::now()) >= 0.2);
        assert_eq!(share(&b, &eps, hung.addr, 300), 0);
        // The requests are given up on: the wait they cost stays in the estimate.
        drop(waiting);
        assert!(hung.latency(Instant::now()) >= 0.2);
        assert_eq!(share(&b, &eps, hung.addr, 300), 0);
    }

    /// Issue 12: a fast 503, or a 200 that then breaks, looked cheap; and a response
    /// that broke after its headers counted as a success for the breaker.
    #[tokio::test(start_paused = true)]
    async fn a_response_that_breaks_after_its_headers_counts_as_a_failure() {
        let (b, eps) = (balancer(), endpoints(3));
        let mut p = ServicePolicy::default();
        p.breaker.consecutive_failures = 3;
        let flaky = b.pick(&eps).unwrap();
        let ejections = Counter::default();
        for _ in 0..3 {
            let mut f = flaky.start();
            f.settle_with(Settle {
                breaker: p.breaker.clone(),
                balancer: b.clone(),
                ejections: ejections.clone(),
                service: Arc::from("web.shop:80"),
            });
            f.answered();
            // The body then fails.
            f.settle(false);
            f.settle(true);
        }
        assert_eq!(ejections.get(), 1, "three broken responses eject it");
        assert!(flaky.latency(Instant::now()) >= FAILURE_PENALTY.as_secs_f64());
        // A response that ends well settles as a success, and a dropped one as nothing.
        let ok = b.pick(&eps).unwrap();
        let mut f = ok.start();
        f.answered();
        drop(f);
        assert!(ok.latency(Instant::now()) < FAILURE_PENALTY.as_secs_f64());
    }
}
