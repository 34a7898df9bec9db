//! The controller's Prometheus metrics.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::core::Kind;

/// From a source event to the update a proxy receives: 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0,
];

impl EncodeLabelValue for Kind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: Kind,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    objects: Family<KindLabels, Gauge>,
    targets: Gauge,
    pub streams_open: Gauge,
    pub updates_sent: Counter,
    pub update_latency: Histogram,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        remora_admin::register_common(registry, "remora_controller");
        let r = registry.sub_registry_with_prefix("remora_controller");
        let m = Self {
            objects: Family::default(),
            targets: Gauge::default(),
            streams_open: Gauge::default(),
            updates_sent: Counter::default(),
            update_latency: Histogram::new(LATENCY_BUCKETS),
        };
        r.register("objects", "Objects indexed", m.objects.clone());
        r.register(
            "targets",
            "Targets watched by at least one stream",
            m.targets.clone(),
        );
        r.register(
            "streams_open",
            "Destination streams open",
            m.streams_open.clone(),
        );
        r.register(
            "updates_sent",
            "Destination updates sent",
            m.updates_sent.clone(),
        );
        r.register_with_unit(
            "update_latency",
            "From a source event to the update being sent on a stream",
            Unit::Seconds,
            m.update_latency.clone(),
        );
        m
    }

    pub fn set_objects(&self, counts: [(Kind, usize); 6]) {
        for (kind, n) in counts {
            self.objects
                .get_or_create(&KindLabels { kind })
                .set(n as i64);
        }
    }

    pub fn set_targets(&self, n: usize) {
        self.targets.set(n as i64);
    }
}
