//! Replicas of the controller on Kubernetes, against a real API server (Kubernetes 1.20 and etcd,
//! [`apiserver::ApiServer`]): leader election by Lease, the CA in Secret `weft-ca` and its roots in
//! ConfigMap `weft-root-ca`, and node agents authenticated by TokenReview of their pod-bound
//! service-account tokens.
//!
//! The controllers run as ServiceAccount `weft-system/weft-controller` with exactly the RBAC rules
//! of [`CLUSTER_RULES`] and [`NAMESPACE_RULES`]: what the manifests must grant. The test plays
//! kubelet: it schedules pods (`spec.nodeName`) and sets their phase and addresses itself.
//! Without the Kubernetes binaries these tests skip with a note, or fail with `CI=true`.

#[path = "kubernetes/apiserver.rs"]
mod apiserver;

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use apiserver::ApiServer;
use base64::Engine as _;
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    coordination::v1::Lease,
    core::v1::{ConfigMap, Pod, Secret, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use weft_api::v1::{
    SignRequest, StreamRequest, Subscribe, ca_client::CaClient, config_client::ConfigClient, stream_request,
};
use weft_controller::{
    app::{CaFiles, Config, KubernetesController, KubernetesSettings},
    k8s::{crd, leader},
    store::State,
};

/// The controller's namespace.
const NS: &str = "weft-system";
/// How long any one condition may take to hold.
const TIMEOUT: Duration = Duration::from_secs(30);

/// What the controller's ServiceAccount may do cluster-wide (a ClusterRole).
const CLUSTER_RULES: &str = r#"[
  {"apiGroups": [""], "resources": ["namespaces", "pods", "services", "serviceaccounts"], "verbs": ["get", "list", "watch"]},
  {"apiGroups": ["security.weft.dev"], "resources": ["authorizationpolicies", "peerauthentications"], "verbs": ["get", "list", "watch"]},
  {"apiGroups": ["security.weft.dev"], "resources": ["authorizationpolicies/status", "peerauthentications/status"], "verbs": ["patch"]},
  {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
]"#;

/// What it may do in its own namespace (a Role). `create` cannot be limited by name.
const NAMESPACE_RULES: &str = r#"[
  {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["weft-ca"], "verbs": ["get"]},
  {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
  {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["weft-root-ca"], "verbs": ["get", "update"]},
  {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
  {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["weft-controller"], "verbs": ["get", "update"]},
  {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]}
]"#;

/// An API server with Weft's CRDs, namespace `weft-system`, and the controller's ServiceAccount
/// with its RBAC.
struct Cluster {
    server: ApiServer,
    admin: Client,
    /// Acting as `system:serviceaccount:weft-system:weft-controller`.
    controller: Client,
}

async fn cluster(test: &str) -> Option<Cluster> {
    let server = ApiServer::start(test).await?;
    let admin = server.client().await;
    ApiServer::install_crds(&admin, &crd::crds_yaml().unwrap()).await;
    create(
        &admin,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await;
    service_account(&admin, NS, "weft-controller").await;
    let rules: Value = serde_json::from_str(CLUSTER_RULES).unwrap();
    create(
        &admin,
        None,
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "weft-controller"}, "rules": rules,
        }),
    )
    .await;
    create(
        &admin,
        None,
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "weft-controller"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "weft-controller"},
            "subjects": [{"kind": "ServiceAccount", "name": "weft-controller", "namespace": NS}],
        }),
    )
    .await;
    grant_namespace(&admin, NS).await;
    let token = token_request(
        &admin,
        "weft-controller",
        &["https://kubernetes.default.svc.cluster.local"],
        None,
    )
    .await;
    let controller = server.client_with_token(&token).await;
    Some(Cluster {
        server,
        admin,
        controller,
    })
}

