//! Workloads and services as the agent holds them: compact, with what pods share held once
//! (the state's interner). A workload is its key, uid, node, addresses and version, and a [`Template`]:
//! service account, identity, labels, annotations and services, the same for every pod of a
//! ReplicaSet. Converted from the wire once, at the boundary, validated as the model's [`Pod`] is.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use weft_api::v1;
use weft_hbone::identity::Identity;
use weft_model::Pod;

/// A label or annotation set.
pub type Labels = BTreeMap<String, String>;

/// Where a conversion from the wire takes the values workloads share: each call gives the one
/// shared copy of its argument (the state's interner, `super::intern`).
pub(super) trait Share {
    fn string(&mut self, s: String) -> Arc<str>;
    fn identity(&mut self, identity: Identity) -> Arc<Identity>;
    fn labels(&mut self, labels: Labels) -> Arc<Labels>;
    /// The list of these services (`namespace/name`), each name shared.
    fn services(&mut self, names: &[String]) -> Arc<[Arc<str>]>;
    /// The template of these parts, each taken from this same sharer.
    fn template(&mut self, template: Template) -> Arc<Template>;
}

/// A pod as the data plane sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// `namespace/name`: the state's maps find the workload by it, and plans and records name it.
    key: Arc<str>,
    uid: Uid,
    node: Arc<str>,
    template: Arc<Template>,
    ips: Ips,
    /// The controller's version of it.
    version: u64,
}

/// What the pods of one ReplicaSet have in common (each part shared further with other templates).
#[derive(Debug, PartialEq, Eq)]
pub struct Template {
    service_account: Arc<str>,
    identity: Arc<Identity>,
    labels: Arc<Labels>,
    annotations: Arc<Labels>,
    /// The services that select the pod (`namespace/name`).
    services: Arc<[Arc<str>]>,
}

/// A Kubernetes UID (an RFC 4122 UUID in its canonical lowercase form) in its 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid([u8; 16]);

/// A pod's addresses, in their order: inline for up to two (one per family, the Kubernetes way).
#[derive(Clone)]
enum Ips {
    Inline(u8, [IpAddr; 2]),
    Spilled(Box<[IpAddr]>),
}

/// A service: its cluster IPs and port mapping. Its endpoints are the workloads naming it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// `namespace/name`.
    pub name: Arc<str>,
    pub vips: Box<[IpAddr]>,
    /// (service port, target port)
    pub ports: Box<[(u16, u16)]>,
    pub version: u64,
}

// === impl Workload ===

