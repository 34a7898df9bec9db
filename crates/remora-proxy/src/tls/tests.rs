//! Real rustls handshakes over in-memory pipes: what must connect does, and each way of
//! being wrong is refused.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::NamedGroup;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A root and an issuer under it, as the controller's CA has.
struct Pki {
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    issuer_der: Vec<u8>,
}

fn ca_params(cn: &str, path_len: u8) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

impl Pki {
    fn new(name: &str) -> Self {
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let root_params = ca_params(&format!("{name} root"), 1);
        let root = root_params.self_signed(&root_key).unwrap();
        let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let issuer_params = ca_params(&format!("{name} issuer"), 0);
        let issuer_cert = issuer_params
            .signed_by(&issuer_key, &Issuer::new(root_params, &root_key))
            .unwrap();
        Self {
            root_pem: root.pem(),
            issuer_der: issuer_cert.der().to_vec(),
            issuer: Issuer::new(issuer_params, issuer_key),
        }
    }

    /// A mesh leaf for `sa` in namespace `shop`, valid from `from` for `lifetime`.
    fn leaf(&self, sa: &str, from: OffsetDateTime, lifetime: time::Duration) -> Credentials {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![
            SanType::URI(spiffe(sa).as_str().try_into().unwrap()),
            SanType::DnsName(name(sa).as_str().try_into().unwrap()),
        ];
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = from;
        p.not_after = from + lifetime;
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Credentials {
            leaf_der: cert.der().to_vec(),
            chain_der: vec![self.issuer_der.clone()],
            key_der: key.serialize_der(),
            not_before: SystemTime::now(),
            not_after: SystemTime::now() + Duration::from_secs(3600),
            anchors: crate::identity::NewAnchors::Unsent,
        }
    }

    fn fresh(&self, sa: &str) -> Credentials {
        self.leaf(
            sa,
            OffsetDateTime::now_utc() - time::Duration::minutes(1),
            time::Duration::hours(1),
        )
    }
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}")
}

fn name(sa: &str) -> String {
    format!("{sa}.shop.serviceaccount.identity.cluster.local")
}

/// Runs a handshake: the client expects `expect_sa` at SNI `sni`; returns what each side saw.
async fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    sni: &str,
    expect_sa: &str,
) -> (Result<(), String>, Result<Option<String>, String>) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (sni, want) = (sni.to_string(), spiffe(expect_sa));
    let client = tokio::spawn(async move {
        let mut tls = connect(a, client, &sni, &want)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"pong");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        Ok::<_, String>(())
    });
    let server = tokio::spawn(async move {
        let (mut tls, peer) = accept(b, server).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    (client.await.unwrap(), server.await.unwrap())
}

#[tokio::test]
async fn mutual_tls_between_mesh_identities() {
    let pki = Pki::new("mesh");
    let roots = roots(&pki.root_pem).unwrap();
    let server = server_config(&pki.fresh("api"), roots.clone(), &name("api")).unwrap();
    let client = client_config(&pki.fresh("web"), roots, ALPN_H2).unwrap();
    let (c, s) = handshake(client, server, &name("api"), "api").await;
    c.unwrap();
    assert_eq!(
        s.unwrap().as_deref(),
        Some(spiffe("web").as_str()),
        "the server learns the client's identity"
    );
}

#[tokio::test]
async fn every_wrong_peer_is_refused() {
    let pki = Pki::new("mesh");
    let roots = roots(&pki.root_pem).unwrap();
    let api_server = server_config(&pki.fresh("api"), roots.clone(), &name("api")).unwrap();
    let web_client = client_config(&pki.fresh("web"), roots.clone(), ALPN_H2).unwrap();

    // A server whose certificate comes from another CA.
    let other = Pki::new("other");
    let foreign = server_config(&other.fresh("api"), roots.clone(), &name("api")).unwrap();
    let (c, _) = handshake(web_client.clone(), foreign, &name("api"), "api").await;
    let err = c.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "untrusted CA: {err}");

    // The right CA, the wrong identity: the client expected sa other.
    let impostor = server_config(&pki.fresh("other"), roots.clone(), &name("other")).unwrap();
    let (c, _) = handshake(web_client.clone(), impostor, &name("other"), "api").await;
    assert!(
        c.unwrap_err()
            .contains("expected spiffe://cluster.local/ns/shop/sa/api"),
        "wrong identity"
    );

    // An expired certificate.
    let past = OffsetDateTime::now_utc() - time::Duration::hours(2);
    let expired = server_config(
        &pki.leaf("api", past, time::Duration::hours(1)),
        roots.clone(),
        &name("api"),
    )
    .unwrap();
    let (c, _) = handshake(web_client.clone(), expired, &name("api"), "api").await;
    let err = c.unwrap_err();
    assert!(err.contains("expired"), "expired certificate: {err}");

    // A client without a certificate.
    let anonymous = {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(config)
    };
    let (_, s) = handshake(anonymous, api_server.clone(), &name("api"), "api").await;
    assert!(
        s.unwrap_err().contains("certificate"),
        "no client certificate"
    );

    // SNI naming another pod: this proxy has no certificate to present for it.
    let (c, s) = handshake(web_client, api_server, &name("db"), "db").await;
    assert!(c.is_err() && s.is_err(), "SNI of another pod");
}

