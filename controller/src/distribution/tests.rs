use std::collections::BTreeMap;

use weft_api::{types, v1};

use super::{
    desired::{self, Key, TypeFilter},
    index::MeshConfig,
};
use crate::store::Store;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}, annotations: {weft.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop, uid: 0b5e1c2a-7d3f-4a61-9c8e-000000000001, labels: {app: cart}}
spec: {nodeName: node1, serviceAccountName: cart}
status: {podIPs: [{ip: 10.0.1.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: other, uid: 0b5e1c2a-7d3f-4a61-9c8e-000000000002, labels: {app: cart}}
spec: {nodeName: node2}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {selector: {app: cart}, clusterIP: 10.96.0.1, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: shop}
spec: {ports: [{port: 443}]}
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}
"#;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.apply(OBJECTS, "objects.yaml").unwrap();
    (dir, store)
}

fn mesh(trust_domain: &str) -> MeshConfig {
    MeshConfig {
        trust_domain: trust_domain.into(),
        root_namespace: weft_model::policy::DEFAULT_ROOT_NAMESPACE.into(),
    }
}

fn all() -> TypeFilter {
    TypeFilter::parse(&[]).unwrap()
}

fn key(ty: &'static str, name: &str) -> Key {
    Key { ty, name: name.into() }
}

fn keys(d: &BTreeMap<Key, v1::Resource>) -> Vec<String> {
    d.keys().map(ToString::to_string).collect()
}

#[test]
fn node_sees_everything_but_policies_of_namespaces_without_its_pods() {
    let (_dir, store) = store();
    let state = store.snapshot();
    let node1 = desired::desired(&state, "node1", &mesh("cluster.local"), &all());
    assert_eq!(
        keys(&node1),
        [
            "namespace/other",
            "namespace/shop",
            "policy/shop/deny-other",
            "service/shop/cart",
            "service/shop/external",
            "workload/other/web",
            "workload/shop/cart",
        ]
    );
    let node2 = desired::desired(&state, "node2", &mesh("cluster.local"), &all());
    assert!(!node2.contains_key(&key(types::POLICY, "shop/deny-other")));
    assert_eq!(node2.len(), 6);
}

#[test]
fn root_namespace_policies_go_to_every_node_marked_mesh_wide() {
    let (_dir, store) = store();
    store
        .apply(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: weft-system}\n---\napiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: require-mtls, namespace: weft-system}\nspec: {action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}\n",
            "root.yaml",
        )
        .unwrap();
    let state = store.snapshot();
    let scope_on = |node: &str, root_namespace: &str| {
        let mesh = MeshConfig {
            trust_domain: "cluster.local".into(),
            root_namespace: root_namespace.into(),
        };
        let d = desired::desired(&state, node, &mesh, &all());
        let Some(v1::resource::Kind::Policy(p)) = &d.get(&key(types::POLICY, "weft-system/require-mtls"))?.kind else {
            panic!("not a policy");
        };
        Some(p.scope)
    };
    // node2 has no pod in weft-system (nor in shop), and still gets the mesh-wide policy.
    for node in ["node1", "node2"] {
        assert_eq!(scope_on(node, "weft-system"), Some(v1::Scope::Mesh as i32), "{node}");
    }
    // With another root namespace it is an ordinary policy of a namespace without pods.
    assert_eq!(scope_on("node1", "istio-system"), None);
    let Some(v1::resource::Kind::Policy(p)) = &desired::desired(&state, "node1", &mesh("cluster.local"), &all())
        [&key(types::POLICY, "weft-system/require-mtls")]
        .kind
    else {
        panic!("not a policy");
    };
    assert_eq!(
        p.rules[0].from[0].not_principals,
        ["*"],
        "the new fields reach the wire"
    );
}

#[test]
fn a_policy_with_http_fields_is_refused_by_the_store_and_never_distributed() {
    let (_dir, store) = store();
    let before = desired::desired(&store.snapshot(), "node1", &mesh("cluster.local"), &all());
    let err = store
        .apply(
            "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: shop}\nspec: {rules: [{to: [{operation: {ports: [\"8080\"], methods: [GET]}}]}]}\n",
            "l7.yaml",
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("AuthorizationPolicy shop/get-only: spec.rules[0].to[0].operation.methods: ")
            && err.contains("waypoint"),
        "{err}"
    );
    assert_eq!(
        desired::desired(&store.snapshot(), "node1", &mesh("cluster.local"), &all()),
        before
    );
}

#[test]
fn workloads_carry_identity_addresses_and_their_services() {
    let (_dir, store) = store();
    let d = desired::desired(&store.snapshot(), "node1", &mesh("example.org"), &all());
    let Some(v1::resource::Kind::Workload(w)) = &d[&key(types::WORKLOAD, "shop/cart")].kind else {
        panic!("not a workload");
    };
    assert_eq!(w.identity, "spiffe://example.org/ns/shop/sa/cart");
    assert_eq!(w.ips, ["10.0.1.1", "fd00::1"]);
    assert_eq!(w.uid, "0b5e1c2a-7d3f-4a61-9c8e-000000000001");
    assert_eq!(
        w.services,
        ["shop/cart"],
        "selected by shop/cart; shop/external has no selector"
    );
    let Some(v1::resource::Kind::Workload(other)) = &d[&key(types::WORKLOAD, "other/web")].kind else {
        panic!("not a workload");
    };
    assert!(
        other.services.is_empty(),
        "a service selects pods of its own namespace only"
    );
    let Some(v1::resource::Kind::Service(s)) = &d[&key(types::SERVICE, "shop/cart")].kind else {
        panic!("not a service");
    };
    assert_eq!(s.vips, ["10.96.0.1"]);
    assert_eq!((s.ports[0].port, s.ports[0].target_port), (80, 8080));
}

#[test]
fn versions_are_stable_and_follow_content() {
    let (_dir, store) = store();
    let before = desired::desired(&store.snapshot(), "node1", &mesh("cluster.local"), &all());
    let again = desired::desired(&store.snapshot(), "node1", &mesh("cluster.local"), &all());
    assert_eq!(before, again);
    store
        .apply(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: b}, annotations: {weft.dev/dataplane-mode: ambient}}\n",
            "f",
        )
        .unwrap();
    let after = desired::desired(&store.snapshot(), "node1", &mesh("cluster.local"), &all());
    let changed: Vec<String> = after
        .iter()
        .filter(|(k, r)| before[*k].version != r.version)
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(changed, ["namespace/shop"]);
}

#[test]
fn type_filter_limits_and_rejects_unknown_types() {
    let (_dir, store) = store();
    let only = TypeFilter::parse(&["policy".into()]).unwrap();
    let d = desired::desired(&store.snapshot(), "node1", &mesh("cluster.local"), &only);
    assert_eq!(keys(&d), ["policy/shop/deny-other"]);
    let err = TypeFilter::parse(&["gateway".into()]).unwrap_err();
    assert!(err.contains("unknown resource type \"gateway\""), "{err}");
}

#[test]
fn rejected_keys_parse_with_slashes_in_names() {
    assert_eq!(
        Key::parse("workload/shop/cart"),
        Some(key(types::WORKLOAD, "shop/cart"))
    );
    assert_eq!(Key::parse("gateway/x"), None);
}
