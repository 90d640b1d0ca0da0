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
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use crate::{output, run, step};

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
    let idle_kib = agents.each(Agent::rss_kib)?;

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
        let before = agents.each(Agent::rss_kib)?;
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
        let now = agents.each(Agent::rss_kib)?;
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
    agents.each(Agent::reset_peak)?;
    let cpu_before = agents.each(Agent::cpu_seconds)?;
    let metrics = load()?;
    let cpu_after = agents.each(Agent::cpu_seconds)?;
    Ok(Sample {
        metrics,
        agent_cpu_s: (cpu_after[0] - cpu_before[0]) + (cpu_after[1] - cpu_before[1]),
        agent_peak_kib: agents.each(Agent::peak_kib)?,
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
        // The agents settle (the last streams' buffers) before the reading.
        std::thread::sleep(Duration::from_millis(500));
        let held = agents.each(Agent::rss_kib)?;
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

struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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

trait Each {
    fn each<T>(&self, f: impl Fn(&Agent) -> anyhow::Result<T>) -> anyhow::Result<[T; 2]>;
}

impl Each for [Agent; 2] {
    fn each<T>(&self, f: impl Fn(&Agent) -> anyhow::Result<T>) -> anyhow::Result<[T; 2]> {
        Ok([f(&self[0])?, f(&self[1])?])
    }
}

fn clock_ticks() -> f64 {
    output(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

// === the report ===

/// Median, minimum and maximum.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    /// (max - min) / median: how much the repetitions disagree.
    fn relative(&self) -> f64 {
        (self.max - self.min) / self.median.abs()
    }

    fn json(&self) -> Value {
        json!({ "median": self.median, "min": self.min, "max": self.max })
    }

    fn show(&self, digits: usize) -> String {
        format!("{:.digits$} ({:.digits$}–{:.digits$})", self.median, self.min, self.max)
    }
}

/// The rep-to-rep spread above which the machine is called noisy.
const NOISY: f64 = 0.25;

struct Report {
    json: Value,
    rows: Vec<[String; 5]>,
    agent_rows: Vec<[String; 4]>,
    bar: Vec<(String, String, String, bool)>,
    noisy: Vec<String>,
    header: String,
}

impl Report {
    fn new(
        quick: bool,
        plan: &Plan,
        idle_kib: [u64; 2],
        results: &[(&Scenario, Vec<[Sample; 2]>)],
        idle: BTreeMap<&str, Value>,
    ) -> anyhow::Result<Self> {
        let machine = machine();
        let mut rows = Vec::new();
        let mut agent_rows = Vec::new();
        let mut noisy = Vec::new();
        let mut scenarios = serde_json::Map::new();
        let mut ratio_of = BTreeMap::new();
        let mut peak_mib = BTreeMap::new();
        for (scenario, pairs) in results {
            let metrics: &[(&str, &str, usize)] = match scenario.load {
                Load::Bulk(_) => &[("gbps", "Gbit/s", 2)],
                Load::Http { .. } => &[
                    ("rps", "req/s", 0),
                    ("p50_us", "p50 µs", 1),
                    ("p90_us", "p90 µs", 1),
                    ("p99_us", "p99 µs", 1),
                ],
            };
            let mut summary = serde_json::Map::new();
            for &(metric, unit, digits) in metrics {
                let side = |i: usize| {
                    Spread::of(
                        pairs
                            .iter()
                            .map(|p| p[i].metrics.get(metric).copied().unwrap_or(f64::NAN)),
                    )
                };
                let (direct, mesh) = (side(0), side(1));
                let ratio = Spread::of(pairs.iter().map(|p| {
                    p[1].metrics.get(metric).copied().unwrap_or(f64::NAN)
                        / p[0].metrics.get(metric).copied().unwrap_or(f64::NAN)
                }));
                let added = Spread::of(pairs.iter().map(|p| {
                    p[1].metrics.get(metric).copied().unwrap_or(f64::NAN)
                        - p[0].metrics.get(metric).copied().unwrap_or(f64::NAN)
                }));
                for (which, s) in [("direct", direct), ("mesh", mesh)] {
                    if plan.reps > 1 && s.relative() > NOISY {
                        noisy.push(format!(
                            "{} {which} {unit}: the repetitions spread {:.0}% around the median",
                            scenario.title,
                            s.relative() * 100.0
                        ));
                    }
                }
                let compare = if metric.ends_with("_us") {
                    format!("+{} µs", added.show(1))
                } else {
                    ratio.show(2)
                };
                rows.push([
                    scenario.title.to_owned(),
                    unit.to_owned(),
                    direct.show(digits),
                    mesh.show(digits),
                    compare,
                ]);
                ratio_of.insert((scenario.key, metric), (ratio, added));
                summary.insert(
                    metric.to_owned(),
                    json!({ "direct": direct.json(), "mesh": mesh.json(), "ratio": ratio.json(), "added": added.json() }),
                );
            }
            // What the agents spent on the mesh side: per GB moved, or per 1,000 requests.
            let cpu = Spread::of(pairs.iter().map(|p| {
                let s = &p[1];
                match scenario.load {
                    Load::Bulk(_) => s.agent_cpu_s / (s.metrics.get("bytes").copied().unwrap_or(f64::NAN) / 1e9),
                    Load::Http { .. } => {
                        s.agent_cpu_s / (s.metrics.get("requests").copied().unwrap_or(f64::NAN) / 1000.0)
                    }
                }
            }));
            let peak = |i: usize| Spread::of(pairs.iter().map(|p| p[1].agent_peak_kib[i] as f64 / 1024.0));
            let unit = match scenario.load {
                Load::Bulk(_) => "CPU s per GB",
                Load::Http { .. } => "CPU s per 1k req",
            };
            agent_rows.push([
                scenario.title.to_owned(),
                format!("{} {unit}", cpu.show(3)),
                peak(0).show(1),
                peak(1).show(1),
            ]);
            peak_mib.insert(scenario.key, peak(0).median.max(peak(1).median));
            summary.insert(
                "agent".to_owned(),
                json!({
                    "cpu": cpu.json(),
                    "cpu_unit": unit,
                    "peak_rss_mib": [peak(0).json(), peak(1).json()],
                }),
            );
            let reps: Vec<Value> = pairs
                .iter()
                .map(|p| {
                    let one = |s: &Sample| {
                        json!({ "metrics": s.metrics, "agent_cpu_s": s.agent_cpu_s, "agent_peak_rss_kib": s.agent_peak_kib })
                    };
                    json!({ "direct": one(&p[0]), "mesh": one(&p[1]) })
                })
                .collect();
            scenarios.insert(
                scenario.key.to_owned(),
                json!({ "title": scenario.title, "summary": summary, "reps": reps }),
            );
        }

        let idle_per_conn = idle
            .get("mesh")
            .and_then(|m| m["agent_bytes_per_connection"].as_array())
            .map(|a| a.iter().filter_map(Value::as_f64).fold(f64::NAN, f64::max))
            .unwrap_or(f64::NAN);
        let idle_mib = idle_kib.iter().map(|k| *k as f64 / 1024.0).fold(f64::NAN, f64::max);
        let get = |k: (&str, &str)| ratio_of.get(&k).copied();
        let ratio = |k| get(k).map_or(f64::NAN, |(r, _)| r.median);
        let added = |k| get(k).map_or(f64::NAN, |(_, a)| a.median);
        let bar_items = [
            (
                "single-stream throughput, mesh/direct",
                ">= 0.45",
                ratio(("bulk_1", "gbps")),
                0.45,
                true,
            ),
            (
                "keep-alive req/s at c16, mesh/direct",
                ">= 0.40",
                ratio(("keepalive_c16", "rps")),
                0.40,
                true,
            ),
            (
                "added p50 latency at c1 (keep-alive), µs",
                "<= 70",
                added(("keepalive_c1", "p50_us")),
                70.0,
                false,
            ),
            (
                "new connection per request at c1, mesh/direct",
                ">= 0.25",
                ratio(("close_c1", "rps")),
                0.25,
                true,
            ),
            (
                "new connection per request at c16, mesh/direct",
                ">= 0.30",
                ratio(("close_c16", "rps")),
                0.30,
                true,
            ),
            ("agent RSS idle, MiB (larger agent)", "<= 8", idle_mib, 8.0, false),
            (
                "agent peak RSS under keep-alive c16, MiB (larger agent)",
                "<= 16",
                peak_mib.get("keepalive_c16").copied().unwrap_or(f64::NAN),
                16.0,
                false,
            ),
            (
                "agent RSS per idle connection at 10k, bytes (larger agent)",
                "<= 4096",
                idle_per_conn,
                4096.0,
                false,
            ),
        ];
        let bar: Vec<_> = bar_items
            .iter()
            .map(|&(what, target, value, limit, at_least)| {
                let ok = if at_least { value >= limit } else { value <= limit };
                (what.to_owned(), target.to_owned(), format!("{value:.2}"), ok)
            })
            .collect();
        let header = format!(
            "Weft {} on {} ({} cores), Linux {}; {} reps x {} s per scenario{}",
            machine["commit"].as_str().unwrap_or("?"),
            machine["cpu_model"].as_str().unwrap_or("?"),
            machine["cores"],
            machine["kernel"].as_str().unwrap_or("?"),
            plan.reps,
            plan.seconds,
            if quick {
                " (--quick: proves the harness, not the numbers)"
            } else {
                ""
            }
        );
        let json = json!({
            "machine": machine,
            "quick": quick,
            "reps": plan.reps,
            "seconds_per_run": plan.seconds,
            "agent_idle_rss_kib": idle_kib,
            "scenarios": scenarios,
            "idle_connections": idle,
            "bar": bar.iter().map(|(what, target, value, ok)| json!({"what": what, "target": target, "value": value, "met": ok})).collect::<Vec<_>>(),
            "noisy": noisy,
        });
        Ok(Report {
            json,
            rows,
            agent_rows,
            bar,
            noisy,
            header,
        })
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(self.header.clone());
        line(String::new());
        line(
            "| scenario | metric | direct: median (min–max) | mesh: median (min–max) | mesh vs direct, pair by pair |"
                .into(),
        );
        line("|---|---|---|---|---|".into());
        for r in &self.rows {
            line(format!("| {} | {} | {} | {} | {} |", r[0], r[1], r[2], r[3], r[4]));
        }
        line(String::new());
        line("| mesh scenario | both agents' CPU | node1 agent peak RSS, MiB | node2 agent peak RSS, MiB |".into());
        line("|---|---|---|---|".into());
        for r in &self.agent_rows {
            line(format!("| {} | {} | {} | {} |", r[0], r[1], r[2], r[3]));
        }
        if let Some(idle) = self.json["idle_connections"]["mesh"].as_object() {
            let n = &idle["connections"];
            let before = &idle["agent_rss_before_kib"];
            let held = &idle["agent_rss_held_kib"];
            let per = &idle["agent_bytes_per_connection"];
            line(String::new());
            line(format!(
                "{n} idle connections through the mesh: agent RSS node1 {} -> {} KiB, node2 {} -> {} KiB; {:.0} and {:.0} bytes per connection. Idle agents before any load: {} and {} KiB.",
                before[0],
                held[0],
                before[1],
                held[1],
                per[0].as_f64().unwrap_or(f64::NAN),
                per[1].as_f64().unwrap_or(f64::NAN),
                self.json["agent_idle_rss_kib"][0],
                self.json["agent_idle_rss_kib"][1],
            ));
        }
        line(String::new());
        line("| the bar | target | measured | met |".into());
        line("|---|---|---|---|".into());
        for (what, target, value, ok) in &self.bar {
            line(format!(
                "| {what} | {target} | {value} | {} |",
                if *ok { "yes" } else { "NO" }
            ));
        }
        if !self.noisy.is_empty() {
            line(String::new());
            line("WARNING: the machine was noisy; repeat the run before trusting these numbers:".into());
            for n in &self.noisy {
                line(format!("- {n}"));
            }
        }
        s
    }
}

/// The kernel, the CPU, the commit.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let git = |args: &[&str]| {
        output(Command::new("git").args(args).current_dir(crate::root()))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let commit = format!(
        "{}{}",
        git(&["rev-parse", "--short=12", "HEAD"]),
        if dirty { "-dirty" } else { "" }
    );
    json!({
        "kernel": output(Command::new("uname").arg("-r")).map(|s| s.trim().to_owned()).unwrap_or_default(),
        "cpu_model": cpu_model,
        "cores": cores,
        "commit": commit,
        "memory_kib": std::fs::read_to_string("/proc/meminfo").unwrap_or_default().lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()),
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    })
}
