//! The demo's cluster on one machine. The manifests of `deploy/demo/` are read as the
//! API server and Kubernetes' controllers would act on them: each Deployment's replicas
//! become pods (a network namespace each, on one bridge, in a namespace of their own),
//! each Service gets a cluster IP and an EndpointSlice of the pods it selects, and all
//! of it is written where the Remora controller's `dir:` source reads it. Every
//! namespace, process and file made is recorded and removed when the [`Machine`] drops,
//! whatever ends the demo.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::{Value, json};

/// Every network namespace the demo makes is named with this prefix.
pub const PREFIX: &str = "remora-demo-";
/// The Kubernetes namespace of the manifests.
pub const NAMESPACE: &str = "demo";
/// The controller's pod (not meshed) and its address.
pub const CONTROLLER_POD: &str = "controller";
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
/// The proxy's UID (the contract's): iptables never redirects its traffic.
pub const PROXY_UID: &str = "2102";

/// One container of a pod: what to run (`remora-demo` with these arguments, the image's
/// entrypoint) and its environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// A pod, as a Deployment's ReplicaSet would create it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pod {
    pub name: String,
    pub deployment: String,
    pub ip: Ipv4Addr,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub containers: Vec<Container>,
}

impl Pod {
    /// Its network namespace.
    pub fn netns(&self) -> String {
        format!("{PREFIX}{}", self.name)
    }
}

/// A Service, with the cluster IP the demo gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub port_name: String,
    pub target_port: u16,
    pub selector: BTreeMap<String, String>,
}

impl Service {
    /// `name.namespace:port`, as metrics name a Service.
    pub fn target(&self) -> String {
        format!("{}.{NAMESPACE}:{}", self.name, self.port)
    }
}

/// What the manifests make.
#[derive(Debug)]
pub struct Plan {
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    /// The objects the controller reads, as YAML: the manifests with cluster IPs, and
    /// the pods and EndpointSlices the cluster would have made.
    pub objects: String,
}

impl Plan {
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// `/etc/hosts` for every pod: each Service's cluster IP under the names cluster DNS
    /// would answer for it.
    pub fn hosts(&self) -> String {
        let mut out = String::from("127.0.0.1 localhost\n");
        for s in &self.services {
            let n = &s.name;
            out.push_str(&format!(
                "{} {n}.{NAMESPACE}.svc.cluster.local {n}.{NAMESPACE}.svc {n}.{NAMESPACE}\n",
                s.cluster_ip
            ));
        }
        out
    }
}

/// The YAML documents of `text`, as JSON values (empty documents skipped).
pub fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).with_context(|| format!("document {}", i + 1))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

/// Reads the manifests and lays the cluster out: pods at `10.250.0.10` on, Services'
/// cluster IPs at `10.251.0.10` on.
pub fn plan(manifests: &str) -> anyhow::Result<Plan> {
    let mut pods = Vec::new();
    let mut services = Vec::new();
    let mut objects = Vec::new();
    for mut doc in documents(manifests)? {
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match doc["kind"].as_str().unwrap_or_default() {
            "Deployment" => {
                let template = &doc["spec"]["template"];
                let replicas = doc["spec"]["replicas"].as_u64().unwrap_or(1);
                for i in 1..=replicas {
                    let pod_name = format!("{name}-{i}");
                    let host = 10 + pods.len();
                    anyhow::ensure!(host < 250, "too many pods for the demo's /24");
                    let containers = template["spec"]["containers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| container(c, &pod_name))
                        .collect::<anyhow::Result<Vec<_>>>()
                        .with_context(|| format!("Deployment {name}"))?;
                    pods.push(Pod {
                        name: pod_name,
                        deployment: name.clone(),
                        ip: Ipv4Addr::new(10, 250, 0, host as u8),
                        service_account: template["spec"]["serviceAccountName"]
                            .as_str()
                            .unwrap_or("default")
                            .to_string(),
                        labels: str_map(&template["metadata"]["labels"]),
                        containers,
                    });
                }
                objects.push(doc);
            }
            "Service" => {
                let port = &doc["spec"]["ports"][0];
                let number = |v: &Value, what: &str| {
                    v.as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .with_context(|| format!("Service {name}: {what} must be a port number"))
                };
                let service = Service {
                    name: name.clone(),
                    cluster_ip: Ipv4Addr::new(10, 251, 0, 10 + services.len() as u8),
                    port: number(&port["port"], "port")?,
                    port_name: port["name"].as_str().unwrap_or_default().to_string(),
                    target_port: number(&port["targetPort"], "targetPort")?,
                    selector: str_map(&doc["spec"]["selector"]),
                };
                doc["spec"]["clusterIP"] = json!(service.cluster_ip.to_string());
                services.push(service);
                objects.push(doc);
            }
            _ => objects.push(doc),
        }
    }
    for pod in &pods {
        let mut labels: serde_json::Map<String, Value> = pod
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        labels.insert("remora.io/meshed".into(), json!("true"));
        objects.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": NAMESPACE, "labels": labels},
            "spec": {"serviceAccountName": pod.service_account,
                "containers": pod.containers.iter().map(|c| json!({"name": c.name})).collect::<Vec<_>>()},
            "status": {"phase": "Running", "podIP": pod.ip.to_string()},
        }));
    }
    for s in &services {
        let endpoints: Vec<Value> = pods
            .iter()
            .filter(|p| s.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .map(|p| {
                json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true},
                    "targetRef": {"kind": "Pod", "name": p.name, "namespace": NAMESPACE}})
            })
            .collect();
        anyhow::ensure!(!endpoints.is_empty(), "Service {} selects no pod", s.name);
        objects.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-demo", s.name), "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": s.name}},
            "addressType": "IPv4",
            "ports": [{"name": s.port_name, "port": s.target_port, "protocol": "TCP"}],
            "endpoints": endpoints,
        }));
    }
    let mut text = String::new();
    for o in &objects {
        text.push_str("---\n");
        text.push_str(&serde_yaml_ng::to_string(o)?);
    }
    Ok(Plan {
        pods,
        services,
        objects: text,
    })
}

