//! The Kubernetes-style YAML form of the store's objects: parsing and validating documents into
//! [`Object`]s, and rendering objects back. Pure: no I/O, no store state (checks that need the
//! store, like namespace existence or address collisions, live in `store.rs`).

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::{Deserialize, Deserializer, Serialize};
use serde_yaml_ng::Value;
use weft_model::{
    peer_auth::PeerAuthentication,
    policy::{self, AuthorizationPolicy},
};

use super::objects::{Kind, Meta, Namespace, Object, ObjectRef, Pod, Service, ServiceAccount, ServicePort};

/// A document that cannot be applied, with where it is and what is wrong: the rendered form is
/// `<file>: document <n>: <Kind> <namespace>/<name>: <field>: <problem>`, leaving out the parts
/// that do not apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    /// Where the YAML came from (a file name, or "-").
    pub file: String,
    /// 1-based position of the document in the stream.
    pub document: Option<usize>,
    /// `Pod default/web`.
    pub object: Option<String>,
    /// `spec.ports[0].port`.
    pub field: Option<String>,
    pub problem: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(n) = self.document {
            write!(f, ": document {n}")?;
        }
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// One parsed document: its 1-based position in the stream and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document<T> {
    pub index: usize,
    pub item: T,
}

/// Parses and validates every document of a YAML stream. Empty documents are skipped (but counted,
/// so that positions match the file). The first problem is returned. A Pod without `metadata.uid`
/// comes back with an empty `uid`; the store fills it in. A present uid must be a UUID, and
/// `weft.dev/dataplane-mode` must be `ambient` or `none`.
pub fn parse(yaml: &str, file: &str) -> Result<Vec<Document<Object>>, Invalid> {
    parse_with(yaml, file, parse_object)
}

/// Parses the objects a YAML stream names, for delete: only `apiVersion`, `kind`,
/// `metadata.name` and `metadata.namespace` are read.
pub fn parse_refs(yaml: &str, file: &str) -> Result<Vec<Document<ObjectRef>>, Invalid> {
    parse_with(yaml, file, |ctx, kind, value| {
        let meta: RawMeta = ctx.field(value.get("metadata").cloned().unwrap_or(Value::Null), "metadata")?;
        let (namespace, name) = ctx.names(kind, &meta)?;
        Ok(ObjectRef { kind, namespace, name })
    })
}

/// Renders objects as a YAML stream, one document each, separated by `---`.
pub fn render<'a>(objects: impl IntoIterator<Item = &'a Object>) -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for object in objects {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&render_one(object)?);
    }
    Ok(out)
}

/// What is wrong with one field of an object, before it is placed in a file: the Kubernetes source
/// writes it (`<field>: <problem>`) into a custom resource's `Accepted` condition, the local store
/// prefixes it with the file, the document and the object ([`Invalid`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldProblem {
    /// `spec.rules[0].from`; `None` when the problem is the whole object's.
    pub field: Option<String>,
    pub problem: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.problem),
            None => f.write_str(&self.problem),
        }
    }
}

/// Reads and checks an AuthorizationPolicy as written, the one rule for every source of the model:
/// `spec` (absent or null: the empty spec) must be a [`policy::Spec`] (unknown fields are refused,
/// named by their path), then the policy must [`validate`](AuthorizationPolicy::validate). The
/// caller has checked `namespace` and `name` against its own naming rules (validation checks that
/// both are DNS labels as well).
pub fn authorization_policy<'de, D: Deserializer<'de>>(
    namespace: &str,
    name: &str,
    spec: D,
) -> Result<AuthorizationPolicy, FieldProblem> {
    let p = AuthorizationPolicy {
        metadata: metadata(namespace, name),
        spec: spec_at(spec)?,
    };
    p.validate().map_err(|e| FieldProblem {
        field: Some(e.field),
        problem: e.problem,
    })?;
    Ok(p)
}

/// As [`authorization_policy`], for a PeerAuthentication ([`peer_auth::Spec`],
/// [`PeerAuthentication::validate`]).
pub fn peer_authentication<'de, D: Deserializer<'de>>(
    namespace: &str,
    name: &str,
    spec: D,
) -> Result<PeerAuthentication, FieldProblem> {
    let p = PeerAuthentication {
        metadata: metadata(namespace, name),
        spec: spec_at(spec)?,
    };
    p.validate().map_err(|e| FieldProblem {
        field: Some(e.field),
        problem: e.problem,
    })?;
    Ok(p)
}

fn metadata(namespace: &str, name: &str) -> policy::Metadata {
    policy::Metadata {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
    }
}

