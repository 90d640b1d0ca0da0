//! L4 authorization with Istio's `AuthorizationPolicy` shape and semantics
//! (`security.weft.dev/v1alpha1`), so people who know Istio can write it.
//!
//! Evaluation for one connection to one workload:
//! 1. policies apply when they are in the workload's namespace and their `selector.matchLabels` is a
//!    subset of the workload's labels (no selector: every workload of the namespace);
//! 2. any matching DENY policy denies;
//! 3. with no applicable ALLOW policy the connection is allowed;
//! 4. otherwise it is allowed only if some ALLOW policy matches.
//!
//! A policy matches when any of its rules matches; a policy with no rules matches nothing, a rule `{}`
//! matches everything. Within a rule every present field must match (any of its values). Conditions
//! on the source identity (`principals`, `namespaces`) never match a connection without one
//! (plaintext), as in Istio: use `notPrincipals`-style ALLOW policies, or strict mode, to refuse it.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "security.weft.dev/v1alpha1";
pub const KIND: &str = "AuthorizationPolicy";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Spec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<String>,
}

/// A validation failure naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("AuthorizationPolicy {namespace}/{name}: {field}: {problem}")]
pub struct Invalid {
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub problem: String,
}

/// What the policy sees of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection<'a> {
    /// SPIFFE identity of the client (`spiffe://<td>/ns/<ns>/sa/<sa>`), if it authenticated.
    pub source_principal: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_port: u16,
}

/// The workload the connection is for.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by the named DENY policy, or (`None`) because ALLOW policies apply and none matched.
    Deny {
        policy: Option<String>,
    },
}

// === validation ===

impl AuthorizationPolicy {
    /// Checks every field; the first problem is reported with its path.
    pub fn validate(&self) -> Result<(), Invalid> {
        let invalid = |field: String, problem: String| Invalid {
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
            field,
            problem,
        };
        if !crate::is_dns_label(&self.metadata.name) {
            return Err(invalid("metadata.name".into(), "must be a lowercase DNS label".into()));
        }
        if !crate::is_dns_label(&self.metadata.namespace) {
            return Err(invalid(
                "metadata.namespace".into(),
                "must be a lowercase DNS label".into(),
            ));
        }
        for (r, rule) in self.spec.rules.iter().enumerate() {
            for (f, from) in rule.from.iter().enumerate() {
                let at = |field: &str, i: usize| format!("spec.rules[{r}].from[{f}].source.{field}[{i}]");
                for (i, p) in from.source.principals.iter().enumerate() {
                    let stars = p.matches('*').count();
                    let ok = !p.is_empty() && (stars == 0 || (stars == 1 && (p.starts_with('*') || p.ends_with('*'))));
                    if !ok {
                        return Err(invalid(
                            at("principals", i),
                            format!("{p:?}: '*' only as a whole value, prefix or suffix"),
                        ));
                    }
                }
                for (i, ns) in from.source.namespaces.iter().enumerate() {
                    if ns != "*" && !crate::is_dns_label(ns) {
                        return Err(invalid(at("namespaces", i), format!("{ns:?} is not a namespace name")));
                    }
                }
                for (i, block) in from.source.ip_blocks.iter().enumerate() {
                    Cidr::parse(block).map_err(|e| invalid(at("ipBlocks", i), e))?;
                }
            }
            for (t, to) in rule.to.iter().enumerate() {
                for (i, port) in to.operation.ports.iter().enumerate() {
                    if !port.parse::<u16>().is_ok_and(|p| p != 0) {
                        return Err(invalid(
                            format!("spec.rules[{r}].to[{t}].operation.ports[{i}]"),
                            format!("{port:?} is not a port number (1-65535)"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// An IP block: `a.b.c.d/n`, `x::y/n`, or a single address.
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
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0-{max}"))?,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
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

// === evaluation ===

/// Decides a connection to `target` under `policies` (all of them; applicability is checked here).
/// Policies are expected to have passed [`AuthorizationPolicy::validate`]; a malformed value that
/// slipped through never matches an ALLOW rule and always matches a DENY rule (fail closed).
pub fn decide(policies: &[AuthorizationPolicy], target: Target<'_>, conn: &Connection<'_>) -> Decision {
    let applicable = policies.iter().filter(|p| applies(p, target));
    let mut any_allow = false;
    let mut allowed = false;
    for p in applicable {
        match p.spec.action {
            Action::Deny => {
                if policy_matches(p, conn, Action::Deny) {
                    return Decision::Deny {
                        policy: Some(format!("{}/{}", p.metadata.namespace, p.metadata.name)),
                    };
                }
            }
            Action::Allow => {
                any_allow = true;
                allowed = allowed || policy_matches(p, conn, Action::Allow);
            }
        }
    }
    if !any_allow || allowed {
        Decision::Allow
    } else {
        Decision::Deny { policy: None }
    }
}

fn applies(p: &AuthorizationPolicy, target: Target<'_>) -> bool {
    p.metadata.namespace == target.namespace
        && p.spec
            .selector
            .as_ref()
            .is_none_or(|s| s.match_labels.iter().all(|(k, v)| target.labels.get(k) == Some(v)))
}

fn policy_matches(p: &AuthorizationPolicy, conn: &Connection<'_>, action: Action) -> bool {
    p.spec.rules.iter().any(|r| rule_matches(r, conn, action))
}

fn rule_matches(rule: &Rule, conn: &Connection<'_>, action: Action) -> bool {
    let from_ok = rule.from.is_empty() || rule.from.iter().any(|f| source_matches(&f.source, conn, action));
    let to_ok = rule.to.is_empty()
        || rule.to.iter().any(|t| {
            t.operation.ports.is_empty()
                || t.operation.ports.iter().any(|p| match p.parse::<u16>() {
                    Ok(port) => port == conn.destination_port,
                    Err(_) => action == Action::Deny,
                })
        });
    from_ok && to_ok
}

fn source_matches(s: &Source, conn: &Connection<'_>, action: Action) -> bool {
    let principals = s.principals.is_empty()
        || conn
            .source_principal
            .is_some_and(|id| s.principals.iter().any(|p| principal_matches(p, id)));
    let namespaces = s.namespaces.is_empty()
        || conn
            .source_principal
            .and_then(namespace_of)
            .is_some_and(|ns| s.namespaces.iter().any(|n| n == "*" || n == ns));
    let ips = s.ip_blocks.is_empty()
        || s.ip_blocks.iter().any(|b| match Cidr::parse(b) {
            Ok(c) => c.contains(conn.source_ip),
            Err(_) => action == Action::Deny,
        });
    principals && namespaces && ips
}

/// Istio matching: exact, `*` (any), `prefix*`, `*suffix`. The value may omit `spiffe://`.
fn principal_matches(pattern: &str, id: &str) -> bool {
    let id = id.strip_prefix("spiffe://").unwrap_or(id);
    let pattern = pattern.strip_prefix("spiffe://").unwrap_or(pattern);
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        id.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        id.ends_with(suffix)
    } else {
        id == pattern
    }
}

/// The namespace of `spiffe://<td>/ns/<ns>/sa/<sa>`.
fn namespace_of(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let mut parts = rest.split('/');
    let (_td, ns_key, ns) = (parts.next()?, parts.next()?, parts.next()?);
    (ns_key == "ns").then_some(ns)
}

#[cfg(test)]
mod tests;
