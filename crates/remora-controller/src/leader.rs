//! Which replica writes statuses. Every replica serves discovery, policy, identity and
//! the webhook; only the holder of the `remora-controller` Lease (in the controller's
//! namespace) writes CRD and HTTPRoute statuses, so two replicas never argue over them.
//! The Lease is held with `kube-leader-election` (get, create, merge patch): renewed
//! every third of its duration, given up on shutdown, taken over by another replica
//! when it expires.
//!
//! Leadership here guards writes that are idempotent and conditional on the object's
//! resourceVersion: in the moment two replicas could both believe they lead (one
//! acquiring an expired Lease as the other renews late), the worst is a write refused
//! with a conflict.

use std::{sync::Arc, time::Duration};

use kube_leader_election::{LeaseLock, LeaseLockParams, LeaseLockResult};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// The Lease's name.
pub const LEASE_NAME: &str = "remora-controller";

/// Whether this replica leads, as it changes.
pub type Leading = watch::Receiver<bool>;

/// The Lease, not yet held.
pub struct Leader {
    lock: Arc<LeaseLock>,
    holder: String,
    duration: Duration,
    tx: watch::Sender<bool>,
}

impl Leader {
    pub fn new(client: kube::Client, namespace: &str, holder: String, duration: Duration) -> Self {
        let lock = LeaseLock::new(
            client,
            namespace,
            LeaseLockParams {
                holder_id: holder.clone(),
                lease_name: LEASE_NAME.into(),
                lease_ttl: duration,
            },
        );
        Self {
            lock: Arc::new(lock),
            holder,
            duration,
            tx: watch::channel(false).0,
        }
    }

    pub fn leading(&self) -> Leading {
        self.tx.subscribe()
    }

    /// Holds the Lease (or waits for it) until `stop`; then gives it up if held.
    pub async fn run(self, metrics: Metrics, stop: CancellationToken) {
        let every = self.duration / 3;
        let mut renewed: Option<tokio::time::Instant> = None;
        loop {
            let attempt = tokio::time::timeout(every, self.lock.try_acquire_or_renew()).await;
            let now = tokio::time::Instant::now();
            let leading = match attempt {
                Ok(Ok(LeaseLockResult::Acquired(_))) => {
                    renewed = Some(now);
                    true
                }
                Ok(Ok(LeaseLockResult::NotAcquired(_))) => false,
                Ok(Err(error)) => {
                    // Another replica created the Lease first, or the API is away: a
                    // leader stays one until its Lease could have expired.
                    warn!(%error, "could not acquire or renew the Lease");
                    renewed.is_some_and(|at| now.duration_since(at) < self.duration)
                }
                Err(_) => {
                    warn!("acquiring or renewing the Lease timed out");
                    renewed.is_some_and(|at| now.duration_since(at) < self.duration)
                }
            };
            if !leading {
                renewed = None;
            }
            if *self.tx.borrow() != leading {
                match leading {
                    true => info!(holder = %self.holder, "leading: this replica writes statuses"),
                    false => {
                        info!(holder = %self.holder, "not leading: another replica writes statuses")
                    }
                }
                metrics.leader.set(i64::from(leading));
            }
            self.tx.send_replace(leading);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        if *self.tx.borrow() {
            self.tx.send_replace(false);
            metrics.leader.set(0);
            // Handed over at once rather than when the Lease expires.
            match tokio::time::timeout(Duration::from_secs(2), self.lock.step_down()).await {
                Ok(Ok(())) => info!("gave up the Lease"),
                Ok(Err(error)) => {
                    warn!(%error, "could not give up the Lease; it expires on its own")
                }
                Err(_) => warn!("giving up the Lease timed out; it expires on its own"),
            }
        }
    }
}
