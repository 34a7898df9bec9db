//! End to end with TrafficPolicy: a client pod calls a Service over three server pods
//! whose backends have fault knobs (status, delay); the controller's `dir:` folder holds
//! the policy. Every assertion counts requests; none times them.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use http::Request;
use http_body_util::BodyExt;
use remora_tests::{
    Binaries, Cluster, Pod, Proxy,
    backend::{self, Faults},
    client::{self, metrics, sample},
    e2e_enabled, write_atomically,
};

const CLUSTER_IP: &str = "10.96.0.10:80";
const SERVERS: [(&str, &str); 3] = [
    ("s1", "10.77.0.11"),
    ("s2", "10.77.0.12"),
    ("s3", "10.77.0.13"),
];

struct Setup {
    cluster: Cluster,
    objects: PathBuf,
    faults: Vec<Arc<Faults>>,
    controller: Proxy,
    /// The client pod's proxy.
    proxy: Proxy,
}

impl Setup {
    /// The Service over three unmeshed server pods, `policy` (a TrafficPolicy spec, if
    /// any) in the folder, and the client pod's proxy connected to the controller.
    async fn start(bins: &Binaries, name: &str, policy: Option<&str>) -> Self {
        Self::start_with(bins, name, policy, &[]).await
    }

    /// As `start`, with `extra` addresses in the Service's endpoints (no pod behind them).
    async fn start_with(bins: &Binaries, name: &str, policy: Option<&str>, extra: &[&str]) -> Self {
        let files = policy.map(|spec| ("policy.yaml", traffic_policy(spec)));
        let web = ("web", "10.96.0.10", &[0, 1, 2][..], extra);
        Self::launch(bins, name, &[web], files.as_slice()).await
    }

    /// Services (name, ClusterIP, the servers behind it, extra endpoint addresses) in
    /// namespace `shop`, each on port 80 → 8080, and `files` in the controller's folder.
    async fn launch(
        bins: &Binaries,
        name: &str,
        services: &[(&str, &str, &[usize], &[&str])],
        files: &[(&str, String)],
    ) -> Self {
        let roles = [("client", "10.77.0.1"), ("ctl", "10.77.0.100")];
        let cluster = Cluster::new(&[&roles[..], &SERVERS[..]].concat());
        let objects = bins.dir().join(format!("objects-{name}"));
        std::fs::create_dir_all(&objects).unwrap();
        for (svc, cluster_ip, servers, extra) in services {
            let mut yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: shop}}\n\
                 spec: {{clusterIP: {cluster_ip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {svc}-1, namespace: shop, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
            );
            for ip in servers
                .iter()
                .map(|i| SERVERS[*i].1)
                .chain(extra.iter().copied())
            {
                yaml.push_str(&format!(
                    "  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}\n"
                ));
            }
            write_atomically(&objects, &format!("{svc}.yaml"), &yaml);
        }
        for (file, text) in files {
            write_atomically(&objects, file, text);
        }
        let controller = Proxy::plaintext_controller(cluster.pod("ctl"), bins, &objects).await;
        let faults = SERVERS
            .iter()
            .map(|(role, _)| backend::faulty(cluster.pod(role), "0.0.0.0:8080".parse().unwrap()))
            .collect();
        let client_pod = cluster.pod("client");
        client_pod.intercept(bins);
        let proxy = Proxy::start(
            client_pod,
            bins,
            &[("REMORA_CONTROLLER_ADDR", "http://10.77.0.100:8086")],
        )
        .await;
        Self {
            cluster,
            objects,
            faults,
            controller,
            proxy,
        }
    }

    fn client(&self) -> &Pod {
        self.cluster.pod("client")
    }

    fn name(&self, i: usize) -> String {
        self.cluster.pod(SERVERS[i].0).name.clone()
    }

    fn received(&self) -> (u64, u64) {
        self.faults.iter().fold((0, 0), |(g, o), f| {
            (g + f.gets.load(Relaxed), o + f.others.load(Relaxed))
        })
    }
}

fn traffic_policy(spec: &str) -> String {
    format!(
        "apiVersion: policy.remora.io/v1alpha1\nkind: TrafficPolicy\n\
         metadata: {{name: web, namespace: shop}}\nspec:\n  targetRef: {{name: web}}\n{spec}"
    )
}

