//! Wires the controller together: state directory, the model's source (the local store, or the
//! Kubernetes source and its status writer), CA, node tokens, the agent-facing gRPC server (Config +
//! Ca, TLS) and, on the local store, the admin server (Store, unix socket).

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
    k8s::{self, StatusWriter},
    listener,
    store::{State, Store},
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

/// Where the model comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Source {
    /// The local store (`<state-dir>/store.json`), changed through the admin socket.
    #[default]
    Local,
    /// A Kubernetes cluster's API server, reached with the in-cluster configuration or
    /// `KUBECONFIG` ([`kube::Client::try_default`]). No admin socket is served.
    Kubernetes,
}

/// A running controller on the local store.
pub struct Controller {
    core: Core,
    admin_socket: PathBuf,
    store: Arc<Store>,
}

/// A running controller on a Kubernetes cluster.
pub struct KubernetesController {
    core: Core,
    states: watch::Receiver<Arc<State>>,
}

/// What both kinds of controller run: the agent-facing server and the tasks that feed it.
struct Core {
    listen_addr: SocketAddr,
    roots_path: PathBuf,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<(&'static str, Result<(), tonic::transport::Error>)>,
}

/// The parts made from the configuration before anything is served.
struct Prepared {
    ca: Arc<Ca>,
    roots_path: PathBuf,
    tokens: Arc<NodeTokens>,
}

/// Starts the controller on `source`, runs it until SIGTERM or SIGINT, and shuts it down
/// gracefully.
pub async fn run(config: Config, source: Source) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let starting = async {
        anyhow::Ok(match source {
            Source::Local => Running::Local(Controller::start(config).await?),
            Source::Kubernetes => {
                let client = k8s::client()
                    .await
                    .context("cannot configure a Kubernetes client (in-cluster configuration or KUBECONFIG)")?;
                Running::Kubernetes(KubernetesController::start(config, client).await?)
            }
        })
    };
    // Starting may wait long (for the cluster's initial lists): a signal stops it too.
    let mut running = tokio::select! {
        running = starting => running?,
        _ = term.recv() => { tracing::info!("SIGTERM while starting: stopping"); return Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT while starting: stopping"); return Ok(()) }
    };
    let core = match &mut running {
        Running::Local(c) => &mut c.core,
        Running::Kubernetes(c) => &mut c.core,
    };
    let failed = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); None }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); None }
        e = core.failed() => Some(e),
    };
    match running {
        Running::Local(c) => c.shutdown().await?,
        Running::Kubernetes(c) => c.shutdown().await?,
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A controller of either source, for [`run`].
enum Running {
    Local(Controller),
    Kubernetes(KubernetesController),
}

// === impl Controller ===

impl Controller {
    /// Sets everything up and starts serving. Fails, naming the file or flag, when the state
    /// directory, the store, the CA or the token file is unusable, or an address cannot be bound.
    pub async fn start(config: Config) -> anyhow::Result<Controller> {
        create_state_dir(&config)?;
        let store = Arc::new(Store::open(&config.state_dir)?);
        let prepared = prepare(&config)?;
        let admin = bind_admin_socket(&config.admin_socket).await?;
        let mut core = Core::serve(&config, prepared, store.subscribe()).await?;
        let admin_server = Server::builder()
            .add_service(StoreServer::new(StoreService::new(store.clone())))
            .serve_with_incoming_shutdown(UnixListenerStream::new(admin), stopped(core.shutdown.subscribe()));
        core.tasks.spawn(async move { ("admin server", admin_server.await) });
        tracing::info!(
            listen = %core.listen_addr,
            admin_socket = %config.admin_socket.display(),
            roots = %core.roots_path.display(),
            trust_domain = config.trust_domain,
            root_namespace = config.root_namespace,
            revision = store.snapshot().revision,
            source = "local",
            "controller started"
        );
        Ok(Controller {
            core,
            admin_socket: config.admin_socket,
            store,
        })
    }

    /// The bound agent-facing address (with the real port when `--listen` said 0).
    pub fn listen_addr(&self) -> SocketAddr {
        self.core.listen_addr
    }

    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// `<state-dir>/root.pem`: what agents trust.
    pub fn roots_path(&self) -> &Path {
        &self.core.roots_path
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Ends every config stream, lets the servers drain (at most a few seconds) and removes the
    /// admin socket.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.core.shutdown().await;
        match fs::remove_file(&self.admin_socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, path = %self.admin_socket.display(), "cannot remove the admin socket"),
        }
        Ok(())
    }
}

// === impl KubernetesController ===

