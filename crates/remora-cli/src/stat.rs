//! `remora stat`: success rate, requests per second, latency quantiles and the share of
//! mTLS, per workload (what each proxy serves), per Service called, and per HTTPRoute
//! and backend — from two scrapes of the proxies' `/metrics` a window apart, with no
//! Prometheus. The arithmetic is Prometheus' own: counters' increase over the window,
//! and `histogram_quantile`'s linear interpolation within a bucket.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;

/// One sample of an exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// The samples of a text exposition (the Prometheus text format, or OpenMetrics: both
/// write samples as `name{label="value",...} value`). Comments and blank lines are
/// skipped; a line that is not a sample is an error naming it.
pub fn parse(text: &str) -> anyhow::Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_sample(line).with_context(|| format!("line {}: {line}", n + 1))?);
    }
    Ok(out)
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let name_end = line.find(['{', ' ']).context("no value")?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end = loop {
            // `}` or `label="value"` followed by `,` or `}`.
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            let Some(&(start, c)) = chars.peek() else {
                anyhow::bail!("unterminated labels");
            };
            if c == '}' {
                break start + 1;
            }
            let eq = inner[start..].find('=').context("a label without =")? + start;
            let key = inner[start..eq].trim().to_string();
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            anyhow::ensure!(
                chars.next().is_some_and(|(_, c)| c == '"'),
                "label {key}: a value must be quoted"
            );
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => anyhow::bail!("label {key}: unterminated value"),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => anyhow::bail!("label {key}: unterminated value"),
                }
            }
            labels.push((key, value));
        };
        rest = &inner[end..];
    }
    let value = rest
        .split_whitespace()
        .next()
        .context("no value")?
        .parse::<f64>()
        .context("the value is not a number")?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// The proxy's admin port (`REMORA_ADMIN_ADDR`'s default).
pub const ADMIN_PORT: u16 = 4191;

/// One proxy's exposition at one moment.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// Which proxy: its source's address (or `namespace/pod`).
    pub source: String,
    /// What the rows call this proxy's workload.
    pub workload: String,
    pub samples: Vec<Sample>,
}

/// A proxy to scrape: its admin address, and the workload it serves (`name=host:port`
/// names it; otherwise the address does); or, in a cluster, a meshed pod reached
/// through the API server's pod proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub workload: String,
    /// `host:port`, or `namespace/pod` for a pod.
    pub addr: String,
    /// (namespace, pod) when read through the API server.
    pub pod: Option<(String, String)>,
}

/// The meshed pods of `namespace` that are running, each named by its workload: the
/// Deployment (its ReplicaSet's name without the template hash), StatefulSet,
/// DaemonSet or Job that owns it, or the pod itself.
pub async fn cluster_sources(
    client: &kube::Client,
    namespace: &str,
) -> anyhow::Result<Vec<Source>> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&kube::api::ListParams::default().labels("remora.io/meshed=true"))
        .await
        .with_context(|| format!("listing the meshed pods of {namespace}"))?;
    let mut out = Vec::new();
    for pod in list.items {
        let running = pod
            .status
            .as_ref()
            .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some());
        let Some(name) = pod.metadata.name.clone().filter(|_| running) else {
            continue;
        };
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true));
        let workload = match owner {
            Some(o) if o.kind == "ReplicaSet" => o
                .name
                .rsplit_once('-')
                .map_or(o.name.clone(), |(d, _)| d.to_string()),
            Some(o) => o.name.clone(),
            None => name.clone(),
        };
        out.push(Source {
            workload,
            addr: format!("{namespace}/{name}"),
            pod: Some((namespace.to_string(), name)),
        });
    }
    anyhow::ensure!(!out.is_empty(), "no running meshed pods in {namespace}");
    Ok(out)
}

impl Source {
    pub fn parse(arg: &str) -> anyhow::Result<Self> {
        let (workload, addr) = match arg.split_once('=') {
            Some((w, a)) => (w.to_string(), a.to_string()),
            None => (arg.to_string(), arg.to_string()),
        };
        let addr = admin_addr(&addr);
        anyhow::ensure!(!workload.is_empty(), "{arg}: an empty workload name");
        Ok(Self {
            workload,
            addr,
            pod: None,
        })
    }

