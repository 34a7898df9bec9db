//! A fake Kubernetes API server for tests, where no real one can run: objects held in
//! memory, served over real HTTP in the API server's own shapes, so that kube-rs (and
//! anything else) talks to it unchanged.
//!
//! It does what the controller and the CLI rely on, as the API server does it:
//! - list (cluster-wide or in a namespace) and watch from a resource version, with
//!   `ADDED`/`MODIFIED`/`DELETED` events, and `410 Gone` when told to expire a watch;
//! - get, create (`409 AlreadyExists`), merge patch (strategic merge is treated as a
//!   merge patch), replace, delete, and the `status` subresource;
//! - a patch or replace naming an old `metadata.resourceVersion` gets `409 Conflict`;
//! - an unknown kind gets a `NotFound` Status; an API group that is not installed gets
//!   the plain-text `404 page not found` a real server sends;
//! - `/version`;
//! - the pod proxy, `GET /api/v1/namespaces/<ns>/pods/<name>:<port>/proxy/<path>`: the
//!   request is sent to the pod's `status.podIP` and its answer passed back;
//! - port forwarding, `GET /api/v1/namespaces/<ns>/pods/<name>/portforward?ports=…`
//!   upgraded to a WebSocket with the `v4.channel.k8s.io` subprotocol, as `kubectl
//!   port-forward` and kube-rs speak it: each port's connection is made to the pod's
//!   loopback, as the kubelet makes it from inside the pod's network namespace.
//!
//! A test whose pods live in network namespaces sets how to reach them, `set_pod_dialer`.
//!
//! Each request's bearer token is recorded, so a test can tell its clients apart.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// A kind the fake serves: where it lives and whether it is namespaced.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resource {
    /// `/api/v1` or `/apis/<group>/<version>`.
    prefix: String,
    plural: String,
    kind: String,
    api_version: String,
    namespaced: bool,
}

/// The kinds served unless a test adds more.
const KINDS: &[(&str, &str, &str, bool)] = &[
    ("v1", "services", "Service", true),
    ("v1", "pods", "Pod", true),
    ("v1", "namespaces", "Namespace", false),
    ("v1", "configmaps", "ConfigMap", true),
    ("v1", "secrets", "Secret", true),
    (
        "discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        true,
    ),
    ("coordination.k8s.io/v1", "leases", "Lease", true),
    ("apps/v1", "deployments", "Deployment", true),
    (
        "apiextensions.k8s.io/v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
    ),
    (
        "admissionregistration.k8s.io/v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        false,
    ),
    (
        "policy.remora.io/v1alpha1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        true,
    ),
    (
        "policy.remora.io/v1alpha1",
        "trafficpolicies",
        "TrafficPolicy",
        true,
    ),
    (
        "gateway.networking.k8s.io/v1",
        "httproutes",
        "HTTPRoute",
        true,
    ),
];

/// One write a client made: its method, the object's plural and name, the body, and the
/// bearer token it came with.
#[derive(Debug, Clone)]
pub struct Write {
    pub method: Method,
    pub plural: String,
    pub name: String,
    /// Whether it was to the `status` subresource.
    pub status: bool,
    pub body: Value,
    pub token: Option<String>,
    /// Whether the server applied it (not refused: a conflict, a missing object).
    pub accepted: bool,
}

type Key = (String, String, String);

#[derive(Default)]
struct State {
    rv: u64,
    resources: Vec<Resource>,
    /// (plural, namespace, name) → object.
    objects: BTreeMap<Key, Value>,
    log: Vec<(u64, String, Value)>,
    watchers: Vec<(String, Option<String>, mpsc::UnboundedSender<Bytes>)>,
    writes: Vec<Write>,
    conflicts: usize,
    missing_groups: BTreeSet<String>,
    /// The minor version `/version` reports (1.x).
    minor: u32,
    /// How the pod proxy reaches a pod; None: a plain connect.
    pod_dialer: Option<PodDialer>,
}

/// Connects to a pod: given its IP and the address to reach, which is the pod's IP and a
/// port for the pod proxy, or its loopback (`127.0.0.1:port`) for port forwarding, where
/// the connection must be made from inside the pod.
pub type PodDialer = Arc<
    dyn Fn(
            std::net::IpAddr,
            SocketAddr,
        ) -> Pin<
            Box<dyn std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>,
        > + Send
        + Sync,