/// The Role of [`NAMESPACE_RULES`] in `namespace`, bound to the controller's ServiceAccount.
async fn grant_namespace(admin: &Client, namespace: &str) {
    let rules: Value = serde_json::from_str(NAMESPACE_RULES).unwrap();
    create(
        admin,
        Some(namespace),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "weft-controller"}, "rules": rules,
        }),
    )
    .await;
    create(
        admin,
        Some(namespace),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "weft-controller"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "weft-controller"},
            "subjects": [{"kind": "ServiceAccount", "name": "weft-controller", "namespace": NS}],
        }),
    )
    .await;
}

/// Creates any object from its JSON (`apiVersion` and `kind` say what it is).
async fn create(client: &Client, namespace: Option<&str>, object: Value) -> DynamicObject {
    let api_version = object["apiVersion"].as_str().unwrap().to_owned();
    let kind = object["kind"].as_str().unwrap().to_owned();
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let gvk = kube::api::GroupVersionKind::gvk(group, version, &kind);
    let lower = kind.to_lowercase();
    let plural = match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{lower}s"),
    };
    let resource = ApiResource::from_gvk_with_plural(&gvk, &plural);
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let object: DynamicObject = serde_json::from_value(object).unwrap();
    api.create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("cannot create {kind} {:?}: {e}", object.metadata.name))
}

async fn service_account(admin: &Client, namespace: &str, name: &str) -> ServiceAccount {
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap()
}

/// A token of ServiceAccount `weft-system/<account>` for `audiences`, bound to `pod` (name, uid)
/// if given: what kubelet projects into a pod.
async fn token_request(admin: &Client, account: &str, audiences: &[&str], pod: Option<&Pod>) -> String {
    let bound = pod.map(|p| json!({"kind": "Pod", "apiVersion": "v1", "name": p.metadata.name, "uid": p.metadata.uid}));
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": audiences, "expirationSeconds": 3600, "boundObjectRef": bound},
    }))
    .unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), NS)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {account}: {e}"))
        .status
        .unwrap()
        .token
}

/// Creates a pod on `node` running as `account` and marks it Running (as kubelet would), with
/// `ip` as its address (an agent is on the host network and has none of its own here).
async fn running_pod(admin: &Client, namespace: &str, name: &str, account: &str, node: &str, ip: Option<&str>) -> Pod {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": node, "serviceAccountName": account, "hostNetwork": ip.is_none(),
            "containers": [{"name": "c", "image": "x"}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let status = match ip {
        Some(ip) => json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}),
        None => json!({"status": {"phase": "Running"}}),
    };
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap()
}

fn config(dir: &Path) -> Config {
    Config {
        state_dir: dir.join("state"),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.join("admin.sock"),
        trust_domain: "cluster.local".into(),
        root_namespace: NS.into(),
        cert_lifetime: Duration::from_secs(3600),
        node_tokens: None,
        ca: None,
        server_name: "weft-controller".into(),
        limits: Default::default(),
    }
}

fn settings(identity: &str) -> KubernetesSettings {
    KubernetesSettings {
        namespace: Some(NS.into()),
        identity: identity.into(),
        pod_ip: None,
        election: leader::Timings::default(),
    }
}

/// A controller replica and its state directory.
struct Replica {
    name: String,
    controller: Option<KubernetesController>,
    _dir: tempfile::TempDir,
}

impl Replica {
    async fn start(client: &Client, name: &str) -> Replica {
        Replica::start_with(client, settings(name), |_| {}).await
    }

    async fn start_with(client: &Client, settings: KubernetesSettings, configure: impl FnOnce(&mut Config)) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        configure(&mut config);
        let name = settings.identity.clone();
        let controller = tokio::time::timeout(TIMEOUT, KubernetesController::start(config, settings, client.clone()))
            .await
            .unwrap_or_else(|_| panic!("{name} did not start within {TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("{name} did not start: {e:#}"));
        Replica {
            name,
            controller: Some(controller),
            _dir: dir,
        }
    }

    fn controller(&self) -> &KubernetesController {
        self.controller.as_ref().unwrap()
    }

    fn leads(&self) -> bool {
        *self.controller().is_leader().borrow()
    }

    fn manager(&self) -> String {
        format!("weft-controller/{}", self.name)
    }

    async fn channel(&self) -> Channel {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.controller().roots().concat()))
            .domain_name("weft-controller");
        Endpoint::from_shared(format!("https://{}", self.controller().listen_addr()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn stop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.shutdown().await.unwrap();
        }
    }
}

/// Waits until `f` holds, polling every 20 ms; panics naming `what` after `timeout`.
async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn lease(admin: &Client) -> Lease {
    Api::<Lease>::namespaced(admin.clone(), NS)
        .get(leader::LEASE)
        .await
        .unwrap()
}

fn holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone())
}

