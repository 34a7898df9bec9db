//! Resilience as decisions: whether an attempt's outcome is retried, how long to pause
//! first, whether the retry budget pays, and what the circuit breaker makes of an
//! outcome. Each is a function of the outcome, the policy and the time it is given, so
//! each is tested as a table; `forward` does the HTTP sequencing around them and the
//! balancer keeps the state.

use std::{collections::VecDeque, time::Duration};

use http::{HeaderMap, Method, StatusCode, header};
use parking_lot::Mutex;
use tokio::time::Instant;

use super::policy::{Breaker, Retry};

/// How many other endpoints a request whose connect failed may try, policy or not.
pub const CONNECT_RETRIES: u32 = 2;

/// How an attempt ended, as far as retrying it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The request never left: no endpoints, all at capacity, no connection slot.
    NotSent,
    /// The connect to the endpoint failed: it received nothing.
    ConnectFailed,
    /// The connection broke before an answer (reset, refused stream).
    Broken,
    /// No answer within the per-try timeout.
    PerTryTimeout,
    /// The request's own timeout ran out.
    RequestTimeout,
    /// An answer, with the gRPC status of its headers (a trailers-only response).
    Answered {
        status: StatusCode,
        grpc: Option<u32>,
    },
}

/// Whether a request may be retried at all under `retry`: never an upgrade; a gRPC call
/// (a POST) when the policy names gRPC codes or `unavailable`; any other request when
/// its method is one the policy retries.
pub fn eligible(retry: &Retry, method: &Method, is_grpc: bool, upgrade: bool) -> bool {
    !upgrade
        && if is_grpc {
            !retry.on.grpc.is_empty() || retry.on.unavailable
        } else {
            retry.method_allowed(method)
        }
}

/// Whether the policy names `outcome` as worth another attempt.
pub fn retriable(outcome: Outcome, retry: Option<&Retry>, is_grpc: bool) -> bool {
    let Some(r) = retry else {
        return false;
    };
    match outcome {
        Outcome::NotSent | Outcome::RequestTimeout => false,
        Outcome::ConnectFailed => r.on.connect_failure,
        Outcome::Broken => r.on.reset || r.on.refused_stream,
        Outcome::PerTryTimeout => r.on.per_try_timeout,
        Outcome::Answered { status, grpc } => r.retriable_response(status, grpc, is_grpc),
    }
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The client gets this attempt's outcome.
    Answer,
    /// Nothing reached the endpoint: another at once, with no backoff and no budget,
    /// whatever the policy (nothing was sent, so it is always safe).
    Elsewhere,
    /// The policy retries it, after its backoff and if its budget allows.
    Retry,
}

/// The decision after attempt number `attempt` (0 first) of policy retries, when
/// `elsewhere` connect-failure retries were made already.
pub fn next(
    outcome: Outcome,
    retriable: bool,
    max_retries: Option<u32>,
    attempt: u32,
    elsewhere: u32,
) -> Next {
    if outcome == Outcome::ConnectFailed && elsewhere < CONNECT_RETRIES {
        return Next::Elsewhere;
    }
    match max_retries {
        Some(max) if retriable && attempt < max => Next::Retry,
        _ => Next::Answer,
    }
}

/// The pause before the retry that follows attempt number `attempt`: full jitter
/// (`jitter` in [0, 1)) under an exponential ceiling, and never less than what the
/// endpoint asked for with `Retry-After`.
pub fn backoff(
    retry: &Retry,
    attempt: u32,
    jitter: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let ceiling = retry
        .backoff_base
        .saturating_mul(1 << attempt.min(16))
        .min(retry.backoff_max);
    let pause = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
    retry_after.map_or(pause, |after| pause.max(after))
}

/// Whether an attempt after `pause` still starts before the request's deadline.
pub fn fits(now: Instant, pause: Duration, deadline: Option<Instant>) -> bool {
    deadline.is_none_or(|d| now + pause < d)
}

