//! End to end: two pods (network namespaces on a veth link), each with `remora-init`'s
//! iptables rules and a `remora-proxy` running as UID 2102. Clients in the client pod
//! dial the server pod's IP as an unmeshed app would; the kernel redirects every
//! connection through both proxies.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use remora_tests::{
    Binaries, PodPair, Proxy,
    backend::full,
    backend::{self, GREETING},
    client::empty,
    client::{self, metrics, sample},
    e2e_enabled, eventually,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    sync::mpsc,
};

const APP: &str = "10.77.0.2:8080";
const GREETER: &str = "10.77.0.2:7000";
const ECHO: &str = "10.77.0.2:7001";
const TEN_MIB: usize = 10 * 1024 * 1024;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Two meshed pods with the backends running. Fields drop in order: proxies first.
struct Mesh {
    client_proxy: Proxy,
    server_proxy: Proxy,
    slow: mpsc::UnboundedReceiver<()>,
    pods: PodPair,
    _bins: Binaries,
}

async fn mesh(env: &[(&str, &str)]) -> Option<Mesh> {
    if !e2e_enabled() {
        return None;
    }
    let bins = Binaries::new();
    let pods = PodPair::new();
    pods.client.intercept(&bins);
    pods.server.intercept(&bins);
    let slow = backend::http(&pods.server, addr("0.0.0.0:8080"));
    backend::greeter(&pods.server, addr("0.0.0.0:7000"));
    backend::echo(&pods.server, addr("0.0.0.0:7001"));
    let client_proxy = Proxy::start(&pods.client, &bins, env).await;
    let server_proxy = Proxy::start(&pods.server, &bins, env).await;
    Some(Mesh {
        client_proxy,
        server_proxy,
        slow,
        pods,
        _bins: bins,
    })
}

