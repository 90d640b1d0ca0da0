use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::{Method, Uri};
use proptest::prelude::*;

use super::*;

fn connect(authority: &str) -> Result<SocketAddr, BadRequest> {
    let uri: Uri = authority.parse().map_err(|_| BadRequest::MissingAuthority)?;
    parse_connect(&Method::CONNECT, &uri)
}

#[test]
fn accepts_ipv4_and_bracketed_ipv6_targets() {
    assert_eq!(connect("10.0.0.1:8080"), Ok("10.0.0.1:8080".parse().unwrap()));
    assert_eq!(connect("[fd00::1]:443"), Ok("[fd00::1]:443".parse().unwrap()));
}

#[test]
fn rejects_everything_but_connect_to_an_allowed_ip_port() {
    let uri: Uri = "10.0.0.1:80".parse().unwrap();
    assert!(matches!(
        parse_connect(&Method::GET, &uri),
        Err(BadRequest::Method { .. })
    ));
    assert_eq!(
        connect("10.0.0.1:15008"),
        Err(BadRequest::ForbiddenPort { port: 15008 })
    );
    assert_eq!(
        connect("10.0.0.1:15001"),
        Err(BadRequest::ForbiddenPort { port: 15001 })
    );
    assert_eq!(
        connect("10.0.0.1:15006"),
        Err(BadRequest::ForbiddenPort { port: 15006 })
    );
    assert_eq!(connect("10.0.0.1:0"), Err(BadRequest::PortZero));
    assert_eq!(connect("user@10.0.0.1:80"), Err(BadRequest::UserInfo));
    assert!(matches!(connect("example.com:80"), Err(BadRequest::NotIpPort { .. })));
    assert!(matches!(connect("10.0.0.1"), Err(BadRequest::NotIpPort { .. })));
    assert!(connect("10.0.0.1:65536").is_err());
    assert!(connect("fd00::1:80").is_err());
    assert!(connect("[fe80::1%25eth0]:80").is_err());
    assert!(matches!(connect("0.0.0.0:80"), Err(BadRequest::NotUnicast { .. })));
    assert!(matches!(connect("[::]:80"), Err(BadRequest::NotUnicast { .. })));
    assert!(matches!(connect("224.0.0.1:80"), Err(BadRequest::NotUnicast { .. })));
    assert!(matches!(
        connect("[::ffff:0.0.0.0]:80"),
        Err(BadRequest::NotUnicast { .. })
    ));
    assert!(matches!(
        connect("[::ffff:224.0.0.1]:80"),
        Err(BadRequest::NotUnicast { .. })
    ));
    assert!(matches!(
        connect("[::ffff:255.255.255.255]:80"),
        Err(BadRequest::NotUnicast { .. })
    ));
    assert_eq!(
        connect("[::ffff:10.0.0.1]:80"),
        Ok("[::ffff:10.0.0.1]:80".parse().unwrap())
    );
    assert!(matches!(
        connect("255.255.255.255:80"),
        Err(BadRequest::NotUnicast { .. })
    ));
    assert_eq!(
        parse_connect(&Method::CONNECT, &"http://10.0.0.1:80/".parse().unwrap()),
        Err(BadRequest::NotAuthorityForm)
    );
}

#[test]
fn refusals_map_to_ztunnel_status_codes() {
    assert_eq!(Refusal::Denied.status(), 401);
    assert_eq!(Refusal::Forbidden.status(), 400);
    assert_eq!(Refusal::Unreachable.status(), 503);
}

#[path = "../../tests/hbone/reference.rs"]
mod reference;

/// The name of `e`'s variant, as [`reference::target`] names the rules a target breaks.
fn variant(e: &BadRequest) -> &'static str {
    match e {
        BadRequest::Method { .. } => "Method",
        BadRequest::NotAuthorityForm => "NotAuthorityForm",
        BadRequest::MissingAuthority => "MissingAuthority",
        BadRequest::UserInfo => "UserInfo",
        BadRequest::NotIpPort { .. } => "NotIpPort",
        BadRequest::PortZero => "PortZero",
        BadRequest::ForbiddenPort { .. } => "ForbiddenPort",
        BadRequest::NotUnicast { .. } => "NotUnicast",
    }
}

#[test]
fn authority_like_strings_reach_every_outcome() {
    use proptest::strategy::ValueTree as _;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = reference::authority_like();
    let (mut valid, mut uris, mut refused) = (0, 0, std::collections::BTreeSet::new());
    for _ in 0..2000 {
        let s = strategy.new_tree(&mut runner).unwrap().current();
        uris += usize::from(s.parse::<Uri>().is_ok());
        match reference::target(&s) {
            Ok(_) => valid += 1,
            Err(broken) => refused.extend(broken),
        }
    }
    assert!(valid > 400, "only {valid} of 2000 valid");
    // Most reach parse_connect: the HTTP layer refuses few of them.
    assert!(uris > 1400, "only {uris} of 2000 are URIs");
    assert_eq!(
        refused.into_iter().collect::<Vec<_>>(),
        ["ForbiddenPort", "NotIpPort", "NotUnicast", "PortZero", "UserInfo"]
    );
}

fn unicast_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        any::<u128>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
    ]
    .prop_filter("unicast", |ip| {
        !ip.is_unspecified() && !ip.is_multicast() && *ip != IpAddr::V4(Ipv4Addr::BROADCAST)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn accepts_exactly_the_targets_the_rules_allow(s in reference::authority_like()) {
        let want = reference::target(&s);
        let Ok(uri) = s.parse::<Uri>() else {
            // The HTTP layer refuses it before parse_connect sees it: never a target the rules allow.
            prop_assert!(want.is_err(), "{:?} is a valid target but not a URI", s);
            return Ok(());
        };
        match (parse_connect(&Method::CONNECT, &uri), want) {
            (Ok(got), Ok(want)) => prop_assert_eq!(got, want, "{:?}", s),
            (Err(e), Err(broken)) => {
                prop_assert!(broken.contains(&variant(&e)), "{:?}: refused as {:?}, the rules break {:?}", s, e, broken)
            }
            (got, want) => prop_assert!(false, "{:?}: parse_connect says {:?}, the rules {:?}", s, got, want),
        }
    }

    #[test]
    fn accepts_exactly_allowed_ip_port_and_round_trips(ip in unicast_ip(), port in any::<u16>()) {
        let addr = SocketAddr::new(ip, port);
        let result = connect(&addr.to_string());
        if port == 0 || FORBIDDEN_PORTS.contains(&port) {
            prop_assert!(result.is_err());
        } else {
            prop_assert_eq!(result, Ok(addr));
        }
    }
}
