//! Admission of client connections before anything is spent on them: TLS handshakes in flight are
//! bounded per source address and in all, and so are connections per source address. A peer that
//! opens thousands of connections and never finishes a handshake (or finishes them all) holds at most
//! its share; connections past it are closed at once, and other peers are served as usual.
//!
//! One implementation for every TLS listener: HBONE's 15008 (`weft_hbone::server` re-exports it) and
//! the controller's agent listener 15012, each with its own [`AdmissionLimits`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// The bounds. The defaults are HBONE's (one pod's agent as a source); other listeners state their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Connections (handshaking or established), all sources together.
    pub connections: usize,
    /// TLS handshakes in flight, all sources together.
    pub handshakes: usize,
    /// TLS handshakes in flight from one source address.
    pub handshakes_per_source: usize,
    /// Connections (handshaking or established) from one source address. A source is one pod's
    /// agent: its pooled connections carry 100 tunnels each.
    pub connections_per_source: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self {
            connections: 16_384,
            handshakes: 1024,
            handshakes_per_source: 64,
            connections_per_source: 512,
        }
    }
}

/// The admission state of one server (shared by every listener it serves).
#[derive(Debug, Default)]
pub struct Admission {
    limits: AdmissionLimits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    connections: usize,
    handshakes: usize,
    sources: HashMap<IpAddr, PerSource>,
}

#[derive(Debug, Default, Clone, Copy)]
struct PerSource {
    connections: usize,
    handshakes: usize,
}

/// Why a connection was not admitted; bounded, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// [`AdmissionLimits::connections`] reached.
    #[error("too many connections")]
    Connections,
    /// [`AdmissionLimits::handshakes`] reached.
    #[error("too many TLS handshakes in flight")]
    Handshakes,
    /// [`AdmissionLimits::handshakes_per_source`] reached.
    #[error("too many TLS handshakes in flight from this source")]
    SourceHandshakes,
    /// [`AdmissionLimits::connections_per_source`] reached.
    #[error("too many connections from this source")]
    SourceConnections,
}

/// An admitted connection: holds its source's connection slot (and, until the handshake is done, a
/// handshake slot) until dropped.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    source: IpAddr,
    handshaking: bool,
}

impl Admission {
    /// An admission state with `limits` and nothing admitted.
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::default(),
        })
    }

    /// Admits a TLS connection from `source` if every bound allows it; it holds a handshake slot
    /// until [`Admitted::handshake_done`].
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, Refused> {
        self.admit_as(source, true)
    }

    /// Admits a connection that has no handshake (plaintext) if the connection bounds allow it;
    /// the handshake bounds do not apply.
    pub fn admit_plain(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, Refused> {
        self.admit_as(source, false)
    }

    fn admit_as(self: &Arc<Self>, source: IpAddr, handshaking: bool) -> Result<Admitted, Refused> {
        let source = source.to_canonical();
        let mut state = self.lock();
        let per = state.sources.get(&source).copied().unwrap_or_default();
        if per.connections >= self.limits.connections_per_source {
            return Err(Refused::SourceConnections);
        }
        if state.connections >= self.limits.connections {
            return Err(Refused::Connections);
        }
        if handshaking {
            if per.handshakes >= self.limits.handshakes_per_source {
                return Err(Refused::SourceHandshakes);
            }
            if state.handshakes >= self.limits.handshakes {
                return Err(Refused::Handshakes);
            }
            state.handshakes += 1;
        }
        state.connections += 1;
        let per = state.sources.entry(source).or_default();
        per.connections += 1;
        per.handshakes += usize::from(handshaking);
        Ok(Admitted {
            admission: self.clone(),
            source,
            handshaking,
        })
    }

    /// TLS handshakes in flight now.
    pub fn handshakes(&self) -> usize {
        self.lock().handshakes
    }

    /// Connections admitted and not yet closed.
    pub fn connections(&self) -> usize {
        self.lock().connections
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a few counters updated whole under the lock: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Admitted {
    /// The handshake finished (either way): its slot goes back.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let mut state = self.admission.lock();
            state.handshakes -= 1;
            if let Some(per) = state.sources.get_mut(&self.source) {
                per.handshakes -= 1;
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.handshake_done();
        let mut state = self.admission.lock();
        state.connections -= 1;
        if let Some(per) = state.sources.get_mut(&self.source) {
            per.connections -= 1;
            if per.connections == 0 {
                state.sources.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_hold_per_source_and_in_all_and_slots_come_back() {
        let a = Admission::new(AdmissionLimits {
            connections: 100,
            handshakes: 3,
            handshakes_per_source: 2,
            connections_per_source: 3,
        });
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let y: IpAddr = "10.0.0.2".parse().unwrap();
        let mut x1 = a.admit(x).unwrap();
        let _x2 = a.admit(x).unwrap();
        assert_eq!(a.admit(x).unwrap_err(), Refused::SourceHandshakes);
        let _y1 = a.admit(y).unwrap();
        assert_eq!(a.admit(y).unwrap_err(), Refused::Handshakes, "three in flight in all");
        x1.handshake_done();
        x1.handshake_done(); // once only
        assert_eq!(a.handshakes(), 2);
        let mut x3 = a.admit(x).unwrap();
        x3.handshake_done();
        assert_eq!(a.admit(x).unwrap_err(), Refused::SourceConnections);
        // IPv4-mapped is the same source.
        assert_eq!(
            a.admit("::ffff:10.0.0.1".parse().unwrap()).unwrap_err(),
            Refused::SourceConnections
        );
        drop(x1);
        drop(x3);
        drop(_x2);
        assert_eq!(a.connections(), 1);
        assert_eq!(a.handshakes(), 1);
        drop(_y1);
        assert_eq!((a.connections(), a.handshakes()), (0, 0));
        assert!(
            a.lock().sources.is_empty(),
            "no per-source entry outlives its connections"
        );
    }

    #[test]
    fn a_plain_connection_takes_no_handshake_slot_and_counts_as_a_connection() {
        let a = Admission::new(AdmissionLimits {
            connections: 100,
            handshakes: 0,
            handshakes_per_source: 0,
            connections_per_source: 2,
        });
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let first = a.admit_plain(x).unwrap();
        let _second = a.admit_plain(x).unwrap();
        assert_eq!(a.handshakes(), 0);
        assert_eq!(a.admit_plain(x).unwrap_err(), Refused::SourceConnections);
        drop(first);
        assert_eq!(a.connections(), 1);
        assert!(a.admit_plain(x).is_ok(), "the slot came back");
    }

    #[test]
    fn connections_are_bounded_in_all_whatever_the_source() {
        let a = Admission::new(AdmissionLimits {
            connections: 2,
            ..AdmissionLimits::default()
        });
        let first = a.admit("10.0.0.1".parse().unwrap()).unwrap();
        let _second = a.admit("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(a.admit("10.0.0.3".parse().unwrap()).unwrap_err(), Refused::Connections);
        drop(first);
        assert!(
            a.admit("10.0.0.3".parse().unwrap()).is_ok(),
            "a slot comes back when a connection closes"
        );
    }
}
