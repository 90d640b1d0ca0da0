//! `weft-waypoint`: placeholder until its issue lands (see docs/architecture.md, "Not built yet").
use std::process::ExitCode;

use clap::Parser as _;

/// Weft's waypoint.
#[derive(clap::Parser)]
#[command(name = "weft-waypoint", version)]
struct Args {}

fn main() -> ExitCode {
    let _ = Args::parse();
    eprintln!("weft-waypoint: not built yet; see docs/architecture.md");
    ExitCode::from(2)
}
