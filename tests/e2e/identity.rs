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
    std::fs::create_dir_all(dir.join("objects")).unwrap();
    std::fs::write(
        dir.join("tokens.yaml"),
        "- {token: web-token, namespace: shop, serviceAccount: web}\n",
    )
    .unwrap();
    let args = vec![
        "remora-controller".to_string(),
        "--source".into(),
        format!("dir:{}", dir.join("objects").display()),
        "--grpc-addr".into(),
        "127.0.0.1:0".into(),
        "--admin-addr".into(),
        "127.0.0.1:0".into(),
        "--dev-ca".into(),
        dir.join("ca").display().to_string(),
        "--token-validator".into(),
        format!("static:{}", dir.join("tokens.yaml").display()),
        "--cert-lifetime".into(),
        "10s".into(),
    ];
    let config = remora_controller::Config::load(args, &|_| None).unwrap();
    // Bound but not yet serving: the proxies start before the controller answers.
    let controller = remora_controller::App::build(config, LogLevel::detached("info"))
        .await
        .unwrap();
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
