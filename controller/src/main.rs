//! `weft-controller`: parses flags, sets up logging, and hands over to [`weft_controller::app`].
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::Parser as _;
use weft_controller::{
    app::{self, CaFiles, KubernetesSettings},
    ca, k8s, listener,
};

/// Weft's controller: the model (a local store, or a Kubernetes cluster), the mesh CA, and config
/// distribution to node agents.
#[derive(clap::Parser, Debug)]
#[command(
    name = "weft-controller",
    version,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Directory for store.json, the CA (ca/root.pem, ca/root.key) and the published root.pem.
    /// Required with the local source; with --source kubernetes it only gets root.pem, and without
    /// it nothing is written to disk (the CA is in Secret weft-ca, the roots in ConfigMap weft-root-ca).
    #[arg(long, env = "WEFT_STATE_DIR", required_if_eq("source", "local"))]
    state_dir: Option<PathBuf>,
    /// Where the model comes from: `local` (the store in STATE_DIR, changed with weftctl over
    /// --admin-socket) or `kubernetes` (the cluster's API server, by the in-cluster configuration or
    /// KUBECONFIG; no admin socket is served).
    #[arg(long, value_enum, default_value_t = SourceArg::Local)]
    source: SourceArg,
    /// Address for node agents (Config and Ca over TLS).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], weft_api::CONTROLLER_PORT)))]
    listen: SocketAddr,
    /// Unix socket for the Store admin API (weftctl apply/delete/get), mode 0600 [default: STATE_DIR/admin.sock]; local source only.
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// SPIFFE trust domain of the workload identities.
    #[arg(long, default_value = "cluster.local", value_parser = parse_trust_domain)]
    trust_domain: String,
    /// Namespace whose AuthorizationPolicies apply to workloads of every namespace (Istio's root namespace).
    #[arg(long, default_value = weft_model::policy::DEFAULT_ROOT_NAMESPACE, value_parser = parse_namespace)]
    root_namespace: String,
    /// Lifetime of workload certificates (humantime: 24h, 90m, ...).
    #[arg(long, default_value = "24h", value_parser = parse_lifetime)]
    cert_lifetime: Duration,
    /// JSON object {"<node>": "<token>"} of node credentials; must not be readable by group or others.
    /// Local source only: on Kubernetes node agents send their service-account tokens (audience
    /// weft-controller, ServiceAccount weft-node of --namespace), checked by TokenReview.
    #[arg(long, env = "WEFT_NODE_TOKENS")]
    node_tokens: Option<PathBuf>,
    /// The controller's namespace on Kubernetes: Lease weft-controller (leader election), Secret
    /// weft-ca (the CA), ConfigMap weft-root-ca (the published roots), ServiceAccount weft-node (node
    /// agents) [default: the client's namespace: in a pod, its own].
    #[arg(long, env = "POD_NAMESPACE", value_parser = parse_namespace)]
    namespace: Option<String>,
    /// This replica's identity in leader election (Kubernetes): its pod's name [default: the host
    /// name and a random suffix].
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// This replica's pod address (Kubernetes): an IP SAN of its serving certificate, for agents
    /// that connect to it by address.
    #[arg(long, env = "POD_IP")]
    pod_ip: Option<IpAddr>,
    /// Operator-supplied CA certificate (PEM: the CA first, then its issuers up to the root).
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Private key of --ca-cert (PKCS#8 PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// DNS name in the controller's serving certificate (agents check it).
    #[arg(long, default_value = "weft-controller", value_parser = parse_server_name)]
    server_name: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    /// Longest TLS handshake on --listen [default: 10s]. Tests shorten it; every other bound of
    /// --listen is fixed (see docs/architecture.md).
    #[arg(long, hide = true, value_parser = parse_handshake_timeout)]
    handshake_timeout: Option<Duration>,
    /// Large resyncs (a new agent's whole config) sent at a time. After a restart, agents that
    /// need more wait their turn in order of arrival, and are told that they wait.
    #[arg(long, default_value_t = weft_controller::distribution::CONCURRENT_RESYNCS, value_parser = parse_concurrent_resyncs)]
    concurrent_resyncs: usize,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Print Weft's CustomResourceDefinitions (apiextensions.k8s.io/v1) as a YAML stream, for
    /// `kubectl apply -f -`.
    Crds,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SourceArg {
    Local,
    Kubernetes,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Json,
    Plain,
}

fn parse_trust_domain(s: &str) -> Result<String, String> {
    if ca::is_trust_domain(s) {
        Ok(s.to_owned())
    } else {
        Err("a trust domain is lowercase letters, digits, '.', '-' and '_'".into())
    }
}

fn parse_namespace(s: &str) -> Result<String, String> {
    if weft_model::is_dns_label(s) {
        Ok(s.to_owned())
    } else {
        Err("a namespace name is a lowercase DNS label (a-z, 0-9, '-')".into())
    }
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(60) || d > Duration::from_secs(365 * 24 * 3600) {
        return Err("must be between 1m and 365d".into());
    }
    Ok(d)
}

fn parse_concurrent_resyncs(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ 1..=4096) => Ok(n),
        _ => Err("must be a whole number from 1 to 4096".into()),
    }
}

fn parse_handshake_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(60) {
        return Err("must be between 100ms and 60s".into());
    }
    Ok(d)
}

fn parse_server_name(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 253 && s.split('.').all(weft_model::is_dns_label) {
        Ok(s.to_owned())
    } else {
        Err("must be a DNS name (lowercase labels separated by '.')".into())
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Plain => builder.init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Crds) = args.command {
        return match k8s::crd::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weft-controller: cannot render the CRDs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // clap enforces --state-dir for the local source unless a subcommand was given.
    let state_dir = match (args.state_dir, args.source) {
        (Some(dir), _) => dir,
        (None, SourceArg::Kubernetes) => PathBuf::new(),
        (None, SourceArg::Local) => {
            eprintln!("weft-controller: --state-dir is required");
            return ExitCode::FAILURE;
        }
    };
    init_logging(args.log_format);
    let source = match args.source {
        SourceArg::Local => app::Source::Local,
        SourceArg::Kubernetes => {
            if args.admin_socket.is_some() {
                tracing::warn!("--admin-socket is not served with --source kubernetes");
            }
            let identity = match args.pod_name.filter(|n| !n.trim().is_empty()) {
                Some(name) => name.trim().to_owned(),
                None => {
                    let identity = k8s::leader::default_identity();
                    tracing::warn!(
                        identity,
                        "no --pod-name (POD_NAME): leader election uses a made-up identity"
                    );
                    identity
                }
            };
            app::Source::Kubernetes(KubernetesSettings {
                namespace: args.namespace,
                identity,
                pod_ip: args.pod_ip,
                election: k8s::leader::Timings::default(),
            })
        }
    };
    let config = app::Config {
        admin_socket: args.admin_socket.unwrap_or_else(|| state_dir.join("admin.sock")),
        state_dir,
        listen: args.listen,
        trust_domain: args.trust_domain,
        root_namespace: args.root_namespace,
        cert_lifetime: args.cert_lifetime,
        node_tokens: args.node_tokens,
        ca: args.ca_cert.zip(args.ca_key).map(|(cert, key)| CaFiles { cert, key }),
        server_name: args.server_name,
        limits: listener::Limits {
            handshake_timeout: args.handshake_timeout.unwrap_or(listener::HANDSHAKE_TIMEOUT),
            resyncs: weft_controller::distribution::ResyncLimits {
                concurrent: args.concurrent_resyncs,
                ..Default::default()
            },
            ..listener::Limits::default()
        },
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(app::run(config, source)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}
