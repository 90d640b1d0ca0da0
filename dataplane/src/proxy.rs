//! Moving bytes between two connections.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, copy_bidirectional_with_sizes};

/// Bytes moved by [`copy`], each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Downstream (the connecting side) to upstream.
    pub sent: u64,
    /// Upstream to downstream.
    pub received: u64,
}

const BUFFER: usize = 64 * 1024;

/// Copies both ways until both sides have finished, propagating half-closes.
pub async fn copy<A, B>(downstream: &mut A, upstream: &mut B) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (sent, received) = copy_bidirectional_with_sizes(downstream, upstream, BUFFER, BUFFER).await?;
    Ok(Transferred { sent, received })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test]
    async fn copies_both_ways_and_counts_bytes() {
        let (mut client, mut down) = duplex(1024);
        let (mut up, mut server) = duplex(1024);
        let proxy = tokio::spawn(async move { copy(&mut down, &mut up).await });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        server.write_all(b"world!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        let t = proxy.await.unwrap().unwrap();
        assert_eq!(t, Transferred { sent: 5, received: 6 });
    }
}
