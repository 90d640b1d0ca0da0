//! The agent's proxies inside an enrolled pod.
//!
//! - Outbound (15001): a captured connect goes by its original destination's plan: HBONE to a
//!   meshed workload (service VIPs load-balanced first), plain TCP to anything outside the mesh.
//! - Inbound HBONE (15008): mutual TLS from another agent; each CONNECT is authorized by policy and
//!   connected to the application from the client's address.
//! - Inbound plaintext (15006): connections from outside the mesh, steered by sk_lookup; the same
//!   policies with no source identity, or refused outright in strict mode.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use weft_dataplane::{
    admission::AdmissionLimits,
    proxy::{Transferred, copy},
    socket::{self, Source},
};
use weft_hbone::identity::Identity;
use weft_model::ports;

use crate::{
    access::AccessRecord,
    metrics::{self, TcpLabels, WorkloadNames},
    pod::{Current, PodContext},
    state::Workload,
};

mod inbound;
mod outbound;
#[cfg(test)]
mod tests;

pub use inbound::hbone as inbound_hbone;
pub use outbound::outbound;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What plaintext clients may hold on this node's 15006 listeners. Each connection costs the agent
/// two sockets (the client's and one to the application) and a task, so one source may hold 512,
/// and all sources together 16,384. Plaintext has no handshake (its connect to the application is
/// bounded by `CONNECT_TIMEOUT`), so the handshake bounds are not used.
pub const PLAINTEXT_ADMISSION: AdmissionLimits = AdmissionLimits {
    connections: 16_384,
    handshakes: 0,
    handshakes_per_source: 0,
    connections_per_source: 512,
};

/// A connection steered to a pod's plaintext inbound listener (15006): admitted first, then
/// authorized and proxied. One past its source's (or the node's) bound is closed at once.
pub async fn inbound_plaintext(ctx: Arc<PodContext>, downstream: TcpStream, peer: SocketAddr) {
    let _admitted = match ctx.mesh.plaintext_admission.admit_plain(peer.ip()) {
        Ok(admitted) => admitted,
        Err(refused) => {
            tracing::debug!(pod = %ctx.name, %peer, error = %refused, "plaintext connection refused");
            // Reset rather than FIN: the client learns at once, and no TIME_WAIT stays behind.
            let _ = downstream.set_zero_linger();
            return;
        }
    };
    inbound::plaintext(ctx, downstream, peer).await;
}

/// Where a connection ended; bounded, so it can label metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Proxied until both sides closed.
    Done,
    /// No original destination recorded for an outbound connection: refused.
    NoOriginalDst,
    /// A destination the agent never proxies to (its own ports, another pod's address): refused.
    ForbiddenTarget,
    /// The upstream refused, timed out or was unreachable.
    UpstreamConnect,
    /// An I/O error while proxying.
    Io,
    /// The agent could not open its socket in the pod.
    LocalSocket,
    /// Denied by an authorization policy.
    Denied,
    /// Allowed when it opened, closed because a changed policy (or the pod's changed labels) now
    /// denies it.
    Revoked,
    /// Plaintext inbound to a port that a STRICT PeerAuthentication covers.
    StrictMtls,
    /// No certificate for the pod's identity: refused rather than sent in plaintext.
    NoIdentity,
    /// A service VIP with no endpoint for the port.
    NoEndpoint,
    /// The HBONE tunnel could not be opened; the label says why.
    Tunnel(&'static str),
}

