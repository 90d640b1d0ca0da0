//! TLS 1.3 records of our own, after rustls's handshake.
//!
//! rustls runs the handshake (certificates, key schedule, alerts) through its unbuffered API and then hands
//! over the traffic keys ([`rustls::kernel`], the interface kTLS users get). From there this module seals and
//! opens the records itself, because rustls's buffered stream copied every byte more often than the cipher
//! needs:
//! - sending, rustls gathered HTTP/2's frames into a record buffer and encrypted it in place; here the cipher
//!   reads HTTP/2's buffers and writes the record straight into the queue for the socket (out of place);
//! - receiving, the bytes went socket, read batch, rustls's record buffer, rustls's plaintext queue, HTTP/2's
//!   read buffer; here the cipher reads the record from the read batch and writes the plaintext straight into
//!   HTTP/2's read buffer.
//!
//! Those copies were a tenth of both agents' CPU in a bulk flow; what is left of them is a hundredth
//! (docs/performance.md).
//!
//! What the record layer does beyond sealing and opening, as RFC 8446 asks:
//! - KeyUpdate both ways: a peer's update changes the receive key (and, when it asks, ours after a
//!   KeyUpdate of our own); we update our send key before the cipher's confidentiality limit;
//! - alerts: `close_notify` is the end of the stream, `user_canceled` is ignored, any other alert fails the
//!   connection with [`rustls::Error::AlertReceived`];
//! - a record that does not decrypt, is too long or not of the one outer type TLS 1.3 allows fails the
//!   connection, after a `bad_record_mac` / `record_overflow` / `unexpected_message` alert to the peer;
//! - a NewSessionTicket goes to rustls (clients only; resumption is off, so it is dropped there).
//!
//! Every error is an [`io::Error`] wrapping the [`rustls::Error`], as tokio-rustls reports them.

mod handshake;
#[cfg(test)]
mod tests;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use bytes::Bytes;
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{AlertDescription, ConnectionTrafficSecrets, ContentType, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use weft_dataplane::proxy::{READ_CHUNK, advance, poll_read_shared};

pub(crate) use handshake::{accept, connect};

/// Record header: type, legacy version (2), length (2).
const HEADER: usize = 5;
/// Largest plaintext in one record.
const MAX_PLAIN: usize = 16 * 1024;
/// Largest record body a peer may send: plaintext, content type, padding and tag (RFC 8446 5.2).
const MAX_BODY: usize = MAX_PLAIN + 256;
/// Tag length of every TLS 1.3 AEAD.
const TAG: usize = 16;
/// A write slice at least this long is sealed straight from the caller's memory; shorter ones (HTTP/2 frame
/// headers, small frames) are gathered into a record first.
const DIRECT_MIN: usize = 1024;
/// Output kept allocated between bursts; a drained buffer above this is released once the connection has
/// stopped streaming ([`RELEASE_AFTER`] small bursts in a row). Regrowing it costs a reallocation and
/// zeroing per burst, so it must not happen on every one.
const KEEP_OUT: usize = 64 * 1024;
const RELEASE_AFTER: u8 = 64;

const TYPE_ALERT: u8 = 21;
const TYPE_HANDSHAKE: u8 = 22;
const TYPE_APP_DATA: u8 = 23;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;

/// The key, IV and sequence number of one direction.
struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Self, rustls::Error> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(rustls::Error::General("unsupported TLS 1.3 cipher suite".into())),
        };
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| rustls::Error::General("cannot load the traffic key".into()))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| rustls::Error::General("traffic IV is not 12 bytes".into()))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq: seq_checked(seq)?,
        })
    }

    /// The nonce of the next record (RFC 8446 5.3), advancing the sequence number.
    fn next_nonce(&mut self) -> Result<Nonce, rustls::Error> {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = seq_checked(self.seq + 1)?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// A sequence number may never wrap; key updates reset it long before.
fn seq_checked(seq: u64) -> Result<u64, rustls::Error> {
    if seq == u64::MAX {
        return Err(rustls::Error::EncryptError);
    }
    Ok(seq)
}

/// The header of a record whose body is `body` bytes.
fn header(body: usize) -> [u8; HEADER] {
    // Bodies are at most MAX_PLAIN + 1 + TAG bytes, so the length fits.
    let [hi, lo] = (body as u16).to_be_bytes();
    [TYPE_APP_DATA, 0x03, 0x03, hi, lo]
}

/// What rustls still does after the handshake: derive the next traffic secrets, take session tickets.
enum Secrets {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Secrets {
    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Secrets::Client(k) => k.negotiated_cipher_suite(),
            Secrets::Server(k) => k.negotiated_cipher_suite(),
        }
    }

    fn update_tx(&mut self) -> Result<Keys, rustls::Error> {
        Keys::new(match self {
            Secrets::Client(k) => k.update_tx_secret()?,
            Secrets::Server(k) => k.update_tx_secret()?,
        })
    }

    fn update_rx(&mut self) -> Result<Keys, rustls::Error> {
        Keys::new(match self {
            Secrets::Client(k) => k.update_rx_secret()?,
            Secrets::Server(k) => k.update_rx_secret()?,
        })
    }

    fn new_session_ticket(&mut self, payload: &[u8]) -> Result<(), rustls::Error> {
        match self {
            Secrets::Client(k) => k.handle_new_session_ticket(payload),
            Secrets::Server(_) => Err(unexpected("a NewSessionTicket from a client")),
        }
    }
}

