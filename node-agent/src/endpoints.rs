//! The agent's HTTP endpoints, where a hostNetwork DaemonSet's pod serves them on its node: the
//! admin API on loopback (`--admin-address`, 127.0.0.1:15000), Prometheus metrics
//! (`--metrics-address`, :15020) and readiness (`--readiness-address`, :15021). HTTP/1.1, a task
//! per connection, at most [`MAX_CONNECTIONS`] at a time on each listener; a client that sends no
//! request head within [`HEADER_TIMEOUT`] is disconnected.
//!
//! | listener | paths |
//! |---|---|
//! | admin | `/`, `/config_dump`, `/logging` (`POST ?level=SPEC` changes it), `POST /quitquitquit`, `/healthz/ready`, `/metrics`, `/stats/prometheus` |
//! | metrics | `/metrics`, `/stats/prometheus` |
//! | readiness | `/healthz/ready` |

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, watch},
};

use crate::{config, metrics::Metrics, telemetry::LogFilter};

/// Connections served at once on each listener; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection is kept, requests included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether the agent serves its pods, as `/healthz/ready` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Not yet: why.
    Starting(&'static str),
    Ready,
    /// Shutting down: new connections should go elsewhere.
    Stopping,
}

/// What the endpoints show and act on.
pub struct Shared {
    pub log: LogFilter,
    pub metrics: Arc<Metrics>,
    pub ready: watch::Receiver<Readiness>,
    /// The agent's view for `/config_dump`, made when asked.
    pub dump: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// `/quitquitquit`: the agent stops as on SIGTERM outside Kubernetes (a restart: capture stays).
    pub quit: mpsc::Sender<()>,
}

/// Which listener a request came in on; each serves its own paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Admin,
    Metrics,
    Readiness,
}

/// The three listeners, bound: a port in use stops the agent's start, naming the flag.
pub struct Bound {
    listeners: Vec<(Listener, TcpListener)>,
}

impl Bound {
    pub async fn bind(endpoints: &config::Endpoints) -> anyhow::Result<Self> {
        let mut listeners = Vec::new();
        for (which, flag, addr) in [
            (Listener::Admin, "--admin-address", endpoints.admin),
            (Listener::Metrics, "--metrics-address", endpoints.metrics),
            (Listener::Readiness, "--readiness-address", endpoints.readiness),
        ] {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("{flag} {addr}: {e}"))?;
            listeners.push((which, listener));
        }
        Ok(Self { listeners })
    }

    /// The addresses bound, in the order admin, metrics, readiness (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|(_, l)| l.local_addr().ok()).collect()
    }

    /// Serves each listener in its own task, for the life of the runtime.
    pub fn spawn(self, shared: Arc<Shared>) {
        for (which, listener) in self.listeners {
            tokio::spawn(serve(which, listener, shared.clone()));
        }
    }
}

async fn serve(which: Listener, listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(listener = ?which, error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(listener = ?which, "endpoint connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(which, req.method(), req.uri().path(), req.uri().query(), &shared);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(slot);
        });
    }
}

/// The answer to one request.
pub fn respond(
    which: Listener,
    method: &Method,
    path: &str,
    query: Option<&str>,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let serves = match which {
        Listener::Admin => true,
        Listener::Metrics => matches!(path, "/metrics" | "/stats/prometheus"),
        Listener::Readiness => path == "/healthz/ready",
    };
    if !serves {
        return text(StatusCode::NOT_FOUND, format!("{path}: not served here\n"));
    }
    let read_only = |f: &dyn Fn() -> Response<Full<Bytes>>| match *method {
        Method::GET | Method::HEAD => f(),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes GET\n")),
    };
    match path {
        "/" => read_only(&|| text(StatusCode::OK, INDEX.to_owned())),
        "/healthz/ready" => read_only(&|| match &*shared.ready.borrow() {
            Readiness::Ready => text(StatusCode::OK, "ready\n".into()),
            Readiness::Starting(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
            Readiness::Stopping => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down\n".into()),
        }),
        "/metrics" | "/stats/prometheus" => read_only(&|| match shared.metrics.encode() {
            Ok(body) => reply(StatusCode::OK, OPENMETRICS, body.into()),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the metrics could not be encoded\n".into(),
            ),
        }),
        "/config_dump" => read_only(&|| match serde_json::to_vec_pretty(&(shared.dump)()) {
            Ok(mut body) => {
                body.push(b'\n');
                reply(StatusCode::OK, JSON, body.into())
            }
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the dump could not be encoded: {e}\n"),
            ),
        }),
        "/logging" => logging(method, query, &shared.log),
        "/quitquitquit" => match *method {
            Method::POST => {
                let _ = shared.quit.try_send(());
                tracing::info!("/quitquitquit: stopping");
                text(StatusCode::OK, "stopping\n".into())
            }
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "/quitquitquit takes POST\n".into()),
        },
        _ => text(StatusCode::NOT_FOUND, format!("{path}: no such endpoint\n{INDEX}")),
    }
}

const INDEX: &str = "\
/config_dump            the agent's view (JSON)
/logging                the log filter; POST /logging?level=SPEC replaces it (a level or target=level directives)
/quitquitquit           POST: stop (a restart: capture stays attached and refuses connections until an agent returns)
/healthz/ready          200 when serving, 503 before and while stopping
/metrics                Prometheus metrics (also /stats/prometheus)
";

/// `GET /logging` shows the filter, `POST /logging?level=SPEC` replaces it.
fn logging(method: &Method, query: Option<&str>, log: &LogFilter) -> Response<Full<Bytes>> {
    let level = query.and_then(|q| {
        q.split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(k, _)| *k == "level")
            .map(|(_, v)| percent_decode(v))
    });
    match (method, level) {
        (&Method::GET | &Method::HEAD, None) => text(StatusCode::OK, format!("log filter: {}\n", log.current())),
        (&Method::POST, Some(Ok(spec))) => match log.set(&spec) {
            Ok(()) => {
                tracing::info!(filter = %spec, "log filter replaced");
                text(StatusCode::OK, format!("log filter: {spec}\n"))
            }
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        (&Method::POST, Some(Err(e))) => text(StatusCode::BAD_REQUEST, format!("level: {e}\n")),
        (&Method::POST, None) => text(StatusCode::BAD_REQUEST, "POST /logging needs ?level=SPEC\n".into()),
        _ => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /logging shows the filter; POST /logging?level=SPEC changes it\n".into(),
        ),
    }
}

/// `%XX` escapes decoded (`+` is a space, as forms send it); a malformed escape or a result that
/// is not UTF-8 is an error.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("{s:?} has a malformed %-escape"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    reply(status, TEXT, body.into())
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
#[path = "endpoints_tests.rs"]
mod tests;
