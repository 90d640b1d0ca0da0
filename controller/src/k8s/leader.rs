//! Leader election among the controller's replicas, with a `coordination.k8s.io/v1` Lease
//! ([`LEASE`] in the controller's namespace), as client-go's leaderelection does it.
//!
//! Every replica serves node agents and signs certificates whether it leads or not; only the leader
//! writes: custom resources' status, the CA Secret when there is none, the published roots.
//!
//! - **Acquire.** Every [`Timings::retry_period`] a replica reads the Lease. It takes it (holder =
//!   its identity, `acquireTime` and `renewTime` now, `leaseTransitions` + 1) when it has no holder
//!   or the holder's `renewTime + leaseDurationSeconds` has passed; creating it if it does not exist.
//! - **Never two leaders.** Every write is an update guarded by the `resourceVersion` read (or a
//!   create): of two replicas taking the same Lease, one gets a conflict. A conflict, or finding
//!   another holder, ends this replica's leadership at once.
//! - **Renew.** The leader renews every [`Timings::retry_period`]. Failing that, it stops leading
//!   [`Timings::renew_deadline`] after the start of its last successful renewal: before anyone
//!   else may take the Lease ([`Timings::lease_duration`] after that renewal), given clocks that
//!   agree within their difference.
//! - **Release.** On shutdown the leader stops leading first, then clears the Lease's holder, so that
//!   another replica takes over at its next attempt instead of after the lease duration.
//!
//! Transitions are logged at info.

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt as _},
};
use tokio::{sync::watch, time::Instant};

/// The Lease's name.
pub const LEASE: &str = "weft-controller";

/// The longest one request to the API server may take before the attempt counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the release on shutdown may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// The election's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// How long a Lease is held after its last renewal (`leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// Between two attempts to acquire or renew.
    pub retry_period: Duration,
}

