//! The agent's configuration: parsed and validated before anything binds or attaches.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, ValueEnum};
use weft_dataplane::socket::CongestionControl;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Command-line arguments of `weft-node`.
#[derive(Clone, Debug, Parser)]
#[command(name = "weft-node", version, about = "Weft's per-node zero-trust tunnel agent")]
pub struct Args {
    /// Name of the node this agent serves; only pods on this node are captured.
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node: String,
    /// The agent runs in a Kubernetes cluster (as a DaemonSet's pod) and uses its API: to find the
    /// controller (`--controller-endpoints`), to write each pod's `weft.dev/redirection`
    /// annotation, to tell an uninstall from a restart, and to find running pods' network
    /// namespaces at start.
    #[arg(long, env = "WEFT_KUBERNETES")]
    pub kubernetes: bool,
    /// The controller's gRPC endpoint (config and CA), e.g. `https://172.30.0.1:15012`.
    #[arg(
        long,
        env = "WEFT_CONTROLLER",
        required_unless_present = "controller_endpoints",
        conflicts_with = "controller_endpoints"
    )]
    pub controller: Option<String>,
    /// The controller's Service, `<namespace>/<service>` (with `--kubernetes`): the agent follows its
    /// `Endpoints` and connects to a ready replica on the port named `grpc` (or the only port),
    /// failing over to another one when it goes away.
    #[arg(long, value_name = "NAMESPACE/SERVICE", requires = "kubernetes")]
    pub controller_endpoints: Option<String>,
    /// The mesh root the controller's certificate is checked against (the controller publishes it
    /// as `<state-dir>/root.pem`).
    #[arg(long)]
    pub controller_ca: PathBuf,
    /// The name in the controller's certificate.
    #[arg(long, default_value = "weft-controller")]
    pub controller_name: String,
    /// File holding this node's credential for the controller; read again for every call (a
    /// projected service-account token is replaced by kubelet before it expires).
    #[arg(long)]
    pub node_token_file: PathBuf,
    /// This agent's own DaemonSet, `<namespace>/<name>` (with `--kubernetes`): on SIGTERM, if it is
    /// gone or being deleted, the agent uninstalls itself from the node.
    #[arg(
        long,
        env = "WEFT_DAEMONSET",
        value_name = "NAMESPACE/NAME",
        default_value = "weft-system/weft-node"
    )]
    pub daemonset: String,
    /// The node's CNI configuration directory (as mounted in the agent): on an uninstall the agent
    /// takes `weft-cni` out of its chain (with `--cni-bin-dir`, the plugin too) before releasing
    /// any pod, so that no new pod asks an agent that is gone.
    #[arg(long, requires = "cni_bin_dir")]
    pub cni_conf_dir: Option<PathBuf>,
    /// The node's CNI plugin directory (as mounted in the agent).
    #[arg(long, requires = "cni_conf_dir")]
    pub cni_bin_dir: Option<PathBuf>,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Unix socket the CNI plugin reports pods on.
    #[arg(long, default_value = "/run/weft/cni.sock")]
    pub cni_socket: PathBuf,
    /// Where the agent keeps what it must know across restarts (pod networks).
    #[arg(long, default_value = "/run/weft/node")]
    pub state_dir: PathBuf,
    /// bpffs directory for this agent's pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/weft")]
    pub bpf_pin_dir: PathBuf,
    /// cgroup v2 directory whose processes are subject to capture; the agent must run inside it.
    /// `auto`: the nearest ancestor of the agent's own cgroup named `kubepods` or `kubepods.slice`
    /// (Kubernetes' pod cgroups).
    #[arg(long, value_name = "DIR|auto")]
    pub cgroup: PathBuf,
    #[arg(long, value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Threads that run the data path. Default: one per CPU the agent may use, at most 4. Each
    /// handoff between threads is a wakeup, so a node with few cores is faster with fewer threads.
    #[arg(long, env = "WEFT_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// TCP congestion control of the HBONE connections between agents, both ways; `system` leaves
    /// each pod's default. Default: `cubic`, or the pod's default on a kernel without it. The
    /// application's own connections to the agent keep their pod's default.
    #[arg(long, env = "WEFT_TUNNEL_CONGESTION_CONTROL", value_name = "NAME|system")]
    pub tunnel_congestion_control: Option<String>,
    /// The admin API (`/config_dump`, `/logging`, `/quitquitquit`, `/healthz/ready`): on loopback
    /// only, as it changes what the agent does.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15000")]
    pub admin_address: SocketAddr,
    /// Prometheus metrics (`/metrics`, `/stats/prometheus`), on the node's addresses.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_address: SocketAddr,
    /// Readiness (`/healthz/ready`), on the node's addresses: 200 once the controller's config is in
    /// and every enrolled pod is served, 503 before and while shutting down.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_address: SocketAddr,
}

