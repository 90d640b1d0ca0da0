//! One tunnel's HTTP/2 stream, driven through h2 directly.
//!
//! hyper's upgraded `CONNECT` stream copies every write into a fresh buffer, hands it to a task of its
//! own through a channel, and copies every read out of h2's buffer: two extra copies of every byte and
//! an extra task wake-up per write on each agent. A tunnel here moves [`Bytes`] instead. [`splice`] reads
//! the TCP side into the worker thread's read buffer and gives h2 those bytes as they are; DATA payloads
//! from h2 are written to the TCP side straight from h2's receive buffer.
//!
//! [`H2Stream`] is also an ordinary byte stream ([`AsyncRead`] + [`AsyncWrite`], copying) for callers that
//! want one.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
pub(crate) use weft_dataplane::proxy::{advance, poll_read_shared};

/// A DATA payload of exactly sixteen full TLS records (16 KiB of plaintext each). The record layer seals
/// the payload straight from h2's buffer, record by record, and the 9-byte frame header as a record of its
/// own (`crate::record`), so a payload of whole records is sixteen full records and one small one.
pub(crate) const FRAME_PAYLOAD: usize = 16 * 16 * 1024;

/// The most one read from the TCP side takes: one frame's worth.
pub(crate) const READ_CHUNK: usize = FRAME_PAYLOAD;

/// The two halves of one HTTP/2 stream carrying a tunnel.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read through [`AsyncRead`].
    buffered: Bytes,
    /// END_STREAM was sent.
    ended: bool,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            buffered: Bytes::new(),
            ended: false,
        }
    }

    /// Moves bytes both ways between `io` and this stream until both directions have finished, propagating
    /// half-closes (EOF on `io` sends END_STREAM; END_STREAM shuts `io`'s write side). Returns the bytes
    /// moved `(from io to the stream, from the stream to io)`.
    pub(crate) async fn splice<T>(&mut self, io: &mut T) -> io::Result<(u64, u64)>
    where
        T: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let mut out = ToStream {
            done: self.ended,
            ..ToStream::default()
        };
        let mut back = FromStream {
            pending: std::mem::take(&mut self.buffered),
            ..FromStream::default()
        };
        poll_fn(|cx| {
            let sent = out.poll(cx, io, &mut self.send)?;
            let received = back.poll(cx, io, &mut self.recv)?;
            match (sent, received) {
                (Poll::Ready(sent), Poll::Ready(received)) => Poll::Ready(Ok((sent, received))),
                _ => Poll::Pending,
            }
        })
        .await
    }
}

/// `io` to the HTTP/2 stream.
#[derive(Default)]
struct ToStream {
    moved: u64,
    eof: bool,
    done: bool,
}

impl ToStream {
    fn poll<R>(&mut self, cx: &mut Context<'_>, io: &mut R, send: &mut SendStream<Bytes>) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.moved));
            }
            if self.eof {
                send.send_data(Bytes::new(), true).map_err(send_error)?;
                self.done = true;
                continue;
            }
            // Room in the stream first, then the read, no more than the room: what is read goes to h2 at once
            // (and is sealed) while it is still in cache, and a stream the tunnel cannot take holds none of the
            // application's bytes. Reading ahead held a second chunk per stream and sealed it after the next
            // read had evicted it.
            let room = ready!(poll_send_capacity(cx, send, READ_CHUNK))?;
            let read = match poll_read_shared(cx, &mut *io, room.min(READ_CHUNK)) {
                Poll::Ready(read) => read?,
                Poll::Pending => {
                    // Idle: the window reserved for this stream goes back to the connection's other streams.
                    send.reserve_capacity(0);
                    return Poll::Pending;
                }
            };
            if read.is_empty() {
                self.eof = true;
                continue;
            }
            self.moved += read.len() as u64;
            send.send_data(read, false).map_err(send_error)?;
        }
    }
}

/// The HTTP/2 stream to `io`.
#[derive(Default)]
struct FromStream {
    /// A DATA payload (or its rest) not yet written to `io`.
    pending: Bytes,
    moved: u64,
    unflushed: bool,
    eof: bool,
    done: bool,
}

impl FromStream {
    fn poll<W>(&mut self, cx: &mut Context<'_>, io: &mut W, recv: &mut RecvStream) -> Poll<io::Result<u64>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.moved));
            }
            if !self.pending.is_empty() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                advance(&mut self.pending, n);
                self.moved += n as u64;
                self.unflushed = true;
                // Only bytes the application side took reopen the window: that is the backpressure.
                release(recv, n);
                continue;
            }
            if self.eof {
                ready!(Pin::new(&mut *io).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            match recv.poll_data(cx) {
                Poll::Pending => {
                    if self.unflushed && Pin::new(&mut *io).poll_flush(cx)?.is_ready() {
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => self.eof = true,
                Poll::Ready(Some(Ok(data))) => self.pending = data,
                Poll::Ready(Some(Err(e))) => match recv_error(e) {
                    Ok(()) => self.eof = true,
                    Err(e) => return Poll::Ready(Err(e)),
                },
            }
        }
    }
}

/// Waits until h2 grants send capacity for (up to) `want` bytes, and returns how much it granted.
fn poll_send_capacity(cx: &mut Context<'_>, send: &mut SendStream<Bytes>, want: usize) -> Poll<io::Result<usize>> {
    send.reserve_capacity(want);
    loop {
        // Capacity already granted counts even when h2 has nothing new to report.
        let capacity = send.capacity();
        if capacity > 0 {
            return Poll::Ready(Ok(capacity));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Poll::Ready(Err(send_error(e))),
            None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed"))),
        }
    }
}

/// Gives `n` received bytes back to the peer's flow-control window.
fn release(recv: &mut RecvStream, n: usize) {
    // Cannot fail: `n` bytes of this stream's data were received and not released yet.
    let _ = recv.flow_control().release_capacity(n);
}

/// A receive error as the application sees it: the peer cancelling or ending the stream without error is
/// an EOF (as with hyper's upgraded streams), anything else an I/O error.
fn recv_error(e: h2::Error) -> io::Result<()> {
    match e.reason() {
        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
        Some(Reason::STREAM_CLOSED) => Err(io::Error::new(io::ErrorKind::BrokenPipe, e)),
        _ => Err(h2_io_error(e)),
    }
}

fn send_error(e: h2::Error) -> io::Error {
    match e.reason() {
        Some(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => io::Error::new(io::ErrorKind::BrokenPipe, e),
        _ => h2_io_error(e),
    }
}

/// h2's I/O errors keep their kind; protocol errors become `io::ErrorKind::Other` with the h2 error inside.
fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

// === impl H2Stream as a byte stream ===

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.buffered.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    release(&mut this.recv, data.len());
                    this.buffered = data;
                }
                Some(Err(e)) => return Poll::Ready(recv_error(e)),
            }
        }
        let n = this.buffered.len().min(buf.remaining());
        buf.put_slice(&this.buffered[..n]);
        advance(&mut this.buffered, n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let granted = ready!(poll_send_capacity(cx, &mut self.send, buf.len()))?;
        let n = granted.min(buf.len());
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(send_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes whatever a stream queued; there is nothing to push from here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.send.send_data(Bytes::new(), true).map_err(send_error)?;
            self.ended = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream").finish_non_exhaustive()
    }
}
