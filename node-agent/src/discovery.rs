//! The discovery client: subscribes to the controller's config stream, applies every push to the
//! [`State`], and ACKs or NACKs it. While the controller is away the agent keeps serving on the last
//! good state; it reconnects with backoff and the controller resyncs it in full.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use weft_api::v1::{Ack, StreamRequest, Subscribe, config_client::ConfigClient, stream_request::Kind};

use crate::{controller::Controller, state::State};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Follows the controller forever, publishing each new state on `tx`.
pub async fn run(controller: Controller, node: String, tx: watch::Sender<Arc<State>>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match follow(&controller, &node, &tx).await {
            Ok(pushes) => tracing::warn!(pushes, "the controller closed the config stream; reconnecting"),
            Err((pushes, status)) => {
                tracing::warn!(pushes, code = ?status.code(), error = %status.message(), "config stream; reconnecting")
            }
        }
        // A stream that delivered something was healthy: start the backoff over.
        if tx.borrow().synced {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff + jitter(backoff)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One stream, until it ends. Returns how many pushes it delivered.
async fn follow(
    controller: &Controller,
    node: &str,
    tx: &watch::Sender<Arc<State>>,
) -> Result<usize, (usize, tonic::Status)> {
    let (req_tx, req_rx) = mpsc::channel(4);
    let subscribe = StreamRequest {
        kind: Some(Kind::Subscribe(Subscribe {
            node: node.to_owned(),
            types: Vec::new(),
        })),
    };
    // The receiver is alive (held below), so the first send of a fresh channel cannot fail.
    let _ = req_tx.send(subscribe).await;
    let mut client = ConfigClient::with_interceptor(controller.channel(), controller.auth());
    let mut pushes = 0;
    let mut stream = client
        .stream(ReceiverStream::new(req_rx))
        .await
        .map_err(|s| (pushes, s))?
        .into_inner();
    loop {
        let push = match stream.message().await {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(pushes),
            Err(s) => return Err((pushes, s)),
        };
        pushes += 1;
        let current = tx.borrow().clone();
        let (next, rejected) = current.apply(&push);
        tracing::debug!(
            nonce = %push.nonce,
            full = push.full,
            changed = push.resources.len(),
            removed = push.removed.len(),
            revision = push.revision,
            rejected = rejected.len(),
            "config push"
        );
        tx.send_replace(Arc::new(next));
        let ack = Ack {
            nonce: push.nonce,
            error: rejected
                .iter()
                .map(|r| format!("{}: {}", r.key, r.error))
                .collect::<Vec<_>>()
                .join("; "),
            rejected: rejected.into_iter().map(|r| r.key).collect(),
        };
        if req_tx
            .send(StreamRequest {
                kind: Some(Kind::Ack(ack)),
            })
            .await
            .is_err()
        {
            return Ok(pushes);
        }
    }
}

/// Up to a quarter of `d`, so that agents restarted together do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d / 4 * (nanos % 1000) / 1000
}
