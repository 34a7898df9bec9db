//! The Remora binaries under test, and proxy processes started from them.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::Pod;

/// The proxy's UID, from the contract: iptables never redirects its traffic.
pub const PROXY_UID: &str = "2102";

/// Copies of the built binaries in a world-readable folder, so the proxy can run as
/// its own unprivileged UID wherever the workspace is checked out. Removed on drop
/// (unless `REMORA_E2E_KEEP=1`), with the processes' logs.
#[derive(Debug)]
pub struct Binaries {
    dir: PathBuf,
    pub proxy: PathBuf,
    pub init: PathBuf,
    pub controller: PathBuf,
}

impl Binaries {
    /// The binaries next to the running test executable (`target/<profile>/deps/…`).
    pub fn new() -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let built = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        Self::from_dir(&built)
    }

    /// The binaries in `built` (e.g. `target/x86_64-unknown-linux-musl/release`).
    pub fn from_dir(built: &Path) -> Self {
        let dir =
            std::env::temp_dir().join(format!("remora-e2e-{}-{}", std::process::id(), unique()));
        fs::create_dir_all(&dir).expect("create binaries folder");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let copy = |name: &str| {
            let from = built.join(name);
            assert!(
                from.is_file(),
                "{} is missing: build the binaries first (cargo build --workspace --bins; `make test` does)",
                from.display()
            );
            let to = dir.join(name);
            fs::copy(&from, &to).expect("copy binary");
            fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).expect("chmod");
            to
        };
        Self {
            proxy: copy("remora-proxy"),
            init: copy("remora-init"),
            controller: copy("remora-controller"),
            dir,
        }
    }
}

impl Binaries {
    /// Copies another program next to ours, runnable by the proxy's UID.
    pub fn add(&self, program: &Path) -> PathBuf {
        let to = self.dir.join(program.file_name().expect("a file"));
        fs::copy(program, &to).unwrap_or_else(|e| panic!("copy {}: {e}", program.display()));
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).expect("chmod");
        to
    }

    /// The folder the copies live in (also holds the proxies' logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Default for Binaries {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Binaries {
    /// Removes the folder (and the logs in it), unless `REMORA_E2E_KEEP=1` asks to keep
    /// them for a look afterwards.
    fn drop(&mut self) {
        if std::env::var("REMORA_E2E_KEEP").is_ok_and(|v| v == "1") {
            eprintln!("kept {} (REMORA_E2E_KEEP=1)", self.dir.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A running `remora-proxy` in a pod. Killed on drop; its log is printed if the test failed.
#[derive(Debug)]
pub struct Proxy {
    child: Option<Child>,
    pub log: PathBuf,
    pod: String,
}

impl Proxy {
    /// Starts `remora-proxy` in `pod` as UID 2102 with `env` on top of the defaults, and
    /// waits until its admin server reports ready.
    pub async fn start(pod: &Pod, bins: &Binaries, env: &[(&str, &str)]) -> Self {
        let mut env_all = vec![("REMORA_LOG", "info,remora_proxy=debug")];
        env_all.extend_from_slice(env);
        let ready = ("127.0.0.1:4191".parse().unwrap(), "/ready");
        Self::start_program(pod, bins, &bins.proxy, &[], &env_all, ready).await
    }

    /// Starts `remora-controller` in `pod` with `args`, and waits until its admin server
    /// (`127.0.0.1:9990` in the pod) reports ready.
    pub async fn controller(pod: &Pod, bins: &Binaries, args: &[&str]) -> Self {
        let ready = ("127.0.0.1:9990".parse().expect("an address"), "/ready");
        Self::start_program(pod, bins, &bins.controller, args, &[], ready).await
    }

    /// A controller over the folder `objects` (the `dir:` source), serving plaintext
    /// gRPC for proxies without an identity.
    pub async fn plaintext_controller(pod: &Pod, bins: &Binaries, objects: &Path) -> Self {
        let source = format!("dir:{}", objects.display());
        let args = [
            "--source",
            &source,
            "--grpc-plaintext",
            "--log",
            "info,remora_controller=debug",
        ];
        Self::controller(pod, bins, &args).await
    }

    /// Starts any proxy `program` in `pod` as UID 2102 with exactly `env`, and waits
    /// until `GET ready.1` on `ready.0` (inside the pod) answers 200.
    pub async fn start_program(
        pod: &Pod,
        bins: &Binaries,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        ready: (std::net::SocketAddr, &str),
    ) -> Self {
        let name = program
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("proxy");
        let log = bins
            .dir
            .join(format!("{name}-{}-{}.log", pod.name, unique()));
        let file = fs::File::create(&log).expect("log file");
        let mut cmd = pod.command("setpriv");
        cmd.args([
            "--reuid",
            PROXY_UID,
            "--regid",
            PROXY_UID,
            "--clear-groups",
            "--",
        ])
        .arg(program)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let mut proxy = Self {
            child: Some(child),
            log,
            pod: pod.name.clone(),
        };
        for _ in 0..400 {
            if let Some(status) = proxy
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{name} exited at start ({status}):\n{}", proxy.log_text());
            }
            if let Ok((200, _)) = crate::client::get(pod, ready.0, ready.1).await {
                return proxy;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "{name} in {} never became ready:\n{}",
            proxy.pod,
            proxy.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id (`ip netns exec` and `setpriv` exec into the proxy: same process).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Its resident memory now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        remora_admin::rss_kib(Some(self.pid())).expect("VmRSS in /proc/<pid>/status")
    }

    /// Sends SIGTERM (to `ip netns exec`, which execs into setpriv and then the proxy).
    pub fn terminate(&self) {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).expect("SIGTERM");
    }

    /// Kills the proxy at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `limit` for the process to exit; its exit code, or None if still running.
    pub async fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().expect("wait") {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- remora-proxy log ({}) ----\n{}",
                self.pod,
                self.log_text()
            );
        }
    }
}

/// A child process killed (and reaped) when this goes out of scope, a failing assertion
/// included: a server or a watching CLI a test started never outlives it.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `remora` CLI this build made, next to the running test (`target/<profile>/`).
pub fn remora_cli() -> PathBuf {
    built("remora")
}

/// A binary this build made, next to the running test (`target/<profile>/`).
pub fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("the build folder")
        .join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins; `make test` does)",
        bin.display()
    );
    bin
}

/// The Helm the chart tests run: `REMORA_HELM`, or `helm` on the PATH.
pub fn helm_program() -> String {
    std::env::var("REMORA_HELM").unwrap_or_else(|_| "helm".into())
}
