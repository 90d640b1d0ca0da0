//! Weft's custom resources, `security.weft.dev/v1alpha1` `AuthorizationPolicy` and
//! `PeerAuthentication`: the Rust types the Kubernetes source watches and the CRDs
//! (`weft-controller crds`) the cluster serves them with.
//!
//! The spec is kept as written ([`RawSpec`], raw JSON) and read into the model by the local store's
//! own rules ([`crate::store::manifest::authorization_policy`]): a spec Weft refuses still reads, is
//! left out of the model and is reported in the resource's `Accepted` condition, instead of breaking
//! the watch. The API server checks the shape first, with the schema of [`schema`]'s types:
//!
//! - structural (every node has a `type`, or is an object that keeps unknown fields), no CEL, no
//!   defaults, no `nullable`: what Kubernetes 1.20 serves;
//! - every object node of the spec keeps unknown fields (`x-kubernetes-preserve-unknown-fields`)
//!   rather than pruning them, so that a misspelt field (`principal` for `principals`) reaches Weft,
//!   which refuses the resource naming it, as the local store does. Pruned, it would vanish silently
//!   and the rule would match more than its author wrote;
//! - a wrongly typed field (`action: 5`) is refused by the API server itself (422).

pub mod schema;

use std::borrow::Cow;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt as _};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize};

/// The API group of Weft's resources.
pub const GROUP: &str = "security.weft.dev";
/// Their one version.
pub const VERSION: &str = "v1alpha1";
/// The condition the controller writes on every resource it has read.
pub const ACCEPTED: &str = "Accepted";

/// An AuthorizationPolicy's spec as written; see [`schema::AuthorizationPolicySpec`] for its shape.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize)]
#[kube(
    group = "security.weft.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "Status",
    category = "weft",
    doc = "L4 authorization with Istio's AuthorizationPolicy shape and semantics, enforced by Weft's node agents.",
    printcolumn = r#"{"name": "Action", "type": "string", "jsonPath": ".spec.action"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct AuthorizationPolicySpec(pub RawSpec);

/// A PeerAuthentication's spec as written; see [`schema::PeerAuthenticationSpec`] for its shape.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize)]
#[kube(
    group = "security.weft.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "Status",
    category = "weft",
    doc = "Which workloads and ports accept plaintext and which require mutual TLS, with Istio's PeerAuthentication shape and semantics.",
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mtls.mode"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(transparent)]
pub struct PeerAuthenticationSpec(pub RawSpec);

/// A spec as written, raw JSON; absent or `null` reads as `null` (the empty spec, as in the local
/// store).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct RawSpec(pub serde_json::Value);

impl<'de> Deserialize<'de> for RawSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawSpec, D::Error> {
        // Through `Option`: serde reads an absent field as `None` only for types that accept it.
        Ok(RawSpec(
            Option::<serde_json::Value>::deserialize(d)?.unwrap_or_default(),
        ))
    }
}

impl<'de> Deserialize<'de> for AuthorizationPolicySpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RawSpec::deserialize(d).map(AuthorizationPolicySpec)
    }
}

impl<'de> Deserialize<'de> for PeerAuthenticationSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RawSpec::deserialize(d).map(PeerAuthenticationSpec)
    }
}

impl JsonSchema for AuthorizationPolicySpec {
    fn schema_name() -> Cow<'static, str> {
        "AuthorizationPolicySpec".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        schema::AuthorizationPolicySpec::json_schema(generator)
    }
}

impl JsonSchema for PeerAuthenticationSpec {
    fn schema_name() -> Cow<'static, str> {
        "PeerAuthenticationSpec".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        schema::PeerAuthenticationSpec::json_schema(generator)
    }
}

/// The status both resources share: written by the controller, never read back into the model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Status {
    /// `Accepted`: whether Weft enforces this version of the resource, and if not, which field is
    /// wrong and how.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A condition in Kubernetes' usual shape (`metav1.Condition`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word: `Valid`, `Invalid`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// For people: what is wrong, naming the field.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
    /// The `metadata.generation` the condition was decided for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Both CRDs, for `weft-controller crds`.
pub fn crds() -> [CustomResourceDefinition; 2] {
    [
        spec_optional(AuthorizationPolicy::crd()),
        spec_optional(PeerAuthentication::crd()),
    ]
}

/// The generated schema requires `spec` (the Rust field is not an `Option`); the local store reads
/// a resource without one as the empty spec, and so must the cluster.
fn spec_optional(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        if let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut())
            && let Some(required) = schema.required.as_mut()
        {
            required.retain(|r| r != "spec");
            if required.is_empty() {
                schema.required = None;
            }
        }
    }
    crd
}

/// Both CRDs as one YAML stream (`---` between documents), as `kubectl apply -f` takes it.
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for crd in crds() {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
