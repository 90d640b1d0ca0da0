//! `weftctl dev`: a cluster built from network namespaces on one machine.
//!
//! Each node is a network namespace joined to the others by a bridge (in the cluster's own "fabric"
//! namespace, so nothing touches the host's network); each pod is a network namespace behind its
//! node's bridge with a veth pair, dual-stack addresses from the node's pod CIDRs, and a cgroup v2
//! leaf under its node's cgroup. One `weft-node` runs per node, inside the node's namespace and
//! cgroup, like a hostNetwork DaemonSet pod. The controller runs in the fabric namespace on its local
//! store; `up` and `annotate` register namespaces and pods in that store, as a kube-apiserver would
//! hold them, and the agents follow the controller.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command as Process, ExitCode, Stdio},
};

use anyhow::Context as _;
use weft_model::{Namespace, Pod, annotations, enrollment};

mod mesh;
mod state;
mod system;

use state::{Cluster, Names, Node, PodRecord};

/// The network namespace of dev cluster `cluster`'s node `node`, where its agent listens.
pub fn node_netns(cluster: &str, node: &str) -> anyhow::Result<weft_dataplane::netns::NetNs> {
    let c = Cluster::load(cluster)?;
    let Some(n) = c.nodes.iter().find(|n| n.name == node) else {
        let names: Vec<&str> = c.nodes.iter().map(|n| n.name.as_str()).collect();
        anyhow::bail!(
            "dev cluster {cluster:?} has no node {node:?} (its nodes: {})",
            names.join(", ")
        );
    };
    weft_dataplane::netns::NetNs::open(system::netns_path(&n.netns))
        .with_context(|| format!("opening node {node:?}'s network namespace {}", n.netns))
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Create a cluster (cleaning a stale one of the same name first) and start one agent per node.
    Up(UpArgs),
    /// Remove everything a cluster created, also after a crash.
    Down {
        #[arg(long)]
        name: String,
    },
    /// List nodes and pods with their addresses.
    Status {
        #[arg(long)]
        name: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Run a command inside a pod (its network namespace and cgroup); exits with the command's code.
    Exec {
        #[arg(long)]
        name: String,
        /// Pod name or namespace/name.
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Set (KEY=VALUE) or remove (KEY-) an annotation on a namespace or a pod.
    Annotate {
        #[arg(long)]
        name: String,
        #[arg(value_enum)]
        kind: Kind,
        /// Namespace name, or pod name / namespace/name.
        target: String,
        /// KEY=VALUE or KEY-.
        change: String,
    },
    /// Start a node's agent if it is not running (after it was stopped or crashed).
    StartAgent {
        #[arg(long)]
        name: String,
        node: String,
    },
    /// Start the controller if it is not running; it keeps its CA and store.
    StartController {
        #[arg(long)]
        name: String,
    },
}

#[derive(clap::Args)]
pub struct UpArgs {
    #[arg(long)]
    name: String,
    #[arg(long, default_value_t = 2)]
    nodes: u8,
    #[arg(long, default_value_t = 2)]
    pods_per_node: u8,
    /// Namespaces pods are spread over (pod k of each node goes to the k-th, round robin).
    #[arg(long, value_delimiter = ',', default_value = "default")]
    namespaces: Vec<String>,
    /// Namespaces to enroll in the ambient mesh.
    #[arg(long, value_delimiter = ',')]
    ambient: Vec<String>,
    /// Do not start the controller and the node agents.
    #[arg(long)]
    no_mesh: bool,
    /// Lifetime of the workload certificates the controller issues.
    #[arg(long, default_value = "24h")]
    cert_lifetime: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    Namespace,
    Pod,
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Up(args) => up(args).map(|()| ExitCode::SUCCESS),
        Command::Down { name } => down(&name).map(|()| ExitCode::SUCCESS),
        Command::Status { name, output } => status(&name, output).map(|()| ExitCode::SUCCESS),
        Command::Exec { name, pod, command } => exec(&name, &pod, &command),
        Command::Annotate {
            name,
            kind,
            target,
            change,
        } => annotate(&name, kind, &target, &change).map(|()| ExitCode::SUCCESS),
        Command::StartAgent { name, node } => start_agent_cmd(&name, &node).map(|()| ExitCode::SUCCESS),
        Command::StartController { name } => start_controller_cmd(&name).map(|()| ExitCode::SUCCESS),
    }
}

// === up ===

fn up(args: UpArgs) -> anyhow::Result<()> {
    state::validate_name(&args.name)?;
    anyhow::ensure!((1..=20).contains(&args.nodes), "--nodes must be between 1 and 20");
    anyhow::ensure!(
        (1..=50).contains(&args.pods_per_node),
        "--pods-per-node must be between 1 and 50"
    );
    for ns in &args.namespaces {
        anyhow::ensure!(
            weft_model::is_dns_label(ns),
            "namespace {ns:?} is not a valid Kubernetes name (lowercase DNS label)"
        );
    }
    for ns in &args.ambient {
        anyhow::ensure!(
            args.namespaces.contains(ns),
            "--ambient {ns}: no such namespace; pods are in --namespaces {}",
            args.namespaces.join(",")
        );
    }
    system::preflight()?;
    let bins = if args.no_mesh {
        None
    } else {
        Some(MeshBins {
            agent: mesh::sibling_binary("weft-node", "WEFT_NODE_BIN")?,
            controller: mesh::sibling_binary("weft-controller", "WEFT_CONTROLLER_BIN")?,
            cni: mesh::sibling_binary("weft-cni", "WEFT_CNI_BIN")?,
        })
    };

    let _lock = lock(&args.name)?;
    if let Ok(existing) = Cluster::load(&args.name)
        && existing.complete
        && (!existing.mesh || existing.nodes.iter().any(|n| n.agent_pid.is_some_and(system::alive)))
    {
        anyhow::bail!(
            "a dev cluster named {:?} is already running; remove it with `weftctl dev down --name {}` or pick another name",
            args.name,
            args.name
        );
    }
    if has_leftovers(&args.name)? {
        println!("cleaning stale cluster {:?}", args.name);
        teardown(&args.name)?;
    }
    let result = build(&args, bins.as_ref());
    if let Err(e) = result {
        // Nothing half-created: whatever failed, remove all of it.
        let _ = teardown(&args.name);
        return Err(e);
    }
    Ok(())
}

struct MeshBins {
    agent: PathBuf,
    controller: PathBuf,
    cni: PathBuf,
}

fn build(args: &UpArgs, bins: Option<&MeshBins>) -> anyhow::Result<()> {
    let names = Names(&args.name);
    let cg_root = system::cgroup2_root()?;
    let cluster_cg = names.cgroup(&cg_root);
    fs::create_dir_all(names.log_dir())?;
    let mut cluster = Cluster {
        name: args.name.clone(),
        mesh: !args.no_mesh,
        complete: false,
        controller_pid: None,
        cert_lifetime: args.cert_lifetime.clone(),
        nodes: Vec::new(),
        namespaces: args
            .namespaces
            .iter()
            .map(|ns| Namespace {
                name: ns.clone(),
                annotations: if args.ambient.contains(ns) {
                    BTreeMap::from([(
                        annotations::DATAPLANE_MODE.to_owned(),
                        annotations::DATAPLANE_MODE_AMBIENT.to_owned(),
                    )])
                } else {
                    BTreeMap::new()
                },
            })
            .collect(),
        pods: Vec::new(),
    };
    cluster.save()?; // from here on `down` finds the cluster by its state too

    let fabric = names.netns("fabric");
    system::create_netns(&fabric)?;
    system::ip_in(&fabric, &["link", "add", "br0", "type", "bridge"])?;
    system::ip_in(&fabric, &["link", "set", "br0", "up"])?;
    // The controller's address: nodes are on the same bridge.
    system::ip_in(
        &fabric,
        &["addr", "add", &format!("{}/24", mesh::CONTROLLER_IP), "dev", "br0"],
    )?;

    for i in 1..=args.nodes {
        let node = format!("node{i}");
        let netns = names.netns(&node);
        system::create_netns(&netns)?;
        system::sysctls(
            &netns,
            &[("net/ipv4/ip_forward", "1"), ("net/ipv6/conf/all/forwarding", "1")],
        )?;
        let fabric_if = format!("n{i}");
        system::ip_in(
            &fabric,
            &[
                "link", "add", &fabric_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        system::ip_in(&fabric, &["link", "set", &fabric_if, "master", "br0", "up"])?;
        let (ip4, ip6) = (format!("172.30.0.{}", 10 + i), format!("fd00:172:30::{}", 10 + i));
        system::ip_in(&netns, &["addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        system::ip_in(&netns, &["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        system::ip_in(&netns, &["link", "set", "eth0", "up"])?;
        system::ip_in(&netns, &["link", "add", "cbr0", "type", "bridge"])?;
        system::ip_in(&netns, &["addr", "add", &format!("10.244.{i}.1/24"), "dev", "cbr0"])?;
        system::ip_in(
            &netns,
            &["addr", "add", &format!("fd00:10:244:{i}::1/64"), "dev", "cbr0", "nodad"],
        )?;
        system::ip_in(&netns, &["link", "set", "cbr0", "up"])?;

        let agent_log = names.log_dir().join(format!("{node}-agent.log"));
        let _ = fs::remove_file(&agent_log); // a new cluster starts a new log
        let node_cg = cluster_cg.join(&node);
        fs::create_dir_all(node_cg.join("agent")).with_context(|| format!("creating cgroup {}", node_cg.display()))?;
        cluster.nodes.push(Node {
            name: node.clone(),
            netns: netns.clone(),
            ips: vec![ip4.parse()?, ip6.parse()?],
            pod_cidrs: vec![format!("10.244.{i}.0/24"), format!("fd00:10:244:{i}::/64")],
            cgroup: node_cg.clone(),
            bpf_pin_dir: names.bpf_dir().join(&node),
            agent_log,
            agent_pid: None,
        });
    }
    // Routes between nodes: every node reaches every other node's pod CIDRs through it.
    for node in &cluster.nodes {
        for other in cluster.nodes.iter().filter(|o| o.name != node.name) {
            for (cidr, via) in other.pod_cidrs.iter().zip(&other.ips) {
                system::ip_in(&node.netns, &["route", "add", cidr, "via", &via.to_string()])?;
            }
        }
    }
    cluster.save()?;

    // The controller, then the agents, run before any pod, as in a cluster; each pod is registered
    // in the store and then goes through the CNI plugin.
    if let Some(bins) = bins {
        mesh::provision_tokens(&cluster)?;
        cluster.controller_pid = Some(mesh::start_controller(&cluster, &bins.controller)?);
        cluster.save()?;
        let namespaces: Vec<_> = cluster.namespaces.iter().map(mesh::namespace_object).collect();
        mesh::apply(&cluster.name, &namespaces, "weftctl dev up")?;
        for idx in 0..cluster.nodes.len() {
            let pid = mesh::start_agent(&cluster, &cluster.nodes[idx], &bins.agent)?;
            cluster.nodes[idx].agent_pid = Some(pid);
        }
    }
    for node in cluster.nodes.clone() {
        let i = node.name.trim_start_matches("node").to_owned();
        let (netns, node_cg) = (node.netns.clone(), node.cgroup.clone());
        let node = node.name.clone();
        for k in 1..=args.pods_per_node {
            let pod_name = format!("app-{i}-{k}");
            let pod_netns = names.netns(&pod_name);
            system::create_netns(&pod_netns)?;
            let host_if = format!("vp{k}");
            system::ip_in(
                &netns,
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod_netns,
                ],
            )?;
            system::ip_in(&netns, &["link", "set", &host_if, "master", "cbr0", "up"])?;
            let (pip4, pip6) = (format!("10.244.{i}.{}", 10 + k), format!("fd00:10:244:{i}::{}", 10 + k));
            system::ip_in(&pod_netns, &["addr", "add", &format!("{pip4}/24"), "dev", "eth0"])?;
            system::ip_in(
                &pod_netns,
                &["addr", "add", &format!("{pip6}/64"), "dev", "eth0", "nodad"],
            )?;
            system::ip_in(&pod_netns, &["link", "set", "eth0", "up"])?;
            system::ip_in(
                &pod_netns,
                &["route", "add", "default", "via", &format!("10.244.{i}.1")],
            )?;
            system::ip_in(
                &pod_netns,
                &["-6", "route", "add", "default", "via", &format!("fd00:10:244:{i}::1")],
            )?;
            let pod_cg = node_cg.join(&pod_name);
            fs::create_dir_all(&pod_cg).with_context(|| format!("creating cgroup {}", pod_cg.display()))?;
            let namespace = args.namespaces[usize::from(k - 1) % args.namespaces.len()].clone();
            cluster.pods.push(PodRecord {
                pod: Pod {
                    uid: new_pod_uid()?,
                    namespace,
                    name: pod_name.clone(),
                    node: node.clone(),
                    service_account: "default".into(),
                    labels: BTreeMap::from([("app".to_owned(), pod_name.clone())]),
                    annotations: BTreeMap::new(),
                    ips: vec![pip4.parse()?, pip6.parse()?],
                    netns: Some(system::netns_path(&pod_netns)),
                },
                netns_name: pod_netns,
                cgroup: pod_cg,
            });
        }
    }
    cluster.save()?;
    if let Some(bins) = bins {
        let pods: Vec<_> = cluster.pods.iter().map(|p| mesh::pod_object(&p.pod)).collect();
        mesh::apply(&cluster.name, &pods, "weftctl dev up")?;
        for pod in &cluster.pods {
            cni_add(&cluster, pod, &bins.cni)?;
        }
    }
    cluster.complete = true;
    cluster.save()?;
    println!(
        "dev cluster {:?} is up: {} nodes, {} pods; `weftctl dev status --name {}` shows it",
        cluster.name,
        cluster.nodes.len(),
        cluster.pods.len(),
        cluster.name
    );
    Ok(())
}

/// Calls the CNI plugin for a pod exactly as a container runtime would: `CNI_*` environment, the
/// network configuration on stdin with the primary plugin's result as `prevResult`.
fn cni_add(cluster: &Cluster, pod: &PodRecord, bin: &Path) -> anyhow::Result<()> {
    let netns = system::netns_path(&pod.netns_name);
    let ips: Vec<_> = pod
        .pod
        .ips
        .iter()
        .map(|ip| {
            let prefix = if ip.is_ipv4() { 24 } else { 64 };
            serde_json::json!({ "address": format!("{ip}/{prefix}"), "interface": 0 })
        })
        .collect();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "weft-dev",
        "type": "weft-cni",
        "agentSocket": Names(&cluster.name).cni_socket(&pod.pod.node),
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{ "name": "eth0", "sandbox": netns }],
            "ips": ips,
        },
    });
    let mut child = Process::new(bin)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &pod.pod.uid)
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", bin.parent().unwrap_or(Path::new("/")))
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                pod.pod.namespace, pod.pod.name, pod.pod.uid
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "CNI ADD for {} failed: {}",
        pod.pod.qualified_name(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}

