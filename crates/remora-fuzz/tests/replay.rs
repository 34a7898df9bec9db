//! Every fuzz target over its seeds and over every input a fuzzer ever crashed it with
//! (`fuzz/regressions/<target>/`): the fast half of fuzzing, in `make test`. Also keeps
//! `fuzz/` in step with the targets: each has its `fuzz_targets/<name>.rs` and `[[bin]]`.

use std::{collections::BTreeMap, path::Path};

fn fuzz_dir() -> std::path::PathBuf {
    remora_fuzz::seeds::repo().join("fuzz")
}

#[test]
fn every_target_has_seeds_and_survives_them() {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (target, name, bytes) in remora_fuzz::seeds::all() {
        let t = remora_fuzz::target(target).unwrap_or_else(|| panic!("seed for {target}"));
        let run = std::panic::catch_unwind(|| (t.run)(&bytes));
        assert!(run.is_ok(), "{target} fails on its seed {name}");
        *counts.entry(target).or_default() += 1;
    }
    for t in remora_fuzz::TARGETS {
        assert!(
            counts.get(t.name).copied().unwrap_or(0) > 0,
            "{} has no seeds",
            t.name
        );
    }
    eprintln!("seeds per target: {counts:?}");
}

/// The seeds must reach deep: the seed cluster loads, and the controller answers it
/// with routes, a policy and endpoints (an answer that decodes to nothing would fuzz
/// only prost).
#[test]
fn the_seed_cluster_reaches_every_answer() {
    let root = remora_fuzz::seeds::repo();
    let file = "crates/remora-fuzz/seeds/cluster.yaml";
    let text = std::fs::read_to_string(root.join(file)).unwrap();
    let objects = remora_controller::source::yaml::parse(file, &text).unwrap();
    let answers = remora_fuzz::seeds::answers(objects);
    assert!(answers.outbound.iter().any(|p| !p.http_routes.is_empty()));
    assert!(
        answers
            .outbound
            .iter()
            .any(|p| p.retry.is_some() && p.circuit_breaker.is_some())
    );
    assert!(
        answers
            .inbound
            .iter()
            .any(|w| w.ports.values().any(|p| !p.http_routes.is_empty()))
    );
    assert!(
        answers
            .destinations
            .iter()
            .any(|d| d.iter().any(|u| matches!(
                &u.kind,
                Some(remora_api::v1::update::Kind::Add(a)) if !a.endpoints.is_empty()
            )))
    );
}

#[test]
fn every_regression_stays_fixed() {
    // A folder that names no target would be skipped silently: refuse it.
    for entry in std::fs::read_dir(fuzz_dir().join("regressions")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name == "README.md" || remora_fuzz::target(&name).is_some(),
            "fuzz/regressions/{name} is not a fuzz target's folder"
        );
    }
    let mut n = 0;
    for t in remora_fuzz::TARGETS {
        let dir = fuzz_dir().join("regressions").join(t.name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let run = std::panic::catch_unwind(|| (t.run)(&bytes));
            assert!(run.is_ok(), "{} fails again on {}", t.name, path.display());
            n += 1;
        }
    }
    eprintln!("{n} regressions replayed");
}

#[test]
fn the_cargo_fuzz_crate_lists_every_target() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for t in remora_fuzz::TARGETS {
        let file = format!("fuzz_targets/{}.rs", t.name);
        assert!(
            manifest.contains(&format!("name = \"{}\"", t.name)) && manifest.contains(&file),
            "fuzz/Cargo.toml lacks a [[bin]] for {}",
            t.name
        );
        let source = std::fs::read_to_string(fuzz_dir().join(&file))
            .unwrap_or_else(|e| panic!("fuzz/{file}: {e}"));
        assert!(
            source.contains(&format!("remora_fuzz::{}(", t.name)),
            "fuzz/{file} does not run remora_fuzz::{}",
            t.name
        );
    }
    let targets = fuzz_dir().join("fuzz_targets");
    let files = std::fs::read_dir(&targets).unwrap().count();
    assert_eq!(
        files,
        remora_fuzz::TARGETS.len(),
        "a file in {} is no target",
        Path::new(&targets).display()
    );
}

/// The reference reading of paths the route-grant property relies on.
#[test]
fn the_lenient_reading_resolves_what_servlet_containers_do() {
    for (path, read) in [
        ("/public/..;/admin", "/admin"),
        ("/public/%252e%252e/admin", "/admin"),
        ("/public\\..\\admin", "/admin"),
        ("/public/x;jsessionid=1", "/public/x"),
        ("/public%3f/../../admin", "/public"),
        ("/a//b/./c", "/a/b/c"),
    ] {
        assert_eq!(remora_fuzz::lenient_path(path), read, "{path}");
    }
}
