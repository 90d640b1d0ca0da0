//! Inbound: HBONE from other agents (15008) and plaintext from outside the mesh (15006), both
//! authorized by policy, both connected to the application from the client's own address.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use weft_dataplane::socket::Source;
use weft_hbone::server::{Handler, Refusal, Request};
use weft_model::policy::{Connection, Decision};

use super::{Direction, Mode, Reason, Record, connect_in, forward, is_forbidden};
use crate::{pod::PodContext, state};

/// A connection steered to the plaintext inbound listener.
pub async fn plaintext(ctx: Arc<PodContext>, downstream: TcpStream, peer: SocketAddr) {
    let mut record = Record::new(ctx.clone(), Direction::Inbound, Mode::Plaintext, peer);
    // Steered by sk_lookup: the accepted socket's local address is the original destination.
    let Ok(dst) = downstream.local_addr() else {
        record.reason = Reason::Io;
        return;
    };
    record.dst = Some(dst);
    // The capture programs refuse these first; this holds whatever reached the listener.
    if is_forbidden(dst, &record.own.pod.ips) {
        record.reason = Reason::ForbiddenTarget;
        return;
    }
    let state = ctx.mesh.state();
    record.peer_workload = state.workload_by_ip(peer.ip()).map(|w| w.pod.qualified_name());
    if ctx.mesh.strict_mtls {
        record.reason = Reason::StrictMtls;
        return;
    }
    let conn = Connection {
        source_principal: None,
        source_ip: peer.ip(),
        destination_ip: dst.ip(),
        destination_port: dst.port(),
    };
    if let Decision::Deny { policy } = state::authorize(&state, &ctx.name, &ctx.uid, &conn) {
        record.policy = policy;
        record.reason = Reason::Denied;
        return;
    }
    forward(&mut record, downstream, dst, Source::Spoofed(peer.ip())).await;
}

/// Serves HBONE connections accepted on the pod's 15008 listener.
pub async fn hbone(ctx: Arc<PodContext>, listener: TcpListener) {
    let handler = Arc::new(Inbound(ctx.clone()));
    super::accept_loop(ctx, listener, move |ctx, stream, peer| {
        let handler = handler.clone();
        async move {
            // Presented: the pod's current certificate; without one, nothing is served.
            let cert = match ctx.mesh.identities.get(&ctx.current().identity).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(pod = %ctx.name, %peer, error = %e, "HBONE connection refused");
                    return;
                }
            };
            if let Err(e) = weft_hbone::server::serve(stream, cert.server.clone(), handler).await {
                tracing::debug!(pod = %ctx.name, %peer, error = %e, "HBONE connection");
            }
        }
    })
    .await;
}

struct Inbound(Arc<PodContext>);

impl Handler for Inbound {
    type Session = Record;

    async fn open(&self, req: &Request) -> (Record, Result<TcpStream, Refusal>) {
        let ctx = &self.0;
        let mut record = Record::new(ctx.clone(), Direction::Inbound, Mode::Hbone, req.peer);
        record.dst = Some(req.target);
        record.peer_identity = Some(req.identity.clone());
        // A tunnel into this pod reaches this pod only: the agent is not an open proxy.
        if !record.own.pod.ips.contains(&req.target.ip()) {
            record.reason = Reason::ForbiddenTarget;
            return (record, Err(Refusal::Forbidden));
        }
        let state = ctx.mesh.state();
        record.peer_workload = state.workload_by_ip(req.peer.ip()).map(|w| w.pod.qualified_name());
        let principal = req.identity.to_string();
        let conn = Connection {
            source_principal: Some(&principal),
            source_ip: req.peer.ip(),
            destination_ip: req.target.ip(),
            destination_port: req.target.port(),
        };
        if let Decision::Deny { policy } = state::authorize(&state, &ctx.name, &ctx.uid, &conn) {
            record.policy = policy;
            record.reason = Reason::Denied;
            return (record, Err(Refusal::Denied));
        }
        match connect_in(ctx, req.target, Source::Spoofed(req.peer.ip())).await {
            Ok(s) => (record, Ok(s)),
            Err(r) => {
                record.reason = r;
                (record, Err(Refusal::Unreachable))
            }
        }
    }

    fn closed(&self, mut record: Record, result: std::io::Result<weft_hbone::server::Transferred>) {
        match result {
            Ok(t) => record.transferred = t,
            Err(_) if record.reason == Reason::Done => record.reason = Reason::Io,
            Err(_) => {}
        }
    }
}
