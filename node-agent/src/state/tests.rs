use std::collections::HashMap;

use weft_api::v1::{self, resource::Kind};

use super::*;

fn res(kind: &str, name: &str, body: Kind) -> v1::Resource {
    v1::Resource {
        key: Some(v1::ResourceKey {
            r#type: kind.into(),
            name: name.into(),
        }),
        version: 1,
        kind: Some(body),
    }
}

fn ns(name: &str, ambient: bool) -> v1::Resource {
    let mut annotations = HashMap::new();
    if ambient {
        annotations.insert("weft.dev/dataplane-mode".to_owned(), "ambient".to_owned());
    }
    res(
        types::NAMESPACE,
        name,
        Kind::Namespace(v1::Namespace {
            name: name.into(),
            labels: HashMap::new(),
            annotations,
        }),
    )
}

fn pod(ns: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> v1::Resource {
    res(
        types::WORKLOAD,
        &format!("{ns}/{name}"),
        Kind::Workload(v1::Workload {
            uid: format!("uid-{name}"),
            namespace: ns.into(),
            name: name.into(),
            node: "node1".into(),
            service_account: "default".into(),
            identity: format!("spiffe://cluster.local/ns/{ns}/sa/default"),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            annotations: HashMap::new(),
            ips: vec![ip.into()],
        }),
    )
}

fn service(ns: &str, name: &str, vip: &str, endpoints: &[&str]) -> v1::Resource {
    res(
        types::SERVICE,
        &format!("{ns}/{name}"),
        Kind::Service(v1::Service {
            namespace: ns.into(),
            name: name.into(),
            vips: vec![vip.into()],
            ports: vec![v1::ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
            }],
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        }),
    )
}

fn push(full: bool, resources: Vec<v1::Resource>, removed: &[(&str, &str)]) -> v1::Push {
    v1::Push {
        nonce: "n".into(),
        full,
        resources,
        removed: removed
            .iter()
            .map(|(t, n)| v1::ResourceKey {
                r#type: t.to_string(),
                name: n.to_string(),
            })
            .collect(),
        revision: 7,
        store_id: String::new(),
    }
}

