//! Bad configuration stops the real binary at start, with a message naming the flag or
//! file: never a ready controller that serves nothing.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("remora-startup-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The controller with `args` (listening on free loopback ports, no cluster in reach):
/// its output once it has exited, or a failure if it is still running after 10 s.
fn controller(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_remora-controller"))
        .args(["--admin-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
        .args(args)
        .env_clear()
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HOME", "/nonexistent")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the controller starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after 10s with {args:?}:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn refused(args: &[&str]) -> String {
    let out = controller(args);
    assert!(!out.status.success(), "{args:?} started");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn a_dir_source_that_is_not_a_folder_stops_the_controller_naming_it() {
    let dir = scratch("dir");
    let missing = dir.join("objects");
    let source = format!("dir:{}", missing.display());
    let text = refused(&["--source", &source, "--grpc-plaintext"]);
    assert!(
        text.contains(&format!("--source {source}: no such directory")),
        "{text}"
    );
    let file = dir.join("objects.yaml");
    std::fs::write(&file, "").unwrap();
    let source = format!("dir:{}", file.display());
    let text = refused(&["--source", &source, "--grpc-plaintext"]);
    assert!(
        text.contains(&format!("--source {source}: not a directory")),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_dev_ca_without_a_cluster_to_check_tokens_names_the_token_validator() {
    let dir = scratch("tokens");
    let objects = dir.join("objects");
    let ca = dir.join("ca");
    std::fs::create_dir_all(&objects).unwrap();
    std::fs::create_dir_all(&ca).unwrap();
    let source = format!("dir:{}", objects.display());
    let text = refused(&["--source", &source, "--dev-ca", ca.to_str().unwrap()]);
    assert!(
        text.contains("--token-validator kube (the default)")
            && text.contains("--token-validator static:FILE"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
