//! What the fuzz targets in `fuzz/` run: each target is one function from bytes to
//! nothing that panics when an input breaks a rule. They feed the proxy and the controller
//! exactly what an attacker or a broken peer could send them — a connection's first bytes,
//! HTTP requests, the controller's gRPC messages, `dir:` files, AdmissionReviews, a CSR,
//! `remora-init`'s flags — and check what must hold whatever the bytes: no panic, and the
//! properties written beside each target (a route grant never reaches past its prefix, a
//! protocol verdict never depends on how the bytes were split).
//!
//! `cargo fuzz` runs them from `fuzz/` (nightly-only flags, so outside the workspace);
//! `make test` replays every seed ([`seeds`]) and every saved crash
//! (`fuzz/regressions/<target>/`) through the same functions.

pub mod seeds;

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::OnceLock,
};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};
use prost::Message;
use remora_api::v1 as api;
use remora_proxy::{
    detect::{self, Verdict},
    inbound::{authz, policies::WorkloadPolicy},
    outbound::{discovery::StreamState, policy::ServicePolicy, routes::Routes},
};

/// One fuzz target: its name (the file `fuzz/fuzz_targets/<name>.rs`, the folders
/// `fuzz/regressions/<name>/` and `fuzz/corpus/<name>/`) and what it runs.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "detect",
        run: detect,
    },
    Target {
        name: "http_request",
        run: http_request,
    },
    Target {
        name: "outbound_policy",
        run: outbound_policy,
    },
    Target {
        name: "inbound_policy",
        run: inbound_policy,
    },
    Target {
        name: "destination",
        run: destination,
    },
    Target {
        name: "certify_request",
        run: certify_request,
    },
    Target {
        name: "certify_response",
        run: certify_response,
    },
    Target {
        name: "dir_yaml",
        run: dir_yaml,
    },
    Target {
        name: "admission",
        run: admission,
    },
    Target {
        name: "init_config",
        run: init_config,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// A connection's first bytes, as the proxy's protocol detection and SNI peek see them.
/// Holds: past the detection limit the verdict is final; a final verdict on a prefix is
/// the verdict on the whole (it must not depend on how TCP split the bytes).
pub fn detect(data: &[u8]) {
    let verdict = detect::classify(data);
    if data.len() >= detect::MAX_DETECT_BYTES {
        assert_ne!(verdict, Verdict::NeedMore, "buffering past the limit");
    }
    for cut in [1, 5, 9, 24, data.len() / 2, data.len().saturating_sub(1)] {
        let Some(prefix) = data.get(..cut) else {
            continue;
        };
        let early = detect::classify(prefix);
        if early != Verdict::NeedMore {
            assert_eq!(
                early, verdict,
                "the verdict on {cut} bytes changes with more"
            );
        }
    }
    let sni = remora_proxy::tls::client_hello_sni(data);
    if let Some(sni) = sni {
        assert!(
            !sni.is_empty() && sni.len() <= 255,
            "an SNI no client sends"
        );
    }
}

/// An HTTP request (in HTTP/1 form: the bytes also reach hyper's parser in the proxy) as
/// the proxy's header handling and inbound authorization see it. Holds: no hop-by-hop
/// field survives stripping; a route grant for `GET /public` allows nothing an
/// application could read as a path outside `/public` (see [`lenient_path`]).
pub fn http_request(data: &[u8]) {
    let Some(mut req) = request(data) else {
        return;
    };
    let upgrade = remora_proxy::http::headers::wants_upgrade(&req);
    let mut headers = req.headers().clone();
    let named: Vec<String> = connection_tokens(&headers);
    remora_proxy::http::headers::strip_hop_by_hop(&mut headers, upgrade);
    for name in ["keep-alive", "proxy-connection", "transfer-encoding"]
        .into_iter()
        .map(String::from)
        .chain(named)
    {
        if upgrade && (name == "upgrade" || name == "connection") {
            continue;
        }
        assert!(!headers.contains_key(name.as_str()), "{name} survived");
    }
    if let Some(te) = headers.get(http::header::TE) {
        assert_eq!(te, "trailers");
    }
    for status in [
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::SERVICE_UNAVAILABLE,
    ] {
        if let Some(pause) = remora_proxy::outbound::resilience::retry_after(status, req.headers())
        {
            assert!(pause.as_secs() <= 60, "a Retry-After past the cap");
        }
    }

    let path = req.uri().path().to_string();
    let peer = authz::Peer {
        ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        identity: None,
    };
    let allowed = public_grant().allows_request(&peer, req.method(), &path, upgrade);
    if allowed && path != "/ready" {
        let read_as = lenient_path(&path);
        assert!(
            read_as == "/public" || read_as.starts_with("/public/"),
            "a grant for GET /public allowed {path:?}, which an application may read as {read_as:?}"
        );
    }

    remora_proxy::http::pool::restore_orig_proto(&mut req);
    assert!(!req.headers().contains_key("remora-orig-proto"));
}

/// The controller's answer for a Service (`OutboundPolicy`), then a request routed by it.
/// Layout: a 2-byte little-endian length, the message, an HTTP/1 request.
pub fn outbound_policy(data: &[u8]) {
    let Some((message, rest)) = split(data) else {
        return;
    };
    let Ok(policy) = api::OutboundPolicy::decode(message) else {
        return;
    };
    let _ = ServicePolicy::from_api(&policy);
    let routes = Routes::from_api(&policy.http_routes);
    let _ = routes.debug();
    let Some(req) = request(rest) else {
        return;
    };
    let (mut parts, ()) = req.into_parts();
    if let Some(rule) = routes.find(&parts) {
        for seed in [0, 1, u64::from(rest.len() as u32) * 7919, u64::MAX] {
            let _ = rule.pick(seed);
        }
        if let Some(m) = &rule.request_headers {
            m.apply(&mut parts.headers);
        }
        let mut response = HeaderMap::new();
        if let Some(m) = &rule.response_headers {
            m.apply(&mut response);
        }
    }
}

/// The controller's answer for a workload (`InboundWorkloadPolicy`), then a request to
/// it. Layout as [`outbound_policy`]'s. Holds: a port the answer does not name gets
/// `other`, and a missing `other` allows nothing.
pub fn inbound_policy(data: &[u8]) {
    let Some((message, rest)) = split(data) else {
        return;
    };
    let Ok(answer) = api::InboundWorkloadPolicy::decode(message) else {
        return;
    };
    let had_other = answer.other.is_some();
    let policy = WorkloadPolicy::from_api(answer);
    let _ = policy.get(8080).debug();
    let req = request(rest);
    for (ip, identity) in [
        (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), None),
        (
            "fd00::9".parse().expect("an address"),
            Some("spiffe://cluster.local/ns/shop/sa/frontend"),
        ),
    ] {
        let peer = authz::Peer { ip, identity };
        for port in [8080, 9090, 1] {
            let p = policy.get(port);
            let conn = p.allows_connection(&peer);
            if !had_other && port == 1 {
                assert!(!conn, "no `other` answer, yet a connection was allowed");
            }
            if let Some(req) = &req {
                let _ = p.allows_request(&peer, req.method(), req.uri().path(), false);
            }
        }
    }
}

