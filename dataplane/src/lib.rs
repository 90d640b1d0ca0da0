//! Data-plane building blocks shared by the node agent and (later) waypoints: entering network
//! namespaces, the sockets the agent opens inside pods, recovering original destinations, and
//! proxying bytes.

pub mod cgroup;
pub mod netlink;
pub mod netns;
pub mod proxy;
pub mod socket;
