//! What the agent knows of the mesh: namespaces, workloads, services and policies, as pushed by the
//! controller. One writer (the discovery client) makes a new state from each push; readers take an
//! `Arc` and look up synchronously. Protobuf types are converted here, once, at the boundary.
//!
//! The maps are persistent: a new state shares everything a push did not change with the one before,
//! so a delta costs its own size (O(log n) per resource), not the size of the mesh, and readers of
//! the old state are never in the way. A service's endpoints are the workloads that name it
//! (`Workload::services`), indexed here as they come and go.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use imbl::{HashMap as PMap, OrdSet};
use weft_api::{sync, types, v1};
use weft_hbone::identity::Identity;
use weft_model::{
    Namespace, Pod, WorkloadSnapshot, enrollment, peer_auth,
    policy::{self, Scope},
};

/// A pod as the data plane sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub pod: Pod,
    pub identity: Identity,
    /// The services that select it (`namespace/name`).
    pub services: Vec<String>,
    /// The controller's version of it.
    pub version: u64,
}

/// A service: its cluster IPs and port mapping. Its endpoints are the workloads naming it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub vips: Vec<IpAddr>,
    /// (service port, target port)
    pub ports: Vec<(u16, u16)>,
    pub version: u64,
}

/// A resource the agent could not take; the controller is told (NACK) and the previous version, if
/// any, stays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub key: String,
    pub error: String,
}

#[derive(Clone, Debug, Default)]
pub struct State {
    namespaces: BTreeMap<String, (Namespace, u64)>,
    workloads: PMap<String, Arc<Workload>>,
    services: PMap<String, Arc<Service>>,
    /// Service key -> the keys of the workloads that name it.
    members: PMap<String, OrdSet<String>>,
    policies: Scoped<policy::Compiled>,
    peer_auths: Scoped<peer_auth::Compiled>,
    by_ip: PMap<IpAddr, String>,
    by_vip: PMap<IpAddr, String>,
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
        identity: Identity,
        /// `namespace/name` of the destination workload.
        workload: String,
    },
    /// Not in the mesh (or a pod that is not enrolled): plain TCP, as without the mesh.
    Passthrough {
        target: SocketAddr,
        workload: Option<String>,
    },
    /// A service VIP with no endpoint (or no such port): nothing to connect to.
    NoEndpoint { service: String },
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
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
}

impl Staged {
    /// Applies one chunk (the first included).
    pub fn take(&mut self, chunk: &v1::Push) {
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
            if let Err(error) = self.next.insert(res) {
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
        self.next.policies.reindex();
        self.next.peer_auths.reindex();
        (self.next, self.rejected)
    }
}

impl State {
    /// Starts applying a push whose first chunk is `first` (which is not taken yet). A full push
    /// replaces everything, except that a rejected resource keeps its previous version; a bucket
    /// resync replaces what the agent held in those buckets.
    pub fn stage(self: &Arc<Self>, first: &v1::Push) -> Staged {
        let mut next = if first.full { State::default() } else { (**self).clone() };
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
            .chain(self.workloads.keys().map(|k| (types::WORKLOAD, k.as_str())))
            .chain(self.services.keys().map(|k| (types::SERVICE, k.as_str())))
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
                    .map(|(k, w)| (types::WORKLOAD, k.as_str(), w.version)),
            )
            .chain(
                self.services
                    .iter()
                    .map(|(k, s)| (types::SERVICE, k.as_str(), s.version)),
            )
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

