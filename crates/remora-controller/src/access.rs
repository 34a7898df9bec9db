//! Who may call what on the gRPC port. `Identity.Certify` is for proxies without a
//! certificate yet (over server-authenticated TLS); everything else needs a client
//! certificate from the trust anchors. Plaintext is refused unless it was enabled for
//! local use, and then every caller counts as unauthenticated. Each client address may
//! hold a bounded number of streams.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use parking_lot::Mutex;
use tonic::Status;

use crate::metrics::{Metrics, Refusal};

/// How a caller reached the gRPC port, and who it proved to be: in each request's
/// extensions.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The client's address.
    pub addr: Option<SocketAddr>,
    /// The connection is TLS.
    pub tls: bool,
    /// The SPIFFE ID of the client certificate, when one was presented (and verified).
    pub identity: Option<String>,
}

/// The services a caller without a certificate may use.
const OPEN_PREFIX: &str = "/remora.v1.Identity/";

/// The gRPC port's rules.
#[derive(Debug)]
pub struct Access {
    /// Plaintext callers are served (local use only).
    pub plaintext: bool,
    pub streams: StreamLimits,
    pub metrics: Metrics,
}

impl Access {
    /// Whether `caller` may call `path`; the status to answer otherwise.
    pub fn check(&self, path: &str, caller: &Caller) -> Result<(), Status> {
        let refuse = |why: &str| {
            self.metrics.refused(Refusal::Unauthenticated);
            Err(Status::unauthenticated(why.to_string()))
        };
        if !caller.tls {
            if self.plaintext {
                return Ok(());
            }
            return refuse(
                "this controller does not accept plaintext: use https:// with the mesh's trust \
                 anchors, or start the controller with --grpc-plaintext for local use",
            );
        }
        if caller.identity.is_some() || path.starts_with(OPEN_PREFIX) {
            return Ok(());
        }
        refuse(
            "a client certificate is required: certify with Identity.Certify first, then \
             connect with the certificate",
        )
    }
}

/// Streams open per client address.
type OpenStreams = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Open streams per client address, each at most `max`.
#[derive(Debug)]
pub struct StreamLimits {
    max: usize,
    open: OpenStreams,
}

impl StreamLimits {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// A permit for one more stream of `caller`, held as long as the stream lives; or
    /// RESOURCE_EXHAUSTED once it holds `max`.
    pub fn acquire(
        &self,
        caller: Option<&Caller>,
        metrics: &Metrics,
    ) -> Result<StreamPermit, Status> {
        let Some(ip) = caller.and_then(|c| c.addr).map(|a| a.ip()) else {
            // Only in-process callers (tests) have no address.
            return Ok(StreamPermit { slot: None });
        };
        let mut open = self.open.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            metrics.refused(Refusal::TooManyStreams);
            return Err(Status::resource_exhausted(format!(
                "{ip} has {} streams open, the most a client may (--max-streams-per-client)",
                self.max
            )));
        }
        *n += 1;
        Ok(StreamPermit {
            slot: Some((ip, self.open.clone())),
        })
    }

    /// Streams open now, all clients together.
    pub fn open(&self) -> usize {
        self.open.lock().values().sum()
    }
}

/// One open stream. Dropping it frees the slot.
#[derive(Debug)]
pub struct StreamPermit {
    slot: Option<(IpAddr, OpenStreams)>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Some((ip, open)) = self.slot.take() {
            let mut open = open.lock();
            if let Some(n) = open.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::register(&mut prometheus_client::registry::Registry::default())
    }

    fn caller(tls: bool, identity: Option<&str>) -> Caller {
        Caller {
            addr: Some("10.0.0.1:40000".parse().unwrap()),
            tls,
            identity: identity.map(str::to_string),
        }
    }

    #[test]
    fn only_certify_is_open_to_callers_without_a_certificate() {
        let access = Access {
            plaintext: false,
            streams: StreamLimits::new(1),
            metrics: metrics(),
        };
        let web = Some("spiffe://cluster.local/ns/shop/sa/web");
        let certify = "/remora.v1.Identity/Certify";
        let get = "/remora.v1.Destination/Get";
        let inbound = "/remora.v1.Policy/WatchInboundWorkload";
        assert!(access.check(certify, &caller(true, None)).is_ok());
        assert!(access.check(get, &caller(true, web)).is_ok());
        for path in [get, inbound, "/remora.v1.Nope/X"] {
            let err = access.check(path, &caller(true, None)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{path}");
        }
        // Plaintext is refused outright, Certify included (a token must not travel in clear).
        for path in [certify, get] {
            let err = access.check(path, &caller(false, None)).unwrap_err();
            assert!(err.message().contains("--grpc-plaintext"), "{err}");
        }
        let local = Access {
            plaintext: true,
            ..access
        };
        assert!(local.check(get, &caller(false, None)).is_ok());
        assert!(
            local.check(get, &caller(true, None)).is_err(),
            "TLS without a certificate"
        );
    }

    #[test]
    fn streams_are_capped_per_client_and_freed_when_they_end() {
        let (limits, m) = (StreamLimits::new(2), metrics());
        let a = caller(true, None);
        let mut b = caller(true, None);
        b.addr = Some("10.0.0.2:40000".parse().unwrap());
        let one = limits.acquire(Some(&a), &m).unwrap();
        let _two = limits.acquire(Some(&a), &m).unwrap();
        let err = limits.acquire(Some(&a), &m).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let _other = limits
            .acquire(Some(&b), &m)
            .expect("another client is not affected");
        drop(one);
        let _three = limits.acquire(Some(&a), &m).expect("a slot was freed");
        assert_eq!(limits.open(), 3);
    }
}