    /// `GET /metrics` from this proxy's admin server, in the text format: directly, or
    /// for a pod through `kube`'s API server.
    pub async fn scrape(
        &self,
        kube: Option<&kube::Client>,
        timeout: Duration,
    ) -> anyhow::Result<Scrape> {
        let get = async {
            match (&self.pod, kube) {
                (Some((ns, name)), Some(client)) => {
                    let uri =
                        format!("/api/v1/namespaces/{ns}/pods/{name}:{ADMIN_PORT}/proxy/metrics");
                    let req = http::Request::get(uri).body(Vec::new())?;
                    Ok(client.request_text(req).await?)
                }
                (Some(_), None) => anyhow::bail!("a pod is read through a cluster client"),
                (None, _) => get(&self.addr, "/metrics").await,
            }
        };
        let text = tokio::time::timeout(timeout, get)
            .await
            .with_context(|| format!("{}: no answer within {timeout:?}", self.addr))?
            .with_context(|| format!("scraping {}", self.addr))?;
        Ok(Scrape {
            source: self.addr.clone(),
            workload: self.workload.clone(),
            samples: parse(&text).with_context(|| format!("{}/metrics", self.addr))?,
        })
    }
}

/// `GET path` from an admin server at `addr`: the body of a 200, or an error with the
/// status and what the server said.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    get_over(stream, addr, path).await
}

/// `GET path` over a connection already made to an admin server known as `host` (a
/// socket, or a port-forwarded stream): as [`get`].
pub async fn get_over<IO>(io: IO, host: &str, path: &str) -> anyhow::Result<String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())?;
    let rsp = sender.send_request(req).await?;
    let status = rsp.status();
    let body = rsp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8(body.to_vec())?;
    anyhow::ensure!(status == 200, "{path} answered {status}: {}", text.trim());
    Ok(text)
}

/// `host:port` (`[v6]:port`), or a host or IP address alone with the proxy's admin
/// port.
pub fn admin_addr(arg: &str) -> String {
    if let Ok(ip) = arg
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        return std::net::SocketAddr::new(ip, ADMIN_PORT).to_string();
    }
    if arg.contains(':') {
        arg.to_string()
    } else {
        format!("{arg}:{ADMIN_PORT}")
    }
}

/// What a row describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A proxy's inbound traffic: what the workload serves.
    Workload,
    /// Outbound traffic to a Service, from every proxy scraped.
    Service,
    /// Outbound traffic that matched an HTTPRoute, by the backend it went to.
    Route,
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub kind: Kind,
    /// The workload, the Service (`name.namespace:port`), or `namespace/route -> backend`.
    pub name: String,
    /// Responses in the window.
    pub responses: u64,
    /// Successes over responses; None without responses.
    pub success_rate: Option<f64>,
    pub rps: f64,
    /// Seconds; None without latency observations.
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    /// Responses over mTLS over responses.
    pub mtls_share: Option<f64>,
}

