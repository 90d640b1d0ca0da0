//! A real Kubernetes API server for tests: etcd (Debian's `/usr/bin/etcd`) and `kube-apiserver`
//! (1.20, built from Debian's source package into `$HOME/.cache/weft/kubernetes-1.20.2/bin`, or
//! `$WEFT_KUBE_BIN_DIR`) on 127.0.0.1 with free ports and a fresh temporary directory each: a
//! self-signed CA and serving certificate (SAN IP 127.0.0.1), service-account signing keys, and a
//! static token file whose one user is in `system:masters`.
//!
//! Both processes are killed by PID when the [`ApiServer`] is dropped (also when a test panics; and
//! by the kernel if the test process dies first, `PR_SET_PDEATHSIG`), then the directory is
//! removed. A test that panics prints the tail of the API server's log first.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::PostParams,
    runtime::wait::{await_condition, conditions},
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// How long the API server has to answer `/readyz` (about 5 s on an idle machine).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The token of the test's administrator (`system:masters`).
const ADMIN_TOKEN: &str = "weft-test-admin-token";

pub struct ApiServer {
    /// Where `kube-apiserver` answers: `https://127.0.0.1:<port>`.
    pub url: String,
    /// A kubeconfig file for the administrator.
    pub kubeconfig: PathBuf,
    apiserver: Option<Child>,
    etcd: Option<Child>,
    dir: Option<tempfile::TempDir>,
}

/// Where the Kubernetes binaries are.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("WEFT_KUBE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/weft/kubernetes-1.20.2/bin"),
    }
}

const ETCD: &str = "/usr/bin/etcd";

impl ApiServer {
    /// Starts etcd and the API server and waits until the API server is ready. When a binary is
    /// missing: with `CI=true` this fails naming it; otherwise it prints a note and returns `None`
    /// (the caller skips).
    pub async fn start(test: &str) -> Option<ApiServer> {
        let apiserver_bin = bin_dir().join("kube-apiserver");
        for bin in [apiserver_bin.as_path(), Path::new(ETCD)] {
            if !bin.exists() {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true");
                assert!(
                    !ci,
                    "CI=true: {} is missing; the Kubernetes tests must run (build it with xtask/scripts/kubernetes-build.sh, or set WEFT_KUBE_BIN_DIR)",
                    bin.display()
                );
                eprintln!(
                    "note: {test}: skipped, {} is missing (set WEFT_KUBE_BIN_DIR, or build Kubernetes 1.20 first)",
                    bin.display()
                );
                return None;
            }
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("weft-kube-{test}-"))
            .tempdir()
            .unwrap();
        let d = dir.path();
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
            dir: None,
        };
        let p = |name: &str| d.join(name).display().to_string();
        server.apiserver = Some(spawn(
            Command::new(&apiserver_bin).args([
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
            ]),
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
        server.dir = Some(dir);
        server.wait_ready().await;
        Some(server)
    }

    /// A client acting as the administrator.
    pub async fn client(&self) -> kube::Client {
        let yaml = fs::read_to_string(&self.kubeconfig).unwrap();
        Self::client_from_yaml(&yaml).await
    }

    /// A client authenticating with `token` (a service account's, from the TokenRequest API).
    #[allow(dead_code, reason = "not every test binary acts as a service account")]
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        let yaml = fs::read_to_string(&self.kubeconfig)
            .unwrap()
            .replace(ADMIN_TOKEN, token);
        Self::client_from_yaml(&yaml).await
    }

    /// The private key (PKCS#8 PEM, ECDSA P-256) the API server signs service-account tokens with.
    #[allow(dead_code, reason = "not every test binary forges tokens")]
    pub fn service_account_key(&self) -> String {
        fs::read_to_string(self.dir().join("sa.key")).unwrap()
    }

    async fn client_from_yaml(yaml: &str) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(yaml).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
        weft_controller::k8s::client_from(config).unwrap()
    }

    /// Installs the CRDs of a YAML stream and waits until the API server serves them.
    pub async fn install_crds(client: &Client, yaml: &str) {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        let mut names = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let crd: CustomResourceDefinition = serde::Deserialize::deserialize(doc).unwrap();
            let created = api
                .create(&PostParams::default(), &crd)
                .await
                .unwrap_or_else(|e| panic!("the API server refused CRD {:?}: {e}", crd.metadata.name));
            names.push(created.metadata.name.unwrap());
        }
        assert_eq!(names.len(), 2, "{names:?}");
        for name in names {
            tokio::time::timeout(
                READY_TIMEOUT,
                await_condition(api.clone(), &name, conditions::is_crd_established()),
            )
            .await
            .unwrap_or_else(|_| panic!("CRD {name} not Established within {READY_TIMEOUT:?}"))
            .unwrap();
        }
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(Path::new("."))
    }

    /// Waits for `/readyz` to answer 200, failing early (with the logs) if a process exits.
    async fn wait_ready(&mut self) {
        let client = self.client().await;
        let dir = self.dir().to_owned();
        let started = Instant::now();
        loop {
            for (name, child) in [("etcd", &mut self.etcd), ("kube-apiserver", &mut self.apiserver)] {
                if let Some(status) = child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                    panic!(
                        "{name} exited ({status}) before the API server was ready\n--- etcd.log\n{}\n--- apiserver.log\n{}",
                        tail(&dir.join("etcd.log"), 20),
                        tail(&dir.join("apiserver.log"), 40)
                    );
                }
            }
            let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
            if client.request_text(request).await.is_ok() {
                eprintln!("kube-apiserver ready after {:?}", started.elapsed());
                return;
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "kube-apiserver not ready after {READY_TIMEOUT:?}\n--- apiserver.log\n{}",
                tail(&dir.join("apiserver.log"), 40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- the last lines of kube-apiserver's log\n{}",
                tail(&self.dir().join("apiserver.log"), 30)
            );
        }
        // The API server first: it would otherwise log etcd's disappearance at length.
        for child in [self.apiserver.take(), self.etcd.take()].into_iter().flatten() {
            kill(child);
        }
        // The temporary directory goes last, with `dir`.
    }
}

fn kill(mut child: Child) {
    // SIGKILL to this PID only; then reap it.
    let _ = child.kill();
    let _ = child.wait();
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
        Files {
            ca: write("ca.pem", &ca_cert.pem()),
            serving_cert: write("serving.pem", &serving_cert.pem()),
            serving_key: write("serving.key", &serving_key.serialize_pem()),
            sa_key: write("sa.key", &sa.serialize_pem()),
            sa_public: write("sa.pub", &sa.public_key_pem()),
            tokens: write(
                "tokens.csv",
                &format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n"),
            ),
        }
    }
}
