//! What one subscriber should hold, computed from a store snapshot: a pure function, so the rules
//! (which policies a node sees, which pods a service selects, how versions are made) are tested
//! without streams.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message as _;
use weft_api::{
    convert::{peer_authentication_to_wire, policy_to_wire},
    types, v1,
};
use weft_model::policy::Scope;

use super::index::{MeshConfig, namespace_resource, service_resource, workload_resource};
use crate::store::State;

/// A resource key: (type, name), as in [`v1::ResourceKey`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub ty: &'static str,
    pub name: String,
}

impl Key {
    /// Parses the `type/name` form used in [`v1::Ack::rejected`].
    pub fn parse(s: &str) -> Option<Key> {
        let (ty, name) = s.split_once('/')?;
        let ty = ALL_TYPES.into_iter().find(|t| *t == ty)?;
        Some(Key {
            ty,
            name: name.to_owned(),
        })
    }

    pub fn to_wire(&self) -> v1::ResourceKey {
        v1::ResourceKey {
            r#type: self.ty.to_owned(),
            name: self.name.clone(),
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ty, self.name)
    }
}

pub const ALL_TYPES: [&str; 5] = [
    types::NAMESPACE,
    types::WORKLOAD,
    types::SERVICE,
    types::POLICY,
    types::PEER_AUTHENTICATION,
];

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

/// The resource `key` with body `kind`, its version set.
pub fn resource(key: &Key, kind: v1::resource::Kind) -> v1::Resource {
    let mut resource = v1::Resource {
        key: Some(key.to_wire()),
        version: 0,
        kind: Some(kind),
    };
    resource.version = version(&resource);
    resource
}

/// A content hash of the resource's encoding (its `version` left out). The wire maps are hash maps
/// with no stable order, so they are hashed separately, sorted, after the rest of the encoding.
pub fn version(resource: &v1::Resource) -> u64 {
    use v1::resource::Kind as K;
    let mut r = resource.clone();
    r.version = 0;
    let mut maps: Vec<BTreeMap<String, String>> = Vec::new();
    let mut take = |m: &mut std::collections::HashMap<String, String>| maps.push(m.drain().collect());
    match &mut r.kind {
        Some(K::Namespace(n)) => {
            take(&mut n.labels);
            take(&mut n.annotations);
        }
        Some(K::Workload(w)) => {
            take(&mut w.labels);
            take(&mut w.annotations);
        }
        Some(K::Policy(p)) => {
            if let Some(s) = &mut p.selector {
                take(&mut s.match_labels);
            }
        }
        Some(K::PeerAuthentication(p)) => {
            if let Some(s) = &mut p.selector {
                take(&mut s.match_labels);
            }
        }
        Some(K::Service(_)) | None => {}
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&r.encode_to_vec());
    for map in maps {
        ctx.update(&(map.len() as u64).to_be_bytes());
        for (k, v) in map {
            for s in [k, v] {
                ctx.update(&(s.len() as u64).to_be_bytes());
                ctx.update(s.as_bytes());
            }
        }
    }
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first)
}
