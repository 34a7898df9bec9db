//! The admission webhook over real HTTPS, driven by curl as the API server would call
//! it: a Deployment's pod gets the patch that makes the golden pod; re-injecting, a
//! hostNetwork pod, an opted-out pod and a namespace that did not ask are left alone; a
//! malformed review is allowed unchanged and counted; the serving certificate is
//! re-read when its files change, and a bad pair leaves the served one in place.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use remora_controller::{App, Config};
use serde_json::Value;

const HOST: &str = "remora-controller.remora-system.svc";

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/webhook")
        .join(name)
}

/// A CA and a serving certificate for [`HOST`] signed by it, written to `dir`:
/// `ca.pem`, `tls.crt`, `tls.key`.
fn serving_cert(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "remora webhook test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec![HOST.to_string()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, HOST);
    let leaf = leaf.signed_by(&key, &Issuer::new(ca, &ca_key)).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("tls.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
}

struct Running {
    webhook: SocketAddr,
    admin: SocketAddr,
    anchors: String,
}

async fn controller(dir: &Path, extra: &[String]) -> Result<Running, String> {
    let objects = testdata("objects");
    let mut args: Vec<String> = [
        "remora-controller",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--webhook-addr",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    args.extend(["--source".into(), format!("dir:{}", objects.display())]);
    args.extend(["--dev-ca".into(), dir.join("ca").display().to_string()]);
    args.extend([
        "--token-validator".into(),
        format!("static:{}", dir.join("tokens.yaml").display()),
    ]);
    std::fs::write(dir.join("tokens.yaml"), "[]\n").unwrap();
    args.extend([
        "--webhook-cert".into(),
        dir.join("tls.crt").display().to_string(),
    ]);
    args.extend([
        "--webhook-key".into(),
        dir.join("tls.key").display().to_string(),
    ]);
    args.extend(extra.iter().cloned());
    let config = Config::load(args, &|_| None).map_err(|e| e.to_string())?;
    let app = App::build(config, remora_admin::LogLevel::detached("info"))
        .await
        .map_err(|e| e.to_string())?;
    let running = Running {
        webhook: app.webhook_addr().expect("the webhook is served"),
        admin: app.admin_addr().unwrap(),
        anchors: std::fs::read_to_string(dir.join("ca/trust-anchors.pem")).unwrap(),
    };
    tokio::spawn(app.run(std::future::pending()));
    Ok(running)
}

/// POSTs `body` to `/inject` with curl, trusting `ca`: the parsed answer, or curl's
/// error.
async fn post(addr: SocketAddr, ca: &Path, body: Vec<u8>) -> Result<Value, String> {
    let ca = ca.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = tempfile(&body);
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
            .arg(&ca)
            .args(["--resolve", &format!("{HOST}:{}:127.0.0.1", addr.port())])
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", file.display()))
            .arg(format!("https://{HOST}:{}/inject", addr.port()))
            .output()
            .expect("curl runs (apt-get install curl)");
        let _ = std::fs::remove_file(&file);
        match out.status.success() {
            true => serde_json::from_slice(&out.stdout).map_err(|e| e.to_string()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    })
    .await
    .unwrap()
}

fn tempfile(body: &[u8]) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("remora-review-{}-{n}.json", std::process::id()));
    std::fs::write(&path, body).unwrap();
    path
}

/// The review's pod with the answer's patch applied, and whether there was one.
fn patched(review: &Value, answer: &Value) -> Option<Value> {
    let response = &answer["response"];
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        response["uid"], review["request"]["uid"],
        "the uid is echoed"
    );
    assert_eq!(
        response["allowed"], true,
        "the webhook never refuses: {answer}"
    );
    let patch = response.get("patch")?.as_str().unwrap();
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the object sent");
    Some(pod)
}

fn review() -> Value {
    serde_json::from_str(&std::fs::read_to_string(testdata("review.json")).unwrap()).unwrap()
}

fn with_object(f: impl Fn(&mut Value)) -> Value {
    let mut r = review();
    f(&mut r["request"]["object"]);
    r
}

/// Compares `pod` with the golden file (`REMORA_BLESS=1` rewrites it); the trust
/// anchors, new each run, are checked and then stand as `<trust anchors>`.
fn golden(name: &str, pod: &Value, anchors: &str) {
    let mut pod = pod.clone();
    for c in pod["spec"]["initContainers"].as_array_mut().unwrap() {
        let env = c.get_mut("env").and_then(Value::as_array_mut);
        for e in env.into_iter().flatten() {
            if e["name"] == "REMORA_TRUST_ANCHORS_PEM" {
                assert_eq!(e["value"].as_str().unwrap(), anchors.trim());
                e["value"] = "<trust anchors>".into();
            }
        }
    }
    remora_fake_kube::assert_golden(&testdata(name), &serde_yaml_ng::to_string(&pod).unwrap());
}

