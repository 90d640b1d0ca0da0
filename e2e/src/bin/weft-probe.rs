//! `weft-probe`: the test workload of Weft's end-to-end tests, run inside dev-cluster pods.
//!
//! - `serve --ports 8080 | 20000-20199`: an HTTP server on every port (dual stack) that answers each
//!   request with `peer=<client ip:port> local=<ip:port>` — what the server really saw.
//! - `connect --addr IP --ports P[-Q] [--count N] [--concurrency C]`: N connections (bounded), each a
//!   request to one port in turn; checks every answer names the port it was sent to; prints a JSON
//!   summary (with the bytes the successful ones sent and received) and exits non-zero if any failed.
//! - `get --addr IP:PORT [--mark N] [--marker S]`: one request (carrying S), from a socket with `SO_MARK` N if given; prints
//!   `local_port=<its own port> <the server's answer>`, so a test can tell whether it was captured.
//! - `echo --port P`: echoes every byte back until the client closes (dual stack).
//! - `stream --addr IP:PORT --seconds S [--connections N]`: N connections open at once to an echo
//!   server, each sending a numbered 1 KiB chunk every 100 ms and checking its echo, for S seconds
//!   (bounded). Prints a JSON summary; exits non-zero on any error or mismatch.
//! - `flood --addr IP:PORT --connections N --hold S`: opens N connections (at most 20,000; 256
//!   connecting at a time) to an echo server and sends each a ping: a connection whose ping comes back
//!   is `served` and kept open, one closed or reset first is `refused`, one with no answer in 3 s is
//!   `stalled` (kept open too). Prints `holding {json summary}` and holds them for S seconds (at
//!   most 600), then exits.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

#[derive(Parser)]
enum Cli {
    Serve {
        #[arg(long, value_parser = parse_ports)]
        ports: (u16, u16),
    },
    Connect {
        #[arg(long)]
        addr: IpAddr,
        #[arg(long, value_parser = parse_ports)]
        ports: (u16, u16),
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    Get {
        #[arg(long)]
        addr: SocketAddr,
        /// `SO_MARK` of the client socket (decimal or 0x hex).
        #[arg(long, value_parser = parse_mark)]
        mark: Option<u32>,
        /// Sent in the request (header `x-weft-marker`), for a test to look for on the wire.
        #[arg(long)]
        marker: Option<String>,
    },
    Echo {
        #[arg(long)]
        port: u16,
    },
    Stream {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 1)]
        connections: usize,
    },
    Flood {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        hold: u64,
    },
}

fn parse_mark(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s}: {e}"))
}

fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u16 = a.parse().map_err(|e| format!("{s}: {e}"))?;
    let b: u16 = b.parse().map_err(|e| format!("{s}: {e}"))?;
    if a > b {
        return Err(format!("{s}: empty range"));
    }
    Ok((a, b))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::Serve { ports } => serve(ports).await,
        Cli::Connect {
            addr,
            ports,
            count,
            concurrency,
        } => connect(addr, ports, count, concurrency).await,
        Cli::Get { addr, mark, marker } => get(addr, mark, marker.as_deref()).await,
        Cli::Echo { port } => echo(port).await,
        Cli::Stream {
            addr,
            seconds,
            connections,
        } => {
            stream(
                addr,
                Duration::from_secs(seconds.min(3600)),
                connections.clamp(1, 10_000),
            )
            .await
        }
        Cli::Flood {
            addr,
            connections,
            hold,
        } => flood(addr, connections.min(20_000), Duration::from_secs(hold.min(600))).await,
    }
}

/// A dual-stack listener on `port`, all addresses.
fn listen(port: u16) -> anyhow::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&SocketAddr::from(([0u16; 8], port)).into())
        .with_context(|| format!("binding port {port}"))?;
    socket.listen(1024)?;
    let listener = TcpListener::from_std(socket.into())?;
    Ok(listener)
}

async fn serve((first, last): (u16, u16)) -> anyhow::Result<()> {
    for port in first..=last {
        let listener = listen(port)?;
        tokio::spawn(async move {
            loop {
                if let Ok((stream, peer)) = listener.accept().await {
                    tokio::spawn(answer(stream, peer));
                }
            }
        });
    }
    println!("ready: serving ports {first}-{last}");
    std::future::pending::<()>().await;
    Ok(())
}

