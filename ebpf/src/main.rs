//! Weft's capture programs.
//!
//! * `cgroup/connect4|6` rewrite an enrolled pod's TCP connects to the node agent's outbound listener
//!   on the pod's loopback, remembering the original destination by socket cookie.
//! * `sockops` moves that record to the established 4-tuple (qualified by network namespace) and
//!   deletes both records when the client socket closes, so maps do not grow with connection count.
//! * `cgroup/getsockopt` answers `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on the agent's accepted
//!   socket, as iptables REDIRECT would.
//! * `cgroup/getpeername4|6` hide the rewrite from the application.
//! * `sk_lookup` (one link per enrolled pod's network namespace) steers inbound TCP from outside the
//!   pod, to any port, to the agent's inbound listener in that pod.
//!
//! Every context field is read and written with volatile 4-byte accesses: LLVM otherwise merges
//! neighbouring accesses into wider ones that the verifier rejects.
#![no_std]
#![no_main]

use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock,
    },
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use weft_ebpf_common::{
    ConnKey, Endpoint, Ip, ListenerKey, PodEntry, limits,
    ports::{self, HBONE, OUTBOUND},
};

/// Reads a `[u32; 4]` context field word by word at constant offsets: the verifier rejects loads
/// through a context pointer that was modified first.
macro_rules! read_ip6 {
    ($base:expr, $field:ident) => {
        [
            read_volatile(addr_of!((*$base).$field[0])),
            read_volatile(addr_of!((*$base).$field[1])),
            read_volatile(addr_of!((*$base).$field[2])),
            read_volatile(addr_of!((*$base).$field[3])),
        ]
    };
}

/// Writes a `[u32; 4]` context field word by word at constant offsets.
macro_rules! write_ip6 {
    ($base:expr, $field:ident, $words:expr) => {{
        let w: [u32; 4] = $words;
        write_volatile(addr_of_mut!((*$base).$field[0]), w[0]);
        write_volatile(addr_of_mut!((*$base).$field[1]), w[1]);
        write_volatile(addr_of_mut!((*$base).$field[2]), w[2]);
        write_volatile(addr_of_mut!((*$base).$field[3]), w[3]);
    }};
}
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the number 80.
const SO_ORIGINAL_DST: i32 = 80;
const LOOPBACK_IFINDEX: u32 = 1;
/// cgroup program verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
/// sk_lookup verdicts.
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

const LOOPBACK4_BE: u32 = u32::from_be(0x7f00_0001);
const LOOPBACK6: Ip = Ip {
    words: [0, 0, 0, u32::from_be(1)],
};

/// The running agent's cgroup v2 id (slot 0), written by the agent before it enrolls any pod.
#[map(name = "WEFT_AGENT_CGROUP")]
static AGENT_CGROUP: Array<u64> = Array::pinned(1, 0);

/// Enrolled pods, by network-namespace cookie. Written by the agent.
#[map(name = "WEFT_ENROLLED")]
static ENROLLED: HashMap<u64, PodEntry> = HashMap::pinned(limits::MAX_ENROLLED_PODS, 0);

/// Socket cookie of a captured client socket -> its original destination (connect -> sockops,
/// getpeername). Deleted when the socket closes.
#[map(name = "WEFT_ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, Endpoint> = LruHashMap::pinned(limits::MAX_TRACKED_CONNECTIONS, 0);

/// Established client-side tuple -> original destination, read by the getsockopt program on the
/// agent's accepted socket. Deleted when the client socket closes.
#[map(name = "WEFT_ORIG_BY_TUPLE")]
static ORIG_BY_TUPLE: LruHashMap<ConnKey, Endpoint> = LruHashMap::pinned(limits::MAX_TRACKED_CONNECTIONS, 0);

/// Enrolled pod address -> the agent's inbound listener in that pod. Entries vanish when the
/// listener closes (agent stopped), which makes sk_lookup refuse rather than bypass the agent.
#[map(name = "WEFT_LISTENERS")]
static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(limits::MAX_LISTENERS, 0);

// === connect ===

/// Fails closed: a captured connect whose original destination cannot be recorded is rejected
/// (EPERM) instead of being let through around the agent. Anything not captured is allowed.
#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    unsafe {
        if read_volatile(addr_of!((*sa).protocol)) != IPPROTO_TCP {
            return ALLOW;
        }
        let ip4 = read_volatile(addr_of!((*sa).user_ip4));
        let port = read_volatile(addr_of!((*sa).user_port)) as u16;
        if is_local_v4(ip4) {
            return local_connect(&ctx, port);
        }
        if !captured(&ctx) {
            return ALLOW;
        }
        let orig = Endpoint {
            ip: Ip::from_v4_be(ip4),
            port,
            _pad: 0,
        };
        if remember(&ctx, &orig).is_err() {
            return REJECT;
        }
        write_volatile(addr_of_mut!((*sa).user_ip4), LOOPBACK4_BE);
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(OUTBOUND.to_be()));
    }
    ALLOW
}

