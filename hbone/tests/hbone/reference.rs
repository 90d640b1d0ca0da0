//! What an HBONE `CONNECT` target may be, written from the rules and not from `parse_connect`, as the
//! oracle of its tests (the unit tests include this file with `#[path]`):
//! - the request target is authority-form `host:port` (RFC 9110 section 9.3.6), without user info;
//! - the host is an IPv4 address in dotted decimal (RFC 3986 section 3.2.2 `IPv4address`: four
//!   decimal octets 0-255, no leading zeros) or an IPv6 address in brackets (RFC 4291 section 2.2 text
//!   forms: eight groups of 1-4 hex digits, `::` standing for one or more zero groups at most once, an
//!   IPv4 address in place of the last two groups); no zone id, no host name;
//! - the port is decimal digits (RFC 3986 `port`) naming 1-65535, not one of the agent's own
//!   (15001, 15006, 15008);
//! - the address is one a TCP connection can reach: not unspecified (`0.0.0.0`, `::`), multicast
//!   (224.0.0.0/4, ff00::/8) or the IPv4 broadcast address, an IPv4-mapped IPv6 address
//!   (`::ffff:0:0/96`) judged as the IPv4 address it carries.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;

/// The agent's own ports: outbound, plaintext inbound, HBONE.
pub const OWN_PORTS: [u16; 3] = [15001, 15006, 15008];

/// The target `authority` names, or every rule it breaks, by the name of `BadRequest`'s variant.
pub fn target(authority: &str) -> Result<SocketAddr, Vec<&'static str>> {
    if authority.contains('@') {
        return Err(vec!["UserInfo"]);
    }
    let (ip, port) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((host, after)) => (ipv6(host).map(IpAddr::V6), after.strip_prefix(':')),
            None => (None, None),
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (ipv4(host).map(IpAddr::V4), Some(port)),
            None => (None, None),
        },
    };
    let (Some(ip), Some(port)) = (ip, port.and_then(port_number)) else {
        return Err(vec!["NotIpPort"]);
    };
    let mut broken = Vec::new();
    if port == 0 {
        broken.push("PortZero");
    }
    if OWN_PORTS.contains(&port) {
        broken.push("ForbiddenPort");
    }
    if !reachable(ip) {
        broken.push("NotUnicast");
    }
    if broken.is_empty() {
        Ok(SocketAddr::new(ip, port))
    } else {
        Err(broken)
    }
}

/// RFC 3986 `IPv4address`.
fn ipv4(s: &str) -> Option<Ipv4Addr> {
    let octets: Vec<&str> = s.split('.').collect();
    let [a, b, c, d] = octets[..] else { return None };
    let octet = |o: &str| -> Option<u8> {
        let digits = !o.is_empty() && o.len() <= 3 && o.bytes().all(|b| b.is_ascii_digit());
        let no_leading_zero = o == "0" || !o.starts_with('0');
        if digits && no_leading_zero {
            u8::try_from(o.bytes().fold(0u32, |n, b| n * 10 + u32::from(b - b'0'))).ok()
        } else {
            None
        }
    };
    Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?))
}

/// RFC 4291 section 2.2.
fn ipv6(s: &str) -> Option<Ipv6Addr> {
    // Groups of one side of `::` (or of the whole address): hex groups, the last possibly IPv4.
    fn groups(side: &str, may_end_in_ipv4: bool) -> Option<Vec<u16>> {
        if side.is_empty() {
            return Some(Vec::new());
        }
        let parts: Vec<&str> = side.split(':').collect();
        let mut out = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            if i + 1 == parts.len() && may_end_in_ipv4 && part.contains('.') {
                let [a, b, c, d] = ipv4(part)?.octets();
                out.extend([u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d])]);
            } else if (1..=4).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push(
                    part.bytes()
                        .fold(0u16, |n, b| n * 16 + (b as char).to_digit(16).unwrap() as u16),
                );
            } else {
                return None;
            }
        }
        Some(out)
    }
    let all = match s.split_once("::") {
        Some((head, tail)) => {
            if tail.contains("::") {
                return None;
            }
            let (head, tail) = (groups(head, false)?, groups(tail, true)?);
            // `::` stands for at least one group.
            if head.len() + tail.len() > 7 {
                return None;
            }
            let zeros = vec![0; 8 - head.len() - tail.len()];
            [head, zeros, tail].concat()
        }
        None => groups(s, true)?,
    };
    let all: [u16; 8] = all.try_into().ok()?;
    Some(Ipv6Addr::from(all))
}

/// RFC 3986 `port`, as a number (leading zeros allowed); none if empty or above 65535.
fn port_number(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let significant = s.trim_start_matches('0');
    if significant.len() > 5 {
        return None;
    }
    u16::try_from(significant.bytes().fold(0u32, |n, b| n * 10 + u32::from(b - b'0'))).ok()
}

fn reachable(ip: IpAddr) -> bool {
    let v4 = match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => match v6.segments() {
            [0, 0, 0, 0, 0, 0xffff, hi, lo] => {
                let [a, b] = hi.to_be_bytes();
                let [c, d] = lo.to_be_bytes();
                Some(Ipv4Addr::new(a, b, c, d))
            }
            _ => None,
        },
    };
    match (v4, ip) {
        (Some(v4), _) => {
            let [first, ..] = v4.octets();
            v4 != Ipv4Addr::new(0, 0, 0, 0) && !(224..=239).contains(&first) && v4 != Ipv4Addr::new(255, 255, 255, 255)
        }
        (None, IpAddr::V6(v6)) => v6.segments() != [0; 8] && v6.segments()[0] >> 8 != 0xff,
        (None, IpAddr::V4(_)) => unreachable!("an IPv4 address is its own IPv4 form"),
    }
}

