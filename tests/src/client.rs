//! Clients that run inside a pod: HTTP/1 and h2c connections, and metric scraping.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::{Pod, backend::Body};

/// An empty request body.
pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|n| match n {}).boxed()
}

/// An HTTP/1 connection from `pod` to `addr`.
pub async fn http1(pod: &Pod, addr: SocketAddr) -> anyhow::Result<http1::SendRequest<Body>> {
    let io = TokioIo::new(pod.connect(addr).await?);
    let (sender, conn) = http1::Builder::new().handshake(io).await?;
    tokio::spawn(conn.with_upgrades());
    Ok(sender)
}

/// An h2c (prior knowledge) connection from `pod` to `addr`.
pub async fn http2(pod: &Pod, addr: SocketAddr) -> anyhow::Result<http2::SendRequest<Body>> {
    let io = TokioIo::new(pod.connect(addr).await?);
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(io)
        .await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A gRPC-style call (`POST uri` with `message`, `content-type: application/grpc`,
/// `te: trailers`, and `headers`): the answer must be 200 with trailers; its body and
/// trailers.
pub async fn grpc(
    sender: &mut http2::SendRequest<Body>,
    uri: &str,
    message: Bytes,
    headers: &[(&str, &str)],
) -> anyhow::Result<(Bytes, http::HeaderMap)> {
    let mut req = Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let rsp = sender
        .send_request(req.body(crate::backend::full(message))?)
        .await?;
    anyhow::ensure!(rsp.status() == 200, "status {}", rsp.status());
    let collected = rsp.into_body().collect().await?;
    let trailers = collected
        .trailers()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no trailers"))?;
    Ok((collected.to_bytes(), trailers))
}

/// `GET path` over a new HTTP/1 connection: status and body.
pub async fn get(pod: &Pod, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut sender = http1(pod, addr).await?;
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new().map_err(|n| match n {}).boxed())?;
    let rsp = sender.send_request(req).await?;
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The proxy's `/metrics` in `pod`.
pub async fn metrics(pod: &Pod) -> String {
    let (status, text) = get(pod, "127.0.0.1:4191".parse().unwrap(), "/metrics")
        .await
        .expect("scrape /metrics");
    assert_eq!(status, 200, "{text}");
    text
}

/// The sum of the samples of `name` whose labels include every pair in `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
