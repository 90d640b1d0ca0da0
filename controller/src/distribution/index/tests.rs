//! The incremental index against the same function computed from scratch ([`desired`]), on random
//! sequences of changes made through the store (so that states share structure as they do in use).

use std::{collections::BTreeMap, sync::Arc};

use proptest::prelude::*;

use super::{Index, MeshConfig};
use crate::{
    distribution::{
        desired::{Key, TypeFilter, desired},
        session::Subscriber,
    },
    store::{State, Store},
};
use weft_api::v1;

pub(crate) fn mesh() -> MeshConfig {
    MeshConfig {
        trust_domain: "cluster.local".into(),
        root_namespace: "weft-system".into(),
    }
}

const NAMESPACES: [&str; 4] = ["weft-system", "a", "b", "c"];
const NODES: [&str; 3] = ["n0", "n1", "n2"];

/// One change to the store.
#[derive(Clone, Debug)]
enum Op {
    Pod {
        id: u8,
        ns: u8,
        node: u8,
        app: u8,
    },
    Service {
        id: u8,
        ns: u8,
        app: Option<u8>,
    },
    Policy {
        id: u8,
        ns: u8,
        app: Option<u8>,
        deny: bool,
    },
    PeerAuth {
        id: u8,
        ns: u8,
        app: u8,
        strict: bool,
    },
    NamespaceLabel {
        ns: u8,
        value: u8,
    },
    Delete {
        kind: u8,
        id: u8,
        ns: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..8u8, 1..4u8, 0..3u8, 0..3u8).prop_map(|(id, ns, node, app)| Op::Pod { id, ns, node, app }),
        2 => (0..3u8, 1..4u8, proptest::option::of(0..3u8)).prop_map(|(id, ns, app)| Op::Service { id, ns, app }),
        2 => (0..3u8, 0..4u8, proptest::option::of(0..3u8), any::<bool>())
            .prop_map(|(id, ns, app, deny)| Op::Policy { id, ns, app, deny }),
        1 => (0..2u8, 0..4u8, 0..3u8, any::<bool>()).prop_map(|(id, ns, app, strict)| Op::PeerAuth { id, ns, app, strict }),
        1 => (1..4u8, 0..3u8).prop_map(|(ns, value)| Op::NamespaceLabel { ns, value }),
        3 => (0..4u8, 0..8u8, 0..4u8).prop_map(|(kind, id, ns)| Op::Delete { kind, id, ns }),
    ]
}

fn pod_yaml(id: u8, ns: &str, node: &str, app: u8) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{id}, namespace: {ns}, uid: 0b5e1c2a-7d3f-4a61-9c8e-0000000000{id:02}, labels: {{app: a{app}}}}}\nspec: {{nodeName: {node}, serviceAccountName: sa{app}}}\nstatus: {{podIP: 10.0.0.{}}}\n",
        u32::from(id) + 1
    )
}

