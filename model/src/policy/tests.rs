use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const CLIENT_A: &str = "spiffe://cluster.local/ns/a/sa/web";
const CLIENT_B: &str = "spiffe://cluster.local/ns/b/sa/web";

fn policy(name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        metadata: Metadata {
            name: name.into(),
            namespace: "shop".into(),
        },
        spec: Spec {
            selector: None,
            action,
            rules,
        },
    }
}

fn from_namespaces(ns: &[&str]) -> Rule {
    Rule {
        from: vec![From {
            source: Source {
                namespaces: ns.iter().map(|s| s.to_string()).collect(),
                ..Source::default()
            },
        }],
        to: vec![],
    }
}

fn conn(principal: Option<&str>) -> Connection<'_> {
    Connection {
        source_principal: principal,
        source_ip: "10.244.1.11".parse().unwrap(),
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

#[test]
fn no_policy_allows() {
    assert_eq!(decide(&[], target(&labels()), &conn(None)), Decision::Allow);
}

#[test]
fn allow_for_a_namespace_admits_it_and_refuses_others() {
    let ps = [policy("allow-a", Action::Allow, vec![from_namespaces(&["a"])])];
    let l = labels();
    assert_eq!(decide(&ps, target(&l), &conn(Some(CLIENT_A))), Decision::Allow);
    assert_eq!(
        decide(&ps, target(&l), &conn(Some(CLIENT_B))),
        Decision::Deny { policy: None }
    );
    assert_eq!(
        decide(&ps, target(&l), &conn(None)),
        Decision::Deny { policy: None },
        "plaintext has no namespace"
    );
}

#[test]
fn deny_beats_allow() {
    let ps = [
        policy("allow-a", Action::Allow, vec![from_namespaces(&["a"])]),
        policy("deny-a", Action::Deny, vec![from_namespaces(&["a"])]),
    ];
    let l = labels();
    assert_eq!(
        decide(&ps, target(&l), &conn(Some(CLIENT_A))),
        Decision::Deny {
            policy: Some("shop/deny-a".into())
        }
    );
}

#[test]
fn allow_nothing_and_allow_all() {
    let l = labels();
    let nothing = [policy("allow-nothing", Action::Allow, vec![])];
    assert_eq!(
        decide(&nothing, target(&l), &conn(Some(CLIENT_A))),
        Decision::Deny { policy: None }
    );
    let all = [policy("allow-all", Action::Allow, vec![Rule::default()])];
    assert_eq!(decide(&all, target(&l), &conn(None)), Decision::Allow);
}

#[test]
fn selector_and_namespace_scope_the_policy() {
    let mut p = policy("allow-a", Action::Allow, vec![from_namespaces(&["a"])]);
    p.spec.selector = Some(Selector {
        match_labels: BTreeMap::from([("app".into(), "other".into())]),
    });
    let l = labels();
    assert_eq!(
        decide(&[p.clone()], target(&l), &conn(Some(CLIENT_B))),
        Decision::Allow,
        "selector does not match"
    );
    p.spec.selector = None;
    p.metadata.namespace = "elsewhere".into();
    assert_eq!(
        decide(&[p], target(&l), &conn(Some(CLIENT_B))),
        Decision::Allow,
        "other namespace's policy"
    );
}

#[test]
fn ports_principals_and_ip_blocks() {
    let rule = Rule {
        from: vec![From {
            source: Source {
                principals: vec!["cluster.local/ns/a/*".into()],
                ip_blocks: vec!["10.244.1.0/24".into()],
                ..Source::default()
            },
        }],
        to: vec![To {
            operation: Operation {
                ports: vec!["8080".into()],
            },
        }],
    };
    let ps = [policy("p", Action::Allow, vec![rule])];
    let l = labels();
    assert_eq!(decide(&ps, target(&l), &conn(Some(CLIENT_A))), Decision::Allow);
    let mut c = conn(Some(CLIENT_A));
    c.destination_port = 9090;
    assert_eq!(decide(&ps, target(&l), &c), Decision::Deny { policy: None });
    let mut c = conn(Some(CLIENT_A));
    c.source_ip = "10.244.2.11".parse().unwrap();
    assert_eq!(decide(&ps, target(&l), &c), Decision::Deny { policy: None });
    let mut c = conn(Some(CLIENT_A));
    c.source_ip = "::ffff:10.244.1.99".parse().unwrap();
    assert_eq!(
        decide(&ps, target(&l), &c),
        Decision::Allow,
        "IPv4-mapped sources match IPv4 blocks"
    );
}

#[test]
fn validation_names_the_object_and_field() {
    let mut p = policy(
        "bad",
        Action::Allow,
        vec![Rule {
            from: vec![From {
                source: Source {
                    ip_blocks: vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()],
                    ..Source::default()
                },
            }],
            to: vec![],
        }],
    );
    let e = p.validate().unwrap_err();
    assert_eq!(e.field, "spec.rules[0].from[0].source.ipBlocks[1]");
    assert!(
        e.to_string()
            .starts_with("AuthorizationPolicy shop/bad: spec.rules[0].from[0].source.ipBlocks[1]"),
        "{e}"
    );
    p.spec.rules = vec![Rule {
        from: vec![],
        to: vec![To {
            operation: Operation {
                ports: vec!["http".into()],
            },
        }],
    }];
    assert_eq!(
        p.validate().unwrap_err().field,
        "spec.rules[0].to[0].operation.ports[0]"
    );
    p.spec.rules = vec![from_namespaces(&["Not_A_Namespace"])];
    assert_eq!(
        p.validate().unwrap_err().field,
        "spec.rules[0].from[0].source.namespaces[0]"
    );
}

