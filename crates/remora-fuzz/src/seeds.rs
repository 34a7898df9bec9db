//! Where fuzzing starts: inputs taken from the tests and the repository's own files
//! (the YAML examples and fixtures, the webhook's AdmissionReview), and messages made by
//! the real code paths (a rustls ClientHello, the controller's answers for
//! `seeds/cluster.yaml`, a proxy's CSR and the CA's certificate for it). `make fuzz`
//! writes them to `fuzz/seeds/`; `make test` runs every target over them.

use std::path::{Path, PathBuf};

use prost::Message;
use remora_api::v1 as api;
use remora_controller::{
    core::{Event, NsName, Object, Target as Dest},
    inbound::WorkloadKey,
    index::{Domains, Index, Touched},
};

/// The repository, found from this crate's manifest at build time.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The YAML files the `dir_yaml` target starts from: this crate's cluster, the
/// repository's examples and manifests, and the test fixtures.
pub const YAML: &[&str] = &[
    "crates/remora-fuzz/seeds/cluster.yaml",
    "deploy/examples",
    "deploy/demo",
    "deploy/crds",
    "crates/remora-controller/testdata/webhook/objects",
    "crates/remora-controller/testdata/webhook/injected.yaml",
    "crates/remora-cli/testdata",
    "crates/remora-k8s/testdata/inject",
];

/// Every seed: (target, name, bytes).
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: String, bytes: Vec<u8>| {
        out.push((target, name, bytes));
    };

    for (n, bytes) in first_bytes().into_iter().enumerate() {
        add("detect", format!("bytes-{n}"), bytes);
    }
    for (n, head) in requests().iter().enumerate() {
        add(
            "http_request",
            format!("request-{n}"),
            head.as_bytes().to_vec(),
        );
    }

    let yaml = yaml_files();
    for (name, text) in &yaml {
        add("dir_yaml", name.clone(), text.as_bytes().to_vec());
    }
    let cluster = remora_controller::source::yaml::parse(&yaml[0].0, &yaml[0].1)
        .unwrap_or_else(|e| panic!("the seed cluster must load: {e}"));
    let answers = answers(cluster);
    for (n, policy) in answers.outbound.iter().enumerate() {
        for (m, head) in requests().iter().enumerate() {
            let bytes = crate::join(&policy.encode_to_vec(), head.as_bytes());
            add("outbound_policy", format!("service-{n}-request-{m}"), bytes);
        }
    }
    let mut inbound = answers.inbound.clone();
    inbound.push(api::InboundWorkloadPolicy {
        ports: [(8080, public_grant())].into(),
        other: None,
    });
    for (n, policy) in inbound.iter().enumerate() {
        for (m, head) in requests().iter().enumerate() {
            let bytes = crate::join(&policy.encode_to_vec(), head.as_bytes());
            add("inbound_policy", format!("workload-{n}-request-{m}"), bytes);
        }
    }
    for (n, updates) in answers.destinations.iter().enumerate() {
        let mut bytes = Vec::new();
        for u in updates {
            u.encode_length_delimited(&mut bytes)
                .expect("a Vec has room");
        }
        add("destination", format!("stream-{n}"), bytes);
    }

    let proxy = crate::fixtures::identity();
    let req = proxy.request("a-token").expect("a CSR");
    let (ca, sa) = crate::fixtures::ca();
    let certified = ca
        .certify(sa, &req.certificate_signing_request)
        .expect("the CA signs the proxy's own CSR");
    let rsp: api::CertifyResponse = certified.into();
    add("certify_request", "proxy".into(), req.encode_to_vec());
    add("certify_response", "ca".into(), rsp.encode_to_vec());

    let review =
        std::fs::read(repo().join("crates/remora-controller/testdata/webhook/review.json"))
            .expect("the webhook's AdmissionReview fixture");
    add("admission", "review.json".into(), review);

    for (n, args) in INIT_ARGS.iter().enumerate() {
        add(
            "init_config",
            format!("args-{n}"),
            args.join("\0").into_bytes(),
        );
    }
    out
}

