//! The proxy's identity: a P-256 key made in memory (never written anywhere), certified
//! by the controller with the pod's ServiceAccount token, and renewed at 70 % of each
//! certificate's lifetime. `/ready` waits for the first certificate.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use remora_admin::Readiness;
use remora_api::v1 as api;
use rustls::RootCertStore;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{error, info, warn};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// What readiness waits for.
pub const READY_REASON: &str = "identity certificate";
/// Why a proxy whose certificate expired unrenewed is not ready: meshed peers refuse
/// it, so Kubernetes should send its traffic to pods that can serve.
pub const EXPIRED_REASON: &str = "identity certificate expired, not renewed";

/// What the renewal loop keeps up to date in the proxy's metrics.
pub struct Counted {
    /// When the certificate in use expires, seconds since the epoch.
    pub expiry: Gauge,
    /// Certify calls that failed.
    pub failures: Counter,
    /// Certificates in the trust-anchor bundle in use.
    pub anchors: Gauge,
    /// Bundles from the controller that were not trusted.
    pub anchors_refused: Counter,
}

/// When to renew, as a share of the certificate's remaining lifetime: 70 % on average,
/// spread by ±10 % so that proxies started together (a rollout, a node's pods) do not
/// renew together, at the controller or in step with each other.
const RENEW_AT: f64 = 0.7;
const RENEW_SPREAD: f64 = 0.1;
/// Retries after a failed certification: from 1 s, doubling, to 30 s, with jitter.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Who this proxy is and where its token is.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    pub token_file: PathBuf,
    pub trust_anchors: TrustAnchors,
}

/// Where the mesh's trust anchors come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TrustAnchors {
    /// `REMORA_TRUST_ANCHORS`: a PEM file.
    File(PathBuf),
    /// `REMORA_TRUST_ANCHORS_PEM`: the PEM itself (what the injector sets).
    Inline(String),
}

impl TrustAnchors {
    /// The PEM text, or an error that names where it was looked for.
    pub fn read(&self) -> Result<String, String> {
        match self {
            TrustAnchors::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("REMORA_TRUST_ANCHORS {}: {e}", path.display())),
            TrustAnchors::Inline(pem) => Ok(pem.clone()),
        }
    }

    /// Where they come from, for errors.
    pub fn describe(&self) -> String {
        match self {
            TrustAnchors::File(path) => format!("REMORA_TRUST_ANCHORS {}", path.display()),
            TrustAnchors::Inline(_) => "REMORA_TRUST_ANCHORS_PEM".into(),
        }
    }
}

impl IdentityConfig {
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    pub fn server_name(&self) -> String {
        format!(
            "{}.{}.serviceaccount.identity.{}",
            self.service_account, self.namespace, self.trust_domain
        )
    }
}

/// A certificate and its private key, ready for TLS.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub leaf_der: Vec<u8>,
    pub chain_der: Vec<Vec<u8>>,
    /// PKCS#8.
    pub key_der: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The trust anchors that came with it.
    pub anchors: NewAnchors,
}

/// The trust anchors the controller sent with a certificate. From then on the proxy
/// trusts them, for peers and for the controller: that is how a rotation of the anchors
/// reaches every proxy without a restart. They come over TLS verified with the anchors
/// the proxy already had, from the controller that signs every certificate anyway.
#[derive(Debug, Clone)]
pub enum NewAnchors {
    /// None sent (a controller that predates rotation): the proxy keeps its own.
    Unsent,
    /// The bundle to trust, and its certificates (DER).
    Bundle {
        roots: Arc<RootCertStore>,
        der: Vec<Vec<u8>>,
    },
    /// Not trusted, and why: unreadable, or the new certificate does not chain to it (a
    /// bundle that would make the proxy's own certificate untrusted is never taken).
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "token file {path} cannot be read: {source}; is the pod's ServiceAccount token projected there?"
    )]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("making the key or CSR failed: {0}")]
    Key(String),
    #[error("the controller refused to certify {identity}: {status}")]
    Refused {
        identity: String,
        status: tonic::Status,
    },
    #[error("the controller's certificate is unusable: {0}")]
    BadCertificate(String),
}

