//! Wires the controller together: state directory, the model's source (the local store, or the
//! Kubernetes source and its status writer), CA, node authentication, the agent-facing gRPC server
//! (Config + Ca, TLS) and, on the local store, the admin server (Store, unix socket). On Kubernetes
//! also leader election, the CA Secret and the published roots.

use std::{
    fs, io,
    net::{IpAddr, SocketAddr},
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{sync::watch, task::JoinSet};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use weft_api::{
    encoded::config_server::ConfigServer,
    v1::{ca_server::CaServer, store_server::StoreServer},
};

use crate::{
    admin::StoreService,
    auth::{NodeAuth, NodeTokens},
    ca::{Ca, service::CaService},
    distribution::{ConfigService, index::MeshConfig},
    k8s::{self, StatusWriter, TokenReviewer, ca_root, leader},
    listener,
    store::{State, Store},
};

/// How long shutdown waits for the servers to drain before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The controller's settings, validated by the caller (the binary's flag parser).
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds `store.json`, `ca/`, and the published `root.pem`. On Kubernetes only `root.pem` (the
    /// roots are in ConfigMap `weft-root-ca` as well), and it may be empty: nothing is written.
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
    /// `{"<node>": "<token>"}`; `None`: no node can authenticate. Local source only: on Kubernetes
    /// nodes authenticate with service-account tokens ([`k8s::token_review`]).
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Source {
    /// The local store (`<state-dir>/store.json`), changed through the admin socket.
    #[default]
    Local,
    /// A Kubernetes cluster's API server, reached with the in-cluster configuration or
    /// `KUBECONFIG` ([`kube::Client::try_default`]). No admin socket is served.
    Kubernetes(KubernetesSettings),
}

/// Where a replica on Kubernetes is: its namespace (the Lease [`leader::LEASE`], the Secret
/// [`ca_root::CA_SECRET`], the ConfigMap [`ca_root::ROOTS_CONFIG_MAP`], the node agents'
/// ServiceAccount [`k8s::token_review::NODE_SERVICE_ACCOUNT`]), its name and its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// `None`: the client's default namespace (in a pod, the pod's own).
    pub namespace: Option<String>,
    /// This replica's holder identity in the Lease: its pod's name (see
    /// [`leader::default_identity`] otherwise). Two replicas must never share one.
    pub identity: String,
    /// Its pod's address, an IP SAN of its serving certificate (besides `--listen`'s, if specified).
    pub pod_ip: Option<IpAddr>,
    pub election: leader::Timings,
}

/// A running controller on the local store.
pub struct Controller {
    core: Core,
    roots_path: PathBuf,
    admin_socket: PathBuf,
    store: Arc<Store>,
}

/// A running controller on a Kubernetes cluster.
pub struct KubernetesController {
    core: Core,
    states: watch::Receiver<Arc<State>>,
    is_leader: watch::Receiver<bool>,
    roots: Vec<String>,
    roots_path: Option<PathBuf>,
}

/// What both kinds of controller run: the agent-facing server and the tasks that feed it.
struct Core {
    listen_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Tasks,
}

/// The tasks a controller runs, each returning its name and how it ended.
type Tasks = JoinSet<(&'static str, Result<(), tonic::transport::Error>)>;

/// The parts made from the configuration before anything is served.
struct Prepared {
    ca: Arc<Ca>,
    /// Where the roots were written, if anywhere.
    roots_path: Option<PathBuf>,
    auth: Arc<NodeAuth>,
    /// The IP SANs of the serving certificate (unspecified ones are left out).
    serving_ips: Vec<IpAddr>,
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
            Source::Kubernetes(settings) => {
                let client = k8s::client()
                    .await
                    .context("cannot configure a Kubernetes client (in-cluster configuration or KUBECONFIG)")?;
                Running::Kubernetes(KubernetesController::start(config, settings, client).await?)
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
        let roots_path = prepared.roots_path.clone().unwrap_or_default();
        let admin = bind_admin_socket(&config.admin_socket).await?;
        let mut core = Core::serve(&config, prepared, store.subscribe()).await?;
        let admin_server = Server::builder()
            .add_service(StoreServer::new(StoreService::new(store.clone())))
            .serve_with_incoming_shutdown(UnixListenerStream::new(admin), stopped(core.shutdown.subscribe()));
        core.tasks.spawn(async move { ("admin server", admin_server.await) });
        tracing::info!(
            listen = %core.listen_addr,
            admin_socket = %config.admin_socket.display(),
            roots = %roots_path.display(),
            trust_domain = config.trust_domain,
            root_namespace = config.root_namespace,
            revision = store.snapshot().revision,
            source = "local",
            "controller started"
        );
        Ok(Controller {
            core,
            roots_path,
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
        &self.roots_path
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
    /// Starts leader election and the Kubernetes source on `client`, loads the CA (the operator's,
    /// or the Secret's, which the leader creates if there is none: [`ca_root`]), waits for the
    /// source's first complete state (every initial list done: an agent is never served a partial
    /// model), then serves agents, authenticated by TokenReview ([`k8s::token_review`]), whether
    /// leading or not. While leading it also writes each custom resource's `Accepted` condition and
    /// publishes the roots in a ConfigMap. No admin socket: the cluster is changed through its API
    /// server. Fails when the state directory or the operator's CA is unusable, the CA Secret
    /// exists but cannot be used, `--listen` cannot be bound, or the source stops before its first
    /// state; the election then releases what it took.
    pub async fn start(
        config: Config,
        settings: KubernetesSettings,
        client: kube::Client,
    ) -> anyhow::Result<KubernetesController> {
        let write_roots = !config.state_dir.as_os_str().is_empty();
        if write_roots {
            create_state_dir(&config)?;
        }
        if config.node_tokens.is_some() {
            tracing::warn!(
                "--node-tokens is not used on Kubernetes: node agents authenticate with service-account tokens"
            );
        }
        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks: Tasks = JoinSet::new();
        let (is_leader, election) = leader::elect(
            client.clone(),
            &namespace,
            &settings.identity,
            settings.election,
            shutdown_rx.clone(),
        );
        tasks.spawn(async move {
            election.await;
            ("leader election", Ok(()))
        });
        let (outputs, source) = k8s::source(client.clone());
        let stop = shutdown_rx.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = source => {}
                () = stopped(stop) => {}
            }
            ("Kubernetes source", Ok(()))
        });
        let ready = async {
            let ca = match &config.ca {
                Some(files) => Ca::from_files(&files.cert, &files.key, &config.trust_domain, config.cert_lifetime)
                    .context("--ca-cert/--ca-key")?,
                None => ca_root::load_or_create(
                    client.clone(),
                    &namespace,
                    &config.trust_domain,
                    config.cert_lifetime,
                    is_leader.clone(),
                )
                .await
                .context("the mesh CA")?,
            };
            let roots_path = if write_roots {
                Some(ca.publish_roots(&config.state_dir)?)
            } else {
                None
            };
            tracing::info!("waiting for the cluster's initial lists");
            let states = outputs
                .states
                .await
                .context("the Kubernetes source stopped before its first state")?;
            let prepared = Prepared {
                ca: Arc::new(ca),
                roots_path,
                auth: Arc::new(NodeAuth::Kubernetes(Box::new(TokenReviewer::new(
                    client.clone(),
                    &namespace,
                )))),
                serving_ips: [Some(config.listen.ip()), settings.pod_ip]
                    .into_iter()
                    .flatten()
                    .collect(),
            };
            anyhow::Ok((prepared, states))
        };
        let (prepared, states) = match ready.await {
            Ok(ready) => ready,
            Err(e) => {
                stop_tasks(shutdown, tasks).await;
                return Err(e);
            }
        };
        let roots = prepared.ca.roots_pem().to_vec();
        let roots_path = prepared.roots_path.clone();
        let mut core =
            match Core::serve_with(&config, prepared, states.clone(), shutdown, shutdown_rx.clone(), tasks).await {
                Ok(core) => core,
                Err((e, shutdown, tasks)) => {
                    stop_tasks(shutdown, tasks).await;
                    return Err(e);
                }
            };
        let publisher = ca_root::publish_roots(client.clone(), namespace.clone(), roots.concat(), is_leader.clone());
        let stop = shutdown_rx.clone();
        core.tasks.spawn(async move {
            tokio::select! {
                () = publisher => {}
                () = stopped(stop) => {}
            }
            ("roots publisher", Ok(()))
        });
        let conditions = outputs.conditions;
        let leader = is_leader.clone();
        let manager = format!("weft-controller/{}", settings.identity);
        core.tasks.spawn(async move {
            tokio::select! {
                () = StatusWriter::run(client, conditions, leader, &manager) => {}
                () = stopped(shutdown_rx) => {}
            }
            ("status writer", Ok(()))
        });
        let state = states.borrow().clone();
        tracing::info!(
            listen = %core.listen_addr,
            roots = roots_path.as_deref().map(|p| p.display().to_string()),
            trust_domain = config.trust_domain,
            root_namespace = config.root_namespace,
            namespace,
            identity = settings.identity,
            leader = *is_leader.borrow(),
            cluster = state.id,
            revision = state.revision,
            source = "kubernetes",
            "controller started"
        );
        Ok(KubernetesController {
            core,
            states,
            is_leader,
            roots,
            roots_path,
        })
    }

    /// Whether this replica leads (it changes as the election goes).
    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.is_leader.clone()
    }

    /// The mesh roots (PEM) this replica's CA chains to.
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// The bound agent-facing address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.core.listen_addr
    }

    /// `<state-dir>/root.pem`, unless the state directory was left empty.
    pub fn roots_path(&self) -> Option<&Path> {
        self.roots_path.as_deref()
    }

    /// The states the source publishes.
    pub fn states(&self) -> watch::Receiver<Arc<State>> {
        self.states.clone()
    }

    /// Stops leading (releasing the Lease, so that another replica takes over at once), ends every
    /// config stream, stops the source and the status writer, and lets the server drain (at most a
    /// few seconds).
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.core.shutdown().await;
        Ok(())
    }
}

