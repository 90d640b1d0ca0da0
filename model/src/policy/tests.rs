mod istio;

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const ROOT: &str = DEFAULT_ROOT_NAMESPACE;
const CLIENT_A: &str = "spiffe://cluster.local/ns/a/sa/web";
const CLIENT_B: &str = "spiffe://cluster.local/ns/b/sa/web";

/// A policy of `shop` from its spec in JSON (which is YAML too).
fn parse(name: &str, spec: &str) -> AuthorizationPolicy {
    AuthorizationPolicy {
        metadata: Metadata {
            name: name.into(),
            namespace: "shop".into(),
        },
        spec: serde_json::from_str(spec).unwrap(),
    }
}

fn compiled(name: &str, spec: &str) -> Compiled {
    parse(name, spec).compile(Scope::Namespace).unwrap()
}

fn conn(principal: Option<&str>) -> Connection<'_> {
    Connection {
        source_principal: principal,
        source_ip: "10.244.1.11".parse().unwrap(),
        destination_ip: "10.244.2.20".parse().unwrap(),
        destination_port: 8080,
    }
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_owned(), "cart".to_owned())])
}

fn target(labels: &BTreeMap<String, String>) -> Target<'_> {
    Target {
        namespace: "shop",
        labels,
    }
}

// === validation ===

#[test]
fn validation_names_the_object_and_field() {
    let p = parse(
        "bad",
        r#"{"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8", "10.0.0.0/33"]}}]}]}"#,
    );
    let e = p.validate().unwrap_err();
    assert_eq!(e.field, "spec.rules[0].from[0].source.ipBlocks[1]");
    assert!(
        e.to_string()
            .starts_with("AuthorizationPolicy shop/bad: spec.rules[0].from[0].source.ipBlocks[1]: "),
        "{e}"
    );
    let p = parse(
        "bad",
        r#"{"rules": [{}, {"to": [{"operation": {"ports": ["http"]}}]}]}"#,
    );
    let e = p.validate().unwrap_err();
    assert_eq!(e.field, "spec.rules[1].to[0].operation.ports[0]");
    assert_eq!(e.problem, "\"http\" is not a port number (1-65535)");
    let mut p = parse("bad", "{}");
    p.metadata.name = "Not_A_Name".into();
    assert_eq!(p.validate().unwrap_err().field, "metadata.name");
}

