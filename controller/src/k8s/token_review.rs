//! Node identity on Kubernetes: each node agent sends its projected service-account token
//! (audience [`AUDIENCE`], of ServiceAccount [`NODE_SERVICE_ACCOUNT`] in the controller's
//! namespace) as `authorization: Bearer`, and its node is the node of the pod the token is bound
//! to.
//!
//! - **Decided by the API server.** A `TokenReview` (`authentication.k8s.io/v1`, audiences
//!   `[weft-controller]`) must say `authenticated`, the user must be
//!   `system:serviceaccount:<namespace>:weft-node`, and the token must be bound to a pod (the
//!   `authentication.kubernetes.io/pod-name` and `pod-uid` extras; a token that is not pod-bound is
//!   refused). That pod is then read: it must have that uid, run as `weft-node`, be scheduled and
//!   `Running`; its `spec.nodeName` is the caller's node (and must agree with the `node-name` extra,
//!   which API servers give from 1.30).
//! - **Refused early and cheaply.** What is not a JWT, has expired (`exp`), is for another audience or
//!   names no pod is refused without asking the API server (these claims are read unverified, only
//!   ever to refuse; acceptance is always the API server's).
//! - **Cached.** An accepted token is remembered (by SHA-256, never the token) for at most
//!   [`ACCEPTED_TTL`] and never past its `exp`; a refused one for [`REFUSED_TTL`]. So a pod deleted
//!   keeps its agent authenticated for at most a minute, as a revoked token does.
//! - **Bounded.** At most [`MAX_CONCURRENT_REVIEWS`] reviews (each a TokenReview and a pod read) are
//!   in flight; a caller waits at most [`QUEUE_TIMEOUT`] for its turn and each review has
//!   [`REVIEW_TIMEOUT`]. Concurrent calls with one token share one review. A flood of bogus tokens
//!   costs the API server that many requests at a time, and a token repeated costs one review per
//!   [`REFUSED_TTL`]. When the API server cannot decide
//!   (unreachable, slow, forbidden) the call fails with UNAVAILABLE and nothing is cached.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use serde_json::Value;
use tokio::{
    sync::{OnceCell, Semaphore},
    time::Instant,
};
use tonic::{Status, metadata::MetadataMap};

use crate::auth::{bearer, digest};

/// The audience node agents' tokens must be for.
pub const AUDIENCE: &str = "weft-controller";
/// The ServiceAccount (in the controller's namespace) node agents run as.
pub const NODE_SERVICE_ACCOUNT: &str = "weft-node";
/// The longest an accepted token is trusted without asking the API server again.
pub const ACCEPTED_TTL: Duration = Duration::from_secs(60);
/// How long a refused token is refused without asking again.
pub const REFUSED_TTL: Duration = Duration::from_secs(5);
/// Reviews in flight at once.
pub const MAX_CONCURRENT_REVIEWS: usize = 16;
/// The longest a caller waits for a review slot.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest one review (TokenReview and pod read) may take.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries each cache holds at most (tokens of one node agent each; a full cache caches no more
/// until entries expire).
const MAX_CACHED: usize = 8192;

/// The extras of a pod-bound token's user.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// From Kubernetes 1.30.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Why a token does not authenticate a node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the token is not a service-account token (JWT): {0}")]
    NotJwt(&'static str),
    #[error("the token expired {seconds_ago} s ago")]
    Expired { seconds_ago: i64 },
    #[error("the token is for audiences {audiences:?}, not {AUDIENCE:?}")]
    Audience { audiences: Vec<String> },
    #[error("the token is not bound to a pod (use a projected service-account token)")]
    NotPodBound,
    #[error("the API server does not authenticate the token: {reason}")]
    Rejected { reason: String },
    #[error("the token is {username:?}'s, not {expected:?}'s")]
    WrongAccount { username: String, expected: String },
    #[error("the token's pod {pod} is gone")]
    PodGone { pod: String },
    #[error("the token's pod {pod} is another pod now (uid {uid}, the token's {bound})")]
    PodReplaced { pod: String, uid: String, bound: String },
    #[error("the token's pod {pod} runs as service account {service_account:?}, not {NODE_SERVICE_ACCOUNT:?}")]
    PodAccount { pod: String, service_account: String },
    #[error("the token's pod {pod} is not running (phase {phase:?})")]
    PodNotRunning { pod: String, phase: String },
    #[error("the token's pod {pod} is not scheduled on a node")]
    PodNotScheduled { pod: String },
    #[error("the token names node {token:?} but its pod {pod} is on node {scheduled:?}")]
    NodeMismatch {
        pod: String,
        token: String,
        scheduled: String,
    },
}