// === strategies ===

/// Strings near an HBONE target: each part usually right and sometimes wrong in one of the ways the
/// rules name, so that valid targets and every refusal are common.
pub fn authority_like() -> impl Strategy<Value = String> {
    let user = prop_oneof![12 => Just(""), 1 => Just("u@"), 1 => Just("@")];
    let host = prop_oneof![
        4 => ipv4_text(),
        4 => ipv6_text().prop_map(|h| format!("[{h}]")),
        1 => ipv6_text(),
        1 => prop::sample::select(&["example.com", "localhost", "", "[]", "[::1", "[fe80::1%25eth0]", "[::1%eth0]"][..])
            .prop_map(String::from),
    ];
    let port = prop_oneof![
        6 => (1u16..).prop_map(|p| format!(":{p}")),
        3 => prop::sample::select(&[":0", ":15001", ":15006", ":15008", ":80", ":443"][..]).prop_map(String::from),
        2 => prop::sample::select(&[":080", ":0000080", ":65535", ":65536", ":99999", ":", "", ":+80", ":8a", "::80"][..])
            .prop_map(String::from),
    ];
    (user, host, port).prop_map(|(user, host, port)| format!("{user}{host}{port}"))
}

fn special_ipv4() -> impl Strategy<Value = [u8; 4]> {
    prop_oneof![
        4 => any::<[u8; 4]>(),
        1 => prop::sample::select(&[[0, 0, 0, 0], [255, 255, 255, 255], [224, 0, 0, 1], [239, 255, 255, 255], [127, 0, 0, 1], [10, 0, 0, 1]][..]),
        1 => (224u8..=239, any::<[u8; 3]>()).prop_map(|(a, [b, c, d])| [a, b, c, d]),
    ]
}

fn ipv4_text() -> impl Strategy<Value = String> {
    let valid = special_ipv4().prop_map(|[a, b, c, d]| format!("{a}.{b}.{c}.{d}"));
    prop_oneof![
        6 => valid,
        1 => prop::sample::select(&["01.2.3.4", "1.2.3", "1.2.3.4.5", "256.0.0.1", "1..2.3", "1.2.3.4 ", "0x1.2.3.4", "1.2.3.-4"][..])
            .prop_map(String::from),
    ]
}

/// IPv6 text in the forms RFC 4291 allows (full, leading zeros, either case, `::`, an IPv4 tail) and
/// a few it does not.
fn ipv6_text() -> impl Strategy<Value = String> {
    let groups = prop_oneof![
        3 => any::<[u16; 8]>(),
        // Zero runs to compress, special addresses, IPv4-mapped ones.
        2 => (any::<[u16; 8]>(), 0usize..8, 1usize..=8).prop_map(|(mut g, at, len)| {
            g[at..(at + len).min(8)].fill(0);
            g
        }),
        1 => prop::sample::select(&[[0u16; 8], [0, 0, 0, 0, 0, 0, 0, 1], [0xff02, 0, 0, 0, 0, 0, 0, 1], [0xfe80, 0, 0, 0, 0, 0, 0, 1]][..]),
        1 => special_ipv4().prop_map(|[a, b, c, d]| [0, 0, 0, 0, 0, 0xffff, u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d])]),
    ];
    let style = (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>());
    let valid = (groups, style).prop_map(|(g, (upper, padded, compress, v4_tail))| {
        let hex = |x: u16| match (upper, padded) {
            (false, false) => format!("{x:x}"),
            (false, true) => format!("{x:04x}"),
            (true, false) => format!("{x:X}"),
            (true, true) => format!("{x:04X}"),
        };
        let mut parts: Vec<String> = if v4_tail {
            let [a, b] = g[6].to_be_bytes();
            let [c, d] = g[7].to_be_bytes();
            g[..6]
                .iter()
                .map(|x| hex(*x))
                .chain([format!("{a}.{b}.{c}.{d}")])
                .collect()
        } else {
            g.iter().map(|x| hex(*x)).collect()
        };
        // The first longest run of zero groups (among the hex ones) becomes `::`.
        let hex_groups = if v4_tail { 6 } else { 8 };
        let mut best = (0, 0);
        let mut i = 0;
        while i < hex_groups {
            let len = g[i..hex_groups].iter().take_while(|x| **x == 0).count();
            if len > best.1 {
                best = (i, len);
            }
            i += len.max(1);
        }
        if compress && best.1 > 0 {
            let (at, len) = best;
            let tail = parts.split_off(at + len);
            parts.truncate(at);
            format!("{}::{}", parts.join(":"), tail.join(":"))
        } else {
            parts.join(":")
        }
    });
    prop_oneof![
        8 => valid,
        1 => prop::sample::select(&[
            "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7", "1::2::3", "12345::", "1:2:3:4:5:6:7:1.2.3.4", "1:2:3:4:5:6::1.2.3.4",
            "::1.2.3.4.5", ":::", "1:2:3:4:5:6:7:8::", "::g", "fe80::1%eth0", "::01.2.3.4",
        ][..])
        .prop_map(String::from),
    ]
}
