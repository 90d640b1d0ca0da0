//! Kubernetes objects into the model's [`Object`]s: pure functions, one per kind.
//!
//! The API server has already checked names, labels and annotation keys, so what is left is what
//! Weft adds: which pods are mesh workloads, which service ports it can serve, and the whole of a
//! policy's validation, which is the local store's ([`manifest::authorization_policy`],
//! [`manifest::peer_authentication`]): a resource refused here is refused there with the same
//! field and text.
//!
//! Annotations: only Weft's own (`weft.dev/...`) are carried into the model. Nothing else reads
//! them, and every namespace and workload goes to every node: a
//! `kubectl.kubernetes.io/last-applied-configuration` would cost each agent a copy of the object.
//! A value of Weft's annotation that the local store would refuse is kept, with a warning; the
//! agents read it as no annotation ([`weft_model::enrollment::is_enrolled`]).

use std::{collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::{
    api::core::v1 as core, apimachinery::pkg::apis::meta::v1::ObjectMeta, apimachinery::pkg::util::intstr::IntOrString,
};

use super::crd;
use crate::store::{
    Kind, Object, ObjectRef,
    manifest::{self, FieldProblem},
    objects::{Meta, Namespace, Pod, Service, ServiceAccount, ServicePort},
};

/// The prefix of the annotations the model keeps.
pub const WEFT_ANNOTATION_PREFIX: &str = "weft.dev/";

/// An object Weft cannot take into the model, naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {problem}")]
pub struct Invalid {
    pub object: ObjectRef,
    pub problem: FieldProblem,
}

/// Something of an object Weft leaves out, or keeps although the local store would refuse it; the
/// object itself is in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// A converted object and what was left out of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    pub object: Object,
    pub warnings: Vec<Warning>,
}

pub fn namespace(ns: &core::Namespace) -> Result<Converted, Invalid> {
    let name = name(&ns.metadata, Kind::Namespace)?;
    let mut warnings = Vec::new();
    let meta = meta(&ns.metadata, &mut warnings);
    Ok(Converted {
        object: Object::Namespace(Namespace { name, meta }),
        warnings,
    })
}

pub fn service_account(sa: &core::ServiceAccount) -> Result<Converted, Invalid> {
    let (namespace, name) = names(&sa.metadata, Kind::ServiceAccount)?;
    let mut warnings = Vec::new();
    let meta = meta(&sa.metadata, &mut warnings);
    Ok(Converted {
        object: Object::ServiceAccount(ServiceAccount { namespace, name, meta }),
        warnings,
    })
}

/// A pod is a mesh workload (`Some`) once it is scheduled (`spec.nodeName`), with or without an
/// address yet, until it finishes (phase `Succeeded` or `Failed`: its address may be another pod's
/// next). A scheduled pod has no address while its sandbox is made, and that is when the CNI plugin
/// asks its node's agent about it: the agent must know the pod then (it takes the addresses from
/// the CNI report), or the pod could not start. Addresses: `status.podIPs`, or `status.podIP` from
/// an API server that sets only that. A pod on the host's
/// network is never one: its address is the node's. Node: `spec.nodeName`; service account:
/// `spec.serviceAccountName`, or `default`; addresses: the first of each family, in the order
/// given.
pub fn pod(pod: &core::Pod) -> Result<Option<Converted>, Invalid> {
    let (namespace, name) = names(&pod.metadata, Kind::Pod)?;
    let object = ObjectRef {
        kind: Kind::Pod,
        namespace: namespace.clone(),
        name: name.clone(),
    };
    let invalid = |field: &str, problem: String| Invalid {
        object: object.clone(),
        problem: FieldProblem {
            field: Some(field.to_owned()),
            problem,
        },
    };
    let Some(spec) = &pod.spec else {
        return Ok(None);
    };
    let status = pod.status.as_ref();
    let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    if spec.host_network == Some(true) {
        return Ok(None);
    }
    if let Some("Succeeded" | "Failed") = status.and_then(|s| s.phase.as_deref()) {
        return Ok(None);
    }
    let mut written: Vec<(String, &str)> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip.as_str()))
        .collect();
    if written.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()).filter(|ip| !ip.is_empty())
    {
        written.push(("status.podIP".to_owned(), ip));
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for (field, text) in written {
        let ip: IpAddr = text
            .parse()
            .map_err(|_| invalid(&field, format!("{text:?} is not an IP address")))?;
        if !ips.iter().any(|seen| seen.is_ipv4() == ip.is_ipv4()) {
            ips.push(ip);
        }
    }
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    weft_model::workload::validate_uid(&uid).map_err(|p| invalid("metadata.uid", p))?;
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    let mut warnings = Vec::new();
    let meta = meta(&pod.metadata, &mut warnings);
    Ok(Some(Converted {
        object: Object::Pod(Pod {
            namespace,
            name,
            uid,
            meta,
            node,
            service_account,
            ips,
        }),
        warnings,
    }))
}