/// A destination stream: length-delimited `Update`s, applied in order.
pub fn destination(mut data: &[u8]) {
    let mut state = StreamState::default();
    for _ in 0..64 {
        if data.is_empty() {
            break;
        }
        let Ok(update) = api::Update::decode_length_delimited(&mut data) else {
            break;
        };
        let _ = state.apply(update);
    }
}

/// What a meshed pod sends the controller's Identity service: a `CertifyRequest` (its
/// token is checked before this; the CSR reaches the CA). Holds: whatever is signed
/// names exactly the caller's identity.
pub fn certify_request(data: &[u8]) {
    let Ok(req) = api::CertifyRequest::decode(data) else {
        return;
    };
    let (ca, sa) = fixtures::ca();
    if let Ok(out) = ca.certify(sa, &req.certificate_signing_request) {
        // The proxy's check: one URI SAN, the caller's identity (the key is the CSR's,
        // which TLS checks, not this).
        if let Err(e) = fixtures::identity().accept(out.into()) {
            panic!("the CA signed what the caller's proxy refuses: {e}");
        }
    }
}

/// What the controller answers a proxy's Certify: a `CertifyResponse`, as the proxy
/// checks it before serving with it.
pub fn certify_response(data: &[u8]) {
    let Ok(rsp) = api::CertifyResponse::decode(data) else {
        return;
    };
    let _ = fixtures::identity().accept(rsp);
}

/// A file in the `dir:` source: parsed and validated as the API server would (strict
/// fields, CRD schemas), then indexed and compiled into every answer the controller
/// gives for it.
pub fn dir_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(objects) = remora_controller::source::yaml::parse("fuzz.yaml", text) else {
        return;
    };
    let _ = seeds::answers(objects);
}

/// An AdmissionReview body, as the injector webhook reads it. Holds: the answer is
/// always an AdmissionReview that allows the pod (the webhook never blocks a cluster).
pub fn admission(data: &[u8]) {
    let answer = fixtures::injector().review(data);
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
}

