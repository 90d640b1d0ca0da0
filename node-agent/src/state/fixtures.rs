//! Resources as the controller pushes them, for the agent's tests: namespaces, pods, services,
//! policies and pushes, built with the fewest fields a test has to name.

use std::collections::HashMap;

use weft_api::v1::{self, resource::Kind};

use super::{State, types};

pub(crate) fn res(kind: &str, name: &str, body: Kind) -> v1::Resource {
    v1::Resource {
        key: Some(v1::ResourceKey {
            r#type: kind.into(),
            name: name.into(),
        }),
        version: 1,
        kind: Some(body),
    }
}

pub(crate) fn ns(name: &str, ambient: bool) -> v1::Resource {
    let mut annotations = HashMap::new();
    if ambient {
        annotations.insert("weft.dev/dataplane-mode".to_owned(), "ambient".to_owned());
    }
    res(
        types::NAMESPACE,
        name,
        Kind::Namespace(v1::Namespace {
            name: name.into(),
            labels: HashMap::new(),
            annotations,
        }),
    )
}

/// A UUID-shaped uid made from the pod's name.
pub(crate) fn uid(name: &str) -> String {
    let n = name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    format!("00000000-0000-4000-8000-{:012x}", n & 0xffff_ffff_ffff)
}

pub(crate) fn pod(ns: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> v1::Resource {
    res(
        types::WORKLOAD,
        &format!("{ns}/{name}"),
        Kind::Workload(v1::Workload {
            uid: uid(name),
            namespace: ns.into(),
            name: name.into(),
            node: "node1".into(),
            service_account: "default".into(),
            identity: format!("spiffe://cluster.local/ns/{ns}/sa/default"),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            annotations: HashMap::new(),
            ips: vec![ip.into()],
            services: Vec::new(),
        }),
    )
}

/// `workload` as a member of `services` (`namespace/name`).
pub(crate) fn member_of(mut workload: v1::Resource, services: &[&str]) -> v1::Resource {
    if let Some(Kind::Workload(w)) = &mut workload.kind {
        w.services = services.iter().map(|s| s.to_string()).collect();
    }
    workload
}

pub(crate) fn service(ns: &str, name: &str, vip: &str) -> v1::Resource {
    res(
        types::SERVICE,
        &format!("{ns}/{name}"),
        Kind::Service(v1::Service {
            namespace: ns.into(),
            name: name.into(),
            vips: vec![vip.into()],
            ports: vec![v1::ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
            }],
        }),
    )
}

pub(crate) fn push(full: bool, resources: Vec<v1::Resource>, removed: &[(&str, &str)]) -> v1::Push {
    v1::Push {
        nonce: "n".into(),
        full,
        resources,
        removed: removed
            .iter()
            .map(|(t, n)| v1::ResourceKey {
                r#type: t.to_string(),
                name: n.to_string(),
            })
            .collect(),
        revision: 7,
        store_id: String::new(),
        ..Default::default()
    }
}

pub(crate) fn policy(
    namespace: &str,
    name: &str,
    action: v1::Action,
    scope: v1::Scope,
    rules: Vec<v1::Rule>,
) -> v1::Resource {
    res(
        types::POLICY,
        &format!("{namespace}/{name}"),
        Kind::Policy(v1::Policy {
            namespace: namespace.into(),
            name: name.into(),
            selector: None,
            action: action as i32,
            rules,
            scope: scope as i32,
        }),
    )
}

/// The state a first (full) push of `resources` makes, every one taken.
pub(crate) fn state_of(resources: Vec<v1::Resource>) -> State {
    let (state, rejected) = State::default().apply(&push(true, resources, &[]));
    assert!(rejected.is_empty(), "{rejected:?}");
    state
}

/// shop (meshed): web-1 and web-2 behind the service shop/web, and the service shop/empty;
/// legacy (outside the mesh): db.
pub(crate) fn shop_and_legacy() -> Vec<v1::Resource> {
    vec![
        ns("shop", true),
        ns("legacy", false),
        member_of(pod("shop", "web-1", "10.244.1.11", &[("app", "web")]), &["shop/web"]),
        member_of(pod("shop", "web-2", "10.244.2.11", &[("app", "web")]), &["shop/web"]),
        pod("legacy", "db", "10.244.1.12", &[]),
        service("shop", "web", "10.96.0.10"),
        service("shop", "empty", "10.96.0.11"),
    ]
}

/// `service` with these VIPs instead of its one.
pub(crate) fn with_vips(mut service: v1::Resource, vips: &[&str]) -> v1::Resource {
    if let Some(Kind::Service(s)) = &mut service.kind {
        s.vips = vips.iter().map(|v| v.to_string()).collect();
    }
    service
}

/// A policy's rules: one, for connections from `source`.
pub(crate) fn from_source(source: v1::PolicySource) -> Vec<v1::Rule> {
    vec![v1::Rule {
        from: vec![source],
        ..v1::Rule::default()
    }]
}

/// An AUDIT policy of `namespace` matching connections to `port`.
pub(crate) fn audit_port(namespace: &str, name: &str, port: u16) -> v1::Resource {
    policy(
        namespace,
        name,
        v1::Action::Audit,
        v1::Scope::Namespace,
        vec![v1::Rule {
            when: vec![v1::Condition {
                key: "destination.port".into(),
                values: vec![port.to_string()],
                not_values: vec![],
            }],
            ..v1::Rule::default()
        }],
    )
}

/// A PeerAuthentication: its mode, and port-level modes (which need a selector).
pub(crate) fn peer_auth(
    namespace: &str,
    name: &str,
    scope: v1::Scope,
    selector: Option<(&str, &str)>,
    mode: v1::MtlsMode,
    ports: &[(u32, v1::MtlsMode)],
) -> v1::Resource {
    res(
        types::PEER_AUTHENTICATION,
        &format!("{namespace}/{name}"),
        Kind::PeerAuthentication(v1::PeerAuthentication {
            namespace: namespace.into(),
            name: name.into(),
            selector: selector.map(|(k, v)| v1::Selector {
                match_labels: HashMap::from([(k.to_owned(), v.to_owned())]),
            }),
            mode: mode as i32,
            port_level_mtls: ports
                .iter()
                .map(|(port, mode)| v1::PortMtls {
                    port: *port,
                    mode: *mode as i32,
                })
                .collect(),
            scope: scope as i32,
        }),
    )
}

/// `workload` with these addresses (in this order) instead of its one.
pub(crate) fn with_ips(mut workload: v1::Resource, ips: &[&str]) -> v1::Resource {
    if let Some(Kind::Workload(w)) = &mut workload.kind {
        w.ips = ips.iter().map(|ip| ip.to_string()).collect();
    }
    workload
}

/// `workload` placed on `node` instead.
pub(crate) fn with_node(mut workload: v1::Resource, node: &str) -> v1::Resource {
    if let Some(Kind::Workload(w)) = &mut workload.kind {
        w.node = node.into();
    }
    workload
}
