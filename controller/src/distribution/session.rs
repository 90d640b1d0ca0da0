//! One subscriber's side of the protocol, without I/O: what it holds, which push awaits its ack,
//! which versions it rejected. The stream task feeds it indexes and acks and sends the pushes it
//! returns.
//!
//! Rules: the first push is a resync: of the buckets whose digests differ from those the subscriber
//! says it holds, or full when it holds nothing of this store. After that only changes are pushed,
//! and only when the previous push was acked or nacked (so changes made meanwhile are coalesced into
//! the next push). A version the subscriber rejected is not sent again until the resource changes.
//!
//! What the subscriber holds is not copied per subscriber: it is the [`Index`] its last acked push
//! brought it to (shared with every other subscriber at that version), plus the few scoped
//! resources (policies, PeerAuthentications) that differ per node.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use weft_api::{encoded::EncodedPush, sync::BUCKETS, types, v1};

use super::{
    desired::{Key, TypeFilter},
    index::{Change, Entry, Index},
};

/// Streams get distinct nonce prefixes, so no two pushes of one controller share a nonce.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// Resource bytes per chunk of a push: a push of any size goes out in messages of about this size.
/// Small, because each stream's encoder keeps a buffer of its largest message for as long as the
/// stream lives: 64 KiB per subscriber, where 1 MiB chunks made 1,000 subscribers cost 2.5 GiB.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// The types every subscriber of a version of the index holds alike.
const GLOBAL: [&str; 3] = [types::NAMESPACE, types::WORKLOAD, types::SERVICE];
/// The types that go to some nodes only.
const SCOPED: [&str; 2] = [types::POLICY, types::PEER_AUTHENTICATION];

#[derive(Debug)]
pub struct Subscriber {
    node: String,
    filter: TypeFilter,
    /// The index the subscriber's last acked push brought it to: it holds that index's global
    /// resources (but for those it rejected, which are not sent again until they change).
    synced: Option<Arc<Index>>,
    /// The scoped resources it holds: the version we know, or `None` for a version we do not (it
    /// rejected ours in a resync and kept whatever it had).
    scoped: BTreeMap<Key, Option<u64>>,
    /// Scoped versions it rejected, not to be sent again.
    nacked: BTreeMap<Key, u64>,
    pending: Option<Pending>,
    stream: u64,
    seq: u64,
}

#[derive(Debug)]
struct Pending {
    nonce: String,
    target: Arc<Index>,
    /// The push's resources, for a NACK that names none (all rejected): pointers into the index, no
    /// copies.
    sent: Vec<Arc<Entry>>,
    scoped: ScopedSent,
}

#[derive(Debug)]
enum ScopedSent {
    /// A resync: after it, the subscriber holds exactly these (those it rejects: something else).
    Resync { holds: BTreeMap<Key, u64> },
    Delta {
        sent: BTreeMap<Key, u64>,
        removed: Vec<Key>,
    },
}

/// A push to send, before it is cut into chunks.
#[derive(Debug)]
pub struct Outgoing {
    pub nonce: String,
    pub full: bool,
    pub resync: bool,
    pub replaced_buckets: Vec<u32>,
    pub resources: Vec<Arc<Entry>>,
    pub removed: Vec<Key>,
    pub revision: u64,
    pub store_id: String,
}

impl Outgoing {
    /// The push as messages of about `max_bytes` of resources each (at least one message; one
    /// resource per message when a resource is larger). All but the last have `more` set.
    pub fn chunks(self, max_bytes: usize) -> Vec<EncodedPush> {
        let head = |more: bool| EncodedPush {
            nonce: self.nonce.clone(),
            full: self.full,
            resources: Vec::new(),
            removed: Vec::new(),
            revision: self.revision,
            store_id: self.store_id.clone(),
            replaced_buckets: Vec::new(),
            resync: self.resync,
            more,
            queued: None,
        };
        let mut chunks = Vec::new();
        let mut current = head(true);
        current.replaced_buckets.clone_from(&self.replaced_buckets);
        let mut size = current.replaced_buckets.len() * 2;
        for key in &self.removed {
            let wire = key.to_wire();
            let len = key.name.len() + key.ty.len() + 8;
            if size + len > max_bytes && size > 0 {
                chunks.push(std::mem::replace(&mut current, head(true)));
                size = 0;
            }
            size += len;
            current.removed.push(wire);
        }
        for r in &self.resources {
            if size + r.bytes.len() > max_bytes && size > 0 {
                chunks.push(std::mem::replace(&mut current, head(true)));
                size = 0;
            }
            size += r.bytes.len();
            current.resources.push(r.bytes.clone());
        }
        current.more = false;
        chunks.push(current);
        chunks
    }
}

