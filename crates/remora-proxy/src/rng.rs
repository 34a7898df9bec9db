//! The proxy's one source of cheap randomness, for jitter and balancer picks (never for
//! anything secret): a xorshift generator per thread, seeded once per thread from the
//! process's random hash keys, so proxies started together do not pick or back off in
//! step.

use std::{
    cell::Cell,
    hash::{BuildHasher, RandomState},
};

thread_local! {
    static STATE: Cell<u64> =
        Cell::new(RandomState::new().hash_one(std::thread::current().id()) | 1);
}

/// A xorshift step: from a non-zero state, the next (never zero).
pub fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A random number.
pub fn random() -> u64 {
    STATE.with(|s| {
        let x = xorshift(s.get());
        s.set(x);
        x
    })
}

/// A random fraction in [0, 1).
pub fn fraction() -> f64 {
    (random() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_cover_the_unit_interval_and_threads_differ() {
        let xs: Vec<f64> = (0..10_000).map(|_| fraction()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((0.45..0.55).contains(&mean), "mean {mean}");
        let here = random();
        let there = std::thread::spawn(random).join().unwrap();
        assert_ne!(here, there, "each thread has its own sequence");
    }
}
