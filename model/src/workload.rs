//! Namespaces and pods, as the node agent needs to know them.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// A Kubernetes namespace: its name and annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A pod, with what the data plane needs: where it runs, who it is, its addresses and its network
/// namespace (reported by the CNI plugin on the pod's node).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Pod addresses, one per family (dual stack).
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace on its node (`/proc/<pid>/ns/net` or a bind mount).
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

fn default_service_account() -> String {
    "default".to_owned()
}

impl Pod {
    /// `namespace/name`, the form used in logs and on the command line.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Everything a node agent is told about workloads: one consistent snapshot. Sources (the dev
/// cluster's store today, the controller next) publish whole snapshots; the agent reconciles to them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSnapshot {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub pods: Vec<Pod>,
}

impl WorkloadSnapshot {
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.name == name)
    }

    /// Pods scheduled on `node`.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }
}
