//! What many workloads have in common, held once: node, service-account and service names,
//! identities, label and annotation sets, service lists, and the [`Template`] the pods of one
//! ReplicaSet share. A mesh of 100,000 pods has a few thousand of each.
//!
//! Every version of a state lineage (a state and the ones made from it by pushes) takes its values
//! from one [`Interner`], shared behind a lock that only the writer (the discovery client, while it
//! applies a push) takes; readers never see it. The pools hold strong references. A value that only
//! its pool still holds is dropped when its slice of the pool is pruned ([`Interner::maybe_prune`]):
//! one slice in [`SLICES`] at a time, a slice whenever as many resources changed as a slice holds
//! live values, so that a push pays for a small part of the pools, and every dead value goes within
//! a round of slices (about as many changes as the pools hold live values). Pruning invalidates
//! nothing: every state holds strong references to what it uses, so an old `Arc<State>` keeps its
//! values, and a value pruned while a new state still wanted it is simply interned again.

use std::{
    borrow::Borrow,
    collections::HashMap,
    fmt,
    hash::{BuildHasher, Hash, RandomState},
    sync::{Arc, Mutex, MutexGuard},
};

use weft_hbone::identity::Identity;

use super::workload::{Labels, Share, Template};

/// Each pool is cut in this many slices, pruned one at a time.
const SLICES: usize = 32;

/// A slice is pruned after at least this many changes: a small mesh is pruned now and then, not
/// on every push.
const PRUNE_AFTER_AT_LEAST: usize = 16;

/// The pools of one state lineage; cloning shares them.
#[derive(Clone, Default)]
pub(super) struct Shared(Arc<Mutex<Interner>>);

impl Shared {
    /// The pools, for the writer. A panic while they were held leaves them whole (each operation
    /// is one insertion, or one slice's pruning), so a poisoned lock is taken as it is.
    pub(super) fn lock(&self) -> MutexGuard<'_, Interner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for Shared {
    /// How many values the pools hold (never waiting for the writer: "busy" while it applies).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.try_lock() {
            Ok(pools) => write!(f, "Interner({} values)", pools.len()),
            Err(_) => f.write_str("Interner(busy)"),
        }
    }
}

#[derive(Default)]
pub(super) struct Interner {
    strings: Pool<str>,
    identities: Pool<Identity>,
    label_sets: Pool<Labels>,
    service_lists: Pool<[Arc<str>]>,
    /// Templates by the addresses of their parts: the parts are interned, so equal parts are the
    /// same values, and the template in the entry keeps them (and their addresses) alive.
    templates: Sliced<[usize; 5], Arc<Template>>,
    /// Resources put or removed that no slice's pruning paid for yet.
    changes: usize,
    /// The slice to prune next.
    next_slice: usize,
    /// What each slice held (of all pools) after it was last pruned: about the live values.
    live: [usize; SLICES],
}

impl Interner {
    pub(super) fn string<Q>(&mut self, s: Q) -> Arc<str>
    where
        Q: Borrow<str>,
        Arc<str>: From<Q>,
    {
        self.strings.intern(s)
    }

    pub(super) fn identity(&mut self, identity: Identity) -> Arc<Identity> {
        self.identities.intern(identity)
    }

    pub(super) fn labels(&mut self, labels: Labels) -> Arc<Labels> {
        self.label_sets.intern(labels)
    }

    /// The list of these services (`namespace/name`), each name interned.
    pub(super) fn services(&mut self, names: &[String]) -> Arc<[Arc<str>]> {
        let list: Vec<Arc<str>> = names.iter().map(|n| self.strings.intern(n.as_str())).collect();
        self.service_lists.intern(list)
    }

    /// The template of these parts, each taken from this interner.
    pub(super) fn template(&mut self, template: Template) -> Arc<Template> {
        let parts = template.parts();
        if let Some((_, held)) = self.templates.get(&parts) {
            return held.clone();
        }
        let held = Arc::new(template);
        self.templates.insert(parts, held.clone());
        held
    }

    /// Notes that `n` resources were put or removed: what they held may be unused now.
    pub(super) fn changed(&mut self, n: usize) {
        self.changes += n;
    }

