//! Each pod's capture as the cluster sees it: the annotation `weft.dev/redirection` on every pod of
//! this node that the mesh should capture (enrolled by its namespace or its own annotation), `active`
//! while its traffic is captured and `inactive: <reason>` while it should be and is not (its network
//! namespace unknown to the agent, its enrollment failing: what the agent logs). The annotation is
//! removed when the pod is opted out or its namespace unenrolled.
//!
//! Written through the `pods/status` subresource (the agent may patch only that, not pods), as a
//! JSON merge patch of `metadata.annotations` that also names the pod's uid: a pod re-created
//! under the same name is not written with the old one's value (the API server refuses the patch).
//! Kubernetes 1.20's `pods/status` takes annotation changes (`tests/kubernetes.rs` checks it).
//!
//! The writer runs on its own task, off the data path and the enrollment steps: it gets the wanted
//! values ([`plan`]) and writes only what differs from what the pod carries, as the workload source
//! last reported it, or as the writer itself last wrote it until the source catches up. A failed
//! write is retried with backoff: five times within half a minute, then every five minutes while it
//! keeps failing and the value is still wanted.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use weft_model::{WorkloadSnapshot, enrollment};

use crate::{errors::display_chain, kube};

/// The annotation's key.
pub const ANNOTATION: &str = "weft.dev/redirection";
/// Its value for a captured pod.
pub const ACTIVE: &str = "active";
/// Reasons are cut to this many characters.
const MAX_REASON: usize = 512;
/// Quick retries of a failed write before it is tried only every [`SLOW_RETRY`].
const QUICK_RETRIES: u32 = 5;
const SLOW_RETRY: Duration = Duration::from_secs(300);

/// What one pod's annotation should be, and what it was last seen to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub namespace: String,
    pub name: String,
    /// The value to write; `None`: no annotation.
    pub value: Option<String>,
    /// The value on the pod as the workload source last reported it (the controller passes Weft's
    /// annotations through).
    pub observed: Option<String>,
}

/// The annotation of every pod on `node` that should carry one, or carries one it should not
/// have, by uid. `served` says whether the agent captures a pod now; `failures` has the last error
/// of each pod whose enrollment is failing.
pub fn plan(
    snapshot: &WorkloadSnapshot,
    node: &str,
    served: impl Fn(&str) -> bool,
    failures: &BTreeMap<String, String>,
) -> BTreeMap<String, Wanted> {
    snapshot
        .pods_on(node)
        .filter_map(|pod| {
            let observed = pod.annotations.get(ANNOTATION).cloned();
            let value = enrollment::is_enrolled(pod, snapshot.namespace(&pod.namespace)).then(|| {
                if served(&pod.uid) {
                    ACTIVE.to_owned()
                } else if pod.netns.is_none() {
                    inactive("its network namespace is unknown to the node agent (no CNI report for this pod)")
                } else {
                    inactive(failures.get(&pod.uid).map_or("not enrolled yet", String::as_str))
                }
            });
            (value.is_some() || observed.is_some()).then(|| {
                let wanted = Wanted {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    value,
                    observed,
                };
                (pod.uid.clone(), wanted)
            })
        })
        .collect()
}

fn inactive(reason: &str) -> String {
    let mut value = String::from("inactive: ");
    value.extend(reason.chars().take(MAX_REASON));
    value
}

/// The merge patch that sets (or with `None` removes) the annotation of the pod with `uid`.
pub fn patch(uid: &str, value: Option<&str>) -> serde_json::Value {
    serde_json::json!({"metadata": {"uid": uid, "annotations": {ANNOTATION: value}}})
}

/// Writes the annotation of one pod (see the module's documentation).
pub async fn write(kube: &kube::Client, uid: &str, wanted: &Wanted) -> Result<(), kube::Error> {
    let path = format!("/api/v1/namespaces/{}/pods/{}/status", wanted.namespace, wanted.name);
    kube.merge_patch::<kube::Object>(&path, &patch(uid, wanted.value.as_deref()))
        .await
        .map(drop)
}

