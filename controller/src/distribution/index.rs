//! The distribution index: every resource the controller distributes, built once per change for all
//! subscribers. Each resource is converted, versioned and encoded once, when it changes, and kept in
//! persistent maps, so that a new index shares everything it did not change with the one before.
//! A subscriber's stream then finds what changed for its node by comparing the index it last sent
//! with the new one ([`Table::changes`]), in time proportional to the change, and sends the encoded
//! bytes as they are.
//!
//! [`Index::update`] turns a change of the store (two [`State`]s) into the resources it affects:
//! - a namespace: its resource;
//! - a pod: its workload, and the namespaces its node has pods in (which policies the node gets);
//! - a service: its resource, and the workloads of its namespace (a workload names the services that
//!   select it, so that a pod's coming and going never resends a service's endpoints);
//! - a policy or PeerAuthentication: its resource, sent to the nodes with pods in its namespace
//!   (every node for the root namespace's, marked mesh-wide).
//!
//! [`desired`](super::desired::desired) is the same function computed from scratch; the tests check
//! that both agree on random changes.

use std::{collections::BTreeSet, sync::Arc};

use bytes::Bytes;
use imbl::{HashMap as PHashMap, OrdMap};
use weft_api::{
    convert::{peer_authentication_to_wire, policy_to_wire},
    encoded::encode_resource,
    sync::{self, BUCKETS},
    types, v1,
};
use weft_model::policy::Scope;

pub use super::resource::MeshConfig;
use super::resource::{Key, namespace_resource, resource, service_resource, workload_resource};
use crate::store::{
    Object, State,
    objects::{Namespace, Pod, Service},
};

/// One resource as it is sent: converted, versioned and encoded once.
#[derive(Debug)]
pub struct Entry {
    pub key: Key,
    /// A content hash: it changes whenever the resource does.
    pub version: u64,
    /// The encoding of the [`v1::Resource`] (version included).
    pub bytes: Bytes,
    /// For policies and PeerAuthentications: their namespace (which nodes get them).
    pub namespace: Option<String>,
}

impl PartialEq for Entry {
    /// Two entries of one key are equal when their versions are: the version is the content's hash.
    fn eq(&self, other: &Entry) -> bool {
        self.version == other.version && self.key == other.key
    }
}

impl Entry {
    fn new(ty: &'static str, name: String, kind: v1::resource::Kind, namespace: Option<String>) -> Entry {
        let key = Key { ty, name };
        let resource = resource(&key, kind);
        Entry {
            version: resource.version,
            bytes: encode_resource(&resource),
            key,
            namespace,
        }
    }

    /// The bucket it falls in (see [`weft_api::sync`]).
    pub fn bucket(&self) -> usize {
        sync::bucket(self.key.ty, &self.key.name)
    }

    /// What it adds to its bucket's digest.
    pub fn digest(&self) -> u64 {
        sync::digest(self.key.ty, &self.key.name, self.version)
    }
}

/// The resources of one type, by bucket and name, with each bucket's digest.
#[derive(Clone, Debug)]
pub struct Table {
    entries: OrdMap<(u16, String), Arc<Entry>>,
    digests: Arc<Vec<u64>>,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            entries: OrdMap::new(),
            digests: Arc::new(vec![0; BUCKETS]),
        }
    }
}

