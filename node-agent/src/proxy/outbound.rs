//! Outbound: a captured connect, by the plan for its original destination.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
};

use tokio::net::TcpStream;
use weft_dataplane::socket::{self, Source};
use weft_hbone::{
    client::{PoolKey, Tunnel},
    identity::Identity,
    tls,
};

use super::{Direction, Mode, Reason, Record, connect_in, forward, is_forbidden};
use crate::{pod::PodContext, state::Plan};

fn unspecified(v6: bool) -> SocketAddr {
    let ip = if v6 {
        IpAddr::from([0u16; 8])
    } else {
        IpAddr::from([0u8; 4])
    };
    SocketAddr::new(ip, 0)
}

/// A connect captured on the outbound listener.
pub async fn outbound(ctx: Arc<PodContext>, downstream: TcpStream, v6: bool) {
    // Until the upstream socket exists, the source is the pod's address (the client socket sits on
    // the pod's loopback).
    let mut record = Record::new(ctx.clone(), Direction::Outbound, Mode::Passthrough, unspecified(v6));
    let pod_ip = record.own.pod.ips.iter().find(|ip| ip.is_ipv6() == v6).copied();
    record.src = SocketAddr::new(pod_ip.unwrap_or(record.src.ip()), 0);
    let Ok(dst) = socket::original_dst(&downstream, v6) else {
        record.reason = Reason::NoOriginalDst;
        return;
    };
    record.dst = Some(dst);
    if is_forbidden(dst, &record.own.pod.ips) {
        record.reason = Reason::ForbiddenTarget;
        return;
    }
    let pick = ctx.mesh.next_endpoint.fetch_add(1, Ordering::Relaxed);
    let state = ctx.mesh.state();
    let plan = state.plan(dst, pick);
    record.service = state.service_by_vip(dst.ip()).map(|s| s.name.clone());
    if let Plan::Hbone { target, .. } | Plan::Passthrough { target, .. } = &plan {
        record.peer = state.workload_by_ip(target.ip()).cloned();
    }
    drop(state);
    match plan {
        Plan::Hbone {
            peer,
            target,
            identity,
            workload,
        } => {
            record.mode = Mode::Hbone;
            record.dst = Some(target);
            record.peer_workload = Some(workload);
            record.peer_identity = Some(Identity::clone(&identity));
            hbone(&mut record, downstream, peer, target, Identity::clone(&identity)).await;
        }
        Plan::Passthrough { target, workload } => {
            record.peer_workload = workload;
            forward(&mut record, downstream, target, Source::Pod).await;
        }
        Plan::NoEndpoint { service } => {
            record.peer_workload = Some(service);
            record.reason = Reason::NoEndpoint;
        }
    }
}

/// Through an HBONE tunnel, in mutual TLS as the pod's identity, to the destination's agent. Without
/// a certificate the connection is refused, never sent in plaintext.
async fn hbone(
    record: &mut Record,
    mut downstream: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    expected: Identity,
) {
    // Boxed: an async fn's state is as large as its largest await point, and the set-up (certificate,
    // TLS and HTTP/2 handshakes) would otherwise stay in every connection's task for its whole life.
    let mut tunnel = match Box::pin(open_tunnel(&record.ctx, &record.own.identity, peer, target, expected)).await {
        Ok(t) => t,
        Err(reason) => {
            record.reason = reason;
            return;
        }
    };
    let _ = downstream.set_nodelay(true);
    record.established();
    match tunnel.splice(&mut downstream).await {
        Ok(t) => record.transferred = t,
        Err(_) => record.reason = Reason::Io,
    }
}

/// A tunnel to `target` through the peer agent at `peer`, as the pod's identity.
async fn open_tunnel(
    ctx: &Arc<PodContext>,
    own: &Identity,
    peer: SocketAddr,
    target: SocketAddr,
    expected: Identity,
) -> Result<Tunnel, Reason> {
    let cert = ctx.mesh.identities.get(own).await.map_err(|e| {
        tracing::warn!(pod = %ctx.name, error = %e, "outbound refused");
        Reason::NoIdentity
    })?;
    let key = PoolKey {
        source: ctx.uid.clone(),
        destination: expected.clone(),
        peer,
    };
    let dial_ctx = ctx.clone();
    let dial = move |peer: SocketAddr| async move {
        let tcp = connect_in(&dial_ctx, peer, Source::Pod)
            .await
            .map_err(|r| std::io::Error::other(r.as_str()))?;
        if let Some(cc) = &dial_ctx.mesh.tunnel_congestion
            && let Err(e) = cc.apply(&tcp)
        {
            // Checked at start, so this is unexpected; the tunnel still works with the pod's default.
            tracing::warn!(pod = %dial_ctx.name, %peer, congestion_control = cc.name(), error = %e, "HBONE connection keeps the pod's congestion control");
        }
        Ok(tcp)
    };
    let tls = || tls::client_config(&cert.credential, &cert.bundle, &expected);
    ctx.mesh.pool.connect(key, tls, dial, target).await.map_err(|e| {
        tracing::debug!(pod = %ctx.name, %target, error = %e, "tunnel");
        Reason::Tunnel(e.reason())
    })
}