/// How long one attempt may take: its per-try timeout, within what is left of the
/// request's.
pub fn attempt_limit(
    per_try: Option<Duration>,
    deadline: Option<Instant>,
    now: Instant,
) -> Option<Duration> {
    let left = deadline.map(|d| d.saturating_duration_since(now));
    match (per_try, left) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

/// The pause a 429 or 503 asks for with `Retry-After`: seconds, or an HTTP date (RFC
/// 9110 §10.2.3; one past is no pause); at most a minute.
pub fn retry_after(status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
    retry_after_at(status, headers, std::time::SystemTime::now())
}

/// [`retry_after`] with the clock's reading given.
pub fn retry_after_at(
    status: StatusCode,
    headers: &HeaderMap,
    now: std::time::SystemTime,
) -> Option<Duration> {
    if !matches!(status.as_u16(), 429 | 503) {
        return None;
    }
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    let pause = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs.min(60)),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(pause.min(Duration::from_secs(60)))
}

/// Whether a budget of `ratio` of the window's `requests`, plus `min_per_second` for
/// each of its `window_secs` seconds, has room for one more retry after `retries`.
/// Whole retries only: 20 % of 5 requests is one retry, not two.
pub fn budget_allows(
    requests: u64,
    retries: u64,
    ratio: f64,
    min_per_second: u32,
    window_secs: u64,
) -> bool {
    retries < budget(requests, ratio, min_per_second, window_secs)
}

/// How many retries a budget of `ratio` of `requests`, plus `min_per_second` for each
/// of the window's `window_secs` seconds, allows in all.
pub fn budget(requests: u64, ratio: f64, min_per_second: u32, window_secs: u64) -> u64 {
    (ratio * requests as f64 + 1e-9).floor() as u64 + u64::from(min_per_second) * window_secs
}

/// Caps retries to `ratio` of the requests over a sliding window, plus a floor of
/// `min_per_second`: when a Service fails, retries add a bounded load, never a storm.
#[derive(Debug)]
pub struct RetryBudget {
    /// Where its seconds count from.
    epoch: Instant,
    /// (second, requests, retries), oldest first.
    buckets: Mutex<VecDeque<(u64, u64, u64)>>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            buckets: Mutex::default(),
        }
    }
}

