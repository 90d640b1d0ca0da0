//! `cargo xtask kube up|down|status`: a real local Kubernetes cluster on this machine.
//!
//! etcd, kube-apiserver, kube-controller-manager and kube-scheduler (Kubernetes 1.20, built once from
//! Debian's source package into the cache, see `scripts/kubernetes-build.sh`) run in the host's network
//! namespace. Each of the two nodes is what a real node is to the processes on it:
//!
//! - its own network namespace `weft-kube-nodeI`, joined to the host's bridge `weftk0` by a veth (`eth0`,
//!   10.99.0.1I/24), with its pods on its own bridge `cni0` (10.244.I.0/24, the bridge and host-local CNI
//!   plugins); routes send the other node's pod range to that node, so pod-to-pod crosses `weftk0`;
//! - its own mount namespace (a holder process keeps it), where the paths a node's software expects
//!   are the node's own: `/etc/cni/net.d`, `/opt/cni/bin`, `/var/lib/kubelet`, `/run/containerd`,
//!   `/var/lib/containerd`, `/var/lib/cni`, `/run/netns`, `/run/weft`, `/var/lib/weft`, `/var/log/pods`,
//!   and a bpffs of its own at `/sys/fs/bpf`. So the manifests in deploy/ are a real cluster's (hostPath
//!   `/etc/cni/net.d` and so on), and the two nodes' agents share no file, socket, pin or port;
//! - its own cgroup subtree `weft-kube/nodeI` in every hierarchy (kubelet's `cgroupRoot`), holding its
//!   kubelet, containerd, the shims and every pod: its agent sees only its node's pods, and `down` finds
//!   every process of the node there.
//!
//! The API server serves on 10.96.0.1:443, the `kubernetes` Service's cluster IP, held by the host on
//! `weftk0`: pods reach it by their in-cluster configuration without kube-proxy (the nodes route the
//! service range to the host). Nothing routes off the machine: the nodes have no default route, pods'
//! default route ends in their node, no cluster DNS is configured and pods get an empty resolv.conf,
//! kubelet's cloud credential probe is off (`AWS_EC2_METADATA_DISABLED`), and the API server reaches
//! kubelets by InternalIP, never by resolving a node name.
//!
//! `down` restores the host: processes (by cgroup and PID file), namespaces, links, cgroups, the mount
//! points it created, and the sysctls kubelet changes (recorded at `up`).

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{cache_dir, output, root, run, step};

/// The Kubernetes release Debian's source package builds (`scripts/kubernetes-build.sh`).
pub const KUBERNETES_VERSION: &str = "1.20.2";
/// Debian packages a node needs.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "etcd-server",
    "openssl",
];

const NODES: usize = 2;
const BRIDGE: &str = "weftk0";
const HOST_IP: &str = "10.99.0.1";
/// The API server's address: the first address of the service range, the `kubernetes` Service's.
pub const API_IP: &str = "10.96.0.1";
const SERVICE_RANGE: &str = "10.96.0.0/24";
const ETCD_CLIENT: &str = "127.0.0.1:23790";
const ETCD_PEER: &str = "127.0.0.1:23800";
/// The cgroup subtree (in every hierarchy) that holds the whole cluster.
const CGROUP: &str = "weft-kube";
/// Host sysctls kubelet sets at start (its "kernel tunables"); recorded at `up`, restored at `down`.
const SYSCTLS: &[&str] = &[
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
];
/// Paths that are each node's own (bind-mounted from the node's directory inside its mount namespace).
const NODE_PATHS: &[(&str, &str)] = &[
    ("/etc/cni/net.d", "cni-conf"),
    ("/opt/cni/bin", "cni-bin"),
    ("/var/lib/kubelet", "kubelet"),
    ("/run/containerd", "run-containerd"),
    ("/var/lib/containerd", "containerd"),
    ("/var/lib/cni", "var-lib-cni"),
    ("/run/netns", "netns"),
    ("/run/weft", "run-weft"),
    ("/var/lib/weft", "var-lib-weft"),
    ("/var/log/pods", "log-pods"),
    ("/var/log/containers", "log-containers"),
];

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Build Kubernetes (once, cached), then bring up etcd, the control plane and two nodes, and
    /// import Weft's images (`cargo xtask images`) into both nodes.
    Up {
        /// Do not build or import Weft's images (a bare cluster).
        #[arg(long)]
        no_images: bool,
    },
    /// Tear everything down, restoring the host.
    Down,
    /// What runs, and how to reach it.
    Status,
}