fn start_agent_cmd(name: &str, node_name: &str) -> anyhow::Result<()> {
    system::preflight()?;
    let _lock = lock(name)?;
    let mut cluster = Cluster::load(name)?;
    anyhow::ensure!(cluster.mesh, "cluster {name:?} was created with --no-mesh");
    let idx = cluster
        .nodes
        .iter()
        .position(|n| n.name == node_name)
        .with_context(|| format!("no node {node_name:?} in cluster {name:?}"))?;
    if let Some(pid) = cluster.nodes[idx].agent_pid.filter(|p| system::alive(*p)) {
        println!("the agent on {node_name} is already running (pid {pid})");
        return Ok(());
    }
    let pid = mesh::start_agent(
        &cluster,
        &cluster.nodes[idx],
        &mesh::sibling_binary("weft-node", "WEFT_NODE_BIN")?,
    )?;
    cluster.nodes[idx].agent_pid = Some(pid);
    cluster.save()?;
    println!("started the agent on {node_name} (pid {pid})");
    Ok(())
}

fn start_controller_cmd(name: &str) -> anyhow::Result<()> {
    system::preflight()?;
    let _lock = lock(name)?;
    let mut cluster = Cluster::load(name)?;
    anyhow::ensure!(cluster.mesh, "cluster {name:?} was created with --no-mesh");
    if let Some(pid) = cluster.controller_pid.filter(|p| system::alive(*p)) {
        println!("the controller is already running (pid {pid})");
        return Ok(());
    }
    let pid = mesh::start_controller(
        &cluster,
        &mesh::sibling_binary("weft-controller", "WEFT_CONTROLLER_BIN")?,
    )?;
    cluster.controller_pid = Some(pid);
    cluster.save()?;
    println!("started the controller (pid {pid})");
    Ok(())
}

