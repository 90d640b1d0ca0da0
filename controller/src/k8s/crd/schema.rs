//! The shape of the two specs, for the API server's schema only: a mirror of the model's serde
//! types ([`weft_model::policy::Spec`], [`weft_model::peer_auth::Spec`]), which carry no
//! `JsonSchema` (the model has no schema dependency). Nothing is deserialized into these types; the
//! model's own types and validation read every spec. The tests hold the two in step: every field
//! of a fully written model spec is in the schema with the right type, and every field of the
//! schema is one the model reads.
//!
//! Optional fields are written without `Option` (`#[serde(default, skip_serializing_if)]`, as the
//! model has them) so that the schema carries neither `nullable` nor a `default` (the API server
//! would write defaults into every stored object). Every object keeps unknown fields, for Weft to
//! refuse by name (see the parent module).

use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Serialize;

// === AuthorizationPolicy ===

/// Istio's AuthorizationPolicy spec, the L4 part that Weft's node agents enforce.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct AuthorizationPolicySpec {
    /// The workloads (pods) of the policy's namespace it applies to; absent: all of them.
    #[serde(default, skip_serializing_if = "is_absent")]
    selector: Selector,
    /// Attachment to a Service or Gateway: enforced by a waypoint, refused by Weft.
    #[serde(default, skip_serializing_if = "is_absent")]
    #[schemars(schema_with = "any_object")]
    target_ref: (),
    /// As targetRef.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "any_objects")]
    target_refs: Vec<()>,
    /// ALLOW (the default), DENY or AUDIT; CUSTOM is refused by Weft.
    #[serde(default, skip_serializing_if = "is_absent")]
    action: Action,
    /// The external authorizer of CUSTOM: refused by Weft.
    #[serde(default, skip_serializing_if = "is_absent")]
    #[schemars(schema_with = "any_object")]
    provider: (),
    /// A connection matches the policy when it matches one rule. No rules match nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rules: Vec<Rule>,
}

#[derive(Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct Selector {
    /// Labels a workload must all have, with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    match_labels: BTreeMap<String, String>,
}

#[derive(Default, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct Rule {
    /// Sources; absent: any. Present, it must not be empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    from: Vec<From>,
    /// Operations; absent: any. Present, it must not be empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    to: Vec<To>,
    /// Conditions that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    when: Vec<Condition>,
}

#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct From {
    source: Source,
}

/// Every field given must match. The request-level fields (requestPrincipals, remoteIpBlocks and
/// their not- forms) need a waypoint and are refused by Weft.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_namespaces: Vec<String>,
    /// `namespace/name`, or `name` in the policy's own namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_remote_ip_blocks: Vec<String>,
}

#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct To {
    operation: Operation,
}

/// Only ports (and notPorts) are L4; the HTTP fields need a waypoint and are refused by Weft.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_hosts: Vec<String>,
    /// Port numbers, as strings (`"8080"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_paths: Vec<String>,
}

/// `key` is one of source.ip, source.namespace, source.principal, destination.ip,
/// destination.port.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct Condition {
    key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_values: Vec<String>,
}

// === PeerAuthentication ===

/// Istio's PeerAuthentication spec.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct PeerAuthenticationSpec {
    /// The workloads of the policy's namespace it applies to; absent or empty: the namespace (in
    /// the root namespace: the mesh).
    #[serde(default, skip_serializing_if = "is_absent")]
    selector: Selector,
    #[serde(default, skip_serializing_if = "is_absent")]
    mtls: Mtls,
    /// Keyed by the workload's port number (1-65535); needs a selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Default, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct Mtls {
    /// UNSET (inherit, the default), DISABLE, PERMISSIVE or STRICT.
    #[serde(default, skip_serializing_if = "is_absent")]
    mode: Mode,
}

#[derive(Default, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

// === helpers ===

/// For `skip_serializing_if`: these types are never serialized; the attribute only keeps a
/// `default` out of the schema.
fn is_absent<T>(_: &T) -> bool {
    true
}

/// An object Weft refuses whatever it holds: any object passes the schema.
fn any_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

fn any_objects(generator: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": any_object(generator),
    })
}
