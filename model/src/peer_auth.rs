//! PeerAuthentication: which workloads and ports accept plaintext (PERMISSIVE) and which require
//! mutual TLS (STRICT), with Istio's mesh-wide, namespace, selector and port-level precedence.
//!
//! A policy is parsed ([`PeerAuthentication`], serde), checked and compiled
//! ([`PeerAuthentication::compile`]) as Istio validates it, then [`requirement`] resolves what one
//! workload's port requires, from every policy that can apply:
//! 1. the mesh-wide policy: in the root namespace ([`Scope::Mesh`]) without a selector. A policy
//!    of the root namespace *with* a selector is ignored, as Istio ignores it;
//! 2. the namespace-wide policy: in the workload's namespace, without a selector;
//! 3. the workload policy: in the workload's namespace, with a selector its labels match;
//! 4. the workload policy's `portLevelMtls` entry for the port (the workload's own port, the one
//!    the client connected to on the pod).
//!
//! Each level that says UNSET (or is absent) inherits the level above; with nothing said, a
//! workload is PERMISSIVE. An empty `matchLabels` is no selector (Istio's rule). Where several
//! policies compete for one level, Istio takes the oldest; Weft has no creation time and takes the
//! first by name, so that the choice is the same on every node and after every restart.
//!
//! DISABLE is accepted and means PERMISSIVE, as in Istio's ambient mode (ztunnel treats both as
//! "plaintext allowed"): a meshed client always arrives over HBONE, which the receiving agent always
//! accepts, so there is nothing for DISABLE to turn off.

use std::{collections::BTreeMap, fmt, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize};

use crate::{
    is_dns_label,
    policy::{self, Metadata, Scope, Selector, Target},
};

/// Weft's own resource, Istio's shape (as [`policy::API_VERSION`] for AuthorizationPolicy).
pub const API_VERSION: &str = policy::API_VERSION;
pub const KIND: &str = "PeerAuthentication";

// === the resource, as written ===

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Spec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Keyed by the workload's port, written as a number or a string (`8080:` or `"8080":`); kept as
    /// written (a string) until [`compile`](PeerAuthentication::compile) checks it is a port.
    #[serde(default, deserialize_with = "port_keys", skip_serializing_if = "Option::is_none")]
    pub port_level_mtls: Option<BTreeMap<String, Mtls>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: Mode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    /// Inherit from the level above (mesh-wide: PERMISSIVE).
    #[default]
    Unset,
    /// Plaintext and mTLS accepted; in Weft (as in ztunnel) the same as PERMISSIVE.
    Disable,
    Permissive,
    Strict,
}

/// `portLevelMtls` keys: a number or a string, kept as a string.
fn port_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, Mtls>>, D::Error> {
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    struct Key(String);
    impl<'de> Deserialize<'de> for Key {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = Key;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a port number")
                }
                fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Key, E> {
                    Ok(Key(v.to_string()))
                }
                fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Key, E> {
                    Ok(Key(v.to_string()))
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key, E> {
                    Ok(Key(v.to_owned()))
                }
            }
            d.deserialize_any(V)
        }
    }
    let map = Option::<BTreeMap<Key, Mtls>>::deserialize(d)?;
    Ok(map.map(|m| m.into_iter().map(|(k, v)| (k.0, v)).collect()))
}

/// A validation failure naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("PeerAuthentication {namespace}/{name}: {field}: {problem}")]
pub struct Invalid {
    pub namespace: String,
    pub name: String,
    /// The path of the field, as written in YAML: `spec.portLevelMtls["8080"]`.
    pub field: String,
    pub problem: String,
}

// === the compiled policy ===

/// A checked policy, ready to resolve: built by [`PeerAuthentication::compile`] only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// `namespace/name`, shared with the decisions that name it.
    name: Arc<str>,
    namespace: String,
    scope: Scope,
    /// `None` also for an empty `matchLabels`.
    selector: Option<BTreeMap<String, String>>,
    mode: Mode,
    ports: BTreeMap<u16, Mode>,
}

impl PeerAuthentication {
    /// Whether the policy has no selector (or an empty one): it is its namespace's policy, or, in
    /// the root namespace, the mesh's.
    pub fn is_namespace_wide(&self) -> bool {
        self.spec.selector.as_ref().is_none_or(|s| s.match_labels.is_empty())
    }

