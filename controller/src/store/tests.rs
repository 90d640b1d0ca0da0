use std::{collections::BTreeMap, fs, net::IpAddr};

use proptest::prelude::*;

use super::*;

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n";

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

fn pod(name: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: {name}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: x\nstatus:\n  podIP: {ip}\n"
    )
}

fn apply_err(store: &Store, yaml: &str) -> String {
    store
        .apply(yaml, "deploy.yaml")
        .expect_err("apply should fail")
        .to_string()
}

#[test]
fn apply_reports_created_configured_unchanged() {
    let (_dir, store) = store();
    let yaml = format!("{NS}---\n{}", pod("web", "node1", "10.0.0.1"));
    let out = store.apply(&yaml, "f").unwrap();
    assert_eq!(out.results, ["namespace default created", "pod default/web created"]);
    assert_eq!(out.revision, 1);
    let out = store.apply(&yaml, "f").unwrap();
    assert_eq!(
        out.results,
        ["namespace default unchanged", "pod default/web unchanged"]
    );
    assert_eq!(out.revision, 1, "nothing changed, no new revision");
    let out = store.apply(&pod("web", "node2", "10.0.0.1"), "f").unwrap();
    assert_eq!(out.results, ["pod default/web configured"]);
    assert_eq!(out.revision, 2);
}

#[test]
fn pod_without_uid_gets_one_and_keeps_it() {
    let (_dir, store) = store();
    store
        .apply(&format!("{NS}---\n{}", pod("web", "n1", "10.0.0.1")), "f")
        .unwrap();
    let uid = |s: &Store| s.snapshot().pods().next().unwrap().uid.clone();
    let first = uid(&store);
    assert_eq!(first.len(), 36, "{first}");
    store.apply(&pod("web", "n1", "10.0.0.1"), "f").unwrap();
    assert_eq!(uid(&store), first);
}

#[test]
fn validation_errors_name_document_object_and_field() {
    let (_dir, store) = store();
    store.apply(NS, "f").unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n",
            "deploy.yaml: document 1: Pod default/web: spec.nodeName: required",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  ports:\n  - port: 70000\n",
            "deploy.yaml: document 1: Service default/api: spec.ports[0].port: 70000 is not in 1-65535",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  ports:\n  - port: 53\n    protocol: UDP\n",
            "Service default/api: spec.ports[0].protocol: \"UDP\" is not supported (TCP only)",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  ports:\n  - port: 80\n    targetPort: http\n",
            "Service default/api: spec.ports[0].targetPort: \"http\": named ports are not supported",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  clusterIP: 10.96.0.300\n",
            "Service default/api: spec.clusterIP: \"10.96.0.300\" is not an IP address",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n",
            "deploy.yaml: document 1: kind: unknown kind \"Deployment\"",
        ),
        (
            "apiVersion: v2\nkind: Pod\nmetadata:\n  name: web\n",
            "deploy.yaml: document 1: Pod default/web: apiVersion: unknown apiVersion \"v2\" for Pod",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: Web_1\nspec:\n  nodeName: n1\n",
            "Pod default/Web_1: metadata.name: \"Web_1\" is not a DNS label",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  nodeName: n1\nstatus:\n  podIPs:\n  - ip: nope\n",
            "Pod default/web: status.podIPs[0].ip: \"nope\" is not an IP address",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  nodeName: n1\n",
            "Pod shop/web: metadata.namespace: namespace \"shop\" does not exist",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  nodeName: n1\n  serviceAccountName: 7\n",
            "Pod default/web: spec.serviceAccountName: invalid type: integer `7`, expected a string",
        ),
        (
            "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\nspec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"0\"]\n",
            "AuthorizationPolicy default/p: spec.rules[0].to[0].operation.ports[0]: \"0\" is not a port number",
        ),
        (
            "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\nspec:\n  actions: DENY\n",
            "AuthorizationPolicy default/p: spec.actions: unknown field `actions`",
        ),
        ("kind: Pod\n", "deploy.yaml: document 1: apiVersion: required"),
        (
            "- a\n- b\n",
            "deploy.yaml: document 1: expected an object with apiVersion and kind",
        ),
        ("a: [\n", "deploy.yaml: document 1: invalid YAML"),
    ];
    for (yaml, want) in cases {
        let got = apply_err(&store, yaml);
        assert!(got.contains(want), "\n got: {got}\nwant: {want}");
    }
}

