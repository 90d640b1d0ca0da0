//! The control-plane scale harness (`cargo xtask scale`): the real controller (its release binary,
//! with the local store) and N simulated node agents in this process, each on the agent's own
//! client code path ([`weft_node::discovery`]: TLS, its bearer token, Subscribe with what it holds,
//! chunked pushes applied whole, ACK/NACK, reconnect with backoff) from an address of its own.
//! A simulated agent keeps only the version of each resource it holds, not the data-plane state.
//!
//! It feeds the controller a generated cluster, applies one change of each kind and reports how long
//! each took from the apply to its arrival at every agent that needs it, the bytes pushed, the
//! controller's CPU for it, its memory, the streams that dropped, and how long all agents needed to
//! resync after the controller restarted.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    ffi::OsString,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use prost::Message as _;
use serde::Serialize;
use tokio::sync::watch;
use weft_api::{sync, v1};
use weft_node::{
    controller::{Controller, Deadlines},
    discovery::{self, Holdings},
};

pub mod kubernetes;

/// The generated cluster.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Shape {
    pub nodes: usize,
    pub pods: usize,
    pub namespaces: usize,
    pub services: usize,
    pub policies: usize,
    /// The controller's `--concurrent-resyncs`, when not its default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrent_resyncs: Option<usize>,
}

impl Shape {
    /// The controller's flags this shape sets.
    pub(crate) fn controller_args(&self) -> Vec<OsString> {
        self.concurrent_resyncs
            .map(|n| vec!["--concurrent-resyncs".into(), n.to_string().into()])
            .unwrap_or_default()
    }

    fn namespace_of_service(&self, s: usize) -> usize {
        s % self.namespaces
    }

    /// Pod `i`: selected by service `i % services`, in that service's namespace, on node `i % nodes`.
    fn pod(&self, i: usize) -> (usize, usize, usize) {
        let s = i % self.services;
        (self.namespace_of_service(s), s, i % self.nodes)
    }

    /// The nodes with pods in namespace `ns`.
    fn nodes_of_namespace(&self, ns: usize) -> BTreeSet<usize> {
        (0..self.pods)
            .filter(|i| self.pod(*i).0 == ns)
            .map(|i| self.pod(i).2)
            .collect()
    }
}

fn pod_ip(i: usize) -> Ipv4Addr {
    // 10.1.0.0 onwards (service VIPs are in 10.96/16): room for 5.9 million pods.
    let n = (10u32 << 24) + (1 << 16) + u32::try_from(i).unwrap_or(u32::MAX);
    Ipv4Addr::from(n)
}

fn pod_yaml(i: usize, ns: usize, app: usize, node: usize, extra_label: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{ns}, uid: 0b5e1c2a-7d3f-4a61-9c8e-{i:012}, labels: {{app: svc-{app}{extra_label}}}}}\nspec: {{nodeName: node-{node}, serviceAccountName: sa-{app}}}\nstatus: {{podIP: {}}}\n---\n",
        pod_ip(i)
    )
}

fn service_yaml(s: usize, ns: usize, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: ns-{ns}}}\nspec: {{selector: {{app: svc-{s}}}, clusterIP: 10.96.{}.{}, ports: [{ports}]}}\n---\n",
        s / 256,
        s % 256
    )
}

fn policy_yaml(p: usize, ns: &str, from: &str) -> String {
    format!(
        "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: pol-{p}, namespace: {ns}}}\nspec: {{selector: {{matchLabels: {{app: svc-{p}}}}}, action: ALLOW, rules: [{{from: [{{source: {{namespaces: [{from}]}}}}]}}]}}\n---\n"
    )
}

/// The cluster as YAML batches of at most `batch` objects (namespaces first).
fn cluster(shape: &Shape, batch: usize) -> Vec<String> {
    let mut docs = Vec::new();
    docs.push("apiVersion: v1\nkind: Namespace\nmetadata: {name: weft-system}\n---\n".to_owned());
    for ns in 0..shape.namespaces {
        docs.push(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}, annotations: {{weft.dev/dataplane-mode: ambient}}}}\n---\n"
        ));
    }
    for s in 0..shape.services {
        docs.push(service_yaml(
            s,
            shape.namespace_of_service(s),
            "{port: 80, targetPort: 8080}",
        ));
    }
    for i in 0..shape.pods {
        let (ns, app, node) = shape.pod(i);
        docs.push(pod_yaml(i, ns, app, node, ""));
    }
    for p in 0..shape.policies {
        let ns = shape.namespace_of_service(p % shape.services);
        docs.push(policy_yaml(p, &format!("ns-{ns}"), "ns-0"));
    }
    docs.chunks(batch).map(|c| c.concat()).collect()
}

