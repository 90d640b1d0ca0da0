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
    /// An object that did not change since the last build is the same `Arc` as then.
    pub objects: Vec<Arc<Object>>,
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

/// Builds the model, remembering across builds each plain object's conversion and the last valid
/// version of each custom resource.
#[derive(Debug, Default)]
pub struct Builder {
    /// By object: the namespaces', service accounts', services' and pods' conversions.
    converted: HashMap<ObjectRef, Conversion>,
    /// By object: the uid and the model object of the last version that was valid.
    last_valid: HashMap<ObjectRef, (String, Object)>,
    /// By object: the notes last given, so that each is given once.
    noted: HashMap<ObjectRef, Vec<String>>,
}

/// A plain object's conversion, kept while the object keeps its uid and `resourceVersion` (which
/// every write changes): a build converts only the objects that changed, and one that did not keeps
/// its `Arc`, so consecutive states share it and compare in time proportional to what changed.
/// Without a `resourceVersion` (never from an API server) an object is converted every time.
#[derive(Debug)]
struct Conversion {
    uid: Option<String>,
    version: Option<String>,
    /// The model object (`None`: not one, as a pod that is not a workload), or why there is none.
    outcome: Result<Option<Model>, Invalid>,
}

/// A plain object's model object, with the warnings its conversion gave.
#[derive(Debug)]
struct Model {
    object: Arc<Object>,
    warnings: Vec<String>,
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
        let mut converted = HashMap::with_capacity(self.converted.len());
        let mut plain = Plain {
            before: &mut self.converted,
            after: &mut converted,
        };
        plain.convert(&snapshot.namespaces, Kind::Namespace, |o| {
            convert::namespace(o).map(Some)
        });
        plain.convert(&snapshot.service_accounts, Kind::ServiceAccount, |o| {
            convert::service_account(o).map(Some)
        });
        plain.convert(&snapshot.services, Kind::Service, |o| convert::service(o).map(Some));
        plain.convert(&snapshot.pods, Kind::Pod, convert::pod);
        for (r, conversion) in &converted {
            match &conversion.outcome {
                Ok(Some(Model { object, warnings })) => {
                    if !warnings.is_empty() {
                        notes.entry(r.clone()).or_default().extend(warnings.iter().cloned());
                    }
                    objects.push(object.clone());
                }
                Ok(None) => {}
                Err(e) => notes
                    .entry(e.object.clone())
                    .or_default()
                    .push(format!("{}: left out of the model", e.problem)),
            }
        }
        // Deleted objects are forgotten with their conversions.
        self.converted = converted;

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
                    objects.push(Arc::new(object.clone()));
                    last_valid.insert(res.object.clone(), (uid, object.clone()));
                }
                Err(problem) => {
                    let kept = self
                        .last_valid
                        .remove(&res.object)
                        .filter(|(kept_uid, _)| *kept_uid == uid);
                    let message = match kept {
                        Some(kept) => {
                            objects.push(Arc::new(kept.1.clone()));
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

/// The plain objects' conversions: the last build's, and this one's.
struct Plain<'a> {
    before: &'a mut HashMap<ObjectRef, Conversion>,
    after: &'a mut HashMap<ObjectRef, Conversion>,
}

impl Plain<'_> {
    /// Converts the objects of one kind, taking over the last build's conversion of each that kept
    /// its uid and `resourceVersion`.
    fn convert<K: kube::Resource>(
        &mut self,
        objects: &[Arc<K>],
        kind: Kind,
        convert: impl Fn(&K) -> Result<Option<Converted>, Invalid>,
    ) {
        for o in objects {
            let meta = o.meta();
            let r = convert::object_ref(kind, meta);
            let same = |c: &Conversion| c.version.is_some() && c.version == meta.resource_version && c.uid == meta.uid;
            let conversion = match self.before.remove(&r) {
                Some(c) if same(&c) => c,
                _ => Conversion {
                    uid: meta.uid.clone(),
                    version: meta.resource_version.clone(),
                    outcome: convert(o).map(|c| {
                        c.map(|c| Model {
                            warnings: c.warnings.iter().map(|w| w.to_string()).collect(),
                            object: Arc::new(c.object),
                        })
                    }),
                },
            };
            self.after.insert(r, conversion);
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
