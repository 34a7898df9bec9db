//! Rotation decides, in order: a new bundle is handed out at once, a new issuer signs
//! only once its root has been everywhere for a certificate lifetime, a broken set
//! changes nothing.

use std::path::{Path, PathBuf};

use prometheus_client::registry::Registry;

use super::*;
use crate::identity::ca::generate;

const LIFETIME: Duration = Duration::from_secs(60);

/// Two independent CAs (root and issuer each), `a` and `b`, under a fresh folder.
fn two_cas(name: &str) -> PathBuf {
    let base = std::env::temp_dir().join(format!("remora-rotation-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    generate(&base.join("a"), "cluster.local").unwrap();
    generate(&base.join("b"), "cluster.local").unwrap();
    base
}

/// Writes into `dir` the issuer of CA `issuer` and the roots of `roots`.
fn write_set(base: &Path, dir: &str, issuer: &str, roots: &[&str]) -> CaFiles {
    let dir = base.join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let files = CaFiles::dev(&dir);
    let from = |ca: &str| CaFiles::dev(&base.join(ca));
    std::fs::copy(from(issuer).cert, &files.cert).unwrap();
    std::fs::copy(from(issuer).key, &files.key).unwrap();
    let bundle: String = roots
        .iter()
        .map(|r| std::fs::read_to_string(from(r).anchors).unwrap())
        .collect();
    std::fs::write(&files.anchors, bundle).unwrap();
    files
}

fn ca(base: &Path, dir: &str, issuer: &str, roots: &[&str]) -> Ca {
    let files = write_set(base, dir, issuer, roots);
    Ca::from_files(&files, "cluster.local", LIFETIME).unwrap()
}

/// The issuer, by its certificate (both development CAs use the same names).
fn subject(ca: &Ca) -> Vec<u8> {
    ca.issuer_cert().der.clone()
}

#[test]
fn a_new_issuer_waits_until_its_root_has_been_everywhere_for_a_lifetime() {
    let base = two_cas("choose");
    let now = Instant::now();
    let a = ca(&base, "1", "a", &["a"]);
    let ab = ca(&base, "2", "a", &["a", "b"]);
    let b_ab = ca(&base, "3", "b", &["a", "b"]);
    let b_b = ca(&base, "4", "b", &["b"]);
    let root = |c: &Ca, i: usize| c.anchors()[i].der.clone();
    let handed: HashMap<_, _> = [(root(&ab, 0), now), (root(&ab, 1), now + LIFETIME)].into();
    let old: HashMap<_, _> = [(root(&ab, 0), now), (root(&ab, 1), now)].into();
    let only_a: HashMap<_, _> = [(root(&a, 0), now)].into();
    // (in use, files, roots handed out, expected)
    let cases = [
        (
            &a,
            &ab,
            &only_a,
            Choice::Files,
            "same issuer, new bundle: at once",
        ),
        (
            &ab,
            &b_ab,
            &handed,
            Choice::Hold {
                until: now + LIFETIME,
            },
            "root handed out just now",
        ),
        (&ab, &b_ab, &old, Choice::Files, "root everywhere"),
        (
            &a,
            &b_ab,
            &only_a,
            Choice::Hold {
                until: now + LIFETIME,
            },
            "root not handed out yet",
        ),
        (
            &ab,
            &b_b,
            &handed,
            Choice::Files,
            "the old root removed: the files win",
        ),
    ];
    for (in_use, files, everywhere, want, why) in cases {
        assert_eq!(choose(in_use, files, everywhere, now), want, "{why}");
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn the_documented_rotation_applies_in_order_and_a_wrong_order_is_made_safe() {
    let base = two_cas("reload");
    let metrics = Metrics::register(&mut Registry::default());
    let files = write_set(&base, "live", "a", &["a"]);
    let rotation = Rotation::load(files.clone(), "cluster.local", LIFETIME).unwrap();
    let handle = rotation.handle();
    let (a_issuer, b_issuer) = (
        subject(&ca(&base, "x", "a", &["a"])),
        subject(&ca(&base, "y", "b", &["b"])),
    );
    let t0 = Instant::now();
    let at = |secs: u64| t0 + Duration::from_secs(secs);

    // Nothing changed: nothing happens.
    rotation.reload(&metrics, at(0));
    assert_eq!(handle.current().anchors().len(), 1);

    // 1. Both roots: handed out at once, same issuer.
    write_set(&base, "live", "a", &["a", "b"]);
    rotation.reload(&metrics, at(1));
    assert_eq!(handle.current().anchors().len(), 2);
    assert_eq!(subject(&handle.current()), a_issuer);

    // 2. The new issuer, too early: the old one goes on signing until b's root has
    // been handed out for a lifetime.
    write_set(&base, "live", "b", &["a", "b"]);
    rotation.reload(&metrics, at(10));
    assert_eq!(subject(&handle.current()), a_issuer, "held");
    rotation.reload(&metrics, at(40));
    assert_eq!(subject(&handle.current()), a_issuer, "still held");
    rotation.reload(&metrics, at(61));
    assert_eq!(subject(&handle.current()), b_issuer, "switched");
    assert_eq!(handle.current().anchors().len(), 2);

    // 3. The old root dropped.
    write_set(&base, "live", "b", &["b"]);
    rotation.reload(&metrics, at(130));
    assert_eq!(handle.current().anchors().len(), 1);
    assert_eq!(subject(&handle.current()), b_issuer);

    // A broken key changes nothing.
    std::fs::write(&files.key, "not a key").unwrap();
    rotation.reload(&metrics, at(140));
    assert_eq!(subject(&handle.current()), b_issuer);
    assert_eq!(handle.current().anchors().len(), 1);

    // The wrong order: the issuer first is refused (it does not chain to the anchors),
    // and once its root is added the old issuer still signs for a lifetime.
    let files = write_set(&base, "wrong", "a", &["a"]);
    let rotation = Rotation::load(files.clone(), "cluster.local", LIFETIME).unwrap();
    let handle = rotation.handle();
    let t0 = Instant::now();
    write_set(&base, "wrong", "b", &["a"]);
    rotation.reload(&metrics, t0);
    assert_eq!(subject(&handle.current()), a_issuer, "refused");
    assert_eq!(handle.current().anchors().len(), 1);
    write_set(&base, "wrong", "b", &["a", "b"]);
    rotation.reload(&metrics, t0 + Duration::from_secs(5));
    assert_eq!(subject(&handle.current()), a_issuer, "held");
    assert_eq!(handle.current().anchors().len(), 2);
    rotation.reload(&metrics, t0 + Duration::from_secs(66));
    assert_eq!(subject(&handle.current()), b_issuer);

    // A controller (re)started after step 1 cannot know when the new root was handed
    // out: it takes it as just now, and holds a switch to it for a lifetime.
    let files = write_set(&base, "restarted", "a", &["a", "b"]);
    let rotation = Rotation::load(files.clone(), "cluster.local", LIFETIME).unwrap();
    let handle = rotation.handle();
    let t0 = Instant::now();
    write_set(&base, "restarted", "b", &["a", "b"]);
    rotation.reload(&metrics, t0 + Duration::from_secs(1));
    assert_eq!(subject(&handle.current()), a_issuer, "held after a restart");
    rotation.reload(&metrics, t0 + Duration::from_secs(61));
    assert_eq!(subject(&handle.current()), b_issuer);
    let _ = std::fs::remove_dir_all(&base);
}