/// A service with its selector, cluster IPs (`spec.clusterIPs`, or `spec.clusterIP`; `None` and
/// empty are no address; the first of each family) and TCP ports. An ExternalName service selects
/// nothing. Ports the model cannot carry are left out, the service stays:
///
/// - other protocols than TCP (UDP, SCTP), silently: Weft's data plane is TCP only;
/// - a named `targetPort` (`http`), with a warning: the model gives a service port one target port
///   for every endpoint, while a name may resolve to another number in each selected pod. The
///   port is left out rather than guessed; give the number to have it served.
pub fn service(svc: &core::Service) -> Result<Converted, Invalid> {
    let (namespace, name) = names(&svc.metadata, Kind::Service)?;
    let object = ObjectRef {
        kind: Kind::Service,
        namespace: namespace.clone(),
        name: name.clone(),
    };
    let mut warnings = Vec::new();
    let meta = meta(&svc.metadata, &mut warnings);
    let Some(spec) = &svc.spec else {
        return Ok(Converted {
            object: Object::Service(Service {
                namespace,
                name,
                meta,
                selector: None,
                cluster_ips: Vec::new(),
                ports: Vec::new(),
            }),
            warnings,
        });
    };
    let external = spec.type_.as_deref() == Some("ExternalName");

    let mut written: Vec<(String, &str)> = spec
        .cluster_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
        .collect();
    if written.is_empty()
        && let Some(ip) = spec.cluster_ip.as_deref()
    {
        written.push(("spec.clusterIP".to_owned(), ip));
    }
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for (field, text) in written {
        if text.is_empty() || text == "None" || external {
            continue;
        }
        let ip: IpAddr = text.parse().map_err(|_| Invalid {
            object: object.clone(),
            problem: FieldProblem {
                field: Some(field),
                problem: format!("{text:?} is not an IP address"),
            },
        })?;
        if !cluster_ips.iter().any(|seen| seen.is_ipv4() == ip.is_ipv4()) {
            cluster_ips.push(ip);
        }
    }

    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let at = |field: &str| format!("spec.ports[{i}].{field}");
        let Some(port) = port_number(p.port) else {
            warnings.push(Warning {
                field: at("port"),
                problem: format!("{} is not in 1-65535: the port is left out", p.port),
            });
            continue;
        };
        let target_port = match &p.target_port {
            None => port,
            Some(IntOrString::Int(t)) => match port_number(*t) {
                Some(t) => t,
                None => {
                    warnings.push(Warning {
                        field: at("targetPort"),
                        problem: format!("{t} is not in 1-65535: the port is left out"),
                    });
                    continue;
                }
            },
            Some(IntOrString::String(s)) => match s.parse::<i32>().ok().and_then(port_number) {
                Some(t) => t,
                None => {
                    warnings.push(Warning {
                        field: at("targetPort"),
                        problem: format!(
                            "{s:?}: named target ports are not supported (one number must serve every endpoint): the port is left out"
                        ),
                    });
                    continue;
                }
            },
        };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            port,
            target_port,
        });
    }
    Ok(Converted {
        object: Object::Service(Service {
            namespace,
            name,
            meta,
            selector: if external { None } else { spec.selector.clone() },
            cluster_ips,
            ports,
        }),
        warnings,
    })
}

/// Reads and checks the policy by the local store's rule; a refusal names the field.
pub fn authorization_policy(cr: &crd::AuthorizationPolicy) -> Result<Object, Invalid> {
    let (namespace, name) = names(&cr.metadata, Kind::AuthorizationPolicy)?;
    manifest::authorization_policy(&namespace, &name, cr.spec.0.0.clone())
        .map(Object::AuthorizationPolicy)
        .map_err(|problem| Invalid {
            object: ObjectRef {
                kind: Kind::AuthorizationPolicy,
                namespace,
                name,
            },
            problem,
        })
}

/// As [`authorization_policy`].
pub fn peer_authentication(cr: &crd::PeerAuthentication) -> Result<Object, Invalid> {
    let (namespace, name) = names(&cr.metadata, Kind::PeerAuthentication)?;
    manifest::peer_authentication(&namespace, &name, cr.spec.0.0.clone())
        .map(Object::PeerAuthentication)
        .map_err(|problem| Invalid {
            object: ObjectRef {
                kind: Kind::PeerAuthentication,
                namespace,
                name,
            },
            problem,
        })
}

/// The reference of a namespaced or cluster object, as far as its metadata names it.
pub fn object_ref(kind: Kind, meta: &ObjectMeta) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: if kind.is_namespaced() {
            meta.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        },
        name: meta.name.clone().unwrap_or_default(),
    }
}

// === helpers ===

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn name(meta: &ObjectMeta, kind: Kind) -> Result<String, Invalid> {
    meta.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| Invalid {
        object: object_ref(kind, meta),
        problem: FieldProblem {
            field: Some("metadata.name".into()),
            problem: "required".into(),
        },
    })
}

fn names(meta: &ObjectMeta, kind: Kind) -> Result<(String, String), Invalid> {
    let name = name(meta, kind)?;
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Invalid {
            object: object_ref(kind, meta),
            problem: FieldProblem {
                field: Some("metadata.namespace".into()),
                problem: "required".into(),
            },
        })?;
    Ok((namespace, name))
}

/// Labels, and Weft's annotations (a value the local store would refuse is kept, with a warning).
fn meta(meta: &ObjectMeta, warnings: &mut Vec<Warning>) -> Meta {
    let annotations: BTreeMap<String, String> = meta
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(WEFT_ANNOTATION_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, value) in &annotations {
        if let Err(problem) = weft_model::annotations::validate_value(key, value) {
            warnings.push(Warning {
                field: format!("metadata.annotations[{key:?}]"),
                problem: format!("{problem}: read as no annotation"),
            });
        }
    }
    Meta {
        labels: meta.labels.clone().unwrap_or_default(),
        annotations,
    }
}

#[cfg(test)]
mod tests;
