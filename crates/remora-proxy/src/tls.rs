//! mTLS between proxies (rustls, TLS 1.3 only). A server presents its certificate only
//! to clients that ask for its own name (SNI = its DNS-form identity) and requires a
//! client certificate from the same trust anchors; a client checks that the server's
//! certificate chains to the anchors and names exactly the identity discovery promised.

use std::{fmt, sync::Arc, time::Duration};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};
use tracing::{info, warn};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::identity::{Credentials, NewAnchors};

/// ALPN for HTTP between proxies.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for opaque TCP between proxies.
pub const ALPN_OPAQUE: &[u8] = b"remora-opaque/1";
/// ALPN for HTTP/1 requests that cannot ride HTTP/2: upgrades (WebSocket) and CONNECT.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// What a connection between proxies carries, as its ALPN says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http1,
    Opaque,
}

impl Alpn {
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Alpn::H2 => ALPN_H2,
            Alpn::Http1 => ALPN_HTTP1,
            Alpn::Opaque => ALPN_OPAQUE,
        }
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        [Alpn::H2, Alpn::Http1, Alpn::Opaque]
            .into_iter()
            .find(|a| a.as_bytes() == b)
    }
}

/// The identity a peer's proxy must prove: its SPIFFE ID, and the DNS form used as SNI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerId {
    pub spiffe_id: Arc<str>,
    pub server_name: Arc<str>,
}

/// The TLS configurations made from one certificate.
#[derive(Debug)]
pub struct Configs {
    pub server: Arc<ServerConfig>,
    h2: Arc<ClientConfig>,
    http1: Arc<ClientConfig>,
    opaque: Arc<ClientConfig>,
}

impl Configs {
    pub fn new(
        creds: &Credentials,
        roots: Arc<RootCertStore>,
        local_name: &str,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            server: server_config(creds, roots.clone(), local_name)?,
            h2: client_config(creds, roots.clone(), ALPN_H2)?,
            http1: client_config(creds, roots.clone(), ALPN_HTTP1)?,
            opaque: client_config(creds, roots, ALPN_OPAQUE)?,
        })
    }

    pub fn client(&self, alpn: Alpn) -> Arc<ClientConfig> {
        match alpn {
            Alpn::H2 => self.h2.clone(),
            Alpn::Http1 => self.http1.clone(),
            Alpn::Opaque => self.opaque.clone(),
        }
    }
}

/// The proxy's TLS side: its own name and identity, and configurations rebuilt at each
/// certificate renewal. Connections made after a renewal use the new certificate;
/// established ones keep theirs.
#[derive(Debug)]
pub struct TlsContext {
    /// Our DNS-form identity: the SNI that inbound TLS is terminated for.
    pub local_name: String,
    pub local_id: String,
    configs: watch::Receiver<Option<Arc<Configs>>>,
    anchors: watch::Receiver<Arc<RootCertStore>>,
}

impl TlsContext {
    /// Follows `credentials`, rebuilding the configurations at each renewal, with the
    /// trust anchors that came with it (`roots`, the configured ones, until then).
    pub fn spawn(
        mut credentials: watch::Receiver<Option<Arc<Credentials>>>,
        roots: Arc<RootCertStore>,
        local_name: String,
        local_id: String,
    ) -> Arc<Self> {
        let (tx, rx) = watch::channel(None);
        let (anchors_tx, anchors) = watch::channel(roots.clone());
        let name = local_name.clone();
        tokio::spawn(async move {
            let mut roots = roots;
            let mut bundle: Option<Vec<Vec<u8>>> = None;
            loop {
                let creds = credentials.borrow_and_update().clone();
                if let Some(creds) = creds {
                    if let NewAnchors::Bundle { roots: new, der } = &creds.anchors
                        && bundle.as_ref() != Some(der)
                    {
                        info!(
                            anchors = der.len(),
                            "trusting the controller's trust anchors"
                        );
                        roots = new.clone();
                        bundle = Some(der.clone());
                        anchors_tx.send_replace(roots.clone());
                    }
                    match Configs::new(&creds, roots.clone(), &name) {
                        Ok(c) => {
                            tx.send_replace(Some(Arc::new(c)));
                        }
                        Err(error) => warn!(%error, "the new certificate cannot be used for TLS"),
                    }
                }
                if credentials.changed().await.is_err() {
                    return;
                }
            }
        });
        Arc::new(Self {
            local_name,
            local_id,
            configs: rx,
            anchors,
        })
    }

    /// The trust anchors in use: the configured ones, then the controller's.
    pub fn anchors(&self) -> Arc<RootCertStore> {
        self.anchors.borrow().clone()
    }

