//! Conversions between the wire types and Weft's model, done once at the boundary: the agent turns
//! what it receives into model types (`TryFrom`, checked), the controller turns model types into wire
//! types (`From`, infallible).

use std::net::IpAddr;

use weft_model::policy::{self, AuthorizationPolicy};

use crate::v1;

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

// === policy ===

impl From<&AuthorizationPolicy> for v1::Policy {
    fn from(p: &AuthorizationPolicy) -> Self {
        v1::Policy {
            namespace: p.metadata.namespace.clone(),
            name: p.metadata.name.clone(),
            selector: p.spec.selector.as_ref().map(|s| v1::Selector {
                match_labels: s.match_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            }),
            action: match p.spec.action {
                policy::Action::Allow => v1::Action::Allow,
                policy::Action::Deny => v1::Action::Deny,
            } as i32,
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
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|t| v1::Operation {
                            ports: t.operation.ports.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl TryFrom<&v1::Policy> for AuthorizationPolicy {
    type Error = Invalid;

    /// Converts and validates ([`AuthorizationPolicy::validate`]): a policy that converts is one the
    /// evaluator can use.
    fn try_from(p: &v1::Policy) -> Result<Self, Invalid> {
        let resource = format!("policy {}/{}", p.namespace, p.name);
        let action = match v1::Action::try_from(p.action) {
            Ok(v1::Action::Allow) => policy::Action::Allow,
            Ok(v1::Action::Deny) => policy::Action::Deny,
            Err(_) => {
                return Err(Invalid {
                    resource,
                    field: "action".into(),
                    problem: format!("unknown action {}", p.action),
                });
            }
        };
        let out = AuthorizationPolicy {
            metadata: policy::Metadata {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
            },
            spec: policy::Spec {
                selector: p.selector.as_ref().map(|s| policy::Selector {
                    match_labels: s.match_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                }),
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
                                    namespaces: s.namespaces.clone(),
                                    ip_blocks: s.ip_blocks.clone(),
                                },
                            })
                            .collect(),
                        to: r
                            .to
                            .iter()
                            .map(|o| policy::To {
                                operation: policy::Operation { ports: o.ports.clone() },
                            })
                            .collect(),
                    })
                    .collect(),
            },
        };
        out.validate().map_err(|e| Invalid {
            resource,
            field: e.field,
            problem: e.problem,
        })?;
        Ok(out)
    }
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

    use weft_model::policy::{Action, From, Metadata, Operation, Rule, Selector, Source, Spec, To};

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
                    from: vec![From {
                        source: Source {
                            principals: vec!["spiffe://cluster.local/ns/b/*".into()],
                            namespaces: vec!["b".into()],
                            ip_blocks: vec!["10.0.0.0/8".into()],
                        },
                    }],
                    to: vec![To {
                        operation: Operation {
                            ports: vec!["8080".into()],
                        },
                    }],
                }],
            },
        }
    }

    #[test]
    fn policy_round_trips() {
        let p = sample_policy();
        let wire = v1::Policy::from(&p);
        assert_eq!(wire.action, v1::Action::Deny as i32);
        assert_eq!(AuthorizationPolicy::try_from(&wire).unwrap(), p);

        let mut no_selector = p.clone();
        no_selector.spec.selector = None;
        no_selector.spec.action = Action::Allow;
        let wire = v1::Policy::from(&no_selector);
        assert!(wire.selector.is_none());
        assert_eq!(AuthorizationPolicy::try_from(&wire).unwrap(), no_selector);
    }

    #[test]
    fn invalid_policy_names_the_field() {
        let mut wire = v1::Policy::from(&sample_policy());
        wire.rules[0].to[0].ports[0] = "http".into();
        let err = AuthorizationPolicy::try_from(&wire).unwrap_err();
        assert_eq!(err.field, "spec.rules[0].to[0].operation.ports[0]");
        assert!(err.to_string().starts_with("policy shop/deny-b: "), "{err}");
        wire.action = 7;
        assert_eq!(AuthorizationPolicy::try_from(&wire).unwrap_err().field, "action");
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
