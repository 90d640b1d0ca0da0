//! The HBONE server: terminates mutual TLS, serves HTTP/2, validates each `CONNECT` request and hands it to a
//! [`Handler`], which authorizes it and connects to the application; then copies bytes both ways.
//!
//! Status codes (ztunnel-compatible): 200 only after the handler connected to the application; 400 for a
//! request that is not a `CONNECT` to an allowed `ip:port`; 401 / 400 / 503 for the handler's
//! [`Refusal`]s.

mod admission;
mod connect;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Response, StatusCode};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tracing::Instrument;

use crate::identity::Identity;
use crate::record;
use crate::stream::H2Stream;
use crate::tls::ALPN_H2;

pub use admission::{Admission, AdmissionLimits, Admitted, Refused};
pub use connect::{BadRequest, FORBIDDEN_PORTS, parse_connect};

/// How long a client gets to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum concurrent `CONNECT` streams per client connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// HTTP/2 flow-control window per stream (tunnel-sized).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 flow-control window per connection.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame payload we accept. h2 writes one frame per TLS write, so a bulk flow costs one
/// `writev` (and on the far side one write to the application) per frame: 256 KiB frames (sixteen TLS
/// records) take four times fewer than 64 KiB ones. A frame is decoded whole, so a pooled connection's read
/// buffer grows to this size under a bulk flow.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Bytes one stream may queue for sending before its writer is pushed back.
pub const SEND_BUFFER: usize = 256 * 1024;
/// Encrypted bytes queued for the socket before a write is cut short: two frames' room lets whole frames
/// through (with 64 KiB, a frame's last bytes went out as a record, a `writev` and a TCP segment of their
/// own).
pub const TLS_SEND_BUFFER: usize = 2 * (MAX_FRAME_SIZE as usize + 1024);
/// Largest request or response header block accepted (a `CONNECT` needs a few dozen bytes).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Streams the client reset before we accepted them, at once; more is a rapid-reset attack and ends the
/// connection (h2's default, stated here as a bound we rely on).
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams we reset because the client broke the protocol; past this the connection ends with GOAWAY
/// `ENHANCE_YOUR_CALM`.
pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Reset streams whose late frames we still recognise; the oldest is forgotten past this.
pub const MAX_CONCURRENT_RESETS: usize = 50;

/// What one client connection may cost the server in time; every bound has a default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time to finish the TLS and HTTP/2 handshakes.
    pub handshake_timeout: Duration,
    /// A PING goes out this long after the last one was answered...
    pub keepalive_interval: Duration,
    /// ...and the connection is dropped, with all its tunnels, if the answer takes longer than this: a
    /// peer that vanished (no FIN, no RST) costs its connection only that long.
    pub keepalive_timeout: Duration,
    /// A connection that carried no tunnel for this long is shut down (GOAWAY).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            // Longer than the client pool's own idle timeout (60 s): normally the client closes first.
            idle_timeout: Duration::from_secs(300),
        }
    }
}

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

    /// Resolves when what allowed the open tunnels may have changed (a policy, the target's labels);
    /// the server then asks [`Handler::allowed`] about each open tunnel of each connection, and asks
    /// for the next `rechecks`. One is awaited per client connection, none per tunnel. Never resolves
    /// by default.
    fn rechecks(&self) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }

    /// Whether the open tunnel that `req` opened is still allowed. One that is not is closed: its task
    /// is stopped (the stream is reset, the upstream connection closed) and [`Handler::closed`] is
    /// called with an [`io::ErrorKind::PermissionDenied`] error. Always allowed by default.
    fn allowed(&self, req: &Request) -> bool {
        let _ = req;
        true
    }
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
    /// The client left a keepalive PING unanswered: it is gone, and so are its tunnels.
    #[error("client left a keepalive PING unanswered for {after:?}")]
    KeepaliveTimeout {
        /// The limit.
        after: Duration,
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
        /// h2's error.
        #[source]
        source: h2::Error,
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
    serve_with_limits(tcp, tls, handler, Limits::default(), None).await
}

