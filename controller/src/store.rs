//! The local store: Kubernetes-style objects applied from YAML, kept in memory, persisted to
//! `<state-dir>/store.json` after every commit and published to readers through a watch channel.
//!
//! Every change is all or nothing: a request is validated completely against the current state
//! first, then committed as one new revision (monotonic, persisted). A request that changes nothing
//! commits nothing and keeps the revision. One writer at a time; readers never wait for writers
//! (they hold an `Arc<State>` snapshot), and slow readers never hold writers up.

pub mod manifest;
pub mod objects;

use std::{
    collections::{BTreeSet, HashMap, hash_map::Entry},
    fmt, fs,
    hash::Hash,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use manifest::Invalid;
use manifest::{Document, Invalid as InvalidDoc};
pub use objects::{Kind, Object, ObjectRef};
use objects::{Pod, Service};
use weft_model::{peer_auth::PeerAuthentication, policy::AuthorizationPolicy};

/// The file name of the persisted store inside the state directory.
pub const FILE_NAME: &str = "store.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request does not validate; nothing was changed.
    #[error(transparent)]
    Invalid {
        #[from]
        invalid: Invalid,
    },
    /// A delete names an object that does not exist; nothing was changed.
    #[error("{at}")]
    NotFound { at: Invalid },
    #[error("cannot write {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is corrupt (move it away to start with an empty store)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot render YAML")]
    Render {
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error(
        "unknown kind {kind:?} (known: Namespace, ServiceAccount, Service, Pod, AuthorizationPolicy, PeerAuthentication)"
    )]
    UnknownKind { kind: String },
    #[error("no randomness for a pod uid")]
    Random,
}

/// What a successful apply or delete did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// One line per object: `pod default/web created`.
    pub results: Vec<String>,
    /// The store's revision after the request.
    pub revision: u64,
}

/// One consistent view of the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// The store's identity, a UUID fixed when the store is created and persisted with it: a store
    /// that was lost and started over has another one (agents then keep their last good state).
    pub id: String,
    pub revision: u64,
    /// A persistent map: a new state shares all it did not change with the one before (cloning is
    /// O(1), a change O(log n)), and two states compare in time proportional to what differs.
    objects: OrdMap<ObjectRef, Arc<Object>>,
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    path: PathBuf,
    /// Serializes writers; readers use `tx`.
    write: Mutex<()>,
    tx: watch::Sender<Arc<State>>,
}

// === impl Store ===

impl Store {
    /// Opens the store persisted in `state_dir` (empty at revision 0 when there is none yet).
    /// A file that does not parse is an error naming it: the store never starts over silently.
    pub fn open(state_dir: &Path) -> Result<Store, Error> {
        let path = state_dir.join(FILE_NAME);
        let state = match fs::read(&path) {
            Ok(bytes) => {
                let file: Persisted = serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt {
                    path: path.clone(),
                    source,
                })?;
                State {
                    id: file.id,
                    revision: file.revision,
                    objects: file
                        .objects
                        .into_iter()
                        .map(|o| (o.object_ref(), Arc::new(o)))
                        .collect(),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(Error::Read { path, source }),
        };
        let store = Store {
            path,
            write: Mutex::new(()),
            tx: watch::Sender::new(Arc::new(state)),
        };
        if store.snapshot().id.is_empty() {
            // A new store (or one written before stores had an identity): its identity is fixed now,
            // on disk before anyone is told it.
            let mut state = (*store.snapshot()).clone();
            state.id = random_uid()?;
            store.persist(&state)?;
            store.tx.send_replace(Arc::new(state));
        }
        Ok(store)
    }

    /// The current state.
    pub fn snapshot(&self) -> Arc<State> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every committed state (coalesced: a slow reader sees the latest).
    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.tx.subscribe()
    }

    /// Applies every object of a YAML stream, all or nothing. Besides each object being valid on its
    /// own, the new state must hold no two pods with one uid and no address twice (pod IPs and
    /// service VIPs share one space); an error names both objects. Blocking (it writes the file).
    pub fn apply(&self, yaml: &str, file: &str) -> Result<Outcome, Error> {
        let docs = manifest::parse(yaml, file)?;
        self.commit(|current| current.plan_apply(docs, file))
    }

    /// Deletes every object a YAML stream names, all or nothing; deleting a Namespace deletes what
    /// is in it. An object that does not exist is an error unless `ignore_not_found`. Blocking.
    pub fn delete(&self, yaml: &str, file: &str, ignore_not_found: bool) -> Result<Outcome, Error> {
        let docs = manifest::parse_refs(yaml, file)?;
        self.commit(|current| current.plan_delete(docs, file, ignore_not_found))
    }

