//! The HBONE client: a pool of mutual-TLS HTTP/2 connections, each multiplexing many `CONNECT` tunnels.
//!
//! Connections are pooled per [`PoolKey`] (source workload, destination identity, destination address).
//! A caller gets a stream on an existing connection with spare capacity; otherwise it dials one, and callers
//! arriving meanwhile for the same key wait for that handshake and share its connection instead of starting
//! their own. Connections idle longer than [`PoolConfig::idle_timeout`] are closed, broken ones are evicted.

mod conn;
mod tls_io;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::identity::Identity;
use crate::record;
use crate::server::{
    CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, SEND_BUFFER, STREAM_WINDOW, TLS_SEND_BUFFER, Transferred,
};
use crate::stream::H2Stream;
use crate::tls::{ALPN_H2, TlsError};
use conn::{Conn, ConnState, Entry, StreamGuard};
use tls_io::TlsIo;

/// HTTP/2 PING interval on connections with live tunnels (dead peers are noticed within interval + timeout).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keepalive PING may go unanswered before the connection is considered broken.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of the connection pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Concurrent tunnels per TLS connection (values below 1 count as 1). Default 100.
    pub max_streams_per_connection: usize,
    /// A connection without tunnels for this long is closed. Default 60 s.
    pub idle_timeout: Duration,
    /// Upper bound on one [`Pool::connect`] call: waiting for another caller's handshake, dialing, TLS, HTTP/2
    /// and the `CONNECT` answer. Default 10 s.
    pub connect_timeout: Duration,
}

/// What connections are pooled by: tunnels with equal keys may share a TLS connection.
#[derive(Clone, Hash, Eq, PartialEq, Debug)]
pub struct PoolKey {
    /// The source workload's uid (its credential is what the connection presents).
    pub source: String,
    /// The identity the destination must present.
    pub destination: Identity,
    /// The destination's HBONE address (pod IP, port 15008).
    pub peer: SocketAddr,
}

/// The HBONE connection pool. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

/// One `CONNECT` tunnel: a byte stream to the target through the destination's HBONE server.
///
/// Shutting down the write half sends END_STREAM (the far side sees EOF); dropping the tunnel resets the
/// stream and frees its slot on the connection.
pub struct Tunnel {
    io: H2Stream,
    _stream: StreamGuard,
}