impl KubernetesController {
    /// Sets up the CA and node credentials, starts the Kubernetes source on `client`, waits for its
    /// first complete state (every initial list done: an agent is never served a partial model),
    /// then serves agents and writes each custom resource's `Accepted` condition. Until leader
    /// election exists, this replica is always the status writer. No admin socket: the cluster is
    /// changed through its API server.
    pub async fn start(config: Config, client: kube::Client) -> anyhow::Result<KubernetesController> {
        create_state_dir(&config)?;
        let prepared = prepare(&config)?;
        let (outputs, source) = k8s::source(client.clone());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let stop = shutdown_rx.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = source => {}
                () = stopped(stop) => {}
            }
            ("Kubernetes source", Ok(()))
        });
        tracing::info!("waiting for the cluster's initial lists");
        let states = outputs
            .states
            .await
            .context("the Kubernetes source stopped before its first state")?;
        let mut core =
            Core::serve_with(&config, prepared, states.clone(), shutdown, shutdown_rx.clone(), tasks).await?;
        let (_, is_leader) = watch::channel(true);
        let conditions = outputs.conditions;
        core.tasks.spawn(async move {
            tokio::select! {
                () = StatusWriter::run(client, conditions, is_leader) => {}
                () = stopped(shutdown_rx) => {}
            }
            ("status writer", Ok(()))
        });
        let state = states.borrow().clone();
        tracing::info!(
            listen = %core.listen_addr,
            roots = %core.roots_path.display(),
            trust_domain = config.trust_domain,
            root_namespace = config.root_namespace,
            cluster = state.id,
            revision = state.revision,
            source = "kubernetes",
            "controller started"
        );
        Ok(KubernetesController { core, states })
    }

    /// The bound agent-facing address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.core.listen_addr
    }

    /// `<state-dir>/root.pem`: what agents trust.
    pub fn roots_path(&self) -> &Path {
        &self.core.roots_path
    }

    /// The states the source publishes.
    pub fn states(&self) -> watch::Receiver<Arc<State>> {
        self.states.clone()
    }

    /// Ends every config stream, stops the source and the status writer, and lets the server
    /// drain (at most a few seconds).
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.core.shutdown().await;
        Ok(())
    }
}

// === impl Core ===

impl Core {
    async fn serve(config: &Config, prepared: Prepared, states: watch::Receiver<Arc<State>>) -> anyhow::Result<Core> {
        let (shutdown, shutdown_rx) = watch::channel(false);
        Core::serve_with(config, prepared, states, shutdown, shutdown_rx, JoinSet::new()).await
    }

    /// Binds `--listen` and serves Config and Ca on `states`, alongside `tasks`.
    async fn serve_with(
        config: &Config,
        prepared: Prepared,
        states: watch::Receiver<Arc<State>>,
        shutdown: watch::Sender<bool>,
        shutdown_rx: watch::Receiver<bool>,
        mut tasks: JoinSet<(&'static str, Result<(), tonic::transport::Error>)>,
    ) -> anyhow::Result<Core> {
        let Prepared { ca, roots_path, tokens } = prepared;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("--listen: cannot bind {}", config.listen))?;
        let listen_addr = listener.local_addr().context("--listen: no local address")?;
        let (cert, key) = ca.serving_cert(&config.server_name, config.listen.ip())?;
        let tls = listener::tls_config(&cert, &key).context("--listen")?;
        let config_service = ConfigService::new(
            states.clone(),
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
                CaServer::new(CaService::new(ca.clone(), states, tokens.clone()))
                    .max_decoding_message_size(listener::MAX_SIGN_REQUEST),
            )
            .serve_with_incoming_shutdown(listener::incoming(listener, tls, config.limits), stopped(shutdown_rx));
        tasks.spawn(async move { ("agent server", agents.await) });
        tracing::info!(nodes = tokens.len(), "serving node agents");
        Ok(Core {
            listen_addr,
            roots_path,
            shutdown,
            tasks,
        })
    }

    /// Resolves when a server or task stops on its own, with why.
    async fn failed(&mut self) -> anyhow::Error {
        match self.tasks.join_next().await {
            Some(Ok((name, Ok(())))) => anyhow::anyhow!("the {name} stopped"),
            Some(Ok((name, Err(e)))) => anyhow::Error::new(e).context(format!("the {name} failed")),
            Some(Err(e)) => anyhow::Error::new(e).context("a task panicked"),
            None => anyhow::anyhow!("no server is running"),
        }
    }

    /// Ends every config stream and every task, and lets the servers drain (at most a few seconds).
    async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let mut tasks = self.tasks;
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((_, Ok(()))) => {}
                    Ok((name, Err(e))) => tracing::warn!(error = %e, "the {name} failed while stopping"),
                    Err(e) => tracing::warn!(error = %e, "a task panicked"),
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("the servers did not drain in time");
        }
        tracing::info!("controller stopped");
    }
}

/// Creates the state directory: world-readable so that agents running as any user can read
/// root.pem; the CA key lives in the private ca/ directory and the store file is 0600.
fn create_state_dir(config: &Config) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&config.state_dir)
        .with_context(|| format!("--state-dir: cannot create {}", config.state_dir.display()))
}

/// The CA (generated or the operator's), the published roots, and the node credentials.
fn prepare(config: &Config) -> anyhow::Result<Prepared> {
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
    Ok(Prepared {
        ca,
        roots_path,
        tokens: Arc::new(tokens),
    })
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
