//! `remora inject`: the webhook's own injection, applied offline to a stream of YAML
//! documents. Pods and the workloads that make them (Deployments, StatefulSets,
//! DaemonSets, ReplicaSets, ReplicationControllers, Jobs, CronJobs, and `List`s of them)
//! get the proxy; every other document is written out exactly as it came, comments
//! included. Nothing is written unless every document could be read.

use remora_k8s::inject::{Outcome, Settings, inject_manifest};
use serde_json::Value;

/// One line of the report: which object, and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reported {
    pub object: String,
    pub outcome: Outcome,
}

/// Injects every workload in `input`: the new stream and what happened to each object.
pub fn run(input: &str, settings: &Settings) -> Result<(String, Vec<Reported>), String> {
    let mut out = String::with_capacity(input.len() * 2);
    let mut report = Vec::new();
    for (n, doc) in documents(input).into_iter().enumerate() {
        let where_ = |e: &dyn std::fmt::Display| {
            format!("document {} (line {}): {e}", n + 1, doc.first_line)
        };
        let value: Option<Value> = match serde_yaml_ng::from_str::<Option<Value>>(&doc.body) {
            Ok(v) => v,
            Err(e) => return Err(where_(&e)),
        };
        let Some(mut value) = value.filter(|v| !v.is_null()) else {
            // Only comments or nothing: as it was.
            out.push_str(&doc.text);
            continue;
        };
        if !value.is_object() {
            return Err(where_(&"not a Kubernetes object (a mapping)"));
        }
        let injected = inject_object(&mut value, settings, &mut report).map_err(|e| where_(&e))?;
        if injected {
            out.push_str(&doc.separator);
            let yaml = serde_yaml_ng::to_string(&value).map_err(|e| where_(&e))?;
            out.push_str(&yaml);
        } else {
            out.push_str(&doc.text);
        }
    }
    Ok((out, report))
}

/// Injects `value` (or each item of a `List`); whether anything changed.
fn inject_object(
    value: &mut Value,
    settings: &Settings,
    report: &mut Vec<Reported>,
) -> Result<bool, String> {
    if value["kind"] == "List" {
        let mut any = false;
        for item in value["items"].as_array_mut().into_iter().flatten() {
            any |= inject_object(item, settings, report)?;
        }
        return Ok(any);
    }
    let name = value["metadata"]["name"].as_str().unwrap_or("(unnamed)");
    let kind = value["kind"].as_str().unwrap_or("(no kind)");
    let object = format!("{}/{name}", kind.to_lowercase());
    let outcome = inject_manifest(value, settings)?;
    let injected = outcome == Outcome::Injected;
    report.push(Reported { object, outcome });
    Ok(injected)
}

/// One document of a YAML stream, as written.
#[derive(Debug, PartialEq)]
struct Document {
    /// Everything, its `---` line included.
    text: String,
    /// The `---` line it starts with (with its newline), or nothing for the first.
    separator: String,
    /// Its content after the separator.
    body: String,
    /// Where it starts, 1-based.
    first_line: usize,
}

/// Splits a stream at its `---` lines (a `---` followed by content on the same line
/// starts a document with that content).
fn documents(input: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut current = Document {
        text: String::new(),
        separator: String::new(),
        body: String::new(),
        first_line: 1,
    };
    for (i, line) in input.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let starts = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if starts {
            let done = std::mem::replace(
                &mut current,
                Document {
                    text: String::new(),
                    separator: String::new(),
                    body: String::new(),
                    first_line: i + 1,
                },
            );
            if !done.text.is_empty() {
                docs.push(done);
            }
            current.text.push_str(line);
            current.separator = "---\n".into();
            // Content after `--- ` belongs to the document.
            current.body.push_str(&bare[3..]);
            current.body.push('\n');
            continue;
        }
        if bare == "..." {
            current.text.push_str(line);
            continue;
        }
        current.text.push_str(line);
        current.body.push_str(line);
    }
    if !current.text.is_empty() {
        docs.push(current);
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_at_separator_lines_only() {
        let docs = documents("# head\na: 1\n---\nb: '---'\n--- c: 3\n...\n");
        let bodies: Vec<_> = docs.iter().map(|d| d.body.as_str()).collect();
        // The separator's line stays (empty), so YAML errors count lines from it.
        assert_eq!(bodies, ["# head\na: 1\n", "\nb: '---'\n", " c: 3\n"]);
        let lines: Vec<_> = docs.iter().map(|d| d.first_line).collect();
        assert_eq!(lines, [1, 3, 5]);
        let joined: String = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(joined, "# head\na: 1\n---\nb: '---'\n--- c: 3\n...\n");
    }
}
