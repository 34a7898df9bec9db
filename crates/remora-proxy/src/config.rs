//! The proxy's configuration: its knob table and the typed [`Config`] built from it.
//! The environment is read here and nowhere else, through a lookup tests fill from a map.

use std::{net::SocketAddr, time::Duration};

use remora_admin::LogFormat;
use remora_config::{Effective, Knob, Loader, PortRange};

pub use remora_config::ConfigError;

pub const CONTROLLER_ADDR: Knob = Knob::value(
    "controller-addr",
    "REMORA_CONTROLLER_ADDR",
    None,
    "The controller's gRPC address: https://host:8086 (verified against the trust anchors), or http:// for local use; unset runs standalone: every destination passthrough",
);
pub const CONTROLLER_NAME: Knob = Knob::value(
    "controller-name",
    "REMORA_CONTROLLER_NAME",
    None,
    "The TLS name the controller must prove with https://; default remora-controller.remora-system.serviceaccount.identity.<trust domain>",
);
pub const DEFAULT_INBOUND_POLICY: Knob = Knob::value(
    "default-inbound-policy",
    "REMORA_DEFAULT_INBOUND_POLICY",
    Some("all-unauthenticated"),
    "Who may connect where no AuthorizationPolicy selects a port: all-unauthenticated, all-authenticated, cluster-authenticated or deny (the pod annotation remora.io/default-inbound-policy overrides it)",
);
pub const NAMESPACE: Knob = Knob::value(
    "namespace",
    "REMORA_NAMESPACE",
    Some(""),
    "The pod's namespace (downward API), sent to the controller",
);
pub const POD_NAME: Knob = Knob::value(
    "pod-name",
    "REMORA_POD_NAME",
    Some(""),
    "The pod's name (downward API), sent to the controller",
);
pub const POD_IP: Knob = Knob::value(
    "pod-ip",
    "REMORA_POD_IP",
    Some(""),
    "The pod's IP (downward API), sent to the controller",
);
pub const TRUST_DOMAIN: Knob = Knob::value(
    "trust-domain",
    "REMORA_TRUST_DOMAIN",
    Some("cluster.local"),
    "Trust domain of the mesh's identities",
);
pub const TRUST_ANCHORS: Knob = Knob::value(
    "trust-anchors",
    "REMORA_TRUST_ANCHORS",
    None,
    "The mesh's trust anchors (PEM file); with REMORA_IDENTITY_TOKEN_FILE, turns identity on",
);
pub const TRUST_ANCHORS_PEM: Knob = Knob::value(
    "trust-anchors-pem",
    "REMORA_TRUST_ANCHORS_PEM",
    None,
    "The trust anchors' PEM itself, in place of REMORA_TRUST_ANCHORS (the injector sets it, so no ConfigMap is needed in each namespace)",
);
pub const IDENTITY_TOKEN_FILE: Knob = Knob::value(
    "identity-token-file",
    "REMORA_IDENTITY_TOKEN_FILE",
    None,
    "The pod's projected ServiceAccount token (audience identity.remora.io), re-read at each renewal",
);
pub const SERVICE_ACCOUNT: Knob = Knob::value(
    "service-account",
    "REMORA_SERVICE_ACCOUNT",
    Some(""),
    "The pod's ServiceAccount (downward API); its identity is what the proxy certifies",
);
pub const DISCOVERY_WAIT: Knob = Knob::value(
    "discovery-wait",
    "REMORA_DISCOVERY_WAIT",
    Some("1s"),
    "How long a connection waits for the controller's first answer, or a Service for endpoints, before passthrough or a fast 503",
);
pub const PRECONNECT_DELAY: Knob = Knob::value(
    "preconnect-delay",
    "REMORA_PRECONNECT_DELAY",
    Some("50ms"),
    "For a Service, how long to wait for the client's first bytes before connecting ahead for server-speaks-first protocols",
);
pub const INBOUND_ADDR: Knob = Knob::value(
    "inbound-addr",
    "REMORA_INBOUND_ADDR",
    Some("0.0.0.0:4143,[::]:4143"),
    "Inbound listeners (iptables PREROUTING redirects here); an unavailable IPv6 address is skipped",
);
pub const OUTBOUND_ADDR: Knob = Knob::value(
    "outbound-addr",
    "REMORA_OUTBOUND_ADDR",
    Some("127.0.0.1:4140,[::1]:4140"),
    "Outbound listeners (iptables OUTPUT redirects here); loopback only, so nothing outside the pod reaches them",
);
pub const ADMIN_ADDR: Knob = Knob::value(
    "admin-addr",
    "REMORA_ADMIN_ADDR",
    Some("0.0.0.0:4191,[::]:4191"),
    "Admin listeners: /metrics, /live, /ready, /config; /shutdown and /log-level from loopback only",
);
pub const OPAQUE_PORTS: Knob = Knob::value(
    "opaque-ports",
    "REMORA_OPAQUE_PORTS",
    Some("25,587,3306,4444,5432,6379,9300,11211"),
    "Destination ports proxied as TCP without protocol detection (server-speaks-first protocols)",
);
pub const INBOUND_PORTS: Knob = Knob::value(
    "inbound-ports",
    "REMORA_INBOUND_PORTS",
    Some(""),
    "The ports the pod serves (its containerPorts; the injector sets them): inbound metrics name these and the ports policies name, and fold every other port into target=\"other\"",
);
pub const PROBE_PATHS: Knob = Knob::value(
    "probe-paths",
    "REMORA_PROBE_PATHS",
    Some(""),
    "The kubelet's probes as port:path pairs (the injector sets them): allowed for GET before the controller's first answer, so a pod whose default is deny stays live while the controller is away",
);
pub const INBOUND_MAX_CONNECTIONS: Knob = Knob::value(
    "inbound-max-connections",
    "REMORA_INBOUND_MAX_CONNECTIONS",
    Some("10000"),
    "Inbound connections open at once; beyond it new ones are reset and counted, so no client can exhaust the pod's memory or file descriptors",
);
pub const TCP_IDLE_TIMEOUT: Knob = Knob::value(
    "tcp-idle-timeout",
    "REMORA_TCP_IDLE_TIMEOUT",
    Some("1h"),
    "An opaque TCP connection with no bytes either way for this long is closed, as is an inbound HTTP/2 one with no request in flight (0 never closes one)",
);
pub const DETECT_TIMEOUT: Knob = Knob::value(
    "detect-timeout",
    "REMORA_DETECT_TIMEOUT",
    Some("10s"),
    "How long to wait for a client's first bytes before treating the connection as opaque TCP",
);
pub const CONNECT_TIMEOUT: Knob = Knob::value(
    "connect-timeout",
    "REMORA_CONNECT_TIMEOUT",
    Some("5s"),
    "Limit for connecting to a destination; passthrough destinations may be far away",
);
pub const SHUTDOWN_GRACE_PERIOD: Knob = Knob::value(
    "shutdown-grace-period",
    "REMORA_SHUTDOWN_GRACE_PERIOD",
    Some("25s"),
    "After SIGTERM, how long in-flight work may finish; under Kubernetes' default 30s",
);
pub const SHUTDOWN_DELAY: Knob = Knob::value(
    "shutdown-delay",
    "REMORA_SHUTDOWN_DELAY",
    Some("5s"),
    "After SIGTERM, how long the proxy goes on accepting before it drains: Kubernetes removes a terminating pod's endpoint about when it sends SIGTERM, and clients take a moment to hear of it; within the grace period",
);
pub const WORKER_THREADS: Knob = Knob::value(
    "worker-threads",
    "REMORA_WORKER_THREADS",
    Some("1"),
    "Runtime threads: 1 runs everything on one thread, as a sidecar should; raise it for very busy pods",
);
pub const ACCESS_LOG: Knob = Knob::value(
    "access-log",
    "REMORA_ACCESS_LOG",
    Some("off"),
    "Access log on standard output, one line per HTTP request (method, authority, path, status, duration, retries, route, backend, endpoint, peer identity): json, plain or off; lines the output cannot take are dropped and counted, never waited for",
);
pub const METRICS_OMIT_LABELS: Knob = Knob::value(
    "metrics-omit-labels",
    "REMORA_METRICS_OMIT_LABELS",
    Some(""),
    "Optional metric labels to leave empty, for fewer series: a comma-separated list of peer_identity, authz_name and route (route_name, route_namespace, backend)",
);
pub const LOG: Knob = Knob::value(
    "log",
    "REMORA_LOG",
    Some("info"),
    "Log filter in tracing's EnvFilter syntax (e.g. info,remora_proxy=debug)",
);
pub const LOG_FORMAT: Knob = Knob::value(
    "log-format",
    "REMORA_LOG_FORMAT",
    Some("plain"),
    "Log format: plain or json",
);