fn apply(store: &Store, op: &Op) {
    let ns = |n: u8| NAMESPACES[usize::from(n)];
    let yaml = match *op {
        Op::Pod { id, ns: n, node, app } => {
            // A pod moves namespace only by going and coming back: delete it elsewhere first.
            for other in NAMESPACES.iter().filter(|o| **o != ns(n)) {
                let _ = store.delete(
                    &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p{id}, namespace: {other}}}\n"),
                    "t",
                    true,
                );
            }
            pod_yaml(id, ns(n), NODES[usize::from(node)], app)
        }
        Op::Service { id, ns: n, app } => {
            for other in NAMESPACES.iter().filter(|o| **o != ns(n)) {
                let _ = store.delete(
                    &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{id}, namespace: {other}}}\n"),
                    "t",
                    true,
                );
            }
            let selector = app.map(|a| format!("selector: {{app: a{a}}}, ")).unwrap_or_default();
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{id}, namespace: {}}}\nspec: {{{selector}clusterIP: 10.96.0.{}, ports: [{{port: 80, targetPort: 8080}}]}}\n",
                ns(n),
                u32::from(id) + 1
            )
        }
        Op::Policy { id, ns: n, app, deny } => {
            let selector = app
                .map(|a| format!("selector: {{matchLabels: {{app: a{a}}}}}, "))
                .unwrap_or_default();
            let action = if deny { "DENY" } else { "ALLOW" };
            format!(
                "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: ap{id}, namespace: {}}}\nspec: {{{selector}action: {action}, rules: [{{from: [{{source: {{namespaces: [a]}}}}]}}]}}\n",
                ns(n)
            )
        }
        Op::PeerAuth { id, ns: n, app, strict } => {
            let mode = if strict { "STRICT" } else { "PERMISSIVE" };
            format!(
                "apiVersion: security.weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: pa{id}, namespace: {}}}\nspec: {{selector: {{matchLabels: {{app: a{app}}}}}, mtls: {{mode: {mode}}}}}\n",
                ns(n)
            )
        }
        Op::NamespaceLabel { ns: n, value } => {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {{v: x{value}}}}}\n",
                ns(n)
            )
        }
        Op::Delete { kind, id, ns: n } => {
            let (kind, api, name) = match kind {
                0 => ("Pod", "v1", format!("p{id}")),
                1 => ("Service", "v1", format!("s{}", id % 3)),
                2 => (
                    "AuthorizationPolicy",
                    "security.weft.dev/v1alpha1",
                    format!("ap{}", id % 3),
                ),
                _ => (
                    "PeerAuthentication",
                    "security.weft.dev/v1alpha1",
                    format!("pa{}", id % 2),
                ),
            };
            let _ = store.delete(
                &format!(
                    "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {}}}\n",
                    ns(n)
                ),
                "t",
                true,
            );
            return;
        }
    };
    // Some applies are refused (a second namespace-wide PeerAuthentication): nothing changes then.
    let _ = store.apply(&yaml, "t");
}

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("scratch");
    let store = Store::open(dir.path()).expect("store");
    let namespaces: String = NAMESPACES
        .iter()
        .map(|n| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}}}\n---\n"))
        .collect();
    store.apply(&namespaces, "namespaces").expect("namespaces");
    (dir, store)
}

/// Key -> version of what the index sends `node`.
fn from_index(index: &Index, node: &str) -> BTreeMap<Key, u64> {
    index
        .resources_for(node, |_| true)
        .map(|e| (e.key.clone(), e.version))
        .collect()
}

/// Key -> version of what `node` should hold, from scratch.
fn from_scratch(state: &State, node: &str) -> BTreeMap<Key, u64> {
    desired(state, node, &mesh(), &TypeFilter::parse(&[]).expect("all"))
        .into_iter()
        .map(|(k, r)| (k, r.version))
        .collect()
}

/// A table's (key, version) pairs and its bucket digests.
type Dump = (Vec<(Key, u64)>, Vec<u64>);

fn tables(index: &Index) -> Vec<Dump> {
    [
        &index.namespaces,
        &index.workloads,
        &index.services,
        &index.policies,
        &index.peer_authentications,
    ]
    .into_iter()
    .map(|t| {
        (
            t.iter().map(|e| (e.key.clone(), e.version)).collect(),
            t.digests().to_vec(),
        )
    })
    .collect()
}

/// A subscriber's holdings as an agent keeps them: key -> version, by applying pushes.
#[derive(Default)]
struct Agent(BTreeMap<Key, u64>);

impl Agent {
    fn take(&mut self, push: super::super::session::Outgoing) -> v1::Ack {
        if push.full {
            self.0.clear();
        }
        for b in &push.replaced_buckets {
            self.0
                .retain(|k, _| weft_api::sync::bucket(k.ty, &k.name) != *b as usize);
        }
        for k in &push.removed {
            self.0.remove(k);
        }
        for e in &push.resources {
            self.0.insert(e.key.clone(), e.version);
        }
        v1::Ack {
            nonce: push.nonce,
            ..Default::default()
        }
    }

