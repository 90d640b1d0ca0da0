//! What SIGTERM means in Kubernetes: an uninstall, or a restart. The agent's pods are stopped both
//! when its DaemonSet is deleted and when it is updated (or a pod is just restarted); only the first
//! must take capture away. So on SIGTERM the agent asks the API server about its own DaemonSet
//! (`--daemonset`, `WEFT_DAEMONSET`):
//!
//! - gone (404), being deleted (`metadata.deletionTimestamp`), or replaced by another DaemonSet of
//!   the same name (another uid than at start): **uninstall**. Every captured pod is released, every
//!   eBPF program and map is detached and unpinned, and the state file removed.
//! - anything else (it exists; the API server cannot be reached or refuses): **restart**, exactly as
//!   without Kubernetes: pins and capture stay, so enrolled pods stay captured and their connections
//!   are refused until the next agent serves them, never sent around the mesh.
//!
//! A 404 is trusted only if the DaemonSet was found at start: a wrong `WEFT_DAEMONSET` must not turn
//! every rolling update into an uninstall. The agent looks its DaemonSet up at start until it gets an
//! answer ([`at_start`]) and says at error level when it is not there.

use std::time::Duration;

use tokio::sync::watch;

use crate::{config::ObjectName, errors::display_chain, kube};

/// The DaemonSet as the agent found it at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AtStart {
    /// No answer from the API server yet.
    Unknown,
    Found {
        uid: String,
    },
    /// 404: `WEFT_DAEMONSET` names no DaemonSet (or it was deleted while the agent started).
    Missing,
}

/// What to do on SIGTERM, and why (for the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Uninstall(String),
    Restart(String),
}

/// The decision, given the DaemonSet at start and the answer to the GET made now.
pub fn decide(daemonset: &ObjectName, at_start: &AtStart, now: Result<kube::Object, kube::Error>) -> Decision {
    use Decision::{Restart, Uninstall};
    match (now, at_start) {
        (Ok(ds), _) if ds.metadata.deletion_timestamp.is_some() => Uninstall(format!(
            "DaemonSet {daemonset} is being deleted (since {})",
            ds.metadata.deletion_timestamp.unwrap_or_default()
        )),
        (Ok(ds), AtStart::Found { uid }) if ds.metadata.uid != *uid => Uninstall(format!(
            "DaemonSet {daemonset} was replaced (uid {}; this agent's was {uid})",
            ds.metadata.uid
        )),
        (Ok(_), _) => Restart(format!("DaemonSet {daemonset} exists and is not being deleted")),
        (Err(e), AtStart::Missing) if e.is_not_found() => Restart(format!(
            "DaemonSet {daemonset} is not found, and was not found at start either: --daemonset (WEFT_DAEMONSET) may be wrong, so capture stays"
        )),
        (Err(e), _) if e.is_not_found() => Uninstall(format!("DaemonSet {daemonset} is gone ({})", display_chain(&e))),
        (Err(e), _) => Restart(format!(
            "cannot tell whether DaemonSet {daemonset} is being deleted, so capture stays: {}",
            display_chain(&e)
        )),
    }
}

fn path(daemonset: &ObjectName) -> String {
    format!(
        "/apis/apps/v1/namespaces/{}/daemonsets/{}",
        daemonset.namespace, daemonset.name
    )
}

/// Asks the API server now and decides.
pub async fn check(kube: &kube::Client, daemonset: &ObjectName, at_start: &AtStart) -> Decision {
    decide(daemonset, at_start, kube.get(&path(daemonset)).await)
}

/// Looks the DaemonSet up until the API server answers, publishing what it found.
pub fn at_start(kube: kube::Client, daemonset: ObjectName) -> watch::Receiver<AtStart> {
    let (tx, rx) = watch::channel(AtStart::Unknown);
    tokio::spawn(async move {
        let mut delay = Duration::from_secs(1);
        loop {
            match kube.get::<kube::Object>(&path(&daemonset)).await {
                Ok(ds) => {
                    tracing::info!(daemonset = %daemonset, uid = %ds.metadata.uid, "this agent's DaemonSet");
                    tx.send_replace(AtStart::Found { uid: ds.metadata.uid });
                    return;
                }
                Err(e) if e.is_not_found() => {
                    tracing::error!(
                        daemonset = %daemonset,
                        "this agent's DaemonSet is not found (is --daemonset/WEFT_DAEMONSET right?): SIGTERM will keep capture in place, never uninstall"
                    );
                    tx.send_replace(AtStart::Missing);
                    return;
                }
                Err(e) => {
                    tracing::warn!(daemonset = %daemonset, error = %display_chain(&e), "looking up this agent's DaemonSet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};

    use super::*;

    fn ds(uid: &str, deleting: bool) -> Result<kube::Object, kube::Error> {
        let mut o = kube::Object::default();
        o.metadata.uid = uid.into();
        o.metadata.deletion_timestamp = deleting.then(|| "2024-05-01T10:00:00Z".into());
        Ok(o)
    }

    fn status(status: StatusCode) -> Result<kube::Object, kube::Error> {
        Err(kube::Error::Status {
            method: Method::GET,
            url: "https://10.96.0.1:443/apis/apps/v1/namespaces/weft-system/daemonsets/weft-node".into(),
            status,
            reason: String::new(),
            message: String::new(),
        })
    }

    #[test]
    fn only_a_daemonset_known_gone_or_being_deleted_uninstalls() {
        let name: ObjectName = "weft-system/weft-node".parse().expect("valid");
        let found = AtStart::Found { uid: "u1".into() };
        let cases = [
            (AtStart::Found { uid: "u1".into() }, ds("u1", false), false, "exists"),
            (
                found.clone(),
                ds("u1", true),
                true,
                "being deleted (since 2024-05-01T10:00:00Z)",
            ),
            (
                found.clone(),
                ds("u2", false),
                true,
                "was replaced (uid u2; this agent's was u1)",
            ),
            (found.clone(), status(StatusCode::NOT_FOUND), true, "is gone"),
            (AtStart::Unknown, status(StatusCode::NOT_FOUND), true, "is gone"),
            (AtStart::Missing, status(StatusCode::NOT_FOUND), false, "may be wrong"),
            (AtStart::Missing, ds("u3", true), true, "being deleted"),
            (found.clone(), status(StatusCode::FORBIDDEN), false, "cannot tell"),
            (found, status(StatusCode::SERVICE_UNAVAILABLE), false, "cannot tell"),
        ];
        for (i, (at_start, now, uninstall, says)) in cases.into_iter().enumerate() {
            let d = decide(&name, &at_start, now);
            let (got, why) = match &d {
                Decision::Uninstall(why) => (true, why),
                Decision::Restart(why) => (false, why),
            };
            assert_eq!(got, uninstall, "case {i}: {d:?}");
            assert!(
                why.contains(says) && why.contains("weft-system/weft-node"),
                "case {i}: {why}"
            );
        }
    }
}
