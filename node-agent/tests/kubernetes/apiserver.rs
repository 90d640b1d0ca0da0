//! A real Kubernetes API server for the agent's tests: etcd (Debian's `/usr/bin/etcd`) and
//! `kube-apiserver` 1.20 (built from Debian's source package into
//! `$HOME/.cache/weft/kubernetes-1.20.2/bin`, or `$WEFT_KUBE_BIN_DIR`) on 127.0.0.1 with free ports and
//! a fresh directory: a self-signed CA and serving certificate (SAN IP 127.0.0.1), service-account
//! keys, and static tokens for an administrator (`system:masters`, used through `kubectl` to set the
//! scene) and for the agent (`system:serviceaccount:weft-system:weft-node`, with only the RBAC the
//! least RBAC the agent needs, [`AGENT_RBAC`]).
//!
//! Both processes are killed by PID when the [`ApiServer`] is dropped (also when a test panics; and
//! by the kernel if the test process dies first, `PR_SET_PDEATHSIG`), then the directory is removed.
//! A test that panics prints the tail of the API server's log first.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use weft_node::kube;

/// How long the API server has to become ready (about 5 s on an idle machine).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

const ADMIN_TOKEN: &str = "weft-test-admin-token";
const AGENT_TOKEN: &str = "weft-test-agent-token";

/// What the agent's service account may do: the least the agent needs (the manifests may grant
/// more), so that the tests fail if the agent needs anything else.
pub const AGENT_RBAC: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: weft-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: weft-node}
rules:
- {apiGroups: [""], resources: [pods/status], verbs: [patch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: weft-node}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: weft-node}
subjects: [{kind: ServiceAccount, name: weft-node, namespace: weft-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: weft-node, namespace: weft-system}
rules:
- {apiGroups: [""], resources: [endpoints], verbs: [list, watch]}
- {apiGroups: [apps], resources: [daemonsets], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: weft-node, namespace: weft-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: weft-node}
subjects: [{kind: ServiceAccount, name: weft-node, namespace: weft-system}]
"#;

pub struct ApiServer {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    kubeconfig: PathBuf,
    apiserver: Option<Child>,
    etcd: Option<Child>,
    dir: PathBuf,
}

/// Where the Kubernetes binaries are.
fn bin_dir() -> PathBuf {
    match std::env::var_os("WEFT_KUBE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/weft/kubernetes-1.20.2/bin"),
    }
}

const ETCD: &str = "/usr/bin/etcd";

