//! The agent's proxies inside an enrolled pod: outbound (captured connects, to their original
//! destination) and inbound (steered connections from outside, to the application, with the client's
//! address as source). Plain TCP for now; HBONE replaces the outbound path between meshed pods.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
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

impl<'a> Record<'a> {
    fn new(ctx: &'a PodContext, direction: Direction, src: SocketAddr) -> Self {
        Self {
            ctx,
            direction,
            src,
            dst: None,
            started: Instant::now(),
            transferred: Transferred::default(),
            reason: Reason::Done,
        }
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        let dst = self.dst.map(|d| d.to_string()).unwrap_or_default();
        let (direction, src_workload, dst_workload) = match self.direction {
            Direction::Outbound => ("outbound", self.ctx.name.as_str(), ""),
            Direction::Inbound => ("inbound", "", self.ctx.name.as_str()),
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

/// Accepts connections on one of the pod's listeners, each handled in its own task.
pub async fn accept_loop<F, Fut>(ctx: Arc<PodContext>, listener: TcpListener, handle: F)
where
    F: Fn(Arc<PodContext>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(ctx.clone(), stream, peer));
            }
            Err(e) => {
                tracing::warn!(pod = %ctx.name, error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A connect captured on the outbound listener: to its original destination, from the pod's address.
pub async fn outbound(ctx: Arc<PodContext>, downstream: TcpStream, v6: bool) {
    // Until the upstream socket exists, the source is the pod's address (the client socket sits on
    // the pod's loopback).
    let pod_ip = ctx.pod.ips.iter().find(|ip| ip.is_ipv6() == v6).copied();
    let src = SocketAddr::new(pod_ip.unwrap_or(IpAddr::from([0, 0, 0, 0])), 0);
    let mut record = Record::new(&ctx, Direction::Outbound, src);
    match socket::original_dst(&downstream, v6) {
        Ok(dst) => forward(&mut record, downstream, dst, Source::Pod).await,
        Err(_) => record.reason = Reason::NoOriginalDst,
    }
}

/// A connection steered to the inbound listener: to the application, from the client's address.
pub async fn inbound(ctx: Arc<PodContext>, downstream: TcpStream, peer: SocketAddr) {
    let mut record = Record::new(&ctx, Direction::Inbound, peer);
    // Steered by sk_lookup: the accepted socket's local address is the original destination.
    match downstream.local_addr() {
        Ok(dst) => forward(&mut record, downstream, dst, Source::Spoofed(peer.ip())).await,
        Err(_) => record.reason = Reason::Io,
    }
}

/// Connects to `dst` from inside the pod and proxies until both sides close, noting in `record`
/// where it ended.
async fn forward(record: &mut Record<'_>, mut downstream: TcpStream, dst: SocketAddr, source: Source) {
    record.dst = Some(dst);
    if is_forbidden(dst, record.ctx) {
        record.reason = Reason::ForbiddenTarget;
        return;
    }
    let _ = downstream.set_nodelay(true);
    let Ok(upstream) = socket::agent_socket_in(&record.ctx.netns, dst, source) else {
        record.reason = Reason::LocalSocket;
        return;
    };
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, upstream.connect(dst)).await {
        Ok(Ok(s)) => s,
        _ => {
            record.reason = Reason::UpstreamConnect;
            return;
        }
    };
    if matches!(source, Source::Pod)
        && let Ok(local) = upstream.local_addr()
    {
        // The address the destination sees: the pod's own, with the agent socket's port.
        record.src = local;
    }
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