/// The controller's answers for a set of objects.
#[derive(Debug, Default)]
pub struct Answers {
    /// For each Service port, as a client in the Service's namespace asks.
    pub outbound: Vec<api::OutboundPolicy>,
    /// For each Pod, with the default `all-unauthenticated`.
    pub inbound: Vec<api::InboundWorkloadPolicy>,
    /// For each Service port: the destination stream from nothing to now.
    pub destinations: Vec<Vec<api::Update>>,
}

/// Indexes `objects` and compiles every answer the controller would stream for them.
pub fn answers(objects: Vec<Object>) -> Answers {
    let mut services = Vec::new();
    let mut pods = Vec::new();
    for o in &objects {
        match o {
            Object::Service(s) => services.extend(s.ports.iter().map(|p| (s.id.clone(), p.port))),
            Object::Pod(p) => pods.push(p.id.clone()),
            _ => {}
        }
    }
    let index = index(objects);
    let mut out = Answers::default();
    for (id, port) in services.into_iter().take(64) {
        let client_ns = id.namespace.clone();
        let target = Dest::Service { id, port };
        out.outbound.push(remora_controller::outbound::outbound(
            &index, &target, &client_ns,
        ));
        let mut sent = None;
        let updates = remora_controller::grpc::updates(&mut sent, &index.resolve(&target));
        out.destinations.push(updates.into());
    }
    for pod in pods.into_iter().take(64) {
        let key = WorkloadKey {
            pod: NsName {
                namespace: pod.namespace,
                name: pod.name,
            },
            default: "all-unauthenticated".into(),
        };
        out.inbound
            .push(remora_controller::inbound::workload(&index, &key, &[]));
    }
    out
}

/// An index of `objects`, as the controller builds it from its source.
pub fn index(objects: Vec<Object>) -> Index {
    let mut index = Index::new(Domains {
        trust_domain: "cluster.local".into(),
        cluster_domain: "cluster.local".into(),
    });
    let mut touched = Touched::default();
    for o in objects {
        index.apply(Event::Apply(o), &mut touched);
    }
    index.apply(Event::Synced, &mut touched);
    index
}

/// The controller's metrics, registered in a registry of their own.
pub fn metrics() -> remora_controller::metrics::Metrics {
    remora_controller::metrics::Metrics::register(&mut Default::default())
}

/// A port whose only grant is `GET /public` (and below) for anyone, plus the kubelet's
/// `/ready`; connections need the identity `shop/frontend`.
pub fn public_grant() -> api::InboundPolicy {
    let anyone = api::Authorization {
        authentication: Some(api::authorization::Authentication::Unauthenticated(
            api::Unauthenticated {},
        )),
        ..Default::default()
    };
    api::InboundPolicy {
        authorizations: vec![api::Authorization {
            authentication: Some(api::authorization::Authentication::Identities(
                api::MeshIdentities {
                    identities: vec!["spiffe://cluster.local/ns/shop/sa/frontend".into()],
                    namespaces: Vec::new(),
                },
            )),
            ..Default::default()
        }],
        http_routes: vec![api::InboundHttpRoute {
            matches: vec![api::HttpRouteMatch {
                path: Some(api::PathMatch {
                    kind: Some(api::path_match::Kind::Prefix("/public".into())),
                }),
                method: "GET".into(),
                ..Default::default()
            }],
            authorizations: vec![anyone],
            ..Default::default()
        }],
        probe_paths: vec!["/ready".into()],
        default_policy: "deny".into(),
        ..Default::default()
    }
}

