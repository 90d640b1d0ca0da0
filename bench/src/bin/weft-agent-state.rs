//! `weft-agent-state`: what a node agent's own state costs at a scale (see
//! `weft_bench::scale::agent_state`): the memory it holds, a full push's apply, a one-workload
//! delta's. With the system allocator, as the agent runs.

use clap::Parser;
use weft_bench::scale;

#[derive(Parser)]
#[command(about = "What a Weft node agent's state costs holding this many workloads and services")]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    workloads: usize,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// One-workload deltas applied, one at a time, for their latency.
    #[arg(long, default_value_t = 200)]
    deltas: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.workloads > 0 && args.services > 0 && args.deltas > 0,
        "--workloads, --services and --deltas must be at least 1"
    );
    let r = scale::agent_state(args.workloads, args.services, args.deltas)?;
    println!(
        "agent state: {} workloads, {} services: +{:.1} MiB RSS, full push applied in {:.2} s, a one-workload delta in {:.3} ms (p50), {:.3} ms (max of {})",
        r.workloads, r.services, r.state_mib, r.full_apply_s, r.delta_p50_ms, r.delta_max_ms, args.deltas
    );
    // Reported, not asserted: the bar (64 MiB for an agent holding this) includes the agent's own
    // code and runtime, which this process does not have.
    println!(
        "agent state: process RSS holding it {:.1} MiB ({:.1} MiB after malloc_trim, peak {:.1} MiB); bar for a whole agent: 64 MiB",
        r.process_mib, r.process_trimmed_mib, r.process_peak_mib
    );
    Ok(())
}
