//! `cargo xtask soak`: the mTLS mesh of the end-to-end suite (a controller with a `dir:`
//! folder and a development CA, three meshed pods with real iptables rules) under a
//! steady open-loop load for a long time, while the Service's endpoints, its
//! TrafficPolicy and the AuthorizationPolicy in front of it change every few seconds and
//! certificates short enough to be renewed several times expire. Every request is
//! checked (status and body); every sample period it reads each process's resident memory,
//! file descriptors and threads from `/proc`. Prints the samples and a summary, writes the
//! summary to `docs/reliability.md`, and fails when a request failed or a process died.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use remora_tests::{
    Binaries, backend,
    mesh::{self, Mesh},
    write_atomically,
};
use tokio::time::Instant;

use crate::bench::{
    self,
    load::{self, Mode, Spec},
    procstat,
};

const BEGIN: &str = "<!-- BEGIN soak (cargo xtask soak) -->";
const END: &str = "<!-- END soak -->";

#[derive(Debug, Clone)]
pub struct Options {
    pub duration: Duration,
    pub rate: u32,
    pub concurrency: usize,
    /// The certificates' lifetime (`--cert-lifetime` of the controller).
    pub lifetime: String,
    /// How often memory, descriptors and threads are read (and the load's tally cut).
    pub sample: Duration,
    /// How often the endpoints and policies change.
    pub churn: Duration,
    pub write: bool,
}

impl Options {
    pub fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut o = Self {
            duration: Duration::from_secs(30 * 60),
            rate: 1000,
            concurrency: 32,
            lifetime: "5m".into(),
            sample: Duration::from_secs(30),
            churn: Duration::from_secs(2),
            write: true,
        };
        let duration = |v: &str| remora_config::parse_duration(v).map_err(anyhow::Error::msg);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().context(format!("{a} needs a value"));
            match a.as_str() {
                "--duration" => o.duration = duration(value()?)?,
                "--rate" => o.rate = value()?.parse()?,
                "--concurrency" => o.concurrency = value()?.parse()?,
                "--cert-lifetime" => {
                    let v = value()?;
                    duration(v)?;
                    o.lifetime = v.clone();
                }
                "--sample" => o.sample = duration(value()?)?,
                "--churn" => o.churn = duration(value()?)?,
                "--no-write" => o.write = false,
                other => anyhow::bail!(
                    "unknown option {other}\nusage: cargo xtask soak [--duration 30m] [--rate 1000] \
                     [--concurrency 32] [--cert-lifetime 5m] [--sample 30s] [--churn 2s] [--no-write]"
                ),
            }
        }
        anyhow::ensure!(
            o.rate > 0 && o.concurrency > 0,
            "--rate and --concurrency must be positive"
        );
        anyhow::ensure!(
            o.sample >= Duration::from_secs(1) && o.duration >= o.sample,
            "--sample must be at least 1s and at most --duration"
        );
        anyhow::ensure!(
            o.churn >= Duration::from_millis(100),
            "--churn must be at least 100ms"
        );
        Ok(o)
    }
}

/// One process's readings at one sample.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    rss_mib: f64,
    fds: usize,
    threads: usize,
}

impl Reading {
    fn of(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        Some(Self {
            rss_mib: procstat::rss_mib(pid),
            fds,
            threads,
        })
    }
}

/// The processes watched, in the order of the tables' columns.
const WATCHED: [&str; 3] = ["frontend proxy", "web proxy", "controller"];

#[derive(Debug)]
struct Sample {
    at: Duration,
    completed: u64,
    errors: u64,
    p99_ms: f64,
    readings: [Reading; 3],
}

#[derive(Debug)]
struct Report {
    opts: Options,
    samples: Vec<Sample>,
    first_error: Option<String>,
    changes: u64,
    renewals: [usize; 3],
    /// Connections the proxies hold open once the load has stopped and pools idled.
    open_after: [f64; 2],
}

