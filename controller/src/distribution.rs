//! The `Config` gRPC service: streams each node agent the resources it should hold, xDS-like.
//!
//! Per stream: authenticate the node (bearer token: [`NodeAuth`]), read its `Subscribe` (which must name that
//! node), resync it (the buckets of what it holds that differ, or everything), then send a delta
//! after every new state that changes what the node should hold, in chunks of bounded size. Each push waits for its ACK/NACK before the next one is sent; states published meanwhile are
//! coalesced. The source (the local store or the Kubernetes source) is never held up: streams watch
//! its states through a watch channel.

pub mod desired;
pub mod index;
pub mod resource;
pub mod session;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use weft_api::{
    encoded::{EncodedPush, config_server},
    v1::{self, StreamRequest, stream_request},
};

use crate::{auth::NodeAuth, store::State};
use desired::TypeFilter;
use index::{Index, MeshConfig};
use session::{Acked, CHUNK_BYTES, Subscriber};

/// Streams sending a resync of more than one chunk at a time, unless told otherwise: after a
/// controller restart thousands of agents reconnect at once, and those that need more than a little
/// are served this many at a time, so that the pushes in flight (and the memory they hold) stay
/// bounded. Agents that held what they should get an empty resync and never wait here.
pub const CONCURRENT_RESYNCS: usize = 32;

/// How often a subscriber whose resync waits for its turn is told so ([`EncodedPush::queued`]): well
/// within the agent's deadline for a silent controller (`weft_node::controller::Deadlines`, 30 s).
pub const QUEUED_NOTICE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest a subscriber holding a turn may take in nothing of its resync: past it, its stream ends
/// (it reconnects and asks again) and the turn goes to the next in line. Without it, one subscriber
/// that stops reading (its HTTP/2 PINGs still answered) would hold a turn for as long as it lives,
/// and those told to wait would wait as long.
pub const RESYNC_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// How large resyncs take turns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncLimits {
    /// Sent at a time (at least 1): [`CONCURRENT_RESYNCS`].
    pub concurrent: usize,
    /// How often a waiting subscriber is told that it waits (at least 10 ms): [`QUEUED_NOTICE_EVERY`].
    pub notice_every: std::time::Duration,
    /// How long a subscriber holding a turn may take in nothing: [`RESYNC_STALL`].
    pub stall: std::time::Duration,
}

impl Default for ResyncLimits {
    fn default() -> Self {
        Self {
            concurrent: CONCURRENT_RESYNCS,
            notice_every: QUEUED_NOTICE_EVERY,
            stall: RESYNC_STALL,
        }
    }
}

/// The turns of large resyncs: [`ResyncLimits::concurrent`] at a time, first come first served, and
/// an estimate of how many wait ahead of each waiter.
#[derive(Debug)]
struct Turns {
    notice_every: std::time::Duration,
    stall: std::time::Duration,
    permits: Arc<tokio::sync::Semaphore>,
    /// Tickets given to waiters, in order...
    issued: std::sync::atomic::AtomicU64,
    /// ...and one past the highest ticket whose holder got its turn (the semaphore is fair: turns
    /// come in ticket order, but for waiters who left, which the estimate then counts as waiting).
    served: std::sync::atomic::AtomicU64,
}

impl Turns {
    fn new(limits: ResyncLimits) -> Self {
        Self {
            notice_every: limits.notice_every.max(std::time::Duration::from_millis(10)),
            stall: limits.stall,
            permits: Arc::new(tokio::sync::Semaphore::new(limits.concurrent.max(1))),
            issued: 0.into(),
            served: 0.into(),
        }
    }
}

/// The `Config` service.
pub struct ConfigService {
    index: watch::Receiver<Arc<Index>>,
    auth: Arc<NodeAuth>,
    shutdown: watch::Receiver<bool>,
    turns: Arc<Turns>,
}

