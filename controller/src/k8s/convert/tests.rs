use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;

const UID: &str = "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e03";

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// A scheduled, running pod with an address; `edit` changes the JSON first.
fn pod_json(edit: impl FnOnce(&mut Value)) -> core::Pod {
    let mut v = json!({
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": UID,
            "labels": {"app": "web"},
            "annotations": {
                "weft.dev/dataplane-mode": "ambient",
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
            },
        },
        "spec": {"nodeName": "node1", "serviceAccountName": "api", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]},
    });
    edit(&mut v);
    from(v)
}

fn model_pod(edit: impl FnOnce(&mut Pod)) -> Option<Object> {
    let mut p = Pod {
        namespace: "shop".into(),
        name: "web".into(),
        uid: UID.into(),
        meta: Meta {
            labels: BTreeMap::from([("app".into(), "web".into())]),
            annotations: BTreeMap::from([("weft.dev/dataplane-mode".into(), "ambient".into())]),
        },
        node: "node1".into(),
        service_account: "api".into(),
        ips: vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
    };
    edit(&mut p);
    Some(Object::Pod(p))
}

#[test]
fn pods_become_workloads_once_scheduled_and_addressed_until_they_finish() {
    type Case = (&'static str, core::Pod, Result<Option<Object>, &'static str>);
    let cases: Vec<Case> = vec![
        ("running", pod_json(|_| {}), Ok(model_pod(|_| {}))),
        (
            "not scheduled",
            pod_json(|v| v["spec"].as_object_mut().unwrap().remove("nodeName").map(drop).unwrap()),
            Ok(None),
        ),
        // Known while its sandbox is made: the CNI plugin asks the node's agent about it then.
        (
            "scheduled, no address yet",
            pod_json(|v| v["status"] = json!({"phase": "Pending"})),
            Ok(model_pod(|p| p.ips.clear())),
        ),
        (
            "no status at all",
            pod_json(|v| v["status"] = Value::Null),
            Ok(model_pod(|p| p.ips.clear())),
        ),
        (
            "host network",
            pod_json(|v| v["spec"]["hostNetwork"] = json!(true)),
            Ok(None),
        ),
        (
            "succeeded",
            pod_json(|v| v["status"]["phase"] = json!("Succeeded")),
            Ok(None),
        ),
        ("failed", pod_json(|v| v["status"]["phase"] = json!("Failed")), Ok(None)),
        (
            "no service account: default",
            pod_json(|v| {
                v["spec"]
                    .as_object_mut()
                    .unwrap()
                    .remove("serviceAccountName")
                    .map(drop)
                    .unwrap()
            }),
            Ok(model_pod(|p| p.service_account = "default".into())),
        ),
        (
            "only podIP (no podIPs)",
            pod_json(|v| v["status"] = json!({"podIP": "10.1.0.7"})),
            Ok(model_pod(|p| p.ips = vec!["10.1.0.7".parse().unwrap()])),
        ),
        (
            "a second address of one family is ignored",
            pod_json(|v| v["status"]["podIPs"] = json!([{"ip": "fd00::5"}, {"ip": "fd00::6"}, {"ip": "10.1.0.5"}])),
            Ok(model_pod(|p| {
                p.ips = vec!["fd00::5".parse().unwrap(), "10.1.0.5".parse().unwrap()];
            })),
        ),
        (
            "only Weft's annotations are kept",
            pod_json(|v| v["metadata"]["annotations"] = json!({"example.com/x": "y"})),
            Ok(model_pod(|p| p.meta.annotations.clear())),
        ),
        (
            "unparsable address",
            pod_json(|v| v["status"]["podIPs"] = json!([{"ip": "10.1.0.300"}])),
            Err("Pod shop/web: status.podIPs[0].ip: \"10.1.0.300\" is not an IP address"),
        ),
        (
            "uid not a UUID",
            pod_json(|v| v["metadata"]["uid"] = json!("../x")),
            Err("Pod shop/web: metadata.uid: \"../x\" is not a UID (8-4-4-4-12 lowercase hex)"),
        ),
    ];
    for (name, input, want) in cases {
        let got = pod(&input).map(|c| c.map(|c| c.object));
        match want {
            Ok(want) => assert_eq!(got, Ok(want), "{name}"),
            Err(text) => assert_eq!(got.unwrap_err().to_string(), text, "{name}"),
        }
    }
}

#[test]
fn a_weft_annotation_value_the_store_refuses_is_kept_with_a_warning() {
    let p = pod_json(|v| v["metadata"]["annotations"] = json!({"weft.dev/dataplane-mode": "sidecar"}));
    let c = pod(&p).unwrap().unwrap();
    assert_eq!(
        c.warnings,
        vec![Warning {
            field: "metadata.annotations[\"weft.dev/dataplane-mode\"]".into(),
            problem: "\"sidecar\" is not a dataplane mode (allowed: \"ambient\", \"none\"): read as no annotation"
                .into(),
        }]
    );
}

