//! Where the agent learns about workloads. A source publishes whole [`WorkloadSnapshot`]s; the
//! agent reconciles to the latest. The local dev cluster's file store is the source today; the
//! controller's gRPC stream replaces it without touching the reconciler.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use weft_model::WorkloadSnapshot;

/// Follows a JSON snapshot file, polling its modification time. Unchanged files cost one `stat`
/// per interval; a file that fails to parse keeps the last good snapshot.
pub struct FileSource {
    path: PathBuf,
    interval: Duration,
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            interval: Duration::from_millis(200),
        }
    }

    /// Spawns the follower; the receiver always holds the latest good snapshot.
    pub fn spawn(self) -> watch::Receiver<WorkloadSnapshot> {
        let (tx, rx) = watch::channel(WorkloadSnapshot::default());
        tokio::spawn(async move {
            let mut seen: Option<(SystemTime, u64)> = None;
            let mut ticker = tokio::time::interval(self.interval);
            loop {
                ticker.tick().await;
                let Ok(meta) = tokio::fs::metadata(&self.path).await else {
                    continue;
                };
                let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len());
                if seen == Some(stamp) {
                    continue;
                }
                match tokio::fs::read(&self.path)
                    .await
                    .map(|b| serde_json::from_slice::<WorkloadSnapshot>(&b))
                {
                    Ok(Ok(snapshot)) => {
                        seen = Some(stamp);
                        if tx.send(snapshot).is_err() {
                            return;
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "ignoring bad workload snapshot")
                    }
                    Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "reading workload snapshot"),
                }
            }
        });
        rx
    }
}
