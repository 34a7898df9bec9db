//! The controller's certificate authority: an issuer (intermediate) certificate and key,
//! and the trust anchors every proxy verifies against. From files in production, or
//! generated once into a folder (`--dev-ca`) for development and tests.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use remora_k8s::pki::{self, Cert};
use time::OffsetDateTime;

use super::{ServiceAccount, server_name, spiffe_id};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("generating the development CA failed: {0}")]
    Generate(String),
}

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("the CSR cannot be parsed or its signature is wrong: {0}")]
    Malformed(String),
    #[error("the CSR's key must be ECDSA P-256")]
    KeyAlgorithm,
    #[error("the CSR must name exactly {want:?} (URI and DNS SANs), it names {got:?}")]
    Names { want: Vec<String>, got: Vec<String> },
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A signed leaf and what comes with it.
#[derive(Debug, Clone)]
pub struct Certified {
    pub leaf_der: Vec<u8>,
    /// From the leaf's issuer up to, not including, a trust anchor.
    pub chain_der: Vec<Vec<u8>>,
    pub not_after: SystemTime,
    /// The trust anchors handed out with the leaf (DER): the bundle proxies trust.
    pub anchors_der: Vec<Vec<u8>>,
}

/// An issuer and the trust anchors it chains to. Cheap to clone: rotation makes one
/// from the issuer in use and a new bundle (see [`super::rotation`]).
#[derive(Clone)]
pub struct Ca {
    issuer: Arc<IssuerKey>,
    anchors: Arc<Anchors>,
    trust_domain: String,
    lifetime: Duration,
}

/// The issuer's certificate and key.
pub(crate) struct IssuerKey {
    issuer: Issuer<'static, KeyPair>,
    pub(crate) cert: Cert,
}

/// A bundle of trust anchors: as written, as read, and as rustls verifies with it.
pub(crate) struct Anchors {
    pub(crate) pem: String,
    pub(crate) certs: Vec<Cert>,
    pub(crate) roots: Arc<rustls::RootCertStore>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .field("issuer", &self.issuer.cert.subject)
            .field(
                "anchors",
                &self
                    .anchors
                    .certs
                    .iter()
                    .map(|c| &c.subject)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Where an issuer set is read from: the issuer's certificate and key, and the trust
/// anchors, each a PEM file.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub anchors: PathBuf,
}

impl CaFiles {
    /// The development CA's files in `dir`.
    pub fn dev(dir: &Path) -> Self {
        Self {
            cert: dir.join("issuer.pem"),
            key: dir.join("issuer.key"),
            anchors: dir.join("trust-anchors.pem"),
        }
    }

    /// The development CA's files in `dir`, made first when absent.
    pub fn dev_made(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let files = Self::dev(dir);
        if !(files.cert.exists() && files.key.exists() && files.anchors.exists()) {
            generate(dir, trust_domain)?;
        }
        Ok(files)
    }

