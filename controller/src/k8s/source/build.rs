//! The model from what the watchers hold: a pure function of the objects and of what this replica
//! accepted before ([`Builder`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use k8s_openapi::api::core::v1 as core;
use kube::{Resource as _, core::DeserializeGuard};

use super::super::{
    convert::{self, Converted, Invalid},
    crd,
    status::{self, Conditions, Verdict},
};
use crate::store::{Kind, Object, ObjectRef, manifest::FieldProblem};

/// Everything the watchers hold at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub namespaces: Vec<Arc<core::Namespace>>,
    pub pods: Vec<Arc<core::Pod>>,
    pub services: Vec<Arc<core::Service>>,
    pub service_accounts: Vec<Arc<core::ServiceAccount>>,
    pub policies: Vec<Arc<DeserializeGuard<crd::AuthorizationPolicy>>>,
    pub peer_authentications: Vec<Arc<DeserializeGuard<crd::PeerAuthentication>>>,
}

/// One build's result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Built {
    pub objects: Vec<Object>,
    /// The verdict on every custom resource, valid or not.
    pub conditions: Conditions,
    /// What to tell the operator about objects, new since the last build: an object's notes are
    /// given again only when they change.
    pub notes: Vec<Note>,
}

/// Something wrong with an object (left out of the model, partly or wholly, or kept at its last
/// valid version), for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub object: ObjectRef,
    pub message: String,
}

/// Builds the model, remembering across builds the last valid version of each custom resource.
#[derive(Debug, Default)]
pub struct Builder {
    /// By object: the uid and the model object of the last version that was valid.
    last_valid: HashMap<ObjectRef, (String, Object)>,
    /// By object: the notes last given, so that each is given once.
    noted: HashMap<ObjectRef, Vec<String>>,
}

/// One custom resource as the watch holds it, whichever kind.
struct Resource<'a> {
    object: ObjectRef,
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    /// The model object, or why there is none.
    read: Result<Object, FieldProblem>,
    current: Option<crd::Condition>,
}

impl Builder {
    /// The model of `snapshot`:
    ///
    /// - namespaces, service accounts and services, each as [`convert`] reads it; pods that are
    ///   mesh workloads ([`convert::pod`]). An object that cannot be read is left out (noted);
    /// - AuthorizationPolicies and PeerAuthentications that validate. One that does not is not in
    ///   the model as written, ever (nothing is half-applied); if this replica saw a valid version of
    ///   it (same uid) before, that version stays enforced (noted). Every resource gets a verdict;
    /// - at most one PeerAuthentication without a selector per namespace, as in the local store:
    ///   the oldest (then the first by name) is accepted, any other is refused naming it.
    pub fn build(&mut self, snapshot: &Snapshot) -> Built {
        let mut objects = Vec::new();
        let mut notes: BTreeMap<ObjectRef, Vec<String>> = BTreeMap::new();
        let mut take = |result: Result<Option<Converted>, Invalid>, r: ObjectRef| match result {
            Ok(Some(c)) => {
                if !c.warnings.is_empty() {
                    let ws = c.warnings.iter().map(|w| w.to_string());
                    notes.entry(r).or_default().extend(ws);
                }
                objects.push(c.object);
            }
            Ok(None) => {}
            Err(e) => notes
                .entry(e.object.clone())
                .or_default()
                .push(format!("{}: left out of the model", e.problem)),
        };
        for ns in &snapshot.namespaces {
            take(
                convert::namespace(ns).map(Some),
                convert::object_ref(Kind::Namespace, &ns.metadata),
            );
        }
        for sa in &snapshot.service_accounts {
            take(
                convert::service_account(sa).map(Some),
                convert::object_ref(Kind::ServiceAccount, &sa.metadata),
            );
        }
        for svc in &snapshot.services {
            take(
                convert::service(svc).map(Some),
                convert::object_ref(Kind::Service, &svc.metadata),
            );
        }
        for pod in &snapshot.pods {
            take(convert::pod(pod), convert::object_ref(Kind::Pod, &pod.metadata));
        }

        let resources = custom_resources(snapshot);
        let mut accepted: BTreeMap<ObjectRef, Result<Object, FieldProblem>> = resources
            .iter()
            .map(|res| (res.object.clone(), res.read.clone()))
            .collect();
        refuse_second_namespace_wide(&resources, &mut accepted);

        let mut conditions = Conditions::new();
        let mut last_valid = HashMap::new();
        for res in &resources {
            let uid = res.meta.uid.clone().unwrap_or_default();
            // Every resource has an entry (made from this same list just above).
            let Some(verdict) = accepted.get(&res.object) else {
                continue;
            };
            conditions.insert(
                res.object.clone(),
                Verdict::new(
                    uid.clone(),
                    res.meta.resource_version.clone().unwrap_or_default(),
                    res.meta.generation,
                    verdict.as_ref().map(drop),
                    res.current.clone(),
                ),
            );
            match verdict {
                Ok(object) => {
                    objects.push(object.clone());
                    last_valid.insert(res.object.clone(), (uid, object.clone()));
                }
                Err(problem) => {
                    let kept = self
                        .last_valid
                        .remove(&res.object)
                        .filter(|(kept_uid, _)| *kept_uid == uid);
                    let message = match kept {
                        Some(kept) => {
                            objects.push(kept.1.clone());
                            last_valid.insert(res.object.clone(), kept);
                            format!("{problem}: the last valid version stays enforced")
                        }
                        None => format!("{problem}: not enforced"),
                    };
                    notes.entry(res.object.clone()).or_default().push(message);
                }
            }
        }
        // Deleted resources are forgotten with their last valid version.
        self.last_valid = last_valid;

        let mut new_notes = Vec::new();
        for (object, messages) in &notes {
            if self.noted.get(object) != Some(messages) {
                new_notes.extend(messages.iter().map(|m| Note {
                    object: object.clone(),
                    message: m.clone(),
                }));
            }
        }
        self.noted = notes.into_iter().collect();
        Built {
            objects,
            conditions,
            notes: new_notes,
        }
    }
}

