use serde_json::{Value, json};

use super::*;

const UID_A: &str = "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e03";
const UID_B: &str = "1c6f2d3b-8e4a-4b72-8d9f-3a5c7e9b2f14";

fn arc<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
    Arc::new(serde_json::from_value(v).unwrap())
}

fn cluster() -> Snapshot {
    Snapshot {
        namespaces: vec![
            arc(json!({"metadata": {"name": "kube-system", "uid": "cluster-1"}})),
            arc(
                json!({"metadata": {"name": "shop", "uid": "ns-1", "annotations": {"weft.dev/dataplane-mode": "ambient"}}}),
            ),
        ],
        pods: vec![arc(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": UID_A, "labels": {"app": "web"}},
            "spec": {"nodeName": "node1", "containers": [{"name": "c"}]},
            "status": {"podIPs": [{"ip": "10.1.0.5"}]},
        }))],
        services: vec![arc(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "clusterIPs": ["10.96.0.10"], "ports": [{"port": 80}]},
        }))],
        service_accounts: vec![arc(json!({"metadata": {"name": "default", "namespace": "shop"}}))],
        ..Snapshot::default()
    }
}

fn policy(name: &str, uid: &str, generation: i64, spec: Value) -> Arc<DeserializeGuard<crd::AuthorizationPolicy>> {
    arc(json!({
        "apiVersion": "security.weft.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "generation": generation, "resourceVersion": format!("{}", 100 + generation)},
        "spec": spec,
    }))
}

fn peer_auth(name: &str, created: &str, spec: Value) -> Arc<DeserializeGuard<crd::PeerAuthentication>> {
    arc(json!({
        "apiVersion": "security.weft.dev/v1alpha1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": "shop", "uid": UID_A, "generation": 1, "creationTimestamp": created},
        "spec": spec,
    }))
}

fn r(kind: Kind, name: &str) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: if kind.is_namespaced() {
            "shop".into()
        } else {
            String::new()
        },
        name: name.into(),
    }
}

fn refs(built: &Built) -> Vec<String> {
    let mut v: Vec<String> = built.objects.iter().map(|o| o.object_ref().to_string()).collect();
    v.sort();
    v
}

fn spec_of(built: &Built, name: &str) -> Option<weft_model::policy::Spec> {
    built.objects.iter().find_map(|o| match &**o {
        Object::AuthorizationPolicy(p) if p.metadata.name == name => Some(p.spec.clone()),
        _ => None,
    })
}

const DENY_OTHER: fn() -> Value =
    || json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]});
const INVALID: fn() -> Value = || json!({"rules": [{"from": []}]});

#[test]
fn the_model_holds_every_kind_and_a_valid_policy_is_accepted() {
    let mut snapshot = cluster();
    snapshot.policies.push(policy("deny", UID_A, 1, DENY_OTHER()));
    let built = Builder::default().build(&snapshot);
    assert_eq!(
        refs(&built),
        vec![
            "AuthorizationPolicy shop/deny",
            "Namespace kube-system",
            "Namespace shop",
            "Pod shop/web",
            "Service shop/web",
            "ServiceAccount shop/default",
        ]
    );
    let verdict = &built.conditions[&r(Kind::AuthorizationPolicy, "deny")];
    assert_eq!(
        (verdict.desired.status.as_str(), verdict.desired.reason.as_str()),
        ("True", "Valid")
    );
    assert_eq!(verdict.desired.observed_generation, Some(1));
    assert_eq!(verdict.resource_version, "101");
    assert!(verdict.needs_write());
    assert!(built.notes.is_empty(), "{:?}", built.notes);
}

