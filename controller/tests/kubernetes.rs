//! The controller's Kubernetes side against a real API server (Kubernetes 1.20 and etcd, started by
//! [`apiserver::ApiServer`]): Weft's CRDs as `weft-controller crds` prints them, the source's model
//! of a cluster, and the `Accepted` condition of custom resources. The test plays kubelet: it
//! schedules pods itself (`spec.nodeName`) and sets their addresses through the status subresource.
//! Without the Kubernetes binaries these tests skip with a note, or fail with `CI=true`.

#[path = "kubernetes/apiserver.rs"]
mod apiserver;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use apiserver::ApiServer;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
    runtime::wait::await_condition,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use weft_controller::{
    k8s::{self, StatusWriter, crd},
    store::{Kind, Object, ObjectRef, State},
};

/// How long any one condition may take to hold.
const TIMEOUT: Duration = Duration::from_secs(30);

async fn install_crds(client: &Client, yaml: &str) {
    ApiServer::install_crds(client, yaml).await
}

fn dynamic(client: &Client, namespace: &str, resource: ApiResource) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &resource)
}

fn policies(client: &Client, namespace: &str) -> Api<DynamicObject> {
    dynamic(client, namespace, ApiResource::erase::<crd::AuthorizationPolicy>(&()))
}

fn policy(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "security.weft.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

async fn create_namespace(client: &Client, name: &str, annotations: Value) {
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

/// Creates an object that must be refused by the API server's schema, and returns the refusal.
async fn refused(api: &Api<DynamicObject>, object: DynamicObject) -> kube::core::Status {
    match api.create(&PostParams::default(), &object).await {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected the API server to refuse {object:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_from_the_binary_are_established_and_the_api_server_refuses_wrong_types() {
    let started = Instant::now();
    let Some(server) = ApiServer::start("crds").await else {
        return;
    };
    let client = server.client().await;

    let out = Command::new(env!("CARGO_BIN_EXE_weft-controller"))
        .arg("crds")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    install_crds(&client, &String::from_utf8(out.stdout).unwrap()).await;
    create_namespace(&client, "shop", json!({})).await;
    let api = policies(&client, "shop");

    // Wrongly typed fields: 422 from the API server itself.
    for (name, spec, field) in [
        ("action-number", json!({"action": 5}), "spec.action"),
        ("action-unknown", json!({"action": "PERMIT"}), "spec.action"),
        ("rules-string", json!({"rules": "all"}), "spec.rules"),
        (
            "label-number",
            json!({"selector": {"matchLabels": {"app": 5}}}),
            "spec.selector.matchLabels.app",
        ),
        (
            "ports-numbers",
            json!({"rules": [{"to": [{"operation": {"ports": [8080]}}]}]}),
            // 1.20 names the path without indices.
            "spec.rules.to.operation.ports",
        ),
    ] {
        let status = refused(&api, policy(name, spec)).await;
        assert_eq!(status.code, 422, "{name}: {status:?}");
        assert!(status.message.contains(field), "{name}: {}", status.message);
    }
    let pas = dynamic(&client, "shop", ApiResource::erase::<crd::PeerAuthentication>(&()));
    let mut pa = policy("strict", json!({"mtls": {"mode": "strict"}}));
    pa.types = Some(kube::api::TypeMeta {
        api_version: "security.weft.dev/v1alpha1".into(),
        kind: "PeerAuthentication".into(),
    });
    assert_eq!(refused(&pas, pa).await.code, 422);

    // What only Weft refuses passes the schema, unknown fields and all (kept for Weft to name).
    let created = api
        .create(
            &PostParams::default(),
            &policy(
                "misspelt",
                json!({"rules": [{"from": [{"source": {"principal": ["x"]}}]}, {"from": []}]}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        created.data["spec"]["rules"][0]["from"][0]["source"]["principal"],
        json!(["x"]),
        "unknown fields are kept, not pruned"
    );
    // No spec at all, as in the local store.
    let mut bare = policy("bare", Value::Null);
    bare.data = json!({});
    api.create(&PostParams::default(), &bare).await.unwrap();

    the_binary_starts_on_the_cluster(&server, &client).await;
    eprintln!("crds test took {:?}", started.elapsed());
}

/// `weft-controller --source kubernetes --namespace default` with `KUBECONFIG` and the downward
/// API's environment, as the manifests run it (no state directory): starts once the cluster is
/// listed, leads (its pod name holds the Lease), writes nothing to disk and serves no admin socket,
/// and on SIGTERM releases the Lease and stops cleanly.
async fn the_binary_starts_on_the_cluster(server: &ApiServer, client: &Client) {
    use k8s_openapi::api::coordination::v1::Lease;
    let cwd = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-controller"))
        .args([
            "--source",
            "kubernetes",
            "--namespace",
            "default",
            "--listen",
            "127.0.0.1:0",
        ])
        .current_dir(cwd.path())
        .env_remove("WEFT_STATE_DIR")
        .env("POD_NAME", "weft-controller-0")
        .env("POD_IP", "127.0.0.1")
        .env("KUBECONFIG", &server.kubeconfig)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let mut child = KillOnDrop(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    tokio::task::block_in_place(|| {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("controller started") && line.contains("kubernetes") => break,
                Ok(line) => seen.push(line),
                Err(e) => panic!(
                    "the controller did not start on the cluster ({e}); its log:\n{}",
                    seen.join("\n")
                ),
            }
        }
    });
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let holder = |lease: Lease| lease.spec.and_then(|s| s.holder_identity);
    let deadline = Instant::now() + TIMEOUT;
    while holder(leases.get("weft-controller").await.unwrap()).as_deref() != Some("weft-controller-0") {
        assert!(Instant::now() < deadline, "the binary does not lead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        std::fs::read_dir(cwd.path()).unwrap().count(),
        0,
        "nothing on disk (and no admin socket) in kubernetes mode without --state-dir"
    );
    // SAFETY: a plain kill(2) of our own child's PID.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the controller did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    assert_eq!(
        holder(leases.get("weft-controller").await.unwrap()),
        None,
        "the Lease is released on SIGTERM"
    );
}

// === the source ===

/// Waits until the published state satisfies `f`.
async fn state_where(states: &mut watch::Receiver<Arc<State>>, what: &str, f: impl Fn(&State) -> bool) -> Arc<State> {
    let found = match tokio::time::timeout(TIMEOUT, states.wait_for(|s| f(s))).await {
        Ok(Ok(state)) => Some(state.clone()),
        Ok(Err(_)) => panic!("the source stopped while waiting for {what}"),
        Err(_) => None,
    };
    found.unwrap_or_else(|| {
        panic!(
            "no state with {what} within {TIMEOUT:?}; the last: {:#?}",
            states.borrow()
        )
    })
}

/// Waits until the policy's `Accepted` condition satisfies `f`; returns it.
async fn accepted_where(client: &Client, name: &str, f: impl Fn(&crd::Condition) -> bool + Send) -> crd::Condition {
    let api: Api<crd::AuthorizationPolicy> = Api::namespaced(client.clone(), "shop");
    let holds = |p: Option<&crd::AuthorizationPolicy>| {
        p.and_then(|p| k8s::status::accepted(p.status.as_ref()))
            .is_some_and(|c| f(&c))
    };
    let found = tokio::time::timeout(TIMEOUT, await_condition(api.clone(), name, holds))
        .await
        .unwrap_or_else(|_| panic!("policy {name}: no such Accepted condition within {TIMEOUT:?}"))
        .unwrap()
        .unwrap();
    k8s::status::accepted(found.status.as_ref()).unwrap()
}

fn policy_spec(state: &State, name: &str) -> Option<weft_model::policy::Spec> {
    let r = ObjectRef {
        kind: Kind::AuthorizationPolicy,
        namespace: "shop".into(),
        name: name.into(),
    };
    match state.get(&r) {
        Some(Object::AuthorizationPolicy(p)) => Some(p.spec.clone()),
        _ => None,
    }
}

/// Aborts a spawned task when dropped (the test's end, or a panic).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_publishes_the_cluster_and_enforces_only_valid_policies() {
    let started = Instant::now();
    let Some(server) = ApiServer::start("source").await else {
        return;
    };
    let client = server.client().await;
    install_crds(&client, &crd::crds_yaml().unwrap()).await;
    let ready = started.elapsed();

    // The cluster before the controller starts: a namespace, a service account, a service, a pod
    // that is scheduled but has no address yet, and a valid policy.
    create_namespace(&client, "shop", json!({"weft.dev/dataplane-mode": "ambient"})).await;
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "api"}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), "shop")
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let svc = Api::<Service>::namespaced(client.clone(), "shop")
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let vip = svc.spec.unwrap().cluster_ip.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"nodeName": "node1", "serviceAccountName": "api", "containers": [{"name": "c", "image": "x"}]},
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let api = policies(&client, "shop");
    let deny_other = json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]});
    api.create(&PostParams::default(), &policy("deny-other", deny_other.clone()))
        .await
        .unwrap();

    let (outputs, source) = k8s::source(client.clone());
    let _source = AbortOnDrop(tokio::spawn(source));
    let (_leader, is_leader) = watch::channel(true);
    let _writer = AbortOnDrop(tokio::spawn(StatusWriter::run(
        client.clone(),
        outputs.conditions,
        is_leader,
        "weft-controller/test",
    )));
    let mut states = tokio::time::timeout(TIMEOUT, outputs.states)
        .await
        .expect("no first state")
        .expect("the source stopped");
    let first = states.borrow_and_update().clone();
    eprintln!(
        "first state {:?} after the API server was ready",
        started.elapsed() - ready
    );
    let kube_system = Api::<Namespace>::all(client.clone()).get("kube-system").await.unwrap();
    assert_eq!(first.id, kube_system.metadata.uid.unwrap(), "the cluster's identity");
    assert!(first.revision > 0);
    assert!(
        first.namespaces().any(|n| n.name == "shop"),
        "the first state is the whole cluster: {first:#?}"
    );
    assert!(policy_spec(&first, "deny-other").is_some(), "{first:#?}");
    // Scheduled but without an address yet (its sandbox is being made): the CNI plugin asks the
    // node's agent about it now, so the agent must know it.
    assert!(
        first.pods().any(|p| p.name == "web" && p.ips.is_empty()),
        "a scheduled pod is a workload before it has an address: {:?}",
        first.pods().map(|p| &p.name).collect::<Vec<_>>()
    );

    // The test plays kubelet: the pod gets its address through the status subresource.
    pods.patch_status(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]}})),
    )
    .await
    .unwrap();
    let state = state_where(&mut states, "pod shop/web with its address", |s| {
        s.pods().any(|p| p.name == "web" && !p.ips.is_empty())
    })
    .await;
    let web = state.pods().find(|p| p.name == "web").unwrap();
    assert_eq!(web.uid, pod.metadata.uid.unwrap());
    assert_eq!(web.node, "node1");
    assert_eq!(web.service_account, "api");
    assert_eq!(web.ips, vec!["10.244.1.5".parse::<std::net::IpAddr>().unwrap()]);
    let shop = state.namespaces().find(|n| n.name == "shop").unwrap();
    assert_eq!(shop.meta.annotations["weft.dev/dataplane-mode"], "ambient");
    let service = state.services().find(|s| s.name == "web").unwrap();
    assert_eq!(service.cluster_ips, vec![vip.parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!((service.ports[0].port, service.ports[0].target_port), (80, 8080));
    assert!(service.selects(web));
    assert!(state.revision >= first.revision);
    let valid = accepted_where(&client, "deny-other", |c| c.status == "True").await;
    assert_eq!((valid.reason.as_str(), valid.observed_generation), ("Valid", Some(1)));

    // An invalid policy (the schema lets it through; Weft does not) is refused naming the field,
    // and never enters the model.
    api.create(
        &PostParams::default(),
        &policy("broken", json!({"rules": [{"from": []}]})),
    )
    .await
    .unwrap();
    let refusal = accepted_where(&client, "broken", |c| c.status == "False").await;
    assert_eq!(refusal.reason, "Invalid");
    assert!(
        refusal.message.starts_with("spec.rules[0].from: must not be empty"),
        "{}",
        refusal.message
    );
    assert!(refusal.last_transition_time.is_some());
    assert!(policy_spec(&states.borrow(), "broken").is_none());

    // A valid policy made invalid: refused, and its last valid version stays enforced.
    let enforced = policy_spec(&states.borrow(), "deny-other").unwrap();
    api.patch(
        "deny-other",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}})),
    )
    .await
    .unwrap();
    let refusal = accepted_where(&client, "deny-other", |c| c.status == "False").await;
    assert_eq!(refusal.observed_generation, Some(2));
    assert!(
        refusal.message.starts_with("spec.rules[0].to[0].operation.methods:"),
        "{}",
        refusal.message
    );
    assert_eq!(policy_spec(&states.borrow(), "deny-other"), Some(enforced.clone()));

    // Fixed again: the new version is enforced.
    api.patch(
        "deny-other",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rules": [{"from": [{"source": {"namespaces": ["elsewhere"]}}]}]}})),
    )
    .await
    .unwrap();
    let state = state_where(&mut states, "deny-other's third version", |s| {
        policy_spec(s, "deny-other").is_some_and(|spec| spec != enforced)
    })
    .await;
    assert_eq!(
        policy_spec(&state, "deny-other").unwrap().rules[0].from[0]
            .source
            .namespaces,
        vec!["elsewhere".to_owned()]
    );
    let valid = accepted_where(&client, "deny-other", |c| c.status == "True").await;
    assert_eq!(valid.observed_generation, Some(3));

    // The pod finishes: it is no workload any more.
    pods.patch_status(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
    )
    .await
    .unwrap();
    state_where(&mut states, "no pod shop/web", |s| s.pods().all(|p| p.name != "web")).await;

    eprintln!(
        "source test took {:?} (API server ready after {ready:?})",
        started.elapsed()
    );
}