/// Where the controller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControllerTarget {
    /// One URL (`--controller`).
    Url(String),
    /// The ready replicas behind a Kubernetes Service (`--controller-endpoints`).
    Endpoints(ObjectName),
}

/// A namespaced Kubernetes object, written `<namespace>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for ObjectName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (namespace, name) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not <namespace>/<name>"))?;
        if !weft_model::is_dns_label(namespace) {
            return Err(format!("{s:?}: {namespace:?} is not a namespace name"));
        }
        if name.len() > 253 || !name.split('.').all(weft_model::is_dns_label) {
            return Err(format!("{s:?}: {name:?} is not an object name"));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The cgroup capture attaches to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupChoice {
    Dir(PathBuf),
    /// Found at start: see [`crate::cgroup::kubepods`].
    Auto,
}

/// What the HBONE connections' congestion control is asked to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelCongestion {
    /// Not configured: [`DEFAULT_TUNNEL_CONGESTION`] if the kernel has it, else the pod's default.
    Default,
    /// `system`: each pod's default (`net.ipv4.tcp_congestion_control` in its namespace).
    System,
    /// Named: the agent does not start without it.
    Named(CongestionControl),
}

/// Tunnels run between nodes of one cluster, where cubic is the kernel's own default. The common
/// alternative, BBR, paces every burst with a timer unless the interface has the `fq` qdisc, which
/// cost the agents 9% more CPU per byte on the dev cluster (docs/performance.md).
pub const DEFAULT_TUNNEL_CONGESTION: &str = "cubic";

/// More data-path threads than this only add contention.
const MAX_WORKER_THREADS: usize = 64;

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: String,
    pub kubernetes: bool,
    pub controller: ControllerTarget,
    pub controller_ca: PathBuf,
    pub controller_name: String,
    pub node_token_file: PathBuf,
    pub daemonset: ObjectName,
    /// `(conf dir, bin dir)` of the node's CNI, for the uninstall.
    pub cni_dirs: Option<(PathBuf, PathBuf)>,
    pub trust_domain: String,
    pub cni_socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpf_pin_dir: PathBuf,
    pub cgroup: CgroupChoice,
    pub log_format: LogFormat,
    pub worker_threads: usize,
    pub tunnel_congestion: TunnelCongestion,
    pub endpoints: Endpoints,
}

/// Where the agent's HTTP endpoints listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

