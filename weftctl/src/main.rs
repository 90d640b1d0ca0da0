//! `weftctl`: Weft's command-line tool: the local dev cluster (`weftctl dev ...`), the
//! controller's local store (`weftctl apply | delete | get`), installing on Kubernetes, and a node's
//! agent (`weftctl node ...`).
use std::process::ExitCode;

use clap::Parser as _;

mod dev;
mod install;
mod node;
mod store;

#[derive(clap::Parser)]
#[command(name = "weftctl", version, about = "Weft's command-line tool")]
enum Cli {
    /// The local dev cluster: nodes and pods built from network namespaces, with real capture.
    #[command(subcommand)]
    Dev(dev::Command),
    /// Apply Kubernetes-style YAML to the controller's local store (all or nothing).
    Apply(store::ApplyArgs),
    /// Delete the objects a YAML file names from the controller's local store (all or nothing).
    Delete(store::DeleteArgs),
    /// Show the controller's local store as YAML.
    Get(store::GetArgs),
    /// Install Weft on the Kubernetes cluster of KUBECONFIG (or print its manifests: --dry-run).
    Install(install::InstallArgs),
    /// Remove Weft from the Kubernetes cluster: agents first (each releases its node), then the rest.
    Uninstall(install::UninstallArgs),
    /// Whether this node's kernel has what Weft needs (BPF program and map types, BTF, cgroup v2, bpffs).
    Check,
    /// What a node's agent holds and does: workloads, services, policies, certificates, its pods,
    /// its config dump, its log level (from its admin API, or a saved dump).
    #[command(subcommand)]
    Node(node::Command),
}

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`weftctl dev status -o json | head`) ends this
    // process quietly, as it does `ls` or `cat`; Rust's default (SIGPIPE ignored) made every print a
    // panic there.
    // SAFETY: called first in main, before any thread exists; SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let result = match Cli::parse() {
        Cli::Dev(cmd) => dev::run(cmd),
        Cli::Apply(args) => store::run_apply(args),
        Cli::Delete(args) => store::run_delete(args),
        Cli::Get(args) => store::run_get(args),
        Cli::Install(args) => install::run_install(args),
        Cli::Uninstall(args) => install::run_uninstall(args),
        Cli::Check => install::check::run(),
        Cli::Node(cmd) => node::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weftctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
