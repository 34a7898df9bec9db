//! A client's request body on its way upstream, noting whether the client broke it: a
//! malformed chunked body or a stream cut short is the client's fault (`400`), never
//! the upstream's (`502`), so no client can inflate a Service's error rate.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    failed: Arc<AtomicBool>,
}

/// Whether the body it was made with failed.
#[derive(Debug, Clone, Default)]
pub struct BodyFailed(Arc<AtomicBool>);

impl BodyFailed {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl ClientBody {
    pub fn new(inner: Incoming) -> (Self, BodyFailed) {
        let failed = BodyFailed::default();
        let body = Self {
            inner,
            failed: failed.0.clone(),
        };
        (body, failed)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.failed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
