//! A minimal Kubernetes API client: what the agent uses of the API and nothing more. The agent is
//! the mesh's cost on every node, so it does not link kube-rs and k8s-openapi; this is built on
//! what it already links for the controller's gRPC channel (hyper's HTTP/2 client, tokio-rustls,
//! serde_json).
//!
//! - [`Client::in_cluster`]: the API server from `KUBERNETES_SERVICE_HOST`/`_PORT`, trusted by the
//!   service account's `ca.crt`, authenticated by its token, which is read again for every request
//!   (kubelet rotates projected tokens).
//! - [`Client::get`], [`Client::merge_patch`], and [`Client::watch`] ([`Watcher`]: list, then watch
//!   from the list's resource version, resume where a stream ended, list again on 410 Gone).
//! - One HTTP/2 connection, opened on first use and again after it closed; an HTTP/2 PING unanswered
//!   in time closes it.
//! - Every request has a deadline ([`Deadlines`]), and every error names the method and URL, and the
//!   status with the API server's reason and message when there is one.

mod types;
mod watch;

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderValue, Method, Request, Response, StatusCode,
    header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE},
};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde::de::DeserializeOwned;
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::TlsConnector;

pub use types::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints, List, ListMeta, Object, ObjectMeta, Status};
pub use watch::{Event, Watcher};

