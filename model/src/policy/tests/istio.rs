//! Istio's documented `AuthorizationPolicy` semantics at L4, one row per case: policies (YAML; written
//! here in its JSON form), a connection, and the decision Istio documents for it. The expected column is
//! written by hand from Istio's reference, not computed:
//! - (ap): istio.io/latest/docs/reference/config/security/authorization-policy/ (evaluation order:
//!   DENY, then "no ALLOW policy: allow", then "any ALLOW matches: allow", else deny; AUDIT never
//!   decides; `spec: {}` allows nothing, `rules: [{}]` matches everything; a policy of the root
//!   namespace applies to all namespaces, its selector to workloads of every namespace; a rule needs one
//!   source, one operation and all conditions; fields of a source or an operation are ANDed; `notX`
//!   matches what `X` would not; `*` is presence, `x*` prefix, `*x` suffix)
//! - (cond): istio.io/latest/docs/reference/config/security/conditions/ (`source.ip`,
//!   `destination.ip` take addresses and CIDRs; `source.namespace` and `source.principal` need mTLS;
//!   `values` and `notValues`)
//! - (l4): istio.io/latest/docs/ambient/usage/l4-policy/ (the receiving side enforces; principals and
//!   namespaces come from the client's mTLS identity)
//!
//! Rows marked (weft) are Weft's own requirement where Istio says nothing (IPv4-mapped addresses).

use std::collections::BTreeMap;

use super::super::*;

const ROOT: &str = DEFAULT_ROOT_NAMESPACE;

/// A workload: namespace and labels.
#[derive(Clone, Copy)]
struct Workload(&'static str, &'static [(&'static str, &'static str)]);

const CART: Workload = Workload("shop", &[("app", "cart"), ("version", "v1")]);
const DB: Workload = Workload("legacy", &[("app", "db")]);

