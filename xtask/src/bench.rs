//! `cargo xtask bench`: what the mesh costs, measured side by side with a direct connection.
//!
//! One dev cluster, two nodes, two pods per node. Namespace `mesh` is enrolled, namespace `direct`
//! is not: app-1-1 -> app-2-1 crosses the mesh (captured, HBONE, mutual TLS), app-1-2 -> app-2-2 is
//! the same path without it. Every scenario runs both ways in the same invocation, interleaved rep
//! by rep (the order alternates, so drift hits both sides alike), with the load generator inside
//! the client pod like a real client. The agents are measured from /proc: CPU time (utime + stime)
//! and peak RSS (VmHWM, reset before each run through /proc/PID/clear_refs).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use crate::{Background, output, run, step};

mod report;

use report::Report;

const CLUSTER: &str = "bench";
const HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;

/// How long and how often.
struct Plan {
    reps: usize,
    seconds: u32,
    idle_connections: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                reps: 1,
                seconds: 1,
                idle_connections: 500,
            }
        } else {
            Plan {
                reps: 5,
                seconds: 6,
                idle_connections: 10_000,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Direct,
    Mesh,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Direct => "direct",
            Side::Mesh => "mesh",
        }
    }

    fn client(self) -> &'static str {
        match self {
            Side::Direct => "app-1-2",
            Side::Mesh => "app-1-1",
        }
    }

    fn server(self) -> &'static str {
        match self {
            Side::Direct => "app-2-2",
            Side::Mesh => "app-2-1",
        }
    }
}

/// What a scenario runs in the client pod.
#[derive(Clone, Copy)]
enum Load {
    /// iperf3 with this many parallel streams.
    Bulk(u32),
    /// weft-load http: keep-alive (false) or a new connection per request (true), at a concurrency.
    Http { close: bool, concurrency: u32 },
}

struct Scenario {
    key: &'static str,
    title: &'static str,
    load: Load,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        key: "bulk_1",
        title: "bulk, 1 stream",
        load: Load::Bulk(1),
    },
    Scenario {
        key: "bulk_4",
        title: "bulk, 4 streams",
        load: Load::Bulk(4),
    },
    Scenario {
        key: "keepalive_c1",
        title: "HTTP keep-alive, c1",
        load: Load::Http {
            close: false,
            concurrency: 1,
        },
    },
    Scenario {
        key: "keepalive_c16",
        title: "HTTP keep-alive, c16",
        load: Load::Http {
            close: false,
            concurrency: 16,
        },
    },
    Scenario {
        key: "close_c1",
        title: "connection per request, c1",
        load: Load::Http {
            close: true,
            concurrency: 1,
        },
    },
    Scenario {
        key: "close_c16",
        title: "connection per request, c16",
        load: Load::Http {
            close: true,
            concurrency: 16,
        },
    },
];

/// One run of one scenario on one side.
#[derive(Clone, Default)]
struct Sample {
    /// The scenario's own numbers: `gbps` and `bytes` (bulk); `rps`, `requests`, `p50_us`, `p90_us`,
    /// `p99_us` (HTTP).
    metrics: BTreeMap<&'static str, f64>,
    /// Both agents' CPU seconds during the run.
    agent_cpu_s: f64,
    /// Each agent's peak RSS during the run, KiB (node1, node2).
    agent_peak_kib: [u64; 2],
}

