//! The detection race. Detection waits for the client's first bytes, but a
//! server-speaks-first protocol (SMTP, MySQL, …) has a client that waits for the
//! server: so the upstream connection is made at the same time, and if the server
//! speaks (or closes) before the client has said anything conclusive, the connection
//! is opaque at once.

use std::{future::Future, io, pin::Pin, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{Verdict, classify};
use crate::{
    connect::{Conn, ConnectError},
    metrics::DetectResult,
};

/// The outcome of the race.
#[derive(Debug)]
pub struct Detection {
    pub result: DetectResult,
    /// What the client sent while detection read it: replayed before the rest.
    pub prefix: Bytes,
    /// The upstream connection, when it was made before detection ended. Otherwise
    /// the connect future passed in is still running.
    pub upstream: Option<Conn>,
}

/// Why the race ended without a result.
#[derive(Debug, thiserror::Error)]
pub enum RaceError {
    #[error("reading from the client failed: {0}")]
    Client(io::Error),
    #[error(transparent)]
    Connect(ConnectError),
}

enum Step {
    Read(io::Result<usize>),
    Connected(Result<Conn, ConnectError>),
    ServerSpoke,
    Timeout,
}

/// Reads the client's first bytes until they are conclusive, while `connecting` runs;
/// ends early when the server speaks first, when the client closes, or after `timeout`.
pub async fn race<C: AsyncRead + Unpin>(
    client: &mut C,
    mut connecting: Pin<&mut (impl Future<Output = Result<Conn, ConnectError>> + ?Sized)>,
    timeout: Duration,
) -> Result<Detection, RaceError> {
    let mut buf = BytesMut::with_capacity(1024);
    let mut upstream: Option<Conn> = None;
    // Once the client has begun to speak, a server that speaks too is no reason to stop
    // listening: only a client that waits for the server makes the connection opaque.
    let mut watch_server = true;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let result = loop {
        let step = {
            let server_spoke = async {
                match &upstream {
                    // Readable without consuming: the server's bytes stay in the socket.
                    Some(s) if watch_server => drop(s.readable().await),
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                r = client.read_buf(&mut buf) => Step::Read(r),
                r = connecting.as_mut(), if upstream.is_none() => Step::Connected(r),
                _ = server_spoke => Step::ServerSpoke,
                _ = &mut deadline => Step::Timeout,
            }
        };
        match step {
            Step::Read(Ok(0)) => break DetectResult::ClientClosed,
            Step::Read(Ok(_)) => match classify(&buf) {
                Verdict::NeedMore => {}
                Verdict::Http1 => break DetectResult::Http1,
                Verdict::Http2 => break DetectResult::Http2,
                Verdict::Tls => break DetectResult::Tls,
                Verdict::Opaque => break DetectResult::Opaque,
            },
            Step::Read(Err(e)) => return Err(RaceError::Client(e)),
            Step::Connected(Ok(s)) => upstream = Some(s),
            Step::Connected(Err(e)) => return Err(RaceError::Connect(e)),
            Step::ServerSpoke if buf.is_empty() => break DetectResult::ServerFirst,
            Step::ServerSpoke => watch_server = false,
            Step::Timeout => break DetectResult::Timeout,
        }
    };
    Ok(Detection {
        result,
        prefix: buf.freeze(),
        upstream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addr::OrigDst, connect::connect, detect::H2_PREFACE};
    use tokio::{io::AsyncWriteExt, net::TcpListener};

    async fn plain(addr: OrigDst) -> Result<Conn, ConnectError> {
        connect(addr, Duration::from_secs(5)).await.map(Conn::Plain)
    }

    /// A real upstream on loopback; `greeting` is sent on accept when set.
    async fn upstream(greeting: Option<&'static [u8]>) -> OrigDst {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = OrigDst(listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            if let Some(g) = greeting {
                s.write_all(g).await.unwrap();
            }
            // Hold the connection open until the test ends.
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        });
        addr
    }

    async fn run(client_sends: &[u8], close: bool, greeting: Option<&'static [u8]>) -> Detection {
        let addr = upstream(greeting).await;
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        theirs.write_all(client_sends).await.unwrap();
        if close {
            theirs.shutdown().await.unwrap();
        }
        let connecting = plain(addr);
        tokio::pin!(connecting);
        let d = race(&mut ours, connecting, Duration::from_secs(30))
            .await
            .unwrap();
        drop(theirs);
        d
    }

    #[tokio::test]
    async fn http_requests_are_recognised_and_kept_for_replay() {
        let d = run(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n", false, None).await;
        assert_eq!(d.result, DetectResult::Http1);
        assert_eq!(&d.prefix[..], b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n");
        assert_eq!(
            run(H2_PREFACE, false, None).await.result,
            DetectResult::Http2
        );
    }

    #[tokio::test]
    async fn garbage_is_opaque() {
        let d = run(b"\x00\xff\x13garbage", false, None).await;
        assert_eq!(d.result, DetectResult::Opaque);
        assert_eq!(&d.prefix[..], b"\x00\xff\x13garbage");
    }

    #[tokio::test]
    async fn a_partial_preface_then_close_keeps_its_bytes() {
        let d = run(&H2_PREFACE[..10], true, None).await;
        assert_eq!(d.result, DetectResult::ClientClosed);
        assert_eq!(&d.prefix[..], &H2_PREFACE[..10]);
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_and_closes() {
        let d = run(b"", true, None).await;
        assert_eq!(d.result, DetectResult::ClientClosed);
        assert!(d.prefix.is_empty());
    }

    #[tokio::test]
    async fn a_server_that_speaks_first_ends_detection_and_its_bytes_stay_unread() {
        let d = run(b"", false, Some(b"220 hello\r\n")).await;
        assert_eq!(d.result, DetectResult::ServerFirst);
        let mut upstream = d.upstream.expect("connected");
        let mut greeting = [0u8; 11];
        upstream.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"220 hello\r\n");
    }

    #[tokio::test]
    async fn a_client_that_has_begun_to_speak_is_heard_out_though_the_server_greets() {
        let addr = upstream(Some(b"220 hello\r\n")).await;
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        // The first half of a ClientHello split over two records.
        theirs
            .write_all(b"\x16\x03\x01\x00\x02\x01\x00")
            .await
            .unwrap();
        let connecting = plain(addr);
        tokio::pin!(connecting);
        let race = race(&mut ours, connecting, Duration::from_secs(30));
        let rest = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            theirs
                .write_all(b"\x16\x03\x01\x00\x02\x00\x00")
                .await
                .unwrap();
            theirs
        };
        let (d, _theirs) = tokio::join!(race, rest);
        let d = d.unwrap();
        assert_eq!(d.result, DetectResult::Tls);
        assert_eq!(d.prefix.len(), 14);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_on_both_sides_times_out() {
        let (mut ours, _theirs) = tokio::io::duplex(64);
        let connecting = std::future::pending::<Result<Conn, ConnectError>>();
        tokio::pin!(connecting);
        let d = race(&mut ours, connecting, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(d.result, DetectResult::Timeout);
    }

    #[tokio::test]
    async fn an_unreachable_destination_is_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = OrigDst(listener.local_addr().unwrap());
        drop(listener);
        let (mut ours, _theirs) = tokio::io::duplex(64);
        let connecting = plain(addr);
        tokio::pin!(connecting);
        let err = race(&mut ours, connecting, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RaceError::Connect(ConnectError::Io { .. })),
            "{err}"
        );
    }
}
