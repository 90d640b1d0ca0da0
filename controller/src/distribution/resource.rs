//! Resources as they are distributed: their keys, how each object of the store becomes one, and
//! how versions are made. Shared by the incremental [`index`](super::index) and the from-scratch
//! [`desired`](super::desired).

use std::collections::BTreeMap;

use prost::Message as _;
use weft_api::{types, v1};
use weft_model::identity::Identity;

use crate::store::{
    State,
    objects::{Namespace, Pod, Service},
};

/// Mesh-wide settings that shape what subscribers are sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    /// Of the workload identities (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub trust_domain: String,
    /// Whose policies apply to workloads of every namespace.
    pub root_namespace: String,
}

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

fn to_map(m: &BTreeMap<String, String>) -> std::collections::HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn namespace_resource(ns: &Namespace) -> v1::resource::Kind {
    v1::resource::Kind::Namespace(v1::Namespace {
        name: ns.name.clone(),
        labels: to_map(&ns.meta.labels),
        annotations: to_map(&ns.meta.annotations),
    })
}

pub fn service_resource(s: &Service) -> v1::resource::Kind {
    v1::resource::Kind::Service(v1::Service {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        vips: s.cluster_ips.iter().map(ToString::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| v1::ServicePort {
                name: p.name.clone(),
                port: u32::from(p.port),
                target_port: u32::from(p.target_port),
            })
            .collect(),
    })
}

/// A pod as a workload of `state`: with the services of its namespace that select it.
pub fn workload_resource(mesh: &MeshConfig, state: &State, p: &Pod) -> v1::resource::Kind {
    let services = state
        .services_in(&p.namespace)
        .filter(|s| s.selects(p))
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect();
    v1::resource::Kind::Workload(v1::Workload {
        uid: p.uid.clone(),
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        node: p.node.clone(),
        service_account: p.service_account.clone(),
        // The trust domain is checked at start and the store admits only DNS labels, so this
        // cannot fail; if it did, the agent would refuse the workload by name.
        identity: Identity::try_new(&mesh.trust_domain, &p.namespace, &p.service_account)
            .map(|id| id.to_string())
            .unwrap_or_default(),
        labels: to_map(&p.meta.labels),
        annotations: to_map(&p.meta.annotations),
        ips: p.ips.iter().map(ToString::to_string).collect(),
        services,
    })
}
