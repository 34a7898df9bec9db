//! The proxy's Prometheus metrics. Names and labels are part of the contract
//! (see docs/contract.md); every label set here is bounded.

mod series;

use std::sync::Arc;

use parking_lot::Mutex;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// Request durations: the mesh's latency buckets, 100 µs to 30 s.
pub use remora_admin::LATENCY_BUCKETS;

/// Buckets for protocol detection time, in seconds: 10 µs (the client had spoken
/// already) up to the default detect timeout.
pub const DETECT_BUCKETS: [f64; 12] = [
    0.00001, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
];

/// Which side of the pod a connection came in on.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// The labels every traffic metric carries.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub direction: Direction,
    /// Outbound: the Service as `name.namespace:port`, or `passthrough`; inbound: the port.
    pub target: Arc<str>,
    pub tls: bool,
    /// The peer's SPIFFE ID, or empty when the connection is not mutually authenticated.
    pub peer_identity: Arc<str>,
    /// Inbound: the authorization policy that judged the connection and its requests
    /// (`namespace/name` of the AuthorizationPolicies, or `default:<policy>`), as it was
    /// when the connection was accepted; empty outbound.
    pub authz_name: Arc<str>,
}

/// Whether a response counts as a success.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Classification {
    Success,
    Failure,
}

impl EncodeLabelValue for Classification {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = match self {
            Classification::Success => "success",
            Classification::Failure => "failure",
        };
        EncodeLabelValue::encode(&s, encoder)
    }
}

/// Which route and backend an outbound HTTP request took, so a canary's success rate
/// and latency are one query. Empty inbound and for passthrough; a request no HTTPRoute
/// matched has empty route labels and its Service as the backend.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The HTTPRoute's name.
    pub route_name: Arc<str>,
    /// The HTTPRoute's namespace.
    pub route_namespace: Arc<str>,
    /// The Service the request went to, as `name.namespace:port` (a weighted rule's pick).
    pub backend: Arc<str>,
}

/// Optional labels left empty in every family (`REMORA_METRICS_OMIT_LABELS`), for
/// installs that want fewer series: `peer_identity` (one series per calling identity),
/// `authz_name`, and `route` (`route_name`, `route_namespace`, `backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Omit {
    pub peer_identity: bool,
    pub authz_name: bool,
    pub route: bool,
}

impl Omit {
    /// A comma-separated list of `peer_identity`, `authz_name` and `route`; empty for none.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut o = Self::default();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "peer_identity" => o.peer_identity = true,
                "authz_name" => o.authz_name = true,
                "route" => o.route = true,
                other => {
                    return Err(format!(
                        "{other} is not an optional label: peer_identity, authz_name or route"
                    ));
                }
            }
        }
        Ok(o)
    }

    fn traffic(self, labels: &TrafficLabels) -> TrafficLabels {
        let mut l = labels.clone();
        if self.peer_identity {
            l.peer_identity = empty_label();
        }
        if self.authz_name {
            l.authz_name = empty_label();
        }
        l
    }
}

/// An empty label value, shared: labels are cloned per request, and an `Arc<str>` of
/// its own would be an allocation each time.
pub fn empty_label() -> Arc<str> {
    static EMPTY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from("")).clone()
}

impl Default for RouteLabels {
    fn default() -> Self {
        Self {
            route_name: empty_label(),
            route_namespace: empty_label(),
            backend: empty_label(),
        }
    }
}

/// The labels of a request's latency: its connection's and its route's.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    #[prometheus(flatten)]
    pub traffic: TrafficLabels,
    #[prometheus(flatten)]
    pub route: RouteLabels,
}

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Timeout {
    /// The request's own (`timeouts.request`, or the rule's): it was answered 504.
    Request,
    /// One attempt's (`timeouts.perTry`, or the rule's `backendRequest`): it may have
    /// been retried.
    PerTry,
}

impl Timeout {
    const ALL: [Timeout; 2] = [Timeout::Request, Timeout::PerTry];
}

impl EncodeLabelValue for Timeout {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = match self {
            Timeout::Request => "request",
            Timeout::PerTry => "per_try",
        };
        EncodeLabelValue::encode(&s, encoder)
    }
}