// === down ===

fn down(name: &str) -> anyhow::Result<()> {
    state::validate_name(name)?;
    system::preflight()?;
    let _lock = lock(name)?;
    // Idempotent, as a cleanup must be: a second `down` (or one after a crashed `up` cleaned up
    // already) has nothing to do, and says so.
    if !has_leftovers(name)? {
        println!("no dev cluster named {name:?}: nothing to remove");
        return Ok(());
    }
    teardown(name)?;
    println!("dev cluster {name:?} removed");
    Ok(())
}

fn has_leftovers(name: &str) -> anyhow::Result<bool> {
    let names = Names(name);
    Ok(!system::list_netns(&names.netns_prefix()).is_empty()
        || names.cgroup(&system::cgroup2_root()?).exists()
        || names.bpf_dir().exists()
        || names.state_file().exists())
}

/// Removes everything found by the cluster's names, whatever state it is in: processes (by the
/// cluster's cgroup), pins (which detaches capture), namespaces (and with them every link), cgroups.
fn teardown(name: &str) -> anyhow::Result<()> {
    let names = Names(name);
    system::remove_cgroup_tree(&names.cgroup(&system::cgroup2_root()?))?;
    if names.bpf_dir().exists() {
        fs::remove_dir_all(names.bpf_dir()).with_context(|| format!("removing {}", names.bpf_dir().display()))?;
    }
    for ns in system::list_netns(&names.netns_prefix()) {
        system::ip(&["netns", "del", &ns])?;
    }
    let run_dir = names.run_dir();
    if run_dir.exists() {
        // Keep the lock file: it is held by the caller.
        for entry in fs::read_dir(&run_dir)?.filter_map(Result::ok) {
            if entry.file_name() == "lock" {
                continue;
            }
            if entry.path().is_dir() {
                fs::remove_dir_all(entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        }
    }
    Ok(())
}

/// Serialises commands on one cluster; released when the returned file is closed.
fn lock(name: &str) -> anyhow::Result<LockFile> {
    let dir = Names(name).run_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // SAFETY: flock on an open descriptor.
    anyhow::ensure!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } == 0,
        "locking {}",
        path.display()
    );
    Ok(LockFile { path, _file: file })
}

