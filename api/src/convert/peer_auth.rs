//! PeerAuthentication on the wire: the controller sends validated policies with their scope; the
//! agent converts and compiles each one ([`peer_auth::Compiled`]) or refuses it by field.

use std::collections::BTreeMap;

use weft_model::{
    peer_auth::{self, Mode, PeerAuthentication},
    policy::{self, Scope},
};

use super::{Invalid, scope_from_wire, scope_to_wire, selector_from_wire, selector_to_wire};
use crate::v1;

/// The wire form of a validated PeerAuthentication, with the scope the controller gives it. A port
/// key that is not a port (validation refuses those) goes out as 0, which the agent refuses.
pub fn peer_authentication_to_wire(p: &PeerAuthentication, scope: Scope) -> v1::PeerAuthentication {
    let mut port_level_mtls: Vec<v1::PortMtls> = p
        .spec
        .port_level_mtls
        .iter()
        .flatten()
        .map(|(port, mtls)| v1::PortMtls {
            port: port.parse().unwrap_or(0),
            mode: mode_to_wire(mtls.mode) as i32,
        })
        .collect();
    port_level_mtls.sort_by_key(|p| p.port);
    v1::PeerAuthentication {
        namespace: p.metadata.namespace.clone(),
        name: p.metadata.name.clone(),
        selector: p.spec.selector.as_ref().map(selector_to_wire),
        mode: mode_to_wire(p.spec.mtls.as_ref().map_or(Mode::Unset, |m| m.mode)) as i32,
        port_level_mtls,
        scope: scope_to_wire(scope),
    }
}

impl TryFrom<&v1::PeerAuthentication> for peer_auth::Compiled {
    type Error = Invalid;

    /// Converts, validates and compiles the policy for its scope: what the agent resolves with.
    fn try_from(p: &v1::PeerAuthentication) -> Result<Self, Invalid> {
        let (policy, scope) = from_wire(p)?;
        policy.compile(scope).map_err(|e| Invalid {
            resource: resource(p),
            field: e.field,
            problem: e.problem,
        })
    }
}

fn resource(p: &v1::PeerAuthentication) -> String {
    format!("peerauthentication {}/{}", p.namespace, p.name)
}

fn mode_to_wire(mode: Mode) -> v1::MtlsMode {
    match mode {
        Mode::Unset => v1::MtlsMode::MtlsUnset,
        Mode::Disable => v1::MtlsMode::MtlsDisable,
        Mode::Permissive => v1::MtlsMode::MtlsPermissive,
        Mode::Strict => v1::MtlsMode::MtlsStrict,
    }
}

fn from_wire(p: &v1::PeerAuthentication) -> Result<(PeerAuthentication, Scope), Invalid> {
    let invalid = |field: &str, problem: String| Invalid {
        resource: resource(p),
        field: field.into(),
        problem,
    };
    let mode = |field: &str, m: i32| match v1::MtlsMode::try_from(m) {
        Ok(v1::MtlsMode::MtlsUnset) => Ok(Mode::Unset),
        Ok(v1::MtlsMode::MtlsDisable) => Ok(Mode::Disable),
        Ok(v1::MtlsMode::MtlsPermissive) => Ok(Mode::Permissive),
        Ok(v1::MtlsMode::MtlsStrict) => Ok(Mode::Strict),
        Err(_) => Err(invalid(field, format!("unknown mTLS mode {m}"))),
    };
    let scope = scope_from_wire(p.scope).ok_or_else(|| invalid("scope", format!("unknown scope {}", p.scope)))?;
    let port_level_mtls = if p.port_level_mtls.is_empty() {
        None
    } else {
        let mut ports = BTreeMap::new();
        for (i, level) in p.port_level_mtls.iter().enumerate() {
            let field = format!("port_level_mtls[{i}]");
            let m = mode(&field, level.mode)?;
            if ports
                .insert(level.port.to_string(), peer_auth::Mtls { mode: m })
                .is_some()
            {
                return Err(invalid(&field, format!("port {} is given twice", level.port)));
            }
        }
        Some(ports)
    };
    let policy = PeerAuthentication {
        metadata: policy::Metadata {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
        },
        spec: peer_auth::Spec {
            selector: p.selector.as_ref().map(selector_from_wire),
            mtls: Some(peer_auth::Mtls {
                mode: mode("mode", p.mode)?,
            }),
            port_level_mtls,
        },
    };
    Ok((policy, scope))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_model::policy::Target;

    use super::*;

    fn sample() -> PeerAuthentication {
        PeerAuthentication {
            metadata: policy::Metadata {
                name: "cart".into(),
                namespace: "shop".into(),
            },
            spec: peer_auth::Spec {
                selector: Some(policy::Selector {
                    match_labels: BTreeMap::from([("app".into(), "cart".into())]),
                }),
                mtls: Some(peer_auth::Mtls { mode: Mode::Strict }),
                port_level_mtls: Some(BTreeMap::from([
                    ("9090".into(), peer_auth::Mtls { mode: Mode::Disable }),
                    ("8080".into(), peer_auth::Mtls { mode: Mode::Permissive }),
                ])),
            },
        }
    }

    #[test]
    fn peer_authentication_round_trips_with_scope_and_ports() {
        let p = sample();
        for scope in [Scope::Namespace, Scope::Mesh] {
            let wire = peer_authentication_to_wire(&p, scope);
            assert_eq!(
                wire.port_level_mtls.iter().map(|l| l.port).collect::<Vec<_>>(),
                [8080, 9090],
                "sorted by port"
            );
            let compiled = peer_auth::Compiled::try_from(&wire).unwrap();
            assert_eq!(compiled, p.compile(scope).unwrap());
            assert_eq!(compiled.scope(), scope);
        }
        // What it decides survives the trip.
        let labels = BTreeMap::from([("app".to_owned(), "cart".to_owned())]);
        let target = Target {
            namespace: "shop",
            labels: &labels,
        };
        let compiled = peer_auth::Compiled::try_from(&peer_authentication_to_wire(&p, Scope::Namespace)).unwrap();
        assert!(!peer_auth::requirement([&compiled], target, 8080).is_strict());
        assert!(peer_auth::requirement([&compiled], target, 7070).is_strict());
    }

    #[test]
    fn invalid_peer_authentication_names_the_field() {
        let mut wire = peer_authentication_to_wire(&sample(), Scope::Namespace);
        wire.mode = 9;
        let err = peer_auth::Compiled::try_from(&wire).unwrap_err();
        assert_eq!(
            err.to_string(),
            "peerauthentication shop/cart: mode: unknown mTLS mode 9"
        );
        let mut wire = peer_authentication_to_wire(&sample(), Scope::Namespace);
        wire.port_level_mtls[1].port = 8080;
        assert_eq!(
            peer_auth::Compiled::try_from(&wire).unwrap_err().field,
            "port_level_mtls[1]"
        );
        let mut wire = peer_authentication_to_wire(&sample(), Scope::Namespace);
        wire.port_level_mtls[0].port = 0;
        assert_eq!(
            peer_auth::Compiled::try_from(&wire).unwrap_err().field,
            "spec.portLevelMtls[\"0\"]"
        );
        let mut wire = peer_authentication_to_wire(&sample(), Scope::Namespace);
        wire.selector = None;
        assert_eq!(
            peer_auth::Compiled::try_from(&wire).unwrap_err().field,
            "spec.portLevelMtls"
        );
        let mut wire = peer_authentication_to_wire(&sample(), Scope::Namespace);
        wire.scope = 5;
        assert_eq!(peer_auth::Compiled::try_from(&wire).unwrap_err().field, "scope");
    }
}
