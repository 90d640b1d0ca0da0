//! The agent's Prometheus metrics, served at `/metrics` (and `/stats/prometheus`, where Istio's
//! agents serve theirs) on `--metrics-address`: encoded by prometheus-client in the OpenMetrics
//! text format. Label values are bounded: names from the agent's config, never an address, a port
//! or an error's text.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};

/// What `/metrics` shows.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub tcp: Arc<Tcp>,
    /// The access log's records written and dropped ([`crate::access`]).
    pub access: Arc<crate::access::Counters>,
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
        let tcp = Arc::new(Tcp::default());
        registry.register_collector(Box::new(tcp.clone()));
        let access = Arc::new(crate::access::Counters::default());
        registry.register_collector(Box::new(AccessLog(access.clone())));
        Self { registry, tcp, access }
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

/// The label set of Istio's standard TCP metrics, as ztunnel reports them: who reports
/// (`source`: the client's agent, `destination`: the server's), both ends' workloads and
/// identities, the service when the client asked for one, and how the connection went. Every value
/// is a name from the mesh's config or a fixed word; `unknown` where the agent does not know it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: Arc<str>,
    pub source_canonical_service: Arc<str>,
    pub source_canonical_revision: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub source_app: Arc<str>,
    pub source_version: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_service_namespace: Arc<str>,
    pub destination_service_name: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_canonical_service: Arc<str>,
    pub destination_canonical_revision: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    pub destination_app: Arc<str>,
    pub destination_version: Arc<str>,
    pub request_protocol: &'static str,
    /// `-` when it went through, `DENY` when a policy refused or closed it, `CONNECT` when it
    /// could not be connected (ztunnel's flags).
    pub response_flags: &'static str,
    /// `mutual_tls` through an HBONE tunnel, `none` in plaintext.
    pub connection_security_policy: &'static str,
}

/// The TCP series: one set of counters per label set, kept for the life of the agent (counters
/// never go back), at most [`MAX_TCP_SERIES`] of them.
#[derive(Debug, Default)]
pub struct Tcp {
    series: Mutex<HashMap<Arc<TcpLabels>, Arc<TcpCounters>>>,
    /// Connections not counted because the series were full.
    overflow: AtomicU64,
}

/// Label sets the agent keeps. Each is a pair of workloads (or a workload and a destination outside
/// the mesh), so this is only reached on a node whose pods talk to thousands of distinct peers; the
/// connections beyond it are counted in `weft_tcp_series_overflow_total`.
pub const MAX_TCP_SERIES: usize = 10_000;

/// One label set's counts.
#[derive(Debug, Default)]
pub struct TcpCounters {
    opened: AtomicU64,
    closed: AtomicU64,
    /// From the server to the client (Istio's "sent during response").
    sent: AtomicU64,
    /// From the client to the server (Istio's "received during request").
    received: AtomicU64,
}

impl Tcp {
    /// The counters of `labels`; the label set is copied only when it is new.
    fn counters(&self, labels: &TcpLabels) -> Option<Arc<TcpCounters>> {
        let mut series = self.series.lock().ok()?;
        if let Some(c) = series.get(labels) {
            return Some(c.clone());
        }
        if series.len() >= MAX_TCP_SERIES {
            self.overflow.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let counters = Arc::new(TcpCounters::default());
        series.insert(Arc::new(labels.clone()), counters.clone());
        Some(counters)
    }

    /// A connection was opened (or refused: then [`Tcp::closed`] follows at once).
    pub fn opened(&self, labels: &TcpLabels) {
        if let Some(c) = self.counters(labels) {
            c.opened.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection ended, having carried `request` bytes from the client and `response` back.
    pub fn closed(&self, labels: &TcpLabels, request: u64, response: u64) {
        if let Some(c) = self.counters(labels) {
            c.closed.fetch_add(1, Ordering::Relaxed);
            c.received.fetch_add(request, Ordering::Relaxed);
            c.sent.fetch_add(response, Ordering::Relaxed);
        }
    }
}

impl Collector for Tcp {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // Copied out first: a scrape never holds the lock while it formats.
        let series: Vec<(Arc<TcpLabels>, Arc<TcpCounters>)> = match self.series.lock() {
            Ok(s) => s.iter().map(|(l, c)| (l.clone(), c.clone())).collect(),
            Err(_) => Vec::new(),
        };
        type Pick = fn(&TcpCounters) -> &AtomicU64;
        let families: [(&str, &str, Pick); 4] = [
            ("istio_tcp_connections_opened", "TCP connections opened", |c| &c.opened),
            ("istio_tcp_connections_closed", "TCP connections closed", |c| &c.closed),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent from the server to the client, counted when the connection closes",
                |c| &c.sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received from the client, counted when the connection closes",
                |c| &c.received,
            ),
        ];
        for (name, help, pick) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, counters) in &series {
                let value = pick(counters).load(Ordering::Relaxed);
                ConstCounter::new(value).encode(family.encode_family(labels.as_ref())?)?;
            }
        }
        let overflow = ConstCounter::new(self.overflow.load(Ordering::Relaxed));
        overflow.encode(encoder.encode_descriptor(
            "weft_tcp_series_overflow",
            "Connections not counted in istio_tcp_*: the agent already keeps its most label sets",
            None,
            overflow.metric_type(),
        )?)
    }
}