fn service_json(edit: impl FnOnce(&mut Value)) -> core::Service {
    let mut v = json!({
        "metadata": {"name": "api", "namespace": "shop", "labels": {"tier": "backend"}},
        "spec": {
            "selector": {"app": "web"},
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    });
    edit(&mut v);
    from(v)
}

fn model_service(edit: impl FnOnce(&mut Service)) -> Object {
    let mut s = Service {
        namespace: "shop".into(),
        name: "api".into(),
        meta: Meta {
            labels: BTreeMap::from([("tier".into(), "backend".into())]),
            annotations: BTreeMap::new(),
        },
        selector: Some(BTreeMap::from([("app".into(), "web".into())])),
        cluster_ips: vec!["10.96.0.10".parse().unwrap(), "fd00:96::10".parse().unwrap()],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            target_port: 8080,
        }],
    };
    edit(&mut s);
    Object::Service(s)
}

#[test]
fn services_keep_their_selector_addresses_and_tcp_ports() {
    type Case = (
        &'static str,
        core::Service,
        Result<(Object, Vec<&'static str>), &'static str>,
    );
    let cases: Vec<Case> = vec![
        ("dual stack", service_json(|_| {}), Ok((model_service(|_| {}), vec![]))),
        (
            "headless",
            service_json(|v| {
                v["spec"]["clusterIP"] = json!("None");
                v["spec"]["clusterIPs"] = json!(["None"]);
            }),
            Ok((model_service(|s| s.cluster_ips.clear()), vec![])),
        ),
        (
            "only clusterIP",
            service_json(|v| {
                v["spec"].as_object_mut().unwrap().remove("clusterIPs");
            }),
            Ok((model_service(|s| s.cluster_ips.truncate(1)), vec![])),
        ),
        (
            "no selector",
            service_json(|v| {
                v["spec"].as_object_mut().unwrap().remove("selector");
            }),
            Ok((model_service(|s| s.selector = None), vec![])),
        ),
        (
            "ExternalName selects nothing and has no address",
            service_json(|v| {
                v["spec"]["type"] = json!("ExternalName");
                v["spec"]["externalName"] = json!("db.example.com");
                v["spec"]["clusterIP"] = json!("");
                v["spec"].as_object_mut().unwrap().remove("clusterIPs");
            }),
            Ok((
                model_service(|s| {
                    s.selector = None;
                    s.cluster_ips.clear();
                }),
                vec![],
            )),
        ),
        (
            "target port defaults to the port",
            service_json(|v| v["spec"]["ports"] = json!([{"port": 80}])),
            Ok((
                model_service(|s| {
                    s.ports = vec![ServicePort {
                        name: String::new(),
                        port: 80,
                        target_port: 80,
                    }];
                }),
                vec![],
            )),
        ),
        (
            "UDP and SCTP ports are left out silently",
            service_json(|v| {
                v["spec"]["ports"] = json!([
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    {"name": "s", "port": 9, "protocol": "SCTP"},
                ]);
            }),
            Ok((
                model_service(|s| {
                    s.ports = vec![ServicePort {
                        name: "dns-tcp".into(),
                        port: 53,
                        target_port: 53,
                    }];
                }),
                vec![],
            )),
        ),
        (
            "a named target port is left out with a warning",
            service_json(|v| {
                v["spec"]["ports"] = json!([
                    {"name": "http", "port": 80, "targetPort": "http"},
                    {"name": "admin", "port": 9000, "targetPort": 9001},
                ]);
            }),
            Ok((
                model_service(|s| {
                    s.ports = vec![ServicePort {
                        name: "admin".into(),
                        port: 9000,
                        target_port: 9001,
                    }];
                }),
                vec![
                    "spec.ports[0].targetPort: \"http\": named target ports are not supported (one number must serve every endpoint): the port is left out",
                ],
            )),
        ),
        (
            "unparsable cluster IP",
            service_json(|v| v["spec"]["clusterIPs"] = json!(["10.96.0.300"])),
            Err("Service shop/api: spec.clusterIPs[0]: \"10.96.0.300\" is not an IP address"),
        ),
    ];
    for (name, input, want) in cases {
        let got = service(&input);
        match want {
            Ok((object, warnings)) => {
                let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(got.object, object, "{name}");
                let texts: Vec<String> = got.warnings.iter().map(ToString::to_string).collect();
                assert_eq!(texts, warnings, "{name}");
            }
            Err(text) => assert_eq!(got.unwrap_err().to_string(), text, "{name}"),
        }
    }
}

#[test]
fn namespaces_and_service_accounts_keep_labels_and_weft_annotations() {
    let ns: core::Namespace = from(json!({"metadata": {
        "name": "shop",
        "uid": UID,
        "labels": {"team": "a"},
        "annotations": {"weft.dev/dataplane-mode": "ambient", "other": "x"},
    }}));
    assert_eq!(
        namespace(&ns).unwrap().object,
        Object::Namespace(Namespace {
            name: "shop".into(),
            meta: Meta {
                labels: BTreeMap::from([("team".into(), "a".into())]),
                annotations: BTreeMap::from([("weft.dev/dataplane-mode".into(), "ambient".into())]),
            },
        })
    );
    let sa: core::ServiceAccount = from(json!({"metadata": {"name": "api", "namespace": "shop"}}));
    assert_eq!(
        service_account(&sa).unwrap().object,
        Object::ServiceAccount(ServiceAccount {
            namespace: "shop".into(),
            name: "api".into(),
            meta: Meta::default(),
        })
    );
}

fn policy_cr(name: &str, spec: Value) -> crd::AuthorizationPolicy {
    from(json!({
        "apiVersion": "security.weft.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop", "uid": UID, "generation": 1},
        "spec": spec,
    }))
}