/// [`serve`] with `limits` instead of the defaults. An `admitted` connection gives its handshake slot
/// back once the TLS handshake is over, and its connection slot when this returns.
pub async fn serve_with_limits<H: Handler>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    limits: Limits,
    mut admitted: Option<Admitted>,
) -> Result<(), ServeError> {
    let peer = tcp.peer_addr().map_err(|source| ServeError::PeerAddr { source })?;
    // Best effort: a socket that refuses TCP_NODELAY still works, only with more latency.
    let _ = tcp.set_nodelay(true);
    let handshake_timeout = limits.handshake_timeout;
    let handshake = tokio::time::timeout(handshake_timeout, record::accept(tls, tcp, TLS_SEND_BUFFER)).await;
    if let Some(admitted) = &mut admitted {
        admitted.handshake_done();
    }
    let (stream, negotiated) = handshake
        .map_err(|_| ServeError::HandshakeTimeout {
            after: handshake_timeout,
        })?
        .map_err(|source| ServeError::Handshake { source })?;
    if negotiated.alpn.as_deref() != Some(ALPN_H2) {
        return Err(ServeError::Alpn {
            negotiated: negotiated.alpn.map(|p| String::from_utf8_lossy(&p).into_owned()),
        });
    }
    if negotiated.version != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Err(ServeError::Version);
    }
    let identity = negotiated.identity.ok_or(ServeError::NoIdentity)?;

    let ctx = Arc::new(Connection {
        peer,
        identity,
        handler,
        opened: AtomicU64::new(0),
        open: Mutex::default(),
    });
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_concurrent_reset_streams(MAX_CONCURRENT_RESETS)
        .handshake::<_, Bytes>(stream);
    let mut connection = tokio::time::timeout(handshake_timeout, handshake)
        .await
        .map_err(|_| ServeError::HandshakeTimeout {
            after: handshake_timeout,
        })?
        .map_err(|source| ServeError::Http { source })?;
    let keepalive = keepalive(connection.ping_pong(), limits);
    let idle = ctx.idle(limits.idle_timeout);
    let recheck = ctx.handler.rechecks();
    tokio::pin!(keepalive, idle, recheck);
    // `accept` also drives the connection: tunnels keep moving while we wait for the next request.
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(next) => {
                    let (req, mut respond) = next.map_err(|source| ServeError::Http { source })?;
                    // Checked here, before a task exists: a tunnel's task never holds the request.
                    let (parts, recv) = req.into_parts();
                    let target = match parse_connect(&parts.method, &parts.uri) {
                        Ok(target) => target,
                        Err(error) => {
                            tracing::debug!(src.addr = %ctx.peer, src.identity = %ctx.identity, %error, "bad HBONE request");
                            let _ = respond.send_response(status(StatusCode::BAD_REQUEST), true);
                            continue;
                        }
                    };
                    let id = ctx.opened.fetch_add(1, Ordering::AcqRel);
                    ctx.table().insert(id, Open::default());
                    let task = tokio::spawn(ctx.clone().handle(id, target, recv, respond));
                    ctx.set_abort(id, task.abort_handle());
                }
                None => break,
            },
            () = &mut recheck => {
                // The next one first: a change that lands while these are checked fires it.
                recheck.set(ctx.handler.rechecks());
                ctx.recheck();
            }
            // Dropping the connection ends its tunnels: their streams fail, their tasks close the
            // application's side.
            () = &mut keepalive => {
                return Err(ServeError::KeepaliveTimeout {
                    after: limits.keepalive_timeout,
                })
            }
            () = &mut idle => {
                connection.graceful_shutdown();
                break;
            }
        }
    }
    poll_fn(|cx| connection.poll_closed(cx))
        .await
        .map_err(|source| ServeError::Http { source })
}

/// Resolves when the client leaves a PING unanswered for `limits.keepalive_timeout`.
async fn keepalive(ping: Option<h2::PingPong>, limits: Limits) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(limits.keepalive_interval).await;
        match tokio::time::timeout(limits.keepalive_timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            // The connection itself failed: `accept` reports that.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
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
struct Connection<H: Handler> {
    peer: SocketAddr,
    identity: Identity,
    handler: Arc<H>,
    /// Tunnels opened since the connection started: tells the idle timer whether one came and went,
    /// and numbers them.
    opened: AtomicU64,
    /// The tunnels open on this connection, by number: how to stop each, and its target once the
    /// handler opened it. Only that: a tunnel's session stays in its task, and what a recheck asks the
    /// handler is rebuilt from the connection and the target, so an open tunnel costs the table a few
    /// dozen bytes.
    open: Mutex<HashMap<u64, Open>>,
}

#[derive(Default)]
struct Open {
    abort: Option<AbortHandle>,
    /// Set once the handler opened the tunnel: from then on a recheck may stop it.
    target: Option<SocketAddr>,
    /// A recheck found it no longer allowed and stopped it.
    revoked: bool,
}

impl<H: Handler> Connection<H> {
    fn table(&self) -> MutexGuard<'_, HashMap<u64, Open>> {
        // Every change is one field or one entry: a panic elsewhere leaves the table whole.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_abort(&self, id: u64, abort: AbortHandle) {
        // A tunnel that already ended took its entry: nothing to stop.
        if let Some(open) = self.table().get_mut(&id) {
            open.abort = Some(abort);
        }
    }

    fn request(&self, target: SocketAddr) -> Request {
        Request {
            peer: self.peer,
            identity: self.identity.clone(),
            target,
        }
    }

    /// Stops every open tunnel the handler no longer allows; each task, dropped, reports its session
    /// closed as revoked.
    fn recheck(&self) {
        let mut table = self.table();
        // One request for the connection, its target set per tunnel: no copy of the identity each.
        let mut request: Option<Request> = None;
        for open in table.values_mut() {
            let Some(target) = open.target else { continue };
            if open.revoked {
                continue;
            }
            let request = request.get_or_insert_with(|| self.request(target));
            request.target = target;
            if self.handler.allowed(request) {
                continue;
            }
            open.revoked = true;
            if let Some(abort) = &open.abort {
                abort.abort();
            }
        }
    }

    /// Resolves once a whole `timeout` passed with no tunnel open and none opened.
    async fn idle(&self, timeout: Duration) {
        let mut seen = self.opened.load(Ordering::Acquire);
        loop {
            tokio::time::sleep(timeout).await;
            let now = self.opened.load(Ordering::Acquire);
            if now == seen && self.table().is_empty() {
                return;
            }
            seen = now;
        }
    }

    async fn handle(self: Arc<Self>, id: u64, target: SocketAddr, recv: RecvStream, respond: SendResponse<Bytes>) {
        // Dropped however the task ends, a recheck stopping it included.
        let mut tunnel = Tunnel {
            conn: &self,
            id,
            session: None,
        };
        tunnel.run(target, recv, respond).await;
    }
}

