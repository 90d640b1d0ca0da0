//! The agent-facing listener (`--listen`, port 15012): what any one peer may cost the controller.
//!
//! Every accepted TCP connection is first admitted ([`weft_dataplane::admission`], the type HBONE's
//! 15008 uses) by its source address, before its TLS handshake costs anything: past a bound it is
//! closed at once. An admitted connection has [`Limits::handshake_timeout`] from accept to finish its
//! TLS handshake and send its first HTTP/2 bytes; its handshake slot goes back when the handshake
//! ends either way, its connection slot when the connection closes. HTTP/2 and gRPC bounds are set on the server ([`server`], [`MAX_CONFIG_REQUEST`],
//! [`MAX_SIGN_REQUEST`]); a PING every [`KEEPALIVE_INTERVAL`] unanswered for [`KEEPALIVE_TIMEOUT`]
//! closes the connection of an agent that vanished, and with it its config stream.

use std::{
    future::Future as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinSet,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Server, server::Connected};
use weft_dataplane::admission::{Admission, AdmissionLimits, Admitted};

/// Longest TLS handshake: the default of `--handshake-timeout`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Admission bounds of 15012. A source is one node's agent, which holds one connection (its channel
/// carries the config stream and every CSR): a few more allow for an agent restarted before its old
/// connection is noticed gone. In all: a connection per node of a 4,096-node mesh, and a controller
/// restarted under thousands of agents reconnecting with jittered backoff handshakes a bounded number
/// at a time (those refused retry).
pub const ADMISSION: AdmissionLimits = AdmissionLimits {
    connections: 4096,
    handshakes: 256,
    handshakes_per_source: 8,
    connections_per_source: 16,
};
/// Streams one connection may have open: an agent uses one config stream and a CSR per identity
/// being renewed.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Bytes of request headers (HPACK-decoded) on one stream; an agent sends a few hundred.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Streams a client may reset before the server accepted them (the HTTP/2 "rapid reset" attack);
/// past it the connection is closed with GOAWAY.
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the server may reset for the client's protocol errors before it closes the connection.
pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// HTTP/2 flow-control windows: what the server buffers for one stream, and for one connection, of
/// data it has not read yet. Agents send small messages.
pub const STREAM_WINDOW: u32 = 64 * 1024;
pub const CONNECTION_WINDOW: u32 = 256 * 1024;
/// A PING after this much silence...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...unanswered for this long closes the connection (an agent that vanished without FIN or RST).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest decoded message on a config stream (a subscription or an ACK/NACK naming the rejected
/// resources).
pub const MAX_CONFIG_REQUEST: usize = 1024 * 1024;
/// Largest decoded CSR request (a P-256 CSR in PEM is about 500 bytes).
pub const MAX_SIGN_REQUEST: usize = 16 * 1024;
/// Pause after an accept error such as EMFILE, so that the loop does not spin while it lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The bounds of the agent-facing address that can be changed (by flag or by tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub admission: AdmissionLimits,
    pub handshake_timeout: Duration,
    /// How large resyncs take turns.
    pub resyncs: crate::distribution::ResyncLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            admission: ADMISSION,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            resyncs: crate::distribution::ResyncLimits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the serving certificate chain is not PEM")]
    Certificate(#[source] rustls::pki_types::pem::Error),
    #[error("the serving key is not a PEM private key")]
    Key(#[source] rustls::pki_types::pem::Error),
    #[error("TLS settings")]
    Tls(#[source] rustls::Error),
}

/// The TLS settings of 15012 (ALPN `h2`, the ring provider named explicitly) for the serving
/// certificate chain and key, both PEM.
pub fn tls_config(chain_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, Error> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::Certificate)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(Error::Key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(Error::Tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(Error::Tls)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A gRPC server builder with the HTTP/2 bounds of 15012.
pub fn server() -> Server {
    Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// Accepts on `listener`, admits, and handshakes; yields the connections whose TLS handshake
/// succeeded in time, for `Server::serve_with_incoming*`. Accepting stops (and the port is closed,
/// and handshakes in flight are dropped) when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
) -> ReceiverStream<Result<AgentConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    let admission = Admission::new(limits.admission);
    tokio::spawn(accept(
        listener,
        TlsAcceptor::from(tls),
        admission,
        limits.handshake_timeout,
        tx,
    ));
    ReceiverStream::new(rx)
}

/// An agent's connection after its TLS handshake; holds its admission slot until dropped (closed).
/// Its first bytes (the HTTP/2 preface) must come by the handshake deadline too: hyper has no
/// deadline of its own for them, and its keepalive starts only after them.
#[derive(Debug)]
pub struct AgentConnection {
    tls: TlsStream<TcpStream>,
    /// Until the first bytes arrive.
    preface_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _admitted: Admitted,
}

async fn accept(
    listener: TcpListener,
    tls: TlsAcceptor,
    admission: Arc<Admission>,
    handshake_timeout: Duration,
    tx: mpsc::Sender<Result<AgentConnection, io::Error>>,
) {
    let mut handshakes = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = tx.closed() => return,
            Some(_) = handshakes.join_next() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or memory: already accepted connections go on; try again
                    // shortly. Anything else (an aborted connection) concerns only that connection.
                    if e.raw_os_error().is_some_and(is_resource_exhaustion) {
                        tracing::warn!(error = %e, "agent listener: cannot accept");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    } else {
                        tracing::debug!(error = %e, "agent listener: accept");
                    }
                    continue;
                }
            },
        };
        let admitted = match admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(refused) => {
                // Closed at once (dropped). Debug only: a flood would otherwise flood the log too.
                tracing::debug!(src.addr = %peer, reason = %refused, "agent connection refused");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let deadline = tokio::time::Instant::now() + handshake_timeout;
        handshakes.spawn(handshake(tcp, peer, admitted, tls.clone(), deadline, tx.clone()));
    }
}

fn is_resource_exhaustion(errno: i32) -> bool {
    matches!(errno, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
}

async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    mut admitted: Admitted,
    tls: TlsAcceptor,
    deadline: tokio::time::Instant,
    tx: mpsc::Sender<Result<AgentConnection, io::Error>>,
) {
    let result = tokio::time::timeout_at(deadline, tls.accept(tcp)).await;
    admitted.handshake_done();
    match result {
        Ok(Ok(tls)) => {
            let _ = tx
                .send(Ok(AgentConnection {
                    tls,
                    preface_deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
                    _admitted: admitted,
                }))
                .await;
        }
        Ok(Err(e)) => tracing::debug!(src.addr = %peer, error = %e, "agent connection: TLS handshake failed"),
        Err(_) => tracing::debug!(src.addr = %peer, "agent connection: TLS handshake timed out"),
    }
}

// === impl AgentConnection ===

impl Connected for AgentConnection {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

impl AsyncRead for AgentConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tls).poll_read(cx, buf);
        if let Some(deadline) = self.preface_deadline.as_mut() {
            match polled {
                Poll::Ready(Ok(())) if buf.filled().len() > before => self.preface_deadline = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface by the handshake deadline",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl AsyncWrite for AgentConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}
