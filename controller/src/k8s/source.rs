//! The Kubernetes source: watches Namespaces, Pods, Services, ServiceAccounts and Weft's two custom
//! resources, and publishes the model built from them ([`build`]) as the local store publishes
//! its own: an `Arc<State>` through a watch channel.
//!
//! - **Nothing before the whole picture.** The first state is published only after every watcher
//!   has finished its initial list (and the `kube-system` namespace is known): an empty or partial
//!   first state would un-enroll every pod it lacks. Until then [`Outputs::states`] does not
//!   resolve. Lists are plain paginated lists (no streaming lists, which Kubernetes 1.20 lacks).
//! - **Coalesced.** After a change the model is rebuilt at most every [`COALESCE`], and a state is
//!   published only when its objects differ from the last one's (a status write, a pod that is not
//!   a workload yet, a relabelled object the model does not carry publish nothing).
//! - **Proportional.** A rebuild converts only the objects whose `resourceVersion` changed (the
//!   others keep their model object, the same `Arc`), and the new state is made from the last one,
//!   sharing all that did not change: what follows it (the distribution index) works on the
//!   difference. A rebuild still walks every object once, a map lookup each.
//! - **Identity: the cluster's.** The state id is the UID of the `kube-system` namespace, which
//!   lives as long as the cluster: agents follow one store id and refuse pushes of another, so a
//!   controller pointed at another cluster cannot take over their configuration.
//! - **Revision: the etcd revision, in practice.** The highest `metadata.resourceVersion` this
//!   replica has seen in any watch event, and at least the `resourceVersion` of a consistent list
//!   made after the initial lists (so a restarted replica never starts behind what a previous one
//!   published, even when the newest object has been deleted since). Kubernetes documents resource
//!   versions as opaque; every API server backed by etcd (all of them, including 1.20) gives etcd's
//!   revision, a number that only grows. Monotonic within a replica; one that cannot be parsed as a
//!   number is ignored.
//! - **Errors** of a watch are logged and the watch is retried with backoff; the state of the other
//!   kinds stays current, and the last state stays published.

pub mod build;

use std::{fmt::Debug, future::Future, pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt as _, stream::select_all};
use k8s_openapi::api::core::v1 as core;
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::ListParams,
    core::DeserializeGuard,
    runtime::{WatchStreamExt as _, reflector::store::Writer, watcher},
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};

use super::{crd, status::Conditions};
use crate::store::{Kind, State};
use build::{Builder, Snapshot};

/// The shortest time between two rebuilds of the model while changes stream in.
pub const COALESCE: Duration = Duration::from_millis(50);

/// The name of the namespace whose UID is the cluster's identity.
pub const IDENTITY_NAMESPACE: &str = "kube-system";

/// What the source publishes.
pub struct Outputs {
    /// Resolves with the states once the first complete one is published (see the module
    /// documentation); an error means the source stopped before.
    pub states: oneshot::Receiver<watch::Receiver<Arc<State>>>,
    /// The verdict on every custom resource (empty until the first state), for the
    /// [`StatusWriter`](super::status::StatusWriter).
    pub conditions: watch::Receiver<Arc<Conditions>>,
}

/// The source: its outputs, and the future that runs it (forever; the caller spawns it, and stops
/// it by dropping it).
pub fn source(client: Client) -> (Outputs, impl Future<Output = ()> + Send + 'static) {
    let (first_tx, first_rx) = oneshot::channel();
    let (conditions_tx, conditions_rx) = watch::channel(Arc::new(Conditions::new()));
    let outputs = Outputs {
        states: first_rx,
        conditions: conditions_rx,
    };
    (outputs, run(client, first_tx, conditions_tx))
}

// === the loop ===

/// One watch event, of any kind (boxed: a pod's is 2 KB, a namespace's a few hundred bytes).
enum Update {
    Namespace(Box<watcher::Event<core::Namespace>>),
    Pod(Box<watcher::Event<core::Pod>>),
    Service(Box<watcher::Event<core::Service>>),
    ServiceAccount(Box<watcher::Event<core::ServiceAccount>>),
    AuthorizationPolicy(Box<watcher::Event<DeserializeGuard<crd::AuthorizationPolicy>>>),
    PeerAuthentication(Box<watcher::Event<DeserializeGuard<crd::PeerAuthentication>>>),
}

