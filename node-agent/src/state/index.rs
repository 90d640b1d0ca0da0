//! The state's maps: values found by their own key, values by address, and each service's
//! endpoints. All persistent (a new state shares what a push did not change), all found without
//! allocating, and small per entry: a map of 100,000 workloads holds one pointer for each.

use std::{
    borrow::Borrow,
    cmp::Ordering,
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use imbl::OrdMap;

use super::workload::{Service, Workload};

/// What a [`ByKey`] orders by.
pub(super) trait Keyed {
    fn key(&self) -> &str;
}

impl Keyed for Workload {
    fn key(&self) -> &str {
        Workload::key(self)
    }
}

impl Keyed for Service {
    fn key(&self) -> &str {
        &self.name
    }
}

/// An `Arc<T>` ordered, and found, by its key: a set of these is a map from key to value that
/// stores the key once, in the value.
pub(super) struct ByKey<T>(pub(super) Arc<T>);

impl<T> Clone for ByKey<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Keyed> Borrow<str> for ByKey<T> {
    fn borrow(&self) -> &str {
        self.0.key()
    }
}

impl<T: Keyed> PartialEq for ByKey<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.key() == other.0.key()
    }
}

impl<T: Keyed> Eq for ByKey<T> {}

impl<T: Keyed> PartialOrd for ByKey<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T: Keyed> Ord for ByKey<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.key().cmp(other.0.key())
    }
}

impl<T: fmt::Debug> fmt::Debug for ByKey<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Values by IP address, the two families apart: an IPv4 entry is then half the size.
#[derive(Clone, Debug)]
pub(super) struct ByIp<V> {
    v4: OrdMap<Ipv4Addr, V>,
    v6: OrdMap<Ipv6Addr, V>,
}

impl<V> Default for ByIp<V> {
    fn default() -> Self {
        Self {
            v4: OrdMap::new(),
            v6: OrdMap::new(),
        }
    }
}

impl<V: Clone> ByIp<V> {
    pub(super) fn get(&self, ip: IpAddr) -> Option<&V> {
        match ip {
            IpAddr::V4(ip) => self.v4.get(&ip),
            IpAddr::V6(ip) => self.v6.get(&ip),
        }
    }

    pub(super) fn insert(&mut self, ip: IpAddr, v: V) {
        match ip {
            IpAddr::V4(ip) => self.v4.insert(ip, v),
            IpAddr::V6(ip) => self.v6.insert(ip, v),
        };
    }

    pub(super) fn remove(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(ip) => self.v4.remove(&ip),
            IpAddr::V6(ip) => self.v6.remove(&ip),
        };
    }
}

/// A service's endpoints: the workloads that name it and have an address of the family, in key
/// order. A connection picks one by index.
#[derive(Clone, Debug, Default)]
pub(super) struct Endpoints {
    v4: Arc<[Arc<Workload>]>,
    v6: Arc<[Arc<Workload>]>,
}

impl Endpoints {
    pub(super) fn of_family(&self, v6: bool) -> &[Arc<Workload>] {
        if v6 { &self.v6 } else { &self.v4 }
    }
}

/// Membership changes of a push being applied, by service, folded into the services' endpoints
/// once, when the push is finished ([`Pending::flush`]): a full push builds each service's list
/// once, a delta rebuilds the lists of the services it touched. Empty in every published state.
#[derive(Clone, Debug, Default)]
pub(super) struct Pending(HashMap<Arc<str>, Vec<Change>>);

#[derive(Clone, Debug)]
enum Change {
    Put(Arc<Workload>),
    /// The workload of this key left.
    Remove(Arc<str>),
}

impl Change {
    fn key(&self) -> &str {
        match self {
            Change::Put(w) => w.key(),
            Change::Remove(k) => k,
        }
    }
}

impl Pending {
    /// `w` names `service` (replacing any workload of its key).
    pub(super) fn put(&mut self, service: &Arc<str>, w: &Arc<Workload>) {
        self.0.entry(service.clone()).or_default().push(Change::Put(w.clone()));
    }

    /// The workload `key` no longer names `service`.
    pub(super) fn remove(&mut self, service: &Arc<str>, key: &Arc<str>) {
        self.0
            .entry(service.clone())
            .or_default()
            .push(Change::Remove(key.clone()));
    }

    /// Applies the changes to `members`; a service left without endpoints leaves the map.
    pub(super) fn flush(self, members: &mut OrdMap<Arc<str>, Endpoints>) {
        for (service, mut changes) in self.0 {
            // The last change of each key wins (sorting is stable).
            changes.sort_by(|a, b| a.key().cmp(b.key()));
            let mut last: Vec<Change> = Vec::with_capacity(changes.len());
            for c in changes {
                if last.last().is_some_and(|l| l.key() == c.key()) {
                    last.pop();
                }
                last.push(c);
            }
            let old = members.get(&*service).cloned().unwrap_or_default();
            let new = Endpoints {
                v4: merge(&old.v4, &last, false),
                v6: merge(&old.v6, &last, true),
            };
            if new.v4.is_empty() && new.v6.is_empty() {
                members.remove(&*service);
            } else {
                members.insert(service, new);
            }
        }
    }
}

/// `old` (in key order) with `changes` (in key order, one per key) applied, for the family of `v6`;
/// `old` itself when nothing in it changed.
fn merge(old: &Arc<[Arc<Workload>]>, changes: &[Change], v6: bool) -> Arc<[Arc<Workload>]> {
    let mut out = Vec::with_capacity(old.len() + changes.len());
    let mut rest = old.iter().peekable();
    for c in changes {
        while let Some(w) = rest.next_if(|w| **w.key() < *c.key()) {
            out.push(w.clone());
        }
        rest.next_if(|w| **w.key() == *c.key());
        if let Change::Put(w) = c
            && w.ip(v6).is_some()
        {
            out.push(w.clone());
        }
    }
    out.extend(rest.cloned());
    let unchanged = out.len() == old.len() && out.iter().zip(old.iter()).all(|(a, b)| Arc::ptr_eq(a, b));
    if unchanged { old.clone() } else { out.into() }
}
