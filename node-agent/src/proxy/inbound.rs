//! Inbound: HBONE from other agents (15008) and plaintext from outside the mesh (15006), both
//! authorized by policy, both connected to the application from the client's own address.
//!
//! Authorization holds for a connection's whole life, not only at its start: every new state (a
//! policy or the pod's labels changed) decides each open connection again (HBONE tunnels through
//! the server's per-connection recheck, plaintext alongside its copy), and one it now denies is
//! closed, with an access record saying `revoked` and the policy, as ztunnel does.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::{TcpListener, TcpStream};
use weft_dataplane::socket::Source;
use weft_hbone::server::{Handler, Refusal, Request};
use weft_model::{
    peer_auth::Requirement,
    policy::{Connection, Decision},
};

use super::{Direction, Mode, Reason, Record, connect_in, forward, is_forbidden};
use crate::{
    pod::PodContext,
    state::{self, State},
};

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
    record.peer = state.workload_by_ip(peer.ip()).cloned();
    record.peer_workload = record.peer.as_ref().map(|w| w.key().clone());
    // A STRICT PeerAuthentication of this port refuses plaintext before any AuthorizationPolicy.
    if let Requirement::Strict { policy } = state::mtls_requirement(&state, &ctx.name, &ctx.uid, dst.port()) {
        record.reason = Reason::StrictMtls;
        record.policy = Some(policy.to_string());
        return;
    }
    let authz = Authz {
        principal: None,
        source: peer.ip(),
        destination: dst,
    };
    if let Decision::Deny { policy } = authz.decide(&ctx, &state) {
        record.policy = policy;
        record.reason = Reason::Denied;
        return;
    }
    drop(state);
    let revoked = tokio::select! {
        () = forward(&mut record, downstream, dst, Source::Spoofed(peer.ip())) => None,
        policy = revoked(&ctx, |state| plaintext_decision(&ctx, state, &authz)) => Some(policy),
    };
    if let Some(policy) = revoked {
        record.reason = Reason::Revoked;
        record.policy = policy;
    }
}

/// A plaintext connection's decision under `state`: denied, naming the PeerAuthentication, when its
/// port is now STRICT; otherwise as its AuthorizationPolicies decide. An open plaintext connection
/// is closed as `revoked` when either changes against it.
fn plaintext_decision(ctx: &PodContext, state: &State, authz: &Authz<'_>) -> Decision {
    match state::mtls_requirement(state, &ctx.name, &ctx.uid, authz.destination.port()) {
        Requirement::Strict { policy } => Decision::Deny {
            policy: Some(policy.to_string()),
        },
        Requirement::Permissive => authz.decide(ctx, state),
    }
}

/// What an inbound connection's authorization is decided on, kept to decide it again. Borrowed from
/// the connection: deciding copies nothing.
struct Authz<'a> {
    /// The verified client identity (HBONE), or none (plaintext).
    principal: Option<&'a str>,
    source: IpAddr,
    destination: SocketAddr,
}

impl Authz<'_> {
    /// The decision for the pod as `state` has it (its current labels) under `state`'s policies.
    fn decide(&self, ctx: &PodContext, state: &State) -> Decision {
        let conn = Connection {
            source_principal: self.principal,
            source_ip: self.source,
            destination_ip: self.destination.ip(),
            destination_port: self.destination.port(),
        };
        state::authorize(state, &ctx.name, &ctx.uid, &conn)
    }
}

/// Resolves, with the denying policy, once `decide` denies under a new state; never while every
/// state allows. Holds only a receiver of the state while it waits: what `decide` needs is borrowed
/// from the connection, nothing is copied per connection.
async fn revoked(ctx: &PodContext, decide: impl Fn(&State) -> Decision) -> Option<String> {
    let mut states = ctx.mesh.state.clone();
    states.borrow_and_update();
    while states.changed().await.is_ok() {
        let state = states.borrow_and_update().clone();
        if let Decision::Deny { policy } = decide(&state) {
            return policy;
        }
    }
    // The state's writer is gone: the agent is stopping.
    std::future::pending().await
}

/// Serves HBONE connections accepted on the pod's 15008 listener.
pub async fn hbone(ctx: Arc<PodContext>, listener: TcpListener) {
    let handler = Arc::new(Inbound(ctx.clone()));
    super::accept_loop(ctx, listener, move |ctx, stream, peer| {
        let handler = handler.clone();
        async move {
            // Before anything is spent on it: one source cannot take every handshake or connection.
            let admitted = match ctx.mesh.admission.admit(peer.ip()) {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(pod = %ctx.name, %peer, error = %e, "HBONE connection refused");
                    return;
                }
            };
            // Presented: the pod's current certificate; without one, nothing is served.
            let cert = match ctx.mesh.identities.get(&ctx.current().identity).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(pod = %ctx.name, %peer, error = %e, "HBONE connection refused");
                    return;
                }
            };
            let limits = weft_hbone::server::Limits::default();
            if let Err(e) =
                weft_hbone::server::serve_with_limits(stream, cert.server.clone(), handler, limits, Some(admitted))
                    .await
            {
                tracing::debug!(pod = %ctx.name, %peer, error = %e, "HBONE connection");
            }
        }
    })
    .await;
}

pub(super) struct Inbound(pub(super) Arc<PodContext>);

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
        record.peer = state.workload_by_ip(req.peer.ip()).cloned();
        record.peer_workload = record.peer.as_ref().map(|w| w.key().clone());
        if let Decision::Deny { policy } = Authz::of_request(req).decide(ctx, &state) {
            record.policy = policy;
            record.reason = Reason::Denied;
            return (record, Err(Refusal::Denied));
        }
        match connect_in(ctx, req.target, Source::Spoofed(req.peer.ip())).await {
            Ok(s) => {
                record.established();
                (record, Ok(s))
            }
            Err(r) => {
                record.reason = r;
                (record, Err(Refusal::Unreachable))
            }
        }
    }

    fn closed(&self, mut record: Record, result: std::io::Result<weft_hbone::server::Transferred>) {
        match result {
            Ok(t) => record.transferred = t,
            Err(e) if record.reason == Reason::Done && e.kind() == std::io::ErrorKind::PermissionDenied => {
                // Ended by `revoked`: name the policy that now denies it.
                record.reason = Reason::Revoked;
                if let Some(authz) = Authz::of(&record)
                    && let Decision::Deny { policy } = authz.decide(&self.0, &self.0.mesh.state())
                {
                    record.policy = policy;
                }
            }
            Err(_) if record.reason == Reason::Done => record.reason = Reason::Io,
            Err(_) => {}
        }
    }

    fn rechecks(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut states = self.0.mesh.state.clone();
        states.borrow_and_update();
        async move {
            if states.changed().await.is_err() {
                // The state's writer is gone: the agent is stopping.
                std::future::pending::<()>().await;
            }
        }
    }

    fn allowed(&self, req: &Request) -> bool {
        Authz::of_request(req)
            .decide(&self.0, &self.0.mesh.state())
            .is_allowed()
    }
}

impl<'a> Authz<'a> {
    /// The authorization inputs of a tunnel.
    fn of_request(req: &'a Request) -> Self {
        Self {
            principal: Some(req.identity.as_str()),
            source: req.peer.ip(),
            destination: req.target,
        }
    }

    /// The authorization inputs of an open tunnel, from its record.
    fn of(record: &'a Record) -> Option<Self> {
        Some(Self {
            principal: Some(record.peer_identity.as_ref()?.as_str()),
            source: record.src.ip(),
            destination: record.dst?,
        })
    }
}
