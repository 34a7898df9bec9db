//! `cargo xtask bench controller`: the control plane under load. A release
//! `remora-controller` reads a `dir:` folder of N Services × M endpoints (one file per
//! Service); S Destination streams watch their ClusterIPs over real gRPC; then a burst
//! rewrites C Services at once. Reported: time from each file write to the update on
//! its stream (p50/p99), the controller's own event→update histogram, RSS and CPU.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use parking_lot::Mutex;
use remora_api::v1 as api;
use tonic::transport::Channel;

use super::procstat;

#[derive(Debug, Clone)]
pub struct Options {
    pub services: usize,
    pub endpoints: usize,
    pub streams: usize,
    pub changes: usize,
    pub connections: usize,
}

impl Options {
    pub fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut o = Self {
            services: 1000,
            endpoints: 10,
            streams: 1000,
            changes: 200,
            connections: 10,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || -> anyhow::Result<usize> {
                Ok(it.next().context(format!("{a} needs a value"))?.parse()?)
            };
            match a.as_str() {
                "--services" => o.services = value()?,
                "--endpoints" => o.endpoints = value()?,
                "--streams" => o.streams = value()?,
                "--changes" => o.changes = value()?,
                "--connections" => o.connections = value()?,
                other => anyhow::bail!(
                    "unknown option {other}\nusage: cargo xtask bench controller [--services 1000] [--endpoints 10] \
                     [--streams 1000] [--changes 200] [--connections 10]"
                ),
            }
        }
        anyhow::ensure!(
            o.streams <= o.services && o.changes <= o.streams,
            "need changes ≤ streams ≤ services"
        );
        Ok(o)
    }
}

/// The figures of one run.
#[derive(Debug)]
pub struct Report {
    pub options: Options,
    pub load_s: f64,
    pub snapshot_s: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_max_ms: f64,
    pub internal: String,
    /// Upper bounds of the buckets holding the controller's own p50 and p99, in ms.
    pub internal_p50_ms: f64,
    pub internal_p99_ms: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub burst_cpu_s: f64,
    pub total_cpu_s: f64,
}

fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

/// One Service, its EndpointSlice and its Pods; `generation` shifts the endpoints.
fn service_file(i: usize, endpoints: usize, generation: usize) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
         spec: {{clusterIP: {}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: svc-{i}-a, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
        cluster_ip(i)
    );
    for e in 0..endpoints {
        let n = i * 64 + e + generation;
        s.push_str(&format!(
            "  - {{addresses: [\"10.{}.{}.{}\"], targetRef: {{kind: Pod, name: svc-{i}-{e}}}}}\n",
            100 + n / 65536 % 100,
            n / 256 % 256,
            n % 256
        ));
    }
    for e in 0..endpoints {
        s.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: svc-{i}-{e}, namespace: bench, labels: {{remora.io/meshed: \"true\"}}}}\n\
             spec: {{serviceAccountName: svc-{i}, containers: []}}\n"
        ));
    }
    s
}

