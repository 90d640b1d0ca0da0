//! A flood of half-open connections against the real `weft-controller` binary's agent listener,
//! alone in its test binary: the test holds 10,000 sockets and raises its file descriptor limit, and
//! it measures the controller process's descriptors and resident memory from /proc.

use std::{
    collections::VecDeque,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Streaming,
    transport::{Certificate, ClientTlsConfig, Endpoint},
};
use weft_api::v1::{Push, StreamRequest, Subscribe, config_client::ConfigClient, stream_request};

const HALF_OPEN: usize = 10_000;
/// Shortened from the default 10 s (hidden flag), so that the test waits for it only briefly.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// What the flood may add to the controller's resident memory.
const RSS_BOUND_KIB: u64 = 8 * 1024;
/// How long the well-behaved agent may take, from TCP connect to its first push, during the flood.
const AGENT_DEADLINE: Duration = Duration::from_secs(5);
/// Descriptors the controller may hold above its baseline for reasons of its own (a log file
/// reopened, a timer): not the flood's.
const FD_SLACK: usize = 4;
const START_DEADLINE: Duration = Duration::from_secs(20);

/// 10,000 connections from one source that never finish (half of them never start) their TLS
/// handshake: the controller closes every one of them by itself (past the source's share at once,
/// the rest at the handshake deadline) while the flooder holds its ends open; its memory stays
/// bounded; an agent from another address is served meanwhile; and every descriptor comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_half_open_connections_are_closed_by_the_controller_and_an_agent_is_served() {
    raise_fd_limit(HALF_OPEN + 1024);
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tokens)
        .unwrap()
        .write_all(br#"{"node1": "token-1"}"#)
        .unwrap();
    let state = dir.path().join("state");
    let controller = Running::start(&state, &tokens, HANDSHAKE_TIMEOUT);
    let root = std::fs::read_to_string(state.join("root.pem")).unwrap();

    // One agent first, so that what a served connection allocates once is in the baseline.
    let fds_before = controller.fds();
    drop(subscribe(controller.addr, &root).await);
    eventually(
        "the warm-up agent's descriptor to come back",
        Duration::from_secs(10),
        || controller.fds() <= fds_before,
    )
    .await;
    let rss_before = controller.rss_kib();

    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pid) = (peak.clone(), sampling.clone(), controller.child.id());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let addr = controller.addr;
    let flood_started = Instant::now();
    let flood = tokio::task::spawn_blocking(move || {
        (0..HALF_OPEN)
            .map(|i| {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                socket
                    .bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
                    .unwrap();
                socket.connect(&addr.into()).unwrap();
                if i % 2 == 1 {
                    // The start of a ClientHello: a handshake record header announcing 512 bytes,
                    // and its first byte. The rest never comes.
                    let _ = (&socket).write(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
                }
                socket.set_nonblocking(true).unwrap();
                socket
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let flooded_in = flood_started.elapsed();

    // A well-behaved agent from another address, while the flood holds everything it can.
    let started = Instant::now();
    let agent = tokio::time::timeout(AGENT_DEADLINE, subscribe(addr, &root))
        .await
        .unwrap_or_else(|_| panic!("the agent got no push within {AGENT_DEADLINE:?} during the flood"));
    let agent_took = started.elapsed();
    drop(agent);

    // The flooder keeps its ends open: the controller closes them by itself.
    let mut open = flood;
    let mut closed = Vec::with_capacity(HALF_OPEN);
    let deadline = HANDSHAKE_TIMEOUT + Duration::from_secs(10);
    let waiting = Instant::now();
    while !open.is_empty() {
        let (gone, still): (Vec<_>, Vec<_>) = open.into_iter().partition(closed_by_peer);
        closed.extend(gone);
        open = still;
        assert!(
            open.is_empty() || waiting.elapsed() < deadline,
            "after {deadline:?} the controller still holds {} of {HALF_OPEN} half-open connections (it holds {} descriptors, {} before the flood; its RSS grew by {} KiB)",
            open.len(),
            controller.fds(),
            fds_before,
            peak.load(Ordering::Relaxed).saturating_sub(rss_before),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_closed_in = waiting.elapsed();
    eventually(
        "the controller's descriptors back to their baseline",
        Duration::from_secs(10),
        || controller.fds() <= fds_before + FD_SLACK,
    )
    .await;
    let fds_during = controller.fds();
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let grown = peak.load(Ordering::Relaxed).saturating_sub(rss_before);

    drop(closed);
    eventually(
        "the controller's descriptors back to their baseline",
        Duration::from_secs(10),
        || controller.fds() <= fds_before + FD_SLACK,
    )
    .await;
    eprintln!(
        "flood of {HALF_OPEN} in {flooded_in:?}; agent served in {agent_took:?}; all closed by the controller {all_closed_in:?} after the agent; controller fds {fds_before} before, {fds_during} with the flood held, {} after; RSS {rss_before} KiB before, peak +{grown} KiB",
        controller.fds()
    );
    assert!(
        grown < RSS_BOUND_KIB,
        "the flood cost the controller {grown} KiB (bound {RSS_BOUND_KIB} KiB)"
    );
    controller.stop().await;
}

/// The peer closed (FIN or RST) a non-blocking socket; data it sent is read and dropped.
fn closed_by_peer(socket: &Socket) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match (&*socket).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// An agent's open config stream: its requests and the pushes.
struct Agent {
    _requests: mpsc::Sender<StreamRequest>,
    _pushes: Streaming<Push>,
}

/// Connects as node1 over TLS, subscribes and waits for the first push; the stream stays open until
/// the agent is dropped.
async fn subscribe(addr: SocketAddr, root: &str) -> Agent {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root))
        .domain_name("weft-controller");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(StreamRequest {
        kind: Some(stream_request::Kind::Subscribe(Subscribe {
            node: "node1".into(),
            types: Vec::new(),
            held: None,
            accepts_queued: false,
        })),
    })
    .await
    .unwrap();
    let mut request = Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", "Bearer token-1".parse().unwrap());
    let mut stream = ConfigClient::new(channel).stream(request).await.unwrap().into_inner();
    let push = stream.message().await.unwrap().expect("a first push");
    assert!(push.full);
    Agent {
        _requests: tx,
        _pushes: stream,
    }
}

/// Polls `cond` until it holds, failing after `deadline`.
async fn eventually(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Raises the soft limit on open files to `want` (or the hard limit, if lower; then the test fails
/// naming it). The controller started afterwards inherits it, so that it is the admission bounds,
/// not the descriptor limit, that stop a flood.
fn raise_fd_limit(want: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read only the struct passed.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    let want = want as libc::rlim_t;
    assert!(
        limit.rlim_max >= want,
        "the hard limit on open files is {}; this test needs {want}",
        limit.rlim_max
    );
    if limit.rlim_cur < want {
        limit.rlim_cur = want;
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The controller binary, killed and reaped on drop so that a failing test leaves nothing behind.
struct Running {
    child: Child,
    addr: SocketAddr,
    /// The last lines it logged, for failure messages.
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Running {
    fn start(state: &Path, tokens: &Path, handshake_timeout: Duration) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weft-controller"))
            .arg("--state-dir")
            .arg(state)
            .arg("--node-tokens")
            .arg(tokens)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--handshake-timeout")
            .arg(humantime_secs(handshake_timeout))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            // Drains the controller's log for as long as it runs (a full pipe would stop it).
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(addr) = listen_addr(&line) {
                        let _ = tx.send(addr);
                    }
                    let mut log = log.lock().unwrap();
                    if log.len() == 50 {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            });
        }
        let running = |addr| Running { child, addr, log };
        match rx.recv_timeout(START_DEADLINE) {
            Ok(addr) => running(addr),
            Err(_) => {
                let mut r = running("0.0.0.0:0".parse().unwrap());
                let status = r.child.try_wait().unwrap();
                panic!(
                    "the controller did not start in time ({status:?}): {:?}",
                    r.log.lock().unwrap()
                );
            }
        }
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("the controller's descriptors: {e}; log: {:?}", self.log.lock().unwrap()))
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// SIGTERM, and a clean exit within a few seconds.
    async fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "controller exited with {status}");
                return;
            }
            assert!(start.elapsed() < START_DEADLINE, "controller did not exit in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `listen` of the JSON line `controller started`.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if fields.get("message")?.as_str()? != "controller started" {
        return None;
    }
    fields.get("listen")?.as_str()?.parse().ok()
}

fn humantime_secs(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}