    /// Prunes the next slice once as many resources changed as a slice held live values (and at
    /// least [`PRUNE_AFTER_AT_LEAST`]). A change adds a few values at most: pruning costs O(1) per
    /// change, and a push pays for one slice at most. What a large push left to do (a round of
    /// slices at most) is done by the pushes after it, a slice each.
    pub(super) fn maybe_prune(&mut self) {
        let threshold = (self.live.iter().sum::<usize>() / SLICES).max(PRUNE_AFTER_AT_LEAST);
        if self.changes >= threshold {
            self.changes = (self.changes - threshold).min(threshold * SLICES);
            self.prune_slice();
        }
    }

    /// Drops the values of one slice that only their pool holds. Templates first: they hold the
    /// other values (which go when their own slice's turn comes).
    fn prune_slice(&mut self) {
        let slice = self.next_slice;
        self.next_slice = (slice + 1) % SLICES;
        self.live[slice] = self.templates.retain(slice, |_, t| Arc::strong_count(t) > 1)
            + self.service_lists.prune(slice)
            + self.label_sets.prune(slice)
            + self.identities.prune(slice)
            + self.strings.prune(slice);
    }

    /// How many values the pools hold.
    pub(super) fn len(&self) -> usize {
        self.strings.0.len()
            + self.identities.0.len()
            + self.label_sets.0.len()
            + self.service_lists.0.len()
            + self.templates.len()
    }
}

/// One kind of value, each distinct one held once.
struct Pool<T: ?Sized>(Sliced<Arc<T>, ()>);

impl<T: ?Sized> Default for Pool<T> {
    fn default() -> Self {
        Self(Sliced::default())
    }
}

impl<T: ?Sized + Hash + Eq> Pool<T> {
    /// The pool's value equal to `value`, which becomes it if there is none.
    fn intern<Q>(&mut self, value: Q) -> Arc<T>
    where
        Q: Borrow<T>,
        Arc<T>: From<Q>,
    {
        if let Some((held, ())) = self.0.get(value.borrow()) {
            return held.clone();
        }
        let held = Arc::from(value);
        self.0.insert(held.clone(), ());
        held
    }

    /// Drops the values of `slice` that only the pool holds; returns how many it keeps.
    fn prune(&mut self, slice: usize) -> usize {
        self.0.retain(slice, |v, ()| Arc::strong_count(v) > 1)
    }
}

/// A map in [`SLICES`] parts by the hash of the key, each pruned on its own.
struct Sliced<K, V> {
    slices: Vec<HashMap<K, V>>,
    /// Picks a key's slice (each slice hashes with its own hasher as well).
    hasher: RandomState,
}

impl<K, V> Default for Sliced<K, V> {
    fn default() -> Self {
        Self {
            slices: (0..SLICES).map(|_| HashMap::new()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl<K: Hash + Eq, V> Sliced<K, V> {
    /// `key`'s slice; a borrowed form hashes as its key does (the `Borrow` contract).
    fn slice_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (self.hasher.hash_one(key) % SLICES as u64) as usize
    }

    fn get<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.slices[self.slice_of(key)].get_key_value(key)
    }

    fn insert(&mut self, key: K, value: V) {
        let slice = self.slice_of(&key);
        self.slices[slice].insert(key, value);
    }

    /// Keeps the entries of `slice` that `keep` says; returns how many it kept.
    fn retain(&mut self, slice: usize, keep: impl FnMut(&K, &mut V) -> bool) -> usize {
        let map = &mut self.slices[slice];
        map.retain(keep);
        // In proportion to what it holds after a mesh shrank.
        if map.capacity() > 4 * map.len().max(16) {
            map.shrink_to_fit();
        }
        map.len()
    }

    fn len(&self) -> usize {
        self.slices.iter().map(HashMap::len).sum()
    }
}

impl Share for Interner {
    fn string(&mut self, s: String) -> Arc<str> {
        Interner::string(self, s)
    }

    fn identity(&mut self, identity: Identity) -> Arc<Identity> {
        Interner::identity(self, identity)
    }

    fn labels(&mut self, labels: Labels) -> Arc<Labels> {
        Interner::labels(self, labels)
    }

    fn services(&mut self, names: &[String]) -> Arc<[Arc<str>]> {
        Interner::services(self, names)
    }

    fn template(&mut self, template: Template) -> Arc<Template> {
        Interner::template(self, template)
    }
}
