//! The gRPC side: the services behind one port, after [`Access`] has checked the
//! caller; `Destination.Get` streams a full snapshot, then deltas, from the published
//! answers. A stream costs a receiver and its last-sent set; no task.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
};

use futures_util::Stream;
use remora_api::v1 as api;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    access::{Access, Caller, StreamPermit},
    core::{EndpointView, Protocol, Resolution, Shared, Target},
    discovery::{Discovery, TargetWatch},
};

/// The controller's gRPC services behind one listener, routed by path (what tonic's
/// router would do, without its axum dependency), each call checked by `access` first.
#[derive(Clone)]
pub struct Router {
    pub destination: api::destination_server::DestinationServer<DestinationService>,
    pub identity: api::identity_server::IdentityServer<crate::identity::grpc::IdentityService>,
    pub policy: api::policy_server::PolicyServer<crate::policy::PolicyService>,
    pub access: Arc<Access>,
}

impl<B> tower_service::Service<http::Request<B>> for Router
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let caller = req
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_default();
        if let Err(status) = self.access.check(req.uri().path(), &caller) {
            tracing::debug!(path = req.uri().path(), addr = ?caller.addr, %status, "refused");
            return Box::pin(async move { Ok(status.into_http()) });
        }
        if req.uri().path().starts_with("/remora.v1.Identity/") {
            Box::pin(self.identity.call(req))
        } else if req.uri().path().starts_with("/remora.v1.Policy/") {
            Box::pin(self.policy.call(req))
        } else {
            // Destination, and anything unknown, which its server answers UNIMPLEMENTED.
            Box::pin(self.destination.call(req))
        }
    }
}

pub struct DestinationService {
    discovery: Arc<Discovery>,
    cluster_domain: String,
    shutdown: CancellationToken,
    access: Arc<Access>,
}

impl DestinationService {
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
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<api::Update, Status>> + Send>>;

#[tonic::async_trait]
impl api::destination_server::Destination for DestinationService {
    type GetStream = UpdateStream;