/// The local store's verdict on the same policy, as `<field>: <problem>`.
fn store_verdict(name: &str, spec: &Value) -> Result<Object, String> {
    let yaml = serde_yaml_ng::to_string(&json!({
        "apiVersion": "security.weft.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    }))
    .unwrap();
    manifest::parse(&yaml, "p.yaml")
        .map(|mut docs| docs.remove(0).item)
        .map_err(|e| format!("{}: {}", e.field.unwrap_or_default(), e.problem))
}

#[test]
fn policies_are_refused_exactly_as_the_local_store_refuses_them() {
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        ("empty", json!({}), None),
        ("null spec", Value::Null, None),
        (
            "deny from a namespace",
            json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}),
            None,
        ),
        (
            "empty from",
            json!({"rules": [{"from": []}]}),
            Some("spec.rules[0].from"),
        ),
        (
            "misspelt field",
            json!({"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}),
            Some("spec.rules[0].from[0].source.principal"),
        ),
        (
            "bad port",
            json!({"rules": [{"to": [{"operation": {"ports": ["0"]}}]}]}),
            Some("spec.rules[0].to[0].operation.ports[0]"),
        ),
        (
            "HTTP field",
            json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
            Some("spec.rules[0].to[0].operation.methods"),
        ),
        ("CUSTOM", json!({"action": "CUSTOM"}), Some("spec.action")),
        ("wrong type", json!({"rules": "all"}), Some("spec.rules")),
    ];
    for (name, spec, bad_field) in cases {
        let got = authorization_policy(&policy_cr("p", spec.clone()));
        let store = store_verdict("p", &spec);
        match bad_field {
            None => {
                let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(Ok(got), store, "{name}");
            }
            Some(field) => {
                let e = got.expect_err(name);
                assert_eq!(e.object.to_string(), "AuthorizationPolicy shop/p", "{name}");
                assert_eq!(e.problem.field.as_deref(), Some(field), "{name}: {e}");
                assert_eq!(
                    Err(e.problem.to_string()),
                    store,
                    "{name}: the same text as the local store"
                );
            }
        }
    }
}

#[test]
fn a_policy_name_the_store_would_refuse_is_refused_naming_it() {
    // Kubernetes allows dots in a custom resource's name; policy names are DNS labels.
    let e = authorization_policy(&policy_cr("allow.web", json!({}))).unwrap_err();
    assert_eq!(e.problem.field.as_deref(), Some("metadata.name"));
}

#[test]
fn peer_authentications_are_refused_as_the_local_store_refuses_them() {
    let cr = |spec: Value| -> crd::PeerAuthentication {
        from(json!({
            "apiVersion": "security.weft.dev/v1alpha1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "strict", "namespace": "shop"},
            "spec": spec,
        }))
    };
    let ok = peer_authentication(&cr(json!({"mtls": {"mode": "STRICT"}}))).unwrap();
    let Object::PeerAuthentication(p) = ok else {
        panic!("{ok:?}")
    };
    assert_eq!(p.spec.mtls.unwrap().mode, weft_model::peer_auth::Mode::Strict);
    let e = peer_authentication(&cr(json!({"portLevelMtls": {"8080": {"mode": "STRICT"}}}))).unwrap_err();
    assert_eq!(e.problem.field.as_deref(), Some("spec.portLevelMtls"));
    let e = peer_authentication(&cr(json!({"mtls": {"mode": "strict"}}))).unwrap_err();
    assert_eq!(e.problem.field.as_deref(), Some("spec.mtls.mode"), "{e}");
}
