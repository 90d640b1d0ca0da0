//! Types shared by Weft's eBPF programs (kernel side) and the node agent (userspace side).
//!
//! Every type here is `#[repr(C)]` and is the exact byte layout of a map key or value. Addresses are
//! kept as the kernel keeps them: IPv6 as four network-order `u32` words, IPv4 as an IPv4-mapped IPv6
//! address (`::ffff:a.b.c.d`) so that one key type serves both families, and ports in network order.
#![no_std]

/// Ports the node agent listens on inside each enrolled pod's network namespace.
pub mod ports {
    /// Outbound capture: pod connects are rewritten to this port on the pod's loopback.
    pub const OUTBOUND: u16 = 15001;
    /// Inbound plaintext: connections from outside the pod are steered here.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// HBONE (mTLS tunnel) listener; never steered.
    pub const HBONE: u16 = 15008;

    /// The agent's own ports in a pod. A connection to one of them on the pod's loopback or
    /// unspecified address, or in plaintext from outside, would make the agent its own upstream: it is
    /// refused.
    pub const fn is_agent_port(port: u16) -> bool {
        matches!(port, OUTBOUND | INBOUND_PLAINTEXT | HBONE)
    }
}

/// Socket marks. The agent marks every socket it opens with [`marks::AGENT`] (in the low 12 bits), which
/// tells its sockets apart in `ss` and packet captures. It exempts nothing from capture: any container
/// with `CAP_NET_RAW` can set a mark. The agent's own sockets are recognised by its cgroup
/// ([`names::MAP_AGENT_CGROUP`]), which a pod cannot join.
pub mod marks {
    /// Bits of `SO_MARK` that Weft owns for the agent-socket tag.
    pub const AGENT_MASK: u32 = 0x0fff;
    /// Tag on every socket the agent opens.
    pub const AGENT: u32 = 0x0539;
    /// Extra bit on the agent's inbound sockets towards the application. With `tcp_fwmark_accept` the
    /// application's accepted socket inherits it, and a policy rule routes its replies to the agent
    /// (which connected with the client's address as source) rather than out of the pod.
    pub const LOCAL_REPLY: u32 = 0x1000;
    /// Routing table holding `local 0.0.0.0/0 dev lo` / `local ::/0 dev lo` for [`LOCAL_REPLY`].
    pub const LOCAL_REPLY_TABLE: u32 = 15006;
}

/// Map and program names (the names the eBPF object gives them, and their pin names).
pub mod names {
    pub const MAP_ENROLLED: &str = "WEFT_ENROLLED";
    pub const MAP_ORIG_BY_COOKIE: &str = "WEFT_ORIG_BY_COOKIE";
    pub const MAP_ORIG_BY_TUPLE: &str = "WEFT_ORIG_BY_TUPLE";
    pub const MAP_LISTENERS: &str = "WEFT_LISTENERS";
    /// One slot: the cgroup v2 id of the running agent. Connects from that cgroup are never captured.
    pub const MAP_AGENT_CGROUP: &str = "WEFT_AGENT_CGROUP";

    pub const PROG_CONNECT4: &str = "weft_connect4";
    pub const PROG_CONNECT6: &str = "weft_connect6";
    pub const PROG_GETPEERNAME4: &str = "weft_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "weft_getpeername6";
    pub const PROG_SOCKOPS: &str = "weft_sockops";
    pub const PROG_GETSOCKOPT: &str = "weft_getsockopt";
    pub const PROG_SK_LOOKUP: &str = "weft_sk_lookup";

    /// Programs attached to the node's cgroup (one link each).
    pub const CGROUP_PROGRAMS: [&str; 6] = [
        PROG_CONNECT4,
        PROG_CONNECT6,
        PROG_GETPEERNAME4,
        PROG_GETPEERNAME6,
        PROG_SOCKOPS,
        PROG_GETSOCKOPT,
    ];
}

/// Map sizes. Per-connection maps are bounded LRU maps: entries are deleted when the client socket
/// closes; the LRU bound is a backstop, never the cleanup mechanism.
pub mod limits {
    pub const MAX_ENROLLED_PODS: u32 = 4096;
    pub const MAX_LISTENERS: u32 = 2 * MAX_ENROLLED_PODS;
    pub const MAX_TRACKED_CONNECTIONS: u32 = 65536;
}

/// An IP address in IPv6 form, four network-order words; IPv4 as `::ffff:a.b.c.d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ip {
    pub words: [u32; 4],
}

impl Ip {
    /// Network-order word 2 of an IPv4-mapped address: `0000:ffff`.
    pub const MAPPED_WORD: u32 = u32::from_be(0x0000_ffff);

    /// IPv4 (network-order word, as the kernel gives it) as an IPv4-mapped address.
    pub const fn from_v4_be(ip4: u32) -> Self {
        Self {
            words: [0, 0, Self::MAPPED_WORD, ip4],
        }
    }

    pub const fn is_v4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == Self::MAPPED_WORD
    }

    /// The IPv4 address (network-order word) if this is IPv4-mapped.
    pub const fn v4_be(&self) -> Option<u32> {
        if self.is_v4_mapped() { Some(self.words[3]) } else { None }
    }
}

/// An endpoint: address and network-order port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub ip: Ip,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// A captured connection as seen from the client socket after the rewrite: the pod's loopback
/// address and ephemeral port to the agent's outbound listener, qualified by the pod's network
/// namespace (loopback tuples repeat across pods).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub client: Endpoint,
    pub listener: Endpoint,
}

/// Value of the enrolled-pods map, keyed by the pod's network-namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodEntry {
    /// Reserved for per-pod capture options; 0 today.
    pub flags: u32,
    pub _pad: u32,
}

/// Key of the inbound listener map: the enrolled pod's own address. `sk_lookup` steers connections to
/// that address to the socket stored under it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub ip: Ip,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are #[repr(C)], Copy, contain only integers and have explicit padding fields.
    unsafe impl aya::Pod for super::Ip {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::PodEntry {}
    unsafe impl aya::Pod for super::ListenerKey {}
}
