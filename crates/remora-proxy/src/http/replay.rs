//! Keeping a request body for a retry without holding the request back: the first
//! attempt streams the client's body as it comes, and a copy is kept of up to 64 KiB of
//! it. Once the attempt has failed, the body can be sent again if the copy holds all of
//! it (the client had finished sending, within the limit, without trailers) — as for a
//! unary gRPC call or a small request — or if the attempt let go of the client's
//! stream with everything it took from it copied (a failed connect takes nothing): the
//! next attempt sends the copy, then goes on with the stream. Never for a large upload,
//! nor for a stream an earlier attempt's connection still holds.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use super::ClientBody;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
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
    /// The most kept: [`MAX_REPLAY`], or 0 to only give back a stream nothing was
    /// taken from.
    limit: u64,
    /// The rest of the client's stream, given back by an attempt that let go of it.
    rest: Option<ClientBody>,
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

    /// A body for another attempt that sends the copy, then the rest of the client's
    /// stream, when the last attempt gave the stream back; None otherwise.
    pub fn resume(&self) -> Option<Tee> {
        let mut c = self.0.lock();
        if c.spoiled || c.complete {
            return None;
        }
        let rest = c.rest.take()?;
        Some(Tee {
            prefix: c.chunks.iter().cloned().collect(),
            inner: Some(rest),
            copy: Some(self.clone()),
        })
    }
}

/// A client's request body on its way upstream, copied into a [`Replay`] when one is
/// attached; a resumed one first sends what an earlier attempt copied.
#[derive(Debug)]
pub struct Tee {
    /// Copied bytes to send before the stream goes on.
    prefix: std::collections::VecDeque<Bytes>,
    inner: Option<ClientBody>,
    copy: Option<Replay>,
}

impl Tee {
    /// Streams `inner` as is.
    pub fn plain(inner: ClientBody) -> Self {
        Self {
            prefix: Default::default(),
            inner: Some(inner),
            copy: None,
        }
    }

    /// Streams `inner` and keeps what the returned handle needs to replay it.
    pub fn copying(inner: ClientBody) -> (Self, Replay) {
        Self::keeping(inner, MAX_REPLAY)
    }

    /// Streams `inner` and copies nothing: the returned handle gives the stream back
    /// only if the attempt took nothing from it (its connect failed), or the whole
    /// body if it was empty.
    pub fn returning(inner: ClientBody) -> (Self, Replay) {
        Self::keeping(inner, 0)
    }

    fn keeping(inner: ClientBody, limit: u64) -> (Self, Replay) {
        let replay = Replay::default();
        {
            let mut c = replay.0.lock();
            c.limit = limit;
            if inner.is_end_stream() {
                c.complete = true;
            }
        }
        (
            Self {
                prefix: Default::default(),
                inner: Some(inner),
                copy: Some(replay.clone()),
            },
            replay,
        )
    }
}

impl Drop for Tee {
    /// An attempt that lets go of the client's stream gives it back for the next one,
    /// when everything it took from the stream is in the copy.
    fn drop(&mut self) {
        if let (Some(replay), Some(inner)) = (&self.copy, self.inner.take()) {
            let mut c = replay.0.lock();
            if !c.spoiled && !c.complete && c.rest.is_none() {
                c.rest = Some(inner);
            }
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        if let Some(replay) = this.copy.as_ref() {
            let mut c = replay.0.lock();
            match &polled {
                Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                    Some(data) if !c.spoiled => {
                        c.len += data.len() as u64;
                        if c.len > c.limit {
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
            if inner.is_end_stream() {
                c.complete = true;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let prefix: u64 = self.prefix.iter().map(|b| b.len() as u64).sum();
        let mut hint = self
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        hint.set_lower(hint.lower() + prefix);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + prefix);
        }
        hint
    }
}
