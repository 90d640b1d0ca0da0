//! The local store: Kubernetes-style objects applied from YAML, kept in memory, persisted in the
//! state directory and published to readers through a watch channel.
//!
//! Every change is all or nothing: a request is validated completely against the current state
//! first, then committed as one new revision (monotonic, persisted). A request that changes nothing
//! commits nothing and keeps the revision. One writer at a time; readers never wait for writers
//! (they hold an `Arc<State>` snapshot), and slow readers never hold writers up.
//!
//! A commit costs what it changes, not the size of the store. Validation looks up the objects of
//! the request in indexes kept in every state beside the objects (pod uids, addresses, each
//! namespace's namespace-wide PeerAuthentication: `index.rs`), updated by each commit. Persistence
//! appends one record per commit to a write-ahead log, `store.log`, beside the snapshot,
//! `store.json`, which a thread rewrites now and then (compaction) so that the log stays smaller
//! than the snapshot; a store written before the log existed (the snapshot alone) opens as it is.
//! The files, their format and why a crash loses no acknowledged revision: `disk.rs`.

mod disk;
mod index;
pub mod manifest;
pub mod objects;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt,
    hash::Hash,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use imbl::OrdMap;
use tokio::sync::watch;

pub use disk::{LOG_NAME, LogProblem};
use index::Index;
pub use manifest::Invalid;
use manifest::{Document, Invalid as InvalidDoc};
pub use objects::{Kind, Object, ObjectRef};
use objects::{Pod, Service};
use weft_model::{peer_auth::PeerAuthentication, policy::AuthorizationPolicy};

/// The file name of the store's snapshot inside the state directory (its log: [`LOG_NAME`]).
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
    /// A record of the log, not its last, is damaged or out of place. (A damaged last record is
    /// what a crash while appending leaves: it is cut, not an error.)
    #[error("{path}: record {record} is corrupt (move it and store.json away to start with an empty store)")]
    LogCorrupt {
        path: PathBuf,
        /// 1-based: the line of the file.
        record: usize,
        #[source]
        problem: LogProblem,
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
#[derive(Clone, Debug, Default)]
pub struct State {
    /// The store's identity, a UUID fixed when the store is created and persisted with it: a store
    /// that was lost and started over has another one (agents then keep their last good state).
    pub id: String,
    pub revision: u64,
    /// A persistent map: a new state shares all it did not change with the one before (cloning is
    /// O(1), a change O(log n)), and two states compare in time proportional to what differs.
    objects: OrdMap<ObjectRef, Arc<Object>>,
    /// Who holds what must be unique, kept up to date with `objects` by [`put`](State::put) and
    /// [`remove`](State::remove) (the only ways they change).
    index: Index,
}

/// Two states are equal when they hold the same objects at the same revision of the same store
/// (the index follows from the objects).
impl PartialEq for State {
    fn eq(&self, other: &State) -> bool {
        self.id == other.id && self.revision == other.revision && self.objects == other.objects
    }
}

impl Eq for State {}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    /// The log of commits, whose lock also serializes writers; readers use `tx`.
    log: Arc<Mutex<disk::Log>>,
    tx: watch::Sender<Arc<State>>,
}

// === impl Store ===

impl Store {
    /// Opens the store persisted in `state_dir` (empty at revision 0 when there is none yet, with
    /// its identity on disk before this returns). A snapshot that does not parse, or a log record
    /// that is damaged before the log's end, is an error naming the file: the store never starts
    /// over silently. A torn last record (a crash while it was appended) is cut.
    pub fn open(state_dir: &Path) -> Result<Store, Error> {
        Store::open_with(state_dir, disk::COMPACT_AFTER)
    }

