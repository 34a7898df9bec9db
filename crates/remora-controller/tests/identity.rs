//! `Identity.Certify` over real gRPC, next to `Destination` on the same listener: a
//! token entitles exactly its ServiceAccount's certificate, and nothing else.

use std::path::Path;

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use remora_api::v1 as api;
use remora_controller::{App, Config};
use tonic::{Code, transport::Channel};
use x509_parser::prelude::{FromDer, X509Certificate};

fn csr_for(ns: &str, sa: &str) -> Vec<u8> {
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
    params.serialize_request(&key).unwrap().der().to_vec()
}

async fn controller(dir: &Path, identity: bool) -> Channel {
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
    let config = Config::load(args, &|_| None).unwrap();
    let app = App::build(config, remora_admin::LogLevel::detached("info"))
        .await
        .unwrap();
    let addr = app.grpc_addr().unwrap();
    tokio::spawn(app.run(std::future::pending()));
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn request(token: &str, identity: &str, csr: Vec<u8>) -> api::CertifyRequest {
    api::CertifyRequest {
        token: token.into(),
        identity: identity.into(),
        certificate_signing_request: csr,
    }
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

#[tokio::test]
async fn certify_signs_what_the_token_entitles_and_refuses_the_rest() {
    let dir = std::env::temp_dir().join(format!("remora-identity-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let channel = controller(&dir, true).await;
    let mut client = api::identity_client::IdentityClient::new(channel.clone());

    let rsp = client
        .certify(request("web-token", WEB, csr_for("shop", "web")))
        .await
        .unwrap()
        .into_inner();
    let (_, leaf) = X509Certificate::from_der(&rsp.leaf_certificate).unwrap();
    let (_, issuer) = X509Certificate::from_der(&rsp.intermediate_certificates[0]).unwrap();
    leaf.verify_signature(Some(issuer.public_key()))
        .expect("leaf signed by the issuer");
    let anchors = std::fs::read_to_string(dir.join("ca/trust-anchors.pem")).unwrap();
    let root_der = pem::parse(anchors).unwrap().into_contents();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    issuer
        .verify_signature(Some(root.public_key()))
        .expect("issuer signed by the trust anchor");
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
            csr_for("shop", "other"),
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
        .certify(request("web-token", WEB, csr_for("shop", "other")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("must name exactly"), "{err}");
    // An unknown token.
    let err = client
        .certify(request("stolen", WEB, csr_for("shop", "web")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // Destination answers on the same listener.
    let mut dest = api::destination_client::DestinationClient::new(channel);
    let mut stream = dest
        .get(api::GetDestination {
            target: "10.96.0.99:80".into(),
            client: None,
        })
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
    let mut client = api::identity_client::IdentityClient::new(controller(&dir, false).await);
    let err = client
        .certify(request("web-token", WEB, csr_for("shop", "web")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("--dev-ca"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
