//! The enrolled pod a connection belongs to, as its proxies see it.

use std::sync::{Arc, RwLock};

use weft_dataplane::netns::NetNs;
use weft_hbone::identity::Identity;
use weft_model::Pod;

use crate::{mesh::Mesh, metrics::WorkloadNames};

/// What the proxies need to know about the pod a connection belongs to. What the workload source
/// can change about a running pod (labels, service account, addresses) is in [`Current`], replaced in
/// place: the pod's listeners and capture never go away for it.
pub struct PodContext {
    pub uid: String,
    /// `namespace/name`, formatted once for every record and log line.
    pub name: Arc<str>,
    pub netns: NetNs,
    pub mesh: Arc<Mesh>,
    current: RwLock<Arc<Current>>,
}

/// The pod as the workload source describes it now.
#[derive(Debug, PartialEq, Eq)]
pub struct Current {
    pub pod: Pod,
    /// The pod's SPIFFE identity (from its service account).
    pub identity: Identity,
    /// Its names as the metrics label them, made once per update.
    pub names: WorkloadNames,
    /// The identity as a label value.
    pub principal: Arc<str>,
}

impl Current {
    pub fn new(pod: Pod, identity: Identity) -> Self {
        Self {
            names: WorkloadNames::of(&pod.namespace, &pod.name, &pod.labels),
            principal: Arc::from(identity.as_str()),
            pod,
            identity,
        }
    }
}

impl PodContext {
    pub fn new(pod: Pod, identity: Identity, netns: NetNs, mesh: Arc<Mesh>) -> Self {
        Self {
            uid: pod.uid.clone(),
            name: Arc::from(pod.qualified_name()),
            netns,
            mesh,
            current: RwLock::new(Arc::new(Current::new(pod, identity))),
        }
    }

    /// The pod as last updated; a connection takes it once, at its start.
    pub fn current(&self) -> Arc<Current> {
        // A poisoned lock only means a panic elsewhere while replacing an Arc: the Arc is whole.
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the pod's description; connections already open keep the one they started with.
    pub fn update(&self, current: Current) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(current);
    }
}