/// Bytes whose every position matters: a reordered or dropped chunk changes them.
fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_bodies_streams_and_chunking_arrive_intact() -> anyhow::Result<()> {
    let Some(m) = mesh(&[]).await else {
        return Ok(());
    };
    let mut h1 = client::http1(&m.pods.client, addr(APP)).await?;

    // A 10 MiB body with a content-length, echoed back.
    let body = pattern(TEN_MIB);
    let req = Request::post("/echo")
        .header("host", "app")
        .body(full(body.clone()))?;
    let rsp = h1.send_request(req).await?;
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["x-echo"], "1", "the backend answered");
    let got = rsp.into_body().collect().await?.to_bytes();
    assert!(got == body, "10 MiB echo differs: {} bytes back", got.len());

    // A chunked request body, streamed in 64 pieces on the same connection.
    let (mut tx, chunked) = remora_tests::body::channel(2);
    let sent = pattern(64 * 16 * 1024);
    let pieces = sent.clone();
    tokio::spawn(async move {
        for piece in pieces.chunks(16 * 1024) {
            tx.send_data(Bytes::copy_from_slice(piece)).await.unwrap();
        }
    });
    h1.ready().await?;
    let rsp = h1
        .send_request(
            Request::post("/echo")
                .header("host", "app")
                .body(chunked.boxed())?,
        )
        .await?;
    assert_eq!(rsp.status(), 200);
    assert!(
        rsp.into_body().collect().await?.to_bytes() == sent,
        "chunked echo differs"
    );

    // A chunked response stream.
    h1.ready().await?;
    let rsp = h1
        .send_request(
            Request::get("/chunks?n=200")
                .header("host", "app")
                .body(empty())?,
        )
        .await?;
    assert_eq!(rsp.status(), 200);
    assert!(rsp.headers().get("content-length").is_none());
    assert_eq!(rsp.headers()["transfer-encoding"], "chunked");
    let want: String = (0..200).map(|i| format!("chunk-{i}\n")).collect();
    assert_eq!(
        String::from_utf8(rsp.into_body().collect().await?.to_bytes().to_vec())?,
        want
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_bodies_and_grpc_trailers_arrive_intact() -> anyhow::Result<()> {
    let Some(m) = mesh(&[]).await else {
        return Ok(());
    };
    let mut h2 = client::http2(&m.pods.client, addr(APP)).await?;

    let body = pattern(TEN_MIB);
    let rsp = h2
        .send_request(Request::post("http://app/echo").body(full(body.clone()))?)
        .await?;
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.version(), http::Version::HTTP_2);
    assert!(
        rsp.into_body().collect().await?.to_bytes() == body,
        "10 MiB h2 echo differs"
    );

    let message = pattern(1024 * 1024);
    let (echoed, trailers) = client::grpc(&mut h2, "http://app/grpc", message.clone(), &[])
        .await
        .expect("trailers survived both proxies");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        trailers["x-received-bytes"],
        message.len().to_string().as_str()
    );
    assert!(echoed == message);

    let client_proxy = &m.pods.client;
    eventually("gRPC status recorded", async || {
        let text = metrics(client_proxy).await;
        let ok = [
            ("direction", "outbound"),
            ("grpc_status", "0"),
            ("classification", "success"),
        ];
        match sample(&text, "remora_http_responses_total", &ok) {
            1.0 => Ok(()),
            n => Err(format!("{n} gRPC responses counted:\n{text}")),
        }
    })
    .await;
    let text = metrics(&m.pods.server).await;
    assert_eq!(
        sample(
            &text,
            "remora_protocol_detect_total",
            &[("direction", "inbound"), ("result", "http2")]
        ),
        1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_and_connect_continue_as_byte_streams() -> anyhow::Result<()> {
    let Some(m) = mesh(&[]).await else {
        return Ok(());
    };
    let mut h1 = client::http1(&m.pods.client, addr(APP)).await?;
    let req = Request::get("/ws")
        .header("host", "app")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(empty())?;
    let rsp = h1.send_request(req).await?;
    assert_eq!(rsp.status(), 101);
    assert_eq!(rsp.headers()["upgrade"], "websocket");
    assert_eq!(
        rsp.headers()["sec-websocket-accept"],
        "accept-dGhlIHNhbXBsZSBub25jZQ=="
    );
    echo_through(TokioIo::new(hyper::upgrade::on(rsp).await?)).await?;

    // CONNECT: after the 200 the connection is a tunnel.
    let mut h1 = client::http1(&m.pods.client, addr(APP)).await?;
    let rsp = h1
        .send_request(Request::connect("db.example:5432").body(empty())?)
        .await?;
    assert_eq!(rsp.status(), 200);
    echo_through(TokioIo::new(hyper::upgrade::on(rsp).await?)).await
}

/// Writes messages into an upgraded connection and expects them echoed back.
async fn echo_through(
    mut io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
) -> anyhow::Result<()> {
    for msg in ["first frame", "second frame after the first"] {
        io.write_all(msg.as_bytes()).await?;
        let mut back = vec![0u8; msg.len()];
        io.read_exact(&mut back).await?;
        assert_eq!(back, msg.as_bytes());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_is_never_stalled_by_detection() -> anyhow::Result<()> {
    // A detect timeout far longer than the read below: the greeting can only arrive in
    // time if the proxies do not wait for the client to speak.
    let Some(m) = mesh(&[("REMORA_DETECT_TIMEOUT", "120s")]).await else {
        return Ok(());
    };
    let stream = m.pods.client.connect(addr(GREETER)).await?;
    let (r, mut w) = tokio::io::split(stream);
    let mut lines = BufReader::new(r).lines();
    let greeting = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    let greeting = greeting.expect("greeting stalled behind protocol detection")?;
    assert_eq!(greeting.as_deref(), Some(GREETING.trim_end()));
    w.write_all(b"ping\n").await?;
    assert_eq!(lines.next_line().await?.as_deref(), Some("echo ping"));

    let server_first = |dir| [("direction", dir), ("result", "server_first")];
    let text = metrics(&m.pods.client).await;
    assert_eq!(
        sample(
            &text,
            "remora_protocol_detect_total",
            &server_first("outbound")
        ),
        1.0,
        "{text}"
    );
    let text = metrics(&m.pods.server).await;
    assert_eq!(
        sample(
            &text,
            "remora_protocol_detect_total",
            &server_first("inbound")
        ),
        1.0,
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_silent_and_half_sent_clients_are_carried_or_closed_cleanly() -> anyhow::Result<()>
{
    let Some(m) = mesh(&[]).await else {
        return Ok(());
    };
    // Bytes that are not HTTP go through as opaque TCP.
    let garbage: &[u8] = b"\x16\x03\x01\x00\xffnot http at all\x00\x01\x02";
    let mut s = m.pods.client.connect(addr(ECHO)).await?;
    s.write_all(garbage).await?;
    let mut back = vec![0u8; garbage.len()];
    s.read_exact(&mut back).await?;
    assert_eq!(back, garbage);
    // A client that says nothing and leaves, and one that stops mid request line.
    drop(m.pods.client.connect(addr(ECHO)).await?);
    let mut half = m.pods.client.connect(addr(APP)).await?;
    half.write_all(b"GET /hel").await?;
    drop(half);
    // Both proxies still carry traffic.
    let (status, body) = client::get(&m.pods.client, addr(APP), "/hello").await?;
    assert_eq!((status, body.as_str()), (200, "hello from the backend"));
    let text = metrics(&m.pods.client).await;
    let opaque = [("direction", "outbound"), ("result", "opaque")];
    assert_eq!(
        sample(&text, "remora_protocol_detect_total", &opaque),
        1.0,
        "{text}"
    );
    Ok(())
}

/// Issue 11: a client scanning ports made one series per port it tried (24k-65k label
/// values, megabytes of `/metrics`, memory never returned). Only the ports the pod
/// serves are named; every other port is `other`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_scan_is_folded_into_one_series() -> anyhow::Result<()> {
    let Some(m) = mesh(&[("REMORA_INBOUND_PORTS", "8080")]).await else {
        return Ok(());
    };
    const SCANNED: u16 = 300;
    for port in 20_000..20_000 + SCANNED {
        // An HTTP request to a port nothing listens on: the server's proxy answers 502.
        let target = SocketAddr::new(m.pods.server.ip, port);
        let (status, _) = client::get(&m.pods.client, target, "/").await?;
        assert_eq!(status, 502, "port {port}");
    }
    // A served port keeps its name.
    let (status, _) = client::get(&m.pods.client, addr(APP), "/hello").await?;
    assert_eq!(status, 200);
    let server_pod = &m.pods.server;
    eventually("every scanned port counted as other", async || {
        let s = metrics(server_pod).await;
        let other = [("direction", "inbound"), ("target", "other")];
        let scanned = sample(&s, "remora_http_requests_total", &other);
        if scanned != f64::from(SCANNED) {
            return Err(format!("{scanned} requests on other, want {SCANNED}:\n{s}"));
        }
        let served = [("direction", "inbound"), ("target", "8080")];
        if sample(&s, "remora_http_requests_total", &served) != 1.0 {
            return Err(format!("the served port lost its name:\n{s}"));
        }
        if let Some(line) = s.lines().find(|l| l.contains("target=\"20")) {
            return Err(format!("a scanned port has a series of its own: {line}"));
        }
        Ok(())
    })
    .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_traffic_and_proxy_connections_are_not_recaptured() -> anyhow::Result<()>
{
    let Some(m) = mesh(&[("REMORA_INBOUND_PORTS", "8080")]).await else {
        return Ok(());
    };
    for _ in 0..5 {
        let (status, body) = client::get(&m.pods.client, addr(APP), "/hello").await?;
        assert_eq!((status, body.as_str()), (200, "hello from the backend"));
    }
    let (client_pod, server_pod) = (&m.pods.client, &m.pods.server);
    eventually("both proxies count five requests", async || {
        let c = metrics(client_pod).await;
        let s = metrics(server_pod).await;
        let out = [
            ("direction", "outbound"),
            ("target", "passthrough"),
            ("tls", "false"),
        ];
        let inb = [("direction", "inbound"), ("target", "8080")];
        let ok = [("status_code", "200"), ("classification", "success")];
        let checks = [
            // Exactly one accepted connection per client connection: had a proxy's own
            // upstream connection been redirected again, it would be counted (or loop).
            (
                "client outbound connections",
                sample(&c, "remora_tcp_connections_opened_total", &out),
                5.0,
            ),
            (
                "client inbound connections",
                sample(
                    &c,
                    "remora_tcp_connections_opened_total",
                    &[("direction", "inbound")],
                ),
                0.0,
            ),
            (
                "server inbound connections",
                sample(&s, "remora_tcp_connections_opened_total", &inb),
                5.0,
            ),
            (
                "server outbound connections",
                sample(
                    &s,
                    "remora_tcp_connections_opened_total",
                    &[("direction", "outbound")],
                ),
                0.0,
            ),
            (
                "client requests",
                sample(&c, "remora_http_requests_total", &out),
                5.0,
            ),
            (
                "server requests",
                sample(&s, "remora_http_requests_total", &inb),
                5.0,
            ),
            (
                "client 200s",
                sample(
                    &c,
                    "remora_http_responses_total",
                    &[out.as_slice(), &ok].concat(),
                ),
                5.0,
            ),
            (
                "server 200s",
                sample(
                    &s,
                    "remora_http_responses_total",
                    &[inb.as_slice(), &ok].concat(),
                ),
                5.0,
            ),
            (
                "client latency observations",
                sample(&c, "remora_http_response_duration_seconds_count", &out),
                5.0,
            ),
            (
                "connections still open",
                sample(&s, "remora_tcp_connections_open", &inb),
                0.0,
            ),
        ];
        for (what, got, want) in checks {
            if got != want {
                return Err(format!(
                    "{what}: {got}, want {want}\nclient:\n{c}\nserver:\n{s}"
                ));
            }
        }
        if sample(&c, "remora_tcp_read_bytes_total", &out) <= 0.0
            || sample(&s, "remora_tcp_written_bytes_total", &inb) <= 0.0
        {
            return Err("byte counters did not move".into());
        }
        Ok(())
    })
    .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_to_the_proxy_itself_is_refused_not_looped() -> anyhow::Result<()> {
    let Some(m) = mesh(&[]).await else {
        return Ok(());
    };
    let reset = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionReset;
    // The reset can arrive before connect() returns, or on the first read.
    match m.pods.client.connect(addr("127.0.0.1:4140")).await {
        Err(e) => assert!(reset(&e), "{e}"),
        Ok(mut s) => {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: loop\r\n\r\n").await;
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await? {
                Ok(0) => {}
                Err(e) if reset(&e) => {}
                other => panic!("the proxy answered a connection made to itself: {other:?}"),
            }
        }
    }
    let text = metrics(&m.pods.client).await;
    assert_eq!(
        sample(&text, "remora_tcp_connections_opened_total", &[]),
        0.0,
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_proxy_stopped_connections_fail() -> anyhow::Result<()> {
    let Some(mut m) = mesh(&[]).await else {
        return Ok(());
    };
    let (status, _) = client::get(&m.pods.client, addr(APP), "/hello").await?;
    assert_eq!(status, 200);

    // Without the server's proxy its inbound redirect leads nowhere.
    m.server_proxy.kill();
    match client::get(&m.pods.client, addr(APP), "/hello").await {
        Ok((status, body)) => assert_eq!(status, 502, "reached the app without its proxy: {body}"),
        Err(e) => eprintln!("request failed as expected: {e}"),
    }
    // Without the client's proxy the outbound redirect leads nowhere.
    m.client_proxy.kill();
    let err = m
        .pods
        .client
        .connect(addr(APP))
        .await
        .expect_err("connected without the proxy");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits() -> anyhow::Result<()> {
    let Some(mut m) = mesh(&[("REMORA_SHUTDOWN_GRACE_PERIOD", "20s")]).await else {
        return Ok(());
    };
    let mut h1 = client::http1(&m.pods.client, addr(APP)).await?;
    let in_flight = tokio::spawn(async move {
        let req = Request::get("/slow?ms=1500")
            .header("host", "app")
            .body(empty())
            .unwrap();
        let rsp = h1.send_request(req).await?;
        let status = rsp.status();
        let body = rsp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    });
    m.slow
        .recv()
        .await
        .expect("the slow request reached the backend");
    m.server_proxy.terminate();
    let (status, body) = in_flight.await??;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"slow done"[..]));
    assert_eq!(
        m.server_proxy.wait(Duration::from_secs(20)).await,
        Some(0),
        "clean exit after drain"
    );
    assert!(
        m.server_proxy.log_text().contains("draining"),
        "{}",
        m.server_proxy.log_text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_calling_its_own_ip_reaches_its_app_directly() -> anyhow::Result<()> {
    let Some(m) = mesh(&[]).await else {
        return Ok(());
    };
    let (status, body) = client::get(&m.pods.server, addr(APP), "/hello").await?;
    assert_eq!((status, body.as_str()), (200, "hello from the backend"));
    // Loopback traffic stays in the pod: neither listener saw it.
    let text = metrics(&m.pods.server).await;
    assert_eq!(
        sample(&text, "remora_tcp_connections_opened_total", &[]),
        0.0,
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_bound_to_loopback_is_not_exposed_by_the_mesh() -> anyhow::Result<()> {
    let Some(m) = mesh(&[]).await else {
        return Ok(());
    };
    let _slow = backend::http(&m.pods.server, addr("127.0.0.1:8082"));
    // It serves inside its pod…
    let (status, _) = client::get(&m.pods.server, addr("127.0.0.1:8082"), "/hello").await?;
    assert_eq!(status, 200);
    // …but the inbound proxy forwards to the pod IP, where nothing listens.
    match client::get(&m.pods.client, addr("10.77.0.2:8082"), "/hello").await {
        Ok((status, body)) => assert_eq!(status, 502, "a loopback-only app was reached: {body}"),
        Err(e) => eprintln!("request failed as expected: {e}"),
    }
    Ok(())
}

/// Many concurrent gRPC-style exchanges: every response keeps its trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_survive_concurrent_load() -> anyhow::Result<()> {
    let Some(m) = mesh(&[]).await else {
        return Ok(());
    };
    let h2 = client::http2(&m.pods.client, addr(APP)).await?;
    let message = Bytes::from_static(b"\x00\x00\x00\x00\x0bhello world");
    let mut tasks = Vec::new();
    for _ in 0..5000 {
        let (mut h2, message) = (h2.clone(), message.clone());
        tasks.push(tokio::spawn(async move {
            h2.ready().await?;
            let req = Request::post("http://app/grpc")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(full(message))?;
            let rsp = h2.send_request(req).await?;
            let headers = rsp.headers().clone();
            let collected = rsp.into_body().collect().await?;
            anyhow::Ok((headers, collected.trailers().cloned()))
        }));
        if tasks.len() % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let mut missing = Vec::new();
    for t in tasks {
        let (headers, trailers) = t.await??;
        match trailers.as_ref().and_then(|t| t.get("grpc-status")) {
            Some(s) if s == "0" => {}
            _ => missing.push(format!("{headers:?} / {trailers:?}")),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of 5000 lost their trailers, e.g. {}",
        missing.len(),
        missing[0]
    );
    Ok(())
}

/// `REMORA_ACCESS_LOG=json`: one line per request on each proxy's standard output, with
/// the method, authority, path with its query as sent, status and direction; the log's
/// own lines parse as JSON among the proxy's other output, and none was dropped. (What a
/// hostile value does to a line is the access log's unit tests' business.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_request_on_both_proxies() -> anyhow::Result<()> {
    let Some(m) = mesh(&[("REMORA_ACCESS_LOG", "json")]).await else {
        return Ok(());
    };
    let mut h1 = client::http1(&m.pods.client, addr(APP)).await?;
    for path in ["/hello", "/missing", "/hello?x=%0d%0a%22"] {
        h1.ready().await?;
        let rsp = h1
            .send_request(Request::get(path).header("host", "app").body(empty())?)
            .await?;
        rsp.into_body().collect().await?;
    }
    for (side, proxy, direction) in [
        ("client", &m.client_proxy, "outbound"),
        ("server", &m.server_proxy, "inbound"),
    ] {
        let mut lines = Vec::new();
        eventually("three access log lines", async || {
            let text = std::fs::read_to_string(&proxy.log).map_err(|e| e.to_string())?;
            lines = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v.get("duration_ms").is_some())
                .collect();
            if lines.len() == 3 {
                Ok(())
            } else {
                Err(format!("{side}: {} lines in\n{text}", lines.len()))
            }
        })
        .await;
        let got: Vec<(String, u64)> = lines
            .iter()
            .map(|l| {
                assert_eq!(l["direction"], direction, "{l}");
                assert_eq!(l["method"], "GET", "{l}");
                assert_eq!(l["authority"], "app", "{l}");
                (
                    l["path"].as_str().unwrap_or("").to_string(),
                    l["status"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("/hello".to_string(), 200),
                ("/missing".to_string(), 404),
                ("/hello?x=%0d%0a%22".to_string(), 200),
            ],
            "{side}"
        );
    }
    let text = metrics(&m.pods.client).await;
    assert!(
        text.contains("\nremora_access_log_dropped_total 0\n"),
        "{text}"
    );
    Ok(())
}