/// A container's arguments and environment (`value`, or the downward API's
/// `metadata.name` and `metadata.namespace`).
fn container(c: &Value, pod: &str) -> anyhow::Result<Container> {
    let args = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            a.as_str()
                .map(str::to_string)
                .context("an argument that is not a string")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut env = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"]
            .as_str()
            .context("env without a name")?
            .to_string();
        let value = match (
            &e["value"],
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Value::String(v), _) => v.clone(),
            (_, Some("metadata.name")) => pod.to_string(),
            (_, Some("metadata.namespace")) => NAMESPACE.to_string(),
            _ => bail!("env {name}: only a value or metadata.name/namespace"),
        };
        env.push((name, value));
    }
    Ok(Container {
        name: c["name"].as_str().unwrap_or("app").to_string(),
        args,
        env,
    })
}

/// What the demo needs of the machine that is missing, each said as what to do.
pub fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push(
            "root: the demo makes network namespaces and iptables rules (run it as root, \
             e.g. sudo make demo)"
                .to_string(),
        );
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("iptables-restore", "iptables"),
        ("ip6tables-restore", "iptables"),
        ("setpriv", "util-linux"),
    ] {
        if !on_path(tool) {
            missing.push(format!("`{tool}` (apt-get install -y {package})"));
        }
    }
    missing
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// A process the demo started.
struct Process {
    label: String,
    child: Child,
}

/// The machine's share of the demo: its folder, its network namespaces and its
/// processes, all removed on drop.
pub struct Machine {
    pub root: PathBuf,
    netns: Vec<String>,
    processes: Vec<Process>,
    keep_files: bool,
}

