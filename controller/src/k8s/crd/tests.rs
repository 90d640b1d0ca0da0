use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use weft_model::{peer_auth, policy};

use super::*;

fn schema_of(crd: &CustomResourceDefinition) -> Value {
    let version = &crd.spec.versions[0];
    let schema = version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap();
    serde_json::to_value(schema).unwrap()
}

fn spec_schema(crd: &CustomResourceDefinition) -> Value {
    schema_of(crd)["properties"]["spec"].clone()
}

/// Every node of a schema, with its path.
fn nodes<'a>(schema: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    out.push((path.clone(), schema));
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            nodes(v, format!("{path}.{k}"), out);
        }
    }
    if let Some(items) = schema.get("items") {
        nodes(items, format!("{path}[]"), out);
    }
    if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        nodes(extra, format!("{path}{{}}"), out);
    }
}

#[test]
fn schemas_are_structural_without_cel_defaults_or_references() {
    for crd in crds() {
        let schema = schema_of(&crd);
        let mut all = Vec::new();
        nodes(&schema, crd.spec.names.kind.clone(), &mut all);
        assert!(all.len() > 10, "{all:?}");
        for (path, node) in all {
            let obj = node
                .as_object()
                .unwrap_or_else(|| panic!("{path}: not an object: {node}"));
            assert!(
                obj.get("type").and_then(Value::as_str).is_some(),
                "{path}: every node needs a type (structural schema): {node}"
            );
            for banned in [
                "x-kubernetes-validations",
                "default",
                "$ref",
                "$schema",
                "anyOf",
                "oneOf",
                "allOf",
                "not",
                "uniqueItems",
            ] {
                assert!(!obj.contains_key(banned), "{path}: {banned} in {node}");
            }
            assert!(
                !(obj.contains_key("additionalProperties") && obj.contains_key("properties")),
                "{path}: properties and additionalProperties are exclusive: {node}"
            );
            if path.contains(".spec") && obj.get("type") == Some(&json!("object")) {
                assert!(
                    obj.contains_key("additionalProperties")
                        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true)),
                    "{path}: spec objects keep unknown fields for Weft to refuse by name: {node}"
                );
            }
            if path.contains(".spec") {
                assert!(!obj.contains_key("nullable"), "{path}: {node}");
            }
        }
        let required: Vec<&Value> = schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        assert!(
            !required.contains(&&json!("spec")),
            "spec is optional, as in the local store"
        );
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(version.name, VERSION);
        assert_eq!(crd.spec.scope, "Namespaced");
    }
}

/// Checks `value` against `schema` and, where the schema lists properties, that the value has
/// exactly those keys: a value that sets every field of the model finds each in the schema, and
/// the schema names no field the model does not read.
fn check_full(value: &Value, schema: &Value, path: &str) {
    let ty = schema["type"].as_str().unwrap_or_else(|| panic!("{path}: no type"));
    match value {
        Value::Object(map) => {
            assert_eq!(ty, "object", "{path}");
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                let keys: BTreeSet<&String> = map.keys().collect();
                let declared: BTreeSet<&String> = props.keys().collect();
                assert_eq!(keys, declared, "{path}: the model's fields and the schema's differ");
                for (k, v) in map {
                    check_full(v, &props[k], &format!("{path}.{k}"));
                }
            } else if let Some(extra) = schema.get("additionalProperties") {
                for (k, v) in map {
                    check_full(v, extra, &format!("{path}[{k:?}]"));
                }
            } else {
                assert_eq!(
                    schema.get("x-kubernetes-preserve-unknown-fields"),
                    Some(&json!(true)),
                    "{path}"
                );
            }
        }
        Value::Array(items) => {
            assert_eq!(ty, "array", "{path}");
            assert!(!items.is_empty(), "{path}: the fixture must set every field");
            for (i, v) in items.iter().enumerate() {
                check_full(v, &schema["items"], &format!("{path}[{i}]"));
            }
        }
        Value::String(s) => {
            assert_eq!(ty, "string", "{path}");
            if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
                assert!(allowed.contains(&json!(s)), "{path}: {s:?} not in {allowed:?}");
            }
        }
        Value::Number(_) => assert_eq!(ty, "integer", "{path}"),
        Value::Bool(_) => assert_eq!(ty, "boolean", "{path}"),
        Value::Null => panic!("{path}: the fixture must set every field"),
    }
}

fn strings(s: &str) -> Vec<String> {
    vec![s.to_owned()]
}