impl RetryBudget {
    fn bucket(
        buckets: &mut VecDeque<(u64, u64, u64)>,
        now: u64,
        window: u64,
    ) -> &mut (u64, u64, u64) {
        while buckets.front().is_some_and(|b| b.0 + window <= now) {
            buckets.pop_front();
        }
        if buckets.back().is_none_or(|b| b.0 != now) {
            buckets.push_back((now, 0, 0));
        }
        buckets.back_mut().expect("just pushed")
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Counts an original request.
    pub fn request(&self, window: Duration) {
        let mut b = self.buckets.lock();
        Self::bucket(&mut b, self.now(), window.as_secs().max(1)).1 += 1;
    }

    /// The requests and retries counted in `r`'s window, and the retries still
    /// allowed in it, for `/debug/targets`.
    pub fn debug(&self, r: &Retry) -> (u64, u64, u64) {
        self.with_window(r, |requests, retries, window, _| {
            let allowed = budget(requests, r.budget_ratio, r.budget_min_per_second, window);
            (requests, retries, allowed.saturating_sub(retries))
        })
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn try_retry(&self, r: &Retry) -> bool {
        self.with_window(r, |requests, retries, window, current| {
            let may = budget_allows(
                requests,
                retries,
                r.budget_ratio,
                r.budget_min_per_second,
                window,
            );
            if may {
                current.2 += 1;
            }
            may
        })
    }

    /// `f` over `r`'s window: the requests and retries in it, its length in seconds,
    /// and the current second's bucket.
    fn with_window<T>(
        &self,
        r: &Retry,
        f: impl FnOnce(u64, u64, u64, &mut (u64, u64, u64)) -> T,
    ) -> T {
        let window = r.budget_window.as_secs().max(1);
        let mut b = self.buckets.lock();
        Self::bucket(&mut b, self.now(), window);
        let (requests, retries) = b.iter().fold((0, 0), |(q, t), b| (q + b.1, t + b.2));
        f(requests, retries, window, b.back_mut().expect("a bucket"))
    }
}

/// After a failed connect an endpoint is left alone this long, doubling with each
/// further failure up to [`CONNECT_BACKOFF_MAX`]; a connect that succeeds resets it.
pub const CONNECT_BACKOFF: Duration = Duration::from_millis(500);
pub const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long an endpoint is left alone after `failures` connect failures in a row.
pub fn connect_backoff(failures: u32) -> Duration {
    let failures = failures.clamp(1, 16);
    CONNECT_BACKOFF
        .saturating_mul(1 << (failures - 1))
        .min(CONNECT_BACKOFF_MAX)
}

/// One endpoint's circuit breaker.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BreakerState {
    pub consecutive_failures: u32,
    /// Ejected until then; once it has passed, one request probes (half-open).
    pub ejected_until: Option<Instant>,
    /// A half-open probe is in flight, until then: a probe whose request never reports
    /// back (the client went away) frees the endpoint for another probe afterwards.
    pub probing: Option<Instant>,
    /// Ejections so far: each doubles the next one's length.
    pub ejections: u32,
}

/// What the breaker makes of one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing more to do.
    Keep,
    /// Enough failures in a row: eject, if the cap on ejected endpoints allows.
    EjectIfAllowed,
    /// A half-open probe failed: eject again at once (it is counted already).
    Eject,
}

impl BreakerState {
    /// Whether a request may go now: not ejected, or half-open with no probe yet in
    /// flight.
    pub fn available(&self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if now < until => false,
            Some(_) => self.probing.is_none_or(|p| now >= p),
            None => true,
        }
    }

    /// Records an outcome under `breaker`: a success resets the count (and restores a
    /// half-open endpoint), a failure counts toward ejection.
    pub fn record(&mut self, ok: bool, breaker: &Breaker, now: Instant) -> Verdict {
        if breaker.consecutive_failures == 0 {
            // Breaking was turned off: nothing stays ejected.
            *self = Self::default();
            return Verdict::Keep;
        }
        let half_open = self.ejected_until.is_some_and(|u| now >= u);
        if ok {
            self.consecutive_failures = 0;
            if half_open {
                self.ejected_until = None;
                self.probing = None;
                self.ejections = self.ejections.saturating_sub(1);
            }
            return Verdict::Keep;
        }
        self.consecutive_failures += 1;
        match (half_open, self.ejected_until) {
            (true, _) => Verdict::Eject,
            // Ejected already (by a failure that raced this one): once is enough.
            (false, Some(_)) => Verdict::Keep,
            (false, None) if self.consecutive_failures >= breaker.consecutive_failures => {
                Verdict::EjectIfAllowed
            }
            (false, None) => Verdict::Keep,
        }
    }

    /// Ejects for an exponentially growing time, `jitter` (in [0, 1)) spreading it by
    /// ±10 %, never beyond the breaker's maximum.
    pub fn eject(&mut self, breaker: &Breaker, now: Instant, jitter: f64) {
        self.ejections = (self.ejections + 1).min(16);
        let base = breaker.base_ejection.as_secs_f64() * f64::from(1u32 << (self.ejections - 1));
        let spread = 0.9 + jitter.clamp(0.0, 1.0) * 0.2;
        let length = Duration::from_secs_f64(base * spread).min(breaker.max_ejection);
        self.ejected_until = Some(now + length);
        self.probing = None;
        self.consecutive_failures = 0;
    }
}

#[cfg(test)]
mod tests;