fn unexpected(what: &str) -> rustls::Error {
    rustls::Error::General(format!("unexpected TLS message: {what}"))
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Why the next record is not there.
enum RecordError {
    /// The peer broke the protocol.
    Tls(rustls::Error),
    /// The socket failed, or closed mid-record.
    Io(io::Error),
}

impl From<io::Error> for RecordError {
    fn from(e: io::Error) -> Self {
        RecordError::Io(e)
    }
}

impl From<rustls::Error> for RecordError {
    fn from(e: rustls::Error) -> Self {
        RecordError::Tls(e)
    }
}

/// Where [`TlsStream::poll_record`] left the next whole record.
#[derive(Clone, Copy)]
enum Whole {
    /// All of `partial` (it arrived in more than one read).
    Partial,
    /// The first this many bytes of `pending`.
    Pending(usize),
}

/// How the read side ended.
enum ReadEnd {
    /// The peer sent `close_notify`: reads return end of stream.
    Closed,
    /// The connection failed; every read returns this.
    Failed(rustls::Error),
}

/// Ciphertext waiting to be written: `buf[start..end]`. `buf` stays initialized up to its length, so sealing
/// into it never zeroes memory first.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes sealed since the queue last drained: a connection streaming in bulk keeps its buffer.
    since_drain: usize,
    /// Drains in a row that followed no more than [`KEEP_OUT`] bytes.
    small_bursts: u8,
}

impl Outgoing {
    fn queued(&self) -> usize {
        self.end - self.start
    }

    /// Room for `n` more bytes at the end, returned for writing.
    fn grow(&mut self, n: usize) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < n {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < n {
                let want = (self.end + n).max(self.buf.len() * 2).max(4096);
                self.buf.resize(want, 0);
            }
        }
        let at = self.end;
        self.end += n;
        self.since_drain += n;
        &mut self.buf[at..at + n]
    }

    /// Undoes the last `grow` of `n` bytes (its record was not sealed).
    fn shrink(&mut self, n: usize) {
        self.end -= n;
        self.since_drain -= n;
    }

    fn drained(&mut self) {
        self.start = 0;
        self.end = 0;
        if self.since_drain > KEEP_OUT {
            self.small_bursts = 0;
        } else {
            self.small_bursts = self.small_bursts.saturating_add(1);
            // A bulk flow's own window updates and pings are small bursts too: only a run of them means
            // the flow stopped.
            if self.small_bursts >= RELEASE_AFTER && self.buf.len() > KEEP_OUT {
                self.buf = Vec::new();
            }
        }
        self.since_drain = 0;
    }
}

/// One TLS 1.3 connection after its handshake: [`AsyncRead`] gives the peer's plaintext, [`AsyncWrite`]
/// takes ours.
pub(crate) struct TlsStream {
    io: TcpStream,
    secrets: Secrets,
    rx: Keys,
    tx: Keys,
    /// Update the send key when its sequence number reaches this (below the cipher's confidentiality limit).
    tx_update_at: u64,