/// A write that failed: how often, and when to try again.
struct Failing {
    attempts: u32,
    next: Instant,
}

/// Keeps the annotations equal to the latest plan until `plans` closes.
pub async fn run(kube: kube::Client, mut plans: watch::Receiver<BTreeMap<String, Wanted>>) {
    // What the writer last wrote, until the workload source reports the same.
    let mut written: HashMap<String, Option<String>> = HashMap::new();
    let mut failing: HashMap<String, Failing> = HashMap::new();
    loop {
        let plan = plans.borrow_and_update().clone();
        written.retain(|uid, value| plan.get(uid).is_some_and(|w| w.observed != *value));
        failing.retain(|uid, _| plan.contains_key(uid));
        let mut wake: Option<Instant> = None;
        for (uid, wanted) in &plan {
            let on_pod = written.get(uid).unwrap_or(&wanted.observed);
            if *on_pod == wanted.value {
                failing.remove(uid);
                continue;
            }
            if let Some(f) = failing.get(uid)
                && f.next > Instant::now()
            {
                wake = Some(wake.map_or(f.next, |w| w.min(f.next)));
                continue;
            }
            let pod = format!("{}/{}", wanted.namespace, wanted.name);
            match write(&kube, uid, wanted).await {
                Ok(()) => {
                    tracing::info!(pod, value = ?wanted.value, "{ANNOTATION} written");
                    written.insert(uid.clone(), wanted.value.clone());
                    failing.remove(uid);
                }
                Err(e) if gone(&e) => {
                    // Deleted, or re-created under the same name: nothing to write to.
                    tracing::debug!(pod, error = %display_chain(&e), "{ANNOTATION}: the pod is gone");
                    written.insert(uid.clone(), wanted.value.clone());
                    failing.remove(uid);
                }
                Err(e) => {
                    let attempts = failing.get(uid).map_or(1, |f| f.attempts + 1);
                    let delay = match attempts {
                        n if n < QUICK_RETRIES => Duration::from_secs(1 << n),
                        _ => SLOW_RETRY,
                    };
                    tracing::warn!(pod, attempts, retry_in = ?delay, error = %display_chain(&e), "writing {ANNOTATION}");
                    let next = Instant::now() + delay;
                    wake = Some(wake.map_or(next, |w| w.min(next)));
                    failing.insert(uid.clone(), Failing { attempts, next });
                }
            }
        }
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = plans.changed() => if changed.is_err() { return },
            _ = sleep => {}
        }
    }
}

/// Takes the annotation off every pod in `plan` (an uninstall: nothing of this node is captured
/// any more), all at once, each within `deadline`; returns how many were not cleared (and logs
/// why). The writer of [`run`] must be stopped first, or it would write them back.
pub async fn clear(kube: &kube::Client, plan: &BTreeMap<String, Wanted>, deadline: Duration) -> usize {
    let mut writes = tokio::task::JoinSet::new();
    for (uid, wanted) in plan {
        let (kube, uid) = (kube.clone(), uid.clone());
        let wanted = Wanted {
            value: None,
            ..wanted.clone()
        };
        writes.spawn(async move {
            let pod = format!("{}/{}", wanted.namespace, wanted.name);
            match tokio::time::timeout(deadline, write(&kube, &uid, &wanted)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) if gone(&e) => true,
                Ok(Err(e)) => {
                    tracing::warn!(pod, error = %display_chain(&e), "removing {ANNOTATION} at uninstall");
                    false
                }
                Err(_) => {
                    tracing::warn!(pod, ?deadline, "removing {ANNOTATION} at uninstall: no answer");
                    false
                }
            }
        });
    }
    let mut failed = 0;
    while let Some(cleared) = writes.join_next().await {
        failed += usize::from(!matches!(cleared, Ok(true)));
    }
    failed
}

