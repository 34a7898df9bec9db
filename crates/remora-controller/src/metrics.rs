//! The controller's Prometheus metrics.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::core::Kind;

/// From a source event to the update a proxy receives: the mesh's latency buckets.
pub use remora_admin::LATENCY_BUCKETS;

/// An enum of label values, each with its text.
macro_rules! label_values {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $var:ident => $text:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $var,)* }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$var => $text,)* }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

impl EncodeLabelValue for Kind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: Kind,
}

label_values! {
    /// What a watch event did to an object.
    pub enum WatchEvent {
        /// Added or changed.
        Apply => "apply",
        Delete => "delete",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchEventLabels {
    kind: Kind,
    event: WatchEvent,
}

label_values! {
    /// Which side of a proxy a policy watch is for.
    pub enum Direction {
        Inbound => "inbound",
        Outbound => "outbound",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

label_values! {
    /// Why a gRPC call was refused before it was served.
    pub enum Refusal {
        /// No client certificate (or plaintext, where it is not enabled).
        Unauthenticated => "unauthenticated",
        /// The client has as many streams open as it may.
        TooManyStreams => "too_many_streams",
        /// A workload asked about what its identity may not see.
        PermissionDenied => "permission_denied",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: Refusal,
}

label_values! {
    /// How one `Identity.Certify` call ended.
    pub enum CertifyResult {
        Issued => "issued",
        /// The client asked too often.
        RateLimited => "rate_limited",
        /// The token is not a valid ServiceAccount token for the identity audience.
        BadToken => "bad_token",
        /// The token is valid but for another identity.
        WrongIdentity => "wrong_identity",
        /// The CSR does not name exactly the identity, or its key is not P-256.
        BadCsr => "bad_csr",
        /// The token could not be checked, or no CA is configured.
        Unavailable => "unavailable",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertifyLabels {
    result: CertifyResult,
}

label_values! {
    /// Why a source refused an input.
    pub enum SourceRefusal {
        /// A `dir:` file larger than the limit.
        TooLarge => "too_large",
        /// A `dir:` file nested deeper than the limit.
        TooDeep => "too_deep",
        /// A `dir:` file that could not be read.
        Unreadable => "unreadable",
        /// Malformed YAML, an unknown field, or an object that fails validation.
        Invalid => "invalid",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceRefusalLabels {
    reason: SourceRefusal,
}

label_values! {
    /// What the injector did with one admission review.
    pub enum Injection {
        /// The pod gets the proxy.
        Injected => "injected",
        /// Left alone: not asked for, opted out, hostNetwork, already injected.
        Skipped => "skipped",
        /// The review could not be read: allowed unchanged.
        Malformed => "malformed",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InjectionLabels {
    result: Injection,
}

label_values! {
    /// How re-reading the webhook's serving certificate went.
    pub enum CertReload {
        Reloaded => "reloaded",
        /// Unreadable or mismatched files: the previous certificate stays.
        Failed => "failed",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertReloadLabels {
    result: CertReload,
}

label_values! {
    /// How re-reading the issuer files (certificate, key, trust anchors) went.
    pub enum IssuerReload {
        /// Applied as the files say.
        Reloaded => "reloaded",
        /// The new anchors applied; the new issuer waits until its root is everywhere.
        Held => "held",
        /// Unreadable or inconsistent files: the CA in use stays.
        Failed => "failed",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerReloadLabels {
    result: IssuerReload,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    objects: Family<KindLabels, Gauge>,
    watch_events: Family<WatchEventLabels, Counter>,
    /// Destination targets watched by at least one stream.
    pub targets: Gauge,
    /// 1 while this replica holds the Lease (writes statuses).
    pub leader: Gauge,
    policy_watches: Family<DirectionLabels, Gauge>,
    pub streams_open: Gauge,
    pub updates_sent: Counter,
    pub update_latency: Histogram,
    refused: Family<RefusalLabels, Counter>,
    certify: Family<CertifyLabels, Counter>,
    source_refusals: Family<SourceRefusalLabels, Counter>,
    injections: Family<InjectionLabels, Counter>,
    cert_reloads: Family<CertReloadLabels, Counter>,
    issuer_reloads: Family<IssuerReloadLabels, Counter>,
    /// Certificates in the trust-anchor bundle handed out to proxies.
    trust_anchors: Gauge,
    /// When the issuer in use expires, seconds since the epoch.
    issuer_expiry: Gauge,
    /// When the last certificate of a replaced issuer expires, seconds since the epoch.
    issuer_retired_until: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        remora_admin::register_common(registry, "remora_controller");
        let r = registry.sub_registry_with_prefix("remora_controller");
        let m = Self {
            objects: Family::default(),
            watch_events: Family::default(),
            targets: Gauge::default(),
            leader: Gauge::default(),
            policy_watches: Family::default(),
            streams_open: Gauge::default(),
            updates_sent: Counter::default(),
            update_latency: Histogram::new(LATENCY_BUCKETS),
            refused: Family::default(),
            certify: Family::default(),
            source_refusals: Family::default(),
            injections: Family::default(),
            cert_reloads: Family::default(),
            issuer_reloads: Family::default(),
            trust_anchors: Gauge::default(),
            issuer_expiry: Gauge::default(),
            issuer_retired_until: Gauge::default(),
        };
        r.register("objects", "Objects indexed", m.objects.clone());
        r.register(
            "watch_events",
            "Objects added, changed or deleted as the source reported them, by kind",
            m.watch_events.clone(),
        );
        r.register(
            "targets",
            "Targets watched by at least one stream",
            m.targets.clone(),
        );
        r.register(
            "policy_watches",
            "Workloads (inbound) and targets (outbound) whose policy at least one stream watches",
            m.policy_watches.clone(),
        );
        r.register(
            "grpc_refused",
            "gRPC calls refused before being served, by reason",
            m.refused.clone(),
        );
        r.register(
            "certify",
            "Identity.Certify calls, by result",
            m.certify.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the Lease and writes statuses",
            m.leader.clone(),
        );
        r.register(
            "injections",
            "Admission reviews the injector answered, by result",
            m.injections.clone(),
        );
        r.register(
            "webhook_cert_reloads",
            "Times the webhook's serving certificate files changed, by result",
            m.cert_reloads.clone(),
        );
        r.register(
            "issuer_reloads",
            "Times the issuer files (certificate, key, trust anchors) changed, by result",
            m.issuer_reloads.clone(),
        );
        r.register(
            "trust_anchors",
            "Certificates in the trust-anchor bundle handed out to proxies with their certificates",
            m.trust_anchors.clone(),
        );
        r.register_with_unit(
            "issuer_expiry_timestamp",
            "When the issuer certificate in use expires, seconds since the epoch",
            Unit::Seconds,
            m.issuer_expiry.clone(),
        );
        r.register_with_unit(
            "issuer_retired_until_timestamp",
            "When the last certificate signed by a replaced issuer expires, seconds since the epoch (0: none replaced); its root may be dropped after",
            Unit::Seconds,
            m.issuer_retired_until.clone(),
        );
        r.register(
            "source_refusals",
            "Inputs a source refused (the last good state stays), by reason",
            m.source_refusals.clone(),
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

    /// Counts one event from the source.
    pub fn watch_event(&self, kind: Kind, event: WatchEvent) {
        self.watch_events
            .get_or_create(&WatchEventLabels { kind, event })
            .inc();
    }

    pub fn set_objects(&self, counts: [(Kind, usize); 7]) {
        for (kind, n) in counts {
            self.objects
                .get_or_create(&KindLabels { kind })
                .set(n as i64);
        }
    }

    /// The gauge of workloads or targets whose policy is watched.
    pub fn policy_watches(&self, direction: Direction) -> Gauge {
        self.policy_watches
            .get_or_create_owned(&DirectionLabels { direction })
    }

    pub fn refused(&self, reason: Refusal) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }

    pub fn certified(&self, result: CertifyResult) {
        self.certify.get_or_create(&CertifyLabels { result }).inc();
    }

    pub fn injected(&self, result: Injection) {
        self.injections
            .get_or_create(&InjectionLabels { result })
            .inc();
    }

    pub fn cert_reloaded(&self, result: CertReload) {
        self.cert_reloads
            .get_or_create(&CertReloadLabels { result })
            .inc();
    }

    pub fn issuer_reloaded(&self, result: IssuerReload) {
        self.issuer_reloads
            .get_or_create(&IssuerReloadLabels { result })
            .inc();
    }

    /// The gauges of the CA in use: roots handed out, and when its issuer expires
    /// (seconds since the epoch).
    pub fn set_ca(&self, anchors: usize, issuer_expiry: i64) {
        self.trust_anchors.set(anchors as i64);
        self.issuer_expiry.set(issuer_expiry);
    }

    pub fn set_issuer_retired_until(&self, secs: i64) {
        self.issuer_retired_until.set(secs);
    }

    pub fn source_refused(&self, reason: SourceRefusal) {
        self.source_refusals
            .get_or_create(&SourceRefusalLabels { reason })
            .inc();
    }
}