type Updates = Pin<Box<dyn Stream<Item = Result<Update, (Kind, watcher::Error)>> + Send>>;

async fn run(
    client: Client,
    first: oneshot::Sender<watch::Receiver<Arc<State>>>,
    conditions: watch::Sender<Arc<Conditions>>,
) {
    let mut updates = select_all([
        updates(
            Api::<core::Namespace>::all(client.clone()),
            Kind::Namespace,
            Update::Namespace,
        ),
        updates(Api::<core::Pod>::all(client.clone()), Kind::Pod, Update::Pod),
        updates(
            Api::<core::Service>::all(client.clone()),
            Kind::Service,
            Update::Service,
        ),
        updates(
            Api::<core::ServiceAccount>::all(client.clone()),
            Kind::ServiceAccount,
            Update::ServiceAccount,
        ),
        updates(
            Api::<DeserializeGuard<crd::AuthorizationPolicy>>::all(client.clone()),
            Kind::AuthorizationPolicy,
            Update::AuthorizationPolicy,
        ),
        updates(
            Api::<DeserializeGuard<crd::PeerAuthentication>>::all(client.clone()),
            Kind::PeerAuthentication,
            Update::PeerAuthentication,
        ),
    ]);
    let mut caches = Caches::default();
    let mut builder = Builder::default();
    let mut first = Some(first);
    let mut states: Option<watch::Sender<Arc<State>>> = None;
    // The revision floor: the consistent list's, taken once before the first state.
    let mut floor: Option<u64> = None;
    let mut dirty = false;
    let mut next_build = Instant::now();
    let mut waiting_logged = false;
    loop {
        let ready = caches.ready();
        tokio::select! {
            update = updates.next() => match update {
                Some(Ok(update)) => {
                    caches.apply(update);
                    dirty = true;
                }
                Some(Err((kind, e))) => log_watch_error(kind, &e),
                // The watchers never end; if they did, there would be nothing left to follow.
                None => return,
            },
            () = tokio::time::sleep_until(next_build), if dirty && ready => {
                dirty = false;
                next_build = Instant::now() + COALESCE;
                if floor.is_none() {
                    match consistent_revision(&client).await {
                        Ok(r) => floor = Some(r),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the cluster's current revision; retrying");
                            dirty = true;
                            next_build = Instant::now() + Duration::from_secs(1);
                            continue;
                        }
                    }
                }
                let snapshot = caches.snapshot();
                let Some(id) = cluster_id(&snapshot) else {
                    if !waiting_logged {
                        tracing::warn!("no namespace {IDENTITY_NAMESPACE} (or it has no uid): nothing is published until it exists");
                        waiting_logged = true;
                    }
                    continue;
                };
                let built = builder.build(&snapshot);
                for note in &built.notes {
                    tracing::warn!(object = %note.object, "{}", note.message);
                }
                let revision = caches.max_revision.max(floor.unwrap_or(0));
                // Made from the last state, sharing what did not change (a build keeps the `Arc` of
                // each object that did not): the index's step after it costs what changed.
                let last = states.as_ref().map(|tx| tx.borrow().clone()).unwrap_or_default();
                let next = last.succeeded_by(id, revision, built.objects);
                match &states {
                    None => {
                        tracing::info!(
                            revision,
                            objects = next.objects().count(),
                            "the initial lists are complete: publishing the first state"
                        );
                        let (tx, rx) = watch::channel(Arc::new(next));
                        if let Some(first) = first.take() {
                            // The receiver may be gone (nobody waits); the state is kept anyway.
                            let _ = first.send(rx);
                        }
                        states = Some(tx);
                    }
                    Some(tx) => {
                        tx.send_if_modified(|current| {
                            let changed = current.id != next.id || current.changes(&next).next().is_some();
                            if changed {
                                tracing::debug!(revision, "publishing a new state");
                                *current = Arc::new(next);
                            }
                            changed
                        });
                    }
                }
                conditions.send_if_modified(|current| {
                    let changed = **current != built.conditions;
                    if changed {
                        *current = Arc::new(built.conditions);
                    }
                    changed
                });
            }
        }
    }
}

