//! I/O adapters for accepted connections: replaying the bytes detection read, and
//! counting the bytes a connection carries.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pin_project_lite::pin_project! {
    /// A stream whose first reads return `prefix` (the bytes detection consumed).
    #[derive(Debug)]
    pub struct PrefixedIo<I> {
        prefix: Bytes,
        #[pin]
        io: I,
    }
}

impl<I> PrefixedIo<I> {
    pub fn new(prefix: Bytes, io: I) -> Self {
        Self { prefix, io }
    }

    /// The bytes not yet replayed, and the stream.
    pub fn into_parts(self) -> (Bytes, I) {
        (self.prefix, self.io)
    }

    pub fn get_mut(&mut self) -> &mut I {
        &mut self.io
    }
}

impl<I: AsyncRead> AsyncRead for PrefixedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> AsyncWrite for PrefixedIo<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, b)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// Counts the bytes read from and written to a stream.
    #[derive(Debug)]
    pub struct CountingIo<I> {
        #[pin]
        io: I,
        read: Counter,
        written: Counter,
    }
}

impl<I> CountingIo<I> {
    pub fn new(io: I, read: Counter, written: Counter) -> Self {
        Self { io, read, written }
    }

    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The stream, and its counters of bytes read and written.
    pub fn into_parts(self) -> (I, Counter, Counter) {
        (self.io, self.read, self.written)
    }

    /// Counts into `read` and `written` from now on, carrying over what was counted so
    /// far (bytes read before the connection's labels were known).
    pub fn retarget(&mut self, read: Counter, written: Counter) {
        read.inc_by(self.read.get());
        written.inc_by(self.written.get());
        self.read = read;
        self.written = written;
    }
}

impl<I: AsyncRead> AsyncRead for CountingIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.io.poll_read(cx, buf);
        this.read.inc_by((buf.filled().len() - before) as u64);
        res
    }
}

impl<I: AsyncWrite> AsyncWrite for CountingIo<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.io.poll_write(cx, b);
        if let Poll::Ready(Ok(n)) = res {
            this.written.inc_by(n as u64);
        }
        res
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.io.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            this.written.inc_by(n as u64);
        }
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefix_is_replayed_before_the_stream_and_bytes_are_counted() {
        let (a, mut b) = tokio::io::duplex(64);
        let (read, written) = (Counter::default(), Counter::default());
        let mut io = PrefixedIo::new(
            Bytes::from_static(b"GET / "),
            CountingIo::new(a, read.clone(), written.clone()),
        );
        b.write_all(b"HTTP/1.1\r\n").await.unwrap();
        drop(b.shutdown().await);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4];
        loop {
            let n = io.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, b"GET / HTTP/1.1\r\n");
        // The prefix was counted when detection read it, not again on replay.
        assert_eq!(read.get(), 10);
        io.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        assert_eq!(written.get(), 17);
        assert_eq!(b.read_u8().await.unwrap(), b'H');
    }
}
