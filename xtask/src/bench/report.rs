//! The bench's report: medians and spreads, the Markdown table, the JSON, the bar.

use std::{collections::BTreeMap, process::Command};

use serde_json::{Value, json};

use super::{Load, Plan, Sample, Scenario};
use crate::output;

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

pub(super) struct Report {
    pub(super) json: Value,
    rows: Vec<[String; 5]>,
    agent_rows: Vec<[String; 4]>,
    bar: Vec<(String, String, String, bool)>,
    noisy: Vec<String>,
    header: String,
}

impl Report {
    pub(super) fn new(
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
                // Ratios to three places: a median of 0.449 must not read as the 0.45 it misses.
                let shown = if at_least {
                    format!("{value:.3}")
                } else {
                    format!("{value:.2}")
                };
                (what.to_owned(), target.to_owned(), shown, ok)
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

    pub(super) fn markdown(&self) -> String {
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
        // A quick run proves the harness: its numbers are not judged, and must not read as a miss.
        let quick = self.json["quick"].as_bool().unwrap_or(false);
        line(format!(
            "| the bar | target | measured | {} |",
            if quick { "met (--quick: not judged)" } else { "met" }
        ));
        line("|---|---|---|---|".into());
        for (what, target, value, ok) in &self.bar {
            let met = match (quick, *ok) {
                (true, _) => "-",
                (false, true) => "yes",
                (false, false) => "NO",
            };
            line(format!("| {what} | {target} | {value} | {met} |"));
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
