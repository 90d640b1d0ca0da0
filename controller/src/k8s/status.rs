//! The `Accepted` condition of Weft's custom resources: what the source decided for each
//! ([`Conditions`]) and the writer that puts it into `status.conditions` ([`StatusWriter`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, SystemTime},
};

use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::watch;

use super::crd::{self, ACCEPTED};
use crate::store::{Kind, ObjectRef, manifest::FieldProblem};

/// `reason` of an accepted resource.
pub const REASON_VALID: &str = "Valid";
/// `reason` of a refused one.
pub const REASON_INVALID: &str = "Invalid";

/// How long a write that failed for another reason than a conflict waits before it is tried again.
const RETRY: Duration = Duration::from_secs(2);

/// The verdict on every custom resource the source holds, by object.
pub type Conditions = BTreeMap<ObjectRef, Verdict>;

/// What one resource's `Accepted` condition should say, and what it says now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub uid: String,
    /// Of the version the verdict is on: a write is made against it, and fails (conflict) if the
    /// resource changed since (the source then decides again).
    pub resource_version: String,
    /// The condition to write, without `lastTransitionTime` (set when written).
    pub desired: crd::Condition,
    /// The `Accepted` condition the resource carries.
    pub current: Option<crd::Condition>,
}

impl Verdict {
    /// The verdict on a resource of `generation`: accepted, or refused for `problem`.
    pub fn new(
        uid: String,
        resource_version: String,
        generation: Option<i64>,
        verdict: Result<(), &FieldProblem>,
        current: Option<crd::Condition>,
    ) -> Verdict {
        let (status, reason, message) = match verdict {
            Ok(()) => ("True", REASON_VALID, String::new()),
            Err(problem) => ("False", REASON_INVALID, problem.to_string()),
        };
        Verdict {
            uid,
            resource_version,
            desired: crd::Condition {
                type_: ACCEPTED.to_owned(),
                status: status.to_owned(),
                reason: reason.to_owned(),
                message,
                last_transition_time: None,
                observed_generation: generation,
            },
            current,
        }
    }

    /// Whether the resource's condition differs from the desired one in type, status, reason,
    /// message or observed generation (the transition time alone is no change).
    pub fn needs_write(&self) -> bool {
        let Some(c) = &self.current else {
            return true;
        };
        let d = &self.desired;
        (&c.type_, &c.status, &c.reason, &c.message, c.observed_generation)
            != (&d.type_, &d.status, &d.reason, &d.message, d.observed_generation)
    }

    /// The condition as written at `now`: the transition time is kept while the status stays.
    fn to_write(&self, now: SystemTime) -> crd::Condition {
        let kept = self
            .current
            .as_ref()
            .filter(|c| c.status == self.desired.status)
            .and_then(|c| c.last_transition_time.clone());
        crd::Condition {
            last_transition_time: Some(kept.unwrap_or_else(|| humantime::format_rfc3339_seconds(now).to_string())),
            ..self.desired.clone()
        }
    }
}

/// The `Accepted` condition of a resource's status, if it has one.
pub fn accepted(status: Option<&crd::Status>) -> Option<crd::Condition> {
    status?.conditions.iter().find(|c| c.type_ == ACCEPTED).cloned()
}

/// Writes each resource's `Accepted` condition (a merge patch of `status.conditions` through the
/// status subresource), only when it differs from the one the resource carries
/// ([`Verdict::needs_write`]), and only while this replica is the writer.
pub struct StatusWriter;

/// The longest field manager name the API server takes.
const MAX_FIELD_MANAGER: usize = 128;

impl StatusWriter {
    /// Runs until `conditions` is closed (the source stopped). Writes only while `is_leader` is
    /// true (leader election decides it; a replica that is not the leader writes nothing, so
    /// replicas do not fight over a status); a closed `is_leader` keeps its last value. Each write is conditional on the resource version the verdict
    /// was made on: a resource changed since is not overwritten with a stale verdict (the source
    /// decides again and the writer gets the new one). A write that fails otherwise is retried
    /// after a short delay; a resource that is gone is skipped. Writes are made as field manager
    /// `manager` (cut to 128 bytes), which names the replica in each resource's `managedFields`.
    pub async fn run(
        client: Client,
        mut conditions: watch::Receiver<Arc<Conditions>>,
        mut is_leader: watch::Receiver<bool>,
        manager: &str,
    ) {
        let mut manager = manager.to_owned();
        while manager.len() > MAX_FIELD_MANAGER {
            manager.pop();
        }
        let params = PatchParams {
            field_manager: Some(manager).filter(|m| !m.is_empty()),
            ..PatchParams::default()
        };
        // What this replica wrote and the watch has not shown back yet, so as not to write it twice.
        let mut written: HashMap<ObjectRef, (String, crd::Condition)> = HashMap::new();
        let mut leader_open = true;
        loop {
            let leader = *is_leader.borrow_and_update();
            let mut failed = false;
            if leader {
                let current = conditions.borrow_and_update().clone();
                written.retain(|r, _| current.contains_key(r));
                for (r, verdict) in current.iter() {
                    if !verdict.needs_write() {
                        written.remove(r);
                        continue;
                    }
                    let token = (verdict.resource_version.clone(), verdict.desired.clone());
                    if written.get(r) == Some(&token) {
                        continue;
                    }
                    match write(&client, &params, r, verdict).await {
                        Ok(()) => {
                            tracing::debug!(object = %r, status = verdict.desired.status, "wrote the Accepted condition");
                            written.insert(r.clone(), token);
                        }
                        Err(WriteError::Stale) => {
                            tracing::debug!(object = %r, "changed since the verdict: waiting for the new one");
                        }
                        Err(WriteError::Other(e)) => {
                            tracing::warn!(object = %r, error = %e, "cannot write the Accepted condition; retrying");
                            failed = true;
                        }
                    }
                }
            } else {
                written.clear();
            }
            tokio::select! {
                changed = conditions.changed() => if changed.is_err() { return },
                changed = is_leader.changed(), if leader_open => leader_open = changed.is_ok(),
                () = tokio::time::sleep(RETRY), if failed => {}
            }
        }
    }
}

