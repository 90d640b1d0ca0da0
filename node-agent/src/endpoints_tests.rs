//! The endpoints' answers, through the router and through real HTTP on loopback.

use std::time::Instant;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing_subscriber::layer::SubscriberExt as _;

use super::*;
use crate::telemetry;

struct Fixture {
    shared: Arc<Shared>,
    ready: watch::Sender<Readiness>,
    quit: mpsc::Receiver<()>,
    _log: tracing::subscriber::DefaultGuard,
}

fn fixture() -> Fixture {
    let (log, layer) = telemetry::detached("info");
    let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let (ready_tx, ready) = watch::channel(Readiness::Starting("waiting for the controller's config"));
    let (quit_tx, quit) = mpsc::channel(1);
    let shared = Arc::new(Shared {
        log,
        metrics: Arc::new(Metrics::new()),
        ready,
        dump: Box::new(|| serde_json::json!({"node": "node1", "pods": [{"name": "default/app-1"}]})),
        quit: quit_tx,
    });
    Fixture {
        shared,
        ready: ready_tx,
        quit,
        _log: guard,
    }
}

fn ask(f: &Fixture, which: Listener, method: Method, target: &str) -> (StatusCode, String, String) {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let response = respond(which, &method, path, query, &f.shared);
    let status = response.status();
    let content_type = response.headers()[header::CONTENT_TYPE].to_str().unwrap().to_owned();
    let body = futures_body(response);
    (status, content_type, body)
}

fn futures_body(response: Response<Full<Bytes>>) -> String {
    use http_body_util::BodyExt as _;
    let bytes = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(response.into_body().collect())
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn readiness_follows_the_agent_and_says_why_not() {
    let f = fixture();
    let (status, _, body) = ask(&f, Listener::Readiness, Method::GET, "/healthz/ready");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "not ready: waiting for the controller's config\n");
    f.ready.send(Readiness::Ready).unwrap();
    assert_eq!(
        ask(&f, Listener::Readiness, Method::GET, "/healthz/ready"),
        (StatusCode::OK, TEXT.to_owned(), "ready\n".to_owned())
    );
    // The admin listener answers the same.
    assert_eq!(
        ask(&f, Listener::Admin, Method::GET, "/healthz/ready").0,
        StatusCode::OK
    );
    f.ready.send(Readiness::Stopping).unwrap();
    let (status, _, body) = ask(&f, Listener::Readiness, Method::GET, "/healthz/ready");
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down\n")
    );
}