impl Machine {
    /// Removes what an earlier run left (one killed before it could clean up), then
    /// makes the demo's folder.
    pub fn new(keep_files: bool) -> anyhow::Result<Self> {
        remove_leftovers();
        let root = std::env::temp_dir().join(format!("remora-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        // The proxies and the controller run as the proxy's UID: they read from here.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self {
            root,
            netns: Vec::new(),
            processes: Vec::new(),
            keep_files,
        })
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.netns.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// The pods' namespaces on one bridge (itself in a namespace: the machine's own
    /// network is not touched), each with an address and a default route, and
    /// `/etc/hosts` naming the Services (`ip netns exec` mounts it).
    pub fn network(&mut self, pods: &[(String, Ipv4Addr)], hosts: &str) -> anyhow::Result<()> {
        let bridge = format!("{PREFIX}bridge");
        self.add_netns(&bridge)?;
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        for (i, (netns, addr)) in pods.iter().enumerate() {
            self.add_netns(netns)?;
            let port = format!("p{i}");
            ip(&[
                "link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", &port,
                "netns", &bridge,
            ])?;
            ip(&["-n", &bridge, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &bridge, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", netns, "route", "add", "default", "dev", "eth0"])?;
            let etc = Path::new("/etc/netns").join(netns);
            std::fs::create_dir_all(&etc)?;
            std::fs::write(etc.join("hosts"), hosts)?;
        }
        Ok(())
    }

    /// Starts `program args` in the network namespace `netns` with exactly `env`, as the
    /// proxy's UID or as root, its output to `logs/<label>.log`.
    pub fn spawn(
        &mut self,
        label: &str,
        netns: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        as_proxy: bool,
    ) -> anyhow::Result<()> {
        let logs = self.root.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = File::create(logs.join(format!("{label}.log")))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]);
        if as_proxy {
            cmd.args([
                "setpriv",
                "--reuid",
                PROXY_UID,
                "--regid",
                PROXY_UID,
                "--clear-groups",
                "--",
            ]);
        }
        let child = cmd
            .arg(program)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {label}"))?;
        self.processes.push(Process {
            label: label.to_string(),
            child,
        });
        Ok(())
    }

    /// Runs `program args` in `netns` to the end; an error with its output if it fails.
    pub fn run(&self, netns: &str, program: &Path, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(program)
            .args(args)
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{} in {netns}: {}: {}",
                program.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn find(&mut self, label: &str) -> anyhow::Result<&mut Process> {
        self.processes
            .iter_mut()
            .find(|p| p.label == label)
            .with_context(|| format!("no process {label}"))
    }

    /// Sends `signal` to the process started as `label`.
    pub fn signal(&mut self, label: &str, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.find(label)?.child.id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .with_context(|| format!("signalling {label}"))
    }

    /// Stops the process started as `label` (SIGTERM, then SIGKILL after `grace`).
    pub async fn stop(&mut self, label: &str, grace: Duration) -> anyhow::Result<()> {
        self.signal(label, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = tokio::time::Instant::now() + grace;
        let p = self.find(label)?;
        while tokio::time::Instant::now() < deadline {
            if p.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p.child.kill()?;
        p.child.wait()?;
        Ok(())
    }

    /// The first process that has exited (and was not stopped on purpose), with the end
    /// of its log.
    pub fn exited(&mut self) -> Option<String> {
        let root = self.root.clone();
        self.processes.iter_mut().find_map(|p| {
            let status = p.child.try_wait().ok().flatten()?;
            let log = std::fs::read_to_string(root.join("logs").join(format!("{}.log", p.label)))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Some(format!(
                "{} exited ({status}):\n{}",
                p.label,
                tail.join("\n")
            ))
        })
    }

    /// Forgets a process that was stopped on purpose.
    pub fn forget(&mut self, label: &str) {
        self.processes.retain(|p| p.label != label);
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        for p in &mut self.processes {
            let _ = p.child.kill();
        }
        for p in &mut self.processes {
            let _ = p.child.wait();
        }
        for netns in self.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", netns]).output();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(netns));
        }
        if self.keep_files {
            eprintln!("kept {} (REMORA_DEMO_KEEP=1)", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// The namespaces an earlier demo left, their processes killed, and their `/etc/netns`
/// folders.
fn remove_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line
            .split_whitespace()
            .next()
            .filter(|n| n.starts_with(PREFIX))
        else {
            continue;
        };
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A TCP connection made from inside the network namespace `netns` (its socket belongs
/// there for its life), as a process of that pod would make it.
pub async fn connect(netns: &str, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let path = format!("/run/netns/{netns}");
    let std = std::thread::spawn(move || -> std::io::Result<std::net::TcpStream> {
        let ns = File::open(&path)?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))??;
    let socket = tokio::net::TcpSocket::from_std_stream(std);
    tokio::time::timeout(Duration::from_secs(3), socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// `GET path` from `addr`, connecting from inside `netns`: the body of a 200.
pub async fn get(netns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let tcp = connect(netns, addr).await?;
    tokio::time::timeout(
        Duration::from_secs(5),
        remora_cli::stat::get_over(tcp, &addr.to_string(), path),
    )
    .await
    .with_context(|| format!("{addr}{path}: no answer within 5s"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifests_make_pods_services_and_their_endpoint_slices() {
        let plan = plan(include_str!("../../../deploy/demo/demo.yaml")).unwrap();
        let names: Vec<&str> = plan.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["web-1", "api-1", "api-2", "api-3", "api-v2-1", "intruder-1"]
        );
        let api2 = plan.pod("api-2").unwrap();
        assert_eq!(api2.service_account, "api");
        assert_eq!(
            api2.containers[0].env,
            [("POD_NAME".into(), "api-2".into())]
        );
        assert_eq!(api2.containers[0].args[0], "serve");
        let api = &plan.services[0];
        assert_eq!(
            (api.name.as_str(), api.target()),
            ("api", "api.demo:80".into())
        );
        let objects = documents(&plan.objects).unwrap();
        let slice = objects
            .iter()
            .find(|o| o["kind"] == "EndpointSlice" && o["metadata"]["name"] == "api-demo")
            .unwrap();
        // The three v1 replicas, not the canary.
        assert_eq!(slice["endpoints"].as_array().unwrap().len(), 3);
        assert!(
            objects
                .iter()
                .any(|o| o["kind"] == "Service" && o["spec"]["clusterIP"] == "10.251.0.10")
        );
        assert!(
            plan.hosts()
                .contains("10.251.0.10 api.demo.svc.cluster.local")
        );
    }
}
