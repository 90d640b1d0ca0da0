//! What the agent knows of the mesh: namespaces, workloads, services and policies, as pushed by the
//! controller. One writer (the discovery client) makes a new state from each push; readers take an
//! `Arc` and look up synchronously. Protobuf types are converted here, once, at the boundary.
//!
//! The maps are persistent: a new state shares everything a push did not change with the one before,
//! so a delta costs its own size (O(log n) per resource), not the size of the mesh, and readers of
//! the old state are never in the way. A service's endpoints are the workloads that name it
//! (`Workload::services`), indexed here as they come and go.
//!
//! The state is compact (an agent holds every workload of the mesh): a workload is stored once,
//! under its own key, and the maps point to it; what pods have in common (names, identities, label
//! sets) is held once for all of them ([`intern`]). Every lookup a connection makes (`plan`,
//! `workload_by_ip`, `authorize`, `mtls_requirement`) allocates nothing.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use imbl::{OrdMap, OrdSet};
use weft_api::{sync, types, v1};
use weft_hbone::identity::Identity;
use weft_model::{
    Namespace, WorkloadSnapshot, enrollment, peer_auth,
    policy::{self, Scope},
};

mod dump;
mod index;
mod intern;
mod workload;

use index::{ByIp, ByKey, Endpoints, Pending};
pub use workload::{Labels, Service, Uid, Workload};

/// A resource the agent could not take; the controller is told (NACK) and the previous version, if
/// any, stays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub key: String,
    pub error: String,
}

#[derive(Clone, Debug, Default)]
pub struct State {
    namespaces: OrdMap<String, (Arc<Namespace>, u64)>,
    workloads: OrdSet<ByKey<Workload>>,
    services: OrdSet<ByKey<Service>>,
    /// Service key -> its endpoints: the workloads that name it.
    members: OrdMap<Arc<str>, Endpoints>,
    policies: Scoped<policy::Compiled>,
    peer_auths: Scoped<peer_auth::Compiled>,
    by_ip: ByIp<Arc<Workload>>,
    by_vip: ByIp<Arc<Service>>,
    /// The values this state's lineage shares (every state made from this one by pushes).
    interner: intern::Shared,
    /// Membership changes of the push being staged, not yet in `members`.
    pending: Pending,
    /// Store revision of the last push applied.
    pub revision: u64,
    /// Whether a first (full) push has arrived since the agent started.
    pub synced: bool,
}

/// Compiled objects of one kind (compiled when received: a connection's decision parses nothing),
/// by name and indexed by scope: the mesh-wide ones (the controller's root namespace's) and each
/// namespace's own, so that a connection's decision looks at few of them and allocates nothing.
#[derive(Clone, Debug)]
struct Scoped<T> {
    by_name: BTreeMap<String, (Arc<T>, u64)>,
    by_namespace: HashMap<String, Vec<Arc<T>>>,
    mesh: Vec<Arc<T>>,
    dirty: bool,
}

impl<T> Default for Scoped<T> {
    fn default() -> Self {
        Self {
            by_name: BTreeMap::new(),
            by_namespace: HashMap::new(),
            mesh: Vec::new(),
            dirty: false,
        }
    }
}

/// What [`Scoped`] indexes by.
trait ScopedObject {
    fn scope(&self) -> Scope;
    fn namespace(&self) -> &str;
}

impl ScopedObject for policy::Compiled {
    fn scope(&self) -> Scope {
        policy::Compiled::scope(self)
    }
    fn namespace(&self) -> &str {
        policy::Compiled::namespace(self)
    }
}

impl ScopedObject for peer_auth::Compiled {
    fn scope(&self) -> Scope {
        peer_auth::Compiled::scope(self)
    }
    fn namespace(&self) -> &str {
        peer_auth::Compiled::namespace(self)
    }
}

impl<T: ScopedObject> Scoped<T> {
    fn reindex(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        self.by_namespace.clear();
        self.mesh.clear();
        for (o, _) in self.by_name.values() {
            match o.scope() {
                Scope::Mesh => self.mesh.push(o.clone()),
                Scope::Namespace => self
                    .by_namespace
                    .entry(o.namespace().to_owned())
                    .or_default()
                    .push(o.clone()),
            }
        }
    }

    /// The mesh-wide ones, then `namespace`'s own.
    fn for_namespace<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a T> + 'a {
        let own = self.by_namespace.get(namespace).map_or(&[][..], Vec::as_slice);
        self.mesh.iter().chain(own).map(|o| &**o)
    }
}

