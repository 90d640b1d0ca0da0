//! From a parsed policy to a [`Compiled`] one: every field checked as Istio's validation checks it,
//! the fields only a waypoint can enforce refused by name, and every value parsed once.
//!
//! Istio's ztunnel accepts a policy with HTTP fields and enforces what it can: an ALLOW rule with one
//! never matches, a DENY rule is enforced without it (wider than written). Weft refuses such a policy
//! instead, naming the field, so that nobody is surprised by either.

use std::sync::Arc;

use super::{
    Action, AuthorizationPolicy, Cidr, Compiled, Condition, Effect, Invalid, Operation, Rule, Scope, Source,
    matcher::{self, Match, ServiceAccount, StringMatch, Values},
};
use crate::is_dns_label;

const WAYPOINT: &str = "it needs a waypoint, which Weft does not have yet";
const L4_KEYS: &str = "source.ip, source.namespace, source.principal, destination.ip, destination.port";

impl AuthorizationPolicy {
    /// Checks every field as [`compile`](Self::compile) does.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.compile(Scope::Namespace).map(drop)
    }

    /// Checks the policy and compiles it for `scope`. The first problem is reported with the path of
    /// its field (`spec.rules[0].from[1].source.ipBlocks[2]`) and what is wrong with it.
    pub fn compile(&self, scope: Scope) -> Result<Compiled, Invalid> {
        self.compile_spec(scope).map_err(|p| Invalid {
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
            field: p.field,
            problem: p.problem,
        })
    }

    fn compile_spec(&self, scope: Scope) -> Result<Compiled, Problem> {
        let (meta, spec) = (&self.metadata, &self.spec);
        if !is_dns_label(&meta.name) {
            return Err(problem("metadata.name", "must be a lowercase DNS label"));
        }
        if !is_dns_label(&meta.namespace) {
            return Err(problem("metadata.namespace", "must be a lowercase DNS label"));
        }
        if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
            let field = if spec.target_ref.is_some() {
                "spec.targetRef"
            } else {
                "spec.targetRefs"
            };
            return Err(problem(
                field,
                format!(
                    "a policy attached to a Service or Gateway is enforced by a waypoint: {WAYPOINT}; use spec.selector"
                ),
            ));
        }
        if let Some(selector) = &spec.selector {
            selector.check().map_err(|p| problem("spec.selector.matchLabels", p))?;
        }
        let effect = match spec.action {
            Action::Allow => Effect::Allow,
            Action::Deny => Effect::Deny,
            Action::Audit => Effect::Audit,
            Action::Custom => {
                return Err(problem(
                    "spec.action",
                    "CUSTOM asks an external authorizer, which Weft does not support (ALLOW, DENY or AUDIT)",
                ));
            }
        };
        if spec.provider.is_some() {
            return Err(problem(
                "spec.provider",
                "only the CUSTOM action takes a provider, and Weft does not support CUSTOM",
            ));
        }
        if effect == Effect::Deny && spec.rules.is_empty() {
            return Err(problem(
                "spec.rules",
                "a DENY policy without rules never matches: add an empty rule {} to deny everything",
            ));
        }
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(r, rule)| compile_rule(rule, &format!("spec.rules[{r}]"), &meta.namespace))
            .collect::<Result<_, _>>()?;
        Ok(Compiled {
            name: Arc::from(format!("{}/{}", meta.namespace, meta.name)),
            namespace: meta.namespace.clone(),
            scope,
            selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
            effect,
            rules,
        })
    }
}

/// A problem at a field, before it is tied to its policy.
struct Problem {
    field: String,
    problem: String,
}

fn problem(field: impl Into<String>, problem: impl Into<String>) -> Problem {
    Problem {
        field: field.into(),
        problem: problem.into(),
    }
}

