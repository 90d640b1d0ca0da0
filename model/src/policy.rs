//! L4 authorization with Istio's `AuthorizationPolicy` shape and semantics
//! (`security.weft.dev/v1alpha1`), so that a policy written for Istio's ambient mode means the same here.
//!
//! A policy is parsed ([`AuthorizationPolicy`], serde), then compiled ([`AuthorizationPolicy::compile`]):
//! every field is checked as Istio checks it, the fields only a waypoint could enforce are refused by
//! name, and values are parsed once. Deciding one connection to one workload ([`decide`]) reads
//! compiled policies only:
//! 1. a policy applies when it is in the workload's namespace, or in the mesh's root namespace
//!    ([`Scope::Mesh`]), and its `selector.matchLabels` is a subset of the workload's labels (no
//!    selector: every workload in its scope);
//! 2. any applicable DENY policy that matches denies;
//! 3. with no applicable ALLOW policy the connection is allowed, otherwise only if one of them matches;
//! 4. AUDIT policies change nothing; the first one that matches an allowed connection is named in the
//!    decision, for the access log.
//!
//! A policy matches when any of its rules does: no rules match nothing, a rule `{}` everything. A rule
//! matches when one of its `from` entries, one of its `to` entries and every `when` condition match (an
//! absent list matches). Within a `source` or an `operation` every field given must match: a positive
//! field (`principals`) when the connection's value matches one of its entries, a negative one
//! (`notPrincipals`) when it matches none. A connection without a client identity (plaintext) has no
//! principal, namespace or service account: positive fields on them never match it and negative ones
//! always do (`notPrincipals: ["*"]` is Istio's way of saying "plaintext").

mod compile;
mod matcher;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize};

pub use matcher::Cidr;

pub const API_VERSION: &str = "security.weft.dev/v1alpha1";
pub const KIND: &str = "AuthorizationPolicy";
/// The namespace whose policies apply to workloads of every namespace, unless the controller is told
/// another (`--root-namespace`). Istio's equivalent is its root namespace, `istio-system` by default.
pub const DEFAULT_ROOT_NAMESPACE: &str = "weft-system";

// === the resource, as written ===

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Istio's attachment to a Service or Gateway, which a waypoint enforces: refused by validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    /// As `target_ref`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<serde_json::Value>,
    #[serde(default)]
    pub action: Action,
    /// Istio's external authorizer for the CUSTOM action: refused by validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    /// Checks the labels as Istio does: no empty key, no `*` in a key or a value.
    pub fn check(&self) -> Result<(), String> {
        for (k, v) in &self.match_labels {
            if k.is_empty() || k.contains('*') || v.contains('*') {
                return Err(format!(
                    "{k:?}: {v:?}: keys must not be empty, and neither keys nor values may hold '*'"
                ));
            }
        }
        Ok(())
    }
}

/// Whether `match_labels` selects a workload with `labels`: every key present with the same value
/// (an empty selector selects every workload).
pub fn selects(match_labels: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Changes no decision; a match is reported in [`Decision::Allow`].
    Audit,
    /// Istio's external authorization: parsed only to be refused by validation.
    Custom,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Absent matches any source; present, it must not be empty (Istio refuses `from: []`).
    #[serde(default, deserialize_with = "non_empty", skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    /// Absent matches any operation; present, it must not be empty (Istio refuses `to: []`).
    #[serde(default, deserialize_with = "non_empty", skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

/// Istio's `Source`. The request-level fields (`requestPrincipals`, `remoteIpBlocks` and their `not`
/// forms) are parsed only to be refused by validation: they need a waypoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// `namespace/name`, or `name` in the policy's own namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

/// Istio's `Operation`. The HTTP fields (`hosts`, `methods`, `paths` and their `not` forms) are parsed
/// only to be refused by validation: they need a waypoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// Istio's `Condition`: `key` is one of the L4 attributes `source.ip`, `source.namespace`,
/// `source.principal`, `destination.ip`, `destination.port`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

fn non_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let v = Vec::<T>::deserialize(d)?;
    if v.is_empty() {
        return Err(serde::de::Error::custom(
            "must not be empty (leave the field out to match everything)",
        ));
    }
    Ok(v)
}

/// A validation failure naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("AuthorizationPolicy {namespace}/{name}: {field}: {problem}")]
pub struct Invalid {
    pub namespace: String,
    pub name: String,
    /// The path of the field, as written in YAML: `spec.rules[0].from[1].source.ipBlocks[2]`.
    pub field: String,
    pub problem: String,
}

