//! The dev cluster's mesh processes: the controller (in the fabric namespace, on the local store)
//! and one agent per node (in the node's namespace and cgroup), plus the objects `up` registers in
//! the store and the per-node credentials the controller authenticates agents with.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    os::unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command as Process, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Deserialize as _;
use weft_model::{Namespace, Pod};

use super::{
    state::{Cluster, Names, Node},
    system,
};

/// The controller's address on the fabric bridge; nodes reach it directly.
pub const CONTROLLER_IP: &str = "172.30.0.1";

pub fn controller_url() -> String {
    format!("https://{CONTROLLER_IP}:{}", weft_api::CONTROLLER_PORT)
}

/// A binary next to this one, or the one named by `env`.
pub fn sibling_binary(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let bin = std::env::current_exe()
        .context("locating weftctl")?
        .with_file_name(name);
    anyhow::ensure!(
        bin.exists(),
        "{name} not found next to weftctl ({}); build it (cargo xtask build) or set {env}",
        bin.display()
    );
    Ok(bin)
}

/// Creates one random credential per node: `node-tokens.json` for the controller, one token file
/// per node for its agent; all 0600.
pub fn provision_tokens(cluster: &Cluster) -> anyhow::Result<()> {
    let names = Names(&cluster.name);
    let mut tokens = BTreeMap::new();
    for node in &cluster.nodes {
        let token = random_hex(32)?;
        write_private(&names.node_token_file(&node.name), token.as_bytes())?;
        tokens.insert(node.name.clone(), token);
    }
    write_private(&names.node_tokens_file(), &serde_json::to_vec_pretty(&tokens)?)
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

/// Starts the controller in the fabric namespace and waits until its store answers.
pub fn start_controller(cluster: &Cluster, bin: &Path) -> anyhow::Result<u32> {
    let names = Names(&cluster.name);
    let state_dir = names.controller_state_dir();
    fs::create_dir_all(&state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let cgroup = names.cgroup(&system::cgroup2_root()?).join("controller");
    fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    let mut cmd = Process::new(bin);
    cmd.arg("--state-dir")
        .arg(&state_dir)
        .args(["--listen", &format!("{CONTROLLER_IP}:{}", weft_api::CONTROLLER_PORT)])
        .arg("--admin-socket")
        .arg(names.controller_socket())
        .arg("--node-tokens")
        .arg(names.node_tokens_file())
        .args(["--cert-lifetime", &cluster.cert_lifetime])
        .args(["--log-format", "json"]);
    let log = names.log_dir().join("controller.log");
    let socket = names.controller_socket();
    let _ = fs::remove_file(&socket);
    let pid = spawn_detached(cmd, &names.netns("fabric"), &cgroup, &log, "controller", || {
        socket.exists() && state_dir.join("root.pem").exists()
    })?;
    Ok(pid)
}

/// This machine's CPUs divided among the cluster's nodes, at least one each.
fn node_share_of_cpus(cluster: &Cluster) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / cluster.nodes.len().max(1)).max(1)
}

/// Starts a node's agent inside the node's network namespace and agent cgroup and waits until it
/// reports ready.
pub fn start_agent(cluster: &Cluster, node: &Node, bin: &Path) -> anyhow::Result<u32> {
    let names = Names(&cluster.name);
    let mut cmd = Process::new(bin);
    cmd.args(["--node", &node.name, "--log-format", "json"])
        .args(["--controller", &controller_url()])
        .arg("--controller-ca")
        .arg(names.controller_state_dir().join("root.pem"))
        .arg("--node-token-file")
        .arg(names.node_token_file(&node.name))
        .arg("--cni-socket")
        .arg(names.cni_socket(&node.name))
        .arg("--state-dir")
        .arg(names.agent_state_dir(&node.name))
        .arg("--bpf-pin-dir")
        .arg(&node.bpf_pin_dir)
        .arg("--cgroup")
        .arg(&node.cgroup)
        // The dev nodes share this machine's CPUs: each gets its slice, as a real node has its own.
        .args(["--worker-threads", &node_share_of_cpus(cluster).to_string()]);
    let log = node.agent_log.clone();
    let start_len = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let ready = || {
        let text = fs::read(&log).unwrap_or_default();
        let new = String::from_utf8_lossy(text.get(start_len as usize..).unwrap_or_default()).into_owned();
        new.lines().any(|l| l.contains("\"message\":\"ready\""))
    };
    spawn_detached(
        cmd,
        &node.netns,
        &node.cgroup.join("agent"),
        &node.agent_log,
        &node.name,
        ready,
    )
}

