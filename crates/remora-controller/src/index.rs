//! The index: every Service, EndpointSlice and Pod the source delivered, and the pure,
//! synchronous answers built from them. One writer applies events; readers resolve.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use crate::core::{
    AuthzPolicy, EndpointSlice, EndpointView, Event, HttpRoute, Identity, Kind, NsName, Object,
    ObjectKey, Pod, Protocol, Resolution, Service, ServicePort, Target, TargetPort, TrafficPolicy,
};

/// Names identities are built from.
#[derive(Debug, Clone)]
pub struct Domains {
    pub trust_domain: String,
    pub cluster_domain: String,
}

/// What a batch of events may have changed: targets depending on these need a new answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Touched {
    pub services: BTreeSet<NsName>,
    pub ips: BTreeSet<IpAddr>,
    /// Namespaces whose pods or AuthorizationPolicies changed: inbound policies there
    /// need compiling again.
    pub policy_namespaces: BTreeSet<String>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.ips.is_empty() && self.policy_namespaces.is_empty()
    }
}

#[derive(Debug)]
pub struct Index {
    domains: Domains,
    services: HashMap<NsName, Service>,
    slices: HashMap<NsName, EndpointSlice>,
    pods: HashMap<NsName, Pod>,
    /// For the injector, by name.
    namespaces: HashMap<String, remora_k8s::inject::Namespace>,
    authz: HashMap<NsName, AuthzPolicy>,
    traffic: HashMap<NsName, TrafficPolicy>,
    routes: HashMap<NsName, HttpRoute>,
    /// Service → its slices.
    slices_of: HashMap<NsName, BTreeSet<NsName>>,
    /// ClusterIP → Service.
    cluster_ips: HashMap<IpAddr, NsName>,
    /// Pod IP → Pod.
    pod_ips: HashMap<IpAddr, NsName>,
    /// Pod → the Services whose slices name it (its identity appears in their answers).
    services_of_pod: HashMap<NsName, BTreeSet<NsName>>,
    /// Endpoint address → the Services whose slices list it: a slice endpoint without
    /// `targetRef` is the pod at its address.
    services_of_ip: HashMap<IpAddr, BTreeSet<NsName>>,
}

impl Index {
    pub fn new(domains: Domains) -> Self {
        Self {
            domains,
            services: HashMap::new(),
            slices: HashMap::new(),
            pods: HashMap::new(),
            namespaces: HashMap::new(),
            authz: HashMap::new(),
            traffic: HashMap::new(),
            routes: HashMap::new(),
            slices_of: HashMap::new(),
            cluster_ips: HashMap::new(),
            pod_ips: HashMap::new(),
            services_of_pod: HashMap::new(),
            services_of_ip: HashMap::new(),
        }
    }

    /// An index of the objects in `yaml` (as `kubectl apply` takes them), for tests.
    #[cfg(test)]
    pub fn from_yaml(yaml: &str) -> Self {
        let mut index = Self::new(Domains {
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
        });
        let mut touched = Touched::default();
        for o in crate::source::yaml::parse("objects.yaml", yaml).expect("valid objects") {
            index.apply(Event::Apply(o), &mut touched);
        }
        index
    }

    pub fn domains(&self) -> &Domains {
        &self.domains
    }

    /// Objects indexed, by kind.
    pub fn counts(&self) -> [(Kind, usize); 7] {
        [
            (Kind::Service, self.services.len()),
            (Kind::Slice, self.slices.len()),
            (Kind::Pod, self.pods.len()),
            (Kind::Authz, self.authz.len()),
            (Kind::Traffic, self.traffic.len()),
            (Kind::Route, self.routes.len()),
            (Kind::Namespace, self.namespaces.len()),
        ]
    }

    /// The Service port a target names (by name, or by ClusterIP), if it is one.
    pub fn service_port(&self, target: &Target) -> Option<(NsName, u16)> {
        match target {
            Target::Service { id, port } => Some((id.clone(), *port)),
            Target::Addr(a) => self
                .cluster_ips
                .get(&a.ip())
                .map(|id| (id.clone(), a.port())),
        }
    }

    /// The TrafficPolicy for a Service port: one naming the port beats one for every
    /// port; among equals, the first by name.
    pub fn traffic_for(&self, service: &NsName, port: u16) -> Option<&TrafficPolicy> {
        let mut matching: Vec<&TrafficPolicy> = self
            .traffic
            .values()
            .filter(|t| t.id.namespace == service.namespace && t.service == service.name)
            .filter(|t| t.port.is_none_or(|p| p == port))
            .collect();
        matching.sort_by(|a, b| (a.port.is_none(), &a.id).cmp(&(b.port.is_none(), &b.id)));
        matching.first().copied()
    }