/// Why [`Pool::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server's policy denied the tunnel (401).
    #[error("HBONE peer denied the tunnel (401)")]
    Denied,
    /// The server could not connect to the target (503).
    #[error("HBONE peer could not reach the target (503)")]
    UpstreamRefused,
    /// The server rejected the request as malformed or not allowed (400).
    #[error("HBONE peer rejected the request (400)")]
    BadRequest,
    /// Any other non-200 status.
    #[error("HBONE peer answered status {0}")]
    Status(u16),
    /// The TLS handshake failed, peer certificate or identity checks included (the rustls error says which),
    /// or the peer refused our certificate.
    #[error("TLS with the HBONE peer failed")]
    Tls(#[source] rustls::Error),
    /// The client TLS configuration could not be built.
    #[error("cannot build the client TLS configuration")]
    TlsConfig(#[source] TlsError),
    /// Dialing the peer failed, or the connection broke during the TLS handshake.
    #[error("cannot connect to the HBONE peer")]
    Connect(#[source] io::Error),
    /// [`PoolConfig::connect_timeout`] elapsed.
    #[error("HBONE connect timed out")]
    Timeout,
    /// HTTP/2 failed (handshake, stream reset, connection closed).
    #[error("HTTP/2 with the HBONE peer failed")]
    Http(#[source] h2::Error),
}

// === impl PoolConfig ===

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

// === impl Pool ===

pub(crate) struct PoolInner {
    config: PoolConfig,
    entries: Mutex<HashMap<PoolKey, Arc<Entry>>>,
    /// Live TLS connections.
    live: AtomicUsize,
}

impl Pool {
    /// An empty pool.
    pub fn new(config: PoolConfig) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                config,
                entries: Mutex::default(),
                live: AtomicUsize::new(0),
            }),
        }
    }

    /// Opens a tunnel to `target` (ip:port, sent as `:authority`) through the HBONE server at `key.peer`.
    ///
    /// Reuses a pooled connection for `key` with a free stream; otherwise, unless another caller is already
    /// handshaking for `key` (then it waits and shares that connection), calls `tls` for the client
    /// configuration (see [`crate::tls::client_config`]; the server must present `key.destination`), `dial`
    /// for the TCP socket to `key.peer`, and handshakes TLS and HTTP/2. Succeeds only on a 200 answer.
    /// The tunnel's stream counts against the connection's cap until the [`Tunnel`] is dropped.
    ///
    /// A pooled connection that turns out to be broken before the request went out is evicted and the
    /// request retried on a fresh connection. The whole call is bounded by [`PoolConfig::connect_timeout`].
    pub async fn connect<F, Fut>(
        &self,
        key: PoolKey,
        tls: impl FnOnce() -> Result<Arc<rustls::ClientConfig>, TlsError>,
        dial: F,
        target: SocketAddr,
    ) -> Result<Tunnel, ConnectError>
    where
        F: FnOnce(SocketAddr) -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        let timeout = self.inner.config.connect_timeout;
        let result = tokio::time::timeout(timeout, self.connect_inner(&key, tls, dial, target))
            .await
            .unwrap_or(Err(ConnectError::Timeout));
        if result.is_err() {
            // Don't keep an empty entry for a destination we could not reach.
            self.inner.forget_if_unused(&key);
        }
        result
    }

    /// Live TLS connections (all keys).
    pub fn connection_count(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }

    async fn connect_inner<F, Fut>(
        &self,
        key: &PoolKey,
        tls: impl FnOnce() -> Result<Arc<rustls::ClientConfig>, TlsError>,
        dial: F,
        target: SocketAddr,
    ) -> Result<Tunnel, ConnectError>
    where
        F: FnOnce(SocketAddr) -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        let entry = self.inner.entry(key);
        let mut dialer = Some((tls, dial));
        let mut evicted = None;
        loop {
            let (conn, guard, reused) = match entry.reserve() {
                Some((conn, guard)) => (conn, guard, true),
                None => {
                    let _dialing = entry.dial.lock().await;
                    match (entry.reserve(), dialer.take()) {
                        (Some((conn, guard)), _) => (conn, guard, true),
                        (None, Some((tls, dial))) => {
                            let (conn, guard) = self.dial(key, &entry, tls, dial).await?;
                            (conn, guard, false)
                        }
                        // Unreachable: we only come round again after a pooled connection failed, and dialing
                        // happens at most once, right before the last attempt.
                        (None, None) => return Err(evicted.unwrap_or(ConnectError::Timeout)),
                    }
                }
            };
            match send_connect(&conn, target).await {
                Ok(io) => return Ok(Tunnel { io, _stream: guard }),
                Err(SendError::Unsent(e)) if reused && dialer.is_some() => {
                    tracing::debug!(error = %e, "evicting broken HBONE connection");
                    conn.state.close();
                    entry.remove(&conn.state);
                    evicted = Some(e);
                }
                Err(SendError::Unsent(e) | SendError::Failed(e)) => return Err(e),
            }
        }
    }

    /// Dials, handshakes TLS and HTTP/2, lists the connection under `key` and spawns its driver.
    async fn dial<F, Fut>(
        &self,
        key: &PoolKey,
        entry: &Arc<Entry>,
        tls: impl FnOnce() -> Result<Arc<rustls::ClientConfig>, TlsError>,
        dial: F,
    ) -> Result<(Arc<Conn>, StreamGuard), ConnectError>
    where
        F: FnOnce(SocketAddr) -> Fut,
        Fut: Future<Output = io::Result<TcpStream>>,
    {
        let config = tls().map_err(ConnectError::TlsConfig)?;
        let tcp = dial(key.peer).await.map_err(ConnectError::Connect)?;
        // Best effort: without TCP_NODELAY the tunnel still works, only with more latency.
        let _ = tcp.set_nodelay(true);
        let server_name = ServerName::IpAddress(key.peer.ip().into());
        let (stream, negotiated) = record::connect(config, server_name, tcp, TLS_SEND_BUFFER)
            .await
            .map_err(handshake_error)?;
        if negotiated.alpn.as_deref() != Some(ALPN_H2) {
            return Err(ConnectError::Tls(rustls::Error::NoApplicationProtocol));
        }
        let (io, tls_error) = TlsIo::new(stream);
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_send_buffer_size(SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| classify(e, &tls_error))?;

        let config = &self.inner.config;
        let (state, guard) = ConnState::new_reserved(config.max_streams_per_connection);
        let conn = Arc::new(Conn {
            sender,
            state: state.clone(),
            tls_error,
        });
        entry.push(conn.clone());
        self.inner.live.fetch_add(1, Ordering::AcqRel);
        let span = tracing::debug_span!(
            "hbone_outbound_conn",
            dst.addr = %key.peer,
            dst.identity = %key.destination,
        );
        tokio::spawn(
            conn::drive(
                connection,
                state,
                Arc::downgrade(entry),
                Arc::downgrade(&self.inner),
                key.clone(),
                config.idle_timeout,
            )
            .instrument(span),
        );
        Ok((conn, guard))
    }
}