pub fn bench(bin: &Path, quick: bool, out: &Path) -> anyhow::Result<()> {
    ensure!(
        crate::is_root(),
        "the bench builds network namespaces and loads eBPF: run it as root"
    );
    let plan = Plan::new(quick);
    let weftctl = bin.join("weftctl");
    let load = bin.join("weft-load");
    let started = Instant::now();

    step(&format!(
        "bringing up the bench cluster `{CLUSTER}`: namespace `mesh` enrolled, `direct` not (release build)"
    ));
    let _ = Command::new(&weftctl).args(["dev", "down", "--name", CLUSTER]).output();
    run(Command::new(&weftctl).args([
        "dev",
        "up",
        "--name",
        CLUSTER,
        "--nodes",
        "2",
        "--pods-per-node",
        "2",
        "--namespaces",
        "mesh,direct",
        "--ambient",
        "mesh",
    ]))?;
    let cluster = Cluster {
        weftctl: weftctl.clone(),
    };
    let status: Value = serde_json::from_str(&output(
        Command::new(&weftctl).args(["dev", "status", "--name", CLUSTER, "-o", "json"]),
    )?)?;
    let agents = ["node1", "node2"].map(|node| {
        status["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == node))
            .and_then(|n| n["agent"]["pid"].as_u64())
            .map(|pid| Agent { pid: pid as u32 })
            .with_context(|| format!("no agent running on {node}"))
    });
    let [Ok(agent1), Ok(agent2)] = agents else {
        bail!("the bench cluster came up without both agents");
    };
    let agents = [agent1, agent2];
    let ip = |pod: &str| -> anyhow::Result<String> {
        status["pods"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == pod))
            .and_then(|p| p["ips"].as_array())
            .and_then(|ips| ips.iter().filter_map(|i| i.as_str()).find(|i| !i.contains(':')))
            .map(str::to_owned)
            .with_context(|| format!("no IPv4 address for {pod}"))
    };

    step("starting the servers in app-2-1 (mesh) and app-2-2 (direct): weft-load serve and iperf3 -s");
    let mut servers = Vec::new();
    for side in [Side::Direct, Side::Mesh] {
        servers.push(cluster.spawn(
            side.server(),
            &[
                load.to_str().context("weft-load path")?,
                "serve",
                "--listen",
                &format!("0.0.0.0:{HTTP_PORT}"),
            ],
        )?);
        servers.push(cluster.spawn(side.server(), &["iperf3", "-s", "-p", &IPERF_PORT.to_string()])?);
    }
    let target = |side: Side| -> anyhow::Result<String> { Ok(format!("{}:{HTTP_PORT}", ip(side.server())?)) };
    for side in [Side::Direct, Side::Mesh] {
        // The servers are up, and the mesh side has its certificates and a pooled tunnel.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = cluster.exec_output(
                side.client(),
                &[
                    load.to_str().context("weft-load path")?,
                    "http",
                    "--target",
                    &target(side)?,
                    "--concurrency",
                    "1",
                    "--duration",
                    "0.2",
                    "--warmup",
                    "0",
                ],
            );
            if out.is_ok() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the {} server in {} did not answer within 15 s",
                side.name(),
                side.server()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let idle_kib = both(&agents, Agent::rss_kib)?;

    let mut results: Vec<(&Scenario, Vec<[Sample; 2]>)> = Vec::new();
    for scenario in SCENARIOS {
        step(&format!(
            "{} ({} x direct and mesh, interleaved)",
            scenario.title, plan.reps
        ));
        let mut pairs = Vec::new();
        for rep in 0..plan.reps {
            let order = if rep % 2 == 0 {
                [Side::Direct, Side::Mesh]
            } else {
                [Side::Mesh, Side::Direct]
            };
            let mut pair: [Sample; 2] = Default::default();
            for side in order {
                let server_ip = ip(side.server())?;
                settle(&agents, idle_kib)?;
                let sample = measure(&agents, || match scenario.load {
                    Load::Bulk(streams) => cluster.iperf(side.client(), &server_ip, streams, plan.seconds),
                    Load::Http { close, concurrency } => {
                        cluster.http(&load, side.client(), &target(side)?, close, concurrency, plan.seconds)
                    }
                })?;
                println!("    rep {} {:<6} {}", rep + 1, side.name(), brief(&sample));
                pair[usize::from(side == Side::Mesh)] = sample;
            }
            pairs.push(pair);
        }
        results.push((scenario, pairs));
    }

    step(&format!(
        "{} mostly idle connections, direct then through the mesh (one agent per node holds them)",
        plan.idle_connections
    ));
    let mut idle = BTreeMap::new();
    for side in [Side::Direct, Side::Mesh] {
        let before = both(&agents, Agent::rss_kib)?;
        let (seconds, held) = cluster.idle(&load, side.client(), &target(side)?, plan.idle_connections, &agents)?;
        let per_conn = [0, 1].map(|i| (held[i] as f64 - before[i] as f64) * 1024.0 / plan.idle_connections as f64);
        println!(
            "    {:<6} established in {seconds:.2} s; agent RSS node1 {} -> {} KiB, node2 {} -> {} KiB ({:.0} / {:.0} bytes per connection)",
            side.name(),
            before[0],
            held[0],
            before[1],
            held[1],
            per_conn[0],
            per_conn[1]
        );
        idle.insert(
            side.name(),
            json!({
                "connections": plan.idle_connections,
                "establish_seconds": seconds,
                "agent_rss_before_kib": before,
                "agent_rss_held_kib": held,
                "agent_bytes_per_connection": per_conn,
            }),
        );
    }
    drop(servers);
    drop(cluster);

    let report = Report::new(quick, &plan, idle_kib, &results, idle)?;
    let markdown = report.markdown();
    println!();
    println!("{markdown}");
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json_path = out.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report.json)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = out.join("bench.md");
    std::fs::write(&md_path, &markdown).with_context(|| format!("writing {}", md_path.display()))?;
    step(&format!(
        "bench finished in {:.0} s; results in {} and {}",
        started.elapsed().as_secs_f64(),
        json_path.display(),
        md_path.display()
    ));
    Ok(())
}

