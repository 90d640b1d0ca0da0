//! The sockets the agent opens inside pods, and what it asks of them.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, AsRawFd},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
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
