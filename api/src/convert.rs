//! Conversions between the wire types and Weft's model, done once at the boundary: the agent turns
//! what it receives into model types (`TryFrom`, checked), the controller turns model types into wire
//! types (`From`, infallible).

use std::net::IpAddr;

use weft_model::policy::{self, AuthorizationPolicy};

use crate::v1;

mod peer_auth;

pub use peer_auth::peer_authentication_to_wire;

/// A wire resource that does not convert: which resource, which field, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// `workload default/web`, `policy shop/deny`.
    pub resource: String,
    pub field: String,
    pub problem: String,
}

// (Display and Error by hand: this crate does not depend on thiserror.)
impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.resource, self.field, self.problem)
    }
}

impl std::error::Error for Invalid {}

// === shared by policies and PeerAuthentications ===

fn selector_to_wire(s: &policy::Selector) -> v1::Selector {
    v1::Selector {
        match_labels: s.match_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

fn selector_from_wire(s: &v1::Selector) -> policy::Selector {
    policy::Selector {
        match_labels: s.match_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

fn scope_to_wire(scope: policy::Scope) -> i32 {
    let scope = match scope {
        policy::Scope::Namespace => v1::Scope::Namespace,
        policy::Scope::Mesh => v1::Scope::Mesh,
    };
    scope as i32
}

/// The scope a wire value names; none for a value this agent does not know.
fn scope_from_wire(scope: i32) -> Option<policy::Scope> {
    match v1::Scope::try_from(scope) {
        Ok(v1::Scope::Namespace) => Some(policy::Scope::Namespace),
        Ok(v1::Scope::Mesh) => Some(policy::Scope::Mesh),
        Err(_) => None,
    }
}

// === policy ===

/// The wire form of a validated policy, with the scope the controller gives it.
pub fn policy_to_wire(p: &AuthorizationPolicy, scope: policy::Scope) -> v1::Policy {
    v1::Policy {
        namespace: p.metadata.namespace.clone(),
        name: p.metadata.name.clone(),
        selector: p.spec.selector.as_ref().map(selector_to_wire),
        action: match p.spec.action {
            policy::Action::Allow => v1::Action::Allow as i32,
            policy::Action::Deny => v1::Action::Deny as i32,
            policy::Action::Audit => v1::Action::Audit as i32,
            // Refused by validation; should one get here, the agent refuses it (unknown action).
            policy::Action::Custom => -1,
        },
        rules: p
            .spec
            .rules
            .iter()
            .map(|r| v1::Rule {
                from: r
                    .from
                    .iter()
                    .map(|f| v1::PolicySource {
                        principals: f.source.principals.clone(),
                        namespaces: f.source.namespaces.clone(),
                        ip_blocks: f.source.ip_blocks.clone(),
                        not_principals: f.source.not_principals.clone(),
                        not_namespaces: f.source.not_namespaces.clone(),
                        not_ip_blocks: f.source.not_ip_blocks.clone(),
                        service_accounts: f.source.service_accounts.clone(),
                        not_service_accounts: f.source.not_service_accounts.clone(),
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|t| v1::Operation {
                        ports: t.operation.ports.clone(),
                        not_ports: t.operation.not_ports.clone(),
                    })
                    .collect(),
                when: r
                    .when
                    .iter()
                    .map(|c| v1::Condition {
                        key: c.key.clone(),
                        values: c.values.clone(),
                        not_values: c.not_values.clone(),
                    })
                    .collect(),
            })
            .collect(),
        scope: scope_to_wire(scope),
    }
}

impl TryFrom<&v1::Policy> for AuthorizationPolicy {
    type Error = Invalid;

    /// Converts and validates ([`AuthorizationPolicy::validate`]): a policy that converts is one the
    /// evaluator can use. The scope is not part of the model's policy: see [`policy::Compiled`].
    fn try_from(p: &v1::Policy) -> Result<Self, Invalid> {
        let (policy, _) = policy_from_wire(p)?;
        policy.validate().map_err(|e| invalid_policy(p, e))?;
        Ok(policy)
    }
}

impl TryFrom<&v1::Policy> for policy::Compiled {
    type Error = Invalid;

    /// Converts, validates and compiles the policy for its scope: what the agent decides with.
    fn try_from(p: &v1::Policy) -> Result<Self, Invalid> {
        let (policy, scope) = policy_from_wire(p)?;
        policy.compile(scope).map_err(|e| invalid_policy(p, e))
    }
}

fn invalid_policy(p: &v1::Policy, e: policy::Invalid) -> Invalid {
    Invalid {
        resource: format!("policy {}/{}", p.namespace, p.name),
        field: e.field,
        problem: e.problem,
    }
}

fn policy_from_wire(p: &v1::Policy) -> Result<(AuthorizationPolicy, policy::Scope), Invalid> {
    let invalid = |field: &str, problem: String| Invalid {
        resource: format!("policy {}/{}", p.namespace, p.name),
        field: field.into(),
        problem,
    };
    let action = match v1::Action::try_from(p.action) {
        Ok(v1::Action::Allow) => policy::Action::Allow,
        Ok(v1::Action::Deny) => policy::Action::Deny,
        Ok(v1::Action::Audit) => policy::Action::Audit,
        Err(_) => return Err(invalid("action", format!("unknown action {}", p.action))),
    };
    let scope = scope_from_wire(p.scope).ok_or_else(|| invalid("scope", format!("unknown scope {}", p.scope)))?;
    let policy = AuthorizationPolicy {
        metadata: policy::Metadata {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
        },
        spec: policy::Spec {
            selector: p.selector.as_ref().map(selector_from_wire),
            action,
            rules: p
                .rules
                .iter()
                .map(|r| policy::Rule {
                    from: r
                        .from
                        .iter()
                        .map(|s| policy::From {
                            source: policy::Source {
                                principals: s.principals.clone(),
                                not_principals: s.not_principals.clone(),
                                namespaces: s.namespaces.clone(),
                                not_namespaces: s.not_namespaces.clone(),
                                service_accounts: s.service_accounts.clone(),
                                not_service_accounts: s.not_service_accounts.clone(),
                                ip_blocks: s.ip_blocks.clone(),
                                not_ip_blocks: s.not_ip_blocks.clone(),
                                ..policy::Source::default()
                            },
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|o| policy::To {
                            operation: policy::Operation {
                                ports: o.ports.clone(),
                                not_ports: o.not_ports.clone(),
                                ..policy::Operation::default()
                            },
                        })
                        .collect(),
                    when: r
                        .when
                        .iter()
                        .map(|c| policy::Condition {
                            key: c.key.clone(),
                            values: c.values.clone(),
                            not_values: c.not_values.clone(),
                        })
                        .collect(),
                })
                .collect(),
            ..policy::Spec::default()
        },
    };
    Ok((policy, scope))
}

// === workload ===

impl TryFrom<&v1::Workload> for weft_model::Pod {
    type Error = Invalid;

    /// Every address must parse; namespace, name and node must be present; the uid must be a UID
    /// ([`weft_model::workload::validate_uid`]: the agent names paths after it, so a bad one never
    /// gets that far). `netns` is left `None` (the agent learns it from the CNI plugin).
    fn try_from(w: &v1::Workload) -> Result<Self, Invalid> {
        let invalid = |field: String, problem: String| Invalid {
            resource: format!("workload {}/{}", w.namespace, w.name),
            field,
            problem,
        };
        for (field, value) in [("namespace", &w.namespace), ("name", &w.name), ("node", &w.node)] {
            if value.is_empty() {
                return Err(invalid(field.into(), "required".into()));
            }
        }
        weft_model::workload::validate_uid(&w.uid).map_err(|problem| invalid("uid".into(), problem))?;
        let ips = w
            .ips
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<IpAddr>()
                    .map_err(|_| invalid(format!("ips[{i}]"), format!("{s:?} is not an IP address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(weft_model::Pod {
            uid: w.uid.clone(),
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            node: w.node.clone(),
            service_account: if w.service_account.is_empty() {
                "default".into()
            } else {
                w.service_account.clone()
            },
            labels: w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            annotations: w.annotations.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ips,
            netns: None,
        })
    }
}

// === namespace ===

impl From<&v1::Namespace> for weft_model::Namespace {
    /// The model keeps only what enrollment reads: name and annotations (labels are dropped).
    fn from(n: &v1::Namespace) -> Self {
        weft_model::Namespace {
            name: n.name.clone(),
            annotations: n.annotations.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use weft_model::policy::{Action, Condition, From, Metadata, Operation, Rule, Scope, Selector, Source, Spec, To};

    use super::*;

    fn sample_policy() -> AuthorizationPolicy {
        AuthorizationPolicy {
            metadata: Metadata {
                name: "deny-b".into(),
                namespace: "shop".into(),
            },
            spec: Spec {
                selector: Some(Selector {
                    match_labels: BTreeMap::from([("app".into(), "cart".into())]),
                }),
                action: Action::Deny,
                rules: vec![Rule {
                    from: vec![
                        From {
                            source: Source {
                                principals: vec!["spiffe://cluster.local/ns/b/*".into()],
                                not_principals: vec!["cluster.local/ns/b/sa/admin".into()],
                                namespaces: vec!["b".into()],
                                not_namespaces: vec!["b-test".into()],
                                ip_blocks: vec!["10.0.0.0/8".into()],
                                not_ip_blocks: vec!["10.1.0.0/16".into()],
                                ..Source::default()
                            },
                        },
                        From {
                            source: Source {
                                service_accounts: vec!["b/web".into()],
                                not_service_accounts: vec!["web".into()],
                                ..Source::default()
                            },
                        },
                    ],
                    to: vec![To {
                        operation: Operation {
                            ports: vec!["8080".into()],
                            not_ports: vec!["9090".into()],
                            ..Operation::default()
                        },
                    }],
                    when: vec![Condition {
                        key: "destination.ip".into(),
                        values: vec!["10.244.0.0/16".into()],
                        not_values: vec!["10.244.1.1".into()],
                    }],
                }],
                ..Spec::default()
            },
        }
    }

    #[test]
    fn policy_round_trips_with_every_l4_field() {
        let p = sample_policy();
        let wire = policy_to_wire(&p, Scope::Namespace);
        assert_eq!(wire.action, v1::Action::Deny as i32);
        assert_eq!(wire.scope, v1::Scope::Namespace as i32);
        assert_eq!(AuthorizationPolicy::try_from(&wire).unwrap(), p);

        let mut audit = p.clone();
        audit.spec.selector = None;
        audit.spec.action = Action::Audit;
        let wire = policy_to_wire(&audit, Scope::Mesh);
        assert!(wire.selector.is_none());
        assert_eq!(wire.scope, v1::Scope::Mesh as i32);
        assert_eq!(AuthorizationPolicy::try_from(&wire).unwrap(), audit);
    }

    #[test]
    fn compiled_policy_keeps_the_wire_scope() {
        let mut p = sample_policy();
        p.metadata.namespace = "weft-system".into();
        for scope in [Scope::Namespace, Scope::Mesh] {
            let compiled = policy::Compiled::try_from(&policy_to_wire(&p, scope)).unwrap();
            assert_eq!(compiled, p.compile(scope).unwrap());
            assert_eq!(compiled.scope(), scope);
        }
    }

    #[test]
    fn invalid_policy_names_the_field() {
        let mut wire = policy_to_wire(&sample_policy(), Scope::Namespace);
        wire.rules[0].to[0].not_ports[0] = "http".into();
        let err = policy::Compiled::try_from(&wire).unwrap_err();
        assert_eq!(err.field, "spec.rules[0].to[0].operation.notPorts[0]");
        assert!(err.to_string().starts_with("policy shop/deny-b: "), "{err}");
        assert_eq!(AuthorizationPolicy::try_from(&wire).unwrap_err(), err);
        wire.action = 7;
        assert_eq!(AuthorizationPolicy::try_from(&wire).unwrap_err().field, "action");
        let mut wire = policy_to_wire(&sample_policy(), Scope::Namespace);
        wire.scope = 9;
        assert_eq!(policy::Compiled::try_from(&wire).unwrap_err().field, "scope");
        let mut custom = sample_policy();
        custom.spec.action = Action::Custom;
        let err = AuthorizationPolicy::try_from(&policy_to_wire(&custom, Scope::Namespace)).unwrap_err();
        assert_eq!(
            (err.resource.as_str(), err.field.as_str()),
            ("policy shop/deny-b", "action")
        );
    }

    fn sample_workload() -> v1::Workload {
        v1::Workload {
            uid: "0b5e1c2a-7d3f-4a61-9c8e-2f4b6d8a1e03".into(),
            namespace: "default".into(),
            name: "web".into(),
            node: "node1".into(),
            service_account: "web".into(),
            identity: "spiffe://cluster.local/ns/default/sa/web".into(),
            labels: HashMap::from([("app".into(), "web".into())]),
            annotations: HashMap::from([("weft.dev/dataplane-mode".into(), "ambient".into())]),
            ips: vec!["10.244.1.5".into(), "fd00::5".into()],
            services: vec!["default/web".into()],
        }
    }

    #[test]
    fn workload_converts_to_pod() {
        let pod = weft_model::Pod::try_from(&sample_workload()).unwrap();
        assert_eq!(pod.qualified_name(), "default/web");
        assert_eq!(pod.node, "node1");
        assert_eq!(pod.service_account, "web");
        assert_eq!(
            pod.ips,
            ["10.244.1.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]
        );
        assert_eq!(pod.labels["app"], "web");
        assert_eq!(pod.annotations["weft.dev/dataplane-mode"], "ambient");
        assert_eq!(pod.netns, None);
    }

    #[test]
    fn workload_with_bad_address_names_the_field() {
        let mut w = sample_workload();
        w.ips[1] = "nope".into();
        let err = weft_model::Pod::try_from(&w).unwrap_err();
        assert_eq!(err.field, "ips[1]");
        assert_eq!(
            err.to_string(),
            "workload default/web: ips[1]: \"nope\" is not an IP address"
        );
        let mut w = sample_workload();
        w.node.clear();
        assert_eq!(weft_model::Pod::try_from(&w).unwrap_err().field, "node");
    }

    #[test]
    fn workload_with_a_uid_that_is_not_a_uuid_is_refused() {
        for bad in ["", "../x", "a/b", "..", "u1", "0B5E1C2A-7D3F-4A61-9C8E-2F4B6D8A1E03"] {
            let mut w = sample_workload();
            w.uid = bad.into();
            let err = weft_model::Pod::try_from(&w).expect_err(bad);
            assert_eq!(err.field, "uid");
            assert_eq!(
                err.to_string(),
                format!("workload default/web: uid: {bad:?} is not a UID (8-4-4-4-12 lowercase hex)")
            );
        }
    }

    #[test]
    fn namespace_keeps_name_and_annotations() {
        let wire = v1::Namespace {
            name: "shop".into(),
            labels: HashMap::from([("team".into(), "a".into())]),
            annotations: HashMap::from([("weft.dev/dataplane-mode".into(), "ambient".into())]),
        };
        let ns = weft_model::Namespace::from(&wire);
        assert_eq!(ns.name, "shop");
        assert_eq!(ns.annotations["weft.dev/dataplane-mode"], "ambient");
    }
}
