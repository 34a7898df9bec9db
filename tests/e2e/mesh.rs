//! End to end with identity, on the harness's mesh (`remora_tests::mesh`): a controller
//! with a development CA and static tokens, and three meshed pods (`frontend`, `other`,
//! and `web` serving a Service). Traffic between
//! them is mTLS with the right identities on both sides, a packet capture on the wire
//! never shows the response's plaintext, an AuthorizationPolicy in the controller's
//! folder decides who may call `web` (and changes take effect live), and certificates
//! that live 10 seconds rotate under continuous traffic without a failed request.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use http::Request;
use http_body_util::BodyExt;
use remora_tests::{
    Binaries, Pod, backend,
    client::{self, metrics, sample},
    e2e_enabled, eventually,
    mesh::{CLUSTER_IP, MARKER, Mesh, WEB_IP, allow_only, spiffe},
    write_atomically,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /hello` on the Service: status, the `remora-error` header, and the body.
async fn hello(pod: &Pod) -> anyhow::Result<(u16, String, String)> {
    let addr: SocketAddr = CLUSTER_IP.parse()?;
    let mut sender = client::http1(pod, addr).await?;
    let req = Request::get("/hello")
        .header("host", "web.shop.svc.cluster.local")
        .body(client::empty())?;
    let rsp = sender.send_request(req).await?;
    let status = rsp.status().as_u16();
    let error = rsp
        .headers()
        .get("remora-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((status, error, String::from_utf8_lossy(&body).into()))
}

/// A TCP round trip to `web`'s echo port: Ok(true) echoed, Ok(false) closed on us.
/// (Payloads start with a NUL: words and spaces would look like the start of an HTTP
/// request line, which detection waits to see the end of.)
async fn echo(pod: &Pod, payload: &[u8]) -> anyhow::Result<bool> {
    let mut s = pod.connect(format!("{WEB_IP}:7001").parse()?).await?;
    s.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await?;
    Ok(read.is_ok() && back == payload)
}

/// tcpdump on a pod's `eth0`, writing packets as they come.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Starts the capture and waits until tcpdump writes its file: a capture that cannot
    /// run fails here with tcpdump's own words, not later as an empty capture.
    fn start(pod: &Pod, file: PathBuf) -> Self {
        let mut child = pod
            .command("tcpdump")
            .args(["-i", "eth0", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec runs");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !file.exists() {
            if let Some(status) = child.try_wait().expect("wait") {
                let mut err = String::new();
                let _ =
                    std::io::Read::read_to_string(child.stderr.as_mut().expect("piped"), &mut err);
                panic!("tcpdump in {} exited ({status}): {}", pod.name, err.trim());
            }
            assert!(Instant::now() < deadline, "tcpdump wrote no file within 5s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, file }
    }

    fn stop(mut self) -> Vec<u8> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap_or_default()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `GET /hello` from `pod` straight to `web`'s pod IP on `port`: the status.
async fn hello_at(pod: &Pod, port: u16) -> anyhow::Result<u16> {
    let addr = SocketAddr::new(WEB_IP.parse()?, port);
    Ok(client::get(pod, addr, "/hello").await?.0)
}

/// Issue 11: the proxy watched at most 256 ports and forgot the others; with the
/// controller away, a forgotten port fell back to `all-unauthenticated`. A port scan
/// followed by a request to a protected port got 200 where 403 was due, for meshed and
/// unmeshed clients alike. The last answer covers every port and stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_policy_stays_in_force_through_a_controller_outage_and_a_port_scan()
-> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mut mesh = Mesh::start(&bins, "24h").await;
    write_atomically(&mesh.objects, "policy.yaml", &allow_only("frontend"));
    let (frontend, other, web) = (
        mesh.cluster.pod("frontend"),
        mesh.cluster.pod("other"),
        mesh.cluster.pod("web"),
    );
    // The controller's pod has no proxy: an unmeshed client on the pod network.
    let unmeshed = mesh.cluster.pod("ctl");
    // (frontend's proxy learns web's pod IP meanwhile: without a controller, a
    // destination never asked about is passthrough, with no mTLS to prove who calls.)
    eventually("the policy applies", async || {
        match (
            hello_at(other, 8080).await,
            hello_at(unmeshed, 8080).await,
            hello_at(frontend, 8080).await,
        ) {
            (Ok(403), Ok(403), Ok(200)) => Ok(()),
            got => Err(format!("{got:?}")),
        }
    })
    .await;
    // A full scan (65,535 ports) once cost the controller 13 -> 97 MB: the proxy opened a
    // policy stream per port it saw, and the controller kept a watch per (pod, port). One stream per pod
    // now answers for every port, so a scan asks the controller nothing.
    let controller_at = "127.0.0.1:9990".parse()?;
    let streams = async || {
        let (_, text) = client::get(unmeshed, controller_at, "/metrics").await?;
        anyhow::Ok(sample(&text, "remora_controller_streams_open", &[]))
    };
    let (streams_before, rss_before) = (streams().await?, mesh.controller.rss_kib());
    for port in 21_000..21_300 {
        assert_eq!(hello_at(unmeshed, port).await?, 403, "port {port}");
    }
    let (streams_after, rss_after) = (streams().await?, mesh.controller.rss_kib());
    eprintln!(
        "a 300-port scan: controller streams {streams_before} -> {streams_after}, \
         RSS {rss_before} -> {rss_after} KiB"
    );
    assert_eq!(streams_after, streams_before, "the scan opened streams");
    assert!(
        rss_after < rss_before + 4 * 1024,
        "the controller grew from {rss_before} to {rss_after} KiB"
    );
    mesh.controller.kill();

    // A scan of 300 ports web's proxy never heard of, from the unmeshed client.
    for port in 20_000..20_300 {
        assert_eq!(hello_at(unmeshed, port).await?, 403, "port {port}");
    }
    for _ in 0..3 {
        assert_eq!(hello_at(unmeshed, 8080).await?, 403, "unmeshed");
        assert_eq!(
            hello_at(other, 8080).await?,
            403,
            "meshed, another identity"
        );
        assert_eq!(hello_at(frontend, 8080).await?, 200, "the identity allowed");
    }
    let text = metrics(web).await;
    assert_eq!(
        sample(&text, "remora_authz_policy_fallbacks_total", &[]),
        0.0,
        "the configured default never stood in: {text}"
    );
    let scanned = [("direction", "inbound"), ("target", "other")];
    assert!(
        sample(&text, "remora_authz_denied_total", &scanned) >= 300.0,
        "{text}"
    );
    Ok(())
}

/// `curl --path-as-is` from `pod` to `web`'s port 8080: the status it saw.
fn curl(pod: &Pod, path: &str) -> u16 {
    let out = pod
        .command("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--path-as-is",
        ])
        .arg(format!("http://{WEB_IP}:8080{path}"))
        .output()
        .expect("curl: install it (apt-get install curl)");
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

/// Issue 11: a grant for `GET /public*` let `/public/..;/admin`, `/public/.;/admin`,
/// `/public/..%3b/admin` and `/public/%252e%252e/admin` through unchanged, which servlet
/// containers and double-decoding apps read as `/admin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_grant_admits_no_path_an_app_could_read_as_another() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mesh = Mesh::start(&bins, "24h").await;
    write_atomically(
        &mesh.objects,
        "policy.yaml",
        &format!(
            "{}---\n\
             apiVersion: policy.remora.io/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: web-public, namespace: shop}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n\
             \x20 from: [{{unauthenticated: true}}]\n\
             \x20 http: [{{path: {{type: PathPrefix, value: /public}}, method: GET}}]\n",
            allow_only("frontend")
        ),
    );
    let (unmeshed, frontend) = (mesh.cluster.pod("ctl"), mesh.cluster.pod("frontend"));
    eventually("the policies apply", async || {
        match (curl(unmeshed, "/admin"), curl(unmeshed, "/public/x")) {
            (403, 404) => Ok(()),
            got => Err(format!("{got:?}")),
        }
    })
    .await;
    for sneaky in [
        "/public/..;/admin",
        "/public/.;/admin",
        "/public/..%3b/admin",
        "/public/%252e%252e/admin",
        "/public/%2e%2e/admin",
        "/public/../admin",
    ] {
        assert_eq!(curl(unmeshed, sneaky), 403, "{sneaky}");
        // The port-level grant still covers them: the app decides what they mean.
        assert_eq!(curl(frontend, sneaky), 404, "frontend: {sneaky}");
    }
    Ok(())
}

