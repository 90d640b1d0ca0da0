//! `weftctl`: Weft's command-line tool: the local dev cluster (`weftctl dev ...`) and the
//! controller's local store (`weftctl apply | delete | get`).
use std::process::ExitCode;

use clap::Parser as _;

mod dev;
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
}

fn main() -> ExitCode {
    let result = match Cli::parse() {
        Cli::Dev(cmd) => dev::run(cmd),
        Cli::Apply(args) => store::run_apply(args),
        Cli::Delete(args) => store::run_delete(args),
        Cli::Get(args) => store::run_get(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weftctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
