//! PeerAuthentication: which workloads and ports accept plaintext (PERMISSIVE) and which require
//! mutual TLS (STRICT), with Istio's mesh-wide, namespace, selector and port-level precedence.
