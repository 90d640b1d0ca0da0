//! `weftctl`: Weft's command-line tool. Today: the local dev cluster (`weftctl dev ...`).
use std::process::ExitCode;

use clap::Parser as _;

mod dev;

#[derive(clap::Parser)]
#[command(name = "weftctl", version, about = "Weft's command-line tool")]
enum Cli {
    /// The local dev cluster: nodes and pods built from network namespaces, with real capture.
    #[command(subcommand)]
    Dev(dev::Command),
}

fn main() -> ExitCode {
    let result = match Cli::parse() {
        Cli::Dev(cmd) => dev::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weftctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
