//! Wires the controller together: state directory, store, CA, node tokens, the agent-facing gRPC
//! server (Config + Ca, TLS) and the admin server (Store, unix socket).

use std::{
    fs, io,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{sync::watch, task::JoinSet};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use weft_api::v1::{ca_server::CaServer, config_server::ConfigServer, store_server::StoreServer};

use crate::{
    admin::StoreService,
    auth::NodeTokens,
    ca::{Ca, service::CaService},
    distribution::ConfigService,
    listener,
    store::Store,
};

/// How long shutdown waits for the servers to drain before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The controller's settings, validated by the caller (the binary's flag parser).
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds `store.json`, `ca/`, and the published `root.pem`.
    pub state_dir: PathBuf,
    /// The agent-facing gRPC address (TLS). Port 0 picks one; see [`Controller::listen_addr`].
    pub listen: SocketAddr,
    /// The admin (Store) unix socket.
    pub admin_socket: PathBuf,
    pub trust_domain: String,
    /// The namespace whose AuthorizationPolicies apply to workloads of every namespace (Istio's root
    /// namespace); [`weft_model::policy::DEFAULT_ROOT_NAMESPACE`] unless told otherwise.
    pub root_namespace: String,
    pub cert_lifetime: Duration,
    /// `{"<node>": "<token>"}`; `None`: no node can authenticate.
    pub node_tokens: Option<PathBuf>,
    /// An operator-supplied CA instead of the generated root.
    pub ca: Option<CaFiles>,
    /// The DNS name in the serving certificate.
    pub server_name: String,
    /// What one peer of the agent-facing address may cost: [`listener::Limits::default`] unless a test
    /// shortens the handshake deadline.
    pub limits: listener::Limits,
}

#[derive(Clone, Debug)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A running controller.
pub struct Controller {
    listen_addr: SocketAddr,
    admin_socket: PathBuf,
    roots_path: PathBuf,
    store: Arc<Store>,
    shutdown: watch::Sender<bool>,
    servers: JoinSet<(&'static str, Result<(), tonic::transport::Error>)>,
}

/// Starts the controller, runs it until SIGTERM or SIGINT, and shuts it down gracefully.
pub async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut controller = Controller::start(config).await?;
    let failed = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); None }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); None }
        e = controller.failed() => Some(e),
    };
    controller.shutdown().await?;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

// === impl Controller ===