    /// Objects as a YAML stream, namespaces first. `kind` is looked up like `kubectl get` does
    /// (`pods`, `svc`, ...); `namespace` limits namespaced kinds to one namespace (and Namespaces to
    /// that one).
    pub fn get(&self, kind: Option<&str>, namespace: Option<&str>) -> Result<String, Error> {
        let kind = match kind {
            None => None,
            Some(k) => Some(Kind::lookup(k).ok_or_else(|| Error::UnknownKind { kind: k.to_owned() })?),
        };
        let state = self.snapshot();
        let selected = state.objects.iter().filter(|(r, _)| {
            kind.is_none_or(|k| r.kind == k)
                && namespace.is_none_or(|ns| {
                    if r.kind.is_namespaced() {
                        r.namespace == ns
                    } else {
                        r.name == ns
                    }
                })
        });
        manifest::render(selected.map(|(_, o)| &**o)).map_err(|source| Error::Render { source })
    }

    /// Runs `plan` against the current state under the write lock; persists and publishes its new
    /// state, if it has one.
    fn commit(&self, plan: impl FnOnce(&State) -> Result<Plan, Error>) -> Result<Outcome, Error> {
        // A panic while holding the lock leaves nothing half-written (the state is only replaced
        // after persisting), so a poisoned lock is safe to take over.
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.snapshot();
        let Plan { results, next } = plan(&current)?;
        let Some(mut next) = next else {
            return Ok(Outcome {
                results,
                revision: current.revision,
            });
        };
        next.revision = current.revision + 1;
        self.persist(&next)?;
        let revision = next.revision;
        self.tx.send_replace(Arc::new(next));
        Ok(Outcome { results, revision })
    }

    /// Writes the state durably (write, fsync, rename, fsync of the directory).
    fn persist(&self, state: &State) -> Result<(), Error> {
        let err = |source| Error::Persist {
            path: self.path.clone(),
            source,
        };
        let file = PersistedRef {
            format: 1,
            id: &state.id,
            revision: state.revision,
            objects: state.objects.values().map(|o| &**o).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| err(io::Error::other(e)))?;
        weft_api::durable::write(&self.path, &bytes, 0o600).map_err(err)?;
        Ok(())
    }
}

/// The on-disk form of the store.
#[derive(Serialize, Deserialize)]
struct Persisted {
    format: u32,
    #[serde(default)]
    id: String,
    revision: u64,
    objects: Vec<Object>,
}

/// [`Persisted`], written from a state without copying its objects.
#[derive(Serialize)]
struct PersistedRef<'a> {
    format: u32,
    id: &'a str,
    revision: u64,
    objects: Vec<&'a Object>,
}

/// A planned change: result lines, and the new state (`None`: nothing changes).
struct Plan {
    results: Vec<String>,
    next: Option<State>,
}

// === impl State ===

impl State {
    /// A state of another source of the same model (the Kubernetes source). `id` names that source's
    /// store (agents follow one store and refuse pushes of another); `revision` orders its states and
    /// must not go back. An object whose reference repeats replaces the earlier one.
    pub fn new(id: String, revision: u64, objects: impl IntoIterator<Item = Object>) -> State {
        State {
            id,
            revision,
            objects: objects.into_iter().map(|o| (o.object_ref(), Arc::new(o))).collect(),
        }
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values().map(|o| &**o)
    }

    pub fn get(&self, r: &ObjectRef) -> Option<&Object> {
        self.objects.get(r).map(|o| &**o)
    }

