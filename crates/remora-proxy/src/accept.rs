//! Accepting: each listener's loop, the checks every accepted connection passes (it was
//! redirected, and has an original destination), and the protocol detection both sides
//! share. Then the connection belongs to its [`Side`]: [`crate::inbound`] or
//! [`crate::outbound`], each with its own context.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::OwnedSemaphorePermit,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    addr::{ClientAddr, OrigDst},
    connect::{Conn, ConnectError, orig_dst, reset},
    detect::{Detection, RaceError, race},
    io::CountingIo,
    metrics::{Direction, Metrics},
};

/// One direction of the proxy, as its listeners see it.
pub trait Side: Send + Sync + Sized + 'static {
    const DIRECTION: Direction;

    /// Cancelled when the side drains: its listeners stop, its connections finish.
    fn drain(&self) -> &CancellationToken;

    /// Every connection task of the side, so shutdown can wait for them.
    fn tracker(&self) -> &TaskTracker;

    /// Whether a new connection may be served.
    fn admit(&self, client: ClientAddr) -> Admit;

    /// Serves one accepted connection to `orig_dst`.
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        client: ClientAddr,
        orig_dst: OrigDst,
    ) -> impl Future<Output = ()> + Send;
}

/// A side's answer to a new connection.
#[derive(Debug)]
pub enum Admit {
    /// Served, holding the permit (if any) until it closes.
    Serve(Option<OwnedSemaphorePermit>),
    /// Reset at once.
    Refuse,
}

/// Accepts connections until the side drains.
pub async fn accept_loop<S: Side>(listener: TcpListener, side: Arc<S>) {
    let direction = S::DIRECTION;
    loop {
        let accepted = tokio::select! {
            _ = side.drain().cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, client)) => {
                let client = ClientAddr(client);
                let Admit::Serve(permit) = side.admit(client) else {
                    reset(&stream);
                    continue;
                };
                let side2 = side.clone();
                side.tracker().spawn(async move {
                    serve_connection(side2, stream, client).await;
                    drop(permit);
                });
            }
            Err(error) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(%error, direction = direction.as_str(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection<S: Side>(side: Arc<S>, stream: TcpStream, client: ClientAddr) {
    let direction = S::DIRECTION;
    let _ = stream.set_nodelay(true);
    let orig_dst = match orig_dst(&stream) {
        Ok(dst) if stream.local_addr().ok() != Some(dst.0) => dst,
        Ok(dst) => {
            // Not redirected by iptables: forwarding would connect back to ourselves.
            warn!(%client, %dst, direction = direction.as_str(),
                "refusing a connection made to the proxy's own port rather than redirected to it");
            reset(&stream);
            return;
        }
        Err(error) => {
            warn!(%client, %error, "refusing a connection without an original destination \
                (is conntrack available in this network namespace?)");
            reset(&stream);
            return;
        }
    };
    // `tls` and `peer` are recorded once known, so every log line of the connection
    // carries them.
    let span = info_span!(
        "conn",
        dir = direction.as_str(),
        client = %client,
        dst = %orig_dst,
        tls = tracing::field::Empty,
        peer = tracing::field::Empty,
    );
    Box::pin(side.serve(stream, client, orig_dst))
        .instrument(span)
        .await
}

/// What protocol detection needs and reports to.
#[derive(Debug, Clone)]
pub struct Detect {
    pub timeout: Duration,
    pub metrics: Metrics,
    pub direction: Direction,
}

impl Detect {
    /// Detects the protocol while `connecting` goes on (see [`race`]) and records it.
    /// None when the client went away (logged) or the connection ahead failed (the
    /// client is refused).
    pub async fn run(
        &self,
        io: &mut CountingIo<TcpStream>,
        connecting: std::pin::Pin<&mut (impl Future<Output = Result<Conn, ConnectError>> + ?Sized)>,
        start: Instant,
    ) -> Option<Detection> {
        match race(io, connecting, self.timeout).await {
            Ok(d) => {
                self.metrics
                    .detected(self.direction, d.result, start.elapsed());
                Some(d)
            }
            Err(RaceError::Client(error)) => {
                debug!(%error, "client connection failed during detection");
                None
            }
            Err(RaceError::Connect(error)) => {
                refuse(io.get_ref(), &error);
                None
            }
        }
    }
}

/// The destination cannot be reached: the client sees a reset, as if it had been refused.
pub fn refuse(client: &TcpStream, error: &ConnectError) {
    info!(%error, "closing the client connection: its destination is unreachable");
    reset(client);
}
