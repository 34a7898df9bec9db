//! Kubernetes objects (k8s-openapi types) into the index's domain types. Every source
//! uses these, so a malformed object is refused the same way whichever way it came.

use std::net::IpAddr;

use k8s_openapi::{
    api::{core::v1 as core_v1, discovery::v1 as discovery_v1},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::core::{
    AuthzPolicy, AuthzSource, EndpointSlice, HttpMatch, NsName, Pod, Service, ServicePort,
    SliceEndpoint, SlicePort, TargetPort, Who,
};

use remora_k8s::inject::{
    MESHED as MESHED_LABEL,
    annotations::DEFAULT_INBOUND_POLICY as DEFAULT_INBOUND_POLICY_ANNOTATION,
    annotations::SKIP_INBOUND_PORTS as SKIP_INBOUND_PORTS_ANNOTATION,
};
/// The proxy's admin port: never intercepted.
pub const ADMIN_PORT: u16 = 4191;
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Namespace: what the injector reads of it.
pub fn namespace(ns: &core_v1::Namespace) -> Result<remora_k8s::inject::Namespace, Invalid> {
    let name = id("Namespace", &ns.metadata)?.name;
    Ok(remora_k8s::inject::Namespace {
        name,
        labels: ns.metadata.labels.clone().unwrap_or_default(),
        annotations: ns.metadata.annotations.clone().unwrap_or_default(),
    })
}

/// An object that cannot be indexed, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {id}: {reason}")]
pub struct Invalid {
    pub kind: &'static str,
    pub id: String,
    pub reason: String,
}

fn id(kind: &'static str, meta: &ObjectMeta) -> Result<NsName, Invalid> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Invalid {
            kind,
            id: "(unnamed)".into(),
            reason: "metadata.name is missing".into(),
        })?;
    Ok(NsName::new(
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
    ))
}

fn invalid(kind: &'static str, id: &NsName, reason: impl Into<String>) -> Invalid {
    Invalid {
        kind,
        id: id.to_string(),
        reason: reason.into(),
    }
}

fn port(kind: &'static str, id: &NsName, p: i32) -> Result<u16, Invalid> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid(kind, id, format!("port {p} is not between 1 and 65535")))
}

fn ip(kind: &'static str, id: &NsName, s: &str) -> Result<IpAddr, Invalid> {
    s.parse()
        .map_err(|_| invalid(kind, id, format!("{s:?} is not an IP address")))
}

pub fn service(svc: &core_v1::Service) -> Result<Service, Invalid> {
    const KIND: &str = "Service";
    let id = id(KIND, &svc.metadata)?;
    let spec = svc.spec.clone().unwrap_or_default();
    let ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) => vec![ip.clone()],
        _ => Vec::new(),
    };
    let headless = ips.iter().any(|i| i == "None");
    let cluster_ips = ips
        .iter()
        .filter(|i| *i != "None" && !i.is_empty())
        .map(|i| ip(KIND, &id, i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = Vec::new();
    for p in spec.ports.unwrap_or_default() {
        let number = port(KIND, &id, p.port)?;
        let target_port = match p.target_port {
            None => TargetPort::Number(number),
            Some(IntOrString::Int(n)) => TargetPort::Number(port(KIND, &id, n)?),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(port(KIND, &id, n)?),
                Err(_) => TargetPort::Name(s),
            },
        };
        ports.push(ServicePort {
            name: p.name.filter(|n| !n.is_empty()),
            port: number,
            target_port,
            app_protocol: p.app_protocol,
        });
    }
    Ok(Service {
        id,
        cluster_ips,
        headless,
        ports,
    })
}

pub fn endpoint_slice(slice: &discovery_v1::EndpointSlice) -> Result<EndpointSlice, Invalid> {
    const KIND: &str = "EndpointSlice";
    let id = id(KIND, &slice.metadata)?;
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .ok_or_else(|| invalid(KIND, &id, format!("label {SERVICE_NAME_LABEL} is missing")))?;
    if slice.address_type == "FQDN" {
        return Err(invalid(KIND, &id, "FQDN address types are not supported"));
    }
    let mut ports = Vec::new();
    for p in slice.ports.clone().unwrap_or_default() {
        if let Some(n) = p.port {
            ports.push(SlicePort {
                name: p.name.filter(|n| !n.is_empty()),
                port: port(KIND, &id, n)?,
            });
        }
    }
    let mut endpoints = Vec::new();
    for e in &slice.endpoints {
        let conditions = e.conditions.clone().unwrap_or_default();
        // A nil `ready` means unknown, which consumers treat as ready.
        let ready = conditions.ready.unwrap_or(true);
        let serving = conditions.serving.unwrap_or(ready);
        let terminating = conditions.terminating.unwrap_or(false);
        let addresses = e
            .addresses
            .iter()
            .map(|a| ip(KIND, &id, a))
            .collect::<Result<Vec<_>, _>>()?;
        let pod = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone());
        endpoints.push(SliceEndpoint {
            addresses,
            ready,
            serving,
            terminating,
            pod,
            zone: e.zone.clone(),
        });
    }
    Ok(EndpointSlice {
        id,
        service,
        ports,
        endpoints,
    })
}