/// Records whether two leadership flags were ever true at once.
fn watch_overlap(mut a: watch::Receiver<bool>, mut b: watch::Receiver<bool>) -> Arc<AtomicBool> {
    let both = Arc::new(AtomicBool::new(false));
    let seen = both.clone();
    tokio::spawn(async move {
        let (mut a_open, mut b_open) = (true, true);
        while a_open || b_open {
            if *a.borrow_and_update() && *b.borrow_and_update() {
                seen.store(true, Ordering::SeqCst);
            }
            tokio::select! {
                r = a.changed(), if a_open => a_open = r.is_ok(),
                r = b.changed(), if b_open => b_open = r.is_ok(),
            }
        }
    });
    both
}

/// The field managers of the policy `shop/<name>`, once its `Accepted` condition has `status`.
async fn managers_once_accepted(admin: &Client, name: &str, status: &str) -> Vec<String> {
    let api: Api<crd::AuthorizationPolicy> = Api::namespaced(admin.clone(), "shop");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let policy = api.get(name).await.unwrap();
        let condition = weft_controller::k8s::status::accepted(policy.status.as_ref());
        if condition.is_some_and(|c| c.status == status) {
            return policy
                .metadata
                .managed_fields
                .unwrap_or_default()
                .into_iter()
                .filter_map(|m| m.manager)
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "policy {name}: no Accepted {status} within {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// === leader election ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_elect_one_leader_and_a_stopped_leader_hands_over_at_once() {
    let started = Instant::now();
    let Some(c) = cluster("leader").await else {
        return;
    };
    let (mut a, mut b) = tokio::join!(
        Replica::start(&c.controller, "replica-a"),
        Replica::start(&c.controller, "replica-b")
    );
    let overlap = watch_overlap(a.controller().is_leader(), b.controller().is_leader());
    until("exactly one leader", TIMEOUT, || a.leads() != b.leads()).await;
    // And it stays so over a few renewals.
    for _ in 0..30 {
        assert!(a.leads() != b.leads(), "a: {}, b: {}", a.leads(), b.leads());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (leader, follower) = if a.leads() { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let lease = lease(&c.admin).await;
    assert_eq!(holder(&lease).as_deref(), Some(leader.name.as_str()));
    let spec = lease.spec.unwrap();
    assert_eq!(spec.lease_duration_seconds, Some(15));
    assert_eq!(spec.lease_transitions, Some(0));

    // Status is written by the leader only.
    create(
        &c.admin,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    )
    .await;
    create(
        &c.admin,
        Some("shop"),
        json!({
            "apiVersion": "security.weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-other"},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]},
        }),
    )
    .await;
    let managers = managers_once_accepted(&c.admin, "deny-other", "True").await;
    assert!(managers.contains(&leader.manager()), "{managers:?}");
    assert!(!managers.contains(&follower.manager()), "{managers:?}");

    // The leader stops: it releases the lease and the follower takes over at its next attempt.
    let stopping = Instant::now();
    leader.stop().await;
    let stopped = stopping.elapsed();
    until("the follower leads", Duration::from_secs(15), || follower.leads()).await;
    let handover = stopping.elapsed();
    eprintln!("handover after a graceful stop: {handover:?} (the old leader's shutdown took {stopped:?})");
    let lease = self::lease(&c.admin).await;
    assert_eq!(holder(&lease).as_deref(), Some(follower.name.as_str()));
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(1));

    // The new leader writes status now.
    Api::<DynamicObject>::namespaced_with(
        c.admin.clone(),
        "shop",
        &ApiResource::erase::<crd::AuthorizationPolicy>(&()),
    )
    .patch(
        "deny-other",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rules": [{"from": []}]}})),
    )
    .await
    .unwrap();
    let managers = managers_once_accepted(&c.admin, "deny-other", "False").await;
    assert!(managers.contains(&follower.manager()), "{managers:?}");
    follower.stop().await;
    assert!(!overlap.load(Ordering::SeqCst), "two replicas led at once");
    assert_eq!(holder(&self::lease(&c.admin).await), None, "released");

    // A leader that dies without releasing: taken over once its lease expires, not before.
    let (_stop, stop_rx) = watch::channel(false);
    let (x_leads, x) = leader::elect(
        c.controller.clone(),
        NS,
        "crashing-x",
        leader::Timings::default(),
        stop_rx.clone(),
    );
    let x = tokio::spawn(x);
    until("x leads", TIMEOUT, || *x_leads.borrow()).await;
    let (y_leads, y) = leader::elect(
        c.controller.clone(),
        NS,
        "survivor-y",
        leader::Timings::default(),
        stop_rx,
    );
    let y = tokio::spawn(y);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!*y_leads.borrow(), "y must wait for x's lease");
    let crashed = Instant::now();
    x.abort();
    until("y leads", Duration::from_secs(25), || *y_leads.borrow()).await;
    let takeover = crashed.elapsed();
    eprintln!("takeover after the leader vanished: {takeover:?} (lease 15 s, retry 2 s)");
    assert!(
        takeover >= Duration::from_secs(10),
        "taken over before the lease expired: {takeover:?}"
    );
    assert!(takeover <= Duration::from_secs(18), "{takeover:?}");

    // A leader whose renewals fail (here: forbidden) stops leading at the renew deadline, before
    // its lease could expire for the others.
    let revoked = Instant::now();
    Api::<DynamicObject>::namespaced_with(
        c.admin.clone(),
        NS,
        &ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", "RoleBinding"),
            "rolebindings",
        ),
    )
    .delete("weft-controller", &DeleteParams::default())
    .await
    .unwrap();
    until("y steps down", Duration::from_secs(15), || !*y_leads.borrow()).await;
    let stepped_down = revoked.elapsed();
    eprintln!("step-down after renewals began to fail: {stepped_down:?} (renew deadline 10 s)");
    assert!(stepped_down >= Duration::from_secs(7), "{stepped_down:?}");
    assert!(stepped_down <= Duration::from_secs(11), "{stepped_down:?}");
    assert_eq!(holder(&self::lease(&c.admin).await).as_deref(), Some("survivor-y"));
    y.abort();
    eprintln!("leader test took {:?}", started.elapsed());
}