impl Controller {
    /// Sets everything up and starts serving. Fails, naming the file or flag, when the state
    /// directory, the store, the CA or the token file is unusable, or an address cannot be bound.
    pub async fn start(config: Config) -> anyhow::Result<Controller> {
        // World-readable so that agents running as any user can read root.pem; the CA key lives
        // in the private ca/ directory and the store file is 0600.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&config.state_dir)
            .with_context(|| format!("--state-dir: cannot create {}", config.state_dir.display()))?;
        let store = Arc::new(Store::open(&config.state_dir)?);
        let ca = match &config.ca {
            Some(files) => Ca::from_files(&files.cert, &files.key, &config.trust_domain, config.cert_lifetime)
                .context("--ca-cert/--ca-key")?,
            None => Ca::load_or_generate(&config.state_dir, &config.trust_domain, config.cert_lifetime)?,
        };
        let ca = Arc::new(ca);
        let roots_path = ca.publish_roots(&config.state_dir)?;
        let tokens = match &config.node_tokens {
            Some(path) => NodeTokens::load(path).context("--node-tokens")?,
            None => {
                tracing::warn!("no --node-tokens: no node agent can authenticate");
                NodeTokens::none()
            }
        };
        let tokens = Arc::new(tokens);

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("--listen: cannot bind {}", config.listen))?;
        let listen_addr = listener.local_addr().context("--listen: no local address")?;
        let (cert, key) = ca.serving_cert(&config.server_name, config.listen.ip())?;
        let tls = listener::tls_config(&cert, &key).context("--listen")?;
        let admin = bind_admin_socket(&config.admin_socket).await?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let config_service = ConfigService::new(
            store.subscribe(),
            tokens.clone(),
            config.trust_domain.clone(),
            config.root_namespace.clone(),
            shutdown_rx.clone(),
        );
        // Admission and the TLS handshake happen in `listener::incoming`, the HTTP/2 and message
        // bounds here: see `listener` for each bound and why.
        let agents = listener::server()
            .add_service(ConfigServer::new(config_service).max_decoding_message_size(listener::MAX_CONFIG_REQUEST))
            .add_service(
                CaServer::new(CaService::new(ca.clone(), store.subscribe(), tokens.clone()))
                    .max_decoding_message_size(listener::MAX_SIGN_REQUEST),
            )
            .serve_with_incoming_shutdown(
                listener::incoming(listener, tls, config.limits),
                stopped(shutdown_rx.clone()),
            );
        let admin_server = Server::builder()
            .add_service(StoreServer::new(StoreService::new(store.clone())))
            .serve_with_incoming_shutdown(UnixListenerStream::new(admin), stopped(shutdown_rx));
        let mut servers = JoinSet::new();
        servers.spawn(async move { ("agent server", agents.await) });
        servers.spawn(async move { ("admin server", admin_server.await) });
        tracing::info!(
            listen = %listen_addr,
            admin_socket = %config.admin_socket.display(),
            roots = %roots_path.display(),
            trust_domain = config.trust_domain,
            root_namespace = config.root_namespace,
            revision = store.snapshot().revision,
            nodes = tokens.len(),
            "controller started"
        );
        Ok(Controller {
            listen_addr,
            admin_socket: config.admin_socket,
            roots_path,
            store,
            shutdown,
            servers,
        })
    }

    /// The bound agent-facing address (with the real port when `--listen` said 0).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// `<state-dir>/root.pem`: what agents trust.
    pub fn roots_path(&self) -> &Path {
        &self.roots_path
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Resolves when a server stops on its own, with why.
    async fn failed(&mut self) -> anyhow::Error {
        match self.servers.join_next().await {
            Some(Ok((name, Ok(())))) => anyhow::anyhow!("the {name} stopped"),
            Some(Ok((name, Err(e)))) => anyhow::Error::new(e).context(format!("the {name} failed")),
            Some(Err(e)) => anyhow::Error::new(e).context("a server panicked"),
            None => anyhow::anyhow!("no server is running"),
        }
    }

    /// Ends every config stream, lets the servers drain (at most a few seconds) and removes the
    /// admin socket.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        let mut servers = self.servers;
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(joined) = servers.join_next().await {
                match joined {
                    Ok((_, Ok(()))) => {}
                    Ok((name, Err(e))) => tracing::warn!(error = %e, "the {name} failed while stopping"),
                    Err(e) => tracing::warn!(error = %e, "a server panicked"),
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("the servers did not drain in time");
        }
        match fs::remove_file(&self.admin_socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, path = %self.admin_socket.display(), "cannot remove the admin socket"),
        }
        tracing::info!("controller stopped");
        Ok(())
    }
}

/// Resolves when shutdown is requested (or nobody can request it any more).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Binds the admin socket, replacing a stale socket file but refusing to take over one that a
/// running controller still answers on. The socket has mode 0600 from the moment it exists at
/// `path` ([`weft_api::unix::bind_private`]): no other local user ever gets to connect.
async fn bind_admin_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("--admin-socket: cannot create {}", dir.display()))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                anyhow::bail!(
                    "--admin-socket: {} is in use: is another controller running?",
                    path.display()
                );
            }
            fs::remove_file(path).with_context(|| format!("--admin-socket: cannot remove stale {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!("--admin-socket: {} exists and is not a socket", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("--admin-socket: {}", path.display())),
    }
    let listener = weft_api::unix::bind_private(path).context("--admin-socket")?;
    tokio::net::UnixListener::from_std(listener)
        .with_context(|| format!("--admin-socket: cannot serve on {}", path.display()))
}
