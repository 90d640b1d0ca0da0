//! `weft-node`: Weft's per-node agent. Parses its configuration and hands over to [`weft_node::app`].
use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let config = weft_node::config::Args::parse();
    let config = match config.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weft-node: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let log = weft_node::telemetry::init(config.log_format);
    match weft_node::app::run(config, log) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "weft-node stopped");
            eprintln!("weft-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
