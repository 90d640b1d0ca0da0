//! The store's objects after validation: normalized (defaults filled in, addresses parsed), the form
//! that is persisted, distributed and rendered back as YAML.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::{Deserialize, Serialize};
use weft_model::{peer_auth::PeerAuthentication, policy::AuthorizationPolicy};

/// The kinds the local store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    // Declaration order is the order `get` renders in: a namespace before what lives in it, so the
    // output of `get` can be applied as is.
    Namespace,
    ServiceAccount,
    Service,
    Pod,
    AuthorizationPolicy,
    PeerAuthentication,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::ServiceAccount,
        Kind::Service,
        Kind::Pod,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
    ];

    /// The `kind:` of the YAML form.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::AuthorizationPolicy => weft_model::policy::KIND,
            Kind::PeerAuthentication => weft_model::peer_auth::KIND,
        }
    }

    /// The `apiVersion:` of the YAML form.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::AuthorizationPolicy => weft_model::policy::API_VERSION,
            Kind::PeerAuthentication => weft_model::peer_auth::API_VERSION,
            _ => "v1",
        }
    }

    pub fn is_namespaced(self) -> bool {
        self != Kind::Namespace
    }

    /// Looks a kind up by its name, case-insensitively, also in plural form and by the usual short
    /// names (`ns`, `sa`, `svc`, `po`, `pa`), as `kubectl get` does.
    pub fn lookup(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        let singular = lower.strip_suffix('s').unwrap_or(&lower);
        Kind::ALL.into_iter().find(|k| {
            let name = k.name().to_ascii_lowercase();
            let short = match k {
                Kind::Namespace => "ns",
                Kind::ServiceAccount => "sa",
                Kind::Service => "svc",
                Kind::Pod => "po",
                Kind::AuthorizationPolicy => "authorizationpolicies",
                Kind::PeerAuthentication => "pa",
            };
            lower == name || singular == name || lower == short
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names one object: kind, namespace (empty for a Namespace) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    /// `namespace/name`, or `name` for a Namespace.
    pub fn qualified_name(&self) -> String {
        if self.kind.is_namespaced() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            self.name.clone()
        }
    }

    /// The form used in result lines: `pod default/web`.
    pub fn result_line(&self, verb: &str) -> String {
        format!(
            "{} {} {verb}",
            self.kind.name().to_ascii_lowercase(),
            self.qualified_name()
        )
    }
}

impl fmt::Display for ObjectRef {
    /// `Pod default/web`, `Namespace shop`: the form used in error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.qualified_name())
    }
}

/// Labels and annotations, shared by every kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    #[serde(flatten)]
    pub meta: Meta,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    #[serde(flatten)]
    pub meta: Meta,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    #[serde(flatten)]
    pub meta: Meta,
    pub node: String,
    pub service_account: String,
    /// At most one address per family, the primary first.
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    #[serde(flatten)]
    pub meta: Meta,
    /// `None`: the service has no selector (and so no endpoints).
    pub selector: Option<BTreeMap<String, String>>,
    /// Cluster IPs, at most one per family.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Empty when the port has no name.
    pub name: String,
    pub port: u16,
    pub target_port: u16,
}

impl Service {
    /// Whether the service selects `pod`: same namespace, a non-empty selector, and every selector
    /// label present on the pod with the same value.
    pub fn selects(&self, pod: &Pod) -> bool {
        self.namespace == pod.namespace
            && self
                .selector
                .as_ref()
                .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| pod.meta.labels.get(k) == Some(v)))
    }
}

/// One object of any kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Service(Service),
    Pod(Pod),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
}

impl Object {
    pub fn object_ref(&self) -> ObjectRef {
        let (kind, namespace, name) = match self {
            Object::Namespace(o) => (Kind::Namespace, String::new(), &o.name),
            Object::ServiceAccount(o) => (Kind::ServiceAccount, o.namespace.clone(), &o.name),
            Object::Service(o) => (Kind::Service, o.namespace.clone(), &o.name),
            Object::Pod(o) => (Kind::Pod, o.namespace.clone(), &o.name),
            Object::AuthorizationPolicy(o) => (
                Kind::AuthorizationPolicy,
                o.metadata.namespace.clone(),
                &o.metadata.name,
            ),
            Object::PeerAuthentication(o) => (Kind::PeerAuthentication, o.metadata.namespace.clone(), &o.metadata.name),
        };
        ObjectRef {
            kind,
            namespace,
            name: name.clone(),
        }
    }
}
