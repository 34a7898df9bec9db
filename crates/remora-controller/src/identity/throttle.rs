//! How often one client address may ask `Identity.Certify`: a token bucket per
//! address. A proxy certifies once at start and renews every few hours; a client asking
//! many times a second is guessing tokens.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use parking_lot::Mutex;
use tokio::time::Instant;

/// Requests one address may make at once before it is slowed down.
pub const BURST: f64 = 10.0;
/// Requests per second an address earns back: far more than renewals need.
pub const PER_SECOND: f64 = 1.0;
/// Addresses remembered at most; idle ones (whose bucket has refilled) go first.
const MAX_ADDRESSES: usize = 16_384;

#[derive(Debug)]
pub struct Throttle {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant) -> f64 {
        (self.tokens + now.duration_since(self.at).as_secs_f64() * PER_SECOND).min(BURST)
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
        }
    }
}

impl Throttle {
    /// Whether `ip` may make one more request now; if not, how long until it may.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        if buckets.len() >= MAX_ADDRESSES && !buckets.contains_key(&ip) {
            buckets.retain(|_, b| b.refilled(now) < BURST);
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
            tokens: BURST,
            at: now,
        });
        let tokens = bucket.refilled(now);
        if tokens < 1.0 {
            return Err(Duration::from_secs_f64((1.0 - tokens) / PER_SECOND));
        }
        *bucket = Bucket {
            tokens: tokens - 1.0,
            at: now,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_one_a_second_per_address() {
        let t = Throttle::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let admitted = (0..100).filter(|_| t.admit(a).is_ok()).count();
        assert_eq!(admitted, BURST as usize);
        let wait = t.admit(a).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(t.admit(b).is_ok(), "another address is not affected");
        tokio::time::advance(Duration::from_secs(3)).await;
        let admitted = (0..100).filter(|_| t.admit(a).is_ok()).count();
        assert_eq!(admitted, 3, "three seconds earn three requests");
    }
}