    /// The HTTPRoutes a client in `client_ns` follows to a Service port, in precedence
    /// order (oldest first, then by namespace and name). As GAMMA has it, routes in the
    /// client's own namespace (consumer routes), when there are any, replace the routes
    /// in the Service's namespace (producer routes); routes elsewhere do not apply.
    pub fn routes_for(&self, service: &NsName, port: u16, client_ns: &str) -> Vec<&HttpRoute> {
        let port_name = self
            .services
            .get(service)
            .and_then(|s| s.ports.iter().find(|p| p.port == port))
            .and_then(|p| p.name.as_deref());
        let attached = |r: &HttpRoute| {
            r.parents.iter().any(|p| {
                p.service == *service
                    && p.port.is_none_or(|n| n == port)
                    && p.section.as_deref().is_none_or(|s| Some(s) == port_name)
            })
        };
        let from = |namespace: &str| {
            let mut out: Vec<&HttpRoute> = self
                .routes
                .values()
                .filter(|r| r.id.namespace == namespace && attached(r))
                .collect();
            out.sort_by(|a, b| {
                (a.created.is_none(), &a.created, &a.id).cmp(&(
                    b.created.is_none(),
                    &b.created,
                    &b.id,
                ))
            });
            out
        };
        let consumer = if client_ns != service.namespace && !client_ns.is_empty() {
            from(client_ns)
        } else {
            Vec::new()
        };
        if consumer.is_empty() {
            from(&service.namespace)
        } else {
            consumer
        }
    }

    pub fn namespace(&self, name: &str) -> Option<&remora_k8s::inject::Namespace> {
        self.namespaces.get(name)
    }

    pub fn pod(&self, id: &NsName) -> Option<&Pod> {
        self.pods.get(id)
    }

