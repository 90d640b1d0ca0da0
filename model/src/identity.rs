//! SPIFFE workload identities: the one type and validator every crate uses.