#[test]
fn document_numbers_count_from_one_across_the_stream() {
    let (_dir, store) = store();
    let yaml = format!("{NS}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n");
    assert_eq!(
        apply_err(&store, &yaml),
        "deploy.yaml: document 2: Pod default/web: spec.nodeName: required"
    );
}

#[test]
fn duplicates_and_address_collisions_name_both_objects() {
    let (_dir, store) = store();
    let dup = format!(
        "{NS}---\n{}---\n{}",
        pod("web", "n1", "10.0.0.1"),
        pod("web", "n1", "10.0.0.2")
    );
    assert_eq!(
        apply_err(&store, &dup),
        "deploy.yaml: document 3: Pod default/web: duplicate of document 2"
    );
    let same_ip = format!(
        "{NS}---\n{}---\n{}",
        pod("a", "n1", "10.0.0.1"),
        pod("b", "n1", "10.0.0.1")
    );
    assert_eq!(
        apply_err(&store, &same_ip),
        "deploy.yaml: document 3: Pod default/b: status.podIPs[0].ip: 10.0.0.1 is already used by Pod default/a (document 2)"
    );
    store
        .apply(&format!("{NS}---\n{}", pod("a", "n1", "10.0.0.1")), "f")
        .unwrap();
    assert_eq!(
        apply_err(&store, &pod("b", "n1", "10.0.0.1")),
        "deploy.yaml: document 1: Pod default/b: status.podIPs[0].ip: 10.0.0.1 is already used by Pod default/a"
    );
    // A pod keeps its own address when re-applied.
    store.apply(&pod("a", "n2", "10.0.0.1"), "f").unwrap();
}

#[test]
fn one_bad_document_changes_nothing() {
    let (dir, store) = store();
    store.apply(NS, "f").unwrap();
    let before = store.snapshot();
    let yaml = format!(
        "{}---\n{}---\nkind: Nope\napiVersion: v1\n",
        pod("a", "n1", "10.0.0.1"),
        pod("b", "n1", "10.0.0.2")
    );
    let err = apply_err(&store, &yaml);
    assert!(err.contains("document 3"), "{err}");
    assert_eq!(*store.snapshot(), *before);
    assert_eq!(store.snapshot().revision, 1);
    let reopened = Store::open(dir.path()).unwrap();
    assert_eq!(*reopened.snapshot(), *before);
}

#[test]
fn delete_cascades_from_namespace_and_reports_every_object() {
    let (_dir, store) = store();
    let shop = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";
    let in_shop = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: cart\n  namespace: shop\n";
    store
        .apply(
            &format!("{NS}---\n{shop}---\n{in_shop}---\n{}", pod("web", "n1", "10.0.0.1")),
            "f",
        )
        .unwrap();
    let out = store.delete(shop, "f", false).unwrap();
    assert_eq!(
        out.results,
        ["namespace shop deleted", "serviceaccount shop/cart deleted"]
    );
    assert_eq!(store.snapshot().objects().count(), 2);
}

#[test]
fn delete_of_missing_object_fails_unless_ignored() {
    let (_dir, store) = store();
    store
        .apply(&format!("{NS}---\n{}", pod("web", "n1", "10.0.0.1")), "f")
        .unwrap();
    let yaml = format!("{}---\n{}", pod("web", "n1", "10.0.0.1"), pod("gone", "n1", "10.0.0.9"));
    let err = store.delete(&yaml, "rm.yaml", false).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }));
    assert_eq!(err.to_string(), "rm.yaml: document 2: Pod default/gone: not found");
    assert_eq!(store.snapshot().pods().count(), 1, "all or nothing");
    let out = store.delete(&yaml, "rm.yaml", true).unwrap();
    assert_eq!(out.results, ["pod default/web deleted"]);
    assert_eq!(out.revision, 2);
    let out = store.delete(&yaml, "rm.yaml", true).unwrap();
    assert!(out.results.is_empty());
    assert_eq!(out.revision, 2);
}

#[test]
fn delete_reads_only_kind_and_names() {
    let (_dir, store) = store();
    store
        .apply(&format!("{NS}---\n{}", pod("web", "n1", "10.0.0.1")), "f")
        .unwrap();
    let out = store
        .delete("apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n", "f", false)
        .unwrap();
    assert_eq!(out.results, ["pod default/web deleted"]);
}

