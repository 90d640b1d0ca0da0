//! One pooled HTTP/2 connection: its stream accounting, and the task that drives it and closes it when idle.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, PingPong};
use tokio::sync::Notify;

use super::tls_io::TlsIo;
use super::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, PoolInner, PoolKey};

/// Set in [`ConnState::streams`] once the connection takes no new streams (closed, broken or idle-expired).
const CLOSED: usize = 1 << (usize::BITS - 1);

/// How long an idle-closed connection gets to shut down gracefully (GOAWAY) before it is dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A pooled connection as the pool lists it.
pub(super) struct Conn {
    pub(super) sender: SendRequest<Bytes>,
    pub(super) state: Arc<ConnState>,
    /// The first TLS error on the connection (e.g. the server refusing our certificate).
    pub(super) tls_error: super::tls_io::TlsErrorSlot,
}

/// Stream accounting shared by the pool, the driving task and every [`StreamGuard`].
pub(super) struct ConnState {
    /// Live streams, plus the [`CLOSED`] bit.
    streams: AtomicUsize,
    /// Bumped on every reservation, so the idle timer can tell whether the connection was used meanwhile.
    generation: AtomicU64,
    /// Signalled when the stream count drops to zero.
    released: Notify,
    max_streams: usize,
}

/// One reserved stream on a connection; released on drop.
pub(super) struct StreamGuard {
    state: Arc<ConnState>,
}

/// The streams and the dial lock of one pool key.
#[derive(Default)]
pub(super) struct Entry {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Held while dialing, so concurrent callers wait for one handshake instead of starting their own.
    pub(super) dial: tokio::sync::Mutex<()>,
}

// === impl ConnState ===

impl ConnState {
    /// A fresh connection state with one stream already reserved for its creator.
    pub(super) fn new_reserved(max_streams: usize) -> (Arc<Self>, StreamGuard) {
        let state = Arc::new(Self {
            streams: AtomicUsize::new(1),
            generation: AtomicU64::new(1),
            released: Notify::new(),
            max_streams: max_streams.clamp(1, CLOSED - 1),
        });
        let guard = StreamGuard { state: state.clone() };
        (state, guard)
    }

    /// Reserves a stream if the connection is open and below its cap.
    fn try_reserve(self: &Arc<Self>) -> Option<StreamGuard> {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n & CLOSED == 0 && n < self.max_streams).then_some(n + 1)
            })
            .ok()?;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Some(StreamGuard { state: self.clone() })
    }

    /// No new streams from now on.
    pub(super) fn close(&self) {
        self.streams.fetch_or(CLOSED, Ordering::AcqRel);
    }

    /// Current number of live streams.
    pub(super) fn live_streams(&self) -> usize {
        self.streams.load(Ordering::Acquire) & !CLOSED
    }

    /// Resolves once the connection had no stream for `idle_timeout`, and closes it to new streams atomically
    /// with that decision (a concurrent reservation either wins and resets the wait, or fails).
    pub(super) async fn idle_expired(&self, idle_timeout: Duration) {
        loop {
            let released = self.released.notified();
            if self.live_streams() != 0 {
                released.await;
                continue;
            }
            let generation = self.generation.load(Ordering::Acquire);
            tokio::time::sleep(idle_timeout).await;
            if self.generation.load(Ordering::Acquire) == generation
                && self
                    .streams
                    .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return;
            }
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let before = self.state.streams.fetch_sub(1, Ordering::AcqRel);
        if before & !CLOSED == 1 {
            self.state.released.notify_one();
        }
    }
}

// === impl Entry ===

impl Entry {
    fn conns(&self) -> MutexGuard<'_, Vec<Arc<Conn>>> {
        // The list is always left consistent (push/retain only), so a poisoned lock is still usable.
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A stream on the first listed connection that is open and has room.
    pub(super) fn reserve(&self) -> Option<(Arc<Conn>, StreamGuard)> {
        // A connection that ended is closed by its driving task; one that broke a moment ago fails the
        // request unsent, and the caller evicts it and retries.
        self.conns()
            .iter()
            .find_map(|conn| conn.state.try_reserve().map(|guard| (conn.clone(), guard)))
    }

    pub(super) fn push(&self, conn: Arc<Conn>) {
        self.conns().push(conn);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.conns().is_empty()
    }

    /// Removes the connection with `state` (no-op if already gone); true when the list is now empty.
    pub(super) fn remove(&self, state: &Arc<ConnState>) -> bool {
        let mut conns = self.conns();
        conns.retain(|c| !Arc::ptr_eq(&c.state, state));
        conns.is_empty()
    }
}

/// Drives one HTTP/2 connection until it ends, its peer stops answering PINGs, or it stays idle for
/// `idle_timeout`; then takes it out of the pool.
pub(super) async fn drive(
    mut connection: h2::client::Connection<TlsIo, Bytes>,
    state: Arc<ConnState>,
    entry: Weak<Entry>,
    pool: Weak<PoolInner>,
    key: PoolKey,
    idle_timeout: Duration,
) {
    let ping = connection.ping_pong();
    let idle = tokio::select! {
        result = &mut connection => {
            if let Err(error) = result {
                tracing::debug!(%error, "HBONE connection failed");
            }
            false
        }
        () = keepalive(ping, &state) => false,
        () = state.idle_expired(idle_timeout) => true,
    };
    state.close();
    // Dropping the pool's handle (the last `SendRequest` when idle) lets h2 shut the connection down.
    let emptied = entry.upgrade().is_some_and(|entry| entry.remove(&state));
    if let Some(pool) = pool.upgrade() {
        if emptied {
            pool.forget_if_unused(&key);
        }
        if idle {
            tracing::debug!("closing idle HBONE connection");
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
        }
        pool.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves when the peer leaves a PING unanswered for [`KEEPALIVE_TIMEOUT`]. PINGs go out every
/// [`KEEPALIVE_INTERVAL`] while the connection carries tunnels, so a dead peer is noticed even when no
/// tunnel is sending.
async fn keepalive(ping: Option<PingPong>, state: &ConnState) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        if state.live_streams() == 0 {
            continue;
        }
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            // The connection itself failed: its own future reports that.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => {
                tracing::debug!(after = ?KEEPALIVE_TIMEOUT, "HBONE peer left a keepalive PING unanswered");
                return;
            }
        }
    }
}