/// The access log's counters.
#[derive(Debug)]
struct AccessLog(Arc<crate::access::Counters>);

impl Collector for AccessLog {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        for (name, help, value) in [
            ("weft_access_log_records", "Access records written", &self.0.written),
            (
                "weft_access_log_dropped",
                "Access records dropped because the log did not keep up",
                &self.0.dropped,
            ),
        ] {
            let metric = ConstCounter::new(value.load(Ordering::Relaxed));
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        Ok(())
    }
}

/// What a metric label says when the agent does not know.
pub fn unknown() -> Arc<str> {
    static UNKNOWN: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    UNKNOWN.get_or_init(|| Arc::from("unknown")).clone()
}

/// A workload's names as Istio's metrics label them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadNames {
    /// The workload the pod belongs to: its Deployment, StatefulSet, DaemonSet or Job, or the pod
    /// itself when it has no such owner.
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    /// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`, else the workload.
    pub canonical_service: Arc<str>,
    /// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else `version`, else
    /// `latest`.
    pub canonical_revision: Arc<str>,
    /// The `app` label, `unknown` without one.
    pub app: Arc<str>,
    /// The `version` label, `unknown` without one.
    pub version: Arc<str>,
}

impl WorkloadNames {
    pub fn of(namespace: &str, pod: &str, labels: &std::collections::BTreeMap<String, String>) -> Self {
        let label = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k))
                .map(|v| Arc::<str>::from(v.as_str()))
        };
        let workload: Arc<str> = Arc::from(workload_name(pod, labels));
        Self {
            canonical_service: label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
                .unwrap_or_else(|| workload.clone()),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| Arc::from("latest")),
            app: label(&["app"]).unwrap_or_else(unknown),
            version: label(&["version"]).unwrap_or_else(unknown),
            namespace: Arc::from(namespace),
            workload,
        }
    }

    /// A peer the agent does not know: every name `unknown`.
    pub fn unknown() -> Self {
        Self {
            workload: unknown(),
            namespace: unknown(),
            canonical_service: unknown(),
            canonical_revision: unknown(),
            app: unknown(),
            version: unknown(),
        }
    }
}

