//! The proxy's identity, in-process against a real controller over real gRPC with TLS:
//! `/ready` waits for the first certificate, which is renewed before it expires; a
//! proxy whose token is not accepted never becomes ready, nor does one that expects
//! the controller under another name.

use std::{collections::HashMap, net::SocketAddr, path::Path, time::Duration};

use remora_admin::LogLevel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: admin\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf[9..12].parse().unwrap();
    (
        status,
        buf.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

fn expiry(metrics: &str) -> Option<i64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("remora_identity_cert_expiry_timestamp_seconds "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
}

async fn proxy(
    dir: &Path,
    controller: SocketAddr,
    token: &str,
    controller_name: Option<&str>,
) -> SocketAddr {
    let token_file = dir.join(format!("token-{token}"));
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut env: HashMap<&str, String> = [
        ("REMORA_CONTROLLER_ADDR", format!("https://{controller}")),
        ("REMORA_NAMESPACE", "shop".into()),
        ("REMORA_SERVICE_ACCOUNT", "web".into()),
        (
            "REMORA_TRUST_ANCHORS",
            dir.join("ca/trust-anchors.pem").display().to_string(),
        ),
        (
            "REMORA_IDENTITY_TOKEN_FILE",
            token_file.display().to_string(),
        ),
        ("REMORA_INBOUND_ADDR", "127.0.0.1:0".into()),
        ("REMORA_OUTBOUND_ADDR", "127.0.0.1:0".into()),
        ("REMORA_ADMIN_ADDR", "127.0.0.1:0".into()),
    ]
    .into();
    if let Some(name) = controller_name {
        env.insert("REMORA_CONTROLLER_NAME", name.into());
    }
    let args = ["remora-proxy"].map(String::from);
    let config = remora_proxy::Config::load(args, &|k| env.get(k).cloned()).unwrap();
    let app = remora_proxy::App::build(config, LogLevel::detached("info"))
        .await
        .unwrap();
    let admin = app.admin_addrs()[0];
    tokio::spawn(app.run(std::future::pending()));
    admin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_a_certificate_that_is_renewed_before_it_expires() {
    let dir = std::env::temp_dir().join(format!("remora-proxy-identity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Bound but not yet serving: the proxies start before the controller answers.
    let controller = controller(&dir, "127.0.0.1:0").await;
    let grpc = controller.grpc_addr().unwrap();

    let good = proxy(&dir, grpc, "web-token", None).await;
    let stolen = proxy(&dir, grpc, "stolen-token", None).await;
    let impostor_name = "remora-controller.elsewhere.serviceaccount.identity.cluster.local";
    let misled = proxy(&dir, grpc, "web-token", Some(impostor_name)).await;
    let (status, body) = get(good, "/ready").await;
    assert_eq!(status, 503);
    assert!(body.contains("identity certificate"), "{body}");

    tokio::spawn(controller.run(std::future::pending()));
    let mut ready = false;
    for _ in 0..200 {
        if get(good, "/ready").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the proxy never became ready");
    let first = expiry(&get(good, "/metrics").await.1).expect("expiry metric");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now..=now + 11).contains(&first),
        "a 10 s certificate expires at {first}, now is {now}"
    );

    // Renewed at 70 % of its lifetime: the expiry moves forward before the first one passes.
    let mut renewed = None;
    for _ in 0..150 {
        match expiry(&get(good, "/metrics").await.1) {
            Some(e) if e > first => {
                renewed = Some(e);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let renewed = renewed.expect("the certificate was not renewed");
    // At 70 % of 10 s, not at once: the new certificate was issued about 7 s later.
    assert!(
        renewed - first >= 5,
        "renewed too early: {first} then {renewed}"
    );
    assert_eq!(
        get(good, "/ready").await.0,
        200,
        "still ready across the renewal"
    );

    // The proxy with a token the controller does not accept is not ready, nor is the
    // one for which the controller's certificate names the wrong identity.
    let (status, body) = get(stolen, "/ready").await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = get(misled, "/ready").await;
    assert_eq!(status, 503, "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A controller with a development CA in `dir`, static tokens (`web-token` is `shop/web`)
/// and 10-second certificates, bound to `grpc` (`127.0.0.1:0` for any port), not yet
/// serving.
async fn controller(dir: &Path, grpc: &str) -> remora_controller::App {
    std::fs::create_dir_all(dir.join("objects")).unwrap();
    std::fs::write(
        dir.join("tokens.yaml"),
        "- {token: web-token, namespace: shop, serviceAccount: web}\n",
    )
    .unwrap();
    let args = [
        "remora-controller",
        "--source",
        &format!("dir:{}", dir.join("objects").display()),
        "--grpc-addr",
        grpc,
        "--admin-addr",
        "127.0.0.1:0",
        "--dev-ca",
        &dir.join("ca").display().to_string(),
        "--token-validator",
        &format!("static:{}", dir.join("tokens.yaml").display()),
        "--cert-lifetime",
        "10s",
    ]
    .map(String::from);
    let config = remora_controller::Config::load(args, &|_| None).unwrap();
    remora_controller::App::build(config, LogLevel::detached("info"))
        .await
        .unwrap()
}

/// [`controller`], serving until `stop` fires: its gRPC address.
async fn controller_until(
    dir: &Path,
    grpc: &str,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> SocketAddr {
    let controller = controller(dir, grpc).await;
    let addr = controller.grpc_addr().unwrap();
    tokio::spawn(controller.run(async move {
        let _ = stop.await;
    }));
    addr
}

fn failures(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("remora_identity_certify_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Issue 17: the issuer out of reach as the certificate nears expiry. The failed
/// renewals are counted (beside the expiry time, what an alert needs) while the proxy
/// stays ready on the certificate it has; at expiry it becomes unready, saying why, and
/// once the controller is back it is certified and ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_cannot_be_renewed_is_said_ahead_and_expiry_makes_the_proxy_unready() {
    let dir = std::env::temp_dir().join(format!("remora-proxy-expiry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let grpc = controller_until(&dir, "127.0.0.1:0", stopped).await;
    let admin = proxy(&dir, grpc, "web-token", None).await;
    let wait_for = async |what: &str, limit: Duration, ok: &dyn Fn(u16, &str) -> bool| {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (status, body) = get(admin, "/ready").await;
            if ok(status, &body) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: /ready {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_for("certified", Duration::from_secs(10), &|s, _| s == 200).await;
    let metrics = get(admin, "/metrics").await.1;
    let expires = expiry(&metrics).expect("expiry metric");
    assert_eq!(failures(&metrics), 0.0, "{metrics}");

    // The controller goes away: the renewal at about 7 s fails, and is counted, while
    // the proxy serves on with the certificate it has.
    stop.send(()).unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let mut failed_before_expiry = 0.0;
    while now() < expires - 1 {
        let metrics = get(admin, "/metrics").await.1;
        failed_before_expiry = failures(&metrics);
        if failed_before_expiry > 0.0 {
            assert_eq!(
                expiry(&metrics),
                Some(expires),
                "the expiry stays what it is"
            );
            assert_eq!(get(admin, "/ready").await.0, 200, "ready until expiry");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        failed_before_expiry > 0.0,
        "no failed renewal counted before expiry"
    );

    // At expiry: unready, saying why (within a second or two of it).
    wait_for("unready at expiry", Duration::from_secs(8), &|s, body| {
        s == 503 && body.contains("expired")
    })
    .await;
    assert!(now() >= expires, "unready before the certificate expired");

    // The controller is back at the same address: certified again, and ready.
    let (_stop, stopped) = tokio::sync::oneshot::channel();
    let back = controller_until(&dir, &grpc.to_string(), stopped).await;
    assert_eq!(back, grpc);
    wait_for("ready again", Duration::from_secs(30), &|s, _| s == 200).await;
    let metrics = get(admin, "/metrics").await.1;
    assert!(
        expiry(&metrics).unwrap() > expires,
        "a new certificate: {metrics}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
