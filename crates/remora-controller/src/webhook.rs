//! The admission webhook: HTTPS `POST /inject` on `--webhook-addr`, AdmissionReview v1.
//! It answers every review: a pod to mesh gets a JSON patch (computed by
//! [`remora_k8s::inject`], the same code `remora inject` runs), anything else is
//! allowed unchanged. It never refuses a pod and never blocks the cluster: a review it
//! cannot read is allowed as it is, logged and counted.
//!
//! The serving certificate comes from `--webhook-cert`/`--webhook-key` and is re-read
//! when the files change (cert-manager rotates them in place); until a good pair is
//! read, the previous one stays.

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::Pod;
use parking_lot::RwLock;
use remora_k8s::inject::{self, Decision, Settings};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    discovery::Discovery,
    metrics::{CertReload, Injection, Metrics},
};

/// An AdmissionReview larger than this is not read (the API server's own request limit
/// is 3 MiB).
const MAX_REVIEW: usize = 4 << 20;
/// The API server waits at most 10 s (the chart sets less); a client that sends
/// nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a review waits for the source's first sync (the API server's timeout is
/// longer).
const SYNC_WAIT: Duration = Duration::from_secs(3);

/// What the webhook needs to answer.
pub struct Injector {
    pub settings: Settings,
    /// The CA in use: injected pods get its trust anchors as they rotate.
    pub ca: Option<crate::identity::CaHandle>,
    pub discovery: Arc<Discovery>,
    pub metrics: Metrics,
}

impl Injector {
    /// The AdmissionReview to send back for the request body `body`.
    pub fn review(&self, body: &[u8]) -> Value {
        let review: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return self.malformed(None, &format!("not JSON: {e}")),
        };
        let request = &review["request"];
        let Some(uid) = request["uid"].as_str().filter(|u| !u.is_empty()) else {
            return self.malformed(None, "request.uid is missing");
        };
        if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
            return self.malformed(
                Some(uid),
                "not an admission.k8s.io/v1 AdmissionReview (the webhook configuration must \
                 ask for admissionReviewVersions [v1])",
            );
        }
        if request["kind"]["kind"] != "Pod" || request["operation"] != "CREATE" {
            self.metrics.injected(Injection::Skipped);
            return allowed(uid, None);
        }
        let pod: Pod = match serde_json::from_value(request["object"].clone()) {
            Ok(p) => p,
            Err(e) => return self.malformed(Some(uid), &format!("request.object: {e}")),
        };
        // A pod from a template has no name or namespace yet: the request carries them.
        let namespace = request["namespace"]
            .as_str()
            .or(pod.metadata.namespace.as_deref())
            .unwrap_or("default")
            .to_string();
        let name = pod
            .metadata
            .name
            .clone()
            .or(pod.metadata.generate_name.clone())
            .unwrap_or_default();
        let ns = self
            .discovery
            .namespace(&namespace)
            .unwrap_or_else(|| inject::Namespace {
                name: namespace.clone(),
                ..Default::default()
            });
        let rotated;
        let anchors = self.ca.as_ref().map(|ca| ca.current());
        let settings = match anchors.as_ref().map(|ca| ca.trust_anchors_pem().trim()) {
            Some(pem) if pem != self.settings.trust_anchors => {
                rotated = Settings {
                    trust_anchors: pem.to_string(),
                    ..self.settings.clone()
                };
                &rotated
            }
            _ => &self.settings,
        };
        match inject::decide(&pod, &ns, settings) {
            Decision::Skip(why) => {
                debug!(%namespace, pod = %name, %why, "not injected");
                self.metrics.injected(Injection::Skipped);
                allowed(uid, None)
            }
            Decision::Inject(injection) => {
                // Against the object as sent: fields the types here do not know stay.
                let patch = injection.patch(&request["object"]);
                info!(%namespace, pod = %name, "injected");
                self.metrics.injected(Injection::Injected);
                allowed(uid, Some(&patch))
            }
        }
    }

    /// A review that cannot be read is allowed as it is: the webhook must never keep a
    /// pod from starting.
    fn malformed(&self, uid: Option<&str>, why: &str) -> Value {
        warn!(%why, "malformed admission review: allowed unchanged");
        self.metrics.injected(Injection::Malformed);
        allowed(uid.unwrap_or(""), None)
    }
}