#[test]
fn an_invalid_policy_is_not_in_the_model_and_its_verdict_names_the_field() {
    let mut snapshot = cluster();
    snapshot.policies.push(policy("broken", UID_A, 1, INVALID()));
    let built = Builder::default().build(&snapshot);
    assert!(spec_of(&built, "broken").is_none());
    let verdict = &built.conditions[&r(Kind::AuthorizationPolicy, "broken")];
    assert_eq!(
        (verdict.desired.status.as_str(), verdict.desired.reason.as_str()),
        ("False", "Invalid")
    );
    assert!(
        verdict
            .desired
            .message
            .starts_with("spec.rules[0].from: must not be empty"),
        "{}",
        verdict.desired.message
    );
    assert_eq!(built.notes.len(), 1);
    assert!(built.notes[0].message.ends_with(": not enforced"), "{:?}", built.notes);
}

#[test]
fn a_policy_made_invalid_keeps_its_last_valid_version_until_deleted() {
    let mut builder = Builder::default();
    let mut snapshot = cluster();
    snapshot.policies = vec![policy("deny", UID_A, 1, DENY_OTHER())];
    let valid = builder.build(&snapshot);
    let enforced = spec_of(&valid, "deny").unwrap();

    snapshot.policies = vec![policy("deny", UID_A, 2, INVALID())];
    let kept = builder.build(&snapshot);
    assert_eq!(
        spec_of(&kept, "deny"),
        Some(enforced.clone()),
        "the last valid version stays"
    );
    let verdict = &kept.conditions[&r(Kind::AuthorizationPolicy, "deny")];
    assert_eq!(verdict.desired.status, "False");
    assert_eq!(verdict.desired.observed_generation, Some(2));
    assert!(
        kept.notes[0].message.ends_with("the last valid version stays enforced"),
        "{:?}",
        kept.notes
    );
    // Still kept on the next build, and not noted again.
    let again = builder.build(&snapshot);
    assert_eq!(spec_of(&again, "deny"), Some(enforced));
    assert!(again.notes.is_empty(), "{:?}", again.notes);

    // Deleted: forgotten. Created again (another uid) as invalid: nothing is enforced.
    snapshot.policies.clear();
    let gone = builder.build(&snapshot);
    assert!(spec_of(&gone, "deny").is_none());
    assert!(gone.conditions.is_empty());
    snapshot.policies = vec![policy("deny", UID_B, 1, INVALID())];
    assert!(spec_of(&builder.build(&snapshot), "deny").is_none());
}

#[test]
fn a_recreated_policy_does_not_inherit_the_old_ones_last_valid_version() {
    let mut builder = Builder::default();
    let mut snapshot = cluster();
    snapshot.policies = vec![policy("deny", UID_A, 1, DENY_OTHER())];
    builder.build(&snapshot);
    // Deleted and created again between two builds: another uid.
    snapshot.policies = vec![policy("deny", UID_B, 1, INVALID())];
    assert!(spec_of(&builder.build(&snapshot), "deny").is_none());
}

#[test]
fn a_resource_that_cannot_be_read_is_refused_not_fatal() {
    let mut snapshot = cluster();
    snapshot.policies.push(arc(json!({
        "apiVersion": "security.weft.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "odd", "namespace": "shop", "uid": UID_A},
        "spec": {},
        "status": {"conditions": "not a list"},
    })));
    let built = Builder::default().build(&snapshot);
    assert!(spec_of(&built, "odd").is_none());
    let verdict = &built.conditions[&r(Kind::AuthorizationPolicy, "odd")];
    assert!(
        verdict.desired.message.starts_with("cannot be read: "),
        "{}",
        verdict.desired.message
    );
}

