//! `remora-init`: installs the iptables rules that send a pod's TCP traffic through
//! `remora-proxy`. Rule generation ([`rules`]) is pure; this module validates the
//! configuration and drives `iptables-save`/`iptables-restore` through an [`Iptables`]
//! seam that tests can replace.

pub mod rules;

use std::{
    io::Write,
    process::{Command, Stdio},
};

use ipnet::IpNet;
use remora_config::{ConfigError, Knob, Loader, parse_port, parse_port_ranges};

pub use rules::{Family, Plan};

pub const PROXY_UID: Knob = Knob::value(
    "proxy-uid",
    "REMORA_PROXY_UID",
    Some("2102"),
    "UID the proxy runs as; its traffic is never redirected",
);
pub const INBOUND_PORT: Knob = Knob::value(
    "inbound-port",
    "REMORA_INBOUND_PORT",
    Some("4143"),
    "The proxy's inbound port",
);
pub const OUTBOUND_PORT: Knob = Knob::value(
    "outbound-port",
    "REMORA_OUTBOUND_PORT",
    Some("4140"),
    "The proxy's outbound port",
);
pub const SKIP_INBOUND_PORTS: Knob = Knob::value(
    "skip-inbound-ports",
    "REMORA_SKIP_INBOUND_PORTS",
    Some("4191"),
    "Inbound ports (and ranges) not redirected; the admin port so probes and scrapes reach it directly",
);
pub const SKIP_OUTBOUND_PORTS: Knob = Knob::value(
    "skip-outbound-ports",
    "REMORA_SKIP_OUTBOUND_PORTS",
    Some(""),
    "Destination ports (and ranges) the pod reaches without the proxy",
);
pub const SKIP_SUBNETS: Knob = Knob::value(
    "skip-subnets",
    "REMORA_SKIP_SUBNETS",
    Some(""),
    "CIDRs whose traffic is never redirected, either way",
);
pub const IPTABLES_MODE: Knob = Knob::value(
    "iptables-mode",
    "REMORA_IPTABLES_MODE",
    Some("auto"),
    "auto (the variant already holding rules, else nft), nft or legacy",
);
pub const IPV6: Knob = Knob::switch(
    "ipv6",
    "REMORA_IPV6",
    "Require IPv6 interception: fail unless ip6tables rules are written (by default they are whenever the pod has IPv6)",
);
pub const NO_IPV6: Knob = Knob::switch(
    "no-ipv6",
    "REMORA_NO_IPV6",
    "Leave IPv6 alone even when the pod has it: IPv6 connections then bypass the proxy and every AuthorizationPolicy",
);
pub const DRY_RUN: Knob = Knob::switch(
    "dry-run",
    "REMORA_DRY_RUN",
    "Print the exact iptables-restore input; change nothing",
);
pub const CLEANUP: Knob = Knob::switch(
    "cleanup",
    "REMORA_CLEANUP",
    "Remove Remora's rules and chains",
);

pub const KNOBS: &[Knob] = &[
    PROXY_UID,
    INBOUND_PORT,
    OUTBOUND_PORT,
    SKIP_INBOUND_PORTS,
    SKIP_OUTBOUND_PORTS,
    SKIP_SUBNETS,
    IPTABLES_MODE,
    IPV6,
    NO_IPV6,
    DRY_RUN,
    CLEANUP,
];

/// Which iptables variant to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Nft,
    Legacy,
}

impl Mode {
    fn suffix(self) -> &'static str {
        match self {
            Mode::Nft => "nft",
            Mode::Legacy | Mode::Auto => "legacy",
        }
    }
}

/// Whether to intercept IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6 {
    /// Whenever the pod has IPv6: an app listening on `::` must not be reachable past
    /// the proxy.
    Auto,
    /// Always, failing where it cannot be done (`--ipv6`).
    Required,
    /// Never (`--no-ipv6`).
    Off,
}

impl Ipv6 {
    /// The families to set up, given whether the pod's network namespace has IPv6.
    pub fn families(self, available: bool) -> &'static [Family] {
        match (self, available) {
            (Ipv6::Required, _) | (Ipv6::Auto, true) => &[Family::V4, Family::V6],
            (Ipv6::Off, _) | (Ipv6::Auto, false) => &[Family::V4],
        }
    }
}