impl Default for Timings {
    /// 15 s, 10 s, 2 s (client-go's defaults, with a faster retry).
    fn default() -> Self {
        Timings {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// A replica's identity when its pod name is not known: the host's name and a random suffix, so
/// that two processes on one host never share one.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "weft-controller".to_owned());
    let mut bytes = [0u8; 4];
    // Without randomness the suffix is zeros: the pid still tells processes apart on the host.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    format!("{host}_{}_{:08x}", std::process::id(), u32::from_be_bytes(bytes))
}

/// The election of `identity` for Lease [`LEASE`] in `namespace`: whether this replica leads (false
/// at first), and the future that runs it until `shutdown` turns true (then, leading, it steps
/// down and releases the Lease). The caller spawns the future.
pub fn elect(
    client: Client,
    namespace: &str,
    identity: &str,
    timings: Timings,
    shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<bool>, impl Future<Output = ()> + Send + 'static) {
    let (tx, rx) = watch::channel(false);
    let elector = Elector {
        api: Api::namespaced(client, namespace),
        namespace: namespace.to_owned(),
        identity: identity.to_owned(),
        timings,
        is_leader: tx,
        holder: None,
    };
    (rx, elector.run(shutdown))
}

/// What an attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// This replica holds the Lease (renewed or acquired).
    Held,
    /// Another replica holds it (its identity), or took it meanwhile (a conflict: `None`).
    Other(Option<String>),
}

struct Elector {
    api: Api<Lease>,
    namespace: String,
    identity: String,
    timings: Timings,
    is_leader: watch::Sender<bool>,
    /// The holder last seen, for logging changes.
    holder: Option<String>,
}

impl Elector {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(
            lease = %format!("{}/{LEASE}", self.namespace),
            identity = self.identity,
            "leader election started"
        );
        // While leading: the start of the last renewal that succeeded.
        let mut renewed: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                result = tokio::time::timeout(REQUEST_TIMEOUT, self.attempt()) => Some(result),
                () = self.deadline(renewed) => None,
                _ = shutdown.wait_for(|v| *v) => break,
            };
            match result {
                Some(Ok(Ok(Attempt::Held))) => {
                    renewed = Some(started);
                    self.observe(Some(self.identity.clone()));
                    self.set_leader(true, "");
                }
                Some(Ok(Ok(Attempt::Other(holder)))) => {
                    renewed = None;
                    let why = match &holder {
                        Some(h) => format!("the lease is held by {h}"),
                        None => "another replica updated the lease first".to_owned(),
                    };
                    if holder.is_some() {
                        self.observe(holder);
                    }
                    self.set_leader(false, &why);
                }
                Some(Ok(Err(e))) => {
                    tracing::warn!(error = %e, leading = renewed.is_some(), "cannot acquire or renew the lease; retrying");
                }
                Some(Err(_)) => tracing::warn!(
                    leading = renewed.is_some(),
                    "acquiring or renewing the lease took longer than {REQUEST_TIMEOUT:?}; retrying"
                ),
                // Past the renew deadline: no longer leading.
                None => renewed = None,
            }
            tokio::select! {
                () = tokio::time::sleep(self.timings.retry_period) => {}
                () = self.deadline(renewed) => renewed = None,
                _ = shutdown.wait_for(|v| *v) => break,
            }
        }
        if *self.is_leader.borrow() {
            self.set_leader(false, "shutting down");
            match tokio::time::timeout(RELEASE_TIMEOUT, self.release()).await {
                Ok(Ok(true)) => tracing::info!("released the lease"),
                Ok(Ok(false)) => tracing::info!("the lease was no longer ours to release"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot release the lease: another replica takes over when it expires")
                }
                Err(_) => {
                    tracing::warn!("releasing the lease took too long: another replica takes over when it expires")
                }
            }
        }
    }

    /// Resolves when a leader whose last renewal started at `renewed` must stop leading, and makes
    /// it stop; never while not leading.
    async fn deadline(&self, renewed: Option<Instant>) {
        match renewed {
            Some(r) => tokio::time::sleep_until(r + self.timings.renew_deadline).await,
            None => std::future::pending().await,
        }
        self.set_leader(false, "no renewal succeeded within the renew deadline");
    }

    fn set_leader(&self, leading: bool, why: &str) {
        let changed = self.is_leader.send_if_modified(|current| {
            let changed = *current != leading;
            *current = leading;
            changed
        });
        if changed {
            if leading {
                tracing::info!(identity = self.identity, "became the leader");
            } else {
                tracing::info!(identity = self.identity, reason = why, "stopped leading");
            }
        }
    }

    fn observe(&mut self, holder: Option<String>) {
        if holder != self.holder {
            if let Some(h) = holder.as_ref().filter(|h| **h != self.identity) {
                tracing::info!(leader = %h, "the leader is another replica");
            }
            self.holder = holder;
        }
    }

    /// Reads the Lease and renews or takes it when this replica may.
    async fn attempt(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let Some(lease) = self.api.get_opt(LEASE).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.taken(&LeaseSpec::default(), now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Other(None)),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let next = match decide(&spec, &self.identity, now, self.timings.lease_duration) {
            Decision::Renew => LeaseSpec {
                renew_time: Some(MicroTime(now)),
                lease_duration_seconds: Some(seconds(self.timings.lease_duration)),
                ..spec
            },
            Decision::Take => {
                let transitions = spec.lease_transitions.unwrap_or(0).saturating_add(1);
                self.taken(&spec, now, transitions)
            }
            Decision::Wait => return Ok(Attempt::Other(holder)),
        };
        let mut updated = lease;
        updated.spec = Some(next);
        // `updated` carries the resourceVersion read: a write by anyone since is a conflict.
        match self.api.replace(LEASE, &PostParams::default(), &updated).await {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Other(None)),
            Err(e) => Err(e),
        }
    }

    /// `spec` with this replica as its new holder from `now`.
    fn taken(&self, spec: &LeaseSpec, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(seconds(self.timings.lease_duration)),
            lease_transitions: Some(transitions),
            ..spec.clone()
        }
    }

    /// Clears the holder if it is still this replica: true if released.
    async fn release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(LEASE).await? else {
            return Ok(false);
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(false);
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        // Expired as well, for any reader that looks only at the renewal time.
        spec.renew_time = Some(MicroTime(
            Timestamp::now()
                .checked_sub(SignedDuration::from_secs(i64::from(
                    spec.lease_duration_seconds.unwrap_or(0).saturating_add(1),
                )))
                .unwrap_or(Timestamp::UNIX_EPOCH),
        ));
        let name = lease.name_any();
        match self.api.replace(&name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// What a replica may do with a Lease it read.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// It holds it: renew.
    Renew,
    /// Nobody holds it, or the holder let it expire: take it.
    Take,
    /// Another replica holds it.
    Wait,
}

/// Decides, for replica `identity` at `now`, on the Lease `spec`: expired when
/// `renewTime` (or `acquireTime`) + `leaseDurationSeconds` (`default_duration` if unset) is past.
pub fn decide(spec: &LeaseSpec, identity: &str, now: Timestamp, default_duration: Duration) -> Decision {
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
    match holder {
        Some(h) if h == identity => Decision::Renew,
        None => Decision::Take,
        Some(_) => {
            let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| t.0);
            let duration = spec
                .lease_duration_seconds
                .map_or(default_duration, |s| Duration::from_secs(u64::try_from(s).unwrap_or(0)));
            let expires = renewed.and_then(|r| r.checked_add(SignedDuration::try_from(duration).ok()?).ok());
            match expires {
                Some(expires) if expires > now => Decision::Wait,
                _ => Decision::Take,
            }
        }
    }
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_secs_ago: Option<i64>, duration: Option<i32>, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: renewed_secs_ago.map(|s| MicroTime(now.checked_sub(SignedDuration::from_secs(s)).unwrap())),
            lease_duration_seconds: duration,
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_is_taken_only_when_free_or_expired() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let d = Duration::from_secs(15);
        let decide = |s: &LeaseSpec| decide(s, "me", now, d);
        assert_eq!(decide(&spec(Some("me"), Some(100), Some(15), now)), Decision::Renew);
        assert_eq!(decide(&spec(None, Some(1), Some(15), now)), Decision::Take, "released");
        assert_eq!(
            decide(&spec(Some(""), Some(1), Some(15), now)),
            Decision::Take,
            "released"
        );
        assert_eq!(decide(&spec(Some("other"), Some(14), Some(15), now)), Decision::Wait);
        assert_eq!(decide(&spec(Some("other"), Some(15), Some(15), now)), Decision::Take);
        assert_eq!(
            decide(&spec(Some("other"), Some(20), Some(30), now)),
            Decision::Wait,
            "the holder's duration counts"
        );
        assert_eq!(
            decide(&spec(Some("other"), Some(20), None, now)),
            Decision::Take,
            "no duration: ours"
        );
        assert_eq!(
            decide(&spec(Some("other"), None, Some(15), now)),
            Decision::Take,
            "never renewed"
        );
    }

    #[test]
    fn the_renew_deadline_ends_before_the_lease() {
        let t = Timings::default();
        assert!(t.renew_deadline < t.lease_duration);
        assert!(t.retry_period < t.renew_deadline);
        assert!(REQUEST_TIMEOUT < t.renew_deadline);
    }

    #[test]
    fn default_identities_differ() {
        assert_ne!(default_identity(), default_identity());
    }
}
