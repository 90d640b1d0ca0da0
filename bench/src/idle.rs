//! `idle`: opens many connections, proves each with one request, then holds them open and idle.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use serde::Serialize;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::http::{REQUEST_TIMEOUT, RESPONSE_BUF, connect, read_response};

#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    /// The server (or proxy) to connect to, `IP:PORT`.
    #[arg(long)]
    pub target: SocketAddr,
    /// Connections to open and hold.
    #[arg(long, value_parser = crate::parse_positive)]
    pub connections: usize,
    /// The longest time to hold them, in seconds (stdin reaching EOF ends it sooner).
    #[arg(long, value_parser = crate::parse_secs, default_value = "600")]
    pub hold: Duration,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256, value_parser = crate::parse_positive)]
    pub connect_concurrency: usize,
}

/// A line of `idle`'s output.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum IdleEvent {
    /// All connections are open and idle.
    Ready { connections: usize, seconds: f64 },
    /// All connections were closed.
    Closed { connections: usize },
}

/// Runs `idle`: prints `ready`, holds until stdin's EOF or `--hold`, closes, prints `closed`.
pub fn main(args: &IdleArgs) -> anyhow::Result<()> {
    let rt = crate::runtime(1).context("building the tokio runtime")?;
    rt.block_on(async {
        let started = Instant::now();
        let connections = establish(args.target, args.connections, args.connect_concurrency).await?;
        let seconds = started.elapsed().as_secs_f64();
        emit(&IdleEvent::Ready {
            connections: connections.len(),
            seconds: (seconds * 1e6).round() / 1e6,
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // A plain thread: a blocking stdin read cannot be cancelled, and this one must not hold up the exit.
        std::thread::Builder::new()
            .name("stdin-eof".into())
            .spawn(move || {
                let mut stdin = std::io::stdin().lock();
                let mut scratch = [0u8; 256];
                while matches!(stdin.read(&mut scratch), Ok(n) if n > 0) {}
                let _ = tx.send(());
            })
            .context("starting the stdin watcher")?;
        tokio::select! {
            _ = rx => {}
            () = tokio::time::sleep(args.hold) => {}
        }
        let count = connections.len();
        drop(connections);
        emit(&IdleEvent::Closed { connections: count })
    })
}

fn emit(event: &IdleEvent) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(event)?).context("writing stdout")?;
    out.flush().context("writing stdout")
}

/// Opens `count` connections to `target`, at most `in_flight` attempts at a time, each proven by one
/// keep-alive request answered 200 (connect and request within 5 s). Fails on the first failure, naming
/// how many connections succeeded.
pub async fn establish(target: SocketAddr, count: usize, in_flight: usize) -> anyhow::Result<Vec<TcpStream>> {
    let request: Arc<[u8]> = format!("GET / HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes().into();
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let workers: Vec<_> = (0..in_flight.clamp(1, count.max(1)))
        .map(|_| {
            let (request, next, failed, first_error) =
                (request.clone(), next.clone(), failed.clone(), first_error.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; RESPONSE_BUF];
                let mut mine = Vec::new();
                while !failed.load(Ordering::Relaxed) && next.fetch_add(1, Ordering::Relaxed) < count {
                    let opened = tokio::time::timeout(REQUEST_TIMEOUT, open(target, &request, &mut buf))
                        .await
                        .unwrap_or_else(|_| Err(anyhow!("connect and request to {target}: timed out after 5 s")));
                    match opened {
                        Ok(stream) => mine.push(stream),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            if let Ok(mut first) = first_error.lock() {
                                first.get_or_insert_with(|| format!("{e:#}"));
                            }
                            break;
                        }
                    }
                }
                mine
            })
        })
        .collect();
    let mut connections = Vec::with_capacity(count);
    for w in workers {
        connections.extend(w.await.context("a connect worker failed")?);
    }
    if failed.load(Ordering::Relaxed) {
        let first = first_error.lock().ok().and_then(|f| f.clone()).unwrap_or_default();
        anyhow::bail!(
            "idle {target}: only {} of {count} connections established; first error: {first}",
            connections.len()
        );
    }
    Ok(connections)
}

async fn open(target: SocketAddr, request: &[u8], buf: &mut [u8]) -> anyhow::Result<TcpStream> {
    let mut stream = connect(target).await?;
    stream.write_all(request).await.context("writing the request")?;
    let head = read_response(&mut stream, buf, false)
        .await
        .with_context(|| format!("request to {target}"))?;
    anyhow::ensure!(!head.close, "request to {target}: the server closed the connection");
    Ok(stream)
}
