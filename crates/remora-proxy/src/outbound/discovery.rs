//! The proxy's discovery client: for a destination in use (an original destination, or
//! a backend Service an HTTP route names), one `Destination.Get` stream that keeps a
//! watch of its endpoints, and once it is known to be a Service one
//! `Policy.WatchOutbound` stream that keeps a watch of its outbound policy; each
//! reconnected with jittered backoff. While the controller is unreachable the last
//! answers stay in force, so traffic keeps flowing. Who owns and shares the watches is
//! [`super::destination`]'s business.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use prometheus_client::metrics::counter::Counter;
use remora_api::v1 as api;
use tokio::{sync::watch, task::AbortHandle, time::Instant};
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::policy::ServicePolicy;
use crate::{
    addr::OrigDst,
    control::ClientInfo,
    reconnect::{Backoff, Reconnected},
    tls::PeerId,
};

/// One endpoint as the proxy uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The identity its proxy proves: set when the endpoint is meshed, and then traffic
    /// to it is mTLS.
    pub identity: Option<PeerId>,
    pub ready: bool,
}

/// What is known about one original destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// No answer yet.
    Pending,
    /// The controller does not know it: forward as-is.
    Passthrough,
    /// A Service port.
    Service {
        /// `name.namespace:port`, the `target` metric label.
        name: Arc<str>,
        headless: bool,
        endpoints: Arc<[Endpoint]>,
    },
    /// A bare pod (a pod IP, as headless Services give): forwarded to the address
    /// asked for, over mTLS when the pod is meshed.
    Pod { endpoints: Arc<[Endpoint]> },
}

/// What a destination is looked up by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A connection's original destination.
    Addr(OrigDst),
    /// A backend Service an HTTP route names (`name.namespace.svc.domain:port`).
    Name(Arc<str>),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Addr(a) => a.fmt(f),
            Key::Name(n) => n.fmt(f),
        }
    }
}

/// A client of the controller's discovery and outbound policy services.
pub struct Discovery {
    client: api::destination_client::DestinationClient<Channel>,
    channel: Channel,
    info: ClientInfo,
    reconnects: Counter,
    reconnected: Reconnected,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery").finish_non_exhaustive()
    }
}

impl Discovery {
    /// A client over `channel` to the controller.
    pub fn new(
        channel: Channel,
        info: ClientInfo,
        reconnects: Counter,
        reconnected: Reconnected,
    ) -> Arc<Self> {
        Arc::new(Self {
            client: api::destination_client::DestinationClient::new(channel.clone()),
            channel,
            info,
            reconnects,
            reconnected,
        })
    }

    /// The endpoints of `key`, kept up to date until the task is aborted.
    pub fn views(self: &Arc<Self>, key: Key) -> (watch::Receiver<View>, AbortHandle) {
        let (tx, rx) = watch::channel(View::Pending);
        let task = tokio::spawn(self.clone().watch(key, tx)).abort_handle();
        (rx, task)
    }