#[derive(Default)]
struct Tally {
    responses: f64,
    successes: f64,
    mtls: f64,
    /// Cumulative bucket counts by upper bound.
    buckets: BTreeMap<OrderedF64, f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
struct OrderedF64(f64);
impl Eq for OrderedF64 {}
#[allow(clippy::derive_ord_xor_partial_ord)]
impl Ord for OrderedF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The keys a sample counts under.
fn keys(workload: &str, s: &Sample) -> Vec<(Kind, String)> {
    match s.label("direction") {
        "inbound" => vec![(Kind::Workload, workload.to_string())],
        "outbound" => {
            let mut k = vec![(Kind::Service, s.label("target").to_string())];
            let route = s.label("route_name");
            if !route.is_empty() {
                k.push((
                    Kind::Route,
                    format!(
                        "{}/{route} -> {}",
                        s.label("route_namespace"),
                        s.label("backend")
                    ),
                ));
            }
            k
        }
        _ => Vec::new(),
    }
}

/// The series' identity within one proxy's exposition: its name and labels.
fn series_key(s: &Sample) -> (String, Vec<(String, String)>) {
    (s.name.clone(), s.labels.clone())
}

/// The rows for the window between `before` and `after`, `seconds` apart, each proxy
/// matched by its source. A counter that went down restarted (its series expired and
/// came back, or the proxy restarted): its increase is its new value, as Prometheus
/// reads a reset.
pub fn rows(before: &[Scrape], after: &[Scrape], seconds: f64) -> Vec<Row> {
    let mut tallies: BTreeMap<(Kind, String), Tally> = BTreeMap::new();
    for a in after {
        // A proxy counts once it was scraped at both ends (one that came up inside the
        // window has no start to count from, as Prometheus' rate needs two samples).
        let Some(b) = before.iter().find(|b| b.source == a.source) else {
            continue;
        };
        let old: std::collections::HashMap<_, f64> =
            b.samples.iter().map(|s| (series_key(s), s.value)).collect();
        for s in &a.samples {
            let prev = old.get(&series_key(s)).copied().unwrap_or(0.0);
            let increase = if s.value >= prev {
                s.value - prev
            } else {
                s.value
            };
            if s.name == "remora_http_responses_total" {
                for key in keys(&a.workload, s) {
                    let t = tallies.entry(key).or_default();
                    t.responses += increase;
                    if s.label("classification") == "success" {
                        t.successes += increase;
                    }
                    if s.label("tls") == "true" {
                        t.mtls += increase;
                    }
                }
            } else if s.name == "remora_http_response_duration_seconds_bucket" {
                let le = match s.label("le") {
                    "+Inf" => f64::INFINITY,
                    le => match le.parse() {
                        Ok(v) => v,
                        Err(_) => continue,
                    },
                };
                for key in keys(&a.workload, s) {
                    *tallies
                        .entry(key)
                        .or_default()
                        .buckets
                        .entry(OrderedF64(le))
                        .or_default() += increase;
                }
            }
        }
    }
    tallies
        .into_iter()
        .filter(|(_, t)| t.responses > 0.0 || t.buckets.values().any(|c| *c > 0.0))
        .map(|((kind, name), t)| {
            let ratio = |n: f64| (t.responses > 0.0).then(|| n / t.responses);
            let buckets: Vec<(f64, f64)> = t.buckets.iter().map(|(le, c)| (le.0, *c)).collect();
            Row {
                kind,
                name,
                responses: t.responses.round() as u64,
                success_rate: ratio(t.successes),
                rps: if seconds > 0.0 {
                    t.responses / seconds
                } else {
                    0.0
                },
                p50: quantile(0.50, &buckets),
                p95: quantile(0.95, &buckets),
                p99: quantile(0.99, &buckets),
                mtls_share: ratio(t.mtls),
            }
        })
        .collect()
}

/// `histogram_quantile(q, ...)` over cumulative `buckets` (upper bound, count), sorted
/// by bound: linear interpolation inside the bucket the rank falls in, the lowest
/// bucket starting at 0, and the highest finite bound when the rank falls in `+Inf`.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last().filter(|(le, _)| le.is_infinite())?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let i = buckets.iter().position(|(_, c)| *c >= rank)?;
    if buckets[i].0.is_infinite() {
        return buckets.get(i.wrapping_sub(1)).map(|b| b.0);
    }
    let (lower, below) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
    let (upper, count) = buckets[i];
    let within = count - below;
    if within <= 0.0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below) / within)
}