/// The name of the workload a pod belongs to, from what its controller leaves on it: a
/// Deployment's pods are `<deployment>-<pod-template-hash>-<suffix>`, a StatefulSet's
/// `<set>-<ordinal>`, a DaemonSet's `<set>-<suffix>` (with `controller-revision-hash`), a Job's carry
/// `job-name`. A pod that matches none is its own workload.
fn workload_name<'a>(pod: &'a str, labels: &'a std::collections::BTreeMap<String, String>) -> &'a str {
    if let Some(hash) = labels.get("pod-template-hash")
        && let Some((deployment, _)) = pod.rsplit_once('-')
        && let Some(name) = deployment.strip_suffix(hash.as_str()).and_then(|d| d.strip_suffix('-'))
        && !name.is_empty()
    {
        return name;
    }
    if let Some(job) = labels.get("job-name") {
        return job;
    }
    if labels.contains_key("controller-revision-hash")
        && let Some((set, last)) = pod.rsplit_once('-')
        && !set.is_empty()
    {
        let ordinal = !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit());
        let stateful = labels
            .get("statefulset.kubernetes.io/pod-name")
            .is_some_and(|n| n == pod);
        // A StatefulSet's pod ends in its ordinal; a DaemonSet's in a random suffix.
        if ordinal == stateful {
            return set;
        }
    }
    pod
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

    fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_pod_is_labelled_with_the_workload_its_controller_made_it_for() {
        let cases = [
            (
                "reviews-v1-5f8d9c7b4-x2k9p",
                labels(&[("pod-template-hash", "5f8d9c7b4")]),
                "reviews-v1",
            ),
            (
                "db-2",
                labels(&[
                    ("controller-revision-hash", "db-7c9"),
                    ("statefulset.kubernetes.io/pod-name", "db-2"),
                ]),
                "db",
            ),
            (
                "fluentd-8xk2p",
                labels(&[("controller-revision-hash", "6d5f")]),
                "fluentd",
            ),
            ("migrate-7h2k1", labels(&[("job-name", "migrate")]), "migrate"),
            // No controller's marks, or marks that do not fit the name: the pod is its own workload.
            ("app-1-1", labels(&[("app", "app-1")]), "app-1-1"),
            ("odd-name", labels(&[("pod-template-hash", "zzz")]), "odd-name"),
            ("-5f8d-x", labels(&[("pod-template-hash", "5f8d")]), "-5f8d-x"),
        ];
        for (pod, labels, want) in cases {
            assert_eq!(workload_name(pod, &labels), want, "{pod}");
        }
    }

    #[test]
    fn canonical_names_come_from_istios_labels_then_the_common_ones() {
        let names = WorkloadNames::of(
            "shop",
            "web-6b7f-abcde",
            &labels(&[("pod-template-hash", "6b7f"), ("app", "web"), ("version", "v2")]),
        );
        assert_eq!(
            (
                &*names.workload,
                &*names.namespace,
                &*names.canonical_service,
                &*names.canonical_revision
            ),
            ("web", "shop", "web", "v2")
        );
        assert_eq!((&*names.app, &*names.version), ("web", "v2"));
        let names = WorkloadNames::of(
            "shop",
            "solo",
            &labels(&[
                ("app", "web"),
                ("app.kubernetes.io/name", "storefront"),
                ("service.istio.io/canonical-revision", "r7"),
            ]),
        );
        assert_eq!(
            (&*names.canonical_service, &*names.canonical_revision),
            ("storefront", "r7")
        );
        let bare = WorkloadNames::of("shop", "solo", &labels(&[]));
        assert_eq!(
            (
                &*bare.workload,
                &*bare.canonical_service,
                &*bare.canonical_revision,
                &*bare.app
            ),
            ("solo", "solo", "latest", "unknown")
        );
    }

    #[test]
    fn tcp_series_count_each_label_set_and_stop_growing_at_their_bound() {
        let tcp = Tcp::default();
        let labels = |workload: &str, flags: &'static str| TcpLabels {
            reporter: "source",
            source_workload: Arc::from(workload),
            source_canonical_service: unknown(),
            source_canonical_revision: unknown(),
            source_workload_namespace: unknown(),
            source_principal: unknown(),
            source_app: unknown(),
            source_version: unknown(),
            destination_service: unknown(),
            destination_service_namespace: unknown(),
            destination_service_name: unknown(),
            destination_workload: unknown(),
            destination_canonical_service: unknown(),
            destination_canonical_revision: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
            destination_app: unknown(),
            destination_version: unknown(),
            request_protocol: "tcp",
            response_flags: flags,
            connection_security_policy: "mutual_tls",
        };
        tcp.opened(&labels("a", "-"));
        tcp.opened(&labels("a", "-"));
        tcp.closed(&labels("a", "-"), 10, 20);
        tcp.closed(&labels("a", "DENY"), 0, 0);
        let mut registry = Registry::default();
        let tcp = Arc::new(tcp);
        registry.register_collector(Box::new(tcp.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |prefix: &str, flags: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(prefix) && l.contains(&format!("response_flags=\"{flags}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix} with {flags} in:\n{text}"))
        };
        assert_eq!(value("istio_tcp_connections_opened_total{", "-"), 2);
        assert_eq!(value("istio_tcp_connections_closed_total{", "-"), 1);
        assert_eq!(value("istio_tcp_received_bytes_total{", "-"), 10);
        assert_eq!(value("istio_tcp_sent_bytes_total{", "-"), 20);
        assert_eq!(value("istio_tcp_connections_closed_total{", "DENY"), 1);
        assert!(text.contains("reporter=\"source\",source_workload=\"a\""), "{text}");

        for i in 0..MAX_TCP_SERIES {
            tcp.opened(&labels(&format!("w{i}"), "-"));
        }
        assert_eq!(tcp.series.lock().unwrap().len(), MAX_TCP_SERIES);
        assert_eq!(tcp.overflow.load(Ordering::Relaxed), 2, "the two sets that did not fit");
        // A set already kept is still counted.
        tcp.opened(&labels("a", "-"));
        assert_eq!(tcp.overflow.load(Ordering::Relaxed), 2);
    }

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
