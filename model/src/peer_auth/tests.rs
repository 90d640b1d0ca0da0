//! Istio's PeerAuthentication semantics, one row per case (istio.io reference for
//! `security.istio.io/v1 PeerAuthentication`, and ztunnel's conversion in Istio's ambient controller).

use std::collections::BTreeMap;

use super::*;

const ROOT: &str = policy::DEFAULT_ROOT_NAMESPACE;

/// A policy `namespace/name` from its spec in JSON (which is YAML too).
fn parse(namespace: &str, name: &str, spec: &str) -> PeerAuthentication {
    PeerAuthentication {
        metadata: Metadata {
            name: name.into(),
            namespace: namespace.into(),
        },
        spec: serde_json::from_str(spec).unwrap_or_else(|e| panic!("{spec}: {e}")),
    }
}

fn compiled(namespace: &str, name: &str, spec: &str) -> Compiled {
    parse(namespace, name, spec)
        .compile(Scope::of(namespace, ROOT))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One case: the policies (namespace, name, spec), and what port 8080 and port 9090 of the workload
/// `shop` / `app: cart` then require: the policy that made them STRICT, or `None` (PERMISSIVE).
struct Case {
    what: &'static str,
    policies: &'static [(&'static str, &'static str, &'static str)],
    port_8080: Option<&'static str>,
    port_9090: Option<&'static str>,
}

const STRICT: &str = r#"{"mtls": {"mode": "STRICT"}}"#;
const PERMISSIVE: &str = r#"{"mtls": {"mode": "PERMISSIVE"}}"#;
const UNSET: &str = r#"{"mtls": {"mode": "UNSET"}}"#;
const CART_STRICT: &str = r#"{"selector": {"matchLabels": {"app": "cart"}}, "mtls": {"mode": "STRICT"}}"#;
const CART_PERMISSIVE: &str = r#"{"selector": {"matchLabels": {"app": "cart"}}, "mtls": {"mode": "PERMISSIVE"}}"#;
const CART_UNSET: &str = r#"{"selector": {"matchLabels": {"app": "cart"}}}"#;
const CART_8080_PERMISSIVE: &str =
    r#"{"selector": {"matchLabels": {"app": "cart"}}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}"#;
const CART_STRICT_8080_DISABLE: &str = r#"{"selector": {"matchLabels": {"app": "cart"}}, "mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}"#;
const CART_PERMISSIVE_8080_STRICT: &str = r#"{"selector": {"matchLabels": {"app": "cart"}}, "mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"8080": {"mode": "STRICT"}}}"#;
const CART_8080_UNSET: &str =
    r#"{"selector": {"matchLabels": {"app": "cart"}}, "portLevelMtls": {"8080": {"mode": "UNSET"}}}"#;