impl ApiServer {
    /// Starts etcd and the API server (with `extra` flags), waits until it is ready and applies
    /// [`AGENT_RBAC`]. When a binary is missing: with `CI=true` this fails naming it; otherwise it
    /// prints a note and returns `None` (the caller skips).
    pub fn start(test: &str, extra: &[&str]) -> Option<ApiServer> {
        let apiserver_bin = bin_dir().join("kube-apiserver");
        for bin in [apiserver_bin.as_path(), Path::new(ETCD), Path::new("/usr/bin/kubectl")] {
            if !bin.exists() {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true");
                assert!(
                    !ci,
                    "CI=true: {} is missing; the Kubernetes tests must run (build it with xtask/scripts/kubernetes-build.sh, or set WEFT_KUBE_BIN_DIR)",
                    bin.display()
                );
                eprintln!("note: {test}: skipped, {} is missing", bin.display());
                return None;
            }
        }
        let dir = std::env::temp_dir().join(format!("weft-node-kube-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let d = dir.as_path();
        let files = Files::write(d);
        let [etcd_client, etcd_peer, secure] = free_ports();
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd = spawn(
            Command::new(ETCD).args([
                "--name=weft-test".to_owned(),
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=weft-test={peer_url}"),
            ]),
            &d.join("etcd.log"),
        );
        let mut server = ApiServer {
            url: format!("https://127.0.0.1:{secure}"),
            kubeconfig: d.join("kubeconfig"),
            apiserver: None,
            etcd: Some(etcd),
            dir: dir.clone(),
        };
        let p = |name: &str| d.join(name).display().to_string();
        server.apiserver = Some(spawn(
            Command::new(&apiserver_bin)
                .args([
                    format!("--etcd-servers={etcd_url}"),
                    "--bind-address=127.0.0.1".to_owned(),
                    "--advertise-address=127.0.0.1".to_owned(),
                    format!("--secure-port={secure}"),
                    "--insecure-port=0".to_owned(),
                    format!("--cert-dir={}", p("certs")),
                    format!("--tls-cert-file={}", files.serving_cert.display()),
                    format!("--tls-private-key-file={}", files.serving_key.display()),
                    format!("--client-ca-file={}", files.ca.display()),
                    format!("--token-auth-file={}", files.tokens.display()),
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
                    format!("--service-account-key-file={}", files.sa_public.display()),
                    format!("--service-account-signing-key-file={}", files.sa_key.display()),
                    "--api-audiences=https://kubernetes.default.svc.cluster.local".to_owned(),
                    "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
                    "--authorization-mode=Node,RBAC".to_owned(),
                    "--disable-admission-plugins=ServiceAccount".to_owned(),
                    "--endpoint-reconciler-type=none".to_owned(),
                    "--allow-privileged=true".to_owned(),
                ])
                .args(extra),
            &d.join("apiserver.log"),
        ));
        fs::write(
            &server.kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: admin\n  user: {{token: \"{ADMIN_TOKEN}\"}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
                server.url,
                files.ca.display()
            ),
        )
        .unwrap();
        server.wait_ready();
        server.apply(AGENT_RBAC);
        Some(server)
    }

    /// A client of the agent's kind, with the agent's credentials and `deadlines`.
    pub fn agent(&self, deadlines: kube::Deadlines) -> kube::Client {
        self.client("agent-token", deadlines)
    }

    /// A client with the administrator's credentials.
    pub fn admin(&self) -> kube::Client {
        self.client("admin-token", kube::Deadlines::default())
    }

    fn client(&self, token: &str, deadlines: kube::Deadlines) -> kube::Client {
        kube::Client::new(kube::Config {
            url: self.url.clone(),
            ca_file: self.dir.join("ca.pem"),
            token_file: self.dir.join(token),
            deadlines,
        })
        .unwrap()
    }

    /// `kubectl` as the administrator; panics with its output if it fails.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new("kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .arg("--request-timeout=10s")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "kubectl {args:?}: {stdout}{stderr}");
        stdout
    }

    /// `kubectl apply` of a YAML stream.
    pub fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], Some(yaml));
    }

    /// Waits for `/readyz`, failing early (with the logs) if a process exits.
    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            for (name, child) in [("etcd", &mut self.etcd), ("kube-apiserver", &mut self.apiserver)] {
                if let Some(status) = child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                    panic!(
                        "{name} exited ({status}) before the API server was ready\n--- etcd.log\n{}\n--- apiserver.log\n{}",
                        tail(&self.dir.join("etcd.log"), 20),
                        tail(&self.dir.join("apiserver.log"), 40)
                    );
                }
            }
            let ready = Command::new("kubectl")
                .env("KUBECONFIG", &self.kubeconfig)
                .args(["--request-timeout=2s", "get", "--raw", "/readyz"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                eprintln!("kube-apiserver ready after {:?}", started.elapsed());
                return;
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "kube-apiserver not ready after {READY_TIMEOUT:?}\n--- apiserver.log\n{}",
                tail(&self.dir.join("apiserver.log"), 40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- the last lines of kube-apiserver's log\n{}",
                tail(&self.dir.join("apiserver.log"), 30)
            );
        }
        for mut child in [self.apiserver.take(), self.etcd.take()].into_iter().flatten() {
            // SIGKILL to this PID only; then reap it.
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Starts `cmd` with its output in `log`, killed by the kernel if this process dies.
fn spawn(cmd: &mut Command, log: &Path) -> Child {
    let out = fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()))
}

/// Three ports free at this moment (each bound and released; distinct).
fn free_ports() -> [u16; 3] {
    let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let ports: Vec<u16> = listeners.iter().map(|l| l.local_addr().unwrap().port()).collect();
    [ports[0], ports[1], ports[2]]
}

fn tail(path: &Path, lines: usize) -> String {
    let Ok(file) = fs::File::open(path) else {
        return format!("({} cannot be read)", path.display());
    };
    let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The credentials the API server starts with.
struct Files {
    ca: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_key: PathBuf,
    sa_public: PathBuf,
    tokens: PathBuf,
}

impl Files {
    fn write(dir: &Path) -> Files {
        let write = |name: &str, content: &str| {
            let path = dir.join(name);
            fs::write(&path, content).unwrap();
            path
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, "weft test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let serving_key = KeyPair::generate().unwrap();
        let mut serving = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        serving
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let serving_cert = serving.signed_by(&serving_key, &issuer).unwrap();

        let sa = KeyPair::generate().unwrap();
        write("admin-token", ADMIN_TOKEN);
        write("agent-token", AGENT_TOKEN);
        Files {
            ca: write("ca.pem", &ca_cert.pem()),
            serving_cert: write("serving.pem", &serving_cert.pem()),
            serving_key: write("serving.key", &serving_key.serialize_pem()),
            sa_key: write("sa.key", &sa.serialize_pem()),
            sa_public: write("sa.pub", &sa.public_key_pem()),
            tokens: write(
                "tokens.csv",
                &format!(
                    "{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n{AGENT_TOKEN},system:serviceaccount:weft-system:weft-node,agent-uid,\"system:serviceaccounts,system:serviceaccounts:weft-system\"\n"
                ),
            ),
        }
    }
}