    /// Ciphertext read and not yet opened: a slice of the worker's shared read buffer.
    pending: Bytes,
    /// A record whose bytes arrived in more than one read, gathered here.
    partial: Vec<u8>,
    /// Plaintext opened but not yet read (the reader's buffer had no room for the whole record): `plain[at..]`.
    plain: Vec<u8>,
    plain_at: usize,
    read_end: Option<ReadEnd>,

    out: Outgoing,
    /// The most ciphertext queued before writers wait.
    out_limit: usize,
    /// `close_notify` has been queued: nothing more may be written.
    write_closed: bool,
    /// The peer asked for a key update that is not answered yet. Requests that arrive while the answer
    /// cannot be queued (the peer is not reading) share one answer (RFC 8446 4.6.3), so a peer
    /// flooding KeyUpdates costs at most `out_limit` of queued bytes.
    owe_key_update: bool,
}

impl TlsStream {
    fn new(
        io: TcpStream,
        secrets: rustls::ExtractedSecrets,
        kernel: Secrets,
        leftover: Vec<u8>,
        out_limit: usize,
    ) -> Result<Self, rustls::Error> {
        let limit = kernel
            .suite()
            .tls13()
            .ok_or_else(|| rustls::Error::General("not a TLS 1.3 cipher suite".into()))?
            .common
            .confidentiality_limit;
        Ok(Self {
            io,
            rx: Keys::new(secrets.rx)?,
            tx: Keys::new(secrets.tx)?,
            secrets: kernel,
            // Well before the limit: the update itself and records sealed in the same write need room.
            tx_update_at: limit.saturating_sub(limit / 8).min(u64::MAX - 1),
            pending: Bytes::from(leftover),
            partial: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            read_end: None,
            out: Outgoing::default(),
            out_limit: out_limit.max(MAX_PLAIN + HEADER + TAG + 1),
            write_closed: false,
            owe_key_update: false,
        })
    }

    /// Lowers the record count at which the send key is updated (tests reach it in a few records).
    #[cfg(test)]
    fn set_tx_update_at(&mut self, at: u64) {
        self.tx_update_at = at;
    }

    /// The send key's sequence number (tests see it reset by key updates).
    #[cfg(test)]
    fn tx_seq(&self) -> u64 {
        self.tx.seq
    }

    // --- sending ---

    /// Seals `plain` (content type `typ`) from the caller's memory into one record.
    fn seal_direct(&mut self, typ: u8, plain: &[u8]) -> Result<(), rustls::Error> {
        self.maybe_update_tx()?;
        let body = plain.len() + 1 + TAG;
        let nonce = self.tx.next_nonce()?;
        let record = self.out.grow(HEADER + body);
        let hdr = header(body);
        record[..HEADER].copy_from_slice(&hdr);
        let (ciphertext, tail) = record[HEADER..].split_at_mut(plain.len());
        let sealed = self
            .tx
            .key
            .seal_out_of_place_scatter(nonce, Aad::from(hdr), plain, ciphertext, &[typ], tail);
        if sealed.is_err() {
            self.out.shrink(HEADER + body);
            return Err(rustls::Error::EncryptError);
        }
        Ok(())
    }