enum WriteError {
    /// The resource is gone or changed since the verdict.
    Stale,
    Other(kube::Error),
}

async fn write(client: &Client, params: &PatchParams, r: &ObjectRef, verdict: &Verdict) -> Result<(), WriteError> {
    let patch = json!({
        "metadata": {"resourceVersion": verdict.resource_version},
        "status": {"conditions": [verdict.to_write(SystemTime::now())]},
    });
    let result = match r.kind {
        Kind::AuthorizationPolicy => Api::<crd::AuthorizationPolicy>::namespaced(client.clone(), &r.namespace)
            .patch_status(&r.name, params, &Patch::Merge(&patch))
            .await
            .map(drop),
        Kind::PeerAuthentication => Api::<crd::PeerAuthentication>::namespaced(client.clone(), &r.namespace)
            .patch_status(&r.name, params, &Patch::Merge(&patch))
            .await
            .map(drop),
        // The source gives verdicts on custom resources only.
        _ => return Ok(()),
    };
    match result {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Err(WriteError::Stale),
        Err(e) => Err(WriteError::Other(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(status: &str, message: &str, generation: i64, ltt: &str) -> crd::Condition {
        crd::Condition {
            type_: ACCEPTED.into(),
            status: status.into(),
            reason: if status == "True" { REASON_VALID } else { REASON_INVALID }.into(),
            message: message.into(),
            last_transition_time: Some(ltt.into()),
            observed_generation: Some(generation),
        }
    }

    fn refused(field: &str) -> FieldProblem {
        FieldProblem {
            field: Some(field.into()),
            problem: "must not be empty".into(),
        }
    }

    #[test]
    fn a_condition_is_written_only_when_it_changed_beyond_its_time() {
        let t = "2025-01-01T00:00:00Z";
        let v = |verdict: Result<(), &FieldProblem>, generation: i64, current: Option<crd::Condition>| {
            Verdict::new("u".into(), "7".into(), Some(generation), verdict, current)
        };
        let p = refused("spec.rules[0].from");
        assert!(v(Ok(()), 1, None).needs_write(), "no condition yet");
        assert!(!v(Ok(()), 1, Some(condition("True", "", 1, t))).needs_write());
        assert!(!v(Ok(()), 1, Some(condition("True", "", 1, "2030-01-01T00:00:00Z"))).needs_write());
        assert!(
            v(Ok(()), 2, Some(condition("True", "", 1, t))).needs_write(),
            "new generation"
        );
        assert!(v(Err(&p), 1, Some(condition("True", "", 1, t))).needs_write(), "status");
        assert!(
            !v(
                Err(&p),
                1,
                Some(condition("False", "spec.rules[0].from: must not be empty", 1, t))
            )
            .needs_write()
        );
        assert!(
            v(
                Err(&p),
                1,
                Some(condition("False", "spec.rules[1].from: must not be empty", 1, t))
            )
            .needs_write(),
            "message"
        );
    }

    #[test]
    fn the_transition_time_moves_only_with_the_status() {
        let t = "2025-01-01T00:00:00Z";
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let p = refused("spec.rules[0].from");
        let same_status = Verdict::new(
            "u".into(),
            "7".into(),
            Some(2),
            Err(&p),
            Some(condition("False", "old", 1, t)),
        );
        let written = same_status.to_write(now);
        assert_eq!(written.last_transition_time.as_deref(), Some(t));
        assert_eq!(written.message, "spec.rules[0].from: must not be empty");
        assert_eq!(written.observed_generation, Some(2));
        let flipped = Verdict::new(
            "u".into(),
            "7".into(),
            Some(2),
            Ok(()),
            Some(condition("False", "old", 1, t)),
        );
        assert_eq!(
            flipped.to_write(now).last_transition_time.as_deref(),
            Some("2027-01-15T08:00:00Z")
        );
    }
}