struct LockFile {
    path: PathBuf,
    _file: fs::File,
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // After `down` the whole run dir goes; while a cluster exists the lock file stays.
        let dir = self.path.parent().map(Path::to_path_buf);
        if let Some(dir) = dir
            && !dir.join("cluster.json").exists()
        {
            let _ = fs::remove_file(&self.path);
            let _ = fs::remove_dir(&dir);
        }
    }
}

// === status ===

fn status(name: &str, output: Output) -> anyhow::Result<()> {
    let cluster = Cluster::load(name)?;
    let snapshot = cluster.snapshot();
    let enrolled = |p: &Pod| enrollment::is_enrolled(p, snapshot.namespace(&p.namespace));
    match output {
        Output::Json => {
            let nodes: Vec<_> = cluster
                .nodes
                .iter()
                .map(|n| {
                    serde_json::json!({
                        "name": n.name, "netns": n.netns, "ips": n.ips, "podCIDRs": n.pod_cidrs,
                        "cgroup": n.cgroup, "bpfPinDir": n.bpf_pin_dir,
                        "agent": {
                            "pid": n.agent_pid, "running": n.agent_pid.is_some_and(system::alive), "log": n.agent_log,
                            "stateDir": Names(name).agent_state_dir(&n.name),
                        },
                    })
                })
                .collect();
            let pods: Vec<_> = cluster
                .pods
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "namespace": p.pod.namespace, "name": p.pod.name, "uid": p.pod.uid, "node": p.pod.node,
                        "serviceAccount": p.pod.service_account, "labels": p.pod.labels,
                        "annotations": p.pod.annotations, "ips": p.pod.ips, "netns": p.netns_name,
                        "cgroup": p.cgroup, "enrolled": enrolled(&p.pod),
                    })
                })
                .collect();
            let names = Names(name);
            let controller = serde_json::json!({
                "pid": cluster.controller_pid,
                "running": cluster.controller_pid.is_some_and(system::alive),
                "log": names.log_dir().join("controller.log"),
                "adminSocket": names.controller_socket(),
                "url": mesh::controller_url(),
                "root": names.controller_state_dir().join("root.pem"),
            });
            let doc = serde_json::json!({
                "name": cluster.name, "mesh": cluster.mesh, "controller": controller,
                "namespaces": cluster.namespaces, "nodes": nodes, "pods": pods,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Output::Table => {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "cluster {}  (mesh: {})",
                cluster.name,
                if cluster.mesh { "on" } else { "off" }
            )?;
            if cluster.mesh {
                let controller = match cluster.controller_pid {
                    Some(pid) if system::alive(pid) => format!("pid {pid}"),
                    Some(_) => "stopped".into(),
                    None => "-".into(),
                };
                writeln!(
                    out,
                    "controller {}  {controller}  store: weftctl get --cluster {}  log: {}",
                    mesh::controller_url(),
                    cluster.name,
                    Names(name).log_dir().join("controller.log").display()
                )?;
            }
            writeln!(
                out,
                "\n{:<8} {:<14} {:<16} {:<20} {:<10} AGENT LOG",
                "NODE", "IPV4", "IPV6", "POD CIDRS", "AGENT"
            )?;
            for n in &cluster.nodes {
                let agent = match n.agent_pid {
                    Some(pid) if system::alive(pid) => format!("pid {pid}"),
                    Some(_) => "stopped".into(),
                    None => "-".into(),
                };
                writeln!(
                    out,
                    "{:<8} {:<14} {:<16} {:<20} {:<10} {}",
                    n.name,
                    n.ips[0],
                    n.ips[1],
                    n.pod_cidrs[0],
                    agent,
                    n.agent_log.display()
                )?;
            }
            writeln!(
                out,
                "\n{:<20} {:<8} {:<14} {:<22} ENROLLED",
                "POD", "NODE", "IPV4", "IPV6"
            )?;
            for p in &cluster.pods {
                let ip = |v6: bool| {
                    p.pod
                        .ips
                        .iter()
                        .find(|i| i.is_ipv6() == v6)
                        .map(IpAddr::to_string)
                        .unwrap_or_default()
                };
                writeln!(
                    out,
                    "{:<20} {:<8} {:<14} {:<22} {}",
                    p.pod.qualified_name(),
                    p.pod.node,
                    ip(false),
                    ip(true),
                    if enrolled(&p.pod) { "yes" } else { "no" }
                )?;
            }
        }
    }
    Ok(())
}

