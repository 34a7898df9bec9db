//! Issue 15: the metrics as tools nobody here wrote read them, on the harness's mesh
//! (`remora_tests::mesh`: a controller and three meshed pods, mTLS between them).
//!
//! After known traffic — successes, failures, slow requests and requests the policy
//! refuses — both proxies' and the controller's expositions parse with a strict
//! OpenMetrics parser (PyPI `prometheus-client`) and pass `promtool check metrics`, and
//! a real Prometheus server (Debian's `prometheus`) scraping the pods answers PromQL for
//! the request count, the success rate and latency quantiles with what the traffic
//! implies.

use std::{
    io::Write,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use http::Request;
use remora_tests::{
    Binaries, Pod, client, e2e_enabled,
    mesh::{CLUSTER_IP, Mesh, ROLES, WEB_IP, allow_only, spiffe},
    write_atomically,
};
use serde::Deserialize;

const FRONTEND_IP: &str = ROLES[0].1;
const CONTROLLER_ADMIN: &str = "10.77.0.100:9990";
/// Where Prometheus listens, inside the controller's pod (unmeshed).
const PROMETHEUS: &str = "127.0.0.1:9091";

/// A second Service over `web`'s pod, and an HTTPRoute splitting `web`'s requests
/// marked `x-split: yes` 1:3 between the two, marking their responses.
const SPLIT: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web-v2, namespace: shop}\n\
spec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {name: web-v2-1, namespace: shop, labels: {kubernetes.io/service-name: web-v2}}\n\
addressType: IPv4\nports: [{name: http, port: 8080}]\n\
endpoints: [{addresses: [\"10.77.0.11\"], conditions: {ready: true}}]\n---\n\
apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
metadata: {name: web-split, namespace: shop}\n\
spec:\n\
\x20 parentRefs: [{kind: Service, group: \"\", name: web, port: 80}]\n\
\x20 rules:\n\
\x20 - matches: [{headers: [{name: x-split, value: \"yes\"}]}]\n\
\x20   filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-routed, value: split}]}}]\n\
\x20   backendRefs: [{name: web, port: 80, weight: 1}, {name: web-v2, port: 80, weight: 3}]\n";

/// `GET /hello` marked for the split, from `pod`: whether the route took it.
async fn routed(pod: &Pod) -> anyhow::Result<bool> {
    let addr: SocketAddr = CLUSTER_IP.parse()?;
    let mut sender = client::http1(pod, addr).await?;
    let req = Request::get("/hello")
        .header("host", "web.shop.svc.cluster.local")
        .header("x-split", "yes")
        .body(client::empty())?;
    let rsp = sender.send_request(req).await?;
    anyhow::ensure!(rsp.status() == 200, "{}", rsp.status());
    Ok(rsp.headers().get("x-routed").is_some_and(|v| v == "split"))
}

/// `GET path` on the Service from `pod`: the status.
async fn call(pod: &Pod, path: &str) -> anyhow::Result<u16> {
    let addr: SocketAddr = CLUSTER_IP.parse()?;
    let mut sender = client::http1(pod, addr).await?;
    let req = Request::get(path)
        .header("host", "web.shop.svc.cluster.local")
        .body(client::empty())?;
    Ok(sender.send_request(req).await?.status().as_u16())
}

/// What Prometheus' scrapes send.
const OPENMETRICS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `GET /metrics` on an admin address from `pod`, with `accept` if given: the content
/// type and the body.
async fn scrape(
    pod: &Pod,
    addr: SocketAddr,
    accept: Option<&str>,
) -> anyhow::Result<(String, String)> {
    let mut sender = client::http1(pod, addr).await?;
    let mut req = Request::get("/metrics").header("host", addr.to_string());
    if let Some(accept) = accept {
        req = req.header("accept", accept);
    }
    let rsp = sender.send_request(req.body(client::empty())?).await?;
    anyhow::ensure!(rsp.status() == 200, "{addr}: {}", rsp.status());
    let content_type = rsp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = http_body_util::BodyExt::collect(rsp.into_body())
        .await?
        .to_bytes();
    Ok((content_type, String::from_utf8(body.to_vec())?))
}

/// Runs `program args` with `input` on stdin: (succeeded, stdout + stderr).
fn pipe(program: &str, args: &[&str], input: &str, install: &str) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("`{program}` cannot run ({e}): {install}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The families the strict OpenMetrics parser read from `text`; panics with its error.
fn openmetrics_families(what: &str, text: &str) -> Vec<(String, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("metrics/openmetrics.py");
    let (ok, out) = pipe(
        "python3",
        &[script.to_str().expect("utf-8 path")],
        text,
        "pip install prometheus-client (.ci/run does)",
    );
    assert!(
        ok,
        "{what}: the strict OpenMetrics parser refused it:\n{out}\n{text}"
    );
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

/// `promtool check metrics`: no error and no lint warning.
fn promtool_check(what: &str, text: &str) {
    let (ok, out) = pipe(
        "promtool",
        &["check", "metrics"],
        text,
        "apt-get install prometheus (.ci/run does)",
    );
    assert!(
        ok && out.trim().is_empty(),
        "{what}: promtool check metrics found problems:\n{out}"
    );
}

/// A Prometheus server in `pod`, scraping every second, stopped on drop.
struct Prometheus {
    _child: remora_tests::Reaped,
}

impl Prometheus {
    /// Starts Prometheus with `scrape_configs` (JSON, which is YAML too), every second.
    fn start(pod: &Pod, dir: &Path, scrape_configs: serde_json::Value) -> Self {
        std::fs::create_dir_all(dir).expect("prometheus folder");
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": scrape_configs,
        });
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config.to_string()).expect("write prometheus.yml");
        let child = pod
            .command("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log file"))
            .spawn()
            .expect("prometheus: apt-get install prometheus (.ci/run does)");
        Self {
            _child: remora_tests::Reaped(child),
        }
    }

    /// Every series an instant PromQL query returns (none while Prometheus is not
    /// answering yet); panics if Prometheus refuses the query.
    fn series(pod: &Pod, promql: &str) -> Vec<serde_json::Value> {
        let out = pod
            .command("curl")
            .args(["-s", "--max-time", "5", "--data-urlencode"])
            .arg(format!("query={promql}"))
            .arg(format!("http://{PROMETHEUS}/api/v1/query"))
            .output()
            .expect("curl: apt-get install curl");
        let Ok(body) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            return Vec::new();
        };
        assert_eq!(body["status"], "success", "{promql}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The value of an instant PromQL query returning one sample; None while it
    /// returns none.
    fn query(pod: &Pod, promql: &str) -> Option<f64> {
        let result = Self::series(pod, promql);
        assert!(
            result.len() <= 1,
            "{promql}: more than one series: {result:?}"
        );
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Polls `promql` for up to 20 s until `want` accepts its value; panics with the
    /// last value otherwise.
    fn eventually(pod: &Pod, promql: &str, want: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = Self::query(pod, promql);
            if let Some(v) = got.filter(|v| want(*v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "{promql}: got {got:?}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_promtool_and_a_strict_parser_read_what_the_traffic_implies()
-> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mesh = Mesh::start(&bins, "24h").await;
    write_atomically(&mesh.objects, "policy.yaml", &allow_only("frontend"));
    let (frontend, other, ctl) = (
        mesh.cluster.pod("frontend"),
        mesh.cluster.pod("other"),
        mesh.cluster.pod("ctl"),
    );
    let frontend_admin = format!("{FRONTEND_IP}:4191");
    let web_admin = format!("{WEB_IP}:4191");
    // The proxies as the chart's PodMonitor would have Prometheus scrape them: the
    // labels the Operator adds (namespace, pod), the Kubernetes metadata its relabelings
    // read, and those relabelings themselves, taken from the rendered chart.
    let proxy_target = |admin: &str, pod: &Pod, kind: &str, owner: &str| {
        serde_json::json!({"targets": [admin], "labels": {
            "namespace": "shop",
            "pod": pod.name,
            "__meta_kubernetes_pod_name": pod.name,
            "__meta_kubernetes_pod_controller_kind": kind,
            "__meta_kubernetes_pod_controller_name": owner,
        }})
    };
    let prometheus = Prometheus::start(
        ctl,
        &bins.dir().join("prometheus"),
        serde_json::json!([
            {
                "job_name": "remora-proxy",
                "static_configs": [
                    proxy_target(&frontend_admin, frontend, "ReplicaSet", "frontend-7d4b9c8f6"),
                    proxy_target(&web_admin, mesh.cluster.pod("web"), "StatefulSet", "web"),
                ],
                "relabel_configs": chart_relabelings(),
            },
            {
                "job_name": "remora-controller",
                "static_configs": [{"targets": [CONTROLLER_ADMIN], "labels": {
                    "namespace": "remora-system", "pod": "remora-controller-0",
                }}],
            },
        ]),
    );
    Prometheus::eventually(ctl, "count(up == 1)", |v| v == 3.0);

    // The policy is in force once `other` is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(other, "/hello").await? != 403 {
        assert!(Instant::now() < deadline, "the policy never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The traffic: 30 successes, 10 failures and 5 slow successes from frontend; 5
    // more refusals for other.
    for _ in 0..30 {
        assert_eq!(call(frontend, "/hello").await?, 200);
    }
    for _ in 0..10 {
        assert_eq!(call(frontend, "/status?code=500").await?, 500);
    }
    for _ in 0..5 {
        assert_eq!(call(frontend, "/slow?ms=300").await?, 200);
    }
    for _ in 0..5 {
        assert_eq!(call(other, "/hello").await?, 403);
    }

    // Every exposition, in both formats: OpenMetrics as a strict parser reads it, the
    // text format as promtool does, with the same families.
    for (what, admin) in [
        ("frontend's proxy", frontend_admin.as_str()),
        ("web's proxy", web_admin.as_str()),
        ("the controller", CONTROLLER_ADMIN),
    ] {
        let addr: SocketAddr = admin.parse()?;
        let (content_type, openmetrics) = scrape(ctl, addr, Some(OPENMETRICS_ACCEPT)).await?;
        assert!(
            content_type.starts_with("application/openmetrics-text; version=1.0.0"),
            "{what}: {content_type}"
        );
        let families = openmetrics_families(what, &openmetrics);
        assert!(families.len() >= 10, "{what}: only {families:?} were read");
        let (content_type, text) = scrape(ctl, addr, None).await?;
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{what}: {content_type}"
        );
        promtool_check(what, &text);
        // Each family under the name and type the text format gives it.
        for (family, kind) in &families {
            let line = match kind.as_str() {
                "counter" => format!("\n# TYPE {family}_total counter\n"),
                "info" => format!("\n# TYPE {family}_info gauge\n"),
                "unknown" => format!("\n# TYPE {family} untyped\n"),
                other => format!("\n# TYPE {family} {other}\n"),
            };
            assert!(
                text.contains(&line),
                "{what}: {family} ({kind}) is missing from the text format:\n{text}"
            );
        }
    }

    // What Prometheus answers, from the two proxies' own counts.
    let out = format!("instance=\"{frontend_admin}\", direction=\"outbound\"");
    let requests = format!("sum(remora_http_requests_total{{{out}}})");
    Prometheus::eventually(ctl, &requests, |v| v == 45.0);
    let success = format!(
        "sum(remora_http_responses_total{{{out}, classification=\"success\"}}) \
         / sum(remora_http_responses_total{{{out}}})"
    );
    Prometheus::eventually(ctl, &success, |v| (v - 35.0 / 45.0).abs() < 1e-9);
    let quantile = |q: f64| {
        format!(
            "histogram_quantile({q}, sum by (le) \
             (remora_http_response_duration_seconds_bucket{{{out}}}))"
        )
    };
    // 40 of 45 answered at once, 5 after 300 ms: the median is fast, p99 is slow.
    let p50 = Prometheus::eventually(ctl, &quantile(0.5), |v| v > 0.0);
    assert!(p50 < 0.1, "p50 {p50}");
    let p99 = Prometheus::eventually(ctl, &quantile(0.99), |v| v > 0.0);
    assert!(
        (0.25..=0.5).contains(&p99),
        "p99 {p99}: the slow calls' bucket"
    );
    // web saw frontend's 45 by its identity, and refused other's.
    let inbound = format!(
        "instance=\"{web_admin}\", direction=\"inbound\", peer_identity=\"{}\"",
        spiffe("frontend")
    );
    Prometheus::eventually(
        ctl,
        &format!("sum(remora_http_responses_total{{{inbound}, classification=\"failure\"}})"),
        |v| v == 10.0,
    );
    // ... each counted under the AuthorizationPolicy that judged it.
    Prometheus::eventually(
        ctl,
        &format!(
            "sum(remora_authz_denied_total{{instance=\"{web_admin}\", \
             authz_name=\"shop/web-callers\", peer_identity=\"{}\"}})",
            spiffe("other")
        ),
        |v| v >= 5.0,
    );
    Prometheus::eventually(
        ctl,
        &format!("sum(remora_http_responses_total{{{inbound}, authz_name=\"shop/web-callers\"}})"),
        |v| v == 45.0,
    );
    Prometheus::eventually(
        ctl,
        "sum(remora_controller_certify_total{result=\"issued\"})",
        |v| v >= 3.0,
    );
    // Requests no route matched went to web, and say so.
    let unrouted = format!("{out}, route_name=\"\", route_namespace=\"\"");
    Prometheus::eventually(
        ctl,
        &format!("sum(remora_http_responses_total{{{unrouted}, backend=\"web.shop:80\"}})"),
        |v| v == 45.0,
    );

    // A weighted HTTPRoute (1:3 between web and web-v2, a second Service over the same
    // pod) for requests marked `x-split: yes`: the per-backend split is one query.
    write_atomically(&mesh.objects, "split.yaml", SPLIT);
    // Every request the route took counts, the probes that found it in force included:
    // each was split like the rest.
    let mut taken = 0u32;
    let deadline = Instant::now() + Duration::from_secs(10);
    while taken == 0 {
        assert!(Instant::now() < deadline, "the HTTPRoute never applied");
        taken += u32::from(routed(frontend).await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..200 {
        assert!(routed(frontend).await?, "a request the route did not take");
        taken += 1;
    }
    let n = f64::from(taken);
    let split = |backend: &str| {
        format!(
            "sum(remora_http_responses_total{{{out}, route_name=\"web-split\", \
             route_namespace=\"shop\", backend=\"{backend}\"}})"
        )
    };
    let total = format!("sum(remora_http_responses_total{{{out}, route_name=\"web-split\"}})");
    Prometheus::eventually(ctl, &total, |v| v == n);
    let to_web = Prometheus::query(ctl, &split("web.shop:80")).unwrap_or(0.0);
    let to_v2 = Prometheus::query(ctl, &split("web-v2.shop:80")).unwrap_or(0.0);
    assert_eq!(to_web + to_v2, n, "web {to_web}, web-v2 {to_v2}");
    // A quarter to web: the bounds are more than 5 standard deviations wide.
    let (expected, sd) = (n / 4.0, (n * 0.25 * 0.75).sqrt());
    assert!(
        (to_web - expected).abs() <= 5.0 * sd + 1.0,
        "web {to_web}, web-v2 {to_v2} of {n}"
    );

    // The controller counted what its source reported: the pods, and the route.
    Prometheus::eventually(
        ctl,
        "sum(remora_controller_watch_events_total{kind=\"HTTPRoute\", event=\"apply\"})",
        |v| v >= 1.0,
    );
    Prometheus::eventually(
        ctl,
        "sum(remora_controller_watch_events_total{kind=\"Pod\", event=\"apply\"})",
        |v| v >= 3.0,
    );

    // The chart's relabelings name each proxy's workload.
    for workload in ["frontend", "web"] {
        let q = format!("count(remora_build_info{{workload=\"{workload}\"}})");
        Prometheus::eventually(ctl, &q, |v| v == 1.0);
    }
    // Every query of the Grafana dashboard runs and returns series, and every metric
    // and label it names exists, with a value, in what Prometheus scraped.
    let dashboard = dashboard_queries();
    assert!(dashboard.len() >= 20, "{dashboard:?}");
    for expr in &dashboard {
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("$namespace", ".*");
        // (A rate needs two scrapes of a series; the newest are seconds old.)
        let deadline = Instant::now() + Duration::from_secs(10);
        while Prometheus::series(ctl, &promql).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the dashboard's {expr} returns nothing"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let (metrics, labels) = names_in(&promql);
        assert!(!metrics.is_empty(), "{expr} names no metric");
        for label in labels {
            let present = metrics.iter().any(|m| {
                let q = format!("count({{__name__=\"{m}\", {label}!=\"\"}})");
                Prometheus::query(ctl, &q).is_some()
            });
            assert!(present, "{expr}: no series of {metrics:?} has `{label}`");
        }
    }
    drop(prometheus);
    Ok(())
}

/// The relabelings of the chart's PodMonitor, as `helm template` renders them, in
/// Prometheus' own spelling (the Operator's `sourceLabels` is `source_labels`).
fn chart_relabelings() -> serde_json::Value {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/remora");
    let out = Command::new("helm")
        .args([
            "template",
            "remora",
            "--set",
            "monitoring.podMonitor.enabled=true",
        ])
        .arg(&chart)
        .output()
        .expect("helm: .ci/run installs it");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let monitor = serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|d| serde_yaml_ng::Value::deserialize(d).ok())
        .find(|d| d["kind"].as_str() == Some("PodMonitor"))
        .expect("the chart renders a PodMonitor");
    let relabelings = &monitor["spec"]["podMetricsEndpoints"][0]["relabelings"];
    let json = serde_json::to_value(relabelings).expect("YAML as JSON");
    let snake = |key: &str| {
        key.chars()
            .flat_map(|c| {
                let lower = c.to_ascii_lowercase();
                (c.is_ascii_uppercase().then_some('_').into_iter()).chain([lower])
            })
            .collect::<String>()
    };
    let rules: Vec<serde_json::Value> = json
        .as_array()
        .expect("relabelings are a list")
        .iter()
        .map(|rule| {
            let fields = rule.as_object().expect("a relabeling is a map");
            serde_json::Value::Object(fields.iter().map(|(k, v)| (snake(k), v.clone())).collect())
        })
        .collect();
    assert!(!rules.is_empty(), "no relabelings in {monitor:?}");
    serde_json::Value::Array(rules)
}

/// Every PromQL expression of `deploy/grafana/remora.json`, rows' panels included.
fn dashboard_queries() -> Vec<String> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/remora.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("the dashboard"))
            .expect("JSON");
    fn walk(panels: &serde_json::Value, out: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(
                    target["expr"]
                        .as_str()
                        .expect("a target's expr")
                        .to_string(),
                );
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    // The namespace picker: `label_values(metric, label)` is Grafana's, as PromQL.
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(q) = var["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .expect("label_values(metric, label)");
            let (metric, label) = inner.split_once(',').expect("metric, label");
            out.push(format!("count by ({}) ({})", label.trim(), metric.trim()));
        }
    }
    out
}

/// The metric names (`remora_*`, `process_*`) and label names an expression uses: in
/// matchers, and in `by`, `without`, `on`, `ignoring`, `group_left` and `group_right`.
fn names_in(promql: &str) -> (Vec<String>, Vec<String>) {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut metrics = Vec::new();
    let mut labels = Vec::new();
    let push = |v: &mut Vec<String>, s: &str| {
        if !s.is_empty() && !v.iter().any(|x| x == s) {
            v.push(s.to_string());
        }
    };
    let bytes: Vec<char> = promql.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word: String = bytes[start..i].iter().collect();
            let rest: String = bytes[i..].iter().collect();
            let rest = rest.trim_start();
            if word.starts_with("remora_") || word.starts_with("process_") {
                push(&mut metrics, &word);
            } else if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&word.as_str())
                && rest.starts_with('(')
            {
                let list = &rest[1..rest.find(')').expect("a closing parenthesis")];
                for l in list.split(',') {
                    push(&mut labels, l.trim());
                }
            }
            continue;
        }
        if bytes[i] == '{' {
            let close = bytes[i..]
                .iter()
                .position(|c| *c == '}')
                .expect("a closing brace")
                + i;
            let inside: String = bytes[i + 1..close].iter().collect();
            // `name op "value"` pairs; values are quoted and contain no commas here.
            for matcher in inside.split(',') {
                let name: String = matcher.trim().chars().take_while(|c| ident(*c)).collect();
                if name != "__name__" {
                    push(&mut labels, &name);
                }
            }
            i = close + 1;
            continue;
        }
        if bytes[i] == '"' {
            // Skip a string: a label value is not a name.
            i += 1;
            while i < bytes.len() && bytes[i] != '"' {
                i += 1;
            }
        }
        i += 1;
    }
    (metrics, labels)
}

/// Requests from frontend to the Service until stopped (at most 20,000): `/hello`, and
/// with `fail_every` = n, every nth a `/status?code=500`.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u32>,
}

impl Traffic {
    fn start(frontend: &Pod, fail_every: Option<u32>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, frontend) = (
            stop.clone(),
            Pod::borrowed(frontend.name.clone(), frontend.ip),
        );
        let task = tokio::spawn(async move {
            let mut sent = 0u32;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && sent < 20_000 {
                let fails = fail_every.is_some_and(|n| sent % n == n - 1);
                let (path, want) = match fails {
                    true => ("/status?code=500", 500),
                    false => ("/hello", 200),
                };
                assert_eq!(call(&frontend, path).await.expect("a call"), want);
                sent += 1;
            }
            sent
        });
        Self { stop, task }
    }

    /// Stops it: how many requests were sent.
    async fn stop(self) -> anyhow::Result<u32> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// The `remora` CLI with `args`, in `pod`: its standard output, or its exit status and
/// standard error.
fn remora(pod: &Pod, args: &[&str]) -> Result<String, String> {
    let out = pod
        .command(remora_tests::remora_cli().to_str().expect("utf-8 path"))
        .args(args)
        .output()
        .expect("the remora CLI runs (cargo build --workspace --bins)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `remora stat` reads the same proxies a user would point it at, while traffic flows:
/// three successes to one failure, all over mTLS, give a success rate near 75 % and an
/// mTLS share of 100 % for the Service called and for the workload serving it. Then
/// `remora diagnose` shows, from inside the pods, the destination, its endpoint and
/// identity, the inbound policy in force and the configuration; off the pod it is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remora_stat_and_diagnose_see_the_traffic_and_why_it_went_where_it_did()
-> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mesh = Mesh::start(&bins, "24h").await;
    let (frontend, ctl) = (mesh.cluster.pod("frontend"), mesh.cluster.pod("ctl"));
    let traffic = Traffic::start(frontend, Some(4));
    // Traffic first, so the window sees it from end to end.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let frontend_admin = format!("frontend={FRONTEND_IP}:4191");
    let web_admin = format!("web={WEB_IP}:4191");
    let out = tokio::task::block_in_place(|| {
        remora(
            ctl,
            &[
                "stat",
                &frontend_admin,
                &web_admin,
                "--window",
                "2s",
                "-o",
                "json",
            ],
        )
    });
    let sent = traffic.stop().await?;
    let out = out.map_err(anyhow::Error::msg)?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(out.trim())?;
    let row = |kind: &str, name: &str| {
        rows.iter()
            .find(|r| r["kind"] == kind && r["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} row {name} in {out}"))
            .clone()
    };
    for r in [row("service", "web.shop:80"), row("workload", "web")] {
        let n = r["responses"].as_u64().expect("responses");
        assert!(n >= 40, "too few in the window to judge ({sent} sent): {r}");
        let rate = r["success_rate"].as_f64().expect("a success rate");
        // Three of four succeed; the window may cut the pattern at either end.
        assert!((rate - 0.75).abs() <= 2.0 / n as f64 + 1e-9, "{r}");
        assert_eq!(r["mtls_share"].as_f64(), Some(1.0), "{r}");
        assert!(r["rps"].as_f64().expect("rps") > 10.0, "{r}");
        let (p50, p99) = (
            r["p50"].as_f64().expect("p50"),
            r["p99"].as_f64().expect("p99"),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 < 1.0, "{r}");
    }
    assert!(
        !rows
            .iter()
            .any(|r| r["kind"] == "workload" && r["name"] == "frontend"),
        "frontend serves nothing: {out}"
    );

    // A proxy that does not answer is named, and nothing is printed.
    let err = tokio::task::block_in_place(|| {
        remora(ctl, &["stat", "10.77.0.99:4191", "--window", "100ms"])
    })
    .expect_err("an unreachable proxy fails");
    assert!(err.contains("10.77.0.99:4191"), "{err}");

    // `remora diagnose`, in the pod: where frontend's proxy sends web's requests, and
    // why (the endpoint, its identity, its state).
    let web = mesh.cluster.pod("web");
    let out = tokio::task::block_in_place(|| remora(frontend, &["diagnose", "endpoints"]))
        .map_err(anyhow::Error::msg)?;
    // The policy in force, with the revision of the controller's answer.
    let line = out
        .lines()
        .find(|l| l.starts_with("service web.shop:80"))
        .unwrap_or_else(|| panic!("web.shop:80 in:\n{out}"));
    let revision = line
        .split_once(" @")
        .and_then(|(_, r)| r.split(',').next())
        .unwrap_or_else(|| panic!("a policy revision in {line}"));
    assert!(
        revision.len() == 16 && revision.chars().all(|c| c.is_ascii_hexdigit()),
        "{line}"
    );
    for want in [
        "service web.shop:80 [10.96.0.10:80]".to_string(),
        format!("{WEB_IP}:8080"),
        spiffe("web"),
        "ready".into(),
    ] {
        assert!(out.contains(&want), "{want} in:\n{out}");
    }
    let json = tokio::task::block_in_place(|| {
        remora(
            frontend,
            &["diagnose", "endpoints", "127.0.0.1", "-o", "json"],
        )
    })
    .map_err(anyhow::Error::msg)?;
    let targets: serde_json::Value = serde_json::from_str(&json)?;
    let service = targets
        .as_array()
        .and_then(|t| t.iter().find(|t| t["service"] == "web.shop:80"))
        .unwrap_or_else(|| panic!("web.shop:80 in {json}"));
    assert_eq!(service["endpoints"][0]["ejected"], false, "{service}");
    assert!(
        service["endpoints"][0]["latency_ms"].as_f64().is_some(),
        "{service}"
    );
    // Every request rode one multiplexed mTLS connection to web.
    assert_eq!(
        service["endpoints"][0]["pool"]["connections"].as_u64(),
        Some(1),
        "{service}"
    );
    let out = tokio::task::block_in_place(|| remora(web, &["diagnose", "policy"]))
        .map_err(anyhow::Error::msg)?;
    assert!(
        out.contains("every other port:"),
        "an answer in force:\n{out}"
    );
    // frontend's requests, each allowed on web's port 8080.
    let allowed = out
        .lines()
        .find_map(|l| l.strip_prefix("decided on 8080: 0 connections allowed, 0 denied; "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("8080's decisions in:\n{out}"));
    assert!(
        allowed >= sent / 2,
        "{allowed} of {sent} requests allowed:\n{out}"
    );
    let out = tokio::task::block_in_place(|| remora(web, &["diagnose", "config"]))
        .map_err(anyhow::Error::msg)?;
    assert!(out.contains("REMORA_WORKER_THREADS=1 (default)"), "{out}");
    // Off the pod, the /debug pages are refused.
    let err = tokio::task::block_in_place(|| {
        remora(
            ctl,
            &["diagnose", "endpoints", &format!("{FRONTEND_IP}:4191")],
        )
    })
    .expect_err("refused off the pod");
    assert!(err.contains("only allowed from loopback"), "{err}");
    Ok(())
}

/// An app that talks to 20,000 distinct destinations the mesh does not know (closed
/// ports of an unmeshed pod): each is one more `target="passthrough"` connection, not a
/// series of its own, so `/metrics` stays the size it was after the first hundred; the
/// proxy holds at most its cap of destinations, and once the cap has been churned through
/// its memory stops growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_destinations_add_no_series_and_no_lasting_memory() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mesh = Mesh::start(&bins, "24h").await;
    let frontend = mesh.cluster.pod("frontend");
    // Requests to `ports`, 32 at a time. Nothing listens there: the app sees its
    // connection reset, as it would without the mesh (the proxy dials ahead for
    // destinations that are not Services), or the proxy's 502.
    let call_each = async |ports: std::ops::Range<u16>| -> anyhow::Result<()> {
        let ports: Vec<u16> = ports.collect();
        for chunk in ports.chunks(32) {
            let mut calls = tokio::task::JoinSet::new();
            for &port in chunk {
                let pod = Pod::borrowed(frontend.name.clone(), frontend.ip);
                calls.spawn(async move {
                    let addr = SocketAddr::new("10.77.0.100".parse().unwrap(), port);
                    client::get(&pod, addr, "/").await.map(|(status, _)| status)
                });
            }
            while let Some(called) = calls.join_next().await {
                match called? {
                    Ok(status) => assert_eq!(status, 502, "nothing listens there"),
                    Err(e) => assert!(
                        e.chain().any(|c| c
                            .downcast_ref::<std::io::Error>()
                            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset))
                            || e.to_string().contains("reset")
                            || e.to_string().contains("closed"),
                        "{e:#}"
                    ),
                }
            }
        }
        Ok(())
    };
    call_each(20_000..20_100).await?;
    let after_100 = client::get(frontend, "127.0.0.1:4191".parse()?, "/metrics")
        .await?
        .1;
    let rss_100 = mesh.proxies[0].rss_kib();
    call_each(20_100..30_000).await?;
    let after_10k = client::get(frontend, "127.0.0.1:4191".parse()?, "/metrics")
        .await?
        .1;
    // 10,000 destinations have replaced the 4,096 held more than twice over: what the
    // allocator keeps for a full table is in place, and RSS reads a steady state.
    let rss_10k = mesh.proxies[0].rss_kib();
    call_each(30_000..40_000).await?;
    let rss_20k = mesh.proxies[0].rss_kib();
    let targets = client::get(frontend, "127.0.0.1:4191".parse()?, "/debug/targets")
        .await?
        .1;
    let held = serde_json::from_str::<serde_json::Value>(&targets)?
        .as_array()
        .map(Vec::len)
        .unwrap_or_else(|| panic!("a list of destinations: {targets}"));

    let opened = |text: &str| {
        client::sample(
            text,
            "remora_tcp_connections_opened_total",
            &[("direction", "outbound"), ("target", "passthrough")],
        )
    };
    assert!(opened(&after_10k) >= 10_000.0, "{after_10k}");
    let series = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
    assert!(
        series(&after_10k) <= series(&after_100) + 10,
        "{} series after 100 destinations, {} after 10,000:\n{after_10k}",
        series(&after_100),
        series(&after_10k)
    );
    assert!(
        after_10k.len() <= after_100.len() + 2048,
        "/metrics grew from {} to {} bytes",
        after_100.len(),
        after_10k.len()
    );
    // Destinations are kept at most 4,096 at a time (each with its controller stream,
    // about 11 KiB), and 10,000 more past the cap cost nothing lasting: a leak of 1 KiB
    // per destination would add 10 MiB. (Measured from 5,000 instead, RSS still grew by
    // 1–8 MiB as the table's first churn settled; from 10,000 on it swings ±1 MiB.)
    let cap = remora_proxy::outbound::destination::MAX_DESTINATIONS;
    assert!(
        (cap / 2..=cap).contains(&held),
        "{held} destinations held, the cap {cap}: the latest kept, never more"
    );
    eprintln!(
        "RSS: {rss_100} KiB after 100 destinations, {rss_10k} after 10,000, {rss_20k} after 20,000; {held} held"
    );
    assert!(
        rss_20k <= rss_10k + 4 * 1024,
        "RSS grew from {rss_10k} KiB to {rss_20k} KiB past the destinations' cap"
    );
    Ok(())
}

/// `remora stat -n shop`: the meshed pods of a namespace, found and read through the
/// API server (its pod proxy, as `kubectl get --raw` would reach them), each named by
/// the workload that owns it. `remora diagnose … pod/NAME`: one pod's loopback-only
/// `/debug` pages, port-forwarded through the API server as `kubectl port-forward`
/// does; a pod that is missing, not meshed or not listening is said to be. `remora stat
/// --watch` follows the namespace's pods from window to window, as a rollout changes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remora_stat_and_diagnose_reach_pods_through_the_api_server() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mesh = Mesh::start(&bins, "24h").await;
    let (frontend, web, ctl) = (
        mesh.cluster.pod("frontend"),
        mesh.cluster.pod("web"),
        mesh.cluster.pod("ctl"),
    );
    let fake = remora_fake_kube::FakeApi::start().await;
    // The fake runs out here; the pods live in network namespaces: it reaches them
    // with sockets made in the controller's pod, on the same bridge, and a pod's
    // loopback (port forwarding) from inside that pod, as the kubelet does.
    let via = std::sync::Arc::new(Pod::borrowed(ctl.name.clone(), ctl.ip));
    let pods: std::sync::Arc<Vec<Pod>> = std::sync::Arc::new(
        [frontend, web, ctl]
            .iter()
            .map(|p| Pod::borrowed(p.name.clone(), p.ip))
            .collect(),
    );
    fake.set_pod_dialer(std::sync::Arc::new(move |pod_ip, addr| {
        let (via, pods) = (via.clone(), pods.clone());
        Box::pin(async move {
            match pods.iter().find(|p| p.ip == pod_ip) {
                Some(pod) if addr.ip().is_loopback() => pod.connect(addr).await,
                _ => via.connect(addr).await,
            }
        })
    }));
    let pod = |pod: &Pod, owner_kind: &str, owner: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": "shop",
                "labels": {"remora.io/meshed": "true"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner_kind,
                    "name": owner, "uid": format!("uid-{owner}"), "controller": true}]},
            "spec": {"containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": pod.ip.to_string()},
        })
    };
    fake.apply(pod(frontend, "StatefulSet", "frontend"));
    fake.apply(pod(web, "ReplicaSet", "web-5d9c7b8f4"));
    // The controller's pod runs no proxy; one labelled meshed by mistake has nothing
    // listening on 4191.
    let mut lost = pod(ctl, "ReplicaSet", "ctl-7c6b5");
    lost["metadata"]["namespace"] = "other".into();
    fake.apply(lost.clone());
    lost["metadata"]["labels"] = serde_json::json!({});
    lost["metadata"]["namespace"] = "shop".into();
    fake.apply(lost);
    let kubeconfig = bins.dir().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig("stat-token"))?;
    let cli = remora_tests::remora_cli();

    let traffic = Traffic::start(frontend, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stat = |namespace: &str| {
        let cli = cli.clone();
        let kubeconfig = kubeconfig.clone();
        let namespace = namespace.to_string();
        tokio::task::spawn_blocking(move || {
            Command::new(cli)
                .args(["stat", "-n", &namespace, "--window", "2s", "-o", "json"])
                .env("KUBECONFIG", kubeconfig)
                .output()
                .expect("the remora CLI runs")
        })
    };
    let out = stat("shop").await?;
    traffic.stop().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(stdout.trim())?;
    let row = |kind: &str, name: &str| {
        rows.iter()
            .find(|r| r["kind"] == kind && r["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} row {name} in {stdout}"))
    };
    // web serves, named by its Deployment (its ReplicaSet's name without the hash);
    // frontend only calls, so it has no workload row.
    for r in [row("workload", "web"), row("service", "web.shop:80")] {
        assert_eq!(r["success_rate"].as_f64(), Some(1.0), "{r}");
        assert_eq!(r["mtls_share"].as_f64(), Some(1.0), "{r}");
        assert!(r["responses"].as_u64().is_some_and(|n| n >= 20), "{r}");
    }
    assert!(
        !rows
            .iter()
            .any(|r| r["kind"] == "workload" && r["name"] != "web"),
        "{stdout}"
    );
    // A namespace with no meshed pods is said to be one.
    let out = stat("empty").await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no running meshed pods in empty"), "{err}");

    // `remora diagnose` by pod name, from out here: the /debug pages answer only the
    // pod's loopback, which port forwarding reaches.
    let diagnose = |args: &[&str]| {
        let out = Command::new(&cli)
            .arg("diagnose")
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .expect("the remora CLI runs");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match out.status.success() {
            true => Ok(text(&out.stdout)),
            false => Err(format!("{}: {}", out.status, text(&out.stderr))),
        }
    };
    let out = tokio::task::block_in_place(|| {
        diagnose(&["endpoints", &format!("pod/{}", frontend.name), "-n", "shop"])
    })
    .map_err(anyhow::Error::msg)?;
    for want in [
        "service web.shop:80 [10.96.0.10:80]".to_string(),
        format!("{WEB_IP}:8080"),
        spiffe("web"),
    ] {
        assert!(out.contains(&want), "{want} in:\n{out}");
    }
    // A bare name with -n is a pod too; JSON passes through.
    let json = tokio::task::block_in_place(|| {
        diagnose(&["policy", &web.name, "-n", "shop", "-o", "json"])
    })
    .map_err(anyhow::Error::msg)?;
    let policy: serde_json::Value = serde_json::from_str(&json)?;
    let allowed = policy["decided"]["8080"]["requests_allowed"].as_u64();
    assert!(allowed.is_some_and(|n| n >= 20), "{json}");
    // proxy-metrics passes the proxy's exposition through as it is.
    let metrics = tokio::task::block_in_place(|| {
        diagnose(&["proxy-metrics", &format!("pod/{}", web.name), "-n", "shop"])
    })
    .map_err(anyhow::Error::msg)?;
    let served = client::sample(
        &metrics,
        "remora_http_responses_total",
        &[("direction", "inbound"), ("classification", "success")],
    );
    assert!(served >= 20.0, "{served} responses in:\n{metrics}");
    // Prometheus' text format (the CLI asks for no other), whole: from the first family's
    // HELP to a last sample.
    let last = metrics.trim_end().lines().last().unwrap_or_default();
    assert!(
        metrics.starts_with("# HELP ")
            && last
                .rsplit_once(' ')
                .is_some_and(|(_, v)| v.parse::<f64>().is_ok()),
        "the exposition, whole:\n{metrics}"
    );
    // The namespace defaults to the kubeconfig's ("default"): no such pod there.
    for (args, want) in [
        (
            vec!["config".to_string(), format!("pod/{}", web.name)],
            format!("pod default/{}: no such pod", web.name),
        ),
        (
            vec![
                "config".into(),
                format!("pod/{}", ctl.name),
                "-n".into(),
                "shop".into(),
            ],
            format!("pod shop/{}: not meshed", ctl.name),
        ),
        (
            vec![
                "config".into(),
                format!("pod/{}", ctl.name),
                "-n".into(),
                "other".into(),
            ],
            format!("pod other/{}: error forwarding port 4191", ctl.name),
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = tokio::task::block_in_place(|| diagnose(&args))
            .expect_err("a pod with no proxy to ask fails");
        assert!(err.contains(&want), "{want} in: {err}");
    }

    // `--watch`: a table every window, over the namespace's pods as they are at each
    // window, as a rollout changes them. web's pod goes (its workload row with it); a
    // meshed pod that does not answer yet comes, and is told on standard error while the
    // windows go on.
    let traffic = Traffic::start(frontend, None);
    let mut watching = remora_tests::Reaped(
        Command::new(&cli)
            .args([
                "stat", "-n", "shop", "--watch", "--window", "1s", "-o", "json",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let (windows_tx, windows) = std::sync::mpsc::channel::<String>();
    let stdout = std::io::BufReader::new(watching.stdout.take().expect("piped"));
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in stdout.lines().map_while(Result::ok) {
            if windows_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_window = || -> anyhow::Result<Vec<serde_json::Value>> {
        let line = tokio::task::block_in_place(|| windows.recv_timeout(Duration::from_secs(15)))
            .map_err(|e| anyhow::anyhow!("no window printed: {e}"))?;
        Ok(serde_json::from_str(&line)?)
    };
    let has = |rows: &[serde_json::Value], kind: &str, name: &str| {
        rows.iter().any(|r| r["kind"] == kind && r["name"] == name)
    };
    let first = next_window()?;
    assert!(has(&first, "workload", "web"), "{first:?}");
    fake.delete("v1", "Pod", "shop", &web.name);
    let mut newcomer = pod(ctl, "ReplicaSet", "ctl-7c6b5");
    newcomer["metadata"]["name"] = "web-new".into();
    fake.apply(newcomer);
    // The window that spans the change still counts web (scraped at both ends); from
    // the next on, it is gone, while frontend's calls to web's Service are still seen.
    let mut later = Vec::new();
    for _ in 0..4 {
        let rows = next_window()?;
        let gone = !has(&rows, "workload", "web");
        later.push(rows);
        if gone {
            break;
        }
    }
    let last = later.last().expect("a window");
    assert!(!has(last, "workload", "web"), "web's pod left: {later:?}");
    assert!(has(last, "service", "web.shop:80"), "{last:?}");
    assert_eq!(
        watching.try_wait()?,
        None,
        "the watch goes on through the change"
    );
    watching.kill()?;
    let _ = watching.wait();
    let _ = reader.join();
    traffic.stop().await?;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut watching.stderr.take().expect("piped"), &mut stderr)?;
    assert!(
        stderr.contains("web-new"),
        "the pod that did not answer, named: {stderr}"
    );
    Ok(())
}
