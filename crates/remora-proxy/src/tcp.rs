//! Opaque TCP: copies bytes both ways, passing on each side's half-close.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// Copies between the client and the upstream until both directions are done.
pub async fn forward<C, U>(mut client: C, mut upstream: U)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => debug!(sent, received, "TCP stream closed"),
        Err(error) => debug!(%error, "TCP stream failed"),
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
        let task = tokio::spawn(forward(proxy_client, proxy_upstream));
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
}
