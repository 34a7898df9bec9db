//! A response body that records the response's outcome when its stream ends.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::Guard;
use crate::metrics::RequestMetrics;

pin_project_lite::pin_project! {
    /// Wraps a response body; counts the response in `remora_http_responses_total` once,
    /// when the stream ends or is dropped, with the gRPC status from its trailers.
    pub struct MeteredBody<B, G: Guard> {
        #[pin]
        inner: B,
        metrics: Option<RequestMetrics>,
        status: u16,
        grpc_status: Option<u32>,
        failed: bool,
        // Had nothing to send from the start (HEAD, 204, 304): never polled, yet complete.
        empty: bool,
        // The forwarder's guard (the balancer's request in flight), told how the
        // response ended.
        in_flight: Option<G>,
    }

    impl<B, G: Guard> PinnedDrop for MeteredBody<B, G> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Nothing left to send: the endpoint's answer was whole.
            if *this.empty && let Some(f) = this.in_flight.as_mut() {
                f.finish(true);
            }
            if let Some(m) = this.metrics.take() {
                // Dropped before its end: complete only if nothing was left to send.
                m.response(*this.status, *this.grpc_status, !*this.failed && *this.empty);
            }
        }
    }
}

impl<B: Body, G: Guard> MeteredBody<B, G> {
    pub fn new(
        inner: B,
        metrics: RequestMetrics,
        status: u16,
        headers: &HeaderMap,
        in_flight: Option<G>,
    ) -> Self {
        let empty = inner.is_end_stream();
        Self {
            inner,
            metrics: Some(metrics),
            status,
            grpc_status: grpc_status(headers),
            failed: false,
            empty,
            in_flight,
        }
    }
}

/// The `grpc-status` field, if present: its code, or UNKNOWN (2) for one outside 0-16.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    let value = headers.get("grpc-status")?;
    // As the gRPC spec says of a code it does not know: UNKNOWN. So the `grpc_status`
    // label has at most 17 values whatever a server sends.
    let code = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|c| *c <= 16)
        .unwrap_or(GRPC_UNKNOWN);
    Some(code)
}

/// gRPC's UNKNOWN status code.
const GRPC_UNKNOWN: u32 = 2;

impl<B: Body<Data = Bytes>, G: Guard> Body for MeteredBody<B, G> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    *this.grpc_status = grpc_status(trailers).or(*this.grpc_status);
                }
                // A body of known length may never be polled to its `None`.
                if this.inner.is_end_stream() {
                    if let Some(f) = this.in_flight.as_mut() {
                        f.finish(true);
                    }
                    if let Some(m) = this.metrics.take() {
                        m.response(*this.status, *this.grpc_status, true);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                // The endpoint broke its response after the headers: a failure for the
                // balancer and the breaker, not only for the metrics.
                *this.failed = true;
                if let Some(f) = this.in_flight.as_mut() {
                    f.finish(false);
                }
            }
            Poll::Ready(None) => {
                if let Some(mut f) = this.in_flight.take() {
                    f.finish(!*this.failed);
                }
                if let Some(m) = this.metrics.take() {
                    m.response(*this.status, *this.grpc_status, !*this.failed);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    /// As the upstream's body says. An HTTP/2 upstream body ends only once its stream
    /// is closed with nothing left to read (trailers received but not yet read keep it
    /// open), so a stream is never finished before its trailers; and an HTTP/1 one ends
    /// with its last DATA frame, not in an empty frame of its own after the client's
    /// proxy has written the whole `content-length` and dropped the stream (each such
    /// stream was reset, and past h2's 1,024 local resets the connection between the
    /// proxies closed). A trailers-only response (a gRPC error) is one HEADERS frame
    /// that ends the stream: an empty DATA frame after it is, to grpc-core, a broken
    /// stream.
    ///
    /// Until issue 14 an HTTP/2 response never claimed its end early, at the cost of an
    /// empty final DATA frame each, against trailers that went missing under load; they
    /// went missing in the test servers' response channel, not in the proxy
    /// (BENCHMARKS.md's notes), and `grpc_trailers_survive_concurrent_load` guards it.
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod grpc_tests {
    use super::*;

    #[test]
    fn grpc_codes_beyond_the_spec_are_unknown() {
        let status = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", http::HeaderValue::from_static(v));
            grpc_status(&h)
        };
        assert_eq!(status("0"), Some(0));
        assert_eq!(status("16"), Some(16));
        for wild in ["17", "4294967295", "99999999999", "abc", ""] {
            assert_eq!(status(wild), Some(GRPC_UNKNOWN), "{wild}");
        }
        assert_eq!(grpc_status(&HeaderMap::new()), None);
    }
}
