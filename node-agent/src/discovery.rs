//! The discovery client: subscribes to the controller's config stream, applies every push to the
//! [`State`], and ACKs or NACKs it. While the controller is away the agent keeps serving on the last
//! good state; it reconnects with backoff and the controller resyncs it in full.
//!
//! The agent follows one store: the one its first push came from. A controller that comes back with
//! another store (its store was lost and started over, or replaced) or with an older revision of the
//! same one (restored from a backup) is not followed: an empty store would unenroll every pod of the
//! node. The agent keeps its last good state, says why at error level on every attempt, and follows
//! again when its store is back (same identity, revision not behind) or when an operator restarts it.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use weft_api::v1::{Ack, Held, Push, StreamRequest, Subscribe, config_client::ConfigClient, stream_request::Kind};

use crate::{controller::Controller, state::State};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The store the agent follows, and the last revision of it the agent took.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Followed {
    pub store_id: String,
    pub revision: u64,
}

/// Why a push is not taken: it comes from another store, or from an older revision of this one.
pub fn refuse(followed: Option<&Followed>, store_id: &str, revision: u64, resync: bool) -> Option<String> {
    let followed = followed?;
    if store_id != followed.store_id {
        return Some(format!(
            "the controller's store is not the one this agent follows (store {:?} at revision {}; the controller now serves store {store_id:?} at revision {revision}): keeping the last good config until that store is back or this agent is restarted",
            followed.store_id, followed.revision
        ));
    }
    if resync && revision < followed.revision {
        return Some(format!(
            "the controller's store went back from revision {} to {revision} (store {store_id:?}): keeping the last good config until it catches up or this agent is restarted",
            followed.revision
        ));
    }
    None
}

/// Largest message the agent takes on the config stream: the controller cuts pushes into chunks of
/// about 1 MiB (see the controller's `session::CHUNK_BYTES`); this leaves room for one large resource.
pub const MAX_PUSH_CHUNK: usize = 16 * 1024 * 1024;

/// What a subscriber holds, built push by push: the agent's [`State`], or the scale harness's
/// lighter record of versions. Each push is staged chunk by chunk and published whole.
pub trait Holdings: Send + Sync + Sized + 'static {
    type Staged: Send;
    /// Whether a push was taken since the agent started.
    fn synced(&self) -> bool;
    /// The bucket summary of what it holds (`weft_api::sync`).
    fn held(&self) -> Vec<u64>;
    /// Starts a push whose first chunk is `first` (not taken yet).
    fn stage(self: &Arc<Self>, first: &Push) -> Self::Staged;
    /// Takes one chunk (the first included).
    fn take(staged: &mut Self::Staged, chunk: &Push);
    /// The holdings after the last chunk, and the keys ("type/name") rejected, with why.
    fn finish(staged: Self::Staged) -> (Self, Vec<(String, String)>);
    /// Told each time a config stream ended, or could not be opened, with the error if there was
    /// one (the agent then reconnects).
    fn stream_ended(&self, _error: Option<&tonic::Status>) {}
    /// Told each time the controller said that this stream's resync waits for its turn, behind about
    /// `ahead` others.
    fn queued(&self, _ahead: u32) {}
}

impl Holdings for State {
    type Staged = crate::state::Staged;

    fn synced(&self) -> bool {
        self.synced
    }

    fn held(&self) -> Vec<u64> {
        State::held(self)
    }

    fn stage(self: &Arc<Self>, first: &Push) -> Self::Staged {
        State::stage(self, first)
    }

    fn take(staged: &mut Self::Staged, chunk: &Push) {
        staged.take(chunk);
    }

    fn finish(staged: Self::Staged) -> (Self, Vec<(String, String)>) {
        let (state, rejected) = staged.finish();
        (state, rejected.into_iter().map(|r| (r.key, r.error)).collect())
    }
}