/// Whether this network namespace has IPv6: the stack is loaded and not disabled. An
/// unreadable answer counts as yes, so a doubt never leaves a bypass.
pub fn ipv6_available() -> bool {
    if !std::path::Path::new("/proc/net/if_inet6").exists() {
        return false;
    }
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map(|v| v.trim() != "1")
        .unwrap_or(true)
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub plan: Plan,
    pub mode: Mode,
    pub ipv6: Ipv6,
    pub dry_run: bool,
    pub cleanup: bool,
}

impl Config {
    /// Parses flags and environment; every bad value is reported at once, before
    /// anything is changed.
    pub fn load(
        args: impl IntoIterator<Item = String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let cmd = remora_config::command(
            "remora-init",
            "Redirects a pod's TCP traffic through remora-proxy with iptables.",
            KNOBS,
        );
        let mut l = Loader::new(cmd, args, env)?;
        let proxy_uid = l.get(&PROXY_UID, |s| match s.parse::<u32>() {
            Ok(0) => Err("must not be 0: root's traffic would bypass the proxy".into()),
            Ok(uid) => Ok(uid),
            Err(_) => Err("expected a numeric UID".into()),
        });
        let inbound_port = l.get(&INBOUND_PORT, parse_port);
        let outbound_port = l.get(&OUTBOUND_PORT, parse_port);
        let skip_inbound_ports = l.get(&SKIP_INBOUND_PORTS, parse_port_ranges);
        let skip_outbound_ports = l.get(&SKIP_OUTBOUND_PORTS, parse_port_ranges);
        let skip_subnets = l.get(&SKIP_SUBNETS, parse_subnets);
        let mode = l.get(&IPTABLES_MODE, |s| match s {
            "auto" => Ok(Mode::Auto),
            "nft" => Ok(Mode::Nft),
            "legacy" => Ok(Mode::Legacy),
            _ => Err("expected auto, nft or legacy".into()),
        });
        let ipv6 = match (l.flag(&IPV6), l.flag(&NO_IPV6)) {
            (true, true) => {
                l.error("--ipv6 and --no-ipv6 contradict each other: give one at most");
                Ipv6::Auto
            }
            (true, false) => Ipv6::Required,
            (false, true) => Ipv6::Off,
            (false, false) => Ipv6::Auto,
        };
        let dry_run = l.flag(&DRY_RUN);
        let cleanup = l.flag(&CLEANUP);
        if inbound_port.is_some() && inbound_port == outbound_port {
            l.error("--inbound-port and --outbound-port must differ");
        }
        l.finish()?;
        Ok(Self {
            plan: Plan {
                proxy_uid: remora_config::present(proxy_uid)?,
                inbound_port: remora_config::present(inbound_port)?,
                outbound_port: remora_config::present(outbound_port)?,
                skip_inbound_ports: remora_config::present(skip_inbound_ports)?,
                skip_outbound_ports: remora_config::present(skip_outbound_ports)?,
                skip_subnets: remora_config::present(skip_subnets)?,
            },
            mode: remora_config::present(mode)?,
            ipv6,
            dry_run,
            cleanup,
        })
    }
}

fn parse_subnets(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            n.parse::<IpNet>()
                .map_err(|_| format!("{n:?} is not a CIDR such as 10.0.0.0/8"))
        })
        .collect()
}

/// Running iptables failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "the pod has IPv6, and its IPv6 rules could not be written ({0}); without them an app \
         listening on :: is reachable past the proxy and every AuthorizationPolicy. Make \
         ip6tables (and the kernel's ip6table_nat) available to the init container, or pass \
         --no-ipv6 to accept that bypass"
    )]
    Ipv6(Box<InitError>),
    #[error("cannot run {program}: {source}; is the iptables package installed in the init image?")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}\ninput was:\n{input}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
        input: String,
    },
    #[error(
        "{program} succeeded but chain {chain} is missing afterwards; the rules were not applied"
    )]
    NotApplied {
        program: String,
        chain: &'static str,
    },
}

/// The seam to the iptables binaries.
pub trait Iptables {
    /// Whether `program` can be run.
    fn exists(&self, program: &str) -> bool;
    /// Runs `program args…` with `input` on stdin and returns its stdout.
    fn run(&self, program: &str, args: &[&str], input: &str) -> Result<String, InitError>;
}

