//! The whole outbound path in one process: a real proxy (`remora_proxy::App`) and a real
//! controller (`remora_controller::App`, `dir:` source) with test servers, all on one
//! runtime whose threads live in one network namespace. One iptables rule sends the
//! app's connections to the Service's ClusterIP to the proxy's outbound port, so every
//! request goes accept → original destination → discovery → detection → the
//! Service's destination → balancer → endpoint pools, under the Service's policy and
//! its routes, as in a pod, yet a debugger or a profiler sees all of it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use http::Request;
use http_body_util::BodyExt;
use remora_admin::LogLevel;
use remora_tests::{Pod, backend, client, write_atomically};

const CLUSTER_IP: &str = "10.96.0.10:80";
const V2_IP: &str = "10.96.0.11:80";
/// The Service's three endpoints, then `web-v2`'s one: addresses on the pod's loopback.
const ENDPOINTS: [&str; 4] = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"];

fn objects() -> String {
    let service = |name: &str, ip: &str, endpoints: &[&str]| {
        let list: String = endpoints
            .iter()
            .map(|a| format!("- {{addresses: [\"{a}\"], conditions: {{ready: true}}}}\n"))
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{list}---\n"
        )
    };
    let mut out = service("web", "10.96.0.10", &ENDPOINTS[..3]);
    out.push_str(&service("web-v2", "10.96.0.11", &ENDPOINTS[3..]));
    out.push_str(
        "apiVersion: policy.remora.io/v1alpha1\nkind: TrafficPolicy\n\
         metadata: {name: web, namespace: shop}\nspec:\n  targetRef: {name: web}\n\
         \x20 retries:\n    attempts: 2\n    retryOn: [5xx, connect-failure]\n\
         \x20   backoff: {base: 1ms, max: 5ms}\n",
    );
    out
}