#[test]
fn each_listener_serves_only_its_own_paths() {
    let f = fixture();
    for path in ["/config_dump", "/logging", "/quitquitquit", "/healthz/ready"] {
        assert_eq!(
            ask(&f, Listener::Metrics, Method::GET, path).0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    for path in ["/config_dump", "/logging", "/metrics", "/"] {
        assert_eq!(
            ask(&f, Listener::Readiness, Method::GET, path).0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    // /quitquitquit on a node address would let any pod stop the agent: admin only.
    assert_eq!(
        ask(&f, Listener::Metrics, Method::POST, "/quitquitquit").0,
        StatusCode::NOT_FOUND
    );
    let (status, _, body) = ask(&f, Listener::Admin, Method::GET, "/nope");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.starts_with("/nope: no such endpoint\n/config_dump"), "{body}");
}

#[test]
fn metrics_are_openmetrics_on_both_paths() {
    let f = fixture();
    for (which, path) in [
        (Listener::Metrics, "/metrics"),
        (Listener::Metrics, "/stats/prometheus"),
        (Listener::Admin, "/metrics"),
    ] {
        let (status, content_type, body) = ask(&f, which, Method::GET, path);
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(content_type, OPENMETRICS);
        assert!(body.contains("process_resident_memory_bytes "), "{body}");
        assert!(body.ends_with("# EOF\n"));
    }
    assert_eq!(
        ask(&f, Listener::Metrics, Method::POST, "/metrics").0,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[test]
fn config_dump_is_the_agents_view_as_json() {
    let f = fixture();
    let (status, content_type, body) = ask(&f, Listener::Admin, Method::GET, "/config_dump");
    assert_eq!((status, content_type.as_str()), (StatusCode::OK, JSON));
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["pods"][0]["name"], "default/app-1");
}

#[test]
fn logging_changes_the_filter_at_run_time_and_refuses_what_does_not_parse() {
    let f = fixture();
    assert!(!tracing::enabled!(tracing::Level::DEBUG));
    assert_eq!(
        ask(&f, Listener::Admin, Method::GET, "/logging").2,
        "log filter: info\n"
    );
    let (status, _, body) = ask(&f, Listener::Admin, Method::POST, "/logging?level=debug");
    assert_eq!((status, body.as_str()), (StatusCode::OK, "log filter: debug\n"));
    assert!(tracing::enabled!(tracing::Level::DEBUG), "debug takes effect at once");

    // Directives, escaped as a browser or curl --data-urlencode would send them.
    let (status, _, body) = ask(
        &f,
        Listener::Admin,
        Method::POST,
        "/logging?level=info%2Cweft%3A%3Aaccess%3Doff",
    );
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "log filter: info,weft::access=off\n")
    );
    assert!(!tracing::enabled!(target: "weft::access", tracing::Level::INFO));
    assert!(tracing::enabled!(target: "weft::other", tracing::Level::INFO));

    // Refused, and the filter in force stays.
    for bad in [
        "/logging?level=dbug",
        "/logging?level=info,weft=loud",
        "/logging?level==debug",
        "/logging?level=",
        "/logging?level=%zz",
        "/logging",
    ] {
        let (status, _, body) = ask(&f, Listener::Admin, Method::POST, bad);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    assert_eq!(
        ask(&f, Listener::Admin, Method::GET, "/logging").2,
        "log filter: info,weft::access=off\n"
    );
    // A GET never changes it.
    assert_eq!(
        ask(&f, Listener::Admin, Method::GET, "/logging?level=debug").0,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[test]
fn quitquitquit_takes_post_only() {
    let mut f = fixture();
    assert_eq!(
        ask(&f, Listener::Admin, Method::GET, "/quitquitquit").0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert!(f.quit.try_recv().is_err(), "a GET does not stop the agent");
    assert_eq!(
        ask(&f, Listener::Admin, Method::POST, "/quitquitquit").0,
        StatusCode::OK
    );
    assert!(f.quit.try_recv().is_ok());
}

/// One HTTP/1.1 request on a fresh connection; the status code and body.
async fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8(out).unwrap();
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn served_over_http_and_bounded_in_connections() {
    let f = fixture();
    let loopback = "127.0.0.1:0".parse().unwrap();
    let bound = Bound::bind(&config::Endpoints {
        admin: loopback,
        metrics: loopback,
        readiness: loopback,
    })
    .await
    .unwrap();
    let [admin, metrics, readiness] = bound.local_addrs()[..] else {
        panic!("three listeners")
    };
    bound.spawn(f.shared.clone());
    f.ready.send(Readiness::Ready).unwrap();

    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(http(readiness, &get("/healthz/ready")).await, (200, "ready\n".into()));
    let (status, body) = http(metrics, &get("/stats/prometheus")).await;
    assert_eq!(status, 200);
    assert!(body.contains("process_open_fds "), "{body}");
    let (status, body) = http(
        admin,
        "POST /logging?level=warn HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "log filter: warn\n"));
    assert_eq!(http(admin, "NOT HTTP\r\n\r\n").await.0, 400);

    // Every slot held by a client that sends nothing: the next connection is closed at once, and a
    // slot is free again as soon as one of them goes.
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(readiness).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut extra = tokio::net::TcpStream::connect(readiness).await.unwrap();
        let mut buf = [0u8; 1];
        let closed = matches!(
            tokio::time::timeout(Duration::from_millis(500), extra.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        );
        if closed {
            break;
        }
        // The accept loop may not have taken every idle connection yet.
        assert!(
            Instant::now() < deadline,
            "a connection beyond {MAX_CONNECTIONS} was kept"
        );
    }
    drop(idle.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if http(readiness, &get("/healthz/ready")).await.0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was not reused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn percent_decoding() {
    assert_eq!(percent_decode("a%2Cb+c").unwrap(), "a,b c");
    assert!(percent_decode("%4").is_err());
    assert!(percent_decode("%ff").is_err(), "not UTF-8");
}
