//! The store on disk: what a crash leaves opens to every acknowledged revision and no other, a
//! damaged log is refused naming it, compaction changes nothing a reader can see, a store written
//! before the log opens; and the indexes a commit updates equal ones built from scratch.

use std::{fs, path::Path};

use proptest::prelude::*;

use super::{index::Index, *};

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n";

fn pod(name: &str, ip: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: n1\nstatus:\n  podIP: {ip}\n")
}

/// A store with a namespace and `pods` pods, one commit each (revision `pods + 1`).
fn store_with_pods(dir: &Path, pods: usize) -> Store {
    let store = Store::open(dir).unwrap();
    store.apply(NS, "ns.yaml").unwrap();
    for i in 0..pods {
        store
            .apply(&pod(&format!("p{i}"), &format!("10.0.0.{}", i + 1)), "pod.yaml")
            .unwrap();
    }
    store
}

/// The files of `store` as a crash would leave them now (every acknowledged write is in them),
/// copied to a directory of their own; the store keeps running.
fn crash_image(store: &Store, dir: &Path) -> tempfile::TempDir {
    disk::wait_for_compaction(&store.log);
    let image = tempfile::tempdir().unwrap();
    for name in [FILE_NAME, LOG_NAME] {
        if dir.join(name).exists() {
            fs::copy(dir.join(name), image.path().join(name)).unwrap();
        }
    }
    image
}

/// A store as [`store_with_pods`] makes it (its directory kept alive with it), and a crash image of it.
fn crashed_store_with_pods(pods: usize) -> ((tempfile::TempDir, Store), tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_pods(dir.path(), pods);
    let image = crash_image(&store, dir.path());
    ((dir, store), image)
}

/// A store opened from what a crash would leave of `store` now holds what `store` holds.
fn assert_a_crash_now_loses_nothing(store: &Store, dir: &Path) {
    let image = crash_image(store, dir);
    let reopened = Store::open(image.path()).unwrap();
    assert_eq!(*reopened.snapshot(), *store.snapshot());
    assert_eq!(reopened.snapshot().index, store.snapshot().index);
}

/// The log's lines.
fn log_lines(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join(LOG_NAME))
        .unwrap()
        .split_inclusive('\n')
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_commit_appends_one_record_and_leaves_the_snapshot_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_pods(dir.path(), 2);
    let snapshot = fs::read(dir.path().join(FILE_NAME)).unwrap();
    store.apply(&pod("p9", "10.0.0.9"), "pod.yaml").unwrap();
    assert_eq!(fs::read(dir.path().join(FILE_NAME)).unwrap(), snapshot);
    let lines = log_lines(dir.path());
    assert_eq!(lines.len(), 4, "{lines:?}");
    let last = &lines[3];
    assert!(
        last.contains("\"revision\":4") && last.contains("\"name\":\"p9\"") && !last.contains("\"p1\""),
        "only what the commit changed: {last}"
    );
    // A delete records the reference it removes.
    store.delete(&pod("p9", "10.0.0.9"), "pod.yaml", false).unwrap();
    let last = log_lines(dir.path()).pop().unwrap();
    assert!(
        last.contains("\"put\":[]")
            && last.contains("\"remove\":[{\"kind\":\"Pod\",\"namespace\":\"default\",\"name\":\"p9\"}]"),
        "{last}"
    );
}

#[test]
fn a_torn_last_record_is_dropped_and_the_store_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_pods(dir.path(), 3);
    let whole = fs::read(dir.path().join(LOG_NAME)).unwrap();
    let before_last = {
        let mut lines = log_lines(dir.path());
        lines.pop();
        lines.concat()
    };
    // The crash cut the last append short (at several places), or left its line damaged.
    let mut damaged = whole.clone();
    let last = damaged.len() - 2;
    damaged[last] ^= 0x20;
    for torn in [
        whole[..whole.len() - 1].to_vec(),
        whole[..before_last.len() + 10].to_vec(),
        whole[..before_last.len() + 1].to_vec(),
        damaged,
        [before_last.as_bytes(), &[0; 300]].concat(),
    ] {
        let image = crash_image(&store, dir.path());
        let log = image.path().join(LOG_NAME);
        fs::write(&log, &torn).unwrap();
        let reopened = Store::open(image.path()).unwrap();
        let state = reopened.snapshot();
        assert_eq!(state.revision, 3, "the last commit (revision 4) is gone");
        assert!(state.get(&pod_ref("p1")).is_some() && state.get(&pod_ref("p2")).is_none());
        assert_eq!(
            fs::read_to_string(&log).unwrap(),
            before_last,
            "the torn record is cut from the file"
        );
        // The next commit takes the revision the torn one had, and a reopen sees it.
        assert_eq!(reopened.apply(&pod("p2", "10.0.0.3"), "pod.yaml").unwrap().revision, 4);
        assert_a_crash_now_loses_nothing(&reopened, image.path());
    }
}