pub fn run(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let (libc, rest) = bench::Libc::take(args)?;
    let opts = Options::parse(&rest)?;
    let built = bench::in_release(root, "soak", args, libc)?;
    if !remora_tests::e2e_enabled() {
        anyhow::bail!("the soak needs the end-to-end environment (root, iptables, iproute2)");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(soak(&built, opts))?;
    let info = crate::bench::report::Info::collect(root, args, libc);
    let section = markdown(&report, &info.date, &info.commit);
    println!("{section}");
    if report.opts.write {
        let path = root.join("docs/reliability.md");
        let old = std::fs::read_to_string(&path).context("read docs/reliability.md")?;
        let new = crate::replace_marked(&old, BEGIN, END, &section, "docs/reliability.md")?;
        std::fs::write(&path, new).context("write docs/reliability.md")?;
        eprintln!("updated the soak section of docs/reliability.md");
    }
    let failed: u64 = report.samples.iter().map(|s| s.errors).sum();
    anyhow::ensure!(
        failed == 0,
        "{failed} requests failed; the first: {}",
        report.first_error.as_deref().unwrap_or("?")
    );
    Ok(())
}

/// `built`: the folder with the release binaries to run.
async fn soak(built: &Path, opts: Options) -> anyhow::Result<Report> {
    let bins = Binaries::from_dir(built);
    let mesh = Mesh::start(&bins, &opts.lifetime).await;
    // A second backend for the churned endpoint: `other` serves the same app.
    let other = mesh.cluster.pod("other");
    let _other_app = backend::http(other, "0.0.0.0:8080".parse()?);
    let pids = [
        mesh.proxies[0].pid(),
        mesh.proxies[2].pid(),
        mesh.controller.pid(),
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let churn = tokio::spawn(churn(
        mesh.objects.clone(),
        other.name.clone(),
        opts.churn,
        stop.clone(),
        changes.clone(),
    ));

    let frontend = mesh.cluster.pod("frontend");
    let target: SocketAddr = mesh::CLUSTER_IP.parse()?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut first_error = None;
    eprintln!(
        "soak: {} at {} requests/s, certificates living {}, a change every {:?}",
        humantime(opts.duration),
        opts.rate,
        opts.lifetime,
        opts.churn
    );
    eprintln!(
        "{:>6} {:>7} {:>6} {:>8}  {}",
        "at s",
        "ok",
        "failed",
        "p99 ms",
        WATCHED
            .map(|w| format!("{w}: RSS MiB/fds/threads"))
            .join("  ")
    );
    while started.elapsed() < opts.duration {
        let spec = Spec {
            mode: Mode::Http1,
            rate: Some(opts.rate),
            concurrency: opts.concurrency,
            warmup: Duration::ZERO,
            duration: opts
                .sample
                .min(opts.duration.saturating_sub(started.elapsed()))
                .max(Duration::from_secs(1)),
        };
        let outcome = load::run(frontend, target, spec).await?;
        if first_error.is_none() {
            first_error = outcome.first_error.clone();
        }
        let mut readings = [Reading::default(); 3];
        for (reading, (pid, name)) in readings.iter_mut().zip(pids.iter().zip(WATCHED)) {
            *reading = Reading::of(*pid).with_context(|| format!("the {name} has exited"))?;
        }
        let sample = Sample {
            at: started.elapsed(),
            completed: outcome.completed,
            errors: outcome.errors,
            p99_ms: outcome.latency.value_at_quantile(0.99) as f64 / 1000.0,
            readings,
        };
        eprintln!(
            "{:>6} {:>7} {:>6} {:>8.2}  {}",
            sample.at.as_secs(),
            sample.completed,
            sample.errors,
            sample.p99_ms,
            readings
                .map(|r| format!("{:>6.1} {:>4} {:>3}", r.rss_mib, r.fds, r.threads))
                .join("  ")
        );
        samples.push(sample);
    }
    stop.store(true, Ordering::Relaxed);
    churn.await??;

    // Idle: what the proxies hold open with no client left (pooled connections between
    // the proxies idle out after 90 s at most; an accepted connection nobody holds must
    // be gone).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut open_after = [0.0; 2];
    for (open, role) in open_after.iter_mut().zip(["frontend", "web"]) {
        let text = remora_tests::client::metrics(mesh.cluster.pod(role)).await;
        *open = remora_tests::client::sample(&text, "remora_tcp_connections_open", &[]);
    }
    // Each proxy logs `certified` once at start and once per renewal.
    let renewals = [0, 2, 1].map(|i| {
        mesh.proxies[i]
            .log_text()
            .lines()
            .filter(|l| l.contains("certified"))
            .count()
            .saturating_sub(1)
    });
    Ok(Report {
        opts,
        samples,
        first_error,
        changes: changes.load(Ordering::Relaxed),
        renewals,
        open_after,
    })
}

/// Every `every`: the `web` Service gains or loses a second endpoint (the `other` pod,
/// in a second EndpointSlice), its TrafficPolicy switches between two shapes, and its
/// AuthorizationPolicy between letting `frontend` alone and `frontend` and `other` call
/// it — no change ever leaves the load's path without a ready, authorized endpoint.
async fn churn(
    objects: PathBuf,
    other_pod: String,
    every: Duration,
    stop: Arc<AtomicBool>,
    changes: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let odd = n % 2 == 1;
        let slice = objects.join("churn-endpoints.yaml");
        if odd {
            std::fs::remove_file(&slice).context("remove the churned EndpointSlice")?;
        } else {
            write_atomically(&objects, "churn-endpoints.yaml", &second_slice(&other_pod));
        }
        // The policies change on a slower beat than the endpoints.
        if n % 4 < 2 {
            write_atomically(&objects, "churn-policy.yaml", &policies(n % 8 < 4));
        }
        n += 1;
        changes.store(n, Ordering::Relaxed);
    }
    Ok(())
}

fn second_slice(other_pod: &str) -> String {
    let (_, ip, _) = mesh::ROLES[1];
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-2, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n\
         - {{addresses: [\"{ip}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {other_pod}}}}}\n"
    )
}

/// One of two TrafficPolicy shapes and AuthorizationPolicies (`first` picks).
fn policies(first: bool) -> String {
    let (algorithm, per_try, attempts) = if first {
        ("PeakEWMA", "500ms", 2)
    } else {
        ("LeastRequest", "1s", 3)
    };
    let callers = if first {
        format!("[\"{}\"]", mesh::spiffe("frontend"))
    } else {
        format!(
            "[\"{}\", \"{}\"]",
            mesh::spiffe("frontend"),
            mesh::spiffe("other")
        )
    };
    format!(
        "apiVersion: policy.remora.io/v1alpha1\nkind: TrafficPolicy\n\
         metadata: {{name: web, namespace: shop}}\n\
         spec:\n  targetRef: {{kind: Service, name: web, port: 80}}\n\
         \x20 loadBalancer: {{algorithm: {algorithm}}}\n\
         \x20 timeouts: {{request: 2s, perTry: {per_try}, connect: 1s}}\n\
         \x20 retries: {{attempts: {attempts}, retryOn: [5xx, connect-failure, reset, refused-stream]}}\n\
         \x20 circuitBreaker: {{consecutiveFailures: 5, baseEjectionTime: 10s}}\n\
         ---\n\
         apiVersion: policy.remora.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: web-callers, namespace: shop}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n\
         \x20 from:\n  - identities: {callers}\n"
    )
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 60, s % 60) {
        (0, s) => format!("{s}s"),
        (m, 0) => format!("{m}m"),
        (m, s) => format!("{m}m{s}s"),
    }
}

/// The section of docs/reliability.md: the run, a summary, and the samples (every one
/// up to 20 rows, else evenly spaced ones and the last).
fn markdown(r: &Report, date: &str, commit: &str) -> String {
    let total: u64 = r.samples.iter().map(|s| s.completed + s.errors).sum();
    let failed: u64 = r.samples.iter().map(|s| s.errors).sum();
    let worst_p99 = r.samples.iter().map(|s| s.p99_ms).fold(0.0, f64::max);
    let mut out = format!(
        "{BEGIN}\n_{date}, commit `{commit}`: `cargo xtask soak --duration {} --rate {} --cert-lifetime {} --churn {:?}`._\n\n",
        humantime(r.opts.duration),
        r.opts.rate,
        r.opts.lifetime,
        r.opts.churn
    );
    out.push_str(&format!(
        "- Requests: **{total}** sent, **{failed}** failed{}; worst p99 of a {}-second sample {worst_p99:.1} ms.\n",
        r.first_error
            .as_ref()
            .map(|e| format!(" (the first: {e})"))
            .unwrap_or_default(),
        r.opts.sample.as_secs()
    ));
    out.push_str(&format!(
        "- Changes applied under load: {} (the second endpoint added or removed each time; \
         the TrafficPolicy and AuthorizationPolicy rewritten every other time).\n",
        r.changes
    ));
    out.push_str(&format!(
        "- Certificate renewals: frontend proxy {}, web proxy {}, other proxy {}.\n",
        r.renewals[0], r.renewals[1], r.renewals[2]
    ));
    out.push_str(&format!(
        "- Connections open 5 s after the load stopped: frontend proxy {}, web proxy {} \
         (pooled proxy-to-proxy connections idle out later).\n",
        r.open_after[0], r.open_after[1]
    ));
    // Flat: from the first sample (warm) to the last.
    if let (Some(first), Some(last)) = (r.samples.first(), r.samples.last()) {
        let drift: Vec<String> = WATCHED
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let max = r
                    .samples
                    .iter()
                    .map(|s| s.readings[i].rss_mib)
                    .fold(0.0, f64::max);
                format!(
                    "{name} {:.1} → {:.1} MiB (peak {max:.1}), fds {} → {}, threads {} → {}",
                    first.readings[i].rss_mib,
                    last.readings[i].rss_mib,
                    first.readings[i].fds,
                    last.readings[i].fds,
                    first.readings[i].threads,
                    last.readings[i].threads
                )
            })
            .collect();
        out.push_str(&format!("- First sample → last: {}.\n", drift.join("; ")));
    }
    out.push_str(&format!(
        "\n| at | requests | failed | p99 ms | {} |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        WATCHED.map(|w| format!("{w} RSS MiB / fds / threads")).join(" | ")
    ));
    let n = r.samples.len();
    let step = n.div_ceil(20).max(1);
    for (i, s) in r.samples.iter().enumerate() {
        if i % step != 0 && i + 1 != n {
            continue;
        }
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} |\n",
            humantime(Duration::from_secs(s.at.as_secs())),
            s.completed + s.errors,
            s.errors,
            s.p99_ms,
            s.readings
                .map(|r| format!("{:.1} / {} / {}", r.rss_mib, r.fds, r.threads))
                .join(" | ")
        ));
    }
    out.push_str(END);
    out
}