>;

/// The fake server; clone it to share.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
}

impl FakeApi {
    /// Starts serving on a loopback port.
    pub async fn start() -> Self {
        let mut state = State {
            minor: 33,
            ..State::default()
        };
        for (api_version, plural, kind, namespaced) in KINDS {
            state
                .resources
                .push(resource(api_version, plural, kind, *namespaced));
        }
        let state = Arc::new(Mutex::new(state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |r| serve(state.clone(), r));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self { state, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kube client of the fake, sending `token` (recorded with each write).
    pub fn client(&self, token: &str) -> kube::Client {
        kube::Client::try_from(self.kube_config(token)).unwrap()
    }

    pub fn kube_config(&self, token: &str) -> kube::Config {
        let mut cfg = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        cfg.default_namespace = "default".into();
        cfg.auth_info.token = Some(token.to_string().into());
        cfg
    }

    /// A kubeconfig file's text for the fake, as `kubectl` and `remora` read it.
    pub fn kubeconfig(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: fake\n  user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.addr
        )
    }

    /// How the pod proxy connects to pods (they may live where this process cannot
    /// connect directly, in network namespaces).
    pub fn set_pod_dialer(&self, dialer: PodDialer) {
        self.state.lock().pod_dialer = Some(dialer);
    }

    /// Whether the API group answers as not installed (plain-text 404).
    pub fn set_missing_group(&self, group: &str, missing: bool) {
        let mut s = self.state.lock();
        match missing {
            true => s.missing_groups.insert(group.to_string()),
            false => s.missing_groups.remove(group),
        };
    }

    /// Whether the fake stores objects of this `apiVersion` and `kind`.
    pub fn serves(&self, api_version: &str, kind: &str) -> bool {
        let probe = json!({"apiVersion": api_version, "kind": kind});
        self.state.lock().resource_of(&probe).is_some()
    }

    /// The Kubernetes version `/version` reports: 1.`minor` (default 1.33).
    pub fn set_version(&self, minor: u32) {
        self.state.lock().minor = minor;
    }

    /// Creates or replaces `object` and tells the watchers.
    pub fn apply(&self, object: Value) {
        let mut s = self.state.lock();
        let r = s
            .resource_of(&object)
            .unwrap_or_else(|| panic!("the fake serves no {}", object["kind"]));
        s.store(&r, object);
    }

    /// Deletes an object and tells the watchers.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let mut s = self.state.lock();
        let probe = json!({"apiVersion": api_version, "kind": kind});
        let r = s.resource_of(&probe).expect("a served kind");
        s.remove(&r, namespace, name);
    }

    /// Removes an object without telling anyone, as if the watch had missed it.
    pub fn forget(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let mut s = self.state.lock();
        let probe = json!({"apiVersion": api_version, "kind": kind});
        let r = s.resource_of(&probe).expect("a served kind");
        s.rv += 1;
        s.objects.remove(&key(&r, namespace, name));
    }

    /// Ends every watch of a kind with `410 Gone`: its clients must list again.
    pub fn expire(&self, api_version: &str, kind: &str) {
        let mut s = self.state.lock();
        let probe = json!({"apiVersion": api_version, "kind": kind});
        let r = s.resource_of(&probe).expect("a served kind");
        let gone = json!({"type": "ERROR", "object": status_json(410, "Expired", "too old resource version")});
        let line = Bytes::from(format!("{gone}\n"));
        for (_, _, tx) in s.watchers.iter().filter(|(p, _, _)| *p == r.plural) {
            let _ = tx.send(line.clone());
        }
        s.watchers.retain(|(p, _, _)| *p != r.plural);
    }

    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let s = self.state.lock();
        let probe = json!({"apiVersion": api_version, "kind": kind});
        let r = s.resource_of(&probe)?;
        s.objects.get(&key(&r, namespace, name)).cloned()
    }

    /// Every write clients made, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.state.lock().writes.clone()
    }

    /// Writes refused for naming an old resourceVersion.
    pub fn conflicts(&self) -> usize {
        self.state.lock().conflicts
    }
}