async fn answer(mut stream: TcpStream, peer: SocketAddr) {
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    // Read the request head (bounded in size and time).
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 64 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let local = stream
        .local_addr()
        .map(canonical)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let body = format!("peer={} local={local}\n", canonical(peer));
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// IPv4-mapped addresses as plain IPv4, the way a user reads them.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

async fn connect(addr: IpAddr, (first, last): (u16, u16), count: usize, concurrency: usize) -> anyhow::Result<()> {
    let ports: Vec<u16> = (first..=last).collect();
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let failures = Arc::new(tokio::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (ports, next, ok, failures) = (ports.clone(), next.clone(), ok.clone(), failures.clone());
        let bytes = bytes.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let port = ports[i % ports.len()];
                match tokio::time::timeout(Duration::from_secs(10), request(SocketAddr::new(addr, port))).await {
                    Ok(Ok(x)) if x.body.contains(&format!("local={}", SocketAddr::new(addr, port))) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        bytes[0].fetch_add(x.sent, Ordering::Relaxed);
                        bytes[1].fetch_add(x.received, Ordering::Relaxed);
                    }
                    Ok(Ok(x)) => failures
                        .lock()
                        .await
                        .push(format!("port {port}: wrong answer {:?}", x.body)),
                    Ok(Err(e)) => failures.lock().await.push(format!("port {port}: {e}")),
                    Err(_) => failures.lock().await.push(format!("port {port}: timed out")),
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let failures = failures.lock().await;
    let summary = serde_json::json!({
        "ok": ok.load(Ordering::Relaxed),
        "failed": failures.len(),
        "bytes_sent": bytes[0].load(Ordering::Relaxed),
        "bytes_received": bytes[1].load(Ordering::Relaxed),
        "first_failures": failures.iter().take(5).collect::<Vec<_>>(),
    });
    println!("{summary}");
    anyhow::ensure!(failures.is_empty(), "{} of {count} connections failed", failures.len());
    Ok(())
}

async fn get(to: SocketAddr, mark: Option<u32>, marker: Option<&str>) -> anyhow::Result<()> {
    let socket = match to {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(mark) = mark {
        socket2::SockRef::from(&socket)
            .set_mark(mark)
            .context("setting SO_MARK (needs CAP_NET_RAW or CAP_NET_ADMIN)")?;
    }
    let s = tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .context("connect timed out")??;
    let local_port = s.local_addr()?.port();
    let body = tokio::time::timeout(Duration::from_secs(5), exchange_marked(s, marker))
        .await
        .context("request timed out")??
        .body;
    println!("local_port={local_port} {}", body.trim());
    Ok(())
}

/// One request on a new connection: the answer's body, and the bytes sent and received.
async fn request(to: SocketAddr) -> anyhow::Result<Exchanged> {
    exchange_marked(TcpStream::connect(to).await?, None).await
}

struct Exchanged {
    body: String,
    sent: usize,
    received: usize,
}

async fn exchange_marked(mut s: TcpStream, marker: Option<&str>) -> anyhow::Result<Exchanged> {
    let marker = marker.map(|m| format!("x-weft-marker: {m}\r\n")).unwrap_or_default();
    let request = format!("GET / HTTP/1.1\r\nHost: probe\r\n{marker}Connection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .context("no HTTP response")?;
    Ok(Exchanged {
        body,
        sent: request.len(),
        received: out.len(),
    })
}

async fn echo(port: u16) -> anyhow::Result<()> {
    let listener = listen(port)?;
    println!("ready: echo on port {port}");
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

async fn stream(addr: SocketAddr, duration: Duration, connections: usize) -> anyhow::Result<()> {
    let mut streams = Vec::new();
    for _ in 0..connections {
        streams.push(
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                .await
                .context("connect timed out")??,
        );
    }
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for (id, mut s) in streams.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut chunk = vec![0u8; 1024];
            let mut back = vec![0u8; 1024];
            let mut seq: u64 = 0;
            let mut ticker = tokio::time::interval(Duration::from_millis(100));
            while started.elapsed() < duration {
                ticker.tick().await;
                let stamp = format!("conn={id} seq={seq} ");
                chunk.fill(b'.');
                chunk[..stamp.len()].copy_from_slice(stamp.as_bytes());
                s.write_all(&chunk)
                    .await
                    .with_context(|| format!("conn {id} seq {seq}: write"))?;
                tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
                    .await
                    .with_context(|| format!("conn {id} seq {seq}: echo timed out"))?
                    .with_context(|| format!("conn {id} seq {seq}: read"))?;
                anyhow::ensure!(back == chunk, "conn {id} seq {seq}: echo differs");
                seq += 1;
            }
            s.shutdown().await?;
            Ok::<u64, anyhow::Error>(seq)
        }));
    }
    let mut chunks = 0;
    let mut errors = Vec::new();
    for t in tasks {
        match t.await? {
            Ok(n) => chunks += n,
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    println!(
        "{}",
        serde_json::json!({ "connections": connections, "chunks": chunks, "errors": errors.len(), "first_errors": errors.iter().take(5).collect::<Vec<_>>(), "seconds": started.elapsed().as_secs_f64() })
    );
    anyhow::ensure!(errors.is_empty(), "{} of {connections} streams failed", errors.len());
    Ok(())
}

/// How one flood connection fared.
enum Fate {
    Served(TcpStream),
    Stalled(TcpStream),
    Refused,
    ConnectFailed(String),
}

async fn flood(addr: SocketAddr, connections: usize, hold: Duration) -> anyhow::Result<()> {
    raise_fd_limit(connections as u64 + 1024)?;
    let started = std::time::Instant::now();
    let mut held = Vec::new();
    let (mut served, mut stalled, mut refused, mut connect_failed) = (0usize, 0usize, 0usize, 0usize);
    let mut connect_errors = std::collections::BTreeMap::new();
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < connections || !pending.is_empty() {
        while next < connections && pending.len() < 256 {
            next += 1;
            pending.spawn(ping(addr));
        }
        match pending.join_next().await {
            Some(Ok(Fate::Served(s))) => {
                served += 1;
                held.push(s);
            }
            Some(Ok(Fate::Stalled(s))) => {
                stalled += 1;
                held.push(s);
            }
            Some(Ok(Fate::Refused)) => refused += 1,
            Some(Ok(Fate::ConnectFailed(why))) => {
                connect_failed += 1;
                *connect_errors.entry(why).or_insert(0usize) += 1;
            }
            Some(Err(_)) => connect_failed += 1,
            None => {}
        }
    }
    let summary = serde_json::json!({
        "served": served,
        "stalled": stalled,
        "refused": refused,
        "connect_failed": connect_failed,
        "connect_errors": connect_errors,
        "seconds": started.elapsed().as_secs_f64(),
    });
    println!("holding {summary}");
    tokio::time::sleep(hold).await;
    drop(held);
    Ok(())
}

/// One flood connection: connect, send a ping, wait for its echo.
async fn ping(addr: SocketAddr) -> Fate {
    let mut s = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        // Reset before the connect was reported: refused just as surely.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return Fate::Refused,
        Ok(Err(e)) => return Fate::ConnectFailed(e.kind().to_string()),
        Err(_) => return Fate::ConnectFailed("timed out".to_owned()),
    };
    if s.write_all(b"ping").await.is_err() {
        return Fate::Refused;
    }
    let mut back = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut back)).await {
        Ok(Ok(_)) if &back == b"ping" => Fate::Served(s),
        Ok(_) => Fate::Refused,
        Err(_) => Fate::Stalled(s),
    }
}

/// Raises the soft limit on open files to `want` (within the hard limit).
fn raise_fd_limit(want: u64) -> anyhow::Result<()> {
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    anyhow::ensure!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim) } == 0,
        "getrlimit: {}",
        std::io::Error::last_os_error()
    );
    rlim.rlim_cur = rlim.rlim_cur.max(want.min(rlim.rlim_max));
    anyhow::ensure!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) } == 0,
        "setrlimit: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}
