//! `--source kube` against an in-process fake API server that speaks real HTTP list and
//! watch, through a real `kube::Client`, with the answers reaching the real proxy-side
//! discovery client over a real gRPC stream.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use remora_controller::{App, Config, source::kube::KubeSource};
use remora_proxy::{
    addr::OrigDst,
    discovery::{ClientInfo, Discovery, View},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const TRAFFIC: &str = "/apis/policy.remora.io/v1alpha1/trafficpolicies";
const ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";

/// A fake API server: objects per collection, an event log for watches to resume from.
#[derive(Default)]
struct Fake {
    rv: u64,
    objects: BTreeMap<(&'static str, String), Value>,
    log: Vec<(u64, &'static str, Value)>,
    watchers: Vec<(&'static str, mpsc::UnboundedSender<Bytes>)>,
    /// Status patches applied: (collection, name, body).
    patches: Vec<(&'static str, String, Value)>,
    /// Status patches refused for naming an old resourceVersion.
    conflicts: usize,
    /// The Gateway API's CRDs are not installed: its group answers as a real API server
    /// does for a group it does not serve (`404 page not found`, plain text).
    without_gateway_api: bool,
}

fn collection(path: &str) -> Option<(&'static str, &'static str, &'static str)> {
    match path {
        SERVICES => Some((SERVICES, "v1", "ServiceList")),
        SLICES => Some((SLICES, "discovery.k8s.io/v1", "EndpointSliceList")),
        PODS => Some((PODS, "v1", "PodList")),
        NAMESPACES => Some((NAMESPACES, "v1", "NamespaceList")),
        TRAFFIC => Some((TRAFFIC, "policy.remora.io/v1alpha1", "TrafficPolicyList")),
        ROUTES => Some((ROUTES, "gateway.networking.k8s.io/v1", "HTTPRouteList")),
        _ => None,
    }
}

impl Fake {
    /// Stores `object` and tells the watchers (`ADDED`/`MODIFIED`).
    fn apply(&mut self, path: &'static str, mut object: Value) {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let kind = if self.objects.insert((path, name), object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.emit(path, json!({"type": kind, "object": object}));
    }

    /// Removes an object without telling anyone, as if the watch had missed it.
    fn forget(&mut self, path: &'static str, name: &str) {
        self.rv += 1;
        self.objects.remove(&(path, name.to_string()));
    }

    fn emit(&mut self, path: &'static str, event: Value) {
        self.log.push((self.rv, path, event.clone()));
        let line = Bytes::from(format!("{event}\n"));
        self.watchers
            .retain(|(p, tx)| *p != path || tx.send(line.clone()).is_ok());
    }

    /// Ends every watch of `path` with `410 Gone`, as the API server does for an
    /// expired resource version: the client must list again.
    fn expire(&mut self, path: &'static str) {
        let gone = json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "metadata": {},
            "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
        let line = Bytes::from(format!("{gone}\n"));
        for (_, tx) in self.watchers.iter().filter(|(p, _)| *p == path) {
            let _ = tx.send(line.clone());
        }
        self.watchers.retain(|(p, _)| *p != path);
    }

    fn list(&self, path: &'static str, api_version: &str, kind: &str) -> Value {
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((p, _), _)| *p == path)
            .map(|(_, o)| o.clone())
            .collect();
        json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": self.rv.to_string()}, "items": items})
    }
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

/// `PATCH .../namespaces/<ns>/<plural>/<name>/status`: the merge patch's status is
/// stored and announced (`MODIFIED`), as the API server does.
async fn patch_status(fake: &Mutex<Fake>, req: Request<Incoming>) -> Option<Response<Body>> {
    let path = req.uri().path().to_string();
    let rest = path.strip_suffix("/status")?;
    let (prefix, name) = rest.rsplit_once('/')?;
    let (prefix, plural) = prefix.rsplit_once('/')?;
    let (group, _namespace) = prefix.rsplit_once("/namespaces/")?;
    let collection = [TRAFFIC, ROUTES]
        .into_iter()
        .find(|c| *c == format!("{group}/{plural}"))?;
    let body = http_body_util::BodyExt::collect(req.into_body())
        .await
        .ok()?
        .to_bytes();
    let patch: Value = serde_json::from_slice(&body).ok()?;
    let mut f = fake.lock();
    let mut object = f.objects.get(&(collection, name.to_string()))?.clone();
    // A patch naming a resourceVersion applies only to that version.
    let wanted = &patch["metadata"]["resourceVersion"];
    if !wanted.is_null() && *wanted != object["metadata"]["resourceVersion"] {
        f.conflicts += 1;
        let conflict = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Conflict", "code": 409,
            "message": "the object has been modified"});
        let mut rsp = Response::new(Body::Left(Full::new(Bytes::from(conflict.to_string()))));
        *rsp.status_mut() = http::StatusCode::CONFLICT;
        return Some(rsp);
    }
    f.patches
        .push((collection, name.to_string(), patch.clone()));
    object["status"] = patch["status"].clone();
    f.apply(collection, object.clone());
    Some(Response::new(Body::Left(Full::new(Bytes::from(
        object.to_string(),
    )))))
}

async fn serve(
    fake: Arc<Mutex<Fake>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if req.method() == http::Method::PATCH {
        return Ok(patch_status(&fake, req).await.unwrap_or_else(|| {
            let mut rsp = Response::new(Body::Left(Full::new(Bytes::from_static(b"{}"))));
            *rsp.status_mut() = http::StatusCode::BAD_REQUEST;
            rsp
        }));
    }
    let query = req.uri().query().unwrap_or("").to_string();
    if fake.lock().without_gateway_api
        && req
            .uri()
            .path()
            .starts_with("/apis/gateway.networking.k8s.io/")
    {
        let mut rsp = Response::new(Body::Left(Full::new(Bytes::from_static(
            b"404 page not found\n",
        ))));
        *rsp.status_mut() = http::StatusCode::NOT_FOUND;
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return Ok(rsp);
    }
    let Some((path, api_version, kind)) = collection(req.uri().path()) else {
        // As the API server answers for a kind that is not installed.
        let not_found = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "the server could not find the requested resource",
            "reason": "NotFound", "code": 404});
        let mut rsp = Response::new(Body::Left(Full::new(Bytes::from(not_found.to_string()))));
        *rsp.status_mut() = http::StatusCode::NOT_FOUND;
        return Ok(rsp);
    };
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
    };
    let mut fake = fake.lock();
    let body = if param("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel();
        for (rv, p, event) in &fake.log {
            if *p == path && *rv > from {
                let _ = tx.send(Bytes::from(format!("{event}\n")));
            }
        }
        fake.watchers.push((path, tx));
        Body::Right(WatchBody(rx))
    } else {
        Body::Left(Full::new(Bytes::from(
            fake.list(path, api_version, kind).to_string(),
        )))
    };
    let mut rsp = Response::new(body);
    rsp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Ok(rsp)
}