fn allowed(uid: &str, patch: Option<&json_patch::Patch>) -> Value {
    let mut response = json!({ "uid": uid, "allowed": true });
    if let Some(patch) = patch.filter(|p| !p.0.is_empty()) {
        let bytes = serde_json::to_vec(patch).expect("a patch serializes");
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

/// The serving certificate, swapped when its files change.
#[derive(Debug)]
pub struct ServingCert {
    cert: PathBuf,
    key: PathBuf,
    /// The files' contents last loaded, and what they made.
    current: RwLock<(Vec<u8>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().1.clone())
    }
}

impl ServingCert {
    /// Loads the pair, or says which file is wrong and how.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, String> {
        let (raw, certified) = read_pair(cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new((raw, certified)),
        }))
    }

    /// Re-reads the files; a changed, good pair replaces the served one.
    fn reload(&self, metrics: &Metrics) {
        // Read once: what is compared is what is parsed. A failure is said once per
        // change (an unreadable pair reads as nothing).
        let files = (read_file(&self.cert), read_file(&self.key));
        let raw = match &files {
            (Ok(c), Ok(k)) => [&c[..], &k[..]].concat(),
            _ => Vec::new(),
        };
        if self.current.read().0 == raw {
            return;
        }
        let pair = match files {
            (Ok(c), Ok(k)) => parse_pair(&self.cert, c, &self.key, k),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        match pair {
            Ok(pair) => {
                info!(cert = %self.cert.display(), "webhook certificate reloaded");
                metrics.cert_reloaded(CertReload::Reloaded);
                *self.current.write() = pair;
            }
            Err(error) => {
                // Mid-rotation the two files may disagree for a moment: try again later.
                warn!(%error, "webhook certificate not reloaded; the previous one stays");
                metrics.cert_reloaded(CertReload::Failed);
                self.current.write().0 = raw;
            }
        }
    }

    fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(crate::identity::serving::provider())
            .with_safe_default_protocol_versions()
            .expect("the provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// The files' bytes and the key they make, checked to belong together.
fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Arc<CertifiedKey>), String> {
    parse_pair(cert, read_file(cert)?, key, read_file(key)?)
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`read_pair`] on bytes already read (named by their files in errors).
fn parse_pair(
    cert: &Path,
    cert_pem: Vec<u8>,
    key: &Path,
    key_pem: Vec<u8>,
) -> Result<(Vec<u8>, Arc<CertifiedKey>), String> {
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: no PEM private key: {e}", key.display()))?;
    let signer = crate::identity::serving::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        format!(
            "{} and {} do not belong together: {e}",
            cert.display(),
            key.display()
        )
    })?;
    let mut raw = cert_pem;
    raw.extend_from_slice(&key_pem);
    Ok((raw, Arc::new(certified)))
}

/// Serves `/inject` on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    cert: Arc<ServingCert>,
    injector: Arc<Injector>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config());
    let reload = {
        let (cert, metrics) = (cert.clone(), injector.metrics.clone());
        tokio::spawn(crate::reread::every(stop.clone(), move || {
            cert.reload(&metrics)
        }))
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(error) => {
                    warn!(%error, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, injector, stop) = (acceptor.clone(), injector.clone(), stop.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => return debug!(%peer, %error, "webhook TLS handshake failed"),
                Err(_) => return debug!(%peer, "webhook TLS handshake timed out"),
            };
            let service = service_fn(move |req| handle(injector.clone(), req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(error) = r {
                    debug!(%peer, %error, "webhook connection ended");
                },
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
    reload.abort();
}

async fn handle(
    injector: Arc<Injector>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Bytes, json: bool| {
        let mut rsp = Response::new(Full::new(body));
        *rsp.status_mut() = status;
        let kind = if json {
            "application/json"
        } else {
            "text/plain"
        };
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(kind),
        );
        Ok(rsp)
    };
    if req.uri().path() != "/inject" {
        return reply(
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"not found\n"),
            false,
        );
    }
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"POST an AdmissionReview\n"),
            false,
        );
    }
    let body = tokio::time::timeout(
        READ_TIMEOUT,
        Limited::new(req.into_body(), MAX_REVIEW).collect(),
    )
    .await;
    // Before the first sync a namespace's labels are not known yet: wait a little.
    let _ = tokio::time::timeout(SYNC_WAIT, injector.discovery.synced()).await;
    let review = match body {
        Ok(Ok(b)) => injector.review(&b.to_bytes()),
        Ok(Err(e)) => injector.malformed(None, &format!("body: {e}")),
        Err(_) => injector.malformed(None, "body: timed out"),
    };
    let bytes = serde_json::to_vec(&review).expect("a review serializes");
    reply(StatusCode::OK, Bytes::from(bytes), true)
}