#[test]
fn a_corrupt_record_before_the_last_is_an_error_naming_the_file_and_the_record() {
    let (_store, image) = crashed_store_with_pods(3);
    let log = image.path().join(LOG_NAME);
    let lines = log_lines(image.path());
    let mut damaged = lines.clone();
    damaged[1] = damaged[1].replacen("10.0.0.1", "10.0.0.7", 1);
    fs::write(&log, damaged.concat()).unwrap();
    let err = Store::open(image.path()).err().expect("a corrupt log is refused");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: record 2 is corrupt (move it and store.json away to start with an empty store)",
            log.display()
        )
    );
    assert!(
        matches!(
            &err,
            Error::LogCorrupt {
                problem: LogProblem::Checksum,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        damaged.concat(),
        "the file is left as it is"
    );

    // A record missing in the middle, or one of another store, is refused too.
    let mut gap = lines.clone();
    gap.remove(1);
    fs::write(&log, gap.concat()).unwrap();
    let err = Store::open(image.path()).err().expect("a gap is refused");
    assert!(
        matches!(
            &err,
            Error::LogCorrupt {
                record: 2,
                problem: LogProblem::Gap { after: 1, found: 3 },
                ..
            }
        ),
        "{err:?}"
    );
    let other = tempfile::tempdir().unwrap();
    let other_store = store_with_pods(other.path(), 0);
    fs::write(&log, lines.concat()).unwrap();
    fs::copy(other.path().join(FILE_NAME), image.path().join(FILE_NAME)).unwrap();
    let err = Store::open(image.path()).err().expect("another store's log is refused");
    assert!(
        matches!(
            &err,
            Error::LogCorrupt {
                record: 1,
                problem: LogProblem::OtherStore { .. },
                ..
            }
        ),
        "{err:?}"
    );
    drop(other_store);
}

#[test]
fn compaction_moves_the_log_into_the_snapshot_and_a_reopen_sees_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    // Compacts whenever the log outgrows the snapshot.
    let store = Store::open_with(dir.path(), 1).unwrap();
    store.apply(NS, "ns.yaml").unwrap();
    for i in 0..40 {
        store
            .apply(&pod(&format!("p{i}"), &format!("10.0.1.{i}")), "pod.yaml")
            .unwrap();
    }
    disk::wait_for_compaction(&store.log);
    // The log holds exactly the revisions after the snapshot's.
    let snapshot: serde_json::Value = serde_json::from_slice(&fs::read(dir.path().join(FILE_NAME)).unwrap()).unwrap();
    let base = snapshot["revision"].as_u64().unwrap();
    let revisions: Vec<u64> = log_lines(dir.path())
        .iter()
        .map(|l| {
            let record: serde_json::Value = serde_json::from_str(&l[17..]).unwrap();
            record["revision"].as_u64().unwrap()
        })
        .collect();
    assert!(base > 1, "compacted");
    assert_eq!(revisions, (base + 1..=41).collect::<Vec<_>>());

    assert_a_crash_now_loses_nothing(&store, dir.path());
    // A clean close compacts the rest: the snapshot alone holds the store.
    let before = store.snapshot();
    drop(store);
    assert_eq!(fs::metadata(dir.path().join(LOG_NAME)).unwrap().len(), 0);
    let reopened = Store::open(dir.path()).unwrap();
    assert_eq!(*reopened.snapshot(), *before);
    assert_eq!(reopened.snapshot().index, before.index);
}

