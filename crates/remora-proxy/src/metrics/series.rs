//! Which traffic series are in use: a label set with no connection open and none
//! opened for [`SERIES_IDLE`] is dropped from every family, so what a long-lived proxy
//! reports (and keeps in memory) follows the traffic it carries now, not every peer and
//! Service it ever saw.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{Classification, RouteLabels, TrafficLabels};

/// How long an unused series is kept: longer than any scrape interval, so a scrape
/// sees a connection's last counts before they go.
pub const SERIES_IDLE: Duration = Duration::from_secs(15 * 60);

/// The labels a response adds to its connection's.
pub type ResponseKey = (RouteLabels, u16, Classification, Option<u32>);

#[derive(Debug, Default)]
pub struct Series {
    in_use: Mutex<HashMap<TrafficLabels, Use>>,
}

#[derive(Debug)]
struct Use {
    open: usize,
    last: Instant,
    routes: HashSet<RouteLabels>,
    responses: HashSet<ResponseKey>,
}

impl Series {
    /// A connection with `labels` opened.
    pub fn opened(&self, labels: &TrafficLabels) {
        let mut in_use = self.in_use.lock();
        let now = Instant::now();
        let u = in_use.entry(labels.clone()).or_insert_with(|| Use {
            open: 0,
            last: now,
            routes: HashSet::new(),
            responses: HashSet::new(),
        });
        u.open += 1;
        u.last = now;
    }

    /// A connection with `labels` closed.
    pub fn closed(&self, labels: &TrafficLabels) {
        if let Some(u) = self.in_use.lock().get_mut(labels) {
            u.open = u.open.saturating_sub(1);
            u.last = Instant::now();
        }
    }

    /// A connection with `labels` had a request take a route it had not taken before.
    pub fn routed(&self, labels: &TrafficLabels, route: &RouteLabels) {
        if let Some(u) = self.in_use.lock().get_mut(labels) {
            u.routes.insert(route.clone());
        }
    }

    /// A connection with `labels` sent a response of a kind it had not sent before.
    pub fn responded(&self, labels: &TrafficLabels, key: ResponseKey) {
        if let Some(u) = self.in_use.lock().get_mut(labels) {
            u.responses.insert(key);
        }
    }

    /// Calls `remove` for each label set unused for `idle`, and forgets it. Runs under
    /// the lock, so a connection opening meanwhile either keeps the set or starts anew.
    pub fn sweep(
        &self,
        idle: Duration,
        mut remove: impl FnMut(&TrafficLabels, &HashSet<RouteLabels>, &HashSet<ResponseKey>),
    ) {
        let now = Instant::now();
        self.in_use.lock().retain(|labels, u| {
            let expired = u.open == 0 && now.duration_since(u.last) >= idle;
            if expired {
                remove(labels, &u.routes, &u.responses);
            }
            !expired
        });
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.in_use.lock().is_empty()
    }
}
