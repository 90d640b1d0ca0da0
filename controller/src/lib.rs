//! Weft's controller: a local store of Kubernetes-style objects, the mesh CA, and the config stream
//! to node agents. `app` wires the parts together; the binary (`main.rs`) only parses flags.

pub mod admin;
pub mod app;
pub mod auth;
pub mod ca;
pub mod distribution;
pub mod k8s;
pub mod listener;
pub mod store;