impl ConfigService {
    /// `states` is the model's source (the local store's [`subscribe`](crate::store::Store::subscribe)
    /// or the Kubernetes source's): every stream follows it, through one [`Index`] made from each new
    /// state (see [`follow`]). `mesh.root_namespace`'s policies go to every node, marked mesh-wide.
    /// `shutdown` turning true ends every stream (cleanly, status OK), so that the server can drain.
    /// Large resyncs take turns as `resyncs` says. Spawns the index's task: call it on the runtime.
    pub fn new(
        states: watch::Receiver<Arc<State>>,
        auth: Arc<NodeAuth>,
        mesh: MeshConfig,
        shutdown: watch::Receiver<bool>,
        resyncs: ResyncLimits,
    ) -> Self {
        Self {
            index: follow(states, mesh),
            auth,
            shutdown,
            turns: Arc::new(Turns::new(resyncs)),
        }
    }
}

/// The index of every state `states` publishes, kept up to date by a task of its own: each new
/// state is turned into a new index once, off the runtime's worker threads (the streams, handshakes
/// and keepalives go on meanwhile), in work proportional to what changed. States published while an
/// update runs are coalesced into the next one. The task ends when `states`' sender does.
pub fn follow(mut states: watch::Receiver<Arc<State>>, mesh: MeshConfig) -> watch::Receiver<Arc<Index>> {
    let first = Arc::new(Index::build(mesh, states.borrow_and_update().clone()));
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        while states.changed().await.is_ok() {
            let next = states.borrow_and_update().clone();
            let current = tx.borrow().clone();
            let started = std::time::Instant::now();
            let updated = tokio::task::spawn_blocking(move || current.update(next)).await;
            let Ok(index) = updated else {
                tracing::error!("the distribution index update panicked; streams keep the last index");
                continue;
            };
            tracing::debug!(
                revision = index.revision,
                took_us = started.elapsed().as_micros() as u64,
                "distribution index updated"
            );
            if tx.send(Arc::new(index)).is_err() {
                return;
            }
        }
    });
    rx
}

#[tonic::async_trait]
impl config_server::Config for ConfigService {
    type StreamStream = ReceiverStream<Result<EncodedPush, Status>>;

