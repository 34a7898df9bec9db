//! End to end with the controller: a client pod calls a Service's ClusterIP (which only
//! the controller knows: there is no kube-proxy), its proxy balances requests over the
//! Service's three server pods, follows endpoint changes made in the controller's
//! `dir:` folder, and keeps working while the controller is down.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use remora_tests::{Binaries, Cluster, Pod, Proxy, backend, client, e2e_enabled, write_atomically};

const CLUSTER_IP: &str = "10.96.0.10:80";
const CONTROLLER: &str = "http://10.77.0.100:8086";
const SERVERS: [(&str, &str); 3] = [
    ("s1", "10.77.0.11"),
    ("s2", "10.77.0.12"),
    ("s3", "10.77.0.13"),
];

/// The Service, its EndpointSlice over `servers` and their Pods, as `kubectl apply` takes them.
fn objects(cluster: &Cluster, servers: &[(&str, &str)]) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n",
    );
    for (role, ip) in servers {
        let pod = &cluster.pod(role).name;
        out.push_str(&format!("  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {pod}}}}}\n"));
    }
    for (role, ip) in servers {
        let pod = &cluster.pod(role).name;
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: shop, labels: {{remora.io/meshed: \"true\"}}}}\n\
             spec: {{serviceAccountName: web, containers: []}}\nstatus: {{podIP: {ip}}}\n"
        ));
    }
    out
}

async fn start_controller(cluster: &Cluster, bins: &Binaries, dir: &Path) -> Proxy {
    Proxy::plaintext_controller(cluster.pod("ctl"), bins, dir).await
}

/// A client pod, a controller pod serving the Service `web` over the three servers'
/// pods from a `dir:` folder, and the servers: the cluster, the folder, the controller.
async fn client_controller_and_servers(bins: &Binaries) -> (Cluster, std::path::PathBuf, Proxy) {
    let roles = [("client", "10.77.0.1"), ("ctl", "10.77.0.100")];
    let cluster = Cluster::new(&[&roles[..], &SERVERS[..]].concat());
    let dir = tempdir(bins);
    write_atomically(&dir, "web.yaml", &objects(&cluster, &SERVERS));
    let controller = start_controller(&cluster, bins, &dir).await;
    (cluster, dir, controller)
}

