//! The `Config` gRPC service: streams each node agent the resources it should hold, xDS-like.
//!
//! Per stream: authenticate the node (bearer token: [`NodeAuth`]), read its `Subscribe` (which must name that
//! node), send a full push, then a delta after every new state that changes what the node should
//! hold. Each push waits for its ACK/NACK before the next one is sent; states published meanwhile are
//! coalesced. The source (the local store or the Kubernetes source) is never held up: streams watch
//! its states through a watch channel.

pub mod desired;
pub mod session;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use weft_api::v1::{self, Push, StreamRequest, config_server, stream_request};

use crate::{auth::NodeAuth, store::State};
use desired::TypeFilter;
use session::{Acked, Session};

/// The `Config` service.
pub struct ConfigService {
    states: watch::Receiver<Arc<State>>,
    auth: Arc<NodeAuth>,
    trust_domain: String,
    root_namespace: String,
    shutdown: watch::Receiver<bool>,
}

impl ConfigService {
    /// `states` is the model's source (the local store's [`subscribe`](crate::store::Store::subscribe)
    /// or the Kubernetes source's): every stream follows it. `root_namespace`'s policies go to every
    /// node, marked mesh-wide. `shutdown` turning true ends every stream (cleanly, status OK), so that
    /// the server can drain.
    pub fn new(
        states: watch::Receiver<Arc<State>>,
        auth: Arc<NodeAuth>,
        trust_domain: String,
        root_namespace: String,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            states,
            auth,
            trust_domain,
            root_namespace,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl config_server::Config for ConfigService {
    type StreamStream = ReceiverStream<Result<Push, Status>>;

    async fn stream(&self, request: Request<Streaming<StreamRequest>>) -> Result<Response<Self::StreamStream>, Status> {
        let node = self.auth.authenticate(request.metadata()).await?;
        let peer = request.remote_addr();
        // One push in flight at a time, so a small buffer is enough.
        let (tx, rx) = mpsc::channel(2);
        let stream = Stream {
            node: node.clone(),
            trust_domain: self.trust_domain.clone(),
            root_namespace: self.root_namespace.clone(),
            inbound: request.into_inner(),
            tx,
            states: self.states.clone(),
            shutdown: self.shutdown.clone(),
        };
        let span = tracing::info_span!("config_stream", node = %node, peer = ?peer);
        tokio::spawn(stream.run().instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One subscriber's stream.
struct Stream {
    node: String,
    trust_domain: String,
    root_namespace: String,
    inbound: Streaming<StreamRequest>,
    tx: mpsc::Sender<Result<Push, Status>>,
    states: watch::Receiver<Arc<State>>,
    shutdown: watch::Receiver<bool>,
}

impl Stream {
    /// Runs until the subscriber goes away, breaks the protocol, or the controller shuts down.
    async fn run(mut self) {
        let Some(subscribe) = self.subscribe().await else {
            return;
        };
        if subscribe.node != self.node {
            let msg = format!(
                "the credential is node {:?}'s but the subscription is for node {:?}",
                self.node, subscribe.node
            );
            tracing::warn!(subscribed = subscribe.node, "refused a subscription for another node");
            let _ = self.tx.send(Err(Status::permission_denied(msg))).await;
            return;
        }
        let filter = match TypeFilter::parse(&subscribe.types) {
            Ok(f) => f,
            Err(msg) => {
                let _ = self.tx.send(Err(Status::invalid_argument(msg))).await;
                return;
            }
        };
        tracing::info!(types = ?subscribe.types, "subscribed");
        let mut session = Session::new();
        loop {
            if session.ready() {
                let state = self.states.borrow_and_update().clone();
                let mesh = desired::Mesh {
                    trust_domain: &self.trust_domain,
                    root_namespace: &self.root_namespace,
                };
                let desired = desired::desired(&state, &self.node, mesh, &filter);
                if let Some(mut push) = session.next_push(&desired, state.revision) {
                    push.store_id.clone_from(&state.id);
                    tracing::debug!(
                        nonce = push.nonce,
                        full = push.full,
                        resources = push.resources.len(),
                        removed = push.removed.len(),
                        revision = push.revision,
                        "push"
                    );
                    if self.tx.send(Ok(push)).await.is_err() {
                        tracing::debug!("subscriber went away");
                        return;
                    }
                }
            }
            let ready = session.ready();
            tokio::select! {
                message = self.inbound.message() => match message {
                    Ok(Some(StreamRequest { kind: Some(stream_request::Kind::Ack(ack)) })) => {
                        log_ack(&ack, session.ack(&ack));
                    }
                    Ok(Some(_)) => {
                        let status = Status::invalid_argument("after Subscribe, only Ack messages are expected");
                        let _ = self.tx.send(Err(status)).await;
                        return;
                    }
                    Ok(None) => {
                        tracing::info!("subscriber closed the stream");
                        return;
                    }
                    Err(status) => {
                        tracing::info!(error = %status.message(), "stream broke");
                        return;
                    }
                },
                changed = self.states.changed(), if ready => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = wait_true(&mut self.shutdown) => return,
                () = self.tx.closed() => return,
            }
        }
    }

    /// Waits for the first message, which must be a Subscribe.
    async fn subscribe(&mut self) -> Option<v1::Subscribe> {
        let message = tokio::select! {
            m = self.inbound.message() => m,
            _ = wait_true(&mut self.shutdown) => return None,
        };
        match message {
            Ok(Some(StreamRequest {
                kind: Some(stream_request::Kind::Subscribe(s)),
            })) => Some(s),
            Ok(Some(_)) => {
                let status = Status::invalid_argument("the first message must be a Subscribe");
                let _ = self.tx.send(Err(status)).await;
                None
            }
            Ok(None) | Err(_) => None,
        }
    }
}

fn log_ack(ack: &v1::Ack, outcome: Result<Acked, session::UnexpectedAck>) {
    match outcome {
        Ok(Acked::Accepted) => tracing::debug!(nonce = ack.nonce, "ack"),
        Ok(Acked::Rejected { keys }) => {
            let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
            tracing::warn!(nonce = ack.nonce, error = ack.error, rejected = ?keys, "nack: the subscriber rejected resources");
        }
        Err(e) => tracing::warn!(error = %e, "ignored an ack"),
    }
}

/// Resolves once the flag is true (or its sender is gone, which also means: stop).
async fn wait_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod peer_auth_tests;
