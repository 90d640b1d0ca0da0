//! Harness for the Kubernetes tests: the local cluster of `cargo xtask kube up` (a real API server,
//! kubelets, containerd, Weft's own images), reached as a user reaches it: `kubectl`, `weftctl`.
//! The nodes' own views (their mount namespaces: CNI configuration, bpffs pins) are entered through
//! each node's holder process.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;

/// Where `cargo xtask kube` keeps the cluster (`WEFT_KUBE_DIR`).
pub fn dir() -> PathBuf {
    std::env::var_os("WEFT_KUBE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/weft-kube"))
}

pub struct Kube {
    pub kubeconfig: PathBuf,
}

impl Kube {
    /// The running local cluster, or `None` (with a note) when there is none outside CI. Under
    /// `CI=true` a missing cluster is a failure: `cargo xtask test` brings it up.
    pub fn find() -> Option<Kube> {
        let kubeconfig = dir().join("admin.kubeconfig");
        if kubeconfig.exists() {
            return Some(Kube { kubeconfig });
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: no local Kubernetes cluster at {} (cargo xtask test brings it up with `cargo xtask kube up`)",
            dir().display()
        );
        eprintln!(
            "note: no local Kubernetes cluster ({} missing); skipping. Run `cargo xtask kube up` first.",
            kubeconfig.display()
        );
        None
    }

    pub fn kubectl_output(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .arg("--request-timeout=20s")
            .args(args)
            .output()
            .expect("running kubectl")
    }

    /// `kubectl args`, which must succeed; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` with `yaml`; the output, success or not.
    pub fn apply(&self, yaml: &str) -> Output {
        self.stdin(&["apply", "-f", "-"], yaml)
    }

    pub fn stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write as _;
        let mut child = Command::new("kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())
            .expect("writing to kubectl");
        child.wait_with_output().expect("waiting for kubectl")
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&a)).expect("kubectl printed JSON")
    }

    /// `weftctl args` with this cluster's KUBECONFIG.
    pub fn weftctl(&self, args: &[&str]) -> Output {
        Command::new(crate::bin("weftctl"))
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .output()
            .expect("running weftctl")
    }

    /// Runs `cmd` inside node `i`'s mount namespace (its CNI files, its bpffs).
    pub fn on_node(&self, i: usize, cmd: &[&str]) -> Output {
        let pid = std::fs::read_to_string(dir().join("run").join(format!("node{i}-holder.pid")))
            .expect("the node's holder pid file");
        Command::new("nsenter")
            .args(["-t", pid.trim(), "-m", "--"])
            .args(cmd)
            .output()
            .expect("running nsenter")
    }

    /// Node `i`'s directory on the host (`node{i}/cni-conf` is its /etc/cni/net.d).
    pub fn node_dir(&self, i: usize) -> PathBuf {
        dir().join(format!("node{i}"))
    }

    /// Pods matching `selector` in `ns`.
    pub fn pods(&self, ns: &str, selector: &str) -> Vec<Value> {
        self.json(&["-n", ns, "get", "pods", "-l", selector])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until every pod of `selector` in `ns` is Running and ready (at least `count`).
    pub fn wait_ready(&self, ns: &str, selector: &str, count: usize, timeout: Duration) -> Vec<Value> {
        crate::wait_for(&format!("{count} ready pods {selector} in {ns}"), timeout, || {
            let pods = self.pods(ns, selector);
            let ready = pods
                .iter()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .filter(|p| {
                    p["status"]["conditions"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
                })
                .cloned()
                .collect::<Vec<_>>();
            (ready.len() >= count).then_some(ready)
        })
    }
}

/// A pod's name, IP and node.
pub fn name(pod: &Value) -> String {
    pod["metadata"]["name"].as_str().unwrap_or_default().to_owned()
}

pub fn namespace(pod: &Value) -> String {
    pod["metadata"]["namespace"].as_str().unwrap_or_default().to_owned()
}

pub fn ip(pod: &Value) -> String {
    pod["status"]["podIP"].as_str().unwrap_or_default().to_owned()
}

pub fn node(pod: &Value) -> String {
    pod["spec"]["nodeName"].as_str().unwrap_or_default().to_owned()
}