/// Where an outbound connection goes, decided from the state alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// A meshed workload: HBONE to its agent (`peer` = pod IP:15008), CONNECT to `target`.
    Hbone {
        peer: SocketAddr,
        target: SocketAddr,
        identity: Arc<Identity>,
        /// `namespace/name` of the destination workload.
        workload: Arc<str>,
    },
    /// Not in the mesh (or a pod that is not enrolled): plain TCP, as without the mesh.
    Passthrough {
        target: SocketAddr,
        workload: Option<Arc<str>>,
    },
    /// A service VIP with no endpoint (or no such port): nothing to connect to.
    NoEndpoint { service: Arc<str> },
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// `held` if it equals `new`, else `new`: the state keeps one copy of what did not change.
fn held_or_new<T: PartialEq>(held: Option<&Arc<T>>, new: T) -> Arc<T> {
    match held.filter(|held| ***held == new) {
        Some(held) => held.clone(),
        None => Arc::new(new),
    }
}

/// A push being applied, chunk by chunk, to a state nobody sees until [`Staged::finish`]: a push
/// is taken all or nothing, however many chunks it came in.
pub struct Staged {
    base: Arc<State>,
    next: State,
    full: bool,
    /// The buckets a bucket resync replaces, and the keys ("type/name") it brought for them.
    replaced: HashSet<usize>,
    received: HashSet<String>,
    rejected: Vec<Rejected>,
    /// Resources put or removed, for the interner's pruning.
    changes: usize,
}