/// The pod a reviewed token is bound to, as the API server says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    pub uid: String,
    /// The `node-name` extra (Kubernetes 1.30 and later).
    pub node: Option<String>,
}

/// Authenticates node agents by TokenReview (see the module documentation).
pub struct TokenReviewer {
    client: Client,
    namespace: String,
    username: String,
    permits: Semaphore,
    caches: Mutex<Caches>,
    /// The reviews in progress, by token digest.
    inflight: Mutex<HashMap<Vec<u8>, Arc<OnceCell<Outcome>>>>,
}

/// What a review decided, for every call that waited for it.
#[derive(Clone, Debug)]
enum Outcome {
    /// The node.
    Accepted(String),
    /// Why not (UNAUTHENTICATED).
    Refused(String),
    /// Why it could not be decided (UNAVAILABLE).
    Unavailable(String),
}

/// A review that could not be made: not the token's fault, so nothing is cached.
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    #[error("cannot review the token: {0}")]
    Api(#[source] kube::Error),
    #[error("the token review took longer than {REVIEW_TIMEOUT:?}")]
    Timeout,
    #[error("the API server's TokenReview has no status")]
    NoStatus,
}

impl TokenReviewer {
    /// A reviewer for agents of ServiceAccount [`NODE_SERVICE_ACCOUNT`] in `namespace`.
    pub fn new(client: Client, namespace: &str) -> TokenReviewer {
        TokenReviewer {
            client,
            namespace: namespace.to_owned(),
            username: format!("system:serviceaccount:{namespace}:{NODE_SERVICE_ACCOUNT}"),
            permits: Semaphore::new(MAX_CONCURRENT_REVIEWS),
            caches: Mutex::new(Caches::default()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The user node agents' tokens must authenticate as.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The node the request's bearer token belongs to; UNAUTHENTICATED naming why not
    /// ([`Refusal`]); UNAVAILABLE when the API server cannot decide now.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<String, Status> {
        let token = bearer(metadata, "projected service-account token")?;
        let key = digest(token);
        if let Some(hit) = self.cached(&key) {
            return hit;
        }
        let claims = precheck(token, SystemTime::now()).map_err(|r| Status::unauthenticated(r.to_string()))?;
        // Calls with one token share one review: the first runs it, the others wait for it (and
        // if the first goes away, the next runs it).
        let review = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            inflight.entry(key.clone()).or_default().clone()
        };
        let outcome = review
            .get_or_init(|| self.review_once(token, &key, &claims))
            .await
            .clone();
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if inflight.get(&key).is_some_and(|r| Arc::ptr_eq(r, &review)) {
                inflight.remove(&key);
            }
        }
        match outcome {
            Outcome::Accepted(node) => Ok(node),
            Outcome::Refused(message) => Err(Status::unauthenticated(message)),
            Outcome::Unavailable(message) => Err(Status::unavailable(message)),
        }
    }

