//! The agent's proxies inside an enrolled pod: outbound (captured connects, to their original
//! destination) and inbound (steered connections from outside, to the application, with the client's
//! address as source). Plain TCP for now; HBONE replaces the outbound path between meshed pods.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use weft_dataplane::{
    proxy::{Transferred, copy},
    socket::{self, Source},
};
use weft_model::ports;

use crate::inpod::PodContext;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a connection ended; bounded, so it can label metrics later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Proxied until both sides closed.
    Done,
    /// No original destination recorded for an outbound connection: refused.
    NoOriginalDst,
    /// A destination the agent never proxies to (its own ports): refused.
    ForbiddenTarget,
    /// The upstream refused, timed out or was unreachable.
    UpstreamConnect,
    /// An I/O error while proxying.
    Io,
    /// The agent could not open its socket in the pod.
    LocalSocket,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Done => "done",
            Reason::NoOriginalDst => "no_original_dst",
            Reason::ForbiddenTarget => "forbidden_target",
            Reason::UpstreamConnect => "upstream_connect",
            Reason::Io => "io",
            Reason::LocalSocket => "local_socket",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Outbound,
    Inbound,
}

/// One access record per connection, written when the connection ends, on every path.
struct Record<'a> {
    ctx: &'a PodContext,
    direction: Direction,
    src: SocketAddr,
    dst: Option<SocketAddr>,
    started: Instant,
    transferred: Transferred,
    reason: Reason,
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        let dst = self.dst.map(|d| d.to_string()).unwrap_or_default();
        let (direction, src_workload, dst_workload) = match self.direction {
            Direction::Outbound => ("outbound", self.ctx.pod.qualified_name(), String::new()),
            Direction::Inbound => ("inbound", String::new(), self.ctx.pod.qualified_name()),
        };
        tracing::info!(
            target: "weft::access",
            direction,
            src.addr = %self.src,
            src.workload = %src_workload,
            dst.addr = %dst,
            dst.workload = %dst_workload,
            bytes_sent = self.transferred.sent,
            bytes_received = self.transferred.received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            reason = self.reason.as_str(),
            "connection"
        );
    }
}

/// Accepts captured connects on the pod's outbound listener.
pub async fn outbound_loop(ctx: Arc<PodContext>, listener: TcpListener, v6: bool) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(outbound(ctx.clone(), stream, v6));
            }
            Err(e) => {
                tracing::warn!(pod = %ctx.pod.qualified_name(), error = %e, "outbound accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn outbound(ctx: Arc<PodContext>, mut downstream: TcpStream, v6: bool) {
    // The client's socket is on the pod's loopback; report the pod's own address as source.
    let src_ip = ctx.pod.ips.iter().find(|ip| ip.is_ipv6() == v6).copied();
    let src = downstream.peer_addr().ok();
    let mut record = Record {
        ctx: &ctx,
        direction: Direction::Outbound,
        src: match (src_ip, src) {
            (Some(ip), Some(s)) => SocketAddr::new(ip, s.port()),
            (_, Some(s)) => s,
            _ => SocketAddr::from(([0, 0, 0, 0], 0)),
        },
        dst: None,
        started: Instant::now(),
        transferred: Transferred::default(),
        reason: Reason::Done,
    };
    let dst = match socket::original_dst(&downstream, v6) {
        Ok(d) => d,
        Err(_) => {
            record.reason = Reason::NoOriginalDst;
            return;
        }
    };
    record.dst = Some(dst);
    if is_forbidden(dst, &ctx) {
        record.reason = Reason::ForbiddenTarget;
        return;
    }
    let _ = downstream.set_nodelay(true);
    let upstream = match socket::agent_socket_in(&ctx.netns, dst, Source::Pod) {
        Ok(s) => s,
        Err(_) => {
            record.reason = Reason::LocalSocket;
            return;
        }
    };
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, upstream.connect(dst)).await {
        Ok(Ok(s)) => s,
        _ => {
            record.reason = Reason::UpstreamConnect;
            return;
        }
    };
    // The address the destination sees: the pod's own, with the agent socket's port.
    if let Ok(local) = upstream.local_addr() {
        record.src = local;
    }
    match copy(&mut downstream, &mut upstream).await {
        Ok(t) => record.transferred = t,
        Err(_) => record.reason = Reason::Io,
    }
}

/// Accepts connections steered to the pod's inbound listener.
pub async fn inbound_loop(ctx: Arc<PodContext>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(inbound(ctx.clone(), stream, peer));
            }
            Err(e) => {
                tracing::warn!(pod = %ctx.pod.qualified_name(), error = %e, "inbound accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn inbound(ctx: Arc<PodContext>, mut downstream: TcpStream, peer: SocketAddr) {
    let mut record = Record {
        ctx: &ctx,
        direction: Direction::Inbound,
        src: peer,
        dst: None,
        started: Instant::now(),
        transferred: Transferred::default(),
        reason: Reason::Done,
    };
    // Steered by sk_lookup: the accepted socket's local address is the original destination.
    let Ok(dst) = downstream.local_addr() else {
        record.reason = Reason::Io;
        return;
    };
    record.dst = Some(dst);
    if is_forbidden(dst, &ctx) {
        record.reason = Reason::ForbiddenTarget;
        return;
    }
    let _ = downstream.set_nodelay(true);
    let upstream = match socket::agent_socket_in(&ctx.netns, dst, Source::Spoofed(peer.ip())) {
        Ok(s) => s,
        Err(_) => {
            record.reason = Reason::LocalSocket;
            return;
        }
    };
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, upstream.connect(dst)).await {
        Ok(Ok(s)) => s,
        _ => {
            record.reason = Reason::UpstreamConnect;
            return;
        }
    };
    match copy(&mut downstream, &mut upstream).await {
        Ok(t) => record.transferred = t,
        Err(_) => record.reason = Reason::Io,
    }
}

/// The agent's own ports on the pod's own addresses: proxying there would loop.
fn is_forbidden(dst: SocketAddr, ctx: &PodContext) -> bool {
    matches!(dst.port(), ports::OUTBOUND | ports::INBOUND_PLAINTEXT | ports::HBONE)
        && (ctx.pod.ips.contains(&dst.ip()) || dst.ip().is_loopback())
}
