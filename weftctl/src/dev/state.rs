//! The dev cluster's persistent state and the names derived from a cluster name.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use weft_model::{Namespace, Pod, WorkloadSnapshot};

/// State directory of all dev clusters.
pub const RUN_DIR: &str = "/run/weft/dev";
/// Agent logs are kept after `down`, for post-mortems.
pub const LOG_DIR: &str = "/var/log/weft/dev";
/// bpffs directory of all dev clusters.
pub const BPF_DIR: &str = "/sys/fs/bpf/weft";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    pub mesh: bool,
    /// Set once `up` finished; a cluster without it is a leftover of a crashed `up`.
    pub complete: bool,
    /// The controller's pid, when the mesh is on.
    #[serde(default)]
    pub controller_pid: Option<u32>,
    /// Workload certificate lifetime the controller issues (humantime, e.g. `24h`).
    #[serde(default = "default_cert_lifetime")]
    pub cert_lifetime: String,
    pub nodes: Vec<Node>,
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<PodRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<String>,
    pub cgroup: PathBuf,
    pub bpf_pin_dir: PathBuf,
    pub agent_log: PathBuf,
    pub agent_pid: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodRecord {
    #[serde(flatten)]
    pub pod: Pod,
    pub netns_name: String,
    pub cgroup: PathBuf,
}

/// Names derived from the cluster name: every object `up` creates is found again by these.
fn default_cert_lifetime() -> String {
    "24h".into()
}

pub struct Names<'a>(pub &'a str);

impl Names<'_> {
    /// Prefix of every network namespace of the cluster. Cluster names contain no '.', so the prefix
    /// of one cluster is never the prefix of another.
    pub fn netns_prefix(&self) -> String {
        format!("weft.{}.", self.0)
    }
    pub fn netns(&self, entity: &str) -> String {
        format!("{}{entity}", self.netns_prefix())
    }
    pub fn run_dir(&self) -> PathBuf {
        Path::new(RUN_DIR).join(self.0)
    }
    pub fn state_file(&self) -> PathBuf {
        self.run_dir().join("cluster.json")
    }
    /// The controller's state (its CA root and store).
    pub fn controller_state_dir(&self) -> PathBuf {
        self.run_dir().join("controller")
    }
    /// The controller's admin socket (the store API that `weftctl apply` uses).
    pub fn controller_socket(&self) -> PathBuf {
        self.run_dir().join("controller.sock")
    }
    /// Every node's credential, for the controller.
    pub fn node_tokens_file(&self) -> PathBuf {
        self.run_dir().join("node-tokens.json")
    }
    /// One node's credential, for its agent.
    pub fn node_token_file(&self, node: &str) -> PathBuf {
        self.run_dir().join(format!("{node}-token"))
    }
    /// Where a node's agent takes CNI reports.
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.run_dir().join(format!("{node}-cni.sock"))
    }
    pub fn agent_state_dir(&self, node: &str) -> PathBuf {
        self.run_dir().join(format!("{node}-agent"))
    }
    pub fn log_dir(&self) -> PathBuf {
        Path::new(LOG_DIR).join(self.0)
    }
    pub fn bpf_dir(&self) -> PathBuf {
        Path::new(BPF_DIR).join(self.0)
    }
    pub fn cgroup(&self, cgroup_root: &Path) -> PathBuf {
        cgroup_root.join(format!("weft.{}", self.0))
    }
}

/// Cluster names: 1-20 lowercase alphanumerics or '-', starting and ending alphanumeric.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = weft_model::is_dns_label(name) && name.len() <= 20;
    anyhow::ensure!(
        ok,
        "invalid cluster name {name:?}: use 1-20 lowercase letters, digits or '-', starting and ending with a letter or digit"
    );
    Ok(())
}

impl Cluster {
    pub fn load(name: &str) -> anyhow::Result<Self> {
        let path = Names(name).state_file();
        let bytes = fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!("no dev cluster named {name:?}; create it with `weftctl dev up --name {name}`")
            } else {
                anyhow::anyhow!("reading {}: {e}", path.display())
            }
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes the cluster state and the workload snapshot the agents follow, each atomically.
    pub fn save(&self) -> anyhow::Result<()> {
        let names = Names(&self.name);
        fs::create_dir_all(names.run_dir())?;
        write_atomic(&names.state_file(), &serde_json::to_vec_pretty(self)?)
    }

    pub fn snapshot(&self) -> WorkloadSnapshot {
        WorkloadSnapshot {
            namespaces: self.namespaces.clone(),
            pods: self.pods.iter().map(|p| p.pod.clone()).collect(),
        }
    }

    /// Finds a pod by `name` or `namespace/name`.
    pub fn pod(&self, query: &str) -> anyhow::Result<&PodRecord> {
        let found: Vec<_> = self
            .pods
            .iter()
            .filter(|p| p.pod.name == query || p.pod.qualified_name() == query)
            .collect();
        match found.as_slice() {
            [one] => Ok(one),
            [] => {
                let known: Vec<_> = self.pods.iter().map(|p| p.pod.qualified_name()).collect();
                anyhow::bail!(
                    "no pod {query:?} in cluster {:?}; pods: {}",
                    self.name,
                    known.join(", ")
                )
            }
            _ => anyhow::bail!("pod name {query:?} is ambiguous; use namespace/name"),
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    weft_api::durable::write(path, bytes, 0o644).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_cannot_collide_by_prefix() {
        assert!(validate_name("a").is_ok());
        assert!(validate_name("e2e-restart-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", "aaaaaaaaaaaaaaaaaaaaa"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(!Names("a").netns("node1").starts_with(&Names("a-b").netns_prefix()));
        assert!(!Names("a-b").netns("node1").starts_with(&Names("a").netns_prefix()));
    }
}