    /// The outbound policy of `key` once `views` says it is a Service (None until the
    /// controller answers or is found away), kept up to date until the task is aborted;
    /// `changed` sees each new one first. A backend Service's own routes are dropped:
    /// routes apply once.
    pub fn policy(
        self: &Arc<Self>,
        key: Key,
        views: watch::Receiver<View>,
        changed: impl Fn(&ServicePolicy) + Send + Sync + 'static,
    ) -> (watch::Receiver<Option<Arc<ServicePolicy>>>, AbortHandle) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(self.clone().watch_policy(key, views, tx, changed)).abort_handle();
        (rx, task)
    }

    /// Keeps `tx` up to date for `key` until aborted.
    async fn watch(self: Arc<Self>, key: Key, tx: watch::Sender<View>) {
        let mut backoff = self.reconnected.backoff(crate::rng::random());
        loop {
            let started = Instant::now();
            match self.stream(&key, &tx, &mut backoff).await {
                Ok(()) => debug!(%key, "destination stream ended"),
                Err(status) => debug!(%key, %status, "destination stream failed"),
            }
            self.reconnects.inc();
            // A route's backend has no original destination to pass through to: it stays
            // pending, and its requests find no endpoints.
            if *tx.borrow() == View::Pending && matches!(key, Key::Addr(_)) {
                // Never answered: connections waiting on it pass through rather than stall.
                tx.send_replace(View::Passthrough);
                warn!(%key, "controller unreachable: passing this destination through until it answers");
            }
            backoff.pause(started).await;
        }
    }

    /// Keeps the outbound policy of a Service destination up to date: nothing is asked
    /// until discovery says the destination is a Service; the last policy stays in force
    /// while the controller is away.
    async fn watch_policy(
        self: Arc<Self>,
        key: Key,
        mut views: watch::Receiver<View>,
        tx: watch::Sender<Option<Arc<ServicePolicy>>>,
        changed: impl Fn(&ServicePolicy),
    ) {
        if views
            .wait_for(|v| matches!(v, View::Service { .. }))
            .await
            .is_err()
        {
            return;
        }
        let mut client = api::policy_client::PolicyClient::new(self.channel.clone());
        let mut backoff = self.reconnected.backoff(crate::rng::random());
        loop {
            let started = Instant::now();
            let req = api::OutboundPolicyRequest {
                target: key.to_string(),
                client: Some(self.info.to_api()),
            };
            let result = async {
                let mut stream = client.watch_outbound(req).await?.into_inner();
                while let Some(p) = stream.message().await? {
                    backoff.answered();
                    let mut policy = ServicePolicy::from_api(&p);
                    if matches!(key, Key::Name(_)) {
                        policy.routes = Arc::default();
                    }
                    let policy = Arc::new(policy);
                    if tx.borrow().as_deref() != Some(&*policy) {
                        info!(%key, policy = %policy.name, "outbound policy");
                    }
                    changed(&policy);
                    tx.send_replace(Some(policy));
                }
                Ok::<_, tonic::Status>(())
            }
            .await;
            if let Err(status) = result {
                debug!(%key, %status, "outbound policy stream failed; the last policy stays");
            }
            // Never answered: requests stop waiting for a policy and use the default.
            if tx.borrow().is_none() {
                tx.send_replace(Some(Arc::new(ServicePolicy::default())));
            }
            backoff.pause(started).await;
        }
    }

    async fn stream(
        &self,
        key: &Key,
        tx: &watch::Sender<View>,
        backoff: &mut Backoff,
    ) -> Result<(), tonic::Status> {
        let req = api::GetDestination {
            target: key.to_string(),
            client: Some(self.info.to_api()),
        };
        let mut stream = self.client.clone().get(req).await?.into_inner();
        let mut state = StreamState::default();
        while let Some(update) = stream.message().await? {
            backoff.answered();
            if let Some(view) = state.apply(update) {
                tx.send_if_modified(|v| {
                    let changed = *v != view;
                    *v = view;
                    changed
                });
            }
        }
        info!(%key, "controller closed the destination stream");
        Ok(())
    }
}

/// The endpoints of one stream, rebuilt from snapshot and deltas.
#[derive(Default)]
pub struct StreamState {
    info: Option<api::TargetInfo>,
    endpoints: BTreeMap<SocketAddr, Endpoint>,
    exists: Option<bool>,
}

impl StreamState {
    /// Applies an update; the new view, or None if the update was malformed.
    pub fn apply(&mut self, u: api::Update) -> Option<View> {
        if u.reset {
            self.endpoints.clear();
        }
        if let Some(info) = u.target {
            self.info = Some(info);
        }
        match u.kind? {
            api::update::Kind::Add(add) => {
                self.exists = Some(true);
                for e in add.endpoints {
                    let Some(addr) = e.address.as_ref().and_then(socket_addr) else {
                        continue;
                    };
                    let identity = e
                        .identity
                        .filter(|i| !i.spiffe_id.is_empty() && !i.server_name.is_empty())
                        .map(|i| PeerId {
                            spiffe_id: Arc::from(i.spiffe_id),
                            server_name: Arc::from(i.server_name),
                        });
                    self.endpoints.insert(
                        addr,
                        Endpoint {
                            addr,
                            identity,
                            ready: e.ready,
                        },
                    );
                }
            }
            api::update::Kind::Remove(rm) => {
                for a in rm.addresses.iter().filter_map(socket_addr) {
                    self.endpoints.remove(&a);
                }
            }
            api::update::Kind::NoEndpoints(n) => {
                self.endpoints.clear();
                self.exists = Some(n.exists);
            }
        }
        Some(self.view())
    }