/// Every knob of `remora-proxy`, in the order `--help` and the README list them.
pub const KNOBS: &[Knob] = &[
    CONTROLLER_ADDR,
    CONTROLLER_NAME,
    DEFAULT_INBOUND_POLICY,
    NAMESPACE,
    POD_NAME,
    POD_IP,
    SERVICE_ACCOUNT,
    TRUST_DOMAIN,
    TRUST_ANCHORS,
    TRUST_ANCHORS_PEM,
    IDENTITY_TOKEN_FILE,
    INBOUND_ADDR,
    OUTBOUND_ADDR,
    ADMIN_ADDR,
    OPAQUE_PORTS,
    INBOUND_PORTS,
    PROBE_PATHS,
    INBOUND_MAX_CONNECTIONS,
    TCP_IDLE_TIMEOUT,
    DETECT_TIMEOUT,
    CONNECT_TIMEOUT,
    SHUTDOWN_GRACE_PERIOD,
    SHUTDOWN_DELAY,
    DISCOVERY_WAIT,
    PRECONNECT_DELAY,
    WORKER_THREADS,
    ACCESS_LOG,
    METRICS_OMIT_LABELS,
    LOG,
    LOG_FORMAT,
];

/// The proxy's validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub controller_addr: Option<crate::control::ControllerAddr>,
    /// The name the controller proves over TLS.
    pub controller_name: String,
    pub default_inbound_policy: crate::inbound::authz::DefaultPolicy,
    pub trust_domain: String,
    pub namespace: String,
    pub pod_name: String,
    pub pod_ip: String,
    /// Present when identity is on.
    pub identity: Option<crate::identity::IdentityConfig>,
    pub discovery_wait: Duration,
    pub preconnect_delay: Duration,
    pub inbound_addrs: Vec<SocketAddr>,
    pub outbound_addrs: Vec<SocketAddr>,
    pub admin_addrs: Vec<SocketAddr>,
    pub opaque_ports: Vec<PortRange>,
    /// The ports the pod declares.
    pub inbound_ports: Vec<PortRange>,
    /// The kubelet's probes, allowed before the controller's first answer.
    pub probe_paths: Vec<(u16, String)>,
    pub inbound_max_connections: usize,
    /// None: opaque connections are never closed for idleness.
    pub tcp_idle_timeout: Option<Duration>,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub shutdown_grace_period: Duration,
    /// After SIGTERM, how long everything goes on as before the inbound side drains.
    pub shutdown_delay: Duration,
    pub worker_threads: usize,
    /// None: off.
    pub access_log: Option<crate::access_log::Format>,
    pub metrics_omit_labels: crate::metrics::Omit,
    pub log: String,
    pub log_format: LogFormat,
    /// The effective values as written, for the start-up log and `/config`.
    pub effective: Vec<Effective>,
}