fn resource(api_version: &str, plural: &str, kind: &str, namespaced: bool) -> Resource {
    let prefix = match api_version {
        "v1" => "/api/v1".to_string(),
        gv => format!("/apis/{gv}"),
    };
    Resource {
        prefix,
        plural: plural.into(),
        kind: kind.into(),
        api_version: api_version.into(),
        namespaced,
    }
}

fn key(r: &Resource, namespace: &str, name: &str) -> Key {
    let ns = if r.namespaced { namespace } else { "" };
    (r.plural.clone(), ns.to_string(), name.to_string())
}

impl State {
    fn resource_of(&self, object: &Value) -> Option<Resource> {
        self.resources
            .iter()
            .find(|r| {
                object["apiVersion"] == r.api_version.as_str() && object["kind"] == r.kind.as_str()
            })
            .cloned()
    }

    fn store(&mut self, r: &Resource, mut object: Value) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        if r.namespaced {
            object["metadata"]["namespace"] = json!(ns);
        }
        let name = object["metadata"]["name"]
            .as_str()
            .expect("a name")
            .to_string();
        let kind = match self.objects.insert(key(r, &ns, &name), object.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        self.emit(r, &ns, json!({"type": kind, "object": object}));
        object
    }

    fn remove(&mut self, r: &Resource, namespace: &str, name: &str) -> Option<Value> {
        let mut object = self.objects.remove(&key(r, namespace, name))?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.emit(r, namespace, json!({"type": "DELETED", "object": object}));
        Some(object)
    }

    fn emit(&mut self, r: &Resource, namespace: &str, event: Value) {
        self.log.push((self.rv, r.plural.clone(), event.clone()));
        let line = Bytes::from(format!("{event}\n"));
        self.watchers.retain(|(p, ns, tx)| {
            *p != r.plural
                || ns.as_deref().is_some_and(|n| n != namespace)
                || tx.send(line.clone()).is_ok()
        });
    }

    fn list(&self, r: &Resource, namespace: Option<&str>, selector: &[Requirement]) -> Value {
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((p, ns, _), o)| {
                *p == r.plural
                    && namespace.is_none_or(|n| n == ns)
                    && selector
                        .iter()
                        .all(|req| req.matches(&o["metadata"]["labels"]))
            })
            .map(|(_, o)| o.clone())
            .collect();
        json!({"apiVersion": r.api_version, "kind": format!("{}List", r.kind),
            "metadata": {"resourceVersion": self.rv.to_string()}, "items": items})
    }
}

/// One requirement of a label selector, as the API server reads `labelSelector`.
#[derive(Debug, PartialEq)]
enum Requirement {
    /// `k=v`, `k==v`, `k in (v1,v2)`.
    In(String, Vec<String>),
    /// `k!=v`, `k notin (v1,v2)`: also true when the label is absent.
    NotIn(String, Vec<String>),
    /// `k`.
    Exists(String),
    /// `!k`.
    Absent(String),
}

impl Requirement {
    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            Self::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|w| w == v)),
            Self::NotIn(k, vs) => get(k).is_none_or(|v| vs.iter().all(|w| w != v)),
            Self::Exists(k) => get(k).is_some(),
            Self::Absent(k) => get(k).is_none(),
        }
    }
}

/// `labelSelector`'s requirements, all of which must hold; an error names what could
/// not be read.
fn label_selector(text: &str) -> Result<Vec<Requirement>, String> {
    // Commas separate requirements, except inside a set's parentheses.
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    let set = |v: &str| -> Result<Vec<String>, String> {
        let inner = v
            .trim()
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| format!("a set must be in parentheses: {v:?}"))?;
        Ok(inner.split(',').map(|s| s.trim().to_string()).collect())
    };
    let mut out = Vec::new();
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let words: Vec<&str> = part.splitn(2, ' ').collect();
        let req = if let Some((k, v)) = part.split_once("!=") {
            Requirement::NotIn(k.trim().into(), vec![v.trim().into()])
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            Requirement::In(k.trim().into(), vec![v.trim().into()])
        } else if let [k, rest] = words.as_slice() {
            let rest = rest.trim_start();
            if let Some(v) = rest.strip_prefix("notin") {
                Requirement::NotIn(k.to_string(), set(v)?)
            } else if let Some(v) = rest.strip_prefix("in") {
                Requirement::In(k.to_string(), set(v)?)
            } else {
                return Err(format!("unable to parse requirement: {part:?}"));
            }
        } else if let Some(k) = part.strip_prefix('!') {
            Requirement::Absent(k.trim().into())
        } else {
            Requirement::Exists(part.into())
        };
        out.push(req);
    }
    Ok(out)
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

