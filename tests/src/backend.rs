//! The applications the tests talk to, running in a pod's namespace: an HTTP/1 + h2c
//! server with echo, streaming, gRPC-style trailers, upgrade and slow endpoints; a
//! server-speaks-first TCP greeter; a raw TCP echo server.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    sync::mpsc,
};

use crate::Pod;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// The greeting the server-speaks-first backend sends on accept.
pub const GREETING: &str = "220 remora-test ready\r\n";

/// A whole body of `b`.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Starts the HTTP backend on `addr` in `pod`. Each request to `/slow` is announced on
/// the returned channel before it is answered.
pub fn http(pod: &Pod, addr: SocketAddr) -> mpsc::UnboundedReceiver<()> {
    let listener = pod.listen(addr);
    let name: std::sync::Arc<str> = pod.name.as_str().into();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            // As servers commonly do: trailers and small frames are not held back by Nagle.
            let _ = stream.set_nodelay(true);
            let (tx, name) = (tx.clone(), name.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(req, tx.clone(), name.clone()));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    rx
}

async fn handle(
    req: Request<Incoming>,
    slow: mpsc::UnboundedSender<()>,
    name: std::sync::Arc<str>,
) -> Result<Response<Body>, Infallible> {
    if req.method() == http::Method::CONNECT {
        // A tunnel: after the 200 the connection echoes bytes.
        tokio::spawn(echo_upgraded(hyper::upgrade::on(req)));
        return Ok(status(StatusCode::OK));
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let rsp = match path.as_str() {
        "/hello" => Response::new(full("hello from the backend")),
        // Which pod answered: the namespace's name.
        "/whoami" => Response::new(full(name.to_string())),
        "/echo" => {
            let mut rsp = Response::new(req.into_body().map_err(Into::into).boxed());
            rsp.headers_mut()
                .insert("x-echo", HeaderValue::from_static("1"));
            rsp
        }
        "/chunks" => {
            let n: usize = query
                .strip_prefix("n=")
                .and_then(|n| n.parse().ok())
                .unwrap_or(10);
            let (mut tx, body) = crate::body::channel(1);
            tokio::spawn(async move {
                for i in 0..n {
                    if tx
                        .send_data(Bytes::from(format!("chunk-{i}\n")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            });
            Response::new(body.boxed())
        }
        "/grpc" => {
            let data = match req.into_body().collect().await {
                Ok(c) => c.to_bytes(),
                Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
            };
            let (mut tx, body) = crate::body::channel(2);
            tokio::spawn(async move {
                let len = data.len();
                let _ = tx.send_data(data).await;
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                trailers.insert("x-received-bytes", HeaderValue::from(len));
                let _ = tx.send_trailers(trailers).await;
            });
            let mut rsp = Response::new(body.boxed());
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            rsp
        }
        "/ws" => {
            let key = req.headers().get("sec-websocket-key").cloned();
            let Some(key) = key else {
                return Ok(status(StatusCode::BAD_REQUEST));
            };
            tokio::spawn(echo_upgraded(hyper::upgrade::on(req)));
            let mut rsp = status(StatusCode::SWITCHING_PROTOCOLS);
            let h = rsp.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            let accept = format!("accept-{}", key.to_str().unwrap_or(""));
            h.insert(
                "sec-websocket-accept",
                HeaderValue::from_str(&accept).expect("header"),
            );
            rsp
        }
        // `?code=NNN`: answers with that status (a failure to count, say).
        "/status" => {
            let code = query
                .strip_prefix("code=")
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            status(code)
        }
        "/slow" => {
            let ms: u64 = query
                .strip_prefix("ms=")
                .and_then(|n| n.parse().ok())
                .unwrap_or(500);
            let _ = slow.send(());
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full("slow done"))
        }
        _ => status(StatusCode::NOT_FOUND),
    };
    Ok(rsp)
}

async fn echo_upgraded(on_upgrade: hyper::upgrade::OnUpgrade) {
    if let Ok(upgraded) = on_upgrade.await {
        let mut io = TokioIo::new(upgraded);
        let (mut r, mut w) = tokio::io::split(&mut io);
        let _ = tokio::io::copy(&mut r, &mut w).await;
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut rsp = Response::new(full(Bytes::new()));
    *rsp.status_mut() = code;
    rsp
}

/// Serves every connection accepted on `addr` in `pod` with `handle`, each in its own task.
fn serve_tcp<F, Fut>(pod: &Pod, addr: SocketAddr, handle: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = pod.listen(addr);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(stream));
        }
    });
}

