//! Several pods on one L2 segment: each pod's `eth0` is a veth whose peer sits on a
//! bridge in a namespace of its own. Pods get a default route, so a Service's
//! ClusterIP (which exists only in discovery, there is no kube-proxy) is routable
//! until iptables redirects it to the proxy.

use std::{net::IpAddr, process::Command};

use crate::{
    Pod,
    pod::{run, unique_id},
};

#[derive(Debug)]
pub struct Cluster {
    pub pods: Vec<Pod>,
    bridge: String,
}

impl Cluster {
    /// One pod per `(role, ip)`, all on one bridge, addresses in a /24.
    pub fn new(pods: &[(&str, &str)]) -> Self {
        let id = unique_id();
        let bridge = format!("remora-br-{id}");
        let _ = Command::new("ip").args(["netns", "del", &bridge]).output();
        run(Command::new("ip").args(["netns", "add", &bridge]));
        let br = |args: &[&str]| run(Command::new("ip").args(["-n", &bridge]).args(args));
        br(&["link", "add", "br0", "type", "bridge"]);
        br(&["link", "set", "br0", "up"]);
        let mut out = Vec::new();
        for (i, (role, ip)) in pods.iter().enumerate() {
            let ip: IpAddr = ip.parse().expect("pod IP");
            let pod = Pod::create(format!("remora-{role}-{id}"), ip);
            let port = format!("p{i}");
            run(Command::new("ip").args([
                "link", "add", "eth0", "netns", &pod.name, "type", "veth", "peer", "name", &port,
                "netns", &bridge,
            ]));
            br(&["link", "set", &port, "master", "br0"]);
            br(&["link", "set", &port, "up"]);
            pod.ip_cmd(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            pod.ip_cmd(&["link", "set", "eth0", "up"]);
            pod.ip_cmd(&["route", "add", "default", "dev", "eth0"]);
            out.push(pod);
        }
        Self { pods: out, bridge }
    }

    /// The pod whose namespace name has `role` in it.
    pub fn pod(&self, role: &str) -> &Pod {
        let prefix = format!("remora-{role}-");
        self.pods
            .iter()
            .find(|p| p.name.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no pod {role}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.pods.clear();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.bridge])
            .output();
    }
}
