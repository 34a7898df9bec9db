//! The interception rules as `iptables-restore` input: a pure function of the
//! configuration and the table's current state, so re-running replaces our chains
//! instead of stacking duplicate jumps.

use ipnet::IpNet;
use remora_config::PortRange;

/// Our chain in the nat table, jumped to from PREROUTING (traffic into the pod).
pub const INBOUND_CHAIN: &str = "REMORA_INBOUND";
/// Our chain in the nat table, jumped to from OUTPUT (traffic the pod sends).
pub const OUTBOUND_CHAIN: &str = "REMORA_OUTPUT";

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn holds(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
}

/// What to intercept, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub skip_inbound_ports: Vec<PortRange>,
    pub skip_outbound_ports: Vec<PortRange>,
    pub skip_subnets: Vec<IpNet>,
}

/// The restore input that installs `plan` into a nat table whose `iptables-save`
/// output is `current` (only our jumps in it matter).
pub fn install(plan: &Plan, family: Family, current: &str) -> String {
    let mut out = vec!["*nat".to_string()];
    // With --noflush, declaring an existing user chain flushes it, and a new one is created.
    out.push(format!(":{INBOUND_CHAIN} - [0:0]"));
    out.push(format!(":{OUTBOUND_CHAIN} - [0:0]"));
    out.extend(delete_jumps(current));

    for p in &plan.skip_inbound_ports {
        out.push(format!("-A {INBOUND_CHAIN} -p tcp --dport {p} -j RETURN"));
    }
    for net in plan.skip_subnets.iter().filter(|n| family.holds(n)) {
        out.push(format!("-A {INBOUND_CHAIN} -s {net} -j RETURN"));
    }
    out.push(format!(
        "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        plan.inbound_port
    ));

    // The proxy's own connections (to apps and to other pods) are never captured again.
    out.push(format!(
        "-A {OUTBOUND_CHAIN} -m owner --uid-owner {} -j RETURN",
        plan.proxy_uid
    ));
    // Loopback stays in the pod: calls to localhost and to the pod's own IP go straight
    // to the app, as they would without the mesh.
    out.push(format!("-A {OUTBOUND_CHAIN} -o lo -j RETURN"));
    for p in &plan.skip_outbound_ports {
        out.push(format!("-A {OUTBOUND_CHAIN} -p tcp --dport {p} -j RETURN"));
    }
    for net in plan.skip_subnets.iter().filter(|n| family.holds(n)) {
        out.push(format!("-A {OUTBOUND_CHAIN} -d {net} -j RETURN"));
    }
    out.push(format!(
        "-A {OUTBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        plan.outbound_port
    ));

    out.push(format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"));
    out.push(format!("-A OUTPUT -p tcp -j {OUTBOUND_CHAIN}"));
    out.push("COMMIT".to_string());
    out.join("\n") + "\n"
}

/// The restore input that removes everything [`install`] added. Empty when there is
/// nothing of ours in `current`.
pub fn cleanup(current: &str) -> String {
    let ours = [INBOUND_CHAIN, OUTBOUND_CHAIN];
    let present: Vec<&str> = ours
        .into_iter()
        .filter(|c| current.lines().any(|l| l.starts_with(&format!(":{c} "))))
        .collect();
    let deletes = delete_jumps(current);
    if present.is_empty() && deletes.is_empty() {
        return String::new();
    }
    let mut out = vec!["*nat".to_string()];
    out.extend(deletes);
    for chain in present {
        out.push(format!(":{chain} - [0:0]"));
        out.push(format!("-X {chain}"));
    }
    out.push("COMMIT".to_string());
    out.join("\n") + "\n"
}

/// `-D` lines for every jump from a built-in chain to ours in `current`.
fn delete_jumps(current: &str) -> Vec<String> {
    current
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING ") || l.starts_with("-A OUTPUT "))
        .filter(|l| {
            l.ends_with(&format!("-j {INBOUND_CHAIN}"))
                || l.ends_with(&format!("-j {OUTBOUND_CHAIN}"))
        })
        .map(|l| format!("-D{}", &l[2..]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            proxy_uid: 2102,
            inbound_port: 4143,
            outbound_port: 4140,
            skip_inbound_ports: vec![PortRange {
                first: 4191,
                last: 4191,
            }],
            skip_outbound_ports: vec![PortRange {
                first: 5000,
                last: 5010,
            }],
            skip_subnets: vec!["10.96.0.0/12".parse().unwrap(), "fd00::/8".parse().unwrap()],
        }
    }

    #[test]
    fn fresh_install_v4() {
        let got = install(&plan(), Family::V4, "");
        let want = "\
*nat
:REMORA_INBOUND - [0:0]
:REMORA_OUTPUT - [0:0]
-A REMORA_INBOUND -p tcp --dport 4191 -j RETURN
-A REMORA_INBOUND -s 10.96.0.0/12 -j RETURN
-A REMORA_INBOUND -p tcp -j REDIRECT --to-ports 4143
-A REMORA_OUTPUT -m owner --uid-owner 2102 -j RETURN
-A REMORA_OUTPUT -o lo -j RETURN
-A REMORA_OUTPUT -p tcp --dport 5000:5010 -j RETURN
-A REMORA_OUTPUT -d 10.96.0.0/12 -j RETURN
-A REMORA_OUTPUT -p tcp -j REDIRECT --to-ports 4140
-A PREROUTING -p tcp -j REMORA_INBOUND
-A OUTPUT -p tcp -j REMORA_OUTPUT
COMMIT
";
        assert_eq!(got, want);
    }

    #[test]
    fn v6_keeps_only_v6_subnets() {
        let got = install(&plan(), Family::V6, "");
        assert!(got.contains("-A REMORA_INBOUND -s fd00::/8 -j RETURN"));
        assert!(got.contains("-A REMORA_OUTPUT -d fd00::/8 -j RETURN"));
        assert!(!got.contains("10.96.0.0/12"));
    }

    const INSTALLED: &str = "\
# Generated by iptables-nft-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:REMORA_INBOUND - [0:0]
:REMORA_OUTPUT - [0:0]
-A PREROUTING -p tcp -j REMORA_INBOUND
-A PREROUTING -p tcp -j KUBE-SERVICES
-A OUTPUT -p tcp -j REMORA_OUTPUT
-A REMORA_INBOUND -p tcp -j REDIRECT --to-ports 4143
COMMIT
";

    #[test]
    fn reinstall_replaces_our_jumps_and_keeps_others() {
        let got = install(&plan(), Family::V4, INSTALLED);
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines[3], "-D PREROUTING -p tcp -j REMORA_INBOUND");
        assert_eq!(lines[4], "-D OUTPUT -p tcp -j REMORA_OUTPUT");
        assert!(!got.contains("KUBE-SERVICES"), "never touches other rules");
        assert_eq!(got.matches("-A PREROUTING").count(), 1);
    }

    #[test]
    fn cleanup_removes_jumps_then_chains() {
        let got = cleanup(INSTALLED);
        let want = "\
*nat
-D PREROUTING -p tcp -j REMORA_INBOUND
-D OUTPUT -p tcp -j REMORA_OUTPUT
:REMORA_INBOUND - [0:0]
-X REMORA_INBOUND
:REMORA_OUTPUT - [0:0]
-X REMORA_OUTPUT
COMMIT
";
        assert_eq!(got, want);
        assert_eq!(cleanup("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"), "");
    }
}