    /// Checks every field as [`compile`](Self::compile) does.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.compile(Scope::Namespace).map(drop)
    }

    /// Checks the policy as Istio's validation does and compiles it for `scope`: names are DNS
    /// labels; the selector holds no `*`; `portLevelMtls` needs a non-empty selector (a mesh-wide or
    /// namespace-wide policy cannot have one), must not be empty when present, and its keys are
    /// ports (1-65535). The first problem is reported with its field.
    pub fn compile(&self, scope: Scope) -> Result<Compiled, Invalid> {
        let (meta, spec) = (&self.metadata, &self.spec);
        let invalid = |field: &str, problem: String| Invalid {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            field: field.to_owned(),
            problem,
        };
        if !is_dns_label(&meta.name) {
            return Err(invalid("metadata.name", "must be a lowercase DNS label".into()));
        }
        if !is_dns_label(&meta.namespace) {
            return Err(invalid("metadata.namespace", "must be a lowercase DNS label".into()));
        }
        let selector = match &spec.selector {
            Some(s) => {
                s.check().map_err(|p| invalid("spec.selector.matchLabels", p))?;
                (!s.match_labels.is_empty()).then(|| s.match_labels.clone())
            }
            None => None,
        };
        let mut ports = BTreeMap::new();
        if let Some(levels) = &spec.port_level_mtls {
            if levels.is_empty() {
                return Err(invalid(
                    "spec.portLevelMtls",
                    "must not be empty (leave it out to set no port)".into(),
                ));
            }
            if selector.is_none() {
                return Err(invalid(
                    "spec.portLevelMtls",
                    "a mesh-wide or namespace-wide policy (no spec.selector.matchLabels) cannot have port-level mTLS"
                        .into(),
                ));
            }
            for (key, mtls) in levels {
                let port = key.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    invalid(
                        &format!("spec.portLevelMtls[{key:?}]"),
                        format!("{key:?} is not a port number (1-65535)"),
                    )
                })?;
                if ports.insert(port, mtls.mode).is_some() {
                    return Err(invalid(
                        &format!("spec.portLevelMtls[{key:?}]"),
                        format!("port {port} is given twice"),
                    ));
                }
            }
        }
        Ok(Compiled {
            name: Arc::from(format!("{}/{}", meta.namespace, meta.name)),
            namespace: meta.namespace.clone(),
            scope,
            selector,
            mode: spec.mtls.as_ref().map_or(Mode::Unset, |m| m.mode),
            ports,
        })
    }
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

    /// The workloads it selects (`matchLabels`); `None`: all of its scope.
    pub fn selector(&self) -> Option<&BTreeMap<String, String>> {
        self.selector.as_ref()
    }

    /// Its mode, and its per-port modes.
    pub fn modes(&self) -> (Mode, &BTreeMap<u16, Mode>) {
        (self.mode, &self.ports)
    }

    /// The level this policy speaks for about `target`, if it applies to it at all.
    fn level(&self, target: Target<'_>) -> Option<Level> {
        match (self.scope, &self.selector) {
            (Scope::Mesh, None) => Some(Level::Mesh),
            // Istio ignores a selector policy of the root namespace.
            (Scope::Mesh, Some(_)) => None,
            (Scope::Namespace, _) if self.namespace != target.namespace => None,
            (Scope::Namespace, None) => Some(Level::Namespace),
            (Scope::Namespace, Some(s)) => policy::selects(s, target.labels).then_some(Level::Workload),
        }
    }
}

/// Mesh, then namespace, then workload: a later level overrides an earlier one unless UNSET.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Mesh,
    Namespace,
    Workload,
}

// === resolving ===

/// What a workload's port requires of a connection's transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// Plaintext and mTLS are accepted (PERMISSIVE or DISABLE, or nothing said).
    Permissive,
    /// Only mTLS: plaintext is refused. `policy` (`namespace/name`) is the policy whose STRICT
    /// decided it, for the access record.
    Strict { policy: Arc<str> },
}

impl Requirement {
    pub fn is_strict(&self) -> bool {
        matches!(self, Requirement::Strict { .. })
    }
}

/// Resolves what `port` of `target` requires under `policies` (any set: which apply is checked here,
/// so the caller may pass more than the target's). See the module documentation for the rules.
/// Allocates nothing.
pub fn requirement<'p>(policies: impl IntoIterator<Item = &'p Compiled>, target: Target<'_>, port: u16) -> Requirement {
    // The chosen policy of each level: the first by name.
    let mut chosen: [Option<&Compiled>; 3] = [None; 3];
    for p in policies {
        if let Some(level) = p.level(target) {
            let slot = &mut chosen[level as usize];
            if slot.is_none_or(|c| p.name < c.name) {
                *slot = Some(p);
            }
        }
    }
    let mut decided: Option<(Mode, &Compiled)> = None;
    for p in chosen.into_iter().flatten() {
        if p.mode != Mode::Unset {
            decided = Some((p.mode, p));
        }
    }
    if let Some(workload) = chosen[Level::Workload as usize]
        && let Some(&mode) = workload.ports.get(&port)
        && mode != Mode::Unset
    {
        decided = Some((mode, workload));
    }
    match decided {
        Some((Mode::Strict, p)) => Requirement::Strict { policy: p.name.clone() },
        _ => Requirement::Permissive,
    }
}

#[cfg(test)]
mod tests;