    /// [`open`](Store::open), compacting once the log is larger than `compact_after` bytes and the
    /// snapshot.
    fn open_with(state_dir: &Path, compact_after: u64) -> Result<Store, Error> {
        let (state, log) = disk::open(state_dir, compact_after)?;
        Ok(Store {
            log: Arc::new(Mutex::new(log)),
            tx: watch::Sender::new(Arc::new(state)),
        })
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
    /// service VIPs share one space); an error names both objects. Blocking (it writes the log).
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

    /// Runs `plan` against the current state under the write lock; logs and publishes its new
    /// state, if it has one (once its record is on disk), then starts a compaction if one is due.
    fn commit(&self, plan: impl FnOnce(&State) -> Result<Plan, Error>) -> Result<Outcome, Error> {
        let mut log = disk::lock(&self.log);
        let current = self.snapshot();
        let Plan { results, next } = plan(&current)?;
        let Some(mut next) = next else {
            return Ok(Outcome {
                results,
                revision: current.revision,
            });
        };
        next.revision = current.revision + 1;
        log.append(&current, &next)?;
        let next = Arc::new(next);
        self.tx.send_replace(next.clone());
        log.compact_if_due(&self.log, &next);
        Ok(Outcome {
            results,
            revision: next.revision,
        })
    }
}

/// A store that goes away (the controller's clean shutdown) waits for a compaction under way and
/// compacts what its log holds: `store.json` then holds the whole store. Failures are logged; the
/// log keeps every revision.
impl Drop for Store {
    fn drop(&mut self) {
        disk::close(&self.log, &self.snapshot());
    }
}

/// A planned change: result lines, and the new state (`None`: nothing changes).
struct Plan {
    results: Vec<String>,
    next: Option<State>,
}

// === impl State ===

impl State {
    /// A state of another source of the same model (the Kubernetes source), or the store's as read
    /// from its snapshot. `id` names that source's store (agents follow one store and refuse pushes
    /// of another); `revision` orders its states and must not go back. An object whose reference
    /// repeats replaces the earlier one.
    pub fn new(id: String, revision: u64, objects: impl IntoIterator<Item = Object>) -> State {
        let objects: OrdMap<ObjectRef, Arc<Object>> =
            objects.into_iter().map(|o| (o.object_ref(), Arc::new(o))).collect();
        let index = Index::of(objects.values());
        State {
            id,
            revision,
            objects,
            index,
        }
    }

    /// The next state of another source (the Kubernetes source), holding exactly `objects`, made
    /// from this one: an object equal to the one it replaces (the same `Arc`, when the source keeps
    /// what did not change) stays as it was, so the two states share everything but the difference,
    /// and [`changes`](State::changes) between them, like each step of the index, costs what
    /// changed. Comparing costs a map lookup per object (no deep comparison of the same `Arc`).
    pub fn succeeded_by(&self, id: String, revision: u64, objects: impl IntoIterator<Item = Arc<Object>>) -> State {
        let mut next = self.clone();
        next.id = id;
        next.revision = revision;
        let mut present = HashSet::with_capacity(self.objects.len());
        for object in objects {
            let r = object.object_ref();
            if self.objects.get(&r) != Some(&object) {
                next.put(object);
            }
            present.insert(r);
        }
        let gone: Vec<ObjectRef> = self.objects.keys().filter(|r| !present.contains(*r)).cloned().collect();
        for r in &gone {
            next.remove(r);
        }
        next
    }

    /// Stores `object`, replacing the one of its reference if there is one, and updates the index.
    fn put(&mut self, object: Arc<Object>) {
        let r = object.object_ref();
        if let Some(old) = self.objects.get(&r) {
            self.index.remove(old);
        }
        self.index.insert(&object);
        self.objects.insert(r, object);
    }

