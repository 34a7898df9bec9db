//! `--source kube`: kube-rs watchers (with backoff) on Services, EndpointSlices, Pods,
//! AuthorizationPolicies, TrafficPolicies and HTTPRoutes across all namespaces. Objects
//! are trimmed of managedFields before anything else and read one by one: one that
//! cannot be read or converted is logged, counted and skipped (the last valid version
//! stays in force), and the watch goes on (a typed list would fail whole for one bad
//! object, and the kind would stop being watched). A kind whose CRD is not installed
//! (the Gateway API's, say) counts as listed, so the controller serves the rest, and is
//! picked up when it is installed.
//! Policy objects get a status saying whether they were accepted, and why not. After a
//! relist, objects that did not come back are deleted.

use std::{
    collections::HashSet,
    fmt::Debug,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use futures_util::StreamExt;
use k8s_openapi::api::{core::v1 as core_v1, discovery::v1 as discovery_v1};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use super::{Events, Source};
use crate::{
    convert::{self, Invalid},
    core::{Event, Kind, NsName, Object, ObjectKey},
    leader::Leading,
    metrics::{Metrics, SourceRefusal},
};

pub struct KubeSource {
    client: Client,
    leading: Option<Leading>,
}

impl KubeSource {
    /// A source that writes statuses itself.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            leading: None,
        }
    }

    /// Writes statuses only while `leading` says so, and all of them again (a relist)
    /// when it starts leading.
    pub fn with_leader(mut self, leading: Leading) -> Self {
        self.leading = Some(leading);
        self
    }
}

impl Source for KubeSource {
    fn run(
        self: Box<Self>,
        events: Events,
        metrics: Metrics,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            let w = Watch {
                client: self.client,
                events,
                synced: AtomicUsize::new(0),
                metrics,
                leading: self.leading,
            };
            let services = w.run::<core_v1::Service>(Kind::Service, None, |s| {
                convert::service(s).map(Object::Service)
            });
            let slices = w.run::<discovery_v1::EndpointSlice>(Kind::Slice, None, |s| {
                convert::endpoint_slice(s).map(Object::Slice)
            });
            let pods = w.run::<core_v1::Pod>(Kind::Pod, None, |p| convert::pod(p).map(Object::Pod));
            let authz = w.run::<remora_k8s::AuthorizationPolicy>(
                Kind::Authz,
                Some(|p, r| policy_status(p.metadata.generation, r, p.status.as_ref())),
                |p| convert::authorization_policy(p).map(Object::Authz),
            );
            let traffic = w.run::<remora_k8s::TrafficPolicy>(
                Kind::Traffic,
                Some(|p, r| policy_status(p.metadata.generation, r, p.status.as_ref())),
                |p| convert::traffic_policy(p).map(Object::Traffic),
            );
            let routes = w.run::<remora_k8s::HttpRoute>(Kind::Route, Some(route_status), |r| {
                convert::http_route(r).map(Object::Route)
            });
            let namespaces = w.run::<core_v1::Namespace>(Kind::Namespace, None, |n| {
                convert::namespace(n).map(Object::Namespace)
            });
            tokio::join!(services, slices, pods, authz, traffic, routes, namespaces);
        })
    }
}

/// The kinds watched (as many as `run` joins); `Synced` goes out when each has listed once.
const KINDS: usize = 7;

/// The status an object should have, given how its conversion went; None: leave it.
type StatusOf<K> = fn(&K, &Result<Object, Invalid>) -> Option<serde_json::Value>;

/// A policy CRD's status: `Accepted`, or not with the reason.
fn policy_status(
    generation: Option<i64>,
    converted: &Result<Object, Invalid>,
    current: Option<&remora_k8s::PolicyStatus>,
) -> Option<serde_json::Value> {
    let previous = current.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let outcome = match converted {
        Ok(_) => Ok("Accepted"),
        Err(e) => Err(("Invalid", e.reason.as_str())),
    };
    let accepted = remora_k8s::condition("Accepted", generation, outcome, previous);
    // Conditions of other types (someone else's) stay as they are.
    let mut conditions: Vec<_> = previous
        .iter()
        .filter(|c| c.type_ != "Accepted")
        .cloned()
        .collect();
    conditions.push(accepted);
    (conditions != previous).then(|| serde_json::json!({ "status": { "conditions": conditions } }))
}