/// One request to the Service: which pod answered, or why it failed.
async fn whoami(client_pod: &Pod) -> Result<String, String> {
    match client::get(client_pod, CLUSTER_IP.parse().unwrap(), "/whoami").await {
        Ok((200, body)) => Ok(body),
        Ok((status, body)) => Err(format!("{status}: {body}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Each request's start and outcome.
type Log = Vec<(Instant, Result<String, String>)>;

/// Requests sent back to back from a background task, each stamped with its start.
struct Load {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(client_pod: &Pod) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let name = client_pod.name.clone();
        let ip = client_pod.ip;
        let (stop2, log2) = (stop.clone(), log.clone());
        let task = tokio::spawn(async move {
            let pod = Pod::borrowed(name, ip);
            // Bounded: at most 20,000 requests or 60 s.
            let deadline = Instant::now() + Duration::from_secs(60);
            for _ in 0..20_000 {
                if stop2.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let at = Instant::now();
                let r = whoami(&pod).await;
                log2.lock().push((at, r));
            }
        });
        Self { stop, log, task }
    }

    async fn finish(self) -> Log {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        Arc::try_unwrap(self.log).unwrap().into_inner()
    }
}

fn tally<'a>(results: impl Iterator<Item = &'a Result<String, String>>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for r in results {
        let key = match r {
            Ok(who) => who.clone(),
            Err(e) => format!("ERROR {e}"),
        };
        *t.entry(key).or_default() += 1;
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_balanced_follows_changes_and_outlives_the_controller() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let (cluster, dir, mut controller) = client_controller_and_servers(&bins).await;

    let mut proxies = Vec::new();
    for (role, _) in SERVERS {
        let pod = cluster.pod(role);
        pod.intercept(&bins);
        let _ = backend::http(pod, "0.0.0.0:8080".parse()?);
        proxies.push(Proxy::start(pod, &bins, &[]).await);
    }
    let client_pod = cluster.pod("client");
    client_pod.intercept(&bins);
    proxies.push(Proxy::start(client_pod, &bins, &[("REMORA_CONTROLLER_ADDR", CONTROLLER)]).await);
    let names: Vec<String> = SERVERS
        .iter()
        .map(|(r, _)| cluster.pod(r).name.clone())
        .collect();

    // All three server pods receive requests for the ClusterIP.
    let mut first = Vec::new();
    for _ in 0..150 {
        first.push(whoami(client_pod).await);
    }
    let t = tally(first.iter());
    assert!(
        names.iter().all(|n| t.get(n).copied().unwrap_or(0) > 0) && t.len() == 3,
        "{t:?}"
    );

    // s3 leaves the Service: within a second it gets no new requests, and no request fails.
    let load = Load::start(client_pod);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let removed_at = Instant::now();
    write_atomically(&dir, "web.yaml", &objects(&cluster, &SERVERS[..2]));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let log = load.finish().await;
    let after: Vec<_> = log
        .iter()
        .filter(|(at, _)| *at > removed_at + Duration::from_secs(1))
        .map(|(_, r)| r)
        .collect();
    let t_all = tally(log.iter().map(|(_, r)| r));
    let t_after = tally(after.iter().copied());
    assert!(
        t_all.keys().all(|k| !k.starts_with("ERROR")),
        "requests failed during the change: {t_all:?}"
    );
    assert!(
        !after.is_empty() && !t_after.contains_key(&names[2]),
        "s3 still served a second after removal: {t_after:?}"
    );

    // The controller goes away: traffic keeps flowing to the endpoints last known.
    controller.kill();
    let mut during = Vec::new();
    for _ in 0..100 {
        during.push(whoami(client_pod).await);
    }
    let t = tally(during.iter());
    assert_eq!(t.values().sum::<usize>(), 100, "{t:?}");
    assert!(t.keys().all(|k| *k == names[0] || *k == names[1]), "{t:?}");

    // It comes back with s3 restored: the change applies without restarting the proxy.
    write_atomically(&dir, "web.yaml", &objects(&cluster, &SERVERS));
    let _controller = start_controller(&cluster, &bins, &dir).await;
    let mut back = false;
    for _ in 0..400 {
        if whoami(client_pod).await.as_deref() == Ok(names[2].as_str()) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        back,
        "s3 never received requests after the controller came back"
    );

    let text = client::metrics(client_pod).await;
    let reconnects = client::sample(&text, "remora_control_stream_reconnects_total", &[]);
    assert!(
        reconnects >= 1.0,
        "the proxy never noticed the controller leaving:\n{text}"
    );
    let by_service = client::sample(
        &text,
        "remora_http_requests_total",
        &[("direction", "outbound"), ("target", "web.shop:80")],
    );
    assert!(
        by_service >= 250.0,
        "requests not labelled with the Service:\n{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_endpoints_fails_fast_with_a_reason() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let cluster = Cluster::new(&[
        ("client", "10.77.0.1"),
        ("ctl", "10.77.0.100"),
        ("s1", "10.77.0.11"),
    ]);
    let dir = tempdir(&bins);
    write_atomically(&dir, "web.yaml", &objects(&cluster, &[]));
    let _controller = start_controller(&cluster, &bins, &dir).await;
    let client_pod = cluster.pod("client");
    client_pod.intercept(&bins);
    let _proxy = Proxy::start(client_pod, &bins, &[("REMORA_CONTROLLER_ADDR", CONTROLLER)]).await;

    let mut h1 = client::http1(client_pod, CLUSTER_IP.parse::<SocketAddr>()?).await?;
    let req = http::Request::get("/whoami")
        .header("host", "web.shop")
        .body(remora_tests::client::empty())?;
    let rsp = h1.send_request(req).await?;
    assert_eq!(rsp.status(), 503);
    let reason = rsp
        .headers()
        .get("remora-error")
        .expect("remora-error header")
        .to_str()?
        .to_string();
    assert!(
        reason.contains("web.shop:80") && reason.contains("no endpoints"),
        "{reason}"
    );
    Ok(())
}

fn tempdir(bins: &Binaries) -> std::path::PathBuf {
    let dir = bins.dir().join("objects");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Issue 12: after the controller came back, a removed endpoint kept receiving requests
/// for 3-4 s (381 of them), until each stream's own backoff ended. While streams fail,
/// the proxy probes the controller's port, and resubscribes them all once it is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_the_controller_was_away_applies_as_soon_as_it_is_back()
-> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let (cluster, dir, mut controller) = client_controller_and_servers(&bins).await;
    for (role, _) in SERVERS {
        let _ = backend::http(cluster.pod(role), "0.0.0.0:8080".parse()?);
    }
    let client_pod = cluster.pod("client");
    client_pod.intercept(&bins);
    let _proxy = Proxy::start(client_pod, &bins, &[("REMORA_CONTROLLER_ADDR", CONTROLLER)]).await;
    let s3 = cluster.pod("s3").name.clone();
    let mut seen = Vec::new();
    for _ in 0..60 {
        seen.push(whoami(client_pod).await);
    }
    assert!(tally(seen.iter()).contains_key(&s3), "s3 serves: {seen:?}");

    // The controller is away long enough for the streams' backoffs to grow to seconds;
    // meanwhile s3 leaves the Service.
    controller.kill();
    tokio::time::sleep(Duration::from_secs(7)).await;
    write_atomically(&dir, "web.yaml", &objects(&cluster, &SERVERS[..2]));
    let _controller = start_controller(&cluster, &bins, &dir).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut after = Vec::new();
    for _ in 0..100 {
        after.push(whoami(client_pod).await);
    }
    let t = tally(after.iter());
    assert_eq!(t.values().sum::<usize>(), 100, "{t:?}");
    assert!(
        !t.contains_key(&s3),
        "s3 still served 1.5 s after the controller was back: {t:?}"
    );
    Ok(())
}

/// Issue 17: the Service's endpoints change every 200 ms under load — each change drops
/// one of the three servers and brings back the last one dropped, as a rollout's
/// readiness flaps would — and no request fails. The servers stay up, so a request
/// already sent to a dropped endpoint must be let finish, and a new one must go to an
/// endpoint listed now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_churned_every_200ms_under_load_lose_no_request() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let (cluster, dir, _controller) = client_controller_and_servers(&bins).await;
    for (role, _) in SERVERS {
        let _ = backend::http(cluster.pod(role), "0.0.0.0:8080".parse()?);
    }
    let client_pod = cluster.pod("client");
    client_pod.intercept(&bins);
    let _proxy = Proxy::start(client_pod, &bins, &[("REMORA_CONTROLLER_ADDR", CONTROLLER)]).await;
    let names: Vec<String> = SERVERS
        .iter()
        .map(|(r, _)| cluster.pod(r).name.clone())
        .collect();
    assert!(
        whoami(client_pod).await.is_ok(),
        "the Service answers before the churn"
    );

    const CHANGES: usize = 50;
    let load = Load::start(client_pod);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    for n in 0..CHANGES {
        tick.tick().await;
        let listed: Vec<_> = (0..SERVERS.len())
            .filter(|i| *i != n % SERVERS.len())
            .map(|i| SERVERS[i])
            .collect();
        write_atomically(&dir, "web.yaml", &objects(&cluster, &listed));
    }
    // The server the last change left out.
    let last_dropped = (CHANGES - 1) % SERVERS.len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let settled_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let log = load.finish().await;

    let t_all = tally(log.iter().map(|(_, r)| r));
    let failed: usize = t_all
        .iter()
        .filter(|(k, _)| k.starts_with("ERROR"))
        .map(|(_, n)| n)
        .sum();
    let total: usize = t_all.values().sum();
    eprintln!("{CHANGES} changes every 200 ms: {total} requests, {failed} failed: {t_all:?}");
    assert_eq!(
        failed, 0,
        "requests failed while endpoints churned: {t_all:?}"
    );
    assert!(total >= 200, "too little load to judge: {t_all:?}");
    assert!(
        names.iter().all(|n| t_all.contains_key(n)),
        "every server took part: {t_all:?}"
    );
    // The churn was followed, not ignored: once settled, the endpoint the last change
    // dropped gets nothing.
    let settled = tally(
        log.iter()
            .filter(|(at, _)| *at > settled_at)
            .map(|(_, r)| r),
    );
    assert!(
        !settled.is_empty() && !settled.contains_key(&names[last_dropped]),
        "{} still served after the last change dropped it: {settled:?}",
        names[last_dropped]
    );
    Ok(())
}