async fn start_fake(fake: Arc<Mutex<Fake>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let fake = fake.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |r| serve(fake.clone(), r));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "managedFields": [{"manager": "kubectl"}]},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

fn slice(ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": format!("web-{ip}")}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints})
}

fn pod(ip: &str, meshed: bool) -> Value {
    let labels = if meshed {
        json!({"remora.io/meshed": "true"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("web-{ip}"), "namespace": "shop", "labels": labels},
        "spec": {"serviceAccountName": "web", "containers": []}, "status": {"podIP": ip}})
}

/// Waits (bounded) until the proxy-side view satisfies `want`.
async fn until(
    views: &mut tokio::sync::watch::Receiver<View>,
    what: &str,
    want: impl Fn(&View) -> bool,
) {
    let ok = tokio::time::timeout(Duration::from_secs(15), views.wait_for(|v| want(v)))
        .await
        .is_ok();
    assert!(ok, "{what}: last view {:?}", *views.borrow());
}

fn endpoints(v: &View) -> Vec<(String, bool)> {
    match v {
        View::Service { endpoints, .. } => endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.identity.is_some()))
            .collect(),
        _ => Vec::new(),
    }
}

/// The fake API server for `fake`, a controller with `--source kube` over it, and a
/// proxy-side discovery client of that controller.
async fn controller_over(fake: Arc<Mutex<Fake>>) -> Arc<Discovery> {
    let api = start_fake(fake).await;
    let mut cfg = kube::Config::new(format!("http://{api}").parse().unwrap());
    cfg.default_namespace = "default".into();
    let client = kube::Client::try_from(cfg).unwrap();
    let args = [
        "remora-controller",
        "--source",
        "kube",
        "--grpc-plaintext",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ];
    let config = Config::load(args.map(String::from), &|_| None).unwrap();
    let app = App::with_source(
        config,
        remora_admin::LogLevel::detached("info"),
        Box::new(KubeSource::new(client)),
    )
    .await
    .unwrap();
    let grpc = app.grpc_addr().unwrap();
    tokio::spawn(app.run(std::future::pending()));
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_lazy();
    Discovery::new(
        channel,
        ClientInfo::default(),
        prometheus_client::metrics::counter::Counter::default(),
        remora_proxy::discovery::Reconnected::default(),
        remora_proxy::connect::Connector::plain(Duration::from_secs(1)),
    )
}

