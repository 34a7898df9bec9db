//! Each decision as a table; the budget and the breaker under paused time.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::time::Instant;

use super::*;
use crate::outbound::policy::{Breaker, Conditions, Retry};

const MS: Duration = Duration::from_millis(1);

fn retry(on: Conditions) -> Retry {
    Retry {
        max_retries: 2,
        on,
        backoff_base: 25 * MS,
        backoff_max: 250 * MS,
        budget_ratio: 0.2,
        budget_min_per_second: 1,
        budget_window: Duration::from_secs(10),
        non_idempotent: false,
    }
}

fn answered(status: u16, grpc: Option<u32>) -> Outcome {
    Outcome::Answered {
        status: StatusCode::from_u16(status).unwrap(),
        grpc,
    }
}

#[test]
fn which_requests_may_be_retried_at_all() {
    let http = retry(Conditions {
        any_5xx: true,
        ..Default::default()
    });
    let grpc = retry(Conditions {
        grpc: vec![14],
        ..Default::default()
    });
    let unavailable = retry(Conditions {
        unavailable: true,
        ..Default::default()
    });
    let mut posts = http.clone();
    posts.non_idempotent = true;
    let cases = [
        // (policy, method, gRPC, upgrade) -> eligible
        (&http, Method::GET, false, false, true),
        (&http, Method::PUT, false, false, true),
        (&http, Method::POST, false, false, false),
        (&posts, Method::POST, false, false, true),
        (&http, Method::GET, false, true, false),
        // A gRPC call is a POST: retried on the gRPC codes the policy names.
        (&http, Method::POST, true, false, false),
        (&grpc, Method::POST, true, false, true),
        (&unavailable, Method::POST, true, false, true),
        (&grpc, Method::GET, false, false, true),
    ];
    for (i, (r, method, is_grpc, upgrade, want)) in cases.into_iter().enumerate() {
        assert_eq!(eligible(r, &method, is_grpc, upgrade), want, "case {i}");
    }
}

#[test]
fn which_outcomes_the_policy_names() {
    let everything = retry(Conditions {
        connect_failure: true,
        reset: true,
        per_try_timeout: true,
        any_5xx: true,
        ..Default::default()
    });
    let statuses = retry(Conditions {
        statuses: vec![429],
        gateway_error: true,
        ..Default::default()
    });
    let refused = retry(Conditions {
        refused_stream: true,
        grpc: vec![14, 4],
        ..Default::default()
    });
    let cases = [
        // (policy, outcome, gRPC call) -> retriable
        (None, Outcome::ConnectFailed, false, false),
        (Some(&everything), Outcome::ConnectFailed, false, true),
        (Some(&everything), Outcome::Broken, false, true),
        (Some(&everything), Outcome::PerTryTimeout, false, true),
        (Some(&everything), Outcome::RequestTimeout, false, false),
        (Some(&everything), Outcome::NotSent, false, false),
        (Some(&everything), answered(500, None), false, true),
        (Some(&everything), answered(404, None), false, false),
        (Some(&statuses), answered(429, None), false, true),
        (Some(&statuses), answered(503, None), false, true),
        (Some(&statuses), answered(500, None), false, false),
        (Some(&statuses), Outcome::ConnectFailed, false, false),
        (Some(&refused), Outcome::Broken, false, true),
        // gRPC: only the codes named, whatever the HTTP status.
        (Some(&refused), answered(200, Some(14)), true, true),
        (Some(&refused), answered(200, Some(4)), true, true),
        (Some(&refused), answered(200, Some(0)), true, false),
        (Some(&everything), answered(503, Some(14)), true, false),
    ];
    for (i, (r, outcome, is_grpc, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            retriable(outcome, r, is_grpc),
            want,
            "case {i}: {outcome:?}"
        );
    }
}

/// A failed connect goes elsewhere at once (twice), policy or not; the policy's retries
/// follow its count.
#[test]
fn what_follows_an_attempt() {
    use Next::*;
    let cases = [
        // (outcome, retriable, max retries, attempt, elsewhere) -> next
        (Outcome::Broken, false, None, 0, 0, Answer),
        (Outcome::ConnectFailed, false, None, 0, 0, Elsewhere),
        (Outcome::ConnectFailed, false, None, 0, 1, Elsewhere),
        (Outcome::ConnectFailed, false, None, 0, 2, Answer),
        (Outcome::ConnectFailed, true, Some(2), 0, 2, Retry),
        (Outcome::Broken, true, Some(2), 0, 0, Retry),
        (Outcome::Broken, true, Some(2), 2, 0, Answer),
        (Outcome::Broken, true, None, 0, 0, Answer),
        (Outcome::Broken, false, Some(2), 0, 0, Answer),
        (Outcome::NotSent, false, Some(2), 0, 0, Answer),
    ];
    for (i, (outcome, retriable, max, attempt, elsewhere, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            next(outcome, retriable, max, attempt, elsewhere),
            want,
            "case {i}"
        );
    }
}

