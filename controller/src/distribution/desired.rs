//! What one subscriber should hold, computed from a store snapshot: a pure function, so the rules
//! (which policies a node sees, which pods a service selects, how versions are made) are tested
//! without streams.

use std::collections::{BTreeMap, BTreeSet};

use weft_api::{
    convert::{peer_authentication_to_wire, policy_to_wire},
    types, v1,
};
use weft_model::policy::Scope;

pub use super::resource::Key;
use super::resource::{ALL_TYPES, MeshConfig, namespace_resource, resource, service_resource, workload_resource};
use crate::store::State;

/// The resource types a subscriber asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeFilter(BTreeSet<&'static str>);

impl TypeFilter {
    /// From [`v1::Subscribe::types`]: empty means all; an unknown name is an error naming it.
    pub fn parse(names: &[String]) -> Result<TypeFilter, String> {
        if names.is_empty() {
            return Ok(TypeFilter(ALL_TYPES.into_iter().collect()));
        }
        names
            .iter()
            .map(|n| {
                ALL_TYPES
                    .into_iter()
                    .find(|t| t == n)
                    .ok_or_else(|| format!("unknown resource type {n:?} (known: {})", ALL_TYPES.join(", ")))
            })
            .collect::<Result<_, _>>()
            .map(TypeFilter)
    }

    pub fn wants(&self, ty: &str) -> bool {
        self.0.contains(ty)
    }
}

/// Every resource `node` should hold, with versions set, computed from scratch: the reference the
/// incremental [`Index`](super::index::Index) is tested against.
///
/// All namespaces, all pods (as workloads, each naming the services of its namespace that select
/// it), all services, the policies of the namespaces that have a pod on `node` (the agent enforces
/// policy for inbound connections to its own pods only), and the policies of the root namespace,
/// which apply to every namespace (marked [`Scope::Mesh`]). PeerAuthentications go by the same rule
/// as AuthorizationPolicies.
pub fn desired(state: &State, node: &str, mesh: &MeshConfig, filter: &TypeFilter) -> BTreeMap<Key, v1::Resource> {
    use v1::resource::Kind as K;
    let mut out = BTreeMap::new();
    let mut add = |ty: &'static str, name: String, kind: K| {
        let key = Key { ty, name };
        out.insert(key.clone(), resource(&key, kind));
    };
    if filter.wants(types::NAMESPACE) {
        for ns in state.namespaces() {
            add(types::NAMESPACE, ns.name.clone(), namespace_resource(ns));
        }
    }
    if filter.wants(types::WORKLOAD) {
        for p in state.pods() {
            add(
                types::WORKLOAD,
                format!("{}/{}", p.namespace, p.name),
                workload_resource(mesh, state, p),
            );
        }
    }
    if filter.wants(types::SERVICE) {
        for s in state.services() {
            add(
                types::SERVICE,
                format!("{}/{}", s.namespace, s.name),
                service_resource(s),
            );
        }
    }
    let local: BTreeSet<&str> = state
        .pods()
        .filter(|p| p.node == node)
        .map(|p| p.namespace.as_str())
        .collect();
    // Policies of both kinds go where they can apply: the root namespace's (mesh-wide) to every
    // node, a namespace's own to the nodes with its pods.
    let sent_here = |namespace: &str| {
        let scope = Scope::of(namespace, &mesh.root_namespace);
        (scope == Scope::Mesh || local.contains(namespace)).then_some(scope)
    };
    if filter.wants(types::PEER_AUTHENTICATION) {
        for p in state.peer_authentications() {
            let namespace = p.metadata.namespace.as_str();
            if let Some(scope) = sent_here(namespace) {
                add(
                    types::PEER_AUTHENTICATION,
                    format!("{namespace}/{}", p.metadata.name),
                    K::PeerAuthentication(peer_authentication_to_wire(p, scope)),
                );
            }
        }
    }
    if filter.wants(types::POLICY) {
        for p in state.policies() {
            let namespace = p.metadata.namespace.as_str();
            if let Some(scope) = sent_here(namespace) {
                add(
                    types::POLICY,
                    format!("{namespace}/{}", p.metadata.name),
                    K::Policy(policy_to_wire(p, scope)),
                );
            }
        }
    }
    out
}