/// Both kinds of custom resource, read by the local store's rules.
fn custom_resources(snapshot: &Snapshot) -> Vec<Resource<'_>> {
    let mut out = read_all(
        &snapshot.policies,
        Kind::AuthorizationPolicy,
        convert::authorization_policy,
        |cr| cr.status.as_ref(),
    );
    out.extend(read_all(
        &snapshot.peer_authentications,
        Kind::PeerAuthentication,
        convert::peer_authentication,
        |cr| cr.status.as_ref(),
    ));
    out
}

/// Each custom resource of one kind: its model object (or why there is none) and its current
/// `Accepted` condition. One that could not even be deserialized is refused as unreadable.
fn read_all<'a, K>(
    guards: &'a [Arc<DeserializeGuard<K>>],
    kind: Kind,
    convert: fn(&K) -> Result<Object, Invalid>,
    status: fn(&K) -> Option<&crd::Status>,
) -> Vec<Resource<'a>>
where
    K: kube::Resource,
{
    guards
        .iter()
        .map(|guard| {
            let object = convert::object_ref(kind, guard.meta());
            match &guard.0 {
                Ok(cr) => Resource {
                    object,
                    meta: cr.meta(),
                    read: convert(cr).map_err(|e| e.problem),
                    current: status::accepted(status(cr)),
                },
                Err(e) => Resource {
                    object,
                    meta: &e.metadata,
                    read: Err(FieldProblem {
                        field: None,
                        problem: format!("cannot be read: {}", e.error),
                    }),
                    current: None,
                },
            }
        })
        .collect()
}

/// A namespace has at most one PeerAuthentication without a selector: among the valid ones, the
/// oldest (then the first by name) stays; any other is refused with the local store's words.
fn refuse_second_namespace_wide(
    resources: &[Resource<'_>],
    accepted: &mut BTreeMap<ObjectRef, Result<Object, FieldProblem>>,
) {
    let mut by_namespace: BTreeMap<&str, Vec<&Resource<'_>>> = BTreeMap::new();
    for res in resources {
        if let Some(Ok(Object::PeerAuthentication(p))) = accepted.get(&res.object)
            && p.is_namespace_wide()
        {
            by_namespace.entry(res.object.namespace.as_str()).or_default().push(res);
        }
    }
    for (namespace, mut wide) in by_namespace {
        wide.sort_by(|a, b| {
            (&a.meta.creation_timestamp, &a.object.name).cmp(&(&b.meta.creation_timestamp, &b.object.name))
        });
        let Some((first, others)) = wide.split_first() else {
            continue;
        };
        let others: BTreeSet<&ObjectRef> = others.iter().map(|r| &r.object).collect();
        for other in others {
            accepted.insert(
                other.clone(),
                Err(FieldProblem {
                    field: Some("spec.selector".into()),
                    problem: format!(
                        "namespace {namespace:?} already has a PeerAuthentication without a selector, {}: a namespace (the root namespace: the mesh) has at most one",
                        first.object
                    ),
                }),
            );
        }
    }
}

#[cfg(test)]
mod tests;
