//! Access records, one per connection, written off the data path. A connection's end hands its
//! record to a bounded queue and goes on; one thread of its own formats the records (through the
//! log's subscriber, target `weft::access`, in `--log-format plain|json`) and writes them. When the
//! log cannot keep up (a slow disk, a log collector that stopped reading the agent's output) the
//! queue fills and records are dropped and counted (`weft_access_log_dropped_total`), never
//! waited for.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use weft_hbone::identity::Identity;

/// Records waiting to be written. The queue holds only what waits (it grows in blocks of 32 and
/// gives them back), so a quiet agent holds next to nothing for it.
pub const QUEUE: usize = 4096;

/// How often at most a run of drops is reported in the log.
const DROP_REPORT: Duration = Duration::from_secs(10);

/// One connection's record.
pub struct AccessRecord {
    /// The agent's own side: the enrolled pod (`namespace/name`) and its identity, as they were
    /// when the connection started.
    pub own_name: Arc<str>,
    pub own_identity: Arc<str>,
    pub outbound: bool,
    pub mode: &'static str,
    pub src: SocketAddr,
    pub dst: Option<SocketAddr>,
    pub peer_workload: Option<Arc<str>>,
    pub peer_identity: Option<Identity>,
    pub policy: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration: Duration,
    pub reason: &'static str,
}

/// Records written and dropped, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
}

/// Where the proxies put their records.
pub type AccessLog = Writer<AccessRecord>;

impl AccessLog {
    /// A log whose records are written by a thread of its own.
    pub fn spawn(counters: Arc<Counters>) -> std::io::Result<Self> {
        Self::spawn_with(counters, QUEUE, emit)
    }

    /// A log that writes each record on the caller's thread (tests: their subscriber is the
    /// thread's own).
    pub fn inline() -> Self {
        Self {
            queue: None,
            counters: Arc::default(),
            emit: emit_boxed(),
        }
    }

    /// Takes `record` ([`Writer::write`]); nothing is queued while the log's filter has access
    /// records off.
    pub fn record(&self, record: AccessRecord) {
        if tracing::enabled!(target: "weft::access", tracing::Level::INFO) {
            self.write(record);
        }
    }
}

fn emit_boxed() -> Box<dyn Fn(&AccessRecord) + Send + Sync> {
    Box::new(emit)
}

/// Items written by a thread of their own, through a bounded queue that drops (and counts) what
/// does not fit rather than wait.
pub struct Writer<T> {
    queue: Option<mpsc::Sender<T>>,
    counters: Arc<Counters>,
    /// Used on the caller's thread when there is no queue.
    emit: Box<dyn Fn(&T) + Send + Sync>,
}

impl<T: Send + 'static> Writer<T> {
    fn spawn_with(
        counters: Arc<Counters>,
        capacity: usize,
        emit: impl Fn(&T) + Send + Sync + Clone + 'static,
    ) -> std::io::Result<Self> {
        let (queue, mut records) = mpsc::channel::<T>(capacity);
        let writer_emit = emit.clone();
        let shared = counters.clone();
        std::thread::Builder::new()
            .name("weft-access-log".into())
            .spawn(move || {
                let mut reported = (0, Instant::now());
                while let Some(record) = records.blocking_recv() {
                    writer_emit(&record);
                    drop(record);
                    shared.written.fetch_add(1, Ordering::Relaxed);
                    let dropped = shared.dropped.load(Ordering::Relaxed);
                    if dropped > reported.0 && reported.1.elapsed() >= DROP_REPORT {
                        tracing::warn!(
                            dropped = dropped - reported.0,
                            total = dropped,
                            "access records dropped: the log did not keep up"
                        );
                        reported = (dropped, Instant::now());
                    }
                }
            })?;
        Ok(Self {
            queue: Some(queue),
            counters,
            emit: Box::new(emit),
        })
    }

    /// Takes `item`, or drops and counts it when the queue is full; never waits.
    pub fn write(&self, item: T) {
        match &self.queue {
            Some(queue) => {
                if queue.try_send(item).is_err() {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                (self.emit)(&item);
                self.counters.written.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Writes `record` through the log's subscriber: target `weft::access`, message `connection`.
pub fn emit(r: &AccessRecord) {
    let own_name = Shown(Some(&r.own_name));
    let own_identity = Shown(Some(&r.own_identity));
    let peer_name = Shown(r.peer_workload.as_ref().map(|p| p as &dyn std::fmt::Display));
    let peer_identity = Shown(r.peer_identity.as_ref().map(|p| p as &dyn std::fmt::Display));
    let (direction, src_workload, src_identity, dst_workload, dst_identity) = match r.outbound {
        true => ("outbound", own_name, own_identity, peer_name, peer_identity),
        false => ("inbound", peer_name, peer_identity, own_name, own_identity),
    };
    tracing::info!(
        target: "weft::access",
        direction,
        mode = r.mode,
        src.addr = %r.src,
        src.workload = %src_workload,
        src.identity = %src_identity,
        dst.addr = %Shown(r.dst.as_ref().map(|d| d as &dyn std::fmt::Display)),
        dst.workload = %dst_workload,
        dst.identity = %dst_identity,
        policy = r.policy.as_deref().unwrap_or(""),
        bytes_sent = r.bytes_sent,
        bytes_received = r.bytes_received,
        duration_ms = r.duration.as_millis() as u64,
        reason = r.reason,
        "connection"
    );
}

/// An optional value displayed as itself or as nothing.
struct Shown<'a>(Option<&'a dyn std::fmt::Display>);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
