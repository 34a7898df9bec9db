//! TLS on the controller's gRPC port. The controller certifies itself with its own CA
//! (as ServiceAccount `--service-account` in `--namespace`), renews at 70 % of the
//! lifetime, and serves TLS 1.3: a proxy verifies that name against its trust anchors.
//! Client certificates are optional at the handshake (a proxy has none before
//! `Certify`) and verified when presented; [`crate::access`] decides what a caller
//! without one may do. A connection whose first byte is not a TLS handshake is served
//! as plaintext, which `access` refuses unless it was enabled for local use.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use parking_lot::RwLock;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Ca, CaHandle, ServiceAccount, server_name, spiffe_id};
use crate::access::Caller;

/// The crypto provider of every TLS endpoint the controller serves (aws-lc-rs: the
/// post-quantum hybrid key exchange first).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The controller's current certificate.
#[derive(Debug)]
pub struct OwnCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for OwnCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// Signs a fresh key for `sa` with `ca`: the key, its chain, and when it expires.
fn issue(ca: &Ca, sa: &ServiceAccount) -> Result<(Arc<CertifiedKey>, SystemTime), String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let td = ca.trust_domain();
    let (uri, dns) = (spiffe_id(td, sa), server_name(td, sa));
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::URI(uri.as_str().try_into().map_err(|e| format!("{e}"))?),
        SanType::DnsName(dns.as_str().try_into().map_err(|e| format!("{e}"))?),
    ];
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    let certified = ca.certify(sa, csr.der()).map_err(|e| e.to_string())?;
    let mut chain = vec![CertificateDer::from(certified.leaf_der)];
    chain.extend(certified.chain_der.into_iter().map(CertificateDer::from));
    let signing = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .map_err(|e| e.to_string())?;
    Ok((
        Arc::new(CertifiedKey::new(chain, signing)),
        certified.not_after,
    ))
}

/// TLS on the gRPC port: the controller's own certificate, renewed at 70 % of its
/// lifetime and issued again at once when the CA rotates, and the server configuration,
/// whose client certificates are verified against the trust anchors in use.
pub struct GrpcTls {
    own: Arc<OwnCert>,
    config: RwLock<Arc<ServerConfig>>,
}

impl GrpcTls {
    /// The configuration new connections are accepted with.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.read().clone()
    }
}

/// Certifies the controller as `sa` and keeps its certificate and trust anchors current.
pub fn grpc_tls(mut ca: CaHandle, sa: ServiceAccount) -> Result<Arc<GrpcTls>, String> {
    let first = ca.current();
    let (key, not_after) = issue(&first, &sa)?;
    info!(identity = %spiffe_id(first.trust_domain(), &sa), "the gRPC port serves TLS");
    let own = Arc::new(OwnCert {
        current: RwLock::new(key),
    });
    let tls = Arc::new(GrpcTls {
        config: RwLock::new(server_config(own.clone(), first.roots())?),
        own,
    });
    let renewing = tls.clone();
    tokio::spawn(async move {
        let mut not_after = not_after;
        loop {
            let left = not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let rotated = tokio::select! {
                _ = tokio::time::sleep(left.mul_f64(0.7).max(Duration::from_secs(1))) => false,
                _ = ca.changed() => true,
            };
            let current = ca.current();
            if rotated {
                match server_config(renewing.own.clone(), current.roots()) {
                    Ok(config) => *renewing.config.write() = config,
                    Err(error) => warn!(%error, "the gRPC port keeps the previous trust anchors"),
                }
            }
            match issue(&current, &sa) {
                Ok((key, expires)) => {
                    *renewing.own.current.write() = key;
                    not_after = expires;
                    debug!(rotated, "renewed the controller's certificate");
                }
                Err(error) => warn!(%error, "renewing the controller's certificate failed"),
            }
        }
    });
    Ok(tls)
}

/// TLS 1.3, ALPN h2, optional client certificates from the anchors.
fn server_config(
    own: Arc<OwnCert>,
    roots: Arc<RootCertStore>,
) -> Result<Arc<ServerConfig>, String> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(own);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A gRPC connection: TLS, or plaintext.
pub enum GrpcIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for GrpcIo {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        match self {
            GrpcIo::Plain(tcp) => Caller {
                addr: tcp.peer_addr().ok(),
                tls: false,
                identity: None,
            },
            GrpcIo::Tls(tls) => Caller {
                addr: tls.get_ref().0.peer_addr().ok(),
                tls: true,
                identity: tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| spiffe_of(leaf)),
            },
        }
    }
}

/// The SPIFFE ID (URI SAN) of a certificate.
fn spiffe_of(der: &[u8]) -> Option<String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer};
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
        _ => None,
    })
}

impl AsyncRead for GrpcIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            GrpcIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GrpcIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_write(cx, b),
            GrpcIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_flush(cx),
            GrpcIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            GrpcIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How long a client may take to send its first byte and finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections, each handshaken on its own task so a slow client holds up
/// nobody; the ready ones come out of the returned stream.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<GrpcTls>>,
    stop: CancellationToken,
) -> impl futures_util::Stream<Item = Result<GrpcIo, io::Error>> {
    let (tx, rx) = mpsc::channel::<GrpcIo>(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(error) => {
                        warn!(%error, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let (tx, tls) = (tx.clone(), tls.as_ref().map(|t| t.current()));
            tokio::spawn(async move {
                let io = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                    let mut first = [0u8; 1];
                    stream.peek(&mut first).await?;
                    match tls {
                        Some(config) if first[0] == 0x16 => {
                            let tls = tokio_rustls::TlsAcceptor::from(config)
                                .accept(stream)
                                .await?;
                            Ok::<_, io::Error>(GrpcIo::Tls(Box::new(tls)))
                        }
                        _ => Ok(GrpcIo::Plain(stream)),
                    }
                })
                .await;
                match io {
                    Ok(Ok(io)) => drop(tx.send(io).await),
                    Ok(Err(error)) => debug!(%peer, %error, "gRPC handshake failed"),
                    Err(_) => debug!(%peer, "gRPC handshake timed out"),
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|io| (Ok(io), rx))
    })
}