/// Runs `cmd` detached (its own session) inside network namespace `netns` and cgroup `cgroup`,
/// logging to `log`, and waits up to 30 s for `ready`.
fn spawn_detached(
    mut cmd: Process,
    netns: &str,
    cgroup: &Path,
    log: &Path,
    what: &str,
    ready: impl Fn() -> bool,
) -> anyhow::Result<u32> {
    let logf = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let start_len = logf.metadata().map(|m| m.len()).unwrap_or(0);
    let netns_file = fs::File::open(system::netns_path(netns)).with_context(|| format!("opening netns {netns}"))?;
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}", cgroup.join("cgroup.procs").display()))?;
    cmd.stdin(Stdio::null()).stdout(logf.try_clone()?).stderr(logf);
    let (netns_fd, procs_fd) = (
        std::os::fd::AsRawFd::as_raw_fd(&netns_file),
        std::os::fd::AsRawFd::as_raw_fd(&procs),
    );
    // SAFETY: only async-signal-safe syscalls between fork and exec, on descriptors kept open above.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("starting the {what} process"))?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let new_output = || {
        let text = fs::read(log).unwrap_or_default();
        String::from_utf8_lossy(text.get(start_len as usize..).unwrap_or_default()).into_owned()
    };
    loop {
        if ready() {
            // The process outlives this command; it is reaped by init once we exit.
            std::mem::forget(child);
            return Ok(pid);
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{what} exited ({status}) during start:\n{}", tail(&new_output(), 10));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("{what} was not ready within 30 s:\n{}", tail(&new_output(), 10));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A namespace as a Kubernetes object (JSON is YAML).
pub fn namespace_object(ns: &Namespace) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": ns.name, "annotations": ns.annotations },
    })
}

/// A pod as a Kubernetes object, with the addresses the dev cluster gave it.
pub fn pod_object(pod: &Pod) -> serde_json::Value {
    let ips: Vec<_> = pod
        .ips
        .iter()
        .map(|ip| serde_json::json!({ "ip": ip.to_string() }))
        .collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name, "namespace": pod.namespace, "uid": pod.uid,
            "labels": pod.labels, "annotations": pod.annotations,
        },
        "spec": { "nodeName": pod.node, "serviceAccountName": pod.service_account },
        "status": { "podIPs": ips },
    })
}

/// The object `kind` `namespace/name` as the cluster's store holds it, if it does.
pub fn stored_object(
    cluster_name: &str,
    kind: &str,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Option<serde_json::Value>> {
    let socket = Names(cluster_name).controller_socket();
    let yaml = crate::store::get(&socket, kind, namespace)
        .with_context(|| format!("reading {kind} objects from the store ({})", socket.display()))?;
    for document in serde_yaml_ng::Deserializer::from_str(&yaml) {
        let object = serde_json::Value::deserialize(document).context("parsing the store's YAML")?;
        if object["metadata"]["name"] == name {
            return Ok(Some(object));
        }
    }
    Ok(None)
}

/// Applies objects to the cluster's store (`start_controller` returned once its socket exists).
pub fn apply(cluster_name: &str, objects: &[serde_json::Value], source: &str) -> anyhow::Result<()> {
    let yaml = objects
        .iter()
        .map(serde_json::Value::to_string)
        .collect::<Vec<_>>()
        .join("\n---\n");
    let socket = Names(cluster_name).controller_socket();
    crate::store::apply(&socket, &yaml, source)
        .map(drop)
        .with_context(|| format!("registering objects in the store ({})", socket.display()))
}
