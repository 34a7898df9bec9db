//! The load generator: HTTP/1.1 or HTTP/2 (gRPC-style) requests from inside a pod,
//! open-loop at a constant rate or closed-loop flat out, every response checked.
//!
//! Open-loop latency is measured from each request's scheduled send time (coordinated
//! omission correction: waiting for a free connection, or a generator that fell behind,
//! counts against the system, as it would against a real client).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use parking_lot::Mutex;
use remora_tests::{Pod, backend::Body, client};
use tokio::{sync::mpsc, time::Instant};

const HELLO: &[u8] = b"hello from the backend";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Http1,
    /// HTTP/2 with gRPC framing conventions: POST, `te: trailers`, status in trailers.
    Grpc,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Http1 => "HTTP/1.1",
            Mode::Grpc => "HTTP/2 (gRPC-style)",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub mode: Mode,
    /// Requests per second; `None` runs closed-loop with `concurrency` callers.
    pub rate: Option<u32>,
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

#[derive(Debug)]
pub struct Outcome {
    /// Latencies in microseconds, warm-up excluded.
    pub latency: Histogram<u64>,
    pub completed: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub measured: Duration,
}

impl Outcome {
    pub fn rps(&self) -> f64 {
        self.completed as f64 / self.measured.as_secs_f64()
    }
}

/// A pool of connections of one mode.
enum Conns {
    Http1(
        mpsc::Sender<http1::SendRequest<Body>>,
        tokio::sync::Mutex<mpsc::Receiver<http1::SendRequest<Body>>>,
    ),
    Http2(Vec<http2::SendRequest<Body>>, AtomicU64),
}

impl Conns {
    async fn open(pod: &Pod, target: SocketAddr, mode: Mode, n: usize) -> anyhow::Result<Self> {
        Ok(match mode {
            Mode::Http1 => {
                let (tx, rx) = mpsc::channel(n);
                for _ in 0..n {
                    tx.send(client::http1(pod, target).await?).await.ok();
                }
                Conns::Http1(tx, tokio::sync::Mutex::new(rx))
            }
            Mode::Grpc => {
                let mut v = Vec::new();
                for _ in 0..n.clamp(1, 2) {
                    v.push(client::http2(pod, target).await?);
                }
                Conns::Http2(v, AtomicU64::new(0))
            }
        })
    }

    /// One request and its check; Err says what was wrong.
    async fn call(&self) -> Result<(), String> {
        match self {
            Conns::Http1(tx, rx) => {
                // Waiting here for a free connection is part of the measured latency.
                let mut sender = rx
                    .lock()
                    .await
                    .recv()
                    .await
                    .ok_or("connection pool closed")?;
                let r = http1_call(&mut sender).await;
                let _ = tx.send(sender).await;
                r
            }
            Conns::Http2(v, next) => {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize % v.len();
                grpc_call(v[i].clone()).await
            }
        }
    }
}

/// A failed status, with the proxy's reason when it gave one.
fn status_error<B>(rsp: &http::Response<B>) -> String {
    let why = rsp
        .headers()
        .get("remora-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    format!("status {}, remora-error {why:?}", rsp.status())
}

async fn http1_call(sender: &mut http1::SendRequest<Body>) -> Result<(), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = Request::get("/hello")
        .header("host", "bench")
        .body(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
        .expect("request");
    let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if rsp.status() != 200 {
        return Err(status_error(&rsp));
    }
    let body = rsp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if &body[..] != HELLO {
        return Err(format!("unexpected body {body:?}"));
    }
    Ok(())
}

async fn grpc_call(mut sender: http2::SendRequest<Body>) -> Result<(), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    // A 5-byte gRPC message header and a small payload.
    let message = Bytes::from_static(b"\x00\x00\x00\x00\x0bhello world");
    let req = Request::post("http://bench/grpc")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(message.clone()).map_err(|n| match n {}).boxed())
        .expect("request");
    let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if rsp.status() != 200 {
        return Err(status_error(&rsp));
    }
    let headers = rsp.headers().clone();
    let collected = rsp.into_body().collect().await.map_err(|e| e.to_string())?;
    match collected.trailers().and_then(|t| t.get("grpc-status")) {
        Some(v) if v == "0" => {}
        Some(v) => return Err(format!("grpc-status {v:?} in trailers")),
        // A trailers-only response: an error made by a proxy, which says why.
        None => {
            let field = |k: &str| {
                headers
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            return Err(format!(
                "no trailers; grpc-status {:?}, grpc-message {:?}, remora-error {:?}",
                field("grpc-status"),
                field("grpc-message"),
                field("remora-error")
            ));
        }
    }
    if collected.to_bytes() != message {
        return Err("unexpected message".into());
    }
    Ok(())
}

