//! Hostile input, kept as tests (issues 11 and 17): the attacks the proxy withstood when
//! the security issue tried them (CONTINUATION floods, HPACK bombs, request smuggling)
//! and those it did not try. Each drives a real proxy in a namespace pod the way an
//! attacker would, counts what the attack achieved, and fails if it works again.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_tests::{
    Binaries, Pod, PodPair, Proxy, backend,
    client::{self, metrics, sample},
    e2e_enabled, eventually,
};

/// What an HTTP/2 app behind the proxy saw: requests started, in flight now, and the
/// most in flight at once. Each request takes 20 ms of the app's time.
#[derive(Clone, Default)]
struct Counts {
    started: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

struct InFlight(Counts);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An HTTP/2-only app (prior knowledge, as gRPC servers are) on `addr` in `pod`.
fn h2_app(pod: &Pod, addr: SocketAddr) -> Counts {
    let counts = Counts::default();
    let listener = pod.listen(addr);
    let shared = counts.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counts = shared.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let counts = counts.clone();
                    async move {
                        counts.started.fetch_add(1, Ordering::Relaxed);
                        let now = counts.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                        counts.most.fetch_max(now, Ordering::Relaxed);
                        let _guard = InFlight(counts);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    counts
}

/// One HTTP/2 `GET /` on a connection of its own: the status.
async fn h2_get(pod: &Pod, addr: SocketAddr) -> anyhow::Result<u16> {
    let mut sender = client::http2(pod, addr).await?;
    let req = Request::get(format!("http://{addr}/")).body(client::empty())?;
    let rsp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req)).await??;
    Ok(rsp.status().as_u16())
}

/// HTTP/2 rapid reset (CVE-2023-44487) against an HTTP/2 app behind the inbound proxy:
/// one connection opens streams and resets each at once, so the server's concurrency
/// limit never holds it back. The proxy must not turn that into unbounded work for the
/// app, must end the connection, and must go on serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_costs_the_app_little_and_ends_the_attackers_connection()
-> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let pods = PodPair::new();
    let app_addr = SocketAddr::new(pods.server.ip, 8080);
    let app = h2_app(&pods.server, "0.0.0.0:8080".parse()?);
    pods.server.intercept(&bins);
    let _proxy = Proxy::start(&pods.server, &bins, &[]).await;

    // The attack: HEADERS then RST_STREAM, as fast as the connection takes them.
    const STREAMS: usize = 20_000;
    let tcp = pods.client.connect(app_addr).await?;
    let (h2, conn) = h2::client::handshake(tcp).await?;
    let conn = tokio::spawn(conn);
    let started = Instant::now();
    let mut opened = 0;
    let mut sender = Some(h2);
    while let Some(h2) = sender.take() {
        if opened == STREAMS || started.elapsed() > Duration::from_secs(30) {
            break;
        }
        let Ok(Ok(mut h2)) = tokio::time::timeout(Duration::from_secs(5), h2.ready()).await else {
            break;
        };
        let req = Request::get(format!("http://{app_addr}/")).body(())?;
        let Ok((_rsp, mut stream)) = h2.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        opened += 1;
        sender = Some(h2);
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;

    // Everyone else is served after, on a connection of their own.
    let status = h2_get(&pods.client, app_addr).await?;
    let detected = sample(
        &metrics(&pods.server).await,
        "remora_http2_abuse_goaways_total",
        &[("direction", "inbound")],
    );
    let (app_started, app_most) = (
        app.started.load(Ordering::Relaxed),
        app.most.load(Ordering::Relaxed),
    );
    eprintln!(
        "opened {opened} streams in {:?}; the app started {app_started}, at most {app_most} at once; connection ended: {ended:?}; detected {detected}",
        started.elapsed()
    );
    assert_eq!(status, 200, "a well-behaved request after the attack");
    assert!(
        opened < STREAMS,
        "the proxy took all {STREAMS} reset streams on one connection"
    );
    assert!(
        matches!(ended, Ok(Ok(Err(_))) | Ok(Ok(Ok(())))),
        "the attacker's connection was not ended: {ended:?}"
    );
    assert_eq!(detected, 1.0, "the closed connection is counted");
    // The app never held more than the proxy's stream limit, and did a small share
    // of what the attacker asked.
    assert!(app_most <= 200, "{app_most} requests at once in the app");
    assert!(
        app_started <= 2_000,
        "{app_started} requests started in the app for {opened} reset streams"
    );
    Ok(())
}