    async fn stream(&self, request: Request<Streaming<StreamRequest>>) -> Result<Response<Self::StreamStream>, Status> {
        let node = self.auth.authenticate(request.metadata()).await?;
        let peer = request.remote_addr();
        // One push in flight at a time; a push of many chunks waits for the transport between them.
        let (tx, rx) = mpsc::channel(2);
        let stream = Stream {
            node: node.clone(),
            inbound: request.into_inner(),
            tx,
            index: self.index.clone(),
            shutdown: self.shutdown.clone(),
            turns: self.turns.clone(),
        };
        let span = tracing::info_span!("config_stream", node = %node, peer = ?peer);
        tokio::spawn(stream.run().instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One subscriber's stream.
struct Stream {
    node: String,
    inbound: Streaming<StreamRequest>,
    tx: mpsc::Sender<Result<EncodedPush, Status>>,
    index: watch::Receiver<Arc<Index>>,
    shutdown: watch::Receiver<bool>,
    turns: Arc<Turns>,
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
        tracing::info!(types = ?subscribe.types, held = subscribe.held.is_some(), "subscribed");
        // A full resync waits for its turn before it is even computed (it holds the whole world); a
        // resync by buckets is computed first, and waits only when it turns out large.
        let notify = subscribe.accepts_queued;
        let mut permit = None;
        if Subscriber::resync_is_full(&self.index.borrow(), subscribe.held.as_ref()) {
            let Some(p) = self.turn(notify).await else { return };
            permit = Some(p);
        }
        let mut subscriber = Subscriber::new(self.node.clone(), filter.clone());
        let mut first = subscriber.resync(&self.index.borrow_and_update().clone(), subscribe.held.as_ref());
        if permit.is_none() && first.resources.iter().map(|e| e.bytes.len()).sum::<usize>() > CHUNK_BYTES {
            drop(first);
            let Some(p) = self.turn(notify).await else { return };
            permit = Some(p);
            subscriber = Subscriber::new(self.node.clone(), filter);
            first = subscriber.resync(&self.index.borrow_and_update().clone(), subscribe.held.as_ref());
        }
        let stall = permit.as_ref().map(|_| self.turns.stall);
        if !self.send(first, stall).await {
            return;
        }
        drop(permit);
        loop {
            if subscriber.ready() {
                let now = self.index.borrow_and_update().clone();
                if let Some(push) = subscriber.next(&now)
                    && !self.send(push, None).await
                {
                    return;
                }
            }
            let ready = subscriber.ready();
            tokio::select! {
                message = self.inbound.message() => match message {
                    Ok(Some(StreamRequest { kind: Some(stream_request::Kind::Ack(ack)) })) => {
                        log_ack(&ack, subscriber.ack(&ack));
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
                changed = self.index.changed(), if ready => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = wait_true(&mut self.shutdown) => return,
                () = self.tx.closed() => return,
            }
        }
    }

    /// Waits for a turn to send a large resync ([`CONCURRENT_RESYNCS`]); `None` when the subscriber
    /// went away or the controller is shutting down meanwhile. A subscriber that must wait, and
    /// `notify`: understands notices, is told so at once and every [`ResyncLimits::notice_every`]
    /// until its turn, so that it does not take the wait for a silent controller and go to the back of the
    /// queue.
    async fn turn(&mut self, notify: bool) -> Option<tokio::sync::OwnedSemaphorePermit> {
        use std::sync::atomic::Ordering;
        if let Ok(permit) = self.turns.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        let ticket = self.turns.issued.fetch_add(1, Ordering::Relaxed);
        let acquire = self.turns.permits.clone().acquire_owned();
        tokio::pin!(acquire);
        let mut notices = tokio::time::interval(self.turns.notice_every);
        notices.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let waited = std::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                permit = &mut acquire => {
                    self.turns.served.fetch_max(ticket + 1, Ordering::Relaxed);
                    tracing::debug!(waited_ms = waited.elapsed().as_millis() as u64, "the resync's turn came");
                    return permit.ok();
                }
                _ = wait_true(&mut self.shutdown) => return None,
                () = self.tx.closed() => return None,
                _ = notices.tick(), if notify => {
                    let ahead = ticket.saturating_sub(self.turns.served.load(Ordering::Relaxed));
                    let ahead = u32::try_from(ahead).unwrap_or(u32::MAX);
                    // Never blocks: a subscriber that has not read the last notices gets no more (and
                    // a notice waiting to be sent cannot hold up the turn when it comes).
                    match self.tx.try_send(Ok(EncodedPush::queued(ahead))) {
                        Ok(()) => tracing::debug!(ahead, "the resync waits for its turn; told the subscriber"),
                        Err(mpsc::error::TrySendError::Full(_)) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => return None,
                    }
                }
            }
        }
    }

    /// Sends one push, in chunks; false when the subscriber went away, or took in nothing for
    /// `stall` (then its stream ends).
    async fn send(&mut self, push: session::Outgoing, stall: Option<std::time::Duration>) -> bool {
        tracing::debug!(
            nonce = push.nonce,
            full = push.full,
            resync = push.resync,
            buckets = push.replaced_buckets.len(),
            resources = push.resources.len(),
            removed = push.removed.len(),
            revision = push.revision,
            "push"
        );
        for chunk in push.chunks(CHUNK_BYTES) {
            let sent = match stall {
                Some(stall) => match tokio::time::timeout(stall, self.tx.send(Ok(chunk))).await {
                    Ok(sent) => sent,
                    Err(_) => {
                        tracing::warn!(
                            stall_s = stall.as_secs_f32(),
                            "the subscriber took in nothing of its resync for too long; ended its stream so that the next in line gets the turn"
                        );
                        return false;
                    }
                },
                None => self.tx.send(Ok(chunk)).await,
            };
            if sent.is_err() {
                tracing::debug!("subscriber went away");
                return false;
            }
        }
        true
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