/// An HTTPRoute's status: for each Service it attaches to, Remora's entry in
/// `status.parents` (`Accepted`, `ResolvedRefs`); other controllers' entries are kept.
fn route_status(
    route: &remora_k8s::HttpRoute,
    converted: &Result<Object, Invalid>,
) -> Option<serde_json::Value> {
    use remora_k8s::{CONTROLLER_NAME, HttpRouteStatusParents, HttpRouteStatusParentsParentRef};
    let generation = route.metadata.generation;
    let current = route.status.clone().unwrap_or_default().parents;
    let accepted = match converted {
        Ok(_) => Ok("Accepted"),
        Err(e) => Err(("UnsupportedValue", e.reason.as_str())),
    };
    let unresolved = unresolved_backends(route);
    let resolved = match &unresolved {
        None => Ok("ResolvedRefs"),
        Some((reason, message)) => Err((*reason, message.as_str())),
    };
    let ours: Vec<HttpRouteStatusParents> = route
        .spec
        .parent_refs
        .iter()
        .flatten()
        .filter(|p| remora_k8s::is_service_parent(p.group.as_deref(), p.kind.as_deref()))
        .map(|p| {
            let parent_ref = HttpRouteStatusParentsParentRef {
                group: p.group.clone(),
                kind: p.kind.clone(),
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                port: p.port,
                section_name: p.section_name.clone(),
            };
            let previous = current
                .iter()
                .find(|s| s.controller_name == CONTROLLER_NAME && s.parent_ref == parent_ref)
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            HttpRouteStatusParents {
                conditions: vec![
                    remora_k8s::condition("Accepted", generation, accepted, previous),
                    remora_k8s::condition("ResolvedRefs", generation, resolved, previous),
                ],
                controller_name: CONTROLLER_NAME.into(),
                parent_ref,
            }
        })
        .collect();
    let theirs = current
        .iter()
        .filter(|s| s.controller_name != CONTROLLER_NAME);
    let current_ours: Vec<_> = current
        .iter()
        .filter(|s| s.controller_name == CONTROLLER_NAME)
        .cloned()
        .collect();
    if current_ours == ours {
        return None;
    }
    let parents: Vec<_> = theirs.cloned().chain(ours).collect();
    Some(serde_json::json!({ "status": { "parents": parents } }))
}

/// The first backendRef the mesh cannot send to: (reason, message).
fn unresolved_backends(route: &remora_k8s::HttpRoute) -> Option<(&'static str, String)> {
    let namespace = route.metadata.namespace.as_deref().unwrap_or("default");
    for (i, rule) in route.spec.rules.iter().flatten().enumerate() {
        for (j, b) in rule.backend_refs.iter().flatten().enumerate() {
            if let Some((reason, why)) = remora_k8s::backend_problem(namespace, b) {
                return Some((reason, format!("spec.rules[{i}].backendRefs[{j}]: {why}")));
            }
        }
    }
    None
}

/// What every watch shares.
struct Watch {
    client: Client,
    events: Events,
    /// The kinds listed once so far.
    synced: AtomicUsize,
    metrics: Metrics,
    /// None: statuses are always written.
    leading: Option<Leading>,
}

/// The kinds the source watches.
trait Watched:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
}