    fn insert(&mut self, res: &v1::Resource) -> Result<(), String> {
        use v1::resource::Kind;
        let version = res.version;
        match &res.kind {
            Some(Kind::Namespace(n)) => {
                self.namespaces.insert(n.name.clone(), (Namespace::from(n), version));
            }
            Some(Kind::Workload(w)) => {
                let pod = Pod::try_from(w).map_err(|e| e.to_string())?;
                let identity: Identity = w.identity.parse().map_err(|e| format!("identity: {e}"))?;
                let k = key(&pod.namespace, &pod.name);
                self.put_workload(
                    k,
                    Arc::new(Workload {
                        pod,
                        identity,
                        services: w.services.clone(),
                        version,
                    }),
                );
            }
            Some(Kind::Service(s)) => {
                let vips = s
                    .vips
                    .iter()
                    .map(|v| {
                        v.parse::<IpAddr>()
                            .map_err(|_| format!("vips: {v:?} is not an IP address"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let ports = s
                    .ports
                    .iter()
                    .map(|p| match (u16::try_from(p.port), u16::try_from(p.target_port)) {
                        (Ok(a), Ok(b)) if a != 0 && b != 0 => Ok((a, b)),
                        _ => Err(format!("ports: {}->{} out of range", p.port, p.target_port)),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let k = key(&s.namespace, &s.name);
                self.put_service(
                    k.clone(),
                    Arc::new(Service {
                        name: k,
                        vips,
                        ports,
                        version,
                    }),
                );
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
    fn put_workload(&mut self, k: String, w: Arc<Workload>) {
        self.remove_workload(&k);
        for ip in &w.pod.ips {
            self.by_ip.insert(*ip, k.clone());
        }
        for s in &w.services {
            self.members.entry(s.clone()).or_default().insert(k.clone());
        }
        self.workloads.insert(k, w);
    }

    /// Puts a service in, replacing any of that key, with its VIPs indexed.
    fn put_service(&mut self, k: String, s: Arc<Service>) {
        self.remove_service(&k);
        for vip in &s.vips {
            self.by_vip.insert(*vip, k.clone());
        }
        self.services.insert(k, s);
    }

    /// Removes a workload and what indexes it.
    fn remove_workload(&mut self, k: &str) {
        let Some(old) = self.workloads.remove(k) else {
            return;
        };
        for ip in &old.pod.ips {
            if self.by_ip.get(ip).is_some_and(|owner| owner == k) {
                self.by_ip.remove(ip);
            }
        }
        for s in &old.services {
            if let Some(set) = self.members.get_mut(s) {
                set.remove(k);
                if set.is_empty() {
                    self.members.remove(s);
                }
            }
        }
    }

    fn remove_service(&mut self, k: &str) {
        let Some(old) = self.services.remove(k) else {
            return;
        };
        for vip in &old.vips {
            if self.by_vip.get(vip).is_some_and(|owner| owner == k) {
                self.by_vip.remove(vip);
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
                if let Some(w) = self.workloads.get(name) {
                    next.put_workload(name.to_owned(), w.clone());
                }
            }
            types::SERVICE => {
                if let Some(s) = self.services.get(name) {
                    next.put_service(name.to_owned(), s.clone());
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

    /// Namespaces and pods, for the enrollment reconciler.
    pub fn snapshot(&self) -> WorkloadSnapshot {
        WorkloadSnapshot {
            namespaces: self.namespaces.values().map(|(n, _)| n.clone()).collect(),
            pods: self.workloads.values().map(|w| w.pod.clone()).collect(),
        }
    }

    /// Whether a pod with this uid is known.
    pub fn has_pod(&self, uid: &str) -> bool {
        self.workloads.values().any(|w| w.pod.uid == uid)
    }

    pub fn workload(&self, key: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(key)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip).and_then(|k| self.workloads.get(k))
    }

    /// Whether the workload's traffic is meshed (enrolled by its own or its namespace's annotation).
    pub fn is_meshed(&self, w: &Workload) -> bool {
        enrollment::is_enrolled(&w.pod, self.namespaces.get(&w.pod.namespace).map(|(n, _)| n))
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

    /// The addresses of `service`'s endpoints of the family of `v6`.
    fn endpoint_ips<'a>(&'a self, service: &str, v6: bool) -> impl Iterator<Item = IpAddr> + 'a {
        self.members
            .get(service)
            .into_iter()
            .flat_map(|set| set.iter())
            .filter_map(|k| self.workloads.get(k))
            .filter_map(move |w| w.pod.ips.iter().copied().find(|ip| ip.is_ipv6() == v6))
    }

    /// Where a connection to `dst` goes. `pick` chooses among a service's endpoints (round robin
    /// when the caller increments it per connection). Allocates nothing but the plan's names.
    pub fn plan(&self, dst: SocketAddr, pick: usize) -> Plan {
        let mut target = dst;
        if let Some(service) = self.by_vip.get(&dst.ip()).and_then(|k| self.services.get(k)) {
            let Some((_, target_port)) = service.ports.iter().find(|(p, _)| *p == dst.port()) else {
                return Plan::NoEndpoint {
                    service: service.name.clone(),
                };
            };
            // Endpoints with an address of the family the client used: counted, then the pick-th.
            let count = self.endpoint_ips(&service.name, dst.is_ipv6()).count();
            let Some(ip) = (count > 0)
                .then(|| self.endpoint_ips(&service.name, dst.is_ipv6()).nth(pick % count))
                .flatten()
            else {
                return Plan::NoEndpoint {
                    service: service.name.clone(),
                };
            };
            target = SocketAddr::new(ip, *target_port);
        }
        match self.workload_by_ip(target.ip()) {
            Some(w) if self.is_meshed(w) => Plan::Hbone {
                peer: SocketAddr::new(target.ip(), weft_model::ports::HBONE),
                target,
                identity: w.identity.clone(),
                workload: w.pod.qualified_name(),
            },
            Some(w) => Plan::Passthrough {
                target,
                workload: Some(w.pod.qualified_name()),
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
    let Some(pod) = current_pod(state, key, uid) else {
        return policy::Decision::Deny { policy: None };
    };
    policy::decide(state.policies_for(&pod.namespace), target(pod), conn)
}

/// What `port` of the workload `key` (`namespace/name`, with `uid`) requires of a connection's
/// transport under this state's PeerAuthentications and the workload's labels in this state: decided
/// for every plaintext connection and again on every new state, like [`authorize`]. A workload this
/// state does not have is [`Permissive`](peer_auth::Requirement::Permissive) here; [`authorize`]
/// refuses it.
pub fn mtls_requirement(state: &State, key: &str, uid: &str, port: u16) -> peer_auth::Requirement {
    let Some(pod) = current_pod(state, key, uid) else {
        return peer_auth::Requirement::Permissive;
    };
    peer_auth::requirement(state.peer_auths_for(&pod.namespace), target(pod), port)
}

/// The workload `key` as `state` has it now, if it is still the pod `uid`.
fn current_pod<'a>(state: &'a State, key: &str, uid: &str) -> Option<&'a Pod> {
    state.workload(key).map(|w| &w.pod).filter(|p| p.uid == uid)
}

/// What policies select a workload by: its namespace and current labels.
fn target(pod: &Pod) -> policy::Target<'_> {
    policy::Target {
        namespace: &pod.namespace,
        labels: &pod.labels,
    }
}

#[cfg(test)]
pub(crate) mod fixtures;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod peer_auth_tests;