/// What one flooding client got: scrapes answered 200, scrapes answered 429, and
/// connections closed before an answer.
#[derive(Debug, Default, Clone, Copy)]
struct Flood {
    served: usize,
    throttled: usize,
    closed: usize,
}

/// Scrapes `/metrics` at `admin` from `pod` as fast as one keep-alive connection allows,
/// reconnecting when the server closes it, until `until`.
async fn flood(pod: Pod, admin: SocketAddr, until: Instant) -> Flood {
    let mut got = Flood::default();
    while Instant::now() < until {
        let Ok(mut sender) = client::http1(&pod, admin).await else {
            got.closed += 1;
            continue;
        };
        while Instant::now() < until {
            let req = Request::get("/metrics")
                .header("host", admin.to_string())
                .body(client::empty())
                .expect("a request");
            match sender.send_request(req).await {
                Ok(rsp) => {
                    let status = rsp.status().as_u16();
                    let _ = http_body_util::BodyExt::collect(rsp.into_body()).await;
                    match status {
                        200 => got.served += 1,
                        429 => got.throttled += 1,
                        other => panic!("/metrics answered {other}"),
                    }
                }
                Err(_) => {
                    got.closed += 1;
                    break;
                }
            }
        }
    }
    got
}

/// The admin port is open to the pod network (probes, scrapes): 64 connections from one
/// client scraping as fast as they can get a client's share — 8 connections — and
/// `/metrics` at 20 encodings a second; the rest is closed or answered 429, and counted.
/// Meanwhile the traffic the proxy carries goes on, and another client (the kubelet's
/// probe, here the pod's loopback) is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_flood_on_the_admin_port_is_bounded_and_traffic_goes_on() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let pods = PodPair::new();
    let _ = backend::http(&pods.server, "0.0.0.0:8080".parse()?);
    pods.server.intercept(&bins);
    let _proxy = Proxy::start(&pods.server, &bins, &[]).await;
    let app = SocketAddr::new(pods.server.ip, 8080);
    let admin = SocketAddr::new(pods.server.ip, 4191);

    let seconds = 3;
    let until = Instant::now() + Duration::from_secs(seconds);
    let flooders: Vec<_> = (0..64)
        .map(|_| {
            let pod = Pod::borrowed(pods.client.name.clone(), pods.client.ip);
            tokio::spawn(flood(pod, admin, until))
        })
        .collect();
    // The traffic, and a probe from another address, while the flood lasts.
    let (mut requests, mut answered, mut probes) = (0, 0, 0);
    while Instant::now() < until {
        requests += 1;
        if let Ok((200, _)) = client::get(&pods.client, app, "/hello").await {
            answered += 1;
        }
        if requests % 20 == 0
            && let Ok((200, _)) =
                client::get(&pods.server, "127.0.0.1:4191".parse()?, "/ready").await
        {
            probes += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut total = Flood::default();
    for f in flooders {
        let f = f.await?;
        total.served += f.served;
        total.throttled += f.throttled;
        total.closed += f.closed;
    }
    eprintln!("flood: {total:?}; traffic {answered} of {requests}; probes {probes}");
    assert_eq!(answered, requests, "traffic failed under the flood");
    assert_eq!(probes, requests / 20, "a probe from another address failed");
    // 20 a second and a burst of 40, whatever the flood asked.
    let most = 20 * seconds as usize + 40 + 5;
    assert!(total.served <= most, "{} scrapes encoded", total.served);
    assert!(total.served >= 20, "the flood got no share: {total:?}");
    assert!(total.throttled > 0 && total.closed > 0, "{total:?}");
    // Once the bucket refills, the refusals are there to see.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = metrics(&pods.server).await;
    for reason in ["client_connections", "scrape_rate"] {
        let n = sample(&text, "remora_admin_refused_total", &[("reason", reason)]);
        assert!(n > 0.0, "{reason}: {n}");
    }
    Ok(())
}

/// Lets this process (and the proxies it starts) hold `want` descriptors, within the
/// hard limit.
fn allow_descriptors(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).expect("setrlimit");
    }
}