/// A watch response: event lines as they come, never ending on its own.
struct WatchBody(mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(http_body::Frame::data(b))))
    }
}

type Body = http_body_util::Either<Full<Bytes>, WatchBody>;

fn reply(code: StatusCode, body: Value) -> Response<Body> {
    let mut rsp = Response::new(Body::Left(Full::new(Bytes::from(body.to_string()))));
    *rsp.status_mut() = code;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    reply(code, status_json(code.as_u16(), reason, message))
}

/// How to reach a pod, or the Status the API server answers when it cannot.
fn pod_route(state: &Arc<Mutex<State>>, ns: &str, name: &str) -> Result<Dial, Box<Response<Body>>> {
    let s = state.lock();
    let key = ("pods".to_string(), ns.to_string(), name.to_string());
    let Some(pod) = s.objects.get(&key) else {
        return Err(Box::new(failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods \"{name}\" not found"),
        )));
    };
    match pod["status"]["podIP"].as_str().map(str::parse) {
        Some(Ok(ip)) => Ok(Dial {
            pod: ip,
            dialer: s.pod_dialer.clone(),
        }),
        _ => Err(Box::new(failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the pod has no IP",
        ))),
    }
}

/// Connects to one pod, with the test's dialer if it set one.
#[derive(Clone)]
struct Dial {
    pod: std::net::IpAddr,
    dialer: Option<PodDialer>,
}

impl Dial {
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        match &self.dialer {
            Some(d) => d(self.pod, addr).await,
            None => tokio::net::TcpStream::connect(addr).await,
        }
    }
}

/// The pod proxy: `GET /api/v1/namespaces/<ns>/pods/<name>:<port>/proxy/<path>` sent to
/// the pod's IP, its status and body passed back; None for any other path.
async fn pod_proxy(state: &Arc<Mutex<State>>, req: &Request<Incoming>) -> Option<Response<Body>> {
    let rest = req.uri().path().strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once("/pods/")?;
    let (pod, rest) = rest.split_once('/')?;
    let path = rest.strip_prefix("proxy")?;
    let path = if path.is_empty() { "/" } else { path };
    let (name, port) = pod.split_once(':').unwrap_or((pod, "80"));
    let port: u16 = port.parse().ok()?;
    let dial = match pod_route(state, ns, name) {
        Ok(dial) => dial,
        Err(rsp) => return Some(*rsp),
    };
    let addr = SocketAddr::new(dial.pod, port);
    let upstream = async {
        let tcp = dial.connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let path_and_query = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let forwarded = Request::get(path_and_query)
            .header(http::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(std::io::Error::other)?;
        let rsp = sender
            .send_request(forwarded)
            .await
            .map_err(std::io::Error::other)?;
        let (parts, body) = rsp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        std::io::Result::Ok(Response::from_parts(parts, Body::Left(Full::new(body))))
    };
    Some(match upstream.await {
        Ok(rsp) => rsp,
        Err(e) => failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &format!("error trying to reach service: {e}"),
        ),
    })
}

/// The subprotocol port forwarding speaks over a WebSocket: binary messages whose first
/// byte is the channel, two channels per port (data `2i`, errors `2i+1`), each opened by
/// the port number in two little-endian bytes.
const PORT_FORWARD_PROTOCOL: &str = "v4.channel.k8s.io";