impl Config {
    /// Parses `args` (with the program name first) and the environment seen through `env`.
    /// Every bad value is reported in one error.
    pub fn load(
        args: impl IntoIterator<Item = String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let cmd = remora_config::command(
            "remora-proxy",
            "The Remora sidecar proxy: carries a pod's intercepted TCP traffic.",
            KNOBS,
        );
        let mut l = Loader::new(cmd, args, env)?;
        let controller_addr = l.get(&CONTROLLER_ADDR, crate::control::ControllerAddr::parse);
        let controller_name = l.get(&CONTROLLER_NAME, |s| Ok::<_, String>(s.to_string()));
        let default_inbound_policy = l.get(&DEFAULT_INBOUND_POLICY, |s| s.parse());
        let text = |s: &str| Ok::<_, String>(s.to_string());
        let namespace = l.get(&NAMESPACE, text);
        let pod_name = l.get(&POD_NAME, text);
        let pod_ip = l.get(&POD_IP, text);
        let service_account = l.get(&SERVICE_ACCOUNT, text);
        let trust_domain = l.get(&TRUST_DOMAIN, text);
        let path = remora_config::parse_path;
        let anchors_file = l.get(&TRUST_ANCHORS, path);
        let anchors_pem = l.get(&TRUST_ANCHORS_PEM, |s| match s.contains("-----BEGIN") {
            true => Ok(s.to_string()),
            false => Err("is not PEM (no -----BEGIN line)".to_string()),
        });
        let trust_anchors = match (anchors_file, anchors_pem) {
            (Some(_), Some(_)) => {
                l.error("REMORA_TRUST_ANCHORS and REMORA_TRUST_ANCHORS_PEM: set one, not both");
                None
            }
            (Some(f), None) => Some(crate::identity::TrustAnchors::File(f)),
            (None, Some(p)) => Some(crate::identity::TrustAnchors::Inline(p)),
            (None, None) => None,
        };
        let token_file = l.get(&IDENTITY_TOKEN_FILE, path);
        let identity = match (trust_anchors, token_file) {
            (None, None) => None,
            (Some(trust_anchors), Some(token_file)) => {
                let (ns, sa) = (
                    namespace.clone().unwrap_or_default(),
                    service_account.clone().unwrap_or_default(),
                );
                if ns.is_empty() || sa.is_empty() {
                    l.error("identity needs REMORA_NAMESPACE and REMORA_SERVICE_ACCOUNT (from the downward API)");
                }
                if controller_addr.is_none() {
                    l.error("identity needs REMORA_CONTROLLER_ADDR: certificates come from the controller");
                }
                Some(crate::identity::IdentityConfig {
                    trust_domain: trust_domain.clone().unwrap_or_default(),
                    namespace: ns,
                    service_account: sa,
                    token_file,
                    trust_anchors,
                })
            }
            _ => {
                l.error(
                    "identity needs both the trust anchors (REMORA_TRUST_ANCHORS or \
                     REMORA_TRUST_ANCHORS_PEM) and REMORA_IDENTITY_TOKEN_FILE",
                );
                None
            }
        };
        if controller_addr.as_ref().is_some_and(|a| a.tls) && identity.is_none() {
            l.error(
                "REMORA_CONTROLLER_ADDR https:// needs the proxy's identity \
                 (REMORA_TRUST_ANCHORS and REMORA_IDENTITY_TOKEN_FILE) to verify the controller",
            );
        }
        let discovery_wait = l.get(&DISCOVERY_WAIT, remora_config::parse_duration);
        let preconnect_delay = l.get(&PRECONNECT_DELAY, remora_config::parse_duration);
        let inbound_addrs = l.get(&INBOUND_ADDR, parse_addrs);
        let outbound_addrs = l.get(&OUTBOUND_ADDR, parse_addrs);
        let admin_addrs = l.get(&ADMIN_ADDR, parse_addrs);
        let opaque_ports = l.get(&OPAQUE_PORTS, remora_config::parse_port_ranges);
        let inbound_ports = l.get(&INBOUND_PORTS, remora_config::parse_port_ranges);
        let probe_paths = l.get(&PROBE_PATHS, parse_probe_paths);
        let inbound_max_connections =
            l.get(&INBOUND_MAX_CONNECTIONS, |s| match s.parse::<usize>() {
                Ok(n @ 1..) => Ok(n),
                _ => Err("expected a number of connections, at least 1".into()),
            });
        let tcp_idle_timeout = l.get(&TCP_IDLE_TIMEOUT, |s| {
            remora_config::parse_duration(s).map(|d| (!d.is_zero()).then_some(d))
        });
        let detect_timeout = l.get(&DETECT_TIMEOUT, parse_positive_duration);
        let connect_timeout = l.get(&CONNECT_TIMEOUT, parse_positive_duration);
        let shutdown_grace_period = l.get(&SHUTDOWN_GRACE_PERIOD, remora_config::parse_duration);
        let shutdown_delay = l.get(&SHUTDOWN_DELAY, remora_config::parse_duration);
        if let (Some(delay), Some(grace)) = (shutdown_delay, shutdown_grace_period)
            && delay >= grace
        {
            l.error(format!(
                "REMORA_SHUTDOWN_DELAY ({delay:?}) must be shorter than \
                 REMORA_SHUTDOWN_GRACE_PERIOD ({grace:?}): the delay leaves no time to drain"
            ));
        }
        let worker_threads = l.get(&WORKER_THREADS, |s| match s.parse::<usize>() {
            Ok(n @ 1..=64) => Ok(n),
            _ => Err("expected a whole number from 1 to 64".into()),
        });
        let access_log = l.get(&ACCESS_LOG, crate::access_log::Format::parse);
        let metrics_omit_labels = l.get(&METRICS_OMIT_LABELS, crate::metrics::Omit::parse);
        let log = l.get(&LOG, remora_admin::log::parse_filter);
        let log_format = l.get(&LOG_FORMAT, LogFormat::parse);
        if let (Some(outbound), Some(inbound)) = (&outbound_addrs, &inbound_addrs) {
            if let Some(a) = outbound.iter().find(|a| !a.ip().is_loopback()) {
                l.error(format!(
                    "REMORA_OUTBOUND_ADDR {a} is not a loopback address: the outbound listener \
                     must not be reachable from outside the pod"
                ));
            }
            if let Some(a) = outbound
                .iter()
                .find(|o| o.port() != 0 && inbound.iter().any(|i| i.port() == o.port()))
            {
                l.error(format!(
                    "REMORA_OUTBOUND_ADDR and REMORA_INBOUND_ADDR share port {}: give each its own",
                    a.port()
                ));
            }
        }
        let effective = l.finish()?;
        // finish() succeeded, so every value above parsed.
        let controller_name = controller_name.unwrap_or_else(|| {
            format!(
                "remora-controller.remora-system.serviceaccount.identity.{}",
                trust_domain.clone().unwrap_or_default()
            )
        });
        Ok(Self {
            controller_addr,
            controller_name,
            default_inbound_policy: remora_config::present(default_inbound_policy)?,
            trust_domain: trust_domain.clone().unwrap_or_default(),
            namespace: remora_config::present(namespace)?,
            pod_name: remora_config::present(pod_name)?,
            pod_ip: remora_config::present(pod_ip)?,
            identity,
            discovery_wait: remora_config::present(discovery_wait)?,
            preconnect_delay: remora_config::present(preconnect_delay)?,
            inbound_addrs: remora_config::present(inbound_addrs)?,
            outbound_addrs: remora_config::present(outbound_addrs)?,
            admin_addrs: remora_config::present(admin_addrs)?,
            opaque_ports: remora_config::present(opaque_ports)?,
            inbound_ports: remora_config::present(inbound_ports)?,
            probe_paths: remora_config::present(probe_paths)?,
            inbound_max_connections: remora_config::present(inbound_max_connections)?,
            tcp_idle_timeout: remora_config::present(tcp_idle_timeout)?,
            detect_timeout: remora_config::present(detect_timeout)?,
            connect_timeout: remora_config::present(connect_timeout)?,
            shutdown_grace_period: remora_config::present(shutdown_grace_period)?,
            shutdown_delay: remora_config::present(shutdown_delay)?,
            worker_threads: remora_config::present(worker_threads)?,
            access_log: remora_config::present(access_log)?,
            metrics_omit_labels: remora_config::present(metrics_omit_labels)?,
            log: remora_config::present(log)?,
            log_format: remora_config::present(log_format)?,
            effective,
        })
    }