// === exec ===

fn exec(name: &str, pod: &str, command: &[String]) -> anyhow::Result<ExitCode> {
    system::preflight()?;
    let cluster = Cluster::load(name)?;
    let pod = cluster.pod(pod)?;
    let netns = fs::File::open(system::netns_path(&pod.netns_name))
        .with_context(|| format!("opening the network namespace of {}", pod.pod.qualified_name()))?;
    // SAFETY: weftctl is single-threaded here; entering a namespace affects only this process.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&netns), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!(
            "entering the network namespace of {}: {}",
            pod.pod.qualified_name(),
            std::io::Error::last_os_error()
        );
    }
    fs::write(pod.cgroup.join("cgroup.procs"), "0")
        .with_context(|| format!("joining the cgroup of {}", pod.pod.qualified_name()))?;
    let (program, args) = command.split_first().context("no command given")?;
    // Replaces this process: the exit code and signals are the command's own.
    let err = Process::new(program).args(args).exec();
    anyhow::bail!("running {program}: {err}")
}

// === annotate ===

fn annotate(name: &str, kind: Kind, target: &str, change: &str) -> anyhow::Result<()> {
    let edit = parse_change(change)?;
    let _lock = lock(name)?;
    let mut cluster = Cluster::load(name)?;
    let map = match kind {
        Kind::Namespace => {
            let ns = cluster
                .namespaces
                .iter_mut()
                .find(|n| n.name == target)
                .with_context(|| format!("no namespace {target:?} in cluster {name:?}"))?;
            &mut ns.annotations
        }
        Kind::Pod => {
            let uid = cluster.pod(target)?.pod.uid.clone();
            let rec = cluster
                .pods
                .iter_mut()
                .find(|p| p.pod.uid == uid)
                .context("pod vanished")?;
            &mut rec.pod.annotations
        }
    };
    match &edit {
        (key, Some(value)) => {
            map.insert(key.clone(), value.clone());
        }
        (key, None) => {
            map.remove(key);
        }
    }
    if cluster.mesh {
        // The store is what the agents follow; the cluster file only mirrors it for `status`. The
        // object is changed as the store holds it, so that what `weftctl apply` set there (labels,
        // a service account) stays, as `kubectl annotate` changes one field of the live object.
        let (kind_name, namespace, object_name, fallback) = match kind {
            Kind::Namespace => (
                "Namespace",
                String::new(),
                target.to_owned(),
                cluster
                    .namespaces
                    .iter()
                    .find(|n| n.name == target)
                    .map(mesh::namespace_object),
            ),
            Kind::Pod => {
                let pod = &cluster.pod(target)?.pod;
                (
                    "Pod",
                    pod.namespace.clone(),
                    pod.name.clone(),
                    Some(mesh::pod_object(pod)),
                )
            }
        };
        let stored = mesh::stored_object(name, kind_name, &namespace, &object_name)?;
        let object = match (stored, &edit) {
            (Some(mut object), (key, value)) => {
                let annotations = object["metadata"]
                    .as_object_mut()
                    .context("a stored object without metadata")?
                    .entry("annotations")
                    .or_insert_with(|| serde_json::json!({}));
                match (annotations.as_object_mut(), value) {
                    (Some(a), Some(v)) => {
                        a.insert(key.clone(), serde_json::Value::from(v.clone()));
                    }
                    (Some(a), None) => {
                        a.remove(key);
                    }
                    (None, _) => anyhow::bail!("the stored object's annotations are not a map"),
                }
                Some(object)
            }
            (None, _) => fallback,
        };
        mesh::apply(name, &object.into_iter().collect::<Vec<_>>(), "weftctl dev annotate")?;
    }
    cluster.save()?;
    println!("annotated {target}");
    Ok(())
}