fn write_atomic(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `built`: the folder with the release `remora-controller` to measure.
pub async fn run(built: &Path, opts: Options) -> anyhow::Result<Report> {
    let dir = std::env::temp_dir().join(format!("remora-bench-controller-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for i in 0..opts.services {
        write_atomic(
            &dir,
            &format!("svc-{i}.yaml"),
            &service_file(i, opts.endpoints, 0),
        )?;
    }
    let started = Instant::now();
    let child = Command::new(built.join("remora-controller"))
        .args([
            "--source",
            &format!("dir:{}", dir.display()),
            "--grpc-plaintext",
        ])
        .args([
            "--grpc-addr",
            "127.0.0.1:18086",
            "--admin-addr",
            "127.0.0.1:19990",
            "--log",
            "warn",
        ])
        .stdin(Stdio::null())
        .spawn()
        .context("start remora-controller")?;
    let controller = Controller(child);
    let pid = controller.0.id();
    // Ready once the folder is indexed.
    loop {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "controller never became ready"
        );
        if http_get("127.0.0.1:19990", "/ready")
            .await
            .is_ok_and(|(s, _)| s == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let load_s = started.elapsed().as_secs_f64();

    // Streams over a few connections, as many proxies would each hold a few.
    let mut channels = Vec::new();
    for _ in 0..opts.connections {
        channels.push(
            Channel::from_static("http://127.0.0.1:18086")
                .connect()
                .await?,
        );
    }
    let received: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; opts.streams]));
    let (snap_tx, mut snap_rx) = tokio::sync::mpsc::unbounded_channel();
    let snap_start = Instant::now();
    for i in 0..opts.streams {
        let mut client =
            api::destination_client::DestinationClient::new(channels[i % channels.len()].clone());
        let (received, snap_tx) = (received.clone(), snap_tx.clone());
        tokio::spawn(async move {
            let req = api::GetDestination {
                target: format!("{}:80", cluster_ip(i)),
                client: None,
            };
            let Ok(rsp) = client.get(req).await else {
                return;
            };
            let mut stream = rsp.into_inner();
            let mut first = true;
            while let Ok(Some(_update)) = stream.message().await {
                if first {
                    first = false;
                    let _ = snap_tx.send(());
                } else {
                    received.lock()[i].get_or_insert_with(Instant::now);
                }
            }
        });
    }
    drop(snap_tx);
    for _ in 0..opts.streams {
        tokio::time::timeout(Duration::from_secs(60), snap_rx.recv())
            .await?
            .context("a stream ended early")?;
    }
    let snapshot_s = snap_start.elapsed().as_secs_f64();

    // The burst: `changes` Services get new endpoints at once.
    let cpu0 = procstat::cpu_seconds(pid);
    let mut written = Vec::with_capacity(opts.changes);
    for i in 0..opts.changes {
        write_atomic(
            &dir,
            &format!("svc-{i}.yaml"),
            &service_file(i, opts.endpoints, 7),
        )?;
        written.push(Instant::now());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.lock()[..opts.changes].iter().any(Option::is_none) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "some changed Services never sent an update"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let burst_cpu_s = procstat::cpu_seconds(pid) - cpu0;
    let mut lat: Vec<f64> = received.lock()[..opts.changes]
        .iter()
        .zip(&written)
        .map(|(r, w)| {
            r.expect("checked")
                .saturating_duration_since(*w)
                .as_secs_f64()
                * 1000.0
        })
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        lat[((lat.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(lat.len() - 1)]
    };
    let (_, metrics) = http_get("127.0.0.1:19990", "/metrics").await?;
    let internal = metrics
        .lines()
        .filter(|l| {
            l.starts_with("remora_controller_update_latency_seconds_bucket")
                || l.starts_with("remora_controller_update_latency_seconds_count")
        })
        .map(str::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let quantile = |p: f64| -> f64 {
        let buckets: Vec<(f64, f64)> = internal
            .lines()
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                let count = l.rsplit(' ').next()?.parse::<f64>().ok()?;
                Some((
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    },
                    count,
                ))
            })
            .collect();
        let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
        buckets
            .iter()
            .find(|(_, c)| *c >= p * total)
            .map(|(le, _)| le * 1000.0)
            .unwrap_or(f64::NAN)
    };
    let (internal_p50_ms, internal_p99_ms) = (quantile(0.5), quantile(0.99));
    let report = Report {
        internal_p50_ms,
        internal_p99_ms,
        options: opts.clone(),
        load_s,
        snapshot_s,
        e2e_p50_ms: q(0.5),
        e2e_p99_ms: q(0.99),
        e2e_max_ms: *lat.last().unwrap_or(&0.0),
        internal,
        rss_mib: procstat::rss_mib(pid),
        peak_rss_mib: procstat::peak_rss_mib(pid),
        burst_cpu_s,
        total_cpu_s: procstat::cpu_seconds(pid),
    };
    drop(controller);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// A plain HTTP/1.0 GET on loopback: status and body.
async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: bench\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let status = buf
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .context("bad response")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The section of BENCHMARKS.md this benchmark owns.
pub fn markdown(r: &Report, date: &str, commit: &str) -> String {
    let o = &r.options;
    let aim = |ok: bool| if ok { "yes" } else { "**no**" };
    format!(
        "<!-- BEGIN controller (cargo xtask bench controller) -->\n\
         ### Controller ({date}, {commit})\n\n\
         `cargo xtask bench controller`: {} Services × {} endpoints (plus their Pods) in a `dir:` folder, {} \
         Destination streams over {} gRPC connections, then {} Services rewritten at once.\n\n\
         | figure | value | aim | met |\n| --- | ---: | --- | --- |\n\
         | folder indexed and ready | {:.2} s | | |\n\
         | {} snapshots received | {:.2} s | | |\n\
         | burst: source event → update sent (controller's histogram), p50 | ≤ {} ms | | |\n\
         | burst: source event → update sent (controller's histogram), p99 | ≤ {} ms | < 100 ms | {} |\n\
         | burst: file written → update on the stream, p50 | {:.1} ms | | |\n\
         | burst: file written → update on the stream, p99 | {:.1} ms | | |\n\
         | burst: file written → update on the stream, max | {:.1} ms | | |\n\
         | controller RSS after the burst (peak) | {:.1} MiB ({:.1} MiB) | < 200 MiB | {} |\n\
         | controller CPU during the burst | {:.2} s | | |\n\
         | controller CPU in all | {:.2} s | | |\n\n\
         The event→update figures are bucket bounds of `remora_controller_update_latency_seconds` (from the\n\
         moment the source delivered the change to the moment the update was written to the stream). The\n\
         write→update figures add the `dir:` source's polling (every 200 ms) and the client's receipt. The\n\
         histogram:\n\n```\n{}\n```\n\
         <!-- END controller -->\n",
        o.services,
        o.endpoints,
        o.streams,
        o.connections,
        o.changes,
        r.load_s,
        o.streams,
        r.snapshot_s,
        r.internal_p50_ms,
        r.internal_p99_ms,
        aim(r.internal_p99_ms < 100.0),
        r.e2e_p50_ms,
        r.e2e_p99_ms,
        r.e2e_max_ms,
        r.rss_mib,
        r.peak_rss_mib,
        aim(r.peak_rss_mib < 200.0),
        r.burst_cpu_s,
        r.total_cpu_s,
        r.internal
    )
}