    /// The AuthorizationPolicies of a namespace, in name order.
    pub fn authz_in(&self, namespace: &str) -> Vec<&AuthzPolicy> {
        let mut out: Vec<&AuthzPolicy> = self
            .authz
            .values()
            .filter(|a| a.id.namespace == namespace)
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Applies one event, adding what it touched to `touched`.
    pub fn apply(&mut self, event: Event, touched: &mut Touched) {
        match event {
            Event::Apply(object) => {
                let key = object.key();
                self.remove(&key, touched);
                self.insert(object, touched);
            }
            Event::Delete(key) => self.remove(&key, touched),
            Event::Synced => {}
        }
    }

    fn insert(&mut self, object: Object, touched: &mut Touched) {
        match object {
            Object::Service(s) => {
                touched.services.insert(s.id.clone());
                for ip in &s.cluster_ips {
                    self.cluster_ips.insert(*ip, s.id.clone());
                    touched.ips.insert(*ip);
                }
                self.services.insert(s.id.clone(), s);
            }
            Object::Slice(s) => {
                let svc = NsName::new(&s.id.namespace, &s.service);
                touched.services.insert(svc.clone());
                self.slices_of
                    .entry(svc.clone())
                    .or_default()
                    .insert(s.id.clone());
                for pod in s.endpoints.iter().filter_map(|e| e.pod.as_ref()) {
                    let pod = NsName::new(&s.id.namespace, pod);
                    self.services_of_pod
                        .entry(pod)
                        .or_default()
                        .insert(svc.clone());
                }
                for ip in s.endpoints.iter().flat_map(|e| &e.addresses) {
                    self.services_of_ip
                        .entry(*ip)
                        .or_default()
                        .insert(svc.clone());
                }
                self.slices.insert(s.id.clone(), s);
            }
            Object::Pod(p) => {
                self.touch_pod(&p, touched);
                for ip in &p.ips {
                    self.pod_ips.insert(*ip, p.id.clone());
                }
                self.pods.insert(p.id.clone(), p);
            }
            Object::Authz(a) => {
                touched.policy_namespaces.insert(a.id.namespace.clone());
                self.authz.insert(a.id.clone(), a);
            }
            Object::Traffic(t) => {
                touched
                    .services
                    .insert(NsName::new(&t.id.namespace, &t.service));
                self.traffic.insert(t.id.clone(), t);
            }
            Object::Route(r) => {
                touched
                    .services
                    .extend(r.parents.iter().map(|p| p.service.clone()));
                self.routes.insert(r.id.clone(), r);
            }
            // Nothing a proxy is told depends on a namespace's metadata.
            Object::Namespace(n) => {
                self.namespaces.insert(n.name.clone(), n);
            }
        }
    }

    fn remove(&mut self, key: &ObjectKey, touched: &mut Touched) {
        match key.kind {
            Kind::Service => {
                if let Some(s) = self.services.remove(&key.id) {
                    touched.services.insert(s.id.clone());
                    for ip in &s.cluster_ips {
                        if self.cluster_ips.get(ip) == Some(&s.id) {
                            self.cluster_ips.remove(ip);
                        }
                        touched.ips.insert(*ip);
                    }
                }
            }
            Kind::Slice => {
                if let Some(s) = self.slices.remove(&key.id) {
                    let svc = NsName::new(&s.id.namespace, &s.service);
                    touched.services.insert(svc.clone());
                    if let Some(set) = self.slices_of.get_mut(&svc) {
                        set.remove(&s.id);
                        if set.is_empty() {
                            self.slices_of.remove(&svc);
                        }
                    }
                    for pod in s.endpoints.iter().filter_map(|e| e.pod.as_ref()) {
                        let pod = NsName::new(&s.id.namespace, pod);
                        let still = self.slices_of.get(&svc).is_some_and(|slices| {
                            slices
                                .iter()
                                .filter_map(|id| self.slices.get(id))
                                .any(|sl| {
                                    sl.endpoints
                                        .iter()
                                        .any(|e| e.pod.as_deref() == Some(pod.name.as_str()))
                                })
                        });
                        if !still && let Some(set) = self.services_of_pod.get_mut(&pod) {
                            set.remove(&svc);
                            if set.is_empty() {
                                self.services_of_pod.remove(&pod);
                            }
                        }
                    }
                    for ip in s.endpoints.iter().flat_map(|e| &e.addresses) {
                        let still = self.slices_of.get(&svc).is_some_and(|slices| {
                            slices
                                .iter()
                                .filter_map(|id| self.slices.get(id))
                                .any(|sl| sl.endpoints.iter().any(|e| e.addresses.contains(ip)))
                        });
                        if !still && let Some(set) = self.services_of_ip.get_mut(ip) {
                            set.remove(&svc);
                            if set.is_empty() {
                                self.services_of_ip.remove(ip);
                            }
                        }
                    }
                }
            }
            Kind::Authz => {
                if self.authz.remove(&key.id).is_some() {
                    touched.policy_namespaces.insert(key.id.namespace.clone());
                }
            }
            Kind::Traffic => {
                if let Some(t) = self.traffic.remove(&key.id) {
                    touched
                        .services
                        .insert(NsName::new(&t.id.namespace, &t.service));
                }
            }
            Kind::Route => {
                if let Some(r) = self.routes.remove(&key.id) {
                    touched
                        .services
                        .extend(r.parents.iter().map(|p| p.service.clone()));
                }
            }
            Kind::Namespace => {
                self.namespaces.remove(&key.id.name);
            }
            Kind::Pod => {
                if let Some(p) = self.pods.remove(&key.id) {
                    self.touch_pod(&p, touched);
                    for ip in &p.ips {
                        if self.pod_ips.get(ip) == Some(&p.id) {
                            self.pod_ips.remove(ip);
                        }
                    }
                }
            }
        }
    }

    fn touch_pod(&self, p: &Pod, touched: &mut Touched) {
        touched.ips.extend(p.ips.iter().copied());
        touched.policy_namespaces.insert(p.id.namespace.clone());
        if let Some(services) = self.services_of_pod.get(&p.id) {
            touched.services.extend(services.iter().cloned());
        }
        for ip in &p.ips {
            if let Some(services) = self.services_of_ip.get(ip) {
                touched.services.extend(services.iter().cloned());
            }
        }
    }

    /// Whether `target`'s answer may have changed.
    pub fn affects(&self, target: &Target, touched: &Touched) -> bool {
        match target {
            Target::Service { id, .. } => touched.services.contains(id),
            Target::Addr(a) => {
                touched.ips.contains(&a.ip())
                    || self
                        .cluster_ips
                        .get(&a.ip())
                        .is_some_and(|s| touched.services.contains(s))
            }
        }
    }

    /// The answer for `target`.
    pub fn resolve(&self, target: &Target) -> Resolution {
        match target {
            Target::Service { id, port } => self.resolve_service(id, *port, None),
            Target::Addr(addr) => {
                if let Some(id) = self.cluster_ips.get(&addr.ip()) {
                    return self.resolve_service(id, addr.port(), Some(addr.ip()));
                }
                match self
                    .pod_ips
                    .get(&addr.ip())
                    .and_then(|id| self.pods.get(id))
                {
                    Some(pod) => {
                        let endpoint =
                            self.endpoint(*addr, Some(pod), Protocol::Unknown, true, None);
                        Resolution::Known {
                            service: String::new(),
                            protocol: Protocol::Unknown,
                            headless: false,
                            endpoints: BTreeMap::from([(*addr, endpoint)]),
                        }
                    }
                    None => Resolution::Unknown,
                }
            }
        }
    }

    /// A Service port's endpoints; `family` keeps only addresses of the ClusterIP's family.
    fn resolve_service(&self, id: &NsName, port: u16, family: Option<IpAddr>) -> Resolution {
        let Some(svc) = self.services.get(id) else {
            return Resolution::Unknown;
        };
        let Some(sp) = svc.ports.iter().find(|p| p.port == port) else {
            return Resolution::Unknown;
        };
        let protocol = app_protocol(sp);
        let mut ready = BTreeMap::new();
        let mut terminating = BTreeMap::new();
        for slice in self
            .slices_of
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|s| self.slices.get(s))
        {
            let Some(target_port) = slice_port(sp, slice, svc.ports.len()) else {
                continue;
            };
            for e in &slice.endpoints {
                let (set, is_ready) = match (e.ready, e.serving && e.terminating) {
                    (true, _) => (&mut ready, true),
                    (false, true) => (&mut terminating, false),
                    (false, false) => continue,
                };
                let named = e
                    .pod
                    .as_ref()
                    .map(|p| self.pods.get(&NsName::new(&id.namespace, p)));
                for ip in &e.addresses {
                    if family.is_some_and(|f| f.is_ipv4() != ip.is_ipv4()) {
                        continue;
                    }
                    // Without `targetRef`, the pod at the address (as when that pod is
                    // addressed directly); a `targetRef` names the pod it means.
                    let pod = named.unwrap_or_else(|| self.pod_at(ip));
                    let addr = SocketAddr::new(*ip, target_port);
                    set.insert(
                        addr,
                        self.endpoint(addr, pod, protocol, is_ready, e.zone.clone()),
                    );
                }
            }
        }
        // Terminating endpoints that still serve are offered only when nothing is ready.
        let endpoints = if ready.is_empty() { terminating } else { ready };
        Resolution::Known {
            service: format!("{}.{}:{}", id.name, id.namespace, port),
            protocol,
            headless: svc.headless,
            endpoints,
        }
    }

