//! `--source dir:PATH`: a folder of YAML files, re-read when it changes. Each file's
//! last good content is kept: a file that stops parsing is reported (file, line,
//! reason), counted in `remora_controller_source_refusals_total`, and its previous
//! objects stay until it parses again. Files are read and parsed on a blocking thread,
//! never on the runtime that serves the proxies, and a hostile file costs little: one
//! larger than [`MAX_FILE_BYTES`] or nested deeper than [`yaml::MAX_FLOW_DEPTH`] is refused
//! before it is parsed.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, Instant, SystemTime},
};

use tracing::{info, warn};

use super::{
    Events, Source,
    yaml::{self, MAX_FLOW_DEPTH},
};
use crate::{
    core::{Event, Object, ObjectKey},
    metrics::{Metrics, SourceRefusal},
};

/// How often the folder is checked: changes reach proxies well within a second.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The largest file read: above the 1.5 MiB the API server keeps per object, so any
/// object a cluster can hold fits, while a parse costs tens of megabytes at most.
pub const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024;

#[derive(Debug)]
pub struct Dir {
    path: PathBuf,
}

impl Dir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

/// What was last read of one file.
struct FileState {
    stamp: (SystemTime, u64),
    objects: Vec<Object>,
}

impl Source for Dir {
    fn run(
        self: Box<Self>,
        events: Events,
        metrics: Metrics,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            let mut files: HashMap<PathBuf, FileState> = HashMap::new();
            let mut emitted: BTreeMap<ObjectKey, Object> = BTreeMap::new();
            let mut synced = false;
            loop {
                let (path, metrics) = (self.path.clone(), metrics.clone());
                let scanned = tokio::task::spawn_blocking(move || {
                    let changed = scan(&path, &mut files, &metrics);
                    (changed, files)
                })
                .await;
                let Ok((changed, scanned_files)) = scanned else {
                    return warn!("the dir source's scan panicked; it stops here");
                };
                files = scanned_files;
                if changed || !synced {
                    let desired = merge(&files);
                    for event in diff(&emitted, &desired) {
                        if events.send((event, Instant::now())).await.is_err() {
                            return;
                        }
                    }
                    emitted = desired;
                }
                if !synced {
                    synced = true;
                    info!(path = %self.path.display(), objects = emitted.len(), "dir source loaded");
                    if events.send((Event::Synced, Instant::now())).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
    }
}

/// Re-reads changed files; true when any file's objects changed.
fn scan(dir: &Path, files: &mut HashMap<PathBuf, FileState>, metrics: &Metrics) -> bool {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(error) => {
            warn!(path = %dir.display(), %error, "cannot read the source folder; keeping the last state");
            return false;
        }
    };
    let mut seen = Vec::new();
    let mut changed = false;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        );
        let Ok(meta) = entry.metadata() else { continue };
        if !is_yaml || !meta.is_file() {
            continue;
        }
        seen.push(path.clone());
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if files.get(&path).is_some_and(|f| f.stamp == stamp) {
            continue;
        }
        match read(&path).and_then(|text| {
            yaml::parse(&path.display().to_string(), &text)
                .map_err(|e| (SourceRefusal::Invalid, e.to_string()))
        }) {
            Ok(objects) => {
                changed = true;
                files.insert(path, FileState { stamp, objects });
            }
            Err((reason, error)) => {
                metrics.source_refused(reason);
                warn!("{error}; keeping this file's last good objects");
                // Remember the stamp so the same bad content is reported once.
                let objects = files.remove(&path).map(|f| f.objects).unwrap_or_default();
                files.insert(path, FileState { stamp, objects });
            }
        }
    }
    let before = files.len();
    files.retain(|p, _| seen.contains(p));
    changed || files.len() != before
}

/// A file's text, if it is small enough and shallow enough to parse.
fn read(path: &Path) -> Result<String, (SourceRefusal, String)> {
    use std::io::Read;
    let file = path.display();
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| {
            (
                SourceRefusal::Unreadable,
                format!("{file}: cannot read it: {e}"),
            )
        })?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err((
            SourceRefusal::TooLarge,
            format!("{file}: larger than {MAX_FILE_BYTES} bytes; split it into several files"),
        ));
    }
    if let Some(at) = too_deep(&text) {
        return Err((
            SourceRefusal::TooDeep,
            format!("{file}: brackets nested deeper than {MAX_FLOW_DEPTH} levels at byte {at}"),
        ));
    }
    Ok(text)
}

