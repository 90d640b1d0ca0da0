//! `serve`: a minimal HTTP/1.1 server. Every request (a head without a body) gets `200 OK` with a fixed
//! body; keep-alive and pipelining are supported, `Connection: close` is honoured.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};

/// The largest request head accepted; a longer one closes the connection.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Bytes read per `read` call, into a buffer that lives only during the call (idle connections hold none).
const READ_CHUNK: usize = 1024;
/// The pause after a failed `accept` (e.g. EMFILE) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);
/// The largest response body `--body-bytes` accepts.
const MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// An address to listen on (repeatable), e.g. `0.0.0.0:8080` and `[::]:8080` (IPv6 listeners are
    /// v6-only, so both bind).
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
    /// The size of every response body, in bytes.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Runtime worker threads; 1 runs everything on the main thread.
    #[arg(long, default_value_t = 1, value_parser = crate::parse_positive)]
    pub threads: usize,
}

/// Runs `serve` until the process is killed.
pub fn main(args: &ServeArgs) -> anyhow::Result<()> {
    let rt = crate::runtime(args.threads).context("building the tokio runtime")?;
    rt.block_on(async {
        let server = Server::bind(&args.listen, args.body_bytes)?;
        for addr in server.local_addrs() {
            eprintln!("listening on {addr}");
        }
        server.run().await;
        Ok(())
    })
}

/// Bound listeners and the responses they serve.
pub struct Server {
    listeners: Vec<(SocketAddr, TcpListener)>,
    responses: Arc<Responses>,
    accepted: Arc<AtomicU64>,
}

/// The two responses, built once.
struct Responses {
    keep_alive: Box<[u8]>,
    close: Box<[u8]>,
}

impl Server {
    /// Binds every address (port 0 picks a free port). Must be called inside a tokio runtime.
    pub fn bind(addrs: &[SocketAddr], body_bytes: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(body_bytes <= MAX_BODY, "--body-bytes {body_bytes}: at most {MAX_BODY}");
        let body = vec![b'x'; body_bytes];
        let response = |extra: &str| {
            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {body_bytes}\r\n{extra}\r\n").into_bytes();
            r.extend_from_slice(&body);
            r.into_boxed_slice()
        };
        let responses = Arc::new(Responses {
            keep_alive: response(""),
            close: response("Connection: close\r\n"),
        });
        let mut listeners = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            let listener = listen(addr).with_context(|| format!("listening on {addr}"))?;
            let local = listener.local_addr().with_context(|| format!("listening on {addr}"))?;
            listeners.push((local, listener));
        }
        Ok(Self {
            listeners,
            responses,
            accepted: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The bound addresses, in the order given to [`Server::bind`].
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(a, _)| *a).collect()
    }

    /// A counter of accepted connections (all listeners).
    pub fn accepted(&self) -> Arc<AtomicU64> {
        self.accepted.clone()
    }

    /// Serves forever.
    pub async fn run(self) {
        for (addr, listener) in self.listeners {
            tokio::spawn(accept_loop(
                addr,
                listener,
                self.responses.clone(),
                self.accepted.clone(),
            ));
        }
        std::future::pending::<()>().await;
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until the process ends; an accept error (e.g. EMFILE) is logged and retried after a pause.
async fn accept_loop(addr: SocketAddr, listener: TcpListener, responses: Arc<Responses>, accepted: Arc<AtomicU64>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, responses.clone()));
            }
            Err(e) => {
                eprintln!("weft-load serve: accept on {addr}: {e} (retrying in 10 ms)");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// Answers requests on one connection until the peer closes, an error, an oversize head or a
/// `Connection: close` request.
async fn connection(mut stream: TcpStream, responses: Arc<Responses>) {
    let mut reader = RequestReader::default();
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let batch = {
            // Lives only until the end of this block (no await in it), so it is not part of the task.
            let mut chunk = [0u8; READ_CHUNK];
            let n = match stream.try_read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            };
            match reader.feed(&chunk[..n]) {
                Ok(batch) => batch,
                Err(HeadTooLarge) => return,
            }
        };
        for i in 0..batch.complete {
            let response = if batch.close && i + 1 == batch.complete {
                &responses.close
            } else {
                &responses.keep_alive
            };
            if stream.write_all(response).await.is_err() {
                return;
            }
        }
        if batch.close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Requests completed by one [`RequestReader::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Batch {
    /// Request heads completed, to be answered in order.
    pub complete: usize,
    /// The last of them asked to close the connection (anything after it is ignored).
    pub close: bool,
}

/// A request head over [`MAX_REQUEST_HEAD`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadTooLarge;

/// Splits a byte stream into request heads (requests carry no body). Holds only the bytes of an
/// incomplete head, in a buffer allocated when one is first needed and freed once empty.
#[derive(Debug, Default)]
pub struct RequestReader {
    pending: Vec<u8>,
}

impl RequestReader {
    /// Takes the next bytes read; returns the requests they complete.
    pub fn feed(&mut self, data: &[u8]) -> Result<Batch, HeadTooLarge> {
        if self.pending.is_empty() {
            let (batch, used) = scan(data)?;
            if !batch.close {
                let rest = &data[used..];
                if rest.len() > MAX_REQUEST_HEAD {
                    return Err(HeadTooLarge);
                }
                self.pending.extend_from_slice(rest);
            }
            return Ok(batch);
        }
        self.pending.extend_from_slice(data);
        let (batch, used) = scan(&self.pending)?;
        if batch.close {
            self.pending = Vec::new();
        } else {
            self.pending.drain(..used);
            if self.pending.len() > MAX_REQUEST_HEAD {
                return Err(HeadTooLarge);
            }
            if self.pending.is_empty() {
                self.pending = Vec::new();
            }
        }
        Ok(batch)
    }

    /// Bytes of an incomplete request head held.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Complete heads at the start of `buf` (stopping after one that asks to close), and the bytes they span.
fn scan(buf: &[u8]) -> Result<(Batch, usize), HeadTooLarge> {
    let mut batch = Batch::default();
    let mut used = 0;
    while let Some(end) = crate::header_end(&buf[used..]) {
        if end > MAX_REQUEST_HEAD {
            return Err(HeadTooLarge);
        }
        let head = &buf[used..used + end];
        used += end;
        batch.complete += 1;
        if wants_close(head) {
            batch.close = true;
            break;
        }
    }
    Ok((batch, used))
}

/// `Connection: close` (any case), or HTTP/1.0 without `Connection: keep-alive`.
fn wants_close(head: &[u8]) -> bool {
    let mut close = false;
    let mut keep_alive = false;
    for (name, value) in crate::header_fields(head) {
        if name.eq_ignore_ascii_case(b"connection") {
            close |= crate::has_token(value, b"close");
            keep_alive |= crate::has_token(value, b"keep-alive");
        }
    }
    let request_line = head.split(|&b| b == b'\n').next().unwrap_or_default().trim_ascii();
    close || (request_line.ends_with(b"HTTP/1.0") && !keep_alive)
}
