//! Validation of HBONE `CONNECT` requests, apart from any I/O.

use std::net::{IpAddr, SocketAddr};

use http::{Method, Uri};
use weft_model::ports;

/// Target ports a tunnel may never reach: the agent's own listeners inside the pod.
pub const FORBIDDEN_PORTS: [u16; 3] = [ports::OUTBOUND, ports::INBOUND_PLAINTEXT, ports::HBONE];

/// Why a request is not a valid HBONE `CONNECT`; answered with 400.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// The method is not `CONNECT`.
    #[error("method {method} is not CONNECT")]
    Method {
        /// The method received.
        method: Method,
    },
    /// The URI has a scheme or a path: not authority-form.
    #[error("request target is not in authority form")]
    NotAuthorityForm,
    /// No `:authority`.
    #[error("missing :authority")]
    MissingAuthority,
    /// The authority carries `user@`.
    #[error("authority may not carry user info")]
    UserInfo,
    /// The authority is not a literal `ip:port` (host names, zone ids and missing ports included).
    #[error("authority {authority:?} is not ip:port")]
    NotIpPort {
        /// The authority received.
        authority: String,
    },
    /// Port 0.
    #[error("target port 0")]
    PortZero,
    /// One of the agent's own ports.
    #[error("target port {port} is reserved for the mesh")]
    ForbiddenPort {
        /// The port.
        port: u16,
    },
    /// An unspecified, multicast or broadcast address, which no TCP connection can reach.
    #[error("target address {ip} is not a unicast address")]
    NotUnicast {
        /// The address.
        ip: IpAddr,
    },
}

/// The target of an HBONE request: `method` must be `CONNECT` and `uri` authority-form `ip:port` (IPv6 in
/// brackets, no zone id, no user info, no host name), with a port other than 0 and the agent's own ports
/// ([`FORBIDDEN_PORTS`]), to a unicast address (an IPv4-mapped address is judged as the IPv4 address it
/// carries: `[::ffff:0.0.0.0]` is unspecified).
pub fn parse_connect(method: &Method, uri: &Uri) -> Result<SocketAddr, BadRequest> {
    if method != Method::CONNECT {
        return Err(BadRequest::Method { method: method.clone() });
    }
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return Err(BadRequest::NotAuthorityForm);
    }
    let authority = uri.authority().ok_or(BadRequest::MissingAuthority)?.as_str();
    if authority.contains('@') {
        return Err(BadRequest::UserInfo);
    }
    let not_ip_port = || BadRequest::NotIpPort {
        authority: authority.to_owned(),
    };
    if authority.contains('%') {
        return Err(not_ip_port());
    }
    let target: SocketAddr = authority.parse().map_err(|_| not_ip_port())?;
    match target.port() {
        0 => return Err(BadRequest::PortZero),
        port if FORBIDDEN_PORTS.contains(&port) => return Err(BadRequest::ForbiddenPort { port }),
        _ => {}
    }
    let ip = target.ip();
    // A connection to an IPv4-mapped address goes to the IPv4 address it carries.
    let reached = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let broadcast = matches!(reached, IpAddr::V4(v4) if v4.is_broadcast());
    if reached.is_unspecified() || reached.is_multicast() || broadcast {
        return Err(BadRequest::NotUnicast { ip });
    }
    Ok(target)
}
