//! The outbound side: the app's connections, redirected to :4140. Each is resolved
//! through discovery to a [`Destination`] (a Service, a meshed pod, or passthrough),
//! its protocol detected, and then forwarded: HTTP per request by [`forward`], anything
//! else as a byte stream to the original destination or a balanced endpoint.
//!
//! The rooms: [`discovery`] keeps watches of endpoints and policy; [`destination`] owns
//! one destination's view, policy, balancer and budget; [`balance`] picks endpoints;
//! [`resilience`] decides retries, backoff, budget and breaker; [`forward`] sequences a
//! request's attempts; [`policy`] and [`routes`] are the controller's answers compiled.

pub mod balance;
pub mod destination;
pub mod discovery;
pub mod forward;
pub mod policy;
pub mod resilience;
pub mod routes;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpStream, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::debug;

pub use destination::{Destination, Destinations};
use discovery::{Endpoint, View};
use forward::{Balanced, Forwarder};
use policy::ServicePolicy;

use crate::{
    accept::{Admit, Detect, Side, refuse},
    addr::{ClientAddr, OrigDst},
    connect::{Conn, ConnectError, Connector, connect},
    detect::Detection,
    http::{self, Upstream, Version, pool::EndpointClients},
    io::{CountingIo, PrefixedIo},
    metrics::{DetectResult, Direction, Metrics, TrafficLabels, empty_label},
    tcp,
    tls::Alpn,
};

/// The balancer of a destination: its endpoints carry their HTTP pools.
pub type Balancer = balance::Balancer<EndpointClients>;
/// A request in flight to one of a destination's endpoints.
pub type InFlight = balance::InFlight<EndpointClients>;

/// What every outbound connection shares.
#[derive(Debug)]
pub struct Outbound {
    pub opaque_ports: Vec<remora_config::PortRange>,
    pub detect: Detect,
    pub connect_timeout: Duration,
    /// mTLS to meshed endpoints once the proxy has a certificate.
    pub connector: Connector,
    pub metrics: Metrics,
    /// Present when a controller is configured.
    pub destinations: Option<Arc<Destinations>>,
    pub discovery_wait: Duration,
    pub preconnect_delay: Duration,
    /// When opaque connections count as idle.
    pub idle: tcp::Idle,
    /// Cancelled as the proxy exits.
    pub drain: CancellationToken,
    pub tracker: TaskTracker,
    /// Connections accepted so far: a draining proxy watches the app's use.
    pub accepted: AtomicU64,
}

impl Side for Outbound {
    const DIRECTION: Direction = Direction::Outbound;

    fn drain(&self) -> &CancellationToken {
        &self.drain
    }

    fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    fn admit(&self, _: ClientAddr) -> Admit {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Admit::Serve(None)
    }

    async fn serve(self: Arc<Self>, stream: TcpStream, _: ClientAddr, orig_dst: OrigDst) {
        self.dispatch(stream, orig_dst).await
    }
}

/// Where a connection goes, as discovery says.
enum Resolved {
    /// The original destination, as-is.
    Passthrough,
    /// A Service's endpoints, balanced; or a meshed pod's one endpoint (its `name` is
    /// then `passthrough`), so its traffic gets mTLS and pooled HTTP/2 the same way.
    Balanced {
        destination: Arc<Destination>,
        name: Arc<str>,
    },
}

impl Outbound {
    fn is_opaque_port(&self, port: u16) -> bool {
        self.opaque_ports.iter().any(|r| r.contains(port))
    }

