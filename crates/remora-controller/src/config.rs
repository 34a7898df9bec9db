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
    "gRPC listener: Destination, Policy and Identity for the proxies, over TLS with the controller's own certificate; a client certificate is required for all but Identity",
);
pub const GRPC_PLAINTEXT: Knob = Knob::switch(
    "grpc-plaintext",
    "REMORA_GRPC_PLAINTEXT",
    "Also serve gRPC without TLS, to anyone who can reach the port, as unauthenticated callers: local use only (needed when no CA is configured)",
);
pub const WEBHOOK_ADDR: Knob = Knob::value(
    "webhook-addr",
    "REMORA_WEBHOOK_ADDR",
    Some("0.0.0.0:8443"),
    "HTTPS listener of the admission webhook (POST /inject); served when --webhook-cert and --webhook-key are given",
);
pub const WEBHOOK_CERT: Knob = Knob::value(
    "webhook-cert",
    "REMORA_WEBHOOK_CERT",
    None,
    "The webhook's serving certificate chain (PEM file), re-read when it changes",
);
pub const WEBHOOK_KEY: Knob = Knob::value(
    "webhook-key",
    "REMORA_WEBHOOK_KEY",
    None,
    "The webhook's serving key (PEM file), re-read when it changes",
);
pub const INJECT_CONFIG: Knob = Knob::value(
    "inject-config",
    "REMORA_INJECT_CONFIG",
    None,
    "The injector's settings (YAML: images, controller address, defaults; the chart writes it); unset: built-in defaults. Its trust anchors default to the controller's",
);
pub const LEASE_DURATION: Knob = Knob::value(
    "lease-duration",
    "REMORA_LEASE_DURATION",
    Some("15s"),
    "With --source kube: how long the remora-controller Lease (which replica writes statuses) lasts unrenewed; a failed leader is replaced within it",
);
pub const POD_NAME: Knob = Knob::value(
    "pod-name",
    "REMORA_POD_NAME",
    None,
    "This replica's name as the Lease's holder (the chart sets it from the downward API); default: the host name",
);
pub const MAX_STREAMS_PER_CLIENT: Knob = Knob::value(
    "max-streams-per-client",
    "REMORA_MAX_STREAMS_PER_CLIENT",
    Some("4096"),
    "Streams one client address (one proxy) may hold open at once, and on one connection; a proxy needs about two per destination it talks to",
);
pub const NAMESPACE: Knob = Knob::value(
    "namespace",
    "REMORA_NAMESPACE",
    Some("remora-system"),
    "The controller's namespace: with its ServiceAccount, the identity its gRPC certificate names",
);
pub const SERVICE_ACCOUNT: Knob = Knob::value(
    "service-account",
    "REMORA_SERVICE_ACCOUNT",
    Some("remora-controller"),
    "The controller's ServiceAccount: proxies expect <sa>.<namespace>.serviceaccount.identity.<trust domain>",
);
pub const CLUSTER_NETWORKS: Knob = Knob::value(
    "cluster-networks",
    "REMORA_CLUSTER_NETWORKS",
    Some("10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8"),
    "The cluster's pod and node networks (CIDRs): what the cluster-authenticated default trusts",
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
pub const DEV_CA: Knob = Knob::value(
    "dev-ca",
    "REMORA_DEV_CA",
    None,
    "Folder for a development CA: a root and an issuer are created there if absent (trust-anchors.pem is what proxies trust)",
);
pub const ISSUER_CERT: Knob = Knob::value(
    "issuer-cert",
    "REMORA_ISSUER_CERT",
    None,
    "Issuer (intermediate CA) certificate, PEM",
);
pub const ISSUER_KEY: Knob = Knob::value(
    "issuer-key",
    "REMORA_ISSUER_KEY",
    None,
    "Issuer private key, PEM (PKCS#8)",
);
pub const TRUST_ANCHORS: Knob = Knob::value(
    "trust-anchors",
    "REMORA_TRUST_ANCHORS",
    None,
    "Trust anchors (root CA bundle), PEM",
);
pub const TOKEN_VALIDATOR: Knob = Knob::value(
    "token-validator",
    "REMORA_TOKEN_VALIDATOR",
    Some("kube"),
    "How proxies' ServiceAccount tokens are checked: kube (TokenReview) or static:FILE",
);
pub const CERT_LIFETIME: Knob = Knob::value(
    "cert-lifetime",
    "REMORA_CERT_LIFETIME",
    Some("24h"),
    "Lifetime of the proxies' certificates",
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
    GRPC_PLAINTEXT,
    MAX_STREAMS_PER_CLIENT,
    WEBHOOK_ADDR,
    WEBHOOK_CERT,
    WEBHOOK_KEY,
    INJECT_CONFIG,
    LEASE_DURATION,
    POD_NAME,
    ADMIN_ADDR,
    NAMESPACE,
    SERVICE_ACCOUNT,
    CLUSTER_NETWORKS,
    TRUST_DOMAIN,
    CLUSTER_DOMAIN,
    DEV_CA,
    ISSUER_CERT,
    ISSUER_KEY,
    TRUST_ANCHORS,
    TOKEN_VALIDATOR,
    CERT_LIFETIME,
    LOG,
    LOG_FORMAT,
];

/// Where the issuer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerSource {
    /// Identity is off: `Certify` answers UNAVAILABLE.
    None,
    Dev(PathBuf),
    Files {
        cert: PathBuf,
        key: PathBuf,
        anchors: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Kube,
    Static(PathBuf),
}

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
    /// Plaintext gRPC callers are served (as unauthenticated).
    pub grpc_plaintext: bool,
    pub max_streams_per_client: u32,
    pub webhook_addr: SocketAddr,
    /// The webhook's serving certificate and key; unset: no webhook.
    pub webhook_tls: Option<(PathBuf, PathBuf)>,
    pub inject_config: Option<PathBuf>,
    pub lease_duration: std::time::Duration,
    /// The Lease holder's name.
    pub pod_name: String,
    pub admin_addr: SocketAddr,
    pub namespace: String,
    pub service_account: String,
    pub cluster_networks: Vec<ipnet::IpNet>,
    pub trust_domain: String,
    pub cluster_domain: String,
    pub issuer: IssuerSource,
    pub tokens: TokenSource,
    pub cert_lifetime: std::time::Duration,
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
        let grpc_plaintext = l.flag(&GRPC_PLAINTEXT);
        let max_streams_per_client = l.get(&MAX_STREAMS_PER_CLIENT, |s| match s.parse::<u32>() {
            Ok(0) | Err(_) => Err("expected a number of streams, at least 1".to_string()),
            Ok(n) => Ok(n),
        });
        let admin_addr = l.get(&ADMIN_ADDR, addr);
        let webhook_addr = l.get(&WEBHOOK_ADDR, addr);
        let webhook_cert = l.get(&WEBHOOK_CERT, remora_config::parse_path);
        let webhook_key = l.get(&WEBHOOK_KEY, remora_config::parse_path);
        let webhook_tls = match (webhook_cert, webhook_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                l.error("the webhook needs both --webhook-cert and --webhook-key");
                None
            }
        };
        let inject_config = l.get(&INJECT_CONFIG, remora_config::parse_path);
        let lease_duration = l.get(&LEASE_DURATION, |s| {
            match remora_config::parse_duration(s)? {
                d if d < std::time::Duration::from_secs(3) => Err("must be at least 3s".into()),
                d => Ok(d),
            }
        });
        let pod_name = l
            .get(&POD_NAME, |s| Ok::<_, String>(s.to_string()))
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("remora-controller-{}", std::process::id()));
        let trust_domain = l.get(&TRUST_DOMAIN, domain);
        let cluster_domain = l.get(&CLUSTER_DOMAIN, domain);
        let name = |s: &str| match s {
            "" => Err("must not be empty".to_string()),
            s if s.contains(['.', '/', ':']) => Err("expected a Kubernetes name".to_string()),
            s => Ok(s.to_string()),
        };
        let namespace = l.get(&NAMESPACE, name);
        let service_account = l.get(&SERVICE_ACCOUNT, name);
        let cluster_networks = l.get(&CLUSTER_NETWORKS, |s| {
            s.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| {
                    n.parse::<ipnet::IpNet>()
                        .map_err(|_| format!("{n:?} is not a CIDR like 10.0.0.0/8"))
                })
                .collect::<Result<Vec<_>, _>>()
        });
        let path = remora_config::parse_path;
        let dev_ca = l.get(&DEV_CA, path);
        let issuer_cert = l.get(&ISSUER_CERT, path);
        let issuer_key = l.get(&ISSUER_KEY, path);
        let trust_anchors = l.get(&TRUST_ANCHORS, path);
        let issuer = match (dev_ca, issuer_cert, issuer_key, trust_anchors) {
            (None, None, None, None) => Some(IssuerSource::None),
            (Some(dir), None, None, None) => Some(IssuerSource::Dev(dir)),
            (None, Some(cert), Some(key), Some(anchors)) => {
                Some(IssuerSource::Files { cert, key, anchors })
            }
            _ => {
                l.error("identity needs either --dev-ca DIR, or all of --issuer-cert, --issuer-key and --trust-anchors");
                None
            }
        };
        if issuer == Some(IssuerSource::None) && !grpc_plaintext {
            l.error(
                "the gRPC port needs TLS, and TLS needs a CA: pass --dev-ca DIR or \
                 --issuer-cert/--issuer-key/--trust-anchors, or --grpc-plaintext for local use \
                 without identity",
            );
        }
        let tokens = l.get(&TOKEN_VALIDATOR, |s| match s {
            "kube" => Ok(TokenSource::Kube),
            _ => match s.strip_prefix("static:") {
                Some(p) if !p.is_empty() => Ok(TokenSource::Static(PathBuf::from(p))),
                _ => Err("expected kube or static:FILE".into()),
            },
        });
        let cert_lifetime = l.get(&CERT_LIFETIME, |s| {
            match remora_config::parse_duration(s)? {
                d if d < std::time::Duration::from_secs(5) => Err("must be at least 5s".into()),
                d => Ok(d),
            }
        });
        let log = l.get(&LOG, remora_admin::log::parse_filter);
        let log_format = l.get(&LOG_FORMAT, LogFormat::parse);
        let effective = l.finish()?;
        Ok(Self {
            source: remora_config::present(source)?,
            grpc_addr: remora_config::present(grpc_addr)?,
            grpc_plaintext,
            max_streams_per_client: remora_config::present(max_streams_per_client)?,
            admin_addr: remora_config::present(admin_addr)?,
            webhook_addr: remora_config::present(webhook_addr)?,
            webhook_tls,
            inject_config,
            lease_duration: remora_config::present(lease_duration)?,
            pod_name,
            namespace: remora_config::present(namespace)?,
            service_account: remora_config::present(service_account)?,
            cluster_networks: remora_config::present(cluster_networks)?,
            trust_domain: remora_config::present(trust_domain)?,
            cluster_domain: remora_config::present(cluster_domain)?,
            issuer: remora_config::present(issuer)?,
            tokens: remora_config::present(tokens)?,
            cert_lifetime: remora_config::present(cert_lifetime)?,
            log: remora_config::present(log)?,
            log_format: remora_config::present(log_format)?,
            effective,
        })
    }
}