/// Issue 13: without the Gateway API's CRDs, the HTTPRoute watch failed forever and the
/// controller never became ready. It serves everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_serves_without_the_gateway_api_crds() {
    let fake = Arc::new(Mutex::new(Fake {
        without_gateway_api: true,
        ..Fake::default()
    }));
    {
        let mut f = fake.lock();
        f.apply(SERVICES, service("web", "10.96.0.10"));
        f.apply(SLICES, slice(&["10.0.0.1"]));
    }
    let discovery = controller_over(fake.clone()).await;
    let target = discovery.target(OrigDst("10.96.0.10:80".parse().unwrap()));
    let mut views = target.views.clone();
    until(&mut views, "the Service's endpoints", |v| {
        endpoints(v).len() == 1
    })
    .await;

    // The CRDs are installed later, with a route, and one whose status cannot be read
    // (`parents` missing): the good one applies without a restart (once the watch's
    // backoff ends); the bad one is skipped rather than stopping the kind's watch.
    {
        let mut f = fake.lock();
        f.without_gateway_api = false;
        f.apply(
            ROUTES,
            http_route(
                "bad",
                json!([{"backendRefs": [{"name": "web", "port": 80}]}]),
                json!({}),
            ),
        );
        f.apply(
            ROUTES,
            http_route(
                "split",
                json!([{"backendRefs": [{"name": "web", "port": 80}]}]),
                Value::Null,
            ),
        );
    }
    let mut policies = target.policy.clone();
    let routed = policies.wait_for(|p| p.as_ref().is_some_and(|p| !p.routes.is_empty()));
    tokio::time::timeout(Duration::from_secs(60), routed)
        .await
        .expect("the HTTPRoute reached the proxy once its CRD was installed")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_list_watch_relist_reaches_the_proxy() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = fake.lock();
        f.apply(SERVICES, service("web", "10.96.0.10"));
        f.apply(SLICES, slice(&["10.0.0.1", "10.0.0.2"]));
        f.apply(PODS, pod("10.0.0.1", true));
        f.apply(PODS, pod("10.0.0.2", false));
    }
    let discovery = controller_over(fake.clone()).await;
    let target = discovery.target(OrigDst("10.96.0.10:80".parse().unwrap()));
    let mut views = target.views.clone();

    // The initial list: two endpoints, the meshed one with its identity.
    until(&mut views, "initial list", |v| {
        endpoints(v)
            == [
                ("10.0.0.1:8080".to_string(), true),
                ("10.0.0.2:8080".to_string(), false),
            ]
    })
    .await;

    // A watch event adds an endpoint.
    fake.lock()
        .apply(SLICES, slice(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    until(&mut views, "watched change", |v| endpoints(v).len() == 3).await;

    // A malformed object is skipped; the watch goes on.
    fake.lock().apply(SERVICES, service("broken", "999.1.1.1"));
    fake.lock().apply(SLICES, slice(&["10.0.0.1"]));
    until(&mut views, "change after a malformed object", |v| {
        endpoints(v).len() == 1
    })
    .await;

    // The slice disappears while the watch misses it; 410 Gone forces a relist, and the
    // relist's absence of the slice deletes it.
    {
        let mut f = fake.lock();
        f.forget(SLICES, "web-abc");
        f.expire(SLICES);
    }
    until(
        &mut views,
        "relist after 410",
        |v| matches!(v, View::Service { endpoints, .. } if endpoints.is_empty()),
    )
    .await;
}

fn traffic_policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "policy.remora.io/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "shop", "generation": 1}, "spec": spec})
}

fn http_route(name: &str, rules: Value, status: Value) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop", "generation": 3},
        "spec": {"parentRefs": [{"kind": "Service", "group": "", "name": "web", "port": 80}], "rules": rules},
        "status": status})
}