/// A connection: client identity (None: plaintext), client address, destination address and port.
#[derive(Clone, Copy)]
struct Conn(Option<&'static str>, &'static str, &'static str, u16);

const FRONT_WEB: Option<&str> = Some("spiffe://cluster.local/ns/front/sa/web");
const OTHER_WEB: Option<&str> = Some("spiffe://cluster.local/ns/other/sa/web");
const FRONT_ADMIN: Option<&str> = Some("spiffe://cluster.local/ns/front/sa/admin");
/// mTLS from front/web, from 10.244.1.11 to the workload's 10.244.2.20:8080.
const MTLS: Conn = Conn(FRONT_WEB, "10.244.1.11", "10.244.2.20", 8080);
const PLAIN: Conn = Conn(None, "10.244.1.11", "10.244.2.20", 8080);
const FROM_OTHER: Conn = Conn(OTHER_WEB, "10.244.1.11", "10.244.2.20", 8080);

#[derive(Debug, PartialEq, Eq)]
enum Want {
    Allow,
    /// Allowed, and the named AUDIT policy matched.
    Audit(&'static str),
    /// Refused by the named DENY policy.
    DeniedBy(&'static str),
    /// Refused because ALLOW policies apply and none matched.
    NotAllowed,
}
use Want::*;

struct Row {
    case: &'static str,
    /// `("<namespace>/<name>", spec)`.
    policies: &'static [(&'static str, &'static str)],
    workload: Workload,
    conn: Conn,
    want: Want,
}

const fn row(
    case: &'static str,
    policies: &'static [(&'static str, &'static str)],
    workload: Workload,
    conn: Conn,
    want: Want,
) -> Row {
    Row {
        case,
        policies,
        workload,
        conn,
        want,
    }
}

const ALLOW_FRONT: &str = r#"{"rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}"#;
const ALLOW_ALL: &str = r#"{"rules": [{}]}"#;
const DENY_ALL: &str = r#"{"action": "DENY", "rules": [{}]}"#;

#[rustfmt::skip]
const ROWS: &[Row] = &[
    // --- evaluation order (ap) ---
    row("no policy: allowed", &[], CART, MTLS, Allow),
    row("spec {} (allow-nothing) refuses everything", &[("shop/allow-nothing", "{}")], CART, MTLS, NotAllowed),
    row("rules [{}] (allow-all) allows plaintext too", &[("shop/allow-all", ALLOW_ALL)], CART, PLAIN, Allow),
    row("DENY rules [{}] (deny-all)", &[("shop/deny-all", DENY_ALL)], CART, MTLS, DeniedBy("shop/deny-all")),
    row("DENY is evaluated before ALLOW", &[("shop/allow-all", ALLOW_ALL), ("shop/deny-all", DENY_ALL)], CART, MTLS, DeniedBy("shop/deny-all")),
    row("a DENY that does not match leaves the default allow", &[("shop/deny-other", r#"{"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}"#)], CART, MTLS, Allow),
    row("any one matching ALLOW policy allows", &[("shop/allow-other", r#"{"rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}"#), ("shop/allow-front", ALLOW_FRONT)], CART, MTLS, Allow),
    // --- which policies apply (ap) ---
    row("selector labels are a subset of the workload's: applies", &[("shop/cart-nothing", r#"{"selector": {"matchLabels": {"app": "cart"}}}"#)], CART, MTLS, NotAllowed),
    row("selector with a label the workload lacks: does not apply", &[("shop/gold-nothing", r#"{"selector": {"matchLabels": {"app": "cart", "tier": "gold"}}}"#)], CART, MTLS, Allow),
    row("another namespace's policy does not apply", &[("legacy/deny-all", DENY_ALL)], CART, MTLS, Allow),
    row("root namespace, no selector: applies in every namespace", &[("weft-system/deny-all", DENY_ALL)], CART, MTLS, DeniedBy("weft-system/deny-all")),
    row("root namespace, no selector: applies to the root namespace's own workloads", &[("weft-system/deny-all", DENY_ALL)], Workload(ROOT, &[("app", "agent")]), MTLS, DeniedBy("weft-system/deny-all")),
    row("root namespace selector picks workloads of every namespace", &[("weft-system/carts-from-front", r#"{"selector": {"matchLabels": {"app": "cart"}}, "rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}"#)], CART, FROM_OTHER, NotAllowed),
    row("root namespace selector leaves other workloads alone", &[("weft-system/carts-from-front", r#"{"selector": {"matchLabels": {"app": "cart"}}, "rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}"#)], DB, FROM_OTHER, Allow),
    row("root and namespace ALLOW policies form one set", &[("weft-system/allow-front", ALLOW_FRONT), ("shop/allow-other", r#"{"rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}"#)], CART, FROM_OTHER, Allow),
    row("a namespace DENY beats a root ALLOW", &[("weft-system/allow-all", ALLOW_ALL), ("shop/deny-front", r#"{"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}"#)], CART, MTLS, DeniedBy("shop/deny-front")),
    row("a root DENY beats a namespace ALLOW", &[("shop/allow-all", ALLOW_ALL), ("weft-system/deny-all", DENY_ALL)], CART, MTLS, DeniedBy("weft-system/deny-all")),
    // --- source (ap) (l4) ---
    row("namespaces: the client's", &[("shop/allow-front", ALLOW_FRONT)], CART, MTLS, Allow),
    row("namespaces: another", &[("shop/allow-front", ALLOW_FRONT)], CART, FROM_OTHER, NotAllowed),
    row("namespaces need mTLS: plaintext never matches", &[("shop/allow-front", ALLOW_FRONT)], CART, PLAIN, NotAllowed),
    row("namespaces prefix pattern", &[("shop/allow-fr", r#"{"rules": [{"from": [{"source": {"namespaces": ["fr*"]}}]}]}"#)], CART, MTLS, Allow),
    row("notNamespaces: DENY all but front, from other", &[("shop/only-front", r#"{"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["front"]}}]}]}"#)], CART, FROM_OTHER, DeniedBy("shop/only-front")),
    row("notNamespaces: DENY all but front, from front", &[("shop/only-front", r#"{"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["front"]}}]}]}"#)], CART, MTLS, Allow),
    row("notNamespaces: plaintext has no namespace, so it is not front", &[("shop/only-front", r#"{"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["front"]}}]}]}"#)], CART, PLAIN, DeniedBy("shop/only-front")),
    row("principals: exact", &[("shop/allow-web", r#"{"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/front/sa/web"]}}]}]}"#)], CART, MTLS, Allow),
    row("principals: exact, another account", &[("shop/allow-web", r#"{"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/front/sa/web"]}}]}]}"#)], CART, Conn(FRONT_ADMIN, "10.244.1.11", "10.244.2.20", 8080), NotAllowed),
    row("principals: prefix", &[("shop/allow-front", r#"{"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/front/*"]}}]}]}"#)], CART, Conn(FRONT_ADMIN, "10.244.1.11", "10.244.2.20", 8080), Allow),
    row("principals: suffix", &[("shop/allow-webs", r#"{"rules": [{"from": [{"source": {"principals": ["*/sa/web"]}}]}]}"#)], CART, FROM_OTHER, Allow),
    row("principals: * is any authenticated client", &[("shop/allow-mtls", r#"{"rules": [{"from": [{"source": {"principals": ["*"]}}]}]}"#)], CART, MTLS, Allow),
    row("principals: * is not plaintext", &[("shop/allow-mtls", r#"{"rules": [{"from": [{"source": {"principals": ["*"]}}]}]}"#)], CART, PLAIN, NotAllowed),
    row("notPrincipals *: DENY plaintext", &[("shop/require-mtls", r#"{"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}"#)], CART, PLAIN, DeniedBy("shop/require-mtls")),
    row("notPrincipals *: mTLS passes", &[("shop/require-mtls", r#"{"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}"#)], CART, MTLS, Allow),
    row("serviceAccounts: namespace/name", &[("shop/allow-web", r#"{"rules": [{"from": [{"source": {"serviceAccounts": ["front/web"]}}]}]}"#)], CART, MTLS, Allow),
    row("notServiceAccounts: DENY all but front/web, from front/admin", &[("shop/only-web", r#"{"action": "DENY", "rules": [{"from": [{"source": {"notServiceAccounts": ["front/web"]}}]}]}"#)], CART, Conn(FRONT_ADMIN, "10.244.1.11", "10.244.2.20", 8080), DeniedBy("shop/only-web")),
    row("ipBlocks: CIDR holding the client", &[("shop/allow-net", r#"{"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}]}]}"#)], CART, PLAIN, Allow),
    row("ipBlocks: CIDR not holding the client", &[("shop/allow-net", r#"{"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}]}]}"#)], CART, Conn(None, "10.244.3.7", "10.244.2.20", 8080), NotAllowed),
    row("ipBlocks: a single address", &[("shop/allow-one", r#"{"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.11"]}}]}]}"#)], CART, PLAIN, Allow),
    row("notIpBlocks carves a hole in ipBlocks", &[("shop/allow-net", r#"{"rules": [{"from": [{"source": {"ipBlocks": ["10.244.0.0/16"], "notIpBlocks": ["10.244.1.0/24"]}}]}]}"#)], CART, PLAIN, NotAllowed),
    row("notIpBlocks: outside the hole", &[("shop/allow-net", r#"{"rules": [{"from": [{"source": {"ipBlocks": ["10.244.0.0/16"], "notIpBlocks": ["10.244.1.0/24"]}}]}]}"#)], CART, Conn(None, "10.244.3.7", "10.244.2.20", 8080), Allow),
    row("fields of one source are ANDed", &[("shop/both", r#"{"rules": [{"from": [{"source": {"namespaces": ["front"], "ipBlocks": ["192.168.0.0/16"]}}]}]}"#)], CART, MTLS, NotAllowed),
    row("sources of one rule are ORed", &[("shop/either", r#"{"rules": [{"from": [{"source": {"namespaces": ["other"]}}, {"source": {"ipBlocks": ["10.244.1.0/24"]}}]}]}"#)], CART, MTLS, Allow),
    // --- operation (ap) ---
    row("ports: the destination port", &[("shop/web-port", r#"{"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}"#)], CART, PLAIN, Allow),
    row("ports: another port", &[("shop/web-port", r#"{"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}"#)], CART, Conn(None, "10.244.1.11", "10.244.2.20", 9090), NotAllowed),
    row("notPorts: DENY every port but 8080, on 9090", &[("shop/only-8080", r#"{"action": "DENY", "rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}]}"#)], CART, Conn(FRONT_WEB, "10.244.1.11", "10.244.2.20", 9090), DeniedBy("shop/only-8080")),
    row("notPorts: DENY every port but 8080, on 8080", &[("shop/only-8080", r#"{"action": "DENY", "rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}]}"#)], CART, MTLS, Allow),
    row("from and to of one rule are ANDed", &[("shop/other-on-8080", r#"{"rules": [{"from": [{"source": {"namespaces": ["other"]}}], "to": [{"operation": {"ports": ["8080"]}}]}]}"#)], CART, MTLS, NotAllowed),
    row("rules of one policy are ORed", &[("shop/other-or-8080", r#"{"rules": [{"from": [{"source": {"namespaces": ["other"]}}]}, {"to": [{"operation": {"ports": ["8080"]}}]}]}"#)], CART, MTLS, Allow),
    // --- when (ap) (cond) ---
    row("when source.ip values", &[("shop/net", r#"{"rules": [{"when": [{"key": "source.ip", "values": ["10.244.1.0/24"]}]}]}"#)], CART, PLAIN, Allow),
    row("when source.ip notValues", &[("shop/not-net", r#"{"rules": [{"when": [{"key": "source.ip", "notValues": ["10.244.1.0/24"]}]}]}"#)], CART, PLAIN, NotAllowed),
    row("when values and notValues of one key both hold", &[("shop/net", r#"{"rules": [{"when": [{"key": "source.ip", "values": ["10.244.0.0/16"], "notValues": ["10.244.1.11"]}]}]}"#)], CART, PLAIN, NotAllowed),
    row("when destination.ip: the address connected to", &[("shop/dst", r#"{"rules": [{"when": [{"key": "destination.ip", "values": ["10.244.2.0/24"]}]}]}"#)], CART, MTLS, Allow),
    row("when destination.ip: another address", &[("shop/dst", r#"{"rules": [{"when": [{"key": "destination.ip", "values": ["10.244.2.0/24"]}]}]}"#)], CART, Conn(FRONT_WEB, "10.244.1.11", "fd00:10:244:2::20", 8080), NotAllowed),
    row("when destination.port in a DENY", &[("shop/no-8080", r#"{"action": "DENY", "rules": [{"when": [{"key": "destination.port", "values": ["8080"]}]}]}"#)], CART, MTLS, DeniedBy("shop/no-8080")),
    row("when source.namespace", &[("shop/front", r#"{"rules": [{"when": [{"key": "source.namespace", "values": ["front"]}]}]}"#)], CART, MTLS, Allow),
    row("when source.namespace needs mTLS", &[("shop/front", r#"{"rules": [{"when": [{"key": "source.namespace", "values": ["front"]}]}]}"#)], CART, PLAIN, NotAllowed),
    row("when source.principal notValues in a DENY: the excepted client", &[("shop/only-web", r#"{"action": "DENY", "rules": [{"when": [{"key": "source.principal", "notValues": ["cluster.local/ns/front/sa/web"]}]}]}"#)], CART, MTLS, Allow),
    row("when source.principal notValues in a DENY: anyone else", &[("shop/only-web", r#"{"action": "DENY", "rules": [{"when": [{"key": "source.principal", "notValues": ["cluster.local/ns/front/sa/web"]}]}]}"#)], CART, FROM_OTHER, DeniedBy("shop/only-web")),
    row("all when conditions must hold", &[("shop/front-on-9090", r#"{"rules": [{"when": [{"key": "source.namespace", "values": ["front"]}, {"key": "destination.port", "values": ["9090"]}]}]}"#)], CART, MTLS, NotAllowed),
    // --- AUDIT (ap) ---
    row("a matching AUDIT policy is reported; the decision stays", &[("shop/audit-front", r#"{"action": "AUDIT", "rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}"#)], CART, MTLS, Audit("shop/audit-front")),
    row("an AUDIT policy does not turn on deny-by-default", &[("shop/audit-other", r#"{"action": "AUDIT", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}"#)], CART, MTLS, Allow),
    row("an AUDIT policy does not allow what no ALLOW matches", &[("shop/allow-other", r#"{"rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}"#), ("shop/audit-all", r#"{"action": "AUDIT", "rules": [{}]}"#)], CART, MTLS, NotAllowed),
    row("an AUDIT policy of the root namespace applies everywhere", &[("weft-system/audit-all", r#"{"action": "AUDIT", "rules": [{}]}"#)], DB, PLAIN, Audit("weft-system/audit-all")),
    row("an AUDIT policy does not stop a DENY", &[("shop/audit-all", r#"{"action": "AUDIT", "rules": [{}]}"#), ("shop/deny-all", DENY_ALL)], CART, MTLS, DeniedBy("shop/deny-all")),
    // --- IPv4-mapped addresses (weft) ---
    row("an IPv4-mapped client is in an IPv4 block", &[("shop/allow-net", r#"{"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.0/24"]}}]}]}"#)], CART, Conn(None, "::ffff:10.244.1.11", "10.244.2.20", 8080), Allow),
    row("an IPv4 client is in an IPv4-mapped block", &[("shop/allow-net", r#"{"rules": [{"from": [{"source": {"ipBlocks": ["::ffff:10.244.1.0/120"]}}]}]}"#)], CART, PLAIN, Allow),
    row("an IPv4-mapped destination is in an IPv4 destination.ip", &[("shop/dst", r#"{"rules": [{"when": [{"key": "destination.ip", "values": ["10.244.2.20"]}]}]}"#)], CART, Conn(None, "10.244.1.11", "::ffff:10.244.2.20", 8080), Allow),
    row("an IPv6 block holds no IPv4 client", &[("shop/allow-v6", r#"{"rules": [{"from": [{"source": {"ipBlocks": ["::/0"]}}]}]}"#)], CART, Conn(None, "::ffff:10.244.1.11", "10.244.2.20", 8080), NotAllowed),
];

fn compile(key: &str, spec: &str) -> Compiled {
    let (namespace, name) = key.split_once('/').unwrap();
    let policy = AuthorizationPolicy {
        metadata: Metadata {
            name: name.into(),
            namespace: namespace.into(),
        },
        spec: serde_json::from_str(spec).unwrap_or_else(|e| panic!("{key}: {e}")),
    };
    policy
        .compile(Scope::of(namespace, ROOT))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn decisions_follow_istio_s_documented_semantics() {
    let mut failures = Vec::new();
    for row in ROWS {
        let policies: Vec<Compiled> = row.policies.iter().map(|(k, s)| compile(k, s)).collect();
        let Workload(namespace, labels) = row.workload;
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let Conn(principal, src, dst, port) = row.conn;
        let conn = Connection {
            source_principal: principal,
            source_ip: src.parse().unwrap(),
            destination_ip: dst.parse().unwrap(),
            destination_port: port,
        };
        let got = match decide(
            &policies,
            Target {
                namespace,
                labels: &labels,
            },
            &conn,
        ) {
            Decision::Allow { audit: None } => Allow,
            Decision::Allow { audit: Some(a) } => {
                Audit(row.policies.iter().map(|(k, _)| *k).find(|k| **k == *a).unwrap())
            }
            Decision::Deny { policy: Some(p) } => {
                DeniedBy(row.policies.iter().map(|(k, _)| *k).find(|k| *k == p).unwrap())
            }
            Decision::Deny { policy: None } => NotAllowed,
        };
        if got != row.want {
            failures.push(format!("{}: want {:?}, got {got:?}", row.case, row.want));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows:\n{}",
        failures.len(),
        ROWS.len(),
        failures.join("\n")
    );
}

/// What Istio refuses, and what Weft refuses because L4 cannot enforce it: (case, spec, field, part
/// of the problem).
#[rustfmt::skip]
const REFUSED: &[(&str, &str, &str, &str)] = &[
    ("empty source", r#"{"rules": [{"from": [{"source": {}}]}]}"#, "spec.rules[0].from[0].source", "must not be empty"),
    ("empty operation", r#"{"rules": [{"to": [{"operation": {}}]}]}"#, "spec.rules[0].to[0].operation", "must not be empty"),
    ("DENY without rules", r#"{"action": "DENY"}"#, "spec.rules", "never matches"),
    ("CUSTOM action", r#"{"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{}]}"#, "spec.action", "CUSTOM"),
    ("provider without CUSTOM", r#"{"provider": {"name": "ext"}, "rules": [{}]}"#, "spec.provider", "CUSTOM"),
    ("targetRefs", r#"{"targetRefs": [{"kind": "Service", "group": "", "name": "cart"}]}"#, "spec.targetRefs", "waypoint"),
    ("targetRef", r#"{"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "w"}}"#, "spec.targetRef", "waypoint"),
    ("selector wildcard", r#"{"selector": {"matchLabels": {"app": "*"}}}"#, "spec.selector.matchLabels", "'*'"),
    ("methods", r#"{"rules": [{"to": [{"operation": {"ports": ["80"], "methods": ["GET"]}}]}]}"#, "spec.rules[0].to[0].operation.methods", "waypoint"),
    ("notMethods", r#"{"rules": [{"to": [{"operation": {"notMethods": ["POST"]}}]}]}"#, "spec.rules[0].to[0].operation.notMethods", "waypoint"),
    ("paths", r#"{"rules": [{"to": [{"operation": {"paths": ["/info*"]}}]}]}"#, "spec.rules[0].to[0].operation.paths", "waypoint"),
    ("notPaths", r#"{"rules": [{"to": [{"operation": {"notPaths": ["/admin"]}}]}]}"#, "spec.rules[0].to[0].operation.notPaths", "waypoint"),
    ("hosts", r#"{"rules": [{"to": [{"operation": {"hosts": ["cart.shop"]}}]}]}"#, "spec.rules[0].to[0].operation.hosts", "waypoint"),
    ("notHosts", r#"{"rules": [{"to": [{"operation": {"notHosts": ["x"]}}]}]}"#, "spec.rules[0].to[0].operation.notHosts", "waypoint"),
    ("requestPrincipals", r#"{"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}"#, "spec.rules[0].from[0].source.requestPrincipals", "waypoint"),
    ("notRequestPrincipals", r#"{"rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}]}"#, "spec.rules[0].from[0].source.notRequestPrincipals", "waypoint"),
    ("remoteIpBlocks", r#"{"rules": [{"from": [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]}]}"#, "spec.rules[0].from[0].source.remoteIpBlocks", "waypoint"),
    ("notRemoteIpBlocks", r#"{"rules": [{"from": [{"source": {"notRemoteIpBlocks": ["1.2.3.4"]}}]}]}"#, "spec.rules[0].from[0].source.notRemoteIpBlocks", "waypoint"),
    ("when request.headers", r#"{"rules": [{"when": [{"key": "request.headers[x-user]", "values": ["a"]}]}]}"#, "spec.rules[0].when[0].key", "waypoint"),
    ("when request.auth.claims", r#"{"rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["a"]}]}]}"#, "spec.rules[0].when[0].key", "waypoint"),
    ("when remote.ip", r#"{"rules": [{"when": [{"key": "remote.ip", "values": ["1.2.3.4"]}]}]}"#, "spec.rules[0].when[0].key", "waypoint"),
    ("when unknown key", r#"{"rules": [{"when": [{"key": "source.nonsense", "values": ["a"]}]}]}"#, "spec.rules[0].when[0].key", "unknown attribute"),
    ("when without values", r#"{"rules": [{"when": [{"key": "source.ip"}]}]}"#, "spec.rules[0].when[0]", "values or notValues"),
    ("when bad address", r#"{"rules": [{"when": [{"key": "source.ip", "values": ["nope"]}]}]}"#, "spec.rules[0].when[0].values[0]", "not an IP address"),
    ("when bad port", r#"{"rules": [{"when": [{"key": "destination.port", "notValues": ["http"]}]}]}"#, "spec.rules[0].when[0].notValues[0]", "port number"),
    ("serviceAccounts with namespaces", r#"{"rules": [{"from": [{"source": {"namespaces": ["a"], "serviceAccounts": ["a/web"]}}]}]}"#, "spec.rules[0].from[0].source.serviceAccounts", "cannot be combined"),
    ("bad serviceAccount", r#"{"rules": [{"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}]}"#, "spec.rules[0].from[0].source.serviceAccounts[0]", "service account"),
    ("empty principal", r#"{"rules": [{"from": [{"source": {"principals": [""]}}]}]}"#, "spec.rules[0].from[0].source.principals[0]", "must not be empty"),
    ("star inside a principal", r#"{"rules": [{"from": [{"source": {"notPrincipals": ["a*b"]}}]}]}"#, "spec.rules[0].from[0].source.notPrincipals[0]", "'*'"),
    ("bad namespace", r#"{"rules": [{"from": [{"source": {"notNamespaces": ["Not_A_Namespace"]}}]}]}"#, "spec.rules[0].from[0].source.notNamespaces[0]", "namespace"),
    ("bad notIpBlocks", r#"{"rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/33"]}}]}]}"#, "spec.rules[0].from[0].source.notIpBlocks[0]", "prefix length"),
    ("short IPv4-mapped block", r#"{"rules": [{"from": [{"source": {"ipBlocks": ["::ffff:10.0.0.0/90"]}}]}]}"#, "spec.rules[0].from[0].source.ipBlocks[0]", "96"),
    ("port 0", r#"{"rules": [{"to": [{"operation": {"notPorts": ["0"]}}]}]}"#, "spec.rules[0].to[0].operation.notPorts[0]", "port number"),
];

#[test]
fn refused_policies_name_the_field_and_say_why() {
    let mut failures = Vec::new();
    for (case, spec, field, problem) in REFUSED {
        let policy = AuthorizationPolicy {
            metadata: Metadata {
                name: "p".into(),
                namespace: "shop".into(),
            },
            spec: serde_json::from_str(spec).unwrap_or_else(|e| panic!("{case}: {e}")),
        };
        match policy.validate() {
            Ok(()) => failures.push(format!("{case}: accepted")),
            Err(e) if e.field != *field || !e.problem.contains(problem) => {
                failures.push(format!(
                    "{case}: want {field}: …{problem}…, got {}: {}",
                    e.field, e.problem
                ));
            }
            Err(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows:\n{}",
        failures.len(),
        REFUSED.len(),
        failures.join("\n")
    );
}