    /// Whether connections to `port` skip protocol detection.
    pub fn is_opaque(&self, port: u16) -> bool {
        self.opaque_ports.iter().any(|r| r.contains(port))
    }
}

/// A comma-separated, non-empty list of socket addresses (`127.0.0.1:4140,[::1]:4140`).
fn parse_addrs(s: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs = s
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|_| format!("{a:?} is not an IP:port address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err("expected at least one IP:port address".into());
    }
    Ok(addrs)
}

/// `port:path` pairs, comma-separated (`8080:/live,8080:/ready`); empty is none. A path
/// is what the kubelet sends: absolute, without a query.
fn parse_probe_paths(s: &str) -> Result<Vec<(u16, String)>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let bad = || format!("{p:?} is not port:/path");
            let (port, path) = p.split_once(':').ok_or_else(bad)?;
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(bad)?;
            if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
                return Err(bad());
            }
            Ok((port, path.to_string()))
        })
        .collect()
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match remora_config::parse_duration(s)? {
        d if d.is_zero() => Err("must be longer than zero".into()),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args = std::iter::once("remora-proxy")
            .chain(args.iter().copied())
            .map(String::from);
        Config::load(args, &|k| env.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = load(&[], &[]).unwrap();
        assert_eq!(
            c.inbound_addrs,
            [
                "0.0.0.0:4143".parse().unwrap(),
                "[::]:4143".parse().unwrap()
            ]
        );
        assert_eq!(c.outbound_addrs[0], "127.0.0.1:4140".parse().unwrap());
        assert_eq!(c.admin_addrs[0].port(), 4191);
        for port in [25, 587, 3306, 4444, 5432, 6379, 9300, 11211] {
            assert!(c.is_opaque(port), "{port} is opaque by default");
        }
        assert!(!c.is_opaque(80));
        assert_eq!(c.log_format, LogFormat::Plain);
        assert_eq!(c.controller_addr, None, "standalone unless told otherwise");
        assert_eq!(c.effective.len(), KNOBS.len(), "every knob is in /config");
    }

    #[test]
    fn env_and_flags_override() {
        let c = load(
            &["--detect-timeout", "250ms"],
            &[
                ("REMORA_OPAQUE_PORTS", "7000-7002"),
                ("REMORA_LOG_FORMAT", "json"),
            ],
        )
        .unwrap();
        assert_eq!(c.detect_timeout, Duration::from_millis(250));
        assert!(c.is_opaque(7001) && !c.is_opaque(25));
        assert_eq!(c.log_format, LogFormat::Json);
        let c = load(&[], &[("REMORA_PROBE_PATHS", "8080:/live, 9000:/ready")]).unwrap();
        assert_eq!(
            c.probe_paths,
            [(8080, "/live".to_string()), (9000, "/ready".to_string())]
        );
        for bad in [
            "8080",
            "http:/live",
            "0:/live",
            "8080:live",
            "8080:/ready?full=1",
        ] {
            let err = load(&[], &[("REMORA_PROBE_PATHS", bad)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("REMORA_PROBE_PATHS"), "{bad}: {err}");
        }
    }

    #[test]
    fn trust_anchors_from_a_file_or_inline_never_both() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
        let identity = [
            ("REMORA_CONTROLLER_ADDR", "https://ctl:8086"),
            ("REMORA_NAMESPACE", "shop"),
            ("REMORA_SERVICE_ACCOUNT", "web"),
            (
                "REMORA_IDENTITY_TOKEN_FILE",
                "/var/run/secrets/remora/token",
            ),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let env: Vec<_> = identity.iter().chain(extra).copied().collect();
            load(&[], &env)
        };
        let c = with(&[("REMORA_TRUST_ANCHORS_PEM", pem)]).unwrap();
        assert_eq!(
            c.identity.unwrap().trust_anchors,
            crate::identity::TrustAnchors::Inline(pem.into())
        );
        let c = with(&[("REMORA_TRUST_ANCHORS", "/etc/anchors.pem")]).unwrap();
        assert_eq!(
            c.identity.unwrap().trust_anchors,
            crate::identity::TrustAnchors::File("/etc/anchors.pem".into())
        );
        let err = with(&[
            ("REMORA_TRUST_ANCHORS", "/etc/anchors.pem"),
            ("REMORA_TRUST_ANCHORS_PEM", pem),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("set one, not both"), "{err}");
        let err = with(&[("REMORA_TRUST_ANCHORS_PEM", "/etc/anchors.pem")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("REMORA_TRUST_ANCHORS_PEM"), "{err}");
        let err = with(&[]).unwrap_err().to_string();
        assert!(err.contains("needs both the trust anchors"), "{err}");
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let err = load(
            &["--connect-timeout", "0s"],
            &[
                ("REMORA_INBOUND_ADDR", "nowhere"),
                ("REMORA_OPAQUE_PORTS", "25,70000"),
                ("REMORA_LOG_FORMAT", "xml"),
                ("REMORA_LOG", "[[["),
                ("REMORA_DEFAULT_INBOUND_POLICY", "sometimes"),
            ],
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "REMORA_DEFAULT_INBOUND_POLICY=\"sometimes\"",
            "all-unauthenticated, all-authenticated, cluster-authenticated, deny",
            "--connect-timeout=\"0s\"",
            "REMORA_INBOUND_ADDR=\"nowhere\"",
            "REMORA_OPAQUE_PORTS=\"25,70000\"",
            "REMORA_LOG_FORMAT=\"xml\"",
            "REMORA_LOG=\"[[[\"",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
    }

    #[test]
    fn controller_address() {
        let c = load(
            &[],
            &[(
                "REMORA_CONTROLLER_ADDR",
                "http://remora-controller.remora-system.svc:8086/",
            )],
        )
        .unwrap();
        assert_eq!(
            c.controller_addr.map(|a| a.to_string()).as_deref(),
            Some("http://remora-controller.remora-system.svc:8086")
        );
        assert_eq!(
            c.controller_name,
            "remora-controller.remora-system.serviceaccount.identity.cluster.local"
        );
        // https:// needs trust anchors to verify the controller with.
        for bad in ["remora:8086", "http://remora", "https://remora:8086"] {
            let err = load(&[], &[("REMORA_CONTROLLER_ADDR", bad)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("REMORA_CONTROLLER_ADDR"), "{bad}: {err}");
        }
    }

    #[test]
    fn outbound_must_stay_on_loopback_and_apart_from_inbound() {
        let err = load(&[], &[("REMORA_OUTBOUND_ADDR", "0.0.0.0:4140")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a loopback address"), "{err}");
        let err = load(&[], &[("REMORA_OUTBOUND_ADDR", "127.0.0.1:4143")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("share port 4143"), "{err}");
    }
}