/// A policy's `spec`: absent or null is the empty spec; fields are named by their path.
fn spec_at<'de, S: Deserialize<'de> + Default, D: Deserializer<'de>>(spec: D) -> Result<S, FieldProblem> {
    Ok(deserialize_at::<Option<S>, D>(spec, "spec")?.unwrap_or_default())
}

/// Deserializes a value found at `at` (`""`: the document) into `T`, naming the failing field's
/// path (`spec.rules[0].from`).
fn deserialize_at<'de, T: Deserialize<'de>, D: Deserializer<'de>>(value: D, at: &str) -> Result<T, FieldProblem> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = match (at, inner.as_str()) {
            ("", p) => p.to_owned(),
            (a, ".") => a.to_owned(),
            (a, p) => format!("{a}.{p}"),
        };
        let field = if path.is_empty() || path == "." {
            None
        } else {
            Some(path)
        };
        FieldProblem {
            field,
            problem: e.into_inner().to_string(),
        }
    })
}

// === parsing ===

/// Where a document is, for error messages.
struct Ctx<'a> {
    file: &'a str,
    index: usize,
    object: Option<String>,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<Option<String>>, problem: impl Into<String>) -> Invalid {
        Invalid {
            file: self.file.to_owned(),
            document: Some(self.index),
            object: self.object.clone(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Deserializes `value` (found at `at`) into `T`, naming the failing field's path.
    fn field<T: for<'de> Deserialize<'de>>(&self, value: Value, at: &str) -> Result<T, Invalid> {
        deserialize_at(value, at).map_err(|p| self.place(p))
    }

    /// Places a field's problem in this document.
    fn place(&self, p: FieldProblem) -> Invalid {
        self.err(p.field, p.problem)
    }

    /// The namespace (defaulted; empty for a Namespace) and name of an object, both checked.
    fn names(&self, kind: Kind, meta: &RawMeta) -> Result<(String, String), Invalid> {
        let name = meta
            .name
            .clone()
            .ok_or_else(|| self.err("metadata.name".to_owned(), "required"))?;
        check_label(&name).map_err(|p| self.err("metadata.name".to_owned(), p))?;
        let namespace = if kind.is_namespaced() {
            let ns = meta.namespace.clone().unwrap_or_else(|| "default".to_owned());
            check_label(&ns).map_err(|p| self.err("metadata.namespace".to_owned(), p))?;
            ns
        } else {
            String::new()
        };
        Ok((namespace, name))
    }

    fn meta(&self, meta: &RawMeta) -> Result<Meta, Invalid> {
        let labels = meta.labels.clone().unwrap_or_default();
        check_labels(&labels, "metadata.labels").map_err(|(f, p)| self.err(f, p))?;
        let annotations = meta.annotations.clone().unwrap_or_default();
        for (key, value) in &annotations {
            weft_model::annotations::validate_key(key)
                .and_then(|()| weft_model::annotations::validate_value(key, value))
                .map_err(|p| self.err(format!("metadata.annotations[{key:?}]"), p))?;
        }
        Ok(Meta { labels, annotations })
    }
}

fn parse_with<T>(
    yaml: &str,
    file: &str,
    mut each: impl FnMut(&Ctx<'_>, Kind, &Value) -> Result<T, Invalid>,
) -> Result<Vec<Document<T>>, Invalid> {
    let mut out = Vec::new();
    // The iterator repeats a syntax error forever: stop at the first one.
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let mut ctx = Ctx {
            file,
            index: i + 1,
            object: None,
        };
        let value = Value::deserialize(doc).map_err(|e| ctx.err(None, format!("invalid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let Value::Mapping(map) = &value else {
            return Err(ctx.err(None, "expected an object with apiVersion and kind"));
        };
        let text = |key: &str| -> Result<String, Invalid> {
            match map.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(ctx.err(key.to_owned(), "must be a string")),
                None => Err(ctx.err(key.to_owned(), "required")),
            }
        };
        let (api_version, kind_name) = (text("apiVersion")?, text("kind")?);
        let kind = Kind::ALL.into_iter().find(|k| k.name() == kind_name).ok_or_else(|| {
            let known: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
            ctx.err(
                "kind".to_owned(),
                format!("unknown kind {kind_name:?} (known: {})", known.join(", ")),
            )
        })?;
        ctx.object = Some(describe(kind, &value));
        if api_version != kind.api_version() {
            return Err(ctx.err(
                "apiVersion".to_owned(),
                format!(
                    "unknown apiVersion {api_version:?} for {kind} (expected {:?})",
                    kind.api_version()
                ),
            ));
        }
        out.push(Document {
            index: ctx.index,
            item: each(&ctx, kind, &value)?,
        });
    }
    Ok(out)
}

/// `Pod default/web` from whatever the document says, before anything is checked.
fn describe(kind: Kind, value: &Value) -> String {
    let meta = value.get("metadata");
    let get = |key: &str| meta.and_then(|m| m.get(key)).and_then(Value::as_str);
    let name = get("name").unwrap_or("(unnamed)");
    if kind.is_namespaced() {
        format!("{kind} {}/{name}", get("namespace").unwrap_or("default"))
    } else {
        format!("{kind} {name}")
    }
}

fn parse_object(ctx: &Ctx<'_>, kind: Kind, value: &Value) -> Result<Object, Invalid> {
    let value = value.clone();
    Ok(match kind {
        Kind::Namespace => {
            let raw: RawNamespace = ctx.field(value, "")?;
            let (_, name) = ctx.names(kind, &raw.metadata)?;
            Object::Namespace(Namespace {
                name,
                meta: ctx.meta(&raw.metadata)?,
            })
        }
        Kind::ServiceAccount => {
            let raw: RawServiceAccount = ctx.field(value, "")?;
            let (namespace, name) = ctx.names(kind, &raw.metadata)?;
            Object::ServiceAccount(ServiceAccount {
                namespace,
                name,
                meta: ctx.meta(&raw.metadata)?,
            })
        }
        Kind::Pod => Object::Pod(parse_pod(ctx, ctx.field(value, "")?)?),
        Kind::Service => Object::Service(parse_service(ctx, ctx.field(value, "")?)?),
        Kind::AuthorizationPolicy => {
            let raw: RawPolicy<Value> = ctx.field(value, "")?;
            let (namespace, name) = ctx.names(kind, &raw.metadata)?;
            let spec = raw.spec.unwrap_or(Value::Null);
            Object::AuthorizationPolicy(authorization_policy(&namespace, &name, spec).map_err(|p| ctx.place(p))?)
        }
        Kind::PeerAuthentication => {
            let raw: RawPeerAuthentication<Value> = ctx.field(value, "")?;
            let (namespace, name) = ctx.names(kind, &raw.metadata)?;
            let spec = raw.spec.unwrap_or(Value::Null);
            Object::PeerAuthentication(peer_authentication(&namespace, &name, spec).map_err(|p| ctx.place(p))?)
        }
    })
}

fn parse_pod(ctx: &Ctx<'_>, raw: RawPod) -> Result<Pod, Invalid> {
    let (namespace, name) = ctx.names(Kind::Pod, &raw.metadata)?;
    let meta = ctx.meta(&raw.metadata)?;
    let uid = raw.metadata.uid.clone().unwrap_or_default();
    if raw.metadata.uid.is_some() {
        if uid.trim().is_empty() {
            return Err(ctx.err("metadata.uid".to_owned(), "must not be empty (leave it out to get one)"));
        }
        // Node agents name paths after it.
        weft_model::workload::validate_uid(&uid).map_err(|p| ctx.err("metadata.uid".to_owned(), p))?;
    }
    let node = raw
        .spec
        .node_name
        .ok_or_else(|| ctx.err("spec.nodeName".to_owned(), "required"))?;
    check_subdomain(&node).map_err(|p| ctx.err("spec.nodeName".to_owned(), p))?;
    let service_account = raw.spec.service_account_name.unwrap_or_else(|| "default".to_owned());
    check_label(&service_account).map_err(|p| ctx.err("spec.serviceAccountName".to_owned(), p))?;

    let mut ips = Vec::new();
    for (i, entry) in raw.status.pod_ips.iter().flatten().enumerate() {
        ips.push(parse_ip(&entry.ip).map_err(|p| ctx.err(format!("status.podIPs[{i}].ip"), p))?);
    }
    if let Some(single) = &raw.status.pod_ip {
        let ip = parse_ip(single).map_err(|p| ctx.err("status.podIP".to_owned(), p))?;
        merge_primary(&mut ips, ip, "status.podIPs[0].ip").map_err(|p| ctx.err("status.podIP".to_owned(), p))?;
    }
    check_families(&ips).map_err(|i| ctx.err(format!("status.podIPs[{i}].ip"), "a second address of one family"))?;
    Ok(Pod {
        namespace,
        name,
        uid,
        meta,
        node,
        service_account,
        ips,
    })
}

/// Kubernetes' singular field (`podIP`, `clusterIP`) is the first of the plural one: it fills an empty
/// list and must agree with a present one.
fn merge_primary(ips: &mut Vec<IpAddr>, single: IpAddr, first_field: &str) -> Result<(), String> {
    match ips.first() {
        None => ips.push(single),
        Some(first) if *first == single => {}
        Some(first) => return Err(format!("{single} differs from {first_field} ({first})")),
    }
    Ok(())
}

fn parse_service(ctx: &Ctx<'_>, raw: RawService) -> Result<Service, Invalid> {
    let (namespace, name) = ctx.names(Kind::Service, &raw.metadata)?;
    let meta = ctx.meta(&raw.metadata)?;
    let spec = raw.spec;
    if let Some(selector) = &spec.selector {
        check_labels(selector, "spec.selector").map_err(|(f, p)| ctx.err(f, p))?;
    }
    let mut cluster_ips = Vec::new();
    for (i, s) in spec.cluster_ips.iter().flatten().enumerate() {
        if s != "None" {
            cluster_ips.push(parse_ip(s).map_err(|p| ctx.err(format!("spec.clusterIPs[{i}]"), p))?);
        }
    }
    if let Some(s) = spec.cluster_ip.as_deref().filter(|s| *s != "None" && !s.is_empty()) {
        let ip = parse_ip(s).map_err(|p| ctx.err("spec.clusterIP".to_owned(), p))?;
        merge_primary(&mut cluster_ips, ip, "spec.clusterIPs[0]")
            .map_err(|p| ctx.err("spec.clusterIP".to_owned(), p))?;
    }
    check_families(&cluster_ips)
        .map_err(|i| ctx.err(format!("spec.clusterIPs[{i}]"), "a second address of one family"))?;

    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let at = |field: &str| format!("spec.ports[{i}].{field}");
        let port = p.port.ok_or_else(|| ctx.err(at("port"), "required"))?;
        let port = check_port(port).map_err(|e| ctx.err(at("port"), e))?;
        let target_port = match &p.target_port {
            None => port,
            Some(IntOrString::Int(t)) => check_port(*t).map_err(|e| ctx.err(at("targetPort"), e))?,
            Some(IntOrString::String(s)) => match s.parse::<i64>() {
                Ok(t) => check_port(t).map_err(|e| ctx.err(at("targetPort"), e))?,
                Err(_) => return Err(ctx.err(at("targetPort"), format!("{s:?}: named ports are not supported"))),
            },
        };
        if let Some(proto) = p.protocol.as_deref().filter(|p| *p != "TCP") {
            return Err(ctx.err(at("protocol"), format!("{proto:?} is not supported (TCP only)")));
        }
        let port_name = p.name.clone().unwrap_or_default();
        if !port_name.is_empty() {
            check_label(&port_name).map_err(|e| ctx.err(at("name"), e))?;
        }
        if let Some(j) = ports.iter().position(|q| q.port == port) {
            return Err(ctx.err(at("port"), format!("{port} is already used by spec.ports[{j}]")));
        }
        if let Some(j) = ports.iter().position(|q| !port_name.is_empty() && q.name == port_name) {
            return Err(ctx.err(at("name"), format!("{port_name:?} is already used by spec.ports[{j}]")));
        }
        ports.push(ServicePort {
            name: port_name,
            port,
            target_port,
        });
    }
    Ok(Service {
        namespace,
        name,
        meta,
        selector: spec.selector,
        cluster_ips,
        ports,
    })
}

fn check_label(s: &str) -> Result<(), String> {
    if weft_model::is_dns_label(s) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a DNS label (1-63 lowercase letters, digits or '-', starting and ending alphanumeric)"
        ))
    }
}