/// One tunnel's task: its entry in the connection's table, and its session once the handler opened
/// it. Whoever ends the tunnel reports the session closed exactly once: the task when the copy ends,
/// or the drop when a recheck stopped the task.
struct Tunnel<'a, H: Handler> {
    conn: &'a Connection<H>,
    id: u64,
    session: Option<H::Session>,
}

impl<H: Handler> Tunnel<'_, H> {
    async fn run(&mut self, target: SocketAddr, recv: RecvStream, mut respond: SendResponse<Bytes>) {
        let conn = self.conn;
        // Boxed: an async fn's state is as large as its largest await point, and the handler's
        // authorization and connect would otherwise stay in every open tunnel's task for its life.
        let Some(mut upstream) = Box::pin(self.open(target, &mut respond)).await else {
            return;
        };
        // Best effort, as for the client side of the tunnel.
        let _ = upstream.set_nodelay(true);
        let span = tracing::debug_span!(
            "hbone_inbound",
            src.addr = %conn.peer,
            src.identity = %conn.identity,
            dst.addr = %target,
        );
        // Open: from now on a recheck may stop the tunnel.
        if let Some(open) = conn.table().get_mut(&self.id) {
            open.target = Some(target);
        }
        let result = async {
            let send = respond
                .send_response(status(StatusCode::OK), false)
                .map_err(io::Error::other)?;
            let (received, sent) = H2Stream::new(send, recv).splice(&mut upstream).await?;
            Ok(Transferred { sent, received })
        }
        .instrument(span)
        .await;
        drop(upstream);
        if let Some(session) = self.session.take() {
            conn.handler.closed(session, result);
        }
    }

    /// Asks the handler to open the tunnel: its connection to the application, with the session kept
    /// for the tunnel's end; or the refusal answered (none if the client reset the stream first).
    async fn open(&mut self, target: SocketAddr, respond: &mut SendResponse<Bytes>) -> Option<TcpStream> {
        let conn = self.conn;
        let request = conn.request(target);
        // A client that resets the stream while we authorize and connect is gone: drop the attempt.
        let (session, result) = tokio::select! {
            opened = conn.handler.open(&request) => opened,
            _ = poll_fn(|cx| respond.poll_reset(cx)) => return None,
        };
        match result {
            Ok(upstream) => {
                self.session = Some(session);
                Some(upstream)
            }
            Err(refusal) => {
                conn.handler
                    .closed(session, Err(io::Error::new(refusal.io_kind(), refusal)));
                let _ = respond.send_response(status(refusal.status()), true);
                None
            }
        }
    }
}

impl<H: Handler> Drop for Tunnel<'_, H> {
    fn drop(&mut self) {
        let open = self.conn.table().remove(&self.id);
        // Still held: the task was stopped before it could report the session.
        if let Some(session) = self.session.take() {
            let error = if open.is_some_and(|o| o.revoked) {
                io::Error::new(io::ErrorKind::PermissionDenied, "tunnel revoked")
            } else {
                io::Error::other("tunnel task stopped")
            };
            self.conn.handler.closed(session, Err(error));
        }
    }
}

fn status(code: StatusCode) -> Response<()> {
    let mut rsp = Response::new(());
    *rsp.status_mut() = code;
    rsp
}