    /// Removes the object `r` names, if there is one, and updates the index.
    fn remove(&mut self, r: &ObjectRef) {
        if let Some(old) = self.objects.remove(r) {
            self.index.remove(&old);
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

    /// Plans an apply: every document is checked against the state's index and the documents
    /// before it, so the work is proportional to the request.
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
        // What the stored objects this apply replaces hold is free for the apply's objects; what the
        // others hold is taken. The apply's objects take what they hold, one by one.
        let replaced: BTreeSet<ObjectRef> = docs.iter().map(|d| d.item.object_ref()).collect();
        let mut uids = Claims::new(&self.index.uids, &replaced);
        let mut addresses = Claims::new(&self.index.addresses, &replaced);
        // The namespace-wide PeerAuthentication of each namespace (at most one).
        let mut namespace_wide = Claims::new(&self.index.namespace_wide, &replaced);

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
                    uids.claim(pod.uid.clone(), holder())
                        .map_err(|p| in_use("metadata.uid".into(), p))?;
                    for (i, ip) in pod.ips.iter().enumerate() {
                        addresses
                            .claim(*ip, holder())
                            .map_err(|p| in_use(format!("status.podIPs[{i}].ip"), p))?;
                    }
                }
                Object::Service(service) => {
                    for (i, ip) in service.cluster_ips.iter().enumerate() {
                        addresses
                            .claim(*ip, holder())
                            .map_err(|p| in_use(format!("spec.clusterIPs[{i}]"), p))?;
                    }
                }
                // Istio would pick the oldest of two; Weft has no creation time, and says so.
                Object::PeerAuthentication(p) if p.is_namespace_wide() => {
                    if let Some(other) = namespace_wide.holder(&r.namespace) {
                        return Err(in_use(
                            "spec.selector".into(),
                            format!(
                                "namespace {:?} already has a PeerAuthentication without a selector, {}: a namespace (the root namespace: the mesh) has at most one",
                                r.namespace,
                                describe(&other)
                            ),
                        ));
                    }
                    namespace_wide.take(r.namespace.clone(), holder());
                }
                _ => {}
            }
            let verb = match self.objects.get(&r) {
                Some(old) if **old == object => "unchanged",
                Some(_) => "configured",
                None => "created",
            };
            results.push(r.result_line(verb));
            if verb != "unchanged" {
                changed = true;
                next.put(Arc::new(object));
            }
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
        // Objects in deleted namespaces go too, after what was named, in reference order.
        let namespaces: BTreeSet<&str> = doomed
            .iter()
            .filter(|r| r.kind == Kind::Namespace)
            .map(|r| r.name.as_str())
            .collect();
        let mut cascade = Vec::new();
        for kind in Kind::ALL.into_iter().filter(|k| k.is_namespaced()) {
            for namespace in &namespaces {
                cascade.extend(
                    self.in_namespace(kind, namespace)
                        .map(Object::object_ref)
                        .filter(|r| !seen.contains_key(r)),
                );
            }
        }
        doomed.extend(cascade);
        let mut next = self.clone();
        let results = doomed
            .iter()
            .map(|r| {
                next.remove(r);
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

/// What the objects of one apply take of one kind of unique value (pod uids, addresses, ...),
/// over what the stored objects hold.
struct Claims<'a, K> {
    stored: &'a OrdMap<K, Arc<Object>>,
    /// Stored objects the apply replaces: what they hold is free.
    replaced: &'a BTreeSet<ObjectRef>,
    taken: HashMap<K, Holder>,
}

impl<'a, K: Ord + Hash + Clone + fmt::Display> Claims<'a, K> {
    fn new(stored: &'a OrdMap<K, Arc<Object>>, replaced: &'a BTreeSet<ObjectRef>) -> Self {
        Claims {
            stored,
            replaced,
            taken: HashMap::new(),
        }
    }

    /// Who holds `key`: an earlier object of the apply, or a stored one the apply keeps.
    fn holder(&self, key: &K) -> Option<Holder> {
        self.taken.get(key).cloned().or_else(|| {
            self.stored
                .get(key)
                .map(|o| o.object_ref())
                .filter(|r| !self.replaced.contains(r))
                .map(|r| (r, None))
        })
    }

    fn take(&mut self, key: K, holder: Holder) {
        self.taken.insert(key, holder);
    }

    /// Takes `key` for `holder`, or says who holds it already.
    fn claim(&mut self, key: K, holder: Holder) -> Result<(), String> {
        match self.holder(&key) {
            Some(other) => Err(format!("{key} is already used by {}", describe(&other))),
            None => {
                self.take(key, holder);
                Ok(())
            }
        }
    }
}

/// `Pod default/web`, and ` (document 2)` when the holder is a document of this apply.
fn describe((other, document): &Holder) -> String {
    let where_ = document.map(|d| format!(" (document {d})")).unwrap_or_default();
    format!("{other}{where_}")
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
mod disk_tests;

#[cfg(test)]
mod peer_auth_tests;