/// Issue 12: requests that waited for a Service's endpoints were labelled
/// `tls="false"`, `peer_identity=""` on the client, though they went over mTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waited_for_endpoints_is_labelled_as_it_went() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mesh = Mesh::start(&bins, "24h").await;
    let late = "apiVersion: v1\nkind: Service\nmetadata: {name: late, namespace: shop}\n\
                spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80, targetPort: 8080}]}\n";
    write_atomically(&mesh.objects, "late.yaml", late);
    let frontend = mesh.cluster.pod("frontend");
    let addr: SocketAddr = "10.96.0.20:80".parse()?;
    // The Service is known before its endpoints: wait until discovery says so (a 503).
    eventually("the Service is known", async || {
        match client::get(frontend, addr, "/hello").await {
            Ok((503, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let pending = {
        let pod = Pod::borrowed(frontend.name.clone(), frontend.ip);
        tokio::spawn(async move { client::get(&pod, addr, "/hello").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let web = &mesh.cluster.pod("web").name;
    write_atomically(
        &mesh.objects,
        "late.yaml",
        &format!(
            "{late}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: late-1, namespace: shop, labels: {{kubernetes.io/service-name: late}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n\
             - {{addresses: [\"{WEB_IP}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {web}}}}}\n"
        ),
    );
    let (status, body) = pending.await??;
    assert_eq!((status, body.as_str()), (200, MARKER));
    let web_id = spiffe("web");
    let text = metrics(frontend).await;
    let mtls = [
        ("direction", "outbound"),
        ("target", "late.shop:80"),
        ("tls", "true"),
        ("peer_identity", web_id.as_str()),
    ];
    assert!(
        sample(&text, "remora_http_requests_total", &mtls) >= 1.0,
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_pods_speak_mtls_and_inbound_policy_decides_who_may_call() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mesh = Mesh::start(&bins, "24h").await;
    let (frontend, other, web) = (
        mesh.cluster.pod("frontend"),
        mesh.cluster.pod("other"),
        mesh.cluster.pod("web"),
    );

    // Both callers reach the Service while no policy selects web (the default admits
    // everyone); the wire never carries the response in plaintext.
    let capture = Capture::start(web, bins.dir().join("web.pcap"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for caller in [frontend, other] {
        for _ in 0..5 {
            let (status, _, body) = hello(caller).await?;
            assert_eq!((status, body.as_str()), (200, MARKER));
        }
        assert!(
            echo(caller, b"\x00opaque bytes over mTLS")
                .await
                .expect("TCP echo")
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pcap = capture.stop();
    assert!(
        contains(&pcap, b"web.shop.serviceaccount.identity.cluster.local"),
        "the capture saw no ClientHello naming web's identity ({} bytes captured)",
        pcap.len()
    );
    assert!(
        !contains(&pcap, MARKER.as_bytes()),
        "the response crossed the wire in plaintext"
    );
    assert!(!contains(&pcap, b"\x00opaque bytes over mTLS"));
    // The ServerHello's key_share (extension 0x0033, 1,124 bytes) chose the hybrid
    // X25519MLKEM768 (0x11ec, a 1,120-byte share: ML-KEM-768 ciphertext + X25519).
    assert!(
        contains(&pcap, &[0x00, 0x33, 0x04, 0x64, 0x11, 0xec, 0x04, 0x60]),
        "no ServerHello with a post-quantum (X25519MLKEM768) key share on the wire"
    );

    // Both sides label the traffic with TLS and the peer's identity.
    let out = metrics(frontend).await;
    let want = spiffe("web");
    let outbound = [
        ("direction", "outbound"),
        ("target", "web.shop:80"),
        ("tls", "true"),
        ("peer_identity", want.as_str()),
    ];
    assert!(
        sample(&out, "remora_http_requests_total", &outbound) >= 5.0,
        "{out}"
    );
    let inb = metrics(web).await;
    for sa in ["frontend", "other"] {
        let id = spiffe(sa);
        let inbound = [
            ("direction", "inbound"),
            ("target", "8080"),
            ("tls", "true"),
            ("peer_identity", id.as_str()),
        ];
        assert!(
            sample(&inb, "remora_http_requests_total", &inbound) >= 5.0,
            "{sa}: {inb}"
        );
        let tcp = [
            ("direction", "inbound"),
            ("target", "7001"),
            ("tls", "true"),
            ("peer_identity", id.as_str()),
        ];
        assert!(
            sample(&inb, "remora_tcp_connections_opened_total", &tcp) >= 1.0,
            "{sa}: {inb}"
        );
    }

    // Only frontend may call web: other gets a 403 that says why, and its TCP is closed.
    write_atomically(&mesh.objects, "policy.yaml", &allow_only("frontend"));
    eventually("other is refused", async || match hello(other).await {
        Ok((403, error, _)) if error.contains("unauthorized") => Ok(()),
        r => Err(format!("{r:?}")),
    })
    .await;
    for _ in 0..5 {
        assert_eq!(hello(frontend).await?.0, 200);
        assert_eq!(hello(other).await?.0, 403);
    }
    assert!(
        echo(frontend, b"\x00still allowed")
            .await
            .expect("TCP echo")
    );
    assert!(!echo(other, b"\x00not allowed").await.unwrap_or(false));
    let denied = [("direction", "inbound"), ("peer_identity", "")];
    let inb = metrics(web).await;
    let other_id = spiffe("other");
    let denied_other = [
        ("direction", "inbound"),
        ("peer_identity", other_id.as_str()),
    ];
    assert!(
        sample(&inb, "remora_authz_denied_total", &denied_other) >= 6.0,
        "{inb}"
    );
    assert_eq!(
        sample(&inb, "remora_authz_denied_total", &denied),
        0.0,
        "nothing unauthenticated was sent"
    );

    // The policy changes in the folder: the roles swap, with nothing restarted.
    write_atomically(&mesh.objects, "policy.yaml", &allow_only("other"));
    eventually("frontend is refused and other allowed", async || {
        match (hello(frontend).await, hello(other).await) {
            (Ok((403, _, _)), Ok((200, _, _))) => Ok(()),
            r => Err(format!("{r:?}")),
        }
    })
    .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_certificates_rotate_under_traffic_without_a_failed_request()
-> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mesh = Mesh::start(&bins, "10s").await;
    let (frontend, web) = (mesh.cluster.pod("frontend"), mesh.cluster.pod("web"));
    let expiry = |text: &str| sample(text, "remora_identity_cert_expiry_timestamp_seconds", &[]);
    let mut expiries = vec![expiry(&metrics(frontend).await)];
    let mut web_expiries = vec![expiry(&metrics(web).await)];
    let (mut ok, mut failed) = (0u32, Vec::new());
    // Bounded: 40 s, at most 20,000 rounds.
    let deadline = Instant::now() + Duration::from_secs(40);
    for round in 0..20_000u32 {
        if Instant::now() > deadline {
            break;
        }
        // Pooled HTTP over one mTLS connection, and a new TLS handshake per TCP connection.
        match hello(frontend).await {
            Ok((200, _, body)) if body == MARKER => ok += 1,
            r => failed.push(format!("round {round} http: {r:?}")),
        }
        match echo(frontend, format!("\x00round {round}").as_bytes()).await {
            Ok(true) => ok += 1,
            r => failed.push(format!("round {round} tcp: {r:?}")),
        }
        if round % 20 == 0 {
            for (pod, seen) in [(frontend, &mut expiries), (web, &mut web_expiries)] {
                let e = expiry(&metrics(pod).await);
                if seen.last() != Some(&e) {
                    seen.push(e);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failed.is_empty(), "{} ok, failed: {failed:#?}", ok);
    assert!(ok > 100, "only {ok} requests in 40 s");
    // Several renewals on both sides during the run.
    assert!(expiries.len() >= 4, "frontend certificates: {expiries:?}");
    assert!(
        web_expiries.len() >= 4,
        "web certificates: {web_expiries:?}"
    );
    Ok(())
}

/// Requests from `frontend` to `web` while something else happens: pooled HTTP over one
/// mTLS connection, and a new TLS handshake per TCP connection.
#[derive(Default)]
struct Load {
    ok: u32,
    failed: Vec<String>,
    round: u32,
}

impl Load {
    /// Rounds of requests until `done` holds (asked every 25 rounds), for at most `secs`.
    async fn until(
        &mut self,
        pod: &Pod,
        secs: u64,
        what: &str,
        mut done: impl AsyncFnMut() -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.round.is_multiple_of(25) && done().await {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: not within {secs} s");
            let round = self.round;
            self.round += 1;
            match hello(pod).await {
                Ok((200, _, body)) if body == MARKER => self.ok += 1,
                r => self.failed.push(format!("round {round} http: {r:?}")),
            }
            match echo(pod, format!("\x00round {round}").as_bytes()).await {
                Ok(true) => self.ok += 1,
                r => self.failed.push(format!("round {round} tcp: {r:?}")),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A root and an issuer under it, made with openssl as an operator would: the root's
/// certificate, and the issuer's certificate and key (SEC1 P-256).
fn openssl_ca(dir: &std::path::Path, name: &str) -> (String, String, String) {
    let path = |f: &str| dir.join(format!("{name}-{f}")).display().to_string();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        path("ext"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    for key in ["root.key", "issuer.key"] {
        openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &path(key),
        ]);
    }
    let subject = |what: &str| format!("/CN=Remora test {what} {name}");
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &path("root.key"),
        "-subj",
        &subject("root"),
        "-days",
        "30",
        "-sha256",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        &path("root.pem"),
    ]);
    openssl(&[
        "req",
        "-new",
        "-key",
        &path("issuer.key"),
        "-subj",
        &subject("issuer"),
        "-out",
        &path("issuer.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path("issuer.csr"),
        "-CA",
        &path("root.pem"),
        "-CAkey",
        &path("root.key"),
        "-CAcreateserial",
        "-days",
        "30",
        "-sha256",
        "-extfile",
        &path("ext"),
        "-out",
        &path("issuer.pem"),
    ]);
    let read = |f: &str| std::fs::read_to_string(path(f)).unwrap();
    (read("root.pem"), read("issuer.pem"), read("issuer.key"))
}

/// Replaces `name` in the controller's CA folder at once, readable by its UID only.
fn replace_ca_file(dir: &std::path::Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::os::unix::fs::chown(&tmp, Some(2102), Some(2102)).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// Issue 17: the trust anchors rotated (old and new overlapping, then the old one
/// dropped) and the issuer switched, under traffic, with no restart and no failed
/// request. The issuer is switched straight after the new root is added, too early:
/// the controller holds it back until every proxy trusts its root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_anchors_and_the_issuer_rotate_under_traffic_without_a_failed_request()
-> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mesh = Mesh::start(&bins, "10s").await;
    let (frontend, ctl) = (mesh.cluster.pod("frontend"), mesh.cluster.pod("ctl"));
    let pods: Vec<&Pod> = ["frontend", "other", "web"]
        .iter()
        .map(|r| mesh.cluster.pod(r))
        .collect();
    let old_root = std::fs::read_to_string(mesh.ca.join("trust-anchors.pem"))?;
    let (new_root, new_issuer, new_key) = openssl_ca(bins.dir(), "b");
    let controller_metrics = async || {
        let (status, text) = client::get(ctl, "127.0.0.1:9990".parse().unwrap(), "/metrics")
            .await
            .expect("scrape the controller");
        assert_eq!(status, 200);
        text
    };
    let reloads = async |result: &str| {
        sample(
            &controller_metrics().await,
            "remora_controller_issuer_reloads_total",
            &[("result", result)],
        )
    };
    let anchors_everywhere = async |n: f64| {
        for pod in &pods {
            if sample(&metrics(pod).await, "remora_identity_trust_anchors", &[]) != n {
                return false;
            }
        }
        true
    };
    let controller_issuer = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &frontend.name,
                "openssl",
                "s_client",
                "-connect",
            ])
            .arg("10.77.0.100:8086")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find_map(|l| l.trim().strip_prefix("i:").map(str::to_owned))
            .unwrap_or_else(|| format!("no chain in: {text}"))
    };
    let mut load = Load::default();
    let started = Instant::now();
    load.until(frontend, 20, "traffic before", async || {
        started.elapsed() > Duration::from_secs(3)
    })
    .await;
    assert!(anchors_everywhere(1.0).await);
    let issuer = controller_issuer();
    assert!(issuer.contains("development issuer"), "{issuer}");

    // 1. The new root beside the old one and, in the same breath, the new issuer: too
    // early, as no proxy trusts its root yet. The controller hands out the bundle and
    // holds the issuer back.
    replace_ca_file(
        &mesh.ca,
        "trust-anchors.pem",
        &format!("{old_root}{new_root}"),
    );
    replace_ca_file(&mesh.ca, "issuer.key", &new_key);
    replace_ca_file(&mesh.ca, "issuer.pem", &new_issuer);
    load.until(frontend, 20, "the new issuer held back", async || {
        reloads("held").await == 1.0
    })
    .await;
    assert_eq!(reloads("reloaded").await, 0.0);
    load.until(frontend, 20, "both roots in every proxy", async || {
        anchors_everywhere(2.0).await
    })
    .await;

    // 2. One lifetime after the root was handed out, the new issuer signs; the
    // controller's own certificate first.
    load.until(frontend, 30, "the new issuer in use", async || {
        reloads("reloaded").await == 1.0
    })
    .await;
    load.until(frontend, 10, "the controller certified by it", async || {
        controller_issuer().contains("issuer b")
    })
    .await;
    // 3. Once the old issuer's certificates have all expired, as the controller says.
    let retired_until = sample(
        &controller_metrics().await,
        "remora_controller_issuer_retired_until_timestamp_seconds",
        &[],
    );
    let epoch = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    assert!(
        retired_until > epoch() - 10.0 && retired_until < epoch() + 11.0,
        "{retired_until}"
    );
    load.until(frontend, 15, "old certificates expired", async || {
        epoch() > retired_until
    })
    .await;

    replace_ca_file(&mesh.ca, "trust-anchors.pem", &new_root);
    load.until(
        frontend,
        30,
        "only the new root in every proxy",
        async || anchors_everywhere(1.0).await,
    )
    .await;
    let settled = Instant::now();
    load.until(frontend, 15, "traffic after", async || {
        settled.elapsed() > Duration::from_secs(8)
    })
    .await;

    assert!(
        load.failed.is_empty(),
        "{} ok, failed: {:#?}",
        load.ok,
        load.failed
    );
    assert!(load.ok > 200, "only {} requests", load.ok);
    eprintln!("rotated under {} requests, none failed", load.ok);
    assert_eq!(reloads("failed").await, 0.0);
    for pod in &pods {
        let text = metrics(pod).await;
        assert_eq!(
            sample(&text, "remora_identity_trust_anchors_refused_total", &[]),
            0.0
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_crosses_the_mesh_intact() -> anyhow::Result<()> {
    if !e2e_enabled() {
        return Ok(());
    }
    let bins = Binaries::new();
    let mesh = Mesh::start(&bins, "24h").await;
    let (frontend, web) = (mesh.cluster.pod("frontend"), mesh.cluster.pod("web"));
    let addr: SocketAddr = CLUSTER_IP.parse()?;

    // gRPC-style HTTP/2 with trailers, over the proxies' multiplexed mTLS connection.
    // The app's own `remora-orig-proto` is dropped: only a peer proxy may say that a
    // request was HTTP/1 (had it been believed, the trailers would be lost).
    let mut h2 = client::http2(frontend, addr).await?;
    let message = bytes::Bytes::from(vec![7u8; 256 * 1024]);
    let uri = "http://web.shop.svc.cluster.local/grpc";
    let orig_proto = [("remora-orig-proto", "HTTP/1.0")];
    let (_, trailers) = client::grpc(&mut h2, uri, message.clone(), &orig_proto)
        .await
        .expect("trailers crossed the mesh");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        trailers["x-received-bytes"],
        message.len().to_string().as_str()
    );

    // HTTP/1.0 and HTTP/1.1 ride HTTP/2 between the proxies and reach the app as sent.
    for version in [http::Version::HTTP_10, http::Version::HTTP_11] {
        let mut h1 = client::http1(frontend, addr).await?;
        let req = Request::post("/echo")
            .version(version)
            .header("host", "web.shop.svc.cluster.local")
            .header("content-length", "5")
            .body(backend::full(bytes::Bytes::from_static(b"hello")))?;
        let rsp = h1.send_request(req).await?;
        assert_eq!(rsp.status(), 200, "{version:?}");
        assert_eq!(rsp.version(), version, "the client sees its own version");
        assert_eq!(&rsp.into_body().collect().await?.to_bytes()[..], b"hello");
    }

    // A WebSocket upgrade needs HTTP/1 end to end: it rides its own mTLS connection.
    let mut h1 = client::http1(frontend, addr).await?;
    let req = Request::get("/ws")
        .header("host", "web.shop.svc.cluster.local")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(client::empty())?;
    let rsp = h1.send_request(req).await?;
    assert_eq!(rsp.status(), 101);
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(rsp).await?);
    for msg in ["first frame", "second frame after the first"] {
        io.write_all(msg.as_bytes()).await?;
        let mut back = vec![0u8; msg.len()];
        io.read_exact(&mut back).await?;
        assert_eq!(back, msg.as_bytes());
    }

    // All of it was mTLS on the server's side.
    let text = metrics(web).await;
    let id = spiffe("frontend");
    let plain = [("direction", "inbound"), ("tls", "false")];
    let mtls = [
        ("direction", "inbound"),
        ("tls", "true"),
        ("peer_identity", id.as_str()),
    ];
    assert_eq!(
        sample(&text, "remora_http_requests_total", &plain),
        0.0,
        "{text}"
    );
    assert!(
        sample(&text, "remora_http_requests_total", &mtls) >= 4.0,
        "{text}"
    );
    // Two connections between the proxies: one HTTP/2 carrying the gRPC call and both
    // HTTP/1 requests, and the WebSocket's own.
    let conns = [
        ("direction", "inbound"),
        ("target", "8080"),
        ("tls", "true"),
    ];
    assert_eq!(
        sample(&text, "remora_tcp_connections_opened_total", &conns),
        2.0,
        "{text}"
    );
    Ok(())
}