    /// Reviews `token` (digest `key`) once a review slot is free, and caches the verdict.
    async fn review_once(&self, token: &str, key: &[u8], claims: &Claims) -> Outcome {
        let Ok(Ok(_permit)) = tokio::time::timeout(QUEUE_TIMEOUT, self.permits.acquire()).await else {
            return Outcome::Unavailable(format!(
                "{MAX_CONCURRENT_REVIEWS} token reviews were in flight for {QUEUE_TIMEOUT:?}: retry later"
            ));
        };
        let started = Instant::now();
        let reviewed = match tokio::time::timeout(REVIEW_TIMEOUT, self.review(token)).await {
            Ok(reviewed) => reviewed,
            Err(_) => Err(Unavailable::Timeout),
        };
        let now = Instant::now();
        match reviewed {
            Ok(Ok((pod, node))) => {
                let until = accepted_until(now, claims.exp, SystemTime::now());
                tracing::debug!(node, pod, took = ?now - started, "authenticated a node agent by TokenReview");
                let mut caches = self.caches.lock().unwrap_or_else(|e| e.into_inner());
                caches.accepted.insert(key.to_vec(), node.clone(), until, now);
                Outcome::Accepted(node)
            }
            Ok(Err(refusal)) => {
                tracing::info!(error = %refusal, took = ?now - started, "refused a node agent's token");
                let message = refusal.to_string();
                let mut caches = self.caches.lock().unwrap_or_else(|e| e.into_inner());
                caches
                    .refused
                    .insert(key.to_vec(), message.clone(), now + REFUSED_TTL, now);
                Outcome::Refused(message)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot review a node agent's token");
                Outcome::Unavailable(e.to_string())
            }
        }
    }

    /// What the caches say of the token of digest `key`, if they know it.
    fn cached(&self, key: &[u8]) -> Option<Result<String, Status>> {
        let caches = self.caches.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(node) = caches.accepted.get(key, now) {
            return Some(Ok(node.to_owned()));
        }
        caches
            .refused
            .get(key, now)
            .map(|message| Err(Status::unauthenticated(message)))
    }

    /// Asks the API server about `token`, then reads its pod: (pod name, node) or why not.
    async fn review(&self, token: &str) -> Result<Result<(String, String), Refusal>, Unavailable> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![AUDIENCE.to_owned()]),
                token: Some(token.to_owned()),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(Unavailable::Api)?;
        let status = reviewed.status.ok_or(Unavailable::NoStatus)?;
        let bound = match bound_pod(&status, &self.username) {
            Ok(bound) => bound,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(&bound.name)
            .await
            .map_err(Unavailable::Api)?;
        let pod_name = format!("{}/{}", self.namespace, bound.name);
        Ok(node_of(pod.as_ref(), &bound, &pod_name).map(|node| (pod_name, node)))
    }
}

// === pure parts ===

/// The claims read (unverified) from a token before it is reviewed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// `exp`, seconds since the epoch.
    pub exp: Option<i64>,
}

/// Refuses at once what no review would accept: not a JWT, expired at `now`, not for
/// [`AUDIENCE`], or bound to no pod. What it reads is not verified: it only ever refuses.
pub fn precheck(token: &str, now: SystemTime) -> Result<Claims, Refusal> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::NotJwt("not three dot-separated parts"));
    };
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| Refusal::NotJwt("the payload is not base64url"))?;
    let claims: Value = serde_json::from_slice(&payload).map_err(|_| Refusal::NotJwt("the payload is not JSON"))?;
    let Value::Object(claims) = claims else {
        return Err(Refusal::NotJwt("the payload is not a JSON object"));
    };
    let exp = claims.get("exp").and_then(Value::as_i64);
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if let Some(exp) = exp
        && exp <= now
    {
        return Err(Refusal::Expired { seconds_ago: now - exp });
    }
    let audiences: Vec<String> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    };
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return Err(Refusal::Audience { audiences });
    }
    if claims.get("kubernetes.io").and_then(|k| k.get("pod")).is_none() {
        return Err(Refusal::NotPodBound);
    }
    Ok(Claims { exp })
}

