//! The agent's Prometheus metrics, served at `/metrics` (and `/stats/prometheus`, where Istio's
//! agents serve theirs) on `--metrics-address`: encoded by prometheus-client in the OpenMetrics
//! text format. Label values are bounded: names from the agent's config, never an address, a port
//! or an error's text.

use std::{fmt, time::SystemTime};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};

/// What `/metrics` shows.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        registry.register(
            "weft_build",
            "The running agent's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(Process));
        Self { registry }
    }

    /// The OpenMetrics text of every metric, `# EOF` last.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's own figures, read from `/proc/self` at each scrape, with the names Prometheus's
/// client libraries give them (`process_*`).
#[derive(Debug)]
struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(stat) = ProcStat::read() else {
            return Ok(());
        };
        let counter = |encoder: &mut DescriptorEncoder, name, help, value: f64| -> fmt::Result {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        let gauge = |encoder: &mut DescriptorEncoder, name, help, value: i64| -> fmt::Result {
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        counter(
            &mut encoder,
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            stat.cpu_seconds,
        )?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            stat.rss_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            stat.vsize_bytes,
        )?;
        gauge(&mut encoder, "process_threads", "Threads of the process", stat.threads)?;
        if let Some(start) = stat.start_time_seconds {
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                start,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                fds.count() as i64,
            )?;
        }
        if let Some(max) = max_fds() {
            gauge(&mut encoder, "process_max_fds", "The open file descriptor limit", max)?;
        }
        Ok(())
    }
}

/// What `/proc/self/stat` says of the process.
struct ProcStat {
    cpu_seconds: f64,
    rss_bytes: i64,
    vsize_bytes: i64,
    threads: i64,
    start_time_seconds: Option<i64>,
}

impl ProcStat {
    fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        Self::parse(&text, clock_ticks()?, page_size()?, boot_time())
    }

    /// Fields after the command (which may hold spaces and parentheses: everything up to the
    /// last `)`), numbered as in proc(5) from 3 (state).
    fn parse(text: &str, ticks: f64, page: i64, boot: Option<i64>) -> Option<Self> {
        let (_, rest) = text.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let utime = field(14)?;
        let stime = field(15)?;
        let threads = field(20)?;
        let start_ticks = field(22)?;
        let vsize = field(23)?;
        let rss_pages = field(24)?;
        Some(Self {
            cpu_seconds: (utime + stime) as f64 / ticks,
            rss_bytes: (rss_pages as i64).saturating_mul(page),
            vsize_bytes: vsize as i64,
            threads: threads as i64,
            start_time_seconds: boot.map(|b| b + (start_ticks as f64 / ticks) as i64),
        })
    }
}

fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf only reads a system value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(ticks as f64)
}

fn page_size() -> Option<i64> {
    // SAFETY: sysconf only reads a system value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then_some(page as i64)
}

/// The machine's boot time, seconds since the epoch (`btime` in `/proc/stat`).
fn boot_time() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let boot = text
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok());
    // Sanity: a boot time after now would make every start time wrong.
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs() as i64;
    boot.filter(|b| *b <= now)
}

fn max_fds() -> Option<i64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit.rlim_cur as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_command_holding_spaces_and_parentheses() {
        // proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice num_threads itrealvalue starttime vsize rss ...
        let line = "42 (weft (node) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1000 123456789 2048 18446744073709551615";
        let stat = ProcStat::parse(line, 100.0, 4096, Some(1_000_000)).expect("parses");
        assert_eq!(stat.cpu_seconds, 3.0);
        assert_eq!(stat.threads, 3);
        assert_eq!(stat.vsize_bytes, 123_456_789);
        assert_eq!(stat.rss_bytes, 2048 * 4096);
        assert_eq!(stat.start_time_seconds, Some(1_000_010));
        assert!(ProcStat::parse("42 (truncated) S 1 2", 100.0, 4096, None).is_none());
    }

    #[test]
    fn exposition_has_the_process_and_build_metrics_and_ends_with_eof() {
        let text = Metrics::new().encode().expect("encodes");
        for name in [
            "weft_build_info{version=\"",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .expect("an RSS value");
        assert!(rss > 1e6, "this test process holds more than 1 MB: {rss}");
    }
}
