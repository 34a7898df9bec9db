//! The `Policy` service: `WatchInboundWorkload` streams a workload's inbound policy
//! (compiled by `inbound`) to its own proxy only, `WatchOutbound` a Service's outbound
//! policy (compiled by `outbound`) to any certified proxy.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use remora_api::v1 as api;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    access::{Access, Caller, StreamPermit},
    core::{NsName, Target},
    discovery::Discovery,
    inbound::{DEFAULTS, WorkloadKey},
    metrics::Refusal,
    watches::Watched,
};

/// `Policy`: `WatchInboundWorkload` streams a workload's inbound policy and
/// `WatchOutbound` a target's, each sent again whenever it changes; nothing is answered
/// before the source's first sync.
pub struct PolicyService {
    discovery: Arc<Discovery>,
    cluster_domain: String,
    shutdown: CancellationToken,
    access: Arc<Access>,
}

impl PolicyService {
    pub fn new(
        discovery: Arc<Discovery>,
        cluster_domain: String,
        shutdown: CancellationToken,
        access: Arc<Access>,
    ) -> Self {
        Self {
            discovery,
            cluster_domain,
            shutdown,
            access,
        }
    }

    async fn synced(&self) -> Result<(), Status> {
        tokio::select! {
            _ = self.discovery.synced() => Ok(()),
            _ = self.shutdown.cancelled() => Err(Status::unavailable("shutting down")),
        }
    }
}

/// Streams the watch's current value, then each change, until shutdown. The permit
/// and the watch are released when the stream ends.
fn stream_of<K, T>(
    watched: Watched<K, Arc<T>>,
    permit: StreamPermit,
    shutdown: CancellationToken,
) -> Streamed<T>
where
    K: Eq + std::hash::Hash + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    let state = (watched, permit, true);
    let stream = futures_util::stream::unfold(state, move |(mut w, permit, first)| {
        let shutdown = shutdown.clone();
        async move {
            if !first {
                tokio::select! {
                    r = w.rx().changed() => if r.is_err() { return None },
                    _ = shutdown.cancelled() => return None,
                }
            }
            let value: Arc<T> = w.rx().borrow_and_update().clone();
            Some((Ok((*value).clone()), (w, permit, false)))
        }
    });
    Box::pin(stream)
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl api::policy_server::Policy for PolicyService {
    type WatchOutboundStream = Streamed<api::OutboundPolicy>;
    type WatchInboundWorkloadStream = Streamed<api::InboundWorkloadPolicy>;

    async fn watch_outbound(
        &self,
        req: Request<api::OutboundPolicyRequest>,
    ) -> Result<Response<Self::WatchOutboundStream>, Status> {
        let target = Target::parse(&req.get_ref().target, &self.cluster_domain)
            .map_err(Status::invalid_argument)?;
        let caller = req.extensions().get::<Caller>().cloned();
        // Consumer routes follow the client's namespace: the one its certificate proves.
        // Over plaintext (local use) the one it says counts.
        let proven = caller
            .as_ref()
            .and_then(|c| c.identity.as_deref())
            .and_then(crate::discovery::workload_of)
            .map(|(ns, _)| ns);
        let client_ns = match proven {
            Some(ns) => ns.to_string(),
            None => req
                .get_ref()
                .client
                .as_ref()
                .map(|c| c.namespace.clone())
                .unwrap_or_default(),
        };
        let permit = self
            .access
            .streams
            .acquire(caller.as_ref(), &self.access.metrics)?;
        self.synced().await?;
        let watched = self.discovery.subscribe_outbound(target, client_ns);
        Ok(Response::new(stream_of(
            watched,
            permit,
            self.shutdown.clone(),
        )))
    }

    async fn watch_inbound_workload(
        &self,
        req: Request<api::InboundPolicyRequest>,
    ) -> Result<Response<Self::WatchInboundWorkloadStream>, Status> {
        let caller = req.extensions().get::<Caller>().cloned();
        let req = req.into_inner();
        let (namespace, pod) = req
            .workload
            .split_once(':')
            .filter(|(ns, pod)| !ns.is_empty() && !pod.is_empty())
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "workload {:?} is not <namespace>:<pod-name>; set REMORA_NAMESPACE and \
                     REMORA_POD_NAME on the proxy",
                    req.workload
                ))
            })?;
        let default = if req.default_policy.is_empty() {
            "all-unauthenticated".to_string()
        } else if DEFAULTS.contains(&req.default_policy.as_str()) {
            req.default_policy
        } else {
            return Err(Status::invalid_argument(format!(
                "default policy {:?} is not one of {}",
                req.default_policy,
                DEFAULTS.join(", ")
            )));
        };
        let key = WorkloadKey {
            pod: NsName::new(namespace, pod),
            default,
        };
        // A proxy that proved its identity asks only about its own workload.
        if let Some(id) = caller.as_ref().and_then(|c| c.identity.as_deref())
            && let Err(why) = self.discovery.may_ask_about(id, &key.pod)
        {
            self.access.metrics.refused(Refusal::PermissionDenied);
            return Err(Status::permission_denied(why));
        }
        let permit = self
            .access
            .streams
            .acquire(caller.as_ref(), &self.access.metrics)?;
        // Nothing is answered before the source's first sync: a port's real policy
        // must not be preceded by its default.
        self.synced().await?;
        let watched = self.discovery.subscribe_inbound(key);
        Ok(Response::new(stream_of(
            watched,
            permit,
            self.shutdown.clone(),
        )))
    }
}

#[cfg(test)]
mod meshed_tests {
    use super::*;
    use crate::{core::Resolution, index::Index};

    const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: { remora.io/meshed: "true" }
  annotations: { remora.io/skip-inbound-ports: "9000-9001" }
spec: { serviceAccountName: web, containers: [] }
status: { podIP: 10.0.0.1 }
"#;

    fn index() -> Index {
        Index::from_yaml(POD)
    }

    fn has_identity(index: &Index, port: u16) -> bool {
        let addr = std::net::SocketAddr::from(([10, 0, 0, 1], port));
        match index.resolve(&Target::Addr(addr)) {
            Resolution::Known { endpoints, .. } => endpoints[&addr].identity.is_some(),
            Resolution::Unknown => panic!("the pod is known"),
        }
    }

    #[test]
    fn ports_the_proxy_does_not_intercept_get_no_identity() {
        let index = index();
        assert!(has_identity(&index, 8080));
        assert!(
            !has_identity(&index, 4191),
            "the admin port is never intercepted"
        );
        assert!(!has_identity(&index, 9000));
        assert!(!has_identity(&index, 9001));
    }

    #[test]
    fn a_proxy_asks_only_about_its_own_workload() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = crate::metrics::Metrics::register(&mut registry);
        let d = Discovery::new(index(), metrics, Vec::new());
        let web = NsName::new("shop", "web-1");
        assert!(
            d.may_ask_about("spiffe://cluster.local/ns/shop/sa/web", &web)
                .is_ok()
        );
        let other_sa = d.may_ask_about("spiffe://cluster.local/ns/shop/sa/other", &web);
        assert!(other_sa.unwrap_err().contains("runs as web"));
        let other_ns = d.may_ask_about("spiffe://cluster.local/ns/ops/sa/web", &web);
        assert!(other_ns.unwrap_err().contains("another namespace"));
        assert!(d.may_ask_about("spiffe://cluster.local/x", &web).is_err());
    }
}
