//! `http`: a closed-loop HTTP/1.1 load generator (C workers, each one request at a time), keep-alive or a
//! new connection per request, reporting throughput and exact latency percentiles.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::stats::{self, Latency};

/// Each connect, and each request (with its connect in close mode), must finish within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A run stops once it has seen more errors than this.
pub const MAX_ERRORS: u64 = 1000;
/// The read buffer of each worker; also the largest response head accepted.
pub(crate) const RESPONSE_BUF: usize = 8 * 1024;

#[derive(clap::Args, Debug, Clone)]
pub struct HttpArgs {
    /// The server (or proxy) to load, `IP:PORT`.
    #[arg(long)]
    pub target: SocketAddr,
    /// Concurrent workers, each with one request in flight at a time.
    #[arg(long, value_parser = crate::parse_positive)]
    pub concurrency: usize,
    /// The measured period, in seconds (fractions allowed).
    #[arg(long, value_parser = crate::parse_secs)]
    pub duration: Duration,
    /// A period before it whose requests are not counted, in seconds.
    #[arg(long, value_parser = crate::parse_secs, default_value = "0.5")]
    pub warmup: Duration,
    /// A new connection per request (`Connection: close`); the latency includes the connect.
    #[arg(long)]
    pub close: bool,
    /// Stop once this many requests have been measured.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_requests: u64,
    /// Runtime worker threads; 1 runs everything on the main thread.
    #[arg(long, default_value_t = 1, value_parser = crate::parse_positive)]
    pub threads: usize,
}

/// The result of a run, printed as one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct HttpReport {
    /// `keepalive` or `close`.
    pub mode: &'static str,
    pub concurrency: usize,
    /// Requests measured (finished after the warmup).
    pub requests: u64,
    /// Failed or timed-out requests and connects, warmup included.
    pub errors: u64,
    /// The measured period's actual length.
    pub seconds: f64,
    /// `requests / seconds`.
    pub rps: f64,
    pub latency_us: Latency,
    /// The first error seen.
    #[serde(skip)]
    pub first_error: Option<String>,
    /// The run stopped after more than [`MAX_ERRORS`] errors.
    #[serde(skip)]
    pub aborted: bool,
}

/// Runs `http`: prints the report on stdout; fails when no request succeeded or errors stopped the run.
pub fn main(args: &HttpArgs) -> anyhow::Result<()> {
    let rt = crate::runtime(args.threads).context("building the tokio runtime")?;
    let report = rt.block_on(run(args))?;
    println!("{}", serde_json::to_string(&report)?);
    let target = args.target;
    let first = report.first_error.as_deref().unwrap_or("none");
    anyhow::ensure!(
        report.requests > 0,
        "http {target}: no request succeeded ({} errors; first error: {first})",
        report.errors
    );
    anyhow::ensure!(
        !report.aborted,
        "http {target}: stopped after more than {MAX_ERRORS} errors (first error: {first})"
    );
    if report.errors > 0 {
        eprintln!(
            "weft-load http {target}: {} errors; first error: {first}",
            report.errors
        );
    }
    Ok(())
}

