//! PeerAuthentication in the agent's state: taken from a push, indexed, and resolved for a
//! workload's port with its current labels; a bad one is NACKed and the previous version kept.

use weft_api::v1;
use weft_model::peer_auth::Requirement;

use super::{fixtures::*, *};

fn cart(labels: &[(&str, &str)]) -> v1::Resource {
    pod("shop", "cart", "10.244.1.5", labels)
}

fn strict_by(state: &State, port: u16) -> Option<String> {
    match mtls_requirement(state, "shop/cart", &uid("cart"), port) {
        Requirement::Strict { policy } => Some(policy.to_string()),
        Requirement::Permissive => None,
    }
}

#[test]
fn peer_authentications_from_pushes_decide_with_the_workloads_current_labels() {
    use v1::MtlsMode::*;
    let mesh_strict = peer_auth("weft-system", "default", v1::Scope::Mesh, None, MtlsStrict, &[]);
    let (state, rejected) = State::default().apply(&push(true, vec![cart(&[("app", "cart")]), mesh_strict], &[]));
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(strict_by(&state, 8080).as_deref(), Some("weft-system/default"));

    // A selector policy exempting 8080: only for pods with the label.
    let exempt = peer_auth(
        "shop",
        "cart",
        v1::Scope::Namespace,
        Some(("app", "cart")),
        MtlsUnset,
        &[(8080, MtlsPermissive)],
    );
    let (state, _) = state.apply(&push(false, vec![exempt], &[]));
    assert_eq!(strict_by(&state, 8080), None);
    assert_eq!(strict_by(&state, 9090).as_deref(), Some("weft-system/default"));
    // The pod loses its label: the exemption no longer selects it.
    let (relabelled, _) = state.apply(&push(false, vec![cart(&[("app", "other")])], &[]));
    assert_eq!(strict_by(&relabelled, 8080).as_deref(), Some("weft-system/default"));

    // Removed: back to the mesh-wide policy; that removed too: PERMISSIVE.
    let (state, _) = state.apply(&push(false, vec![], &[(types::PEER_AUTHENTICATION, "shop/cart")]));
    assert_eq!(strict_by(&state, 8080).as_deref(), Some("weft-system/default"));
    let (state, _) = state.apply(&push(
        false,
        vec![],
        &[(types::PEER_AUTHENTICATION, "weft-system/default")],
    ));
    assert_eq!(strict_by(&state, 8080), None);
    // An unknown workload (or another uid) is not decided here.
    assert_eq!(
        mtls_requirement(&state, "shop/nope", &uid("cart"), 8080),
        Requirement::Permissive
    );
}

#[test]
fn a_bad_peer_authentication_is_rejected_and_its_previous_version_kept() {
    use v1::MtlsMode::*;
    let ns_strict = peer_auth("shop", "default", v1::Scope::Namespace, None, MtlsStrict, &[]);
    let (state, _) = State::default().apply(&push(true, vec![cart(&[]), ns_strict], &[]));
    assert_eq!(strict_by(&state, 80).as_deref(), Some("shop/default"));
    // Port-level without a selector is invalid: NACKed by name, the STRICT one stays, also on a
    // full push.
    let bad = peer_auth(
        "shop",
        "default",
        v1::Scope::Namespace,
        None,
        MtlsPermissive,
        &[(80, MtlsPermissive)],
    );
    for full in [false, true] {
        let (next, rejected) = state.apply(&push(full, vec![cart(&[]), bad.clone()], &[]));
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].key, "peerauthentication/shop/default");
        assert!(
            rejected[0].error.contains("spec.portLevelMtls"),
            "{}",
            rejected[0].error
        );
        assert_eq!(strict_by(&next, 80).as_deref(), Some("shop/default"), "full: {full}");
    }
}