/// A server-speaks-first service (like SMTP or MySQL): greets on accept, then echoes lines.
pub fn greeter(pod: &Pod, addr: SocketAddr) {
    serve_tcp(pod, addr, |mut stream| async move {
        if stream.write_all(GREETING.as_bytes()).await.is_err() {
            return;
        }
        let (r, mut w) = stream.split();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if w.write_all(format!("echo {line}\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });
}

/// A raw TCP echo server.
pub fn echo(pod: &Pod, addr: SocketAddr) {
    serve_tcp(pod, addr, |mut stream| async move {
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
}

/// A bulk sender for throughput: reads an 8-byte big-endian length, then writes that
/// many bytes and closes.
pub fn blast(pod: &Pod, addr: SocketAddr) {
    serve_tcp(pod, addr, |mut stream| async move {
        use tokio::io::AsyncReadExt;
        let Ok(mut left) = stream.read_u64().await else {
            return;
        };
        let chunk = vec![0x5au8; 64 * 1024];
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if stream.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            left -= n as u64;
        }
        let _ = stream.shutdown().await;
    });
}

/// The knobs of one [`faulty`] backend instance, turned while it runs.
#[derive(Debug, Default)]
pub struct Faults {
    /// Answer every request with this status (0: answer 200).
    pub status: std::sync::atomic::AtomicU16,
    /// Wait this long before answering.
    pub delay_ms: std::sync::atomic::AtomicU64,
    /// Answer gRPC calls with this status, trailers-only (0: status 0 with the request's
    /// message echoed).
    pub grpc_status: std::sync::atomic::AtomicU32,
    /// Requests received, by method: `GET` and others.
    pub gets: std::sync::atomic::AtomicU64,
    pub others: std::sync::atomic::AtomicU64,
    /// Connections accepted.
    pub connections: std::sync::atomic::AtomicU64,
    /// Requests being answered now, and the most there ever were at once.
    pub busy: std::sync::atomic::AtomicU64,
    pub most_busy: std::sync::atomic::AtomicU64,
    /// Send the headers and part of the body, then break the response.
    pub break_body: std::sync::atomic::AtomicBool,
    /// Send the headers at once, then the body one byte every this many milliseconds.
    pub trickle_ms: std::sync::atomic::AtomicU64,
    /// Stops listening: new connections are refused.
    closed: tokio::sync::Notify,
}

impl Faults {
    /// Closes the listener: from now on connects are refused, as by a dead process.
    pub fn close(&self) {
        self.closed.notify_one();
    }
}

/// An HTTP/1 + h2c backend with per-instance fault knobs: it answers `200` with its pod's
/// name, or the status set in `faults`, after the delay set there, and counts what it
/// received. Each `x-*` request header comes back as `echo-x-*`, and the length of the
/// request body as `body-bytes`.
pub fn faulty(pod: &Pod, addr: SocketAddr) -> std::sync::Arc<Faults> {
    use std::sync::{Arc, atomic::Ordering::Relaxed};
    let faults = Arc::new(Faults::default());
    let listener = pod.listen(addr);
    let name: Arc<str> = pod.name.as_str().into();
    let knobs = faults.clone();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => return,
                },
                _ = knobs.closed.notified() => return,
            };
            let _ = stream.set_nodelay(true);
            knobs.connections.fetch_add(1, Relaxed);
            let (knobs, name) = (knobs.clone(), name.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (knobs, name) = (knobs.clone(), name.clone());
                    async move {
                        if req.method() == http::Method::GET {
                            knobs.gets.fetch_add(1, Relaxed);
                        } else {
                            knobs.others.fetch_add(1, Relaxed);
                        }
                        let grpc = req
                            .headers()
                            .get(header::CONTENT_TYPE)
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        // What the request carried, for tests of header changes.
                        let echo: Vec<(http::HeaderName, HeaderValue)> = req
                            .headers()
                            .iter()
                            .filter(|(k, _)| k.as_str().starts_with("x-"))
                            .filter_map(|(k, v)| {
                                let name = format!("echo-{}", k.as_str());
                                Some((http::HeaderName::try_from(name).ok()?, v.clone()))
                            })
                            .collect();
                        let message = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if grpc {
                            let code = knobs.grpc_status.load(Relaxed);
                            let mut rsp =
                                Response::new(full(if code == 0 { message } else { Bytes::new() }));
                            let h = rsp.headers_mut();
                            h.insert(
                                header::CONTENT_TYPE,
                                HeaderValue::from_static("application/grpc"),
                            );
                            h.insert("grpc-status", HeaderValue::from(code));
                            h.insert(
                                "x-served-by",
                                HeaderValue::from_str(&name).expect("a pod name"),
                            );
                            return Ok::<_, Infallible>(rsp);
                        }
                        let delay = knobs.delay_ms.load(Relaxed);
                        let busy = knobs.busy.fetch_add(1, Relaxed) + 1;
                        knobs.most_busy.fetch_max(busy, Relaxed);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        knobs.busy.fetch_sub(1, Relaxed);
                        let status = knobs.status.load(Relaxed);
                        if knobs.break_body.load(Relaxed) {
                            // 200, a first chunk, then the stream breaks.
                            let (mut tx, body) = crate::body::channel(1);
                            tokio::spawn(async move {
                                let _ = tx.send_data(Bytes::from_static(b"partial")).await;
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                tx.abort("the backend breaks its response".into()).await;
                            });
                            return Ok::<_, Infallible>(Response::new(body.boxed()));
                        }
                        let trickle = knobs.trickle_ms.load(Relaxed);
                        if trickle > 0 {
                            let (mut tx, body) = crate::body::channel(1);
                            let bytes = Bytes::from(name.to_string());
                            tokio::spawn(async move {
                                for i in 0..bytes.len() {
                                    tokio::time::sleep(Duration::from_millis(trickle)).await;
                                    if tx.send_data(bytes.slice(i..i + 1)).await.is_err() {
                                        return;
                                    }
                                }
                            });
                            return Ok::<_, Infallible>(Response::new(body.boxed()));
                        }
                        let mut rsp = Response::new(full(name.to_string()));
                        rsp.headers_mut().extend(echo);
                        rsp.headers_mut()
                            .insert("body-bytes", HeaderValue::from(message.len()));
                        if status != 0 {
                            *rsp.status_mut() =
                                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                        }
                        Ok::<_, Infallible>(rsp)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    faults
}
