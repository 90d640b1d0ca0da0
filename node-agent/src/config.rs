//! The agent's configuration: parsed and validated before anything binds or attaches.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Command-line arguments of `weft-node`.
#[derive(Clone, Debug, Parser)]
#[command(name = "weft-node", version, about = "Weft's per-node zero-trust tunnel agent")]
pub struct Args {
    /// Name of the node this agent serves; only pods on this node are captured.
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node: String,
    /// Workload snapshot to follow (JSON, `WorkloadSnapshot`); written by the local dev cluster.
    #[arg(long)]
    pub workloads_file: PathBuf,
    /// Unix socket the CNI plugin reports pods on.
    #[arg(long, default_value = "/run/weft/cni.sock")]
    pub cni_socket: PathBuf,
    /// Where the agent keeps what it must know across restarts (pod networks).
    #[arg(long, default_value = "/run/weft/node")]
    pub state_dir: PathBuf,
    /// bpffs directory for this agent's pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/weft")]
    pub bpf_pin_dir: PathBuf,
    /// cgroup v2 directory whose processes are subject to capture; the agent must run inside it.
    #[arg(long)]
    pub cgroup: PathBuf,
    #[arg(long, value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: String,
    pub workloads_file: PathBuf,
    pub cni_socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpf_pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub log_format: LogFormat,
}

impl Args {
    pub fn validate(self) -> Result<Config, String> {
        if self.node.is_empty() {
            return Err("--node must not be empty".into());
        }
        if !self.bpf_pin_dir.starts_with("/sys/fs/bpf") {
            return Err(format!(
                "--bpf-pin-dir {} is not under /sys/fs/bpf",
                self.bpf_pin_dir.display()
            ));
        }
        if !self.cgroup.is_dir() {
            return Err(format!("--cgroup {} is not a directory", self.cgroup.display()));
        }
        Ok(Config {
            node: self.node,
            workloads_file: self.workloads_file,
            cni_socket: self.cni_socket,
            state_dir: self.state_dir,
            bpf_pin_dir: self.bpf_pin_dir,
            cgroup: self.cgroup,
            log_format: self.log_format,
        })
    }
}
