//! Attacks from issue 11, kept as tests: each drives real pods (network namespaces,
//! real iptables, a real proxy) the way the attack did, and fails if it works again.

use std::{net::SocketAddr, path::Path, time::Duration};

use remora_tests::{
    Binaries, PodPair, Proxy, SERVER_V6, backend,
    client::{self, metrics, sample},
    e2e_enabled,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Issue 11: `remora-init` wrote ip6tables rules only with `--ipv6`, so on a pod with
/// IPv6 an app listening on `::` was reachable without the proxy, past every policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_is_intercepted_by_default_and_a_pod_that_cannot_be_refuses_to_start()
-> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let pods = PodPair::dual_stack();
    let server = &pods.server;
    // The app listens on `::`: IPv4 and IPv6 alike.
    let _ = backend::http(server, "[::]:8080".parse()?);
    let v6: SocketAddr = format!("[{SERVER_V6}]:8080").parse()?;
    let v4 = SocketAddr::new(server.ip, 8080);
    // The client pod is not meshed: an attacker on the pod network.
    let attacker = &pods.client;
    let (status, _) = client::get(attacker, v6, "/hello").await?;
    assert_eq!(status, 200, "the app answers over IPv6 before the mesh");

    // Where no IPv6 rules can be written, `remora-init` refuses rather than leave the
    // bypass: here ip6tables is missing from the init container's PATH.
    let path = bins.dir().join("no-ip6tables");
    std::fs::create_dir_all(&path)?;
    for tool in [
        "iptables-nft-save",
        "iptables-nft-restore",
        "iptables-legacy-save",
        "iptables-legacy-restore",
    ] {
        if let Some(found) = which(tool) {
            std::os::unix::fs::symlink(found, path.join(tool))?;
        }
    }
    let out = server
        .command("env")
        .arg(format!("PATH={}", path.display()))
        .arg(&bins.init)
        .output()?;
    assert!(!out.status.success(), "started without IPv6 rules");
    let err = text(&out.stderr);
    assert!(
        err.contains("the pod has IPv6") && err.contains("--no-ipv6"),
        "{err}"
    );

    // The default intercepts both families: a deny-by-default proxy refuses both.
    server.intercept(&bins);
    assert!(
        server
            .nat_rules_v6()
            .contains("-j REDIRECT --to-ports 4143")
    );
    let proxy = Proxy::start(server, &bins, &[("REMORA_DEFAULT_INBOUND_POLICY", "deny")]).await;
    for addr in [v6, v4] {
        let (status, body) = client::get(attacker, addr, "/hello").await?;
        assert_eq!(status, 403, "{addr}: {body}");
    }
    let scraped = metrics(server).await;
    assert_eq!(
        sample(
            &scraped,
            "remora_authz_denied_total",
            &[("direction", "inbound")]
        ),
        2.0,
        "{scraped}"
    );

    // The opt-out does what it says: IPv6 then bypasses the proxy (so this test can
    // tell interception from its absence).
    drop(proxy);
    let cleanup = server.init(&bins, &["--cleanup"]);
    assert!(cleanup.status.success(), "{}", text(&cleanup.stderr));
    let opted_out = server.init(&bins, &["--no-ipv6"]);
    assert!(opted_out.status.success(), "{}", text(&opted_out.stderr));
    assert!(text(&opted_out.stderr).contains("bypass the proxy"));
    let _proxy = Proxy::start(server, &bins, &[("REMORA_DEFAULT_INBOUND_POLICY", "deny")]).await;
    assert_eq!(client::get(attacker, v4, "/hello").await?.0, 403);
    assert_eq!(
        client::get(attacker, v6, "/hello").await?.0,
        200,
        "IPv6 bypasses"
    );
    Ok(())
}