pub fn main(cmd: Cmd) -> anyhow::Result<()> {
    let cluster = Cluster::new();
    match cmd {
        Cmd::Up { no_images } => {
            let images = if no_images {
                Vec::new()
            } else {
                crate::build_release()?;
                crate::images::build(&root())?
            };
            cluster.up(&images)
        }
        Cmd::Down => cluster.down(),
        Cmd::Status => cluster.status(),
    }
}

/// Where the cluster keeps its files, and its fixed names.
pub struct Cluster {
    /// State, configuration, logs: `/var/lib/weft-kube` (`WEFT_KUBE_DIR`).
    dir: PathBuf,
    bin: PathBuf,
}

impl Cluster {
    pub fn new() -> Cluster {
        let dir = std::env::var_os("WEFT_KUBE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/weft-kube"));
        Cluster {
            dir,
            bin: kubernetes_dir().join("bin"),
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{i}"))
    }

    fn pid_file(&self, name: &str) -> PathBuf {
        self.dir.join("run").join(format!("{name}.pid"))
    }

    fn running(&self, name: &str) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.pid_file(name)).ok()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    pub fn is_up(&self) -> bool {
        self.running("kube-apiserver").is_some()
    }

    // === up ===

    pub fn up(&self, images: &[PathBuf]) -> anyhow::Result<()> {
        ensure!(crate::is_root(), "the local Kubernetes cluster needs root");
        ensure!(
            !self.is_up(),
            "a local cluster is already up (cargo xtask kube status; cargo xtask kube down)"
        );
        install()?;
        let started = Instant::now();
        // Whatever a crashed run left behind goes first.
        self.down_quietly();
        for d in ["run", "logs", "pki"] {
            fs::create_dir_all(self.dir.join(d))?;
        }
        self.record_host()?;
        step("network: host bridge weftk0, one network namespace per node");
        self.network()?;
        self.pki()?;
        step("control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler");
        self.control_plane()?;
        for i in 1..=NODES {
            step(&format!("node{i}: mount namespace, containerd, images, kubelet"));
            self.node(i, images)?;
        }
        self.wait_nodes_ready()?;
        step(&format!(
            "cluster up in {:.1} s; export KUBECONFIG={}",
            started.elapsed().as_secs_f64(),
            self.kubeconfig().display()
        ));
        Ok(())
    }

    /// What `down` restores: the sysctls kubelet changes and the mount points created on the host.
    fn record_host(&self) -> anyhow::Result<()> {
        let mut sysctls = BTreeMap::new();
        for s in SYSCTLS {
            let v = output(Command::new("sysctl").args(["-n", s]))?;
            sysctls.insert(s.to_string(), v.trim().to_owned());
        }
        let mut created = Vec::new();
        for (path, _) in NODE_PATHS {
            // Record the highest missing ancestor: down removes what it created, and nothing else.
            let mut missing = None;
            let mut p = Path::new(path);
            while !p.exists() {
                missing = Some(p.to_path_buf());
                match p.parent() {
                    Some(parent) => p = parent,
                    None => break,
                }
            }
            if let Some(m) = missing {
                created.push(m.display().to_string());
            }
            fs::create_dir_all(path).with_context(|| format!("creating mount point {path}"))?;
        }
        created.sort();
        created.dedup();
        let host = serde_json::json!({ "sysctls": sysctls, "created": created });
        fs::write(self.dir.join("host.json"), serde_json::to_vec_pretty(&host)?)?;
        Ok(())
    }

    fn network(&self) -> anyhow::Result<()> {
        run(Command::new("ip").args(["link", "add", BRIDGE, "type", "bridge"]))?;
        run(Command::new("ip").args(["addr", "add", &format!("{HOST_IP}/24"), "dev", BRIDGE]))?;
        run(Command::new("ip").args(["addr", "add", &format!("{API_IP}/32"), "dev", BRIDGE]))?;
        run(Command::new("ip").args(["link", "set", BRIDGE, "up"]))?;
        for i in 1..=NODES {
            let ns = netns(i);
            let host_end = format!("weftk-n{i}");
            run(Command::new("ip").args(["netns", "add", &ns]))?;
            run(Command::new("ip").args([
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]))?;
            run(Command::new("ip").args(["link", "set", &host_end, "master", BRIDGE, "up"]))?;
            let inns = |args: &[&str]| run(Command::new("ip").args(["netns", "exec", &ns]).args(args));
            inns(&["ip", "link", "set", "lo", "up"])?;
            inns(&["ip", "addr", "add", &format!("{}/24", node_ip(i)), "dev", "eth0"])?;
            inns(&["ip", "link", "set", "eth0", "up"])?;
            inns(&["ip", "route", "add", SERVICE_RANGE, "via", HOST_IP])?;
            inns(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            for j in (1..=NODES).filter(|&j| j != i) {
                inns(&["ip", "route", "add", &pod_range(j), "via", &node_ip(j)])?;
            }
            // The host answers pods (the API server) through their node; these routes go with the bridge.
            run(Command::new("ip").args(["route", "add", &pod_range(i), "via", &node_ip(i), "dev", BRIDGE]))?;
        }
        Ok(())
    }

    fn pki(&self) -> anyhow::Result<()> {
        let p = self.dir.join("pki");
        let o = |args: &[&str]| run(Command::new("openssl").current_dir(&p).args(args).stderr(Stdio::null()));
        o(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=weft-kube-ca",
        ])?;
        fs::write(
            p.join("apiserver.ext"),
            format!(
                "subjectAltName=IP:{API_IP},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n"
            ),
        )?;
        // A key and a certificate signed by the CA: `NAME.key`, `NAME.crt`, with `ext` (an openssl
        // extension file) if given.
        let issue = |name: &str, subject: &str, ext: Option<&str>| -> anyhow::Result<()> {
            let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
            o(&[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
            ])?;
            let mut sign = vec![
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "30",
            ];
            sign.extend(ext.iter().flat_map(|e| ["-extfile", *e]));
            o(&sign)
        };
        issue("apiserver", "/CN=kube-apiserver", Some("apiserver.ext"))?;
        // The API server's client certificate towards kubelets (logs, exec), in system:masters.
        issue(
            "kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            None,
        )?;
        o(&["genrsa", "-out", "sa.key", "2048"])?;
        o(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        let mut tokens = String::new();
        let mut users: Vec<(String, String, &str)> = vec![
            ("admin".into(), "admin".into(), "\"system:masters\""),
            ("kcm".into(), "system:kube-controller-manager".into(), ""),
            ("scheduler".into(), "system:kube-scheduler".into(), ""),
        ];
        for i in 1..=NODES {
            users.push((
                format!("node{i}"),
                format!("system:node:{}", node_name(i)),
                "\"system:nodes\"",
            ));
        }
        for (file, user, groups) in users {
            let token = random_hex()?;
            tokens.push_str(&format!("{token},{user},uid-{file},{groups}\n"));
            let kubeconfig = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: weft-kube\n  cluster: {{server: \"https://{API_IP}:443\", certificate-authority: {ca}}}\nusers:\n- name: {file}\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: weft-kube\n  context: {{cluster: weft-kube, user: {file}}}\ncurrent-context: weft-kube\n",
                ca = p.join("ca.crt").display()
            );
            write_private(&self.dir.join(format!("{file}.kubeconfig")), kubeconfig.as_bytes())?;
        }
        write_private(&p.join("tokens.csv"), tokens.as_bytes())?;
        Ok(())
    }

    fn control_plane(&self) -> anyhow::Result<()> {
        let p = self.dir.join("pki");
        let cg = format!("{CGROUP}/control-plane");
        make_cgroup(&cg)?;
        let mut etcd = Command::new("etcd");
        etcd.args(["--name", "weft-kube", "--data-dir"])
            .arg(self.dir.join("etcd"))
            .arg(format!("--listen-client-urls=http://{ETCD_CLIENT}"))
            .arg(format!("--advertise-client-urls=http://{ETCD_CLIENT}"))
            .arg(format!("--listen-peer-urls=http://{ETCD_PEER}"))
            .arg(format!("--initial-advertise-peer-urls=http://{ETCD_PEER}"))
            .arg(format!("--initial-cluster=weft-kube=http://{ETCD_PEER}"));
        self.launch("etcd", etcd, &cg)?;
        wait("etcd to be healthy", Duration::from_secs(30), || {
            output(Command::new("curl").args(["-sf", "--max-time", "1", &format!("http://{ETCD_CLIENT}/health")]))
                .is_ok_and(|s| s.contains("true"))
        })?;
        let pa = |f: &str| p.join(f).display().to_string();
        let mut apiserver = Command::new(self.bin.join("kube-apiserver"));
        apiserver.args([
            &format!("--etcd-servers=http://{ETCD_CLIENT}"),
            &format!("--bind-address={API_IP}"),
            &format!("--advertise-address={API_IP}"),
            "--secure-port=443",
            "--insecure-port=0",
            &format!("--tls-cert-file={}", pa("apiserver.crt")),
            &format!("--tls-private-key-file={}", pa("apiserver.key")),
            &format!("--client-ca-file={}", pa("ca.crt")),
            &format!("--kubelet-client-certificate={}", pa("kubelet-client.crt")),
            &format!("--kubelet-client-key={}", pa("kubelet-client.key")),
            &format!("--token-auth-file={}", pa("tokens.csv")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            &format!("--service-account-key-file={}", pa("sa.pub")),
            &format!("--service-account-signing-key-file={}", pa("sa.key")),
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            &format!("--service-cluster-ip-range={SERVICE_RANGE}"),
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            // Never resolve a node's name through the host's resolver (that would leave the machine).
            "--kubelet-preferred-address-types=InternalIP",
        ]);
        self.launch("kube-apiserver", apiserver, &cg)?;
        let kubeconfig = self.kubeconfig();
        wait("kube-apiserver to be ready", Duration::from_secs(60), || {
            kubectl(&kubeconfig, &["get", "--raw", "/readyz"]).is_ok_and(|s| s.trim() == "ok")
        })?;
        let kcm_config = self.dir.join("kcm.kubeconfig").display().to_string();
        let mut kcm = Command::new(self.bin.join("kube-controller-manager"));
        kcm.args([
            &format!("--kubeconfig={kcm_config}"),
            &format!("--authentication-kubeconfig={kcm_config}"),
            &format!("--authorization-kubeconfig={kcm_config}"),
            "--bind-address=127.0.0.1",
            "--port=0",
            "--secure-port=10257",
            &format!("--service-account-private-key-file={}", pa("sa.key")),
            &format!("--root-ca-file={}", pa("ca.crt")),
            "--use-service-account-credentials=true",
            "--allocate-node-cidrs=false",
            "--leader-elect=false",
            "--controllers=*,-nodeipam",
        ]);
        self.launch("kube-controller-manager", kcm, &cg)?;
        let sched_config = self.dir.join("scheduler.kubeconfig").display().to_string();
        let mut sched = Command::new(self.bin.join("kube-scheduler"));
        sched.args([
            &format!("--kubeconfig={sched_config}"),
            &format!("--authentication-kubeconfig={sched_config}"),
            &format!("--authorization-kubeconfig={sched_config}"),
            "--bind-address=127.0.0.1",
            "--port=0",
            "--secure-port=10259",
            "--leader-elect=false",
        ]);
        self.launch("kube-scheduler", sched, &cg)?;
        Ok(())
    }

    fn node(&self, i: usize, images: &[PathBuf]) -> anyhow::Result<()> {
        let d = self.node_dir(i);
        let _ = fs::remove_dir_all(&d);
        for (_, sub) in NODE_PATHS {
            fs::create_dir_all(d.join(sub))?;
        }
        let cg = format!("{CGROUP}/node{i}");
        make_cgroup(&format!("{cg}/system"))?;
        // The node's own mount namespace, kept by a holder process: its paths are the node's.
        let mut script = String::from("set -e\nmount --make-rslave /\n");
        for (path, sub) in NODE_PATHS {
            script.push_str(&format!("mount --bind {} {path}\n", d.join(sub).display()));
        }
        // Pods' network namespaces are pinned here after the agent's container started: shared, so
        // that a HostToContainer mount of /run/netns sees them.
        script.push_str("mount --make-shared /run/netns\n");
        script.push_str("mount -t bpf bpf /sys/fs/bpf\n");
        script.push_str("echo ready\nexec sleep infinity\n");
        let mut holder = Command::new("nsenter");
        holder.arg(format!("--net=/run/netns/{}", netns(i))).args([
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            "sh",
            "-c",
            &script,
        ]);
        let holder_pid = self.launch(&format!("node{i}-holder"), holder, &format!("{cg}/system"))?;
        let log = self.dir.join("logs").join(format!("node{i}-holder.log"));
        wait(&format!("node{i}'s mount namespace"), Duration::from_secs(10), || {
            fs::read_to_string(&log).is_ok_and(|l| l.contains("ready"))
        })
        .with_context(|| format!("see {}", log.display()))?;
        let enter = |program: &Path| {
            let mut c = Command::new("nsenter");
            c.args(["-t", &holder_pid.to_string(), "-m", "-n", "--"]).arg(program);
            c
        };

        // CNI: the plugins Debian ships, and the node's network (bridge + host-local).
        for plugin in fs::read_dir("/usr/lib/cni").context("reading /usr/lib/cni (containernetworking-plugins)")? {
            let plugin = plugin?.path();
            if let Some(name) = plugin.file_name() {
                std::os::unix::fs::symlink(&plugin, d.join("cni-bin").join(name))?;
            }
        }
        fs::write(
            d.join("cni-conf").join("10-weft-kube.conflist"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "weft-kube",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": pod_range(i), "gateway": pod_gateway(i) }]],
                        "routes": [{ "dst": "0.0.0.0/0" }]
                    }
                }]
            }))?,
        )?;

        let containerd_config = d.join("containerd.toml");
        fs::write(&containerd_config, CONTAINERD_CONFIG)?;
        let mut containerd = enter(Path::new("/usr/bin/containerd"));
        containerd.arg("--config").arg(&containerd_config);
        self.launch(&format!("node{i}-containerd"), containerd, &format!("{cg}/system"))?;
        let sock = d.join("run-containerd").join("containerd.sock");
        wait(&format!("node{i}'s containerd"), Duration::from_secs(30), || {
            Command::new("ctr")
                .arg("--address")
                .arg(&sock)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })?;
        for image in images {
            run(Command::new("ctr")
                .arg("--address")
                .arg(&sock)
                .args(["-n", "k8s.io", "images", "import"])
                .arg(image)
                .stdout(Stdio::null()))
            .with_context(|| format!("importing {} into node{i}", image.display()))?;
        }

        let kubelet_config = d.join("kubelet.yaml");
        fs::write(
            &kubelet_config,
            KUBELET_CONFIG
                .replace("@ADDRESS@", &node_ip(i))
                .replace("@HEALTHZ@", &(10248 + i * 10).to_string())
                .replace("@CGROUP_ROOT@", &format!("/{cg}"))
                .replace("@CA@", &self.dir.join("pki").join("ca.crt").display().to_string()),
        )?;
        let mut kubelet = enter(&self.bin.join("kubelet"));
        kubelet
            .arg(format!("--config={}", kubelet_config.display()))
            .arg(format!(
                "--kubeconfig={}",
                self.dir.join(format!("node{i}.kubeconfig")).display()
            ))
            .args([
                "--container-runtime=remote",
                "--container-runtime-endpoint=unix:///run/containerd/containerd.sock",
                "--runtime-request-timeout=2m",
                &format!("--hostname-override={}", node_name(i)),
                &format!("--node-ip={}", node_ip(i)),
                "--pod-infra-container-image=registry.k8s.io/pause:3.6",
                "--v=1",
            ])
            // kubelet's in-tree AWS credential provider would probe the cloud metadata address.
            .env("AWS_EC2_METADATA_DISABLED", "true");
        self.launch(&format!("node{i}-kubelet"), kubelet, &format!("{cg}/system"))?;
        Ok(())
    }

    fn wait_nodes_ready(&self) -> anyhow::Result<()> {
        let kubeconfig = self.kubeconfig();
        wait("both nodes to be Ready", Duration::from_secs(120), || {
            (1..=NODES).all(|i| {
                kubectl(
                    &kubeconfig,
                    &[
                        "get",
                        "node",
                        &node_name(i),
                        "-o",
                        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                    ],
                )
                .is_ok_and(|s| s.trim() == "True")
            })
        })?;
        wait("the default service account", Duration::from_secs(60), || {
            kubectl(&kubeconfig, &["get", "serviceaccount", "default", "-o", "name"]).is_ok()
        })
    }

    /// Starts `cmd` detached (its own process group), in cgroup `cgroup` of every hierarchy, logging
    /// to `logs/NAME.log`; its PID goes to `run/NAME.pid`.
    fn launch(&self, name: &str, mut cmd: Command, cgroup: &str) -> anyhow::Result<u32> {
        let log = fs::File::create(self.dir.join("logs").join(format!("{name}.log")))?;
        let procs: Vec<PathBuf> = hierarchies()
            .iter()
            .map(|h| h.join(cgroup).join("cgroup.procs"))
            .collect();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // SAFETY: xtask is single-threaded here, so the forked child may allocate; it only writes
        // its own PID into cgroup.procs files before exec.
        unsafe {
            cmd.pre_exec(move || {
                for p in &procs {
                    fs::write(p, b"0")?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        fs::write(self.pid_file(name), pid.to_string())?;
        Ok(pid)
    }

    // === down ===

    pub fn down(&self) -> anyhow::Result<()> {
        ensure!(crate::is_root(), "tearing the local Kubernetes cluster down needs root");
        step("stopping the local Kubernetes cluster and restoring the host");
        let left = self.teardown();
        ensure!(left.is_empty(), "could not remove everything:\n  {}", left.join("\n  "));
        step("local Kubernetes cluster removed");
        Ok(())
    }

    fn down_quietly(&self) {
        let _ = self.teardown();
    }

    /// Removes everything `up` made, found by name (also after a crash). Returns what is left.
    fn teardown(&self) -> Vec<String> {
        let mut left = Vec::new();
        // 1. Every process of the cluster, found by its cgroup: nodes first (pods, shims, kubelets,
        //    containerds, holders: a node's mount namespace ends with its last process), then the
        //    control plane. The API server sometimes lingers in graceful shutdown: SIGKILL is fine,
        //    etcd is the only state and it is discarded.
        for i in 1..=NODES {
            kill_cgroup(&format!("{CGROUP}/node{i}"));
        }
        kill_cgroup(&format!("{CGROUP}/control-plane"));
        if let Some(pids) = cgroup_pids(CGROUP)
            && !pids.is_empty()
        {
            left.push(format!("processes still in cgroup {CGROUP}: {pids:?}"));
        }
        // 2. cgroups, deepest first.
        for h in hierarchies() {
            let top = h.join(CGROUP);
            if top.exists() {
                remove_cgroup_tree(&top);
                if top.exists() {
                    left.push(format!("cgroup {}", top.display()));
                }
            }
        }
        // 3. Network: the node namespaces (their veths go with them) and the bridge (its addresses
        //    and routes go with it).
        for i in 1..=NODES {
            let ns = netns(i);
            if Path::new("/run/netns").join(&ns).exists()
                && !Command::new("ip")
                    .args(["netns", "del", &ns])
                    .status()
                    .is_ok_and(|s| s.success())
            {
                left.push(format!("network namespace {ns}"));
            }
        }
        if Path::new("/sys/class/net").join(BRIDGE).exists()
            && !Command::new("ip")
                .args(["link", "del", BRIDGE])
                .status()
                .is_ok_and(|s| s.success())
        {
            left.push(format!("link {BRIDGE}"));
        }
        // 4. Host settings recorded at up.
        if let Ok(bytes) = fs::read(self.dir.join("host.json"))
            && let Ok(host) = serde_json::from_slice::<serde_json::Value>(&bytes)
        {
            if let Some(sysctls) = host["sysctls"].as_object() {
                for (k, v) in sysctls {
                    if let Some(v) = v.as_str()
                        && !Command::new("sysctl")
                            .args(["-qw", &format!("{k}={v}")])
                            .status()
                            .is_ok_and(|s| s.success())
                    {
                        left.push(format!("sysctl {k} (was {v})"));
                    }
                }
            }
            if let Some(created) = host["created"].as_array() {
                for path in created.iter().filter_map(|p| p.as_str()) {
                    remove_empty_tree(Path::new(path));
                    if Path::new(path).exists() {
                        left.push(format!("directory {path} (not empty)"));
                    }
                }
            }
            let _ = fs::remove_file(self.dir.join("host.json"));
        }
        // 5. The cluster's data (etcd, the nodes' containerd stores); logs stay for a post-mortem.
        for d in ["etcd", "run", "pki"] {
            let _ = fs::remove_dir_all(self.dir.join(d));
        }
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "kubeconfig") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        for i in 1..=NODES {
            let _ = fs::remove_dir_all(self.node_dir(i));
        }
        left
    }

    // === status ===

    pub fn status(&self) -> anyhow::Result<()> {
        let names = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]
            .into_iter()
            .map(String::from)
            .chain((1..=NODES).flat_map(|i| ["holder", "containerd", "kubelet"].map(|p| format!("node{i}-{p}"))));
        for name in names {
            match self.running(&name) {
                Some(pid) => println!("  {name:<24} running (pid {pid})"),
                None => println!("  {name:<24} not running"),
            }
        }
        if self.is_up() {
            println!("\n  export KUBECONFIG={}", self.kubeconfig().display());
            println!("  logs: {}", self.dir.join("logs").display());
            for i in 1..=NODES {
                println!(
                    "  node{i}: network namespace {}, containerd socket {}",
                    netns(i),
                    self.node_dir(i).join("run-containerd/containerd.sock").display()
                );
            }
            println!();
            let _ = Command::new("kubectl")
                .env("KUBECONFIG", self.kubeconfig())
                .args(["get", "nodes", "-o", "wide"])
                .status();
        }
        Ok(())
    }
}

/// A cluster brought up for a test run: [`Guard::down`] tears it down and says what it left behind;
/// dropped without that (the run failed on the way), it is torn down all the same.
pub struct Guard(Option<Cluster>);

impl Guard {
    pub fn up(cluster: Cluster, images: &[PathBuf]) -> anyhow::Result<Guard> {
        // Someone else's cluster is never taken down.
        ensure!(!cluster.is_up(), "a local Kubernetes cluster is already up");
        // Dropped on error too: a half-made cluster is removed.
        let guard = Guard(Some(cluster));
        if let Some(c) = &guard.0 {
            c.up(images)?;
        }
        Ok(guard)
    }

    /// Tears the cluster down; an error names what is left (processes, mounts, cgroups, links,
    /// sysctls), so that a test run that leaves anything behind fails.
    pub fn down(mut self) -> anyhow::Result<()> {
        match self.0.take() {
            Some(c) => c.down().context("tearing down the test cluster"),
            None => Ok(()),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.take()
            && let Err(e) = c.down()
        {
            eprintln!("tearing down the test cluster: {e:#}");
        }
    }
}

const CONTAINERD_CONFIG: &str = r#"version = 2
# Paths are containerd's defaults: the node's mount namespace makes them the node's own.
[metrics]
  address = ""
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.6"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    # This machine lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below containerd's own.
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          BinaryName = "/usr/sbin/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/opt/cni/bin"
      conf_dir = "/etc/cni/net.d"
      max_conf_num = 1
"#;

const KUBELET_CONFIG: &str = r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: @ADDRESS@
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: @HEALTHZ@
cgroupDriver: cgroupfs
cgroupsPerQOS: true
cgroupRoot: @CGROUP_ROOT@
enforceNodeAllocatable: ["pods"]
makeIPTablesUtilChains: false
failSwapOn: false
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: @CA@}
authorization:
  mode: Webhook
staticPodPath: ""
# No cluster DNS, and pods get no resolver of the host's: nothing resolves names off the machine.
resolvConf: ""
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
# Imported images cannot be pulled again: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"#;

fn kubernetes_dir() -> PathBuf {
    std::env::var_os("WEFT_KUBE_BIN_DIR")
        .map(|d| PathBuf::from(d).parent().map(Path::to_path_buf).unwrap_or_default())
        .unwrap_or_else(|| cache_dir().join(format!("kubernetes-{KUBERNETES_VERSION}")))
}

/// Installs what a cluster needs: Debian packages, then the Kubernetes binaries (built once).
pub fn install() -> anyhow::Result<()> {
    crate::install_packages(DEBIAN_PACKAGES)?;
    if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        crate::install_packages(&["kubernetes-client"])?;
    }
    let script = root().join("xtask").join("scripts").join("kubernetes-build.sh");
    run(Command::new(script).arg(kubernetes_dir()))
}

