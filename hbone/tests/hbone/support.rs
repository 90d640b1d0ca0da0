//! Test CA, test servers and waiting helpers.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, date_time_ymd,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weft_hbone::{
    ConnectError, Credential, Handler, Identity, Pool, PoolConfig, PoolKey, Refusal, Request, ServeError, Transferred,
    TrustBundle, Tunnel, client_config,
    server::{Admission, Limits, serve_with_limits},
    server_config,
};

/// Upper bound on any single test.
pub const TEST_DEADLINE: Duration = Duration::from_secs(30);
pub const TD: &str = "cluster.local";

/// Runs `fut`, failing the test if it takes longer than [`TEST_DEADLINE`].
pub async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, fut)
        .await
        .expect("test deadline exceeded")
}

/// Polls `cond` until it holds, failing after `deadline`.
pub async fn eventually(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn id(ns: &str, sa: &str) -> Identity {
    Identity::try_new(TD, ns, sa).unwrap()
}

// === Ca ===

/// A self-signed ECDSA P-256 CA issuing SPIFFE leaf certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn bundle(&self) -> TrustBundle {
        self.bundle_for(TD)
    }

    pub fn bundle_for(&self, trust_domain: &str) -> TrustBundle {
        TrustBundle::from_pem(trust_domain, &[self.issuer.pem()]).unwrap()
    }

    /// A currently valid leaf for `spiffe_id`.
    pub fn issue(&self, spiffe_id: &str) -> Credential {
        self.issue_valid(spiffe_id, (2000, 1, 1), (4000, 1, 1))
    }

    /// A leaf that expired long ago.
    pub fn issue_expired(&self, spiffe_id: &str) -> Credential {
        self.issue_valid(spiffe_id, (2000, 1, 1), (2001, 1, 1))
    }

    fn issue_valid(&self, spiffe_id: &str, (y0, m0, d0): (i32, u8, u8), (y1, m1, d1): (i32, u8, u8)) -> Credential {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(spiffe_id).unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = date_time_ymd(y0, m0, d0);
        params.not_after = date_time_ymd(y1, m1, d1);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Credential::from_pem(&[cert.pem()], &key.serialize_pem()).unwrap()
    }
}

// === application servers ===

/// An echo server: copies everything back, then closes its write half on EOF.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Reads until EOF, then answers "got <n>" and closes: only works if half-close propagates.
pub async fn counting_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if stream.read_to_end(&mut buf).await.is_ok() {
                    let _ = stream.write_all(format!("got {}", buf.len()).as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    addr
}

// === TestHandler ===

/// What the test handler does with every request.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Connect to this application address (whatever the requested target).
    Forward(SocketAddr),
    Refuse(Refusal),
}

pub struct TestHandler {
    mode: Mode,
    pub opened: Mutex<Vec<Request>>,
    closed_tx: mpsc::UnboundedSender<Result<Transferred, io::ErrorKind>>,
    closed_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Result<Transferred, io::ErrorKind>>>,
    /// Targets no longer allowed; changing it fires the rechecks.
    denied: tokio::sync::watch::Sender<Vec<SocketAddr>>,
}

impl TestHandler {
    pub fn new(mode: Mode) -> Arc<Self> {
        let (closed_tx, closed_rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            mode,
            opened: Mutex::default(),
            closed_tx,
            closed_rx: tokio::sync::Mutex::new(closed_rx),
            denied: tokio::sync::watch::Sender::new(Vec::new()),
        })
    }

    /// From now on tunnels to `target` are no longer allowed: the open ones are rechecked.
    pub fn deny(&self, target: SocketAddr) {
        self.denied.send_modify(|d| d.push(target));
    }

    pub fn opened_count(&self) -> usize {
        self.opened.lock().unwrap().len()
    }

    /// The next `closed` report.
    pub async fn next_closed(&self) -> Result<Transferred, io::ErrorKind> {
        self.closed_rx.lock().await.recv().await.unwrap()
    }
}

impl Handler for TestHandler {
    type Session = SocketAddr;

    async fn open(&self, req: &Request) -> (SocketAddr, Result<TcpStream, Refusal>) {
        self.opened.lock().unwrap().push(req.clone());
        let result = match self.mode {
            Mode::Forward(app) => TcpStream::connect(app).await.map_err(|_| Refusal::Unreachable),
            Mode::Refuse(refusal) => Err(refusal),
        };
        (req.target, result)
    }

    fn closed(&self, _target: SocketAddr, result: Result<Transferred, io::Error>) {
        let _ = self.closed_tx.send(result.map_err(|e| e.kind()));
    }

    fn rechecks(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut denied = self.denied.subscribe();
        async move {
            let _ = denied.changed().await;
        }
    }

