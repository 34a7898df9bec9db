//! Every YAML example in the docs is a file in `deploy/examples/` that the `dir:`
//! source loads as it is (strict fields and validation included), so an example can
//! neither drift from what the controller accepts nor from the file users apply.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The ```yaml blocks of a Markdown file.
fn yaml_blocks(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(_), "```") => out.push(current.take().expect("open")),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

#[test]
fn every_docs_yaml_example_is_a_loaded_file() {
    let examples = root().join("deploy/examples");
    let files: Vec<(PathBuf, String)> = std::fs::read_dir(&examples)
        .expect("deploy/examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read");
            (p, text)
        })
        .collect();
    assert!(!files.is_empty());
    for (path, text) in &files {
        let objects = remora_controller::source::yaml::parse(&path.display().to_string(), text)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!objects.is_empty(), "{}: no object", path.display());
    }
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.push(root().join("README.md"));
    let mut blocks = 0;
    for doc in docs {
        let markdown = std::fs::read_to_string(&doc).expect("read");
        for block in yaml_blocks(&markdown) {
            blocks += 1;
            assert!(
                files.iter().any(|(_, text)| *text == block),
                "{}: a YAML example that is not a file in deploy/examples:\n{block}",
                doc.display()
            );
        }
    }
    assert!(
        blocks >= files.len(),
        "{blocks} examples for {} files",
        files.len()
    );
}

/// The demo's manifests (`deploy/demo/`) load in the `dir:` source as they are, strict
/// fields included: the demo feeds them to the controller, and users `kubectl apply` them.
#[test]
fn the_demos_manifests_are_loaded_files() {
    use remora_controller::core::Object;
    let (mut services, mut traffic, mut routes, mut authz, mut namespaces) = (0, 0, 0, 0, 0);
    for entry in std::fs::read_dir(root().join("deploy/demo")).expect("deploy/demo") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let objects = remora_controller::source::yaml::parse(&path.display().to_string(), &text)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!objects.is_empty(), "{}: no object", path.display());
        for o in objects {
            match o {
                Object::Service(_) => services += 1,
                Object::Traffic(_) => traffic += 1,
                Object::Route(_) => routes += 1,
                Object::Authz(_) => authz += 1,
                Object::Namespace(_) => namespaces += 1,
                other => panic!(
                    "{}: the cluster makes these, not the demo's files: {other:?}",
                    path.display()
                ),
            }
        }
    }
    // api and api-v2; the TrafficPolicy; the canary's two steps; the intruder's refusal.
    assert_eq!(
        (services, traffic, routes, authz, namespaces),
        (2, 1, 2, 1, 1)
    );
}
