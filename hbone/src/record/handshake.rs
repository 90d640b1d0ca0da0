//! The TLS handshake, driven through rustls's unbuffered API so that nothing of the connection stays inside
//! rustls afterwards: the bytes that followed the handshake and any plaintext that came with it go to the
//! [`TlsStream`], the traffic keys to its record layer.

use std::io;
use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{CommonState, ExtractedSecrets, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Secrets, TlsStream, tls_error};
use crate::identity::Identity;
use crate::tls::peer_identity;

/// First size of the handshake's read buffer; it doubles up to [`MAX_FLIGHT`] for large certificate chains.
const FIRST_READ: usize = 16 * 1024 + 5;
/// The most handshake bytes buffered at once.
const MAX_FLIGHT: usize = 256 * 1024;
/// Alerts and the like rustls may queue after a failure.
const MAX_FAREWELL_MESSAGES: usize = 4;

/// What the handshake agreed on.
#[derive(Debug)]
pub(crate) struct Negotiated {
    /// The ALPN protocol, if any.
    pub(crate) alpn: Option<Vec<u8>>,
    /// The TLS version.
    pub(crate) version: Option<ProtocolVersion>,
    /// The peer's SPIFFE identity (see [`peer_identity`]).
    pub(crate) identity: Option<Identity>,
}

/// Handshakes as a client of `name` with `config` (which must allow secret extraction, as
/// [`crate::tls::client_config`]'s does). `out_limit` bounds the ciphertext queued for sending.
pub(crate) async fn connect(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    mut tcp: TcpStream,
    out_limit: usize,
) -> io::Result<(TlsStream, Negotiated)> {
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let (leftover, early) = drive(&mut conn, &mut tcp).await?;
    let negotiated = negotiated(&conn);
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    finish(tcp, secrets, Secrets::Client(kernel), leftover, early, out_limit).map(|s| (s, negotiated))
}

/// Handshakes as a server with `config` (which must allow secret extraction, as
/// [`crate::tls::server_config`]'s does).
pub(crate) async fn accept(
    config: Arc<rustls::ServerConfig>,
    mut tcp: TcpStream,
    out_limit: usize,
) -> io::Result<(TlsStream, Negotiated)> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let (leftover, early) = drive(&mut conn, &mut tcp).await?;
    let negotiated = negotiated(&conn);
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    finish(tcp, secrets, Secrets::Server(kernel), leftover, early, out_limit).map(|s| (s, negotiated))
}

fn negotiated(conn: &CommonState) -> Negotiated {
    Negotiated {
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: conn.protocol_version(),
        identity: peer_identity(conn),
    }
}

fn finish(
    tcp: TcpStream,
    secrets: ExtractedSecrets,
    kernel: Secrets,
    leftover: Vec<u8>,
    early: Vec<u8>,
    out_limit: usize,
) -> io::Result<TlsStream> {
    let mut stream = TlsStream::new(tcp, secrets, kernel, leftover, out_limit).map_err(tls_error)?;
    stream.plain = early;
    Ok(stream)
}

/// The two sides' unbuffered connections, as [`drive`] needs them.
trait Handshaking {
    type Data;

    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Handshaking for UnbufferedClientConnection {
    type Data = ClientConnectionData;

    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Handshaking for UnbufferedServerConnection {
    type Data = ServerConnectionData;

    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// What to do after one state of the handshake.
enum Next {
    Continue,
    Read,
    Done,
}

/// Runs the handshake to completion. Returns the bytes read past it and the plaintext that arrived with it.
async fn drive<C: Handshaking>(conn: &mut C, tcp: &mut TcpStream) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut incoming = vec![0u8; FIRST_READ];
    let mut filled = 0;
    let mut outgoing = Vec::new();
    let mut early = Vec::new();
    loop {
        let status = conn.process(&mut incoming[..filled]);
        let discard = status.discard;
        let next = match status.state {
            Err(e) => Err(e),
            Ok(ConnectionState::EncodeTlsData(mut data)) => encode(&mut outgoing, |out| data.encode(out)),
            Ok(ConnectionState::TransmitTlsData(data)) => {
                tcp.write_all(&outgoing).await?;
                outgoing.clear();
                data.done();
                Ok(Next::Continue)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Next::Read),
            Ok(ConnectionState::WriteTraffic(_)) => Ok(Next::Done),
            // The peer's first application data came with the end of the handshake.
            Ok(ConnectionState::ReadTraffic(mut records)) => loop {
                match records.next_record() {
                    Some(Ok(record)) => early.extend_from_slice(record.payload),
                    Some(Err(e)) => break Err(e),
                    None => break Ok(Next::Continue),
                }
            },
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the TLS handshake",
                ));
            }
            Ok(other) => Err(rustls::Error::General(format!("unexpected handshake state {other:?}"))),
        };
        incoming.copy_within(discard..filled, 0);
        filled -= discard;
        match next {
            Err(e) => {
                farewell(conn, tcp, &mut incoming[..filled]).await;
                return Err(tls_error(e));
            }
            Ok(Next::Continue) => {}
            Ok(Next::Done) => {
                incoming.truncate(filled);
                return Ok((incoming, early));
            }
            Ok(Next::Read) => {
                if filled == incoming.len() {
                    if incoming.len() >= MAX_FLIGHT {
                        return Err(tls_error(rustls::Error::General(format!(
                            "handshake flight larger than {MAX_FLIGHT} bytes"
                        ))));
                    }
                    incoming.resize(incoming.len() * 2, 0);
                }
                let n = tcp.read(&mut incoming[filled..]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection during the TLS handshake",
                    ));
                }
                filled += n;
            }
        }
    }
}

/// Appends one encoded handshake record to `outgoing`.
fn encode(
    outgoing: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<Next, rustls::Error> {
    let at = outgoing.len();
    let mut room = 4096;
    loop {
        outgoing.resize(at + room, 0);
        match encode(&mut outgoing[at..]) {
            Ok(n) => {
                outgoing.truncate(at + n);
                return Ok(Next::Continue);
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => room = required_size,
            Err(EncodeError::AlreadyEncoded) => {
                outgoing.truncate(at);
                return Ok(Next::Continue);
            }
        }
    }
}

/// After a failed handshake, sends the alert rustls queued for the peer (best effort: the connection is
/// being dropped either way).
/// `incoming` is what is left of the buffer the handshake read into: rustls's handshake state points into it.
async fn farewell<C: Handshaking>(conn: &mut C, tcp: &mut TcpStream, incoming: &mut [u8]) {
    let mut outgoing = Vec::new();
    for _ in 0..MAX_FAREWELL_MESSAGES {
        let status = conn.process(incoming);
        let Ok(ConnectionState::EncodeTlsData(mut data)) = status.state else {
            break;
        };
        if encode(&mut outgoing, |out| data.encode(out)).is_err() {
            break;
        }
    }
    let _ = tcp.write_all(&outgoing).await;
}