pub fn pod(pod: &core_v1::Pod) -> Result<Pod, Invalid> {
    const KIND: &str = "Pod";
    let id = id(KIND, &pod.metadata)?;
    let status = pod.status.clone().unwrap_or_default();
    let mut ips: Vec<IpAddr> = Vec::new();
    for p in status.pod_ips.unwrap_or_default() {
        ips.push(ip(KIND, &id, &p.ip)?);
    }
    if ips.is_empty()
        && let Some(p) = status.pod_ip.filter(|p| !p.is_empty())
    {
        ips.push(ip(KIND, &id, &p)?);
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let meshed = labels.get(MESHED_LABEL).is_some_and(|v| v == "true");
    let annotation = |name: &str| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(name))
            .cloned()
    };
    let default_inbound_policy = annotation(DEFAULT_INBOUND_POLICY_ANNOTATION);
    let mut skip_inbound_ports = vec![remora_config::PortRange {
        first: ADMIN_PORT,
        last: ADMIN_PORT,
    }];
    if let Some(list) = annotation(SKIP_INBOUND_PORTS_ANNOTATION) {
        let ranges = remora_config::parse_port_ranges(&list).map_err(|e| {
            invalid(
                KIND,
                &id,
                format!("annotation {SKIP_INBOUND_PORTS_ANNOTATION}: {e}"),
            )
        })?;
        skip_inbound_ports.extend(ranges);
    }
    Ok(Pod {
        id,
        ips,
        service_account,
        meshed,
        labels,
        default_inbound_policy,
        probe_paths: remora_k8s::inject::probe_paths(&spec),
        container_ports: spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .collect(),
        skip_inbound_ports,
    })
}

/// The HTTP paths the kubelet probes, by container port.
/// A TrafficPolicy, validated; every problem is named in the error.
pub fn traffic_policy(
    p: &remora_k8s::TrafficPolicy,
) -> Result<crate::core::TrafficPolicy, Invalid> {
    const KIND: &str = "TrafficPolicy";
    let id = id(KIND, &p.metadata)?;
    let errors = p.spec.validate();
    if !errors.is_empty() {
        return Err(invalid(KIND, &id, errors.join("; ")));
    }
    Ok(crate::core::TrafficPolicy {
        service: p.spec.target_ref.name.clone(),
        port: p.spec.target_ref.port,
        spec: Box::new(p.spec.clone()),
        id,
    })
}

/// An HTTPRoute, validated; every problem is named in the error. A route with no
/// Service among its parents is kept with none: it is some gateway's, not the mesh's.
pub fn http_route(r: &remora_k8s::HttpRoute) -> Result<crate::core::HttpRoute, Invalid> {
    const KIND: &str = "HTTPRoute";
    let id = id(KIND, &r.metadata)?;
    let mut parents = Vec::new();
    for p in r.spec.parent_refs.iter().flatten() {
        if !remora_k8s::is_service_parent(p.group.as_deref(), p.kind.as_deref()) {
            continue;
        }
        let port = p.port.map(|n| port(KIND, &id, n)).transpose()?;
        parents.push(crate::core::RouteParent {
            service: NsName::new(p.namespace.as_deref().unwrap_or(&id.namespace), &p.name),
            port,
            section: p.section_name.clone().filter(|s| !s.is_empty()),
        });
    }
    if !parents.is_empty() {
        let errors = remora_k8s::route_problems(&r.spec);
        if !errors.is_empty() {
            return Err(invalid(KIND, &id, errors.join("; ")));
        }
    }
    Ok(crate::core::HttpRoute {
        created: r
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        parents,
        spec: Box::new(r.spec.clone()),
        id,
    })
}

/// An AuthorizationPolicy, validated; every problem is named in the error.
pub fn authorization_policy(p: &remora_k8s::AuthorizationPolicy) -> Result<AuthzPolicy, Invalid> {
    const KIND: &str = "AuthorizationPolicy";
    let id = id(KIND, &p.metadata)?;
    let errors = p.spec.validate();
    if !errors.is_empty() {
        return Err(invalid(KIND, &id, errors.join("; ")));
    }
    let sources = p
        .spec
        .from
        .iter()
        .map(|s| AuthzSource {
            networks: s.networks.iter().filter_map(|n| n.parse().ok()).collect(),
            who: if s.unauthenticated || (s.identities.is_empty() && s.namespaces.is_empty()) {
                Who::Anyone
            } else {
                Who::Mesh {
                    identities: s.identities.clone(),
                    namespaces: s.namespaces.clone(),
                }
            },
        })
        .collect();
    let http = p
        .spec
        .http
        .iter()
        .map(|m| HttpMatch {
            path: m
                .path
                .as_ref()
                .map(|p| (p.kind == remora_k8s::PathMatchType::Exact, p.value.clone())),
            method: m.method.clone(),
        })
        .collect();
    Ok(AuthzPolicy {
        id,
        selector: p.spec.pod_selector.clone(),
        ports: p.spec.ports.clone(),
        sources,
        http,
    })
}
