//! The end-to-end harness: "pods" made of network namespaces joined by a veth pair,
//! with real `remora-init` iptables rules and real `remora-proxy` processes running as
//! the proxy's UID. Test servers and clients run in-process, on sockets created inside
//! a pod's namespace.
//!
//! These tests need root, `ip`, `iptables`, `setpriv`, `curl` and `tcpdump`. When they cannot run they fail
//! and say why; `REMORA_E2E_SKIP=1` skips them loudly on a laptop (CI never sets it).

pub mod backend;
pub mod body;
pub mod client;
pub mod cluster;
pub mod mesh;
pub mod pod;
pub mod proc;

pub use cluster::Cluster;
pub use pod::{CLIENT_V6, Pod, PodPair, SERVER_V6};
pub use proc::{Binaries, Proxy, Reaped, built, helm_program, remora_cli};

/// Writes `dir/name` atomically (a temporary file, then a rename), as an editor or
/// `kubectl` would: a folder watcher never reads half a file.
pub fn write_atomically(dir: &std::path::Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write the temporary file");
    std::fs::rename(&tmp, dir.join(name)).expect("rename it into place");
}

/// Returns false (after saying so) when the suite is skipped on purpose; panics with
/// the reason when it cannot run.
pub fn e2e_enabled() -> bool {
    if std::env::var("REMORA_E2E_SKIP").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPING end-to-end test: REMORA_E2E_SKIP=1 is set");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "end-to-end tests need root (network namespaces and iptables); run them as root, \
             or set REMORA_E2E_SKIP=1 to skip them on a development machine"
        );
    }
    for tool in [
        "ip",
        "iptables-restore",
        "iptables-save",
        "ip6tables-restore",
        "ip6tables-save",
        "setpriv",
        "curl",
        "tcpdump",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "end-to-end tests need `{tool}`: apt-get install -y iproute2 iptables util-linux curl tcpdump"
        );
    }
    true
}

/// Polls `check` every 50 ms until it holds, for at most ten seconds, then panics with
/// `what` and the last reason: metrics, logs and watched folders catch up a moment
/// after the traffic that changed them.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}