#[test]
fn state_survives_reopen_with_the_same_revision() {
    let (dir, store) = store();
    let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  selector:\n    app: web\n  clusterIP: 10.96.0.10\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n";
    store
        .apply(&format!("{NS}---\n{}---\n{svc}", pod("web", "n1", "10.0.0.1")), "f")
        .unwrap();
    store
        .delete(NS.replace("default", "other").as_str(), "f", true)
        .unwrap();
    let reopened = Store::open(dir.path()).unwrap();
    assert_eq!(*reopened.snapshot(), *store.snapshot());
    assert_eq!(reopened.snapshot().revision, 1);
    assert!(!dir.path().join("store.json.tmp").exists());
}

#[test]
fn corrupt_store_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(FILE_NAME), "{not json").unwrap();
    let err = Store::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("store.json is corrupt"), "{err}");
}

#[test]
fn get_filters_by_kind_and_namespace_and_renders_appliable_yaml() {
    let (_dir, store) = store();
    let shop = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  annotations:\n    weft.dev/dataplane-mode: ambient\n";
    let policy = "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [default]\n";
    store
        .apply(
            &format!("{NS}---\n{shop}---\n{policy}---\n{}", pod("web", "n1", "10.0.0.1")),
            "f",
        )
        .unwrap();
    let pods = store.get(Some("pods"), None).unwrap();
    assert!(
        pods.contains("kind: Pod") && pods.contains("nodeName: n1") && !pods.contains("Namespace"),
        "{pods}"
    );
    let shop_only = store.get(None, Some("shop")).unwrap();
    assert!(
        shop_only.contains("name: shop") && shop_only.contains("AuthorizationPolicy"),
        "{shop_only}"
    );
    assert!(!shop_only.contains("kind: Pod"), "{shop_only}");
    assert!(matches!(
        store.get(Some("deployment"), None),
        Err(Error::UnknownKind { .. })
    ));

    let (_dir2, other) = self::store();
    other.apply(&store.get(None, None).unwrap(), "get").unwrap();
    assert_eq!(other.snapshot().objects, store.snapshot().objects);
}

// === properties ===

fn label() -> impl Strategy<Value = String> {
    "[a-z]([a-z0-9-]{0,10}[a-z0-9])?"
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(label(), label(), 0..3)
}

prop_compose! {
    fn arb_pod(index: u8)(name in label(), node in label(), sa in label(), labels in labels(), v6 in any::<bool>()) -> Pod {
        let mut ips: Vec<IpAddr> = vec![format!("10.1.0.{index}").parse().unwrap()];
        if v6 {
            ips.push(format!("fd00::{index}").parse().unwrap());
        }
        Pod {
            namespace: "default".into(),
            name: format!("{name}-{index}"),
            uid: format!("{index:08x}-0000-4000-8000-000000000000"),
            meta: objects::Meta { labels, annotations: BTreeMap::new() },
            node,
            service_account: sa,
            ips,
        }
    }
}

prop_compose! {
    fn arb_service()(name in label(), selector in proptest::option::of(labels()), ports in proptest::collection::btree_set(1u16..=65535, 0..4), vip in proptest::option::of(1u8..=254)) -> Service {
        Service {
            namespace: "default".into(),
            name,
            meta: objects::Meta::default(),
            selector,
            cluster_ips: vip.map(|v| format!("10.96.0.{v}").parse().unwrap()).into_iter().collect(),
            ports: ports.into_iter().map(|p| objects::ServicePort { name: String::new(), port: p, target_port: p.wrapping_add(1).max(1) }).collect(),
        }
    }
}

/// Documents with one defect each, and the field the refusal must name (`None`: the document as a whole).
const BROKEN: &[(&str, Option<&str>)] = &[
    ("apiVersion: v1\nkind: Pdo\nmetadata:\n  name: x\n", Some("kind")),
    ("apiVersion: v1\nmetadata:\n  name: x\n", Some("kind")),
    ("apiVersion: v2\nkind: Pod\nmetadata:\n  name: x\n", Some("apiVersion")),
    ("kind: Namespace\nmetadata:\n  name: x\n", Some("apiVersion")),
    (
        "apiVersion: 1\nkind: Namespace\nmetadata:\n  name: x\n",
        Some("apiVersion"),
    ),
    ("- apiVersion: v1\n- kind: Namespace\n", None),
    ("just text\n", None),
    (
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: Not_A_Label\n",
        Some("metadata.name"),
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: b\n  uid: ../x\nspec:\n  nodeName: n1\nstatus:\n  podIP: 10.1.0.1\n",
        Some("metadata.uid"),
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: b\nspec:\n  nodeName: n1\n  serviceAccountName: Web\nstatus:\n  podIP: 10.1.0.1\n",
        Some("spec.serviceAccountName"),
    ),
];

