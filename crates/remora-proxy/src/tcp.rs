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
    let Some(timeout) = idle.timeout else {
        let (mut client, mut upstream) = (client, upstream);
        return report(tokio::io::copy_bidirectional(&mut client, &mut upstream).await);
    };
    let clock = Clock {
        base: Instant::now(),
        last: Arc::new(AtomicU64::new(0)),
    };
    let mut client = Active {
        io: client,
        clock: clock.clone(),
    };
    let mut upstream = Active {
        io: upstream,
        clock: clock.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let deadline = clock.last_activity() + timeout;
        tokio::select! {
            r = &mut copy => return report(r),
            _ = tokio::time::sleep_until(deadline) => {
                if clock.last_activity() + timeout <= Instant::now() {
                    idle.closed.inc();
                    return debug!(?timeout, "TCP stream idle: closed");
                }
            }
        }
    }
}

/// Copies between two plain TCP sockets with `splice(2)`: each direction moves bytes
/// from one socket into a pipe and from the pipe into the other socket, inside the
/// kernel, with no copy through the proxy's memory and no user-space buffer. Used when
/// neither side is TLS (passthrough, and plaintext inbound); the rest of [`forward`]'s
/// contract holds: half-close passed on, idle timeout, byte counts.
async fn splice(
    client: &TcpStream,
    upstream: &TcpStream,
    read: &Counter,
    written: &Counter,
    idle: &Idle,
) -> io::Result<(u64, u64)> {
    let clock = Clock {
        base: Instant::now(),
        last: Arc::new(AtomicU64::new(0)),
    };
    let up = splice_one_way(client, upstream, read, &clock);
    let down = splice_one_way(upstream, client, written, &clock);
    let both = async { tokio::try_join!(up, down) };
    tokio::pin!(both);
    let Some(timeout) = idle.timeout else {
        return both.await;
    };
    loop {
        let deadline = clock.last_activity() + timeout;
        tokio::select! {
            r = &mut both => return r,
            _ = tokio::time::sleep_until(deadline) => {
                if clock.last_activity() + timeout <= Instant::now() {
                    idle.closed.inc();
                    debug!(?timeout, "TCP stream idle: closed");
                    return Ok((read.get(), written.get()));
                }
            }
        }
    }
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
    report(splice(&client, &upstream, &read, &written, idle).await)
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