#[test]
fn a_crash_between_snapshot_and_log_cut_applies_no_record_twice() {
    let ((_dir, store), image) = crashed_store_with_pods(3);
    // The snapshot of revision 3 is on disk; the log still holds revisions 1 to 4.
    let state = store.snapshot();
    let mut at_3 = (*state).clone();
    at_3.remove(&pod_ref("p2"));
    at_3.revision = 3;
    disk::write_snapshot(&image.path().join(FILE_NAME), &at_3).unwrap();
    let reopened = Store::open(image.path()).unwrap();
    assert_eq!(*reopened.snapshot(), *state);
    assert_eq!(
        log_lines(image.path()).len(),
        1,
        "what the snapshot holds is cut from the log"
    );
    assert_eq!(reopened.apply(&pod("p3", "10.0.0.4"), "pod.yaml").unwrap().revision, 5);
}

#[test]
fn a_store_written_before_the_log_opens_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // What the store wrote before it had a log: pretty JSON, format 1, no store.log.
    let old = r#"{
  "format": 1,
  "id": "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e03",
  "revision": 7,
  "objects": [
    {
      "kind": "Namespace",
      "name": "default",
      "labels": {},
      "annotations": {}
    },
    {
      "kind": "Pod",
      "namespace": "default",
      "name": "web",
      "uid": "5f0c9d7e-1a2b-4c3d-8e4f-a1b2c3d4e5f6",
      "labels": {},
      "annotations": {},
      "node": "n1",
      "service_account": "default",
      "ips": ["10.0.0.1"]
    }
  ]
}"#;
    fs::write(dir.path().join(FILE_NAME), old).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let state = store.snapshot();
    assert_eq!(
        (state.id.as_str(), state.revision),
        ("0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e03", 7)
    );
    assert_eq!(state.pods().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["web"]);
    assert!(
        apply_err(&store, &pod("other", "10.0.0.1")).contains("10.0.0.1 is already used by Pod default/web"),
        "its objects are indexed"
    );
    assert_eq!(store.apply(&pod("db", "10.0.0.2"), "pod.yaml").unwrap().revision, 8);
    assert_a_crash_now_loses_nothing(&store, dir.path());
}

#[test]
fn a_log_without_its_snapshot_is_set_aside_and_a_new_store_starts() {
    let ((_dir, store), image) = crashed_store_with_pods(2);
    let old_id = store.snapshot().id.clone();
    fs::remove_file(image.path().join(FILE_NAME)).unwrap();
    let log = fs::read(image.path().join(LOG_NAME)).unwrap();
    let fresh = Store::open(image.path()).unwrap();
    let state = fresh.snapshot();
    assert_ne!(state.id, old_id, "another store");
    assert_eq!((state.revision, state.objects().count()), (0, 0));
    assert_eq!(fs::read(image.path().join("store.log.orphaned")).unwrap(), log);
}

#[test]
fn a_uid_and_an_address_handed_over_in_one_apply_stay_taken_whatever_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let with_uid =
        |name: &str, uid: &str, ip: &str| pod(name, ip).replacen("  name:", &format!("  uid: {uid}\n  name:"), 1);
    store
        .apply(&format!("{NS}---\n{}", with_uid("a", UIDS[0], "10.0.0.1")), "f.yaml")
        .unwrap();
    // b takes a's uid and address before a lets them go, in the same apply.
    let handover = format!(
        "{}---\n{}",
        with_uid("b", UIDS[0], "10.0.0.1"),
        with_uid("a", UIDS[1], "10.0.0.2")
    );
    store.apply(&handover, "f.yaml").unwrap();
    let state = store.snapshot();
    assert_eq!(state.index, Index::of(state.objects.values()));
    assert_eq!(
        apply_err(&store, &with_uid("c", UIDS[0], "10.0.0.3")),
        format!(
            "f.yaml: document 1: Pod default/c: metadata.uid: {} is already used by Pod default/b",
            UIDS[0]
        )
    );
    assert_eq!(
        apply_err(&store, &pod("c", "10.0.0.1")),
        "f.yaml: document 1: Pod default/c: status.podIPs[0].ip: 10.0.0.1 is already used by Pod default/b"
    );
}

fn pod_ref(name: &str) -> ObjectRef {
    ObjectRef {
        kind: Kind::Pod,
        namespace: "default".into(),
        name: name.into(),
    }
}

fn apply_err(store: &Store, yaml: &str) -> String {
    store.apply(yaml, "f.yaml").expect_err("apply should fail").to_string()
}

// === properties ===

/// An object of a small world, where uids, addresses and namespace-wide policies often collide.
#[derive(Clone, Debug)]
enum Thing {
    Namespace(u8),
    Pod { ns: u8, name: u8, uid: u8, ip: u8 },
    Service { ns: u8, name: u8, vip: u8 },
    Peer { ns: u8, name: u8, wide: bool },
}