/// The pod a TokenReview's status binds the token to, once it says the token is `username`'s.
pub fn bound_pod(status: &TokenReviewStatus, username: &str) -> Result<BoundPod, Refusal> {
    if status.authenticated != Some(true) {
        let reason = status
            .error
            .clone()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "not authenticated".to_owned());
        return Err(Refusal::Rejected { reason });
    }
    let user = status.user.as_ref();
    let actual = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
    if actual != username {
        return Err(Refusal::WrongAccount {
            username: actual.to_owned(),
            expected: username.to_owned(),
        });
    }
    let extra = |key: &str| {
        user.and_then(|u| u.extra.as_ref())
            .and_then(|e| e.get(key))
            .and_then(|values| values.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let (Some(name), Some(uid)) = (extra(EXTRA_POD_NAME), extra(EXTRA_POD_UID)) else {
        return Err(Refusal::NotPodBound);
    };
    Ok(BoundPod {
        name,
        uid,
        node: extra(EXTRA_NODE_NAME),
    })
}

/// The node of the token's pod (`pod` as read now; `pod_name` names it in refusals).
pub fn node_of(pod: Option<&Pod>, bound: &BoundPod, pod_name: &str) -> Result<String, Refusal> {
    let named = || pod_name.to_owned();
    let Some(pod) = pod else {
        return Err(Refusal::PodGone { pod: named() });
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if uid != bound.uid {
        return Err(Refusal::PodReplaced {
            pod: named(),
            uid,
            bound: bound.uid.clone(),
        });
    }
    let spec = pod.spec.as_ref();
    let service_account = spec.and_then(|s| s.service_account_name.clone()).unwrap_or_default();
    if service_account != NODE_SERVICE_ACCOUNT {
        return Err(Refusal::PodAccount {
            pod: named(),
            service_account,
        });
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
    if phase != "Running" {
        return Err(Refusal::PodNotRunning { pod: named(), phase });
    }
    let Some(node) = spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()) else {
        return Err(Refusal::PodNotScheduled { pod: named() });
    };
    if let Some(token) = &bound.node
        && *token != node
    {
        return Err(Refusal::NodeMismatch {
            pod: named(),
            token: token.clone(),
            scheduled: node,
        });
    }
    Ok(node)
}

/// Until when an accepted token is trusted: [`ACCEPTED_TTL`] from `now`, and not past its `exp`
/// (seconds since the epoch, read at wall-clock time `wall`).
pub fn accepted_until(now: Instant, exp: Option<i64>, wall: SystemTime) -> Instant {
    let ttl = match exp {
        Some(exp) => {
            let wall = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            let left = u64::try_from(exp.saturating_sub(wall)).unwrap_or(0);
            ACCEPTED_TTL.min(Duration::from_secs(left))
        }
        None => ACCEPTED_TTL,
    };
    now + ttl
}

// === the caches ===

/// Accepted and refused tokens, each by digest and bounded apart (a flood of refused tokens never
/// pushes accepted ones out).
#[derive(Default)]
struct Caches {
    /// The node of each accepted token.
    accepted: Cache,
    /// The refusal message of each refused token.
    refused: Cache,
}

/// Values remembered by token digest until their deadline.
#[derive(Default)]
struct Cache {
    entries: HashMap<Vec<u8>, (String, Instant)>,
}

impl Cache {
    fn get(&self, key: &[u8], now: Instant) -> Option<&str> {
        self.entries
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(value, _)| value.as_str())
    }

    /// Remembers `value` until `until`. A full cache first drops what has expired; if it is still
    /// full, the value is not remembered (the next call reviews again).
    fn insert(&mut self, key: Vec<u8>, value: String, until: Instant, now: Instant) {
        if self.entries.len() >= MAX_CACHED && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, u)| *u > now);
            if self.entries.len() >= MAX_CACHED {
                return;
            }
        }
        self.entries.insert(key, (value, until));
    }
}

#[cfg(test)]
mod tests;