/// Many idle HTTP/2 connections: a client opens a thousand, each with the preface and
/// SETTINGS and then nothing. Each must cost the proxy little memory (no per-connection
/// buffers sized for traffic, no connection to the app for a client that asks nothing),
/// a well-behaved client is served meanwhile, and when the attacker goes, its
/// connections leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_http2_connections_cost_little_and_leave_nothing_behind()
-> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    const IDLE: usize = 1_000;
    allow_descriptors(4 * IDLE as u64);
    let bins = Binaries::new();
    let pods = PodPair::new();
    let app_addr = SocketAddr::new(pods.server.ip, 8080);
    let app = h2_app(&pods.server, "0.0.0.0:8080".parse()?);
    pods.server.intercept(&bins);
    let proxy = Proxy::start(&pods.server, &bins, &[]).await;
    assert_eq!(h2_get(&pods.client, app_addr).await?, 200);
    let open = async || {
        sample(
            &metrics(&pods.server).await,
            "remora_tcp_connections_open",
            &[("direction", "inbound")],
        )
    };
    // Until the first request's pooled connection has settled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (open_before, rss_before) = (open().await, proxy.rss_kib());

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let tcp = pods.client.connect(app_addr).await?;
        let (h2, conn) = h2::client::handshake(tcp).await?;
        idle.push((h2, tokio::spawn(conn)));
    }
    // Every one accepted and past detection (the proxy counts it open once it is).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut held = open().await - open_before;
    while held < IDLE as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = open().await - open_before;
    }
    let rss_held = proxy.rss_kib();
    let status = h2_get(&pods.client, app_addr).await?;
    let app_requests = app.started.load(Ordering::Relaxed);

    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = open().await - open_before;
    while left > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = open().await - open_before;
    }
    let per_connection = rss_held.saturating_sub(rss_before) as f64 / IDLE as f64;
    eprintln!(
        "{IDLE} idle HTTP/2 connections: {held} held; RSS {rss_before} → {rss_held} KiB \
         ({per_connection:.1} KiB each); a request meanwhile {status}; {left} left after they closed"
    );
    assert_eq!(
        held, IDLE as f64,
        "the proxy did not hold every idle connection"
    );
    assert_eq!(
        status, 200,
        "a well-behaved client beside the idle connections"
    );
    assert_eq!(app_requests, 2, "the idle connections reached the app");
    assert_eq!(
        left, 0.0,
        "connections left open after the client closed them"
    );
    // An HTTP/2 server connection's state (HPACK tables, frame buffers, the task)
    // is a few KiB; 64 KiB each would mean buffers sized for traffic.
    assert!(
        per_connection < 64.0,
        "{per_connection:.1} KiB per idle HTTP/2 connection"
    );
    Ok(())
}