impl PoolInner {
    fn entries(&self) -> MutexGuard<'_, HashMap<PoolKey, Arc<Entry>>> {
        // Insert/remove only: a poisoned map is still consistent.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn entry(&self, key: &PoolKey) -> Arc<Entry> {
        let mut entries = self.entries();
        if let Some(entry) = entries.get(key) {
            return entry.clone();
        }
        entries.entry(key.clone()).or_default().clone()
    }

    /// Drops the entry for `key` when it has no connection and nobody is using it.
    fn forget_if_unused(&self, key: &PoolKey) {
        let mut entries = self.entries();
        if let Some(entry) = entries.get(key)
            && Arc::strong_count(entry) == 1
            && entry.is_empty()
        {
            entries.remove(key);
        }
    }
}

// === impl Tunnel ===

impl Tunnel {
    /// Moves bytes both ways between `io` (the application's connection) and the tunnel until both
    /// directions have finished, propagating half-closes, without copying them through an intermediate
    /// byte stream. `sent` counts bytes from `io` into the tunnel.
    pub async fn splice<T>(&mut self, io: &mut T) -> io::Result<Transferred>
    where
        T: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let (sent, received) = self.io.splice(io).await?;
        Ok(Transferred { sent, received })
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").finish_non_exhaustive()
    }
}

// === impl ConnectError ===

impl ConnectError {
    /// A short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Denied => "denied",
            ConnectError::UpstreamRefused => "upstream_refused",
            ConnectError::BadRequest => "bad_request",
            ConnectError::Status(_) => "status",
            ConnectError::Tls(_) => "tls",
            ConnectError::TlsConfig(_) => "tls_config",
            ConnectError::Connect(_) => "connect",
            ConnectError::Timeout => "timeout",
            ConnectError::Http(_) => "http",
        }
    }

    fn from_status(status: StatusCode) -> Self {
        match status {
            StatusCode::UNAUTHORIZED => ConnectError::Denied,
            StatusCode::SERVICE_UNAVAILABLE => ConnectError::UpstreamRefused,
            StatusCode::BAD_REQUEST => ConnectError::BadRequest,
            other => ConnectError::Status(other.as_u16()),
        }
    }
}

// === helpers ===

enum SendError {
    /// The request never left: safe to retry on another connection.
    Unsent(ConnectError),
    Failed(ConnectError),
}

/// Sends `CONNECT target` on `conn` and, on 200, takes over the stream.
async fn send_connect(conn: &Conn, target: SocketAddr) -> Result<H2Stream, SendError> {
    let classify = |e| classify(e, &conn.tls_error);
    // Until the request is on the wire (the connection takes a new stream, the stream is opened, or the peer
    // refuses it unprocessed), another connection may be tried.
    let mut sender = conn
        .sender
        .clone()
        .ready()
        .await
        .map_err(|e| SendError::Unsent(classify(e)))?;
    let (response, send) = sender
        .send_request(connect_request(target), false)
        .map_err(|e| SendError::Unsent(classify(e)))?;
    let response = response.await.map_err(|e| match e.reason() {
        Some(h2::Reason::REFUSED_STREAM) => SendError::Unsent(classify(e)),
        _ => SendError::Failed(classify(e)),
    })?;
    if response.status() != StatusCode::OK {
        return Err(SendError::Failed(ConnectError::from_status(response.status())));
    }
    Ok(H2Stream::new(send, response.into_body()))
}

fn connect_request(target: SocketAddr) -> http::Request<()> {
    // Invariant: a SocketAddr's Display ("ip:port", "[ipv6]:port", "[ipv6%scope]:port") is always a valid
    // URI authority, so neither the URI nor the request can fail to build.
    let uri = Uri::try_from(target.to_string()).expect("ip:port is a valid authority");
    let mut req = http::Request::new(());
    *req.method_mut() = Method::CONNECT;
    *req.uri_mut() = uri;
    req
}

/// A TLS handshake failure: the rustls error when there is one (certificate refused, alert received),
/// otherwise the I/O error.
fn handshake_error(e: io::Error) -> ConnectError {
    match tls_cause(&e) {
        Some(tls) => ConnectError::Tls(tls.clone()),
        None => ConnectError::Connect(e),
    }
}

/// An HTTP/2 failure, or the TLS failure underneath it: the first one the connection's [`TlsIo`] recorded, or
/// one in `e`'s cause chain (with TLS 1.3 the server refuses a client certificate only after the client's
/// handshake finished, so the refusal surfaces on the first request).
fn classify(e: h2::Error, tls_error: &tls_io::TlsErrorSlot) -> ConnectError {
    match tls_error.get().or_else(|| tls_cause(&e)) {
        Some(tls) => ConnectError::Tls(tls.clone()),
        None => ConnectError::Http(e),
    }
}

/// The rustls error in `e`'s cause chain. `io::Error::source` skips the error it wraps, so look inside
/// every `io::Error` too.
fn tls_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = err
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = err.source();
    }
    None
}
