//! Wires the agent together: capture, the workload source, the reconciler.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::sync::watch;
use weft_dataplane::socket::CongestionControl;
use weft_hbone::client::{Pool, PoolConfig};
use weft_model::{
    Pod, WorkloadSnapshot,
    cni::{PodEvent, Reply},
    enrollment,
};

use crate::{
    capture::Capture,
    cni,
    config::{Config, DEFAULT_TUNNEL_CONGESTION, TunnelCongestion},
    controller::Controller,
    discovery,
    identity::Identities,
    inpod::InPod,
    mesh::Mesh,
    state::State,
};

/// The congestion control HBONE connections get, checked against this kernel before anything is served:
/// one named explicitly must exist, the default falls back to each pod's own.
fn tunnel_congestion(asked: &TunnelCongestion) -> anyhow::Result<Option<CongestionControl>> {
    let chosen = match asked {
        TunnelCongestion::System => None,
        TunnelCongestion::Named(cc) => {
            cc.check()
                .map_err(|e| anyhow::anyhow!("--tunnel-congestion-control: {e}"))?;
            Some(cc.clone())
        }
        TunnelCongestion::Default => {
            let cc: CongestionControl = DEFAULT_TUNNEL_CONGESTION
                .parse()
                .map_err(|e: String| anyhow::anyhow!("{e}"))?;
            match cc.check() {
                Ok(()) => Some(cc),
                Err(e) => {
                    tracing::warn!(error = %e, "HBONE connections keep each pod's congestion control");
                    None
                }
            }
        }
    };
    let shown = chosen.as_ref().map_or("the pod's default", CongestionControl::name);
    tracing::info!(congestion_control = shown, "HBONE connections");
    Ok(chosen)
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(config: Config) -> anyhow::Result<()> {
    raise_memlock();
    if let Err(e) = weft_dataplane::socket::raise_open_file_limit() {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    let tunnel_congestion = tunnel_congestion(&config.tunnel_congestion)?;
    let own_cgroup = own_cgroup(&config)?;
    // One worker: a current-thread runtime runs woken tasks in order, so the tunnels' HTTP/2 connection task
    // runs after every stream that queued data in the same turn and sends their frames in one TLS write.
    // (The multi-thread scheduler runs a just-woken task next, one frame per write.)
    let mut builder = match config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    let runtime = builder.enable_all().build().context("starting the async runtime")?;
    runtime.block_on(serve(config, tunnel_congestion, own_cgroup))
}

async fn serve(
    config: Config,
    tunnel_congestion: Option<CongestionControl>,
    own_cgroup: std::path::PathBuf,
) -> anyhow::Result<()> {
    let agent_cgroup = weft_dataplane::cgroup::id(&own_cgroup)
        .with_context(|| format!("reading the id of cgroup {}", own_cgroup.display()))?;
    let mut capture = Capture::start(&config.bpf_pin_dir, &config.cgroup, agent_cgroup).context("starting capture")?;
    tracing::info!(node = %config.node, cgroup = %config.cgroup.display(), pins = %config.bpf_pin_dir.display(), "capture ready");
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state directory {}", config.state_dir.display()))?;
    let state_file = config.state_dir.join("pod-networks.json");
    let mut networks = cni::load(&state_file);
    let mut cni_events = cni::spawn(&config.cni_socket).context("starting the CNI endpoint")?;
    let controller = Controller::new(
        &config.controller,
        &config.controller_ca,
        &config.controller_name,
        &config.node_token_file,
    )?;
    let (state_tx, mut states) = watch::channel(Arc::new(State::default()));
    tokio::spawn(discovery::run(controller.clone(), config.node.clone(), state_tx));
    tokio::spawn(return_freed_memory());
    let identities = Identities::new(controller, config.trust_domain.clone());
    let mesh = Arc::new(Mesh {
        state: states.clone(),
        identities: identities.clone(),
        pool: Pool::new(PoolConfig::default()),
        strict_mtls: config.strict_mtls,
        next_endpoint: Default::default(),
        tunnel_congestion,
    });
    let mut reconciler = Reconciler {
        node: config.node.clone(),
        pods: BTreeMap::new(),
        first: true,
        mesh,
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    let mut ready = false;
    loop {
        let mut reply = None;
        tokio::select! {
            changed = states.changed() => {
                if changed.is_err() { anyhow::bail!("the discovery client stopped"); }
            }
            Some((event, reply_tx)) = cni_events.recv() => {
                cni::apply(&mut networks, &event);
                let saved = cni::save(&state_file, &networks);
                // The pod's metadata may still be on its way from the workload source.
                if let PodEvent::Add(n) = &event {
                    let deadline = tokio::time::Instant::now() + POD_METADATA_WAIT;
                    while !states.borrow().has_pod(&n.uid)
                        && tokio::time::timeout_at(deadline, states.changed()).await.is_ok_and(|r| r.is_ok())
                    {}
                }
                reply = Some((event, reply_tx, saved));
            }
            _ = retry.tick() => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        let state = states.borrow_and_update().clone();
        let snapshot = with_networks(state.snapshot(), &networks);
        if state.synced {
            // Before the first push the agent knows nothing; reconciling then would unenroll everything.
            reconciler.reconcile(&snapshot, &state, &mut capture);
            identities.want(&reconciler.identities());
            if !ready {
                // Serving: the controller's config is in and every enrolled pod has its listeners.
                ready = true;
                tracing::info!(revision = state.revision, pods = reconciler.pods.len(), "ready");
            }
        }
        if let Some((event, reply_tx, saved)) = reply {
            // Answered only now: a pod that must be captured is, before its containers start.
            let _ = reply_tx.send(cni_reply(&event, &snapshot, &reconciler, saved));
        }
    }
    tracing::info!("shutting down; capture stays attached and refuses connections until an agent returns");
    Ok(())
}

/// How long a CNI ADD waits for the pod's metadata (namespace, annotations) to arrive.
const POD_METADATA_WAIT: Duration = Duration::from_secs(5);

/// The answer to the CNI plugin: failure if the pod should be captured and is not, so the runtime
/// retries instead of starting the pod outside the mesh.
fn cni_reply(
    event: &PodEvent,
    snapshot: &WorkloadSnapshot,
    reconciler: &Reconciler,
    saved: std::io::Result<()>,
) -> Reply {
    let fail = |e: String| Reply {
        ok: false,
        error: Some(e),
    };
    if let Err(e) = saved {
        return fail(format!("persisting pod networks: {e}"));
    }
    let PodEvent::Add(n) = event else {
        return Reply { ok: true, error: None };
    };
    let Some(pod) = snapshot.pods.iter().find(|p| p.uid == n.uid) else {
        return fail(format!(
            "pod {}/{} is not known to the node agent yet",
            n.namespace, n.name
        ));
    };
    let wanted = pod.node == reconciler.node && enrollment::is_enrolled(pod, snapshot.namespace(&pod.namespace));
    if wanted && !reconciler.pods.contains_key(&n.uid) {
        return fail(format!(
            "pod {} could not be enrolled; see the agent's log",
            pod.qualified_name()
        ));
    }
    Reply { ok: true, error: None }
}

/// Joins what the workload source says about pods with what the CNI plugin reported on this node:
/// a pod can be captured once its network namespace is known. The CNI's addresses win (they are what
/// the runtime assigned).
fn with_networks(mut snapshot: WorkloadSnapshot, networks: &cni::Networks) -> WorkloadSnapshot {
    for pod in &mut snapshot.pods {
        match networks.get(&pod.uid) {
            Some(n) => {
                pod.netns = Some(n.netns.clone());
                if !n.ips.is_empty() {
                    pod.ips = n.ips.clone();
                }
            }
            None => pod.netns = None,
        }
    }
    snapshot
}

/// Keeps the set of enrolled pods equal to what the latest snapshot asks for.
struct Reconciler {
    node: String,
    pods: BTreeMap<String, InPod>,
    first: bool,
    mesh: Arc<Mesh>,
}

impl Reconciler {
    /// The identities of the enrolled pods: the certificates the node needs.
    fn identities(&self) -> BTreeSet<weft_hbone::identity::Identity> {
        self.pods.values().map(|p| p.current().identity.clone()).collect()
    }

    fn reconcile(&mut self, snapshot: &WorkloadSnapshot, state: &State, capture: &mut Capture) {
        let desired: BTreeMap<&str, &Pod> = enrollment::enrolled_on(snapshot, &self.node)
            .map(|p| (p.uid.as_str(), p))
            .collect();
        // Gone, no longer enrolled, or changed in a way its listeners cannot follow (another network
        // namespace: the pod's sandbox was replaced).
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, running)| desired.get(uid.as_str()).is_none_or(|p| !running.can_update_to(p)))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in stale {
            if let Some(pod) = self.pods.remove(&uid) {
                pod.unenroll(capture);
            }
        }
        for (uid, pod) in desired {
            let Some(workload) = state.workload(&pod.qualified_name()) else {
                continue;
            };
            if let Some(running) = self.pods.get(uid) {
                // Labels, service account or addresses changed: applied in place, never by
                // unenrolling (a moment uncaptured, and listeners to bind again).
                let current = running.current();
                if (current.pod != *pod || current.identity != workload.identity)
                    && let Err(e) = running.update(pod, &workload.identity, capture)
                {
                    tracing::error!(error = %display_chain(&e), "updating pod; will retry");
                }
                continue;
            }
            match InPod::enroll(pod, &workload.identity, &self.mesh, capture) {
                Ok(p) => {
                    self.pods.insert(uid.to_owned(), p);
                }
                Err(e) => tracing::error!(error = %display_chain(&e), "enrolling pod; will retry"),
            }
        }
        if self.first {
            // A previous agent may have left pods captured that are gone or no longer enrolled.
            self.first = false;
            let live: Vec<u64> = self.pods.values().map(InPod::netns_cookie).collect();
            for cookie in capture.enrolled_netns() {
                if !live.contains(&cookie) {
                    capture.unenroll(cookie);
                }
            }
            for uid in capture.attached_pods() {
                if !self.pods.contains_key(&uid) {
                    capture.detach_pod(&uid);
                }
            }
        }
    }
}

pub fn display_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall; failure only matters on kernels without memcg accounting of BPF memory.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

/// glibc keeps freed memory in its heaps: after a burst (a bulk flow's buffers, 10,000 connections
/// that closed) the agent would hold its peak forever. Every few seconds the free pages go back to
/// the kernel; with little freed this costs microseconds.
async fn return_freed_memory() {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // SAFETY: malloc_trim only releases memory malloc does not hand out; safe at any time.
        unsafe { libc::malloc_trim(0) };
    }
}

/// The agent's own cgroup, checked against the one it captures: the getsockopt program only sees
/// sockets whose cgroup is under the attach point. Capture exempts exactly this cgroup.
fn own_cgroup(config: &Config) -> anyhow::Result<std::path::PathBuf> {
    let own = weft_dataplane::cgroup::own().context("finding the agent's own cgroup v2 directory")?;
    let root = weft_dataplane::cgroup::v2_root().context("finding the cgroup v2 mount")?;
    let target = config.cgroup.strip_prefix(&root).with_context(|| {
        format!(
            "--cgroup {} is not under the cgroup v2 root {}",
            config.cgroup.display(),
            root.display()
        )
    })?;
    let own_rel = own.strip_prefix(&root).unwrap_or(&own);
    anyhow::ensure!(
        own_rel.starts_with(target),
        "weft-node runs in cgroup /{} but captures /{}: it must run inside the cgroup it captures",
        own_rel.display(),
        target.display()
    );
    Ok(own)
}