/// As [`weft_connect4`]; IPv4-mapped destinations go to the IPv4 listener through `::ffff:127.0.0.1`.
#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in weft_connect4.
    unsafe {
        if read_volatile(addr_of!((*sa).protocol)) != IPPROTO_TCP {
            return ALLOW;
        }
        let ip = Ip {
            words: read_ip6!(sa, user_ip6),
        };
        let port = read_volatile(addr_of!((*sa).user_port)) as u16;
        let local = match ip.v4_be() {
            Some(v4) => is_local_v4(v4),
            None => ip == LOOPBACK6 || ip == Ip::default(),
        };
        if local {
            return local_connect(&ctx, port);
        }
        if !captured(&ctx) {
            return ALLOW;
        }
        let orig = Endpoint { ip, port, _pad: 0 };
        if remember(&ctx, &orig).is_err() {
            return REJECT;
        }
        let to = if ip.is_v4_mapped() {
            Ip::from_v4_be(LOOPBACK4_BE)
        } else {
            LOOPBACK6
        };
        write_ip6!(sa, user_ip6, to.words);
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(OUTBOUND.to_be()));
    }
    ALLOW
}

/// Loopback (`127.0.0.0/8`) or unspecified (`0.0.0.0`): the connect stays inside the pod.
#[inline(always)]
fn is_local_v4(ip4_be: u32) -> bool {
    ip4_be == 0 || ip4_be & u32::from_be(0xff00_0000) == u32::from_be(0x7f00_0000)
}

/// A connect that stays inside the pod is not captured, but an enrolled pod never reaches the agent's
/// own listeners this way: the agent would proxy to itself, hop after hop. Rejected (EPERM) at once.
#[inline(always)]
unsafe fn local_connect(ctx: &SockAddrContext, port_be: u16) -> i32 {
    // SAFETY: as in captured.
    if ports::is_agent_port(u16::from_be(port_be)) && unsafe { captured(ctx) } {
        REJECT
    } else {
        ALLOW
    }
}

/// Whether this connect comes from an enrolled pod's network namespace and not from the agent.
///
/// The agent is recognised by its cgroup, which the agent records at start and a pod cannot join; a
/// socket mark would not do, since any container with `CAP_NET_RAW` can set one.
#[inline(always)]
unsafe fn captured(ctx: &SockAddrContext) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: ctx->sk is a kernel-provided socket pointer, checked for null before use; the helpers
    // take the program context.
    unsafe {
        let sk: *mut bpf_sock = read_volatile(addr_of!((*sa).__bindgen_anon_1.sk));
        if sk.is_null() {
            return false;
        }
        if AGENT_CGROUP
            .get(0)
            .is_some_and(|agent| *agent != 0 && *agent == bpf_get_current_cgroup_id())
        {
            return false;
        }
        let netns = bpf_get_netns_cookie(sa as *mut c_void);
        ENROLLED.get_ptr(netns).is_some()
    }
}

#[inline(always)]
unsafe fn remember(ctx: &SockAddrContext, orig: &Endpoint) -> Result<(), i32> {
    // SAFETY: the helper takes the program context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    ORIG_BY_COOKIE.insert(cookie, orig, 0).map_err(|e| e as i32)
}

// === getpeername ===

/// Reports the original destination to a captured client. Fails open: on no record the kernel's
/// answer (the agent's listener) stands.
#[cgroup_sock_addr(getpeername4)]
pub fn weft_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in weft_connect4.
    unsafe {
        let cookie = bpf_get_socket_cookie(sa as *mut c_void);
        if let Some(orig) = ORIG_BY_COOKIE.get_ptr(cookie)
            && let Some(v4) = (*orig).ip.v4_be()
        {
            write_volatile(addr_of_mut!((*sa).user_ip4), v4);
            write_volatile(addr_of_mut!((*sa).user_port), u32::from((*orig).port));
        }
    }
    ALLOW
}

