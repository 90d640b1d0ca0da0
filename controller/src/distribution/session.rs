//! One subscriber's side of the protocol, without I/O: what it holds, which push awaits its ack,
//! which versions it rejected. The stream task feeds it desired states and acks and sends the
//! pushes it returns.
//!
//! Rules: the first push is full; after that only changes are pushed, and only when the previous
//! push was acked or nacked (so changes made meanwhile are coalesced into the next push). A version
//! the subscriber rejected is not sent again until the resource changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic::{AtomicU64, Ordering},
};

use weft_api::v1;

use super::desired::Key;

/// Streams get distinct nonce prefixes, so no two pushes of one controller share a nonce.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
pub struct Session {
    /// What the subscriber holds: the version we know, or `None` for a version we do not (it
    /// rejected our version in a full push and kept whatever it had).
    held: BTreeMap<Key, Option<u64>>,
    /// Versions the subscriber rejected, not to be sent again.
    nacked: BTreeMap<Key, u64>,
    pending: Option<Pending>,
    started: bool,
    stream: u64,
    seq: u64,
}

#[derive(Debug)]
struct Pending {
    nonce: String,
    full: bool,
    resources: BTreeMap<Key, u64>,
    removed: Vec<Key>,
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

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    pub fn new() -> Self {
        Self {
            held: BTreeMap::new(),
            nacked: BTreeMap::new(),
            pending: None,
            started: false,
            stream: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
            seq: 0,
        }
    }

    /// Whether a push may be sent now (none is awaiting its ack).
    pub fn ready(&self) -> bool {
        self.pending.is_none()
    }

    /// The push that brings the subscriber to `desired`, if one is due: always the first time (full,
    /// even when empty), later only when something changed, and never while a push awaits its ack.
    pub fn next_push(&mut self, desired: &BTreeMap<Key, v1::Resource>, revision: u64) -> Option<v1::Push> {
        if self.pending.is_some() {
            return None;
        }
        self.nacked.retain(|k, _| desired.contains_key(k));
        let full = !self.started;
        let changed: Vec<(&Key, &v1::Resource)> = desired
            .iter()
            .filter(|(k, r)| {
                full || (self.held.get(*k) != Some(&Some(r.version)) && self.nacked.get(*k) != Some(&r.version))
            })
            .collect();
        let removed: Vec<Key> = if full {
            Vec::new()
        } else {
            self.held
                .keys()
                .filter(|k| !desired.contains_key(*k))
                .cloned()
                .collect()
        };
        if !full && changed.is_empty() && removed.is_empty() {
            return None;
        }
        self.started = true;
        self.seq += 1;
        let nonce = format!("{}-{}", self.stream, self.seq);
        let resources: BTreeMap<Key, u64> = changed.iter().map(|(k, r)| ((*k).clone(), r.version)).collect();
        let push = v1::Push {
            nonce: nonce.clone(),
            full,
            resources: changed.into_iter().map(|(_, r)| r.clone()).collect(),
            removed: removed.iter().map(Key::to_wire).collect(),
            revision,
            store_id: String::new(),
        };
        self.pending = Some(Pending {
            nonce,
            full,
            resources,
            removed,
        });
        Some(push)
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
                pending.resources.keys().cloned().collect()
            } else {
                named
            }
        };
        if pending.full {
            self.held.clear();
        }
        for k in &pending.removed {
            self.held.remove(k);
            self.nacked.remove(k);
        }
        let mut rejected_keys = Vec::new();
        for (k, version) in pending.resources {
            if rejected.contains(&k) {
                self.nacked.insert(k.clone(), version);
                if pending.full {
                    self.held.insert(k.clone(), None);
                }
                rejected_keys.push(k);
            } else {
                self.nacked.remove(&k);
                self.held.insert(k, Some(version));
            }
        }
        Ok(if ack.error.is_empty() {
            Acked::Accepted
        } else {
            Acked::Rejected { keys: rejected_keys }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(name: &str, version: u64) -> (Key, v1::Resource) {
        let key = Key {
            ty: "namespace",
            name: name.into(),
        };
        let r = v1::Resource {
            key: Some(key.to_wire()),
            version,
            kind: Some(v1::resource::Kind::Namespace(v1::Namespace {
                name: name.into(),
                ..Default::default()
            })),
        };
        (key, r)
    }

    fn desired(items: &[(&str, u64)]) -> BTreeMap<Key, v1::Resource> {
        items.iter().map(|(n, v)| resource(n, *v)).collect()
    }

    fn ack(push: &v1::Push) -> v1::Ack {
        v1::Ack {
            nonce: push.nonce.clone(),
            ..Default::default()
        }
    }

    fn names(push: &v1::Push) -> Vec<String> {
        push.resources.iter().map(|r| r.key.clone().unwrap().name).collect()
    }

    #[test]
    fn first_push_is_full_even_when_empty_then_only_changes() {
        let mut s = Session::new();
        let first = s.next_push(&desired(&[]), 0).unwrap();
        assert!(first.full && first.resources.is_empty());
        assert!(s.next_push(&desired(&[("a", 1)]), 1).is_none(), "waits for the ack");
        s.ack(&ack(&first)).unwrap();
        let second = s.next_push(&desired(&[("a", 1), ("b", 1)]), 2).unwrap();
        assert!(!second.full);
        assert_eq!(names(&second), ["a", "b"]);
        assert_ne!(second.nonce, first.nonce);
        s.ack(&ack(&second)).unwrap();
        assert!(s.next_push(&desired(&[("a", 1), ("b", 1)]), 3).is_none());
        let third = s.next_push(&desired(&[("a", 2)]), 4).unwrap();
        assert_eq!(names(&third), ["a"]);
        assert_eq!(
            third.removed,
            [Key {
                ty: "namespace",
                name: "b".into()
            }
            .to_wire()]
        );
    }

    #[test]
    fn nacked_version_is_not_resent_until_it_changes() {
        let mut s = Session::new();
        let first = s.next_push(&desired(&[("a", 1), ("b", 1)]), 1).unwrap();
        s.ack(&v1::Ack {
            nonce: first.nonce.clone(),
            error: "bad a".into(),
            rejected: vec!["namespace/a".into()],
        })
        .unwrap();
        assert!(s.next_push(&desired(&[("a", 1), ("b", 1)]), 1).is_none());
        let fixed = s.next_push(&desired(&[("a", 2), ("b", 1)]), 2).unwrap();
        assert_eq!(names(&fixed), ["a"]);
        // A NACK naming nothing rejects the whole push.
        let r = s
            .ack(&v1::Ack {
                nonce: fixed.nonce.clone(),
                error: "no".into(),
                rejected: vec![],
            })
            .unwrap();
        assert_eq!(
            r,
            Acked::Rejected {
                keys: vec![Key {
                    ty: "namespace",
                    name: "a".into()
                }]
            }
        );
        assert!(s.next_push(&desired(&[("a", 2), ("b", 1)]), 2).is_none());
        // Deleting a resource the subscriber kept (an unknown version) still removes it.
        let gone = s.next_push(&desired(&[("b", 1)]), 3).unwrap();
        assert_eq!(gone.removed.len(), 1);
    }

    #[test]
    fn ack_with_a_stale_nonce_is_refused() {
        let mut s = Session::new();
        let first = s.next_push(&desired(&[]), 0).unwrap();
        let err = s
            .ack(&v1::Ack {
                nonce: "nope".into(),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(err.expected, Some(first.nonce.clone()));
        s.ack(&ack(&first)).unwrap();
        assert!(s.ack(&ack(&first)).is_err(), "an ack counts once");
    }
}