/// Port forwarding: `GET /api/v1/namespaces/<ns>/pods/<name>/portforward?ports=…` asking
/// for a WebSocket, answered `101 Switching Protocols` and then served as the kubelet
/// does; None for any other path.
fn port_forward(state: &Arc<Mutex<State>>, req: &mut Request<Incoming>) -> Option<Response<Body>> {
    let rest = req.uri().path().strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once("/pods/")?;
    let name = rest.strip_suffix("/portforward")?;
    let bad = |message: &str| Some(failure(StatusCode::BAD_REQUEST, "BadRequest", message));
    let mut ports = Vec::new();
    for (k, v) in form_pairs(req.uri().query().unwrap_or("")) {
        if k == "ports" {
            for p in v.split(',') {
                match p.trim().parse::<u16>() {
                    Ok(port) if port > 0 => ports.push(port),
                    _ => return bad(&format!("invalid port {p:?}")),
                }
            }
        }
    }
    if ports.is_empty() {
        return bad("at least one port must be given");
    }
    let header = |h: http::header::HeaderName| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let key = header(http::header::SEC_WEBSOCKET_KEY);
    if !header(http::header::UPGRADE).eq_ignore_ascii_case("websocket") || key.is_empty() {
        return bad("port forwarding needs a WebSocket upgrade");
    }
    if !header(http::header::SEC_WEBSOCKET_PROTOCOL)
        .split(',')
        .any(|p| p.trim() == PORT_FORWARD_PROTOCOL)
    {
        return bad(&format!(
            "no supported subprotocol: want {PORT_FORWARD_PROTOCOL}"
        ));
    }
    let dial = match pod_route(state, ns, name) {
        Ok(dial) => dial,
        Err(rsp) => return Some(*rsp),
    };
    let pod = format!("{ns}/{name}");
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            forward_ports(ws, &pod, &ports, dial).await;
        }
    });
    let mut rsp = Response::new(Body::Left(Full::new(Bytes::new())));
    *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = rsp.headers_mut();
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    h.insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_static(PORT_FORWARD_PROTOCOL),
    );
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    h.insert(
        http::header::SEC_WEBSOCKET_ACCEPT,
        http::HeaderValue::from_str(&accept).expect("base64 is a header value"),
    );
    Some(rsp)
}