fn check_subdomain(s: &str) -> Result<(), String> {
    if !s.is_empty() && s.len() <= 253 && s.split('.').all(weft_model::is_dns_label) {
        Ok(())
    } else {
        Err(format!("{s:?} is not a DNS name (lowercase labels separated by '.')"))
    }
}

fn check_labels(labels: &BTreeMap<String, String>, at: &str) -> Result<(), (String, String)> {
    for (key, value) in labels {
        weft_model::annotations::validate_key(key)
            .map_err(|p| (format!("{at}[{key:?}]"), p.replacen("annotation key", "key", 1)))?;
        let value_ok = value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && value.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
            && value.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric());
        if !value_ok {
            return Err((
                format!("{at}[{key:?}]"),
                format!(
                    "{value:?}: a label value is at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
                ),
            ));
        }
    }
    Ok(())
}

fn check_port(port: i64) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port} is not in 1-65535"))
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("{s:?} is not an IP address"))
}

/// Index of the first address whose family was already seen.
fn check_families(ips: &[IpAddr]) -> Result<(), usize> {
    for (i, ip) in ips.iter().enumerate() {
        if ips[..i].iter().any(|seen| seen.is_ipv4() == ip.is_ipv4()) {
            return Err(i);
        }
    }
    Ok(())
}