#[test]
fn backoff_is_full_jitter_under_an_exponential_ceiling_and_honours_retry_after() {
    let r = retry(Conditions::default());
    let cases = [
        // (attempt, jitter, Retry-After) -> pause
        (0, 0.0, None, Duration::ZERO),
        (0, 0.5, None, 12_500 * Duration::from_micros(1)),
        (0, 1.0, None, 25 * MS),
        (1, 1.0, None, 50 * MS),
        (3, 1.0, None, 200 * MS),
        // The ceiling stops at the maximum, however many attempts.
        (4, 1.0, None, 250 * MS),
        (40, 1.0, None, 250 * MS),
        (40, 0.5, None, 125 * MS),
        // What the endpoint asked for, unless the jitter pauses longer.
        (0, 0.5, Some(Duration::from_secs(2)), Duration::from_secs(2)),
        (3, 1.0, Some(100 * MS), 200 * MS),
        // Jitter outside [0, 1] is clamped.
        (0, 7.0, None, 25 * MS),
        (0, -1.0, None, Duration::ZERO),
    ];
    for (i, (attempt, jitter, after, want)) in cases.into_iter().enumerate() {
        assert_eq!(backoff(&r, attempt, jitter, after), want, "case {i}");
    }
}

#[test]
fn deadlines_bound_each_attempt_and_the_pause_before_it() {
    let now = Instant::now();
    let s = Duration::from_secs;
    let cases = [
        // (per try, deadline in, ) -> limit
        (None, None, None),
        (Some(s(1)), None, Some(s(1))),
        (None, Some(s(3)), Some(s(3))),
        (Some(s(1)), Some(s(3)), Some(s(1))),
        (Some(s(5)), Some(s(3)), Some(s(3))),
    ];
    for (i, (per_try, left, want)) in cases.into_iter().enumerate() {
        let deadline = left.map(|l| now + l);
        assert_eq!(attempt_limit(per_try, deadline, now), want, "case {i}");
    }
    // A deadline passed leaves nothing.
    assert_eq!(
        attempt_limit(Some(s(1)), Some(now), now + s(1)),
        Some(Duration::ZERO)
    );
    assert!(fits(now, s(10), None));
    assert!(fits(now, s(1), Some(now + s(2))));
    assert!(!fits(now, s(2), Some(now + s(2))));
    assert!(!fits(now, s(3), Some(now + s(2))));
}

#[test]
fn retry_after_is_read_on_429_and_503_only() {
    let cases = [
        // (status, header) -> pause
        (503, Some("3"), Some(Duration::from_secs(3))),
        (429, Some(" 1 "), Some(Duration::from_secs(1))),
        (429, Some("3600"), Some(Duration::from_secs(60))),
        (500, Some("3"), None),
        (200, Some("3"), None),
        (503, None, None),
        // An HTTP date, read against the clock (here 2015-10-21 07:28:00 UTC): 30 s
        // ahead, an hour ahead (capped), past (no pause); the obsolete RFC 850 form too.
        (
            503,
            Some("Wed, 21 Oct 2015 07:28:30 GMT"),
            Some(Duration::from_secs(30)),
        ),
        (
            429,
            Some("Wed, 21 Oct 2015 08:28:00 GMT"),
            Some(Duration::from_secs(60)),
        ),
        (
            503,
            Some("Wed, 21 Oct 2015 07:00:00 GMT"),
            Some(Duration::ZERO),
        ),
        (
            503,
            Some("Wednesday, 21-Oct-15 07:28:10 GMT"),
            Some(Duration::from_secs(10)),
        ),
        // Garbage is not followed.
        (503, Some("-1"), None),
        (503, Some("soon"), None),
        (503, Some("Wed, 32 Oct 2015 07:28:00 GMT"), None),
    ];
    let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
    for (status, value, want) in cases {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from_static(v));
        }
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(retry_after_at(status, &h, now), want, "{status} {value:?}");
    }
}

#[test]
fn the_budget_is_a_ratio_of_requests_plus_a_floor() {
    let cases = [
        // (requests, retries, ratio, min per second, window) -> allowed
        (100, 0, 0.2, 0, 10, true),
        (100, 19, 0.2, 0, 10, true),
        (100, 20, 0.2, 0, 10, false),
        (100, 29, 0.2, 1, 10, true),
        (100, 30, 0.2, 1, 10, false),
        // Whole retries only.
        (5, 0, 0.2, 0, 10, true),
        (5, 1, 0.2, 0, 10, false),
        (4, 0, 0.2, 0, 10, false),
        // Nothing sent and no floor: nothing to retry.
        (0, 0, 0.2, 0, 10, false),
        (0, 0, 0.0, 1, 1, true),
    ];
    for (i, (requests, retries, ratio, min, window, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            budget_allows(requests, retries, ratio, min, window),
            want,
            "case {i}"
        );
    }
}

