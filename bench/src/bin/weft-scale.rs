//! `weft-scale`: the control-plane scale harness (see `weft_bench::scale`). `cargo xtask scale` runs
//! it against the release build; `--check` (CI's short form) fails unless every agent got every
//! change, no stream dropped and no TLS handshake timed out, and asserts no timing.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use weft_bench::scale::{self, Shape};

/// Thousands of simulated agents decode their pushes in this one process, where glibc's malloc took
/// half its CPU (mostly consolidating and unlinking freed chunks): the harness's own cost, which
/// each real agent pays once on a node of its own. The agent's state is measured with the system
/// allocator, as the agent runs (`weft-agent-state`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Weft's control-plane scale harness: the controller and N simulated node agents")]
struct Args {
    /// Simulated nodes, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,3000")]
    nodes: Vec<usize>,
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    #[arg(long, default_value_t = 100)]
    services: usize,
    #[arg(long, default_value_t = 100)]
    policies: usize,
    /// Where weft-controller is (the release build).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Where scale.json, scale.md and each run's controller log go.
    #[arg(long, default_value = "target/scale")]
    out: PathBuf,
    /// Fail unless every agent got every change, no stream dropped, no TLS handshake timed out and
    /// nothing but the controller's admission ended a connection before the agent's first push.
    #[arg(long)]
    check: bool,
    /// The controller's source: its local store, or a real API server (etcd and kube-apiserver
    /// 1.20 on loopback, started for each run) holding the cluster as objects.
    #[arg(long, value_enum, default_value_t = Source::Local)]
    source: Source,
    /// The controller's --concurrent-resyncs (its default unless given): how many large resyncs it
    /// sends at a time while the others wait their turn.
    #[arg(long)]
    concurrent_resyncs: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    Local,
    Kubernetes,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.namespaces > 0 && args.services > 0 && args.pods > 0 && !args.nodes.contains(&0),
        "--nodes, --pods, --namespaces and --services must be at least 1"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut reports = Vec::new();
    for nodes in &args.nodes {
        let shape = Shape {
            nodes: *nodes,
            pods: args.pods,
            namespaces: args.namespaces,
            services: args.services,
            policies: args.policies,
            concurrent_resyncs: args.concurrent_resyncs,
        };
        eprintln!(
            "scale: N = {nodes} ({} pods, {} services, {} policies)",
            shape.pods, shape.services, shape.policies
        );
        let dir = args.out.join(format!("n{nodes}"));
        let report = match args.source {
            Source::Local => runtime.block_on(scale::run(shape, &args.bin_dir, &dir)),
            Source::Kubernetes => {
                // Started on this thread, which outlives it: its processes die with the thread
                // that started them.
                let server = weft_test_apiserver::ApiServer::start("scale", &[], &[])
                    .context("the Kubernetes binaries are missing (cargo xtask kube up installs and builds them)")?;
                runtime.block_on(scale::kubernetes::run(shape, &args.bin_dir, &dir, &server))
            }
        }
        .with_context(|| {
            format!(
                "the run with N = {nodes} (controller log: {})",
                dir.join("controller.log").display()
            )
        })?;
        reports.push(report);
    }
    let table = scale::table(&reports);
    println!("{table}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("scale.md"), &table)?;
    std::fs::write(args.out.join("scale.json"), serde_json::to_vec_pretty(&reports)?)?;
    if args.check {
        for r in &reports {
            r.complete()
                .map_err(|e| anyhow::anyhow!("N = {}: {e}", r.shape.nodes))?;
        }
        eprintln!(
            "scale: every agent got every change; no stream dropped; no handshake timed out; only admission ended first-sync connections"
        );
    }
    // The agents' tasks hold connections to a controller that is gone: do not wait for them.
    runtime.shutdown_background();
    Ok(())
}
