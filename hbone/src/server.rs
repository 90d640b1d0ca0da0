//! The HBONE server: terminates mutual TLS, serves HTTP/2, validates each `CONNECT` request and hands it to a
//! [`Handler`], which authorizes it and connects to the application; then copies bytes both ways.
//!
//! Status codes (ztunnel-compatible): 200 only after the handler connected to the application; 400 for a
//! request that is not a `CONNECT` to an allowed `ip:port`; 401 / 400 / 503 for the handler's
//! [`Refusal`]s.

mod connect;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::identity::Identity;
use crate::tls::{ALPN_H2, peer_identity};

pub use connect::{BadRequest, FORBIDDEN_PORTS, parse_connect};

/// How long a client gets to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum concurrent `CONNECT` streams per client connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// HTTP/2 flow-control window per stream (tunnel-sized).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 flow-control window per connection.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame payload we accept. A frame is decoded whole, so the connection's read
/// buffer grows to this size under a bulk flow and keeps it while the pooled connection lives: 64 KiB
/// frames (four TLS records each) keep that small at no measurable cost in throughput.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Bytes one stream may queue for sending before its writer is pushed back.
pub const SEND_BUFFER: usize = 256 * 1024;

/// One validated `CONNECT` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// TCP peer of the TLS connection.
    pub peer: SocketAddr,
    /// The client's verified identity.
    pub identity: Identity,
    /// The `ip:port` the client asked to reach.
    pub target: SocketAddr,
}

/// Why a [`Handler`] refuses a request; each maps to an HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Authorization policy denies it: 401.
    #[error("denied by authorization policy")]
    Denied,
    /// The target is not one this server forwards to: 400.
    #[error("target not allowed")]
    Forbidden,
    /// The application could not be reached: 503.
    #[error("upstream unreachable")]
    Unreachable,
}

/// Bytes copied through one tunnel: `sent` from the client to the application, `received` back.
pub use weft_dataplane::proxy::Transferred;

/// What the server asks of its embedder for each valid `CONNECT` request.
pub trait Handler: Send + Sync + 'static {
    /// Per-tunnel state handed from [`Handler::open`] to [`Handler::closed`] (e.g. an access-log guard).
    type Session: Send + 'static;

    /// Authorizes `req` and connects to the application. The server answers 200 only when this returns
    /// `Ok`, otherwise the [`Refusal`]'s status.
    ///
    /// If the client goes away while this is pending, the future is dropped and [`Handler::closed`] is not
    /// called (no session exists yet).
    fn open(&self, req: &Request) -> impl Future<Output = (Self::Session, Result<TcpStream, Refusal>)> + Send;

    /// Called exactly once for every session `open` returned:
    /// - after a refusal, with an `Err` of [`io::ErrorKind::PermissionDenied`] (Denied),
    ///   [`io::ErrorKind::InvalidInput`] (Forbidden) or [`io::ErrorKind::ConnectionRefused`] (Unreachable)
    ///   whose inner error is the [`Refusal`];
    /// - after a tunnel ends, with the bytes copied when both directions closed cleanly, or the I/O error that
    ///   ended it (the upgrade failing included).
    fn closed(&self, session: Self::Session, result: Result<Transferred, io::Error>);
}