/// The budget caps retries at the ratio plus the floor over its window, and what
/// slides out of the window is forgotten.
#[tokio::test(start_paused = true)]
async fn the_budget_slides_with_time() {
    let r = retry(Conditions::default());
    let budget = RetryBudget::default();
    for _ in 0..100 {
        budget.request(r.budget_window);
    }
    let granted = (0..1000).filter(|_| budget.try_retry(&r)).count();
    // 20 % of 100 requests, plus 1 per second over the 10-second window.
    assert_eq!(granted, 30);
    // Half a window later the requests still count, and so do the retries.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(!budget.try_retry(&r));
    // Once they slide out, only the floor is left.
    tokio::time::advance(Duration::from_secs(6)).await;
    let granted = (0..1000).filter(|_| budget.try_retry(&r)).count();
    assert_eq!(granted, 10);
}

#[test]
fn connect_backoff_doubles_up_to_its_maximum() {
    let cases = [
        (0, 500 * MS),
        (1, 500 * MS),
        (2, Duration::from_secs(1)),
        (3, Duration::from_secs(2)),
        (7, Duration::from_secs(30)),
        (u32::MAX, Duration::from_secs(30)),
    ];
    for (failures, want) in cases {
        assert_eq!(connect_backoff(failures), want, "{failures}");
    }
}

fn breaker(consecutive_failures: u32) -> Breaker {
    Breaker {
        consecutive_failures,
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(300),
        ..Breaker::default()
    }
}

/// Consecutive failures ask for an ejection; a success resets the count; once the
/// ejection has passed one probe goes, and its outcome restores or ejects again.
#[tokio::test(start_paused = true)]
async fn the_breaker_ejects_probes_and_restores() {
    let b = breaker(3);
    let mut s = BreakerState::default();
    let now = Instant::now();
    let steps = [
        (false, Verdict::Keep),
        (false, Verdict::Keep),
        (true, Verdict::Keep),
        (false, Verdict::Keep),
        (false, Verdict::Keep),
        (false, Verdict::EjectIfAllowed),
    ];
    for (i, (ok, want)) in steps.into_iter().enumerate() {
        assert_eq!(s.record(ok, &b, now), want, "step {i}");
    }
    s.eject(&b, now, 0.5);
    assert_eq!(s.ejected_until, Some(now + Duration::from_secs(30)));
    assert!(!s.available(now));
    // While ejected, failures that raced the ejection change nothing.
    assert_eq!(s.record(false, &b, now), Verdict::Keep);
    // Half-open: one probe; a failed one ejects again at once, for twice as long.
    let later = now + Duration::from_secs(31);
    assert!(s.available(later));
    s.probing = Some(later + Duration::from_secs(10));
    assert!(!s.available(later), "one probe at a time");
    assert_eq!(s.record(false, &b, later), Verdict::Eject);
    s.eject(&b, later, 0.5);
    assert_eq!(s.ejected_until, Some(later + Duration::from_secs(60)));
    assert_eq!(s.probing, None);
    // A probe that succeeds restores it.
    let after = later + Duration::from_secs(61);
    assert_eq!(s.record(true, &b, after), Verdict::Keep);
    assert_eq!(s.ejected_until, None);
    assert!(s.available(after));
    assert_eq!(s.ejections, 1);
}

#[test]
fn ejections_grow_with_jitter_up_to_the_maximum() {
    let b = breaker(1);
    let now = Instant::now();
    let s = Duration::from_secs;
    let cases = [
        // (earlier ejections, jitter) -> length
        (0, 0.5, s(30)),
        (0, 0.0, s(27)),
        (0, 1.0, s(33)),
        (1, 0.5, s(60)),
        (2, 0.5, s(120)),
        (3, 0.5, s(240)),
        (4, 0.5, s(300)),
        (30, 1.0, s(300)),
    ];
    for (earlier, jitter, want) in cases {
        let mut st = BreakerState {
            ejections: earlier,
            ..Default::default()
        };
        st.eject(&b, now, jitter);
        let got = st.ejected_until.unwrap() - now;
        assert!(
            got.abs_diff(want) < MS,
            "{earlier} {jitter}: {got:?} != {want:?}"
        );
    }
}

#[test]
fn a_breaker_turned_off_forgets_everything() {
    let mut s = BreakerState {
        consecutive_failures: 4,
        ejected_until: Some(Instant::now() + Duration::from_secs(30)),
        probing: None,
        ejections: 2,
    };
    assert_eq!(s.record(false, &breaker(0), Instant::now()), Verdict::Keep);
    assert_eq!(s, BreakerState::default());
}