    async fn get(
        &self,
        req: Request<api::GetDestination>,
    ) -> Result<Response<UpdateStream>, Status> {
        let target = Target::parse(&req.get_ref().target, &self.cluster_domain)
            .map_err(Status::invalid_argument)?;
        let permit = self
            .access
            .streams
            .acquire(req.extensions().get::<Caller>(), &self.access.metrics)?;
        // Nothing is answered before the source's first sync: a controller that has just
        // started would otherwise tell reconnecting proxies their Services are unknown.
        tokio::select! {
            _ = self.discovery.synced() => {}
            _ = self.shutdown.cancelled() => return Err(Status::unavailable("shutting down")),
        }
        let watched = self.discovery.subscribe(target);
        let metrics = self.discovery.metrics().clone();
        metrics.streams_open.inc();
        let state = StreamState {
            watched,
            sent: None,
            pending: VecDeque::new(),
            first: true,
            guard: OpenGuard(metrics),
            _permit: permit,
        };
        let shutdown = self.shutdown.clone();
        let stream = futures_util::stream::unfold(state, move |mut s| {
            let shutdown = shutdown.clone();
            async move {
                loop {
                    if let Some(u) = s.pending.pop_front() {
                        s.guard.0.updates_sent.inc();
                        return Some((Ok(u), s));
                    }
                    if !s.first {
                        tokio::select! {
                            r = s.watched.rx().changed() => if r.is_err() { return None },
                            _ = shutdown.cancelled() => return None,
                        }
                    }
                    s.first = false;
                    let published: Shared = s.watched.rx().borrow_and_update().clone();
                    s.pending = updates(&mut s.sent, &published.resolution);
                    if let Some(since) = published.since
                        && !s.pending.is_empty()
                    {
                        s.guard
                            .0
                            .update_latency
                            .observe(since.elapsed().as_secs_f64());
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

struct StreamState {
    watched: TargetWatch,
    /// What the proxy has: `None` before the first snapshot or after `Unknown`.
    sent: Option<BTreeMap<SocketAddr, EndpointView>>,
    pending: VecDeque<api::Update>,
    first: bool,
    guard: OpenGuard,
    _permit: StreamPermit,
}

/// Counts the stream as open while it lives.
struct OpenGuard(crate::metrics::Metrics);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.streams_open.dec();
    }
}

/// The messages that bring a proxy from `sent` to `now`, updating `sent`.
pub fn updates(
    sent: &mut Option<BTreeMap<SocketAddr, EndpointView>>,
    now: &Resolution,
) -> VecDeque<api::Update> {
    let mut out = VecDeque::new();
    match now {
        Resolution::Unknown => {
            *sent = None;
            out.push_back(api::Update {
                kind: Some(api::update::Kind::NoEndpoints(api::NoEndpoints {
                    exists: false,
                })),
                reset: true,
                target: None,
            });
        }
        Resolution::Known {
            service,
            protocol,
            headless,
            endpoints,
        } => {
            let info = api::TargetInfo {
                service: service.clone(),
                protocol: hint(*protocol) as i32,
                headless: *headless,
            };
            match sent.as_ref() {
                None => {
                    let kind = if endpoints.is_empty() {
                        api::update::Kind::NoEndpoints(api::NoEndpoints { exists: true })
                    } else {
                        api::update::Kind::Add(api::AddEndpoints {
                            endpoints: endpoints.values().map(endpoint).collect(),
                        })
                    };
                    out.push_back(api::Update {
                        kind: Some(kind),
                        reset: true,
                        target: Some(info),
                    });
                }
                Some(before) => {
                    let removed: Vec<api::SocketAddress> = before
                        .keys()
                        .filter(|a| !endpoints.contains_key(a))
                        .map(|a| socket(*a))
                        .collect();
                    let added: Vec<api::Endpoint> = endpoints
                        .iter()
                        .filter(|(a, e)| before.get(a) != Some(e))
                        .map(|(_, e)| endpoint(e))
                        .collect();
                    if endpoints.is_empty() {
                        out.push_back(api::Update {
                            kind: Some(api::update::Kind::NoEndpoints(api::NoEndpoints {
                                exists: true,
                            })),
                            reset: true,
                            target: Some(info),
                        });
                    } else {
                        if !removed.is_empty() {
                            out.push_back(api::Update {
                                kind: Some(api::update::Kind::Remove(api::RemoveEndpoints {
                                    addresses: removed,
                                })),
                                reset: false,
                                target: None,
                            });
                        }
                        if !added.is_empty() {
                            out.push_back(api::Update {
                                kind: Some(api::update::Kind::Add(api::AddEndpoints {
                                    endpoints: added,
                                })),
                                reset: false,
                                target: Some(info),
                            });
                        }
                    }
                }
            }
            *sent = Some(endpoints.clone());
        }
    }
    out
}

fn hint(p: Protocol) -> api::ProtocolHint {
    match p {
        Protocol::Unknown => api::ProtocolHint::Unspecified,
        Protocol::Http1 => api::ProtocolHint::Http1,
        Protocol::Http2 => api::ProtocolHint::Http2,
        Protocol::Opaque => api::ProtocolHint::Opaque,
    }
}

fn socket(a: SocketAddr) -> api::SocketAddress {
    let ip = match a.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    api::SocketAddress {
        ip,
        port: u32::from(a.port()),
    }
}

fn endpoint(e: &EndpointView) -> api::Endpoint {
    api::Endpoint {
        address: Some(socket(e.addr)),
        weight: 10_000,
        identity: e.identity.as_ref().map(|i| api::TlsIdentity {
            spiffe_id: i.spiffe_id.clone(),
            server_name: i.server_name.clone(),
        }),
        protocol: hint(e.protocol) as i32,
        zone: e.zone.clone().unwrap_or_default(),
        labels: e.labels.clone().into_iter().collect(),
        ready: e.ready,
    }
}

#[cfg(test)]
mod update_tests {
    use super::*;
    use crate::core::EndpointView;

    fn view(addrs: &[&str]) -> Resolution {
        let endpoints = addrs
            .iter()
            .map(|a| {
                let addr: SocketAddr = a.parse().unwrap();
                let e = EndpointView {
                    addr,
                    identity: None,
                    protocol: Protocol::Unknown,
                    ready: true,
                    zone: None,
                    labels: Default::default(),
                };
                (addr, e)
            })
            .collect();
        Resolution::Known {
            service: "web.shop:80".into(),
            protocol: Protocol::Http1,
            headless: false,
            endpoints,
        }
    }

    fn kinds(u: &VecDeque<api::Update>) -> Vec<String> {
        u.iter()
            .map(|u| {
                let kind = match &u.kind {
                    Some(api::update::Kind::Add(a)) => format!("add{}", a.endpoints.len()),
                    Some(api::update::Kind::Remove(r)) => format!("remove{}", r.addresses.len()),
                    Some(api::update::Kind::NoEndpoints(n)) => format!("none(exists={})", n.exists),
                    None => "?".into(),
                };
                if u.reset { format!("{kind}!") } else { kind }
            })
            .collect()
    }

    #[test]
    fn snapshot_then_deltas_then_empty_then_unknown() {
        let mut sent = None;
        assert_eq!(
            kinds(&updates(&mut sent, &view(&["10.0.0.1:80", "10.0.0.2:80"]))),
            ["add2!"]
        );
        assert_eq!(
            kinds(&updates(&mut sent, &view(&["10.0.0.2:80", "10.0.0.3:80"]))),
            ["remove1", "add1"]
        );
        assert!(
            updates(&mut sent, &view(&["10.0.0.2:80", "10.0.0.3:80"])).is_empty(),
            "nothing changed"
        );
        assert_eq!(
            kinds(&updates(&mut sent, &view(&[]))),
            ["none(exists=true)!"]
        );
        assert_eq!(
            kinds(&updates(&mut sent, &view(&["10.0.0.9:80"]))),
            ["add1"]
        );
        assert_eq!(
            kinds(&updates(&mut sent, &Resolution::Unknown)),
            ["none(exists=false)!"]
        );
        assert_eq!(
            kinds(&updates(&mut sent, &view(&["10.0.0.9:80"]))),
            ["add1!"],
            "after unknown: a new snapshot"
        );
    }
}