impl Reason {
    /// ztunnel's response flags: `-` when the connection went through, `DENY` when a policy refused
    /// or closed it, `CONNECT` when it could not be connected.
    fn response_flags(self) -> &'static str {
        match self {
            Reason::Done | Reason::Io => "-",
            Reason::Denied | Reason::Revoked | Reason::StrictMtls => "DENY",
            Reason::NoOriginalDst
            | Reason::ForbiddenTarget
            | Reason::UpstreamConnect
            | Reason::LocalSocket
            | Reason::NoIdentity
            | Reason::NoEndpoint
            | Reason::Tunnel(_) => "CONNECT",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Reason::Done => "done",
            Reason::NoOriginalDst => "no_original_dst",
            Reason::ForbiddenTarget => "forbidden_target",
            Reason::UpstreamConnect => "upstream_connect",
            Reason::Io => "io",
            Reason::LocalSocket => "local_socket",
            Reason::Denied => "denied",
            Reason::Revoked => "revoked",
            Reason::StrictMtls => "strict_mtls",
            Reason::NoIdentity => "no_identity",
            Reason::NoEndpoint => "no_endpoint",
            Reason::Tunnel(r) => r,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Outbound,
    Inbound,
}

/// How the connection crossed (or would have crossed) the network.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Hbone,
    Passthrough,
    Plaintext,
}

/// One access record per connection, written when the connection ends, on every path.
struct Record {
    ctx: Arc<PodContext>,
    /// The pod as it was when the connection started.
    own: Arc<Current>,
    direction: Direction,
    mode: Mode,
    src: SocketAddr,
    /// The peer's workload (`namespace/name`) when known: the state's own name, shared.
    peer_workload: Option<Arc<str>>,
    /// The peer's SPIFFE identity: the verified client's inbound, the expected server's outbound.
    peer_identity: Option<Identity>,
    /// The peer as the state has it, for the metrics' labels.
    peer: Option<Arc<Workload>>,
    /// The service (`namespace/name`) whose address the client connected to.
    service: Option<Arc<str>>,
    dst: Option<SocketAddr>,
    policy: Option<String>,
    started: Instant,
    transferred: Transferred,
    reason: Reason,
    /// Its metric labels once counted as opened (connected to its destination or tunnel, carrying
    /// bytes): made once, and counted again at the close with the final flags.
    opened: Option<TcpLabels>,
}

impl Record {
    fn new(ctx: Arc<PodContext>, direction: Direction, mode: Mode, src: SocketAddr) -> Self {
        Self {
            own: ctx.current(),
            ctx,
            direction,
            mode,
            src,
            peer_workload: None,
            peer_identity: None,
            peer: None,
            service: None,
            dst: None,
            policy: None,
            started: Instant::now(),
            transferred: Transferred::default(),
            reason: Reason::Done,
            opened: None,
        }
    }

    /// The connection reached its destination and starts carrying bytes: counted as opened.
    fn established(&mut self) {
        if self.opened.is_none() {
            let labels = self.labels("-");
            self.ctx.mesh.metrics.tcp.opened(&labels);
            self.opened = Some(labels);
        }
    }