async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", &format!("http://{admin}/metrics")])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_injects_what_asks_and_leaves_the_rest() {
    let dir = tempdir("inject");
    serving_cert(&dir);
    let ca = dir.join("ca.pem");
    let c = controller(&dir, &[]).await.unwrap();

    // A Deployment's pod in a namespace that asks: the golden pod.
    let review = review();
    let body = serde_json::to_vec(&review).unwrap();
    let answer = post(c.webhook, &ca, body).await.unwrap();
    let pod = patched(&review, &answer).expect("a patch");
    golden("injected.yaml", &pod, &c.anchors);
    // Kept as sent: the service account volume, the app container, its probes.
    assert_eq!(pod["spec"]["volumes"][0]["name"], "kube-api-access-9xk2p");
    assert_eq!(pod["spec"]["containers"][0]["name"], "web");
    assert_eq!(pod["metadata"]["labels"]["remora.io/meshed"], "true");
    // The namespace's default came with it, for the controller to read.
    assert_eq!(
        pod["metadata"]["annotations"]["remora.io/default-inbound-policy"],
        "deny"
    );

    // Re-injecting the injected pod: allowed, no patch.
    let again = with_object(|o| *o = pod.clone());
    let answer = post(c.webhook, &ca, serde_json::to_vec(&again).unwrap())
        .await
        .unwrap();
    assert_eq!(patched(&again, &answer), None, "re-injecting is a no-op");

    // Left alone: hostNetwork, opted out, a namespace that did not ask.
    let host = with_object(|o| o["spec"]["hostNetwork"] = true.into());
    let opted_out = with_object(|o| {
        o["metadata"]["annotations"] = serde_json::json!({"remora.io/inject": "disabled"})
    });
    let mut plain = review.clone();
    plain["request"]["namespace"] = "plain".into();
    plain["request"]["object"]["metadata"]["namespace"] = "plain".into();
    for (what, r) in [
        ("hostNetwork", host),
        ("opted out", opted_out),
        ("plain", plain),
    ] {
        let answer = post(c.webhook, &ca, serde_json::to_vec(&r).unwrap())
            .await
            .unwrap();
        assert_eq!(patched(&r, &answer), None, "{what}: untouched");
    }
    // A pod in a namespace that did not ask, asking itself, is injected.
    let mut asks = review.clone();
    asks["request"]["namespace"] = "plain".into();
    asks["request"]["object"]["metadata"]["annotations"] =
        serde_json::json!({"remora.io/inject": "enabled"});
    let answer = post(c.webhook, &ca, serde_json::to_vec(&asks).unwrap())
        .await
        .unwrap();
    assert!(
        patched(&asks, &answer).is_some(),
        "a pod can ask for itself"
    );

    // Malformed reviews: allowed unchanged, with the uid when there is one, counted.
    let garbage = post(c.webhook, &ca, b"\x16\x03garbage{".to_vec())
        .await
        .unwrap();
    assert_eq!(garbage["response"]["allowed"], true);
    assert!(garbage["response"].get("patch").is_none());
    let bad_object = with_object(|o| o["spec"] = "not a spec".into());
    let answer = post(c.webhook, &ca, serde_json::to_vec(&bad_object).unwrap())
        .await
        .unwrap();
    assert_eq!(patched(&bad_object, &answer), None);
    let v1beta1 = {
        let mut r = review.clone();
        r["apiVersion"] = "admission.k8s.io/v1beta1".into();
        r
    };
    let answer = post(c.webhook, &ca, serde_json::to_vec(&v1beta1).unwrap())
        .await
        .unwrap();
    assert_eq!(patched(&v1beta1, &answer), None);

    let count = |result: &str| format!("remora_controller_injections_total{{result=\"{result}\"}}");
    assert_eq!(metric(c.admin, &count("injected")).await, 2.0);
    assert_eq!(metric(c.admin, &count("skipped")).await, 4.0);
    assert_eq!(metric(c.admin, &count("malformed")).await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_certificate_is_reread_when_it_changes() {
    let dir = tempdir("reload");
    serving_cert(&dir);
    let c = controller(&dir, &[]).await.unwrap();
    let body = || serde_json::to_vec(&review()).unwrap();
    let old_ca = dir.join("old-ca.pem");
    std::fs::rename(dir.join("ca.pem"), &old_ca).unwrap();
    post(c.webhook, &old_ca, body()).await.unwrap();

    // Rotated in place, as cert-manager does: the new one is served within seconds.
    serving_cert(&dir);
    let new_ca = dir.join("ca.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    while post(c.webhook, &new_ca, body()).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reloaded = "remora_controller_webhook_cert_reloads_total{result=\"reloaded\"}";
    assert_eq!(metric(c.admin, reloaded).await, 1.0);

    // A key that does not match: refused, counted, and the good pair stays served.
    let stray = KeyPair::generate().unwrap();
    std::fs::write(dir.join("tls.key"), stray.serialize_pem()).unwrap();
    let failed = "remora_controller_webhook_cert_reloads_total{result=\"failed\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(c.admin, failed).await < 1.0 {
        assert!(Instant::now() < deadline, "the bad pair was never noticed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    post(c.webhook, &new_ca, body()).await.unwrap();
}

#[tokio::test]
async fn settings_that_would_break_pods_stop_the_controller_by_name() {
    let dir = tempdir("settings");
    serving_cert(&dir);
    let config = dir.join("inject.yaml");
    let arg = |p: &Path| vec!["--inject-config".to_string(), p.display().to_string()];
    std::fs::write(&config, "proxyImage: x\nlogLevl: debug\n").unwrap();
    let err = controller(&dir, &arg(&config)).await.err().unwrap();
    assert!(
        err.contains("logLevl") && err.contains("inject.yaml"),
        "{err}"
    );
    std::fs::write(&config, "trustDomain: other.example\n").unwrap();
    let err = controller(&dir, &arg(&config)).await.err().unwrap();
    assert!(err.contains("trustDomain \"other.example\""), "{err}");
    std::fs::write(&config, "controllerAddr: http://ctl:8086\n").unwrap();
    let err = controller(&dir, &arg(&config)).await.err().unwrap();
    assert!(err.contains("controllerAddr"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("remora-webhook-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