// === the CA Secret and the published roots ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_secret_is_created_once_and_every_replica_serves_from_it() {
    let started = Instant::now();
    let Some(c) = cluster("ca").await else {
        return;
    };
    let with_ip = |name: &str| KubernetesSettings {
        pod_ip: Some("10.1.2.3".parse().unwrap()),
        ..settings(name)
    };
    let (mut a, mut b) = tokio::join!(
        Replica::start_with(&c.controller, with_ip("replica-a"), |_| {}),
        Replica::start_with(&c.controller, settings("replica-b"), |_| {})
    );
    let roots = a.controller().roots().to_vec();
    assert_eq!(roots.len(), 1);
    assert_eq!(b.controller().roots(), roots, "one root for both replicas");
    let secrets: Api<Secret> = Api::namespaced(c.admin.clone(), NS);
    let secret = secrets.get("weft-ca").await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.clone().unwrap();
    assert_eq!(String::from_utf8(data["tls.crt"].0.clone()).unwrap(), roots[0]);
    assert!(
        String::from_utf8(data["tls.key"].0.clone())
            .unwrap()
            .contains("PRIVATE KEY")
    );
    let created = secret.metadata.resource_version.clone();

    // The leader publishes the roots for node agents.
    let config_maps: Api<ConfigMap> = Api::namespaced(c.admin.clone(), NS);
    let published = || async {
        config_maps
            .get_opt("weft-root-ca")
            .await
            .unwrap()
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("root.pem").cloned())
    };
    let deadline = Instant::now() + TIMEOUT;
    while published().await.as_deref() != Some(roots[0].as_str()) {
        assert!(Instant::now() < deadline, "ConfigMap weft-root-ca not published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Each replica serves a certificate of its own from that CA, for weft-controller and its pod IP.
    let sans = serving_sans(a.controller()).await;
    assert_eq!(sans, ["DNS:weft-controller", "IP:127.0.0.1", "IP:10.1.2.3"]);
    assert_eq!(
        serving_sans(b.controller()).await,
        ["DNS:weft-controller", "IP:127.0.0.1"]
    );

    // A stale ConfigMap is corrected by the next leader; a third replica reuses the Secret.
    a.stop().await;
    b.stop().await;
    let mut cm = config_maps.get("weft-root-ca").await.unwrap();
    cm.data.as_mut().unwrap().insert("root.pem".into(), "stale".into());
    cm.data.as_mut().unwrap().insert("other".into(), "kept".into());
    config_maps
        .replace("weft-root-ca", &PostParams::default(), &cm)
        .await
        .unwrap();
    let mut third = Replica::start(&c.controller, "replica-c").await;
    assert_eq!(third.controller().roots(), roots);
    assert_eq!(secrets.get("weft-ca").await.unwrap().metadata.resource_version, created);
    let deadline = Instant::now() + TIMEOUT;
    while published().await.as_deref() != Some(roots[0].as_str()) {
        assert!(Instant::now() < deadline, "the stale ConfigMap was not corrected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cm = config_maps.get("weft-root-ca").await.unwrap();
    assert_eq!(cm.data.unwrap()["other"], "kept");
    third.stop().await;

    // An operator's CA: no Secret is written, its root is what is published.
    let byo = "weft-byo";
    create(
        &c.admin,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": byo}}),
    )
    .await;
    grant_namespace(&c.admin, byo).await;
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = weft_controller::ca::generate_root_pem("cluster.local").unwrap();
    let write_private = |name: &str, text: &str| {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let path = files.path().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
        path
    };
    let ca = CaFiles {
        cert: write_private("ca.pem", &cert),
        key: write_private("ca.key", &key),
    };
    let mut operator = Replica::start_with(
        &c.controller,
        KubernetesSettings {
            namespace: Some(byo.into()),
            ..settings("replica-byo")
        },
        |config| config.ca = Some(ca),
    )
    .await;
    assert_eq!(operator.controller().roots(), std::slice::from_ref(&cert));
    let byo_maps: Api<ConfigMap> = Api::namespaced(c.admin.clone(), byo);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let root = byo_maps
            .get_opt("weft-root-ca")
            .await
            .unwrap()
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("root.pem").cloned());
        if root.as_deref() == Some(cert.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "the operator's root is not published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        Api::<Secret>::namespaced(c.admin.clone(), byo)
            .get_opt("weft-ca")
            .await
            .unwrap()
            .is_none(),
        "no Secret with an operator's CA"
    );
    operator.stop().await;
    eprintln!("CA test took {:?}", started.elapsed());
}

/// The subject alternative names of a replica's serving certificate, as a TLS client sees them.
async fn serving_sans(controller: &KubernetesController) -> Vec<String> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for pem in controller.roots() {
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(controller.listen_addr()).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("weft-controller").unwrap(), tcp)
        .await
        .unwrap();
    let der = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = cert.subject_alternative_name().unwrap().unwrap();
    sans.value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => format!("DNS:{d}"),
            x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                4 => format!("IP:{}", std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap())),
                _ => format!("IP:{ip:?}"),
            },
            other => format!("{other:?}"),
        })
        .collect()
}

