//! The compact state: what pods have in common is held once, a change to one pod changes no other
//! pod and no older state, values no state uses are dropped, and a service's endpoints follow its
//! members however a push orders their changes.

use std::sync::Weak;

use weft_api::v1;

use super::{fixtures::*, *};

/// Two pods of one ReplicaSet (same labels and service account) and one other, and a service.
fn three_pods_pushed() -> Vec<v1::Resource> {
    vec![
        ns("shop", true),
        member_of(pod("shop", "web-1", "10.244.1.11", &[("app", "web")]), &["shop/web"]),
        member_of(pod("shop", "web-2", "10.244.2.11", &[("app", "web")]), &["shop/web"]),
        pod("shop", "db", "10.244.1.12", &[("app", "db")]),
        service("shop", "web", "10.96.0.10"),
    ]
}

fn three_pods() -> State {
    state_of(three_pods_pushed())
}

fn workload<'a>(state: &'a State, key: &str) -> &'a Arc<Workload> {
    state.workload(key).unwrap_or_else(|| panic!("{key}"))
}

fn weak_labels(state: &State, key: &str) -> Weak<Labels> {
    Arc::downgrade(workload(state, key).template().labels())
}

/// Applies pushes of one unrelated change each until every slice of the pools was pruned twice
/// (a template first, then what it held).
fn churn(mut state: State) -> State {
    for i in 0..1100 {
        let p = pod(
            "shop",
            "churn",
            &format!("10.244.9.{}", i % 250),
            &[("i", &i.to_string())],
        );
        state = state.apply(&push(false, vec![p], &[])).0;
    }
    state
}

#[test]
fn pods_of_one_replica_set_share_what_they_have_in_common() {
    let state = three_pods();
    let (a, b, db) = (
        workload(&state, "shop/web-1"),
        workload(&state, "shop/web-2"),
        workload(&state, "shop/db"),
    );
    assert!(Arc::ptr_eq(a.template(), b.template()));
    assert!(!Arc::ptr_eq(a.template(), db.template()));
    // db differs in its labels only: the rest is still shared.
    assert!(Arc::ptr_eq(a.template().identity(), db.template().identity()));
    assert!(std::ptr::eq(a.annotations(), db.annotations()));
    assert!(std::ptr::eq(a.node(), db.node()));
    assert_eq!(a.labels(), &Labels::from([("app".to_owned(), "web".to_owned())]));
    assert_eq!(db.service_account(), "default");
    assert_eq!(
        &**a.identity(),
        &"spiffe://cluster.local/ns/shop/sa/default".parse().unwrap()
    );
}

#[test]
fn a_label_change_on_one_pod_changes_no_other_pod_and_no_older_state() {
    let before = three_pods();
    let relabelled = pod("shop", "web-1", "10.244.1.11", &[("app", "web"), ("canary", "yes")]);
    let (after, _) = before.apply(&push(false, vec![member_of(relabelled, &["shop/web"])], &[]));
    let web = Labels::from([("app".to_owned(), "web".to_owned())]);
    assert_eq!(workload(&after, "shop/web-1").labels()["canary"], "yes");
    assert_eq!(workload(&after, "shop/web-2").labels(), &web);
    assert_eq!(
        workload(&before, "shop/web-1").labels(),
        &web,
        "the old state is untouched"
    );
    // web-2 is the very workload it was: nothing about it was copied.
    assert!(Arc::ptr_eq(
        workload(&after, "shop/web-2"),
        workload(&before, "shop/web-2")
    ));
}

#[test]
fn values_no_state_uses_are_dropped_and_those_an_old_state_uses_are_kept() {
    let first = three_pods();
    let db_labels = weak_labels(&first, "shop/db");
    let (second, _) = first.apply(&push(
        false,
        vec![pod("shop", "db", "10.244.1.12", &[("app", "pg")])],
        &[],
    ));

    // The first state still uses db's old labels: pruning keeps them, and they stay right.
    let second = churn(second);
    assert!(db_labels.upgrade().is_some());
    assert_eq!(workload(&first, "shop/db").labels()["app"], "db");

    // Once no state uses them, they go.
    drop(first);
    let second = churn(second);
    assert!(db_labels.upgrade().is_none(), "held by the interner alone, pruned");
    assert_eq!(workload(&second, "shop/db").labels()["app"], "pg");
    // The same labels again are interned anew.
    let (third, _) = second.apply(&push(
        false,
        vec![pod("shop", "db2", "10.244.1.13", &[("app", "db")])],
        &[],
    ));
    assert_eq!(workload(&third, "shop/db2").labels()["app"], "db");
}

