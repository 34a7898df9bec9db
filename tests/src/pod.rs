//! Pods: network namespaces, joined in pairs by a veth link.

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A network namespace standing in for a pod. Deleted on drop.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ip: IpAddr,
    owned: bool,
}

/// Two pods on one link: a client (10.77.0.1) and a server (10.77.0.2). The addresses
/// exist only inside the two namespaces, so every test can use the same ones.
#[derive(Debug)]
pub struct PodPair {
    pub client: Pod,
    pub server: Pod,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// `<pid>-<n>`: names no other test process (nor this one before) has used.
pub(crate) fn unique_id() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl PodPair {
    pub fn new() -> Self {
        let id = unique_id();
        let client = Pod::create(format!("remora-c-{id}"), "10.77.0.1".parse().unwrap());
        let server = Pod::create(format!("remora-s-{id}"), "10.77.0.2".parse().unwrap());
        run(Command::new("ip").args([
            "link",
            "add",
            "eth0",
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &server.name,
        ]));
        for pod in [&client, &server] {
            pod.ip_cmd(&["addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"]);
            pod.ip_cmd(&["link", "set", "eth0", "up"]);
        }
        Self { client, server }
    }
}

impl PodPair {
    /// A pair with IPv6 too: the client at `fd00:77::1`, the server at `fd00:77::2`.
    pub fn dual_stack() -> Self {
        let pair = Self::new();
        for (pod, ip) in [(&pair.client, CLIENT_V6), (&pair.server, SERVER_V6)] {
            // `nodad`: usable at once, not after duplicate address detection.
            pod.ip_cmd(&[
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
        }
        pair
    }
}

/// The IPv6 addresses of [`PodPair::dual_stack`].
pub const CLIENT_V6: &str = "fd00:77::1";
pub const SERVER_V6: &str = "fd00:77::2";

impl Default for PodPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Pod {
    /// A pod of its own, with only loopback (up): for tests that put a whole path
    /// inside one namespace.
    pub fn alone() -> Self {
        Self::create(
            format!("remora-a-{}", unique_id()),
            "127.0.0.1".parse().unwrap(),
        )
    }

    pub(crate) fn create(name: String, ip: IpAddr) -> Self {
        // A namespace left behind by a crashed run with the same name is replaced.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let pod = Self {
            name,
            ip,
            owned: true,
        };
        pod.ip_cmd(&["link", "set", "lo", "up"]);
        pod
    }

    /// `ip -n <pod> args…`, failing the test if it fails.
    pub fn ip_cmd(&self, args: &[&str]) {
        run(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    /// A handle on an existing pod that does not delete it when dropped (for tasks that
    /// outlive a borrow of the owner).
    pub fn borrowed(name: String, ip: IpAddr) -> Self {
        Self {
            name,
            ip,
            owned: false,
        }
    }

    /// A command that runs inside this pod's namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `remora-init` with `args`, inside the pod; returns its output whatever it is.
    pub fn init(&self, bins: &crate::Binaries, args: &[&str]) -> Output {
        self.command(bins.init.to_str().unwrap())
            .args(args)
            .output()
            .expect("run remora-init")
    }

    /// Installs the interception rules, failing the test if that fails.
    pub fn intercept(&self, bins: &crate::Binaries) {
        let out = self.init(bins, &[]);
        assert!(
            out.status.success(),
            "remora-init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `iptables-save -t nat` inside the pod.
    pub fn nat_rules(&self) -> String {
        self.save("iptables-save")
    }

    /// `ip6tables-save -t nat` inside the pod.
    pub fn nat_rules_v6(&self) -> String {
        self.save("ip6tables-save")
    }

    fn save(&self, tool: &str) -> String {
        let out = self
            .command(tool)
            .args(["-t", "nat"])
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered this pod's network namespace: sockets it
    /// creates belong to the pod for their whole life.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path)?;
            setns(ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            f()
        })
        .join()
        .expect("namespace thread panicked")
        .unwrap_or_else(|e| panic!("in namespace {}: {e}", self.name))
    }

    /// A listener inside the pod.
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        let std = self.enter(move || {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            s.listen(128)?;
            Ok(std::net::TcpListener::from(s))
        });
        TcpListener::from_std(std).expect("register listener")
    }

    /// Connects from inside the pod, as an application there would (not as the proxy's UID).
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let std = self.enter(move || {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_nonblocking(true)?;
            Ok(std::net::TcpStream::from(s))
        });
        let socket = TcpSocket::from_std_stream(std);
        let stream = tokio::time::timeout(std::time::Duration::from_secs(10), socket.connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub(crate) fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