    /// The label set of Istio's TCP metrics for this connection, as its agent reports it.
    fn labels(&self, response_flags: &'static str) -> TcpLabels {
        let own = &self.own;
        let peer = self.peer.as_ref().map_or_else(WorkloadNames::unknown, |w| {
            WorkloadNames::of(w.namespace(), w.name(), w.labels())
        });
        let peer_principal = self
            .peer_identity
            .as_ref()
            .map_or_else(metrics::unknown, |i| Arc::from(i.as_str()));
        let (reporter, src, src_principal, dst, dst_principal) = match self.direction {
            Direction::Outbound => ("source", &own.names, own.principal.clone(), &peer, peer_principal),
            Direction::Inbound => ("destination", &peer, peer_principal, &own.names, own.principal.clone()),
        };
        let (service, service_namespace, service_name) = match self.service.as_deref().and_then(|s| s.split_once('/')) {
            Some((namespace, name)) => (
                Arc::from(format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")),
                Arc::from(namespace),
                Arc::from(name),
            ),
            None => (metrics::unknown(), metrics::unknown(), metrics::unknown()),
        };
        TcpLabels {
            reporter,
            source_workload: src.workload.clone(),
            source_canonical_service: src.canonical_service.clone(),
            source_canonical_revision: src.canonical_revision.clone(),
            source_workload_namespace: src.namespace.clone(),
            source_principal: src_principal,
            source_app: src.app.clone(),
            source_version: src.version.clone(),
            destination_service: service,
            destination_service_namespace: service_namespace,
            destination_service_name: service_name,
            destination_workload: dst.workload.clone(),
            destination_canonical_service: dst.canonical_service.clone(),
            destination_canonical_revision: dst.canonical_revision.clone(),
            destination_workload_namespace: dst.namespace.clone(),
            destination_principal: dst_principal,
            destination_app: dst.app.clone(),
            destination_version: dst.version.clone(),
            request_protocol: "tcp",
            response_flags,
            connection_security_policy: match self.mode {
                Mode::Hbone => "mutual_tls",
                Mode::Passthrough | Mode::Plaintext => "none",
            },
        }
    }
}

/// The DNS domain of service names in metrics (`<name>.<namespace>.svc.cluster.local`).
const CLUSTER_DOMAIN: &str = "cluster.local";

impl Drop for Record {
    fn drop(&mut self) {
        // A connection refused or failed before it carried anything is opened and closed at once,
        // with its flags: the opened and closed counters always move together.
        let flags = self.reason.response_flags();
        let tcp = &self.ctx.mesh.metrics.tcp;
        let labels = match self.opened.take() {
            // The peer and service were known before it opened: only the flags can differ.
            Some(mut labels) => {
                labels.response_flags = flags;
                labels
            }
            None => {
                let labels = self.labels(flags);
                tcp.opened(&labels);
                labels
            }
        };
        // Istio counts bytes from the server as sent and bytes from the client as received.
        tcp.closed(&labels, self.transferred.sent, self.transferred.received);
        // Formatted and written by the access log's own thread.
        self.ctx.mesh.access.record(AccessRecord {
            own_name: self.ctx.name.clone(),
            own_identity: self.own.principal.clone(),
            outbound: matches!(self.direction, Direction::Outbound),
            mode: match self.mode {
                Mode::Hbone => "hbone",
                Mode::Passthrough => "passthrough",
                Mode::Plaintext => "plaintext",
            },
            src: self.src,
            dst: self.dst,
            peer_workload: self.peer_workload.take(),
            peer_identity: self.peer_identity.take(),
            policy: self.policy.take(),
            bytes_sent: self.transferred.sent,
            bytes_received: self.transferred.received,
            duration: self.started.elapsed(),
            reason: self.reason.as_str(),
        });
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

/// Connects to `dst` in plain TCP from inside the pod and proxies until both sides close, noting in
/// `record` where it ended.
async fn forward(record: &mut Record, mut downstream: TcpStream, dst: SocketAddr, source: Source) {
    record.dst = Some(dst);
    let _ = downstream.set_nodelay(true);
    let Ok(mut upstream) = connect_in(&record.ctx, dst, source)
        .await
        .map_err(|r| record.reason = r)
    else {
        return;
    };
    if matches!(source, Source::Pod)
        && let Ok(local) = upstream.local_addr()
    {
        // The address the destination sees: the pod's own, with the agent socket's port.
        record.src = local;
    }
    record.established();
    match copy(&mut downstream, &mut upstream).await {
        Ok(t) => record.transferred = t,
        Err(_) => record.reason = Reason::Io,
    }
}

/// A TCP connection from inside the pod's network namespace.
async fn connect_in(ctx: &PodContext, dst: SocketAddr, source: Source) -> Result<TcpStream, Reason> {
    let socket = socket::agent_socket_in(&ctx.netns, dst, source).map_err(|_| Reason::LocalSocket)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(s)) => Ok(s),
        _ => Err(Reason::UpstreamConnect),
    }
}

/// The agent's own ports on the pod's own, loopback or unspecified addresses: proxying there would make
/// the agent its own upstream, hop after hop.
fn is_forbidden(dst: SocketAddr, pod_ips: &[IpAddr]) -> bool {
    let ip = dst.ip().to_canonical();
    ports::is_agent_port(dst.port()) && (pod_ips.contains(&ip) || ip.is_loopback() || ip.is_unspecified())
}
