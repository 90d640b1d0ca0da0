use weft_api::v1::{self, resource::Kind};

use super::{fixtures::*, *};

fn mesh() -> State {
    state_of(shop_and_legacy())
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
            identity: Arc::new("spiffe://cluster.local/ns/shop/sa/default".parse().unwrap()),
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
    assert!(state.snapshot_on("node1", None).pods.is_empty());
    assert_eq!(state.snapshot_on("node1", None).namespaces.len(), 1);
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

/// mTLS from shop/default to 10.244.2.11:8080.
fn conn() -> policy::Connection<'static> {
    policy::Connection {
        source_principal: Some("spiffe://cluster.local/ns/shop/sa/default"),
        source_ip: "10.244.1.11".parse().unwrap(),
        destination_ip: "10.244.2.11".parse().unwrap(),
        destination_port: 8080,
    }
}

#[test]
fn policies_follow_pushes_and_decide_for_the_pod_s_namespace_only() {
    let deny_all = policy(
        "shop",
        "deny",
        v1::Action::Deny,
        v1::Scope::Namespace,
        vec![v1::Rule::default()],
    );
    let state = mesh();
    let (with, rejected) = state.apply(&push(false, vec![deny_all], &[]));
    assert!(rejected.is_empty(), "{rejected:?}");
    let conn = conn();
    let web = with.workload("shop/web-2").unwrap().uid().to_string();
    let db = with.workload("legacy/db").unwrap().uid().to_string();
    assert!(matches!(
        authorize(&with, "shop/web-2", &web, &conn),
        policy::Decision::Deny { .. }
    ));
    assert_eq!(authorize(&with, "legacy/db", &db, &conn), policy::Decision::ALLOW);

    let (without, _) = with.apply(&push(false, vec![], &[(types::POLICY, "shop/deny")]));
    assert_eq!(authorize(&without, "shop/web-2", &web, &conn), policy::Decision::ALLOW);

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

#[test]
fn mesh_wide_policies_decide_for_pods_of_every_namespace() {
    // The agent does not know the root namespace's name: the controller marks its policies.
    let require_mtls = policy(
        "weft-system",
        "require-mtls",
        v1::Action::Deny,
        v1::Scope::Mesh,
        from_source(v1::PolicySource {
            not_principals: vec!["*".into()],
            ..v1::PolicySource::default()
        }),
    );
    let (state, rejected) = mesh().apply(&push(false, vec![require_mtls], &[]));
    assert!(rejected.is_empty(), "{rejected:?}");
    let plaintext = policy::Connection {
        source_principal: None,
        ..conn()
    };
    for key in ["shop/web-2", "legacy/db"] {
        let uid = state.workload(key).unwrap().uid().to_string();
        assert_eq!(
            authorize(&state, key, &uid, &plaintext),
            policy::Decision::Deny {
                policy: Some("weft-system/require-mtls".into())
            },
            "{key}"
        );
        assert_eq!(authorize(&state, key, &uid, &conn()), policy::Decision::ALLOW, "{key}");
    }
    // The same policy scoped to its namespace is weft-system's business only.
    let scoped = policy(
        "weft-system",
        "require-mtls",
        v1::Action::Deny,
        v1::Scope::Namespace,
        vec![v1::Rule::default()],
    );
    let (state, _) = state.apply(&push(false, vec![scoped], &[]));
    let uid = state.workload("legacy/db").unwrap().uid().to_string();
    assert_eq!(
        authorize(&state, "legacy/db", &uid, &plaintext),
        policy::Decision::ALLOW
    );
    assert_eq!(state.policies_for("legacy").count(), 0);
    assert_eq!(state.policies_for("weft-system").count(), 1);
}

#[test]
fn a_matching_audit_policy_is_named_in_the_decision() {
    let audit = audit_port("shop", "audit-8080", 8080);
    let (state, rejected) = mesh().apply(&push(false, vec![audit], &[]));
    assert!(rejected.is_empty(), "{rejected:?}");
    let uid = state.workload("shop/web-2").unwrap().uid().to_string();
    let decision = authorize(&state, "shop/web-2", &uid, &conn());
    assert_eq!(decision.audit(), Some("shop/audit-8080"));
    let other_port = policy::Connection {
        destination_port: 9090,
        ..conn()
    };
    assert_eq!(
        authorize(&state, "shop/web-2", &uid, &other_port),
        policy::Decision::ALLOW
    );
}

#[test]
fn a_policy_that_does_not_compile_is_rejected_and_the_old_version_stays() {
    let good = policy(
        "shop",
        "p",
        v1::Action::Deny,
        v1::Scope::Namespace,
        vec![v1::Rule::default()],
    );
    let (state, _) = mesh().apply(&push(false, vec![good], &[]));
    let mut bad = policy(
        "shop",
        "p",
        v1::Action::Allow,
        v1::Scope::Namespace,
        vec![v1::Rule::default()],
    );
    if let Some(Kind::Policy(p)) = &mut bad.kind {
        p.rules[0].from = vec![v1::PolicySource::default()];
    }
    let (next, rejected) = state.apply(&push(true, vec![ns("shop", true), bad], &[]));
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0]
            .error
            .contains("spec.rules[0].from[0].source: must not be empty"),
        "{}",
        rejected[0].error
    );
    assert_eq!(
        next.policies_for("shop").map(|p| p.name()).collect::<Vec<_>>(),
        ["shop/p"]
    );
}