/// A difference between two versions of a [`Table`].
pub enum Change<'a> {
    Put(&'a Arc<Entry>),
    Removed(&'a Key),
}

impl Table {
    fn slot(key: &Key) -> (u16, String) {
        // sync::bucket is below BUCKETS (1024).
        (sync::bucket(key.ty, &key.name) as u16, key.name.clone())
    }

    /// Puts `entry` in; a no-op when the same version is there already.
    fn put(&mut self, entry: Entry) {
        let slot = Self::slot(&entry.key);
        if self.entries.get(&slot).is_some_and(|e| e.version == entry.version) {
            return;
        }
        let digests = Arc::make_mut(&mut self.digests);
        let b = usize::from(slot.0);
        digests[b] = digests[b].wrapping_add(entry.digest());
        if let Some(old) = self.entries.insert(slot, Arc::new(entry)) {
            digests[b] = digests[b].wrapping_sub(old.digest());
        }
    }

    fn remove(&mut self, key: &Key) {
        let slot = Self::slot(key);
        if let Some(old) = self.entries.remove(&slot) {
            let digests = Arc::make_mut(&mut self.digests);
            let b = usize::from(slot.0);
            digests[b] = digests[b].wrapping_sub(old.digest());
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.entries.values()
    }

    /// The entries of bucket `b`.
    pub fn bucket(&self, b: usize) -> impl Iterator<Item = &Arc<Entry>> {
        // b < BUCKETS (1024) fits u16; b + 1 too.
        let b = b as u16;
        self.entries
            .range((b, String::new())..(b + 1, String::new()))
            .map(|(_, e)| e)
    }

    /// The digest of each bucket.
    pub fn digests(&self) -> &[u64] {
        &self.digests
    }

    /// What differs from `self` to `next`: work proportional to the difference when `next` was
    /// made from `self`, as every index is made from the one before.
    pub fn changes<'a>(&'a self, next: &'a Table) -> impl Iterator<Item = Change<'a>> {
        use imbl::ordmap::DiffItem;
        self.entries.diff(&next.entries).map(|d| match d {
            DiffItem::Add(_, e) | DiffItem::Update { new: (_, e), .. } => Change::Put(e),
            DiffItem::Remove(_, e) => Change::Removed(&e.key),
        })
    }

    /// Whether `self` and `other` are the same version of the table (nothing changed between them).
    pub fn same(&self, other: &Table) -> bool {
        self.entries.ptr_eq(&other.entries)
    }
}

/// Every resource the controller distributes, and which nodes need the scoped ones.
#[derive(Clone, Debug)]
pub struct Index {
    pub store_id: String,
    pub revision: u64,
    mesh: Arc<MeshConfig>,
    /// The state this index was made from (the base of the next update).
    state: Arc<State>,
    pub namespaces: Table,
    pub workloads: Table,
    pub services: Table,
    /// AuthorizationPolicies and PeerAuthentications: a node gets the root namespace's and those of
    /// the namespaces it has pods in.
    pub policies: Table,
    pub peer_authentications: Table,
    /// Per node, the namespaces it has pods in; a set is replaced only when it changes.
    presence: PHashMap<String, Arc<BTreeSet<String>>>,
    /// Pods per (node, namespace).
    counts: PHashMap<(String, String), u32>,
}

impl Index {
    /// The index of an empty store.
    pub fn new(mesh: MeshConfig) -> Index {
        Index {
            store_id: String::new(),
            revision: 0,
            mesh: Arc::new(mesh),
            state: Arc::new(State::default()),
            namespaces: Table::default(),
            workloads: Table::default(),
            services: Table::default(),
            policies: Table::default(),
            peer_authentications: Table::default(),
            presence: PHashMap::new(),
            counts: PHashMap::new(),
        }
    }

    /// The index of `state`, from scratch.
    pub fn build(mesh: MeshConfig, state: Arc<State>) -> Index {
        Index::new(mesh).update(state)
    }

    pub fn mesh(&self) -> &MeshConfig {
        &self.mesh
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// The namespaces `node` has pods in (`None`: none).
    pub fn presence(&self, node: &str) -> Option<&Arc<BTreeSet<String>>> {
        self.presence.get(node)
    }

    /// The table of a distributed type.
    pub fn table(&self, ty: &str) -> Option<&Table> {
        match ty {
            types::NAMESPACE => Some(&self.namespaces),
            types::WORKLOAD => Some(&self.workloads),
            types::SERVICE => Some(&self.services),
            types::POLICY => Some(&self.policies),
            types::PEER_AUTHENTICATION => Some(&self.peer_authentications),
            _ => None,
        }
    }

    /// Whether `node` gets the scoped resource `entry` (a policy or PeerAuthentication).
    pub fn sends_scoped(&self, node: &str, entry: &Entry) -> bool {
        entry.namespace.as_deref().is_some_and(|ns| {
            ns == self.mesh.root_namespace || self.presence.get(node).is_some_and(|set| set.contains(ns))
        })
    }

    /// The index of `next`, made from this one: the work is proportional to what changed between
    /// the state this index was made from and `next`.
    pub fn update(&self, next: Arc<State>) -> Index {
        let mut index = self.clone();
        index.store_id.clone_from(&next.id);
        index.revision = next.revision;
        let old = self.state.clone();
        // Namespaces whose services changed: every pod there may have another set of services.
        let mut members_changed: BTreeSet<&str> = BTreeSet::new();
        let mut pods: Vec<(Option<&Pod>, Option<&Pod>)> = Vec::new();
        for (before, after) in old.changes(&next) {
            match before.or(after) {
                Some(Object::Namespace(_)) => match after {
                    Some(Object::Namespace(ns)) => index.namespaces.put(namespace_entry(ns)),
                    _ => index.namespaces.remove(&key(types::NAMESPACE, ns_name(before))),
                },
                Some(Object::Service(s)) => {
                    members_changed.insert(&s.namespace);
                    match after {
                        Some(Object::Service(s)) => index.services.put(service_entry(s)),
                        _ => index
                            .services
                            .remove(&key(types::SERVICE, format!("{}/{}", s.namespace, s.name))),
                    }
                }
                Some(Object::Pod(_)) => pods.push((as_pod(before), as_pod(after))),
                Some(Object::AuthorizationPolicy(p)) => {
                    let wire = match after {
                        Some(Object::AuthorizationPolicy(p)) => {
                            let scope = Scope::of(&p.metadata.namespace, &index.mesh.root_namespace);
                            Some(v1::resource::Kind::Policy(policy_to_wire(p, scope)))
                        }
                        _ => None,
                    };
                    let (ns, name) = (&p.metadata.namespace, &p.metadata.name);
                    put_scoped(&mut index.policies, types::POLICY, ns, name, wire);
                }
                Some(Object::PeerAuthentication(p)) => {
                    let wire = match after {
                        Some(Object::PeerAuthentication(p)) => {
                            let scope = Scope::of(&p.metadata.namespace, &index.mesh.root_namespace);
                            Some(v1::resource::Kind::PeerAuthentication(peer_authentication_to_wire(
                                p, scope,
                            )))
                        }
                        _ => None,
                    };
                    let (ns, name) = (&p.metadata.namespace, &p.metadata.name);
                    put_scoped(
                        &mut index.peer_authentications,
                        types::PEER_AUTHENTICATION,
                        ns,
                        name,
                        wire,
                    );
                }
                Some(Object::ServiceAccount(_)) | None => {}
            }
        }
        for (before, after) in &pods {
            if let Some(p) = before {
                index.count(&p.node, &p.namespace, -1);
                if after.is_none() {
                    index
                        .workloads
                        .remove(&key(types::WORKLOAD, format!("{}/{}", p.namespace, p.name)));
                }
            }
            if let Some(p) = after {
                index.count(&p.node, &p.namespace, 1);
                if !members_changed.contains(p.namespace.as_str()) {
                    index.workloads.put(workload_entry(&index.mesh, &next, p));
                }
            }
        }
        for ns in members_changed {
            for p in next.pods_in(ns) {
                index.workloads.put(workload_entry(&index.mesh, &next, p));
            }
        }
        index.state = next;
        index
    }

    /// Counts a pod of `namespace` on `node` coming (+1) or going (-1).
    fn count(&mut self, node: &str, namespace: &str, delta: i32) {
        let slot = (node.to_owned(), namespace.to_owned());
        let before = self.counts.get(&slot).copied().unwrap_or(0);
        let after = before.saturating_add_signed(delta);
        if after == 0 {
            self.counts.remove(&slot);
        } else {
            self.counts.insert(slot, after);
        }
        if (before == 0) != (after == 0) {
            let mut set = self.presence.get(node).map(|s| BTreeSet::clone(s)).unwrap_or_default();
            if after == 0 {
                set.remove(namespace);
            } else {
                set.insert(namespace.to_owned());
            }
            if set.is_empty() {
                self.presence.remove(node);
            } else {
                self.presence.insert(node.to_owned(), Arc::new(set));
            }
        }
    }

    /// Every resource `node` should hold of the types `wanted`, by key: what a full push sends.
    pub fn resources_for<'a>(
        &'a self,
        node: &'a str,
        wanted: impl Fn(&str) -> bool + 'a,
    ) -> impl Iterator<Item = &'a Arc<Entry>> + 'a {
        let global = [&self.namespaces, &self.workloads, &self.services];
        let scoped = [&self.policies, &self.peer_authentications];
        let global_types = [types::NAMESPACE, types::WORKLOAD, types::SERVICE];
        let scoped_types = [types::POLICY, types::PEER_AUTHENTICATION];
        let wanted = Arc::new(wanted);
        let w2 = wanted.clone();
        global
            .into_iter()
            .zip(global_types)
            .filter(move |(_, t)| wanted(t))
            .flat_map(|(t, _)| t.iter())
            .chain(
                scoped
                    .into_iter()
                    .zip(scoped_types)
                    .filter(move |(_, t)| w2(t))
                    .flat_map(move |(t, _)| t.iter().filter(move |e| self.sends_scoped(node, e))),
            )
    }
}

/// Puts the policy or PeerAuthentication `namespace/name` in `table` as `wire` (`None`: removes it).
fn put_scoped(table: &mut Table, ty: &'static str, namespace: &str, name: &str, wire: Option<v1::resource::Kind>) {
    let full = format!("{namespace}/{name}");
    match wire {
        Some(kind) => table.put(Entry::new(ty, full, kind, Some(namespace.to_owned()))),
        None => table.remove(&key(ty, full)),
    }
}

fn key(ty: &'static str, name: String) -> Key {
    Key { ty, name }
}

fn ns_name(o: Option<&Object>) -> String {
    match o {
        Some(Object::Namespace(ns)) => ns.name.clone(),
        _ => String::new(),
    }
}

fn as_pod(o: Option<&Object>) -> Option<&Pod> {
    match o {
        Some(Object::Pod(p)) => Some(p),
        _ => None,
    }
}

fn namespace_entry(ns: &Namespace) -> Entry {
    Entry::new(types::NAMESPACE, ns.name.clone(), namespace_resource(ns), None)
}

fn service_entry(s: &Service) -> Entry {
    Entry::new(
        types::SERVICE,
        format!("{}/{}", s.namespace, s.name),
        service_resource(s),
        None,
    )
}

fn workload_entry(mesh: &MeshConfig, state: &State, p: &Pod) -> Entry {
    Entry::new(
        types::WORKLOAD,
        format!("{}/{}", p.namespace, p.name),
        workload_resource(mesh, state, p),
        None,
    )
}

#[cfg(test)]
pub(crate) mod tests;