/// One document of a stream.
#[derive(Clone, Debug)]
enum Piece {
    Namespace(u8),
    Pod(u8),
    /// Nothing but a comment, or nothing at all.
    Empty(bool),
    /// `BROKEN[i]`.
    Broken(usize),
}

impl Piece {
    fn text(&self) -> String {
        match self {
            Piece::Namespace(i) => format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns{i}\n"),
            Piece::Pod(i) => pod(&format!("p{i}"), "n1", &format!("10.0.0.{i}")),
            Piece::Empty(comment) => {
                if *comment {
                    "# nothing here\n".into()
                } else {
                    String::new()
                }
            }
            Piece::Broken(i) => BROKEN[*i].0.to_owned(),
        }
    }

    /// The object's name, for documents that hold one.
    fn name(&self) -> Option<String> {
        match self {
            Piece::Namespace(0) => Some("default".into()),
            Piece::Namespace(i) => Some(format!("ns{i}")),
            Piece::Pod(i) => Some(format!("p{i}")),
            Piece::Empty(_) | Piece::Broken(_) => None,
        }
    }
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        3 => (1u8..).prop_map(Piece::Namespace),
        3 => any::<u8>().prop_map(Piece::Pod),
        1 => any::<bool>().prop_map(Piece::Empty),
        2 => (0..BROKEN.len()).prop_map(Piece::Broken),
    ]
}

proptest! {
    #[test]
    fn a_stream_is_refused_at_its_first_broken_document_naming_the_field(pieces in prop::collection::vec(piece(), 0..8)) {
        // The first document is always the namespace: the stream starts with a document, not a separator.
        let texts: Vec<String> = std::iter::once(NS.to_owned()).chain(pieces.iter().map(Piece::text)).collect();
        let yaml = texts.join("---\n");
        let first_broken = pieces.iter().position(|p| matches!(p, Piece::Broken(_))).map(|i| (i + 2, &pieces[i]));
        match (manifest::parse(&yaml, "f"), first_broken) {
            (Ok(docs), None) => {
                // Every valid document, at its position; empty ones counted but skipped.
                let want: Vec<(usize, String)> = std::iter::once(&Piece::Namespace(0))
                    .chain(&pieces)
                    .enumerate()
                    .filter_map(|(i, p)| p.name().map(|n| (i + 1, n)))
                    .collect();
                let got: Vec<(usize, String)> = docs.iter().map(|d| (d.index, d.item.object_ref().name.clone())).collect();
                prop_assert_eq!(&got, &want, "{}", yaml);
                let refs: Vec<(usize, String)> = manifest::parse_refs(&yaml, "f").unwrap().into_iter().map(|d| (d.index, d.item.name)).collect();
                prop_assert_eq!(&refs, &want);
            }
            (Err(e), Some((index, Piece::Broken(b)))) => {
                prop_assert_eq!(e.document, Some(index), "{}\n{}", e, yaml);
                prop_assert_eq!(e.field.as_deref(), BROKEN[*b].1, "{}\n{}", e, yaml);
            }
            (got, want) => prop_assert!(false, "{:?}, want {:?}\n{}", got, want, yaml),
        }
    }

    #[test]
    fn valid_objects_round_trip_through_apply_and_get(
        pods in proptest::collection::vec((0u8..200).prop_flat_map(arb_pod), 0..5),
        service in proptest::option::of(arb_service()),
    ) {
        let mut objects = vec![Object::Namespace(objects::Namespace { name: "default".into(), meta: objects::Meta::default() })];
        let mut seen = BTreeSet::new();
        for p in pods {
            if seen.insert(p.name.clone()) && p.ips.iter().all(|ip| seen.insert(ip.to_string())) {
                objects.push(Object::Pod(p));
            }
        }
        objects.extend(service.map(Object::Service));
        let yaml = manifest::render(&objects).unwrap();
        let (_dir, store) = store();
        let out = store.apply(&yaml, "gen").map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        prop_assert!(out.results.iter().all(|l| l.ends_with(" created")));
        let stored: Vec<Object> = store.snapshot().objects().cloned().collect();
        let mut want = objects.clone();
        want.sort_by_key(Object::object_ref);
        prop_assert_eq!(&stored, &want);
        let again = store.apply(&store.get(None, None).unwrap(), "get").unwrap();
        prop_assert!(again.results.iter().all(|l| l.ends_with(" unchanged")), "{:?}", again.results);
    }
}