impl Watch {
    /// Lists and watches `K`: converts each object, sends what changed (and, after a
    /// relist, what disappeared), and writes `status` where it should change.
    async fn run<K: Watched>(
        &self,
        kind: Kind,
        status: Option<StatusOf<K>>,
        convert: impl Fn(&K) -> Result<Object, Invalid>,
    ) {
        let Self {
            client,
            events,
            synced,
            metrics,
            leading,
        } = self;
        // Read as untyped objects, each then typed on its own.
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<K>(&()));
        let start = || {
            watcher(api.clone(), watcher::Config::default())
                .modify(|o: &mut DynamicObject| o.managed_fields_mut().clear())
                .default_backoff()
                .boxed()
        };
        let mut stream = start();
        // Kinds with a status follow the leadership.
        let mut leading = status.and(leading.clone());
        let may_write = |l: &Option<Leading>| l.as_ref().is_none_or(|l| *l.borrow());
        let mut known: HashSet<NsName> = HashSet::new();
        let mut relisting: Option<HashSet<NsName>> = None;
        let mut listed_once = false;
        // The kind's CRD was missing at the last list.
        let mut missing = false;
        // A Namespace has none: its key's namespace is empty.
        let key = |o: &DynamicObject| NsName::new(o.namespace().unwrap_or_default(), o.name_any());
        let send = |event: Event| {
            let events = events.clone();
            async move { events.send((event, Instant::now())).await.is_ok() }
        };
        loop {
            let item = tokio::select! {
                item = stream.next() => match item {
                    Some(item) => item,
                    None => break,
                },
                Ok(()) = async {
                    match leading.as_mut() {
                        Some(l) => l.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Statuses went unwritten while another replica led: list again,
                    // and write what differs.
                    if may_write(&leading) {
                        info!(kind = kind.as_str(), "leading: listing again to write statuses");
                        stream = start();
                    }
                    continue;
                }
            };
            let event = match item {
                Ok(e) => e,
                // A group the API server does not serve at all (the Gateway API's CRDs not
                // installed) answers a plain-text `404 page not found`, which has no
                // `NotFound` reason: the code says it.
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                    if status.is_not_found() || status.code == 404 =>
                {
                    // A CRD that is not installed has no objects: the source is synced
                    // without them, and the watch keeps trying (with backoff) in case it
                    // is installed, saying so once.
                    if !listed_once {
                        warn!(
                            kind = kind.as_str(),
                            "its CRD is not installed: serving without it until it is"
                        );
                        listed_once = true;
                        missing = true;
                        if synced.fetch_add(1, Ordering::SeqCst) + 1 == KINDS
                            && !send(Event::Synced).await
                        {
                            return;
                        }
                    }
                    continue;
                }
                Err(error) => {
                    warn!(kind = kind.as_str(), %error, "watch failed; retrying with backoff");
                    continue;
                }
            };
            match event {
                watcher::Event::Init => relisting = Some(HashSet::new()),
                watcher::Event::InitApply(dynamic) | watcher::Event::Apply(dynamic) => {
                    let id = key(&dynamic);
                    let typed =
                        serde_json::to_value(&dynamic).and_then(serde_json::from_value::<K>);
                    let o = match typed {
                        Ok(o) => o,
                        Err(error) => {
                            if let Some(seen) = relisting.as_mut() {
                                seen.insert(id.clone());
                            }
                            metrics.source_refused(SourceRefusal::Invalid);
                            warn!(kind = kind.as_str(), object = %id, %error,
                                "cannot read it; skipping it, the last valid version stays in force");
                            continue;
                        }
                    };
                    let converted = convert(&o);
                    let status = status.filter(|_| may_write(&leading));
                    if let Some(mut body) = status.and_then(|f| f(&o, &converted)) {
                        // Written from the version seen: if the object changed meanwhile (say,
                        // another controller wrote its status), the API server refuses it
                        // and the watch brings the new version to compute again from.
                        body["metadata"] =
                            serde_json::json!({ "resourceVersion": o.resource_version() });
                        tokio::spawn(write_status::<K>(client.clone(), id.clone(), kind, body));
                    }
                    match converted {
                        Ok(object) => {
                            if let Some(seen) = relisting.as_mut() {
                                seen.insert(id.clone());
                            }
                            known.insert(id);
                            if !send(Event::Apply(object)).await {
                                return;
                            }
                        }
                        Err(error) => {
                            // Seen, though unusable: a relist must not delete the last good
                            // version the index holds (an edit broke it; the old one stands).
                            if let Some(seen) = relisting.as_mut() {
                                seen.insert(id.clone());
                            }
                            metrics.source_refused(SourceRefusal::Invalid);
                            warn!("{error}; skipping it, the last valid version stays in force");
                        }
                    }
                }
                watcher::Event::Delete(o) => {
                    let id = key(&o);
                    known.remove(&id);
                    if !send(Event::Delete(ObjectKey { kind, id })).await {
                        return;
                    }
                }
                watcher::Event::InitDone => {
                    if std::mem::take(&mut missing) {
                        info!(kind = kind.as_str(), "its CRD is installed now");
                    }
                    let seen = relisting.take().unwrap_or_default();
                    for id in known.difference(&seen).cloned().collect::<Vec<_>>() {
                        known.remove(&id);
                        if !send(Event::Delete(ObjectKey { kind, id })).await {
                            return;
                        }
                    }
                    if !listed_once {
                        listed_once = true;
                        info!(kind = kind.as_str(), objects = known.len(), "listed");
                        if synced.fetch_add(1, Ordering::SeqCst) + 1 == KINDS
                            && !send(Event::Synced).await
                        {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Writes an object's status (a merge patch of the status subresource, conditional on
/// the resourceVersion in `body`), off the watch loop and within 10 s. A failure is
/// logged and left: the next change to the object tries again.
async fn write_status<K: Watched>(client: Client, id: NsName, kind: Kind, body: serde_json::Value) {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, &id.namespace, &ApiResource::erase::<K>(&()));
    let patch = kube::api::Patch::Merge(&body);
    let params = kube::api::PatchParams::default();
    let written =
        tokio::time::timeout(STATUS_TIMEOUT, api.patch_status(&id.name, &params, &patch)).await;
    match written {
        Ok(Ok(_)) => debug!(kind = kind.as_str(), %id, "status written"),
        Ok(Err(kube::Error::Api(e))) if e.code == 409 => {
            debug!(kind = kind.as_str(), %id, "status not written: the object changed meanwhile")
        }
        Ok(Err(error)) => {
            warn!(kind = kind.as_str(), %id, %error, "could not write status; RBAC must allow patching the status subresource")
        }
        Err(_) => warn!(kind = kind.as_str(), %id, "writing status timed out"),
    }
}

const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
