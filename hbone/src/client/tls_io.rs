//! The client's TLS stream with a memory of the first TLS error on it.
//!
//! With TLS 1.3 the server judges the client certificate after the client's handshake has finished, so a
//! refusal (a fatal alert) arrives on the first read, inside hyper. hyper's HTTP/2 layer keeps only the text
//! of I/O errors, so the rustls error is recorded here, where it is still typed.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::record::TlsStream;

use super::tls_cause;

/// The first TLS error seen on one connection.
pub(super) type TlsErrorSlot = Arc<OnceLock<rustls::Error>>;

pub(super) struct TlsIo {
    inner: TlsStream,
    error: TlsErrorSlot,
}

impl TlsIo {
    pub(super) fn new(inner: TlsStream) -> (Self, TlsErrorSlot) {
        let error = TlsErrorSlot::default();
        (
            Self {
                inner,
                error: error.clone(),
            },
            error,
        )
    }

    fn record<T>(&self, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &poll
            && let Some(tls) = tls_cause(e)
        {
            let _ = self.error.set(tls.clone());
        }
        poll
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.record(poll)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.record(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.record(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.record(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.record(poll)
    }
}