// === what a node must never be handed ===

fn pod_with_uid(name: &str, uid: &str, ip: &str) -> String {
    pod(name, "n1", ip).replacen("  labels:", &format!("  uid: {uid:?}\n  labels:"), 1)
}

const UID_A: &str = "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e03";
const UID_B: &str = "5f0c9d7e-1a2b-4c3d-8e4f-a1b2c3d4e5f6";

#[test]
fn pod_uid_that_is_not_a_uuid_is_rejected() {
    let (_dir, store) = store();
    store.apply(NS, "f").unwrap();
    for bad in [
        "../x",
        "a/b",
        ".",
        "..",
        "u1",
        "0B5E1C2A-7D3F-4A61-9C8E-2F4B6D8A1E03",
        "0b5e1c2a7d3f4a619c8e2f4b6d8a1e03",
        "{0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e03}",
        "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e0/",
        "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e033",
    ] {
        let err = apply_err(&store, &pod_with_uid("web", bad, "10.0.0.1"));
        assert_eq!(
            err,
            format!(
                "deploy.yaml: document 1: Pod default/web: metadata.uid: {bad:?} is not a UID (8-4-4-4-12 lowercase hex)"
            )
        );
    }
    assert_eq!(store.snapshot().pods().count(), 0);
    store.apply(&pod_with_uid("web", UID_A, "10.0.0.1"), "f").unwrap();
    assert_eq!(store.snapshot().pods().next().unwrap().uid, UID_A);
}

#[test]
fn duplicate_pod_uid_is_rejected_naming_both_pods() {
    let (_dir, store) = store();
    let both = format!(
        "{NS}---\n{}---\n{}",
        pod_with_uid("a", UID_A, "10.0.0.1"),
        pod_with_uid("b", UID_A, "10.0.0.2")
    );
    assert_eq!(
        apply_err(&store, &both),
        format!(
            "deploy.yaml: document 3: Pod default/b: metadata.uid: {UID_A} is already used by Pod default/a (document 2)"
        )
    );
    assert_eq!(store.snapshot().revision, 0, "nothing applied");
    store
        .apply(&format!("{NS}---\n{}", pod_with_uid("a", UID_A, "10.0.0.1")), "f")
        .unwrap();
    assert_eq!(
        apply_err(&store, &pod_with_uid("b", UID_A, "10.0.0.2")),
        format!("deploy.yaml: document 1: Pod default/b: metadata.uid: {UID_A} is already used by Pod default/a")
    );
    // A pod keeps its own uid when re-applied, and may hand it over to another in the same apply.
    store.apply(&pod_with_uid("a", UID_A, "10.0.0.1"), "f").unwrap();
    store.apply(&pod("a", "n2", "10.0.0.1"), "f").unwrap();
    assert_eq!(store.snapshot().pods().next().unwrap().uid, UID_A);
    store
        .apply(
            &format!(
                "{}---\n{}",
                pod_with_uid("a", UID_B, "10.0.0.1"),
                pod_with_uid("b", UID_A, "10.0.0.2")
            ),
            "f",
        )
        .unwrap();
}

fn service_with_vip(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  selector:\n    app: web\n  clusterIP: {vip}\n  ports:\n  - port: 80\n"
    )
}

#[test]
fn service_vip_equal_to_a_pod_ip_is_rejected() {
    let (_dir, store) = store();
    let both = format!(
        "{NS}---\n{}---\n{}",
        pod("web", "n1", "10.0.0.1"),
        service_with_vip("api", "10.0.0.1")
    );
    assert_eq!(
        apply_err(&store, &both),
        "deploy.yaml: document 3: Service default/api: spec.clusterIPs[0]: 10.0.0.1 is already used by Pod default/web (document 2)"
    );
    store
        .apply(&format!("{NS}---\n{}", pod("web", "n1", "10.0.0.1")), "f")
        .unwrap();
    assert_eq!(
        apply_err(&store, &service_with_vip("api", "10.0.0.1")),
        "deploy.yaml: document 1: Service default/api: spec.clusterIPs[0]: 10.0.0.1 is already used by Pod default/web"
    );
    store.apply(&service_with_vip("api", "10.96.0.1"), "f").unwrap();
    assert_eq!(
        apply_err(&store, &pod("db", "n1", "10.96.0.1")),
        "deploy.yaml: document 1: Pod default/db: status.podIPs[0].ip: 10.96.0.1 is already used by Service default/api"
    );
    // A service keeps its own VIP when re-applied.
    store.apply(&service_with_vip("api", "10.96.0.1"), "f").unwrap();
}

