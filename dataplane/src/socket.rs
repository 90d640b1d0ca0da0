//! The sockets the agent opens inside pods, and what it asks of them.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, AsRawFd},
    str::FromStr,
};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use weft_ebpf_common::marks;

use crate::netns::NetNs;

const SO_NETNS_COOKIE: libc::c_int = 71;
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Binds a listener inside `netns`; an IPv6 listener is IPv6-only (IPv4 has its own).
pub fn listen_in(netns: &NetNs, addr: SocketAddr, backlog: i32) -> io::Result<tokio::net::TcpListener> {
    let socket = netns.run(|| -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        Ok(socket)
    })??;
    tokio::net::TcpListener::from_std(socket.into())
}

/// How an agent socket presents itself.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// The pod's own address, chosen by the kernel: outbound on behalf of the pod.
    Pod,
    /// A foreign address (the original client's), with `IP_TRANSPARENT`; replies are routed back to
    /// the agent by the pod's `LOCAL_REPLY` rule. Inbound to the application.
    Spoofed(IpAddr),
}

/// Creates an unconnected TCP socket inside `netns`, tagged so capture ignores it.
pub fn agent_socket_in(netns: &NetNs, dst: SocketAddr, source: Source) -> io::Result<tokio::net::TcpSocket> {
    let socket = netns.run(|| -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        let mut mark = marks::AGENT;
        if let Source::Spoofed(ip) = source {
            mark |= marks::LOCAL_REPLY;
            match ip {
                IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
                IpAddr::V6(_) => set_ipv6_transparent(&socket)?,
            }
            // Marks the connection as the agent's for sk_lookup, which lets loopback traffic pass.
            socket.bind_device(Some(b"lo"))?;
            socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
        }
        socket.set_mark(mark)?;
        socket.set_tcp_nodelay(true)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    })??;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}

fn set_ipv6_transparent(socket: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid fd, pointer and length of a c_int option.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The cookie of the network namespace a socket lives in.
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd; the kernel writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The original destination of a captured connection accepted on the outbound listener, answered by
/// the capture programs exactly as iptables REDIRECT would (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`).
pub fn original_dst(socket: &impl AsFd, listener_family_v6: bool) -> io::Result<SocketAddr> {
    let fd = socket.as_fd().as_raw_fd();
    if listener_family_v6 {
        // SAFETY: zeroed sockaddr_in6 is a valid value.
        let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: valid fd; the kernel writes at most `len` bytes into `sa`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if sa.sin6_family != libc::AF_INET6 as libc::sa_family_t {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "original destination is not IPv6",
            ));
        }
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sa.sin6_addr.s6_addr),
            u16::from_be(sa.sin6_port),
            0,
            0,
        )))
    } else {
        // SAFETY: zeroed sockaddr_in is a valid value.
        let mut sa: libc::sockaddr_in = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: valid fd; the kernel writes at most `len` bytes into `sa`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if sa.sin_family != libc::AF_INET as libc::sa_family_t {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "original destination is not IPv4",
            ));
        }
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )))
    }
}

/// A TCP congestion control algorithm, by the kernel's name for it (`cubic`, `bbr`, `reno`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CongestionControl(String);

/// The kernel's limit on a congestion control name, without the terminating NUL (`TCP_CA_NAME_MAX` - 1).
const CONGESTION_NAME_MAX: usize = 15;

impl FromStr for CongestionControl {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        let valid = (1..=CONGESTION_NAME_MAX).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(format!(
                "{name:?} is not a TCP congestion control name (1 to {CONGESTION_NAME_MAX} characters of a-z, 0-9 and _)"
            ))
        }
    }
}

impl CongestionControl {
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Sets it on `socket`. Set on a listener, it holds for every connection the listener accepts.
    pub fn apply(&self, socket: &impl AsFd) -> io::Result<()> {
        SockRef::from(socket).set_tcp_congestion(self.0.as_bytes())
    }

    /// Whether this kernel lets the agent use it: set on a socket of its own, which is then closed.
    pub fn check(&self) -> Result<(), String> {
        let name = &self.0;
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| format!("opening a TCP socket to try congestion control {name:?}: {e}"))?;
        match self.apply(&socket) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(format!(
                "this kernel has no TCP congestion control {name:?} (available: {})",
                std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                    .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
            )),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(format!(
                "TCP congestion control {name:?} is not in net.ipv4.tcp_allowed_congestion_control, and the agent \
                 lacks CAP_NET_ADMIN to use it anyway"
            )),
            Err(e) => Err(format!("setting TCP congestion control {name:?}: {e}")),
        }
    }
}

/// The congestion control a socket uses.
pub fn congestion_control(socket: &impl AsFd) -> io::Result<String> {
    let raw = SockRef::from(socket).tcp_congestion()?;
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Ok(String::from_utf8_lossy(&raw[..end]).into_owned())
}

/// Raises the soft limit on open files to the hard one. A proxied connection holds a socket on each
/// side, and the usual soft limit (1,024) would cap a process at a few hundred connections.
pub fn raise_open_file_limit() -> io::Result<()> {
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if rlim.rlim_cur >= rlim.rlim_max {
        return Ok(());
    }
    rlim.rlim_cur = rlim.rlim_max;
    // SAFETY: setrlimit only reads the rlimit we pass; on failure the limit stays as it was.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn congestion_control_names_are_the_kernels_syntax() {
        for ok in ["cubic", "bbr", "reno", "dctcp", "bbr2", "h_tcp", "abcdefghijklmno"] {
            assert_eq!(
                ok.parse::<CongestionControl>().map(|c| c.name().to_owned()),
                Ok(ok.to_owned())
            );
        }
        for bad in ["", "Cubic", "cu bic", "bbr!", "abcdefghijklmnop", "../cubic"] {
            let err = bad.parse::<CongestionControl>().expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn a_listener_passes_its_congestion_control_to_the_connections_it_accepts() {
        let default =
            congestion_control(&Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket")).expect("read");
        // Something other than what a socket gets anyway, or the test would prove nothing.
        let other: CongestionControl = if default == "reno" { "cubic" } else { "reno" }.parse().expect("valid");
        other.check().expect("reno and cubic are in every kernel Weft supports");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        other.apply(&listener).expect("set on the listener");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        assert_eq!(congestion_control(&accepted).expect("read"), other.name());

        // The other end keeps the default; set after connect, it changes.
        assert_eq!(congestion_control(&client).expect("read"), default);
        other.apply(&client).expect("set on a connected socket");
        assert_eq!(congestion_control(&client).expect("read"), other.name());
    }

    #[test]
    fn an_algorithm_the_kernel_lacks_is_named_with_what_it_has() {
        let missing: CongestionControl = "weft_nosuchcc".parse().expect("valid syntax");
        let err = missing.check().expect_err("no kernel has it");
        assert!(
            err.contains("\"weft_nosuchcc\"") && err.contains("available: ") && err.contains("reno"),
            "{err}"
        );
    }
}
