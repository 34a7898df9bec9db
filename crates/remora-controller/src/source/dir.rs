//! `--source dir:PATH`: a folder of YAML files, re-read when it changes. Each file's
//! last good content is kept: a file that stops parsing is reported (file, line,
//! reason) and its previous objects stay until it parses again.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, Instant, SystemTime},
};

use tracing::{info, warn};

use super::{Events, Source, yaml};
use crate::core::{Event, Object, ObjectKey};

/// How often the folder is checked: changes reach proxies well within a second.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

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
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            let mut files: HashMap<PathBuf, FileState> = HashMap::new();
            let mut emitted: BTreeMap<ObjectKey, Object> = BTreeMap::new();
            let mut synced = false;
            loop {
                let changed = scan(&self.path, &mut files);
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
fn scan(dir: &Path, files: &mut HashMap<PathBuf, FileState>) -> bool {
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
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(error) => {
                warn!(file = %path.display(), %error, "cannot read file; keeping its last good objects");
                continue;
            }
        };
        match yaml::parse(&path.display().to_string(), &text) {
            Ok(objects) => {
                changed = true;
                files.insert(path, FileState { stamp, objects });
            }
            Err(error) => {
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
        let task = tokio::spawn(Box::new(Dir::new(&dir)).run(tx));
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
}