    /// The pod whose IP is `ip`, if the index knows it.
    fn pod_at(&self, ip: &IpAddr) -> Option<&Pod> {
        self.pod_ips.get(ip).and_then(|id| self.pods.get(id))
    }

    fn endpoint(
        &self,
        addr: SocketAddr,
        pod: Option<&Pod>,
        protocol: Protocol,
        ready: bool,
        zone: Option<String>,
    ) -> EndpointView {
        let mut labels = BTreeMap::new();
        let identity = pod.and_then(|p| {
            labels.insert("pod".to_string(), p.id.name.clone());
            labels.insert("namespace".to_string(), p.id.namespace.clone());
            labels.insert("serviceaccount".to_string(), p.service_account.clone());
            // A port the pod's iptables rules skip reaches the app directly: no proxy
            // there to speak mTLS with.
            let skipped = p.skip_inbound_ports.iter().any(|r| r.contains(addr.port()));
            (p.meshed && !skipped).then(|| {
                identity(
                    &self.domains.trust_domain,
                    &p.id.namespace,
                    &p.service_account,
                )
            })
        });
        EndpointView {
            addr,
            identity,
            protocol,
            ready,
            zone,
            labels,
        }
    }
}

/// The SPIFFE ID and DNS-form name of a ServiceAccount.
pub fn identity(trust_domain: &str, namespace: &str, service_account: &str) -> Identity {
    Identity {
        spiffe_id: format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"),
        server_name: format!(
            "{service_account}.{namespace}.serviceaccount.identity.{trust_domain}"
        ),
    }
}

/// The slice's port number for a Service port: by name (named and multi-port
/// Services), or the slice's only port.
fn slice_port(sp: &ServicePort, slice: &EndpointSlice, service_ports: usize) -> Option<u16> {
    if let Some(p) = slice.ports.iter().find(|p| p.name == sp.name) {
        return Some(p.port);
    }
    match (&sp.target_port, service_ports, slice.ports.as_slice()) {
        (_, 1, [only]) => Some(only.port),
        (TargetPort::Number(n), _, []) => Some(*n),
        _ => None,
    }
}

fn app_protocol(sp: &ServicePort) -> Protocol {
    match sp.app_protocol.as_deref() {
        Some("http") => Protocol::Http1,
        Some("kubernetes.io/h2c" | "h2c" | "grpc") => Protocol::Http2,
        Some("tcp" | "remora.io/opaque") => Protocol::Opaque,
        _ => Protocol::Unknown,
    }
}

#[cfg(test)]
mod tests;