// === impl Core ===

impl Core {
    async fn serve(config: &Config, prepared: Prepared, states: watch::Receiver<Arc<State>>) -> anyhow::Result<Core> {
        let (shutdown, shutdown_rx) = watch::channel(false);
        Core::serve_with(config, prepared, states, shutdown, shutdown_rx, JoinSet::new())
            .await
            .map_err(|(e, _, _)| e)
    }

    /// Binds `--listen` and serves Config and Ca on `states`, alongside `tasks`. On failure the
    /// shutdown sender and the tasks come back with the error, for the caller to stop.
    async fn serve_with(
        config: &Config,
        prepared: Prepared,
        states: watch::Receiver<Arc<State>>,
        shutdown: watch::Sender<bool>,
        shutdown_rx: watch::Receiver<bool>,
        mut tasks: Tasks,
    ) -> Result<Core, (anyhow::Error, watch::Sender<bool>, Tasks)> {
        let Prepared {
            ca, auth, serving_ips, ..
        } = prepared;
        let bound = async {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("--listen: cannot bind {}", config.listen))?;
            let listen_addr = listener.local_addr().context("--listen: no local address")?;
            let (cert, key) = ca.serving_cert_for(&config.server_name, &serving_ips)?;
            let tls = listener::tls_config(&cert, &key).context("--listen")?;
            anyhow::Ok((listener, listen_addr, tls))
        };
        let (listener, listen_addr, tls) = match bound.await {
            Ok(bound) => bound,
            Err(e) => return Err((e, shutdown, tasks)),
        };
        let config_service = ConfigService::new(
            states.clone(),
            auth.clone(),
            MeshConfig {
                trust_domain: config.trust_domain.clone(),
                root_namespace: config.root_namespace.clone(),
            },
            shutdown_rx.clone(),
            config.limits.resyncs,
        );
        // Admission and the TLS handshake happen in `listener::incoming`, the HTTP/2 and message
        // bounds here: see `listener` for each bound and why.
        let agents = listener::server()
            .add_service(ConfigServer::new(config_service).max_decoding_message_size(listener::MAX_CONFIG_REQUEST))
            .add_service(
                CaServer::new(CaService::new(ca.clone(), states, auth.clone()))
                    .max_decoding_message_size(listener::MAX_SIGN_REQUEST),
            )
            .serve_with_incoming_shutdown(listener::incoming(listener, tls, config.limits), stopped(shutdown_rx));
        tasks.spawn(async move { ("agent server", agents.await) });
        tracing::info!(nodes = auth.describe(), "serving node agents");
        Ok(Core {
            listen_addr,
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
        stop_tasks(self.shutdown, self.tasks).await;
        tracing::info!("controller stopped");
    }
}

/// Asks every task to stop and waits for them (at most [`DRAIN_TIMEOUT`]).
async fn stop_tasks(shutdown: watch::Sender<bool>, mut tasks: Tasks) {
    let _ = shutdown.send(true);
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

/// The CA (generated or the operator's), the published roots, and the node credentials of the
/// local source.
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
        roots_path: Some(roots_path),
        auth: Arc::new(NodeAuth::Tokens(tokens)),
        serving_ips: vec![config.listen.ip()],
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
