//! Where the index's objects come from. A source sends [`Event`]s; the index never
//! knows which source is in use.

pub mod dir;
pub mod kube;
pub mod yaml;

use std::{future::Future, pin::Pin};

use tokio::sync::mpsc;

use crate::{core::Event, metrics::Metrics};

/// A stream of timestamped events into the index's single writer.
pub type Events = mpsc::Sender<(Event, std::time::Instant)>;

/// A source of Services, EndpointSlices and Pods.
pub trait Source: Send {
    /// Delivers everything it has, then [`Event::Synced`], then every change, until
    /// the receiver is dropped; counts what it refuses in `metrics`.
    fn run(
        self: Box<Self>,
        events: Events,
        metrics: Metrics,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}