/// What every worker shares.
struct Shared {
    target: SocketAddr,
    close: bool,
    request: Box<[u8]>,
    measure_start: Instant,
    deadline: Instant,
    max_requests: u64,
    measured: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn record(&self, began: Instant, done: Instant, samples: &mut Vec<u32>) {
        if done < self.measure_start {
            return;
        }
        let n = self.measured.fetch_add(1, Ordering::Relaxed);
        if n < self.max_requests {
            samples.push(u32::try_from(done.duration_since(began).as_nanos()).unwrap_or(u32::MAX));
        }
        if n + 1 >= self.max_requests {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn error(&self, e: anyhow::Error) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1
            && let Ok(mut first) = self.first_error.lock()
        {
            first.get_or_insert_with(|| format!("{e:#}"));
        }
        if n > MAX_ERRORS {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs the load (inside a tokio runtime) and returns its report.
pub async fn run(args: &HttpArgs) -> anyhow::Result<HttpReport> {
    let start = Instant::now();
    let measure_start = start.checked_add(args.warmup).context("--warmup too long")?;
    let deadline = measure_start
        .checked_add(args.duration)
        .context("--duration too long")?;
    let connection = if args.close { "Connection: close\r\n" } else { "" };
    let shared = Arc::new(Shared {
        target: args.target,
        close: args.close,
        request: format!("GET / HTTP/1.1\r\nHost: {}\r\n{connection}\r\n", args.target)
            .into_bytes()
            .into_boxed_slice(),
        measure_start,
        deadline,
        max_requests: args.max_requests,
        measured: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        first_error: Mutex::new(None),
    });
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| tokio::spawn(worker(shared.clone())))
        .collect();
    let mut samples: Vec<u32> = Vec::new();
    for w in workers {
        let mine = w.await.context("a load worker failed")?;
        if samples.is_empty() {
            samples = mine;
        } else {
            samples.extend_from_slice(&mine);
        }
    }
    let seconds = Instant::now().saturating_duration_since(measure_start).as_secs_f64();
    let requests = samples.len() as u64;
    let errors = shared.errors.load(Ordering::Relaxed);
    let first_error = shared.first_error.lock().ok().and_then(|f| f.clone());
    Ok(HttpReport {
        mode: if args.close { "close" } else { "keepalive" },
        concurrency: args.concurrency,
        requests,
        errors,
        seconds: (seconds * 1e6).round() / 1e6,
        rps: if seconds > 0.0 {
            stats::round1(requests as f64 / seconds)
        } else {
            0.0
        },
        latency_us: stats::summarize(&mut samples),
        first_error,
        aborted: errors > MAX_ERRORS,
    })
}

/// One worker: requests one after another until the deadline, the request cap or too many errors.
async fn worker(shared: Arc<Shared>) -> Vec<u32> {
    let mut samples = Vec::new();
    let mut buf = vec![0u8; RESPONSE_BUF].into_boxed_slice();
    let mut conn: Option<TcpStream> = None;
    while !shared.stop.load(Ordering::Relaxed) && Instant::now() < shared.deadline {
        let result = if shared.close {
            close_request(&shared, &mut buf).await
        } else {
            keepalive_request(&shared, &mut conn, &mut buf).await
        };
        match result {
            Ok((began, done)) => shared.record(began, done, &mut samples),
            Err(e) => shared.error(e),
        }
    }
    samples
}

/// One request on the worker's connection (opened first if needed, outside the measured latency); on any
/// failure the connection is dropped, to be reopened by the next request.
async fn keepalive_request(
    shared: &Shared,
    conn: &mut Option<TcpStream>,
    buf: &mut [u8],
) -> anyhow::Result<(Instant, Instant)> {
    let stream = match conn {
        Some(stream) => stream,
        None => conn.insert(
            tokio::time::timeout(REQUEST_TIMEOUT, connect(shared.target))
                .await
                .map_err(|_| anyhow!("connect {}: timed out after 5 s", shared.target))??,
        ),
    };
    let began = Instant::now();
    let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
        stream.write_all(&shared.request).await.context("writing the request")?;
        read_response(stream, buf, false).await
    })
    .await;
    let done = Instant::now();
    match outcome {
        Ok(Ok(head)) => {
            if head.close {
                *conn = None;
            }
            Ok((began, done))
        }
        Ok(Err(e)) => {
            *conn = None;
            Err(e.context(format!("request to {}", shared.target)))
        }
        Err(_) => {
            *conn = None;
            Err(anyhow!("request to {}: timed out after 5 s", shared.target))
        }
    }
}

/// One request on a new connection, read until the server closes it. The server closes first, so the
/// TIME_WAIT state stays on its side and long runs do not use up the client's ephemeral ports.
async fn close_request(shared: &Shared, buf: &mut [u8]) -> anyhow::Result<(Instant, Instant)> {
    let began = Instant::now();
    let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut stream = connect(shared.target).await?;
        stream.write_all(&shared.request).await.context("writing the request")?;
        read_response(&mut stream, buf, true).await
    })
    .await;
    let done = Instant::now();
    match outcome {
        Ok(Ok(_)) => Ok((began, done)),
        Ok(Err(e)) => Err(e.context(format!("request to {}", shared.target))),
        Err(_) => Err(anyhow!("request to {}: timed out after 5 s", shared.target)),
    }
}