impl Staged {
    /// Applies one chunk (the first included).
    pub fn take(&mut self, chunk: &v1::Push) {
        let shared = self.next.interner.clone();
        let mut interner = shared.lock();
        self.changes += chunk.removed.len() + chunk.resources.len();
        for removed in &chunk.removed {
            self.next.remove(&removed.r#type, &removed.name);
        }
        for res in &chunk.resources {
            let Some(k) = &res.key else {
                self.rejected.push(Rejected {
                    key: "?".into(),
                    error: "resource without a key".into(),
                });
                continue;
            };
            if !self.replaced.is_empty() && self.replaced.contains(&sync::bucket(&k.r#type, &k.name)) {
                self.received.insert(format!("{}/{}", k.r#type, k.name));
            }
            if let Err(error) = self.next.insert(res, &self.base, &mut interner) {
                let full_key = format!("{}/{}", k.r#type, k.name);
                tracing::warn!(resource = %full_key, %error, "rejecting resource");
                // Keep what the agent had for it, if anything. `insert` changes nothing when it
                // fails, so only a full push (which started empty) needs the old version back.
                if self.full {
                    self.base.copy_into(&mut self.next, &k.r#type, &k.name);
                }
                self.rejected.push(Rejected { key: full_key, error });
            }
        }
    }

    /// The new state, once the last chunk was taken, and what was rejected.
    pub fn finish(mut self) -> (State, Vec<Rejected>) {
        if !self.replaced.is_empty() {
            // What the replaced buckets held and the resync did not bring again is gone.
            let gone: Vec<(&'static str, String)> = self
                .next
                .keys()
                .filter(|(ty, name)| {
                    self.replaced.contains(&sync::bucket(ty, name)) && !self.received.contains(&format!("{ty}/{name}"))
                })
                .map(|(ty, name)| (ty, name.to_owned()))
                .collect();
            for (ty, name) in gone {
                self.next.remove(ty, &name);
            }
        }
        std::mem::take(&mut self.next.pending).flush(&mut self.next.members);
        self.next.policies.reindex();
        self.next.peer_auths.reindex();
        self.next.interner.lock().changed(self.changes);
        (self.next, self.rejected)
    }
}

impl State {
    /// Starts applying a push whose first chunk is `first` (which is not taken yet). A full push
    /// replaces everything, except that a rejected resource keeps its previous version; a bucket
    /// resync replaces what the agent held in those buckets.
    pub fn stage(self: &Arc<Self>, first: &v1::Push) -> Staged {
        // Values only states older than this one used are dropped now and then.
        self.interner.lock().maybe_prune();
        let mut next = if first.full {
            State {
                interner: self.interner.clone(),
                ..State::default()
            }
        } else {
            (**self).clone()
        };
        next.synced = true;
        next.revision = first.revision;
        Staged {
            base: self.clone(),
            next,
            full: first.full,
            replaced: if first.full {
                HashSet::new()
            } else {
                first.replaced_buckets.iter().map(|b| *b as usize).collect()
            },
            received: HashSet::new(),
            rejected: Vec::new(),
            changes: 0,
        }
    }

    /// Applies one whole push (of one chunk). Returns what was rejected.
    pub fn apply(&self, push: &v1::Push) -> (State, Vec<Rejected>) {
        let base = Arc::new(self.clone());
        let mut staged = base.stage(push);
        staged.take(push);
        staged.finish()
    }

    /// Every resource held, as (type, name).
    fn keys(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.namespaces
            .keys()
            .map(|k| (types::NAMESPACE, k.as_str()))
            .chain(self.workloads.iter().map(|w| (types::WORKLOAD, &**w.0.key())))
            .chain(self.services.iter().map(|s| (types::SERVICE, &*s.0.name)))
            .chain(self.policies.by_name.keys().map(|k| (types::POLICY, k.as_str())))
            .chain(
                self.peer_auths
                    .by_name
                    .keys()
                    .map(|k| (types::PEER_AUTHENTICATION, k.as_str())),
            )
    }

    /// What the agent holds, summarized per bucket (see [`weft_api::sync`]), for the controller to
    /// resync only what differs.
    pub fn held(&self) -> Vec<u64> {
        let versions = self
            .namespaces
            .iter()
            .map(|(k, (_, v))| (types::NAMESPACE, k.as_str(), *v))
            .chain(
                self.workloads
                    .iter()
                    .map(|w| (types::WORKLOAD, &**w.0.key(), w.0.version())),
            )
            .chain(self.services.iter().map(|s| (types::SERVICE, &*s.0.name, s.0.version)))
            .chain(
                self.policies
                    .by_name
                    .iter()
                    .map(|(k, (_, v))| (types::POLICY, k.as_str(), *v)),
            )
            .chain(
                self.peer_auths
                    .by_name
                    .iter()
                    .map(|(k, (_, v))| (types::PEER_AUTHENTICATION, k.as_str(), *v)),
            );
        sync::summarize(versions)
    }

    /// How many workloads and services the agent holds.
    pub fn sizes(&self) -> (usize, usize) {
        (self.workloads.len(), self.services.len())
    }

    /// Takes one resource. A workload or service equal to the one `base` (the state the push
    /// applies to) holds is that one: a full push or resync makes no second copy of what it did
    /// not change.
    fn insert(&mut self, res: &v1::Resource, base: &State, interner: &mut intern::Interner) -> Result<(), String> {
        use v1::resource::Kind;
        let version = res.version;
        match &res.kind {
            Some(Kind::Namespace(n)) => {
                self.namespaces
                    .insert(n.name.clone(), (Arc::new(Namespace::from(n)), version));
            }
            Some(Kind::Workload(w)) => {
                let new = Workload::from_wire(w, version, interner)?;
                let held = base.workload(new.key());
                self.put_workload(held_or_new(held, new));
            }
            Some(Kind::Service(s)) => {
                let new = Service::from_wire(s, version, interner)?;
                let held = base.service(&new.name);
                self.put_service(held_or_new(held, new));
            }
            Some(Kind::Policy(p)) => {
                let policy = policy::Compiled::try_from(p).map_err(|e| e.to_string())?;
                self.policies
                    .by_name
                    .insert(key(&p.namespace, &p.name), (Arc::new(policy), version));
                self.policies.dirty = true;
            }
            Some(Kind::PeerAuthentication(p)) => {
                let compiled = peer_auth::Compiled::try_from(p).map_err(|e| e.to_string())?;
                self.peer_auths
                    .by_name
                    .insert(key(&p.namespace, &p.name), (Arc::new(compiled), version));
                self.peer_auths.dirty = true;
            }
            None => return Err("resource without a body".into()),
        }
        Ok(())
    }

    /// Puts a workload in, replacing any of that key, with what indexes it (addresses, services).
    /// The very workload held already changes no index.
    fn put_workload(&mut self, w: Arc<Workload>) {
        match self.workloads.insert(ByKey(w.clone())) {
            Some(ByKey(old)) if Arc::ptr_eq(&old, &w) => return,
            Some(ByKey(old)) => self.unindex_workload(&old),
            None => {}
        }
        for ip in w.ips() {
            self.by_ip.insert(*ip, w.clone());
        }
        for s in w.services() {
            self.pending.put(s, &w);
        }
    }

    /// Puts a service in, replacing any of that key, with its VIPs indexed.
    fn put_service(&mut self, s: Arc<Service>) {
        match self.services.insert(ByKey(s.clone())) {
            Some(ByKey(old)) if Arc::ptr_eq(&old, &s) => return,
            Some(ByKey(old)) => self.unindex_service(&old),
            None => {}
        }
        for vip in &s.vips {
            self.by_vip.insert(*vip, s.clone());
        }
    }

    /// Removes a workload and what indexes it.
    fn remove_workload(&mut self, k: &str) {
        if let Some(ByKey(old)) = self.workloads.remove(k) {
            self.unindex_workload(&old);
        }
    }

    fn remove_service(&mut self, k: &str) {
        if let Some(ByKey(old)) = self.services.remove(k) {
            self.unindex_service(&old);
        }
    }

    /// Takes `old` (no longer held) out of the indexes: its addresses, unless another workload
    /// took them since, and its services' endpoints.
    fn unindex_workload(&mut self, old: &Arc<Workload>) {
        for ip in old.ips() {
            if self.by_ip.get(*ip).is_some_and(|owner| Arc::ptr_eq(owner, old)) {
                self.by_ip.remove(*ip);
            }
        }
        for s in old.services() {
            self.pending.remove(s, old.key());
        }
    }

    fn unindex_service(&mut self, old: &Arc<Service>) {
        for vip in &old.vips {
            if self.by_vip.get(*vip).is_some_and(|owner| Arc::ptr_eq(owner, old)) {
                self.by_vip.remove(*vip);
            }
        }
    }

    fn remove(&mut self, kind: &str, name: &str) {
        match kind {
            types::NAMESPACE => {
                self.namespaces.remove(name);
            }
            types::WORKLOAD => self.remove_workload(name),
            types::SERVICE => self.remove_service(name),
            types::POLICY => {
                self.policies.by_name.remove(name);
                self.policies.dirty = true;
            }
            types::PEER_AUTHENTICATION => {
                self.peer_auths.by_name.remove(name);
                self.peer_auths.dirty = true;
            }
            _ => {}
        }
    }

    /// Puts `self`'s version of a resource into `next` (after `next` rejected a new one).
    fn copy_into(&self, next: &mut State, kind: &str, name: &str) {
        match kind {
            types::NAMESPACE => {
                if let Some(v) = self.namespaces.get(name) {
                    next.namespaces.insert(name.to_owned(), v.clone());
                }
            }
            types::WORKLOAD => {
                if let Some(w) = self.workload(name) {
                    next.put_workload(w.clone());
                }
            }
            types::SERVICE => {
                if let Some(s) = self.service(name) {
                    next.put_service(s.clone());
                }
            }
            types::POLICY => {
                if let Some(v) = self.policies.by_name.get(name) {
                    next.policies.by_name.insert(name.to_owned(), v.clone());
                    next.policies.dirty = true;
                }
            }
            types::PEER_AUTHENTICATION => {
                if let Some(v) = self.peer_auths.by_name.get(name) {
                    next.peer_auths.by_name.insert(name.to_owned(), v.clone());
                    next.peer_auths.dirty = true;
                }
            }
            _ => {}
        }
    }

    /// Namespaces, and the pods on `node` and the pod `uid` (wherever it runs), for the enrollment
    /// reconciler: it acts on its own node's pods, and answers the CNI plugin about one pod.
    /// Converting every workload of the mesh to a model pod on each of its steps would cost more
    /// than the state itself.
    pub fn snapshot_on(&self, node: &str, uid: Option<&str>) -> WorkloadSnapshot {
        let uid = uid.and_then(Uid::parse);
        WorkloadSnapshot {
            namespaces: self.namespaces.values().map(|(n, _)| (**n).clone()).collect(),
            pods: self
                .workloads
                .iter()
                .filter(|w| w.0.node() == node || Some(w.0.uid()) == uid)
                .map(|w| w.0.to_pod())
                .collect(),
        }
    }

    /// Whether a pod with this uid is known.
    pub fn has_pod(&self, uid: &str) -> bool {
        Uid::parse(uid).is_some_and(|uid| self.workloads.iter().any(|w| w.0.uid() == uid))
    }

    pub fn workload(&self, key: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(key).map(|w| &w.0)
    }

    fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key).map(|s| &s.0)
    }

    /// The service whose cluster IP `ip` is.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(ip)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(ip)
    }

    /// Whether the workload's traffic is meshed (enrolled by its own or its namespace's annotation).
    pub fn is_meshed(&self, w: &Workload) -> bool {
        let namespace = self.namespaces.get(w.namespace()).map(|(n, _)| &**n);
        enrollment::is_enrolled_by_annotations(w.annotations(), namespace)
    }

    /// The policies that can apply to a workload of `namespace`: the mesh-wide ones and the
    /// namespace's own; [`policy::decide`] checks which of them select the workload.
    pub fn policies_for<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a policy::Compiled> + 'a {
        self.policies.for_namespace(namespace)
    }

    /// The PeerAuthentications that can apply to a workload of `namespace`: the mesh-wide ones and
    /// the namespace's own; [`peer_auth::requirement`] resolves which of them speak for it.
    pub fn peer_auths_for<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a peer_auth::Compiled> + 'a {
        self.peer_auths.for_namespace(namespace)
    }

    /// Where a connection to `dst` goes. `pick` chooses among a service's endpoints (round robin
    /// when the caller increments it per connection). Allocates nothing: the plan's names and
    /// identity are the state's own, shared.
    pub fn plan(&self, dst: SocketAddr, pick: usize) -> Plan {
        let mut target = dst;
        if let Some(service) = self.by_vip.get(dst.ip()) {
            let no_endpoint = || Plan::NoEndpoint {
                service: service.name.clone(),
            };
            let Some((_, target_port)) = service.ports.iter().find(|(p, _)| *p == dst.port()) else {
                return no_endpoint();
            };
            // Endpoints with an address of the family the client used: the pick-th.
            let v6 = dst.is_ipv6();
            let endpoints = self.members.get(&*service.name).map_or(&[][..], |e| e.of_family(v6));
            let Some(ip) = (!endpoints.is_empty())
                .then(|| endpoints[pick % endpoints.len()].ip(v6))
                .flatten()
            else {
                return no_endpoint();
            };
            target = SocketAddr::new(ip, *target_port);
        }
        match self.workload_by_ip(target.ip()) {
            Some(w) if self.is_meshed(w) => Plan::Hbone {
                peer: SocketAddr::new(target.ip(), weft_model::ports::HBONE),
                target,
                identity: w.identity().clone(),
                workload: w.key().clone(),
            },
            Some(w) => Plan::Passthrough {
                target,
                workload: Some(w.key().clone()),
            },
            None => Plan::Passthrough { target, workload: None },
        }
    }
}

/// Decides an inbound connection to the workload `key` (`namespace/name`, with `uid`) by its labels
/// in this state and this state's policies: every connection and every tunnel stream is decided on
/// what the agent knows now, never on what it knew when the pod was enrolled. A workload this state
/// does not have (or has under another uid) is refused: there is nothing current to decide on.
pub fn authorize(state: &State, key: &str, uid: &str, conn: &policy::Connection<'_>) -> policy::Decision {
    let Some(w) = current(state, key, uid) else {
        return policy::Decision::Deny { policy: None };
    };
    policy::decide(state.policies_for(w.namespace()), target(w), conn)
}

/// What `port` of the workload `key` (`namespace/name`, with `uid`) requires of a connection's
/// transport under this state's PeerAuthentications and the workload's labels in this state: decided
/// for every plaintext connection and again on every new state, like [`authorize`]. A workload this
/// state does not have is [`Permissive`](peer_auth::Requirement::Permissive) here; [`authorize`]
/// refuses it.
pub fn mtls_requirement(state: &State, key: &str, uid: &str, port: u16) -> peer_auth::Requirement {
    let Some(w) = current(state, key, uid) else {
        return peer_auth::Requirement::Permissive;
    };
    peer_auth::requirement(state.peer_auths_for(w.namespace()), target(w), port)
}

/// The workload `key` as `state` has it now, if it is still the pod `uid`.
fn current<'a>(state: &'a State, key: &str, uid: &str) -> Option<&'a Workload> {
    let uid = Uid::parse(uid)?;
    state.workload(key).map(|w| &**w).filter(|w| w.uid() == uid)
}

/// What policies select a workload by: its namespace and current labels.
fn target(w: &Workload) -> policy::Target<'_> {
    policy::Target {
        namespace: w.namespace(),
        labels: w.labels(),
    }
}

#[cfg(test)]
pub(crate) mod fixtures;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod peer_auth_tests;

#[cfg(test)]
mod counting;

#[cfg(test)]
mod alloc_tests;

#[cfg(test)]
mod compact_tests;