/// The labels of a timeout: its request's connection and route, and which limit.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    #[prometheus(flatten)]
    pub traffic: TrafficLabels,
    #[prometheus(flatten)]
    pub route: RouteLabels,
    pub timeout: Timeout,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    #[prometheus(flatten)]
    pub traffic: TrafficLabels,
    #[prometheus(flatten)]
    pub route: RouteLabels,
    /// The HTTP status; 0 when no response headers arrived (the stream failed).
    pub status_code: u16,
    pub classification: Classification,
    /// The gRPC status from the trailers (or trailers-only headers); empty when not gRPC.
    pub grpc_status: Option<u32>,
}

/// The outcome of protocol detection, one label value each.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum DetectResult {
    Http1,
    Http2,
    /// A TLS ClientHello.
    Tls,
    /// The client's bytes were not HTTP.
    Opaque,
    /// The server spoke before the client did.
    ServerFirst,
    /// The client said nothing within the detect timeout.
    Timeout,
    /// The client closed before its bytes said anything.
    ClientClosed,
    /// The port is configured opaque: no detection was tried.
    OpaquePort,
}

impl DetectResult {
    pub fn as_str(self) -> &'static str {
        match self {
            DetectResult::Http1 => "http1",
            DetectResult::Http2 => "http2",
            DetectResult::Tls => "tls",
            DetectResult::Opaque => "opaque",
            DetectResult::ServerFirst => "server_first",
            DetectResult::Timeout => "timeout",
            DetectResult::ClientClosed => "client_closed",
            DetectResult::OpaquePort => "opaque_port",
        }
    }
}

impl EncodeLabelValue for DetectResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// An endpoint's state for `remora_endpoints`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum EndpointState {
    Ready,
    Terminating,
    /// Ejected by the circuit breaker, or half-open and not yet proven healthy.
    Ejected,
}