    fn view(&self) -> View {
        let endpoints = || self.endpoints.values().cloned().collect::<Vec<_>>().into();
        let Some(info) = &self.info else {
            return if self.exists == Some(true) {
                View::Pod {
                    endpoints: endpoints(),
                }
            } else {
                View::Passthrough
            };
        };
        if info.service.is_empty() {
            return View::Pod {
                endpoints: endpoints(),
            };
        }
        View::Service {
            name: Arc::from(info.service.as_str()),
            headless: info.headless,
            endpoints: endpoints(),
        }
    }
}

fn socket_addr(a: &api::SocketAddress) -> Option<SocketAddr> {
    let ip: IpAddr = match a.ip.len() {
        4 => <[u8; 4]>::try_from(a.ip.as_slice()).ok()?.into(),
        16 => <[u8; 16]>::try_from(a.ip.as_slice()).ok()?.into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16::try_from(a.port).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: [u8; 4], port: u32, ready: bool) -> api::Endpoint {
        api::Endpoint {
            address: Some(api::SocketAddress {
                ip: ip.to_vec(),
                port,
            }),
            weight: 10_000,
            ready,
            ..Default::default()
        }
    }

    fn info(service: &str) -> Option<api::TargetInfo> {
        Some(api::TargetInfo {
            service: service.into(),
            protocol: 0,
            headless: false,
        })
    }

    fn addrs(v: &View) -> Vec<String> {
        match v {
            View::Service { endpoints, .. } => {
                endpoints.iter().map(|e| e.addr.to_string()).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn snapshot_then_deltas() {
        let mut s = StreamState::default();
        let add = |eps| Some(api::update::Kind::Add(api::AddEndpoints { endpoints: eps }));
        let v = s
            .apply(api::Update {
                kind: add(vec![
                    ep([10, 0, 0, 1], 80, true),
                    ep([10, 0, 0, 2], 80, true),
                ]),
                reset: true,
                target: info("web.shop:80"),
            })
            .unwrap();
        assert_eq!(addrs(&v), ["10.0.0.1:80", "10.0.0.2:80"]);
        let rm = api::RemoveEndpoints {
            addresses: vec![api::SocketAddress {
                ip: vec![10, 0, 0, 1],
                port: 80,
            }],
        };
        let v = s
            .apply(api::Update {
                kind: Some(api::update::Kind::Remove(rm)),
                reset: false,
                target: None,
            })
            .unwrap();
        assert_eq!(addrs(&v), ["10.0.0.2:80"]);
        let v = s
            .apply(api::Update {
                kind: add(vec![ep([10, 0, 0, 3], 80, false)]),
                reset: false,
                target: None,
            })
            .unwrap();
        assert_eq!(addrs(&v), ["10.0.0.2:80", "10.0.0.3:80"]);
        // A new snapshot replaces everything.
        let v = s
            .apply(api::Update {
                kind: add(vec![ep([10, 0, 0, 9], 80, true)]),
                reset: true,
                target: info("web.shop:80"),
            })
            .unwrap();
        assert_eq!(addrs(&v), ["10.0.0.9:80"]);
        let none = api::update::Kind::NoEndpoints(api::NoEndpoints { exists: true });
        let v = s
            .apply(api::Update {
                kind: Some(none),
                reset: true,
                target: info("web.shop:80"),
            })
            .unwrap();
        assert!(addrs(&v).is_empty());
    }

    #[test]
    fn unknown_and_pod_targets() {
        let mut s = StreamState::default();
        let unknown = api::update::Kind::NoEndpoints(api::NoEndpoints { exists: false });
        assert_eq!(
            s.apply(api::Update {
                kind: Some(unknown),
                reset: true,
                target: None
            }),
            Some(View::Passthrough)
        );
        let mut s = StreamState::default();
        let add = api::update::Kind::Add(api::AddEndpoints {
            endpoints: vec![ep([10, 0, 0, 4], 8080, true)],
        });
        let Some(View::Pod { endpoints }) = s.apply(api::Update {
            kind: Some(add),
            reset: true,
            target: info(""),
        }) else {
            panic!("a pod target")
        };
        assert_eq!(endpoints[0].addr, SocketAddr::from(([10, 0, 0, 4], 8080)));
        let mut s = StreamState::default();
        assert_eq!(
            s.apply(api::Update {
                kind: None,
                reset: true,
                target: None
            }),
            None,
            "malformed"
        );
    }
}
