//! The controller's knob table and typed configuration.

use std::{net::SocketAddr, path::PathBuf};

use remora_admin::LogFormat;
use remora_config::{ConfigError, Effective, Knob, Loader};

pub const SOURCE: Knob = Knob::value(
    "source",
    "REMORA_SOURCE",
    Some("kube"),
    "Where objects come from: kube (the API server) or dir:PATH (kubectl-style YAML, re-read on change)",
);
pub const GRPC_ADDR: Knob = Knob::value(
    "grpc-addr",
    "REMORA_GRPC_ADDR",
    Some("0.0.0.0:8086"),
    "gRPC listener: Destination (and later Policy, Identity) for the proxies",
);
pub const ADMIN_ADDR: Knob = Knob::value(
    "admin-addr",
    "REMORA_ADMIN_ADDR",
    Some("0.0.0.0:9990"),
    "Admin listener: /metrics, /live, /ready, /config",
);
pub const TRUST_DOMAIN: Knob = Knob::value(
    "trust-domain",
    "REMORA_TRUST_DOMAIN",
    Some("cluster.local"),
    "Trust domain of the mesh's SPIFFE identities",
);
pub const CLUSTER_DOMAIN: Knob = Knob::value(
    "cluster-domain",
    "REMORA_CLUSTER_DOMAIN",
    Some("cluster.local"),
    "The cluster's DNS domain, for <name>.<namespace>.svc.<domain> targets",
);
pub const LOG: Knob = Knob::value(
    "log",
    "REMORA_LOG",
    Some("info"),
    "Log filter (tracing EnvFilter syntax)",
);
pub const LOG_FORMAT: Knob = Knob::value(
    "log-format",
    "REMORA_LOG_FORMAT",
    Some("plain"),
    "Log format: plain or json",
);

pub const KNOBS: &[Knob] = &[
    SOURCE,
    GRPC_ADDR,
    ADMIN_ADDR,
    TRUST_DOMAIN,
    CLUSTER_DOMAIN,
    LOG,
    LOG_FORMAT,
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    Kube,
    Dir(PathBuf),
}

/// The controller's validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: SourceKind,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub trust_domain: String,
    pub cluster_domain: String,
    pub log: String,
    pub log_format: LogFormat,
    pub effective: Vec<Effective>,
}

fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| "expected IP:port".into())
}

fn domain(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err("expected a DNS name such as cluster.local".into())
    }
}

impl Config {
    pub fn load(
        args: impl IntoIterator<Item = String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let cmd = remora_config::command(
            "remora-controller",
            "The Remora control plane: discovery, policy and identity for the proxies.",
            KNOBS,
        );
        let mut l = Loader::new(cmd, args, env)?;
        let source = l.get(&SOURCE, |s| match s {
            "kube" => Ok(SourceKind::Kube),
            _ => match s.strip_prefix("dir:") {
                Some(p) if !p.is_empty() => Ok(SourceKind::Dir(PathBuf::from(p))),
                _ => Err("expected kube or dir:PATH".into()),
            },
        });
        let grpc_addr = l.get(&GRPC_ADDR, addr);
        let admin_addr = l.get(&ADMIN_ADDR, addr);
        let trust_domain = l.get(&TRUST_DOMAIN, domain);
        let cluster_domain = l.get(&CLUSTER_DOMAIN, domain);
        let log = l.get(&LOG, remora_admin::log::parse_filter);
        let log_format = l.get(&LOG_FORMAT, LogFormat::parse);
        let effective = l.finish()?;
        let missing = || ConfigError::Invalid(vec!["internal: a knob without a value".into()]);
        Ok(Self {
            source: source.ok_or_else(missing)?,
            grpc_addr: grpc_addr.ok_or_else(missing)?,
            admin_addr: admin_addr.ok_or_else(missing)?,
            trust_domain: trust_domain.ok_or_else(missing)?,
            cluster_domain: cluster_domain.ok_or_else(missing)?,
            log: log.ok_or_else(missing)?,
            log_format: log_format.ok_or_else(missing)?,
            effective,
        })
    }
}
