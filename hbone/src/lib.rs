//! HBONE: HTTP/2 `CONNECT` tunnels over mutual TLS 1.3 between SPIFFE workload identities, wire-compatible
//! with Istio's ztunnel.
//!
//! - [`identity`]: `spiffe://<td>/ns/<ns>/sa/<sa>` identities (the model's, re-exported: HBONE's API speaks them).
//! - [`tls`]: credentials, trust bundles, and the rustls client/server configurations (ring, TLS 1.3, ALPN h2).
//! - [`client`]: the pooled HBONE client (one TLS connection multiplexes many `CONNECT` streams).
//! - [`server`]: the HBONE server that validates `CONNECT` requests and hands them to a [`server::Handler`].

#![warn(missing_docs)]

pub mod client;
pub use weft_model::identity;
mod record;
pub mod server;
mod stream;
pub mod tls;

pub use client::{ConnectError, Pool, PoolConfig, PoolKey, Tunnel};
pub use identity::{Identity, InvalidIdentity};
pub use server::{BadRequest, Handler, Refusal, Request, ServeError, Transferred, parse_connect, serve};
pub use tls::{Credential, TlsError, TrustBundle, client_config, peer_identity, server_config};