/// A stable 64-bit hash of `type/name` (the harness's own key for what an agent holds).
fn key_hash(ty: &str, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ty.bytes().chain(std::iter::once(b'/')).chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What every simulated agent reports to.
pub struct Probe {
    watch: Mutex<Option<Watched>>,
    resyncs: Vec<AtomicU64>,
    drops: AtomicU64,
    /// Connections whose TLS handshake with the controller timed out (the agent's deadline).
    handshake_timeouts: AtomicU64,
    /// Notices that an agent's resync waits for its turn, and the most agents one said were ahead.
    queued_notices: AtomicU64,
    most_ahead: AtomicU64,
    /// Why streams ended: the error's code and message, and how often.
    ended: Mutex<BTreeMap<String, u64>>,
    pushes: AtomicU64,
    bytes: AtomicU64,
}

/// The change being measured: the key it changes, and when each agent got it.
struct Watched {
    key: u64,
    since: Instant,
    arrived: Vec<Option<Duration>>,
    pushes: u64,
    bytes: u64,
}

impl Probe {
    fn new(agents: usize) -> Arc<Probe> {
        Arc::new(Probe {
            watch: Mutex::new(None),
            resyncs: (0..agents).map(|_| AtomicU64::new(0)).collect(),
            drops: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            queued_notices: AtomicU64::new(0),
            most_ahead: AtomicU64::new(0),
            ended: Mutex::new(BTreeMap::new()),
            pushes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }

    fn arrived(&self, agent: usize, touched: &[u64], resync: bool, bytes: u64) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if resync {
            self.resyncs[agent].fetch_add(1, Ordering::Relaxed);
        }
        let mut watch = self.watch.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = watch.as_mut() {
            w.pushes += 1;
            w.bytes += bytes;
            if w.arrived[agent].is_none() && touched.contains(&w.key) {
                w.arrived[agent] = Some(w.since.elapsed());
            }
        }
    }

    fn resyncs(&self) -> Vec<u64> {
        self.resyncs.iter().map(|r| r.load(Ordering::Relaxed)).collect()
    }
}

/// A simulated agent's holdings: the version of each resource, by key hash.
#[derive(Clone)]
pub struct Sim {
    agent: usize,
    probe: Arc<Probe>,
    held: imbl::HashMap<u64, (u64, u16, u64)>,
    synced: bool,
}

pub struct SimStaged {
    next: Sim,
    replaced: HashSet<u16>,
    received: HashSet<u64>,
    touched: Vec<u64>,
    resync: bool,
    bytes: u64,
}

impl Holdings for Sim {
    type Staged = SimStaged;

    fn synced(&self) -> bool {
        self.synced
    }

    fn held(&self) -> Vec<u64> {
        let mut buckets = vec![0u64; sync::BUCKETS];
        for (_, bucket, digest) in self.held.values() {
            let b = &mut buckets[usize::from(*bucket)];
            *b = b.wrapping_add(*digest);
        }
        buckets
    }

    fn stage(self: &Arc<Self>, first: &v1::Push) -> SimStaged {
        let mut next = (**self).clone();
        if first.full {
            next.held = imbl::HashMap::new();
        }
        next.synced = true;
        SimStaged {
            next,
            replaced: first
                .replaced_buckets
                .iter()
                .filter_map(|b| u16::try_from(*b).ok())
                .collect(),
            received: HashSet::new(),
            touched: Vec::new(),
            resync: first.resync,
            bytes: 0,
        }
    }

    fn take(staged: &mut SimStaged, chunk: &v1::Push) {
        staged.bytes += chunk.encoded_len() as u64;
        for k in &chunk.removed {
            let h = key_hash(&k.r#type, &k.name);
            staged.next.held.remove(&h);
            staged.touched.push(h);
        }
        for r in &chunk.resources {
            let Some(k) = &r.key else { continue };
            let h = key_hash(&k.r#type, &k.name);
            // sync::bucket is below BUCKETS (1024).
            let bucket = sync::bucket(&k.r#type, &k.name) as u16;
            let digest = sync::digest(&k.r#type, &k.name, r.version);
            staged.next.held.insert(h, (r.version, bucket, digest));
            staged.received.insert(h);
            staged.touched.push(h);
        }
    }

    fn finish(staged: SimStaged) -> (Sim, Vec<(String, String)>) {
        let SimStaged {
            mut next,
            replaced,
            received,
            touched,
            resync,
            bytes,
        } = staged;
        if !replaced.is_empty() {
            let gone: Vec<u64> = next
                .held
                .iter()
                .filter(|(h, (_, b, _))| replaced.contains(b) && !received.contains(*h))
                .map(|(h, _)| *h)
                .collect();
            for h in gone {
                next.held.remove(&h);
            }
        }
        next.probe.arrived(next.agent, &touched, resync, bytes);
        (next, Vec::new())
    }

    fn stream_ended(&self, error: Option<&tonic::Status>) {
        self.probe.drops.fetch_add(1, Ordering::Relaxed);
        let why = error.map_or_else(
            || "closed by the controller".to_owned(),
            |e| format!("{:?}: {}", e.code(), e.message()),
        );
        if let Ok(mut ended) = self.probe.ended.lock() {
            *ended.entry(why).or_default() += 1;
        }
        if error.is_some_and(|e| e.message().contains("handshake timeout")) {
            self.probe.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn queued(&self, ahead: u32) {
        self.probe.queued_notices.fetch_add(1, Ordering::Relaxed);
        self.probe.most_ahead.fetch_max(u64::from(ahead), Ordering::Relaxed);
    }
}

/// How the controller is started: `weft-controller --listen <addr>` and these (kept for its
/// restart).
#[derive(Clone, Debug, Default)]
struct Launch {
    args: Vec<OsString>,
    env: Vec<(String, OsString)>,
    /// The admin socket it serves (the local store's): it is up once both answer.
    admin_socket: Option<PathBuf>,
    /// How long it may take to come up (the Kubernetes source lists the cluster first).
    ready_within: Duration,
}

/// The controller process, with what it was started with.
struct ControllerProcess {
    child: Child,
    dir: PathBuf,
    bin: PathBuf,
    listen: SocketAddr,
    launch: Launch,
}

impl ControllerProcess {
    /// The controller on the local store in `dir/state`, agents authenticated by `dir/tokens.json`.
    fn local(bin: &Path, dir: &Path, listen: SocketAddr, shape: &Shape) -> anyhow::Result<ControllerProcess> {
        let state = dir.join("state");
        let mut args: Vec<OsString> = vec![
            "--state-dir".into(),
            state.clone().into(),
            "--node-tokens".into(),
            dir.join("tokens.json").into(),
        ];
        args.extend(shape.controller_args());
        let launch = Launch {
            args,
            env: Vec::new(),
            admin_socket: Some(state.join("admin.sock")),
            ready_within: Duration::from_secs(30),
        };
        ControllerProcess::start(bin, dir, listen, launch)
    }

    fn start(bin: &Path, dir: &Path, listen: SocketAddr, launch: Launch) -> anyhow::Result<ControllerProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("controller.log"))
            .context("controller.log")?;
        let child = Command::new(bin)
            .arg("--listen")
            .arg(listen.to_string())
            .args(&launch.args)
            .env("RUST_LOG", "warn")
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let process = ControllerProcess {
            child,
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            listen,
            launch,
        };
        process.wait_ready()?;
        Ok(process)
    }

    fn socket(&self) -> PathBuf {
        self.launch.admin_socket.clone().unwrap_or_default()
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let limit = self.launch.ready_within;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let socket = self.launch.admin_socket.as_ref().is_none_or(|s| s.exists());
            if socket && std::net::TcpStream::connect(self.listen).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "the controller did not come up within {limit:?}; see {}",
            self.dir.join("controller.log").display()
        )
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // After the command name (in parentheses, which may hold spaces): fields 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
            .sum();
        // SAFETY: sysconf has no preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .unwrap_or(100)
            .max(1);
        Duration::from_micros(ticks * 1_000_000 / hz)
    }

    /// (RSS, peak RSS) in MiB.
    fn memory(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
    }

    fn stop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let next = ControllerProcess::start(&self.bin, &self.dir, self.listen, self.launch.clone())?;
        drop(std::mem::replace(self, next));
        Ok(())
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// One measured change.
#[derive(Debug, Serialize)]
pub struct ChangeReport {
    pub kind: &'static str,
    /// Agents that need it, and how many got it.
    pub expected: usize,
    pub arrived: usize,
    pub apply_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Bytes pushed (all agents) while it was distributed, and per push.
    pub bytes: u64,
    pub bytes_per_push: f64,
    pub controller_cpu_ms: f64,
}

/// One run at one N.
#[derive(Debug, Serialize)]
pub struct Report {
    pub shape: Shape,
    pub initial_sync_s: f64,
    /// Connections and streams that ended before every agent's first push (each agent then
    /// reconnects after its backoff), and why: mostly connections the controller's admission
    /// refused (it handshakes a bounded number at a time).
    pub initial_sync_drops: u64,
    pub initial_sync_ended: BTreeMap<String, u64>,
    /// The most resyncs the controller said waited ahead of an agent's, in the first sync.
    pub initial_sync_most_ahead: u64,
    pub full_push_bytes_per_workload: f64,
    pub changes: Vec<ChangeReport>,
    pub streams_dropped: u64,
    pub controller_rss_mib: f64,
    pub controller_peak_rss_mib: f64,
    pub restart_resync_s: f64,
    pub restart_resync_bytes: u64,
    /// TLS handshakes with the controller that timed out, in the whole run (restart included).
    pub handshake_timeouts: u64,
    /// The restarted controller's RSS once every agent resynced (no full push since it started).
    pub restarted_rss_mib: f64,
}

impl Report {
    /// Whether every agent got every change, no stream dropped and no TLS handshake timed out (what
    /// CI asserts; no timing).
    pub fn complete(&self) -> Result<(), String> {
        for c in &self.changes {
            if c.arrived != c.expected {
                return Err(format!("{}: {} of {} agents got it", c.kind, c.arrived, c.expected));
            }
        }
        let unexpected: Vec<String> = self
            .initial_sync_ended
            .iter()
            .filter(|(why, _)| !admission_refusal(why))
            .map(|(why, n)| format!("{n} x {why}"))
            .collect();
        if !unexpected.is_empty() {
            return Err(format!(
                "connections ended in the first sync other than by admission: {}",
                unexpected.join("; ")
            ));
        }
        if self.streams_dropped > 0 {
            return Err(format!(
                "{} streams dropped while changes were distributed",
                self.streams_dropped
            ));
        }
        if self.handshake_timeouts > 0 {
            return Err(format!(
                "{} TLS handshakes with the controller timed out",
                self.handshake_timeouts
            ));
        }
        Ok(())
    }
}

/// Whether a connection ended in the first sync because the controller's admission refused it (it
/// handshakes a bounded number at a time and resets the rest, which retry after their backoff): the
/// only expected way for one to end. An agent that gave up waiting for its first push
/// (DeadlineExceeded) or a stream the controller broke is not.
fn admission_refusal(why: &str) -> bool {
    why.starts_with("Unavailable:") && (why.contains("tls handshake eof") || why.contains("Connection reset by peer"))
}

/// Runs the harness once: `bin_dir` has `weft-controller`; `dir` is scratch (emptied first).
pub async fn run(shape: Shape, bin_dir: &Path, dir: &Path) -> anyhow::Result<Report> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("state")).context("scratch dir")?;
    std::fs::create_dir_all(dir.join("tokens")).context("scratch dir")?;
    let tokens: serde_json::Map<String, serde_json::Value> = (0..shape.nodes)
        .map(|n| {
            (
                format!("node-{n}"),
                serde_json::Value::String(format!("token-{n}-scale")),
            )
        })
        .collect();
    let tokens_path = dir.join("tokens.json");
    std::fs::write(&tokens_path, serde_json::to_vec(&tokens)?)?;
    std::fs::set_permissions(&tokens_path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    for n in 0..shape.nodes {
        std::fs::write(dir.join("tokens").join(format!("node-{n}")), format!("token-{n}-scale"))?;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let controller = ControllerProcess::local(&bin_dir.join("weft-controller"), dir, listen, &shape)?;
    let socket = controller.socket();

    // The cluster, then the agents (whose first pushes are full).
    let started = Instant::now();
    for batch in cluster(&shape, 2000) {
        apply(&socket, batch).await?;
    }
    eprintln!("  cluster applied in {:.1} s", started.elapsed().as_secs_f64());
    let probe = Probe::new(shape.nodes);
    let agents = Agents::start(
        &shape,
        &probe,
        listen,
        &dir.join("state").join("root.pem"),
        &dir.join("tokens"),
    )
    .await?;

    let all: BTreeSet<usize> = (0..shape.nodes).collect();
    let policy_ns = shape.namespace_of_service(3 % shape.services);
    let new_pod = shape.pods + 1;
    let (new_ns, new_app, _) = shape.pod(new_pod);
    let changes: Vec<ChangeSpec> = vec![
        (
            "policy",
            policy_yaml(3, &format!("ns-{policy_ns}"), "ns-1"),
            true,
            (v1_types::POLICY, format!("ns-{policy_ns}/pol-3")),
            shape.nodes_of_namespace(policy_ns),
        ),
        (
            "pod-add",
            pod_yaml(new_pod, new_ns, new_app, 0, ""),
            true,
            (v1_types::WORKLOAD, format!("ns-{new_ns}/pod-{new_pod}")),
            all.clone(),
        ),
        (
            "pod-label",
            {
                let (ns, app, node) = shape.pod(5);
                pod_yaml(5, ns, app, node, ", version: v2")
            },
            true,
            (v1_types::WORKLOAD, format!("ns-{}/pod-5", shape.pod(5).0)),
            all.clone(),
        ),
        (
            "pod-delete",
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{new_pod}, namespace: ns-{new_ns}}}\n"),
            false,
            (v1_types::WORKLOAD, format!("ns-{new_ns}/pod-{new_pod}")),
            all.clone(),
        ),
        (
            "service",
            service_yaml(7 % shape.services, shape.namespace_of_service(7 % shape.services), "{port: 80, targetPort: 8080}, {port: 81, targetPort: 8081}"),
            true,
            (v1_types::SERVICE, format!("ns-{}/svc-{}", shape.namespace_of_service(7 % shape.services), 7 % shape.services)),
            all.clone(),
        ),
        (
            "namespace",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ns-0, labels: {tier: gold}, annotations: {weft.dev/dataplane-mode: ambient}}\n".to_owned(),
            true,
            (v1_types::NAMESPACE, "ns-0".to_owned()),
            all.clone(),
        ),
        (
            "root-policy",
            policy_yaml(0, "weft-system", "ns-2"),
            true,
            (v1_types::POLICY, "weft-system/pol-0".to_owned()),
            all.clone(),
        ),
    ];
    let mut reports = Vec::new();
    for (kind, yaml, is_apply, (ty, name), expected) in changes {
        let socket = &socket;
        let change = async move {
            if is_apply {
                apply(socket, yaml).await
            } else {
                delete(socket, yaml).await
            }
        };
        reports.push(measure(&probe, &controller, kind, (ty, &name), &expected, change).await?);
    }
    agents.report(shape, reports, &probe, controller).await
}

/// The simulated agents, connected.
struct Agents {
    receivers: Vec<watch::Receiver<Arc<Sim>>>,
    /// The agents' tasks: aborted when the run ends (dropped), so that a run's agents neither
    /// reconnect during the next run nor keep what they hold.
    tasks: tokio::task::JoinSet<()>,
    initial_sync_s: f64,
    initial_sync_most_ahead: u64,
    full_push_bytes_per_workload: f64,
    drops_before: u64,
    ended_before: BTreeMap<String, u64>,
}

impl Agents {
    /// Connects one simulated agent per node (node-N with the token in `tokens/node-N`) and waits
    /// for every first push.
    async fn start(
        shape: &Shape,
        probe: &Arc<Probe>,
        listen: SocketAddr,
        ca: &Path,
        tokens: &Path,
    ) -> anyhow::Result<Agents> {
        let mut receivers = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        let started = Instant::now();
        // The agent's own deadlines: a resync that waits for its turn is told so, and does not
        // take the wait for a silent controller however long the queue.
        let deadlines = Deadlines::default();
        for n in 0..shape.nodes {
            // 127.1.0.1 onwards: each simulated node connects from an address of its own.
            let local = IpAddr::V4(Ipv4Addr::from((127u32 << 24) + (1 << 16) + 1 + u32::try_from(n)?));
            let client = Controller::with_local_address(
                &format!("https://{listen}"),
                ca,
                "weft-controller",
                &tokens.join(format!("node-{n}")),
                deadlines,
                Some(local),
            )?;
            let sim = Arc::new(Sim {
                agent: n,
                probe: probe.clone(),
                held: imbl::HashMap::new(),
                synced: false,
            });
            let (tx, rx) = watch::channel(sim);
            receivers.push(rx);
            tasks.spawn(discovery::run(client, format!("node-{n}"), tx));
        }
        wait_until("every agent's first push", Duration::from_secs(600), || {
            probe.resyncs().iter().all(|r| *r >= 1)
        })
        .await?;
        let initial_sync_s = started.elapsed().as_secs_f64();
        let full_bytes = probe.bytes.load(Ordering::Relaxed);
        let drops = probe.drops.load(Ordering::Relaxed);
        let most_ahead = probe.most_ahead.load(Ordering::Relaxed);
        eprintln!(
            "  {} agents synced in {initial_sync_s:.1} s ({} notices that a resync waits, at most {most_ahead} ahead; {drops} streams ended)",
            shape.nodes,
            probe.queued_notices.load(Ordering::Relaxed)
        );
        let ended_before = probe.ended.lock().map(|e| e.clone()).unwrap_or_default();
        for (why, n) in &ended_before {
            eprintln!("    {n} ended: {why}");
        }
        Ok(Agents {
            receivers,
            tasks,
            initial_sync_s,
            initial_sync_most_ahead: most_ahead,
            full_push_bytes_per_workload: full_bytes as f64 / shape.nodes as f64 / shape.pods as f64,
            drops_before: probe.drops.load(Ordering::Relaxed),
            ended_before,
        })
    }

    /// After the changes: the streams dropped, the controller's memory, then a controller restart
    /// (every agent reconnects and resyncs what differs: nothing), and the report.
    async fn report(
        self,
        shape: Shape,
        changes: Vec<ChangeReport>,
        probe: &Probe,
        mut controller: ControllerProcess,
    ) -> anyhow::Result<Report> {
        let streams_dropped = probe.drops.load(Ordering::Relaxed) - self.drops_before;
        let (rss, peak) = controller.memory();
        let before = probe.resyncs();
        let bytes_before = probe.bytes.load(Ordering::Relaxed);
        let t = Instant::now();
        controller.restart()?;
        wait_until(
            "every agent's resync after the restart",
            Duration::from_secs(300),
            || probe.resyncs().iter().zip(&before).all(|(now, then)| now > then),
        )
        .await?;
        let restart_resync_s = t.elapsed().as_secs_f64();
        let restart_resync_bytes = probe.bytes.load(Ordering::Relaxed) - bytes_before;
        let (restarted_rss, _) = controller.memory();
        eprintln!(
            "  restart: all {} agents resynced in {restart_resync_s:.2} s; controller RSS then {restarted_rss:.0} MiB",
            shape.nodes
        );
        drop(self.receivers);
        drop(self.tasks);
        controller.stop();
        Ok(Report {
            shape,
            initial_sync_s: self.initial_sync_s,
            initial_sync_drops: self.drops_before,
            initial_sync_ended: self.ended_before,
            initial_sync_most_ahead: self.initial_sync_most_ahead,
            full_push_bytes_per_workload: self.full_push_bytes_per_workload,
            changes,
            streams_dropped,
            controller_rss_mib: rss,
            controller_peak_rss_mib: peak,
            restart_resync_s,
            restart_resync_bytes,
            handshake_timeouts: probe.handshake_timeouts.load(Ordering::Relaxed),
            restarted_rss_mib: restarted_rss,
        })
    }
}

/// Makes one change (`change`: its commit) to the resource `(type, name)` and measures its
/// distribution to the agents of `expected`.
async fn measure(
    probe: &Probe,
    controller: &ControllerProcess,
    kind: &'static str,
    (ty, name): (&str, &str),
    expected: &BTreeSet<usize>,
    change: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<ChangeReport> {
    let agents = probe.resyncs.len();
    {
        let mut w = probe.watch.lock().unwrap_or_else(|e| e.into_inner());
        *w = Some(Watched {
            key: key_hash(ty, name),
            since: Instant::now(),
            arrived: vec![None; agents],
            pushes: 0,
            bytes: 0,
        });
    }
    let cpu = controller.cpu();
    let t = Instant::now();
    change.await.with_context(|| format!("the {kind} change"))?;
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    let done = || {
        let w = probe.watch.lock().unwrap_or_else(|e| e.into_inner());
        w.as_ref()
            .is_some_and(|w| expected.iter().all(|a| w.arrived[*a].is_some()))
    };
    let arrived_all = wait_until(kind, Duration::from_secs(120), done).await.is_ok();
    let cpu_ms = (controller.cpu().saturating_sub(cpu)).as_secs_f64() * 1e3;
    let w = probe
        .watch
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .context("the watch")?;
    let mut times: Vec<f64> = expected
        .iter()
        .filter_map(|a| w.arrived[*a])
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if times.is_empty() {
            f64::NAN
        } else {
            let i = ((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1;
            times[i]
        }
    };
    let report = ChangeReport {
        kind,
        expected: expected.len(),
        arrived: times.len(),
        apply_ms,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: times.last().copied().unwrap_or(f64::NAN),
        bytes: w.bytes,
        bytes_per_push: if w.pushes == 0 {
            0.0
        } else {
            w.bytes as f64 / w.pushes as f64
        },
        controller_cpu_ms: cpu_ms,
    };
    eprintln!(
        "  {kind}: {}/{} agents, p50 {:.0} ms, p99 {:.0} ms, apply {:.0} ms, cpu {:.0} ms{}",
        report.arrived,
        report.expected,
        report.p50_ms,
        report.p99_ms,
        report.apply_ms,
        report.controller_cpu_ms,
        if arrived_all { "" } else { " (INCOMPLETE)" }
    );
    Ok(report)
}

/// A change to measure: its kind, its YAML, apply (or delete), the (type, name) it changes and the
/// agents that need it.
type ChangeSpec = (&'static str, String, bool, (&'static str, String), BTreeSet<usize>);

mod v1_types {
    pub use weft_api::types::{NAMESPACE, POLICY, SERVICE, WORKLOAD};
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

async fn store(socket: &Path) -> anyhow::Result<v1::store_client::StoreClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    Ok(v1::store_client::StoreClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

async fn apply(socket: &Path, yaml: String) -> anyhow::Result<()> {
    store(socket)
        .await?
        .apply(v1::ApplyRequest {
            yaml,
            source: "scale".into(),
        })
        .await
        .context("apply")?;
    Ok(())
}

async fn delete(socket: &Path, yaml: String) -> anyhow::Result<()> {
    store(socket)
        .await?
        .delete(v1::DeleteRequest {
            yaml,
            source: "scale".into(),
            ignore_not_found: false,
        })
        .await
        .context("delete")?;
    Ok(())
}

/// The reports as a Markdown table, one row per (N, change).
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| N | pods | change | agents | p50 ms | p99 ms | max ms | apply ms | bytes/push | controller CPU ms |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        for c in &r.changes {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {}/{} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                r.shape.nodes,
                r.shape.pods,
                c.kind,
                c.arrived,
                c.expected,
                c.p50_ms,
                c.p99_ms,
                c.max_ms,
                c.apply_ms,
                c.bytes_per_push,
                c.controller_cpu_ms
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| N | initial sync s | its ended connections | most queued ahead | full push bytes/workload | streams dropped | controller RSS MiB (peak) | restart: all resynced s | restart bytes | RSS after restart MiB | handshake timeouts |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {} | {} | {:.0} | {} | {:.0} ({:.0}) | {:.2} | {} | {:.0} | {} |",
            r.shape.nodes,
            r.initial_sync_s,
            r.initial_sync_drops,
            r.initial_sync_most_ahead,
            r.full_push_bytes_per_workload,
            r.streams_dropped,
            r.controller_rss_mib,
            r.controller_peak_rss_mib,
            r.restart_resync_s,
            r.restart_resync_bytes,
            r.restarted_rss_mib,
            r.handshake_timeouts
        );
    }
    out
}

/// What the agent's own state costs at a scale: built from pushes of `workloads` workloads and
/// `services` services (in chunks, as the controller sends them), then `deltas` single-workload
/// changes applied one at a time.
#[derive(Debug, Serialize)]
pub struct AgentReport {
    pub workloads: usize,
    pub services: usize,
    /// RSS growth of this process for the state, MiB.
    pub state_mib: f64,
    /// RSS of the whole process holding the state, MiB: what an agent would hold, less the
    /// agent's own code and runtime.
    pub process_mib: f64,
    /// The same after `malloc_trim`, as the agent does every few seconds: without the free heap
    /// pages that building the state left behind.
    pub process_trimmed_mib: f64,
    /// The process's peak RSS, MiB (the full apply's transients included).
    pub process_peak_mib: f64,
    pub full_apply_s: f64,
    pub delta_p50_ms: f64,
    pub delta_max_ms: f64,
}

/// A field of this process's `/proc/self/status` in kB (`VmRSS`, `VmHWM`), as MiB.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn rss_mib() -> f64 {
    status_mib("VmRSS")
}

fn agent_workload(i: usize, services: usize, version: u64) -> v1::Resource {
    let s = i % services;
    let ns = s % 100;
    let name = format!("ns-{ns}/pod-{i}");
    v1::Resource {
        key: Some(v1::ResourceKey {
            r#type: weft_api::types::WORKLOAD.into(),
            name: name.clone(),
        }),
        version,
        kind: Some(v1::resource::Kind::Workload(v1::Workload {
            uid: format!("0b5e1c2a-7d3f-4a61-9c8e-{i:012}"),
            namespace: format!("ns-{ns}"),
            name: format!("pod-{i}"),
            node: format!("node-{}", i % 1000),
            service_account: format!("sa-{s}"),
            identity: format!("spiffe://cluster.local/ns/ns-{ns}/sa/sa-{s}"),
            labels: [("app".to_owned(), format!("svc-{s}"))].into(),
            annotations: Default::default(),
            ips: vec![pod_ip(i).to_string()],
            services: vec![format!("ns-{ns}/svc-{s}")],
        })),
    }
}

/// Measures the agent's state (`weft_node::state::State`) holding `workloads` and `services`.
pub fn agent_state(workloads: usize, services: usize, deltas: usize) -> anyhow::Result<AgentReport> {
    use weft_node::state::State;
    let services = services.max(1);
    let before = rss_mib();
    let started = Instant::now();
    let push = |resources: Vec<v1::Resource>, full: bool, more: bool| v1::Push {
        nonce: "1".into(),
        full,
        resources,
        revision: 1,
        store_id: "s".into(),
        resync: full,
        more,
        ..Default::default()
    };
    let service = |s: usize| v1::Resource {
        key: Some(v1::ResourceKey {
            r#type: weft_api::types::SERVICE.into(),
            name: format!("ns-{}/svc-{s}", s % 100),
        }),
        version: 1,
        kind: Some(v1::resource::Kind::Service(v1::Service {
            namespace: format!("ns-{}", s % 100),
            name: format!("svc-{s}"),
            vips: vec![format!("10.96.{}.{}", s / 256, s % 256)],
            ports: vec![v1::ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
            }],
        })),
    };
    // Chunks of 300 resources (about 64 KiB, as the controller cuts them).
    let first = push(Vec::new(), true, true);
    let empty = Arc::new(State::default());
    let mut staged = empty.stage(&first);
    let all: Vec<usize> = (0..services).map(|s| s + workloads).chain(0..workloads).collect();
    for chunk in all.chunks(300) {
        let resources = chunk
            .iter()
            .map(|i| {
                if *i >= workloads {
                    service(*i - workloads)
                } else {
                    agent_workload(*i, services, 1)
                }
            })
            .collect();
        staged.take(&push(resources, true, true));
    }
    let (state, rejected) = staged.finish();
    anyhow::ensure!(rejected.is_empty(), "rejected: {:?}", rejected.first());
    let full_apply_s = started.elapsed().as_secs_f64();
    let mut state = Arc::new(state);
    let process_mib = rss_mib();
    let state_mib = process_mib - before;
    // SAFETY: malloc_trim only releases memory malloc does not hand out; safe at any time.
    unsafe { libc::malloc_trim(0) };
    let process_trimmed_mib = rss_mib();
    let mut times = Vec::new();
    for d in 0..deltas {
        let delta = push(
            vec![agent_workload(d * 7919 % workloads, services, 2 + d as u64)],
            false,
            false,
        );
        let t = Instant::now();
        let mut staged = state.stage(&delta);
        staged.take(&delta);
        let (next, _) = staged.finish();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        state = Arc::new(next);
    }
    times.sort_by(f64::total_cmp);
    anyhow::ensure!(state.sizes() == (workloads, services), "sizes {:?}", state.sizes());
    Ok(AgentReport {
        workloads,
        services,
        state_mib,
        process_mib,
        process_trimmed_mib,
        process_peak_mib: status_mib("VmHWM"),
        full_apply_s,
        delta_p50_ms: times.get(times.len() / 2).copied().unwrap_or(0.0),
        delta_max_ms: times.last().copied().unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::admission_refusal;

    #[test]
    fn only_admission_refusals_are_expected_ends_of_the_first_sync() {
        assert!(admission_refusal("Unavailable: tls handshake eof"));
        assert!(admission_refusal(
            "Unavailable: error trying to connect: Connection reset by peer (os error 104)"
        ));
        assert!(!admission_refusal(
            "DeadlineExceeded: the controller sent nothing for 30s before its first push"
        ));
        assert!(!admission_refusal("closed by the controller"));
        assert!(!admission_refusal(
            "Internal: h2 protocol error: Connection reset by peer"
        ));
    }
}
