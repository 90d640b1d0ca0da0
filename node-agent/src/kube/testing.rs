//! A scripted Kubernetes API server for unit tests: HTTP/2 over TLS on loopback with its own CA; the
//! test sees each request ([`Seen`]) and writes the answer.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    HeaderValue, Method, Request, Response, StatusCode,
    header::{AUTHORIZATION, CONTENT_TYPE},
};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};

use super::{Client, Config, Deadlines};

/// A request the server got, and where its answer goes.
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub auth: String,
    pub content_type: String,
    pub body: Bytes,
    reply: oneshot::Sender<Reply>,
}

pub enum Reply {
    Full(StatusCode, String),
    /// 200, then each line sent; the stream ends when the sender is dropped.
    Stream(mpsc::Receiver<String>),
}

impl Seen {
    pub fn answer(self, status: StatusCode, body: &str) {
        let _ = self.reply.send(Reply::Full(status, body.to_owned()));
    }

    pub fn stream(self) -> mpsc::Sender<String> {
        let (tx, rx) = mpsc::channel(16);
        let _ = self.reply.send(Reply::Stream(rx));
        tx
    }

    /// The value of query parameter `name`.
    pub fn query(&self, name: &str) -> Option<String> {
        let query = self.uri.split_once('?')?.1;
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub requests: mpsc::Receiver<Seen>,
}

impl Server {
    /// Serves HTTP/2 over TLS for `127.0.0.1`; writes `ca.pem` and `token` into a scratch directory.
    pub async fn start(test: &str) -> Server {
        let dir = std::env::temp_dir().join(format!("weft-kube-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let issued = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        std::fs::write(dir.join("ca.pem"), issued.cert.pem()).unwrap();
        std::fs::write(dir.join("token"), "token-1\n").unwrap();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(issued.signing_key.serialize_der());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![issued.cert.der().clone()], key.into())
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, requests) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req| handle(req, tx.clone()));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Server { addr, dir, requests }
    }

    pub fn client(&self) -> Client {
        self.client_with(Deadlines::default())
    }

    pub fn client_with(&self, deadlines: Deadlines) -> Client {
        Client::new(Config {
            url: format!("https://{}", self.addr),
            ca_file: self.dir.join("ca.pem"),
            token_file: self.dir.join("token"),
            deadlines,
        })
        .unwrap()
    }

    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .expect("a request within 10 s")
            .expect("the server runs")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(req: Request<Incoming>, tx: mpsc::Sender<Seen>) -> Result<Response<Body>, Infallible> {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (auth, content_type) = (header(AUTHORIZATION), header(CONTENT_TYPE));
    let method = req.method().clone();
    let uri = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (reply, answer) = oneshot::channel();
    let seen = Seen {
        method,
        uri,
        auth,
        content_type,
        body,
        reply,
    };
    if tx.send(seen).await.is_err() {
        return Ok(full(StatusCode::SERVICE_UNAVAILABLE, ""));
    }
    Ok(match answer.await {
        Ok(Reply::Full(status, body)) => full(status, &body),
        Ok(Reply::Stream(lines)) => {
            let frames = ReceiverStream::new(lines).map(|l| Ok(Frame::data(Bytes::from(l + "\n"))));
            Response::new(StreamBody::new(frames).boxed())
        }
        // The test dropped the request without answering: it never answers.
        Err(_) => std::future::pending().await,
    })
}

fn full(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())).boxed());
    *r.status_mut() = status;
    r
}
