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
    cni::{PodEvent, PodNetwork, Reply},
    enrollment,
};

use crate::{
    adopt,
    capture::Capture,
    cni,
    config::{CgroupChoice, Config, ControllerTarget, DEFAULT_TUNNEL_CONGESTION, TunnelCongestion},
    controller::{Controller, Deadlines},
    discovery,
    endpoints::{self, Readiness},
    errors::display_chain,
    identity::Identities,
    inpod::InPod,
    kube,
    mesh::Mesh,
    metrics::Metrics,
    networks::{Loaded, Networks},
    redirection,
    state::State,
    telemetry::LogFilter,
    uninstall::{self, Decision},
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

/// Runs the agent until SIGTERM, SIGINT or `/quitquitquit`.
pub fn run(config: Config, log: LogFilter) -> anyhow::Result<()> {
    raise_memlock();
    if let Err(e) = weft_dataplane::socket::raise_open_file_limit() {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    let tunnel_congestion = tunnel_congestion(&config.tunnel_congestion)?;
    let cgroup = match &config.cgroup {
        CgroupChoice::Dir(dir) => dir.clone(),
        CgroupChoice::Auto => {
            let found = crate::cgroup::find()?;
            tracing::info!(cgroup = %found.display(), "--cgroup auto: the cgroup of the node's pods");
            found
        }
    };
    let own_cgroup = own_cgroup(&cgroup)?;
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
    runtime.block_on(serve(config, log, tunnel_congestion, cgroup, own_cgroup))
}

async fn serve(
    config: Config,
    log: LogFilter,
    tunnel_congestion: Option<CongestionControl>,
    cgroup: std::path::PathBuf,
    own_cgroup: std::path::PathBuf,
) -> anyhow::Result<()> {
    // Bound first: a port in use stops the start before anything is attached.
    let endpoints = endpoints::Bound::bind(&config.endpoints).await?;
    let agent_cgroup = weft_dataplane::cgroup::id(&own_cgroup)
        .with_context(|| format!("reading the id of cgroup {}", own_cgroup.display()))?;
    let capture = Capture::start(&config.bpf_pin_dir, &cgroup, agent_cgroup).context("starting capture")?;
    tracing::info!(node = %config.node, cgroup = %cgroup.display(), pins = %config.bpf_pin_dir.display(), "capture ready");
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state directory {}", config.state_dir.display()))?;
    let state_file = config.state_dir.join("pod-networks.json");
    let networks = load_networks(&state_file, &capture);
    let mut cni_events = cni::spawn(&config.cni_socket).context("starting the CNI endpoint")?;
    let kube = match config.kubernetes {
        true => Some(kube::Client::in_cluster().context("the Kubernetes API")?),
        false => None,
    };
    let controller = match (&config.controller, &kube) {
        (ControllerTarget::Url(url), _) => Controller::new(
            url,
            &config.controller_ca,
            &config.controller_name,
            &config.node_token_file,
        )?,
        (ControllerTarget::Endpoints(service), Some(kube)) => Controller::from_endpoints(
            kube.clone(),
            service.clone(),
            &config.controller_ca,
            &config.controller_name,
            &config.node_token_file,
            Deadlines::default(),
        )?,
        (ControllerTarget::Endpoints(_), None) => anyhow::bail!("--controller-endpoints needs --kubernetes"),
    };
    let daemonset = kube
        .as_ref()
        .map(|kube| uninstall::at_start(kube.clone(), config.daemonset.clone()));
    let (plans, plans_rx) = watch::channel(BTreeMap::new());
    let writer = kube
        .as_ref()
        .map(|kube| tokio::spawn(redirection::run(kube.clone(), plans_rx)));
    let (state_tx, mut states) = watch::channel(Arc::new(State::default()));
    tokio::spawn(discovery::run(controller.clone(), config.node.clone(), state_tx));
    tokio::spawn(return_freed_memory());
    let identities = Identities::new(controller, config.trust_domain.clone());
    let metrics = Arc::new(Metrics::new());
    let mesh = Arc::new(Mesh {
        state: states.clone(),
        identities: identities.clone(),
        pool: Pool::new(PoolConfig::default()),
        next_endpoint: Default::default(),
        tunnel_congestion,
        admission: weft_hbone::server::Admission::new(Default::default()),
        plaintext_admission: weft_hbone::server::Admission::new(crate::proxy::PLAINTEXT_ADMISSION),
        access: crate::access::AccessLog::spawn(metrics.access.clone()).context("starting the access log's writer")?,
        metrics: metrics.clone(),
    });
    let mut node = NodeControl {
        capture,
        networks,
        state_file,
        cni_dirs: config.cni_dirs.clone(),
        kubernetes: config.kubernetes,
        scan_netns: config.kubernetes,
        reconciler: Reconciler {
            node: config.node.clone(),
            pods: BTreeMap::new(),
            failures: BTreeMap::new(),
            unaccounted: 0,
            mesh,
        },
    };

    let (readiness, ready_rx) = watch::channel(Readiness::Starting("waiting for the controller's config"));
    let (view, view_rx) = watch::channel(Arc::new(NodeView::default()));
    let (quit, mut quit_rx) = tokio::sync::mpsc::channel(1);
    endpoints.spawn(Arc::new(endpoints::Shared {
        log,
        metrics,
        ready: ready_rx,
        dump: Box::new(config_dump(&config, states.clone(), view_rx, identities.clone())),
        quit,
    }));
    tracing::info!(
        admin = %config.endpoints.admin,
        metrics = %config.endpoints.metrics,
        readiness = %config.endpoints.readiness,
        "HTTP endpoints"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    let mut ready = false;
    let stop = loop {
        let mut pending = None;
        tokio::select! {
            changed = states.changed() => {
                if changed.is_err() { anyhow::bail!("the discovery client stopped"); }
            }
            Some((event, reply_tx)) = cni_events.recv() => {
                // The pod's metadata may still be on its way from the workload source.
                if let PodEvent::Add(n) = &event {
                    let deadline = tokio::time::Instant::now() + POD_METADATA_WAIT;
                    while !states.borrow().has_pod(&n.uid)
                        && tokio::time::timeout_at(deadline, states.changed()).await.is_ok_and(|r| r.is_ok())
                    {}
                }
                pending = Some((event, reply_tx));
            }
            _ = retry.tick() => {}
            _ = term.recv() => break Stop::Term,
            _ = tokio::signal::ctrl_c() => break Stop::Interrupt,
            Some(()) = quit_rx.recv() => break Stop::Quit,
        }
        let state = states.borrow_and_update().clone();
        // Entering pods' namespaces, binding, netlink, eBPF maps, fsync: off the proxies' threads.
        let event = pending.as_ref().map(|(e, _)| e.clone());
        let step_state = state.clone();
        let (back, (reply, plan)) = tokio::task::spawn_blocking(move || {
            let out = node.step(&step_state, event.as_ref());
            (node, out)
        })
        .await
        .context("the enrollment step stopped")?;
        node = back;
        if let Some(plan) = plan {
            plans.send_if_modified(|p| {
                let changed = *p != plan;
                *p = plan;
                changed
            });
        }
        if let (Some((_, reply_tx)), Some(reply)) = (pending, reply) {
            // Answered only now: a pod that must be captured is, before its containers start.
            let _ = reply_tx.send(reply);
        }
        view.send_if_modified(|v| {
            let now = NodeView::of(&node.reconciler);
            let changed = **v != now;
            if changed {
                *v = Arc::new(now);
            }
            changed
        });
        if state.synced {
            identities.want(&node.reconciler.identities());
            if !ready {
                // Serving: the controller's config is in and every enrolled pod has its listeners.
                ready = true;
                readiness.send_replace(Readiness::Ready);
                tracing::info!(revision = state.revision, pods = node.reconciler.pods.len(), "ready");
            }
        }
    };
    readiness.send_replace(Readiness::Stopping);
    let decision = match (stop, &kube, daemonset) {
        (Stop::Term, Some(kube), Some(at_start)) => {
            let at_start = at_start.borrow().clone();
            uninstall::check(kube, &config.daemonset, &at_start).await
        }
        (Stop::Term, ..) => Decision::Restart("SIGTERM, outside Kubernetes".into()),
        (Stop::Interrupt, ..) => Decision::Restart("SIGINT: an operator's stop is always a restart".into()),
        (Stop::Quit, ..) => Decision::Restart("/quitquitquit: an operator's stop is always a restart".into()),
    };
    match decision {
        Decision::Restart(why) => tracing::info!(
            reason = %why,
            "shutting down for a restart; capture stays attached and refuses connections until an agent returns"
        ),
        Decision::Uninstall(why) => {
            tracing::info!(reason = %why, "uninstalling: releasing every pod and removing capture from this node");
            tokio::task::spawn_blocking(move || node.uninstall())
                .await
                .context("the uninstall stopped")??;
            // No pod of this node is captured any more: none may say it is.
            if let (Some(kube), Some(writer)) = (&kube, writer) {
                writer.abort();
                // Stopped, not only told to stop: a write of its own must not follow the clearing.
                let _ = writer.await;
                let plan = plans.borrow().clone();
                let failed = redirection::clear(kube, &plan, Duration::from_secs(5)).await;
                tracing::info!(
                    pods = plan.len(),
                    failed,
                    "{} removed from this node's pods",
                    redirection::ANNOTATION
                );
            }
        }
    }
    Ok(())
}

/// What ended the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// `POST /quitquitquit` on the admin API.
    Quit,
    /// SIGTERM: from kubelet, an uninstall or a restart ([`uninstall`]).
    Term,
    /// SIGINT: an operator's; always a restart.
    Interrupt,
}

/// What enrollment owns on this node: capture, the known pod networks, the enrolled pods. Every step
/// runs on a blocking thread, never on the proxies' runtime threads.
struct NodeControl {
    capture: Capture,
    networks: Networks,
    state_file: std::path::PathBuf,
    /// The node's CNI directories: the uninstall takes `weft-cni` out of them.
    cni_dirs: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// In Kubernetes: pods' redirection annotations are planned ([`redirection`]).
    kubernetes: bool,
    /// In Kubernetes, until the first synced state: find running pods' namespaces ([`adopt`]).
    scan_netns: bool,
    reconciler: Reconciler,
}

/// Each pod's wanted `weft.dev/redirection`, by uid.
type Plan = BTreeMap<String, redirection::Wanted>;

impl NodeControl {
    /// Takes a CNI event if there is one, brings enrollment in line with `state`, and returns the
    /// answer to the event, and in Kubernetes what each pod's annotation should say.
    fn step(&mut self, state: &State, event: Option<&PodEvent>) -> (Option<Reply>, Option<Plan>) {
        if state.synced && self.scan_netns {
            self.scan_netns = false;
            self.adopt(state);
        }
        let mut saved = Ok(());
        if let Some(event) = event {
            if let PodEvent::Delete { uid } = event
                && !self.reconciler.pods.contains_key(uid)
                && let Some(cookie) = self.networks.get(uid).and_then(|k| k.netns_cookie)
            {
                // Captured by an earlier agent and never served by this one: released with its pod.
                self.capture.unenroll(cookie);
            }
            self.networks.apply(event);
            saved = self.networks.save(&self.state_file).map_err(|e| display_chain(&e));
        }
        // This node's pods, and the one a CNI event asks about.
        let asked = event.map(|e| match e {
            PodEvent::Add(n) => n.uid.as_str(),
            PodEvent::Delete { uid } => uid.as_str(),
        });
        let snapshot = with_networks(state.snapshot_on(&self.reconciler.node, asked), &self.networks);
        if state.synced {
            // Before the first push the agent knows nothing; reconciling then would unenroll everything.
            self.reconciler.reconcile(&snapshot, state, &mut self.capture);
            self.reconciler
                .release_unwanted(&snapshot, &mut self.networks, &mut self.capture);
            // Each captured pod's cookie is on disk before its CNI ADD is answered.
            let mut changed = false;
            for (uid, pod) in &self.reconciler.pods {
                changed |= self.networks.set_cookie(uid, pod.netns_cookie());
            }
            if changed && let Err(e) = self.networks.save(&self.state_file) {
                let e = display_chain(&e);
                tracing::error!(error = %e, "persisting pod networks");
                saved = saved.and(Err(e));
            }
        }
        let served = |uid: &str| self.reconciler.pods.contains_key(uid);
        let plan = (self.kubernetes && state.synced)
            .then(|| redirection::plan(&snapshot, &self.reconciler.node, served, &self.reconciler.failures));
        let reply = event.map(|event| cni_reply(event, &snapshot, &self.reconciler.node, served, saved));
        (reply, plan)
    }

    /// Gives each pod of this node that the agent has no network for the namespace, among the
    /// node's pinned ones, that holds its address ([`adopt`]), as if the CNI plugin had reported it.
    fn adopt(&mut self, state: &State) {
        let snapshot = state.snapshot_on(&self.reconciler.node, None);
        let unplaced: Vec<&Pod> = snapshot
            .pods_on(&self.reconciler.node)
            .filter(|p| self.networks.get(&p.uid).is_none())
            .collect();
        if unplaced.is_empty() {
            return;
        }
        let known: BTreeSet<adopt::NsId> = self
            .networks
            .iter()
            .filter_map(|(_, k)| adopt::ns_id(&k.network.netns).ok())
            .collect();
        let scanned = adopt::scan(std::path::Path::new(adopt::NETNS_DIR));
        let pods: Vec<(&str, &[std::net::IpAddr])> =
            unplaced.iter().map(|p| (p.uid.as_str(), p.ips.as_slice())).collect();
        let (adopted, ambiguous) = adopt::matches(&pods, &scanned, &known);
        for why in ambiguous {
            tracing::warn!(reason = %why, "a running pod's network namespace is ambiguous: left to the CNI plugin");
        }
        if adopted.is_empty() {
            return;
        }
        for a in adopted {
            let Some(pod) = unplaced.iter().find(|p| p.uid == a.uid) else {
                continue;
            };
            tracing::info!(pod = %pod.qualified_name(), netns = %a.netns.display(), "adopted a running pod's network namespace, found by its address");
            self.networks.apply(&PodEvent::Add(PodNetwork {
                uid: a.uid,
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                netns: a.netns,
                ips: a.ips,
            }));
        }
        if let Err(e) = self.networks.save(&self.state_file) {
            tracing::error!(error = %display_chain(&e), "persisting pod networks");
        }
    }

    /// Takes the mesh off this node for good: releases every captured pod, removes every eBPF pin
    /// (so the kernel detaches the programs once the agent exits) and the state file.
    fn uninstall(mut self) -> anyhow::Result<()> {
        // First out of the node's CNI chain: a pod created from now on starts without the mesh
        // instead of waiting for an agent that will not come back.
        if let Some((conf, bin)) = &self.cni_dirs {
            let plugin = std::env::current_exe()
                .context("finding weft-node's own path")?
                .with_file_name("weft-cni");
            let out = std::process::Command::new(&plugin)
                .arg("uninstall")
                .arg("--conf-dir")
                .arg(conf)
                .arg("--bin-dir")
                .arg(bin)
                .output()
                .with_context(|| format!("running {} uninstall", plugin.display()))?;
            anyhow::ensure!(
                out.status.success(),
                "{} uninstall: {}",
                plugin.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            tracing::info!(output = %String::from_utf8_lossy(&out.stdout).trim(), "weft-cni removed from the node's CNI configuration");
        }
        let served = std::mem::take(&mut self.reconciler.pods);
        let pods = served.len();
        for pod in served.into_values() {
            pod.unenroll(&mut self.capture);
        }
        let others = self.capture.enrolled_netns();
        for cookie in &others {
            self.capture.unenroll(*cookie);
        }
        self.capture.remove().context("removing capture")?;
        match std::fs::remove_file(&self.state_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", self.state_file.display()));
            }
            _ => {}
        }
        tracing::info!(
            pods,
            other_namespaces = others.len(),
            "uninstalled: no pod is captured, every pin and the state file are gone"
        );
        Ok(())
    }
}

/// The pod networks the previous agent persisted. Lost or unreadable state is said loudly and never
/// read as "no pods": what it would have accounted for stays captured (see
/// [`Reconciler::release_unwanted`]).
fn load_networks(path: &std::path::Path, capture: &Capture) -> Networks {
    match Networks::load(path) {
        Ok(Loaded::Read(networks)) => networks,
        Ok(Loaded::Missing) => {
            let captured = capture.enrolled_netns().len();
            if captured > 0 {
                tracing::error!(
                    path = %path.display(),
                    captured,
                    "pod-network state is missing although pods are captured: they stay captured, and refused, until the agent can account for them"
                );
            }
            Networks::default()
        }
        Err(e) => {
            tracing::error!(
                error = %display_chain(&e),
                "pod-network state lost: pods captured before stay captured, and refused, until the agent can account for them"
            );
            Networks::default()
        }
    }
}

/// How long a CNI ADD waits for the pod's metadata (namespace, annotations) to arrive.
const POD_METADATA_WAIT: Duration = Duration::from_secs(5);

/// The answer to the CNI plugin: failure if the pod should be captured and is not, so the runtime
/// retries instead of starting the pod outside the mesh. OK only for a pod the agent serves, or one
/// the workload source says is not enrolled; never for a pod it does not know (yet), one it could not
/// enroll, one whose network it could not persist, or an enrolled pod the source places on another
/// node (its sandbox would start here uncaptured).
fn cni_reply(
    event: &PodEvent,
    snapshot: &WorkloadSnapshot,
    node: &str,
    served: impl Fn(&str) -> bool,
    saved: Result<(), String>,
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
    if !enrollment::is_enrolled(pod, snapshot.namespace(&pod.namespace)) {
        return Reply { ok: true, error: None };
    }
    if pod.node != node {
        return fail(format!(
            "pod {} is enrolled and placed on node {:?}, not on this node ({node:?}): it would run uncaptured",
            pod.qualified_name(),
            pod.node
        ));
    }
    if !served(&n.uid) {
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
fn with_networks(mut snapshot: WorkloadSnapshot, networks: &Networks) -> WorkloadSnapshot {
    for pod in &mut snapshot.pods {
        match networks.get(&pod.uid).map(|k| &k.network) {
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
    /// The last enrollment error of each wanted pod the agent does not serve.
    failures: BTreeMap<String, String>,
    /// Captured namespaces of no known pod, as last reported.
    unaccounted: usize,
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
        self.failures.retain(|uid, _| desired.contains_key(uid.as_str()));
        for (uid, pod) in desired {
            let Some(workload) = state.workload(&pod.qualified_name()) else {
                continue;
            };
            if let Some(running) = self.pods.get(uid) {
                // Labels, service account or addresses changed: applied in place, never by
                // unenrolling (a moment uncaptured, and listeners to bind again).
                let current = running.current();
                if (current.pod != *pod || current.identity != **workload.identity())
                    && let Err(e) = running.update(pod, workload.identity(), capture)
                {
                    tracing::error!(error = %display_chain(&e), "updating pod; will retry");
                }
                continue;
            }
            match InPod::enroll(pod, workload.identity(), &self.mesh, capture) {
                Ok(p) => {
                    self.pods.insert(uid.to_owned(), p);
                    self.failures.remove(uid);
                }
                Err(e) => {
                    let e = display_chain(&e);
                    tracing::error!(error = %e, "enrolling pod; will retry");
                    self.failures.insert(uid.to_owned(), e);
                }
            }
        }
    }

    /// Releases capture that nothing wants any more, and only that: the namespace of a pod the
    /// workload source deleted or opted out, or one whose namespace vanished. A pod that is wanted
    /// but not served (its enrollment failing, or its network unknown because the saved state was
    /// lost) stays captured: its connections are refused until the agent can serve it, never sent
    /// around the agent. Runs after every reconcile, so it also finishes what an earlier agent left.
    fn release_unwanted(&mut self, snapshot: &WorkloadSnapshot, networks: &mut Networks, capture: &mut Capture) {
        for cookie in networks.drop_vanished() {
            capture.unenroll(cookie);
        }
        let wanted = wanted_on(snapshot, &self.node);
        let live: BTreeSet<u64> = self.pods.values().map(InPod::netns_cookie).collect();
        let (release, unaccounted) = to_release(
            capture.enrolled_netns(),
            &live,
            |cookie| networks.uid_of_cookie(cookie),
            &wanted,
        );
        for cookie in release {
            capture.unenroll(cookie);
        }
        if unaccounted != self.unaccounted {
            self.unaccounted = unaccounted;
            if unaccounted > 0 {
                tracing::error!(
                    namespaces = unaccounted,
                    "captured network namespaces the agent cannot account for (pod-network state lost?): they stay captured and their connections are refused until their pods are re-created"
                );
            }
        }
        for uid in capture.attached_pods() {
            if !self.pods.contains_key(&uid) && !wanted.contains(uid.as_str()) {
                capture.detach_pod(&uid);
            }
        }
    }
}

/// The uids of the pods the workload source wants enrolled on `node`.
fn wanted_on<'a>(snapshot: &'a WorkloadSnapshot, node: &'a str) -> BTreeSet<&'a str> {
    snapshot
        .pods_on(node)
        .filter(|p| enrollment::is_enrolled(p, snapshot.namespace(&p.namespace)))
        .map(|p| p.uid.as_str())
        .collect()
}

/// Of the `captured` network namespaces that no served pod holds (`served`), the ones to release:
/// those whose pod (`uid_of`) is known and not `wanted`. A wanted pod's namespace stays captured
/// even when the agent cannot serve it, and so does one the agent cannot name (its pod-network
/// state lost): their connections are refused, never sent around the agent. Also returns how many
/// could not be named.
fn to_release<'a>(
    captured: impl IntoIterator<Item = u64>,
    served: &BTreeSet<u64>,
    uid_of: impl Fn(u64) -> Option<&'a str>,
    wanted: &BTreeSet<&str>,
) -> (Vec<u64>, usize) {
    let mut release = Vec::new();
    let mut unaccounted = 0;
    for cookie in captured.into_iter().filter(|c| !served.contains(c)) {
        match uid_of(cookie) {
            Some(uid) if !wanted.contains(uid) => release.push(cookie),
            Some(_) => {}
            None => unaccounted += 1,
        }
    }
    (release, unaccounted)
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
fn own_cgroup(cgroup: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let own = weft_dataplane::cgroup::own().context("finding the agent's own cgroup v2 directory")?;
    let root = weft_dataplane::cgroup::v2_root().context("finding the cgroup v2 mount")?;
    let target = cgroup.strip_prefix(&root).with_context(|| {
        format!(
            "--cgroup {} is not under the cgroup v2 root {}",
            cgroup.display(),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_model::{Namespace, annotations, cni::PodNetwork};

    use super::*;

    fn snapshot() -> WorkloadSnapshot {
        let ambient = BTreeMap::from([(annotations::DATAPLANE_MODE.to_owned(), "ambient".to_owned())]);
        let pod = |name: &str, ns: &str, node: &str| Pod {
            uid: format!("uid-{name}"),
            namespace: ns.into(),
            name: name.into(),
            node: node.into(),
            service_account: "default".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            ips: vec!["10.244.1.5".parse().unwrap()],
            netns: None,
        };
        WorkloadSnapshot {
            namespaces: vec![
                Namespace {
                    name: "mesh".into(),
                    annotations: ambient,
                },
                Namespace {
                    name: "plain".into(),
                    annotations: BTreeMap::new(),
                },
            ],
            pods: vec![
                pod("web", "mesh", "node1"),
                pod("legacy", "plain", "node1"),
                pod("elsewhere", "mesh", "node2"),
            ],
        }
    }

    fn add(name: &str) -> PodEvent {
        PodEvent::Add(PodNetwork {
            uid: format!("uid-{name}"),
            namespace: "mesh".into(),
            name: name.into(),
            netns: "/run/netns/x".into(),
            ips: vec![],
        })
    }

    /// One row: the event, which pods the agent serves, whether persisting worked, then the expected
    /// answer and what its error says.
    struct Case {
        event: PodEvent,
        served: &'static [&'static str],
        saved: Result<(), &'static str>,
        ok: bool,
        says: &'static str,
    }

    #[test]
    fn cni_add_is_ok_only_for_a_served_pod_or_one_outside_the_mesh() {
        let s = snapshot();
        let case = |event, served, saved, ok, says| Case {
            event,
            served,
            saved,
            ok,
            says,
        };
        let cases = [
            case(add("web"), &["uid-web"], Ok(()), true, ""),
            case(add("web"), &[], Ok(()), false, "could not be enrolled"),
            case(
                add("web"),
                &["uid-web"],
                Err("disk full"),
                false,
                "persisting pod networks: disk full",
            ),
            case(add("legacy"), &[], Ok(()), true, ""),
            case(add("unknown"), &[], Ok(()), false, "not known to the node agent yet"),
            case(add("elsewhere"), &[], Ok(()), false, "placed on node \"node2\""),
            case(PodEvent::Delete { uid: "uid-web".into() }, &[], Ok(()), true, ""),
        ];
        for (i, c) in cases.into_iter().enumerate() {
            let served = |uid: &str| c.served.contains(&uid);
            let r = cni_reply(&c.event, &s, "node1", served, c.saved.map_err(str::to_owned));
            assert_eq!(r.ok, c.ok, "case {i}: {:?} -> {r:?}", c.event);
            assert!(
                r.error.unwrap_or_default().contains(c.says),
                "case {i}: must say {:?}",
                c.says
            );
        }
    }

    #[test]
    fn only_a_known_unwanted_pods_namespace_is_released() {
        let s = snapshot();
        let wanted = wanted_on(&s, "node1");
        assert_eq!(wanted, BTreeSet::from(["uid-web"]), "enrolled pods of this node only");
        // Captured namespaces by cookie: 1 served; 2 wanted but not served (its enrollment failing);
        // 3 a pod outside the mesh now; 4 a pod of another node; 5 a pod the source deleted; 6 one
        // the agent cannot name (its pod-network state lost).
        let uids = BTreeMap::from([
            (1, "uid-web"),
            (2, "uid-web"),
            (3, "uid-legacy"),
            (4, "uid-elsewhere"),
            (5, "uid-gone"),
        ]);
        let served = BTreeSet::from([1]);
        let (release, unaccounted) = to_release(1..=6, &served, |c| uids.get(&c).copied(), &wanted);
        assert_eq!(release, [3, 4, 5]);
        assert_eq!(unaccounted, 1);
    }
}

/// The node's enrolled pods as `/config_dump` shows them, republished when they change.
#[derive(Debug, Default, PartialEq)]
struct NodeView {
    /// `(uid, namespace/name, identity, addresses)`, by uid.
    pods: Vec<(String, String, String, Vec<std::net::IpAddr>)>,
    /// Wanted pods the agent does not serve, by uid: the last enrollment error.
    failures: BTreeMap<String, String>,
    /// Captured network namespaces of no known pod.
    unaccounted: usize,
}

impl NodeView {
    fn of(reconciler: &Reconciler) -> Self {
        let pods = reconciler
            .pods
            .iter()
            .map(|(uid, pod)| {
                let current = pod.current();
                (
                    uid.clone(),
                    pod.ctx.name.to_string(),
                    current.identity.to_string(),
                    current.pod.ips.clone(),
                )
            })
            .collect();
        Self {
            pods,
            failures: reconciler.failures.clone(),
            unaccounted: reconciler.unaccounted,
        }
    }
}

/// `/config_dump`: the agent's own config, what the controller sent (sizes and revision) and the
/// pods it serves.
fn config_dump(
    config: &Config,
    states: watch::Receiver<Arc<State>>,
    view: watch::Receiver<Arc<NodeView>>,
    identities: Identities,
) -> impl Fn() -> serde_json::Value + Send + Sync + 'static {
    let own = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node": config.node,
        "kubernetes": config.kubernetes,
        "controller": match &config.controller {
            ControllerTarget::Url(url) => url.clone(),
            ControllerTarget::Endpoints(o) => format!("endpoints of {}/{}", o.namespace, o.name),
        },
        "trust_domain": config.trust_domain,
        "cni_socket": config.cni_socket,
        "state_dir": config.state_dir,
        "bpf_pin_dir": config.bpf_pin_dir,
        "worker_threads": config.worker_threads,
        "admin_address": config.endpoints.admin.to_string(),
        "metrics_address": config.endpoints.metrics.to_string(),
        "readiness_address": config.endpoints.readiness.to_string(),
    });
    move || {
        let state = states.borrow().clone();
        let view = view.borrow().clone();
        let (workloads, services) = state.sizes();
        let mut held = state.dump();
        let mut take = |k: &str| held.get_mut(k).map(serde_json::Value::take).unwrap_or_default();
        serde_json::json!({
            "config": own,
            "state": {
                "revision": state.revision,
                "synced": state.synced,
                "workloads": workloads,
                "services": services,
            },
            "workloads": take("workloads"),
            "services": take("services"),
            "authorization_policies": take("authorization_policies"),
            "peer_authentications": take("peer_authentications"),
            "certificates": identities.dump(),
            "pods": view.pods.iter().map(|(uid, name, identity, ips)| serde_json::json!({
                "uid": uid,
                "name": name,
                "identity": identity,
                "ips": ips,
            })).collect::<Vec<_>>(),
            "failures": view.failures,
            "unaccounted_netns": view.unaccounted,
        })
    }
}