    /// Seals one record gathered from the front of `bufs` (small slices, copied), starting `skip` bytes into
    /// the first. Returns the bytes taken.
    fn seal_gathered(&mut self, bufs: &[io::IoSlice<'_>], skip: usize, room: usize) -> Result<usize, rustls::Error> {
        self.maybe_update_tx()?;
        let nonce = self.tx.next_nonce()?;
        let cap = MAX_PLAIN.min(room);
        // Room for a full record; what the slices do not fill is given back before sealing.
        let record = self.out.grow(HEADER + cap + 1 + TAG);
        // Take slices until the record is full or a slice worth sealing directly comes.
        let mut len = 0;
        for (i, buf) in bufs.iter().enumerate() {
            let buf = if i == 0 { &buf[skip..] } else { &buf[..] };
            if i > 0 && buf.len() >= DIRECT_MIN {
                break;
            }
            let n = buf.len().min(cap - len);
            record[HEADER + len..HEADER + len + n].copy_from_slice(&buf[..n]);
            len += n;
            if len == cap {
                break;
            }
        }
        let body = len + 1 + TAG;
        self.out.shrink(cap - len);
        let record = &mut self.out.buf[self.out.end - HEADER - body..self.out.end];
        let hdr = header(body);
        record[..HEADER].copy_from_slice(&hdr);
        let (plain, tail) = record[HEADER..].split_at_mut(len);
        let sealed = self
            .tx
            .key
            .seal_in_place_scatter(nonce, Aad::from(hdr), plain, &[TYPE_APP_DATA], tail);
        if sealed.is_err() {
            self.out.shrink(HEADER + body);
            return Err(rustls::Error::EncryptError);
        }
        Ok(len)
    }

    /// Sends a KeyUpdate under the current key and switches to the next one.
    fn send_key_update(&mut self, request_update: bool) -> Result<(), rustls::Error> {
        let msg = [HS_KEY_UPDATE, 0, 0, 1, u8::from(request_update)];
        let update_at = self.tx_update_at;
        // Sealing the message itself must not recurse into another update.
        self.tx_update_at = u64::MAX;
        let sealed = self.seal_direct(TYPE_HANDSHAKE, &msg);
        self.tx_update_at = update_at;
        sealed?;
        self.tx = self.secrets.update_tx()?;
        Ok(())
    }

    fn maybe_update_tx(&mut self) -> Result<(), rustls::Error> {
        if self.tx.seq >= self.tx_update_at {
            self.send_key_update(false)?;
        }
        Ok(())
    }

    /// Queues an alert; the caller writes it.
    fn queue_alert(&mut self, description: AlertDescription) -> Result<(), rustls::Error> {
        let level = if description == AlertDescription::CloseNotify {
            1
        } else {
            2
        };
        self.seal_direct(TYPE_ALERT, &[level, u8::from(description)])
    }

    /// Answers an owed key update if the output queue has room for it (or `now`: before application
    /// data, which must not go out under the old key).
    fn answer_key_update(&mut self, now: bool) -> Result<(), rustls::Error> {
        if self.owe_key_update && !self.write_closed && (now || self.out.queued() < self.out_limit) {
            self.owe_key_update = false;
            self.send_key_update(false)?;
        }
        Ok(())
    }

    /// Seals as much of `bufs` as the output queue has room for.
    fn seal(&mut self, bufs: &[io::IoSlice<'_>]) -> Result<usize, rustls::Error> {
        self.answer_key_update(true)?;
        let mut room = self.out_limit.saturating_sub(self.out.queued());
        let mut taken = 0;
        let mut index = 0;
        let mut skip = 0;
        while room > 0 && index < bufs.len() {
            let rest = &bufs[index][skip..];
            let n = if rest.is_empty() {
                0
            } else if rest.len() >= DIRECT_MIN {
                let n = rest.len().min(MAX_PLAIN).min(room);
                self.seal_direct(TYPE_APP_DATA, &rest[..n])?;
                n
            } else {
                self.seal_gathered(&bufs[index..], skip, room)?
            };
            taken += n;
            room -= n;
            // Step over what was taken, slice by slice.
            let mut n = n;
            loop {
                let left = bufs[index].len() - skip;
                if n < left {
                    skip += n;
                    break;
                }
                n -= left;
                index += 1;
                skip = 0;
                if n == 0 || index == bufs.len() {
                    break;
                }
            }
        }
        Ok(taken)
    }

    /// Writes queued ciphertext until none is left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.out.start == self.out.end {
            return Poll::Ready(Ok(()));
        }
        while self.out.start < self.out.end {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out.buf[self.out.start..self.out.end]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.start += n;
        }
        self.out.drained();
        Poll::Ready(Ok(()))
    }

    /// Tries to write an alert the caller queued; the connection is failing, so nothing waits for it.
    fn try_send_alert(&mut self, cx: &mut Context<'_>, description: AlertDescription) {
        if self.write_closed || self.queue_alert(description).is_err() {
            return;
        }
        self.write_closed = true;
        let _ = self.poll_drain(cx);
    }

    // --- receiving ---

    /// The length of the record at the front of `bytes` (header included) once its header is there.
    fn record_len(bytes: &[u8]) -> Result<Option<usize>, rustls::Error> {
        let Some(hdr) = bytes.get(..HEADER) else {
            return Ok(None);
        };
        if hdr[0] != TYPE_APP_DATA {
            return Err(rustls::Error::InappropriateMessage {
                expect_types: vec![ContentType::ApplicationData],
                got_type: ContentType::from(hdr[0]),
            });
        }
        let body = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        if body > MAX_BODY {
            return Err(rustls::Error::PeerSentOversizedRecord);
        }
        if body <= TAG {
            return Err(rustls::Error::DecryptError);
        }
        Ok(Some(HEADER + body))
    }