    /// Asks discovery about a connection's destination. Anything not known to be a
    /// Service or a meshed pod (an unknown address, an unmeshed pod, or no answer within
    /// the wait) is passthrough.
    async fn resolve(&self, orig_dst: OrigDst) -> Resolved {
        let Some(destinations) = &self.destinations else {
            return Resolved::Passthrough;
        };
        let destination = destinations.get(orig_dst);
        let mut views = destination.views.clone();
        let wait = views.wait_for(|v| *v != View::Pending);
        let view = match tokio::time::timeout(self.discovery_wait, wait).await {
            Ok(Ok(v)) => v.clone(),
            _ => {
                debug!("no answer from discovery in time: passthrough");
                return Resolved::Passthrough;
            }
        };
        match view {
            View::Service {
                name,
                headless: false,
                ..
            } => Resolved::Balanced { destination, name },
            View::Pod { endpoints } if endpoints.iter().any(|e| e.identity.is_some()) => {
                Resolved::Balanced {
                    destination,
                    name: Arc::from("passthrough"),
                }
            }
            _ => Resolved::Passthrough,
        }
    }

    /// The `tls` and `peer_identity` labels of a connection: encrypted when every
    /// endpoint is meshed and this proxy has an identity; the peer is named when all of
    /// them prove the same identity (one Service, one ServiceAccount, as usual).
    fn peer_labels(&self, resolved: &Resolved) -> (bool, Arc<str>) {
        let Resolved::Balanced { destination, .. } = resolved else {
            return (false, empty_label());
        };
        let view = destination.views.borrow();
        let endpoints: &[Endpoint] = match &*view {
            View::Service { endpoints, .. } | View::Pod { endpoints } => endpoints,
            _ => &[],
        };
        let encrypted = !endpoints.is_empty()
            && endpoints
                .iter()
                .all(|e| self.connector.encrypts(e.identity.as_ref()));
        if !encrypted {
            return (false, empty_label());
        }
        let first = endpoints[0].identity.as_ref().map(|i| &i.spiffe_id);
        let same = endpoints
            .iter()
            .all(|e| e.identity.as_ref().map(|i| &i.spiffe_id) == first);
        match (same, first) {
            (true, Some(id)) => (true, id.clone()),
            _ => (true, empty_label()),
        }
    }

    /// Connects for opaque TCP: to the original destination, or to a balanced endpoint
    /// (over mTLS when it is meshed).
    async fn connect(&self, resolved: &Resolved, orig_dst: OrigDst) -> Result<Conn, ConnectError> {
        let Resolved::Balanced { destination, name } = resolved else {
            return connect(orig_dst, self.connect_timeout)
                .await
                .map(Conn::Plain);
        };
        let no_endpoints = || ConnectError::NoEndpoints {
            service: name.clone(),
        };
        let endpoints = destination
            .endpoints(self.discovery_wait)
            .await
            .ok_or_else(no_endpoints)?;
        // The policy's algorithm; a connection's outcome is not a request's, so the
        // circuit breaker (and its probes) are left to HTTP.
        let algorithm = destination.policy(self.discovery_wait).await.algorithm;
        let policy = ServicePolicy {
            algorithm,
            ..Default::default()
        };
        // A connect that fails sent nothing: another endpoint is tried at once.
        let mut avoid = None;
        let mut tries = 0;
        loop {
            let ep = destination
                .balancer
                .pick_avoiding(&endpoints, &policy, avoid)
                .map_err(|_| no_endpoints())?;
            let mut in_flight = ep.start();
            let identity = ep.identity.as_ref();
            match self
                .connector
                .connect(OrigDst(ep.addr), identity, Alpn::Opaque)
                .await
            {
                Ok(conn) => {
                    ep.connected();
                    in_flight.answered();
                    return Ok(conn);
                }
                Err(error) => {
                    ep.connect_failed();
                    in_flight.settle(false);
                    if tries >= resilience::CONNECT_RETRIES {
                        return Err(error);
                    }
                    debug!(%error, endpoint = %ep.addr, "connect failed: trying another endpoint");
                    tries += 1;
                    avoid = Some(ep.addr);
                }
            }
        }
    }

