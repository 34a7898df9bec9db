//! `remora-init` against real iptables in a fresh network namespace.

use remora_tests::{Binaries, PodPair, e2e_enabled};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The chain and rule lines of an `iptables-save` dump, without its timestamped comments.
fn rules(dump: &str) -> Vec<String> {
    dump.lines()
        .filter(|l| !l.starts_with('#'))
        .map(String::from)
        .collect()
}

#[test]
fn install_rerun_dry_run_and_cleanup() {
    if !e2e_enabled() {
        return;
    }
    let bins = Binaries::new();
    let pods = PodPair::new();
    let pod = &pods.client;
    let pristine = pod.nat_rules();
    assert!(!pristine.contains("REMORA"), "{pristine}");

    // --dry-run prints the restore input and changes nothing.
    let dry = pod.init(&bins, &["--dry-run", "--skip-outbound-ports", "5432"]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    let printed = text(&dry.stdout);
    assert!(
        printed.contains("-A REMORA_OUTPUT -m owner --uid-owner 2102 -j RETURN"),
        "{printed}"
    );
    assert!(printed.trim_end().ends_with("COMMIT"), "{printed}");
    assert_eq!(
        rules(&pod.nat_rules()),
        rules(&pristine),
        "dry run changed the rules"
    );

    // The printed input is exactly what a real run applies: IPv4's, then (the pod has
    // IPv6, as every fresh namespace does) IPv6's.
    let (v4, v6) = printed
        .strip_prefix("# iptables-restore input\n")
        .and_then(|rest| rest.split_once("# ip6tables-restore input\n"))
        .unwrap_or_else(|| panic!("one input per family: {printed}"));
    for (tool, input) in [("iptables-restore", v4), ("ip6tables-restore", v6)] {
        let mut restore = pod.command(tool);
        restore
            .args(["--noflush", "--wait=10"])
            .stdin(std::process::Stdio::piped());
        let mut child = restore.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "{tool}");
    }
    let by_hand = pod.nat_rules();
    let by_hand_v6 = pod.nat_rules_v6();
    let run = pod.init(&bins, &["--skip-outbound-ports", "5432"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let installed = pod.nat_rules();
    let rules = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with('-'))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(rules(&installed), rules(&by_hand));
    assert_eq!(rules(&pod.nat_rules_v6()), rules(&by_hand_v6));
    assert!(
        by_hand_v6.contains("-j REDIRECT --to-ports 4143"),
        "{by_hand_v6}"
    );
    assert!(
        installed.contains("-A REMORA_INBOUND -p tcp -m tcp --dport 4191 -j RETURN"),
        "{installed}"
    );
    assert!(
        installed.contains("-A REMORA_INBOUND -p tcp -j REDIRECT --to-ports 4143"),
        "{installed}"
    );
    assert!(
        installed.contains("-A REMORA_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN"),
        "{installed}"
    );

    // Re-running with other flags replaces our chains: no stale rule, one jump each.
    let again = pod.init(
        &bins,
        &[
            "--skip-outbound-ports",
            "6379",
            "--skip-subnets",
            "10.96.0.0/12",
        ],
    );
    assert!(again.status.success(), "{}", text(&again.stderr));
    let replaced = pod.nat_rules();
    assert!(!replaced.contains("--dport 5432"), "{replaced}");
    assert!(replaced.contains("--dport 6379"), "{replaced}");
    assert!(
        replaced.contains("-A REMORA_OUTPUT -d 10.96.0.0/12 -j RETURN"),
        "{replaced}"
    );
    assert_eq!(
        replaced.matches("-j REMORA_INBOUND").count(),
        1,
        "{replaced}"
    );
    assert_eq!(
        replaced.matches("-j REMORA_OUTPUT").count(),
        1,
        "{replaced}"
    );

    // Bad flags are all reported, and nothing changes.
    let bad = pod.init(
        &bins,
        &[
            "--proxy-uid",
            "0",
            "--skip-subnets",
            "bogus",
            "--outbound-port",
            "99999",
        ],
    );
    assert!(!bad.status.success());
    let err = text(&bad.stderr);
    for needle in ["--proxy-uid", "bogus", "--outbound-port"] {
        assert!(err.contains(needle), "{needle} not in: {err}");
    }
    assert_eq!(
        rules(&pod.nat_rules()),
        rules(&replaced),
        "a failed run changed the rules"
    );

    // Cleanup removes everything of ours, and is safe to repeat.
    for _ in 0..2 {
        let clean = pod.init(&bins, &["--cleanup"]);
        assert!(clean.status.success(), "{}", text(&clean.stderr));
        let after = pod.nat_rules();
        assert!(!after.contains("REMORA"), "{after}");
        let after = pod.nat_rules_v6();
        assert!(!after.contains("REMORA"), "{after}");
    }
}

#[test]
fn ipv6_and_legacy_modes() {
    if !e2e_enabled() {
        return;
    }
    let bins = Binaries::new();
    let pods = PodPair::new();
    let pod = &pods.client;
    let out = pod.init(&bins, &["--ipv6", "--skip-subnets", "fd00::/8,10.0.0.0/8"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v6 = text(
        &pod.command("ip6tables-save")
            .args(["-t", "nat"])
            .output()
            .unwrap()
            .stdout,
    );
    assert!(
        v6.contains("-A REMORA_OUTPUT -d fd00::/8 -j RETURN"),
        "{v6}"
    );
    assert!(!v6.contains("10.0.0.0/8"), "{v6}");
    assert!(
        pod.nat_rules()
            .contains("-A REMORA_OUTPUT -d 10.0.0.0/8 -j RETURN")
    );

    let legacy = pod.init(&bins, &["--iptables-mode", "legacy"]);
    assert!(legacy.status.success(), "{}", text(&legacy.stderr));
    let saved = text(
        &pod.command("iptables-legacy-save")
            .args(["-t", "nat"])
            .output()
            .unwrap()
            .stdout,
    );
    assert!(
        saved.contains("-A REMORA_OUTPUT -p tcp -j REDIRECT --to-ports 4140"),
        "{saved}"
    );
}
