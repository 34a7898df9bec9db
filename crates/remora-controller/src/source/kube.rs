//! `--source kube`: kube-rs watchers (with backoff) on Services, EndpointSlices and
//! Pods across all namespaces. Objects are trimmed of managedFields before anything
//! else; one that cannot be converted is logged and skipped, and the watch goes on.
//! After a relist, objects that did not come back are deleted.

use std::{
    collections::HashSet,
    fmt::Debug,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use futures_util::StreamExt;
use k8s_openapi::api::{core::v1 as core_v1, discovery::v1 as discovery_v1};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::{Events, Source};
use crate::{
    convert::{self, Invalid},
    core::{Event, Kind, NsName, Object, ObjectKey},
};

pub struct KubeSource {
    client: Client,
}

impl KubeSource {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl Source for KubeSource {
    fn run(
        self: Box<Self>,
        events: Events,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            let synced = Arc::new(AtomicUsize::new(0));
            let c = self.client;
            let services = watch::<core_v1::Service>(
                c.clone(),
                Kind::Service,
                events.clone(),
                synced.clone(),
                |s| convert::service(s).map(Object::Service),
            );
            let slices = watch::<discovery_v1::EndpointSlice>(
                c.clone(),
                Kind::Slice,
                events.clone(),
                synced.clone(),
                |s| convert::endpoint_slice(s).map(Object::Slice),
            );
            let pods =
                watch::<core_v1::Pod>(c.clone(), Kind::Pod, events.clone(), synced.clone(), |p| {
                    convert::pod(p).map(Object::Pod)
                });
            let authz =
                watch::<remora_k8s::AuthorizationPolicy>(c, Kind::Authz, events, synced, |p| {
                    convert::authorization_policy(p).map(Object::Authz)
                });
            tokio::join!(services, slices, pods, authz);
        })
    }
}

/// The kinds watched; `Synced` goes out when each has listed once.
const KINDS: usize = 5;

async fn watch<K>(
    client: Client,
    kind: Kind,
    events: Events,
    synced: Arc<AtomicUsize>,
    convert: impl Fn(&K) -> Result<Object, Invalid>,
) where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let api: Api<K> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default())
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .default_backoff()
        .boxed();
    let mut known: HashSet<NsName> = HashSet::new();
    let mut relisting: Option<HashSet<NsName>> = None;
    let mut listed_once = false;
    let key = |o: &K| {
        NsName::new(
            o.namespace().unwrap_or_else(|| "default".into()),
            o.name_any(),
        )
    };
    let send = |event: Event| {
        let events = events.clone();
        async move { events.send((event, Instant::now())).await.is_ok() }
    };
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(e) => e,
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.is_not_found() && !listed_once =>
            {
                // A CRD that is not installed has no objects: the source is synced
                // without them, and the watch keeps trying in case it is installed.
                warn!(
                    kind = kind.as_str(),
                    "the CRD is not installed; install the chart's CRDs"
                );
                listed_once = true;
                if synced.fetch_add(1, Ordering::SeqCst) + 1 == KINDS && !send(Event::Synced).await
                {
                    return;
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
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                let id = key(&o);
                match convert(&o) {
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
