//! Kubernetes as a source of the controller's model: the same [`State`](crate::store::State) the
//! local store publishes, built from the API server.
//!
//! - [`crd`]: Weft's custom resources (`AuthorizationPolicy`, `PeerAuthentication`) and their CRDs;
//! - [`convert`]: Kubernetes objects into the model's objects (pure);
//! - [`source`]: the watchers, and the model they publish;
//! - [`status`]: each custom resource's `Accepted` condition, and its writer;
//! - [`leader`]: leader election among replicas (a Lease);
//! - [`ca_root`]: the CA in a Secret, and the roots published in a ConfigMap;
//! - [`token_review`]: node agents' identity from their service-account tokens.

pub mod ca_root;
pub mod convert;
pub mod crd;
pub mod leader;
pub mod source;
pub mod status;
pub mod token_review;

pub use source::{Outputs, source};
pub use status::{Conditions, StatusWriter, Verdict};
pub use token_review::TokenReviewer;

/// A client from the in-cluster configuration, or `KUBECONFIG` ([`kube::Client::try_default`]).
pub async fn client() -> Result<kube::Client, kube::Error> {
    install_crypto_provider();
    kube::Client::try_default().await
}

/// A client from `config`.
pub fn client_from(config: kube::Config) -> Result<kube::Client, kube::Error> {
    install_crypto_provider();
    kube::Client::try_from(config)
}

/// kube's TLS takes rustls's process-wide provider, and with both of rustls's providers compiled
/// into the workspace (HBONE's record layer is aws-lc's) there is no default: ring, which every
/// other TLS configuration of the controller names, is installed (unless one already is).
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may have installed one meanwhile: either way there is one.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