const SPLIT: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
    metadata: {name: web-split, namespace: shop}\nspec:\n\
    \x20 parentRefs: [{kind: Service, group: \"\", name: web, port: 80}]\n\
    \x20 rules:\n    - backendRefs: [{name: web, port: 80, weight: 50}, {name: web-v2, port: 80, weight: 50}]\n";

/// A controller over `dir`, on the runtime's namespace; its gRPC address.
async fn controller(dir: &Path) -> SocketAddr {
    let source = format!("dir:{}", dir.display());
    let args = [
        "remora-controller",
        "--source",
        &source,
        "--grpc-plaintext",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ];
    let config = remora_controller::Config::load(args.map(String::from), &|_| None).unwrap();
    let app = remora_controller::App::build(config, LogLevel::detached("info"))
        .await
        .unwrap();
    let grpc = app.grpc_addr().unwrap();
    tokio::spawn(app.run(std::future::pending()));
    grpc
}

/// A proxy of the controller at `grpc`: its outbound and admin addresses.
async fn proxy(grpc: SocketAddr) -> (SocketAddr, SocketAddr) {
    let env: HashMap<&str, String> = [
        ("REMORA_CONTROLLER_ADDR", format!("http://{grpc}")),
        ("REMORA_NAMESPACE", "shop".into()),
        ("REMORA_POD_NAME", "client".into()),
        ("REMORA_INBOUND_ADDR", "127.0.0.1:0".into()),
        ("REMORA_OUTBOUND_ADDR", "127.0.0.1:0".into()),
        ("REMORA_ADMIN_ADDR", "127.0.0.1:0".into()),
    ]
    .into();
    let config =
        remora_proxy::Config::load(["remora-proxy"].map(String::from), &|k| env.get(k).cloned())
            .unwrap();
    let app = remora_proxy::App::build(config, LogLevel::detached("info"))
        .await
        .unwrap();
    let addrs = (app.outbound_addrs()[0], app.admin_addrs()[0]);
    tokio::spawn(app.run(std::future::pending()));
    addrs
}

/// `n` GETs to `addr` over one keep-alive connection from the app; the statuses.
async fn gets(pod: &Pod, addr: &str, n: usize) -> Vec<u16> {
    let mut sender = client::http1(pod, addr.parse().unwrap()).await.unwrap();
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        sender.ready().await.unwrap();
        let req = Request::get("/work")
            .header("host", "web.shop.svc.cluster.local")
            .body(backend::full(""))
            .unwrap();
        let rsp = sender.send_request(req).await.unwrap();
        statuses.push(rsp.status().as_u16());
        rsp.into_body().collect().await.unwrap();
    }
    statuses
}

fn received(faults: &[Arc<backend::Faults>]) -> Vec<u64> {
    faults.iter().map(|f| f.gets.load(Relaxed)).collect()
}

async fn metric(pod: &Pod, admin: SocketAddr, name: &str) -> f64 {
    let (status, text) = client::get(pod, admin, "/metrics").await.unwrap();
    assert_eq!(status, 200, "{text}");
    client::sample(&text, name, &[])
}

async fn whole_path(pod: Arc<Pod>, dir: std::path::PathBuf) {
    let faults: Vec<_> = ENDPOINTS
        .iter()
        .map(|ip| backend::faulty(&pod, format!("{ip}:8080").parse().unwrap()))
        .collect();
    let grpc = controller(&dir).await;
    let (outbound, admin) = proxy(grpc).await;
    for vip in [CLUSTER_IP, V2_IP] {
        let (ip, port) = vip.split_once(':').unwrap();
        let out = pod
            .command("iptables")
            .args([
                "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", ip, "--dport", port,
            ])
            .args(["-j", "REDIRECT", "--to-ports", &outbound.port().to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Balanced: every endpoint of the Service serves, and nothing fails.
    let statuses = gets(&pod, CLUSTER_IP, 300).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let spread = received(&faults[..3]);
    assert!(spread.iter().all(|n| *n >= 30), "{spread:?}");

    // One endpoint answers 503: the policy's retries (and the balancer, which a fast
    // 5xx does not fool) keep every request whole.
    faults[1].status.store(503, Relaxed);
    let statuses = gets(&pod, CLUSTER_IP, 300).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(metric(&pod, admin, "remora_http_retries_total").await >= 1.0);

    // It stops listening: connects are refused, and another endpoint takes each request.
    faults[1].close();
    let statuses = gets(&pod, CLUSTER_IP, 300).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    // An HTTPRoute splits the Service with another one, named as its backend: about half
    // of the requests reach `web-v2`, with no restart.
    write_atomically(&dir, "split.yaml", SPLIT);
    let before = faults[3].gets.load(Relaxed);
    let routed = async {
        while faults[3].gets.load(Relaxed) == before {
            gets(&pod, CLUSTER_IP, 10).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), routed)
        .await
        .expect("the route reached the proxy");
    let before = received(&faults);
    let statuses = gets(&pod, CLUSTER_IP, 400).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let after = received(&faults);
    let v2 = after[3] - before[3];
    assert!((120..=280).contains(&v2), "web-v2 got {v2} of 400");
}

#[test]
fn the_whole_outbound_path_in_one_process() {
    if !remora_tests::e2e_enabled() {
        return;
    }
    let pod = Arc::new(Pod::alone());
    pod.ip_cmd(&["route", "add", "default", "dev", "lo"]);
    for ip in ENDPOINTS {
        pod.ip_cmd(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    let dir = std::env::temp_dir().join(format!("remora-outbound-{}", pod.name));
    std::fs::create_dir_all(&dir).unwrap();
    write_atomically(&dir, "objects.yaml", &objects());
    // Threads inherit their creator's namespace: every worker of this runtime (so every
    // socket of the proxy, the controller and the servers) is the pod's.
    let runtime = pod.enter(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    });
    let body = whole_path(pod.clone(), dir.clone());
    let result = runtime.block_on(async move {
        tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(120), body).await })
            .await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    let _ = std::fs::remove_dir_all(&dir);
    result
        .expect("the test body panicked")
        .expect("the test took over two minutes");
}