#[test]
fn two_services_with_one_vip_are_rejected() {
    let (_dir, store) = store();
    store
        .apply(&format!("{NS}---\n{}", service_with_vip("api", "10.96.0.1")), "f")
        .unwrap();
    assert_eq!(
        apply_err(&store, &service_with_vip("web", "10.96.0.1")),
        "deploy.yaml: document 1: Service default/web: spec.clusterIPs[0]: 10.96.0.1 is already used by Service default/api"
    );
}

#[test]
fn dataplane_mode_annotation_must_be_ambient_or_none() {
    let (_dir, store) = store();
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  annotations:\n    weft.dev/dataplane-mode: bogus\n";
    assert_eq!(
        apply_err(&store, ns),
        "deploy.yaml: document 1: Namespace shop: metadata.annotations[\"weft.dev/dataplane-mode\"]: \"bogus\" is not a dataplane mode (allowed: \"ambient\", \"none\")"
    );
    store.apply(NS, "f").unwrap();
    let pod = pod("web", "n1", "10.0.0.1").replacen(
        "  labels:",
        "  annotations:\n    weft.dev/dataplane-mode: Ambient\n  labels:",
        1,
    );
    assert_eq!(
        apply_err(&store, &pod),
        "deploy.yaml: document 1: Pod default/web: metadata.annotations[\"weft.dev/dataplane-mode\"]: \"Ambient\" is not a dataplane mode (allowed: \"ambient\", \"none\")"
    );
    for ok in ["ambient", "none"] {
        store
            .apply(&ns.replace("bogus", ok), "f")
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn a_store_keeps_its_identity_across_restarts_and_a_new_store_gets_another() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path()).unwrap().snapshot().id.clone();
    assert_eq!(first.len(), 36, "a UUID: {first:?}");
    assert_eq!(
        Store::open(dir.path()).unwrap().snapshot().id,
        first,
        "persisted at creation, before any apply"
    );
    let lost = tempfile::tempdir().unwrap();
    assert_ne!(
        Store::open(lost.path()).unwrap().snapshot().id,
        first,
        "a store started over"
    );
}

#[test]
fn a_successor_state_shares_what_did_not_change_and_differs_by_the_change() {
    let (_dir, s) = store();
    s.apply(
        &format!(
            "{NS}---\n{}---\n{}",
            pod("a", "n1", "10.1.0.1"),
            pod("b", "n1", "10.1.0.2")
        ),
        "x.yaml",
    )
    .unwrap();
    let before = s.snapshot();
    let shared: Vec<Arc<Object>> = before.objects.values().cloned().collect();
    // The same objects (the same Arcs): nothing differs.
    let same = before.succeeded_by("other-id".into(), 9, shared.clone());
    assert_eq!((same.id.as_str(), same.revision), ("other-id", 9));
    assert_eq!(before.changes(&same).count(), 0);
    // Equal but fresh copies are kept as they were, too.
    let copies = before.succeeded_by(before.id.clone(), 9, shared.iter().map(|o| Arc::new((**o).clone())));
    assert_eq!(before.changes(&copies).count(), 0);
    // One relabelled, one gone, one new: exactly those differ, and the index follows.
    let mut next: Vec<Arc<Object>> = shared
        .iter()
        .filter(|o| o.object_ref().name != "b")
        .map(|o| match &**o {
            Object::Pod(p) if p.name == "a" => {
                let mut p = p.clone();
                p.meta.labels.insert("version".into(), "v2".into());
                Arc::new(Object::Pod(p))
            }
            _ => o.clone(),
        })
        .collect();
    let (_other, c) = store();
    c.apply(&format!("{NS}---\n{}", pod("c", "n2", "10.1.0.2")), "y.yaml")
        .unwrap();
    next.extend(
        c.snapshot()
            .objects
            .values()
            .filter(|o| o.object_ref().name == "c")
            .cloned(),
    );
    let after = before.succeeded_by(before.id.clone(), 10, next);
    let changed: Vec<String> = before
        .changes(&after)
        .map(|(old, new)| new.or(old).unwrap().object_ref().to_string())
        .collect();
    assert_eq!(changed, ["Pod default/a", "Pod default/b", "Pod default/c"]);
    assert_eq!(after, State::new(after.id.clone(), 10, after.objects().cloned()));
}