impl EncodeLabelValue for EndpointState {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = match self {
            EndpointState::Ready => "ready",
            EndpointState::Terminating => "terminating",
            EndpointState::Ejected => "ejected",
        };
        EncodeLabelValue::encode(&s, encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The Service as `name.namespace:port`.
    pub target: String,
    pub state: EndpointState,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    pub direction: Direction,
    pub result: DetectResult,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the data path records.
#[derive(Debug, Clone)]
pub struct Metrics {
    tcp_opened: Family<TrafficLabels, Counter>,
    tcp_closed: Family<TrafficLabels, Counter>,
    tcp_open: Family<TrafficLabels, Gauge>,
    tcp_read: Family<TrafficLabels, Counter>,
    tcp_written: Family<TrafficLabels, Counter>,
    http_requests: Family<TrafficLabels, Counter>,
    http_responses: Family<ResponseLabels, Counter>,
    http_duration: HistogramFamily<DurationLabels>,
    detect_total: Family<DetectLabels, Counter>,
    detect_duration: HistogramFamily<DetectLabels>,
    authz_denied: Family<TrafficLabels, Counter>,
    tls_failures: Family<DirectionLabels, Counter>,
    http_retries: Family<DurationLabels, Counter>,
    http_timeouts: Family<TimeoutLabels, Counter>,
    endpoints: Family<EndpointLabels, Gauge>,
    budget_exhausted: Family<DurationLabels, Counter>,
    ejections: Family<TrafficLabels, Counter>,
    tcp_refused: Family<DirectionLabels, Counter>,
    tcp_idle_closed: Family<DirectionLabels, Counter>,
    http2_calmed: Family<DirectionLabels, Counter>,
    /// Inbound connections judged by the configured default policy because the
    /// controller had not answered yet.
    pub authz_fallbacks: Counter,
    /// Destination streams to the controller that ended and were started again.
    pub control_reconnects: Counter,
    /// When the current certificate expires, seconds since the epoch.
    pub cert_expiry: Gauge,
    /// Certify calls that failed (the first or a renewal).
    pub certify_failures: Counter,
    /// Certificates in the trust-anchor bundle in use.
    pub trust_anchors: Gauge,
    /// Trust-anchor bundles from the controller that were not trusted.
    pub trust_anchors_refused: Counter,
    /// The traffic label sets in use, for expiry.
    series: Arc<series::Series>,
    /// Lines of the access log dropped because its queue was full.
    pub access_log_dropped: Counter,
    /// Traffic label sets dropped from every family after going unused.
    series_expired: Counter,
    /// Where each request's line goes, when `REMORA_ACCESS_LOG` is on.
    access_log: Option<crate::access_log::AccessLog>,
    /// Optional labels left empty.
    omit: Omit,
}

impl Metrics {
    /// Registers the `remora_*` families in `registry` and the `process_*` ones at its root.
    pub fn register(registry: &mut Registry) -> Self {
        remora_admin::register_common(registry, "remora");
        let r = registry.sub_registry_with_prefix("remora");
        let m = Self {
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_open: Family::default(),
            tcp_read: Family::default(),
            tcp_written: Family::default(),
            http_requests: Family::default(),
            http_responses: Family::default(),
            http_duration: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            detect_total: Family::default(),
            detect_duration: Family::new_with_constructor(|| Histogram::new(DETECT_BUCKETS)),
            authz_denied: Family::default(),
            tls_failures: Family::default(),
            http_retries: Family::default(),
            http_timeouts: Family::default(),
            endpoints: Family::default(),
            budget_exhausted: Family::default(),
            ejections: Family::default(),
            tcp_refused: Family::default(),
            tcp_idle_closed: Family::default(),
            http2_calmed: Family::default(),
            authz_fallbacks: Counter::default(),
            control_reconnects: Counter::default(),
            cert_expiry: Gauge::default(),
            certify_failures: Counter::default(),
            trust_anchors: Gauge::default(),
            trust_anchors_refused: Counter::default(),
            series: Arc::default(),
            access_log_dropped: Counter::default(),
            series_expired: Counter::default(),
            access_log: None,
            omit: Omit::default(),
        };
        r.register(
            "metrics_series_expired",
            "Traffic label sets dropped from every family after 15 minutes with no connection",
            m.series_expired.clone(),
        );
        r.register(
            "access_log_dropped",
            "Access log lines dropped because standard output could not keep up",
            m.access_log_dropped.clone(),
        );
        r.register(
            "tcp_connections_refused",
            "Connections reset at once because the listener's connection limit was reached",
            m.tcp_refused.clone(),
        );
        r.register(
            "http2_abuse_goaways",
            "HTTP/2 connections ended with GOAWAY ENHANCE_YOUR_CALM because the client reset or broke streams faster than it used them (rapid reset)",
            m.http2_calmed.clone(),
        );
        r.register(
            "tcp_idle_timeouts",
            "Connections closed by the idle timeout: opaque TCP after no bytes, inbound HTTP/2 after no request in flight",
            m.tcp_idle_closed.clone(),
        );
        r.register(
            "authz_policy_fallbacks",
            "Inbound connections judged by the configured default policy because the controller had not answered yet",
            m.authz_fallbacks.clone(),
        );
        r.register(
            "http_retries",
            "Requests sent again after a retriable failure",
            m.http_retries.clone(),
        );
        r.register(
            "http_timeouts",
            "Requests and attempts that ran out of time, by the limit they hit",
            m.http_timeouts.clone(),
        );
        r.register(
            "endpoints",
            "Endpoints of each Service destination in use, by state",
            m.endpoints.clone(),
        );
        r.register(
            "retry_budget_exhausted",
            "Retries not made because the retry budget was spent",
            m.budget_exhausted.clone(),
        );
        r.register(
            "endpoint_ejections",
            "Endpoints ejected by the circuit breaker after consecutive failures",
            m.ejections.clone(),
        );
        r.register(
            "authz_denied",
            "Inbound connections and requests refused by authorization policy",
            m.authz_denied.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "mTLS handshakes between proxies that failed (untrusted, wrong identity, expired, no certificate)",
            m.tls_failures.clone(),
        );
        r.register(
            "tcp_connections_opened",
            "TCP connections accepted",
            m.tcp_opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        r.register(
            "tcp_connections_open",
            "TCP connections open now",
            m.tcp_open.clone(),
        );
        r.register(
            "tcp_read_bytes",
            "Bytes read from accepted connections",
            m.tcp_read.clone(),
        );
        r.register(
            "tcp_written_bytes",
            "Bytes written to accepted connections",
            m.tcp_written.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests received",
            m.http_requests.clone(),
        );
        r.register(
            "http_responses",
            "HTTP responses sent, counted when the response stream ends",
            m.http_responses.clone(),
        );
        r.register_with_unit(
            "http_response_duration",
            "Time from a request's arrival to its response headers",
            Unit::Seconds,
            m.http_duration.clone(),
        );
        r.register(
            "protocol_detect",
            "Protocol detection outcomes",
            m.detect_total.clone(),
        );
        r.register_with_unit(
            "protocol_detect_duration",
            "Time protocol detection took",
            Unit::Seconds,
            m.detect_duration.clone(),
        );
        r.register(
            "control_stream_reconnects",
            "Controller streams that ended and were started again",
            m.control_reconnects.clone(),
        );
        r.register_with_unit(
            "identity_cert_expiry_timestamp",
            "When the proxy's certificate expires, seconds since the epoch",
            Unit::Seconds,
            m.cert_expiry.clone(),
        );
        r.register(
            "identity_certify_failures",
            "Certify calls to the controller that failed (unreachable, a refused token or CSR, an unusable answer)",
            m.certify_failures.clone(),
        );
        r.register(
            "identity_trust_anchors",
            "Certificates in the trust-anchor bundle in use: the configured one, then the controller's",
            m.trust_anchors.clone(),
        );
        r.register(
            "identity_trust_anchors_refused",
            "Trust-anchor bundles from the controller that were not trusted (the new certificate did not chain to them)",
            m.trust_anchors_refused.clone(),
        );
        m
    }

    /// Counts a newly accepted connection; the returned handle counts its bytes and,
    /// when dropped, its close.
    pub fn connection(&self, labels: &TrafficLabels) -> ConnMetrics {
        let labels = &self.omit.traffic(labels);
        // Marked in use first: a sweep then either keeps the series or has finished.
        self.series.opened(labels);
        self.tcp_opened.get_or_create(labels).inc();
        let open = self.tcp_open.get_or_create_owned(labels);
        open.inc();
        ConnMetrics {
            read: self.tcp_read.get_or_create_owned(labels),
            written: self.tcp_written.get_or_create_owned(labels),
            closed: self.tcp_closed.get_or_create_owned(labels),
            open,
            series: self.series.clone(),
            labels: labels.clone(),
        }
    }

    /// Leaves the labels `omit` names empty in every family from now on.
    pub fn set_omit(&mut self, omit: Omit) {
        self.omit = omit;
    }

    /// Sends every HTTP request's line to `log` from now on.
    pub fn set_access_log(&mut self, log: crate::access_log::AccessLog) {
        self.access_log = Some(log);
    }

    /// Drops every series unused (no connection open, none opened) for `idle`.
    pub fn expire_idle(&self, idle: std::time::Duration) {
        self.series.sweep(idle, |labels, routes, responses| {
            self.series_expired.inc();
            self.tcp_opened.remove(labels);
            self.tcp_closed.remove(labels);
            self.tcp_open.remove(labels);
            self.tcp_read.remove(labels);
            self.tcp_written.remove(labels);
            self.http_requests.remove(labels);
            self.authz_denied.remove(labels);

            self.ejections.remove(labels);
            for route in routes {
                let with_route = DurationLabels {
                    traffic: labels.clone(),
                    route: route.clone(),
                };
                self.http_duration.remove(&with_route);
                self.http_retries.remove(&with_route);
                self.budget_exhausted.remove(&with_route);
                for timeout in Timeout::ALL {
                    self.http_timeouts.remove(&TimeoutLabels {
                        traffic: labels.clone(),
                        route: route.clone(),
                        timeout,
                    });
                }
            }
            for (route, status_code, classification, grpc_status) in responses {
                self.http_responses.remove(&ResponseLabels {
                    traffic: labels.clone(),
                    route: route.clone(),
                    status_code: *status_code,
                    classification: *classification,
                    grpc_status: *grpc_status,
                });
            }
        });
    }

    pub fn detected(
        &self,
        direction: Direction,
        result: DetectResult,
        elapsed: std::time::Duration,
    ) {
        let labels = DetectLabels { direction, result };
        self.detect_total.get_or_create(&labels).inc();
        self.detect_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// The resilience counters of one client connection's requests to a Service.
    pub fn resilience(&self, labels: &TrafficLabels) -> ResilienceCounters {
        let labels = &self.omit.traffic(labels);
        let counters = ResilienceCounters {
            omit_route: self.omit.route,
            retries: self.http_retries.clone(),
            timeouts: self.http_timeouts.clone(),
            budget_exhausted: self.budget_exhausted.clone(),
            ejections: self.ejections.get_or_create_owned(labels),
            labels: labels.clone(),
        };
        // The Service's own route from the start, at zero: a dashboard's rate reads 0,
        // not "no data", until something is retried.
        let unrouted = RouteLabels {
            backend: labels.target.clone(),
            ..RouteLabels::default()
        };
        // The series as the family keys it (the route left empty where omitted), so it
        // expires with the connection's.
        let with_route = counters.with_route(&unrouted);
        self.series.routed(labels, &with_route.route);
        self.http_retries.get_or_create(&with_route).inc_by(0);
        self.budget_exhausted.get_or_create(&with_route).inc_by(0);
        for timeout in Timeout::ALL {
            counters
                .timeouts
                .get_or_create(&counters.timed_out_labels(&unrouted, timeout))
                .inc_by(0);
        }
        counters
    }

    /// Replaces `remora_endpoints` with `census`: (target, ready, terminating, ejected).
    pub fn set_endpoints(&self, census: &[(String, [usize; 3])]) {
        self.endpoints.clear();
        for (target, counts) in census {
            let states = [
                EndpointState::Ready,
                EndpointState::Terminating,
                EndpointState::Ejected,
            ];
            for (state, n) in states.into_iter().zip(counts) {
                let labels = EndpointLabels {
                    target: target.clone(),
                    state,
                };
                self.endpoints.get_or_create(&labels).set(*n as i64);
            }
        }
    }

    /// The counter of connections refused at the connection limit.
    pub fn tcp_refused(&self, direction: Direction) -> Counter {
        self.tcp_refused
            .get_or_create_owned(&DirectionLabels { direction })
    }

    /// The counter of opaque connections closed for idleness.
    pub fn tcp_idle_closed(&self, direction: Direction) -> Counter {
        self.tcp_idle_closed
            .get_or_create_owned(&DirectionLabels { direction })
    }

    /// Counts a connection refused by inbound policy.
    pub fn denied(&self, labels: &TrafficLabels) {
        self.authz_denied
            .get_or_create(&self.omit.traffic(labels))
            .inc();
    }

    /// The counter of failed mTLS handshakes on one side.
    pub fn tls_failures(&self, direction: Direction) -> Counter {
        self.tls_failures
            .get_or_create_owned(&DirectionLabels { direction })
    }

    /// Handles for one connection's HTTP requests.
    pub fn http(&self, labels: TrafficLabels) -> HttpMetrics {
        let peer_identity = labels.peer_identity.clone();
        let labels = self.omit.traffic(&labels);
        HttpMetrics {
            calmed: self.http2_calmed.clone(),
            peer_identity,
            omit_route: self.omit.route,
            denied: self.authz_denied.get_or_create_owned(&labels),
            requests: self.http_requests.get_or_create_owned(&labels),
            durations: self.http_duration.clone(),
            routes: Arc::default(),
            responses: self.http_responses.clone(),
            seen: Arc::default(),
            series: self.series.clone(),
            access_log: self.access_log.clone(),
            labels,
        }
    }
}

pub use series::SERIES_IDLE;

/// Counters of the resilience a Service's policy adds: retries and spent budgets by
/// the route the request took, ejections by the Service.
#[derive(Debug, Clone)]
pub struct ResilienceCounters {
    retries: Family<DurationLabels, Counter>,
    timeouts: Family<TimeoutLabels, Counter>,
    budget_exhausted: Family<DurationLabels, Counter>,
    pub ejections: Counter,
    labels: TrafficLabels,
    omit_route: bool,
}

impl ResilienceCounters {
    fn with_route(&self, route: &RouteLabels) -> DurationLabels {
        DurationLabels {
            traffic: self.labels.clone(),
            route: if self.omit_route {
                RouteLabels::default()
            } else {
                route.clone()
            },
        }
    }

    /// A request that took `route` is sent again.
    pub fn retried(&self, route: &RouteLabels) {
        self.retries.get_or_create(&self.with_route(route)).inc();
    }

    fn timed_out_labels(&self, route: &RouteLabels, timeout: Timeout) -> TimeoutLabels {
        let DurationLabels { traffic, route } = self.with_route(route);
        TimeoutLabels {
            traffic,
            route,
            timeout,
        }
    }

    /// A request that took `route`, or one of its attempts, ran into `timeout`.
    pub fn timed_out(&self, route: &RouteLabels, timeout: Timeout) {
        self.timeouts
            .get_or_create(&self.timed_out_labels(route, timeout))
            .inc();
    }

    /// A request that took `route` was not retried: the budget was spent.
    pub fn budget_exhausted(&self, route: &RouteLabels) {
        self.budget_exhausted
            .get_or_create(&self.with_route(route))
            .inc();
    }
}

/// One connection's counters. Dropping it counts the close.
#[derive(Debug)]
pub struct ConnMetrics {
    pub read: Counter,
    pub written: Counter,
    closed: Counter,
    open: Gauge,
    series: Arc<series::Series>,
    labels: TrafficLabels,
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        self.open.dec();
        self.closed.inc();
        self.series.closed(&self.labels);
    }
}

/// Counts HTTP/2 connections ended for abuse (GOAWAY ENHANCE_YOUR_CALM), looking the
/// series up only when one is (rarely).
#[derive(Debug, Clone)]
pub struct Abuse {
    family: Family<DirectionLabels, Counter>,
    direction: Direction,
}

impl Abuse {
    pub fn inc(&self) {
        self.family
            .get_or_create(&DirectionLabels {
                direction: self.direction,
            })
            .inc();
    }
}

/// One connection's HTTP metric handles.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    pub requests: Counter,
    /// Requests refused by inbound policy.
    pub denied: Counter,
    /// HTTP/2 connections ended for abuse (GOAWAY ENHANCE_YOUR_CALM).
    calmed: Family<DirectionLabels, Counter>,
    durations: HistogramFamily<DurationLabels>,
    /// The routes this connection's requests took, with their latency histograms: few
    /// per connection, so a request finds its own without touching the family.
    routes: Arc<Mutex<Vec<(RouteLabels, Histogram)>>>,
    responses: Family<ResponseLabels, Counter>,
    /// The kinds of response this connection has sent, told to `series` once each.
    seen: Arc<Mutex<Vec<series::ResponseKey>>>,
    series: Arc<series::Series>,
    access_log: Option<crate::access_log::AccessLog>,
    /// The labels of the connection's series (optional ones left empty as configured).
    labels: TrafficLabels,
    /// The peer's identity whatever the labels omit, for the access log.
    peer_identity: Arc<str>,
    omit_route: bool,
}

impl HttpMetrics {
    /// The peer's SPIFFE ID (or empty), even where the metrics omit it.
    pub fn peer_identity(&self) -> &Arc<str> {
        &self.peer_identity
    }

    /// The access log, when it is on.
    pub fn access_log(&self) -> Option<&crate::access_log::AccessLog> {
        self.access_log.as_ref()
    }

    /// Where an HTTP/2 connection ended for abuse is counted.
    pub fn abuse(&self) -> Abuse {
        Abuse {
            family: self.calmed.clone(),
            direction: self.labels.direction,
        }
    }

    /// The connection's labels.
    pub fn labels(&self) -> &TrafficLabels {
        &self.labels
    }

    /// The handles for one request that took `route` (this is the request's own copy of
    /// its connection's handles).
    pub fn routed(self, route: RouteLabels) -> RequestMetrics {
        let route = if self.omit_route {
            RouteLabels::default()
        } else {
            route
        };
        let duration = {
            let mut routes = self.routes.lock();
            match routes.iter().find(|(r, _)| *r == route) {
                Some((_, h)) => h.clone(),
                None => {
                    self.series.routed(&self.labels, &route);
                    let h = self.durations.get_or_create_owned(&DurationLabels {
                        traffic: self.labels.clone(),
                        route: route.clone(),
                    });
                    routes.push((route.clone(), h.clone()));
                    h
                }
            }
        };
        RequestMetrics {
            http: self,
            route,
            duration,
        }
    }
}

/// One request's metric handles, its route known.
#[derive(Debug)]
pub struct RequestMetrics {
    http: HttpMetrics,
    route: RouteLabels,
    duration: Histogram,
}

impl RequestMetrics {
    /// The connection's handles.
    pub fn http(&self) -> &HttpMetrics {
        &self.http
    }

    /// Records the time from the request's arrival to its response headers.
    pub fn answered_after(&self, elapsed: std::time::Duration) {
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Counts the response once its stream ended (`complete`) or broke.
    pub fn response(&self, status_code: u16, grpc_status: Option<u32>, complete: bool) {
        let failed = !complete || status_code >= 500 || grpc_status.is_some_and(|c| c != 0);
        let classification = if failed {
            Classification::Failure
        } else {
            Classification::Success
        };
        let http = &self.http;
        {
            let mut seen = http.seen.lock();
            let known = seen.iter().any(|(r, s, c, g)| {
                (*s, *c, *g) == (status_code, classification, grpc_status) && *r == self.route
            });
            if !known {
                let key = (self.route.clone(), status_code, classification, grpc_status);
                http.series.responded(&http.labels, key.clone());
                seen.push(key);
            }
        }
        let labels = ResponseLabels {
            traffic: http.labels.clone(),
            route: self.route.clone(),
            status_code,
            classification,
            grpc_status,
        };
        http.responses.get_or_create(&labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> TrafficLabels {
        TrafficLabels {
            direction: Direction::Outbound,
            target: Arc::from("passthrough"),
            tls: false,
            peer_identity: Arc::from(""),
            authz_name: Arc::from(""),
        }
    }

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn contract_names_and_labels() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        let conn = m.connection(&labels());
        conn.read.inc_by(7);
        let http = m.http(labels());
        http.requests.inc();
        let req = http.clone().routed(RouteLabels::default());
        req.response(200, Some(0), true);
        req.response(200, Some(14), true);
        req.response(503, None, true);
        let canary = RouteLabels {
            route_name: "web-split".into(),
            route_namespace: "shop".into(),
            backend: "web-v2.shop:80".into(),
        };
        let resilience = m.resilience(&labels());
        resilience.retried(&canary);
        resilience.budget_exhausted(&canary);
        resilience.timed_out(&canary, Timeout::PerTry);
        resilience.timed_out(&canary, Timeout::PerTry);
        resilience.timed_out(&canary, Timeout::Request);
        let req = http.clone().routed(canary);
        req.answered_after(std::time::Duration::from_millis(3));
        req.response(200, None, true);
        m.detected(
            Direction::Inbound,
            DetectResult::ServerFirst,
            std::time::Duration::ZERO,
        );
        let text = render(&registry);
        let common = r#"direction="outbound",target="passthrough",tls="false",peer_identity="",authz_name="""#;
        let unrouted = r#"route_name="",route_namespace="",backend="""#;
        let canary = r#"route_name="web-split",route_namespace="shop",backend="web-v2.shop:80""#;
        for line in [
            format!("remora_tcp_connections_opened_total{{{common}}} 1"),
            format!("remora_tcp_connections_open{{{common}}} 1"),
            format!("remora_tcp_read_bytes_total{{{common}}} 7"),
            format!("remora_http_requests_total{{{common}}} 1"),
            format!(
                "remora_http_responses_total{{{common},{unrouted},status_code=\"200\",classification=\"success\",grpc_status=\"0\"}} 1"
            ),
            format!(
                "remora_http_responses_total{{{common},{unrouted},status_code=\"200\",classification=\"failure\",grpc_status=\"14\"}} 1"
            ),
            format!(
                "remora_http_responses_total{{{common},{unrouted},status_code=\"503\",classification=\"failure\",grpc_status=\"\"}} 1"
            ),
            format!(
                "remora_http_responses_total{{{common},{canary},status_code=\"200\",classification=\"success\",grpc_status=\"\"}} 1"
            ),
            format!(
                "remora_http_response_duration_seconds_bucket{{le=\"0.005\",{common},{canary}}} 1"
            ),
            format!("remora_http_retries_total{{{common},{canary}}} 1"),
            format!("remora_retry_budget_exhausted_total{{{common},{canary}}} 1"),
            format!("remora_http_timeouts_total{{{common},{canary},timeout=\"per_try\"}} 2"),
            format!("remora_http_timeouts_total{{{common},{canary},timeout=\"request\"}} 1"),
            format!(
                "remora_http_timeouts_total{{{common},route_name=\"\",route_namespace=\"\",backend=\"passthrough\",timeout=\"request\"}} 0"
            ),
            format!(
                "remora_http_retries_total{{{common},route_name=\"\",route_namespace=\"\",backend=\"passthrough\"}} 0"
            ),
            r#"remora_protocol_detect_total{direction="inbound",result="server_first"} 1"#.into(),
            "remora_build_info{version=".into(),
            "process_resident_memory_bytes ".into(),
        ] {
            assert!(text.contains(&line), "missing {line} in:\n{text}");
        }
        drop(conn);
        let text = render(&registry);
        assert!(text.contains(&format!("remora_tcp_connections_open{{{common}}} 0")));
        assert!(text.contains(&format!(
            "remora_tcp_connections_closed_total{{{common}}} 1"
        )));
    }

    #[test]
    fn omitted_labels_are_left_empty_in_every_family() {
        let mut registry = Registry::default();
        let mut m = Metrics::register(&mut registry);
        m.set_omit(Omit::parse("peer_identity, route").unwrap());
        let labels = TrafficLabels {
            direction: Direction::Inbound,
            target: Arc::from("8080"),
            tls: true,
            peer_identity: Arc::from("spiffe://cluster.local/ns/shop/sa/web"),
            authz_name: Arc::from("shop/web-callers"),
        };
        let _conn = m.connection(&labels);
        m.denied(&labels);
        let http = m.http(labels.clone());
        assert_eq!(
            &**http.peer_identity(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        let route = RouteLabels {
            route_name: "web-split".into(),
            route_namespace: "shop".into(),
            backend: "web-v2.shop:80".into(),
        };
        m.resilience(&labels).retried(&route);
        http.routed(route).response(200, None, true);
        let text = render(&registry);
        assert!(
            !text.contains("sa/web") && !text.contains("web-split"),
            "{text}"
        );
        assert!(
            text.contains(r#"remora_tcp_connections_opened_total{direction="inbound",target="8080",tls="true",peer_identity="",authz_name="shop/web-callers"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"peer_identity="",authz_name="shop/web-callers",route_name="",route_namespace="",backend="",status_code="200""#), "{text}");
        assert_eq!(Omit::parse(""), Ok(Omit::default()));
        assert!(
            Omit::parse("tls")
                .unwrap_err()
                .contains("tls is not an optional label")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_series_expire_and_open_ones_stay() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        let peer = |id: &'static str| TrafficLabels {
            direction: Direction::Inbound,
            target: Arc::from("8080"),
            tls: true,
            peer_identity: Arc::from(id),
            authz_name: Arc::from("shop/web-callers"),
        };
        let gone = peer("spiffe://cluster.local/ns/shop/sa/old");
        let busy = peer("spiffe://cluster.local/ns/shop/sa/web");
        let conn = m.connection(&gone);
        let http = m.http(gone.clone());
        http.requests.inc();
        let req = http.clone().routed(RouteLabels::default());
        req.answered_after(std::time::Duration::from_millis(1));
        req.response(200, None, true);
        req.response(503, Some(14), true);
        drop((conn, http, req));
        let kept = m.connection(&busy);
        tokio::time::advance(SERIES_IDLE / 2).await;
        m.expire_idle(SERIES_IDLE);
        assert!(render(&registry).contains("sa/old"), "not idle long enough");
        tokio::time::advance(SERIES_IDLE).await;
        m.expire_idle(SERIES_IDLE);
        let text = render(&registry);
        assert!(!text.contains("sa/old"), "expired:\n{text}");
        assert!(
            text.contains("remora_metrics_series_expired_total 1\n"),
            "{text}"
        );
        assert!(text.contains("sa/web"), "a connection is open:\n{text}");
        drop(kept);
        tokio::time::advance(SERIES_IDLE).await;
        m.expire_idle(SERIES_IDLE);
        assert!(!render(&registry).contains("sa/web"));
        assert!(m.series.is_empty());
        // A series that comes back starts from zero.
        let again = m.connection(&gone);
        assert!(render(&registry).contains("sa/old"));
        drop(again);
    }
}