/// The pod the write was for does not exist any more (404), or another one has its name (the
/// uid in the patch does not match: 409 or 422).
fn gone(e: &kube::Error) -> bool {
    use http::StatusCode;
    matches!(
        e.status(),
        Some(StatusCode::NOT_FOUND | StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY)
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_model::{Namespace, Pod, annotations};

    use super::*;

    #[test]
    fn each_pod_of_the_node_that_should_be_captured_says_whether_it_is() {
        let ambient = BTreeMap::from([(annotations::DATAPLANE_MODE.to_owned(), "ambient".to_owned())]);
        let opt_out = BTreeMap::from([(annotations::DATAPLANE_MODE.to_owned(), "none".to_owned())]);
        let marked = |v: &str| BTreeMap::from([(ANNOTATION.to_owned(), v.to_owned())]);
        let pod = |name: &str, ns: &str, node: &str, netns: bool, annotations: BTreeMap<String, String>| Pod {
            uid: format!("uid-{name}"),
            namespace: ns.into(),
            name: name.into(),
            node: node.into(),
            annotations,
            netns: netns.then(|| "/run/netns/x".into()),
            ..Pod::default()
        };
        let snapshot = WorkloadSnapshot {
            namespaces: vec![
                Namespace {
                    name: "mesh".into(),
                    annotations: ambient.clone(),
                },
                Namespace {
                    name: "plain".into(),
                    annotations: BTreeMap::new(),
                },
            ],
            pods: vec![
                pod("served", "mesh", "node1", true, marked("active")),
                pod("failing", "mesh", "node1", true, BTreeMap::new()),
                pod("pending", "mesh", "node1", true, BTreeMap::new()),
                pod("no-netns", "mesh", "node1", false, BTreeMap::new()),
                pod("opted-in", "plain", "node1", true, ambient),
                pod(
                    "opted-out",
                    "mesh",
                    "node1",
                    true,
                    opt_out.into_iter().chain(marked("active")).collect(),
                ),
                pod("left", "plain", "node1", true, marked("inactive: x")),
                pod("plain", "plain", "node1", true, BTreeMap::new()),
                pod("elsewhere", "mesh", "node2", true, BTreeMap::new()),
            ],
        };
        let served = |uid: &str| ["uid-served", "uid-opted-in"].contains(&uid);
        let failures = BTreeMap::from([(
            "uid-failing".to_owned(),
            "enrolling pod mesh/failing: binding 10.244.1.5:15008: Address already in use".to_owned(),
        )]);
        let plan = plan(&snapshot, "node1", served, &failures);
        let got: Vec<(&str, Option<&str>, Option<&str>)> = plan
            .iter()
            .map(|(uid, w)| (uid.as_str(), w.value.as_deref(), w.observed.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "uid-failing",
                    Some("inactive: enrolling pod mesh/failing: binding 10.244.1.5:15008: Address already in use"),
                    None
                ),
                ("uid-left", None, Some("inactive: x")),
                (
                    "uid-no-netns",
                    Some("inactive: its network namespace is unknown to the node agent (no CNI report for this pod)"),
                    None
                ),
                ("uid-opted-in", Some("active"), None),
                ("uid-opted-out", None, Some("active")),
                ("uid-pending", Some("inactive: not enrolled yet"), None),
                ("uid-served", Some("active"), Some("active")),
            ]
        );
    }

    #[tokio::test]
    async fn the_writer_writes_only_what_differs_from_the_pod_and_retries_a_failure() {
        let mut server = crate::kube::testing::Server::start("redirection").await;
        let wanted = |name: &str, value: Option<&str>, observed: Option<&str>| Wanted {
            namespace: "shop".into(),
            name: name.into(),
            value: value.map(str::to_owned),
            observed: observed.map(str::to_owned),
        };
        // cart already says so; web needs its value.
        let (plans, rx) = watch::channel(BTreeMap::from([
            ("u1".to_owned(), wanted("cart", Some(ACTIVE), Some(ACTIVE))),
            ("u2".to_owned(), wanted("web", Some(ACTIVE), None)),
        ]));
        let writer = tokio::spawn(run(server.client(), rx));
        let seen = server.next().await;
        assert_eq!(seen.uri, "/api/v1/namespaces/shop/pods/web/status");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&seen.body).expect("JSON"),
            patch("u2", Some(ACTIVE))
        );
        seen.answer(http::StatusCode::INTERNAL_SERVER_ERROR, r#"{"message":"etcd is away"}"#);
        // Retried after 2 s.
        let seen = server.next().await;
        assert_eq!(seen.uri, "/api/v1/namespaces/shop/pods/web/status");
        seen.answer(http::StatusCode::OK, "{}");

        // The source reports what was written: nothing to do. Then cart changes: one write.
        plans.send_replace(BTreeMap::from([
            ("u1".to_owned(), wanted("cart", Some(ACTIVE), Some(ACTIVE))),
            ("u2".to_owned(), wanted("web", Some(ACTIVE), Some(ACTIVE))),
        ]));
        plans.send_replace(BTreeMap::from([
            ("u1".to_owned(), wanted("cart", None, Some(ACTIVE))),
            ("u2".to_owned(), wanted("web", Some(ACTIVE), Some(ACTIVE))),
        ]));
        let seen = server.next().await;
        assert_eq!(seen.uri, "/api/v1/namespaces/shop/pods/cart/status");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&seen.body).expect("JSON"),
            patch("u1", None)
        );
        seen.answer(http::StatusCode::OK, "{}");
        let more = tokio::time::timeout(Duration::from_millis(1500), server.requests.recv()).await;
        assert!(more.is_err(), "nothing else to write");
        writer.abort();
    }

    #[tokio::test]
    async fn an_uninstall_clears_every_pods_annotation_and_counts_what_failed() {
        let mut server = crate::kube::testing::Server::start("redirection-clear").await;
        let wanted = |name: &str, value: Option<&str>| Wanted {
            namespace: "shop".into(),
            name: name.into(),
            value: value.map(str::to_owned),
            observed: Some(ACTIVE.to_owned()),
        };
        let plan = BTreeMap::from([
            ("u1".to_owned(), wanted("cart", Some(ACTIVE))),
            ("u2".to_owned(), wanted("web", Some("inactive: not enrolled yet"))),
            ("u3".to_owned(), wanted("gone", Some(ACTIVE))),
        ]);
        let client = server.client();
        let clearing = tokio::spawn(async move { clear(&client, &plan, Duration::from_secs(5)).await });
        let mut seen = BTreeMap::new();
        for _ in 0..3 {
            let request = server.next().await;
            let body: serde_json::Value = serde_json::from_slice(&request.body).expect("JSON");
            assert_eq!(
                body["metadata"]["annotations"][ANNOTATION],
                serde_json::Value::Null,
                "{body}"
            );
            let status = match request.uri.as_str() {
                "/api/v1/namespaces/shop/pods/web/status" => http::StatusCode::INTERNAL_SERVER_ERROR,
                "/api/v1/namespaces/shop/pods/gone/status" => http::StatusCode::NOT_FOUND,
                _ => http::StatusCode::OK,
            };
            seen.insert(request.uri.clone(), body["metadata"]["uid"].clone());
            request.answer(status, "{}");
        }
        assert_eq!(clearing.await.expect("clear"), 1, "web's write failed; gone is gone");
        // Each pod once, its patch naming its own uid.
        assert_eq!(
            seen,
            BTreeMap::from([
                (
                    "/api/v1/namespaces/shop/pods/cart/status".to_owned(),
                    serde_json::json!("u1")
                ),
                (
                    "/api/v1/namespaces/shop/pods/gone/status".to_owned(),
                    serde_json::json!("u3")
                ),
                (
                    "/api/v1/namespaces/shop/pods/web/status".to_owned(),
                    serde_json::json!("u2")
                ),
            ])
        );
    }

    #[test]
    fn the_patch_names_the_uid_and_removes_with_null() {
        assert_eq!(
            patch("u1", Some("active")),
            serde_json::json!({"metadata": {"uid": "u1", "annotations": {"weft.dev/redirection": "active"}}})
        );
        assert_eq!(
            patch("u1", None),
            serde_json::json!({"metadata": {"uid": "u1", "annotations": {"weft.dev/redirection": null}}})
        );
        assert_eq!(inactive(&"x".repeat(2000)).len(), "inactive: ".len() + MAX_REASON);
    }
}
