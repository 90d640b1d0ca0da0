//! `weft-load` on loopback: the server, both HTTP modes, idle connections and the request parser.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_bench::{
    http::{HttpArgs, run},
    server::{Batch, HeadTooLarge, MAX_REQUEST_HEAD, RequestReader, Server},
};

const BIN: &str = env!("CARGO_BIN_EXE_weft-load");
const WAIT: Duration = Duration::from_secs(30);

/// Kills and reaps the child on drop, panics included.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Guard {
    fn spawn(args: &[&str], stdin: Stdio) -> Self {
        let child = Command::new(BIN)
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self(child)
    }

    /// Waits (bounded) for the exit.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("weft-load did not exit within {WAIT:?}");
    }

    fn read_all(pipe: Option<impl std::io::Read>) -> String {
        let mut out = String::new();
        pipe.unwrap().read_to_string(&mut out).unwrap();
        out
    }
}

/// The lines of a pipe, read on a thread so that waiting for one is bounded.
fn lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// `weft-load serve` on a free loopback port, and its address.
fn serve() -> (Guard, String) {
    let mut server = Guard::spawn(&["serve", "--listen", "127.0.0.1:0"], Stdio::null());
    let stderr = lines(server.0.stderr.take().unwrap());
    let line = stderr.recv_timeout(WAIT).expect("the server announces its address");
    let addr = line.strip_prefix("listening on ").expect(&line).to_owned();
    (server, addr)
}

#[test]
fn http_keepalive_against_serve() {
    let (_server, addr) = serve();
    let mut client = Guard::spawn(
        &[
            "http",
            "--target",
            &addr,
            "--concurrency",
            "4",
            "--duration",
            "0.3",
            "--warmup",
            "0.1",
        ],
        Stdio::null(),
    );
    let status = client.wait();
    let stdout = Guard::read_all(client.0.stdout.take());
    let stderr = Guard::read_all(client.0.stderr.take());
    assert!(status.success(), "{status}: {stderr}");
    let report: Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    let fields: Vec<&str> = report.as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = [
        "mode",
        "concurrency",
        "requests",
        "errors",
        "seconds",
        "rps",
        "latency_us",
    ];
    expected.sort_unstable();
    let mut sorted = fields.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, expected, "{stdout}");
    assert_eq!(report["mode"], "keepalive");
    assert_eq!(report["concurrency"], 4);
    assert!(report["requests"].as_u64().unwrap() > 0, "{stdout}");
    assert_eq!(report["errors"], 0, "{stdout}");
    let seconds = report["seconds"].as_f64().unwrap();
    assert!((0.3..5.0).contains(&seconds), "{stdout}");
    assert!(report["rps"].as_f64().unwrap() > 0.0, "{stdout}");
    let latency = &report["latency_us"];
    assert_eq!(latency.as_object().unwrap().len(), 5, "{stdout}");
    let [p50, p90, p99, max, mean] = ["p50", "p90", "p99", "max", "mean"].map(|k| latency[k].as_f64().expect(k));
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max, "{stdout}");
    assert!(mean <= max, "{stdout}");
}

