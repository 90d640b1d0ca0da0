//! PeerAuthentication in the store: applied from the same YAML as every kind, validated as Istio
//! validates it, refused whole with the object and the field, rendered back appliable.

use super::*;

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.apply(NS, "ns.yaml").unwrap();
    (dir, store)
}

fn pa(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n{spec}"
    )
}

fn apply_err(store: &Store, yaml: &str) -> String {
    store.apply(yaml, "pa.yaml").expect_err("apply should fail").to_string()
}

#[test]
fn peer_authentication_is_applied_listed_and_rendered_back() {
    let (_dir, store) = store();
    let strict = pa(
        "cart",
        "  selector:\n    matchLabels:\n      app: cart\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: PERMISSIVE\n    \"9090\":\n      mode: DISABLE\n",
    );
    let out = store.apply(&strict, "pa.yaml").unwrap();
    assert_eq!(out.results, ["peerauthentication shop/cart created"]);
    let state = store.snapshot();
    let stored: Vec<_> = state.peer_authentications().collect();
    assert_eq!(stored.len(), 1);
    let ports = stored[0].spec.port_level_mtls.as_ref().unwrap();
    assert_eq!(
        ports.keys().collect::<Vec<_>>(),
        ["8080", "9090"],
        "numbers and strings alike"
    );
    // `get` by kind name, plural and Istio's short name; the output applies unchanged.
    for kind in ["PeerAuthentication", "peerauthentications", "pa"] {
        let yaml = store.get(Some(kind), Some("shop")).unwrap();
        assert!(yaml.contains("kind: PeerAuthentication"), "{kind}: {yaml}");
        let again = store.apply(&yaml, "get.yaml").unwrap();
        assert_eq!(again.results, ["peerauthentication shop/cart unchanged"], "{yaml}");
    }
    // Survives a restart.
    let reopened = Store::open(_dir.path()).unwrap();
    assert_eq!(reopened.snapshot().peer_authentications().count(), 1);
}

#[test]
fn invalid_peer_authentication_is_refused_naming_object_and_field() {
    let (_dir, store) = store();
    for (spec, want) in [
        (
            "  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: PERMISSIVE\n",
            "pa.yaml: document 1: PeerAuthentication shop/bad: spec.portLevelMtls: a mesh-wide or namespace-wide policy (no spec.selector.matchLabels) cannot have port-level mTLS",
        ),
        (
            "  selector:\n    matchLabels:\n      app: cart\n  portLevelMtls:\n    0:\n      mode: STRICT\n",
            "pa.yaml: document 1: PeerAuthentication shop/bad: spec.portLevelMtls[\"0\"]: \"0\" is not a port number (1-65535)",
        ),
        (
            "  selector:\n    matchLabels:\n      app: cart\n  portLevelMtls: {}\n",
            "pa.yaml: document 1: PeerAuthentication shop/bad: spec.portLevelMtls: must not be empty",
        ),
        (
            "  mtls:\n    mode: OFF\n",
            "pa.yaml: document 1: PeerAuthentication shop/bad: spec.mtls.mode: unknown variant `OFF`",
        ),
        (
            "  mtls:\n    mode: STRICT\n  targetRef:\n    kind: Service\n",
            "pa.yaml: document 1: PeerAuthentication shop/bad: spec.targetRef: unknown field `targetRef`",
        ),
    ] {
        let err = apply_err(&store, &pa("bad", spec));
        assert!(err.starts_with(want), "{spec}\n got: {err}\nwant: {want}");
    }
    // The istio.io apiVersion is not Weft's.
    let istio = pa("bad", "  mtls:\n    mode: STRICT\n").replace("security.weft.dev/v1alpha1", "security.istio.io/v1");
    assert!(apply_err(&store, &istio).contains("apiVersion"));
    assert_eq!(store.snapshot().peer_authentications().count(), 0);
}

#[test]
fn one_bad_peer_authentication_applies_nothing() {
    let (_dir, store) = store();
    let good = pa("default", "  mtls:\n    mode: STRICT\n");
    let bad = pa("cart", "  portLevelMtls:\n    8080:\n      mode: PERMISSIVE\n");
    let err = apply_err(&store, &format!("{good}---\n{bad}"));
    assert!(err.contains("document 2: PeerAuthentication shop/cart"), "{err}");
    assert_eq!(store.snapshot().peer_authentications().count(), 0);
    assert_eq!(store.snapshot().revision, 1, "only the namespace");
}

#[test]
fn a_namespace_has_at_most_one_namespace_wide_peer_authentication() {
    let (_dir, store) = store();
    store
        .apply(&pa("default", "  mtls:\n    mode: STRICT\n"), "a.yaml")
        .unwrap();
    // Another without a selector (an empty one counts as none) is refused, naming the first.
    for spec in ["  mtls:\n    mode: PERMISSIVE\n", "  selector:\n    matchLabels: {}\n"] {
        let err = apply_err(&store, &pa("other", spec));
        assert!(
            err.contains("PeerAuthentication shop/other: spec.selector: namespace \"shop\" already has a PeerAuthentication without a selector, PeerAuthentication shop/default"),
            "{err}"
        );
    }
    // Two in one file: the second names the first's document.
    let (_dir, fresh) = self::store();
    let two = format!(
        "{}---\n{}",
        pa("a", "  mtls:\n    mode: STRICT\n"),
        pa("b", "  mtls:\n    mode: STRICT\n")
    );
    assert!(apply_err(&fresh, &two).contains("(document 1)"));
    // Replacing the one there is, or adding selector policies, is fine.
    store
        .apply(&pa("default", "  mtls:\n    mode: PERMISSIVE\n"), "a.yaml")
        .unwrap();
    let cart = pa(
        "cart",
        "  selector:\n    matchLabels:\n      app: cart\n  mtls:\n    mode: STRICT\n",
    );
    store.apply(&cart, "b.yaml").unwrap();
    // Once it is deleted, another may come.
    store.delete(&pa("default", ""), "a.yaml", false).unwrap();
    store
        .apply(&pa("other", "  mtls:\n    mode: STRICT\n"), "c.yaml")
        .unwrap();
}