// === node identity by TokenReview ===

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn sign_request(identity: &str, token: &str) -> Request<SignRequest> {
    let mut req = Request::new(SignRequest {
        csr_pem: csr(),
        identity: identity.into(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// An ES256 JWT of `claims` signed with `key_pem` (PKCS#8).
fn signed_jwt(key_pem: &str, claims: &Value) -> String {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let der = pem::parse(key_pem).unwrap();
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.contents(), &rng).unwrap();
    let input = format!(
        "{}.{}",
        b64(json!({"alg": "ES256"}).to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = key.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", b64(signature.as_ref()))
}

/// The claims of a weft-node token bound to `pod`, expiring at `exp`.
fn node_claims(pod: &Pod, exp: u64) -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": "system:serviceaccount:weft-system:weft-node",
        "aud": ["weft-controller"],
        "iat": now - 700, "nbf": now - 700, "exp": exp,
        "kubernetes.io": {
            "namespace": NS,
            "pod": {"name": pod.metadata.name, "uid": pod.metadata.uid},
            "serviceaccount": {"name": "weft-node", "uid": "00000000-0000-0000-0000-000000000000"},
        },
    })
}

/// TokenReviews the API server has served so far (its `apiserver_request_total`).
async fn token_reviews(admin: &Client) -> u64 {
    let metrics = admin
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains("resource=\"tokenreviews\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_agents_are_known_by_their_pod_bound_tokens() {
    let started = Instant::now();
    let Some(c) = cluster("tokens").await else {
        return;
    };
    let admin = &c.admin;
    service_account(admin, NS, "weft-node").await;
    service_account(admin, NS, "other-agent").await;
    let agent_a = running_pod(admin, NS, "agent-a", "weft-node", "node-a", None).await;
    let other_a = running_pod(admin, NS, "other-a", "other-agent", "node-a", None).await;
    create(
        admin,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    )
    .await;
    running_pod(admin, "shop", "web", "api", "node-a", Some("10.244.1.5")).await;
    running_pod(admin, "shop", "db", "db", "node-b", Some("10.244.2.5")).await;

    let replica = Replica::start(&c.controller, "replica-a").await;
    let mut states = replica.controller().states();
    let has_pods = |s: &State| s.pods().filter(|p| p.namespace == "shop").count() == 2;
    tokio::time::timeout(TIMEOUT, states.wait_for(|s| has_pods(s)))
        .await
        .expect("no state with both workloads")
        .unwrap();
    let mut ca = CaClient::new(replica.channel().await);
    let api_identity = "spiffe://cluster.local/ns/shop/sa/api";
    let db_identity = "spiffe://cluster.local/ns/shop/sa/db";

    // The agent of node A gets the identities of node A's pods, and only those.
    let token = token_request(admin, "weft-node", &["weft-controller"], Some(&agent_a)).await;
    let t = Instant::now();
    let signed = ca.sign(sign_request(api_identity, &token)).await.unwrap().into_inner();
    let first = t.elapsed();
    assert_eq!(signed.roots_pem, replica.controller().roots());
    let t = Instant::now();
    ca.sign(sign_request(api_identity, &token)).await.unwrap();
    let cached = t.elapsed();
    let denied = ca.sign(sign_request(db_identity, &token)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("node node-a"), "{}", denied.message());
    // More fresh tokens, to measure a review (TokenReview + pod read + signing) against a cached call.
    let mut reviews = Vec::new();
    for _ in 0..5 {
        let token = token_request(admin, "weft-node", &["weft-controller"], Some(&agent_a)).await;
        let t = Instant::now();
        ca.sign(sign_request(api_identity, &token)).await.unwrap();
        reviews.push(t.elapsed());
    }
    reviews.sort();
    eprintln!(
        "Sign with a new token (TokenReview + pod read): first {first:?}, median of 5 more {:?}; with a cached review {cached:?}",
        reviews[2]
    );

    // The config stream knows the caller as node A too.
    let (tx, rx) = mpsc::channel(1);
    let subscribe = |node: &str| StreamRequest {
        kind: Some(stream_request::Kind::Subscribe(Subscribe {
            node: node.into(),
            types: vec![],
            held: None,
            accepts_queued: false,
        })),
    };
    tx.send(subscribe("node-a")).await.unwrap();
    let mut req = Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut pushes = ConfigClient::new(replica.channel().await)
        .stream(req)
        .await
        .unwrap()
        .into_inner();
    let push = tokio::time::timeout(TIMEOUT, pushes.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(push.full && !push.resources.is_empty());
    let (tx_b, rx_b) = mpsc::channel(1);
    tx_b.send(subscribe("node-b")).await.unwrap();
    let mut req = Request::new(ReceiverStream::new(rx_b));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut refused = ConfigClient::new(replica.channel().await)
        .stream(req)
        .await
        .unwrap()
        .into_inner();
    let status = tokio::time::timeout(TIMEOUT, refused.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    drop(tx);

    // Tokens that are refused, each naming why.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let forger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pending: Pod = serde_json::from_value(json!({
        "metadata": {"name": "agent-pending"},
        "spec": {"nodeName": "node-a", "serviceAccountName": "weft-node", "hostNetwork": true, "containers": [{"name": "c", "image": "x"}]},
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let pending = pods.create(&PostParams::default(), &pending).await.unwrap();
    let gone = running_pod(admin, NS, "agent-gone", "weft-node", "node-a", None).await;
    let gone_token = token_request(admin, "weft-node", &["weft-controller"], Some(&gone)).await;
    pods.delete(
        "agent-gone",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .unwrap();
    let cases = [
        ("bogus", "not-a-token".to_owned(), "not a service-account token"),
        (
            "forged",
            signed_jwt(&forger.serialize_pem(), &node_claims(&agent_a, now + 600)),
            "the API server does not authenticate the token",
        ),
        (
            "expired",
            signed_jwt(&c.server.service_account_key(), &node_claims(&agent_a, now - 60)),
            "the token expired",
        ),
        (
            "wrong audience",
            token_request(
                admin,
                "weft-node",
                &["https://kubernetes.default.svc.cluster.local"],
                Some(&agent_a),
            )
            .await,
            "not \"weft-controller\"",
        ),
        (
            "another service account",
            token_request(admin, "other-agent", &["weft-controller"], Some(&other_a)).await,
            "not \"system:serviceaccount:weft-system:weft-node\"'s",
        ),
        (
            "not pod-bound",
            token_request(admin, "weft-node", &["weft-controller"], None).await,
            "not bound to a pod",
        ),
        (
            "pod not running",
            token_request(admin, "weft-node", &["weft-controller"], Some(&pending)).await,
            "is not running",
        ),
        // The API server itself refuses a token whose pod is gone (or was replaced).
        ("pod gone", gone_token, "Token has been invalidated"),
    ];
    for (case, token, why) in cases {
        let refused = ca.sign(sign_request(api_identity, &token)).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{case}: {refused:?}");
        assert!(refused.message().contains(why), "{case}: {}", refused.message());
    }

    // A flood of one bogus token costs one review; of many, at most 16 at a time.
    let forged = signed_jwt(&forger.serialize_pem(), &node_claims(&agent_a, now + 900));
    let before = token_reviews(admin).await;
    let t = Instant::now();
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let mut ca = ca.clone();
            let forged = forged.clone();
            tokio::spawn(async move { ca.sign(sign_request(api_identity, &forged)).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap_err().code(), Code::Unauthenticated);
    }
    let same = t.elapsed();
    let after_same = token_reviews(admin).await;
    assert_eq!(after_same - before, 1, "64 calls with one token: one TokenReview");
    let t = Instant::now();
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let mut ca = ca.clone();
            let forged = signed_jwt(&forger.serialize_pem(), &node_claims(&agent_a, now + 1000 + i));
            tokio::spawn(async move { ca.sign(sign_request(api_identity, &forged)).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap_err().code(), Code::Unauthenticated);
    }
    let distinct = t.elapsed();
    assert_eq!(token_reviews(admin).await - after_same, 64);
    eprintln!("64 concurrent calls with one forged token: {same:?}; with 64 forged tokens: {distinct:?}");
    // The agent is still served meanwhile and after.
    ca.sign(sign_request(api_identity, &token)).await.unwrap();
    let mut replica = replica;
    replica.stop().await;
    eprintln!("token test took {:?}", started.elapsed());
}
