//! `cargo xtask kube up|down|status`: a real local Kubernetes cluster.
//!
//! (being written)

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Build (once) and bring up etcd, the control plane and two nodes.
    Up,
    /// Tear everything down, restoring the host.
    Down,
    /// What runs, and how to reach it.
    Status,
}

pub fn run(_cmd: Cmd) -> anyhow::Result<()> {
    anyhow::bail!("cargo xtask kube: not built yet")
}