/// Waits (bounded) until the fake holds a status patch satisfying `want`.
async fn patched(fake: &Mutex<Fake>, what: &str, want: impl Fn(&str, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some((_, _, p)) = fake.lock().patches.iter().find(|(_, n, p)| want(n, p)) {
            return p.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: patches {:#?}",
            fake.lock().patches
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_policies_reach_the_proxy_and_get_their_status() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let other_controller = json!({"parents": [{"controllerName": "example.com/gateway",
        "parentRef": {"name": "public", "kind": "Gateway"},
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}]});
    {
        let mut f = fake.lock();
        f.apply(SERVICES, service("web", "10.96.0.10"));
        f.apply(SLICES, slice(&["10.0.0.1"]));
        f.apply(
            TRAFFIC,
            traffic_policy(
                "web",
                json!({"targetRef": {"name": "web"}, "timeouts": {"request": "3s"}}),
            ),
        );
        f.apply(
            TRAFFIC,
            traffic_policy(
                "broken",
                json!({"targetRef": {"name": "web"}, "timeouts": {"request": "soon"}}),
            ),
        );
        f.apply(
            ROUTES,
            http_route(
                "split",
                json!([{"backendRefs": [{"name": "web", "port": 80, "weight": 9},
                    {"name": "web-v2", "port": 80, "weight": 1}]}]),
                other_controller.clone(),
            ),
        );
    }
    let discovery = controller_over(fake.clone()).await;
    let target = discovery.target(OrigDst("10.96.0.10:80".parse().unwrap()));
    let mut views = target.views.clone();
    until(&mut views, "endpoints", |v| endpoints(v).len() == 1).await;
    let policy = target.policy(Duration::from_secs(15)).await;
    assert_eq!(&*policy.name, "shop/web");
    assert_eq!(policy.request_timeout, Some(Duration::from_secs(3)));
    assert!(!policy.routes.is_empty(), "the HTTPRoute arrived");

    // Status: accepted, or refused with the reason; another controller's entry is kept.
    let ok = patched(&fake, "web accepted", |n, _| n == "web").await;
    assert_eq!(ok["status"]["conditions"][0]["status"], "True", "{ok}");
    assert_eq!(
        ok["status"]["conditions"][0]["observedGeneration"], 1,
        "{ok}"
    );
    let refused = patched(&fake, "broken refused", |n, _| n == "broken").await;
    let c = &refused["status"]["conditions"][0];
    assert_eq!(
        (c["type"].as_str(), c["status"].as_str()),
        (Some("Accepted"), Some("False")),
        "{refused}"
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("spec.timeouts.request"),
        "{refused}"
    );
    let route = patched(&fake, "route status", |n, _| n == "split").await;
    let parents = route["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "{route}");
    assert_eq!(parents[0], other_controller["parents"][0], "theirs kept");
    assert_eq!(parents[1]["controllerName"], remora_k8s::CONTROLLER_NAME);
    assert_eq!(parents[1]["parentRef"]["name"], "web");
    let conditions: Vec<(&str, &str)> = parents[1]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    assert_eq!(conditions, [("Accepted", "True"), ("ResolvedRefs", "True")]);

    assert!(
        !route["metadata"]["resourceVersion"].is_null(),
        "written only over the version seen: {route}"
    );

    // Another controller rewrites its own entry: ours is still there, so nothing is
    // written; had ours gone, it would be written back over the new version.
    {
        let mut f = fake.lock();
        let mut object = f.objects[&(ROUTES, "split".to_string())].clone();
        object["status"]["parents"][0]["conditions"][0]["reason"] = json!("Programmed");
        f.apply(ROUTES, object);
    }

    // A status written is not written again when the watch brings it back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts: Vec<usize> = ["web", "broken", "split"]
        .iter()
        .map(|name| {
            fake.lock()
                .patches
                .iter()
                .filter(|(_, n, _)| n == name)
                .count()
        })
        .collect();
    assert_eq!(counts, [1, 1, 1], "{:#?}", fake.lock().patches);
    let f = fake.lock();
    let parents = &f.objects[&(ROUTES, "split".to_string())]["status"]["parents"];
    assert_eq!(
        parents[0]["conditions"][0]["reason"], "Programmed",
        "theirs kept"
    );
    assert_eq!(
        parents[1]["controllerName"],
        remora_k8s::CONTROLLER_NAME,
        "ours kept"
    );
    assert_eq!(
        f.conflicts, 0,
        "every write named the version it was computed from"
    );
}