/// The rows as a table for a terminal.
pub fn render(rows: &[Row], window: Duration) -> String {
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0));
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}ms", v * 1000.0));
    let mut lines = vec![[
        "KIND".to_string(),
        "NAME".into(),
        "SUCCESS".into(),
        "RPS".into(),
        "P50".into(),
        "P95".into(),
        "P99".into(),
        "MTLS".into(),
    ]];
    for r in rows {
        lines.push([
            format!("{:?}", r.kind).to_lowercase(),
            r.name.clone(),
            pct(r.success_rate),
            format!("{:.1}", r.rps),
            ms(r.p50),
            ms(r.p95),
            ms(r.p99),
            pct(r.mtls_share),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (v, w))| {
                if c < 2 {
                    format!("{v:<w$}")
                } else {
                    format!("{v:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str(&format!("(no HTTP responses in the last {:.0?})\n", window));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_with_escapes_and_both_formats() {
        let text = "# HELP x_total X.\n# TYPE x_total counter\n\
                    x_total{a=\"b\",c=\"q\\\"u\\\\o\\nte\"} 3\n\
                    y 1.5e3\n\
                    z_bucket{le=\"+Inf\"} 7 1700000000\n# EOF\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "x_total");
        assert_eq!(s[0].label("c"), "q\"u\\o\nte");
        assert_eq!(s[1].value, 1500.0);
        assert_eq!(s[2].label("le"), "+Inf");
        for bad in ["x{a=b} 1", "x{a=\"b\" 1", "x", "x{a=\"b\"} one"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quantiles_as_prometheus_computes_them() {
        let b = [
            (0.1, 40.0),
            (0.25, 45.0),
            (0.5, 50.0),
            (f64::INFINITY, 50.0),
        ];
        // rank 25 in the first bucket: 0 + 0.1 * 25/40.
        assert!((quantile(0.5, &b).unwrap() - 0.0625).abs() < 1e-12);
        // rank 49.5 in (0.25, 0.5]: 0.25 + 0.25 * 4.5/5.
        assert!((quantile(0.99, &b).unwrap() - 0.475).abs() < 1e-12);
        let inf = [(0.1, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(0.99, &inf), Some(0.1));
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.5, &[(0.1, 3.0)]), None, "no +Inf bucket");
    }

    fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    #[test]
    fn rows_from_two_scrapes() {
        let out = [
            ("direction", "outbound"),
            ("target", "web.shop:80"),
            ("tls", "true"),
            ("route_name", "split"),
            ("route_namespace", "shop"),
            ("backend", "web-v2.shop:80"),
        ];
        let ok = |n| {
            let mut l = out.to_vec();
            l.push(("classification", "success"));
            sample("remora_http_responses_total", &l, n)
        };
        let failed = |n| {
            let mut l = out.to_vec();
            l.push(("classification", "failure"));
            sample("remora_http_responses_total", &l, n)
        };
        let inbound = |n| {
            sample(
                "remora_http_responses_total",
                &[
                    ("direction", "inbound"),
                    ("tls", "false"),
                    ("classification", "success"),
                ],
                n,
            )
        };
        let before = [Scrape {
            source: "10.0.0.1:4191".into(),
            workload: "frontend".into(),
            samples: vec![ok(100.0), failed(10.0), inbound(5.0)],
        }];
        // 30 more successes and 10 more failures; the inbound counter restarted at 4.
        // In another order, and with a proxy that was not there at the start: it counts
        // from the next window.
        let after = [
            Scrape {
                source: "10.0.0.9:4191".into(),
                workload: "frontend".into(),
                samples: vec![ok(1000.0)],
            },
            Scrape {
                source: "10.0.0.1:4191".into(),
                workload: "frontend".into(),
                samples: vec![ok(130.0), failed(20.0), inbound(4.0)],
            },
        ];
        let rows = rows(&before, &after, 2.0);
        let names: Vec<_> = rows.iter().map(|r| (r.kind, r.name.as_str())).collect();
        assert_eq!(
            names,
            [
                (Kind::Workload, "frontend"),
                (Kind::Service, "web.shop:80"),
                (Kind::Route, "shop/split -> web-v2.shop:80"),
            ]
        );
        assert_eq!(rows[0].responses, 4);
        assert_eq!(rows[0].mtls_share, Some(0.0));
        for r in &rows[1..] {
            assert_eq!(r.responses, 40);
            assert_eq!(r.success_rate, Some(0.75));
            assert_eq!(r.rps, 20.0);
            assert_eq!(r.mtls_share, Some(1.0));
            assert_eq!(r.p50, None, "no latency samples");
        }
        let table = render(&rows, Duration::from_secs(2));
        assert!(
            table.contains("route     shop/split -> web-v2.shop:80   75.00%  20.0"),
            "{table}"
        );
    }

    #[test]
    fn sources_name_their_workload() {
        assert_eq!(
            Source::parse("web=10.0.0.1").unwrap(),
            Source {
                workload: "web".into(),
                addr: "10.0.0.1:4191".into(),
                pod: None,
            }
        );
        assert_eq!(
            Source::parse("10.0.0.1:9999").unwrap().workload,
            "10.0.0.1:9999"
        );
        assert!(Source::parse("=10.0.0.1").is_err());
        for (arg, addr) in [
            ("fd00::5", "[fd00::5]:4191"),
            ("[::1]", "[::1]:4191"),
            ("[::1]:9999", "[::1]:9999"),
            ("10.0.0.1", "10.0.0.1:4191"),
            ("web.shop", "web.shop:4191"),
            ("web.shop:9", "web.shop:9"),
        ] {
            assert_eq!(admin_addr(arg), addr, "{arg}");
        }
    }
}
