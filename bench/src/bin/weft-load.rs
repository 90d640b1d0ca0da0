//! `weft-load`: Weft's benchmark load generator (dev-only), run inside dev-cluster pods as a real client
//! and a real server, so the same tool measures a direct path and a path through the proxy under test. It
//! shares its CPU cores with that proxy, so it is lean: a current-thread runtime unless `--threads N`
//! asks for N workers. Every subcommand first raises the soft RLIMIT_NOFILE to the hard limit.
//!
//! - `serve --listen ADDR [--listen ADDR ...] [--body-bytes N] [--threads N]`: a minimal HTTP/1.1 server on
//!   every address (IPv6 listeners are v6-only, so `0.0.0.0:P` and `[::]:P` both bind). Each request
//!   (headers only, pipelining allowed) gets `200 OK` with an N-byte body (default 64); keep-alive until
//!   the peer closes, or `Connection: close` when the request asked for it. Prints `listening on ADDR` on
//!   stderr per listener; runs until killed.
//! - `http --target IP:PORT --concurrency C --duration SECS [--warmup SECS] [--close] [--max-requests N]
//!   [--threads N]`: C workers each issue `GET /` one after another, on one kept-alive connection, or
//!   (`--close`) on a new connection per request (its latency includes the connect; the server closes
//!   first, so TIME_WAIT stays on the server side and the client does not run out of ephemeral ports).
//!   Requests finished in the warmup (default 0.5 s) are not counted; then the measured period runs for
//!   SECS or N requests. A request has 5 s; a failure counts as an error and the worker reconnects; more
//!   than 1000 errors stop the run. Prints one JSON object: `{"mode","concurrency","requests","errors",
//!   "seconds","rps","latency_us":{"p50","p90","p99","max","mean"}}` (exact nearest-rank percentiles).
//!   Exits non-zero when no request succeeded or errors stopped the run.
//! - `idle --target IP:PORT --connections N [--hold SECS] [--connect-concurrency K]`: opens N connections
//!   (K attempts in flight, default 256), proves each with one keep-alive request, and holds them idle.
//!   Prints `{"event":"ready","connections":N,"seconds":S}` once all are open, then holds them until
//!   stdin reaches EOF or SECS (default 600) pass, closes them and prints
//!   `{"event":"closed","connections":N}`. Exits non-zero if any connection fails (5 s each).
use clap::Parser;
use weft_bench::{http::HttpArgs, idle::IdleArgs, server::ServeArgs};

#[derive(Parser)]
#[command(name = "weft-load", about = "Weft's benchmark load generator (dev-only)")]
enum Cli {
    /// A minimal HTTP/1.1 server.
    Serve(ServeArgs),
    /// HTTP load: throughput and latency percentiles as JSON.
    Http(HttpArgs),
    /// Hold many idle connections open.
    Idle(IdleArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Best effort: without it, only the connection counts below the soft limit work.
    let _ = weft_dataplane::socket::raise_open_file_limit();
    match cli {
        Cli::Serve(args) => weft_bench::server::main(&args),
        Cli::Http(args) => weft_bench::http::main(&args),
        Cli::Idle(args) => weft_bench::idle::main(&args),
    }
}