    /// One connection: resolves the destination, detects the protocol while connecting
    /// upstream, then forwards.
    async fn dispatch(&self, stream: TcpStream, orig_dst: OrigDst) {
        let resolved = self.resolve(orig_dst).await;
        if let Resolved::Balanced { destination, .. } = &resolved {
            // The labels say whether the endpoints are meshed: a Service whose endpoints
            // are not known yet gets the moment its first request would wait for them.
            let _ = destination.endpoints(self.discovery_wait).await;
        }
        let (tls, peer_identity) = self.peer_labels(&resolved);
        let labels = TrafficLabels {
            direction: Direction::Outbound,
            target: match &resolved {
                Resolved::Balanced { name, .. } => name.clone(),
                Resolved::Passthrough => Arc::from("passthrough"),
            },
            tls,
            peer_identity,
            authz_name: empty_label(),
        };
        let span = tracing::Span::current();
        span.record("tls", labels.tls);
        if !labels.peer_identity.is_empty() {
            span.record("peer", &*labels.peer_identity);
        }
        let conn = self.metrics.connection(&labels);
        let mut io = CountingIo::new(stream, conn.read.clone(), conn.written.clone());
        let start = Instant::now();

        if self.is_opaque_port(orig_dst.0.port()) {
            self.metrics.detected(
                Direction::Outbound,
                DetectResult::OpaquePort,
                start.elapsed(),
            );
            match self.connect(&resolved, orig_dst).await {
                Ok(upstream) => {
                    let io = PrefixedIo::new(bytes::Bytes::new(), io);
                    tcp::forward_client(io, upstream, &self.idle).await
                }
                Err(error) => refuse(io.get_ref(), &error),
            }
            return;
        }

        // Connecting ahead lets a server that speaks first be heard. For a Service it
        // waits a moment: an HTTP client speaks at once, and its requests are balanced
        // over pooled connections instead.
        let delay = match resolved {
            Resolved::Passthrough => Duration::ZERO,
            Resolved::Balanced { .. } => self.preconnect_delay,
        };
        let mut connecting = Box::pin(async {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            self.connect(&resolved, orig_dst).await
        });
        let Some(Detection {
            result,
            prefix,
            upstream,
        }) = self.detect.run(&mut io, connecting.as_mut(), start).await
        else {
            return;
        };
        debug!(
            result = result.as_str(),
            bytes = prefix.len(),
            "protocol detected"
        );
        let io = PrefixedIo::new(prefix, io);

        let version = match result {
            DetectResult::Http1 => Version::Http1,
            DetectResult::Http2 => Version::Http2,
            _ => {
                let upstream = match upstream {
                    Some(s) => s,
                    None => match connecting.await {
                        Ok(s) => s,
                        Err(error) => return refuse(io.into_parts().1.get_ref(), &error),
                    },
                };
                return tcp::forward_client(io, upstream, &self.idle).await;
            }
        };
        let fwd = match &resolved {
            Resolved::Balanced { destination, name } => {
                // A connection made ahead for a slow client is not needed: requests are
                // pooled.
                drop((upstream, connecting));
                Forwarder::Balanced(Balanced {
                    destination: destination.clone(),
                    destinations: self
                        .destinations
                        .clone()
                        .expect("a balanced destination was discovered"),
                    service: name.clone(),
                    version,
                    orig_dst,
                    wait: self.discovery_wait,
                    counters: self.metrics.resilience(&labels),
                })
            }
            Resolved::Passthrough => {
                // An HTTP client whose destination cannot be reached gets a 502 that says
                // why.
                let fresh = match upstream {
                    Some(s) => Ok(s),
                    None => connecting.await,
                };
                Forwarder::Passthrough(Upstream::new(
                    orig_dst,
                    version,
                    Some(fresh),
                    self.connect_timeout,
                ))
            }
        };
        let served = http::Served {
            metrics: self.metrics.http(labels),
            drain: self.drain.clone(),
            idle_timeout: None,
            idle: self.idle.clone(),
        };
        http::serve(io, fwd, served).await;
    }
}