/// What an ack did, for logging.
#[derive(Debug, PartialEq, Eq)]
pub enum Acked {
    Accepted,
    /// The subscriber rejected these resources (all of the push's when it named none).
    Rejected {
        keys: Vec<Key>,
    },
}

/// An ack that matches no push awaiting one.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("ack for nonce {nonce:?}, which is not the push awaiting an ack ({expected:?})")]
pub struct UnexpectedAck {
    pub nonce: String,
    pub expected: Option<String>,
}

impl Subscriber {
    pub fn new(node: String, filter: TypeFilter) -> Self {
        Self {
            node,
            filter,
            synced: None,
            scoped: BTreeMap::new(),
            nacked: BTreeMap::new(),
            pending: None,
            stream: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
            seq: 0,
        }
    }

    /// Whether a push may be sent now (none is awaiting its ack).
    pub fn ready(&self) -> bool {
        self.pending.is_none()
    }

    /// Whether the first push (the resync) was acked.
    pub fn synced(&self) -> bool {
        self.synced.is_some()
    }

    fn nonce(&mut self) -> String {
        self.seq += 1;
        format!("{}-{}", self.stream, self.seq)
    }

    /// The scoped resources of `index` this subscriber should hold.
    fn scoped_desired<'a>(&'a self, index: &'a Index) -> impl Iterator<Item = &'a Arc<Entry>> + 'a {
        SCOPED
            .into_iter()
            .filter(|t| self.filter.wants(t))
            .filter_map(|t| index.table(t))
            .flat_map(move |t| t.iter().filter(|e| index.sends_scoped(&self.node, e)))
    }

    fn global_tables<'a>(&'a self, index: &'a Index) -> impl Iterator<Item = &'a super::index::Table> + 'a {
        GLOBAL
            .into_iter()
            .filter(|t| self.filter.wants(t))
            .filter_map(|t| index.table(t))
    }

    /// Whether the resync of a subscriber that says it holds `held` is a full one.
    pub fn resync_is_full(now: &Index, held: Option<&v1::Held>) -> bool {
        !held.is_some_and(|h| !now.store_id.is_empty() && h.store_id == now.store_id && h.buckets.len() == BUCKETS)
    }

    /// The first push of a stream: brings the subscriber from what `held` says it holds to `now`.
    /// Full when it holds nothing, or another store's resources, or a summary this controller
    /// cannot compare.
    pub fn resync(&mut self, now: &Arc<Index>, held: Option<&v1::Held>) -> Outgoing {
        let scoped: Vec<&Arc<Entry>> = self.scoped_desired(now).collect();
        let comparable =
            held.filter(|h| !now.store_id.is_empty() && h.store_id == now.store_id && h.buckets.len() == BUCKETS);
        let (full, replaced_buckets, resources) = match comparable {
            None => {
                let mut all: Vec<Arc<Entry>> = self.global_tables(now).flat_map(|t| t.iter().cloned()).collect();
                all.extend(scoped.iter().map(|e| Arc::clone(e)));
                (true, Vec::new(), all)
            }
            Some(held) => {
                let mut mine = vec![0u64; BUCKETS];
                for t in self.global_tables(now) {
                    for (m, d) in mine.iter_mut().zip(t.digests()) {
                        *m = m.wrapping_add(*d);
                    }
                }
                let mut scoped_by_bucket: BTreeMap<usize, Vec<&Arc<Entry>>> = BTreeMap::new();
                for e in &scoped {
                    let b = e.bucket();
                    mine[b] = mine[b].wrapping_add(e.digest());
                    scoped_by_bucket.entry(b).or_default().push(e);
                }
                let differ: Vec<usize> = (0..BUCKETS).filter(|b| mine[*b] != held.buckets[*b]).collect();
                let mut resources = Vec::new();
                for b in &differ {
                    for t in self.global_tables(now) {
                        resources.extend(t.bucket(*b).cloned());
                    }
                    if let Some(es) = scoped_by_bucket.get(b) {
                        resources.extend(es.iter().map(|e| Arc::clone(e)));
                    }
                }
                // Bucket numbers are below BUCKETS (1024).
                (false, differ.into_iter().map(|b| b as u32).collect(), resources)
            }
        };
        let holds = scoped.iter().map(|e| (e.key.clone(), e.version)).collect();
        let nonce = self.nonce();
        self.pending = Some(Pending {
            nonce: nonce.clone(),
            target: now.clone(),
            sent: resources.clone(),
            scoped: ScopedSent::Resync { holds },
        });
        Outgoing {
            nonce,
            full,
            resync: true,
            replaced_buckets,
            resources,
            removed: Vec::new(),
            revision: now.revision,
            store_id: now.store_id.clone(),
        }
    }

    /// The push that brings the subscriber from the index it was last brought to to `now`, if
    /// anything it should hold changed; never before the resync was acked, nor while a push awaits
    /// its ack. The work is proportional to what changed.
    pub fn next(&mut self, now: &Arc<Index>) -> Option<Outgoing> {
        if self.pending.is_some() {
            return None;
        }
        let synced = self.synced.as_ref()?;
        if Arc::ptr_eq(synced, now) {
            return None;
        }
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for ty in GLOBAL.into_iter().filter(|t| self.filter.wants(t)) {
            let (Some(old), Some(new)) = (synced.table(ty), now.table(ty)) else {
                continue;
            };
            if old.same(new) {
                continue;
            }
            for change in old.changes(new) {
                match change {
                    Change::Put(e) => resources.push(e.clone()),
                    Change::Removed(k) => removed.push(k.clone()),
                }
            }
        }
        let scoped_same = synced.policies.same(&now.policies)
            && synced.peer_authentications.same(&now.peer_authentications)
            && match (synced.presence(&self.node), now.presence(&self.node)) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
        let mut scoped_sent = BTreeMap::new();
        let mut scoped_removed = Vec::new();
        if !scoped_same {
            let desired: Vec<&Arc<Entry>> = self.scoped_desired(now).collect();
            let keys: BTreeSet<&Key> = desired.iter().map(|e| &e.key).collect();
            for e in &desired {
                let held = self.scoped.get(&e.key) == Some(&Some(e.version));
                let rejected = self.nacked.get(&e.key) == Some(&e.version);
                if !held && !rejected {
                    scoped_sent.insert(e.key.clone(), e.version);
                    resources.push(Arc::clone(e));
                }
            }
            for k in self.scoped.keys().filter(|k| !keys.contains(k)) {
                scoped_removed.push(k.clone());
                removed.push(k.clone());
            }
        }
        if resources.is_empty() && removed.is_empty() {
            // Nothing this subscriber holds changed: it holds `now` as it is.
            self.synced = Some(now.clone());
            return None;
        }
        let nonce = self.nonce();
        self.pending = Some(Pending {
            nonce: nonce.clone(),
            target: now.clone(),
            sent: resources.clone(),
            scoped: ScopedSent::Delta {
                sent: scoped_sent,
                removed: scoped_removed,
            },
        });
        Some(Outgoing {
            nonce,
            full: false,
            resync: false,
            replaced_buckets: Vec::new(),
            resources,
            removed,
            revision: now.revision,
            store_id: now.store_id.clone(),
        })
    }

    /// Records the subscriber's answer to the pending push.
    pub fn ack(&mut self, ack: &v1::Ack) -> Result<Acked, UnexpectedAck> {
        let Some(pending) = self.pending.take_if(|p| p.nonce == ack.nonce) else {
            return Err(UnexpectedAck {
                nonce: ack.nonce.clone(),
                expected: self.pending.as_ref().map(|p| p.nonce.clone()),
            });
        };
        let rejected: BTreeSet<Key> = if ack.error.is_empty() {
            BTreeSet::new()
        } else {
            let named: BTreeSet<Key> = ack.rejected.iter().filter_map(|k| Key::parse(k)).collect();
            if named.is_empty() {
                pending.sent.iter().map(|e| e.key.clone()).collect()
            } else {
                named
            }
        };
        match pending.scoped {
            ScopedSent::Resync { holds } => {
                self.scoped.clear();
                self.nacked.clear();
                for (k, version) in holds {
                    if rejected.contains(&k) {
                        self.nacked.insert(k.clone(), version);
                        self.scoped.insert(k, None);
                    } else {
                        self.scoped.insert(k, Some(version));
                    }
                }
            }
            ScopedSent::Delta { sent, removed } => {
                for k in &removed {
                    self.scoped.remove(k);
                    self.nacked.remove(k);
                }
                for (k, version) in sent {
                    if rejected.contains(&k) {
                        self.nacked.insert(k, version);
                    } else {
                        self.nacked.remove(&k);
                        self.scoped.insert(k, Some(version));
                    }
                }
            }
        }
        self.synced = Some(pending.target);
        Ok(if ack.error.is_empty() {
            Acked::Accepted
        } else {
            Acked::Rejected {
                keys: pending
                    .sent
                    .iter()
                    .filter(|e| rejected.contains(&e.key))
                    .map(|e| e.key.clone())
                    .collect(),
            }
        })
    }
}

#[cfg(test)]
mod tests;