    fn allowed(&self, req: &Request) -> bool {
        !self.denied.borrow().contains(&req.target)
    }
}

// === TestServer ===

pub struct TestServer {
    pub addr: SocketAddr,
    pub identity: Identity,
    pub handler: Arc<TestHandler>,
    /// TCP connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    results: tokio::sync::Mutex<mpsc::UnboundedReceiver<Result<(), ServeError>>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TestServer {
    /// An HBONE server on 127.0.0.1 presenting `cred`, trusting `bundle`.
    pub async fn start(cred: &Credential, bundle: &TrustBundle, mode: Mode) -> Self {
        Self::start_with_limits(cred, bundle, mode, Limits::default()).await
    }

    /// As [`TestServer::start`], with `limits` for every client connection.
    pub async fn start_with_limits(cred: &Credential, bundle: &TrustBundle, mode: Mode, limits: Limits) -> Self {
        Self::start_admitting(cred, bundle, mode, limits, None).await
    }

    /// As [`TestServer::start_with_limits`]; with `admission`, a connection it refuses is closed at once.
    pub async fn start_admitting(
        cred: &Credential,
        bundle: &TrustBundle,
        mode: Mode,
        limits: Limits,
        admission: Option<Arc<Admission>>,
    ) -> Self {
        let tls = server_config(cred, bundle).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = TestHandler::new(mode);
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let (handler, accepted, conns) = (handler.clone(), accepted.clone(), conns.clone());
            tokio::spawn(async move {
                while let Ok((tcp, peer)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let admitted = match admission.as_ref().map(|a| a.admit(peer.ip())) {
                        Some(Err(_)) => continue,
                        Some(Ok(admitted)) => Some(admitted),
                        None => None,
                    };
                    let (tls, handler, tx) = (tls.clone(), handler.clone(), tx.clone());
                    let task = tokio::spawn(async move {
                        let _ = tx.send(serve_with_limits(tcp, tls, handler, limits, admitted).await);
                    });
                    conns.lock().unwrap().push(task);
                }
            });
        }
        Self {
            addr,
            identity: cred.identity.clone(),
            handler,
            accepted,
            results: tokio::sync::Mutex::new(rx),
            conns,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The result of the next client connection the server finished serving.
    pub async fn next_result(&self) -> Result<(), ServeError> {
        self.results.lock().await.recv().await.unwrap()
    }

    /// Kills every client connection (as a crashed peer would).
    pub fn kill_connections(&self) {
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

// === client side ===

/// A client workload: its credential and the bundle it trusts.
#[derive(Clone)]
pub struct Client {
    pub cred: Credential,
    pub bundle: TrustBundle,
    pub pool: Pool,
}

impl Client {
    pub fn new(cred: Credential, bundle: TrustBundle, pool: Pool) -> Self {
        Self { cred, bundle, pool }
    }

    /// A tunnel through `server` (expecting `expected`) to `target`.
    pub async fn connect_expecting(
        &self,
        server: SocketAddr,
        expected: &Identity,
        target: SocketAddr,
    ) -> Result<Tunnel, ConnectError> {
        let key = PoolKey {
            source: self.cred.identity.to_string(),
            destination: expected.clone(),
            peer: server,
        };
        let (cred, bundle) = (&self.cred, &self.bundle);
        self.pool
            .connect(
                key,
                || client_config(cred, bundle, expected),
                TcpStream::connect,
                target,
            )
            .await
    }

    pub async fn connect(&self, server: &TestServer, target: SocketAddr) -> Result<Tunnel, ConnectError> {
        self.connect_expecting(server.addr, &server.identity, target).await
    }
}

/// The usual pair: a server `server/api` in `mode` and a client `client/web` with a pool of `config`,
/// both certified by `ca`.
pub async fn pair(ca: &Ca, mode: Mode, config: PoolConfig) -> (TestServer, Client) {
    let server = TestServer::start(&ca.issue("spiffe://cluster.local/ns/server/sa/api"), &ca.bundle(), mode).await;
    let client = Client::new(
        ca.issue("spiffe://cluster.local/ns/client/sa/web"),
        ca.bundle(),
        Pool::new(config),
    );
    (server, client)
}

/// Sends "ping" through `tunnel` (to an echo server) and checks it comes back.
pub async fn echoes(mut tunnel: Tunnel) {
    let (mut near, mut far) = tokio::io::duplex(1024);
    let echo = tokio::spawn(async move { tunnel.splice(&mut far).await });
    near.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    near.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    drop(near);
    let _ = echo.await;
}

/// A target the test handler ignores (it always forwards to its configured application).
pub fn any_target() -> SocketAddr {
    "10.1.2.3:8080".parse().unwrap()
}