/// Why a client connection could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The accepted socket has no peer address (it is already gone).
    #[error("cannot read the peer address")]
    PeerAddr {
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake did not finish in time.
    #[error("TLS handshake timed out after {after:?}")]
    HandshakeTimeout {
        /// The limit.
        after: Duration,
    },
    /// The TLS handshake failed (bad client certificate included: the inner error is the rustls error).
    #[error("TLS handshake failed")]
    Handshake {
        /// The handshake error.
        #[source]
        source: io::Error,
    },
    /// The client did not negotiate ALPN `h2`.
    #[error("client did not negotiate ALPN h2 (negotiated {negotiated:?})")]
    Alpn {
        /// What was negotiated, lossily decoded.
        negotiated: Option<String>,
    },
    /// The connection is not TLS 1.3.
    #[error("connection is not TLS 1.3")]
    Version,
    /// The verified client certificate carries no SPIFFE id (cannot happen with [`crate::tls::server_config`]).
    #[error("client presented no SPIFFE identity")]
    NoIdentity,
    /// The HTTP/2 connection failed.
    #[error("HTTP/2 connection failed")]
    Http {
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
}

/// Serves one accepted TCP connection until the client closes it: TLS handshake (with `tls`, normally from
/// [`crate::tls::server_config`]), ALPN/version/identity checks, then HTTP/2 `CONNECT` streams handed to
/// `handler`.
///
/// A client failing any TLS check never reaches the handler. Returns when the HTTP/2 connection ends; tunnels
/// still copying at that point end with it.
pub async fn serve<H: Handler>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
) -> Result<(), ServeError> {
    let peer = tcp.peer_addr().map_err(|source| ServeError::PeerAddr { source })?;
    // Best effort: a socket that refuses TCP_NODELAY still works, only with more latency.
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| ServeError::HandshakeTimeout {
            after: HANDSHAKE_TIMEOUT,
        })?
        .map_err(|source| ServeError::Handshake { source })?;
    let conn = stream.get_ref().1;
    if conn.alpn_protocol() != Some(ALPN_H2) {
        return Err(ServeError::Alpn {
            negotiated: conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
        });
    }
    if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Err(ServeError::Version);
    }
    let identity = peer_identity(conn).ok_or(ServeError::NoIdentity)?;

    let ctx = Arc::new(Connection {
        peer,
        identity,
        handler,
    });
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buf_size(SEND_BUFFER)
        .auto_date_header(false)
        .serve_connection(TokioIo::new(stream), service)
        .await
        .map_err(|source| ServeError::Http { source })
}

// === impl Refusal ===

impl Refusal {
    /// The HTTP status this refusal is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Denied => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden => StatusCode::BAD_REQUEST,
            Refusal::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn io_kind(self) -> io::ErrorKind {
        match self {
            Refusal::Denied => io::ErrorKind::PermissionDenied,
            Refusal::Forbidden => io::ErrorKind::InvalidInput,
            Refusal::Unreachable => io::ErrorKind::ConnectionRefused,
        }
    }
}

// === impl Connection ===

/// What every stream of one client connection shares.
struct Connection<H> {
    peer: SocketAddr,
    identity: Identity,
    handler: Arc<H>,
}

impl<H: Handler> Connection<H> {
    async fn handle(&self, mut req: http::Request<Incoming>) -> Response<Empty<Bytes>> {
        let target = match parse_connect(req.method(), req.uri()) {
            Ok(target) => target,
            Err(error) => {
                tracing::debug!(src.addr = %self.peer, src.identity = %self.identity, %error, "bad HBONE request");
                return status(StatusCode::BAD_REQUEST);
            }
        };
        let request = Request {
            peer: self.peer,
            identity: self.identity.clone(),
            target,
        };
        let (session, result) = self.handler.open(&request).await;
        let mut upstream = match result {
            Ok(upstream) => upstream,
            Err(refusal) => {
                self.handler
                    .closed(session, Err(io::Error::new(refusal.io_kind(), refusal)));
                return status(refusal.status());
            }
        };
        // Best effort, as for the client side of the tunnel.
        let _ = upstream.set_nodelay(true);
        let on_upgrade = hyper::upgrade::on(&mut req);
        let handler = self.handler.clone();
        let span = tracing::debug_span!(
            "hbone_inbound",
            src.addr = %request.peer,
            src.identity = %request.identity,
            dst.addr = %request.target,
        );
        tokio::spawn(
            async move {
                let result = match on_upgrade.await {
                    Ok(upgraded) => weft_dataplane::proxy::copy(&mut TokioIo::new(upgraded), &mut upstream).await,
                    Err(e) => Err(io::Error::other(e)),
                };
                handler.closed(session, result);
            }
            .instrument(span),
        );
        status(StatusCode::OK)
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut rsp = Response::new(Empty::new());
    *rsp.status_mut() = code;
    rsp
}
