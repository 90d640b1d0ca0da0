//! What the agent knows of the mesh: namespaces, workloads, services and policies, as pushed by the
//! controller. One writer (the discovery client) replaces the whole state on every push; readers
//! take an `Arc` and look up synchronously. Protobuf types are converted here, once, at the boundary.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use weft_api::{types, v1};
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
}

/// A service: its cluster IPs, port mapping and selected pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub vips: Vec<IpAddr>,
    /// (service port, target port)
    pub ports: Vec<(u16, u16)>,
    /// Workload keys (`namespace/name`).
    pub endpoints: Vec<String>,
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
    namespaces: BTreeMap<String, Namespace>,
    workloads: BTreeMap<String, Arc<Workload>>,
    services: BTreeMap<String, Service>,
    policies: Scoped<policy::Compiled>,
    peer_auths: Scoped<peer_auth::Compiled>,
    by_ip: HashMap<IpAddr, String>,
    by_vip: HashMap<IpAddr, String>,
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
    by_name: BTreeMap<String, Arc<T>>,
    by_namespace: HashMap<String, Vec<Arc<T>>>,
    mesh: Vec<Arc<T>>,
}

impl<T> Default for Scoped<T> {
    fn default() -> Self {
        Self {
            by_name: BTreeMap::new(),
            by_namespace: HashMap::new(),
            mesh: Vec::new(),
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
        self.by_namespace.clear();
        self.mesh.clear();
        for o in self.by_name.values() {
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

impl State {
    /// Applies one push. A full push replaces everything, except that a rejected resource keeps its
    /// previous version. Returns what was rejected.
    pub fn apply(&self, push: &v1::Push) -> (State, Vec<Rejected>) {
        let mut next = if push.full { State::default() } else { self.clone() };
        next.synced = true;
        next.revision = push.revision;
        let mut rejected = Vec::new();
        for removed in &push.removed {
            next.remove(&removed.r#type, &removed.name);
        }
        for res in &push.resources {
            let Some(k) = &res.key else {
                rejected.push(Rejected {
                    key: "?".into(),
                    error: "resource without a key".into(),
                });
                continue;
            };
            if let Err(error) = next.insert(res) {
                let full_key = format!("{}/{}", k.r#type, k.name);
                tracing::warn!(resource = %full_key, %error, "rejecting resource");
                // Keep what the agent had for it, if anything. `insert` changes nothing when it
                // fails, so only a full push (which started empty) needs the old version back.
                if push.full {
                    self.copy_into(&mut next, &k.r#type, &k.name);
                }
                rejected.push(Rejected { key: full_key, error });
            }
        }
        next.reindex();
        (next, rejected)
    }

    fn insert(&mut self, res: &v1::Resource) -> Result<(), String> {
        use v1::resource::Kind;
        match &res.kind {
            Some(Kind::Namespace(n)) => {
                self.namespaces.insert(n.name.clone(), Namespace::from(n));
            }
            Some(Kind::Workload(w)) => {
                let pod = Pod::try_from(w).map_err(|e| e.to_string())?;
                let identity: Identity = w.identity.parse().map_err(|e| format!("identity: {e}"))?;
                self.workloads
                    .insert(key(&pod.namespace, &pod.name), Arc::new(Workload { pod, identity }));
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
                self.services.insert(
                    key(&s.namespace, &s.name),
                    Service {
                        name: key(&s.namespace, &s.name),
                        vips,
                        ports,
                        endpoints: s.endpoints.clone(),
                    },
                );
            }
            Some(Kind::Policy(p)) => {
                let policy = policy::Compiled::try_from(p).map_err(|e| e.to_string())?;
                self.policies
                    .by_name
                    .insert(key(&p.namespace, &p.name), Arc::new(policy));
            }
            Some(Kind::PeerAuthentication(p)) => {
                let compiled = peer_auth::Compiled::try_from(p).map_err(|e| e.to_string())?;
                self.peer_auths
                    .by_name
                    .insert(key(&p.namespace, &p.name), Arc::new(compiled));
            }
            None => return Err("resource without a body".into()),
        }
        Ok(())
    }

    fn remove(&mut self, kind: &str, name: &str) {
        match kind {
            types::NAMESPACE => {
                self.namespaces.remove(name);
            }
            types::WORKLOAD => {
                self.workloads.remove(name);
            }
            types::SERVICE => {
                self.services.remove(name);
            }
            types::POLICY => {
                self.policies.by_name.remove(name);
            }
            types::PEER_AUTHENTICATION => {
                self.peer_auths.by_name.remove(name);
            }
            _ => {}
        }
    }

    fn copy_into(&self, next: &mut State, kind: &str, name: &str) {
        fn copy<V: Clone>(from: &BTreeMap<String, V>, to: &mut BTreeMap<String, V>, name: &str) {
            if let Some(v) = from.get(name) {
                to.insert(name.to_owned(), v.clone());
            }
        }
        match kind {
            types::NAMESPACE => copy(&self.namespaces, &mut next.namespaces, name),
            types::WORKLOAD => copy(&self.workloads, &mut next.workloads, name),
            types::SERVICE => copy(&self.services, &mut next.services, name),
            types::POLICY => copy(&self.policies.by_name, &mut next.policies.by_name, name),
            types::PEER_AUTHENTICATION => copy(&self.peer_auths.by_name, &mut next.peer_auths.by_name, name),
            _ => {}
        }
    }

    fn reindex(&mut self) {
        self.by_ip = self
            .workloads
            .iter()
            .flat_map(|(k, w)| w.pod.ips.iter().map(move |ip| (*ip, k.clone())))
            .collect();
        self.by_vip = self
            .services
            .iter()
            .flat_map(|(k, s)| s.vips.iter().map(move |ip| (*ip, k.clone())))
            .collect();
        self.policies.reindex();
        self.peer_auths.reindex();
    }

    /// Namespaces and pods, for the enrollment reconciler.
    pub fn snapshot(&self) -> WorkloadSnapshot {
        WorkloadSnapshot {
            namespaces: self.namespaces.values().cloned().collect(),
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
        enrollment::is_enrolled(&w.pod, self.namespaces.get(&w.pod.namespace))
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
    /// when the caller increments it per connection).
    pub fn plan(&self, dst: SocketAddr, pick: usize) -> Plan {
        let mut target = dst;
        if let Some(service) = self.by_vip.get(&dst.ip()).and_then(|k| self.services.get(k)) {
            let Some((_, target_port)) = service.ports.iter().find(|(p, _)| *p == dst.port()) else {
                return Plan::NoEndpoint {
                    service: service.name.clone(),
                };
            };
            // Endpoints with an address of the family the client used.
            let candidates: Vec<IpAddr> = service
                .endpoints
                .iter()
                .filter_map(|k| self.workloads.get(k))
                .filter_map(|w| w.pod.ips.iter().copied().find(|ip| ip.is_ipv6() == dst.is_ipv6()))
                .collect();
            if candidates.is_empty() {
                return Plan::NoEndpoint {
                    service: service.name.clone(),
                };
            }
            target = SocketAddr::new(candidates[pick % candidates.len()], *target_port);
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
