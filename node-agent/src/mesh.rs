//! What every enrolled pod's proxies share on this node.

use std::sync::{Arc, atomic::AtomicUsize};

use tokio::sync::watch;
use weft_dataplane::socket;

use crate::{identity::Identities, state::State};

/// What every pod's proxies share on this node.
pub struct Mesh {
    pub state: watch::Receiver<Arc<State>>,
    pub identities: Identities,
    pub pool: weft_hbone::client::Pool,
    /// Round robin over service endpoints.
    pub next_endpoint: AtomicUsize,
    /// Congestion control of the HBONE connections, both ways; `None` keeps the pod's default.
    pub tunnel_congestion: Option<socket::CongestionControl>,
    /// Admission of HBONE connections, shared by every pod's 15008 listener: what one source may
    /// hold in handshakes and connections.
    pub admission: Arc<weft_hbone::server::Admission>,
    /// Admission of plaintext connections, shared by every pod's 15006 listener: what one source
    /// (and all together) may hold in connections to the node's applications.
    pub plaintext_admission: Arc<weft_hbone::server::Admission>,
    /// What `/metrics` shows; the proxies count their connections in it.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where connections' access records go, off the data path.
    pub access: crate::access::AccessLog,
}

impl Mesh {
    pub fn state(&self) -> Arc<State> {
        self.state.borrow().clone()
    }
}
