//! What must be unique across a store's objects, indexed by who holds it: pod uids, addresses (pod
//! IPs and service VIPs share one space) and the namespace-wide PeerAuthentication of each
//! namespace. Kept in every [`State`](super::State) beside its objects as persistent maps and
//! updated with each object put or removed, so that a request is checked against what it touches,
//! not against the whole store.

use std::{net::IpAddr, sync::Arc};

use imbl::OrdMap;

use super::objects::Object;

/// Who holds each unique value: the very object the state stores (a shared `Arc`, so an entry
/// costs its key and a pointer). A function of the objects alone: [`Index::of`] of a state's
/// objects equals the index kept up to date through every put and remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Index {
    pub(super) uids: OrdMap<String, Arc<Object>>,
    pub(super) addresses: OrdMap<IpAddr, Arc<Object>>,
    /// Namespace -> its PeerAuthentication without a selector.
    pub(super) namespace_wide: OrdMap<String, Arc<Object>>,
}

impl Index {
    /// The index of `objects`, built from scratch.
    pub(super) fn of<'a>(objects: impl IntoIterator<Item = &'a Arc<Object>>) -> Index {
        let mut index = Index::default();
        for object in objects {
            index.insert(object);
        }
        index
    }

    /// Records what `object` holds. Where two objects hold one value (only a state of another
    /// source can have that; the store refuses it) the later one is recorded.
    pub(super) fn insert(&mut self, object: &Arc<Object>) {
        match &**object {
            Object::Pod(p) => {
                self.uids.insert(p.uid.clone(), object.clone());
                for ip in &p.ips {
                    self.addresses.insert(*ip, object.clone());
                }
            }
            Object::Service(s) => {
                for ip in &s.cluster_ips {
                    self.addresses.insert(*ip, object.clone());
                }
            }
            Object::PeerAuthentication(p) if p.is_namespace_wide() => {
                self.namespace_wide.insert(p.metadata.namespace.clone(), object.clone());
            }
            _ => {}
        }
    }

    /// Forgets what `object` (about to be replaced or removed) holds. A value another object was
    /// recorded for since is left alone: within one request a uid or an address may move from one
    /// object to another in either order.
    pub(super) fn remove(&mut self, object: &Arc<Object>) {
        fn release<K: Ord + Clone>(map: &mut OrdMap<K, Arc<Object>>, key: &K, object: &Arc<Object>) {
            if map.get(key).is_some_and(|holder| Arc::ptr_eq(holder, object)) {
                map.remove(key);
            }
        }
        match &**object {
            Object::Pod(p) => {
                release(&mut self.uids, &p.uid, object);
                for ip in &p.ips {
                    release(&mut self.addresses, ip, object);
                }
            }
            Object::Service(s) => {
                for ip in &s.cluster_ips {
                    release(&mut self.addresses, ip, object);
                }
            }
            Object::PeerAuthentication(p) if p.is_namespace_wide() => {
                release(&mut self.namespace_wide, &p.metadata.namespace, object);
            }
            _ => {}
        }
    }
}