/// Runs the real binaries.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl Iptables for System {
    fn exists(&self, program: &str) -> bool {
        std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
            .unwrap_or(false)
    }

    fn run(&self, program: &str, args: &[&str], input: &str) -> Result<String, InitError> {
        let spawn = |source| InitError::Spawn {
            program: program.to_string(),
            source,
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).map_err(spawn)?;
        }
        let out = child.wait_with_output().map_err(spawn)?;
        if !out.status.success() {
            return Err(InitError::Failed {
                program: program.to_string(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                input: input.to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn binary(family: Family, mode: Mode, tool: &str) -> String {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    format!("{base}-{}-{tool}", mode.suffix())
}

/// Resolves `auto`: the variant whose tables already hold rules, else nft when its
/// binaries exist, else legacy.
pub fn resolve_mode(ipt: &dyn Iptables, family: Family, mode: Mode) -> Mode {
    if mode != Mode::Auto {
        return mode;
    }
    let rules = |m: Mode| {
        let save = binary(family, m, "save");
        if !ipt.exists(&save) {
            return None;
        }
        let out = ipt.run(&save, &[], "").ok()?;
        Some(out.lines().filter(|l| l.starts_with("-A ")).count())
    };
    match (rules(Mode::Nft), rules(Mode::Legacy)) {
        (Some(n), Some(l)) if l > n => Mode::Legacy,
        (Some(_), _) => Mode::Nft,
        (None, Some(_)) => Mode::Legacy,
        (None, None) => Mode::Nft,
    }
}

/// Installs (or with `cleanup` removes) the rules for every family to intercept, given
/// whether the pod has IPv6. Returns the restore input of each family, which is all
/// that happens with `dry_run`.
pub fn apply(
    ipt: &dyn Iptables,
    config: &Config,
    ipv6_available: bool,
) -> Result<Vec<(Family, String)>, InitError> {
    let mut inputs = Vec::new();
    for &family in config.ipv6.families(ipv6_available) {
        let input = apply_family(ipt, config, family).map_err(|e| match family {
            Family::V6 => InitError::Ipv6(Box::new(e)),
            Family::V4 => e,
        })?;
        inputs.push((family, input));
    }
    Ok(inputs)
}

fn apply_family(ipt: &dyn Iptables, config: &Config, family: Family) -> Result<String, InitError> {
    let mode = resolve_mode(ipt, family, config.mode);
    let save = binary(family, mode, "save");
    let restore = binary(family, mode, "restore");
    let current = ipt.run(&save, &["-t", "nat"], "")?;
    let input = if config.cleanup {
        rules::cleanup(&current)
    } else {
        rules::install(&config.plan, family, &current)
    };
    if !config.dry_run && !input.is_empty() {
        // Wait for the xtables lock rather than fail when another tool holds it.
        ipt.run(&restore, &["--noflush", "--wait=10"], &input)?;
        let after = ipt.run(&save, &["-t", "nat"], "")?;
        if !config.cleanup {
            for chain in [rules::INBOUND_CHAIN, rules::OUTBOUND_CHAIN] {
                if !after
                    .lines()
                    .any(|l| l.starts_with(&format!("-A {chain} ")))
                {
                    return Err(InitError::NotApplied {
                        program: restore,
                        chain,
                    });
                }
            }
        }
    }
    Ok(input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{cell::RefCell, collections::HashMap};

    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        let args = std::iter::once("remora-init")
            .chain(args.iter().copied())
            .map(String::from);
        Config::load(args, &|_| None)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = load(&[]).unwrap();
        assert_eq!(c.plan.proxy_uid, 2102);
        assert_eq!((c.plan.inbound_port, c.plan.outbound_port), (4143, 4140));
        assert_eq!(c.plan.skip_inbound_ports[0].to_string(), "4191");
        assert_eq!(c.mode, Mode::Auto);
        assert_eq!(c.ipv6, Ipv6::Auto);
        assert!(!c.dry_run && !c.cleanup);
    }

    #[test]
    fn every_bad_flag_is_reported_before_anything_changes() {
        let err = load(&[
            "--proxy-uid",
            "0",
            "--inbound-port",
            "70000",
            "--skip-subnets",
            "10.0.0.0/8,nonsense",
            "--iptables-mode",
            "both",
            "--skip-outbound-ports",
            "9-1",
        ])
        .unwrap_err()
        .to_string();
        for needle in [
            "--proxy-uid",
            "--inbound-port",
            "\"nonsense\" is not a CIDR",
            "--iptables-mode",
            "--skip-outbound-ports",
        ] {
            assert!(err.contains(needle), "{needle} missing in {err}");
        }
        let err = load(&["--inbound-port", "4140"]).unwrap_err().to_string();
        assert!(err.contains("must differ"), "{err}");
    }

    /// Records calls; `tables` maps a save binary to what it prints.
    #[derive(Default)]
    struct Fake {
        tables: HashMap<String, String>,
        calls: RefCell<Vec<String>>,
    }

    impl Iptables for Fake {
        fn exists(&self, program: &str) -> bool {
            self.tables.contains_key(program)
        }
        fn run(&self, program: &str, args: &[&str], input: &str) -> Result<String, InitError> {
            self.calls
                .borrow_mut()
                .push(format!("{program} {}", args.join(" ")));
            if !self
                .tables
                .contains_key(&program.replace("-restore", "-save"))
            {
                return Err(InitError::Spawn {
                    program: program.into(),
                    source: std::io::ErrorKind::NotFound.into(),
                });
            }
            if program.ends_with("-restore") {
                assert!(!input.is_empty());
                return Ok(String::new());
            }
            Ok(self.tables.get(program).cloned().unwrap_or_default())
        }
    }

    #[test]
    fn auto_prefers_the_variant_holding_rules() {
        let mut fake = Fake::default();
        fake.tables
            .insert("iptables-nft-save".into(), "*nat\nCOMMIT\n".into());
        fake.tables.insert(
            "iptables-legacy-save".into(),
            "*nat\n-A OUTPUT -j X\nCOMMIT\n".into(),
        );
        assert_eq!(resolve_mode(&fake, Family::V4, Mode::Auto), Mode::Legacy);
        fake.tables
            .insert("iptables-legacy-save".into(), String::new());
        assert_eq!(resolve_mode(&fake, Family::V4, Mode::Auto), Mode::Nft);
        fake.tables.remove("iptables-nft-save");
        assert_eq!(resolve_mode(&fake, Family::V4, Mode::Auto), Mode::Legacy);
        assert_eq!(resolve_mode(&fake, Family::V4, Mode::Nft), Mode::Nft);
    }

    #[test]
    fn dry_run_changes_nothing_and_ipv6_covers_both_families() {
        let mut fake = Fake::default();
        fake.tables
            .insert("iptables-nft-save".into(), String::new());
        fake.tables
            .insert("ip6tables-nft-save".into(), String::new());
        let config = load(&["--dry-run", "--ipv6", "--iptables-mode", "nft"]).unwrap();
        let inputs = apply(&fake, &config, false).unwrap();
        assert_eq!(inputs.len(), 2, "--ipv6 even where none was detected");
        assert!(
            fake.calls.borrow().iter().all(|c| !c.contains("restore")),
            "{:?}",
            fake.calls
        );
    }

    #[test]
    fn a_restore_that_did_not_take_is_an_error() {
        let mut fake = Fake::default();
        fake.tables
            .insert("iptables-nft-save".into(), String::new());
        let config = load(&["--iptables-mode", "nft"]).unwrap();
        let err = apply(&fake, &config, false).unwrap_err().to_string();
        assert!(err.contains("chain REMORA_INBOUND is missing"), "{err}");
    }

    /// Issue 11: IPv6 was intercepted only with --ipv6, so an app listening on :: was
    /// reachable past the proxy on any pod with IPv6.
    #[test]
    fn ipv6_is_intercepted_whenever_the_pod_has_it_or_the_start_fails() {
        assert_eq!(Ipv6::Auto.families(true), [Family::V4, Family::V6]);
        assert_eq!(Ipv6::Auto.families(false), [Family::V4]);
        assert_eq!(Ipv6::Required.families(false), [Family::V4, Family::V6]);
        assert_eq!(Ipv6::Off.families(true), [Family::V4]);
        assert_eq!(load(&["--no-ipv6"]).unwrap().ipv6, Ipv6::Off);
        let both = load(&["--ipv6", "--no-ipv6"]).unwrap_err().to_string();
        assert!(both.contains("contradict"), "{both}");

        // The pod has IPv6 but no ip6tables: refuse, saying what to do.
        let mut fake = Fake::default();
        fake.tables.insert(
            "iptables-nft-save".into(),
            "-A REMORA_INBOUND x\n-A REMORA_OUTPUT x\n".into(),
        );
        let config = load(&["--iptables-mode", "nft"]).unwrap();
        let err = apply(&fake, &config, true).unwrap_err().to_string();
        assert!(err.contains("the pod has IPv6"), "{err}");
        assert!(err.contains("--no-ipv6"), "{err}");
        assert_eq!(apply(&fake, &config, false).unwrap().len(), 1);
    }
}
