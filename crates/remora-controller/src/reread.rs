//! Files the controller re-reads while it runs (the webhook's serving certificate, the
//! issuer set), as cert-manager and the kubelet replace them: compared with what is in
//! use every few seconds, on a blocking thread, since reading a file blocks.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

/// How often the files are compared with what is in use.
pub const EVERY: Duration = Duration::from_secs(5);

/// Calls `reload` every [`EVERY`] (the first at once), one call at a time, until `stop`.
pub async fn every(stop: CancellationToken, reload: impl Fn() + Send + Sync + 'static) {
    let reload = Arc::new(reload);
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let reload = reload.clone();
                let _ = tokio::task::spawn_blocking(move || reload()).await;
            }
        }
    }
}
