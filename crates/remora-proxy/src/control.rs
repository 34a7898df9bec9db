//! The connection to the controller. With `https://`, the proxy verifies the
//! controller's certificate against the trust anchors and its name
//! (`REMORA_CONTROLLER_NAME`); `Identity.Certify` goes over server-authenticated TLS
//! (the proxy has no certificate yet), Destination and Policy over mTLS with the proxy's
//! own certificate. With `http://` (local use) everything is plaintext.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use remora_api::v1 as api;
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{ALPN_H2, Alpn, TlsContext, provider};

/// How long a control connection waits for the proxy's first certificate: within the
/// channel's connect timeout; the streams on it retry with backoff until one exists.
const CERT_WAIT: Duration = Duration::from_secs(3);

/// Where the controller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerAddr {
    /// `host:port`.
    pub authority: String,
    pub tls: bool,
}

impl ControllerAddr {
    /// `http://host:port` or `https://host:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (rest, tls) = match (s.strip_prefix("http://"), s.strip_prefix("https://")) {
            (Some(r), _) => (r, false),
            (_, Some(r)) => (r, true),
            _ => {
                return Err(
                    "expected https://host:port (or http://host:port for local use)".into(),
                );
            }
        };
        let authority = rest.trim_end_matches('/');
        match authority.parse::<http::uri::Authority>() {
            Ok(a) if a.port_u16().is_some() => Ok(Self {
                authority: authority.to_string(),
                tls,
            }),
            _ => Err("expected https://host:port (or http://host:port for local use)".into()),
        }
    }
}

impl std::fmt::Display for ControllerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority)
    }
}

/// The channels to the controller: one for Identity, one for Destination and Policy.
#[derive(Debug, Clone)]
pub struct Channels {
    pub identity: Channel,
    pub api: Channel,
}

/// Makes the channels; they connect lazily and reconnect on their own.
pub fn channels(
    addr: &ControllerAddr,
    controller_name: &str,
    tls: Option<Arc<TlsContext>>,
) -> Result<Channels, String> {
    let endpoint = Endpoint::from_shared(format!("http://{}", addr.authority))
        .map_err(|e| format!("controller address {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    if !addr.tls {
        let channel = endpoint.connect_lazy();
        return Ok(Channels {
            identity: channel.clone(),
            api: channel,
        });
    }
    let Some(tls) = tls else {
        return Err(format!(
            "{addr} needs the proxy's identity (REMORA_TRUST_ANCHORS and \
             REMORA_IDENTITY_TOKEN_FILE) to verify the controller"
        ));
    };
    let name = ServerName::try_from(controller_name.to_string())
        .map_err(|e| format!("REMORA_CONTROLLER_NAME {controller_name:?}: {e}"))?;
    let connector = |mode| ControlConnector {
        authority: addr.authority.clone(),
        name: name.clone(),
        mode,
    };
    Ok(Channels {
        identity: endpoint
            .clone()
            .connect_with_connector_lazy(connector(Mode::ServerAuth(tls.clone()))),
        api: endpoint.connect_with_connector_lazy(connector(Mode::Mutual(tls))),
    })
}

#[derive(Debug, Clone)]
enum Mode {
    /// Verify the controller with the trust anchors in use; present nothing.
    ServerAuth(Arc<TlsContext>),
    /// Verify the controller and present the proxy's current certificate.
    Mutual(Arc<TlsContext>),
}

#[derive(Debug, Clone)]
struct ControlConnector {
    authority: String,
    name: ServerName<'static>,
    mode: Mode,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Uri> for ControlConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let config = match &this.mode {
                Mode::ServerAuth(tls) => server_auth(tls.anchors())?,
                Mode::Mutual(tls) => tls
                    .wait(CERT_WAIT)
                    .await
                    .ok_or("no certificate to present to the controller")?
                    .client(Alpn::H2),
            };
            let tcp = TcpStream::connect(&this.authority).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(this.name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS with the controller at {}: {e}", this.authority))?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// TLS 1.3 to the controller, verified against `roots`, with no client certificate.
fn server_auth(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, BoxError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a = ControllerAddr::parse("https://remora-controller.remora-system.svc:8086").unwrap();
        assert!(a.tls);
        assert_eq!(a.authority, "remora-controller.remora-system.svc:8086");
        let a = ControllerAddr::parse("http://10.0.0.1:8086/").unwrap();
        assert!(!a.tls);
        assert_eq!(a.to_string(), "http://10.0.0.1:8086");
        for bad in ["10.0.0.1:8086", "https://host", "ftp://h:1", "https://"] {
            assert!(ControllerAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
/// Who is asking, sent with every request.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub namespace: String,
    pub pod_name: String,
    pub pod_ip: String,
}

impl ClientInfo {
    /// As every request to the controller carries it.
    pub fn to_api(&self) -> api::ClientInfo {
        api::ClientInfo {
            namespace: self.namespace.clone(),
            pod_name: self.pod_name.clone(),
            pod_ip: self.pod_ip.clone(),
            zone: String::new(),
            proxy_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}