// === rendering ===

fn render_one(object: &Object) -> Result<String, serde_yaml_ng::Error> {
    let r = object.object_ref();
    let (api_version, kind) = (r.kind.api_version().to_owned(), r.kind.name().to_owned());
    let meta = |namespace: &str, name: &str, uid: Option<&str>, m: &Meta| RawMeta {
        name: Some(name.to_owned()),
        namespace: (!namespace.is_empty()).then(|| namespace.to_owned()),
        uid: uid.map(str::to_owned),
        labels: (!m.labels.is_empty()).then(|| m.labels.clone()),
        annotations: (!m.annotations.is_empty()).then(|| m.annotations.clone()),
    };
    match object {
        Object::Namespace(o) => serde_yaml_ng::to_string(&RawNamespace {
            api_version,
            kind,
            metadata: meta("", &o.name, None, &o.meta),
        }),
        Object::ServiceAccount(o) => serde_yaml_ng::to_string(&RawServiceAccount {
            api_version,
            kind,
            metadata: meta(&o.namespace, &o.name, None, &o.meta),
        }),
        Object::Pod(o) => serde_yaml_ng::to_string(&RawPod {
            api_version,
            kind,
            metadata: meta(&o.namespace, &o.name, Some(&o.uid), &o.meta),
            spec: RawPodSpec {
                node_name: Some(o.node.clone()),
                service_account_name: Some(o.service_account.clone()),
            },
            status: RawPodStatus {
                pod_ip: o.ips.first().map(IpAddr::to_string),
                pod_ips: (!o.ips.is_empty()).then(|| o.ips.iter().map(|ip| RawPodIp { ip: ip.to_string() }).collect()),
            },
        }),
        Object::Service(o) => serde_yaml_ng::to_string(&RawService {
            api_version,
            kind,
            metadata: meta(&o.namespace, &o.name, None, &o.meta),
            spec: RawServiceSpec {
                selector: o.selector.clone(),
                cluster_ip: o.cluster_ips.first().map(IpAddr::to_string),
                cluster_ips: (!o.cluster_ips.is_empty()).then(|| o.cluster_ips.iter().map(IpAddr::to_string).collect()),
                ports: Some(
                    o.ports
                        .iter()
                        .map(|p| RawServicePort {
                            name: (!p.name.is_empty()).then(|| p.name.clone()),
                            port: Some(i64::from(p.port)),
                            target_port: Some(IntOrString::Int(i64::from(p.target_port))),
                            protocol: Some("TCP".to_owned()),
                        })
                        .collect(),
                ),
            },
        }),
        Object::AuthorizationPolicy(p) => serde_yaml_ng::to_string(&RawPolicy {
            api_version,
            kind,
            metadata: meta(&p.metadata.namespace, &p.metadata.name, None, &Meta::default()),
            spec: Some(p.spec.clone()),
        }),
        Object::PeerAuthentication(p) => serde_yaml_ng::to_string(&RawPeerAuthentication {
            api_version,
            kind,
            metadata: meta(&p.metadata.namespace, &p.metadata.name, None, &Meta::default()),
            spec: Some(p.spec.clone()),
        }),
    }
}

// === the YAML shapes (only the fields Weft reads; others are ignored) ===

#[derive(Debug, Default, Deserialize, Serialize)]
struct RawMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct RawNamespace {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: RawMeta,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct RawServiceAccount {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: RawMeta,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct RawPod {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: RawPodSpec,
    #[serde(default)]
    status: RawPodStatus,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct RawPodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_account_name: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct RawPodStatus {
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", skip_serializing_if = "Option::is_none")]
    pod_ips: Option<Vec<RawPodIp>>,
}

#[derive(Debug, Deserialize, Serialize)]
struct RawPodIp {
    ip: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct RawService {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: RawServiceSpec,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct RawServiceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    selector: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Option::is_none")]
    cluster_ips: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ports: Option<Vec<RawServicePort>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct RawServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default)]
    port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    protocol: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
enum IntOrString {
    Int(i64),
    String(String),
}

/// `S`: the spec as written (a YAML value, checked by [`authorization_policy`]) when parsing, the
/// checked spec when rendering.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct RawPolicy<S> {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: Option<S>,
}

/// As [`RawPolicy`].
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct RawPeerAuthentication<S> {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default)]
    spec: Option<S>,
}