fn compile_rule(rule: &Rule, at: &str, policy_namespace: &str) -> Result<matcher::Rule, Problem> {
    let from = rule
        .from
        .iter()
        .enumerate()
        .map(|(i, f)| source(&f.source, &format!("{at}.from[{i}].source"), policy_namespace))
        .collect::<Result<_, _>>()?;
    let to = rule
        .to
        .iter()
        .enumerate()
        .map(|(i, t)| operation(&t.operation, &format!("{at}.to[{i}].operation")))
        .collect::<Result<_, _>>()?;
    let when = rule
        .when
        .iter()
        .enumerate()
        .map(|(i, c)| condition(c, &format!("{at}.when[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(matcher::Rule { from, to, when })
}

fn source(s: &Source, at: &str, policy_namespace: &str) -> Result<Match, Problem> {
    for (field, list, what) in [
        (
            "requestPrincipals",
            &s.request_principals,
            "the request's JWT principal",
        ),
        (
            "notRequestPrincipals",
            &s.not_request_principals,
            "the request's JWT principal",
        ),
        (
            "remoteIpBlocks",
            &s.remote_ip_blocks,
            "the original client address (X-Forwarded-For, PROXY protocol)",
        ),
        (
            "notRemoteIpBlocks",
            &s.not_remote_ip_blocks,
            "the original client address (X-Forwarded-For, PROXY protocol)",
        ),
    ] {
        if !list.is_empty() {
            return Err(problem(format!("{at}.{field}"), format!("{what} is HTTP: {WAYPOINT}")));
        }
    }
    let by_identity = !(s.principals.is_empty()
        && s.not_principals.is_empty()
        && s.namespaces.is_empty()
        && s.not_namespaces.is_empty());
    let by_account = !(s.service_accounts.is_empty() && s.not_service_accounts.is_empty());
    if by_identity && by_account {
        let field = if s.service_accounts.is_empty() {
            "notServiceAccounts"
        } else {
            "serviceAccounts"
        };
        return Err(problem(
            format!("{at}.{field}"),
            "cannot be combined with principals or namespaces in one source (as in Istio)",
        ));
    }
    let m = Match {
        principals: values(
            at,
            ["principals", "notPrincipals"],
            [&s.principals, &s.not_principals],
            principal,
        )?,
        namespaces: values(
            at,
            ["namespaces", "notNamespaces"],
            [&s.namespaces, &s.not_namespaces],
            namespace,
        )?,
        service_accounts: values(
            at,
            ["serviceAccounts", "notServiceAccounts"],
            [&s.service_accounts, &s.not_service_accounts],
            |v| service_account(v, policy_namespace),
        )?,
        source_ips: values(
            at,
            ["ipBlocks", "notIpBlocks"],
            [&s.ip_blocks, &s.not_ip_blocks],
            Cidr::parse,
        )?,
        ..Match::default()
    };
    if m.is_empty() {
        return Err(problem(
            at,
            "must not be empty: give at least one field, or leave out `from` to match any source",
        ));
    }
    Ok(m)
}

fn operation(o: &Operation, at: &str) -> Result<Match, Problem> {
    for (field, list) in [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ] {
        if !list.is_empty() {
            return Err(problem(
                format!("{at}.{field}"),
                format!("{field} is HTTP: {WAYPOINT} (at L4 an operation has ports and notPorts)"),
            ));
        }
    }
    let m = Match {
        destination_ports: values(at, ["ports", "notPorts"], [&o.ports, &o.not_ports], port)?,
        ..Match::default()
    };
    if m.is_empty() {
        return Err(problem(
            at,
            "must not be empty: give ports or notPorts, or leave out `to` to match any operation",
        ));
    }
    Ok(m)
}

fn condition(c: &Condition, at: &str) -> Result<Match, Problem> {
    if c.key.is_empty() {
        return Err(problem(format!("{at}.key"), "must not be empty"));
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(problem(at, "at least one of values or notValues must be set"));
    }
    let names = ["values", "notValues"];
    let lists = [&c.values, &c.not_values];
    let m = match c.key.as_str() {
        "source.ip" => Match {
            source_ips: values(at, names, lists, Cidr::parse)?,
            ..Match::default()
        },
        "source.namespace" => Match {
            namespaces: values(at, names, lists, namespace)?,
            ..Match::default()
        },
        "source.principal" => Match {
            principals: values(at, names, lists, principal)?,
            ..Match::default()
        },
        "destination.ip" => Match {
            destination_ips: values(at, names, lists, Cidr::parse)?,
            ..Match::default()
        },
        "destination.port" => Match {
            destination_ports: values(at, names, lists, port)?,
            ..Match::default()
        },
        key => return Err(problem(format!("{at}.key"), unsupported_key(key))),
    };
    Ok(m)
}

fn unsupported_key(key: &str) -> String {
    let http = key.starts_with("request.")
        || key.starts_with("experimental.envoy.filters.")
        || matches!(key, "remote.ip" | "connection.sni" | "source.serviceAccount");
    if http {
        format!("{key:?} is not an L4 attribute: {WAYPOINT} (L4 keys: {L4_KEYS})")
    } else {
        format!("unknown attribute {key:?} (L4 keys: {L4_KEYS})")
    }
}

/// A field and its `not` form (`[field, notField]`), each value parsed; an error names the value.
fn values<T>(
    at: &str,
    names: [&str; 2],
    lists: [&Vec<String>; 2],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Values<T>, Problem> {
    let parse_list = |name: &str, list: &[String]| {
        list.iter()
            .enumerate()
            .map(|(i, v)| parse(v).map_err(|e| problem(format!("{at}.{name}[{i}]"), e)))
            .collect::<Result<Box<[T]>, Problem>>()
    };
    Ok(Values {
        any_of: parse_list(names[0], lists[0])?,
        none_of: parse_list(names[1], lists[1])?,
    })
}

/// Istio's principal, `<td>/ns/<ns>/sa/<sa>` or a pattern of it; a leading `spiffe://` is tolerated.
fn principal(v: &str) -> Result<StringMatch, String> {
    StringMatch::parse(v.strip_prefix("spiffe://").unwrap_or(v))
}

fn namespace(v: &str) -> Result<StringMatch, String> {
    let m = StringMatch::parse(v)?;
    let ok = match &m {
        StringMatch::Exact(name) => is_dns_label(name),
        other => other
            .literal()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
    };
    if ok {
        Ok(m)
    } else {
        Err(format!("{v:?} is not a namespace name or pattern"))
    }
}

/// `namespace/name`, or `name` in the policy's namespace. No patterns, as in Istio.
fn service_account(v: &str, policy_namespace: &str) -> Result<ServiceAccount, String> {
    let (ns, name) = v.split_once('/').unwrap_or((policy_namespace, v));
    let name_ok = !name.is_empty() && name.len() <= 253 && name.split('.').all(is_dns_label);
    if !is_dns_label(ns) || !name_ok {
        return Err(format!(
            "{v:?} is not <namespace>/<service account> or <service account>"
        ));
    }
    Ok(ServiceAccount {
        namespace: ns.into(),
        name: name.into(),
    })
}

fn port(v: &str) -> Result<u16, String> {
    // Digits only: Rust's integer parser would also take "+80".
    let digits = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    digits
        .then(|| v.parse::<u16>().ok())
        .flatten()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{v:?} is not a port number (1-65535)"))
}