/// Waits (at most 8 s) until both agents are back near their idle RSS, so that each load's peak is
/// its own and not what the previous load left for the allocator to return.
fn settle(agents: &[Agent; 2], idle_kib: [u64; 2]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let now = both(agents, Agent::rss_kib)?;
        if (0..2).all(|i| now[i] <= idle_kib[i] + 2048) || Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `load`, measuring the agents around it.
fn measure(
    agents: &[Agent; 2],
    load: impl FnOnce() -> anyhow::Result<BTreeMap<&'static str, f64>>,
) -> anyhow::Result<Sample> {
    both(agents, Agent::reset_peak)?;
    let cpu_before = both(agents, Agent::cpu_seconds)?;
    let metrics = load()?;
    let cpu_after = both(agents, Agent::cpu_seconds)?;
    Ok(Sample {
        metrics,
        agent_cpu_s: (cpu_after[0] - cpu_before[0]) + (cpu_after[1] - cpu_before[1]),
        agent_peak_kib: both(agents, Agent::peak_kib)?,
    })
}

fn brief(s: &Sample) -> String {
    let m = |k: &str| s.metrics.get(k).copied().unwrap_or(f64::NAN);
    let load = if s.metrics.contains_key("gbps") {
        format!("{:>7.2} Gbit/s", m("gbps"))
    } else {
        format!(
            "{:>8.0} req/s  p50 {:>7.1} us  p90 {:>7.1} us  p99 {:>7.1} us",
            m("rps"),
            m("p50_us"),
            m("p90_us"),
            m("p99_us")
        )
    };
    format!(
        "{load}  agents {:.2} CPU s, peak RSS {} / {} KiB",
        s.agent_cpu_s, s.agent_peak_kib[0], s.agent_peak_kib[1]
    )
}

/// The bench cluster; removed however the bench ends.
struct Cluster {
    weftctl: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.weftctl)
            .args(["dev", "down", "--name", CLUSTER])
            .status();
    }
}

impl Cluster {
    fn exec(&self, pod: &str, cmd: &[&str]) -> Command {
        let mut c = Command::new(&self.weftctl);
        c.args(["dev", "exec", "--name", CLUSTER, pod, "--"]).args(cmd);
        c
    }

    fn exec_output(&self, pod: &str, cmd: &[&str]) -> anyhow::Result<String> {
        output(self.exec(pod, cmd).stdin(Stdio::null()))
    }

    fn spawn(&self, pod: &str, cmd: &[&str]) -> anyhow::Result<Background> {
        let child = self
            .exec(pod, cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} in {pod}", cmd.join(" ")))?;
        Ok(Background(child))
    }