/// A TCP connection with TCP_NODELAY.
pub(crate) async fn connect(target: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {target}"))?;
    stream.set_nodelay(true).with_context(|| format!("connect {target}"))?;
    Ok(stream)
}

/// What the client needs from a response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub content_length: Option<u64>,
    /// The server will close the connection (`Connection: close`).
    pub close: bool,
}

/// Parses a response head (status line and headers, through the blank line); anything but 200 is an
/// error, and so is a chunked body (this client only reads `Content-Length` or until close).
pub fn parse_response_head(head: &[u8]) -> anyhow::Result<ResponseHead> {
    let status_line = head.split(|&b| b == b'\n').next().unwrap_or_default().trim_ascii();
    let mut parts = status_line.splitn(3, |&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().unwrap_or_default();
    anyhow::ensure!(
        version.starts_with(b"HTTP/1."),
        "not an HTTP/1 response: {:?}",
        String::from_utf8_lossy(status_line)
    );
    anyhow::ensure!(
        status == b"200",
        "response status {:?}, expected 200",
        String::from_utf8_lossy(status_line)
    );
    let mut parsed = ResponseHead {
        content_length: None,
        close: version == b"HTTP/1.0",
    };
    for (name, value) in crate::header_fields(head) {
        if name.eq_ignore_ascii_case(b"content-length") {
            let text = std::str::from_utf8(value).unwrap_or_default();
            parsed.content_length = Some(
                text.parse()
                    .map_err(|_| anyhow!("bad Content-Length {:?}", String::from_utf8_lossy(value)))?,
            );
        } else if name.eq_ignore_ascii_case(b"connection") {
            parsed.close = crate::has_token(value, b"close");
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            anyhow::bail!(
                "Transfer-Encoding {:?} is not supported (needs Content-Length)",
                String::from_utf8_lossy(value)
            );
        }
    }
    Ok(parsed)
}

/// Reads one full response: the head, then `Content-Length` bytes of body, or (with `until_eof`) every
/// byte until the peer closes. The body is counted, not kept.
pub async fn read_response<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut [u8],
    until_eof: bool,
) -> anyhow::Result<ResponseHead> {
    let mut filled = 0;
    let head_len = loop {
        anyhow::ensure!(filled < buf.len(), "response head over {} bytes", buf.len());
        let n = stream.read(&mut buf[filled..]).await.context("reading the response")?;
        anyhow::ensure!(n > 0, "connection closed before a full response head");
        filled += n;
        if let Some(end) = crate::header_end(&buf[..filled]) {
            break end;
        }
    };
    let head = parse_response_head(&buf[..head_len])?;
    let mut body = (filled - head_len) as u64;
    if until_eof {
        loop {
            let n = stream.read(buf).await.context("reading the response body")?;
            if n == 0 {
                break;
            }
            body += n as u64;
        }
        if let Some(length) = head.content_length {
            anyhow::ensure!(body == length, "body of {body} bytes, Content-Length {length}");
        }
    } else {
        let length = head.content_length.context("response without Content-Length")?;
        anyhow::ensure!(body <= length, "{} bytes after the response body", body - length);
        while body < length {
            let n = stream.read(buf).await.context("reading the response body")?;
            anyhow::ensure!(n > 0, "connection closed after {body} of {length} body bytes");
            body += n as u64;
        }
        anyhow::ensure!(body == length, "{} bytes after the response body", body - length);
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn responses() {
        let mut buf = [0u8; 64];
        let mut ok: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        let head = read_response(&mut ok, &mut buf, false).await.unwrap();
        assert_eq!(head.content_length, Some(3));
        assert!(!head.close);
        let mut closing: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: Close\r\n\r\nabc";
        assert!(read_response(&mut closing, &mut buf, true).await.unwrap().close);
        let mut eof: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n0123456789";
        assert!(read_response(&mut eof, &mut buf, true).await.is_ok());
        for bad in [
            &b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n",
            b"SSH-2.0\r\n\r\n",
        ] {
            let mut r = bad;
            assert!(read_response(&mut r, &mut buf, false).await.is_err(), "{bad:?}");
        }
        let mut big: &[u8] = &[b'a'; 100];
        assert!(read_response(&mut big, &mut buf, false).await.is_err());
    }
}
