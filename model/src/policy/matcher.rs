//! The compiled parts of a rule and how they meet one connection: values are parsed when a policy is
//! compiled, so deciding a connection parses nothing and allocates nothing.

use std::net::IpAddr;

use super::Connection;
use crate::identity;

/// A compiled rule: one of `from`, one of `to` and all of `when` must match (an empty list matches).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Rule {
    pub from: Box<[Match]>,
    pub to: Box<[Match]>,
    pub when: Box<[Match]>,
}

impl Rule {
    pub fn matches(&self, f: &Facts<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|m| m.matches(f)))
            && (self.to.is_empty() || self.to.iter().any(|m| m.matches(f)))
            && self.when.iter().all(|m| m.matches(f))
    }
}

/// One `source`, one `operation` or one `when` condition: every attribute it constrains must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Match {
    pub principals: Values<StringMatch>,
    pub namespaces: Values<StringMatch>,
    pub service_accounts: Values<ServiceAccount>,
    pub source_ips: Values<Cidr>,
    pub destination_ips: Values<Cidr>,
    pub destination_ports: Values<u16>,
}

impl Match {
    pub fn matches(&self, f: &Facts<'_>) -> bool {
        self.destination_ports.check(|p| *p == f.destination_port)
            && self.source_ips.check(|c| c.contains(f.source_ip))
            && self.destination_ips.check(|c| c.contains(f.destination_ip))
            && self.principals.check(|m| f.principal.is_some_and(|p| m.matches(p)))
            && self.namespaces.check(|m| f.namespace.is_some_and(|n| m.matches(n)))
            && self.service_accounts.check(|sa| sa.matches(f))
    }

    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
            && self.namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.destination_ports.is_empty()
    }
}

/// A field and its `not` form: some of `any_of` (when given) and none of `none_of` must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Values<T> {
    pub any_of: Box<[T]>,
    pub none_of: Box<[T]>,
}

impl<T> Default for Values<T> {
    fn default() -> Self {
        Self {
            any_of: Box::new([]),
            none_of: Box::new([]),
        }
    }
}

impl<T> Values<T> {
    fn check(&self, mut hit: impl FnMut(&T) -> bool) -> bool {
        (self.any_of.is_empty() || self.any_of.iter().any(&mut hit)) && !self.none_of.iter().any(hit)
    }

    fn is_empty(&self) -> bool {
        self.any_of.is_empty() && self.none_of.is_empty()
    }
}

/// Istio's string matching: exact, `prefix*`, `*suffix`, or `*` (any value, but there must be one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum StringMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Presence,
}

impl StringMatch {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s == "*" {
            return Ok(StringMatch::Presence);
        }
        let inner = s.strip_prefix('*').or_else(|| s.strip_suffix('*')).unwrap_or(s);
        if inner.contains('*') {
            return Err(format!("{s:?}: '*' only as the whole value, a prefix or a suffix"));
        }
        Ok(if s.starts_with('*') {
            StringMatch::Suffix(inner.into())
        } else if s.ends_with('*') {
            StringMatch::Prefix(inner.into())
        } else {
            StringMatch::Exact(inner.into())
        })
    }

    /// The part that is compared (empty for `*`).
    pub fn literal(&self) -> &str {
        match self {
            StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s) => s,
            StringMatch::Presence => "",
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == &**s,
            StringMatch::Prefix(s) => value.starts_with(&**s),
            StringMatch::Suffix(s) => value.ends_with(&**s),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// A Kubernetes service account, compared with the client identity's namespace and account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServiceAccount {
    pub namespace: Box<str>,
    pub name: Box<str>,
}

impl ServiceAccount {
    fn matches(&self, f: &Facts<'_>) -> bool {
        f.namespace == Some(&*self.namespace) && f.service_account == Some(&*self.name)
    }
}

/// What the rules compare, taken from a [`Connection`] once per decision.
pub(super) struct Facts<'a> {
    /// The client's SPIFFE id without `spiffe://`, as Istio's principals are written
    /// ([`Identity::principal`](crate::identity::Identity::principal)); none unless it is a valid id.
    principal: Option<&'a str>,
    namespace: Option<&'a str>,
    service_account: Option<&'a str>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
}

impl<'a> Facts<'a> {
    pub fn of(conn: &Connection<'a>) -> Self {
        let id = conn.source_principal.and_then(|id| identity::split(id).ok());
        Facts {
            principal: id.map(|id| id.principal),
            namespace: id.map(|id| id.namespace),
            service_account: id.map(|id| id.service_account),
            source_ip: canonical(conn.source_ip),
            destination_ip: canonical(conn.destination_ip),
            destination_port: conn.destination_port,
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An IP block: `a.b.c.d/n`, `x::y/n`, or a single address. An IPv4-mapped block
/// (`::ffff:a.b.c.d/n`, n ≥ 96) is the IPv4 block it covers; addresses compared with it are
/// canonicalized the same way, so IPv4 clients match whichever way either side is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                // Digits only: Rust's integer parser would also take "+8".
                .filter(|n| *n <= max && p.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("{s:?}: prefix length must be 0-{max}"))?,
        };
        match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => Ok(Self {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                }),
                Some(_) => Err(format!(
                    "{s:?}: an IPv4-mapped block needs a prefix length of 96 or more (it is compared as IPv4)"
                )),
                None => Ok(Self { addr, prefix }),
            },
            IpAddr::V4(_) => Ok(Self { addr, prefix }),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}