const CASES: &[Case] = &[
    Case {
        what: "nothing applies: PERMISSIVE, as Istio's default",
        policies: &[],
        port_8080: None,
        port_9090: None,
    },
    Case {
        what: "mesh-wide STRICT (root namespace, no selector) applies to every namespace",
        policies: &[(ROOT, "default", STRICT)],
        port_8080: Some("weft-system/default"),
        port_9090: Some("weft-system/default"),
    },
    Case {
        what: "mesh-wide UNSET means PERMISSIVE",
        policies: &[(ROOT, "default", UNSET)],
        port_8080: None,
        port_9090: None,
    },
    Case {
        what: "mesh-wide policy without mtls at all means PERMISSIVE",
        policies: &[(ROOT, "default", "{}")],
        port_8080: None,
        port_9090: None,
    },
    Case {
        what: "a root-namespace policy with a selector is ignored",
        policies: &[(ROOT, "cart", CART_STRICT)],
        port_8080: None,
        port_9090: None,
    },
    Case {
        what: "namespace STRICT",
        policies: &[("shop", "default", STRICT)],
        port_8080: Some("shop/default"),
        port_9090: Some("shop/default"),
    },
    Case {
        what: "another namespace's policy does not apply",
        policies: &[("bank", "default", STRICT), ("bank", "cart", CART_STRICT)],
        port_8080: None,
        port_9090: None,
    },
    Case {
        what: "namespace PERMISSIVE overrides mesh-wide STRICT",
        policies: &[(ROOT, "default", STRICT), ("shop", "default", PERMISSIVE)],
        port_8080: None,
        port_9090: None,
    },
    Case {
        what: "namespace UNSET inherits mesh-wide STRICT",
        policies: &[(ROOT, "default", STRICT), ("shop", "default", UNSET)],
        port_8080: Some("weft-system/default"),
        port_9090: Some("weft-system/default"),
    },
    Case {
        what: "selector STRICT overrides namespace PERMISSIVE",
        policies: &[("shop", "default", PERMISSIVE), ("shop", "cart", CART_STRICT)],
        port_8080: Some("shop/cart"),
        port_9090: Some("shop/cart"),
    },
    Case {
        what: "selector PERMISSIVE overrides namespace STRICT",
        policies: &[("shop", "default", STRICT), ("shop", "cart", CART_PERMISSIVE)],
        port_8080: None,
        port_9090: None,
    },
    Case {
        what: "selector UNSET inherits namespace STRICT",
        policies: &[("shop", "default", STRICT), ("shop", "cart", CART_UNSET)],
        port_8080: Some("shop/default"),
        port_9090: Some("shop/default"),
    },
    Case {
        what: "selector UNSET and namespace UNSET inherit mesh-wide STRICT",
        policies: &[
            (ROOT, "default", STRICT),
            ("shop", "default", UNSET),
            ("shop", "cart", CART_UNSET),
        ],
        port_8080: Some("weft-system/default"),
        port_9090: Some("weft-system/default"),
    },
    Case {
        what: "a selector the workload's labels do not match does not apply",
        policies: &[(
            "shop",
            "web",
            r#"{"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}}"#,
        )],
        port_8080: None,
        port_9090: None,
    },
    Case {
        what: "an empty matchLabels is no selector: namespace-wide",
        policies: &[(
            "shop",
            "default",
            r#"{"selector": {"matchLabels": {}}, "mtls": {"mode": "STRICT"}}"#,
        )],
        port_8080: Some("shop/default"),
        port_9090: Some("shop/default"),
    },
    Case {
        what: "port-level PERMISSIVE under an UNSET selector exempts that port from namespace STRICT",
        policies: &[("shop", "default", STRICT), ("shop", "cart", CART_8080_PERMISSIVE)],
        port_8080: None,
        port_9090: Some("shop/default"),
    },
    Case {
        what: "port-level DISABLE under selector STRICT: that port accepts plaintext (DISABLE is PERMISSIVE)",
        policies: &[("shop", "cart", CART_STRICT_8080_DISABLE)],
        port_8080: None,
        port_9090: Some("shop/cart"),
    },
    Case {
        what: "port-level STRICT under selector PERMISSIVE: only that port requires mTLS",
        policies: &[(ROOT, "default", STRICT), ("shop", "cart", CART_PERMISSIVE_8080_STRICT)],
        port_8080: Some("shop/cart"),
        port_9090: None,
    },
    Case {
        what: "port-level UNSET inherits the policy's level (here: mesh-wide STRICT)",
        policies: &[(ROOT, "default", STRICT), ("shop", "cart", CART_8080_UNSET)],
        port_8080: Some("weft-system/default"),
        port_9090: Some("weft-system/default"),
    },
    Case {
        what: "DISABLE at namespace level is PERMISSIVE",
        policies: &[
            (ROOT, "default", STRICT),
            ("shop", "default", r#"{"mtls": {"mode": "DISABLE"}}"#),
        ],
        port_8080: None,
        port_9090: None,
    },
    Case {
        what: "two namespace-wide policies: the first by name decides (Istio: the oldest)",
        policies: &[("shop", "b-strict", STRICT), ("shop", "a-permissive", PERMISSIVE)],
        port_8080: None,
        port_9090: None,
    },
    Case {
        what: "two matching selector policies: the first by name decides, with its ports",
        policies: &[
            ("shop", "z-permissive", CART_PERMISSIVE),
            ("shop", "a-strict", CART_STRICT_8080_DISABLE),
        ],
        port_8080: None,
        port_9090: Some("shop/a-strict"),
    },
];

#[test]
fn istio_peer_authentication_semantics() {
    let labels = BTreeMap::from([("app".to_owned(), "cart".to_owned())]);
    let target = Target {
        namespace: "shop",
        labels: &labels,
    };
    for case in CASES {
        let policies: Vec<Compiled> = case
            .policies
            .iter()
            .map(|(ns, name, spec)| compiled(ns, name, spec))
            .collect();
        for (port, want) in [(8080, case.port_8080), (9090, case.port_9090)] {
            let got = requirement(&policies, target, port);
            let want = match want {
                Some(p) => Requirement::Strict { policy: Arc::from(p) },
                None => Requirement::Permissive,
            };
            assert_eq!(got, want, "{}: port {port}", case.what);
            // The order policies arrive in changes nothing.
            assert_eq!(
                requirement(policies.iter().rev(), target, port),
                want,
                "{}: port {port}, reversed",
                case.what
            );
        }
    }
}

/// Invalid input, as Istio's validation refuses it: (spec, field, part of the problem).
const INVALID: &[(&str, &str, &str)] = &[
    (
        r#"{"portLevelMtls": {"8080": {"mode": "STRICT"}}}"#,
        "spec.portLevelMtls",
        "cannot have port-level mTLS",
    ),
    (
        r#"{"selector": {"matchLabels": {}}, "portLevelMtls": {"8080": {"mode": "STRICT"}}}"#,
        "spec.portLevelMtls",
        "cannot have port-level mTLS",
    ),
    (
        r#"{"selector": {"matchLabels": {"app": "cart"}}, "portLevelMtls": {}}"#,
        "spec.portLevelMtls",
        "must not be empty",
    ),
    (
        r#"{"selector": {"matchLabels": {"app": "cart"}}, "portLevelMtls": {"0": {"mode": "STRICT"}}}"#,
        "spec.portLevelMtls[\"0\"]",
        "not a port number",
    ),
    (
        r#"{"selector": {"matchLabels": {"app": "cart"}}, "portLevelMtls": {"65536": {"mode": "STRICT"}}}"#,
        "spec.portLevelMtls[\"65536\"]",
        "not a port number",
    ),
    (
        r#"{"selector": {"matchLabels": {"app": "cart"}}, "portLevelMtls": {"http": {"mode": "STRICT"}}}"#,
        "spec.portLevelMtls[\"http\"]",
        "not a port number",
    ),
    (
        r#"{"selector": {"matchLabels": {"app": "ca*"}}, "mtls": {"mode": "STRICT"}}"#,
        "spec.selector.matchLabels",
        "'*'",
    ),
];

#[test]
fn invalid_policies_are_refused_naming_the_field() {
    for (spec, field, problem) in INVALID {
        let err = parse("shop", "bad", spec).validate().unwrap_err();
        assert_eq!(err.field, *field, "{spec}: {err}");
        assert!(err.problem.contains(problem), "{spec}: {err}");
        assert!(err.to_string().starts_with("PeerAuthentication shop/bad: "), "{err}");
    }
    let mut bad_name = parse("shop", "Bad", STRICT);
    assert_eq!(bad_name.validate().unwrap_err().field, "metadata.name");
    bad_name.metadata.name = "ok".into();
    bad_name.metadata.namespace = "no/pe".into();
    assert_eq!(bad_name.validate().unwrap_err().field, "metadata.namespace");
}

#[test]
fn unknown_fields_and_modes_do_not_parse() {
    for spec in [
        r#"{"mtls": {"mode": "OFF"}}"#,
        r#"{"mtls": {"mode": "STRICT", "extra": 1}}"#,
        r#"{"targetRef": {"kind": "Service", "name": "cart"}}"#,
    ] {
        assert!(serde_json::from_str::<Spec>(spec).is_err(), "{spec}");
    }
}

#[test]
fn port_keys_are_numbers_or_strings() {
    let yaml_like = r#"{"selector": {"matchLabels": {"app": "cart"}}, "portLevelMtls": {"8080": {"mode": "STRICT"}}}"#;
    let from_string: Spec = serde_json::from_str(yaml_like).unwrap();
    assert_eq!(
        from_string.port_level_mtls,
        Some(BTreeMap::from([("8080".to_owned(), Mtls { mode: Mode::Strict })]))
    );
    // Round trip through the stored form.
    let again: Spec = serde_json::from_str(&serde_json::to_string(&from_string).unwrap()).unwrap();
    assert_eq!(again, from_string);
}