/// Follows the controller forever, publishing each new state on `tx`.
pub async fn run<H: Holdings>(controller: Controller, node: String, tx: watch::Sender<Arc<H>>) {
    let mut backoff = BACKOFF_MIN;
    let mut followed = None;
    loop {
        let error = match follow(&controller, &node, &tx, &mut followed).await {
            Ok(pushes) => {
                tracing::warn!(pushes, "the controller closed the config stream; reconnecting");
                None
            }
            Err((pushes, status)) => {
                tracing::warn!(pushes, code = ?status.code(), error = %status.message(), "config stream; reconnecting");
                Some(status)
            }
        };
        tx.borrow().stream_ended(error.as_ref());
        // A stream that delivered something was healthy: start the backoff over.
        if tx.borrow().synced() {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff + jitter(backoff)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One stream, until it ends. Returns how many pushes it delivered.
pub async fn follow<H: Holdings>(
    controller: &Controller,
    node: &str,
    tx: &watch::Sender<Arc<H>>,
    followed: &mut Option<Followed>,
) -> Result<usize, (usize, tonic::Status)> {
    let (req_tx, req_rx) = mpsc::channel(4);
    // What the agent holds of the store it follows: the controller resyncs only what differs.
    let held = followed.as_ref().filter(|_| tx.borrow().synced()).map(|f| Held {
        store_id: f.store_id.clone(),
        revision: f.revision,
        buckets: tx.borrow().held(),
    });
    let subscribe = StreamRequest {
        kind: Some(Kind::Subscribe(Subscribe {
            node: node.to_owned(),
            types: Vec::new(),
            held,
            accepts_queued: true,
        })),
    };
    // The receiver is alive (held below), so the first send of a fresh channel cannot fail.
    let _ = req_tx.send(subscribe).await;
    let mut client = ConfigClient::with_interceptor(controller.channel(), controller.auth())
        .max_decoding_message_size(MAX_PUSH_CHUNK);
    let mut pushes = 0;
    // Connecting, the TLS handshake and opening the stream have their own deadlines
    // (`controller::Deadlines`); this one bounds them all, and then the silence between the
    // controller's messages until the first push is complete: each chunk, and each notice that the
    // resync waits for its turn, starts it again. A busy controller says so; a silent one is left.
    // Later pushes come only when something changes: the connection's keepalive tells a quiet
    // controller from a gone one.
    let first_push = controller.deadlines().first_push;
    let mut deadline = tokio::time::Instant::now() + first_push;
    let late = || {
        tonic::Status::deadline_exceeded(format!(
            "the controller sent nothing for {}s before the first push was complete",
            first_push.as_secs_f32()
        ))
    };
    let mut stream = tokio::time::timeout_at(deadline, client.stream(ReceiverStream::new(req_rx)))
        .await
        .map_err(|_| (pushes, late()))?
        .map_err(|s| (pushes, s))?
        .into_inner();
    // The push being received: its staged holdings and its first chunk's header.
    let mut staged: Option<(H::Staged, Push)> = None;
    loop {
        let next = if pushes == 0 {
            let next = tokio::time::timeout_at(deadline, stream.message())
                .await
                .map_err(|_| (pushes, late()))?;
            deadline = tokio::time::Instant::now() + first_push;
            next
        } else {
            stream.message().await
        };
        let chunk = match next {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(pushes),
            Err(s) => return Err((pushes, s)),
        };
        if let Some(queued) = &chunk.queued {
            // A notice, not a push: only ever while no push has begun on this stream.
            if pushes > 0 || staged.is_some() {
                let why = "the controller said the resync waits for its turn after it had begun";
                return Err((pushes, tonic::Status::internal(why)));
            }
            tracing::info!(
                ahead = queued.ahead,
                "the controller queued this node's resync: waiting for its turn"
            );
            tx.borrow().queued(queued.ahead);
            continue;
        }
        let (mut holdings, head) = match staged.take() {
            Some((h, head)) if head.nonce == chunk.nonce => (h, head),
            Some((_, head)) => {
                let why = format!(
                    "a chunk of push {:?} arrived before push {:?} ended",
                    chunk.nonce, head.nonce
                );
                return Err((pushes, tonic::Status::internal(why)));
            }
            None => {
                if let Some(why) = refuse(
                    followed.as_ref(),
                    &chunk.store_id,
                    chunk.revision,
                    chunk.resync || chunk.full,
                ) {
                    tracing::error!(error = %why, "config push refused");
                    let nack = Ack {
                        nonce: chunk.nonce,
                        error: why.clone(),
                        rejected: Vec::new(),
                    };
                    let _ = req_tx
                        .send(StreamRequest {
                            kind: Some(Kind::Ack(nack)),
                        })
                        .await;
                    // Off this stream: the next one starts with a resync, checked again.
                    return Err((pushes, tonic::Status::failed_precondition(why)));
                }
                let current = tx.borrow().clone();
                let head = Push {
                    nonce: chunk.nonce.clone(),
                    full: chunk.full,
                    resources: Vec::new(),
                    removed: Vec::new(),
                    revision: chunk.revision,
                    store_id: chunk.store_id.clone(),
                    replaced_buckets: chunk.replaced_buckets.clone(),
                    resync: chunk.resync,
                    more: false,
                    queued: None,
                };
                (current.stage(&chunk), head)
            }
        };
        H::take(&mut holdings, &chunk);
        if chunk.more {
            staged = Some((holdings, head));
            continue;
        }
        pushes += 1;
        *followed = Some(Followed {
            store_id: head.store_id.clone(),
            revision: head.revision,
        });
        let (next, rejected) = H::finish(holdings);
        tracing::debug!(
            nonce = %head.nonce,
            full = head.full,
            resync = head.resync,
            buckets = head.replaced_buckets.len(),
            revision = head.revision,
            rejected = rejected.len(),
            "config push"
        );
        tx.send_replace(Arc::new(next));
        let ack = Ack {
            nonce: head.nonce,
            error: rejected
                .iter()
                .map(|(key, error)| format!("{key}: {error}"))
                .collect::<Vec<_>>()
                .join("; "),
            rejected: rejected.into_iter().map(|(key, _)| key).collect(),
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

#[cfg(test)]
mod tests {
    use std::{
        io::Read as _,
        net::SocketAddr,
        path::{Path, PathBuf},
        time::Instant,
    };

    use super::*;
    use crate::controller::Deadlines;

    /// A directory of its own for one test's files, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("weft-discovery-{test}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A controller certificate for `weft-controller` (self-signed: it is its own root) and a node
    /// token, as files in `dir`; returns the certificate and key (DER) for a server to present.
    fn credentials(
        dir: &Path,
    ) -> (
        rustls::pki_types::CertificateDer<'static>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ) {
        let issued = rcgen::generate_simple_self_signed(vec!["weft-controller".to_owned()]).unwrap();
        std::fs::write(dir.join("root.pem"), issued.cert.pem()).unwrap();
        std::fs::write(dir.join("token"), "token-1").unwrap();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(issued.signing_key.serialize_der());
        (issued.cert.der().clone(), key.into())
    }

    fn controller(dir: &Path, addr: SocketAddr, deadlines: Deadlines) -> Controller {
        Controller::with_deadlines(
            &format!("https://{addr}"),
            &dir.join("root.pem"),
            "weft-controller",
            &dir.join("token"),
            deadlines,
        )
        .unwrap()
    }

    /// One config stream against `controller`: how it ended and how long that took.
    async fn follow_once(controller: &Controller) -> (Result<usize, (usize, tonic::Status)>, Duration) {
        let (tx, _rx) = watch::channel(Arc::new(State::default()));
        let started = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(30), follow(controller, "node1", &tx, &mut None))
            .await
            .expect("the config stream is still waiting after 30 s");
        (ended, started.elapsed())
    }

    #[tokio::test]
    async fn config_stream_fails_at_the_handshake_deadline_when_the_controller_never_answers() {
        let scratch = Scratch::new("handshake");
        credentials(&scratch.0);
        // Accepts TCP and never says a word.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        let deadlines = Deadlines {
            handshake: Duration::from_millis(500),
            first_push: Duration::from_secs(20),
            ..Deadlines::default()
        };
        let (ended, took) = follow_once(&controller(&scratch.0, addr, deadlines)).await;
        let (pushes, status) = ended.expect_err("no controller answered");
        assert_eq!(pushes, 0);
        assert!(status.message().contains("handshake timeout"), "{status:?}");
        assert!(
            took < Duration::from_secs(3),
            "the handshake deadline is 500 ms; the stream gave up after {took:?}: {status:?}"
        );
        silent.abort();
    }

    /// The TLS server side of a controller that speaks HTTP/2, with the certificate the agent's
    /// test credentials trust.
    fn controller_tls(dir: &Path) -> rustls::ServerConfig {
        let (cert, key) = credentials(dir);
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    }

    #[tokio::test]
    async fn config_stream_ends_when_the_controller_stops_answering_pings() {
        let scratch = Scratch::new("keepalive");
        // Completes the TLS handshake, then reads everything and answers nothing, not even PINGs: a
        // controller that hung, or vanished behind a connection nobody closes.
        let config = controller_tls(&scratch.0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            let mut tls = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
            let mut buf = [0u8; 4096];
            // Until the client closes the connection.
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        });
        let deadlines = Deadlines {
            keepalive_interval: Duration::from_millis(300),
            keepalive_timeout: Duration::from_millis(300),
            first_push: Duration::from_secs(20),
            ..Deadlines::default()
        };
        let controller = controller(&scratch.0, addr, deadlines);
        let (ended, took) = follow_once(&controller).await;
        let (pushes, status) = ended.expect_err("the controller never answered");
        assert_eq!(pushes, 0);
        assert!(format!("{status:?}").contains("KeepAliveTimedOut"), "{status:?}");
        assert!(
            took < Duration::from_secs(5),
            "an unanswered PING closes the connection in 600 ms; the stream gave up after {took:?}: {status:?}"
        );
        drop(controller);
        tokio::task::spawn_blocking(move || server.join().unwrap())
            .await
            .unwrap();
    }

    /// What a scripted controller sends on each config stream, one message after another, with a
    /// pause before each; then it keeps the stream open and says nothing more.
    #[derive(Clone)]
    struct Script(Vec<(Duration, weft_api::encoded::EncodedPush)>);

    #[tonic::async_trait]
    impl weft_api::encoded::config_server::Config for Script {
        type StreamStream = ReceiverStream<Result<weft_api::encoded::EncodedPush, tonic::Status>>;

        async fn stream(
            &self,
            request: tonic::Request<tonic::Streaming<StreamRequest>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            let (tx, rx) = mpsc::channel(4);
            let script = self.0.clone();
            tokio::spawn(async move {
                let _inbound = request.into_inner();
                for (pause, message) in script {
                    tokio::time::sleep(pause).await;
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                tx.closed().await;
            });
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        }
    }

    /// Serves `script` over TLS on loopback as `weft-controller`; returns the agent's controller
    /// handle, with the given first-push deadline.
    async fn scripted(dir: &Path, script: Script, first_push: Duration) -> (Controller, tokio::task::JoinHandle<()>) {
        let config = controller_tls(dir);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (conns, incoming) = mpsc::channel::<std::io::Result<_>>(4);
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    if let Ok(tls) = acceptor.accept(tcp).await
                        && conns.send(Ok(tls)).await.is_err()
                    {
                        return;
                    }
                }
            });
            tonic::transport::Server::builder()
                .add_service(weft_api::encoded::config_server::ConfigServer::new(script))
                .serve_with_incoming(ReceiverStream::new(incoming))
                .await
                .unwrap();
        });
        let deadlines = Deadlines {
            first_push,
            ..Deadlines::default()
        };
        (controller(dir, addr, deadlines), server)
    }

    fn resync(more: bool) -> weft_api::encoded::EncodedPush {
        weft_api::encoded::EncodedPush {
            nonce: "1-1".into(),
            full: true,
            resync: true,
            revision: 1,
            store_id: "store".into(),
            more,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_resync_queued_longer_than_the_deadline_is_waited_for_while_the_controller_says_so() {
        let scratch = Scratch::new("queued");
        // Six notices 400 ms apart, then the resync in two chunks 400 ms apart: 3.2 s in all, well
        // past the 2 s deadline, and never more than 0.4 s of silence.
        let every = Duration::from_millis(400);
        let mut script: Vec<_> = (0..6u32)
            .map(|i| (every, weft_api::encoded::EncodedPush::queued(5 - i)))
            .collect();
        script.push((every, resync(true)));
        script.push((every, resync(false)));
        let (controller, server) = scripted(&scratch.0, Script(script), Duration::from_secs(2)).await;
        // The scripted controller keeps the stream open after its push: follow the stream until
        // the push is taken, and stop there.
        let (tx, mut rx) = watch::channel(Arc::new(State::default()));
        let started = Instant::now();
        let follower = tokio::spawn(async move { follow(&controller, "node1", &tx, &mut None).await });
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.synced))
            .await
            .expect("no resync within 10 s")
            .expect("the stream ended before its resync");
        assert!(
            started.elapsed() >= Duration::from_millis(3200),
            "{:?}",
            started.elapsed()
        );
        assert!(
            !follower.is_finished(),
            "the stream is still open: {:?}",
            follower.await
        );
        follower.abort();
        server.abort();
    }

    #[tokio::test]
    async fn a_controller_silent_after_saying_the_resync_is_queued_is_left_at_the_deadline() {
        let scratch = Scratch::new("queued-silent");
        let script = Script(vec![(Duration::ZERO, weft_api::encoded::EncodedPush::queued(5))]);
        let (controller, server) = scripted(&scratch.0, script, Duration::from_secs(1)).await;
        let (ended, took) = follow_once(&controller).await;
        let (pushes, status) = ended.expect_err("the controller went silent");
        assert_eq!(pushes, 0);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(status.message().contains("sent nothing for 1s"), "{status:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        server.abort();
    }

    #[tokio::test]
    async fn a_queued_notice_in_the_middle_of_a_push_breaks_the_stream() {
        let scratch = Scratch::new("queued-midway");
        let script = Script(vec![
            (Duration::ZERO, resync(true)),
            (Duration::ZERO, weft_api::encoded::EncodedPush::queued(0)),
        ]);
        let (controller, server) = scripted(&scratch.0, script, Duration::from_secs(1)).await;
        let (ended, _) = follow_once(&controller).await;
        let (pushes, status) = ended.expect_err("a protocol error");
        assert_eq!(pushes, 0);
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert!(
            status.message().contains("waits for its turn after it had begun"),
            "{status:?}"
        );
        server.abort();
    }

    #[test]
    fn pushes_from_another_store_or_an_older_revision_are_refused() {
        let followed = Followed {
            store_id: "a".into(),
            revision: 7,
        };
        // Nothing followed yet: the first store is taken.
        assert_eq!(refuse(None, "a", 0, true), None);
        // The same store, resyncing at or after the revision the agent has, or changing.
        assert_eq!(refuse(Some(&followed), "a", 7, true), None);
        assert_eq!(refuse(Some(&followed), "a", 9, true), None);
        assert_eq!(refuse(Some(&followed), "a", 8, false), None);
        // A store started over (another identity), even at a later revision.
        let why = refuse(Some(&followed), "b", 1, true).expect("refused");
        assert!(
            why.contains("not the one this agent follows") && why.contains("\"b\""),
            "{why}"
        );
        assert!(refuse(Some(&followed), "b", 100, true).is_some());
        // The same store, restored to an older revision.
        let why = refuse(Some(&followed), "a", 3, true).expect("refused");
        assert!(why.contains("went back from revision 7 to 3"), "{why}");
    }
}