#[tokio::test(flavor = "current_thread")]
async fn http_close_opens_a_connection_per_request() {
    let server = Server::bind(&["127.0.0.1:0".parse().unwrap()], 64).unwrap();
    let target = server.local_addrs()[0];
    let accepted = server.accepted();
    let serving = tokio::spawn(server.run());
    let args = HttpArgs {
        target,
        concurrency: 2,
        duration: Duration::from_millis(300),
        warmup: Duration::ZERO,
        close: true,
        max_requests: 5_000,
        threads: 1,
    };
    let report = run(&args).await.unwrap();
    serving.abort();
    assert_eq!(report.mode, "close");
    assert!(report.requests > 0, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    // No warmup: every request is counted but those still in flight when the cap was reached.
    let accepted = accepted.load(Ordering::Relaxed);
    assert!(
        report.requests <= accepted && accepted <= report.requests + 2,
        "{accepted} connections for {report:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn http_keepalive_reuses_connections() {
    let server = Server::bind(&["127.0.0.1:0".parse().unwrap()], 1000).unwrap();
    let target = server.local_addrs()[0];
    let accepted = server.accepted();
    let serving = tokio::spawn(server.run());
    let args = HttpArgs {
        target,
        concurrency: 3,
        duration: Duration::from_secs(5),
        warmup: Duration::from_millis(50),
        close: false,
        max_requests: 500,
        threads: 1,
    };
    let report = run(&args).await.unwrap();
    serving.abort();
    // Stopped by the request cap, well before the deadline.
    assert_eq!(report.requests, 500, "{report:?}");
    assert!(report.seconds < 4.0, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    assert_eq!(accepted.load(Ordering::Relaxed), 3);
}

#[test]
fn idle_holds_connections_until_stdin_closes() {
    let (_server, addr) = serve();
    let mut idle = Guard::spawn(
        &["idle", "--target", &addr, "--connections", "200", "--hold", "60"],
        Stdio::piped(),
    );
    let stdout = lines(idle.0.stdout.take().unwrap());
    let ready: Value = serde_json::from_str(&stdout.recv_timeout(WAIT).expect("a ready line")).unwrap();
    assert_eq!(ready["event"], "ready");
    assert_eq!(ready["connections"], 200);
    assert!(ready["seconds"].as_f64().unwrap() >= 0.0);
    drop(idle.0.stdin.take());
    let closed: Value = serde_json::from_str(&stdout.recv_timeout(WAIT).expect("a closed line")).unwrap();
    assert_eq!(closed, serde_json::json!({"event": "closed", "connections": 200}));
    assert!(idle.wait().success());
}

#[test]
fn idle_fails_naming_the_count() {
    let addr = free_port();
    let mut idle = Guard::spawn(&["idle", "--target", &addr, "--connections", "5"], Stdio::null());
    assert!(!idle.wait().success());
    let stderr = Guard::read_all(idle.0.stderr.take());
    assert!(
        stderr.contains(&format!("idle {addr}: only 0 of 5 connections established")),
        "{stderr}"
    );
}

#[test]
fn http_without_a_server_fails_naming_the_target() {
    let addr = free_port();
    let mut client = Guard::spawn(
        &[
            "http",
            "--target",
            &addr,
            "--concurrency",
            "2",
            "--duration",
            "0.3",
            "--warmup",
            "0",
        ],
        Stdio::null(),
    );
    assert!(!client.wait().success());
    let stderr = Guard::read_all(client.0.stderr.take());
    assert!(
        stderr.contains(&format!("http {addr}: no request succeeded")),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("connect {addr}")), "{stderr}");
}

/// A loopback address nothing listens on (bound, then released).
fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn request_reader() {
    let batch = |complete, close| Ok::<_, HeadTooLarge>(Batch { complete, close });
    let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

    // Split across reads, at every possible point.
    for split in 1..get.len() {
        let mut r = RequestReader::default();
        assert_eq!(r.feed(&get[..split]), batch(0, false));
        assert_eq!(r.feed(&get[split..]), batch(1, false));
        assert_eq!(r.pending(), 0);
    }
    // Byte by byte.
    let mut r = RequestReader::default();
    let mut total = 0;
    for b in get.iter().chain(get) {
        total += r.feed(std::slice::from_ref(b)).unwrap().complete;
    }
    assert_eq!(total, 2);

    // Pipelined, with a partial third request.
    let mut r = RequestReader::default();
    let three = [&get[..], get, &get[..10]].concat();
    assert_eq!(r.feed(&three), batch(2, false));
    assert_eq!(r.pending(), 10);
    assert_eq!(r.feed(&get[10..]), batch(1, false));

    // Connection: close, any case, among other tokens; later requests are ignored.
    for header in ["Connection: close", "connection: CLOSE", "CONNECTION:keep-alive, Close"] {
        let mut r = RequestReader::default();
        let closing = format!("GET / HTTP/1.1\r\n{header}\r\n\r\n");
        let data = [&get[..], closing.as_bytes(), get].concat();
        assert_eq!(r.feed(&data), batch(2, true), "{header}");
    }
    let mut r = RequestReader::default();
    assert_eq!(
        r.feed(b"GET / HTTP/1.1\r\nX-Connection: close\r\n\r\n"),
        batch(1, false)
    );
    assert_eq!(r.feed(b"GET / HTTP/1.1\r\nConnection: closed\r\n\r\n"), batch(1, false));
    assert_eq!(r.feed(b"GET / HTTP/1.0\r\n\r\n"), batch(1, true));
    let mut r = RequestReader::default();
    assert_eq!(
        r.feed(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"),
        batch(1, false)
    );

    // Oversize heads: one large read, or many small ones.
    let huge = [
        &b"GET / HTTP/1.1\r\nX-Big: "[..],
        &vec![b'a'; MAX_REQUEST_HEAD],
        b"\r\n\r\n",
    ]
    .concat();
    assert_eq!(RequestReader::default().feed(&huge), Err(HeadTooLarge));
    let mut r = RequestReader::default();
    let mut result = Ok(Batch::default());
    for chunk in huge.chunks(1024) {
        result = r.feed(chunk);
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, Err(HeadTooLarge));
    // A head of just under the cap is fine.
    let fits = [
        &b"GET / HTTP/1.1\r\nX-Big: "[..],
        &vec![b'a'; MAX_REQUEST_HEAD - 100],
        b"\r\n\r\n",
    ]
    .concat();
    let mut r = RequestReader::default();
    let complete: usize = fits.chunks(1024).map(|c| r.feed(c).unwrap().complete).sum();
    assert_eq!(complete, 1);
}
