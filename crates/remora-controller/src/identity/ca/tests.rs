//! The CA signs exactly what a token entitles, and nothing else.

use super::*;
use rcgen::{PKCS_ECDSA_P384_SHA384, SanType};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

fn sa(ns: &str, name: &str) -> ServiceAccount {
    ServiceAccount {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn csr(names: &[SanType], alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = names.to_vec();
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn names_for(ns: &str, name: &str) -> Vec<SanType> {
    vec![
        SanType::URI(
            format!("spiffe://cluster.local/ns/{ns}/sa/{name}")
                .as_str()
                .try_into()
                .unwrap(),
        ),
        SanType::DnsName(
            format!("{name}.{ns}.serviceaccount.identity.cluster.local")
                .as_str()
                .try_into()
                .unwrap(),
        ),
    ]
}

fn from_files(
    cert: &Path,
    key: &Path,
    anchors: &Path,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<Ca, CaError> {
    let files = CaFiles {
        cert: cert.into(),
        key: key.into(),
        anchors: anchors.into(),
    };
    Ca::from_files(&files, trust_domain, lifetime)
}

fn dev_ca() -> (Ca, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "remora-ca-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    (
        Ca::dev(&dir, "cluster.local", Duration::from_secs(24 * 3600)).unwrap(),
        dir,
    )
}

#[test]
fn a_csr_naming_the_tokens_service_account_is_signed_as_a_mesh_leaf() {
    let (ca, dir) = dev_ca();
    let out = ca
        .certify(
            &sa("shop", "web"),
            &csr(&names_for("shop", "web"), &PKCS_ECDSA_P256_SHA256),
        )
        .unwrap();
    let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&out.leaf_der).unwrap();
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("uri:{u}"),
            GeneralName::DNSName(d) => format!("dns:{d}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        sans,
        [
            "uri:spiffe://cluster.local/ns/shop/sa/web",
            "dns:web.shop.serviceaccount.identity.cluster.local"
        ]
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!leaf.is_ca());
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(
        lifetime,
        24 * 3600 + 60,
        "24 h plus a minute of clock slack"
    );
    let (_, issuer) =
        x509_parser::certificate::X509Certificate::from_der(&out.chain_der[0]).unwrap();
    assert_eq!(leaf.issuer(), issuer.subject());
    leaf.verify_signature(Some(issuer.public_key()))
        .expect("signed by the issuer");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn anything_else_is_refused_with_the_reason() {
    let (ca, dir) = dev_ca();
    let web = sa("shop", "web");
    let p256 = &PKCS_ECDSA_P256_SHA256;
    // A token for sa web, a CSR for sa other.
    let err = ca
        .certify(&web, &csr(&names_for("shop", "other"), p256))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("must name exactly") && err.contains("sa/other"),
        "{err}"
    );
    // One name too many, or one missing.
    let mut extra = names_for("shop", "web");
    extra.push(SanType::DnsName("evil.example.com".try_into().unwrap()));
    assert!(matches!(
        ca.certify(&web, &csr(&extra, p256)),
        Err(CertifyError::Names { .. })
    ));
    assert!(matches!(
        ca.certify(&web, &csr(&names_for("shop", "web")[..1], p256)),
        Err(CertifyError::Names { .. })
    ));
    // The wrong key type, and garbage.
    assert!(matches!(
        ca.certify(
            &web,
            &csr(&names_for("shop", "web"), &PKCS_ECDSA_P384_SHA384)
        ),
        Err(CertifyError::KeyAlgorithm)
    ));
    assert!(matches!(
        ca.certify(&web, b"\x30\x03garbage"),
        Err(CertifyError::Malformed(_))
    ));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_dev_ca_is_made_once_and_reused() {
    let (ca, dir) = dev_ca();
    let anchors = ca.trust_anchors_pem().to_string();
    let key_mode = std::fs::metadata(dir.join("issuer.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key_mode.permissions().mode() & 0o777, 0o600);
    let again = Ca::dev(&dir, "cluster.local", Duration::from_secs(60)).unwrap();
    assert_eq!(again.trust_anchors_pem(), anchors);
    // A broken issuer file is an error that names the file, not a new CA.
    std::fs::write(dir.join("issuer.pem"), "nonsense").unwrap();
    let err = Ca::dev(&dir, "cluster.local", Duration::from_secs(60))
        .unwrap_err()
        .to_string();
    assert!(err.contains("issuer.pem"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 13: a mismatched issuer set started, reported ready, and only the proxies
/// failed, with TLS errors naming no file. Each mistake is refused at start, naming it.
#[test]
fn a_mismatched_issuer_set_is_refused_naming_the_file() {
    let base = std::env::temp_dir().join(format!("remora-ca-set-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (a, b) = (base.join("a"), base.join("b"));
    generate(&a, "cluster.local").unwrap();
    generate(&b, "cluster.local").unwrap();
    let load = |cert: &Path, key: &Path, anchors: &Path| {
        from_files(
            cert,
            key,
            anchors,
            "cluster.local",
            Duration::from_secs(3600),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let (cert, key, anchors) = (
        a.join("issuer.pem"),
        a.join("issuer.key"),
        a.join("trust-anchors.pem"),
    );
    assert_eq!(load(&cert, &key, &anchors), Ok(()));
    let err = load(&cert, &b.join("issuer.key"), &anchors).unwrap_err();
    assert!(
        err.contains("b/issuer.key") && err.contains("is not the key of"),
        "{err}"
    );
    let err = load(&cert, &key, &b.join("trust-anchors.pem")).unwrap_err();
    assert!(
        err.contains("a/issuer.pem") && err.contains("is not signed by any certificate"),
        "{err}"
    );

    // A set written to `dir` and loaded: the error.
    let refused =
        |dir: &str, issuer: &rcgen::Certificate, key: &KeyPair, root: &rcgen::Certificate| {
            let dir = base.join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("issuer.pem"), issuer.pem()).unwrap();
            std::fs::write(dir.join("issuer.key"), key.serialize_pem()).unwrap();
            std::fs::write(dir.join("trust-anchors.pem"), root.pem()).unwrap();
            load(
                &dir.join("issuer.pem"),
                &dir.join("issuer.key"),
                &dir.join("trust-anchors.pem"),
            )
            .unwrap_err()
        };
    let root_params = || {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "root");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p
    };
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let root = root_params().self_signed(&root_key).unwrap();

    // An issuer that expired yesterday, signed by a valid root.
    let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut issuer_params = CertificateParams::default();
    issuer_params
        .distinguished_name
        .push(DnType::CommonName, "issuer");
    issuer_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let now = OffsetDateTime::now_utc();
    issuer_params.not_before = now - time::Duration::days(30);
    issuer_params.not_after = now - time::Duration::days(1);
    let issuer = issuer_params
        .signed_by(&issuer_key, &Issuer::new(root_params(), &root_key))
        .unwrap();
    let err = refused("expired", &issuer, &issuer_key, &root);
    assert!(
        err.contains("expired/issuer.pem") && err.contains("is not valid now"),
        "{err}"
    );

    // An issuer that is not a CA: webpki would refuse every leaf it signs.
    let leafish_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leafish = CertificateParams::default();
    leafish
        .distinguished_name
        .push(DnType::CommonName, "not-a-ca");
    leafish.is_ca = IsCa::ExplicitNoCa;
    let leafish = leafish
        .signed_by(&leafish_key, &Issuer::new(root_params(), &root_key))
        .unwrap();
    let err = refused("not-ca", &leafish, &leafish_key, &root);
    assert!(
        err.contains("not-ca/issuer.pem") && err.contains("is not a CA"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// The quick start's root (the chart makes it with Helm's `genPrivateKey "ecdsa"`) and
/// keys users make with openssl or step are SEC1 `EC PRIVATE KEY`s: read them, and say
/// what is wrong with a key of another curve. The keys come from openssl itself.
#[test]
fn an_openssl_ec_key_and_a_root_that_is_its_own_issuer_are_used() {
    let dir = std::env::temp_dir().join(format!("remora-ca-sec1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for (curve, name) in [("prime256v1", "p256"), ("secp384r1", "p384")] {
        let key = format!("{name}.key");
        openssl(&["ecparam", "-name", curve, "-genkey", "-noout", "-out", &key]);
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-subj",
            "/CN=root.identity.cluster.local",
            "-days",
            "365",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &format!("{name}.pem"),
        ]);
    }
    assert!(
        std::fs::read_to_string(dir.join("p256.key"))
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY")
    );
    // The root as its own issuer, and as the anchors.
    let (cert, key) = (dir.join("p256.pem"), dir.join("p256.key"));
    let ca = from_files(
        &cert,
        &key,
        &cert,
        "cluster.local",
        Duration::from_secs(3600),
    )
    .unwrap();
    let out = ca
        .certify(
            &sa("shop", "web"),
            &csr(&names_for("shop", "web"), &PKCS_ECDSA_P256_SHA256),
        )
        .unwrap();
    let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&out.leaf_der).unwrap();
    let (_, root) =
        x509_parser::pem::parse_x509_pem(std::fs::read(&cert).unwrap().as_slice()).unwrap();
    let root = root.parse_x509().unwrap();
    leaf.verify_signature(Some(root.public_key()))
        .expect("signed by the openssl root");

    let err = from_files(
        &dir.join("p384.pem"),
        &dir.join("p384.key"),
        &dir.join("p384.pem"),
        "cluster.local",
        Duration::from_secs(3600),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("p384.key") && err.contains("P-256"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
