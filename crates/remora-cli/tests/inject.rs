//! `remora inject`, the real binary, over a multi-document stream of every workload
//! kind: the golden output, idempotence, the report, standard input, and bad input
//! that writes nothing.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn settings() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../remora-k8s/testdata/inject/settings.yaml")
}

/// `remora inject --config <settings> <args>` with `stdin`.
fn remora_inject(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_remora"))
        .arg("inject")
        .arg("--config")
        .arg(settings())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn golden(name: &str, text: &str) {
    remora_fake_kube::assert_golden(&testdata(name), text);
}

#[test]
fn every_workload_kind_is_injected_and_the_rest_passes_through() {
    let input = std::fs::read_to_string(testdata("workloads.yaml")).unwrap();
    let out = remora_inject(&[testdata("workloads.yaml").to_str().unwrap()], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    golden("workloads.injected.yaml", &text);

    // What it did, one line per workload.
    let report = String::from_utf8(out.stderr).unwrap();
    for line in [
        "deployment/web injected",
        "statefulset/db injected",
        "daemonset/agent injected",
        "replicaset/legacy injected",
        "job/migrate injected",
        "cronjob/report injected",
        "pod/debug injected",
        "pod/node-exporter skipped: a hostNetwork pod",
        "deployment/batch skipped: the pod opts out",
    ] {
        assert!(report.contains(line), "{line:?} not in:\n{report}");
    }
    assert!(
        !report.contains("configmap"),
        "not workloads: not reported\n{report}"
    );

    // Everything that makes no pods is byte for byte what was given.
    for kept in [
        "  name: web   # the front door\n",
        "# Left alone: it shares the node's network.\n",
        "  on: \"kept as written\"   # a YAML 1.1 boolean key, byte for byte\n",
    ] {
        assert!(input.contains(kept) && text.contains(kept), "{kept:?}");
    }
    // The templates' pods are what the webhook makes, marked so it leaves them be.
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let cron = docs.iter().find(|d| d["kind"] == "CronJob").unwrap();
    let pod = &cron["spec"]["jobTemplate"]["spec"]["template"];
    assert_eq!(pod["spec"]["initContainers"][1]["name"], "remora-proxy");
    assert_eq!(
        pod["metadata"]["annotations"]["remora.io/inject"],
        "enabled"
    );
    assert_eq!(pod["metadata"]["labels"]["remora.io/meshed"], "true");

    // Again, through standard input: nothing changes.
    let again = remora_inject(&["-"], text.as_bytes());
    assert!(again.status.success());
    assert_eq!(String::from_utf8(again.stdout).unwrap(), text, "idempotent");
    let report = String::from_utf8(again.stderr).unwrap();
    assert!(
        report.contains("deployment/web skipped: already injected"),
        "{report}"
    );
}

#[test]
fn bad_input_writes_nothing_and_says_where() {
    let input = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: b\n";
    let out = remora_inject(&[], input.as_bytes());
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing written");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("document 2 (line 4)"), "{err}");

    let not_a_spec =
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: b}\nspec:\n  template: 3\n";
    let out = remora_inject(&[], not_a_spec.as_bytes());
    assert!(!out.status.success() && out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("spec.template is not an object"), "{err}");

    // Settings that would break pods are refused before anything is read.
    let out = Command::new(env!("CARGO_BIN_EXE_remora"))
        .args(["inject", "--config"])
        .arg(testdata("workloads.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success() && out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("unknown field"), "{err}");
}
