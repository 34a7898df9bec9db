//! `Identity.Certify` and the gRPC port's access rules over real gRPC and real TLS:
//! a token entitles exactly its ServiceAccount's certificate; Certify needs no client
//! certificate but everything else does; plaintext is refused unless enabled; one
//! client's streams and Certify attempts are bounded, and counted.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use remora_api::v1 as api;
use remora_controller::{App, Config};
use remora_proxy::outbound::discovery::{StreamState, View};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};
use x509_parser::prelude::{FromDer, X509Certificate};

const CONTROLLER_NAME: &str =
    "remora-controller.remora-system.serviceaccount.identity.cluster.local";

/// A CSR for the workload, and its key.
fn csr_for(ns: &str, sa: &str) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::URI(
            format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
                .as_str()
                .try_into()
                .unwrap(),
        ),
        SanType::DnsName(
            format!("{sa}.{ns}.serviceaccount.identity.cluster.local")
                .as_str()
                .try_into()
                .unwrap(),
        ),
    ];
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    (csr, key)
}

/// A running controller over a `dir:` folder: its gRPC and admin addresses.
struct Running {
    grpc: SocketAddr,
    admin: SocketAddr,
}

async fn controller(dir: &Path, identity: bool, extra: &[&str]) -> Running {
    let objects = dir.join("objects");
    std::fs::create_dir_all(&objects).unwrap();
    std::fs::write(
        dir.join("tokens.yaml"),
        "- {token: web-token, namespace: shop, serviceAccount: web}\n",
    )
    .unwrap();
    let mut args: Vec<String> = [
        "remora-controller",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    args.extend(["--source".into(), format!("dir:{}", objects.display())]);
    if identity {
        args.extend(["--dev-ca".into(), dir.join("ca").display().to_string()]);
        args.extend([
            "--token-validator".into(),
            format!("static:{}", dir.join("tokens.yaml").display()),
        ]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let config = Config::load(args, &|_| None).unwrap();
    let app = App::build(config, remora_admin::LogLevel::detached("info"))
        .await
        .unwrap();
    let running = Running {
        grpc: app.grpc_addr().unwrap(),
        admin: app.admin_addr().unwrap(),
    };
    tokio::spawn(app.run(std::future::pending()));
    running
}

/// A plaintext channel to `addr`.
async fn plaintext(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A TLS channel to the controller at `addr`, verified against `anchors`, presenting
/// `client` (a chain and its key) when given.
fn tls(addr: SocketAddr, anchors: &str, client: Option<(Vec<Vec<u8>>, &KeyPair)>) -> Channel {
    tls_from(None, addr, anchors, client)
}

/// [`tls`], from the local address `from` (another client, to a per-address limit).
fn tls_from(
    from: Option<IpAddr>,
    addr: SocketAddr,
    anchors: &str,
    client: Option<(Vec<Vec<u8>>, &KeyPair)>,
) -> Channel {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(anchors.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(
                chain.into_iter().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector_lazy(TlsConnector {
            from,
            addr,
            config: Arc::new(config),
        })
}

#[derive(Clone)]
struct TlsConnector {
    from: Option<IpAddr>,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            if let Some(from) = this.from {
                socket.bind(SocketAddr::new(from, 0))?;
            }
            let tcp = socket.connect(this.addr).await?;
            let name = ServerName::try_from(CONTROLLER_NAME).unwrap();
            let tls = tokio_rustls::TlsConnector::from(this.config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// The controller's `/metrics`.
async fn metrics(admin: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nhost: admin\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text
}

/// The value of the sample whose name and labels are exactly `series`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn request(token: &str, identity: &str, csr: Vec<u8>) -> api::CertifyRequest {
    api::CertifyRequest {
        token: token.into(),
        identity: identity.into(),
        certificate_signing_request: csr,
    }
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn destination(target: &str) -> api::GetDestination {
    api::GetDestination {
        target: target.into(),
        client: None,
    }
}

/// `WatchInboundWorkload` for `workload`, which must be refused.
async fn inbound_refused(channel: Channel, workload: &str) -> tonic::Status {
    api::policy_client::PolicyClient::new(channel)
        .watch_inbound_workload(api::InboundPolicyRequest {
            workload: workload.into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
}

/// The first `WatchOutbound` answer for `api.shop`, asked as a client saying it is in
/// namespace `said`.
async fn outbound_as(channel: Channel, said: &str) -> api::OutboundPolicy {
    api::policy_client::PolicyClient::new(channel)
        .watch_outbound(api::OutboundPolicyRequest {
            target: "api.shop.svc.cluster.local:80".into(),
            client: Some(api::ClientInfo {
                namespace: said.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap()
}

/// Issue 17: the trust anchors come with every certificate and follow the controller's
/// files, so a rotation reaches a proxy at its next renewal; a proxy never trusts a
/// bundle its own new certificate does not chain to.
#[tokio::test]
async fn the_trust_anchors_come_with_each_certificate_and_follow_the_files() {
    use remora_proxy::identity::{Credentials, Identity, IdentityConfig, NewAnchors, TrustAnchors};
    let dir = std::env::temp_dir().join(format!("remora-anchors-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let running = controller(&dir, true, &[]).await;
    let anchors = std::fs::read_to_string(dir.join("ca/trust-anchors.pem")).unwrap();
    std::fs::write(dir.join("web.token"), "web-token\n").unwrap();
    let identity = Identity::new(IdentityConfig {
        trust_domain: "cluster.local".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        token_file: dir.join("web.token"),
        trust_anchors: TrustAnchors::Inline(anchors.clone()),
    })
    .unwrap();
    let mut client = api::identity_client::IdentityClient::new(tls(running.grpc, &anchors, None));
    let bundle = |c: &Credentials| match &c.anchors {
        NewAnchors::Bundle { der, .. } => der.clone(),
        other => panic!("expected a bundle, got {other:?}"),
    };
    let first = identity.certify(&mut client).await.unwrap();
    assert_eq!(bundle(&first).len(), 1);

    // A second root added to the controller's anchors file: re-read within seconds,
    // handed out with the next certificate, the issuer unchanged.
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "a new root");
    let other = params
        .self_signed(&KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap())
        .unwrap();
    std::fs::write(
        dir.join("ca/trust-anchors.pem"),
        format!("{anchors}{}", other.pem()),
    )
    .unwrap();
    // Bounded: 15 s for a reload every 5 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while value(
        &metrics(running.admin).await,
        "remora_controller_trust_anchors",
    ) != 2.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the anchors file was not re-read"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let text = metrics(running.admin).await;
    assert_eq!(
        value(
            &text,
            "remora_controller_issuer_reloads_total{result=\"reloaded\"}"
        ),
        1.0,
        "{text}"
    );
    let second = identity.certify(&mut client).await.unwrap();
    assert_eq!(bundle(&second)[1], other.der().to_vec());
    assert_eq!(second.chain_der, first.chain_der, "the same issuer");

    // A bundle the new certificate does not chain to is not trusted.
    let rsp = client
        .certify(identity.request("web-token").unwrap())
        .await
        .unwrap()
        .into_inner();
    let forged = api::CertifyResponse {
        trust_anchors: vec![other.der().to_vec()],
        ..rsp
    };
    match identity.accept(forged).unwrap().anchors {
        NewAnchors::Refused(why) => assert!(why.contains("does not chain"), "{why}"),
        other => panic!("a bundle the certificate does not chain to was taken: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 11: without a client certificate (or over plaintext) `Destination.Get` and
/// the policy watches answered endpoints, pod names, ServiceAccounts and policies.
#[tokio::test]
async fn certify_signs_what_the_token_entitles_and_only_certified_callers_get_the_rest() {
    let dir = std::env::temp_dir().join(format!("remora-identity-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A Service in shop, and a consumer route for it that namespace `other` set for
    // its own clients only.
    std::fs::create_dir_all(dir.join("objects")).unwrap();
    std::fs::write(
        dir.join("objects/objects.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: others-only, namespace: other}\n\
         spec:\n  parentRefs: [{kind: Service, group: \"\", name: api, namespace: shop, port: 80}]\n\
         \x20 rules: [{backendRefs: [{name: api, namespace: shop, port: 80}]}]\n",
    )
    .unwrap();
    let running = controller(&dir, true, &[]).await;
    let anchors = std::fs::read_to_string(dir.join("ca/trust-anchors.pem")).unwrap();
    let anonymous = tls(running.grpc, &anchors, None);
    let mut client = api::identity_client::IdentityClient::new(anonymous.clone());

    let (csr, key) = csr_for("shop", "web");
    let rsp = client
        .certify(request("web-token", WEB, csr))
        .await
        .unwrap()
        .into_inner();
    let (_, leaf) = X509Certificate::from_der(&rsp.leaf_certificate).unwrap();
    let (_, issuer) = X509Certificate::from_der(&rsp.intermediate_certificates[0]).unwrap();
    leaf.verify_signature(Some(issuer.public_key()))
        .expect("leaf signed by the issuer");
    let root_der = pem::parse(&anchors).unwrap().into_contents();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    issuer
        .verify_signature(Some(root.public_key()))
        .expect("issuer signed by the trust anchor");
    assert_eq!(
        rsp.trust_anchors,
        vec![root_der.clone()],
        "the bundle comes with the certificate"
    );
    let until = rsp.valid_until.unwrap().seconds;
    assert_eq!(
        until,
        leaf.validity().not_after.timestamp(),
        "valid_until is the leaf's notAfter"
    );

    // A token for sa web asking for sa other's identity.
    let err = client
        .certify(request(
            "web-token",
            "spiffe://cluster.local/ns/shop/sa/other",
            csr_for("shop", "other").0,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        err.message()
            .contains("the token is for spiffe://cluster.local/ns/shop/sa/web"),
        "{err}"
    );
    // The right identity, but a CSR for sa other.
    let err = client
        .certify(request("web-token", WEB, csr_for("shop", "other").0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("must name exactly"), "{err}");
    // An unknown token.
    let err = client
        .certify(request("stolen", WEB, csr_for("shop", "web").0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // Without a certificate, nothing but Certify.
    let err = api::destination_client::DestinationClient::new(anonymous)
        .get(destination("10.96.0.99:80"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(
        err.message().contains("client certificate is required"),
        "{err}"
    );
    let err = inbound_refused(tls(running.grpc, &anchors, None), "shop:web-1").await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    // Plaintext is refused, Certify included: a token must not travel in clear.
    let err = api::identity_client::IdentityClient::new(plaintext(running.grpc).await)
        .certify(request("web-token", WEB, csr_for("shop", "web").0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("--grpc-plaintext"), "{err}");
    let text = metrics(running.admin).await;
    assert_eq!(
        value(
            &text,
            r#"remora_controller_grpc_refused_total{reason="unauthenticated"}"#
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        value(&text, r#"remora_controller_certify_total{result="issued"}"#),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"remora_controller_certify_total{result="bad_token"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"remora_controller_certify_total{result="wrong_identity"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"remora_controller_certify_total{result="bad_csr"}"#
        ),
        1.0
    );

    // With the certificate it was given, Destination answers on the same listener.
    let chain = std::iter::once(rsp.leaf_certificate)
        .chain(rsp.intermediate_certificates)
        .collect();
    let certified = tls(running.grpc, &anchors, Some((chain, &key)));

    // What a workload sees follows what its certificate proves, not what it says.
    let err = inbound_refused(certified.clone(), "other:their-pod").await;
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let outbound = outbound_as(certified.clone(), "other").await;
    assert!(
        outbound.http_routes.is_empty(),
        "web (in shop) got other's consumer route: {:?}",
        outbound.http_routes
    );
    // (Over plaintext, enabled for local use, the namespace a caller says is all there
    // is: that route does reach a client in `other`.)
    let local = controller(&dir, true, &["--grpc-plaintext"]).await;
    let said = outbound_as(plaintext(local.grpc).await, "other").await;
    assert_eq!(said.http_routes.len(), 1, "the consumer route attaches");

    let mut dest = api::destination_client::DestinationClient::new(certified);
    let mut stream = dest
        .get(destination("10.96.0.99:80"))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        first.kind,
        Some(api::update::Kind::NoEndpoints(api::NoEndpoints {
            exists: false
        }))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn without_a_ca_certify_says_what_to_configure() {
    let dir = std::env::temp_dir().join(format!("remora-identity-off-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let running = controller(&dir, false, &["--grpc-plaintext"]).await;
    let mut client = api::identity_client::IdentityClient::new(plaintext(running.grpc).await);
    let err = client
        .certify(request("web-token", WEB, csr_for("shop", "web").0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("--dev-ca"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_a_ca_the_controller_needs_plaintext_asked_for() {
    let args = ["remora-controller", "--source", "dir:/nonexistent"].map(String::from);
    let err = Config::load(args, &|_| None).unwrap_err().to_string();
    assert!(err.contains("--grpc-plaintext"), "{err}");
}

/// Issue 11: one client could ask Certify about 800 times a second, each a TokenReview.
#[tokio::test]
async fn certify_guessing_is_throttled_per_client_and_counted() {
    let dir = std::env::temp_dir().join(format!("remora-identity-guess-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let running = controller(&dir, true, &[]).await;
    let anchors = std::fs::read_to_string(dir.join("ca/trust-anchors.pem")).unwrap();
    let mut client = api::identity_client::IdentityClient::new(tls(running.grpc, &anchors, None));
    let mut codes = std::collections::BTreeMap::new();
    let started = std::time::Instant::now();
    for guess in 0..100 {
        let err = client
            .certify(request(&format!("guess-{guess}"), WEB, Vec::new()))
            .await
            .unwrap_err();
        *codes.entry(format!("{:?}", err.code())).or_insert(0) += 1;
    }
    // The burst of 10, and one a second after it, is judged (and refused for the
    // token); the rest never reach a review.
    let unauthenticated = codes.get("Unauthenticated").copied().unwrap_or(0);
    let exhausted = codes.get("ResourceExhausted").copied().unwrap_or(0);
    let earned = 10 + started.elapsed().as_secs() as u32 + 1;
    assert!((10..=earned).contains(&unauthenticated), "{codes:?}");
    assert_eq!(unauthenticated + exhausted, 100, "{codes:?}");
    // Issue 17: a client held at the rate limit costs no one else: a proxy on another
    // address, with a good token, is certified at once.
    let mut other = api::identity_client::IdentityClient::new(tls_from(
        Some("127.0.0.2".parse().unwrap()),
        running.grpc,
        &anchors,
        None,
    ));
    let (csr, _key) = csr_for("shop", "web");
    let issued = other.certify(request("web-token", WEB, csr)).await;
    assert!(issued.is_ok(), "another client was refused: {issued:?}");
    let text = metrics(running.admin).await;
    assert_eq!(
        value(
            &text,
            r#"remora_controller_certify_total{result="rate_limited"}"#
        ),
        f64::from(exhausted),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 11: 100k cancelled `Destination.Get` streams for made-up targets grew the
/// controller by 70 MB while `remora_controller_targets` read 0. A target is freed with
/// its last stream; one client holds a bounded number of streams.
#[tokio::test]
async fn streams_are_bounded_per_client_and_their_targets_freed_when_they_end() {
    let dir = std::env::temp_dir().join(format!("remora-identity-streams-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let running = controller(
        &dir,
        false,
        &["--grpc-plaintext", "--max-streams-per-client", "8"],
    )
    .await;
    let channel = plaintext(running.grpc).await;
    let mut dest = api::destination_client::DestinationClient::new(channel);
    let mut open = Vec::new();
    for port in 1..=8 {
        let mut stream = dest
            .get(destination(&format!("10.96.0.1:{port}")))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().expect("a first answer");
        open.push(stream);
    }
    let text = metrics(running.admin).await;
    assert_eq!(value(&text, "remora_controller_targets"), 8.0, "{text}");
    // On that connection a ninth stream would wait for HTTP/2 to allow it; on another
    // connection from the same client it is refused.
    let mut second = api::destination_client::DestinationClient::new(plaintext(running.grpc).await);
    let err = second.get(destination("10.96.0.1:9")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    // Cancelled streams free their targets and their slots (the server learns of a
    // cancel a moment after the client sends it).
    open.clear();
    for port in 100..600 {
        let mut attempts = 0;
        let mut stream = loop {
            match dest.get(destination(&format!("10.96.0.1:{port}"))).await {
                Ok(rsp) => break rsp.into_inner(),
                Err(e) if e.code() == Code::ResourceExhausted && attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => panic!("port {port}: {e}"),
            }
        };
        stream.message().await.unwrap().expect("a first answer");
    }
    let mut targets = f64::NAN;
    for _ in 0..100 {
        let text = metrics(running.admin).await;
        targets = value(&text, "remora_controller_targets");
        if targets == 0.0 {
            assert_eq!(
                value(&text, "remora_controller_streams_open"),
                0.0,
                "{text}"
            );
            assert!(
                value(
                    &text,
                    r#"remora_controller_grpc_refused_total{reason="too_many_streams"}"#
                ) >= 1.0,
                "{text}"
            );
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{targets} targets still watched after every stream ended");
}

/// This process's resident memory (the controller runs in it), in KiB.
fn rss_kib() -> u64 {
    remora_admin::rss_kib(None).expect("VmRSS in /proc/self/status")
}

/// The Service `web` with `n` endpoints whose addresses depend on `generation`.
fn big_service(generation: u32, n: u32) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.50, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n",
    );
    for i in 0..n {
        out.push_str(&format!(
            "- {{addresses: [\"10.{}.{}.{}\"], conditions: {{ready: true}}, zone: zone-a}}\n",
            generation % 250 + 1,
            i / 250,
            i % 250 + 1
        ));
    }
    out
}

/// Issue 17: a client that opens Destination streams and never reads them (its HTTP/2
/// windows never reopen) while a large Service changes again and again. The controller
/// must queue nothing it cannot send — each stream owes its reader the latest view, not
/// every view in between — and must hold back no one else: a well-behaved watcher of
/// the same Service sees the last change at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_queues_nothing_and_holds_back_no_one() {
    const ENDPOINTS: u32 = 500;
    const CHANGES: u32 = 30;
    const STALLED: usize = 64;
    let dir = std::env::temp_dir().join(format!("remora-identity-stall-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("objects")).unwrap();
    let write = |generation| {
        let tmp = dir.join("objects/.web.yaml.tmp");
        std::fs::write(&tmp, big_service(generation, ENDPOINTS)).unwrap();
        std::fs::rename(&tmp, dir.join("objects/web.yaml")).unwrap();
    };
    write(0);
    let running = controller(&dir, false, &["--grpc-plaintext"]).await;
    let target = "10.96.0.50:80";

    // The attacker: the smallest windows HTTP/2 allows it to ask for, and no reads.
    let stalled = Endpoint::from_shared(format!("http://{}", running.grpc))
        .unwrap()
        .initial_stream_window_size(1024)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut dest = api::destination_client::DestinationClient::new(stalled);
    let mut held = Vec::new();
    for _ in 0..STALLED {
        held.push(dest.get(destination(target)).await.unwrap().into_inner());
    }
    // The well-behaved watcher reads as updates come.
    let mut watcher =
        api::destination_client::DestinationClient::new(plaintext(running.grpc).await)
            .get(destination(target))
            .await
            .unwrap()
            .into_inner();
    // The endpoints it sees, rebuilt by the proxy's own code.
    let view = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen = view.clone();
    let reader = tokio::spawn(async move {
        let mut state = StreamState::default();
        while let Ok(Some(u)) = watcher.message().await {
            if let Some(View::Service { endpoints, .. }) = state.apply(u) {
                *seen.lock() = endpoints.iter().map(|e| e.addr.ip()).collect();
            }
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let rss_before = rss_kib();

    for generation in 1..=CHANGES {
        write(generation);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The watcher has the last generation's endpoints within two seconds.
    let last = (CHANGES % 250 + 1) as u8;
    let mut current = false;
    for _ in 0..100 {
        {
            let v = view.lock();
            current = v.len() == ENDPOINTS as usize
                && v.iter()
                    .all(|ip| matches!(ip, IpAddr::V4(v4) if v4.octets()[1] == last));
        }
        if current {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let grown = rss_kib().saturating_sub(rss_before);
    let text = metrics(running.admin).await;
    eprintln!(
        "{STALLED} unread streams through {CHANGES} changes of {ENDPOINTS} endpoints: RSS grew {grown} KiB; \
         the watcher current: {current}"
    );
    assert!(
        current,
        "the well-behaved watcher did not get the last change"
    );
    assert_eq!(
        value(&text, "remora_controller_streams_open"),
        STALLED as f64 + 1.0,
        "{text}"
    );
    // Each change replaces all 500 endpoints, tens of KiB of updates per stream:
    // queueing them would be tens of MiB (64 streams × 30 changes). The latest view
    // per stream is a few MiB in all.
    assert!(
        grown < 16 * 1024,
        "the controller grew {grown} KiB for streams nobody reads"
    );
    drop(held);
    reader.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
