//! The Kubernetes source: the controller's model built from the API server (being written).

pub mod convert;
pub mod crd;