#[test]
fn a_mesh_that_shrank_frees_what_its_pods_shared() {
    let before = three_pods();
    let weak = weak_labels(&before, "shop/web-1");
    let (after, _) = before.apply(&push(
        false,
        vec![],
        &[(types::WORKLOAD, "shop/web-1"), (types::WORKLOAD, "shop/web-2")],
    ));
    drop(before);
    let state = churn(after);
    assert!(weak.upgrade().is_none());
    assert!(state.workload("shop/web-1").is_none());
}

#[test]
fn a_full_push_that_changes_nothing_keeps_the_workloads_held() {
    let before = Arc::new(three_pods());
    let (after, rejected) = before.apply(&push(true, three_pods_pushed(), &[]));
    assert!(rejected.is_empty());
    for key in ["shop/web-1", "shop/web-2", "shop/db"] {
        assert!(Arc::ptr_eq(workload(&after, key), workload(&before, key)), "{key}");
    }
    assert_eq!(after.held(), before.held());
    assert_eq!(
        after.plan("10.96.0.10:80".parse().unwrap(), 1),
        before.plan("10.96.0.10:80".parse().unwrap(), 1)
    );
}

#[test]
fn endpoints_follow_the_last_change_of_each_pod_in_a_push() {
    let state = Arc::new(three_pods());
    // In one push, in two chunks: web-1 leaves the service, web-3 joins and leaves again, db
    // joins, web-2 moves to a v6-only address.
    let first = v1::Push {
        more: true,
        ..push(
            false,
            vec![
                pod("shop", "web-1", "10.244.1.11", &[("app", "web")]),
                member_of(pod("shop", "web-3", "10.244.3.11", &[]), &["shop/web"]),
            ],
            &[],
        )
    };
    let last = push(
        false,
        vec![
            member_of(pod("shop", "db", "10.244.1.12", &[]), &["shop/web"]),
            member_of(pod("shop", "web-2", "fd00::2:11", &[]), &["shop/web"]),
        ],
        &[(types::WORKLOAD, "shop/web-3")],
    );
    let mut staged = state.stage(&first);
    staged.take(&first);
    staged.take(&last);
    let (after, rejected) = staged.finish();
    assert!(rejected.is_empty(), "{rejected:?}");
    let endpoints = |state: &State, v6| -> Vec<String> {
        state
            .members
            .get("shop/web")
            .map(|e| e.of_family(v6).iter().map(|w| w.key().to_string()).collect())
            .unwrap_or_default()
    };
    assert_eq!(endpoints(&after, false), ["shop/db"]);
    assert_eq!(endpoints(&after, true), ["shop/web-2"]);
    assert_eq!(
        endpoints(&state, false),
        ["shop/web-1", "shop/web-2"],
        "the old state is untouched"
    );
    // The last member gone: the service has no endpoints, and no entry.
    let (empty, _) = after.apply(&push(
        false,
        vec![],
        &[(types::WORKLOAD, "shop/db"), (types::WORKLOAD, "shop/web-2")],
    ));
    assert!(empty.members.get("shop/web").is_none());
    assert!(matches!(
        empty.plan("10.96.0.10:80".parse().unwrap(), 0),
        Plan::NoEndpoint { .. }
    ));
}

#[test]
fn the_reconciler_sees_its_own_node_s_pods_and_the_one_it_asks_about() {
    let (state, _) = three_pods().apply(&push(
        false,
        vec![with_node(pod("shop", "elsewhere", "10.244.5.11", &[]), "node2")],
        &[],
    ));
    let names = |s: WorkloadSnapshot| s.pods.into_iter().map(|p| p.qualified_name()).collect::<Vec<_>>();
    assert_eq!(
        names(state.snapshot_on("node1", None)),
        ["shop/db", "shop/web-1", "shop/web-2"]
    );
    assert_eq!(
        names(state.snapshot_on("node2", Some(&uid("db")))),
        ["shop/db", "shop/elsewhere"]
    );
    // Whole pods, as pushed.
    let pod = &state.snapshot_on("node2", None).pods[0];
    assert_eq!(pod.uid, uid("elsewhere"));
    assert_eq!((pod.node.as_str(), pod.service_account.as_str()), ("node2", "default"));
    assert_eq!(pod.ips, ["10.244.5.11".parse::<IpAddr>().unwrap()]);
    assert!(state.has_pod(&uid("elsewhere")) && !state.has_pod(&uid("nope")) && !state.has_pod("nope"));
}

#[test]
fn a_uid_is_held_in_its_16_bytes_and_written_back_the_same() {
    let text = "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e03";
    assert_eq!(Uid::parse(text).unwrap().to_string(), text);
    for bad in [
        "",
        "0B5E1C2A-7D3F-4A61-9C8E-2F4B6D8A1E03",
        "0b5e1c2a7d3f4a619c8e2f4b6d8a1e03",
        "0b5e1c2a-7d3f-4a61-9c8e_2f4b6d8a1e03",
        "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e0g",
        "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e033",
    ] {
        assert_eq!(Uid::parse(bad), None, "{bad}");
    }
}
