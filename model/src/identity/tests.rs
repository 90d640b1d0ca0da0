use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::TestRunner;

use super::*;

#[test]
fn parses_and_displays_a_workload_identity() {
    let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo".parse().unwrap();
    assert_eq!(id.trust_domain(), "cluster.local");
    assert_eq!(id.namespace(), "default");
    assert_eq!(id.service_account(), "bookinfo");
    assert_eq!(id.principal(), "cluster.local/ns/default/sa/bookinfo");
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/bookinfo");
    assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/bookinfo");
    assert_eq!(id, Identity::try_new("cluster.local", "default", "bookinfo").unwrap());
}

#[test]
fn rejects_other_shapes_naming_the_part() {
    use Part::*;
    for (bad, part) in [
        ("", Scheme),
        ("SPIFFE://cluster.local/ns/a/sa/b", Scheme),
        ("http://cluster.local/ns/a/sa/b", Scheme),
        ("spiffe:/cluster.local/ns/a/sa/b", Scheme),
        ("spiffe://", Path),
        ("spiffe://cluster.local", Path),
        ("spiffe://cluster.local/ns/a/sa/b/", Path),
        ("spiffe://cluster.local/ns/a/sa/b/c", Path),
        ("spiffe://cluster.local/sa/b/ns/a", Path),
        ("spiffe://cluster.local/ns/a", Path),
        ("spiffe:///ns/a/sa/b", TrustDomain),
        ("spiffe://Cluster.local/ns/a/sa/b", TrustDomain),
        ("spiffe://cluster.local:8080/ns/a/sa/b", TrustDomain),
        ("spiffe://user@cluster.local/ns/a/sa/b", TrustDomain),
        ("spiffe://ns/a/sa/b", Path),
        ("spiffe://cluster.local/ns//sa/b", Namespace),
        ("spiffe://cluster.local/ns/../sa/b", Namespace),
        ("spiffe://cluster.local/ns/./sa/b", Namespace),
        ("spiffe://cluster.local/ns/a%20/sa/b", Namespace),
        ("spiffe://cluster.local/ns/a/sa/", ServiceAccount),
        ("spiffe://cluster.local/ns/a/sa/b?x", ServiceAccount),
        ("spiffe://cluster.local/ns/a/sa/b#x", ServiceAccount),
    ] {
        let err = bad.parse::<Identity>().unwrap_err();
        assert_eq!((err.part, err.input.as_str()), (part, bad), "{bad}");
        assert!(err.to_string().contains(&part.to_string()), "{err}");
    }
    let longest = format!("spiffe://{}/ns/a/sa/b", "t".repeat(MAX_TRUST_DOMAIN_LEN));
    assert!(longest.parse::<Identity>().is_ok());
    let longer = format!("spiffe://{}/ns/a/sa/b", "t".repeat(MAX_TRUST_DOMAIN_LEN + 1));
    assert_eq!(longer.parse::<Identity>().unwrap_err().part, Part::TrustDomain);
}

#[test]
fn try_new_rejects_invalid_components_naming_them() {
    assert!(Identity::try_new("td", "ns", "sa").is_ok());
    for (td, ns, sa, part, input) in [
        ("", "ns", "sa", Part::TrustDomain, ""),
        ("TD", "ns", "sa", Part::TrustDomain, "TD"),
        ("td", "n/s", "sa", Part::Namespace, "n/s"),
        ("td", "..", "sa", Part::Namespace, ".."),
        ("td", "ns", "", Part::ServiceAccount, ""),
        ("td", "ns", "s/a", Part::ServiceAccount, "s/a"),
    ] {
        let err = Identity::try_new(td, ns, sa).unwrap_err();
        assert_eq!((err.part, err.input.as_str()), (part, input), "{td} {ns} {sa}");
    }
}

#[test]
fn identities_order_by_trust_domain_then_namespace_then_account() {
    let id = |td, ns, sa| Identity::try_new(td, ns, sa).unwrap();
    // As strings "a.b/..." < "a/...", but the trust domain "a" comes first.
    assert!(id("a", "z", "z") < id("a.b", "a", "a"));
    assert!(id("a", "a", "z") < id("a", "a-b", "a"));
    assert!(id("a", "a", "a") < id("a", "a", "b"));
}

#[test]
fn trust_domains_are_checked_alone() {
    assert!(is_trust_domain("cluster.local"));
    assert!(!is_trust_domain("Cluster.local"));
    assert_eq!(check_trust_domain("").unwrap_err().part, Part::TrustDomain);
}

// === properties ===

