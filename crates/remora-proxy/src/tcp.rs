//! Opaque TCP: copies bytes both ways, passing on each side's half-close, and closes a
//! connection that carries nothing either way for the idle timeout.

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
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};
use tracing::debug;

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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
