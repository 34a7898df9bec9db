//! Micro-benchmarks of the proxy's per-connection and per-request hot paths. Figures
//! go to BENCHMARKS.md by hand; nothing here is asserted.

use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use remora_proxy::{
    detect::{H2_PREFACE, classify},
    http::strip_hop_by_hop,
};

fn detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    let http1 = b"GET /api/v1/items?limit=10 HTTP/1.1\r\nhost: items.default.svc\r\n\r\n";
    let tls = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefghijklmnopqrstuvwxyz";
    g.bench_function("http1_request_line", |b| {
        b.iter(|| classify(black_box(http1)))
    });
    g.bench_function("h2_preface", |b| b.iter(|| classify(black_box(H2_PREFACE))));
    g.bench_function("tls_client_hello", |b| b.iter(|| classify(black_box(tls))));
    g.finish();
}

fn headers(c: &mut Criterion) {
    let mut typical = HeaderMap::new();
    for (k, v) in [
        ("host", "items.default.svc.cluster.local"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("content-type", "application/json"),
        ("content-length", "42"),
        ("x-request-id", "6f1c2a4e-0b1d-4c55-9b1e-3f1f0d2c1a77"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("connection", "keep-alive"),
    ] {
        typical.insert(k, HeaderValue::from_static(v));
    }
    let mut g = c.benchmark_group("strip_hop_by_hop");
    g.bench_function("typical_request", |b| {
        b.iter_batched(
            || typical.clone(),
            |mut h| strip_hop_by_hop(&mut h, false),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Ten ready, unmeshed endpoints.
fn ten_endpoints() -> std::sync::Arc<[remora_proxy::outbound::discovery::Endpoint]> {
    (1..=10u8)
        .map(|i| remora_proxy::outbound::discovery::Endpoint {
            addr: std::net::SocketAddr::from(([10, 0, 0, i], 8080)),
            identity: None,
            ready: true,
        })
        .collect::<Vec<_>>()
        .into()
}

fn balancer(c: &mut Criterion) {
    use remora_proxy::outbound::balance::Balancer;
    let endpoints = ten_endpoints();
    let b = Balancer::new(|_: &remora_proxy::outbound::discovery::Endpoint| ());
    c.bench_function("balancer_pick/10_endpoints", |bench| {
        bench.iter(|| black_box(b.pick(black_box(&endpoints))))
    });
}

/// What a TrafficPolicy adds per request over ten endpoints: a pick with the circuit
/// breaker and a concurrency limit in force, the in-flight guard, the outcome recorded,
/// and the retry budget's bookkeeping.
struct PolicyWork {
    endpoints: std::sync::Arc<[remora_proxy::outbound::discovery::Endpoint]>,
    balancer: std::sync::Arc<remora_proxy::outbound::balance::Balancer<()>>,
    policy: remora_proxy::outbound::policy::ServicePolicy,
    budget: remora_proxy::outbound::resilience::RetryBudget,
    ejections: prometheus_client::metrics::counter::Counter,
    service: std::sync::Arc<str>,
}

impl PolicyWork {
    fn new() -> Self {
        use remora_proxy::outbound::{
            balance::Balancer,
            discovery::Endpoint,
            policy::{Breaker, Conditions, Retry, ServicePolicy},
            resilience::RetryBudget,
        };
        use std::time::Duration;
        let retry = Retry {
            max_retries: 2,
            on: Conditions {
                any_5xx: true,
                ..Default::default()
            },
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_ratio: 0.2,
            budget_min_per_second: 10,
            budget_window: Duration::from_secs(10),
            non_idempotent: false,
        };
        Self {
            endpoints: ten_endpoints(),
            balancer: std::sync::Arc::new(Balancer::new(|_: &Endpoint| ())),
            policy: ServicePolicy {
                retry: Some(retry),
                breaker: Breaker {
                    consecutive_failures: 5,
                    max_requests: 100,
                    ..Default::default()
                },
                ..Default::default()
            },
            budget: RetryBudget::default(),
            ejections: Default::default(),
            service: std::sync::Arc::from("web.shop:80"),
        }
    }

    /// What an attempt does: pick, count in flight with what settles the outcome,
    /// observe the answer's latency, count the budget, classify, and settle the
    /// outcome when the response ends.
    fn run(&self) {
        let (b, policy) = (&self.balancer, &self.policy);
        let retry = policy.retry.as_ref().expect("a retry policy");
        let ep = b.pick_with(black_box(&self.endpoints), policy).unwrap();
        let mut guard = ep.start();
        guard.settle_with(remora_proxy::outbound::balance::Settle {
            breaker: policy.breaker.clone(),
            balancer: b.clone(),
            ejections: self.ejections.clone(),
            service: self.service.clone(),
        });
        self.budget.request(retry.budget_window);
        ep.observe(std::time::Duration::from_micros(300));
        let outcome = remora_proxy::outbound::resilience::Outcome::Answered {
            status: http::StatusCode::OK,
            grpc: None,
        };
        black_box(remora_proxy::outbound::resilience::retriable(
            outcome,
            Some(retry),
            false,
        ));
        guard.answered();
        guard.settle(true);
        drop(guard);
    }
}

fn policy(c: &mut Criterion) {
    let work = PolicyWork::new();
    c.bench_function("policy/pick_record_budget/10_endpoints", |bench| {
        bench.iter(|| work.run())
    });
}

/// Routes as a Service with a canary and a migration might have them: eight rules over
/// three HTTPRoutes (exact paths, prefixes, a regular expression, a header match, a
/// method, a query match, a 90/10 split).
fn routes() -> remora_proxy::outbound::routes::Routes {
    use api::path_match::Kind::{Exact, Prefix, Regex};
    use remora_api::v1 as api;
    let m = |path: api::path_match::Kind, method: &str| api::HttpRouteMatch {
        path: Some(api::PathMatch { kind: Some(path) }),
        method: method.into(),
        ..Default::default()
    };
    let rule = |matches: Vec<api::HttpRouteMatch>, backends: &[(&str, u32)]| api::HttpRouteRule {
        matches,
        backends: backends
            .iter()
            .map(|(t, w)| api::WeightedBackend {
                target: t.to_string(),
                weight: *w,
            })
            .collect(),
        ..Default::default()
    };
    let mut canary = m(Prefix("/api".into()), "");
    canary.headers = vec![api::HeaderMatch {
        name: "x-canary".into(),
        value: Some(api::header_match::Value::Exact("yes".into())),
    }];
    let mut query = m(Prefix("/search".into()), "GET");
    query.query_params = vec![api::QueryParamMatch {
        name: "beta".into(),
        value: Some(api::query_param_match::Value::Exact("1".into())),
    }];
    let route = |name: &str, rules| api::HttpRoute {
        metadata: Some(api::PolicyMetadata {
            name: name.into(),
            namespace: "shop".into(),
            ..Default::default()
        }),
        rules,
    };
    remora_proxy::outbound::routes::Routes::from_api(&[
        route(
            "health",
            vec![
                rule(vec![m(Exact("/healthz".into()), "GET")], &[("web", 1)]),
                rule(vec![m(Exact("/readyz".into()), "GET")], &[("web", 1)]),
            ],
        ),
        route(
            "canary",
            vec![
                rule(vec![canary], &[("web-v2", 1)]),
                rule(
                    vec![m(Regex("/api/v[0-9]+/orders/.*".into()), "")],
                    &[("orders", 1)],
                ),
                rule(vec![m(Prefix("/api".into()), "POST")], &[("web", 1)]),
                rule(vec![query], &[("search-beta", 1)]),
            ],
        ),
        route(
            "migration",
            vec![
                rule(vec![m(Prefix("/static".into()), "")], &[("cdn", 1)]),
                rule(
                    vec![m(Prefix("/".into()), "")],
                    &[("web", 90), ("web-v2", 10)],
                ),
            ],
        ),
    ])
}

/// A request that falls through to the last of the eight rules, the worst case for a
/// prefix match, after running the regular expression.
fn routed_parts() -> http::request::Parts {
    http::Request::builder()
        .method("GET")
        .uri("http://web.shop.svc.cluster.local/api/v1/items?limit=10")
        .header("host", "web.shop.svc.cluster.local")
        .header("user-agent", "curl/8.5.0")
        .header("accept", "*/*")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// A request's route: matching across eight rules, then a weighted backend pick.
fn route(
    routes: &remora_proxy::outbound::routes::Routes,
    parts: &http::request::Parts,
    seed: &mut u64,
) {
    *seed = remora_proxy::rng::xorshift(*seed);
    let rule = routes.find(black_box(parts)).unwrap();
    black_box(matches!(
        rule.pick(*seed),
        remora_proxy::outbound::routes::Pick::Backend(_)
    ));
}

fn route_matching(c: &mut Criterion) {
    let (routes, parts, mut seed) = (routes(), routed_parts(), 1u64);
    c.bench_function("route/match_pick/8_rules", |bench| {
        bench.iter(|| route(&routes, &parts, &mut seed))
    });
}

/// The whole per-request cost the issue names: the route, the copy of the request's
/// head an attempt keeps (another endpoint may be tried), then a TrafficPolicy's work.
fn routed_request(c: &mut Criterion) {
    let (routes, parts, mut seed) = (routes(), routed_parts(), 1u64);
    let work = PolicyWork::new();
    c.bench_function("routed_request/route_pick_record_budget", |bench| {
        bench.iter(|| {
            route(&routes, &parts, &mut seed);
            black_box((
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            ));
            work.run();
        })
    });
}

/// A CA and a mesh leaf for `sa`, as the controller issues them.
fn mesh_credentials(
    ca: &rcgen::Issuer<'static, rcgen::KeyPair>,
    sa: &str,
) -> remora_proxy::identity::Credentials {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![
        SanType::URI(
            format!("spiffe://cluster.local/ns/shop/sa/{sa}")
                .as_str()
                .try_into()
                .unwrap(),
        ),
        SanType::DnsName(
            format!("{sa}.shop.serviceaccount.identity.cluster.local")
                .as_str()
                .try_into()
                .unwrap(),
        ),
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, ca).unwrap();
    remora_proxy::identity::Credentials {
        leaf_der: cert.der().to_vec(),
        chain_der: vec![],
        key_der: key.serialize_der(),
        not_before: std::time::SystemTime::now(),
        not_after: std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
        anchors: remora_proxy::identity::NewAnchors::Unsent,
    }
}

/// One whole mTLS handshake between two proxies' configurations, in memory: the CPU
/// cost of a new connection between meshed pods (both sides, with certificate checks).
fn handshake_once(client: &Arc<rustls::ClientConfig>, server: &Arc<rustls::ServerConfig>) {
    black_box(connected(client, server));
}

/// Two connected ends, in memory.
fn connected(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
) -> (rustls::ClientConnection, rustls::ServerConnection) {
    let name =
        rustls::pki_types::ServerName::try_from("api.shop.serviceaccount.identity.cluster.local")
            .unwrap();
    let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
    let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
    let mut buf = Vec::with_capacity(8192);
    while c.is_handshaking() || s.is_handshaking() {
        pump(&mut c, &mut s, &mut buf);
        pump(&mut s, &mut c, &mut buf);
    }
    (c, s)
}

/// Moves every TLS record `from` has to send into `to`, through `buf`, and has `to`
/// process them.
fn pump<A, B, DA, DB>(from: &mut A, to: &mut B, buf: &mut Vec<u8>)
where
    A: std::ops::DerefMut<Target = rustls::ConnectionCommon<DA>>,
    B: std::ops::DerefMut<Target = rustls::ConnectionCommon<DB>>,
{
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf).unwrap();
    }
    let mut rd = std::io::Cursor::new(&buf[..]);
    while (rd.position() as usize) < buf.len() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets().unwrap();
    }
}

/// Bulk data over an established mTLS connection, in memory: what encrypting and
/// decrypting costs per byte (one side each), in writes of `chunk` bytes.
fn records(c: &mut Criterion) {
    use std::io::{Read, Write};
    let (client, server) = mtls_configs();
    let (mut tx, mut rx) = connected(&client.0, &server);
    const TOTAL: usize = 1 << 20;
    let mut g = c.benchmark_group("mtls_records");
    g.throughput(criterion::Throughput::Bytes(TOTAL as u64));
    for chunk in [8 << 10, 64 << 10] {
        let data = vec![0x5au8; chunk];
        let mut wire = Vec::with_capacity(chunk + 1024);
        let mut out = vec![0u8; 64 << 10];
        g.bench_function(format!("{}KiB_writes", chunk >> 10), |bench| {
            bench.iter(|| {
                for _ in 0..TOTAL / chunk {
                    tx.writer().write_all(&data).unwrap();
                    wire.clear();
                    while tx.wants_write() {
                        tx.write_tls(&mut wire).unwrap();
                    }
                    // Read as each record is processed: rustls holds at most 16 KiB of
                    // received plaintext.
                    let mut rd = std::io::Cursor::new(&wire[..]);
                    while (rd.position() as usize) < wire.len() {
                        rx.read_tls(&mut rd).unwrap();
                        rx.process_new_packets().unwrap();
                        while let Ok(n) = rx.reader().read(&mut out) {
                            if n == 0 {
                                break;
                            }
                            black_box(&out[..n]);
                        }
                    }
                }
            })
        });
    }
    g.finish();
}

/// A hybrid (post-quantum) client, a classical one, and a server, as two proxies have
/// them.
fn mtls_configs() -> (
    (Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>),
    Arc<rustls::ServerConfig>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use remora_proxy::tls::{ALPN_H2, client_config, roots, server_config};
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let anchors = roots(&ca_cert.pem()).unwrap();
    let server = server_config(
        &mesh_credentials(&ca, "api"),
        anchors.clone(),
        "api.shop.serviceaccount.identity.cluster.local",
    )
    .unwrap();
    let web = mesh_credentials(&ca, "web");
    let hybrid = client_config(&web, anchors.clone(), ALPN_H2).unwrap();
    // The same client offering only X25519: what the hybrid costs on top.
    let classical = {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let provider = rustls::crypto::CryptoProvider {
            kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
            ..rustls::crypto::aws_lc_rs::default_provider()
        };
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(anchors)
            .with_client_auth_cert(
                vec![CertificateDer::from(web.leaf_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(web.key_der.clone())),
            )
            .unwrap();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(config)
    };
    ((hybrid, classical), server)
}

fn handshake(c: &mut Criterion) {
    let ((hybrid, classical), server) = mtls_configs();
    let mut g = c.benchmark_group("mtls_handshake");
    g.bench_function("x25519mlkem768", |b| {
        b.iter(|| handshake_once(&hybrid, &server))
    });
    g.bench_function("x25519", |b| b.iter(|| handshake_once(&classical, &server)));
    g.finish();
}

criterion_group!(
    benches,
    handshake,
    records,
    detection,
    headers,
    balancer,
    policy,
    route_matching,
    routed_request
);
criterion_main!(benches);