/// `k=v` pairs of a query string, decoded as the API server reads them.
fn form_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Serves one port-forwarding WebSocket: for each port, a connection to the pod's
/// loopback; bytes on channel `2i` go to port `i`'s connection and its bytes come back
/// on `2i`; a connection that cannot be made is told on `2i+1`. The WebSocket closes
/// once every port's connection has ended.
async fn forward_ports<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    pod: &str,
    ports: &[u16],
    dial: Dial,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;

    let (mut sink, mut incoming) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
    let mut writers = Vec::new();
    let mut readers = tokio::task::JoinSet::new();
    for (i, &port) in ports.iter().enumerate() {
        let data = 2 * i as u8;
        for ch in [data, data + 1] {
            let [lo, hi] = port.to_le_bytes();
            let _ = out_tx.send(vec![ch, lo, hi]).await;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match dial.connect(addr).await {
            Ok(tcp) => {
                let (mut read, write) = tcp.into_split();
                writers.push(Some(write));
                let out = out_tx.clone();
                readers.spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        buf[0] = data;
                        match read.read(&mut buf[1..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if out.send(buf[..=n].to_vec()).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
            Err(e) => {
                writers.push(None);
                let mut msg = vec![data + 1];
                msg.extend_from_slice(
                    format!("error forwarding port {port} to pod {pod}: {e}").as_bytes(),
                );
                let _ = out_tx.send(msg).await;
            }
        }
    }
    drop(out_tx);
    // What the pods send is written out until every reader is done (the channel then
    // closes); what the client sends goes to its port's connection. Returning drops the
    // readers.
    loop {
        tokio::select! {
            frame = out_rx.recv() => match frame {
                Some(frame) => {
                    if sink.send(Message::binary(frame)).await.is_err() {
                        return;
                    }
                }
                None => break,
            },
            msg = incoming.next() => match msg {
                Some(Ok(Message::Binary(bytes))) if bytes.len() > 1 => {
                    let ch = usize::from(bytes[0]);
                    if ch % 2 == 0
                        && let Some(Some(w)) = writers.get_mut(ch / 2)
                        && w.write_all(&bytes[1..]).await.is_err()
                    {
                        writers[ch / 2] = None;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    // The closing handshake, as a WebSocket server makes it: our Close, then what the
    // client still sends read (and dropped) until its Close. Dropping the connection with
    // the client's bytes unread would reset it, and the client could lose the error
    // message and the Close still on their way to it.
    if sink.send(Message::Close(None)).await.is_ok() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while let Some(Ok(msg)) = incoming.next().await {
                if msg.is_close() {
                    break;
                }
            }
        })
        .await;
    }
}

/// What a path names.
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(state: &State, path: &str) -> Option<Target> {
    for r in &state.resources {
        let Some(rest) = path.strip_prefix(&r.prefix) else {
            continue;
        };
        let parts: Vec<&str> = rest
            .trim_start_matches('/')
            .split('/')
            .filter(|p| !p.is_empty())
            .collect();
        let (namespace, rest) = match parts.as_slice() {
            ["namespaces", ns, rest @ ..] if r.namespaced && !rest.is_empty() => {
                (Some(ns.to_string()), rest)
            }
            rest => (None, rest),
        };
        let (name, status) = match rest {
            [p] if *p == r.plural => (None, false),
            [p, name] if *p == r.plural => (Some(name.to_string()), false),
            [p, name, "status"] if *p == r.plural => (Some(name.to_string()), true),
            _ => continue,
        };
        return Some(Target {
            resource: r.clone(),
            namespace,
            name,
            status,
        });
    }
    None
}

async fn serve(
    state: Arc<Mutex<State>>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/version" {
        let minor = state.lock().minor;
        return Ok(reply(
            StatusCode::OK,
            json!({"major": "1", "minor": minor.to_string(), "gitVersion": format!("v1.{minor}.0"), "platform": "linux/amd64"}),
        ));
    }
    if let Some(rsp) = port_forward(&state, &mut req) {
        return Ok(rsp);
    }
    if let Some(rsp) = pod_proxy(&state, &req).await {
        return Ok(rsp);
    }
    let group_missing = {
        let s = state.lock();
        s.missing_groups
            .iter()
            .any(|g| path.starts_with(&format!("/apis/{g}/")))
    };
    if group_missing {
        let mut rsp = Response::new(Body::Left(Full::new(Bytes::from_static(
            b"404 page not found\n",
        ))));
        *rsp.status_mut() = StatusCode::NOT_FOUND;
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return Ok(rsp);
    }
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let query = form_pairs(req.uri().query().unwrap_or(""));
    let param = |k: &str| {
        query
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
    };
    let method = req.method().clone();
    let target = {
        let s = state.lock();
        match parse_path(&s, &path) {
            Some(t) => t,
            None => {
                return Ok(failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the server could not find the requested resource",
                ));
            }
        }
    };
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = match body.is_empty() {
        true => Value::Null,
        false => match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return Ok(failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &e.to_string(),
                ));
            }
        },
    };
    let selector = match param("labelSelector") {
        None => Vec::new(),
        Some(text) => match label_selector(&text) {
            Ok(s) if s.is_empty() || target.name.is_none() => s,
            Ok(_) => {
                return Ok(failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "a label selector applies to a list",
                ));
            }
            Err(e) => return Ok(failure(StatusCode::BAD_REQUEST, "BadRequest", &e)),
        },
    };
    let mut s = state.lock();
    let r = target.resource.clone();
    let ns = target.namespace.clone().unwrap_or_default();
    let writes_before = s.writes.len();
    let rsp = match (method.clone(), target.name.clone()) {
        (Method::GET, None)
            if param("watch").is_some_and(|w| w == "true" || w == "1") && !selector.is_empty() =>
        {
            // Nobody here watches by label; filtering a watch as the API server does
            // (an object leaving the selection is a DELETED event) is not worth faking.
            failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the fake API server does not filter watches by label",
            )
        }
        (Method::GET, None) if param("watch").is_some_and(|w| w == "true" || w == "1") => {
            let from: u64 = param("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = mpsc::unbounded_channel();
            for (rv, p, event) in &s.log {
                let in_ns = target
                    .namespace
                    .as_deref()
                    .is_none_or(|n| event["object"]["metadata"]["namespace"] == n);
                if *p == r.plural && *rv > from && in_ns {
                    let _ = tx.send(Bytes::from(format!("{event}\n")));
                }
            }
            s.watchers
                .push((r.plural.clone(), target.namespace.clone(), tx));
            let mut rsp = Response::new(Body::Right(WatchBody(rx)));
            rsp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            rsp
        }
        (Method::GET, None) => reply(
            StatusCode::OK,
            s.list(&r, target.namespace.as_deref(), &selector),
        ),
        (Method::GET, Some(name)) => match s.objects.get(&key(&r, &ns, &name)) {
            Some(o) => reply(StatusCode::OK, o.clone()),
            None => failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", r.plural),
            ),
        },
        (Method::POST, None) => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            s.writes.push(Write {
                method,
                plural: r.plural.clone(),
                name: name.clone(),
                status: false,
                body: body.clone(),
                token,
                accepted: false,
            });
            if s.objects.contains_key(&key(&r, &ns, &name)) {
                failure(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", r.plural),
                )
            } else {
                let mut object = body;
                if r.namespaced {
                    object["metadata"]["namespace"] = json!(ns);
                }
                object["apiVersion"] = json!(r.api_version);
                object["kind"] = json!(r.kind);
                let stored = s.store(&r, object);
                reply(StatusCode::CREATED, stored)
            }
        }
        (Method::PATCH | Method::PUT, Some(name)) => {
            s.writes.push(Write {
                method: method.clone(),
                plural: r.plural.clone(),
                name: name.clone(),
                status: target.status,
                body: body.clone(),
                token,
                accepted: false,
            });
            match s.objects.get(&key(&r, &ns, &name)).cloned() {
                None => failure(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{name}\" not found", r.plural),
                ),
                Some(current) => {
                    // A write naming a resourceVersion applies only to that version.
                    let wanted = &body["metadata"]["resourceVersion"];
                    if !wanted.is_null() && *wanted != current["metadata"]["resourceVersion"] {
                        s.conflicts += 1;
                        failure(
                            StatusCode::CONFLICT,
                            "Conflict",
                            "the object has been modified; please apply your changes to the latest version and try again",
                        )
                    } else {
                        let mut next = current.clone();
                        match (method == Method::PUT, target.status) {
                            (true, false) => next = body,
                            (true, true) => next["status"] = body["status"].clone(),
                            (false, false) => json_patch::merge(&mut next, &body),
                            (false, true) => {
                                let mut status = next["status"].clone();
                                json_patch::merge(&mut status, &body["status"]);
                                next["status"] = status;
                            }
                        }
                        let stored = s.store(&r, next);
                        reply(StatusCode::OK, stored)
                    }
                }
            }
        }
        (Method::DELETE, Some(name)) => match s.remove(&r, &ns, &name) {
            Some(o) => reply(StatusCode::OK, o),
            None => failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", r.plural),
            ),
        },
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the fake",
        ),
    };
    if s.writes.len() > writes_before
        && let Some(w) = s.writes.last_mut()
    {
        w.accepted = rsp.status().is_success();
    }
    Ok(rsp)
}

