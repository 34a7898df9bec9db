//! Opaque TCP: moves bytes both ways, passing on each side's half-close, and closes a
//! connection that carries nothing either way for the idle timeout. Between two plain
//! sockets the bytes never leave the kernel (`splice(2)` through a pipe); otherwise
//! (TLS on a side) they are copied.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tracing::debug;

use crate::{
    connect::Conn,
    io::{CountingIo, PrefixedIo},
};

/// When an opaque connection counts as idle, and the counter of those closed for it.
#[derive(Debug, Clone, Default)]
pub struct Idle {
    /// None: never.
    pub timeout: Option<Duration>,
    pub closed: Counter,
}

/// Copies between the client and the upstream until both directions are done, or
/// until neither has carried a byte for the idle timeout.
pub async fn forward<C, U>(client: C, upstream: U, idle: &Idle)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Clock::new();
    let mut client = Active {
        io: client,
        clock: clock.clone(),
    };
    let mut upstream = Active {
        io: upstream,
        clock: clock.clone(),
    };
    until_idle(copy_both(&mut client, &mut upstream), &clock, idle).await
}

/// Runs `moving` (both directions of one connection, noting activity on `clock`) to
/// its end, unless nothing moves for the idle timeout: then it is dropped, which closes
/// the connection, and counted.
async fn until_idle(
    moving: impl Future<Output = io::Result<(u64, u64)>>,
    clock: &Clock,
    idle: &Idle,
) {
    tokio::pin!(moving);
    let Some(timeout) = idle.timeout else {
        return report(moving.await);
    };
    loop {
        let deadline = clock.last_activity() + timeout;
        tokio::select! {
            r = &mut moving => return report(r),
            _ = tokio::time::sleep_until(deadline) => {
                if clock.last_activity() + timeout <= Instant::now() {
                    idle.closed.inc();
                    return debug!(?timeout, "TCP stream idle: closed");
                }
            }
        }
    }
}

/// Moves bytes between two plain TCP sockets with `splice(2)`: each direction moves
/// them from one socket into a pipe and from the pipe into the other socket, inside the
/// kernel, with no copy through the proxy's memory and no user-space buffer. Used when
/// neither side is TLS (passthrough, and plaintext inbound); the rest of [`forward`]'s
/// contract holds: half-close passed on, idle timeout, byte counts.
async fn splice(
    client: &TcpStream,
    upstream: &TcpStream,
    read: &Counter,
    written: &Counter,
    idle: &Idle,
) {
    let clock = Clock::new();
    let up = splice_one_way(client, upstream, read, &clock);
    let down = splice_one_way(upstream, client, written, &clock);
    until_idle(async { tokio::try_join!(up, down) }, &clock, idle).await
}

/// What a pipe holds at most per move: Linux's default pipe size.
const PIPE_CHUNK: usize = 64 * 1024;

/// One direction: until `from` ends (then `to`'s write side is shut, passing the
/// half-close on) or fails. Returns the bytes moved.
async fn splice_one_way(
    from: &TcpStream,
    to: &TcpStream,
    counted: &Counter,
    clock: &Clock,
) -> io::Result<u64> {
    use nix::fcntl::{OFlag, SpliceFFlags, splice};
    use tokio::io::Interest;
    // The pipe (two descriptors) is made once there is something to move: an idle
    // direction holds none.
    from.readable().await?;
    let (pipe_out, pipe_in) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let mut moved = 0u64;
    loop {
        // Into the pipe: it is empty here, so `EAGAIN` means the socket has nothing.
        let n = match from.try_io(Interest::READABLE, || {
            splice(from, None, &pipe_in, None, PIPE_CHUNK, flags).map_err(io::Error::from)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                from.readable().await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            // The end of `from`'s stream: passed on as a half-close (a peer gone
            // already has nothing to be told).
            let shut = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return match shut {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
                _ => Ok(moved),
            };
        }
        clock.touch();
        counted.inc_by(n as u64);
        moved += n as u64;
        // Out of the pipe: it holds `left` bytes, so `EAGAIN` means the socket is full.
        let mut left = n;
        while left > 0 {
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe_out, None, to, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                Err(e) => return Err(e),
            }
        }
        clock.touch();
    }
}

/// Forwards an accepted client connection, the bytes detection read first, to
/// `upstream`: inside the kernel with `splice(2)` when the upstream is plain TCP too,
/// else by copying (mTLS).
pub async fn forward_client(
    client: PrefixedIo<CountingIo<TcpStream>>,
    upstream: Conn,
    idle: &Idle,
) {
    let Conn::Plain(mut upstream) = upstream else {
        return forward(client, upstream, idle).await;
    };
    let (prefix, client) = client.into_parts();
    let (client, read, written) = client.into_parts();
    if let Err(error) = upstream.write_all(&prefix).await {
        return debug!(%error, "TCP stream failed");
    }
    splice(&client, &upstream, &read, &written, idle).await
}