/// The rules of SPIFFE-ID.md section 2 for Weft's `/ns/<ns>/sa/<sa>` form, written from the standard
/// and not from `identity.rs`: the components, or every part that breaks a rule (a string with a
/// wrong scheme is only that).
fn reference(s: &str) -> Result<(&str, &str, &str), Vec<Part>> {
    const TRUST_DOMAIN_CHARS: &str = "abcdefghijklmnopqrstuvwxyz0123456789.-_";
    const SEGMENT_CHARS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_";
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return Err(vec![Part::Scheme]);
    };
    // The authority runs to the first '/'; the path is the rest.
    let (td, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    let mut broken = Vec::new();
    if td.is_empty() || td.len() > 255 || !td.chars().all(|c| TRUST_DOMAIN_CHARS.contains(c)) {
        broken.push(Part::TrustDomain);
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let [ns_key, ns, sa_key, sa] = segments[..] else {
        broken.push(Part::Path);
        return Err(broken);
    };
    if (ns_key, sa_key) != ("ns", "sa") {
        broken.push(Part::Path);
        return Err(broken);
    }
    for (segment, part) in [(ns, Part::Namespace), (sa, Part::ServiceAccount)] {
        if segment.is_empty()
            || segment == "."
            || segment == ".."
            || !segment.chars().all(|c| SEGMENT_CHARS.contains(c))
        {
            broken.push(part);
        }
    }
    if broken.is_empty() {
        Ok((td, ns, sa))
    } else {
        Err(broken)
    }
}

/// Strings near the SPIFFE form: each part is usually right and sometimes wrong in one of the ways
/// the rules name, so that about a fifth are accepted and every rule is broken often.
fn spiffe_like() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![
        8 => Just("spiffe://"),
        1 => prop::sample::select(&["SPIFFE://", "spiffe:/", "http://", "", "spiffe:"][..]),
    ];
    let trust_domain = prop_oneof![
        8 => "[a-z0-9._-]{1,12}".boxed(),
        2 => "[a-zA-Z0-9._:@%/é-]{0,6}".boxed(),
        1 => prop::sample::select(vec!["t".repeat(255), "t".repeat(256)]).boxed(),
    ];
    let segment = || {
        prop_oneof![
            8 => "[A-Za-z0-9._-]{1,8}".boxed(),
            2 => "[A-Za-z0-9._%?#/ é-]{0,4}".boxed(),
            1 => prop::sample::select(&[".", "..", ""][..]).prop_map(String::from).boxed(),
        ]
    };
    let key = |right: &'static str| prop_oneof![8 => Just(right), 1 => prop::sample::select(&["ns", "sa", "NS", "x", ""][..])];
    let tail = prop_oneof![8 => Just(""), 1 => prop::sample::select(&["/", "/x", "//", "/sa/b"][..])];
    (scheme, trust_domain, key("ns"), segment(), key("sa"), segment(), tail)
        .prop_map(|(scheme, td, k1, ns, k2, sa, tail)| format!("{scheme}{td}/{k1}/{ns}/{k2}/{sa}{tail}"))
}

#[test]
fn spiffe_like_strings_cover_acceptance_and_every_rejected_part() {
    let mut runner = TestRunner::deterministic();
    let strategy = spiffe_like();
    let (mut accepted, mut parts) = (0, std::collections::HashSet::new());
    for _ in 0..2000 {
        let s = strategy.new_tree(&mut runner).unwrap().current();
        match reference(&s) {
            Ok(_) => accepted += 1,
            Err(broken) => parts.extend(broken),
        }
    }
    assert!(accepted > 200, "only {accepted} of 2000 accepted");
    assert_eq!(parts.len(), 5, "{parts:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn display_then_parse_round_trips(td in "[a-z0-9._-]{1,30}", ns in "[A-Za-z0-9._-]{1,20}", sa in "[A-Za-z0-9._-]{1,20}") {
        prop_assume!(![".", ".."].contains(&ns.as_str()) && ![".", ".."].contains(&sa.as_str()));
        let id = Identity::try_new(&td, &ns, &sa).unwrap();
        prop_assert_eq!((id.trust_domain(), id.namespace(), id.service_account()), (&*td, &*ns, &*sa));
        let back: Identity = id.to_string().parse().unwrap();
        prop_assert_eq!((back.trust_domain(), back.namespace(), back.service_account()), (&*td, &*ns, &*sa));
        prop_assert_eq!(back, id);
    }

    #[test]
    fn parse_accepts_exactly_what_the_spiffe_rules_accept(s in spiffe_like()) {
        match (s.parse::<Identity>(), reference(&s)) {
            (Ok(id), Ok(parts)) => {
                prop_assert_eq!((id.trust_domain(), id.namespace(), id.service_account()), parts);
                prop_assert_eq!(id.to_string(), s);
            }
            (Err(e), Err(broken)) => {
                prop_assert!(broken.contains(&e.part), "{} names {:?}, the rules break {:?}", s, e.part, broken);
                prop_assert_eq!(e.input, s);
            }
            (got, want) => prop_assert!(false, "{:?}: parsed {:?}, the rules say {:?}", s, got, want),
        }
    }

    #[test]
    fn try_new_accepts_exactly_the_components_the_rules_accept(td in "[a-zA-Z0-9._:/-]{0,6}", ns in "[A-Za-z0-9._/ -]{0,4}", sa in "[A-Za-z0-9._?/-]{0,4}") {
        let uri = format!("spiffe://{td}/ns/{ns}/sa/{sa}");
        match (Identity::try_new(&td, &ns, &sa), reference(&uri)) {
            (Ok(id), Ok(_)) => prop_assert_eq!(id.as_str(), uri.as_str()),
            // A '/' in a component breaks the path's shape once written out; alone it is that component's fault.
            (Err(e), Err(_)) => prop_assert!(matches!(e.part, Part::TrustDomain | Part::Namespace | Part::ServiceAccount)),
            (got, want) => prop_assert!(false, "{:?}: built {:?}, the rules say {:?}", uri, got, want),
        }
    }
}
