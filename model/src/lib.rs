//! Weft's model: the Kubernetes-shaped objects the mesh reasons about (namespaces, pods), the
//! enrollment decision, and the well-known constants. No sockets, no async, no file I/O: everything
//! here is pure so it can be tested as plain functions.

pub mod annotations;
pub mod cni;
pub mod enrollment;
pub mod policy;
pub mod workload;

pub use weft_ebpf_common::{marks, ports};
pub use workload::{Namespace, Pod, WorkloadSnapshot};