/// The buffer each direction of a copied connection starts with, and the most it grows
/// to. A connection that moves little keeps the small one; one whose reads fill it (a
/// bulk transfer) gets a buffer that holds four TLS records, so each write to a TLS side
/// makes full records and each syscall moves more.
const BUF_START: usize = 8 * 1024;
const BUF_MAX: usize = 64 * 1024;

/// One direction of a copied connection.
struct OneWay {
    buf: Box<[u8]>,
    /// What is read and not yet written: `buf[pos..end]`.
    pos: usize,
    end: usize,
    /// The last read filled the buffer: it grows once what it holds is written.
    grow: bool,
    read_done: bool,
    need_flush: bool,
    moved: u64,
}

impl OneWay {
    fn new() -> Self {
        Self {
            buf: vec![0; BUF_START].into_boxed_slice(),
            pos: 0,
            end: 0,
            grow: false,
            read_done: false,
            need_flush: false,
            moved: 0,
        }
    }

    /// Copies from `r` to `w` until `r` ends (then `w` is shut down, passing the
    /// half-close on); the bytes moved.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.end && !self.read_done {
                if self.grow {
                    self.buf = vec![0; (self.buf.len() * 2).min(BUF_MAX)].into_boxed_slice();
                    self.grow = false;
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        (self.pos, self.end) = (0, n);
                        self.read_done = n == 0;
                        self.grow = n == self.buf.len() && n < BUF_MAX;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read now: what was written must not wait in
                        // the writer's buffer (a TLS stream's) for more.
                        if self.need_flush {
                            std::task::ready!(w.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.end {
                let n =
                    std::task::ready!(w.as_mut().poll_write(cx, &self.buf[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.moved += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                std::task::ready!(w.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.moved));
            }
        }
    }
}

/// Copies both ways until both directions have ended, or one fails: the bytes moved
/// from `a` to `b` and from `b` to `a`. As `tokio::io::copy_bidirectional`, with
/// buffers that grow for bulk transfers.
async fn copy_both<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (OneWay::new(), OneWay::new());
    let (mut sent, mut received) = (None, None);
    std::future::poll_fn(|cx| {
        if sent.is_none()
            && let Poll::Ready(r) = a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))
        {
            sent = Some(r?);
        }
        if received.is_none()
            && let Poll::Ready(r) = b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))
        {
            received = Some(r?);
        }
        match (sent, received) {
            (Some(s), Some(r)) => Poll::Ready(Ok((s, r))),
            _ => Poll::Pending,
        }
    })
    .await
}

fn report(r: io::Result<(u64, u64)>) {
    match r {
        Ok((sent, received)) => debug!(sent, received, "TCP stream closed"),
        Err(error) => debug!(%error, "TCP stream failed"),
    }
}

/// When bytes last moved, shared by both sides of a connection.
#[derive(Debug, Clone)]
struct Clock {
    base: Instant,
    /// Nanoseconds after `base`.
    last: Arc<AtomicU64>,
}