/// One request to the Service: status, `remora-error`, body.
async fn call(pod: &Pod, method: http::Method) -> anyhow::Result<(u16, String, String)> {
    let mut sender = client::http1(pod, CLUSTER_IP.parse()?).await?;
    let req = Request::builder()
        .method(method)
        .uri("/work")
        .header("host", "web.shop.svc.cluster.local")
        .header("content-length", "5")
        .body(
            http_body_util::Full::new(bytes::Bytes::from_static(b"hello"))
                .map_err(|n| match n {})
                .boxed(),
        )?;
    let rsp = sender.send_request(req).await?;
    let status = rsp.status().as_u16();
    let error = rsp
        .headers()
        .get("remora-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((status, error, String::from_utf8_lossy(&body).into()))
}

fn tally(results: &[(u16, String, String)]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for (status, _, body) in results {
        let key = if *status == 200 {
            body.clone()
        } else {
            format!("status {status}")
        };
        *t.entry(key).or_default() += 1;
    }
    t
}

const RETRY_5XX: &str =
    "  retries:\n    attempts: 2\n    retryOn: [5xx]\n    backoff: {base: 1ms, max: 5ms}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_retried_around_and_ejected() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    // Round robin: peak-EWMA would shun the failing endpoint after its first 503 (see
    // the tests of one bad endpoint of three), and the breaker is what is tested here.
    let policy = format!(
        "{RETRY_5XX}  loadBalancer: {{algorithm: RoundRobin}}\n  circuitBreaker: {{consecutiveFailures: 5}}\n"
    );
    let s = Setup::start(&bins, "retry", Some(&policy)).await;
    s.faults[0].status.store(503, Relaxed);
    // 2,000 GETs: the failing endpoint's answers are retried on the others until the
    // circuit breaker ejects it.
    let mut results = Vec::new();
    for _ in 0..2000 {
        results.push(call(s.client(), http::Method::GET).await?);
    }
    let ok = results.iter().filter(|r| r.0 == 200).count();
    assert!(
        ok * 1000 >= 2000 * 999,
        "{ok} of 2000: {:?}",
        tally(&results)
    );
    let failing = s.faults[0].gets.load(Relaxed);
    assert!(failing > 0, "the failing endpoint was tried");
    let text = metrics(s.client()).await;
    let target = [("target", "web.shop:80")];
    let retries = sample(&text, "remora_http_retries_total", &target);
    assert!(
        retries >= 1.0 && retries >= failing as f64 - 2.0,
        "{retries} retries, {failing} failures"
    );
    assert!(
        sample(&text, "remora_endpoint_ejections_total", &target) >= 1.0,
        "{text}"
    );
    // remora_endpoints is sampled every 2 s: poll (bounded) until it shows the ejection.
    let mut seen = String::new();
    for _ in 0..50 {
        seen = metrics(s.client()).await;
        let state = |st| {
            sample(
                &seen,
                "remora_endpoints",
                &[("target", "web.shop:80"), ("state", st)],
            )
        };
        if (state("ready"), state("ejected")) == (2.0, 1.0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("remora_endpoints never showed 2 ready and 1 ejected:\n{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_never_retried_unless_the_policy_says_so() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let s = Setup::start(&bins, "post", Some(RETRY_5XX)).await;
    s.faults[0].status.store(503, Relaxed);
    let mut posts = Vec::new();
    for _ in 0..300 {
        posts.push(call(s.client(), http::Method::POST).await?);
    }
    // The failures reach the client, each sent exactly once.
    let failed = posts.iter().filter(|r| r.0 == 503).count() as u64;
    assert!(failed > 0, "{:?}", tally(&posts));
    assert_eq!(failed, s.faults[0].others.load(Relaxed));
    assert_eq!(s.received().1, 300, "300 POSTs, 300 received: none retried");
    let text = metrics(s.client()).await;
    assert_eq!(
        sample(&text, "remora_http_retries_total", &[]),
        0.0,
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_retried_on_the_grpc_codes_named() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let policy =
        "  retries:\n    attempts: 2\n    retryOn: [grpc-14]\n    backoff: {base: 1ms, max: 5ms}\n";
    let s = Setup::start(&bins, "grpc", Some(policy)).await;
    s.faults[0].grpc_status.store(14, Relaxed);
    let mut h2 = client::http2(s.client(), CLUSTER_IP.parse()?).await?;
    let (mut ok, mut failed) = (0, Vec::new());
    for i in 0..300u32 {
        // A streamed body of unknown length, as gRPC sends it: replayed from the copy
        // kept while the first attempt streamed it.
        let message = bytes::Bytes::from(format!("\0\0\0\0\x08call {i:03}"));
        let (mut tx, body) = remora_tests::body::channel(1);
        tx.send_data(message.clone())
            .await
            .map_err(|_| anyhow::anyhow!("body closed"))?;
        drop(tx);
        let req = Request::post("http://web.shop.svc.cluster.local/greeter.Greeter/Hello")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body.boxed())?;
        let rsp = h2.send_request(req).await?;
        let status = rsp.headers().get("grpc-status").cloned();
        let body = rsp.into_body().collect().await?;
        let grpc = body
            .trailers()
            .and_then(|t| t.get("grpc-status").cloned())
            .or(status);
        match grpc.as_ref().map(|v| v.as_bytes()) {
            Some(b"0") if body.to_bytes() == message => ok += 1,
            other => failed.push(format!("call {i}: {other:?}")),
        }
    }
    assert!(failed.is_empty(), "{ok} ok, failed: {failed:?}");
    assert!(
        s.faults[0].others.load(Relaxed) > 0,
        "the failing endpoint was tried"
    );
    let text = metrics(s.client()).await;
    assert!(
        sample(&text, "remora_http_retries_total", &[]) >= 1.0,
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_costs_the_policys_connect_timeout_not_the_proxys()
-> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    // 10.77.0.99 is on the pods' subnet with nothing behind it: connecting hangs until
    // the neighbour lookup gives up (seconds), unless the connect timeout cuts it short.
    // With the policy's 300 ms a retry elsewhere fits in the 2.5 s request timeout; with
    // the proxy's own 5 s it would not.
    let policy = "  loadBalancer: {algorithm: RoundRobin}\n  timeouts: {connect: 300ms, request: 2500ms}\n  retries:\n    attempts: 2\n    retryOn: [connect-failure]\n    backoff: {base: 1ms, max: 2ms}\n";
    let s = Setup::start_with(&bins, "connect", Some(policy), &["10.77.0.99"]).await;

    // Streamed (chunked) PUTs first: round robin sends one of the first four to the black
    // hole. An attempt that failed to connect took nothing from the client's stream, so
    // the retry sends the body from the start.
    let mut results = Vec::new();
    for _ in 0..40 {
        results.push(streamed_put(s.client()).await?);
    }
    let ok = results.iter().filter(|r| r.0 == 200).count();
    assert_eq!(ok, 40, "{:?}", tally(&results));
    let text = metrics(s.client()).await;
    let retried = sample(&text, "remora_http_retries_total", &[]);
    assert!(retried >= 1.0, "a streamed PUT met the black hole: {text}");
    assert!(
        results.iter().all(|r| r.1 == "5"),
        "every body arrived whole: {results:?}"
    );
    let (_, others) = s.received();
    assert_eq!(others, 40, "each PUT reached a server once");

    // Then GETs: the black hole is left alone after its failed connect (its backoff),
    // and none fails.
    let mut results = Vec::new();
    for _ in 0..40 {
        results.push(call(s.client(), http::Method::GET).await?);
    }
    let ok = results.iter().filter(|r| r.0 == 200).count();
    assert_eq!(ok, 40, "{:?}", tally(&results));
    Ok(())
}

/// A PUT whose body streams in two chunks (no length known in advance).
async fn streamed_put(pod: &Pod) -> anyhow::Result<(u16, String, String)> {
    let mut sender = client::http1(pod, CLUSTER_IP.parse()?).await?;
    let (mut tx, body) = remora_tests::body::channel(2);
    tokio::spawn(async move {
        let _ = tx.send_data(bytes::Bytes::from_static(b"hel")).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let _ = tx.send_data(bytes::Bytes::from_static(b"lo")).await;
    });
    let req = Request::builder()
        .method(http::Method::PUT)
        .uri("/upload")
        .header("host", "web.shop.svc.cluster.local")
        .body(body.boxed())?;
    let rsp = sender.send_request(req).await?;
    let status = rsp.status().as_u16();
    let received = rsp
        .headers()
        .get("body-bytes")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((status, received, String::from_utf8_lossy(&body).into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_total_outage_retries_stay_within_the_budget() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let policy = "  retries:\n    attempts: 3\n    retryOn: [5xx]\n    backoff: {base: 1ms, max: 2ms}\n    budget: {ratio: 0.2, minPerSecond: 1, window: 10s}\n";
    let s = Setup::start(&bins, "budget", Some(policy)).await;
    for f in &s.faults {
        f.status.store(503, Relaxed);
    }
    let requests = 500u64;
    for _ in 0..requests {
        let (status, _, _) = call(s.client(), http::Method::GET).await?;
        assert_eq!(status, 503);
    }
    let (attempts, _) = s.received();
    // Unbounded, 3 retries each would be 2,000 attempts; the budget allows 20 % of the
    // requests plus 1 per second over the 10-second window.
    let allowed = requests + requests / 5 + 10;
    assert!(
        attempts > requests && attempts <= allowed,
        "{attempts} attempts for {requests} requests (budget allows {allowed})"
    );
    let text = metrics(s.client()).await;
    assert!(
        sample(&text, "remora_retry_budget_exhausted_total", &[]) > 0.0,
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_gets_little_and_a_concurrency_limit_fails_fast() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let s = Setup::start(&bins, "slow", None).await;
    // Under peak-EWMA (the default) the slow endpoint's share is at most a third of a
    // fast one's.
    // (60 ms against 6 ms: a loaded machine's scheduling noise of a few milliseconds
    // must not make a fast endpoint look slow.)
    s.faults[0].delay_ms.store(60, Relaxed);
    for f in &s.faults[1..] {
        f.delay_ms.store(6, Relaxed);
    }
    let mut results = Vec::new();
    for _ in 0..600 {
        results.push(call(s.client(), http::Method::GET).await?);
    }
    let t = tally(&results);
    let slow = t.get(&s.name(0)).copied().unwrap_or(0);
    let fast = t
        .get(&s.name(1))
        .copied()
        .unwrap_or(0)
        .max(t.get(&s.name(2)).copied().unwrap_or(0));
    assert_eq!(results.iter().filter(|r| r.0 == 200).count(), 600, "{t:?}");
    assert!(slow * 3 <= fast, "slow {slow}, fast {fast}: {t:?}");

    // maxRequests 10 per endpoint, 50 callers at once on slow answers: 30 fit, the rest
    // are refused at once with 503, and no request hangs.
    write_atomically(
        &s.objects,
        "policy.yaml",
        &traffic_policy("  circuitBreaker: {maxRequests: 10}\n"),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for f in &s.faults {
        f.delay_ms.store(1000, Relaxed);
    }
    let client = s.client();
    let calls = (0..50).map(|_| {
        let pod = Pod::borrowed(client.name.clone(), client.ip);
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(30), call(&pod, http::Method::GET)).await
        })
    });
    let mut ok = 0;
    let mut refused = 0;
    for c in calls.collect::<Vec<_>>() {
        match c.await?.expect("no request hangs")? {
            (200, _, _) => ok += 1,
            (503, why, _) if why.contains("concurrency limit") => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok + refused, 50);
    assert!((27..=33).contains(&ok), "{ok} served, {refused} refused");
    Ok(())
}

/// Issue 15: each request that runs out of its request timeout is answered 504 and
/// counted once as `timeout="request"` under its route, whichever step it was in: an
/// attempt waiting for its answer, or a request waiting for a connection slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_timeout_is_a_504_counted_under_its_route() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    // One HTTP/1 connection per endpoint: of 12 callers at once, 3 wait for an answer
    // and the rest for a connection, all past the 300 ms the request may take.
    let policy = "  timeouts: {request: 300ms}\n  circuitBreaker: {maxConnections: 1, maxPendingRequests: 20}\n";
    let s = Setup::start(&bins, "request-timeout", Some(policy)).await;
    for f in &s.faults {
        f.delay_ms.store(1000, Relaxed);
    }
    let client = s.client();
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let pod = Pod::borrowed(client.name.clone(), client.ip);
            tokio::spawn(async move { call(&pod, http::Method::GET).await })
        })
        .collect();
    let mut timed_out = 0;
    for c in calls {
        match c.await?? {
            (504, _, _) => timed_out += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let series = |timeout| {
        [
            ("target", "web.shop:80"),
            ("route_name", ""),
            ("backend", "web.shop:80"),
            ("timeout", timeout),
        ]
    };
    let text = metrics(client).await;
    let counted = sample(&text, "remora_http_timeouts_total", &series("request"));
    eprintln!("{timed_out} answered 504, {counted} request timeouts counted");
    assert_eq!(timed_out, 12);
    assert_eq!(counted, 12.0, "{text}");
    assert_eq!(
        sample(&text, "remora_http_timeouts_total", &series("per_try")),
        0.0,
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_changed_mid_traffic_applies_without_a_failed_request() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let s = Setup::start(&bins, "live", None).await;
    // One slow endpoint: peak-EWMA avoids it; round-robin, once in force, does not.
    s.faults[0].delay_ms.store(15, Relaxed);
    let mut results = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..900 {
        if i == 300 {
            write_atomically(
                &s.objects,
                "policy.yaml",
                &traffic_policy("  loadBalancer: {algorithm: RoundRobin}\n"),
            );
        }
        results.push(call(s.client(), http::Method::GET).await?);
        assert!(Instant::now() < deadline, "bounded");
    }
    assert_eq!(
        results.iter().filter(|r| r.0 == 200).count(),
        900,
        "{:?}",
        tally(&results)
    );
    let before = tally(&results[..300]);
    let after = tally(&results[600..]);
    let slow = s.name(0);
    assert!(before.get(&slow).copied().unwrap_or(0) < 100, "{before:?}");
    assert!(
        (95..=105).contains(&after.get(&slow).copied().unwrap_or(0)),
        "each in turn: {after:?}"
    );
    Ok(())
}

/// One GET to the Service with `headers`: status, body, response headers.
async fn get(
    pod: &Pod,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String, http::HeaderMap)> {
    get_at(pod, CLUSTER_IP, path, headers).await
}

/// One GET to the Service at `cluster_ip`.
async fn get_at(
    pod: &Pod,
    cluster_ip: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String, http::HeaderMap)> {
    let mut sender = client::http1(pod, cluster_ip.parse()?).await?;
    let mut req = Request::builder()
        .uri(path)
        .header("host", "web.shop.svc.cluster.local");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let rsp = sender.send_request(req.body(client::empty())?).await?;
    let status = rsp.status().as_u16();
    let (parts, body) = rsp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into(), parts.headers))
}

/// An HTTPRoute on `web` (port 80) with `rules`.
fn http_route(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: web-split, namespace: shop}}\nspec:\n\
         \x20 parentRefs: [{{kind: Service, group: \"\", name: web, port: 80}}]\n\
         \x20 rules:\n{rules}"
    )
}

const CANARY_RULE: &str = "    - matches: [{headers: [{name: x-canary, value: \"yes\"}]}]\n\
     \x20     filters:\n\
     \x20       - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-route, value: canary}]}}\n\
     \x20       - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-routed, value: canary}]}}\n\
     \x20     backendRefs: [{name: web-v2, port: 80}]\n\
     \x20   - matches: [{path: {type: Exact, value: /missing}}]\n\
     \x20     backendRefs: [{name: ghost, port: 80}]\n";

fn split_rule(web: u32, v2: u32) -> String {
    format!(
        "    - backendRefs: [{{name: web, port: 80, weight: {web}}}, {{name: web-v2, port: 80, weight: {v2}}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_splits_by_weight_routes_by_header_and_changes_live() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let route = http_route(&format!("{CANARY_RULE}{}", split_rule(90, 10)));
    let web = ("web", "10.96.0.10", &[0, 1][..], &[][..]);
    let v2 = ("web-v2", "10.96.0.11", &[2][..], &[][..]);
    let s = Setup::launch(&bins, "routes", &[web, v2], &[("route.yaml", route)]).await;
    let canary = s.name(2);
    let deadline = Instant::now() + Duration::from_secs(120);

    // 90/10 over 1,000 requests, within ±5 % of all requests.
    let mut bodies = BTreeMap::<String, usize>::new();
    for _ in 0..1000 {
        let (status, body, _) = get(s.client(), "/split", &[]).await?;
        let key = if status == 200 {
            body
        } else {
            format!("status {status}")
        };
        *bodies.entry(key).or_default() += 1;
        assert!(Instant::now() < deadline, "bounded");
    }
    let to_canary = bodies.get(&canary).copied().unwrap_or(0);
    let to_web =
        bodies.get(&s.name(0)).copied().unwrap_or(0) + bodies.get(&s.name(1)).copied().unwrap_or(0);
    assert_eq!(to_canary + to_web, 1000, "{bodies:?}");
    assert!(
        (50..=150).contains(&to_canary),
        "10 % of 1,000 ± 50: {bodies:?}"
    );

    // The header match takes only matching requests, with its header changes.
    for (value, want_canary) in [("yes", true), ("no", false)] {
        let mut seen = BTreeMap::<String, usize>::new();
        for _ in 0..100 {
            let (status, body, headers) = get(s.client(), "/x", &[("x-canary", value)]).await?;
            assert_eq!(status, 200);
            let route = headers
                .get("echo-x-route")
                .map(|v| v.to_str().unwrap().to_string());
            let routed = headers.get("x-routed").is_some();
            assert_eq!(
                route.is_some(),
                want_canary,
                "request header set only by the rule"
            );
            assert_eq!(
                routed, want_canary,
                "response header added only by the rule"
            );
            *seen.entry(body).or_default() += 1;
        }
        if want_canary {
            assert_eq!(seen.get(&canary), Some(&100), "{seen:?}");
        } else {
            assert!(seen.get(&canary).copied().unwrap_or(0) < 40, "{seen:?}");
        }
    }

    // A backend Service that does not exist: 500 with the reason, as the Gateway API asks.
    let (status, _, headers) = get(s.client(), "/missing", &[]).await?;
    assert_eq!(status, 500);
    assert!(
        headers
            .get("remora-error")
            .is_some_and(|v| v.to_str().unwrap().contains("does not exist")),
        "{headers:?}"
    );

    // Mid-traffic, everything moves to web-v2; no request fails on the way.
    write_atomically(
        &s.objects,
        "route.yaml",
        &http_route(&format!("{CANARY_RULE}{}", split_rule(0, 100))),
    );
    let mut moved = 0;
    let mut failed = Vec::new();
    for _ in 0..2000 {
        let (status, body, _) = get(s.client(), "/split", &[]).await?;
        if status != 200 {
            failed.push(status);
        }
        moved = if body == canary { moved + 1 } else { 0 };
        if moved == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "bounded");
    }
    assert!(failed.is_empty(), "failed mid-change: {failed:?}");
    assert_eq!(moved, 100, "100 in a row on web-v2 once the change applied");

    // A broken edit is refused; the last valid route stays in force.
    write_atomically(
        &s.objects,
        "route.yaml",
        &http_route(
            "    - matches: [{path: {type: RegularExpression, value: \"/(\"}}]\n      backendRefs: [{name: web, port: 80}]\n",
        ),
    );
    while !s
        .controller
        .log_text()
        .contains("spec.rules[0].matches[0].path.value")
    {
        assert!(
            Instant::now() < deadline,
            "the controller never refused the broken route"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..100 {
        let (status, body, _) = get(s.client(), "/split", &[]).await?;
        assert_eq!((status, body), (200, canary.clone()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policys_idle_timeout_closes_pooled_connections() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    // web (s1) has a 200 ms idle timeout; web-v2 (s3) keeps the proxy's 90 s.
    let policy = ("policy.yaml", traffic_policy("  timeouts: {idle: 200ms}\n"));
    let web = ("web", "10.96.0.10", &[0][..], &[][..]);
    let v2 = ("web-v2", "10.96.0.11", &[2][..], &[][..]);
    let s = Setup::launch(&bins, "idle", &[web, v2], &[policy]).await;
    for _ in 0..3 {
        for ip in [CLUSTER_IP, "10.96.0.11:80"] {
            let (status, _, _) = get_at(s.client(), ip, "/", &[]).await?;
            assert_eq!(status, 200);
        }
        // Far longer than 200 ms, far shorter than 90 s.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let opened = |i: usize| s.faults[i].connections.load(Relaxed);
    assert_eq!((opened(0), opened(2)), (3, 1), "pooled connections opened");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_and_pending_requests_bound_an_http1_endpoint() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    // One unmeshed HTTP/1 endpoint, 2 connections, 3 requests may wait for one.
    let policy = (
        "policy.yaml",
        traffic_policy("  circuitBreaker: {maxConnections: 2, maxPendingRequests: 3}\n"),
    );
    let web = ("web", "10.96.0.10", &[0][..], &[][..]);
    let s = Setup::launch(&bins, "connections", &[web], &[policy]).await;
    // The policy is in force once a request has gone through (the first waits for it).
    assert_eq!(call(s.client(), http::Method::GET).await?.0, 200);
    s.faults[0].delay_ms.store(1000, Relaxed);
    let client = s.client();
    let calls = (0..10).map(|_| {
        let pod = Pod::borrowed(client.name.clone(), client.ip);
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(30), call(&pod, http::Method::GET)).await
        })
    });
    let (mut ok, mut refused) = (0, 0);
    for c in calls.collect::<Vec<_>>() {
        match c.await?.expect("no request hangs")? {
            (200, _, _) => ok += 1,
            (503, why, _) if why.contains("concurrency limit") => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // 2 on the connections, 3 after waiting for one, 5 refused at once.
    assert_eq!((ok, refused), (5, 5));
    assert_eq!(
        s.faults[0].most_busy.load(Relaxed),
        2,
        "never more than 2 at once"
    );
    Ok(())
}

/// A fault one endpoint of three can have.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Nothing listens: connects are refused.
    Refusing,
    /// Accepts and never answers.
    Hung,
    /// Answers every request 503, fast.
    Always503,
    /// Answers 200, then breaks the body.
    BrokenBody,
    /// Answers 200 at once, then sends its body a byte every 100 ms (about 2 s).
    Trickling,
}

/// `n` GETs to the Service at `rate` a second, whatever the answers (an open loop, as
/// clients arrive), each given up after `patience`: how many got a whole 200.
/// `n` GETs at `rate` a second, each given up after `patience`: the 200s, and the
/// longest any call took.
async fn load(pod: &Pod, n: usize, rate: u32, patience: Duration) -> (usize, Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut calls = Vec::with_capacity(n);
    for _ in 0..n {
        tick.tick().await;
        let pod = Pod::borrowed(pod.name.clone(), pod.ip);
        calls.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let answer = tokio::time::timeout(patience, call(&pod, http::Method::GET)).await;
            (matches!(answer, Ok(Ok((200, _, _)))), started.elapsed())
        }));
    }
    let (mut ok, mut longest) = (0, Duration::ZERO);
    for c in calls {
        let (good, took) = c.await.expect("a call");
        ok += usize::from(good);
        longest = longest.max(took);
    }
    (ok, longest)
}

/// Issue 12: failures recorded no latency, so a dead endpoint's estimate decayed toward
/// zero and power of two choices was drawn to it: with one refusing endpoint of three,
/// ≈ 65 % of requests failed; with timeouts and retries set, a hung one took most first
/// attempts and the budget ran out (34 % failed).
/// Returns the 200s among the counted requests, and their number.
async fn one_bad_endpoint_of_three(fault: Fault, policy: bool) -> (usize, usize) {
    let bins = Binaries::new();
    let name = format!("{fault:?}-{policy}");
    let documented = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples/traffic-policy.yaml"),
    )
    .expect("the documented TrafficPolicy");
    let files = [("policy.yaml", documented)];
    let web = ("web", "10.96.0.10", &[0, 1, 2][..], &[][..]);
    let files = if policy { &files[..] } else { &[][..] };
    let s = Setup::launch(&bins, &name, &[web], files).await;
    match fault {
        Fault::Refusing => s.faults[0].close(),
        Fault::Hung => s.faults[0].delay_ms.store(3_600_000, Relaxed),
        Fault::Always503 => s.faults[0].status.store(503, Relaxed),
        Fault::BrokenBody => s.faults[0].break_body.store(true, Relaxed),
        Fault::Trickling => s.faults[0].trickle_ms.store(100, Relaxed),
    }
    // The first second is the balancer's to learn; then five seconds are counted.
    let patience = Duration::from_secs(if matches!(fault, Fault::Trickling) {
        10
    } else {
        3
    });
    let rss_before = s.proxy.rss_kib();
    let (_, learning) = load(s.client(), 200, 200, patience).await;
    let before = s.faults[0].gets.load(Relaxed);
    const COUNTED: usize = 1000;
    let (ok, counted) = load(s.client(), COUNTED, 200, patience).await;
    // The longest call, learning included: that is when the bad endpoint is tried.
    let longest = learning.max(counted);
    let sent = s.faults[0].gets.load(Relaxed) - before;
    let rss_after = s.proxy.rss_kib();
    eprintln!(
        "{fault:?}, policy {policy}: {ok} of {COUNTED} succeeded, {sent} sent to it; \
         the longest took {longest:?}; the client's proxy {rss_before} -> {rss_after} KiB"
    );
    // Memory stays bounded: a bad endpoint leaves nothing piling up in the proxy.
    assert!(
        rss_after < rss_before + 8 * 1024,
        "{fault:?}, policy {policy}: the proxy grew from {rss_before} to {rss_after} KiB"
    );
    // With the documented policy, no request outlasts its 2 s request timeout (a
    // trickling answer's headers come at once; its body is the app's business).
    if policy && !matches!(fault, Fault::Trickling) {
        assert!(
            longest < Duration::from_millis(2_500),
            "{fault:?}: a request took {longest:?} under a 2 s request timeout"
        );
    }
    // Once it has failed, it is left alone: a failure's cost no longer fades to nothing
    // within seconds (at most one probe in the counted load). A trickling endpoint
    // fails nothing, but each answer it owes is a request still in flight: it gets
    // little (a third would be its share).
    let most = if matches!(fault, Fault::Trickling) {
        COUNTED / 20
    } else {
        1
    };
    assert!(
        sent as usize <= most,
        "{fault:?}, policy {policy}: the bad endpoint was sent {sent} of {COUNTED}"
    );
    // Each request the hung endpoint held ran into the policy's per-try timeout and
    // was counted as one, by its route (issue 15).
    if matches!(fault, Fault::Hung) && policy {
        let held = s.faults[0].gets.load(Relaxed);
        let text = metrics(s.client()).await;
        let per_try = [
            ("target", "web.shop:80"),
            ("route_name", ""),
            ("backend", "web.shop:80"),
            ("timeout", "per_try"),
        ];
        let timed_out = sample(&text, "remora_http_timeouts_total", &per_try);
        eprintln!("{held} requests held by the hung endpoint, {timed_out} per-try timeouts");
        assert!(held >= 1, "the hung endpoint was never tried");
        assert_eq!(timed_out, held as f64, "{text}");
    }
    (ok, COUNTED)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_endpoint_is_shunned_with_or_without_a_policy() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    for (policy, want) in [(false, 990), (true, 999)] {
        let (ok, n) = one_bad_endpoint_of_three(Fault::Refusing, policy).await;
        assert!(ok >= want, "policy {policy}: {ok} of {n} succeeded");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_is_shunned_with_or_without_a_policy() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    for (policy, want) in [(false, 990), (true, 999)] {
        let (ok, n) = one_bad_endpoint_of_three(Fault::Hung, policy).await;
        assert!(ok >= want, "policy {policy}: {ok} of {n} succeeded");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_failing_endpoint_is_shunned_with_or_without_a_policy() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    for fault in [Fault::Always503, Fault::BrokenBody] {
        for (policy, want) in [(false, 990), (true, 999)] {
            let (ok, n) = one_bad_endpoint_of_three(fault, policy).await;
            assert!(
                ok >= want,
                "{fault:?}, policy {policy}: {ok} of {n} succeeded"
            );
        }
    }
    Ok(())
}

/// Issue 17: an endpoint that answers at once and then trickles its body (a byte every
/// 100 ms) costs no request, and the balancer sends it little.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_endpoint_fails_nothing_and_gets_little() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    for policy in [false, true] {
        let (ok, n) = one_bad_endpoint_of_three(Fault::Trickling, policy).await;
        assert_eq!(ok, n, "policy {policy}: {ok} of {n} succeeded");
    }
    Ok(())
}

/// Issue 12: an endpoint that answered 200 and then broke the body was never ejected
/// (0 ejections, 420 failures with the breaker on): its success was counted at the
/// headers. Round robin takes latency out of the picture; the breaker alone acts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_broken_after_its_headers_ejects_its_endpoint() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let policy = "  loadBalancer: {algorithm: RoundRobin}\n  circuitBreaker: {consecutiveFailures: 3, baseEjectionTime: 60s}\n";
    let s = Setup::start(&bins, "broken-body", Some(policy)).await;
    s.faults[0].break_body.store(true, Relaxed);
    let mut results = Vec::new();
    for _ in 0..90 {
        results.push(
            call(s.client(), http::Method::GET)
                .await
                .map(|r| r.0)
                .unwrap_or(0),
        );
    }
    let broken = s.faults[0].gets.load(Relaxed);
    assert!(
        broken <= 4,
        "the broken endpoint was sent {broken} requests: {results:?}"
    );
    let text = metrics(s.client()).await;
    let target = [("target", "web.shop:80")];
    assert_eq!(
        sample(&text, "remora_endpoint_ejections_total", &target),
        1.0,
        "{text}"
    );
    let failures = [("target", "web.shop:80"), ("classification", "failure")];
    assert_eq!(
        sample(&text, "remora_http_responses_total", &failures),
        broken as f64,
        "each broken response counts as a failure: {text}"
    );
    Ok(())
}