const UIDS: [&str; 3] = [
    "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e03",
    "5f0c9d7e-1a2b-4c3d-8e4f-a1b2c3d4e5f6",
    "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
];

impl Thing {
    fn yaml(&self) -> String {
        match self {
            Thing::Namespace(ns) => format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns{ns}\n"),
            Thing::Pod { ns, name, uid, ip } => format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p{name}\n  namespace: ns{ns}\n  uid: {}\nspec:\n  nodeName: n1\nstatus:\n  podIP: 10.0.0.{ip}\n",
                UIDS[usize::from(*uid)]
            ),
            Thing::Service { ns, name, vip } => format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: s{name}\n  namespace: ns{ns}\nspec:\n  clusterIP: 10.0.0.{vip}\n  ports:\n  - port: 80\n"
            ),
            Thing::Peer { ns, name, wide } => {
                let selector = if *wide {
                    ""
                } else {
                    "  selector:\n    matchLabels:\n      app: a\n"
                };
                format!(
                    "apiVersion: security.weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata:\n  name: pa{name}\n  namespace: ns{ns}\nspec:\n{selector}  mtls:\n    mode: STRICT\n"
                )
            }
        }
    }
}

fn thing() -> impl Strategy<Value = Thing> {
    prop_oneof![
        1 => (0u8..2).prop_map(Thing::Namespace),
        4 => (0u8..2, 0u8..3, 0u8..3, 1u8..5).prop_map(|(ns, name, uid, ip)| Thing::Pod { ns, name, uid, ip }),
        2 => (0u8..2, 0u8..2, 1u8..5).prop_map(|(ns, name, vip)| Thing::Service { ns, name, vip }),
        2 => (0u8..2, 0u8..2, any::<bool>()).prop_map(|(ns, name, wide)| Thing::Peer { ns, name, wide }),
    ]
}

/// Apply (`true`) or delete what a stream of things names.
fn op() -> impl Strategy<Value = (bool, Vec<Thing>)> {
    (prop::bool::weighted(0.75), prop::collection::vec(thing(), 1..5))
}

/// What the state's index must be, and that it holds no value twice.
fn check_index(state: &State) -> Result<(), TestCaseError> {
    let rebuilt = Index::of(state.objects.values());
    prop_assert_eq!(&state.index, &rebuilt);
    let uids = state.pods().count();
    let addresses =
        state.pods().map(|p| p.ips.len()).sum::<usize>() + state.services().map(|s| s.cluster_ips.len()).sum::<usize>();
    let wide = state.peer_authentications().filter(|p| p.is_namespace_wide()).count();
    prop_assert_eq!(
        (
            rebuilt.uids.len(),
            rebuilt.addresses.len(),
            rebuilt.namespace_wide.len()
        ),
        (uids, addresses, wide),
        "no value is held twice"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn indexes_follow_every_commit_and_a_reopened_store_equals_the_running_one(ops in prop::collection::vec(op(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        // Compacting whenever the log outgrows the snapshot: reopens see every mix of the two.
        let store = Store::open_with(dir.path(), 1).unwrap();
        let namespaces = [Thing::Namespace(0), Thing::Namespace(1)].iter().map(Thing::yaml).collect::<Vec<_>>();
        store.apply(&namespaces.join("---\n"), "ns.yaml").unwrap();
        for (apply, things) in &ops {
            let yaml = things.iter().map(Thing::yaml).collect::<Vec<_>>().join("---\n");
            let before = store.snapshot();
            let result = if *apply {
                store.apply(&yaml, "gen.yaml")
            } else {
                store.delete(&yaml, "gen.yaml", true)
            };
            let state = store.snapshot();
            match result {
                Ok(out) => prop_assert_eq!(out.revision, state.revision),
                Err(_) => prop_assert_eq!(&*state, &*before, "a refused request changes nothing"),
            }
            check_index(&state)?;
        }
        let image = crash_image(&store, dir.path());
        let reopened = Store::open(image.path()).unwrap();
        prop_assert_eq!(&*reopened.snapshot(), &*store.snapshot());
        prop_assert_eq!(&reopened.snapshot().index, &store.snapshot().index);
        let state = store.snapshot();
        drop(store);
        prop_assert_eq!(&*Store::open(dir.path()).unwrap().snapshot(), &*state);
    }
}