    /// Makes the next whole record available: `Some(Whole::Partial)` in `partial`, `Some(Whole::Pending(len))`
    /// as the first `len` bytes of `pending`; `None` at end of stream on a record boundary.
    fn poll_record(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Whole>, RecordError>> {
        loop {
            if self.partial.is_empty() {
                match Self::record_len(&self.pending)? {
                    Some(len) if len <= self.pending.len() => return Poll::Ready(Ok(Some(Whole::Pending(len)))),
                    _ if self.pending.is_empty() => {}
                    // A record cut by the end of the read: gather it.
                    _ => {
                        self.partial.extend_from_slice(&self.pending);
                        self.pending = Bytes::new();
                    }
                }
            } else {
                let want = match Self::record_len(&self.partial)? {
                    Some(len) => len,
                    None => HEADER,
                };
                let n = (want - self.partial.len()).min(self.pending.len());
                self.partial.extend_from_slice(&self.pending[..n]);
                advance(&mut self.pending, n);
                if Self::record_len(&self.partial)? == Some(self.partial.len()) {
                    return Poll::Ready(Ok(Some(Whole::Partial)));
                }
                if !self.pending.is_empty() {
                    // The header arrived and told how much more to take.
                    continue;
                }
            }
            let read = ready!(poll_read_shared(cx, &mut self.io, READ_CHUNK))?;
            if read.is_empty() {
                if self.partial.is_empty() {
                    return Poll::Ready(Ok(None));
                }
                return Poll::Ready(Err(RecordError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection in the middle of a TLS record",
                ))));
            }
            self.pending = read;
        }
    }

    /// Handles a record that is not application data.
    fn on_control(&mut self, cx: &mut Context<'_>, typ: u8, payload: &[u8]) -> Result<(), rustls::Error> {
        match typ {
            TYPE_ALERT => {
                let &[_level, description] = payload else {
                    return Err(unexpected("a malformed alert"));
                };
                match AlertDescription::from(description) {
                    AlertDescription::CloseNotify => {
                        self.read_end = Some(ReadEnd::Closed);
                        Ok(())
                    }
                    AlertDescription::UserCanceled => Ok(()),
                    other => Err(rustls::Error::AlertReceived(other)),
                }
            }
            TYPE_HANDSHAKE => {
                let mut rest = payload;
                while !rest.is_empty() {
                    let &[typ, a, b, c, ref body @ ..] = rest else {
                        return Err(unexpected("a fragmented post-handshake message"));
                    };
                    let len = u32::from_be_bytes([0, a, b, c]) as usize;
                    if body.len() < len {
                        return Err(unexpected("a fragmented post-handshake message"));
                    }
                    let (msg, after) = body.split_at(len);
                    rest = after;
                    match typ {
                        HS_KEY_UPDATE => {
                            // RFC 8446 5.1: a key change must end its record.
                            let (&[request], true) = (msg, rest.is_empty()) else {
                                return Err(unexpected("a malformed KeyUpdate"));
                            };
                            if request > 1 {
                                return Err(unexpected("a malformed KeyUpdate"));
                            }
                            self.rx = self.secrets.update_rx()?;
                            if request == 1 {
                                self.owe_key_update = true;
                                self.answer_key_update(false)?;
                                // Best effort now; the next write or flush finishes it.
                                if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
                                    return Err(rustls::Error::General(format!("sending a KeyUpdate: {e}")));
                                }
                            }
                        }
                        HS_NEW_SESSION_TICKET => self.secrets.new_session_ticket(msg)?,
                        other => return Err(unexpected(&format!("post-handshake message type {other}"))),
                    }
                }
                Ok(())
            }
            other => Err(rustls::Error::InappropriateMessage {
                expect_types: vec![ContentType::ApplicationData],
                got_type: ContentType::from(other),
            }),
        }
    }

    /// Opens the next record: application data into `dst` when it fits, otherwise into `plain`; anything
    /// else to [`Self::on_control`].
    fn open_next(&mut self, cx: &mut Context<'_>, whole: Whole, dst: &mut ReadBuf<'_>) -> Result<(), rustls::Error> {
        let (record, len): (&[u8], usize) = match whole {
            Whole::Partial => (&self.partial, self.partial.len()),
            Whole::Pending(len) => (&self.pending, len),
        };
        let (hdr, body) = record[..len].split_at(HEADER);
        let (ciphertext, tag) = body.split_at(body.len() - TAG);
        let nonce = self.rx.next_nonce()?;
        let aad = Aad::from([hdr[0], hdr[1], hdr[2], hdr[3], hdr[4]]);
        let direct = dst.remaining() >= ciphertext.len();
        let out: &mut [u8] = if direct {
            // SAFETY: the cipher only writes `out` (every byte of it on success) and nothing reads it before
            // that; on failure nothing is marked initialized. The memory belongs to `dst`'s unfilled part.
            unsafe {
                let unfilled = dst.unfilled_mut();
                std::slice::from_raw_parts_mut(unfilled.as_mut_ptr().cast::<u8>(), ciphertext.len())
            }
        } else {
            self.plain.clear();
            self.plain.resize(ciphertext.len(), 0);
            self.plain_at = 0;
            &mut self.plain
        };
        let opened = self.rx.key.open_separate_gather(nonce, aad, ciphertext, tag, out);
        if let Whole::Partial = whole {
            self.partial = Vec::new();
        } else {
            advance(&mut self.pending, len);
        }
        if opened.is_err() {
            self.plain.clear();
            return Err(rustls::Error::DecryptError);
        }
        // The content type is the last non-zero byte; zeros after it are padding.
        let Some(end) = out.iter().rposition(|&b| b != 0) else {
            return Err(unexpected("a record without a content type"));
        };
        let typ = out[end];
        if typ == TYPE_APP_DATA {
            if direct {
                // SAFETY: the cipher wrote these bytes.
                unsafe { dst.assume_init(end) };
                dst.advance(end);
            } else {
                self.plain.truncate(end);
            }
            return Ok(());
        }
        let payload = out[..end].to_vec();
        self.plain.clear();
        self.on_control(cx, typ, &payload)
    }

    fn fail<T>(&mut self, cx: &mut Context<'_>, e: rustls::Error) -> Poll<io::Result<T>> {
        let alert = match &e {
            rustls::Error::DecryptError => Some(AlertDescription::BadRecordMac),
            rustls::Error::PeerSentOversizedRecord => Some(AlertDescription::RecordOverflow),
            rustls::Error::InappropriateMessage { .. } | rustls::Error::General(_) => {
                Some(AlertDescription::UnexpectedMessage)
            }
            _ => None,
        };
        if let Some(alert) = alert {
            self.try_send_alert(cx, alert);
        }
        self.read_end = Some(ReadEnd::Failed(e.clone()));
        Poll::Ready(Err(tls_error(e)))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, dst: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = dst.filled().len();
        loop {
            if this.plain_at < this.plain.len() {
                let n = (this.plain.len() - this.plain_at).min(dst.remaining());
                dst.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match &this.read_end {
                Some(ReadEnd::Closed) => return Poll::Ready(Ok(())),
                Some(ReadEnd::Failed(e)) => return Poll::Ready(Err(tls_error(e.clone()))),
                None => {}
            }
            if dst.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let whole = match this.poll_record(cx) {
                Poll::Ready(Ok(Some(whole))) => whole,
                Poll::Ready(Ok(None)) => {
                    if dst.filled().len() > before {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection without sending TLS close_notify",
                    )));
                }
                Poll::Ready(Err(RecordError::Tls(e))) => return this.fail(cx, e),
                Poll::Ready(Err(RecordError::Io(e))) => return Poll::Ready(Err(e)),
                // Hand over what is there rather than wait with it.
                Poll::Pending if dst.filled().len() > before => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            };
            if let Err(e) = this.open_next(cx, whole, dst) {
                return this.fail(cx, e);
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS connection closed for writing",
            )));
        }
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        if this.out.queued() >= this.out_limit {
            ready!(this.poll_drain(cx))?;
        }
        let n = this.seal(bufs).map_err(tls_error)?;
        // Start sending now; what the socket does not take waits for the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.queue_alert(AlertDescription::CloseNotify).map_err(tls_error)?;
            this.write_closed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
