//! Weft's model: the Kubernetes-shaped objects the mesh reasons about (namespaces, pods), the
//! enrollment decision, and the well-known constants. No sockets, no async, no file I/O: everything
//! here is pure so it can be tested as plain functions.

pub mod annotations;
pub mod cni;
pub mod cni_config;
pub mod enrollment;
pub mod identity;
pub mod peer_auth;
pub mod policy;
pub mod workload;

pub use weft_ebpf_common::{marks, ports};

/// A Kubernetes name of the DNS-label kind (RFC 1123): 1-63 lowercase alphanumerics or '-', starting
/// and ending alphanumeric. Namespaces, policy names and the dev cluster's names use it.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
pub use workload::{Namespace, Pod, WorkloadSnapshot};
