//! gRPC through the mTLS pair with a real implementation at both ends (Python `grpcio`,
//! the C core): every status code, message, trailing metadata and message arrives as
//! it does without the mesh, and a trailers-only answer stays one HEADERS frame that
//! ends the stream, as gRPC requires.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
};

use bytes::{BufMut, Bytes, BytesMut};
use http::Request;
use remora_tests::{
    Binaries, Pod, backend,
    client::{self, metrics, sample},
    e2e_enabled,
    mesh::{Mesh, WEB_IP},
};

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc")
}

/// The gRPC test server, running in a pod until dropped.
struct Server {
    _child: remora_tests::Reaped,
}

impl Server {
    fn start(pod: &Pod, addr: &str) -> Self {
        let mut child = pod
            .command("python3")
            .arg(scripts().join("server.py"))
            .arg(addr)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3: install Python 3 and grpcio (pip install grpcio)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the server's first line");
        assert_eq!(
            line.trim(),
            "ready",
            "the gRPC test server did not start: is grpcio installed (pip install grpcio)?"
        );
        Self {
            _child: remora_tests::Reaped(child),
        }
    }
}

/// What grpcio's client saw of every call to `target`, as JSON.
fn calls(pod: &Pod, target: &str) -> String {
    let out = pod
        .command("python3")
        .arg(scripts().join("client.py"))
        .arg(target)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "client.py failed (is grpcio installed? pip install grpcio):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// A gRPC message frame carrying `payload`.
fn frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// Calls `/test.Echo/Fail` with `code` over h2c from `pod`: the response's
/// `grpc-status` header, and whether its HEADERS frame ended the stream.
async fn trailers_only(pod: &Pod, addr: SocketAddr, code: u32) -> anyhow::Result<(String, bool)> {
    let mut h2 = client::http2(pod, addr).await?;
    let req = Request::post(format!("http://{addr}/test.Echo/Fail"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(backend::full(frame(code.to_string().as_bytes())))?;
    let rsp = h2.send_request(req).await?;
    anyhow::ensure!(rsp.status() == 200, "status {}", rsp.status());
    let status = rsp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    // A DATA frame after the HEADERS (even an empty one ending the stream) would be
    // waiting in the body: not at its end.
    Ok((status, hyper::body::Body::is_end_stream(rsp.body())))
}

/// Issue 12: each proxy turned a trailers-only response into HEADERS, then an empty
/// DATA frame ending the stream; grpc-core read that as a broken stream, so every gRPC
/// error reached the client as UNKNOWN ("Stream removed"), its message and metadata
/// lost, while the proxies' metrics showed the right status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_statuses_messages_and_metadata_cross_the_mesh_intact() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mesh = Mesh::start(&bins, "24h").await;
    let (web, frontend) = (mesh.cluster.pod("web"), mesh.cluster.pod("frontend"));
    let _server = Server::start(web, "0.0.0.0:50051");
    let meshed: SocketAddr = format!("{WEB_IP}:50051").parse()?;

    // Without the mesh (in web's own pod, over loopback), then through both proxies.
    let direct = calls(web, "127.0.0.1:50051");
    let through = calls(frontend, &meshed.to_string());
    let parsed: Vec<serde_json::Value> = serde_json::from_str(&direct)?;
    assert_eq!(parsed.len(), 34, "{direct}");
    for call in &parsed {
        assert_eq!(
            call[1], call[2],
            "the server answers the code asked for: {call}"
        );
    }
    let through: Vec<serde_json::Value> = serde_json::from_str(&through)?;
    for (via_mesh, without) in through.iter().zip(&parsed) {
        assert_eq!(
            via_mesh, without,
            "through the mesh (left) and directly (right)"
        );
    }
    assert_eq!(through.len(), parsed.len());

    // On the wire: one HEADERS frame ending the stream, as directly.
    for code in [1, 5, 13, 16] {
        let want = (code.to_string(), true);
        let local = "127.0.0.1:50051".parse()?;
        assert_eq!(
            trailers_only(web, local, code).await?,
            want,
            "direct {code}"
        );
        assert_eq!(
            trailers_only(frontend, meshed, code).await?,
            want,
            "mesh {code}"
        );
    }
    // The proxy's own answer to a gRPC client (nothing listens on 50099): trailers-only
    // UNAVAILABLE.
    let refused = format!("{WEB_IP}:50099").parse()?;
    assert_eq!(
        trailers_only(frontend, refused, 0).await?,
        ("14".to_string(), true)
    );

    let text = metrics(web).await;
    let inbound_5 = [("direction", "inbound"), ("grpc_status", "5")];
    assert!(
        sample(&text, "remora_http_responses_total", &inbound_5) >= 2.0,
        "{text}"
    );
    Ok(())
}