impl Clock {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.base + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// A stream that notes on `clock` every read or write that moved bytes.
struct Active<I> {
    io: I,
    clock: Clock,
}

impl<I: AsyncRead + Unpin> AsyncRead for Active<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Active<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, b);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncReadExt, net::TcpListener};

    /// A connected pair of loopback sockets.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Between plain sockets the bytes are spliced: the detected prefix first, then
    /// megabytes both ways intact, each half-close passed on, and every byte counted.
    #[tokio::test]
    async fn spliced_streams_arrive_whole_in_order_and_counted() {
        let (mut client, proxy_client) = socket_pair().await;
        let (proxy_upstream, mut server) = socket_pair().await;
        let (read, written) = (Counter::default(), Counter::default());
        let io = PrefixedIo::new(
            bytes::Bytes::from_static(b"PREFIX"),
            CountingIo::new(proxy_client, read.clone(), written.clone()),
        );
        let task = tokio::spawn(async move {
            forward_client(io, Conn::Plain(proxy_upstream), &Idle::default()).await
        });
        let up: Vec<u8> = (0..3 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let down: Vec<u8> = (0..5 << 20).map(|i| (i * 13 % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            let (mut r, mut w) = client.split();
            let send = async {
                w.write_all(&up2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            tokio::join!(send, r.read_to_end(&mut got)).1.unwrap();
            got
        });
        let server_side = tokio::spawn(async move {
            let (mut r, mut w) = server.split();
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            // Answered only after the client's half-close arrived.
            w.write_all(&down2).await.unwrap();
            w.shutdown().await.unwrap();
            got
        });
        let (to_client, to_server) = (client_side.await.unwrap(), server_side.await.unwrap());
        task.await.unwrap();
        assert_eq!(&to_server[..6], b"PREFIX");
        assert!(
            to_server[6..] == up[..],
            "the request arrived whole and in order"
        );
        assert!(to_client == down, "the answer arrived whole and in order");
        assert_eq!(read.get(), up.len() as u64);
        assert_eq!(written.get(), down.len() as u64);
    }

    /// Copied (a TLS side): megabytes both ways arrive whole and in order, and the
    /// buffer of a direction that moves bulk grows while a chatty one stays small.
    #[tokio::test]
    async fn copied_streams_arrive_whole_and_bulk_grows_the_buffer() {
        let up: Vec<u8> = (0..3 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let mut reader: &[u8] = &up;
        let mut sink = Vec::new();
        let mut one = OneWay::new();
        let moved =
            std::future::poll_fn(|cx| one.poll(cx, Pin::new(&mut reader), Pin::new(&mut sink)))
                .await
                .unwrap();
        assert_eq!(moved, up.len() as u64);
        assert!(sink == up);
        assert_eq!(one.buf.len(), BUF_MAX, "bulk grew the buffer");

        // Small messages never fill the buffer: it stays as it started.
        let (mut client, proxy_client) = tokio::io::duplex(1 << 20);
        let (proxy_upstream, mut server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(async move {
            let (mut c, mut u) = (proxy_client, proxy_upstream);
            let mut a_to_b = OneWay::new();
            std::future::poll_fn(|cx| a_to_b.poll(cx, Pin::new(&mut c), Pin::new(&mut u)))
                .await
                .unwrap();
            a_to_b.buf.len()
        });
        for _ in 0..100 {
            client.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            server.read_exact(&mut b).await.unwrap();
        }
        client.shutdown().await.unwrap();
        assert_eq!(task.await.unwrap(), BUF_START);
    }

    /// A spliced connection that carries nothing for the idle timeout is closed.
    #[tokio::test]
    async fn an_idle_spliced_connection_is_closed() {
        let (mut client, proxy_client) = socket_pair().await;
        let (proxy_upstream, mut server) = socket_pair().await;
        let idle = Idle {
            timeout: Some(Duration::from_millis(200)),
            closed: Counter::default(),
        };
        let io = PrefixedIo::new(
            bytes::Bytes::new(),
            CountingIo::new(proxy_client, Counter::default(), Counter::default()),
        );
        let i = idle.clone();
        let task =
            tokio::spawn(async move { forward_client(io, Conn::Plain(proxy_upstream), &i).await });
        client.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        server.read_exact(&mut b).await.unwrap();
        task.await.unwrap();
        assert_eq!(idle.closed.get(), 1);
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn half_close_is_passed_on_and_late_replies_still_arrive() {
        let (proxy_client, mut client) = tokio::io::duplex(1024);
        let (proxy_upstream, mut server) = tokio::io::duplex(1024);
        let idle = Idle::default();
        let task = tokio::spawn(async move { forward(proxy_client, proxy_upstream, &idle).await });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "server saw the request then EOF");
        server.write_all(b"reply after half-close").await.unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply after half-close");
        task.await.unwrap();
    }

    /// Issue 11: a silent client held its connection (and the app's) forever.
    #[tokio::test(start_paused = true)]
    async fn a_connection_idle_for_the_timeout_is_closed_and_a_busy_one_is_not() {
        let idle = Idle {
            timeout: Some(Duration::from_secs(3600)),
            closed: Counter::default(),
        };
        let (proxy_client, mut client) = tokio::io::duplex(1024);
        let (proxy_upstream, mut server) = tokio::io::duplex(1024);
        let i = idle.clone();
        let task = tokio::spawn(async move { forward(proxy_client, proxy_upstream, &i).await });
        // A byte every 50 minutes keeps it open for hours.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(50 * 60)).await;
            client.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            server.read_exact(&mut b).await.unwrap();
        }
        assert!(!task.is_finished());
        assert_eq!(idle.closed.get(), 0);
        // Then an hour of silence closes both sides.
        tokio::time::sleep(Duration::from_secs(3601)).await;
        task.await.unwrap();
        assert_eq!(idle.closed.get(), 1);
        let mut rest = Vec::new();
        assert_eq!(
            client.read_to_end(&mut rest).await.unwrap(),
            0,
            "client sees EOF"
        );
        assert_eq!(
            server.read_to_end(&mut rest).await.unwrap(),
            0,
            "server sees EOF"
        );
    }
}