fn mesh() -> State {
    let (state, rejected) = State::default().apply(&push(
        true,
        vec![
            ns("shop", true),
            ns("legacy", false),
            pod("shop", "web-1", "10.244.1.11", &[("app", "web")]),
            pod("shop", "web-2", "10.244.2.11", &[("app", "web")]),
            pod("legacy", "db", "10.244.1.12", &[]),
            service("shop", "web", "10.96.0.10", &["shop/web-1", "shop/web-2"]),
            service("shop", "empty", "10.96.0.11", &[]),
        ],
        &[],
    ));
    assert!(rejected.is_empty(), "{rejected:?}");
    state
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn a_meshed_pod_gets_hbone_with_its_identity() {
    let plan = mesh().plan(addr("10.244.2.11:8080"), 0);
    assert_eq!(
        plan,
        Plan::Hbone {
            peer: addr("10.244.2.11:15008"),
            target: addr("10.244.2.11:8080"),
            identity: "spiffe://cluster.local/ns/shop/sa/default".parse().unwrap(),
            workload: "shop/web-2".into(),
        }
    );
}

#[test]
fn a_pod_outside_the_mesh_and_an_unknown_address_pass_through() {
    let state = mesh();
    assert_eq!(
        state.plan(addr("10.244.1.12:5432"), 0),
        Plan::Passthrough {
            target: addr("10.244.1.12:5432"),
            workload: Some("legacy/db".into())
        }
    );
    assert_eq!(
        state.plan(addr("192.0.2.1:443"), 0),
        Plan::Passthrough {
            target: addr("192.0.2.1:443"),
            workload: None
        }
    );
}

#[test]
fn a_service_vip_is_spread_round_robin_over_its_endpoints_on_the_target_port() {
    let state = mesh();
    let peers: Vec<SocketAddr> = (0..4)
        .map(|i| match state.plan(addr("10.96.0.10:80"), i) {
            Plan::Hbone { target, .. } => target,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        peers,
        [
            addr("10.244.1.11:8080"),
            addr("10.244.2.11:8080"),
            addr("10.244.1.11:8080"),
            addr("10.244.2.11:8080")
        ]
    );
}

#[test]
fn a_service_without_endpoints_or_port_has_nowhere_to_go() {
    let state = mesh();
    assert!(matches!(state.plan(addr("10.96.0.11:80"), 0), Plan::NoEndpoint { .. }));
    assert!(matches!(state.plan(addr("10.96.0.10:81"), 0), Plan::NoEndpoint { .. }));
}

#[test]
fn increments_add_and_remove_and_a_full_push_replaces() {
    let state = mesh();
    let (state, rejected) = state.apply(&push(
        false,
        vec![pod("shop", "web-3", "10.244.2.12", &[])],
        &[(types::WORKLOAD, "shop/web-1")],
    ));
    assert!(rejected.is_empty());
    assert!(state.workload_by_ip("10.244.2.12".parse().unwrap()).is_some());
    assert!(state.workload_by_ip("10.244.1.11".parse().unwrap()).is_none());
    assert_eq!(state.revision, 7);

    let (state, _) = state.apply(&push(true, vec![ns("shop", true)], &[]));
    assert!(state.snapshot().pods.is_empty());
    assert_eq!(state.snapshot().namespaces.len(), 1);
}

#[test]
fn a_rejected_resource_keeps_its_previous_version() {
    let state = mesh();
    let mut bad = pod("shop", "web-1", "not-an-ip", &[]);
    let (next, rejected) = state.apply(&push(false, vec![bad.clone()], &[]));
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].key, "workload/shop/web-1");
    // An incremental push: the previous version stays.
    assert_eq!(next.workload("shop/web-1"), state.workload("shop/web-1"));

    // A full push: the previous version stays.
    if let Some(Kind::Workload(w)) = &mut bad.kind {
        w.identity = "not-spiffe".into();
        w.ips = vec!["10.244.1.11".into()];
    }
    let (next, rejected) = state.apply(&push(true, vec![ns("shop", true), bad], &[]));
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].error.contains("identity"), "{}", rejected[0].error);
    assert_eq!(next.workload("shop/web-1"), state.workload("shop/web-1"));
}

#[test]
fn policies_follow_pushes_and_decide_for_the_pod_s_namespace_only() {
    let deny_all = res(
        types::POLICY,
        "shop/deny",
        Kind::Policy(v1::Policy {
            namespace: "shop".into(),
            name: "deny".into(),
            selector: None,
            action: v1::Action::Deny as i32,
            rules: vec![v1::Rule::default()],
        }),
    );
    let state = mesh();
    let (with, rejected) = state.apply(&push(false, vec![deny_all], &[]));
    assert!(rejected.is_empty(), "{rejected:?}");
    let conn = policy::Connection {
        source_principal: Some("spiffe://cluster.local/ns/shop/sa/default"),
        source_ip: "10.244.1.11".parse().unwrap(),
        destination_port: 8080,
    };
    let web = with.workload("shop/web-2").unwrap().pod.uid.clone();
    let db = with.workload("legacy/db").unwrap().pod.uid.clone();
    assert!(matches!(
        authorize(&with, "shop/web-2", &web, &conn),
        policy::Decision::Deny { .. }
    ));
    assert_eq!(authorize(&with, "legacy/db", &db, &conn), policy::Decision::Allow);

    let (without, _) = with.apply(&push(false, vec![], &[(types::POLICY, "shop/deny")]));
    assert_eq!(authorize(&without, "shop/web-2", &web, &conn), policy::Decision::Allow);

    // Nothing current to decide on: a workload the state lost, or one with another uid, is refused.
    let (gone, _) = without.apply(&push(false, vec![], &[(types::WORKLOAD, "shop/web-2")]));
    assert!(matches!(
        authorize(&gone, "shop/web-2", &web, &conn),
        policy::Decision::Deny { policy: None }
    ));
    assert!(matches!(
        authorize(&without, "shop/web-2", "another-uid", &conn),
        policy::Decision::Deny { policy: None }
    ));
}