/// Idle HTTP/2 connections do not stay forever: one with no request in flight for the
/// idle timeout (`REMORA_TCP_IDLE_TIMEOUT`, here 2 s) is sent GOAWAY and closed, and
/// counted; one with requests coming stays open and loses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_after_the_idle_timeout_and_busy_ones_are_not()
-> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    const IDLE: usize = 50;
    let bins = Binaries::new();
    let pods = PodPair::new();
    let app_addr = SocketAddr::new(pods.server.ip, 8080);
    let app = h2_app(&pods.server, "0.0.0.0:8080".parse()?);
    pods.server.intercept(&bins);
    let _proxy = Proxy::start(&pods.server, &bins, &[("REMORA_TCP_IDLE_TIMEOUT", "2s")]).await;

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let tcp = pods.client.connect(app_addr).await?;
        let (h2, conn) = h2::client::handshake(tcp).await?;
        idle.push((h2, tokio::spawn(conn)));
    }
    // A busy connection: a request every 300 ms for 5 s, on the one connection.
    let mut busy = client::http2(&pods.client, app_addr).await?;
    let (mut ok, mut failed) = (0, Vec::new());
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let req = Request::get(format!("http://{app_addr}/")).body(client::empty())?;
        match tokio::time::timeout(Duration::from_secs(5), busy.send_request(req)).await {
            Ok(Ok(rsp)) if rsp.status() == 200 => ok += 1,
            other => failed.push(format!("{other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let closed = idle.iter().filter(|(_, conn)| conn.is_finished()).count();
    let counted = sample(
        &metrics(&pods.server).await,
        "remora_tcp_idle_timeouts_total",
        &[("direction", "inbound")],
    );
    eprintln!(
        "{closed} of {IDLE} idle HTTP/2 connections closed after 5 s (counted {counted}); \
         the busy one: {ok} requests, {} failed",
        failed.len()
    );
    assert_eq!(closed, IDLE, "idle connections still open past the timeout");
    assert!(counted >= IDLE as f64, "{counted} counted");
    assert!(failed.is_empty(), "the busy connection: {failed:?}");
    assert!(ok >= 10, "only {ok} requests on the busy connection");
    assert!(!busy.is_closed(), "the busy connection was closed");
    assert_eq!(app.started.load(Ordering::Relaxed), ok);
    Ok(())
}

/// An HTTP/2 frame: the 9-byte header, then `payload`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// An HPACK integer of `value` after a first byte holding `flags` and `prefix` bits.
fn hpack_int(out: &mut Vec<u8>, flags: u8, prefix: u32, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// An HPACK string literal, not Huffman-coded.
fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// `GET http://{authority}/` as a header block of static-table entries and one literal.
fn get_block(authority: &str) -> Vec<u8> {
    // :method GET, :scheme http, :path /; :authority as a literal without indexing.
    let mut out = vec![0x82, 0x86, 0x84, 0x01];
    hpack_str(&mut out, authority.as_bytes());
    out
}

/// The client preface and an empty SETTINGS frame.
fn preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out
}

/// What a server sent on a connection until it closed it or went quiet for `quiet`: the
/// (type, stream) of each whole frame.
async fn frames_until_closed(
    tcp: &mut tokio::net::TcpStream,
    quiet: Duration,
) -> (Vec<(u8, u32)>, bool) {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let closed = loop {
        match tokio::time::timeout(quiet, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    let mut frames = Vec::new();
    let mut at = 0;
    while bytes.len() >= at + 9 {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        let stream =
            u32::from_be_bytes([bytes[at + 5], bytes[at + 6], bytes[at + 7], bytes[at + 8]]);
        frames.push((bytes[at + 3], stream & 0x7fff_ffff));
        at += 9 + len;
    }
    (frames, closed)
}

/// A pod pair whose server runs `h2_app` on 8080 behind its proxy, answering before an
/// attack: what each HTTP/2 attack below starts from. (Fields drop in order: the proxy
/// stops before its pod goes.)
struct H2Target {
    proxy: Proxy,
    app: Counts,
    addr: SocketAddr,
    pods: PodPair,
    _bins: Binaries,
}

impl H2Target {
    async fn start() -> anyhow::Result<Self> {
        let bins = Binaries::new();
        let pods = PodPair::new();
        let addr = SocketAddr::new(pods.server.ip, 8080);
        let app = h2_app(&pods.server, "0.0.0.0:8080".parse()?);
        pods.server.intercept(&bins);
        let proxy = Proxy::start(&pods.server, &bins, &[]).await;
        assert_eq!(h2_get(&pods.client, addr).await?, 200, "before the attack");
        Ok(Self {
            proxy,
            app,
            addr,
            pods,
            _bins: bins,
        })
    }
}

/// A CONTINUATION flood (CVE-2024-27316 and its kin): one request's header block that
/// never ends, CONTINUATION frame after CONTINUATION frame. The proxy must bound what it
/// buffers, end the connection, never pass the request on, and go on serving everyone
/// else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off_and_never_reaches_the_app() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    if !e2e_enabled() {
        return Ok(());
    }
    let t = H2Target::start().await?;
    let (pods, app_addr, app, proxy) = (&t.pods, t.addr, &t.app, &t.proxy);
    let rss_before = proxy.rss_kib();

    // Each CONTINUATION carries one 1,000-byte header; none ends the block.
    let mut one = vec![0x00];
    hpack_str(&mut one, b"x-flood");
    hpack_str(&mut one, &[b'a'; 1000]);
    let continuation = frame(CONTINUATION, 0, 1, &one);
    const FRAMES: usize = 32 * 1024;
    let mut tcp = pods.client.connect(app_addr).await?;
    tcp.write_all(&preface()).await?;
    tcp.write_all(&frame(
        HEADERS,
        END_STREAM,
        1,
        &get_block(&app_addr.to_string()),
    ))
    .await?;
    let started = Instant::now();
    let mut sent = 0;
    let mut refused = None;
    while sent < FRAMES && started.elapsed() < Duration::from_secs(20) {
        match tokio::time::timeout(Duration::from_secs(3), tcp.write_all(&continuation)).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(e)) => {
                refused = Some(e.to_string());
                break;
            }
            Err(_) => {
                refused = Some("the proxy stopped reading".into());
                break;
            }
        }
    }
    let (frames, closed) = frames_until_closed(&mut tcp, Duration::from_secs(5)).await;
    let rss_after = proxy.rss_kib();
    let goaway = frames.iter().any(|&(kind, _)| kind == GOAWAY);
    eprintln!(
        "sent {sent} of {FRAMES} CONTINUATION frames ({} KiB) in {:?}, then {refused:?}; \
         the proxy sent {frames:?}, closed: {closed}; RSS {rss_before} -> {rss_after} KiB; \
         the app started {}",
        sent * continuation.len() / 1024,
        started.elapsed(),
        app.started.load(Ordering::Relaxed)
    );
    assert!(
        sent < FRAMES,
        "the proxy read all {FRAMES} frames of one header block"
    );
    assert!(closed || goaway, "the attacker's connection was left open");
    assert_eq!(
        app.started.load(Ordering::Relaxed),
        1,
        "the endless request reached the app"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "the proxy grew from {rss_before} to {rss_after} KiB"
    );
    assert_eq!(
        h2_get(&pods.client, app_addr).await?,
        200,
        "after the attack"
    );
    Ok(())
}

