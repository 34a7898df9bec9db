//! Keeping a request body for a retry without holding the request back: the first
//! attempt streams the client's body as it comes, and a copy is kept of up to 64 KiB of
//! it. Once the attempt has failed, the body can be sent again only if the copy holds
//! all of it (the client had finished sending, within the limit, without trailers) —
//! as for a unary gRPC call or a small request, never for a large upload or a stream
//! still open.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use parking_lot::Mutex;

/// The most of a request body kept for a retry.
pub const MAX_REPLAY: u64 = 64 * 1024;

/// What the first attempt's body has seen.
#[derive(Debug, Default)]
struct Copy {
    chunks: Vec<Bytes>,
    len: u64,
    /// The whole body went through.
    complete: bool,
    /// Too long, or with trailers: cannot be replayed.
    spoiled: bool,
}

/// The handle that says, after an attempt, whether the body can be sent again.
#[derive(Debug, Clone, Default)]
pub struct Replay(Arc<Mutex<Copy>>);

impl Replay {
    /// The whole body, if the copy holds all of it.
    pub fn body(&self) -> Option<Bytes> {
        let c = self.0.lock();
        if !c.complete || c.spoiled {
            return None;
        }
        let mut all = BytesMut::with_capacity(c.len as usize);
        for chunk in &c.chunks {
            all.extend_from_slice(chunk);
        }
        Some(all.freeze())
    }
}

pin_project_lite::pin_project! {
    /// A client's request body on its way upstream, copied into a [`Replay`] when one
    /// is attached.
    #[derive(Debug)]
    pub struct Tee {
        #[pin]
        inner: Incoming,
        copy: Option<Replay>,
    }
}

impl Tee {
    /// Streams `inner` as is.
    pub fn plain(inner: Incoming) -> Self {
        Self { inner, copy: None }
    }

    /// Streams `inner` and keeps what the returned handle needs to replay it.
    pub fn copying(inner: Incoming) -> (Self, Replay) {
        let replay = Replay::default();
        if inner.is_end_stream() {
            replay.0.lock().complete = true;
        }
        (
            Self {
                inner,
                copy: Some(replay.clone()),
            },
            replay,
        )
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Some(replay) = this.copy.as_ref() {
            let mut c = replay.0.lock();
            match &polled {
                Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                    Some(data) if !c.spoiled => {
                        c.len += data.len() as u64;
                        if c.len > MAX_REPLAY {
                            c.spoiled = true;
                            c.chunks = Vec::new();
                        } else {
                            c.chunks.push(data.clone());
                        }
                    }
                    Some(_) => {}
                    None => c.spoiled = true,
                },
                Poll::Ready(Some(Err(_))) => c.spoiled = true,
                Poll::Ready(None) => c.complete = true,
                Poll::Pending => {}
            }
            // hyper may stop polling once the body says it has ended.
            if this.inner.is_end_stream() {
                c.complete = true;
            }
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