#[test]
fn parsing_refuses_unknown_fields_and_empty_from_or_to() {
    let err = serde_json::from_str::<Spec>(r#"{"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `principal`"), "{err}");
    for spec in [r#"{"rules": [{"from": []}]}"#, r#"{"rules": [{"to": []}]}"#] {
        let err = serde_json::from_str::<Spec>(spec).unwrap_err().to_string();
        assert!(err.contains("must not be empty"), "{spec}: {err}");
    }
}

#[test]
fn a_relative_service_account_is_in_the_policy_s_namespace() {
    let p = compiled(
        "p",
        r#"{"rules": [{"from": [{"source": {"serviceAccounts": ["web"]}}]}]}"#,
    );
    let in_shop = "spiffe://cluster.local/ns/shop/sa/web";
    assert!(p.matches(&conn(Some(in_shop))));
    assert!(!p.matches(&conn(Some(CLIENT_A))), "a/web is another account");
    assert!(!p.matches(&conn(None)));
}

#[test]
fn a_principal_may_be_written_with_its_spiffe_scheme() {
    // Weft's leniency: Istio would compare "spiffe://spiffe://..." and never match.
    let p = compiled(
        "p",
        r#"{"rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/a/sa/web"]}}]}]}"#,
    );
    assert!(p.matches(&conn(Some(CLIENT_A))));
    assert!(!p.matches(&conn(Some(CLIENT_B))));
}

#[test]
fn an_identity_that_is_not_spiffe_counts_as_none() {
    let p = compiled("p", r#"{"rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}"#);
    assert!(p.matches(&conn(Some("cluster.local/ns/a/sa/web"))));
    assert!(!p.matches(&conn(Some(CLIENT_A))));
}

#[test]
fn compiled_policy_reports_its_name_scope_and_action() {
    let p = parse("audit", r#"{"action": "AUDIT", "rules": [{}]}"#);
    let c = p.compile(Scope::of("shop", ROOT)).unwrap();
    assert_eq!(
        (c.name(), c.namespace(), c.scope(), c.action()),
        ("shop/audit", "shop", Scope::Namespace, Action::Audit)
    );
    let mut root = p;
    root.metadata.namespace = ROOT.into();
    assert_eq!(root.compile(Scope::of(ROOT, ROOT)).unwrap().scope(), Scope::Mesh);
}

#[test]
fn decision_helpers() {
    assert!(Decision::ALLOW.is_allowed());
    assert_eq!(Decision::ALLOW.audit(), None);
    let audited = Decision::Allow {
        audit: Some("shop/a".into()),
    };
    assert_eq!(audited.audit(), Some("shop/a"));
    assert!(!Decision::Deny { policy: None }.is_allowed());
}

#[test]
fn serialization_leaves_out_what_was_not_written() {
    let spec = r#"{"selector":{"matchLabels":{"app":"cart"}},"action":"DENY","rules":[{"from":[{"source":{"notPrincipals":["*"]}}],"to":[{"operation":{"ports":["8080"]}}]}]}"#;
    let parsed: Spec = serde_json::from_str(spec).unwrap();
    assert_eq!(serde_json::to_string(&parsed).unwrap(), spec);
}

// === properties ===

fn pick(values: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(prop::sample::select(values), 0..3).prop_map(|v| v.into_iter().map(String::from).collect())
}

const PRINCIPALS: &[&str] = &["cluster.local/ns/a/sa/web", "cluster.local/ns/a/*", "*/sa/web", "*"];
const NAMESPACES: &[&str] = &["a", "b", "*", "a*", "*b"];
const BLOCKS: &[&str] = &[
    "10.244.1.0/24",
    "10.0.0.0/8",
    "::ffff:10.244.1.0/120",
    "fd00::/8",
    "10.244.1.11",
];
const PORTS: &[&str] = &["8080", "9090"];

fn arb_source() -> impl Strategy<Value = Source> {
    (
        (pick(PRINCIPALS), pick(PRINCIPALS)),
        (pick(NAMESPACES), pick(NAMESPACES)),
        (pick(BLOCKS), pick(BLOCKS)),
    )
        .prop_map(
            |((principals, not_principals), (namespaces, not_namespaces), (ip_blocks, not_ip_blocks))| Source {
                principals,
                not_principals,
                namespaces,
                not_namespaces,
                ip_blocks,
                not_ip_blocks,
                ..Source::default()
            },
        )
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(arb_source().prop_map(|source| From { source }), 0..3),
        prop::collection::vec(
            (pick(PORTS), pick(PORTS)).prop_map(|(ports, not_ports)| To {
                operation: Operation {
                    ports,
                    not_ports,
                    ..Operation::default()
                },
            }),
            0..2,
        ),
        prop::collection::vec(
            (
                prop::sample::select(&["source.ip", "destination.ip"][..]),
                pick(BLOCKS),
                pick(BLOCKS),
            )
                .prop_map(|(key, values, not_values)| Condition {
                    key: key.into(),
                    values,
                    not_values,
                }),
            0..2,
        ),
    )
        .prop_map(|(from, to, when)| Rule { from, to, when })
}

fn arb_action() -> impl Strategy<Value = Action> {
    prop::sample::select(&[Action::Allow, Action::Deny, Action::Audit][..])
}

/// Policies of `shop` that compile (most do; the rest, such as an empty source, are dropped).
fn arb_policy() -> impl Strategy<Value = AuthorizationPolicy> {
    (arb_action(), prop::collection::vec(arb_rule(), 0..3), any::<bool>()).prop_map(|(action, rules, selected)| {
        let mut p = parse("p", "{}");
        p.spec.action = action;
        p.spec.rules = rules;
        if selected {
            p.spec.selector = Some(Selector {
                match_labels: BTreeMap::from([("app".into(), "cart".into())]),
            });
        }
        p
    })
}

fn compile_all(ps: &[AuthorizationPolicy]) -> Vec<Compiled> {
    ps.iter().filter_map(|p| p.compile(Scope::Namespace).ok()).collect()
}

fn arb_conn() -> impl Strategy<Value = (Option<&'static str>, &'static str, &'static str, u16)> {
    (
        prop::option::of(prop::sample::select(&[CLIENT_A, CLIENT_B][..])),
        prop::sample::select(&["10.244.1.11", "::ffff:10.244.1.11", "10.9.9.9", "fd00::1"][..]),
        prop::sample::select(&["10.244.2.20", "fd00::20"][..]),
        prop::sample::select(&[8080u16, 9090][..]),
    )
}

fn make_conn(
    (principal, src, dst, port): (Option<&'static str>, &'static str, &'static str, u16),
) -> Connection<'static> {
    Connection {
        source_principal: principal,
        source_ip: src.parse().unwrap(),
        destination_ip: dst.parse().unwrap(),
        destination_port: port,
    }
}

proptest! {
    #[test]
    fn validation_never_panics(p in arb_policy(), junk in prop::collection::vec(".{0,16}", 0..4), name in ".{0,70}") {
        let mut p = p;
        p.metadata.name = name;
        let _ = p.validate();
        // Arbitrary strings in every kind of field.
        for field in 0..6 {
            let mut q = parse("q", r#"{"rules": [{"from": [{"source": {"principals": ["*"]}}]}]}"#);
            let source = &mut q.spec.rules[0].from[0].source;
            match field {
                0 => source.principals = junk.clone(),
                1 => source.namespaces = junk.clone(),
                2 => source.ip_blocks = junk.clone(),
                3 => source.service_accounts = junk.clone(),
                4 => q.spec.rules[0].when = vec![Condition { key: junk.first().cloned().unwrap_or_default(), values: junk.clone(), not_values: vec![] }],
                _ => q.spec.rules[0].to = vec![To { operation: Operation { not_ports: junk.clone(), ..Operation::default() } }],
            }
            let _ = q.validate();
        }
    }

    #[test]
    fn a_matching_deny_always_wins(ps in prop::collection::vec(arb_policy(), 0..4), c in arb_conn()) {
        let mut ps = compile_all(&ps);
        ps.push(compiled("deny-all", r#"{"action": "DENY", "rules": [{}]}"#));
        let l = labels();
        let d = decide(&ps, target(&l), &make_conn(c));
        prop_assert!(matches!(d, Decision::Deny { policy: Some(_) }), "{:?}", d);
    }

    #[test]
    fn an_allow_policy_never_widens_access_beyond_what_it_matches(ps in prop::collection::vec(arb_policy(), 0..4), extra in arb_policy(), c in arb_conn()) {
        let l = labels();
        let c = make_conn(c);
        let ps = compile_all(&ps);
        let before = decide(&ps, target(&l), &c);
        let mut extra = extra;
        extra.spec.action = Action::Allow;
        let Ok(extra) = extra.compile(Scope::Namespace) else { return Ok(()) };
        let mut with = ps.clone();
        with.push(extra.clone());
        let after = decide(&with, target(&l), &c);
        if after.is_allowed() && !before.is_allowed() {
            prop_assert!(extra.matches(&c));
        }
    }

    #[test]
    fn audit_policies_never_change_the_decision(ps in prop::collection::vec(arb_policy(), 0..4), audits in prop::collection::vec(arb_policy(), 0..3), c in arb_conn()) {
        let l = labels();
        let c = make_conn(c);
        let ps = compile_all(&ps);
        let mut audits = audits;
        for a in &mut audits {
            a.spec.action = Action::Audit;
        }
        let mut with = ps.clone();
        with.extend(compile_all(&audits));
        let (before, after) = (decide(&ps, target(&l), &c), decide(&with, target(&l), &c));
        match (&before, &after) {
            (Decision::Allow { .. }, Decision::Allow { audit }) => {
                let matched = with.iter().any(|p| p.action() == Action::Audit && p.applies_to(target(&l)) && p.matches(&c));
                prop_assert_eq!(audit.is_some(), matched);
            }
            _ => prop_assert_eq!(before, after),
        }
    }

    #[test]
    fn a_root_namespace_policy_acts_in_every_namespace_as_if_it_were_there(p in arb_policy(), c in arb_conn(), ns in prop::sample::select(&["shop", "legacy", ROOT][..])) {
        let c = make_conn(c);
        let l = labels();
        let t = Target { namespace: ns, labels: &l };
        let mut here = p.clone();
        here.metadata.namespace = ns.into();
        let mut root = p;
        root.metadata.namespace = ROOT.into();
        let (Ok(here), Ok(root)) = (here.compile(Scope::Namespace), root.compile(Scope::of(ROOT, ROOT))) else { return Ok(()) };
        prop_assert_eq!(decide([&here], t, &c).is_allowed(), decide([&root], t, &c).is_allowed());
        prop_assert_eq!(decide([&here], t, &c).audit().is_some(), decide([&root], t, &c).audit().is_some());
    }

    #[test]
    fn a_not_field_matches_exactly_when_its_field_does_not(
        field in 0usize..5,
        principals in pick(PRINCIPALS), namespaces in pick(NAMESPACES), blocks in pick(BLOCKS), ports in pick(PORTS),
        c in arb_conn(),
    ) {
        let c = make_conn(c);
        let (mut yes, mut no) = (Rule::default(), Rule::default());
        let source = |f: &dyn Fn(&mut Source)| { let mut s = Source::default(); f(&mut s); vec![From { source: s }] };
        let empty = match field {
            0 => { yes.from = source(&|s| s.principals = principals.clone()); no.from = source(&|s| s.not_principals = principals.clone()); principals.is_empty() }
            1 => { yes.from = source(&|s| s.namespaces = namespaces.clone()); no.from = source(&|s| s.not_namespaces = namespaces.clone()); namespaces.is_empty() }
            2 => { yes.from = source(&|s| s.ip_blocks = blocks.clone()); no.from = source(&|s| s.not_ip_blocks = blocks.clone()); blocks.is_empty() }
            3 => {
                yes.to = vec![To { operation: Operation { ports: ports.clone(), ..Operation::default() } }];
                no.to = vec![To { operation: Operation { not_ports: ports.clone(), ..Operation::default() } }];
                ports.is_empty()
            }
            _ => {
                yes.when = vec![Condition { key: "destination.ip".into(), values: blocks.clone(), not_values: vec![] }];
                no.when = vec![Condition { key: "destination.ip".into(), values: vec![], not_values: blocks.clone() }];
                blocks.is_empty()
            }
        };
        prop_assume!(!empty);
        let mut p = parse("p", "{}");
        p.spec.rules = vec![yes];
        let yes = p.compile(Scope::Namespace).unwrap();
        p.spec.rules = vec![no];
        let no = p.compile(Scope::Namespace).unwrap();
        prop_assert_ne!(yes.matches(&c), no.matches(&c));
    }

    #[test]
    fn ipv4_cidr_membership_matches_arithmetic(a in any::<u32>(), ip in any::<u32>(), prefix in 0u8..=32) {
        let (net, addr) = (std::net::Ipv4Addr::from(a), std::net::Ipv4Addr::from(ip));
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
        let want = a & mask == ip & mask;
        // The same block and address, each written as IPv4 or as IPv4-mapped IPv6.
        let blocks = [format!("{net}/{prefix}"), format!("{}/{}", net.to_ipv6_mapped(), u32::from(prefix) + 96)];
        for block in &blocks {
            let cidr = Cidr::parse(block).unwrap();
            prop_assert_eq!(cidr.contains(IpAddr::V4(addr)), want, "{} {}", block, addr);
            prop_assert_eq!(cidr.contains(IpAddr::V6(addr.to_ipv6_mapped())), want, "{} {}", block, addr);
        }
    }
}