/// An HPACK bomb: one 4,000-byte header enters the decoder's dynamic table, then each
/// request names it 16,000 times at one byte each, so 16 KiB on the wire asks for 64 MB
/// of headers, over 64 streams. The proxy must refuse each request without building it,
/// pass none on, stay small, and go on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_bomb_is_refused_unbuilt_and_never_reaches_the_app() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    if !e2e_enabled() {
        return Ok(());
    }
    let t = H2Target::start().await?;
    let (pods, app_addr, app, proxy) = (&t.pods, t.addr, &t.app, &t.proxy);
    let rss_before = proxy.rss_kib();

    const STREAMS: u32 = 64;
    let mut sent = 0;
    let mut tcp = pods.client.connect(app_addr).await?;
    tcp.write_all(&preface()).await?;
    for n in 0..STREAMS {
        let mut block = get_block(&app_addr.to_string());
        if n == 0 {
            // A literal with incremental indexing: dynamic table entry 62 (4,035 bytes).
            block.push(0x40);
            hpack_str(&mut block, b"x-b");
            hpack_str(&mut block, &[b'b'; 4000]);
        }
        // Indexed header field 62, as often as a default-sized frame holds.
        block.resize(16_000, 0x80 | 62);
        let bomb = frame(HEADERS, END_STREAM | END_HEADERS, 1 + 2 * n, &block);
        if tcp.write_all(&bomb).await.is_err() {
            // The proxy has ended the connection.
            break;
        }
        sent += 1;
    }
    let (frames, closed) = frames_until_closed(&mut tcp, Duration::from_secs(3)).await;
    let rss_after = proxy.rss_kib();
    let answered: std::collections::BTreeSet<u32> = frames
        .iter()
        .filter(|&&(kind, stream)| (kind == HEADERS || kind == RST_STREAM) && stream % 2 == 1)
        .map(|&(_, stream)| stream)
        .collect();
    let goaway = frames.iter().any(|&(kind, _)| kind == GOAWAY);
    eprintln!(
        "{sent} of {STREAMS} bombs sent; the proxy answered {} streams, GOAWAY: {goaway}, \
         closed: {closed}; RSS {rss_before} -> {rss_after} KiB; the app started {}",
        answered.len(),
        app.started.load(Ordering::Relaxed)
    );
    assert_eq!(
        app.started.load(Ordering::Relaxed),
        1,
        "a bombed request reached the app"
    );
    assert!(
        answered.len() as u32 == sent || goaway || closed,
        "the proxy left bombed streams unanswered on an open connection: {frames:?}"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "the proxy grew from {rss_before} to {rss_after} KiB"
    );
    assert_eq!(
        h2_get(&pods.client, app_addr).await?,
        200,
        "after the attack"
    );
    Ok(())
}

/// An HTTP/1.1 app that records each request's path.
fn h1_recording_app(pod: &Pod, addr: SocketAddr) -> Arc<std::sync::Mutex<Vec<String>>> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = pod.listen(addr);
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = shared.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push(req.uri().path().to_string());
                        // Read the whole body, as an app that takes a form does.
                        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    seen
}

