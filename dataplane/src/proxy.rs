//! Moving bytes between two connections.
//!
//! An idle proxied connection holds no buffer. Each read goes into the worker thread's read buffer
//! (one per thread, not per connection, shared with the HBONE tunnels through [`poll_read_shared`])
//! and is written on at once; only bytes the writer cannot take yet are copied into a buffer the
//! connection owns, and that buffer is freed as soon as it has drained. A bulk flow therefore reads
//! in large chunks, while 10,000 idle connections cost their sockets and tasks, not 10,000 pairs of
//! buffers.

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// Bytes moved by [`copy`], each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Downstream (the connecting side) to upstream.
    pub sent: u64,
    /// Upstream to downstream.
    pub received: u64,
}

/// The most one read takes: large enough for TLS records and HTTP/2 frames of a bulk flow.
pub const READ_CHUNK: usize = 256 * 1024;

thread_local! {
    /// Reads land here and leave as frozen [`Bytes`] sharing its allocation; an idle connection holds none.
    static READ_BUF: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Reads up to `max` bytes from `io` into the worker thread's read buffer and returns them as [`Bytes`]
/// sharing its allocation (empty at EOF).
pub fn poll_read_shared<R>(cx: &mut Context<'_>, io: &mut R, max: usize) -> Poll<io::Result<Bytes>>
where
    R: AsyncRead + Unpin + ?Sized,
{
    READ_BUF.with_borrow_mut(|buf| {
        // Reuses the buffer from its start once every earlier read has been sent on (a fresh one
        // otherwise), so small reads keep landing in the same page instead of walking 256 KiB of it.
        buf.reserve(READ_CHUNK.max(max));
        let mut limited = (&mut *buf).limit(max);
        ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut limited))?;
        let read = buf.split().freeze();
        // Nothing read (EOF) must not keep a reference to the buffer either.
        Poll::Ready(Ok(if read.is_empty() { Bytes::new() } else { read }))
    })
}

/// Consumes `n` bytes of `bytes`; once it is empty, drops its reference to the allocation it was sliced
/// from (the worker's read buffer, or h2's receive buffer), so an idle connection holds none.
pub fn advance(bytes: &mut Bytes, n: usize) {
    bytes.advance(n);
    if bytes.is_empty() {
        *bytes = Bytes::new();
    }
}

/// Copies both ways until both sides have finished, propagating half-closes.
pub async fn copy<A, B>(downstream: &mut A, upstream: &mut B) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut out = Direction::default();
    let mut back = Direction::default();
    poll_fn(|cx| {
        let sent = out.poll(cx, downstream, upstream)?;
        let received = back.poll(cx, upstream, downstream)?;
        match (sent, received) {
            (Poll::Ready(sent), Poll::Ready(received)) => Poll::Ready(Ok(Transferred { sent, received })),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction of [`copy`].
#[derive(Default)]
struct Direction {
    /// Read but not yet written: only while the writer pushes back.
    pending: Vec<u8>,
    written: usize,
    moved: u64,
    /// The writer has data it may buffer (a TLS or HTTP/2 stream): flush before waiting to read.
    unflushed: bool,
    eof: bool,
    done: bool,
}

impl Direction {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.moved));
            }
            // Bytes left over from a write that was pushed back go first.
            while self.written < self.pending.len() {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.pending[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.moved += n as u64;
                self.unflushed = true;
            }
            if !self.pending.is_empty() {
                // Drained: the connection goes back to holding nothing.
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.eof {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let read = poll_read_shared(cx, &mut *reader, READ_CHUNK).map(|read| {
                let filled = read?;
                if filled.is_empty() {
                    self.eof = true;
                    return Ok(());
                }
                let mut at = 0;
                while at < filled.len() {
                    match Pin::new(&mut *writer).poll_write(cx, &filled[at..]) {
                        Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                        Poll::Ready(Ok(n)) => at += n,
                        Poll::Ready(Err(e)) => return Err(e),
                        // The writer woke us when it has room; keep the rest till then.
                        Poll::Pending => break,
                    }
                }
                self.moved += at as u64;
                self.unflushed = true;
                if at < filled.len() {
                    // Copied out, so the thread's read buffer is free again for every other connection.
                    self.pending = filled[at..].to_vec();
                    self.written = 0;
                }
                Ok(())
            });
            match read {
                Poll::Ready(result) => result?,
                Poll::Pending => {
                    // Nothing to read now: whatever the writer holds must go out before we wait.
                    if self.unflushed && Pin::new(&mut *writer).poll_flush(cx)?.is_ready() {
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
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

    /// A writer much slower than the reader: every byte still arrives, in order, and the leftover
    /// buffer is what carries it.
    #[tokio::test]
    async fn backpressure_keeps_every_byte_in_order() {
        // 64-byte pipes: almost every write of a large read is pushed back.
        let (mut client, mut down) = duplex(64 * 1024);
        let (mut up, mut server) = duplex(64);
        let proxy = tokio::spawn(async move { copy(&mut down, &mut up).await });
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes were reordered or lost");
        drop(server);
        drop(writer.await.unwrap());
        let t = proxy.await.unwrap().unwrap();
        assert_eq!(t.sent, data.len() as u64);
    }

    /// An idle connection holds no buffer of its own.
    #[tokio::test]
    async fn idle_connection_holds_no_buffer() {
        let (_client, mut down) = duplex(1024);
        let (mut up, _server) = duplex(1024);
        let mut d = Direction::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(d.poll(&mut cx, &mut down, &mut up).is_pending());
        assert_eq!(d.pending.capacity(), 0);
    }
}
