//! When the controller's streams try again. Each stream waits out a jittered backoff
//! (100 ms doubling to 10 s) after a failure. While streams fail, one probe checks every
//! half second whether the controller's port accepts connections again; when it does,
//! every stream in backoff tries at once, rather than when its own backoff ends (a
//! removed endpoint kept getting requests meanwhile). A probe wakes the streams once
//! per outage: if they fail again, their backoffs rule until one of them is answered.

use std::{sync::Arc, time::Duration};

use parking_lot::Mutex;
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info};

use crate::rng::xorshift;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often a probe tries the controller's port while streams fail.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Shared by every stream to one controller.
#[derive(Debug, Clone)]
pub struct Reconnected(Arc<Hub>);

#[derive(Debug)]
struct Hub {
    wake: watch::Sender<u64>,
    /// `host:port` to probe; none: no probe (streams follow their backoff).
    authority: Option<String>,
    probe: Mutex<Probe>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Nothing fails, or a probe is not needed.
    Idle,
    Running,
    /// The probe found the port open and woke the streams: no other until a stream is
    /// answered.
    Announced,
}

impl Default for Reconnected {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Reconnected {
    /// For streams to the controller at `authority` (`host:port`), probed while they
    /// fail; without one, never probed.
    pub fn new(authority: Option<String>) -> Self {
        Self(Arc::new(Hub {
            wake: watch::channel(0).0,
            authority,
            probe: Mutex::new(Probe::Idle),
        }))
    }

    /// The backoff of one stream.
    pub fn backoff(&self, seed: u64) -> Backoff {
        Backoff {
            next: BACKOFF_MIN,
            seed: seed | 1,
            woken: self.0.wake.subscribe(),
            hub: self.clone(),
            failing: false,
        }
    }

    fn wake_all(&self) {
        self.0.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A stream failed: make sure a probe watches for the controller's return.
    fn failed(&self) {
        let Some(authority) = self.0.authority.clone() else {
            return;
        };
        {
            let mut probe = self.0.probe.lock();
            if *probe != Probe::Idle {
                return;
            }
            *probe = Probe::Running;
        }
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                if *hub.0.probe.lock() != Probe::Running {
                    return;
                }
                let connect = tokio::net::TcpStream::connect(authority.as_str());
                if let Ok(Ok(_)) = tokio::time::timeout(PROBE_INTERVAL, connect).await {
                    let mut probe = hub.0.probe.lock();
                    if *probe == Probe::Running {
                        *probe = Probe::Announced;
                        drop(probe);
                        info!(controller = %authority, "the controller answers again: resubscribing");
                        hub.wake_all();
                    }
                    return;
                }
                debug!(controller = %authority, "the controller is still unreachable");
            }
        });
    }

    /// A stream that had failed was answered: the outage is over.
    fn recovered(&self) {
        *self.0.probe.lock() = Probe::Idle;
        self.wake_all();
    }
}

/// The pause before a controller stream is started again.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    seed: u64,
    woken: watch::Receiver<u64>,
    hub: Reconnected,
    /// The stream failed and has not heard from the controller since.
    failing: bool,
}

impl Backoff {
    /// The stream heard from the controller. If it had been failing, the controller is
    /// back: every stream still in backoff tries at once.
    pub fn answered(&mut self) {
        if self.failing {
            self.failing = false;
            self.next = BACKOFF_MIN;
            self.hub.recovered();
            self.woken.borrow_and_update();
        }
    }

    /// Sleeps before the next attempt of a stream that started at `started`, or until
    /// the controller is known to be back. A stream that lived a while was healthy: the
    /// backoff starts over.
    pub async fn pause(&mut self, started: Instant) {
        self.failing = true;
        self.hub.failed();
        if started.elapsed() > BACKOFF_MAX {
            self.next = BACKOFF_MIN;
        }
        self.seed = xorshift(self.seed);
        let jitter = 0.5 + (self.seed % 1000) as f64 / 1000.0;
        let pause = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        self.woken.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = self.woken.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12: after the controller came back, a removed endpoint kept getting requests
    /// for 3-4 s, until each stream's own backoff ended.
    #[tokio::test(start_paused = true)]
    async fn streams_in_backoff_try_again_once_the_controller_port_opens() {
        // A port nothing listens on yet.
        let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = spare.local_addr().unwrap();
        drop(spare);
        let hub = Reconnected::new(Some(addr.to_string()));
        let mut slow = hub.backoff(1);
        // A stream that has failed many times: its next pause is long.
        for _ in 0..8 {
            slow.next = (slow.next * 2).min(BACKOFF_MAX);
        }
        let waiting = tokio::spawn(async move {
            let started = Instant::now();
            slow.pause(Instant::now()).await;
            started.elapsed()
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The controller comes back: the probe sees its port within half a second.
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let waited = waiting.await.unwrap();
        assert!(
            waited < Duration::from_secs(3),
            "woken by the probe, not at the end of its backoff: {waited:?}"
        );
        drop(listener);
    }

    #[tokio::test(start_paused = true)]
    async fn one_answered_stream_wakes_the_others() {
        let hub = Reconnected::default();
        let mut a = hub.backoff(1);
        let mut b = hub.backoff(2);
        b.next = BACKOFF_MAX;
        let waiting = tokio::spawn(async move {
            let started = Instant::now();
            b.pause(Instant::now()).await;
            started.elapsed()
        });
        a.pause(Instant::now()).await;
        a.answered();
        let waited = waiting.await.unwrap();
        assert!(waited < BACKOFF_MIN * 2, "{waited:?}");
    }
}