/// Request smuggling: a request whose length the proxy and the app could read two ways
/// hides `GET /smuggled` where one of them sees a body. Whatever the proxy makes of each,
/// the app must see only the requests the proxy saw (and logged, and could refuse):
/// never `/smuggled` unless the proxy logged it as a request of its own. Conflicting
/// lengths are the client's error (400), not a request passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_requests_never_reach_the_app_past_the_proxy() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let pods = PodPair::new();
    let app_addr = SocketAddr::new(pods.server.ip, 8080);
    let seen = h1_recording_app(&pods.server, "0.0.0.0:8080".parse()?);
    pods.server.intercept(&bins);
    let proxy = Proxy::start(&pods.server, &bins, &[("REMORA_ACCESS_LOG", "json")]).await;

    const HIDDEN: &str = "GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n";
    let hidden = HIDDEN.len();
    // (name, bytes, must the proxy refuse it with 400)
    let attacks: Vec<(&str, String, bool)> = vec![
        (
            "CL.TE",
            format!(
                "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{HIDDEN}",
                5 + hidden
            ),
            false,
        ),
        (
            "TE.CL",
            format!(
                "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{HIDDEN}\r\n0\r\n\r\n",
                hidden
            ),
            false,
        ),
        (
            "two lengths",
            format!(
                "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\nContent-Length: {hidden}\r\n\r\n{HIDDEN}"
            ),
            true,
        ),
        (
            "a signed length",
            format!("POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: +{hidden}\r\n\r\n{HIDDEN}"),
            true,
        ),
        (
            "a space before the colon",
            format!(
                "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding : chunked\r\nContent-Length: {}\r\n\r\n0\r\n\r\n{HIDDEN}",
                5 + hidden
            ),
            true,
        ),
        (
            "a folded coding",
            format!(
                "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: {}\r\n\r\n0\r\n\r\n{HIDDEN}",
                5 + hidden
            ),
            true,
        ),
        (
            "an unknown coding",
            format!(
                "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: xchunked\r\nContent-Length: {}\r\n\r\n0\r\n\r\n{HIDDEN}",
                5 + hidden
            ),
            true,
        ),
        (
            "chunked then identity",
            format!(
                "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n{HIDDEN}"
            ),
            true,
        ),
        (
            "a chunk size that overflows",
            format!(
                "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000{:x}\r\n{HIDDEN}\r\n0\r\n\r\n",
                hidden
            ),
            true,
        ),
        (
            "a bare LF in a chunk extension",
            format!(
                "POST /a HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n{:x};x\n\r\n{HIDDEN}\r\n0\r\n\r\n",
                hidden
            ),
            true,
        ),
    ];
    let mut answers = Vec::new();
    for (name, bytes, _) in &attacks {
        let mut tcp = pods.client.connect(app_addr).await?;
        tcp.write_all(bytes.as_bytes()).await?;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut got)).await;
        let text = String::from_utf8_lossy(&got).to_string();
        let statuses: Vec<u16> = text
            .match_indices("HTTP/1.1 ")
            .filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok())
            .collect();
        answers.push((*name, statuses));
    }
    // What the proxy saw as requests: its access log's paths.
    let mut logged = Vec::new();
    eventually("the access log is written", async || {
        let text = std::fs::read_to_string(&proxy.log).map_err(|e| e.to_string())?;
        logged = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some(v.get("path")?.as_str()?.to_string()))
            .collect();
        let app = seen.lock().unwrap().len();
        if logged.len() >= app {
            Ok(())
        } else {
            Err(format!("{} logged, {app} at the app", logged.len()))
        }
    })
    .await;
    let app: Vec<String> = seen.lock().unwrap().clone();
    eprintln!("answers {answers:?}\nthe proxy logged {logged:?}\nthe app saw {app:?}");
    // Each request the app saw, the proxy saw as a request of its own (some the proxy
    // saw began but were refused for their bodies, so never reached the app whole).
    let count = |list: &[String], path: &str| list.iter().filter(|p| *p == path).count();
    for path in &app {
        assert!(
            count(&app, path) <= count(&logged, path),
            "the app saw {path} more often than the proxy: app {app:?}, proxy {logged:?}"
        );
    }
    assert_eq!(count(&app, "/smuggled"), 0, "app {app:?}, proxy {logged:?}");
    for ((name, statuses), (_, _, refused)) in answers.iter().zip(&attacks) {
        if *refused {
            assert_eq!(statuses.first(), Some(&400), "{name}: {statuses:?}");
        } else {
            // Read one way (chunked), answered once: the hidden request is never run.
            assert_eq!(statuses, &[200], "{name}");
        }
    }
    Ok(())
}