#[test]
fn a_second_namespace_wide_peer_authentication_is_refused_naming_the_first() {
    let mut snapshot = cluster();
    snapshot.peer_authentications = vec![
        peer_auth("b-older", "2025-01-01T00:00:00Z", json!({"mtls": {"mode": "STRICT"}})),
        peer_auth(
            "a-newer",
            "2025-02-01T00:00:00Z",
            json!({"mtls": {"mode": "PERMISSIVE"}}),
        ),
        peer_auth(
            "workload",
            "2025-03-01T00:00:00Z",
            json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}}),
        ),
    ];
    let built = Builder::default().build(&snapshot);
    let pas: Vec<String> = refs(&built)
        .into_iter()
        .filter(|s| s.starts_with("PeerAuthentication"))
        .collect();
    assert_eq!(
        pas,
        vec!["PeerAuthentication shop/b-older", "PeerAuthentication shop/workload"]
    );
    let verdict = &built.conditions[&r(Kind::PeerAuthentication, "a-newer")];
    assert_eq!(
        verdict.desired.message,
        "spec.selector: namespace \"shop\" already has a PeerAuthentication without a selector, PeerAuthentication shop/b-older: a namespace (the root namespace: the mesh) has at most one"
    );
}

#[test]
fn objects_that_cannot_be_read_are_left_out_and_noted_once() {
    let mut snapshot = cluster();
    snapshot.pods.push(arc(json!({
        "metadata": {"name": "odd", "namespace": "shop", "uid": "not-a-uid"},
        "spec": {"nodeName": "node1", "containers": []},
        "status": {"podIPs": [{"ip": "10.1.0.9"}]},
    })));
    let mut builder = Builder::default();
    let built = builder.build(&snapshot);
    assert!(!refs(&built).contains(&"Pod shop/odd".to_owned()));
    assert_eq!(built.notes.len(), 1);
    assert_eq!(built.notes[0].object, r(Kind::Pod, "odd"));
    assert!(builder.build(&snapshot).notes.is_empty());
}

/// The pod of [`cluster`] at `resource_version`, with `labels`.
fn versioned_pod(resource_version: &str, labels: Value) -> Arc<core::Pod> {
    arc(json!({
        "metadata": {"name": "web", "namespace": "shop", "uid": UID_A, "resourceVersion": resource_version, "labels": labels},
        "spec": {"nodeName": "node1", "containers": [{"name": "c"}]},
        "status": {"podIPs": [{"ip": "10.1.0.5"}]},
    }))
}

fn model_of(built: &Built, kind: Kind, name: &str) -> Arc<Object> {
    let wanted = r(kind, name);
    built
        .objects
        .iter()
        .find(|o| o.object_ref() == wanted)
        .cloned()
        .unwrap_or_else(|| panic!("{wanted} is not in the model"))
}

#[test]
fn an_object_converts_again_only_when_its_resource_version_changes() {
    let mut snapshot = cluster();
    snapshot.pods = vec![versioned_pod("7", json!({"app": "web"}))];
    let mut builder = Builder::default();
    let first = builder.build(&snapshot);
    let again = builder.build(&snapshot);
    assert!(Arc::ptr_eq(
        &model_of(&first, Kind::Pod, "web"),
        &model_of(&again, Kind::Pod, "web")
    ));
    // A new resourceVersion: converted again, and the change is in the model.
    snapshot.pods = vec![versioned_pod("8", json!({"app": "web", "version": "v2"}))];
    let changed = builder.build(&snapshot);
    let pod = model_of(&changed, Kind::Pod, "web");
    assert!(!Arc::ptr_eq(&model_of(&again, Kind::Pod, "web"), &pod));
    let Object::Pod(p) = &*pod else { panic!("{pod:?}") };
    assert_eq!(p.meta.labels.get("version").map(String::as_str), Some("v2"));
    // Without a resourceVersion (as in the other tests) an object is converted every time.
    let plain = builder.build(&cluster());
    assert!(!Arc::ptr_eq(
        &model_of(&plain, Kind::Pod, "web"),
        &model_of(&builder.build(&cluster()), Kind::Pod, "web")
    ));
    // A deleted object is forgotten with its conversion.
    snapshot.pods.clear();
    assert!(!refs(&builder.build(&snapshot)).contains(&"Pod shop/web".to_owned()));
}