/// Every field of the model's AuthorizationPolicy spec set (struct literals without `..`: a field
/// added to the model fails to compile here until the schema has it too).
fn full_policy_spec() -> policy::Spec {
    policy::Spec {
        selector: Some(policy::Selector {
            match_labels: BTreeMap::from([("app".to_owned(), "web".to_owned())]),
        }),
        target_ref: Some(json!({"kind": "Service", "name": "web"})),
        target_refs: vec![json!({"kind": "Service", "name": "web"})],
        action: policy::Action::Deny,
        provider: Some(json!({"name": "ext"})),
        rules: vec![policy::Rule {
            from: vec![policy::From {
                source: policy::Source {
                    principals: strings("cluster.local/ns/a/sa/b"),
                    not_principals: strings("*"),
                    request_principals: strings("x"),
                    not_request_principals: strings("x"),
                    namespaces: strings("a"),
                    not_namespaces: strings("b"),
                    service_accounts: strings("a/b"),
                    not_service_accounts: strings("b"),
                    ip_blocks: strings("10.0.0.0/8"),
                    not_ip_blocks: strings("10.1.0.0/16"),
                    remote_ip_blocks: strings("10.0.0.0/8"),
                    not_remote_ip_blocks: strings("10.1.0.0/16"),
                },
            }],
            to: vec![policy::To {
                operation: policy::Operation {
                    hosts: strings("h"),
                    not_hosts: strings("h"),
                    ports: strings("8080"),
                    not_ports: strings("9090"),
                    methods: strings("GET"),
                    not_methods: strings("PUT"),
                    paths: strings("/"),
                    not_paths: strings("/x"),
                },
            }],
            when: vec![policy::Condition {
                key: "destination.port".into(),
                values: strings("8080"),
                not_values: strings("9090"),
            }],
        }],
    }
}

fn full_peer_auth_spec() -> peer_auth::Spec {
    peer_auth::Spec {
        selector: Some(policy::Selector {
            match_labels: BTreeMap::from([("app".to_owned(), "web".to_owned())]),
        }),
        mtls: Some(peer_auth::Mtls {
            mode: peer_auth::Mode::Strict,
        }),
        port_level_mtls: Some(BTreeMap::from([(
            "8080".to_owned(),
            peer_auth::Mtls {
                mode: peer_auth::Mode::Permissive,
            },
        )])),
    }
}

#[test]
fn the_schema_has_every_field_of_the_model_and_no_other() {
    let [ap, pa] = crds();
    let policy = serde_json::to_value(full_policy_spec()).unwrap();
    check_full(&policy, &spec_schema(&ap), "spec");
    let peer = serde_json::to_value(full_peer_auth_spec()).unwrap();
    check_full(&peer, &spec_schema(&pa), "spec");
}

/// The serde names of every variant (the `match`es fail to compile when the model gets another).
fn actions() -> Vec<Value> {
    let all = [
        policy::Action::Allow,
        policy::Action::Deny,
        policy::Action::Audit,
        policy::Action::Custom,
    ];
    for a in all {
        match a {
            policy::Action::Allow | policy::Action::Deny | policy::Action::Audit | policy::Action::Custom => {}
        }
    }
    all.iter().map(|a| serde_json::to_value(a).unwrap()).collect()
}

fn modes() -> Vec<Value> {
    use peer_auth::Mode;
    let all = [Mode::Unset, Mode::Disable, Mode::Permissive, Mode::Strict];
    for m in all {
        match m {
            Mode::Unset | Mode::Disable | Mode::Permissive | Mode::Strict => {}
        }
    }
    all.iter().map(|m| serde_json::to_value(m).unwrap()).collect()
}

#[test]
fn enums_list_exactly_the_model_values() {
    let [ap, pa] = crds();
    assert_eq!(
        spec_schema(&ap)["properties"]["action"]["enum"],
        Value::Array(actions())
    );
    let pa = spec_schema(&pa);
    assert_eq!(
        pa["properties"]["mtls"]["properties"]["mode"]["enum"],
        Value::Array(modes())
    );
    assert_eq!(
        pa["properties"]["portLevelMtls"]["additionalProperties"]["properties"]["mode"]["enum"],
        Value::Array(modes())
    );
}

#[test]
fn a_spec_reads_as_written_whatever_it_holds() {
    // A spec Weft refuses (wrong types, unknown fields) must still read, for its status to say why.
    let cr: AuthorizationPolicy = serde_json::from_value(json!({
        "apiVersion": "security.weft.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "shop", "uid": "u1", "generation": 3},
        "spec": {"action": "NOPE", "rules": [{"from": []}], "principal": 7},
    }))
    .unwrap();
    assert_eq!(cr.spec.0.0["principal"], json!(7));
    assert!(cr.status.is_none());

    // No spec, or a null one: the empty spec.
    for spec in [None, Some(Value::Null)] {
        let mut doc = json!({
            "apiVersion": "security.weft.dev/v1alpha1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "p", "namespace": "shop"},
        });
        if let Some(s) = spec {
            doc["spec"] = s;
        }
        let cr: PeerAuthentication = serde_json::from_value(doc).unwrap();
        assert_eq!(cr.spec.0.0, Value::Null);
    }
}

#[test]
fn status_round_trips_in_the_condition_shape() {
    let status = Status {
        conditions: vec![Condition {
            type_: ACCEPTED.into(),
            status: "False".into(),
            reason: "Invalid".into(),
            message: "spec.rules[0].from: must not be empty".into(),
            last_transition_time: Some("2025-01-01T00:00:00Z".into()),
            observed_generation: Some(2),
        }],
    };
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(
        json,
        json!({"conditions": [{
            "type": "Accepted",
            "status": "False",
            "reason": "Invalid",
            "message": "spec.rules[0].from: must not be empty",
            "lastTransitionTime": "2025-01-01T00:00:00Z",
            "observedGeneration": 2,
        }]})
    );
    assert_eq!(serde_json::from_value::<Status>(json).unwrap(), status);
}

#[test]
fn deploy_crds_yaml_is_what_the_binary_prints() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        committed == crds_yaml().unwrap(),
        "{} is stale: run `cargo xtask crds`",
        path.display()
    );
}