/// Issue 11: invalid chunked bodies got `502` and counted as server failures, so any
/// client could inflate a Service's error rate. They get `400`, and no 5xx is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_body_is_the_clients_fault_not_a_server_failure() -> anyhow::Result<()>
{
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let pods = PodPair::new();
    // The app reads the whole body before it answers.
    let _ = backend::http(&pods.server, "0.0.0.0:8080".parse()?);
    let app = SocketAddr::new(pods.server.ip, 8080);
    pods.server.intercept(&bins);
    let _server_proxy = Proxy::start(&pods.server, &bins, &[]).await;
    const BAD: &[&[u8]] = &[
        // A chunk size that is not hex.
        b"POST /grpc HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        // A chunk longer than it said.
        b"POST /grpc HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
    ];
    // An unmeshed client straight to the server's proxy, then a meshed one through both.
    let mut client_proxy = None;
    for meshed in [false, true] {
        if meshed {
            pods.client.intercept(&bins);
            client_proxy = Some(Proxy::start(&pods.client, &bins, &[]).await);
        }
        for request in BAD {
            let answer = raw(&pods.client, app, request).await?;
            assert!(
                answer.starts_with("HTTP/1.1 400 "),
                "meshed {meshed}: {answer}"
            );
            assert!(
                answer.contains("remora-error: the request body was malformed"),
                "{answer}"
            );
        }
        let good = raw(
            &pods.client,
            app,
            b"POST /grpc HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .await?;
        assert!(good.starts_with("HTTP/1.1 200 "), "{good}");
    }
    assert!(client_proxy.is_some());
    for pod in [&pods.client, &pods.server] {
        let scraped = metrics(pod).await;
        for line in scraped
            .lines()
            .filter(|l| l.starts_with("remora_http_responses_total"))
        {
            assert!(!line.contains("status_code=\"5"), "{}: {line}", pod.name);
            assert!(
                !line.contains("classification=\"failure\""),
                "{}: {line}",
                pod.name
            );
        }
    }
    let server = metrics(&pods.server).await;
    let bad_requests = [("direction", "inbound"), ("status_code", "400")];
    assert!(
        sample(&server, "remora_http_responses_total", &bad_requests) >= 2.0,
        "{server}"
    );
    Ok(())
}

/// Issue 11: 2,000 slowloris connections held 4,649 file descriptors and 48 MB,
/// never returned. Inbound connections are capped; past the cap they are reset and
/// counted, and a slot frees when a connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_connections_are_capped_and_counted() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let pods = PodPair::new();
    backend::echo(&pods.server, "0.0.0.0:7001".parse()?);
    let echo = SocketAddr::new(pods.server.ip, 7001);
    pods.server.intercept(&bins);
    let _proxy = Proxy::start(
        &pods.server,
        &bins,
        &[("REMORA_INBOUND_MAX_CONNECTIONS", "5")],
    )
    .await;
    // Five silent clients hold every slot (the proxy waits for their first bytes).
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(pods.client.connect(echo).await?);
    }
    let refused_count = async || {
        let text = metrics(&pods.server).await;
        sample(
            &text,
            "remora_tcp_connections_refused_total",
            &[("direction", "inbound")],
        )
    };
    // The sixth is reset at once (the reset may even beat the end of its connect).
    let sixth = async {
        let mut s = pods.client.connect(echo).await?;
        let _ = s.write_all(b"\x00hello").await;
        let mut buf = [0u8; 16];
        s.read(&mut buf).await
    };
    let read = tokio::time::timeout(Duration::from_secs(5), sixth).await?;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the sixth connection was served: {read:?}"
    );
    assert_eq!(refused_count().await, 1.0);
    // One leaves: the next client is served.
    drop(held.pop());
    let mut served = false;
    for _ in 0..50 {
        // Until the proxy has seen the close, a new client may still be reset.
        let mut back = [0u8; 6];
        let round_trip = async {
            let mut s = pods.client.connect(echo).await?;
            s.write_all(b"\x00hello").await?;
            s.read_exact(&mut back).await?;
            anyhow::Ok(())
        };
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), round_trip).await {
            assert_eq!(&back, b"\x00hello");
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "no slot freed after a connection ended");
    Ok(())
}

/// The admin port is open to the pod network for probes and scrapes; what changes the
/// proxy (`/shutdown`, `/log-level`) answers only loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_changes_nothing_for_a_client_off_the_pod() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let pods = PodPair::new();
    pods.server.intercept(&bins);
    let mut proxy = Proxy::start(&pods.server, &bins, &[]).await;
    let admin = SocketAddr::new(pods.server.ip, 4191);
    let attacker = &pods.client;
    for (what, request) in [
        (
            "shutdown",
            "POST /shutdown HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        ),
        (
            "log level",
            "PUT /log-level HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\ntrace",
        ),
        (
            "log level read",
            "GET /log-level HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        ),
    ] {
        let answer = raw(attacker, admin, request.as_bytes()).await?;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{what}: {answer}");
    }
    for path in ["/ready", "/live", "/metrics"] {
        assert_eq!(client::get(attacker, admin, path).await?.0, 200, "{path}");
    }
    assert_eq!(
        proxy.wait(Duration::from_millis(500)).await,
        None,
        "still running"
    );
    Ok(())
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        })
        .or_else(|| Some(Path::new("/usr/sbin").join(tool)).filter(|p| p.is_file()))
}

/// Writes `request` on a new connection to `addr` from `pod` and reads the answer.
async fn raw(pod: &remora_tests::Pod, addr: SocketAddr, request: &[u8]) -> anyhow::Result<String> {
    let mut s = pod.connect(addr).await?;
    s.write_all(request).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
    Ok(text(&out))
}
