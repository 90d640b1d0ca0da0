use std::sync::Arc;

use prost::Message as _;
use weft_api::v1;

use super::*;
use crate::{
    distribution::index::{Index, tests::mesh},
    store::Store,
};

fn store(yaml: &str) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("scratch");
    let store = Store::open(dir.path()).expect("store");
    store.apply(yaml, "t").expect("objects");
    (dir, store)
}

const SHOP: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: cart, namespace: shop, uid: 0b5e1c2a-7d3f-4a61-9c8e-000000000001}\nspec: {nodeName: node1}\nstatus: {podIP: 10.0.1.1}\n";

fn policy(action: &str) -> String {
    format!(
        "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {{action: {action}, rules: [{{from: [{{source: {{namespaces: [x]}}}}]}}]}}\n"
    )
}

fn all() -> TypeFilter {
    TypeFilter::parse(&[]).expect("all")
}

fn ack(push: &Outgoing) -> v1::Ack {
    v1::Ack {
        nonce: push.nonce.clone(),
        ..Default::default()
    }
}

fn keys(push: &Outgoing) -> Vec<String> {
    push.resources.iter().map(|e| e.key.to_string()).collect()
}

#[test]
fn first_push_is_a_full_resync_then_only_changes_once_acked() {
    let (_dir, store) = store(SHOP);
    let index = Arc::new(Index::build(mesh(), store.snapshot()));
    let mut s = Subscriber::new("node1".into(), all());
    assert!(s.next(&index).is_none(), "nothing before the resync");
    let first = s.resync(&index, None);
    assert!(first.full && first.resync);
    assert_eq!(keys(&first), ["namespace/shop", "workload/shop/cart"]);
    store.apply(&policy("DENY"), "t").expect("policy");
    let index = Arc::new(index.update(store.snapshot()));
    assert!(s.next(&index).is_none(), "waits for the ack");
    s.ack(&ack(&first)).expect("acked");
    let second = s.next(&index).expect("the policy");
    assert!(!second.full && !second.resync);
    assert_eq!(keys(&second), ["policy/shop/p"]);
    assert_ne!(second.nonce, first.nonce);
    s.ack(&ack(&second)).expect("acked");
    assert!(s.next(&index).is_none(), "nothing new");
    // The node's last pod goes: the namespace's policy goes with it.
    store
        .delete(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: cart, namespace: shop}\n",
            "t",
            false,
        )
        .expect("deleted");
    let index = Arc::new(index.update(store.snapshot()));
    let third = s.next(&index).expect("a delta");
    let removed: Vec<String> = third.removed.iter().map(ToString::to_string).collect();
    assert_eq!(removed, ["workload/shop/cart", "policy/shop/p"]);
}

#[test]
fn a_nacked_policy_is_not_resent_until_it_changes() {
    let (_dir, store) = store(SHOP);
    let index = Arc::new(Index::build(mesh(), store.snapshot()));
    let mut s = Subscriber::new("node1".into(), all());
    let first = s.resync(&index, None);
    s.ack(&ack(&first)).expect("acked");
    store.apply(&policy("DENY"), "t").expect("policy");
    let index = Arc::new(index.update(store.snapshot()));
    let push = s.next(&index).expect("the policy");
    let outcome = s
        .ack(&v1::Ack {
            nonce: push.nonce.clone(),
            error: "bad".into(),
            rejected: vec!["policy/shop/p".into()],
        })
        .expect("its push");
    assert_eq!(
        outcome,
        Acked::Rejected {
            keys: vec![Key::parse("policy/shop/p").expect("a key")]
        }
    );
    // Another change elsewhere: the rejected version is not sent again.
    store
        .apply(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {a: b}}\n",
            "t",
        )
        .expect("label");
    let index = Arc::new(index.update(store.snapshot()));
    let push = s.next(&index).expect("the namespace");
    assert_eq!(keys(&push), ["namespace/shop"]);
    s.ack(&ack(&push)).expect("acked");
    store.apply(&policy("ALLOW"), "t").expect("fixed");
    let index = Arc::new(index.update(store.snapshot()));
    let push = s.next(&index).expect("the fixed policy");
    assert_eq!(keys(&push), ["policy/shop/p"]);
}

#[test]
fn ack_with_a_stale_nonce_is_refused() {
    let (_dir, store) = store(SHOP);
    let index = Arc::new(Index::build(mesh(), store.snapshot()));
    let mut s = Subscriber::new("node1".into(), all());
    let first = s.resync(&index, None);
    let err = s
        .ack(&v1::Ack {
            nonce: "nope".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.expected, Some(first.nonce.clone()));
    s.ack(&ack(&first)).expect("acked");
    assert!(s.ack(&ack(&first)).is_err(), "an ack counts once");
}

#[test]
fn a_held_summary_of_another_store_gets_a_full_resync() {
    let (_dir, store) = store(SHOP);
    let index = Arc::new(Index::build(mesh(), store.snapshot()));
    let held = v1::Held {
        store_id: "another".into(),
        revision: 1,
        buckets: vec![0; weft_api::sync::BUCKETS],
    };
    let push = Subscriber::new("node1".into(), all()).resync(&index, Some(&held));
    assert!(push.full && push.resources.len() == 2);
    // The right store but a summary of another size: full too.
    let held = v1::Held {
        store_id: index.store_id.clone(),
        revision: 1,
        buckets: vec![0; 16],
    };
    assert!(Subscriber::new("node1".into(), all()).resync(&index, Some(&held)).full);
}

#[test]
fn a_big_push_goes_in_chunks_that_decode_to_the_whole() {
    let pods: String = (0..3000)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: shop, uid: 0b5e1c2a-7d3f-4a61-9c8e-{i:012}, labels: {{app: cart, version: v1}}}}\nspec: {{nodeName: node{}}}\nstatus: {{podIP: 10.{}.{}.{}}}\n",
                i % 7,
                i / 65536 + 1,
                (i / 256) % 256,
                i % 256
            )
        })
        .collect();
    let (_dir, store) = store(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n{pods}"
    ));
    let index = Arc::new(Index::build(mesh(), store.snapshot()));
    let push = Subscriber::new("node1".into(), all()).resync(&index, None);
    let total: usize = push.resources.iter().map(|e| e.bytes.len()).sum();
    let nonce = push.nonce.clone();
    let chunks = push.chunks(64 * 1024);
    assert!(
        chunks.len() >= total / (64 * 1024),
        "{} chunks for {total} bytes",
        chunks.len()
    );
    let mut names = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let bytes = chunk.encode_to_vec();
        assert!(bytes.len() < 64 * 1024 + 4096, "chunk {i}: {} bytes", bytes.len());
        let decoded = v1::Push::decode(&bytes[..]).expect("a Push");
        assert_eq!(decoded.nonce, nonce);
        assert_eq!(decoded.more, i + 1 < chunks.len(), "chunk {i}");
        assert!(decoded.full && decoded.resync);
        names.extend(decoded.resources.into_iter().map(|r| r.key.expect("key").name));
    }
    assert_eq!(names.len(), 3001, "every resource once");
}
