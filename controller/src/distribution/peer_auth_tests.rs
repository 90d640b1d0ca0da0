//! Which nodes get which PeerAuthentications: those of namespaces with a pod on the node, and the
//! root namespace's everywhere, marked mesh-wide; a change of mode is a new version.

use weft_api::{types, v1};

use super::{
    desired::{self, Key, TypeFilter},
    index::MeshConfig,
};
use crate::store::Store;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: weft-system}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop, uid: 0b5e1c2a-7d3f-4a61-9c8e-000000000001, labels: {app: cart}}
spec: {nodeName: node1}
status: {podIP: 10.0.1.1}
---
apiVersion: security.weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: default, namespace: weft-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: cart, namespace: shop}
spec: {selector: {matchLabels: {app: cart}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}
"#;

fn mesh() -> MeshConfig {
    MeshConfig {
        trust_domain: "cluster.local".into(),
        root_namespace: weft_model::policy::DEFAULT_ROOT_NAMESPACE.into(),
    }
}

fn peer_auth(d: &std::collections::BTreeMap<Key, v1::Resource>, name: &str) -> Option<(v1::PeerAuthentication, u64)> {
    let r = d.get(&Key {
        ty: types::PEER_AUTHENTICATION,
        name: name.into(),
    })?;
    match &r.kind {
        Some(v1::resource::Kind::PeerAuthentication(p)) => Some((p.clone(), r.version)),
        _ => panic!("{name}: not a PeerAuthentication"),
    }
}

#[test]
fn peer_authentications_go_where_their_workloads_are_and_the_root_namespace_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.apply(OBJECTS, "objects.yaml").unwrap();
    let all = TypeFilter::parse(&[]).unwrap();
    let state = store.snapshot();
    let node1 = desired::desired(&state, "node1", &mesh(), &all);
    let node2 = desired::desired(&state, "node2", &mesh(), &all);
    for d in [&node1, &node2] {
        let (root, _) = peer_auth(d, "weft-system/default").expect("the mesh-wide policy on every node");
        assert_eq!(root.scope, v1::Scope::Mesh as i32);
        assert_eq!(root.mode, v1::MtlsMode::MtlsStrict as i32);
    }
    let (cart, version) = peer_auth(&node1, "shop/cart").expect("node1 runs a pod of shop");
    assert_eq!(cart.scope, v1::Scope::Namespace as i32);
    assert_eq!(cart.mode, v1::MtlsMode::MtlsUnset as i32);
    assert_eq!(
        cart.port_level_mtls,
        [v1::PortMtls {
            port: 8080,
            mode: v1::MtlsMode::MtlsPermissive as i32
        }]
    );
    assert!(peer_auth(&node2, "shop/cart").is_none(), "node2 runs no pod of shop");
    // Asked for by name; a subscriber that asks only for policies does not get them.
    assert!(TypeFilter::parse(&["peerauthentication".into()]).is_ok());
    let only_policies = TypeFilter::parse(&["policy".into()]).unwrap();
    assert!(peer_auth(&desired::desired(&state, "node1", &mesh(), &only_policies), "shop/cart").is_none());

    // A new mode is a new version.
    store
        .apply(
            "apiVersion: security.weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: cart, namespace: shop}\nspec: {selector: {matchLabels: {app: cart}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}\n",
            "cart.yaml",
        )
        .unwrap();
    let node1 = desired::desired(&store.snapshot(), "node1", &mesh(), &all);
    let (_, changed) = peer_auth(&node1, "shop/cart").unwrap();
    assert_ne!(changed, version);
}
