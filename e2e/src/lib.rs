//! Harness for Weft's end-to-end tests: each test brings up its own dev cluster (real network
//! namespaces, real eBPF, real agents) under a name of its own, and a guard tears it down even when
//! the test fails.
//!
//! These tests need root. Outside CI they are skipped with a message when not root; with `CI=true`
//! they fail instead, so CI can never pass without running them.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod kube;
pub mod wire;

/// Directory holding the built binaries (`weftctl`, `weft-node`, `weft-probe`).
pub fn bin_dir() -> PathBuf {
    std::env::var_os("WEFT_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("debug")
    })
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Whether this process may run privileged tests. Panics under `CI=true` when it may not.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root (network namespaces, cgroups, eBPF); under CI=true it must run, not skip");
    }
    eprintln!("skipping {test}: needs root");
    false
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A dev cluster owned by one test.
pub struct Cluster {
    pub name: String,
}

impl Cluster {
    /// `weftctl dev up --name NAME ARGS...`, after removing any leftover of an earlier run.
    pub fn up(name: &str, args: &[&str]) -> Self {
        let _ = weftctl(&["dev", "down", "--name", name]);
        let out = weftctl(&[&["dev", "up", "--name", name], args].concat());
        assert!(out.status.success(), "weftctl dev up {name} failed:\n{}", text(&out));
        Self { name: name.to_owned() }
    }