impl Args {
    pub fn validate(self) -> Result<Config, String> {
        if self.node.is_empty() {
            return Err("--node must not be empty".into());
        }
        if !self.bpf_pin_dir.starts_with("/sys/fs/bpf") {
            return Err(format!(
                "--bpf-pin-dir {} is not under /sys/fs/bpf",
                self.bpf_pin_dir.display()
            ));
        }
        let cgroup = if self.cgroup.as_os_str() == "auto" {
            CgroupChoice::Auto
        } else if self.cgroup.is_dir() {
            CgroupChoice::Dir(self.cgroup)
        } else {
            return Err(format!("--cgroup {} is not a directory", self.cgroup.display()));
        };
        let controller = match (self.controller, self.controller_endpoints) {
            (Some(url), None) if url.starts_with("https://") => ControllerTarget::Url(url),
            (Some(url), None) => {
                return Err(format!(
                    "--controller {url} must be an https:// URL (the agent talks to the controller in TLS only)"
                ));
            }
            (None, Some(service)) if self.kubernetes => {
                ControllerTarget::Endpoints(service.parse().map_err(|e| format!("--controller-endpoints {e}"))?)
            }
            (None, Some(_)) => return Err("--controller-endpoints needs --kubernetes".into()),
            _ => return Err("exactly one of --controller and --controller-endpoints is needed".into()),
        };
        let daemonset = self.daemonset.parse().map_err(|e| format!("--daemonset {e}"))?;
        if !weft_model::is_dns_label(&self.trust_domain.replace('.', "-")) {
            return Err(format!(
                "--trust-domain {:?} is not a valid trust domain",
                self.trust_domain
            ));
        }
        let worker_threads = match self.worker_threads {
            Some(0) => return Err("--worker-threads must be at least 1".into()),
            Some(n) if n > MAX_WORKER_THREADS => {
                return Err(format!("--worker-threads {n}: at most {MAX_WORKER_THREADS}"));
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        };
        let tunnel_congestion = match self.tunnel_congestion_control.as_deref() {
            None => TunnelCongestion::Default,
            Some("system") => TunnelCongestion::System,
            Some(name) => TunnelCongestion::Named(
                name.parse()
                    .map_err(|e| format!("--tunnel-congestion-control: {e}, or \"system\""))?,
            ),
        };
        if !self.admin_address.ip().is_loopback() {
            return Err(format!(
                "--admin-address {} is not a loopback address: the admin API changes what the agent does and is served to the node only",
                self.admin_address
            ));
        }
        let endpoints = Endpoints {
            admin: self.admin_address,
            metrics: self.metrics_address,
            readiness: self.readiness_address,
        };
        let named = [
            ("--admin-address", endpoints.admin),
            ("--metrics-address", endpoints.metrics),
            ("--readiness-address", endpoints.readiness),
        ];
        for (i, (a, x)) in named.iter().enumerate() {
            for (b, y) in &named[i + 1..] {
                if x.port() == y.port() && (x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified()) {
                    return Err(format!("{a} {x} and {b} {y} would listen on the same port"));
                }
            }
        }
        Ok(Config {
            node: self.node,
            kubernetes: self.kubernetes,
            controller,
            controller_ca: self.controller_ca,
            controller_name: self.controller_name,
            node_token_file: self.node_token_file,
            daemonset,
            cni_dirs: self.cni_conf_dir.zip(self.cni_bin_dir),
            trust_domain: self.trust_domain,
            cni_socket: self.cni_socket,
            state_dir: self.state_dir,
            bpf_pin_dir: self.bpf_pin_dir,
            cgroup,
            log_format: self.log_format,
            worker_threads,
            tunnel_congestion,
            endpoints,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let cgroup = std::env::temp_dir();
        let cgroup = cgroup.to_str().expect("utf-8 temp dir");
        let base = [
            "weft-node",
            "--node",
            "node1",
            "--controller",
            "https://127.0.0.1:15012",
            "--controller-ca",
            "/ca.pem",
            "--node-token-file",
            "/token",
            "--cgroup",
            cgroup,
        ];
        Args::try_parse_from(base.iter().chain(extra)).expect("parses")
    }

    #[test]
    fn tunnel_congestion_control_is_cubic_unless_told_otherwise() {
        assert_eq!(
            args(&[]).validate().expect("valid").tunnel_congestion,
            TunnelCongestion::Default
        );
        assert_eq!(
            args(&["--tunnel-congestion-control", "system"])
                .validate()
                .expect("valid")
                .tunnel_congestion,
            TunnelCongestion::System
        );
        assert_eq!(
            args(&["--tunnel-congestion-control", "bbr"])
                .validate()
                .expect("valid")
                .tunnel_congestion,
            TunnelCongestion::Named("bbr".parse().expect("valid"))
        );
        let err = args(&["--tunnel-congestion-control", "BBR"])
            .validate()
            .expect_err("upper case");
        assert!(err.starts_with("--tunnel-congestion-control: \"BBR\" is not"), "{err}");
    }

    #[test]
    fn endpoints_default_to_istios_ports_and_the_admin_api_stays_on_loopback() {
        let config = args(&[]).validate().expect("valid");
        assert_eq!(config.endpoints.admin, "127.0.0.1:15000".parse().expect("addr"));
        assert_eq!(config.endpoints.metrics, "0.0.0.0:15020".parse().expect("addr"));
        assert_eq!(config.endpoints.readiness, "0.0.0.0:15021".parse().expect("addr"));
        assert!(args(&["--admin-address", "[::1]:15000"]).validate().is_ok());

        let err = args(&["--admin-address", "0.0.0.0:15000"])
            .validate()
            .expect_err("not loopback");
        assert!(
            err.starts_with("--admin-address 0.0.0.0:15000 is not a loopback address"),
            "{err}"
        );
        let err = args(&["--metrics-address", "127.0.0.1:15021"])
            .validate()
            .expect_err("one port");
        assert_eq!(
            err,
            "--metrics-address 127.0.0.1:15021 and --readiness-address 0.0.0.0:15021 would listen on the same port"
        );
        // Different addresses, one port: both can bind.
        assert!(
            args(&[
                "--metrics-address",
                "127.0.0.2:15020",
                "--readiness-address",
                "127.0.0.3:15020"
            ])
            .validate()
            .is_ok()
        );
    }

    /// `argv` after the program name, parsed and validated.
    fn parse(argv: &[&str]) -> Result<Config, String> {
        let args = Args::try_parse_from(std::iter::once("weft-node").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        args.validate()
    }

    const KUBERNETES: &[&str] = &[
        "--node",
        "node1",
        "--kubernetes",
        "--controller-endpoints",
        "weft-system/weft-controller",
        "--controller-ca",
        "/etc/weft/ca/root.pem",
        "--node-token-file",
        "/var/run/secrets/weft/token",
        "--cgroup",
        "auto",
    ];

    #[test]
    fn the_daemonsets_command_line_follows_the_controllers_endpoints() {
        let config = parse(KUBERNETES).expect("valid");
        assert!(config.kubernetes);
        assert_eq!(
            config.controller,
            ControllerTarget::Endpoints(ObjectName {
                namespace: "weft-system".into(),
                name: "weft-controller".into()
            })
        );
        assert_eq!(config.cgroup, CgroupChoice::Auto);
        assert_eq!(config.daemonset.to_string(), "weft-system/weft-node");
        let local = args(&[]).validate().expect("valid");
        assert_eq!(
            local.controller,
            ControllerTarget::Url("https://127.0.0.1:15012".into())
        );
        assert!(!local.kubernetes);
    }

    #[test]
    fn exactly_one_way_to_the_controller_is_accepted() {
        let without = |flag: &str, arity: usize| {
            let i = KUBERNETES.iter().position(|a| *a == flag).expect("present");
            let mut argv = KUBERNETES.to_vec();
            argv.drain(i..i + arity);
            argv
        };
        let both = [KUBERNETES, &["--controller", "https://10.0.0.1:15012"]].concat();
        let err = parse(&both).expect_err("both");
        assert!(err.contains("cannot be used with"), "{err}");
        let err = parse(&without("--controller-endpoints", 2)).expect_err("neither");
        assert!(
            err.contains("required arguments were not provided") && err.contains("--controller"),
            "{err}"
        );
        let err = parse(&without("--kubernetes", 1)).expect_err("endpoints without kubernetes");
        assert!(err.contains("--kubernetes"), "{err}");
        let mut bad = KUBERNETES.to_vec();
        bad[4] = "weft-controller";
        let err = parse(&bad).expect_err("no namespace");
        assert!(
            err.starts_with("--controller-endpoints \"weft-controller\" is not <namespace>/<name>"),
            "{err}"
        );
        let bad = [KUBERNETES, &["--daemonset", "weft-system/Weft"]].concat();
        let err = parse(&bad).expect_err("bad name");
        assert!(err.contains("\"Weft\" is not an object name"), "{err}");
    }
}