fn netns(i: usize) -> String {
    format!("weft-kube-node{i}")
}

pub fn node_name(i: usize) -> String {
    format!("node{i}")
}

fn node_ip(i: usize) -> String {
    format!("10.99.0.{}", 10 + i)
}

fn pod_range(i: usize) -> String {
    format!("10.244.{i}.0/24")
}

fn pod_gateway(i: usize) -> String {
    format!("10.244.{i}.1")
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
    output(
        Command::new("kubectl")
            .env("KUBECONFIG", kubeconfig)
            .args(["--request-timeout=5s"])
            .args(args),
    )
}

fn wait(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

fn random_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

// === cgroups ===

/// Every mounted cgroup hierarchy (v1 controllers and the v2 one), or just the v2 root.
fn hierarchies() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .collect()
}

fn make_cgroup(rel: &str) -> anyhow::Result<()> {
    for h in hierarchies() {
        let p = h.join(rel);
        fs::create_dir_all(&p).with_context(|| format!("creating cgroup {}", p.display()))?;
        // cpuset children start empty in v1: give them their parent's CPUs and memory nodes.
        if h.ends_with("cpuset") {
            let mut parent = h.clone();
            for part in Path::new(rel).components() {
                let child = parent.join(part);
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    if fs::read_to_string(child.join(f)).is_ok_and(|v| v.trim().is_empty()) {
                        fs::write(child.join(f), fs::read_to_string(parent.join(f))?.trim())?;
                    }
                }
                parent = child;
            }
        }
    }
    Ok(())
}

/// The PIDs in cgroup subtree `rel` (of the first hierarchy that has it), `None` if it does not exist.
fn cgroup_pids(rel: &str) -> Option<Vec<u32>> {
    let top = hierarchies().into_iter().map(|h| h.join(rel)).find(|p| p.exists())?;
    let mut pids = Vec::new();
    let mut stack = vec![top];
    while let Some(dir) = stack.pop() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    Some(pids)
}

/// SIGKILLs every process in cgroup subtree `rel` until none is left (bounded: 20 s).
fn kill_cgroup(rel: &str) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(20);
    while let Some(pids) = cgroup_pids(rel) {
        if pids.is_empty() || Instant::now() > deadline {
            if !pids.is_empty() {
                eprintln!(
                    "cgroup {rel}: processes {pids:?} survive SIGKILL for {:?}",
                    started.elapsed()
                );
            }
            break;
        }
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

fn remove_empty_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}