/// Shared tallies of one run.
struct Tally {
    latency: Mutex<Histogram<u64>>,
    completed: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")),
            completed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        })
    }

    fn record(&self, result: Result<(), String>, started: Instant, counted: bool) {
        if !counted {
            return;
        }
        match result {
            Ok(()) => {
                let us = started.elapsed().as_micros().max(1) as u64;
                self.latency.lock().saturating_record(us);
                self.completed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.first_error.lock().get_or_insert(e);
            }
        }
    }
}

/// Runs `spec` against `target` from inside `pod`.
pub async fn run(pod: &Pod, target: SocketAddr, spec: Spec) -> anyhow::Result<Outcome> {
    let conns = Arc::new(Conns::open(pod, target, spec.mode, spec.concurrency).await?);
    let tally = Tally::new();
    let start = Instant::now() + Duration::from_millis(10);
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    match spec.rate {
        Some(rate) => {
            // The schedule is kept by a plain thread sleeping with the kernel's
            // high-resolution timers (tokio's timer ticks in whole milliseconds); each
            // request is timed from its scheduled instant, whatever delays its start.
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            let total = ((spec.warmup + spec.duration).as_secs_f64() * rate as f64) as u64;
            let handle = tokio::runtime::Handle::current();
            let (start_std, measure_std) = (start.into_std(), measure_from.into_std());
            let (conns, tally) = (conns.clone(), tally.clone());
            let dispatcher = std::thread::spawn(move || {
                let mut tasks = Vec::with_capacity(total as usize);
                for i in 0..total {
                    let scheduled = start_std + interval.mul_f64(i as f64);
                    if let Some(wait) = scheduled.checked_duration_since(std::time::Instant::now())
                    {
                        std::thread::sleep(wait);
                    }
                    let (conns, tally) = (conns.clone(), tally.clone());
                    tasks.push(handle.spawn(async move {
                        let r = conns.call().await;
                        tally.record(r, Instant::from_std(scheduled), scheduled >= measure_std);
                    }));
                }
                tasks
            });
            let tasks = tokio::task::spawn_blocking(move || dispatcher.join())
                .await?
                .map_err(|_| anyhow::anyhow!("the dispatcher thread panicked"))?;
            for t in tasks {
                let _ = t.await;
            }
        }
        None => {
            let mut workers = Vec::new();
            for _ in 0..spec.concurrency {
                let (conns, tally) = (conns.clone(), tally.clone());
                workers.push(tokio::spawn(async move {
                    tokio::time::sleep_until(start).await;
                    loop {
                        let started = Instant::now();
                        if started >= end {
                            return;
                        }
                        let r = conns.call().await;
                        tally.record(r, started, started >= measure_from);
                    }
                }));
            }
            for w in workers {
                let _ = w.await;
            }
        }
    }
    let tally = Arc::try_unwrap(tally).ok().expect("all tasks done");
    Ok(Outcome {
        latency: tally.latency.into_inner(),
        completed: tally.completed.into_inner(),
        errors: tally.errors.into_inner(),
        first_error: tally.first_error.into_inner(),
        measured: spec.duration,
    })
}

/// Reads `bytes` from the blast server through the path; MiB/s.
pub async fn throughput(pod: &Pod, target: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = pod.connect(target).await?;
    let started = Instant::now();
    s.write_u64(bytes).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    anyhow::ensure!(got == bytes, "received {got} of {bytes} bytes");
    Ok(bytes as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64())
}

/// `n` HTTP/1.1 keep-alive connections from `pod` to `target`, each having made one
/// request: what a pod with many idle clients (or pooled callers) holds open. A
/// connection whose request fails is counted and not kept.
pub async fn open_connections(
    pod: &Pod,
    target: SocketAddr,
    n: usize,
) -> anyhow::Result<(Vec<http1::SendRequest<Body>>, u64)> {
    let mut senders = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        let mut sender = client::http1(pod, target).await?;
        match http1_call(&mut sender).await {
            Ok(()) => senders.push(sender),
            Err(_) => failed += 1,
        }
    }
    Ok((senders, failed))
}

/// Every connection sends requests back to back for `duration`, all at once, while
/// `sample` runs every 100 ms; the requests completed and failed (a connection stops
/// at its first failure).
pub async fn keep_busy(
    senders: Vec<http1::SendRequest<Body>>,
    duration: Duration,
    mut sample: impl FnMut(),
) -> anyhow::Result<(u64, u64)> {
    let until = Instant::now() + duration;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < until {
                    if http1_call(&mut sender).await.is_err() {
                        return (done, 1u64);
                    }
                    done += 1;
                }
                (done, 0)
            })
        })
        .collect();
    while Instant::now() < until {
        sample();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut done, mut failed) = (0, 0);
    for t in tasks {
        let (d, f) = t.await?;
        done += d;
        failed += f;
    }
    Ok((done, failed))
}
