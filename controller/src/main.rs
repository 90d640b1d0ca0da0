//! `weft-controller`: placeholder until its issue lands (see docs/architecture.md, "Not built yet").
use std::process::ExitCode;

use clap::Parser as _;

/// Weft's controller.
#[derive(clap::Parser)]
#[command(name = "weft-controller", version)]
struct Args {}

fn main() -> ExitCode {
    let _ = Args::parse();
    eprintln!("weft-controller: not built yet; see docs/architecture.md");
    ExitCode::from(2)
}