/// The watch of one kind: its events (`managedFields` dropped, they are of no use here and large),
/// and its errors with backoff.
fn updates<K>(api: Api<K>, kind: Kind, wrap: fn(Box<watcher::Event<K>>) -> Update) -> Updates
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .map(move |r| r.map(|e| wrap(Box::new(e))).map_err(|e| (kind, e)))
        .boxed()
}

fn log_watch_error(kind: Kind, e: &watcher::Error) {
    let missing = matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
    if missing && matches!(kind, Kind::AuthorizationPolicy | Kind::PeerAuthentication) {
        tracing::error!(
            %kind,
            error = %e,
            "{kind} is not served: install Weft's CRDs (`weft-controller crds | kubectl apply -f -`); nothing is published until every kind is listed"
        );
    } else {
        tracing::warn!(%kind, error = %e, "watch failed; retrying with backoff");
    }
}

/// The `resourceVersion` of a consistent (quorum) list: the store's current revision.
async fn consistent_revision(client: &Client) -> Result<u64, kube::Error> {
    let list = Api::<core::Namespace>::all(client.clone())
        .list_metadata(&ListParams::default().limit(1))
        .await?;
    Ok(list
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

fn cluster_id(snapshot: &Snapshot) -> Option<String> {
    snapshot
        .namespaces
        .iter()
        .find(|ns| ns.metadata.name.as_deref() == Some(IDENTITY_NAMESPACE))
        .and_then(|ns| ns.metadata.uid.clone())
        .filter(|uid| !uid.is_empty())
}

// === the caches ===

/// What the watchers hold, each kind behind a reflector's writer (which swaps a relist in whole,
/// at its end).
#[derive(Default)]
struct Caches {
    namespaces: Cache<core::Namespace>,
    pods: Cache<core::Pod>,
    services: Cache<core::Service>,
    service_accounts: Cache<core::ServiceAccount>,
    policies: Cache<DeserializeGuard<crd::AuthorizationPolicy>>,
    peer_authentications: Cache<DeserializeGuard<crd::PeerAuthentication>>,
    /// The highest resource version seen in any event.
    max_revision: u64,
}

struct Cache<K: Resource<DynamicType = ()> + Clone + 'static> {
    writer: Writer<K>,
    /// Whether the initial list is complete.
    listed: bool,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Default for Cache<K> {
    fn default() -> Self {
        Cache {
            writer: Writer::default(),
            listed: false,
        }
    }
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Cache<K> {
    /// Applies the event; returns the highest resource version it carries.
    fn apply(&mut self, event: &watcher::Event<K>) -> Option<u64> {
        let revision = match event {
            watcher::Event::Apply(o) | watcher::Event::Delete(o) | watcher::Event::InitApply(o) => {
                o.meta().resource_version.as_deref().and_then(|v| v.parse().ok())
            }
            watcher::Event::Init => None,
            watcher::Event::InitDone => {
                self.listed = true;
                None
            }
        };
        self.writer.apply_watcher_event(event);
        revision
    }

    fn state(&self) -> Vec<Arc<K>> {
        self.writer.as_reader().state()
    }
}

impl Caches {
    fn apply(&mut self, update: Update) {
        let revision = match &update {
            Update::Namespace(e) => self.namespaces.apply(e),
            Update::Pod(e) => self.pods.apply(e),
            Update::Service(e) => self.services.apply(e),
            Update::ServiceAccount(e) => self.service_accounts.apply(e),
            Update::AuthorizationPolicy(e) => self.policies.apply(e),
            Update::PeerAuthentication(e) => self.peer_authentications.apply(e),
        };
        if let Some(r) = revision {
            self.max_revision = self.max_revision.max(r);
        }
    }

    /// Whether every kind has finished its initial list.
    fn ready(&self) -> bool {
        self.namespaces.listed
            && self.pods.listed
            && self.services.listed
            && self.service_accounts.listed
            && self.policies.listed
            && self.peer_authentications.listed
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            namespaces: self.namespaces.state(),
            pods: self.pods.state(),
            services: self.services.state(),
            service_accounts: self.service_accounts.state(),
            policies: self.policies.state(),
            peer_authentications: self.peer_authentications.state(),
        }
    }
}
