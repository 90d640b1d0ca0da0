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
fn ports_and_prefix_lengths_are_plain_decimal() {
    for (spec, field) in [
        (
            r#"{"rules": [{"to": [{"operation": {"ports": ["+80"]}}]}]}"#,
            "spec.rules[0].to[0].operation.ports[0]",
        ),
        (
            r#"{"rules": [{"when": [{"key": "source.ip", "values": ["10.0.0.0/+8"]}]}]}"#,
            "spec.rules[0].when[0].values[0]",
        ),
    ] {
        assert_eq!(parse("p", spec).validate().unwrap_err().field, field, "{spec}");
    }
    let leading_zeros = r#"{"rules": [{"to": [{"operation": {"ports": ["080"]}}], "when": [{"key": "source.ip", "values": ["10.0.0.0/08"]}]}]}"#;
    assert!(parse("p", leading_zeros).validate().is_ok());
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

/// The kinds of value a policy holds.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Principal,
    Namespace,
    IpBlock,
    ServiceAccount,
    Port,
}

/// Whether Istio takes `v` as a value of `kind`, written from its reference and docs/policy.md, not
/// from compile.rs: a principal or namespace is exact, `prefix*`, `*suffix` or `*` (a principal may
/// start with `spiffe://`, a namespace is a DNS label, its pattern of a-z, 0-9, '-'); an IP block is an
/// address or `address/length` with a decimal length up to the family's bits, an IPv4-mapped block
/// no shorter than /96; a service account is `name` or `namespace/name` (namespace a DNS label, name
/// a DNS subdomain); a port is decimal 1-65535.
fn valid_value(kind: Kind, v: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let decimal = |s: &str, max: u32| {
        digits(s) && s.trim_start_matches('0').len() <= 5 && s.parse::<u32>().is_ok_and(|n| n <= max)
    };
    let wildcard =
        |v: &str, literal_ok: &dyn Fn(&str) -> bool, exact_ok: &dyn Fn(&str) -> bool| match v.matches('*').count() {
            0 => exact_ok(v),
            1 if v == "*" => true,
            1 if v.starts_with('*') => literal_ok(&v[1..]),
            1 if v.ends_with('*') => literal_ok(&v[..v.len() - 1]),
            _ => false,
        };
    let subdomain = |s: &str| s.len() <= 253 && s.split('.').all(is_dns_label_by_hand);
    match kind {
        Kind::Principal => {
            let v = v.strip_prefix("spiffe://").unwrap_or(v);
            wildcard(v, &|_| true, &|s| !s.is_empty())
        }
        Kind::Namespace => wildcard(
            v,
            &|s| {
                s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            },
            &is_dns_label_by_hand,
        ),
        Kind::IpBlock => {
            let (addr, len) = match v.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (v, None),
            };
            match addr.parse::<IpAddr>() {
                Ok(IpAddr::V4(_)) => len.is_none_or(|l| decimal(l, 32)),
                Ok(IpAddr::V6(a)) if a.to_ipv4_mapped().is_some() => {
                    len.is_none_or(|l| decimal(l, 128) && l.parse::<u32>().is_ok_and(|n| n >= 96))
                }
                Ok(IpAddr::V6(_)) => len.is_none_or(|l| decimal(l, 128)),
                Err(_) => false,
            }
        }
        Kind::ServiceAccount => match v.split_once('/') {
            Some((ns, name)) => is_dns_label_by_hand(ns) && subdomain(name),
            None => subdomain(v),
        },
        Kind::Port => decimal(v, 65535) && v.parse::<u32>().is_ok_and(|n| n >= 1),
    }
}

/// RFC 1123 label: 1-63 of a-z, 0-9, '-', not starting or ending with '-'.
fn is_dns_label_by_hand(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Values of `kind` near the rules: valid ones of every form, the ways each rule is broken, and junk.
fn near_value(kind: Kind) -> BoxedStrategy<String> {
    let near: &'static [&'static str] = match kind {
        Kind::Principal => &[
            "cluster.local/ns/a/sa/web",
            "spiffe://cluster.local/ns/a/sa/web",
            "cluster.local/ns/a/*",
            "*/sa/web",
            "*",
            "",
            "spiffe://",
            "a*b",
            "**",
            "*a*",
            "*/ns/*",
            "spiffe://*",
        ],
        Kind::Namespace => &[
            "a",
            "shop-1",
            "*",
            "a*",
            "*b",
            "-*",
            "*-",
            "",
            "A",
            "a_b",
            "a*b",
            "**",
            "*A",
            "-a",
            "a-",
            "a.b",
            "a23456789012345678901234567890123456789012345678901234567890123",
            "a234567890123456789012345678901234567890123456789012345678901234",
        ],
        Kind::IpBlock => &[
            "10.0.0.0/8",
            "10.244.1.11",
            "10.0.0.0/32",
            "10.0.0.0/0",
            "10.0.0.0/008",
            "fd00::/8",
            "::/0",
            "fd00::1",
            "::ffff:10.0.0.0/104",
            "::ffff:10.0.0.0/96",
            "::ffff:10.0.0.1",
            "::ffff:10.0.0.0/95",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0",
            "example.com",
            "",
            "fd00::/ 8",
        ],
        Kind::ServiceAccount => &[
            "web",
            "a/web",
            "a/web.v1",
            "shop/default",
            "",
            "/web",
            "a/",
            "A/web",
            "a/Web",
            "a/b/c",
            "a/web_v1",
            "web_1",
            "a/web.",
            "a_b/web",
            "a/web..v1",
            "a/.web",
            "a/-web",
            "*",
        ],
        Kind::Port => &[
            "80", "8080", "65535", "1", "080", "0", "65536", "99999", "", "+80", "-1", "http", "8080 ", "0x50",
        ],
    };
    prop_oneof![
        6 => prop::sample::select(near).prop_map(String::from),
        1 => "[a-z0-9*/.:-]{0,12}",
        1 => ".{0,12}",
    ]
    .boxed()
}