    /// The three files' text: certificate, key, anchors.
    pub fn read(&self) -> Result<[String; 3], CaError> {
        Ok([read(&self.cert)?, read(&self.key)?, read(&self.anchors)?])
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| CaError::File {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// The issuer's key: PKCS#8 (`PRIVATE KEY`), or SEC1 (`EC PRIVATE KEY`, what `openssl
/// ecparam`, `step` and Helm's `genPrivateKey "ecdsa"` write) for P-256.
fn key_pair(text: &str) -> Result<KeyPair, String> {
    let parsed = ::pem::parse(text).map_err(|e| format!("not PEM: {e}"))?;
    match parsed.tag() {
        "PRIVATE KEY" => KeyPair::from_pem(text).map_err(|e| format!("unusable PKCS#8 key: {e}")),
        "EC PRIVATE KEY" => KeyPair::try_from(sec1_p256_to_pkcs8(parsed.contents()).as_slice())
            .map_err(|e| format!("unusable EC key (P-256 is supported): {e}")),
        other => Err(format!(
            "a {other:?} PEM block: expected an ECDSA key as PRIVATE KEY (PKCS#8) or EC PRIVATE KEY"
        )),
    }
}

/// Wraps a SEC1 `ECPrivateKey` in PKCS#8 for P-256 (RFC 5915, RFC 5208): ring reads
/// only the latter. A key of another curve fails to load afterwards, by name.
fn sec1_p256_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    fn der(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match body.len() {
            n @ 0..=127 => out.push(n as u8),
            n @ 128..=255 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(body);
        out
    }
    // id-ecPublicKey, prime256v1.
    const ALGORITHM: &[u8] = &[
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(ALGORITHM);
    body.extend(der(0x04, sec1));
    der(0x30, &body)
}

fn pem_to_der(pem_text: &str, path: &Path) -> Result<Vec<u8>, CaError> {
    let p = pem::parse(pem_text).map_err(|e| CaError::File {
        path: path.into(),
        reason: format!("not PEM: {e}"),
    })?;
    Ok(p.into_contents())
}

impl Ca {
    /// The issuer from `files` (PEM), trusted through their anchors (a PEM bundle).
    pub fn from_files(
        files: &CaFiles,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Self, CaError> {
        Self::parse(files, files.read()?, trust_domain, lifetime)
    }

    /// [`Ca::from_files`] on the files' text, already read (named by the files in errors).
    pub fn parse(
        files: &CaFiles,
        [cert_pem, key_pem, trust_anchors_pem]: [String; 3],
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Self, CaError> {
        let (cert, key, anchors) = (&files.cert, &files.key, &files.anchors);
        let key_pair = key_pair(&key_pem).map_err(|reason| CaError::File {
            path: key.into(),
            reason,
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair).map_err(|e| CaError::File {
            path: cert.into(),
            reason: format!("not a CA certificate: {e}"),
        })?;
        if !trust_anchors_pem.contains("BEGIN CERTIFICATE") {
            return Err(CaError::File {
                path: anchors.into(),
                reason: "no certificate in the bundle".into(),
            });
        }
        let issuer_der = pem_to_der(&cert_pem, cert)?;
        let (issuer_cert, certs, roots) = check_set(
            &issuer_der,
            cert,
            &issuer.key().subject_public_key_info(),
            key,
            &trust_anchors_pem,
            anchors,
        )?;
        Ok(Self {
            issuer: Arc::new(IssuerKey {
                issuer,
                cert: issuer_cert,
            }),
            anchors: Arc::new(Anchors {
                pem: trust_anchors_pem,
                certs,
                roots,
            }),
            trust_domain: trust_domain.into(),
            lifetime,
        })
    }

    /// This CA's issuer with `other`'s trust anchors: a new bundle applied while the
    /// issuer in use stays.
    pub(crate) fn with_anchors_of(&self, other: &Ca) -> Ca {
        Ca {
            anchors: other.anchors.clone(),
            ..self.clone()
        }
    }

    pub(crate) fn issuer_cert(&self) -> &Cert {
        &self.issuer.cert
    }

    pub(crate) fn anchors(&self) -> &[Cert] {
        &self.anchors.certs
    }

    /// The trust anchors, for verifying clients' certificates.
    pub(crate) fn roots(&self) -> Arc<rustls::RootCertStore> {
        self.anchors.roots.clone()
    }

    /// The same issuer and the same bundle.
    pub fn same_as(&self, other: &Ca) -> bool {
        self.issuer.cert.der == other.issuer.cert.der && self.anchors.pem == other.anchors.pem
    }

    /// A development CA in `dir`: created (root and issuer) when absent, reused after.
    /// `dir/trust-anchors.pem` is what proxies trust.
    pub fn dev(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<Self, CaError> {
        Self::from_files(
            &CaFiles::dev_made(dir, trust_domain)?,
            trust_domain,
            lifetime,
        )
    }

    pub fn trust_anchors_pem(&self) -> &str {
        &self.anchors.pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Signs `csr_der` for `sa`, if it names exactly that ServiceAccount's identity.
    pub fn certify(&self, sa: &ServiceAccount, csr_der: &[u8]) -> Result<Certified, CertifyError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| CertifyError::Malformed(e.to_string()))?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CertifyError::KeyAlgorithm);
        }
        let uri = spiffe_id(&self.trust_domain, sa);
        let dns = server_name(&self.trust_domain, sa);
        let mut got: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(d) => d.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        got.sort();
        let mut want = vec![uri.clone(), dns.clone()];
        want.sort();
        let kinds_ok = csr
            .params
            .subject_alt_names
            .iter()
            .any(|s| matches!(s, SanType::URI(u) if u.as_str() == uri))
            && csr
                .params
                .subject_alt_names
                .iter()
                .any(|s| matches!(s, SanType::DnsName(d) if d.as_str() == dns));
        if got != want || !kinds_ok {
            return Err(CertifyError::Names { want, got });
        }
        let sign = |e: rcgen::Error| CertifyError::Sign(e.to_string());
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![
            SanType::URI(uri.as_str().try_into().map_err(sign)?),
            SanType::DnsName(dns.as_str().try_into().map_err(sign)?),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        // A minute of slack for clocks that are slightly behind.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + self.lifetime;
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer.issuer)
            .map_err(sign)?;
        Ok(Certified {
            leaf_der: leaf.der().to_vec(),
            chain_der: vec![self.issuer.cert.der.clone()],
            not_after: SystemTime::now() + self.lifetime,
            anchors_der: self.anchors.certs.iter().map(|c| c.der.clone()).collect(),
        })
    }
}

/// Refuses an issuer set proxies could not use: the key must be the certificate's, the
/// certificate valid now and signed by one of the anchors (or be one), and the anchors
/// valid now. Otherwise the controller would start, report ready, and only proxies
/// would fail, with TLS errors naming no file. The issuer's certificate and the
/// anchors, read, and as rustls verifies with them.
fn check_set(
    issuer_der: &[u8],
    cert: &Path,
    key_spki: &[u8],
    key: &Path,
    anchors_pem: &str,
    anchors: &Path,
) -> Result<(Cert, Vec<Cert>, Arc<rustls::RootCertStore>), CaError> {
    let bad = |path: &Path, reason: String| CaError::File {
        path: path.into(),
        reason,
    };
    let issuer = Cert::from_der(issuer_der)
        .map_err(|e| bad(cert, format!("cannot read the certificate: {e}")))?;
    if issuer.public_key != key_spki {
        return Err(bad(
            key,
            format!("is not the key of {} (another key pair's?)", cert.display()),
        ));
    }
    if let Some(why) = issuer.not_a_ca() {
        return Err(bad(
            cert,
            format!("{why}: proxies would refuse every certificate it signs"),
        ));
    }
    let now = pki::now();
    if !issuer.valid_at(now) {
        return Err(bad(
            cert,
            format!(
                "is not valid now (from {} to {}): issue a new issuer certificate",
                pki::date(issuer.not_before),
                pki::date(issuer.not_after)
            ),
        ));
    }
    let roots = pki::bundle(anchors_pem)
        .map_err(|e| bad(anchors, format!("cannot read the bundle: {e}")))?;
    // As the proxies will read them (webpki), or they would refuse the bundle.
    let mut store = rustls::RootCertStore::empty();
    for root in &roots {
        store.add(root.der.as_slice().into()).map_err(|e| {
            bad(
                anchors,
                format!("{}: not usable as a trust anchor: {e}", root.subject),
            )
        })?;
    }
    if let Some(stale) = roots.iter().find(|a| !a.valid_at(now)) {
        return Err(bad(
            anchors,
            format!(
                "holds a certificate ({}) that is not valid now (until {})",
                stale.subject,
                pki::date(stale.not_after)
            ),
        ));
    }
    if !issuer.chains_to(&roots) {
        return Err(bad(
            cert,
            format!(
                "is not signed by any certificate in {} (issuer {}): proxies would trust \
                 nothing it signs",
                anchors.display(),
                issuer.issuer
            ),
        ));
    }
    Ok((issuer, roots, Arc::new(store)))
}

/// Creates a root (10 years) and an issuer (1 year) under it, and writes the issuer's
/// certificate and key and the root as the trust anchors. Keys are written 0600.
pub(crate) fn generate(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    let g = |e: rcgen::Error| CaError::Generate(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| CaError::File {
        path: dir.into(),
        reason: e.to_string(),
    })?;
    let now = OffsetDateTime::now_utc();
    let ca_params = |cn: String, path_len: u8, years: i64| {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::days(365 * years);
        p
    };
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(g)?;
    let root_params = ca_params(format!("Remora development root ({trust_domain})"), 1, 10);
    let root = root_params.self_signed(&root_key).map_err(g)?;
    let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(g)?;
    let issuer_params = ca_params(format!("Remora development issuer ({trust_domain})"), 0, 1);
    let issuer = issuer_params
        .signed_by(&issuer_key, &Issuer::new(root_params, &root_key))
        .map_err(g)?;
    let write = |name: &str, text: String, private: bool| -> Result<(), CaError> {
        let path = dir.join(name);
        let err = |e: std::io::Error| CaError::File {
            path: path.clone(),
            reason: e.to_string(),
        };
        std::fs::write(&path, text).map_err(err)?;
        if private {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
        Ok(())
    };
    write("root.key", root_key.serialize_pem(), true)?;
    write("issuer.key", issuer_key.serialize_pem(), true)?;
    write("issuer.pem", issuer.pem(), false)?;
    write("trust-anchors.pem", root.pem(), false)?;
    Ok(())
}

#[cfg(test)]
mod tests;
