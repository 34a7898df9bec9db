//! `make demo`'s program, run as a user runs it (shorter): its summary keeps the demo's
//! promises — every request between pods over mTLS, success through a failing replica
//! and with the controller stopped, the canary's split, the intruder refused — and it
//! leaves nothing behind: no network namespace, process, iptables rule or file.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use remora_tests::{Binaries, built, e2e_enabled};

const PREFIX: &str = "remora-demo-";

/// Runs `cmd` to its end or kills it at `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "the demo ran past {limit:?}:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().expect("output")
}

/// The demo's network namespaces now.
fn demo_namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_string)
        .collect()
}

/// The machine's own iptables rules (both families, every table), without counters.
fn host_rules() -> String {
    let mut out = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let saved = Command::new(tool).output().expect("iptables-save");
        for line in String::from_utf8_lossy(&saved.stdout).lines() {
            if line.starts_with('#') {
                continue;
            }
            // `:CHAIN POLICY [packets:bytes]`: the counters move, the rules must not.
            out.push_str(line.split(" [").next().unwrap_or(line));
            out.push('\n');
        }
    }
    out
}

/// Processes still running from the demo's folder (`/tmp/remora-demo-<pid>/bin/…`).
fn demo_processes(folder: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(folder) {
            out.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    out
}

/// What the demo must not leave: its namespaces, their `/etc/netns` entries, its folder
/// and any process run from it.
fn assert_nothing_left(folder: &str) {
    assert!(demo_namespaces().is_empty(), "{:?}", demo_namespaces());
    assert!(!Path::new(folder).exists(), "{folder} is left");
    assert!(
        demo_processes(folder).is_empty(),
        "{:?}",
        demo_processes(folder)
    );
    let leftover_etc: Vec<_> = std::fs::read_dir("/etc/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftover_etc.is_empty(), "/etc/netns: {leftover_etc:?}");
}

/// The folder the demo names in its first line.
fn folder_of(stdout: &str) -> String {
    stdout
        .split_whitespace()
        .find(|w| w.starts_with("/tmp/remora-demo-"))
        .map(|w| w.trim_end_matches("/logs").to_string())
        .expect("the demo names its folder")
}

/// Both runs in one test: two demos at once would share their namespaces' names.
#[test]
fn the_demo_plays_its_acts_keeps_its_promises_and_leaves_nothing_behind() {
    if !e2e_enabled() {
        return;
    }
    let demo = built("remora-demo");
    assert!(
        demo_namespaces().is_empty(),
        "another demo is running: {:?}",
        demo_namespaces()
    );
    let rules_before = host_rules();

    // Ctrl-C in the middle of act 1: everything made so far is removed, exit 130.
    let mut child = Command::new(&demo)
        .args(["--duration", "60s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.contains("ACT 1") {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(_) => assert!(
                Instant::now() < deadline && child.try_wait().unwrap().is_none(),
                "no act 1:\n{seen}"
            ),
        }
    }
    let folder = folder_of(&seen);
    assert!(!demo_namespaces().is_empty(), "the demo made its pods");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the demo did not end on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "{seen}");
    assert_nothing_left(&folder);

    // A whole run.
    let summary_file =
        std::env::temp_dir().join(format!("demo-summary-{}.json", std::process::id()));
    let out = run_bounded(
        Command::new(&demo)
            .args(["--duration", "24s", "--summary"])
            .arg(&summary_file)
            .env_remove("DURATION"),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}:\n{stdout}\n{stderr}", out.status);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_file).expect("the summary"))
            .expect("the summary is JSON");
    std::fs::remove_file(&summary_file).unwrap();
    let context = format!("{summary:#}\n{stdout}");

    for act in ["ACT 1", "ACT 2", "ACT 3", "ACT 4", "ACT 5", "Summary of"] {
        assert!(stdout.contains(act), "{act} in:\n{context}");
    }
    // The identities act 1 shows are the proxies' own view of the api's endpoints.
    assert!(
        stdout.contains("spiffe://cluster.local/ns/demo/sa/api"),
        "{context}"
    );
    assert_eq!(summary["mtls_share"].as_f64(), Some(1.0), "{context}");
    let rate = |k: &str| summary[k]["success_rate"].as_f64().unwrap_or(0.0);
    let requests = |k: &str| summary[k]["requests"].as_u64().unwrap_or(0);
    // 100 requests a second from web: about 2,400 in all, 2,000 through the fault.
    assert!(requests("web") >= 1500, "{context}");
    assert!(requests("during_fault") >= 1000, "{context}");
    assert!(requests("controller_down") >= 200, "{context}");
    for k in ["web", "during_fault", "controller_down"] {
        assert!(rate(k) >= 0.999, "{k} below 99.9 %:\n{context}");
    }
    // Each canary step is judged over about 260 requests: at least 4.8 standard
    // deviations either side of the weight.
    let share = |k: &str| summary[k].as_f64().unwrap_or(-1.0);
    assert!((0.0..=0.25).contains(&share("canary_10")), "{context}");
    assert!(share("canary_10") > 0.0, "{context}");
    assert!((0.35..=0.65).contains(&share("canary_50")), "{context}");
    assert!(
        summary["intruder_allowed_before"].as_u64() > Some(0),
        "{context}"
    );
    assert!(
        summary["intruder_refused_after"].as_u64() > Some(10),
        "{context}"
    );
    assert_eq!(
        summary["intruder_allowed_after"].as_u64(),
        Some(0),
        "{context}"
    );

    // Nothing left behind.
    assert_nothing_left(&folder_of(&stdout));
    assert_eq!(
        host_rules(),
        rules_before,
        "the machine's own iptables rules changed"
    );
}

/// Without root, or without the tools, the demo says exactly what is missing and exits
/// non-zero before it makes anything; a run too short for its acts is refused.
#[test]
fn without_what_it_needs_the_demo_says_what_is_missing() {
    if !e2e_enabled() {
        return;
    }
    // A copy anyone can run (the build folder may not be).
    let bins = Binaries::new();
    let demo = bins.add(&built("remora-demo"));
    let empty = bins.dir().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(&demo)
        .env("PATH", &empty)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "`ip` (apt-get install -y iproute2)",
        "`iptables-restore` (apt-get install -y iptables)",
        "`setpriv` (apt-get install -y util-linux)",
    ] {
        assert!(err.contains(want), "{want} in: {err}");
    }
    assert!(!err.contains("root"), "run as root: {err}");

    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(&demo)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("root: the demo makes network namespaces"),
        "{err}"
    );
    assert!(!err.contains("`ip`"), "{err}");

    let out = Command::new(&demo)
        .args(["--duration", "5s"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 15s"),
        "{out:?}"
    );
}
