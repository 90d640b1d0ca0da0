//! A real Kubernetes API server for tests (dev-only): etcd (Debian's `/usr/bin/etcd`) and
//! `kube-apiserver` 1.20 (built from Debian's source package into
//! `$HOME/.cache/weft/kubernetes-1.20.2/bin`, or `$WEFT_KUBE_BIN_DIR`) on 127.0.0.1 with free ports
//! and a fresh directory each: a self-signed CA and serving certificate (SAN IP 127.0.0.1),
//! service-account signing keys, and static tokens: an administrator in `system:masters`, and the
//! users a test adds.
//!
//! Both processes are killed by PID when the [`ApiServer`] is dropped (also when a test panics; and
//! by the kernel if the test process dies first, `PR_SET_PDEATHSIG`), then the directory is
//! removed. A test that panics prints the tail of the API server's log first.
//!
//! The controller's and the node agent's Kubernetes tests both start theirs with it; each adds its
//! own clients on top.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// How long the API server has to answer `/readyz` (about 5 s on an idle machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The token of the test's administrator (`system:masters`).
pub const ADMIN_TOKEN: &str = "weft-test-admin-token";

const ETCD: &str = "/usr/bin/etcd";
const KUBECTL: &str = "kubectl";

/// A static-token user of the API server: token, user name, groups (comma-separated, may be empty).
pub struct User<'a> {
    pub token: &'a str,
    pub name: &'a str,
    pub groups: &'a str,
}

pub struct ApiServer {
    /// Where `kube-apiserver` answers: `https://127.0.0.1:<port>`.
    pub url: String,
    /// A kubeconfig file for the administrator.
    pub kubeconfig: PathBuf,
    /// The CA that signed the API server's certificate (PEM file).
    pub ca_file: PathBuf,
    apiserver: Option<Child>,
    etcd: Option<Child>,
    dir: PathBuf,
}

/// Where the Kubernetes binaries are.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("WEFT_KUBE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/weft/kubernetes-1.20.2/bin"),
    }
}

impl ApiServer {
    /// Starts etcd and the API server (with `extra` flags and `users` besides the administrator)
    /// and waits until it is ready. Call it on the test's own thread: the kernel kills both
    /// processes when the *thread* that started them ends (`PR_SET_PDEATHSIG`), and a runtime's
    /// blocking-pool thread ends after 10 s idle. When a binary is missing: with `CI=true` this fails naming it;
    /// otherwise it prints a note and returns `None` (the caller skips).
    pub fn start(test: &str, extra: &[&str], users: &[User<'_>]) -> Option<ApiServer> {
        let apiserver_bin = bin_dir().join("kube-apiserver");
        let kubectl = Command::new(KUBECTL).args(["version", "--client"]).output().is_ok();
        for (bin, present) in [
            (apiserver_bin.display().to_string(), apiserver_bin.exists()),
            (ETCD.to_owned(), Path::new(ETCD).exists()),
            (KUBECTL.to_owned(), kubectl),
        ] {
            if !present {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true: {bin} is missing; the Kubernetes tests must run (cargo xtask kube up installs and builds what they need, or set WEFT_KUBE_BIN_DIR)"
                );
                eprintln!("note: {test}: skipped, {bin} is missing (cargo xtask kube up installs it)");
                return None;
            }
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-kube-{test}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the test's directory");
        let d = dir.as_path();
        let files = Files::write(d, users);
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
            ca_file: files.ca.clone(),
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
        fs::write(&server.kubeconfig, server.kubeconfig_for(ADMIN_TOKEN)).expect("writing the kubeconfig");
        server.wait_ready();
        Some(server)
    }

    /// A kubeconfig (YAML) for the user of `token`.
    pub fn kubeconfig_for(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: user\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: user}}\ncurrent-context: test\n",
            self.url,
            self.ca_file.display()
        )
    }

    /// The test's directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The private key (PKCS#8 PEM, ECDSA P-256) the API server signs service-account tokens with.
    pub fn service_account_key(&self) -> String {
        fs::read_to_string(self.dir.join("sa.key")).expect("reading the service-account key")
    }

    /// `kubectl` as the administrator, `stdin` on its input; panics with its output if it fails.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new(KUBECTL)
            .env("KUBECONFIG", &self.kubeconfig)
            .arg("--request-timeout=10s")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        let mut input = child.stdin.take().expect("piped stdin");
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .expect("writing to kubectl");
        drop(input);
        let out = child.wait_with_output().expect("waiting for kubectl");
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
                if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    panic!(
                        "{name} exited ({status}) before the API server was ready\n--- etcd.log\n{}\n--- apiserver.log\n{}",
                        tail(&self.dir.join("etcd.log"), 20),
                        tail(&self.dir.join("apiserver.log"), 40)
                    );
                }
            }
            let ready = Command::new(KUBECTL)
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
            std::thread::sleep(Duration::from_millis(100));
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
        // The API server first: it would otherwise log etcd's disappearance at length.
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
    let out = fs::File::create(log).expect("creating a log file");
    let err = out.try_clone().expect("a second handle on the log");
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
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    let port = |l: &TcpListener| l.local_addr().expect("a bound address").port();
    [port(&listeners[0]), port(&listeners[1]), port(&listeners[2])]
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
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
    fn write(dir: &Path, users: &[User<'_>]) -> Files {
        let write = |name: &str, content: &str| {
            let path = dir.join(name);
            fs::write(&path, content).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            path
        };
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.distinguished_name.push(DnType::CommonName, "weft test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("the CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let serving_key = KeyPair::generate().expect("a serving key");
        let mut serving = CertificateParams::new(vec!["localhost".to_owned()]).expect("serving parameters");
        serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        serving
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let serving_cert = serving
            .signed_by(&serving_key, &issuer)
            .expect("the serving certificate");

        let sa = KeyPair::generate().expect("a service-account key");
        let mut tokens = format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n");
        for u in users {
            tokens.push_str(&format!("{},{},{}-uid,\"{}\"\n", u.token, u.name, u.token, u.groups));
        }
        Files {
            ca: write("ca.pem", &ca_cert.pem()),
            serving_cert: write("serving.pem", &serving_cert.pem()),
            serving_key: write("serving.key", &serving_key.serialize_pem()),
            sa_key: write("sa.key", &sa.serialize_pem()),
            sa_public: write("sa.pub", &sa.public_key_pem()),
            tokens: write("tokens.csv", &tokens),
        }
    }
}