    /// The objects that differ between `self` and `next`, as (before, after), in reference order:
    /// work proportional to the difference when `next` was made from `self` (or shares parts with
    /// it), as every state of one store is.
    pub fn changes<'a>(&'a self, next: &'a State) -> impl Iterator<Item = (Option<&'a Object>, Option<&'a Object>)> {
        use imbl::ordmap::DiffItem;
        self.objects.diff(&next.objects).map(|d| match d {
            DiffItem::Add(_, new) => (None, Some(&**new)),
            DiffItem::Update { old, new } => (Some(&*(*old.1)), Some(&*(*new.1))),
            DiffItem::Remove(_, old) => (Some(&**old), None),
        })
    }

    /// The objects of `kind` in `namespace`, by name.
    pub fn in_namespace<'a>(&'a self, kind: Kind, namespace: &'a str) -> impl Iterator<Item = &'a Object> {
        let start = ObjectRef {
            kind,
            namespace: namespace.to_owned(),
            name: String::new(),
        };
        self.objects
            .range(start..)
            .take_while(move |(r, _)| r.kind == kind && r.namespace == namespace)
            .map(|(_, o)| &**o)
    }

    /// The pods of `namespace`.
    pub fn pods_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Pod> {
        self.in_namespace(Kind::Pod, namespace).filter_map(|o| match o {
            Object::Pod(p) => Some(p),
            _ => None,
        })
    }

    /// The services of `namespace`.
    pub fn services_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Service> {
        self.in_namespace(Kind::Service, namespace).filter_map(|o| match o {
            Object::Service(s) => Some(s),
            _ => None,
        })
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &objects::Namespace> {
        self.objects.values().filter_map(|o| match &**o {
            Object::Namespace(n) => Some(n),
            _ => None,
        })
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.objects.values().filter_map(|o| match &**o {
            Object::Pod(p) => Some(p),
            _ => None,
        })
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.objects.values().filter_map(|o| match &**o {
            Object::Service(s) => Some(s),
            _ => None,
        })
    }

    pub fn policies(&self) -> impl Iterator<Item = &AuthorizationPolicy> {
        self.objects.values().filter_map(|o| match &**o {
            Object::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
    }

    pub fn peer_authentications(&self) -> impl Iterator<Item = &PeerAuthentication> {
        self.objects.values().filter_map(|o| match &**o {
            Object::PeerAuthentication(p) => Some(p),
            _ => None,
        })
    }

    fn plan_apply(&self, docs: Vec<Document<Object>>, file: &str) -> Result<Plan, Error> {
        let at = |index: usize, r: &ObjectRef, field: Option<String>, problem: String| InvalidDoc {
            file: file.to_owned(),
            document: Some(index),
            object: Some(r.to_string()),
            field,
            problem,
        };
        let mut seen: HashMap<ObjectRef, usize> = HashMap::new();
        let mut new_namespaces = BTreeSet::new();
        // Pod uids, and addresses (pod IPs and service VIPs share one space), held by the objects
        // this apply does not replace; then by the objects it applies, one by one.
        let replaced: BTreeSet<ObjectRef> = docs.iter().map(|d| d.item.object_ref()).collect();
        let mut uids: HashMap<String, Holder> = HashMap::new();
        let mut addresses: HashMap<IpAddr, Holder> = HashMap::new();
        // The namespace-wide PeerAuthentication of each namespace (at most one).
        let mut namespace_wide: HashMap<String, Holder> = HashMap::new();
        for (r, object) in self.objects.iter().filter(|(r, _)| !replaced.contains(r)) {
            let holder = || (r.clone(), None);
            match &**object {
                Object::Pod(p) => {
                    uids.insert(p.uid.clone(), holder());
                    addresses.extend(p.ips.iter().map(|ip| (*ip, holder())));
                }
                Object::Service(s) => addresses.extend(s.cluster_ips.iter().map(|ip| (*ip, holder()))),
                Object::PeerAuthentication(p) if p.is_namespace_wide() => {
                    namespace_wide.insert(r.namespace.clone(), holder());
                }
                _ => {}
            }
        }

        let mut next = self.clone();
        let mut results = Vec::with_capacity(docs.len());
        let mut changed = false;
        for Document {
            index,
            item: mut object,
        } in docs
        {
            let r = object.object_ref();
            if let Some(first) = seen.insert(r.clone(), index) {
                return Err(at(index, &r, None, format!("duplicate of document {first}")).into());
            }
            if r.kind.is_namespaced() {
                let ns_ref = namespace_ref(&r.namespace);
                if !self.objects.contains_key(&ns_ref) && !new_namespaces.contains(&r.namespace) {
                    return Err(at(
                        index,
                        &r,
                        Some("metadata.namespace".into()),
                        format!(
                            "namespace {:?} does not exist (apply it first, or earlier in the same file)",
                            r.namespace
                        ),
                    )
                    .into());
                }
            } else {
                new_namespaces.insert(r.name.clone());
            }
            if let Object::Pod(pod) = &mut object
                && pod.uid.is_empty()
            {
                pod.uid = match self.objects.get(&r).map(|o| &**o) {
                    Some(Object::Pod(old)) => old.uid.clone(),
                    _ => random_uid()?,
                };
            }
            let holder = || (r.clone(), Some(index));
            let in_use = |field: String, problem: String| Error::from(at(index, &r, Some(field), problem));
            match &object {
                Object::Pod(pod) => {
                    claim(&mut uids, pod.uid.clone(), holder()).map_err(|p| in_use("metadata.uid".into(), p))?;
                    for (i, ip) in pod.ips.iter().enumerate() {
                        claim(&mut addresses, *ip, holder())
                            .map_err(|p| in_use(format!("status.podIPs[{i}].ip"), p))?;
                    }
                }
                Object::Service(service) => {
                    for (i, ip) in service.cluster_ips.iter().enumerate() {
                        claim(&mut addresses, *ip, holder()).map_err(|p| in_use(format!("spec.clusterIPs[{i}]"), p))?;
                    }
                }
                // Istio would pick the oldest of two; Weft has no creation time, and says so.
                Object::PeerAuthentication(p) if p.is_namespace_wide() => {
                    if let Some((other, document)) = namespace_wide.get(&r.namespace) {
                        let where_ = document.map(|d| format!(" (document {d})")).unwrap_or_default();
                        return Err(in_use(
                            "spec.selector".into(),
                            format!(
                                "namespace {:?} already has a PeerAuthentication without a selector, {other}{where_}: a namespace (the root namespace: the mesh) has at most one",
                                r.namespace
                            ),
                        ));
                    }
                    namespace_wide.insert(r.namespace.clone(), holder());
                }
                _ => {}
            }
            let verb = match self.objects.get(&r) {
                Some(old) if **old == object => "unchanged",
                Some(_) => "configured",
                None => "created",
            };
            changed |= verb != "unchanged";
            results.push(r.result_line(verb));
            next.objects.insert(r, Arc::new(object));
        }
        Ok(Plan {
            results,
            next: changed.then_some(next),
        })
    }

    fn plan_delete(&self, docs: Vec<Document<ObjectRef>>, file: &str, ignore_not_found: bool) -> Result<Plan, Error> {
        let mut seen: HashMap<ObjectRef, usize> = HashMap::new();
        let mut doomed: Vec<ObjectRef> = Vec::new();
        for Document { index, item: r } in docs {
            let at = |problem: String| InvalidDoc {
                file: file.to_owned(),
                document: Some(index),
                object: Some(r.to_string()),
                field: None,
                problem,
            };
            if let Some(first) = seen.insert(r.clone(), index) {
                return Err(at(format!("duplicate of document {first}")).into());
            }
            if self.objects.contains_key(&r) {
                doomed.push(r);
            } else if !ignore_not_found {
                return Err(Error::NotFound {
                    at: at("not found".into()),
                });
            }
        }
        // Objects in deleted namespaces go too, after what was named.
        let namespaces: BTreeSet<&str> = doomed
            .iter()
            .filter(|r| r.kind == Kind::Namespace)
            .map(|r| r.name.as_str())
            .collect();
        let cascade: Vec<ObjectRef> = self
            .objects
            .keys()
            .filter(|r| r.kind.is_namespaced() && namespaces.contains(r.namespace.as_str()) && !seen.contains_key(r))
            .cloned()
            .collect();
        doomed.extend(cascade);
        let mut next = self.clone();
        let results = doomed
            .iter()
            .map(|r| {
                next.objects.remove(r);
                r.result_line("deleted")
            })
            .collect();
        Ok(Plan {
            results,
            next: (!doomed.is_empty()).then_some(next),
        })
    }
}

/// Who holds a pod uid or an address: the object, and the document of this apply that set it
/// (`None`: the stored object).
type Holder = (ObjectRef, Option<usize>);

/// Records `holder` as the holder of `key`, or says who holds it already.
fn claim<K: Eq + Hash + fmt::Display>(taken: &mut HashMap<K, Holder>, key: K, holder: Holder) -> Result<(), String> {
    match taken.entry(key) {
        Entry::Occupied(e) => {
            let (other, document) = e.get();
            let where_ = document.map(|d| format!(" (document {d})")).unwrap_or_default();
            Err(format!("{} is already used by {other}{where_}", e.key()))
        }
        Entry::Vacant(e) => {
            e.insert(holder);
            Ok(())
        }
    }
}

fn namespace_ref(name: &str) -> ObjectRef {
    ObjectRef {
        kind: Kind::Namespace,
        namespace: String::new(),
        name: name.to_owned(),
    }
}

/// A random (version 4) UUID, the form Kubernetes uses for uids.
fn random_uid() -> Result<String, Error> {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Error::Random)?;
    Ok(weft_model::workload::uuid_v4(b))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod peer_auth_tests;