#[test]
fn unknown_fields_are_rejected_when_parsing() {
    let json = r#"{"metadata":{"name":"p","namespace":"shop"},"spec":{"action":"ALLOW","rules":[{"from":[{"source":{"principal":["x"]}}]}]}}"#;
    let err = serde_json::from_str::<AuthorizationPolicy>(json).unwrap_err();
    assert!(err.to_string().contains("unknown field `principal`"), "{err}");
}

// === properties ===

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("*".to_owned()),
        Just("10.244.1.0/24".to_owned()),
        Just("cluster.local/ns/a/*".to_owned()),
        Just("8080".to_owned()),
        ".{0,12}",
    ]
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(
            (
                prop::collection::vec(arb_string(), 0..3),
                prop::collection::vec(arb_string(), 0..3),
                prop::collection::vec(arb_string(), 0..3),
            )
                .prop_map(|(principals, namespaces, ip_blocks)| From {
                    source: Source {
                        principals,
                        namespaces,
                        ip_blocks,
                    },
                }),
            0..3,
        ),
        prop::collection::vec(
            prop::collection::vec(arb_string(), 0..3).prop_map(|ports| To {
                operation: Operation { ports },
            }),
            0..2,
        ),
    )
        .prop_map(|(from, to)| Rule { from, to })
}

fn arb_policy() -> impl Strategy<Value = AuthorizationPolicy> {
    (any::<bool>(), prop::collection::vec(arb_rule(), 0..3), any::<bool>()).prop_map(|(deny, rules, selected)| {
        let mut p = policy("p", if deny { Action::Deny } else { Action::Allow }, rules);
        if selected {
            p.spec.selector = Some(Selector {
                match_labels: BTreeMap::from([("app".into(), "cart".into())]),
            });
        }
        p
    })
}

proptest! {
    #[test]
    fn validation_never_panics(p in arb_policy(), name in ".{0,70}") {
        let mut p = p;
        p.metadata.name = name;
        let _ = p.validate();
    }

    #[test]
    fn a_matching_deny_always_wins(ps in prop::collection::vec(arb_policy(), 0..4), principal in prop::option::of(Just(CLIENT_A))) {
        let mut ps = ps;
        ps.push(policy("deny-all", Action::Deny, vec![Rule::default()]));
        let l = labels();
        let d = decide(&ps, target(&l), &conn(principal));
        prop_assert!(matches!(d, Decision::Deny { policy: Some(_) }), "{:?}", d);
    }

    #[test]
    fn an_allow_policy_never_widens_access(ps in prop::collection::vec(arb_policy(), 0..4), extra in arb_policy(), principal in prop::option::of(Just(CLIENT_B))) {
        // Adding ALLOW policies can only turn "deny" into "allow" for connections they match; with
        // none applicable before, it turns "allow everything" into "allow what it matches".
        let l = labels();
        let c = conn(principal);
        let before = decide(&ps, target(&l), &c);
        let mut with = ps.clone();
        let mut extra = extra;
        extra.spec.action = Action::Allow;
        with.push(extra.clone());
        let after = decide(&with, target(&l), &c);
        if after == Decision::Allow && before != Decision::Allow {
            prop_assert!(policy_matches(&extra, &c, Action::Allow));
        }
    }

    #[test]
    fn ipv4_cidr_membership_matches_arithmetic(a in any::<u32>(), ip in any::<u32>(), prefix in 0u8..=32) {
        let cidr = Cidr::parse(&format!("{}/{prefix}", std::net::Ipv4Addr::from(a))).unwrap();
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
        prop_assert_eq!(cidr.contains(IpAddr::from(std::net::Ipv4Addr::from(ip))), a & mask == ip & mask);
    }
}