/// Where `text` first nests flow collections deeper than [`MAX_FLOW_DEPTH`]. Every
/// bracket counts, quoted or not: an overestimate refuses only absurd files, while an
/// underestimate would let the parser stall.
fn too_deep(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, b) in text.bytes().enumerate() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Every file's objects; on a duplicate key the file sorting last wins.
fn merge(files: &HashMap<PathBuf, FileState>) -> BTreeMap<ObjectKey, Object> {
    let mut paths: Vec<&PathBuf> = files.keys().collect();
    paths.sort();
    let mut out = BTreeMap::new();
    for p in paths {
        for o in &files[p].objects {
            out.insert(o.key(), o.clone());
        }
    }
    out
}

/// The events that turn `from` into `to`.
pub fn diff(from: &BTreeMap<ObjectKey, Object>, to: &BTreeMap<ObjectKey, Object>) -> Vec<Event> {
    let mut out: Vec<Event> = from
        .keys()
        .filter(|k| !to.contains_key(*k))
        .cloned()
        .map(Event::Delete)
        .collect();
    for (k, o) in to {
        if from.get(k) != Some(o) {
            out.push(Event::Apply(o.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Kind;
    use tokio::sync::mpsc;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";

    async fn next(rx: &mut mpsc::Receiver<(Event, Instant)>) -> Event {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event")
            .expect("open")
            .0
    }

    #[tokio::test]
    async fn changes_are_delivered_and_a_broken_file_keeps_its_last_good_objects() {
        let dir = std::env::temp_dir().join(format!("remora-dir-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("web.yaml"), SVC).unwrap();
        std::fs::write(dir.join("notes.txt"), "not yaml, not read").unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let task = tokio::spawn(Box::new(Dir::new(&dir)).run(tx, metrics));
        assert!(
            matches!(next(&mut rx).await, Event::Apply(Object::Service(s)) if s.id.name == "web")
        );
        assert_eq!(next(&mut rx).await, Event::Synced);

        // Broken YAML: reported, and the Service stays (no Delete).
        std::fs::write(
            dir.join("web.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
        )
        .unwrap();
        let quiet = tokio::time::timeout(POLL_INTERVAL * 3, rx.recv()).await;
        assert!(quiet.is_err(), "a broken file changed the state: {quiet:?}");

        // Fixed with a change: the new version is applied.
        std::fs::write(
            dir.join("web.yaml"),
            SVC.replace("10.96.0.10", "10.96.0.11"),
        )
        .unwrap();
        match next(&mut rx).await {
            Event::Apply(Object::Service(s)) => {
                assert_eq!(s.cluster_ips[0].to_string(), "10.96.0.11")
            }
            other => panic!("{other:?}"),
        }

        // The file removed: its objects are deleted.
        std::fs::remove_file(dir.join("web.yaml")).unwrap();
        assert!(matches!(next(&mut rx).await, Event::Delete(k) if k.kind == Kind::Service));
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 11: a 392 KB file of nested brackets stalled readiness and new streams for
    /// minutes, and a 51 MB file took the controller to 2.65 GB. Both are refused before
    /// parsing, counted, and the last good state stays.
    #[tokio::test]
    async fn hostile_files_are_refused_unparsed_and_counted() {
        let dir = std::env::temp_dir().join(format!("remora-dir-hostile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("web.yaml"), SVC).unwrap();
        let deep = format!("a: {}{}", "[".repeat(196_000), "]".repeat(196_000));
        std::fs::write(dir.join("deep.yaml"), &deep).unwrap();
        let big = format!("{SVC}---\n# {}\n", "x".repeat(MAX_FILE_BYTES as usize));
        std::fs::write(dir.join("big.yaml"), big).unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(Box::new(Dir::new(&dir)).run(tx, metrics));
        // The good file arrives and the source syncs at once (in seconds, not minutes).
        assert!(matches!(
            next(&mut rx).await,
            Event::Apply(Object::Service(_))
        ));
        assert_eq!(next(&mut rx).await, Event::Synced);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for reason in ["too_deep", "too_large"] {
            let line = format!("remora_controller_source_refusals_total{{reason=\"{reason}\"}} 1");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn flow_depth_counts_every_bracket() {
        assert_eq!(too_deep("a: [1, {b: [2]}]"), None);
        assert_eq!(too_deep(&"[".repeat(MAX_FLOW_DEPTH)), None);
        assert_eq!(
            too_deep(&"[".repeat(MAX_FLOW_DEPTH + 1)),
            Some(MAX_FLOW_DEPTH)
        );
        // Closed brackets free their depth.
        assert_eq!(too_deep(&"[]".repeat(10 * MAX_FLOW_DEPTH)), None);
    }
}
