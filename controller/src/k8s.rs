//! Kubernetes as a source of the controller's model: the same [`State`](crate::store::State) the
//! local store publishes, built from the API server.
//!
//! - [`crd`]: Weft's custom resources (`AuthorizationPolicy`, `PeerAuthentication`) and their CRDs;
//! - [`convert`]: Kubernetes objects into the model's objects (pure);
//! - [`source`]: the watchers, and the model they publish;
//! - [`status`]: each custom resource's `Accepted` condition, and its writer.

pub mod convert;
pub mod crd;
pub mod source;
pub mod status;

pub use source::{Outputs, source};
pub use status::{Conditions, StatusWriter, Verdict};