    /// The configurations of the current certificate; None before the first one.
    pub fn current(&self) -> Option<Arc<Configs>> {
        self.configs.borrow().clone()
    }

    /// The current configurations, waiting up to `wait` for the first certificate.
    pub async fn wait(&self, wait: Duration) -> Option<Arc<Configs>> {
        let mut rx = self.configs.clone();
        tokio::time::timeout(wait, rx.wait_for(Option::is_some))
            .await
            .ok()?
            .ok()?
            .clone()
    }
}

/// The SNI of a TLS ClientHello, when `records` hold a whole one (over one or more
/// records).
pub fn client_hello_sni(records: &[u8]) -> Option<String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = records;
    while !rd.is_empty() {
        if acceptor.read_tls(&mut rd).ok()? == 0 {
            break;
        }
        if let Ok(Some(accepted)) = acceptor.accept() {
            return accepted.client_hello().server_name().map(str::to_owned);
        }
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust anchors: {0}")]
    Anchors(String),
    #[error("our certificate or key cannot be used: {0}")]
    Credentials(String),
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        peer: String,
        source: std::io::Error,
    },
    #[error("{peer} presented identity {got:?}, expected {want}")]
    WrongIdentity {
        peer: String,
        want: String,
        got: Option<String>,
    },
}

pub use crate::crypto::provider;

/// The trust anchors from a PEM bundle.
pub fn roots(pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::Anchors(e.to_string()))?;
        store
            .add(cert)
            .map_err(|e| TlsError::Anchors(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(TlsError::Anchors("no certificate in the bundle".into()));
    }
    Ok(Arc::new(store))
}

fn certified_key(creds: &Credentials) -> Result<Arc<CertifiedKey>, TlsError> {
    let mut chain = vec![CertificateDer::from(creds.leaf_der.clone())];
    chain.extend(creds.chain_der.iter().cloned().map(CertificateDer::from));
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(creds.key_der.clone()));
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Credentials(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// Presents the certificate only for the local name.
struct OwnName {
    name: String,
    key: Arc<CertifiedKey>,
}

impl fmt::Debug for OwnName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnName").field("name", &self.name).finish()
    }
}

impl ResolvesServerCert for OwnName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (hello.server_name() == Some(self.name.as_str())).then(|| self.key.clone())
    }
}

/// The inbound side: our certificate for `local_name`, client certificates required.
pub fn server_config(
    creds: &Credentials,
    roots: Arc<RootCertStore>,
    local_name: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Anchors(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Credentials(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(OwnName {
            name: local_name.into(),
            key: certified_key(creds)?,
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_OPAQUE.to_vec()];
    // No session tickets: resumption is not used between proxies, and a ticket arriving
    // after the handshake would look like a server speaking first.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The outbound side: our certificate as the client's, the anchors for the server's.
pub fn client_config(
    creds: &Credentials,
    roots: Arc<RootCertStore>,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut chain = vec![CertificateDer::from(creds.leaf_der.clone())];
    chain.extend(creds.chain_der.iter().cloned().map(CertificateDer::from));
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(creds.key_der.clone()));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Credentials(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Credentials(e.to_string()))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// The SPIFFE ID (URI SAN) of a peer's leaf certificate.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let leaf = certs?.first()?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
        _ => None,
    })
}

/// Connects to a server that must be `spiffe_id`, reachable by its DNS-form `server_name`.
pub async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    config: Arc<ClientConfig>,
    server_name: &str,
    spiffe_id: &str,
) -> Result<tokio_rustls::client::TlsStream<IO>, TlsError> {
    let peer = server_name.to_string();
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| TlsError::Handshake {
        peer: peer.clone(),
        source: std::io::Error::other(e),
    })?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await
        .map_err(|source| TlsError::Handshake {
            peer: peer.clone(),
            source,
        })?;
    let got = peer_identity(tls.get_ref().1.peer_certificates());
    if got.as_deref() != Some(spiffe_id) {
        return Err(TlsError::WrongIdentity {
            peer,
            want: spiffe_id.into(),
            got,
        });
    }
    Ok(tls)
}

/// Accepts a client that must present a certificate from the anchors; its SPIFFE ID.
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    config: Arc<ServerConfig>,
) -> Result<(tokio_rustls::server::TlsStream<IO>, Option<String>), TlsError> {
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(io)
        .await
        .map_err(|source| TlsError::Handshake {
            peer: "client".into(),
            source,
        })?;
    let id = peer_identity(tls.get_ref().1.peer_certificates());
    Ok((tls, id))
}

#[cfg(test)]
mod tests;