/// Certifies and renews; publishes the current credentials.
pub struct Identity {
    config: IdentityConfig,
    key: KeyPair,
    current: watch::Sender<Option<Arc<Credentials>>>,
}

impl Identity {
    pub fn new(config: IdentityConfig) -> Result<Self, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        Ok(Self {
            config,
            key,
            current: watch::channel(None).0,
        })
    }

    /// The current credentials, and every renewal.
    pub fn credentials(&self) -> watch::Receiver<Option<Arc<Credentials>>> {
        self.current.subscribe()
    }

    /// One certification: read the token, send a CSR, check what comes back.
    pub async fn certify(
        &self,
        client: &mut api::identity_client::IdentityClient<Channel>,
    ) -> Result<Credentials, IdentityError> {
        let token = std::fs::read_to_string(&self.config.token_file).map_err(|source| {
            IdentityError::Token {
                path: self.config.token_file.clone(),
                source,
            }
        })?;
        let req = self.request(token.trim())?;
        let spiffe = req.identity.clone();
        let rsp = client
            .certify(req)
            .await
            .map_err(|status| IdentityError::Refused {
                identity: spiffe,
                status,
            })?
            .into_inner();
        self.accept(rsp)
    }

    /// The request for a certificate of this proxy's identity: `token` proves it, the
    /// CSR names it (URI and DNS SANs) with this proxy's key.
    pub fn request(&self, token: &str) -> Result<api::CertifyRequest, IdentityError> {
        let spiffe = self.config.spiffe_id();
        let dns = self.config.server_name();
        let key_err = |e: rcgen::Error| IdentityError::Key(e.to_string());
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(spiffe.as_str().try_into().map_err(key_err)?),
            SanType::DnsName(dns.as_str().try_into().map_err(key_err)?),
        ];
        let csr = params.serialize_request(&self.key).map_err(key_err)?;
        Ok(api::CertifyRequest {
            token: token.to_string(),
            identity: spiffe,
            certificate_signing_request: csr.der().to_vec(),
        })
    }

    /// Checks the controller's answer: a certificate for this proxy's identity, and only
    /// that, not yet expired. The key is the one the request was made with.
    pub fn accept(&self, rsp: api::CertifyResponse) -> Result<Credentials, IdentityError> {
        let spiffe = self.config.spiffe_id();
        let bad = |m: String| IdentityError::BadCertificate(m);
        let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&rsp.leaf_certificate)
            .map_err(|e| bad(format!("not a certificate: {e}")))?;
        let names: Vec<String> = leaf
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if names != [spiffe.clone()] {
            return Err(bad(format!("it names {names:?}, not {spiffe}")));
        }
        let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        let (not_before, not_after) = (
            at(leaf.validity().not_before.timestamp()),
            at(leaf.validity().not_after.timestamp()),
        );
        if not_after <= SystemTime::now() {
            return Err(bad("it has already expired".into()));
        }
        let anchors = match rsp.trust_anchors.is_empty() {
            true => NewAnchors::Unsent,
            false => match self.check_anchors(&rsp, not_before) {
                Ok(roots) => NewAnchors::Bundle {
                    roots,
                    der: rsp.trust_anchors,
                },
                Err(why) => NewAnchors::Refused(why),
            },
        };
        Ok(Credentials {
            leaf_der: rsp.leaf_certificate,
            chain_der: rsp.intermediate_certificates,
            key_der: self.key.serialize_der(),
            not_before,
            not_after,
            anchors,
        })
    }

    /// The bundle sent with `rsp`, if the certificate it brings chains to it and names
    /// this proxy, as a peer will check it. Checked at the certificate's notBefore when
    /// this proxy's clock is behind it: a clock a minute slow must not refuse every
    /// bundle (peers check validity with their own clocks).
    fn check_anchors(
        &self,
        rsp: &api::CertifyResponse,
        not_before: SystemTime,
    ) -> Result<Arc<RootCertStore>, String> {
        use rustls::{
            client::{WebPkiServerVerifier, danger::ServerCertVerifier},
            pki_types::{CertificateDer, ServerName, UnixTime},
        };
        let mut roots = RootCertStore::empty();
        for der in &rsp.trust_anchors {
            roots
                .add(CertificateDer::from(der.as_slice()))
                .map_err(|e| format!("a trust anchor cannot be read: {e}"))?;
        }
        let roots = Arc::new(roots);
        let verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), crate::crypto::provider())
                .build()
                .map_err(|e| e.to_string())?;
        let chain: Vec<CertificateDer<'_>> = rsp
            .intermediate_certificates
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let name = ServerName::try_from(self.config.server_name()).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(
                &CertificateDer::from(rsp.leaf_certificate.as_slice()),
                &chain,
                &name,
                &[],
                UnixTime::since_unix_epoch(
                    SystemTime::now()
                        .max(not_before + Duration::from_secs(1))
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default(),
                ),
            )
            .map_err(|e| format!("the new certificate does not chain to them: {e}"))?;
        Ok(roots)
    }

    /// How long the certificate in use has left (zero once expired); None before the first.
    fn expires_in(&self) -> Option<Duration> {
        let current = self.current.borrow();
        let creds = current.as_ref()?;
        Some(
            creds
                .not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
    }

    /// Certifies now, then renews at 70 % of each lifetime; retries failures with backoff.
    /// Releases `readiness` after the first certificate. A failed renewal says how long
    /// the certificate has left, at each retry, and the retries never sleep past its
    /// expiry; once it has expired unrenewed the proxy holds readiness until a renewal
    /// succeeds.
    pub async fn run(
        self: Arc<Self>,
        channel: Channel,
        readiness: Arc<Readiness>,
        counted: Counted,
    ) {
        let mut client = api::identity_client::IdentityClient::new(channel);
        let mut retry = RETRY_MIN;
        let mut expired = false;
        loop {
            match self.certify(&mut client).await {
                Ok(creds) => {
                    retry = RETRY_MIN;
                    if std::mem::take(&mut expired) {
                        info!("renewed after the certificate expired: ready again");
                        readiness.release(EXPIRED_REASON);
                    }
                    let expires = creds
                        .not_after
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    counted.expiry.set(expires.as_secs() as i64);
                    match &creds.anchors {
                        NewAnchors::Unsent => {}
                        NewAnchors::Bundle { der, .. } => {
                            counted.anchors.set(der.len() as i64);
                        }
                        NewAnchors::Refused(why) => {
                            counted.anchors_refused.inc();
                            warn!(
                                %why,
                                "the trust anchors sent with the certificate are not trusted; \
                                 the proxy keeps the ones it has"
                            );
                        }
                    }
                    // A share of what is left now: the issuer may backdate notBefore for
                    // clock skew, which must not pull the renewal earlier.
                    let left = creds
                        .not_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let share = RENEW_AT + RENEW_SPREAD * (2.0 * crate::rng::fraction() - 1.0);
                    let wait = left.mul_f64(share).max(RETRY_MIN);
                    info!(identity = %self.config.spiffe_id(), renew_in = ?wait, "certified");
                    self.current.send_replace(Some(Arc::new(creds)));
                    readiness.release(READY_REASON);
                    tokio::time::sleep(wait).await;
                }
                Err(error) => {
                    counted.failures.inc();
                    let pause = retry.mul_f64(0.5 + crate::rng::fraction());
                    retry = (retry * 2).min(RETRY_MAX);
                    let left = self.expires_in();
                    // Wake at expiry at the latest, to become unready on time.
                    let pause = left
                        .filter(|l| !l.is_zero())
                        .map_or(pause, |l| pause.min(l));
                    match left {
                        None => warn!(%error, retry_in = ?pause, "certification failed"),
                        Some(left) if !left.is_zero() => warn!(
                            %error,
                            expires_in = ?left,
                            retry_in = ?pause,
                            "certification failed; the certificate in use expires in {} s",
                            left.as_secs()
                        ),
                        Some(_) if !expired => {
                            error!(
                                %error,
                                "the certificate expired and could not be renewed: not ready \
                                 until it is (meshed peers refuse connections with it)"
                            );
                            readiness.hold(EXPIRED_REASON);
                            expired = true;
                        }
                        Some(_) => warn!(
                            %error,
                            retry_in = ?pause,
                            "certification failed; the certificate has expired"
                        ),
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}
