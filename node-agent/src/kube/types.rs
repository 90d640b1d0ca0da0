//! The few API objects the agent reads, with only the fields it uses. Unknown fields are ignored;
//! a list or map the API server sends as `null` or leaves out is empty.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, de::DeserializeOwned};

/// `metadata` of any object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub resource_version: String,
    /// Set once the object is being deleted (it waits for finalizers).
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub annotations: BTreeMap<String, String>,
}

/// Any object, of which only the metadata matters (a DaemonSet, a Pod...).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Object {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMeta {
    #[serde(default)]
    pub resource_version: String,
}

/// A collection as a list answers it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(bound = "T: DeserializeOwned")]
pub struct List<T> {
    #[serde(default)]
    pub metadata: ListMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub items: Vec<T>,
}

/// What the API server answers instead of an object when something failed, and what a watch
/// sends in an `ERROR` event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub code: u16,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
}

/// `v1 Endpoints`: a Service's addresses, ready and not, by port set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Endpoints {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub subsets: Vec<EndpointSubset>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSubset {
    /// Ready to serve.
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses: Vec<EndpointAddress>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub not_ready_addresses: Vec<EndpointAddress>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<EndpointPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct EndpointAddress {
    pub ip: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct EndpointPort {
    /// Empty when the Service has a single unnamed port.
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: String,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