/// Where a pod finds its service account's credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The most an answer other than a watch may hold (a list of the node's pods is far smaller).
const MAX_BODY: usize = 32 << 20;
/// The most of an error answer that is read for its message.
const MAX_ERROR_BODY: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("in-cluster configuration: {name} is not set (is the agent running in a Kubernetes pod?)")]
    NotInCluster { name: &'static str },
    #[error("the API server's URL {url:?}: {problem}")]
    BadUrl { url: String, problem: String },
    #[error("reading {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the API server's CA bundle {path}: {problem}")]
    BadCa { path: PathBuf, problem: String },
    #[error("{method} {url}: reading the service-account token {path}")]
    Token {
        method: Method,
        url: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{method} {url}: the service-account token in {path} is empty or not printable ASCII")]
    BadToken { method: Method, url: String, path: PathBuf },
    #[error("{method} {url}: connecting")]
    Connect {
        method: Method,
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("{method} {url}: the API server did not agree to HTTP/2")]
    NoHttp2 { method: Method, url: String },
    #[error("{method} {url}: {what} took longer than {after:?}")]
    Timeout {
        method: Method,
        url: String,
        what: &'static str,
        after: Duration,
    },
    #[error("{method} {url}")]
    Http {
        method: Method,
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{method} {url}: {status}{}: {message}", if reason.is_empty() { String::new() } else { format!(" ({reason})") })]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        /// The API server's `Status.reason` (`NotFound`, `Expired`...), when it sent one.
        reason: String,
        message: String,
    },
    #[error("{method} {url}: the answer is larger than {limit} bytes")]
    TooLarge { method: Method, url: String, limit: usize },
    #[error("{method} {url}: the answer is not the expected JSON")]
    Decode {
        method: Method,
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The HTTP status the API server answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the API server said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

/// How long each step of a request may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// The TCP connect.
    pub connect: Duration,
    /// The TLS handshake and the HTTP/2 preface.
    pub handshake: Duration,
    /// A request other than a watch, from sending it to the end of its answer.
    pub request: Duration,
    /// A watch asks the API server to end its stream after this long (`timeoutSeconds`); the
    /// agent ends it itself `watch_slack` later, and resumes.
    pub watch: Duration,
    pub watch_slack: Duration,
    /// A PING after this much silence on the connection...
    pub keepalive_interval: Duration,
    /// ...unanswered for this long closes it, and every request and watch on it.
    pub keepalive_timeout: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            handshake: Duration::from_secs(10),
            request: Duration::from_secs(10),
            watch: Duration::from_secs(290),
            watch_slack: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Where the API server is and how to trust and authenticate to it.
#[derive(Clone, Debug)]
pub struct Config {
    /// `https://host:port`.
    pub url: String,
    /// PEM bundle of the CAs the API server's certificate must chain to.
    pub ca_file: PathBuf,
    /// The bearer token, read again for every request.
    pub token_file: PathBuf,
    pub deadlines: Deadlines,
}

impl Config {
    /// The API server as a pod sees it: `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`, and
    /// the service account's CA and token.
    pub fn in_cluster() -> Result<Self, Error> {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        let host = var("KUBERNETES_SERVICE_HOST").ok_or(Error::NotInCluster {
            name: "KUBERNETES_SERVICE_HOST",
        })?;
        let port = var("KUBERNETES_SERVICE_PORT").ok_or(Error::NotInCluster {
            name: "KUBERNETES_SERVICE_PORT",
        })?;
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => host,
        };
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        Ok(Self {
            url: format!("https://{host}:{port}"),
            ca_file: dir.join("ca.crt"),
            token_file: dir.join("token"),
            deadlines: Deadlines::default(),
        })
    }
}

/// A client of one API server. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    /// `https://host:port`, prefixed to every path.
    base: String,
    /// What the TCP connect dials: an address or a DNS name, and the port.
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    token_file: PathBuf,
    deadlines: Deadlines,
    connection: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl Client {
    /// The API server of the cluster the agent runs in ([`Config::in_cluster`]).
    pub fn in_cluster() -> Result<Self, Error> {
        Self::new(Config::in_cluster()?)
    }

    /// A client of the API server `config` names. Reads the CA bundle now; connects on first use.
    pub fn new(config: Config) -> Result<Self, Error> {
        let bad_url = |problem: &str| Error::BadUrl {
            url: config.url.clone(),
            problem: problem.to_owned(),
        };
        let uri: http::Uri = config.url.parse().map_err(|_| bad_url("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad_url("must be https://"));
        }
        let authority = uri.authority().ok_or_else(|| bad_url("no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(443);
        let server_name = match host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(host.clone()).map_err(|_| bad_url("the host is not a DNS name"))?,
        };
        let pem = std::fs::read(&config.ca_file).map_err(|source| Error::Read {
            what: "the API server's CA bundle",
            path: config.ca_file.clone(),
            source,
        })?;
        let bad_ca = |problem: String| Error::BadCa {
            path: config.ca_file.clone(),
            problem,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad_ca(e.to_string()))?;
            roots.add(cert).map_err(|e| bad_ca(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad_ca("no certificate in it".into()));
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad_ca(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            inner: Arc::new(Inner {
                base: format!("https://{authority}"),
                host,
                port,
                server_name,
                tls: TlsConnector::from(Arc::new(tls)),
                token_file: config.token_file,
                deadlines: config.deadlines,
                connection: tokio::sync::Mutex::new(None),
            }),
        })
    }

    pub fn deadlines(&self) -> Deadlines {
        self.inner.deadlines
    }

    /// GETs `path` (with its query) and decodes the answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.json(Method::GET, path, None).await
    }

    /// Applies a JSON merge patch (RFC 7386) to the object at `path` and decodes the object as the
    /// API server stored it.
    pub async fn merge_patch<T: DeserializeOwned>(&self, path: &str, patch: &serde_json::Value) -> Result<T, Error> {
        let body = Bytes::from(patch.to_string());
        self.json(Method::PATCH, path, Some(("application/merge-patch+json", body)))
            .await
    }

    /// Watches the collection at `path` (no query), narrowed by `selector` (already encoded query
    /// parameters such as `fieldSelector=...`, or empty). See [`Watcher`].
    pub fn watch<T: DeserializeOwned>(&self, path: &str, selector: &str) -> Watcher<T> {
        Watcher::new(self.clone(), path, selector)
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<T, Error> {
        let after = self.inner.deadlines.request;
        let deadline = Instant::now() + after;
        let url = self.url(path);
        let response = self.send(method.clone(), path, body, deadline).await?;
        let bytes = read_body(response.into_body(), MAX_BODY, deadline)
            .await
            .map_err(|e| e.into_error(&method, &url, after))?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Decode { method, url, source })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.inner.base)
    }

    /// Sends one request and returns the answer once its headers are in, before `deadline`. An
    /// answer other than 2xx is an [`Error::Status`] with the API server's reason and message.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
        deadline: Instant,
    ) -> Result<Response<Incoming>, Error> {
        let url = self.url(path);
        let token = self.token(&method, &url)?;
        let mut request = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(AUTHORIZATION, token)
            .header(ACCEPT, "application/json");
        let body = match body {
            Some((content_type, bytes)) => {
                request = request.header(CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body)).map_err(|_| Error::BadUrl {
            url: url.clone(),
            problem: "not a valid request URI".into(),
        })?;
        let after = deadline.saturating_duration_since(Instant::now());
        let timeout = || Error::Timeout {
            method: method.clone(),
            url: url.clone(),
            what: "the answer",
            after,
        };
        let response = tokio::time::timeout_at(deadline, self.exchange(&method, &url, request))
            .await
            .map_err(|_| timeout())??;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = read_body(response.into_body(), MAX_ERROR_BODY, deadline)
            .await
            .unwrap_or_default();
        let (reason, message) = match serde_json::from_slice::<Status>(&body) {
            Ok(s) => (s.reason, s.message),
            Err(_) => (
                String::new(),
                String::from_utf8_lossy(&body).trim().chars().take(512).collect(),
            ),
        };
        Err(Error::Status {
            method,
            url,
            status,
            reason,
            message,
        })
    }

    /// The request on the shared connection; once more on a new connection if the shared one
    /// turned out to be closed before the request went out.
    async fn exchange(
        &self,
        method: &Method,
        url: &str,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, Error> {
        let http = |source| Error::Http {
            method: method.clone(),
            url: url.to_owned(),
            source,
        };
        let mut sender = self.sender(method, url).await?;
        if sender.ready().await.is_err() {
            // That connection is closed now: `sender` opens another.
            sender = self.sender(method, url).await?;
            sender.ready().await.map_err(http)?;
        }
        sender.send_request(request).await.map_err(http)
    }

    /// The bearer credential, read now: kubelet replaces a projected token before it expires.
    fn token(&self, method: &Method, url: &str) -> Result<HeaderValue, Error> {
        let path = &self.inner.token_file;
        let token = std::fs::read_to_string(path).map_err(|source| Error::Token {
            method: method.clone(),
            url: url.to_owned(),
            path: path.clone(),
            source,
        })?;
        let token = token.trim();
        HeaderValue::try_from(format!("Bearer {token}"))
            .ok()
            .filter(|_| !token.is_empty())
            .ok_or_else(|| Error::BadToken {
                method: method.clone(),
                url: url.to_owned(),
                path: path.clone(),
            })
    }

    /// The open connection, or a new one.
    async fn sender(&self, method: &Method, url: &str) -> Result<SendRequest<Full<Bytes>>, Error> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(sender) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let sender = self.connect(method, url).await?;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    async fn connect(&self, method: &Method, url: &str) -> Result<SendRequest<Full<Bytes>>, Error> {
        let d = self.inner.deadlines;
        let timeout = |what, after| Error::Timeout {
            method: method.clone(),
            url: url.to_owned(),
            what,
            after,
        };
        let connect_err = |source| Error::Connect {
            method: method.clone(),
            url: url.to_owned(),
            source,
        };
        let tcp = tokio::time::timeout(
            d.connect,
            TcpStream::connect((self.inner.host.as_str(), self.inner.port)),
        )
        .await
        .map_err(|_| timeout("the TCP connect", d.connect))?
        .map_err(connect_err)?;
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            let tls = self
                .inner
                .tls
                .connect(self.inner.server_name.clone(), tcp)
                .await
                .map_err(connect_err)?;
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(Error::NoHttp2 {
                    method: method.clone(),
                    url: url.to_owned(),
                });
            }
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(d.keepalive_interval)
                .keep_alive_timeout(d.keepalive_timeout)
                .keep_alive_while_idle(true)
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|source| Error::Http {
                    method: method.clone(),
                    url: url.to_owned(),
                    source,
                })
        };
        let (sender, connection) = tokio::time::timeout(d.handshake, handshake)
            .await
            .map_err(|_| timeout("the TLS handshake", d.handshake))??;
        let base = self.inner.base.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(api_server = %base, error = %e, "Kubernetes API connection closed");
            }
        });
        Ok(sender)
    }
}

/// Why reading an answer's body stopped.
enum BodyError {
    Http(hyper::Error),
    TooLarge(usize),
    Timeout,
}

impl BodyError {
    fn into_error(self, method: &Method, url: &str, after: Duration) -> Error {
        let (method, url) = (method.clone(), url.to_owned());
        match self {
            BodyError::Http(source) => Error::Http { method, url, source },
            BodyError::TooLarge(limit) => Error::TooLarge { method, url, limit },
            BodyError::Timeout => Error::Timeout {
                method,
                url,
                what: "the answer",
                after,
            },
        }
    }
}

/// The whole body, at most `limit` bytes, before `deadline`.
async fn read_body(mut body: Incoming, limit: usize, deadline: Instant) -> Result<Bytes, BodyError> {
    let mut out = BytesMut::new();
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .map_err(|_| BodyError::Timeout)?;
        match frame {
            None => return Ok(out.freeze()),
            Some(Err(e)) => return Err(BodyError::Http(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > limit {
                        return Err(BodyError::TooLarge(limit));
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

/// `value` as a query parameter's value (RFC 3986 unreserved characters pass, the rest is
/// percent-encoded).
pub fn query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