/// A policy of `shop` with `values` as the only values of `kind`'s field (its `not` form if
/// `negated`; as a `when` condition if `as_condition` and the kind has one), and that field's path.
fn policy_with(kind: Kind, values: Vec<String>, negated: bool, as_condition: bool) -> (AuthorizationPolicy, String) {
    let mut p = parse("p", "{}");
    let key = match kind {
        Kind::Principal => Some("source.principal"),
        Kind::Namespace => Some("source.namespace"),
        Kind::IpBlock => Some("source.ip"),
        Kind::Port => Some("destination.port"),
        Kind::ServiceAccount => None,
    };
    let mut rule = Rule::default();
    let field = if let (true, Some(key)) = (as_condition, key) {
        let (values, not_values, name) = if negated {
            (vec![], values, "notValues")
        } else {
            (values, vec![], "values")
        };
        rule.when = vec![Condition {
            key: key.into(),
            values,
            not_values,
        }];
        format!("spec.rules[0].when[0].{name}")
    } else if let Kind::Port = kind {
        let mut o = Operation::default();
        let name = if negated {
            o.not_ports = values;
            "notPorts"
        } else {
            o.ports = values;
            "ports"
        };
        rule.to = vec![To { operation: o }];
        format!("spec.rules[0].to[0].operation.{name}")
    } else {
        let mut s = Source::default();
        let (list, name) = match (kind, negated) {
            (Kind::Principal, false) => (&mut s.principals, "principals"),
            (Kind::Principal, true) => (&mut s.not_principals, "notPrincipals"),
            (Kind::Namespace, false) => (&mut s.namespaces, "namespaces"),
            (Kind::Namespace, true) => (&mut s.not_namespaces, "notNamespaces"),
            (Kind::IpBlock, false) => (&mut s.ip_blocks, "ipBlocks"),
            (Kind::IpBlock, true) => (&mut s.not_ip_blocks, "notIpBlocks"),
            (Kind::ServiceAccount, false) => (&mut s.service_accounts, "serviceAccounts"),
            (Kind::ServiceAccount, true) | (Kind::Port, _) => (&mut s.not_service_accounts, "notServiceAccounts"),
        };
        *list = values;
        rule.from = vec![From { source: s }];
        format!("spec.rules[0].from[0].source.{name}")
    };
    p.spec.rules = vec![rule];
    (p, field)
}

#[test]
fn near_values_reach_valid_and_invalid_values_of_every_kind() {
    use proptest::strategy::ValueTree as _;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for kind in [
        Kind::Principal,
        Kind::Namespace,
        Kind::IpBlock,
        Kind::ServiceAccount,
        Kind::Port,
    ] {
        let strategy = near_value(kind);
        let valid = (0..1000)
            .filter(|_| valid_value(kind, &strategy.new_tree(&mut runner).unwrap().current()))
            .count();
        assert!((100..=900).contains(&valid), "{kind:?}: {valid} of 1000 valid");
    }
}

proptest! {
    #[test]
    fn a_policy_compiles_exactly_when_its_values_are_valid_and_a_refusal_names_the_first_bad_one(
        (kind, values) in prop_oneof![Just(Kind::Principal), Just(Kind::Namespace), Just(Kind::IpBlock), Just(Kind::ServiceAccount), Just(Kind::Port)]
            .prop_flat_map(|kind| (Just(kind), prop::collection::vec(near_value(kind), 1..4))),
        negated in any::<bool>(),
        as_condition in any::<bool>(),
    ) {
        let (p, field) = policy_with(kind, values.clone(), negated, as_condition);
        let first_bad = values.iter().position(|v| !valid_value(kind, v));
        match (p.validate(), first_bad) {
            (Ok(()), None) => {}
            (Err(e), Some(i)) => prop_assert_eq!(&e.field, &format!("{field}[{i}]"), "{}", e),
            (got, want) => prop_assert!(false, "{:?} in {}: validation says {:?}, the rules that value {:?} is the first bad one", values, field, got, want),
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
