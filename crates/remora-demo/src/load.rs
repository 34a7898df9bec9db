//! `remora-demo load`: a steady rate of `GET`s to one URL, counted as the application
//! sees them: statuses, errors and which pod answered. The counts are written as JSON to
//! `REMORA_DEMO_STATS` (a file, replaced atomically) for the demo to read, and a line
//! every five seconds goes to standard output.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde::{Deserialize, Serialize};

/// What the application saw, from the start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Requests started.
    pub sent: u64,
    /// Responses by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no response: a connection error or the client's timeout.
    pub errors: u64,
    /// Successful responses by the pod that answered (`x-served-by`).
    pub served_by: BTreeMap<String, u64>,
    /// Ticks skipped because too many requests were still in flight.
    pub skipped: u64,
}

impl Tally {
    /// Requests answered 2xx.
    pub fn ok(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests that ended (answered, or failed without an answer).
    pub fn done(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.errors
    }

    pub fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code).copied().unwrap_or(0)
    }

    /// What happened between `earlier` and this tally.
    pub fn since(&self, earlier: &Tally) -> Tally {
        fn minus<K: Ord + Clone>(a: &BTreeMap<K, u64>, b: &BTreeMap<K, u64>) -> BTreeMap<K, u64> {
            a.iter()
                .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0).min(*v)))
                .collect()
        }
        Tally {
            sent: self.sent.saturating_sub(earlier.sent),
            statuses: minus(&self.statuses, &earlier.statuses),
            errors: self.errors.saturating_sub(earlier.errors),
            served_by: minus(&self.served_by, &earlier.served_by),
            skipped: self.skipped.saturating_sub(earlier.skipped),
        }
    }
}

/// Most requests in flight at once; past it a tick is skipped (and counted).
const MAX_IN_FLIGHT: usize = 256;

pub async fn run(url: http::Uri, rps: u32, timeout: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(rps > 0, "--rps must be more than zero");
    let stats_file = std::env::var_os("REMORA_DEMO_STATS").map(PathBuf::from);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = tokio::time::interval(Duration::from_millis(200));
    let mut reports = 0u64;
    println!("sending {rps} requests per second to {url}");
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    tally.lock().expect("not poisoned").skipped += 1;
                    continue;
                };
                tally.lock().expect("not poisoned").sent += 1;
                let (client, tally, url) = (client.clone(), tally.clone(), url.clone());
                tokio::spawn(async move {
                    let outcome = tokio::time::timeout(timeout, async {
                        let rsp = client.get(url).await?;
                        let status = rsp.status().as_u16();
                        let served_by = rsp
                            .headers()
                            .get("x-served-by")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        rsp.into_body().collect().await?;
                        anyhow::Ok((status, served_by))
                    })
                    .await;
                    let mut t = tally.lock().expect("not poisoned");
                    match outcome {
                        Ok(Ok((status, served_by))) => {
                            *t.statuses.entry(status).or_default() += 1;
                            if let Some(pod) = served_by.filter(|_| (200..300).contains(&status)) {
                                *t.served_by.entry(pod).or_default() += 1;
                            }
                        }
                        _ => t.errors += 1,
                    }
                    drop(permit);
                });
            }
            _ = report.tick() => {
                let now = tally.lock().expect("not poisoned").clone();
                if let Some(path) = &stats_file {
                    write_atomically(path, &serde_json::to_vec(&now)?)?;
                }
                reports += 1;
                if reports.is_multiple_of(25) {
                    println!(
                        "sent {}, {} ok, {} errors, statuses {:?}",
                        now.sent,
                        now.ok(),
                        now.errors,
                        now.statuses
                    );
                }
            }
        }
    }
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The tally a load client last wrote to `path`; the empty tally before its first.
pub fn read(path: &std::path::Path) -> Tally {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_since_an_earlier_one_counts_what_happened_between() {
        let mut a = Tally {
            sent: 10,
            ..Tally::default()
        };
        a.statuses.insert(200, 8);
        a.served_by.insert("api-1".into(), 8);
        let mut b = a.clone();
        b.sent = 25;
        b.statuses.insert(200, 20);
        b.statuses.insert(403, 3);
        b.errors = 1;
        b.served_by.insert("api-1".into(), 15);
        b.served_by.insert("api-v2-1".into(), 5);
        let d = b.since(&a);
        assert_eq!(d.sent, 15);
        assert_eq!((d.ok(), d.status(403), d.errors, d.done()), (12, 3, 1, 16));
        assert_eq!(d.served_by["api-1"], 7);
        assert_eq!(d.served_by["api-v2-1"], 5);
    }
}