    pub fn status(&self) -> Value {
        let out = weftctl(&["dev", "status", "--name", &self.name, "-o", "json"]);
        assert!(out.status.success(), "status: {}", text(&out));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Runs a command in a pod and waits for it.
    pub fn exec(&self, pod: &str, cmd: &[&str]) -> Output {
        weftctl(&[&["dev", "exec", "--name", &self.name, pod, "--"], cmd].concat())
    }

    /// Starts a long-running command in a pod; it is killed when the guard drops.
    pub fn spawn(&self, pod: &str, cmd: &[&str]) -> Background {
        let child = Command::new(bin("weftctl"))
            .args([&["dev", "exec", "--name", &self.name, pod, "--"], cmd].concat())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning weftctl dev exec");
        Background { child }
    }

    /// Starts `weft-probe serve` in a pod and waits until it listens.
    pub fn serve(&self, pod: &str, ports: &str) -> Background {
        self.probe(pod, &["serve", "--ports", ports])
    }

    /// Starts `weft-probe echo` in a pod and waits until it listens.
    pub fn echo(&self, pod: &str, port: u16) -> Background {
        self.probe(pod, &["echo", "--port", &port.to_string()])
    }

    /// Starts a `weft-probe` server in a pod and waits for its `ready` line.
    fn probe(&self, pod: &str, args: &[&str]) -> Background {
        let probe = bin("weft-probe");
        let mut bg = self.spawn(pod, &[&[probe.to_str().expect("utf-8 path")], args].concat());
        let stdout = bg.child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("reading probe");
        assert!(
            line.starts_with("ready"),
            "weft-probe {} in {pod} did not start: {line:?}",
            args[0]
        );
        bg
    }

    pub fn pod_ip(&self, pod: &str, v6: bool) -> String {
        let status = self.status();
        let p = status["pods"]
            .as_array()
            .expect("pods")
            .iter()
            .find(|p| p["name"] == pod)
            .expect("pod");
        p["ips"]
            .as_array()
            .expect("ips")
            .iter()
            .filter_map(Value::as_str)
            .find(|ip| ip.contains(':') == v6)
            .expect("pod address")
            .to_owned()
    }

    pub fn node(&self, node: &str) -> Value {
        self.status()["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["name"] == node)
            .expect("node")
            .clone()
    }

    /// Access records (one per connection) written by a node's agent so far.
    pub fn access_records(&self, node: &str) -> Vec<Value> {
        self.agent_log(node)
            .into_iter()
            .filter(|v| v["target"] == "weft::access")
            .collect()
    }

    /// Kills a node's agent the hard way (SIGKILL) and waits until it is gone.
    pub fn kill_agent(&self, node: &str) {
        let pid = self.node(node)["agent"]["pid"].as_i64().expect("agent pid") as i32;
        // SAFETY: signalling the agent process this test's cluster started.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGKILL) },
            0,
            "killing the agent on {node}"
        );
        wait_for("the agent to exit", Duration::from_secs(5), || {
            (!self.node(node)["agent"]["running"].as_bool().unwrap_or(true)).then_some(())
        });
    }

    /// `weftctl apply -f -` against the cluster's store; returns the command's output.
    pub fn apply(&self, yaml: &str) -> Output {
        weftctl_stdin(&["apply", "--cluster", &self.name, "-f", "-"], yaml)
    }

    /// `weftctl delete -f -` against the cluster's store.
    pub fn delete(&self, yaml: &str) -> Output {
        weftctl_stdin(&["delete", "--cluster", &self.name, "-f", "-"], yaml)
    }

    /// Stops the controller (SIGKILL) and waits until it is gone.
    pub fn kill_controller(&self) {
        let pid = self.status()["controller"]["pid"].as_i64().expect("controller pid") as i32;
        // SAFETY: signalling the controller this test's cluster started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "killing the controller");
        wait_for("the controller to exit", Duration::from_secs(5), || {
            (!self.status()["controller"]["running"].as_bool().unwrap_or(true)).then_some(())
        });
    }

    pub fn start_controller(&self) {
        let out = weftctl(&["dev", "start-controller", "--name", &self.name]);
        assert!(out.status.success(), "start-controller: {}", text(&out));
    }

    /// An agent's log lines, parsed.
    pub fn agent_log(&self, node: &str) -> Vec<Value> {
        json_lines(self.node(node)["agent"]["log"].as_str().expect("log path"))
    }

    pub fn annotate(&self, kind: &str, target: &str, change: &str) {
        let out = weftctl(&["dev", "annotate", "--name", &self.name, kind, target, change]);
        assert!(out.status.success(), "annotate: {}", text(&out));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let out = weftctl(&["dev", "down", "--name", &self.name]);
        if !out.status.success() && !std::thread::panicking() {
            panic!("weftctl dev down {} failed: {}", self.name, text(&out));
        }
    }
}

/// A process running in a pod, killed on drop.
pub struct Background {
    pub child: Child,
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn weftctl(args: &[&str]) -> Output {
    Command::new(bin("weftctl"))
        .args(args)
        .output()
        .expect("running weftctl")
}

/// The JSON lines of a log file (none if it does not exist yet).
fn json_lines(path: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// `weftctl ARGS` with `input` on stdin.
pub fn weftctl_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(bin("weftctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running weftctl");
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, input.as_bytes()).expect("writing weftctl's stdin");
    }
    child.wait_with_output().expect("waiting for weftctl")
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `curl` in a pod: (exit code, body, remote address curl reports).
pub fn curl(cluster: &Cluster, pod: &str, url: &str) -> (i32, String, String) {
    let out = cluster.exec(pod, &["curl", "-sS", "-m", "5", "-w", "\n%{remote_ip}", url]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, remote) = stdout.rsplit_once('\n').unwrap_or((&stdout, ""));
    (out.status.code().unwrap_or(-1), body.to_owned(), remote.to_owned())
}

/// Whether a new connection from `pod` to a `weft-probe serve` at `url` is captured on the client
/// side, decided without waiting for logs. The probe answers with the source port it saw; the client
/// agent reconnects from a socket of its own, so that port differs from curl's own local port exactly
/// when the connection was captured. The server pod must not be enrolled (its agent would reconnect too).
pub fn captured(cluster: &Cluster, pod: &str, url: &str) -> bool {
    let out = cluster.exec(pod, &["curl", "-sS", "-m", "5", "-w", "\n%{local_port}", url]);
    assert!(out.status.success(), "curl from {pod}: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, local_port) = stdout.rsplit_once('\n').expect("curl output ends with the local port");
    let peer = body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .expect("probe answer names the peer");
    let seen_port = peer.rsplit_once(':').map(|(_, p)| p).expect("peer has a port");
    seen_port != local_port.trim()
}