/// IPv6 counterpart of [`weft_getpeername4`].
#[cgroup_sock_addr(getpeername6)]
pub fn weft_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in weft_connect4.
    unsafe {
        let cookie = bpf_get_socket_cookie(sa as *mut c_void);
        if let Some(orig) = ORIG_BY_COOKIE.get_ptr(cookie) {
            let orig = *orig;
            write_ip6!(sa, user_ip6, orig.ip.words);
            write_volatile(addr_of_mut!((*sa).user_port), u32::from(orig.port));
        }
    }
    ALLOW
}

// === sockops ===

/// Tracks captured client sockets: asks for state callbacks before the SYN, records the established
/// tuple, and deletes every record of the socket when it closes. Never changes the connection.
#[sock_ops]
pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // SAFETY: ctx.ops is valid for the program's lifetime; fields are read volatile.
    unsafe {
        let op = read_volatile(addr_of!((*ops).op));
        let cookie = bpf_get_socket_cookie(ops as *mut c_void);
        match op {
            BPF_SOCK_OPS_TCP_CONNECT_CB => {
                if ORIG_BY_COOKIE.get_ptr(cookie).is_some() {
                    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
                }
            }
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
                if let Some(orig) = ORIG_BY_COOKIE.get_ptr(cookie)
                    && let Some(key) = sockops_key(&ctx)
                {
                    // Full map: the agent's getsockopt finds nothing and refuses the connection.
                    let _ = ORIG_BY_TUPLE.insert(&key, &*orig, 0);
                }
            }
            BPF_SOCK_OPS_STATE_CB => {
                let new_state = read_volatile(addr_of!((*ops).__bindgen_anon_1.args[1]));
                if new_state == BPF_TCP_CLOSE && ORIG_BY_COOKIE.get_ptr(cookie).is_some() {
                    if let Some(key) = sockops_key(&ctx) {
                        let _ = ORIG_BY_TUPLE.remove(&key);
                    }
                    let _ = ORIG_BY_COOKIE.remove(cookie);
                }
            }
            _ => {}
        }
    }
    0
}

/// The client-side tuple of a sockops socket, qualified by its network namespace.
#[inline(always)]
unsafe fn sockops_key(ctx: &SockOpsContext) -> Option<ConnKey> {
    let ops = ctx.ops;
    // SAFETY: as in weft_sockops.
    unsafe {
        // Every field is read unconditionally: branch-dependent reads get merged by LLVM into one
        // load through a selected context pointer, which the verifier rejects.
        let family = read_volatile(addr_of!((*ops).family));
        let (l4, r4) = (
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).remote_ip4)),
        );
        let (l6, r6) = (read_ip6!(ops, local_ip6), read_ip6!(ops, remote_ip6));
        let (local, remote) = match family {
            AF_INET => (Ip::from_v4_be(l4), Ip::from_v4_be(r4)),
            AF_INET6 => (Ip { words: l6 }, Ip { words: r6 }),
            _ => return None,
        };
        // local_port: host order; remote_port: network order in the upper 16 bits.
        let local_port = (read_volatile(addr_of!((*ops).local_port)) as u16).to_be();
        let remote_port = (read_volatile(addr_of!((*ops).remote_port)) >> 16) as u16;
        Some(ConnKey {
            netns_cookie: bpf_get_netns_cookie(ops as *mut c_void),
            client: Endpoint {
                ip: local,
                port: local_port,
                _pad: 0,
            },
            listener: Endpoint {
                ip: remote,
                port: remote_port,
                _pad: 0,
            },
        })
    }
}

// === getsockopt ===

/// Answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` on
/// the agent's accepted sockets. Fails closed in effect: with no record the kernel's own error
/// stands and the agent refuses the connection.
#[cgroup_sockopt(getsockopt)]
pub fn weft_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: ctx.sockopt is valid for the program's lifetime; optval is bounds-checked below.
    unsafe {
        let level = read_volatile(addr_of!((*so).level));
        if (level != SOL_IP && level != SOL_IPV6) || read_volatile(addr_of!((*so).optname)) != SO_ORIGINAL_DST {
            return ALLOW;
        }
        let sk: *mut bpf_sock = read_volatile(addr_of!((*so).__bindgen_anon_1.sk));
        if sk.is_null() {
            return ALLOW;
        }
        // Accepted socket: its source is the listener, its destination the client.
        let (s4, d4) = (
            read_volatile(addr_of!((*sk).src_ip4)),
            read_volatile(addr_of!((*sk).dst_ip4)),
        );
        let (s6, d6) = (read_ip6!(sk, src_ip6), read_ip6!(sk, dst_ip6));
        let (listener_ip, client_ip) = match read_volatile(addr_of!((*sk).family)) {
            AF_INET => (Ip::from_v4_be(s4), Ip::from_v4_be(d4)),
            AF_INET6 => (Ip { words: s6 }, Ip { words: d6 }),
            _ => return ALLOW,
        };
        let key = ConnKey {
            netns_cookie: bpf_get_netns_cookie(so as *mut c_void),
            client: Endpoint {
                ip: client_ip,
                port: read_volatile(addr_of!((*sk).dst_port)),
                _pad: 0,
            },
            listener: Endpoint {
                ip: listener_ip,
                port: (read_volatile(addr_of!((*sk).src_port)) as u16).to_be(),
                _pad: 0,
            },
        };
        let Some(orig) = ORIG_BY_TUPLE.get_ptr(&key) else {
            return ALLOW;
        };
        let orig = *orig;
        let optval = read_volatile(addr_of!((*so).__bindgen_anon_2.optval)) as *mut u8;
        let optval_end = read_volatile(addr_of!((*so).__bindgen_anon_3.optval_end)) as *mut u8;
        match (level, orig.ip.v4_be()) {
            (SOL_IP, Some(v4)) => {
                // struct sockaddr_in { u16 family; be16 port; be32 addr; u8 zero[8]; }
                if optval.add(16) > optval_end {
                    return ALLOW;
                }
                write_volatile(optval as *mut u16, AF_INET as u16);
                write_volatile(optval.add(2) as *mut u16, orig.port);
                write_volatile(optval.add(4) as *mut u32, v4);
                write_volatile(optval.add(8) as *mut u32, 0);
                write_volatile(optval.add(12) as *mut u32, 0);
                write_volatile(addr_of_mut!((*so).optlen), 16);
            }
            (SOL_IPV6, None) => {
                // struct sockaddr_in6 { u16 family; be16 port; u32 flowinfo; u8 addr[16]; u32 scope; }
                if optval.add(28) > optval_end {
                    return ALLOW;
                }
                write_volatile(optval as *mut u16, AF_INET6 as u16);
                write_volatile(optval.add(2) as *mut u16, orig.port);
                write_volatile(optval.add(4) as *mut u32, 0);
                write_volatile(optval.add(8) as *mut u32, orig.ip.words[0]);
                write_volatile(optval.add(12) as *mut u32, orig.ip.words[1]);
                write_volatile(optval.add(16) as *mut u32, orig.ip.words[2]);
                write_volatile(optval.add(20) as *mut u32, orig.ip.words[3]);
                write_volatile(optval.add(24) as *mut u32, 0);
                write_volatile(addr_of_mut!((*so).optlen), 28);
            }
            _ => return ALLOW,
        }
        write_volatile(addr_of_mut!((*so).retval), 0);
    }
    ALLOW
}

// === sk_lookup ===

/// Steers TCP arriving from outside an enrolled pod, to any local port but HBONE, to the agent's
/// inbound listener for that address. Attached only to enrolled pods' network namespaces, so it fails
/// closed: with no listener (agent down) the connection is dropped, never delivered around the agent.
/// The agent's other ports (15001, 15006) are never a plaintext target: refused, so the agent is not
/// asked to proxy to itself. Traffic on loopback passes: the agent's own connection to the application
/// is bound to `lo` (a locally delivered packet otherwise reports the device of the local address,
/// `eth0`).
///
/// A dropped lookup finds no socket, so the kernel answers the SYN with a reset: refused at once.
#[sk_lookup]
pub fn weft_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: ctx.lookup is valid for the program's lifetime; fields are read volatile.
    unsafe {
        let port = read_volatile(addr_of!((*l).local_port));
        if read_volatile(addr_of!((*l).protocol)) != IPPROTO_TCP
            || read_volatile(addr_of!((*l).ingress_ifindex)) == LOOPBACK_IFINDEX
            || port == u32::from(HBONE)
        {
            return SK_PASS;
        }
        if port <= u32::from(u16::MAX) && ports::is_agent_port(port as u16) {
            return SK_DROP;
        }
        let (ip4, ip6) = (read_volatile(addr_of!((*l).local_ip4)), read_ip6!(l, local_ip6));
        let ip = match read_volatile(addr_of!((*l).family)) {
            AF_INET => Ip::from_v4_be(ip4),
            AF_INET6 => Ip { words: ip6 },
            _ => return SK_PASS,
        };
        match LISTENERS.redirect_sk_lookup(&ctx, ListenerKey { ip }, 0) {
            Ok(()) => SK_PASS,
            Err(_) => SK_DROP,
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