/// A real ClientHello, in one record and split over two, is recognised whole and its
/// SNI read; anything cut short waits for more.
#[test]
fn client_hello_sni_is_read_across_records() {
    let pki = Pki::new("mesh");
    let config = client_config(
        &pki.fresh("frontend"),
        roots(&pki.root_pem).unwrap(),
        ALPN_H2,
    )
    .unwrap();
    let server = ServerName::try_from(name("web")).unwrap();
    let mut conn = rustls::ClientConnection::new(config, server).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert_eq!(crate::detect::classify(&hello), crate::detect::Verdict::Tls);
    assert_eq!(
        client_hello_sni(&hello).as_deref(),
        Some(name("web").as_str())
    );
    // The same handshake bytes split into two records.
    let body = &hello[5..];
    let (a, b) = body.split_at(body.len() / 2);
    let mut split = Vec::new();
    for part in [a, b] {
        split.extend_from_slice(&[0x16, 0x03, 0x01]);
        split.extend_from_slice(&(part.len() as u16).to_be_bytes());
        split.extend_from_slice(part);
    }
    assert_eq!(crate::detect::classify(&split), crate::detect::Verdict::Tls);
    assert_eq!(
        client_hello_sni(&split).as_deref(),
        Some(name("web").as_str())
    );
    for cut in [1, 5, 6, 10, hello.len() - 1, split.len() - 1] {
        let buf = if cut < hello.len() {
            &hello[..cut]
        } else {
            &split[..cut]
        };
        assert_eq!(
            crate::detect::classify(buf),
            crate::detect::Verdict::NeedMore,
            "{cut}"
        );
    }
}

/// Handshakes `client` with `server` and returns the key exchange both agreed on.
async fn key_exchange(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> NamedGroup {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let want = spiffe("api");
    let client = tokio::spawn(async move {
        let tls = connect(a, client, &name("api"), &want).await.unwrap();
        tls.get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name())
    });
    let (tls, _) = accept(b, server).await.unwrap();
    let server_saw = tls
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .map(|g| g.name());
    let client_saw = client.await.unwrap();
    assert_eq!(client_saw, server_saw, "both sides agree");
    client_saw.expect("a key exchange")
}

#[tokio::test]
async fn proxies_agree_on_post_quantum_key_exchange_and_classical_peers_still_connect() {
    let pki = Pki::new("mesh");
    let roots = roots(&pki.root_pem).unwrap();
    let server = server_config(&pki.fresh("api"), roots.clone(), &name("api")).unwrap();

    // Proxy to proxy: the hybrid X25519 + ML-KEM-768, in the first flight (no
    // HelloRetryRequest: it is the client's first key share).
    let client = client_config(&pki.fresh("web"), roots.clone(), ALPN_H2).unwrap();
    assert_eq!(
        client.crypto_provider().kx_groups[0].name(),
        NamedGroup::X25519MLKEM768,
        "offered first"
    );
    assert_eq!(
        key_exchange(client, server.clone()).await,
        NamedGroup::X25519MLKEM768
    );

    // A peer without post-quantum support (an older proxy, another TLS stack) still
    // connects, classically.
    let classical = rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let creds = pki.fresh("web");
    let mut chain = vec![CertificateDer::from(creds.leaf_der.clone())];
    chain.extend(creds.chain_der.iter().cloned().map(CertificateDer::from));
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(creds.key_der.clone()));
    let old = ClientConfig::builder_with_provider(Arc::new(classical))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    assert_eq!(
        key_exchange(Arc::new(old), server).await,
        NamedGroup::X25519
    );
}