/// Test support beside the fake: compares `text` with the golden file at `path`, and
/// with `REMORA_BLESS=1` rewrites the file first.
pub fn assert_golden(path: &std::path::Path, text: &str) {
    if std::env::var("REMORA_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(path, text).unwrap();
    }
    let want = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(
        text,
        want,
        "{} differs (REMORA_BLESS=1 rewrites it)",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_read_and_match_as_the_api_server_does() {
        let labels = json!({"app": "web", "remora.io/meshed": "true"});
        for (selector, want) in [
            ("remora.io/meshed=true", true),
            ("remora.io/meshed==true,app=web", true),
            ("app!=api", true),
            ("tier!=front", true),
            ("app in (api, web)", true),
            ("app notin (api,web)", false),
            ("app in (api),remora.io/meshed", false),
            ("app,!tier", true),
            ("!app", false),
            ("remora.io/meshed=false", false),
        ] {
            let reqs = label_selector(selector).unwrap();
            assert_eq!(
                reqs.iter().all(|r| r.matches(&labels)),
                want,
                "{selector}: {reqs:?}"
            );
        }
        assert!(label_selector("app in api").is_err());
        assert!(label_selector("app wat (x)").is_err());
        assert_eq!(
            form_pairs("&labelSelector=remora.io%2Fmeshed%3Dtrue&ports=80%2C4191"),
            [
                ("labelSelector".into(), "remora.io/meshed=true".into()),
                ("ports".into(), "80,4191".into())
            ]
        );
    }
}
