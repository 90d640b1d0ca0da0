//! Socket reads batched under TLS.
//!
//! rustls asks its transport for at most one TLS record (about 16 KiB) at a time, so a bulk flow cost the
//! receiving agent one `recvfrom` per record. [`BatchedReads`] reads up to a frame's worth (256 KiB) at once
//! into the worker thread's read buffer and hands rustls its records from memory. An idle connection holds
//! nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stream::{READ_CHUNK as BATCH, advance, poll_read_shared};

/// A transport whose reads are batched; writes pass straight through.
pub(crate) struct BatchedReads<T> {
    io: T,
    /// Read from `io`, not yet taken by the reader.
    pending: Bytes,
}

impl<T> BatchedReads<T> {
    pub(crate) fn new(io: T) -> Self {
        Self {
            io,
            pending: Bytes::new(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchedReads<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, dst: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            if dst.remaining() >= BATCH {
                return Pin::new(&mut this.io).poll_read(cx, dst);
            }
            // Empty at EOF: the caller sees EOF as well.
            this.pending = ready!(poll_read_shared(cx, &mut this.io, BATCH))?;
        }
        let n = this.pending.len().min(dst.remaining());
        dst.put_slice(&this.pending[..n]);
        advance(&mut this.pending, n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchedReads<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Small reads from a batched transport see every byte in order, and the batch empties.
    #[tokio::test]
    async fn small_reads_see_every_byte_in_order() {
        let (mut writer, reader) = duplex(1 << 20);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let feeder = tokio::spawn(async move {
            writer.write_all(&sent).await.unwrap();
        });
        let mut batched = BatchedReads::new(reader);
        let mut got = Vec::new();
        let mut chunk = [0u8; 5000];
        while got.len() < data.len() {
            let n = batched.read(&mut chunk).await.unwrap();
            assert!(n > 0, "early EOF at {}", got.len());
            got.extend_from_slice(&chunk[..n]);
        }
        feeder.await.unwrap();
        assert!(got == data, "bytes were reordered or lost");
        assert!(batched.pending.is_empty(), "a drained transport holds no bytes");
        let n = batched.read(&mut chunk).await.unwrap();
        assert_eq!(n, 0, "EOF after the writer is gone");
    }
}