/// HTTP/1 request heads: the path tricks the security suite tries against route grants,
/// hop-by-hop and upgrade fields, the proxies' own `remora-orig-proto`, Retry-After.
pub fn requests() -> Vec<String> {
    let paths = [
        "/public/x",
        "/public",
        "/ready",
        "/admin",
        "/public/..;/admin",
        "/public/.;/admin",
        "/public/..%3b/admin",
        "/public/%252e%252e/admin",
        "/public/%2e%2e/admin",
        "/public%2f..%2fadmin",
        "/public\\..\\admin",
        "/public//../admin",
        "/public/%c0%ae%c0%ae/admin",
        "/api/v1?x=1",
        "/items/42",
        "/login",
    ];
    let mut out: Vec<String> = paths
        .iter()
        .map(|p| format!("GET {p} HTTP/1.1\r\nhost: web.shop\r\n\r\n"))
        .collect();
    out.extend([
        "GET /public/x HTTP/1.1\r\nhost: web\r\nconnection: keep-alive, x-secret, te\r\nx-secret: 1\r\nte: trailers, gzip\r\nkeep-alive: 5\r\n\r\n".into(),
        "GET /chat HTTP/1.1\r\nhost: web\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-key: x\r\n\r\n".into(),
        "CONNECT web.shop:443 HTTP/1.1\r\nhost: web.shop:443\r\n\r\n".into(),
        "POST /login HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\nproxy-connection: close\r\n\r\n".into(),
        "GET /api HTTP/1.1\r\nhost: web\r\nx-canary: true\r\nx-user: alice7\r\nremora-orig-proto: HTTP/1.0\r\n\r\n".into(),
        "GET /api/v1?v=two HTTP/1.0\r\nretry-after: 120\r\nx-debug: 1\r\n\r\n".into(),
        "GET http://web.shop/public/x HTTP/1.1\r\nremora-orig-proto: HTTP/1.1\r\n\r\n".into(),
    ]);
    out
}

/// A connection's first bytes: HTTP/1 and HTTP/2 openings, a real TLS ClientHello (from
/// rustls, as a meshed client sends it: SNI, ALPN, post-quantum key share), and other
/// protocols the proxy must pass as opaque.
pub fn first_bytes() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nhost: web\r\n\r\n".to_vec(),
        b"POST /api HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
        [
            remora_proxy::detect::H2_PREFACE,
            &[0, 0, 0, 4, 0, 0, 0, 0, 0][..],
        ]
        .concat(),
        b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
        b"*1\r\n$4\r\nPING\r\n".to_vec(),
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f".to_vec(),
    ];
    for (sni, alpn) in [
        ("web.shop.svc.cluster.local", remora_proxy::tls::ALPN_H2),
        (
            "web.shop.serviceaccount.identity.cluster.local",
            remora_proxy::tls::ALPN_OPAQUE,
        ),
    ] {
        out.push(client_hello(sni, alpn));
    }
    out
}

fn client_hello(sni: &str, alpn: &[u8]) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(remora_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("the provider's versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("a DNS name");
    let mut conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("a client");
    let mut bytes = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut bytes).expect("a Vec takes it");
    }
    bytes
}

/// `remora-init` flag sets: the chart's, the documented ones, and refused ones.
pub const INIT_ARGS: &[&[&str]] = &[
    &[],
    &[
        "--proxy-uid",
        "2102",
        "--inbound-port",
        "4143",
        "--outbound-port",
        "4140",
        "--skip-inbound-ports",
        "4191,9000-9010",
        "--skip-outbound-ports",
        "443",
        "--skip-subnets",
        "169.254.169.254/32,fd00::/8",
        "--ipv6",
    ],
    &["--no-ipv6", "--iptables-mode", "nft", "--dry-run"],
    &["--cleanup", "--iptables-mode", "legacy"],
    &["--proxy-uid", "0"],
    &["--inbound-port", "4140"],
    &["--skip-inbound-ports", "70000,5-3"],
    &["--skip-subnets", "10.0.0.0/33"],
];

/// (name, text) of every YAML file under [`YAML`], the seed cluster first.
fn yaml_files() -> Vec<(String, String)> {
    let root = repo();
    let mut out = Vec::new();
    for entry in YAML {
        let path = root.join(entry);
        let mut files = if path.is_dir() {
            std::fs::read_dir(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .map(|e| e.expect("a folder entry").path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
                .collect()
        } else {
            vec![path]
        };
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let name = file
                .strip_prefix(&root)
                .unwrap_or(&file)
                .to_string_lossy()
                .replace('/', "_");
            out.push((name, text));
        }
    }
    out
}