    fn summary(&self) -> Vec<u64> {
        weft_api::sync::summarize(self.0.iter().map(|(k, v)| (k.ty, k.name.as_str(), *v)))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After every change: the index made incrementally is the index made from scratch, what it
    /// sends each node is what that node should hold, and a subscriber that follows the changes
    /// (deltas only) holds exactly that.
    #[test]
    fn the_incremental_index_equals_a_full_recomputation(ops in proptest::collection::vec(op(), 1..24)) {
        let (_dir, store) = new_store();
        let mut index = Arc::new(Index::build(mesh(), store.snapshot()));
        let mut subscribers: Vec<(Subscriber, Agent)> = NODES
            .iter()
            .map(|n| (Subscriber::new((*n).to_owned(), TypeFilter::parse(&[]).expect("all")), Agent::default()))
            .collect();
        for (s, agent) in &mut subscribers {
            let ack = agent.take(s.resync(&index, None));
            s.ack(&ack).expect("its push");
        }
        for op in &ops {
            apply(&store, op);
            let state = store.snapshot();
            index = Arc::new(index.update(state.clone()));
            let scratch = Index::build(mesh(), state.clone());
            prop_assert!(tables(&index) == tables(&scratch), "after {op:?}");
            for (node, (s, agent)) in NODES.iter().zip(&mut subscribers) {
                let want = from_scratch(&state, node);
                prop_assert_eq!(&from_index(&index, node), &want, "index for {} after {:?}", node, op);
                if let Some(push) = s.next(&index) {
                    let ack = agent.take(push);
                    s.ack(&ack).expect("its push");
                }
                prop_assert_eq!(&agent.0, &want, "subscriber {} after {:?}", node, op);
            }
        }
        // A new stream of a subscriber that holds all that resyncs nothing; one that missed a
        // change resyncs that change's bucket only, and ends up holding what it should.
        for (node, (_, agent)) in NODES.iter().zip(&mut subscribers) {
            let mut again = Subscriber::new((*node).to_owned(), TypeFilter::parse(&[]).expect("all"));
            let held = v1::Held { store_id: index.store_id.clone(), revision: index.revision, buckets: agent.summary() };
            let push = again.resync(&index, Some(&held));
            prop_assert!(!push.full && push.replaced_buckets.is_empty() && push.resources.is_empty());
            if let Some((k, _)) = agent.0.iter().next().map(|(k, v)| (k.clone(), *v)) {
                agent.0.insert(k.clone(), 1);
                let mut again = Subscriber::new((*node).to_owned(), TypeFilter::parse(&[]).expect("all"));
                let held = v1::Held { store_id: index.store_id.clone(), revision: index.revision, buckets: agent.summary() };
                let push = again.resync(&index, Some(&held));
                prop_assert_eq!(push.replaced_buckets.clone(), vec![weft_api::sync::bucket(k.ty, &k.name) as u32]);
                agent.take(push);
                prop_assert_eq!(&agent.0, &from_scratch(&store.snapshot(), node));
            }
        }
    }
}

#[test]
fn a_new_pod_changes_one_workload_and_no_service() {
    let (_dir, store) = new_store();
    store
        .apply(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s0, namespace: a}\nspec: {selector: {app: a0}, clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
            "t",
        )
        .expect("service");
    for id in 0..5 {
        store.apply(&pod_yaml(id, "a", "n0", 0), "t").expect("pod");
    }
    let before = Arc::new(Index::build(mesh(), store.snapshot()));
    let mut s = Subscriber::new("n1".into(), TypeFilter::parse(&[]).expect("all"));
    let ack = Agent::default().take(s.resync(&before, None));
    s.ack(&ack).expect("acked");
    store.apply(&pod_yaml(5, "a", "n2", 0), "t").expect("pod");
    let after = Arc::new(before.update(store.snapshot()));
    let push = s.next(&after).expect("a delta");
    let keys: Vec<String> = push.resources.iter().map(|e| e.key.to_string()).collect();
    assert_eq!(keys, ["workload/a/p5"], "the service's endpoints are not resent");
    assert!(push.removed.is_empty());
    let workload = v1::Resource::decode_from(&push.resources[0].bytes);
    let Some(v1::resource::Kind::Workload(w)) = workload.kind else {
        panic!("a workload: {workload:?}")
    };
    assert_eq!(w.services, ["a/s0"]);
}

trait DecodeFrom {
    fn decode_from(bytes: &[u8]) -> Self;
}

impl DecodeFrom for v1::Resource {
    fn decode_from(bytes: &[u8]) -> Self {
        <v1::Resource as prost::Message>::decode(bytes).expect("a resource")
    }
}
