//! Data-plane building blocks shared by the node agent and (later) waypoints: entering network
//! namespaces, the sockets the agent opens inside pods, recovering original destinations, proxying
//! bytes, and admitting connections to a TLS listener (also the controller's).

pub mod admission;
pub mod cgroup;
pub mod netlink;
pub mod netns;
pub mod proxy;
pub mod socket;