impl Workload {
    /// A workload from the wire: validated as the model's [`Pod`] is (the one conversion of the
    /// boundary), its identity parsed, what it shares with other workloads taken from `interner`.
    pub(super) fn from_wire(w: &v1::Workload, version: u64, interner: &mut impl Share) -> Result<Self, String> {
        let pod = Pod::try_from(w).map_err(|e| e.to_string())?;
        let identity: Identity = w.identity.parse().map_err(|e| format!("identity: {e}"))?;
        // Pod::try_from checked the uid's form.
        let uid = Uid::parse(&pod.uid).ok_or_else(|| format!("uid: {:?} is not a UID", pod.uid))?;
        let template = Template {
            service_account: interner.string(pod.service_account),
            identity: interner.identity(identity),
            labels: interner.labels(pod.labels),
            annotations: interner.labels(pod.annotations),
            services: interner.services(&w.services),
        };
        Ok(Self {
            key: format!("{}/{}", pod.namespace, pod.name).into(),
            uid,
            node: interner.string(pod.node),
            template: interner.template(template),
            ips: Ips::new(&pod.ips),
            version,
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> &Arc<str> {
        &self.key
    }

    pub fn namespace(&self) -> &str {
        self.key.split_once('/').map_or(&*self.key, |(ns, _)| ns)
    }

    pub fn name(&self) -> &str {
        self.key.split_once('/').map_or("", |(_, name)| name)
    }

    pub fn uid(&self) -> Uid {
        self.uid
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn service_account(&self) -> &str {
        &self.template.service_account
    }

    /// The pod's SPIFFE identity, shared with the other pods of its service account.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.template.identity
    }

    pub fn labels(&self) -> &Labels {
        &self.template.labels
    }

    pub fn annotations(&self) -> &Labels {
        &self.template.annotations
    }

    /// Pod addresses, one per family (dual stack).
    pub fn ips(&self) -> &[IpAddr] {
        self.ips.as_slice()
    }

    /// The services that select it (`namespace/name`).
    pub fn services(&self) -> &[Arc<str>] {
        &self.template.services
    }

    /// The controller's version of it.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Its first address of the family of `v6`.
    pub fn ip(&self, v6: bool) -> Option<IpAddr> {
        self.ips().iter().copied().find(|ip| ip.is_ipv6() == v6)
    }

    /// The model's pod (allocated: for the enrollment reconciler, never on a connection's path).
    /// The network namespace is the CNI plugin's to tell, so `None`.
    pub fn to_pod(&self) -> Pod {
        Pod {
            uid: self.uid.to_string(),
            namespace: self.namespace().to_owned(),
            name: self.name().to_owned(),
            node: self.node().to_owned(),
            service_account: self.service_account().to_owned(),
            labels: self.labels().clone(),
            annotations: self.annotations().clone(),
            ips: self.ips().to_vec(),
            netns: None,
        }
    }

    /// The template, for tests of what is shared.
    #[cfg(test)]
    pub(super) fn template(&self) -> &Arc<Template> {
        &self.template
    }
}

impl Template {
    /// The addresses of its parts: what identifies a template among those of one interner.
    pub(super) fn parts(&self) -> [usize; 5] {
        [
            Arc::as_ptr(&self.service_account).cast::<u8>() as usize,
            Arc::as_ptr(&self.identity) as usize,
            Arc::as_ptr(&self.labels) as usize,
            Arc::as_ptr(&self.annotations) as usize,
            Arc::as_ptr(&self.services).cast::<u8>() as usize,
        ]
    }

    #[cfg(test)]
    pub(super) fn labels(&self) -> &Arc<Labels> {
        &self.labels
    }

    #[cfg(test)]
    pub(super) fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }
}

// === impl Uid ===

impl Uid {
    /// The UID written `s` (8-4-4-4-12 lowercase hex digits, as `validate_uid` of the model
    /// accepts), if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 36 {
            return None;
        }
        let mut out = [0u8; 16];
        let mut digits = 0;
        for (i, c) in b.iter().enumerate() {
            let nibble = match (i, c) {
                (8 | 13 | 18 | 23, b'-') => continue,
                (8 | 13 | 18 | 23, _) => return None,
                (_, b'0'..=b'9') => c - b'0',
                (_, b'a'..=b'f') => c - b'a' + 10,
                _ => return None,
            };
            out[digits / 2] |= nibble << if digits % 2 == 0 { 4 } else { 0 };
            digits += 1;
        }
        Some(Self(out))
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uid({self})")
    }
}

// === impl Ips ===

impl Ips {
    fn new(ips: &[IpAddr]) -> Self {
        const NONE: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        match *ips {
            [] => Self::Inline(0, [NONE; 2]),
            [a] => Self::Inline(1, [a, NONE]),
            [a, b] => Self::Inline(2, [a, b]),
            _ => Self::Spilled(ips.into()),
        }
    }

    fn as_slice(&self) -> &[IpAddr] {
        match self {
            Self::Inline(len, ips) => &ips[..usize::from(*len)],
            Self::Spilled(ips) => ips,
        }
    }
}

impl PartialEq for Ips {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Ips {}

impl fmt::Debug for Ips {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_slice().fmt(f)
    }
}

// === impl Service ===

impl Service {
    /// A service from the wire: every VIP an address, every port in range and not 0.
    pub(super) fn from_wire(s: &v1::Service, version: u64, interner: &mut impl Share) -> Result<Self, String> {
        let vips = s
            .vips
            .iter()
            .map(|v| {
                v.parse::<IpAddr>()
                    .map_err(|_| format!("vips: {v:?} is not an IP address"))
            })
            .collect::<Result<_, _>>()?;
        let ports = s
            .ports
            .iter()
            .map(|p| match (u16::try_from(p.port), u16::try_from(p.target_port)) {
                (Ok(a), Ok(b)) if a != 0 && b != 0 => Ok((a, b)),
                _ => Err(format!("ports: {}->{} out of range", p.port, p.target_port)),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: interner.string(format!("{}/{}", s.namespace, s.name)),
            vips,
            ports,
            version,
        })
    }
}