/// `remora-init`'s flags (NUL-separated) and, when they load, the rules they make.
pub fn init_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let args = std::iter::once("remora-init".to_string())
        .chain(text.split('\0').map(str::to_string))
        .take(32);
    let Ok(config) = remora_init::Config::load(args, &|_| None) else {
        return;
    };
    for family in [remora_init::Family::V4, remora_init::Family::V6] {
        let rules = remora_init::rules::install(&config.plan, family, "");
        assert!(rules.contains("COMMIT"), "no COMMIT in {rules}");
    }
}

/// The path as the most lenient application could read it: percent-decoded until
/// nothing changes, backslashes as slashes, cut at `?` or `#`, `;` parameters dropped
/// from each segment, dot segments resolved, empty segments dropped.
pub fn lenient_path(path: &str) -> String {
    let mut bytes = path.as_bytes().to_vec();
    for _ in 0..8 {
        let decoded = percent_decode(&bytes);
        if decoded == bytes {
            break;
        }
        bytes = decoded;
    }
    let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
    let text = text.split(['?', '#']).next().unwrap_or("");
    let mut out: Vec<&str> = Vec::new();
    for segment in text.split('/') {
        match segment.split(';').next().unwrap_or("") {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// An HTTP/1 request head in `data`, complete or not, as an `http::Request`.
fn request(data: &[u8]) -> Option<Request<()>> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut fields);
    parsed.parse(data).ok()?;
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    let uri: Uri = parsed.path?.parse().ok()?;
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .version(match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        })
        .body(())
        .ok()?;
    for field in parsed.headers.iter().take_while(|f| !f.name.is_empty()) {
        req.headers_mut().append(
            HeaderName::from_bytes(field.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(field.value).ok()?,
        );
    }
    Some(req)
}

fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| HeaderName::from_bytes(t.as_bytes()).is_ok())
        .collect()
}

/// A message and what follows it: `[len: u16 LE][message][rest]`.
fn split(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(u16::from_le_bytes([*data.first()?, *data.get(1)?]));
    let body = data.get(2..)?;
    Some(body.split_at(len.min(body.len())))
}

/// `[len: u16 LE][message][rest]`: the layout of [`split`].
pub fn join(message: &[u8], rest: &[u8]) -> Vec<u8> {
    let len = u16::try_from(message.len()).expect("a seed message under 64 KiB");
    [&len.to_le_bytes()[..], message, rest].concat()
}

/// A port whose only grant is a route: `GET /public` (and below) for anyone, plus the
/// kubelet's `/ready`.
fn public_grant() -> &'static authz::Policy {
    static POLICY: OnceLock<authz::Policy> = OnceLock::new();
    POLICY.get_or_init(|| authz::Policy::from_api(seeds::public_grant()))
}

/// What the targets need built once per process.
mod fixtures {
    use super::*;
    use remora_controller::identity::{Ca, ServiceAccount};
    use remora_proxy::identity::{Identity, IdentityConfig, TrustAnchors};

    /// The caller every CSR is judged for.
    pub fn service_account() -> ServiceAccount {
        ServiceAccount {
            namespace: "shop".into(),
            name: "web".into(),
        }
    }

    /// A development CA, made in a temporary folder that is removed at once.
    pub fn ca() -> (&'static Ca, &'static ServiceAccount) {
        static CA: OnceLock<(Ca, ServiceAccount)> = OnceLock::new();
        let (ca, sa) = CA.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("remora-fuzz-ca-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a temporary folder");
            let ca = Ca::dev(&dir, "cluster.local", std::time::Duration::from_secs(3600));
            let _ = std::fs::remove_dir_all(&dir);
            (ca.expect("a development CA"), service_account())
        });
        (ca, sa)
    }

    /// The proxy identity `shop/web`, with its key.
    pub fn identity() -> &'static Identity {
        static IDENTITY: OnceLock<Identity> = OnceLock::new();
        IDENTITY.get_or_init(|| {
            let sa = service_account();
            Identity::new(IdentityConfig {
                trust_domain: "cluster.local".into(),
                namespace: sa.namespace,
                service_account: sa.name,
                token_file: "/nonexistent".into(),
                trust_anchors: TrustAnchors::File("/nonexistent".into()),
            })
            .expect("a key")
        })
    }

    pub fn injector() -> &'static remora_controller::webhook::Injector {
        static INJECTOR: OnceLock<remora_controller::webhook::Injector> = OnceLock::new();
        INJECTOR.get_or_init(|| {
            let metrics = seeds::metrics();
            remora_controller::webhook::Injector {
                settings: Default::default(),
                ca: None,
                discovery: remora_controller::discovery::Discovery::new(
                    seeds::index(Vec::new()),
                    metrics.clone(),
                    Vec::new(),
                ),
                metrics,
            }
        })
    }
}