    fn iperf(
        &self,
        pod: &str,
        server: &str,
        streams: u32,
        seconds: u32,
    ) -> anyhow::Result<BTreeMap<&'static str, f64>> {
        let out = self.exec_output(
            pod,
            &[
                "iperf3",
                "-c",
                server,
                "-p",
                &IPERF_PORT.to_string(),
                "-P",
                &streams.to_string(),
                "-t",
                &seconds.to_string(),
                "-J",
            ],
        )?;
        let v: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
        let received = &v["end"]["sum_received"];
        let (Some(bps), Some(bytes)) = (received["bits_per_second"].as_f64(), received["bytes"].as_f64()) else {
            bail!("iperf3 reported no received sum: {}", v["error"]);
        };
        Ok(BTreeMap::from([("gbps", bps / 1e9), ("bytes", bytes)]))
    }

    fn http(
        &self,
        load: &Path,
        pod: &str,
        target: &str,
        close: bool,
        concurrency: u32,
        seconds: u32,
    ) -> anyhow::Result<BTreeMap<&'static str, f64>> {
        let concurrency = concurrency.to_string();
        let seconds = seconds.to_string();
        let mut cmd = vec![
            load.to_str().context("weft-load path")?,
            "http",
            "--target",
            target,
            "--concurrency",
            &concurrency,
            "--duration",
            &seconds,
        ];
        if close {
            cmd.push("--close");
        }
        let v: Value = serde_json::from_str(&self.exec_output(pod, &cmd)?).context("weft-load http output")?;
        let num = |v: &Value, what: &str| v.as_f64().with_context(|| format!("weft-load http: no {what}"));
        let lat = &v["latency_us"];
        ensure!(
            v["errors"].as_u64() == Some(0),
            "weft-load http to {target} from {pod} had {} errors",
            v["errors"]
        );
        Ok(BTreeMap::from([
            ("rps", num(&v["rps"], "rps")?),
            ("requests", num(&v["requests"], "requests")?),
            ("p50_us", num(&lat["p50"], "p50")?),
            ("p90_us", num(&lat["p90"], "p90")?),
            ("p99_us", num(&lat["p99"], "p99")?),
        ]))
    }

    /// Opens `n` idle connections from `pod`; returns how long they took and each agent's RSS while
    /// they are held, then closes them.
    fn idle(
        &self,
        load: &Path,
        pod: &str,
        target: &str,
        n: usize,
        agents: &[Agent; 2],
    ) -> anyhow::Result<(f64, [u64; 2])> {
        let n_arg = n.to_string();
        let mut child = Background(
            self.exec(
                pod,
                &[
                    load.to_str().context("weft-load path")?,
                    "idle",
                    "--target",
                    target,
                    "--connections",
                    &n_arg,
                    "--hold",
                    "300",
                ],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting weft-load idle")?,
        );
        let stdout = child.0.stdout.take().context("weft-load idle output")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let ready: Value = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => serde_json::from_str(&line).with_context(|| format!("weft-load idle said {line:?}"))?,
            Err(_) => bail!("weft-load idle did not establish {n} connections to {target} within 120 s"),
        };
        ensure!(ready["event"] == "ready", "weft-load idle said {ready}");
        let seconds = ready["seconds"].as_f64().unwrap_or(f64::NAN);
        // Read once the agents' RSS has stopped moving (the last streams are still being set up
        // when the client reports ready), or after 5 s.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut held = both(agents, Agent::rss_kib)?;
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = both(agents, Agent::rss_kib)?;
            if now == held || Instant::now() > deadline {
                break;
            }
            held = now;
        }
        drop(child.0.stdin.take());
        let closed = rx.recv_timeout(Duration::from_secs(60));
        ensure!(
            closed.as_deref().is_ok_and(|l| l.contains("closed")),
            "weft-load idle did not close its connections: {closed:?}"
        );
        let _ = child.0.wait();
        Ok((seconds, held))
    }
}

/// A node agent, read from /proc.
struct Agent {
    pid: u32,
}

impl Agent {
    fn proc(&self, file: &str) -> anyhow::Result<String> {
        let path = format!("/proc/{}/{file}", self.pid);
        std::fs::read_to_string(&path).with_context(|| format!("reading {path} (did the agent stop?)"))
    }

    fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        self.proc("status")?
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc/{}/status", self.pid))
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmRSS:")
    }

    fn peak_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmHWM:")
    }

    /// Resets VmHWM to the current RSS.
    fn reset_peak(&self) -> anyhow::Result<()> {
        let path = format!("/proc/{}/clear_refs", self.pid);
        std::fs::write(&path, "5").with_context(|| format!("writing {path}"))
    }

    /// User and system time of every thread, dead or alive.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = self.proc("stat")?;
        // The fields after the command name, which may itself hold spaces and parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
        let (Some(user), Some(system)) = (ticks(11), ticks(12)) else {
            bail!("cannot read CPU time from /proc/{}/stat", self.pid);
        };
        Ok((user + system) as f64 / clock_ticks())
    }
}

/// `f` of each agent, node1's first.
fn both<T>(agents: &[Agent; 2], f: impl Fn(&Agent) -> anyhow::Result<T>) -> anyhow::Result<[T; 2]> {
    Ok([f(&agents[0])?, f(&agents[1])?])
}

/// The kernel's clock ticks per second, asked once: not between a load and its reading.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        output(Command::new("getconf").arg("CLK_TCK"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