// === the compiled policy ===

/// Which workloads a policy can apply to (its selector then picks among them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Workloads of the policy's own namespace.
    #[default]
    Namespace,
    /// Workloads of every namespace: the policy is in the mesh's root namespace.
    Mesh,
}

impl Scope {
    /// The scope of a policy of `namespace` in a mesh whose root namespace is `root_namespace`.
    pub fn of(namespace: &str, root_namespace: &str) -> Scope {
        if namespace == root_namespace {
            Scope::Mesh
        } else {
            Scope::Namespace
        }
    }
}

/// A checked policy, ready to decide connections: built by [`AuthorizationPolicy::compile`] only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// `namespace/name`, shared with the decisions that name it.
    name: Arc<str>,
    namespace: String,
    scope: Scope,
    selector: Option<BTreeMap<String, String>>,
    effect: Effect,
    rules: Box<[matcher::Rule]>,
}

/// [`Action`] without CUSTOM, which does not compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
    Audit,
}

impl Compiled {
    /// `namespace/name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    pub fn action(&self) -> Action {
        match self.effect {
            Effect::Allow => Action::Allow,
            Effect::Deny => Action::Deny,
            Effect::Audit => Action::Audit,
        }
    }

    /// The workloads it selects (`matchLabels`); `None`: all of its scope.
    pub fn selector(&self) -> Option<&BTreeMap<String, String>> {
        self.selector.as_ref()
    }

    /// How many rules it has (none: an ALLOW matches nothing, a DENY nothing).
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Whether the policy applies to `target`: in scope, and selected by its labels.
    pub fn applies_to(&self, target: Target<'_>) -> bool {
        (self.scope == Scope::Mesh || self.namespace == target.namespace)
            && self.selector.as_ref().is_none_or(|s| selects(s, target.labels))
    }

    /// Whether one of the policy's rules matches `conn` (whatever the action).
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        self.matches_facts(&matcher::Facts::of(conn))
    }

    fn matches_facts(&self, facts: &matcher::Facts<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(facts))
    }
}

// === deciding ===

/// What the policy sees of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection<'a> {
    /// SPIFFE identity of the client (`spiffe://<td>/ns/<ns>/sa/<sa>`), if it authenticated. Anything
    /// else counts as no identity.
    pub source_principal: Option<&'a str>,
    pub source_ip: IpAddr,
    /// The address the client connected to (the workload's own).
    pub destination_ip: IpAddr,
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
    /// Allowed; `audit` names (`namespace/name`) the first AUDIT policy that matched, if any, so that
    /// the caller can mark the connection's record. AUDIT policies never change the decision.
    Allow { audit: Option<Arc<str>> },
    /// Denied by the named DENY policy, or (`None`) because ALLOW policies apply and none matched.
    Deny { policy: Option<String> },
}

impl Decision {
    /// Allowed, with no AUDIT policy matched.
    pub const ALLOW: Decision = Decision::Allow { audit: None };

    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The AUDIT policy that matched an allowed connection.
    pub fn audit(&self) -> Option<&str> {
        match self {
            Decision::Allow { audit } => audit.as_deref(),
            Decision::Deny { .. } => None,
        }
    }
}

/// Decides a connection to `target` under `policies` (any set: which apply is checked here, so the
/// caller may pass more than the target's). Allocates only to name a DENY policy that denied.
pub fn decide<'p>(
    policies: impl IntoIterator<Item = &'p Compiled>,
    target: Target<'_>,
    conn: &Connection<'_>,
) -> Decision {
    let facts = matcher::Facts::of(conn);
    let mut any_allow = false;
    let mut allowed = false;
    let mut audit: Option<&Arc<str>> = None;
    for p in policies.into_iter().filter(|p| p.applies_to(target)) {
        match p.effect {
            Effect::Deny => {
                if p.matches_facts(&facts) {
                    return Decision::Deny {
                        policy: Some(p.name.to_string()),
                    };
                }
            }
            Effect::Allow => {
                any_allow = true;
                allowed = allowed || p.matches_facts(&facts);
            }
            Effect::Audit => {
                if audit.is_none() && p.matches_facts(&facts) {
                    audit = Some(&p.name);
                }
            }
        }
    }
    if !any_allow || allowed {
        Decision::Allow { audit: audit.cloned() }
    } else {
        Decision::Deny { policy: None }
    }
}

#[cfg(test)]
mod tests;