/// `KEY=VALUE` sets, `KEY-` removes. The key, and the value of an annotation Weft reads, are checked
/// as the store checks them, before anything changes.
fn parse_change(change: &str) -> anyhow::Result<(String, Option<String>)> {
    let (key, value) = match change.split_once('=') {
        Some((k, v)) => (k, Some(v.to_owned())),
        None => match change.strip_suffix('-') {
            Some(k) => (k, None),
            None => anyhow::bail!("annotation change {change:?}: use KEY=VALUE to set or KEY- to remove"),
        },
    };
    annotations::validate_key(key).map_err(anyhow::Error::msg)?;
    if let Some(value) = &value {
        annotations::validate_value(key, value).map_err(|p| anyhow::anyhow!("annotation {key}: {p}"))?;
    }
    Ok((key.to_owned(), value))
}

/// A pod uid as Kubernetes makes them (a version 4 UUID) from the OS's random source: the store
/// and the agents accept nothing else, because agents name paths after it.
fn new_pod_uid() -> anyhow::Result<String> {
    let mut random = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .context("reading /dev/urandom")?;
    Ok(weft_model::workload::uuid_v4(random))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_changes_parse_or_name_the_problem() {
        assert_eq!(
            parse_change("weft.dev/dataplane-mode=none").unwrap(),
            ("weft.dev/dataplane-mode".into(), Some("none".into()))
        );
        assert_eq!(
            parse_change("weft.dev/dataplane-mode-").unwrap(),
            ("weft.dev/dataplane-mode".into(), None)
        );
        assert!(parse_change("novalue").unwrap_err().to_string().contains("KEY=VALUE"));
        assert!(
            parse_change("Bad Key=1")
                .unwrap_err()
                .to_string()
                .contains("annotation key")
        );
    }

    #[test]
    fn dev_pod_uids_are_fresh_uuids() {
        let (a, b) = (new_pod_uid().unwrap(), new_pod_uid().unwrap());
        weft_model::workload::validate_uid(&a).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn dataplane_mode_value_is_checked_before_anything_changes() {
        let err = parse_change("weft.dev/dataplane-mode=bogus").unwrap_err().to_string();
        assert!(
            err.contains("weft.dev/dataplane-mode")
                && err.contains("\"bogus\"")
                && err.contains("\"ambient\", \"none\""),
            "{err}"
        );
        assert!(parse_change("weft.dev/dataplane-mode=ambient").is_ok());
        assert!(parse_change("example.com/anything=bogus").is_ok());
    }
}
