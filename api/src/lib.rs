//! Weft's control-plane API, generated from `proto/weft/v1/weft.proto`.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod convert;
pub mod durable;
pub mod encoded;
pub mod sync;
pub mod unix;

pub mod v1 {
    tonic::include_proto!("weft.v1");
}

/// The controller's gRPC port for node agents (Config and Ca), TLS.
pub const CONTROLLER_PORT: u16 = 15012;

/// Resource type names, as in [`v1::ResourceKey::type`].
pub mod types {
    pub const NAMESPACE: &str = "namespace";
    pub const WORKLOAD: &str = "workload";
    pub const SERVICE: &str = "service";
    pub const POLICY: &str = "policy";
    pub const PEER_AUTHENTICATION: &str = "peerauthentication";
}