#[test]
fn a_service_spreads_over_the_workloads_naming_it_as_they_come_and_go() {
    let state = mesh();
    let (state, rejected) = state.apply(&push(false, vec![], &[("workload", "shop/web-1")]));
    assert!(rejected.is_empty());
    for pick in 0..4 {
        assert_eq!(
            state.plan(addr("10.96.0.10:80"), pick),
            Plan::Hbone {
                peer: addr("10.244.2.11:15008"),
                target: addr("10.244.2.11:8080"),
                identity: Arc::new("spiffe://cluster.local/ns/shop/sa/default".parse().unwrap()),
                workload: "shop/web-2".into(),
            },
            "pick {pick}"
        );
    }
    // A pod that joins names the service: nothing else is pushed.
    let joined = member_of(pod("shop", "web-3", "10.244.3.11", &[("app", "web")]), &["shop/web"]);
    let (state, _) = state.apply(&push(false, vec![joined], &[]));
    let targets: std::collections::BTreeSet<SocketAddr> = (0..4)
        .map(|pick| match state.plan(addr("10.96.0.10:80"), pick) {
            Plan::Hbone { target, .. } => target,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(targets, [addr("10.244.2.11:8080"), addr("10.244.3.11:8080")].into());
}

#[test]
fn a_bucket_resync_replaces_what_its_buckets_held_and_keeps_the_rest() {
    let state = mesh();
    let bucket = weft_api::sync::bucket("workload", "shop/web-1") as u32;
    let resync = v1::Push {
        resync: true,
        replaced_buckets: vec![bucket],
        ..push(false, vec![], &[])
    };
    let (after, _) = state.apply(&resync);
    assert!(after.workload("shop/web-1").is_none(), "not sent again: gone");
    assert!(after.workload("shop/web-2").is_some() && after.workload("legacy/db").is_some());
    // The summary tells the two apart in exactly that bucket.
    let (a, b) = (state.held(), after.held());
    let differ: Vec<usize> = (0..a.len()).filter(|i| a[*i] != b[*i]).collect();
    assert_eq!(differ, [bucket as usize]);
}

#[test]
fn a_push_in_chunks_is_published_whole_and_the_old_state_is_untouched() {
    let before = Arc::new(mesh());
    let first = v1::Push {
        more: true,
        ..push(false, vec![pod("shop", "web-4", "10.244.4.11", &[])], &[])
    };
    let last = push(
        false,
        vec![pod("shop", "web-5", "10.244.5.11", &[])],
        &[("workload", "legacy/db")],
    );
    let mut staged = before.stage(&first);
    staged.take(&first);
    staged.take(&last);
    let (after, rejected) = staged.finish();
    assert!(rejected.is_empty());
    assert!(after.workload("shop/web-4").is_some() && after.workload("shop/web-5").is_some());
    assert!(after.workload("legacy/db").is_none());
    assert!(before.workload("shop/web-4").is_none() && before.workload("legacy/db").is_some());
}

#[test]
fn the_dump_shows_every_workload_and_service_with_what_the_data_path_uses() {
    let dump = mesh().dump();
    let names: Vec<&str> = dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["legacy/db", "shop/web-1", "shop/web-2"]);
    let web = &dump["workloads"][1];
    assert_eq!(web["identity"], "spiffe://cluster.local/ns/shop/sa/default");
    assert_eq!(web["meshed"], true);
    assert_eq!(web["services"], serde_json::json!(["shop/web"]));
    assert_eq!(dump["workloads"][0]["meshed"], false);
    let service = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "shop/web")
        .expect("shop/web");
    assert_eq!(service["endpoints"], 2);
    assert_eq!(
        service["ports"],
        serde_json::json!([{ "port": 80, "target_port": 8080 }])
    );
}
