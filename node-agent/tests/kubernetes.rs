//! The agent's Kubernetes side against a real API server (Kubernetes 1.20 and etcd, started by
//! [`apiserver::ApiServer`]), as the agent's service account with only the RBAC the agent needs
//! ([`apiserver::AGENT_RBAC`]): the redirection annotation through `pods/status`, the
//! uninstall-or-restart decision on the agent's DaemonSet, watches that resume and list again when
//! the API server can no longer resume them, and the config stream failing over between the
//! controller replicas of a Service's Endpoints. Without the Kubernetes binaries these tests skip
//! with a note, or fail with `CI=true`.

#[path = "kubernetes/apiserver.rs"]
mod apiserver;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use apiserver::ApiServer;
use http::StatusCode;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use weft_api::v1::{
    Push, StreamRequest,
    config_server::{Config, ConfigServer},
    stream_request::Kind,
};
use weft_node::{
    config::ObjectName,
    controller::{Controller, Deadlines},
    discovery,
    kube::{self, Endpoints, Event, Object},
    redirection::{self, ANNOTATION, Wanted},
    state::State,
    uninstall::{self, AtStart, Decision},
};

/// How long any one condition may take to hold.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `f` every 100 ms until it gives a value; fails naming `what` after [`TIMEOUT`].
async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(started.elapsed() < TIMEOUT, "{what}: not within {TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const POD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {weft.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop}
spec:
  nodeName: node1
  containers: [{name: app, image: weft.dev/app:1}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_status_carries_the_redirection_annotation_with_only_the_agents_permissions() {
    let Some(server) = ApiServer::start("status", &[]) else {
        return;
    };
    server.apply(POD);
    let agent = server.agent(kube::Deadlines::default());
    let admin = server.admin();
    let path = "/api/v1/namespaces/shop/pods/cart";
    let uid = admin.get::<Object>(path).await.expect("the pod").metadata.uid;
    let annotation = async || {
        let pod: Object = admin.get(path).await.expect("the pod");
        pod.metadata.annotations.get(ANNOTATION).cloned()
    };
    let wanted = |value: Option<&str>, observed: Option<&str>| Wanted {
        namespace: "shop".into(),
        name: "cart".into(),
        value: value.map(str::to_owned),
        observed: observed.map(str::to_owned),
    };

    // Kubernetes 1.20's pods/status takes a change of the pod's annotations.
    redirection::write(&agent, &uid, &wanted(Some("active"), None))
        .await
        .expect("pods/status takes annotations");
    assert_eq!(annotation().await.as_deref(), Some("active"));

    // A patch naming another pod's uid (the pod was re-created under the same name) is refused.
    let err = redirection::write(
        &agent,
        "00000000-0000-4000-8000-000000000000",
        &wanted(Some("inactive: x"), None),
    )
    .await
    .expect_err("another pod's uid");
    assert!(
        matches!(
            err.status(),
            Some(StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY)
        ),
        "{err}"
    );
    assert_eq!(annotation().await.as_deref(), Some("active"), "unchanged");

    // The pod itself is not the agent's to change: only its status.
    let err = agent
        .merge_patch::<Object>(path, &json!({"metadata": {"annotations": {ANNOTATION: "active"}}}))
        .await
        .expect_err("pods are not the agent's to patch");
    assert_eq!(err.status(), Some(StatusCode::FORBIDDEN), "{err}");

    // The writer: the planned value, then removal once the pod is opted out.
    let inactive = "inactive: its network namespace is unknown to the node agent (no CNI report for this pod)";
    let (plans, rx) = watch::channel(BTreeMap::from([(uid.clone(), wanted(Some(inactive), Some("active")))]));
    let writer = tokio::spawn(redirection::run(agent.clone(), rx));
    eventually("the writer writes the planned value", async || {
        (annotation().await.as_deref() == Some(inactive)).then_some(())
    })
    .await;
    plans.send_replace(BTreeMap::from([(uid.clone(), wanted(None, Some(inactive)))]));
    eventually("the writer removes the annotation", async || {
        annotation().await.is_none().then_some(())
    })
    .await;
    writer.abort();
}

const DAEMONSET: &str = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: weft-node, namespace: weft-system}
spec:
  selector: {matchLabels: {app: weft-node}}
  template:
    metadata: {labels: {app: weft-node}}
    spec: {containers: [{name: agent, image: weft.dev/weft-node:0.1.0}]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_uninstalls_only_when_the_agents_daemonset_is_being_deleted_gone_or_replaced() {
    let Some(server) = ApiServer::start("daemonset", &[]) else {
        return;
    };
    server.apply(DAEMONSET);
    let agent = server.agent(kube::Deadlines::default());
    let name: ObjectName = "weft-system/weft-node".parse().unwrap();
    let mut seen = uninstall::at_start(agent.clone(), name.clone());
    let at_start = seen.wait_for(|s| *s != AtStart::Unknown).await.unwrap().clone();
    assert!(matches!(at_start, AtStart::Found { .. }), "{at_start:?}");
    let decide = async |at_start: &AtStart| uninstall::check(&agent, &name, at_start).await;

    let restart = decide(&at_start).await;
    assert!(
        matches!(&restart, Decision::Restart(why) if why.contains("exists")),
        "{restart:?}"
    );

    // Deleted in the foreground: the DaemonSet stays, marked, until its pods are gone (here, for
    // good: no garbage collector runs).
    server.kubectl(
        &[
            "delete",
            "daemonset",
            "weft-node",
            "-n",
            "weft-system",
            "--cascade=foreground",
            "--wait=false",
        ],
        None,
    );
    let deleting = decide(&at_start).await;
    assert!(
        matches!(&deleting, Decision::Uninstall(why) if why.contains("being deleted")),
        "{deleting:?}"
    );

    // Gone.
    server.kubectl(
        &[
            "patch",
            "daemonset",
            "weft-node",
            "-n",
            "weft-system",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
        None,
    );
    let gone = eventually("the DaemonSet is gone", async || match decide(&at_start).await {
        Decision::Uninstall(why) if why.contains("is gone") => Some(why),
        _ => None,
    })
    .await;
    assert!(gone.contains("404 Not Found"), "{gone}");

    // Re-created under the same name: not this agent's DaemonSet any more.
    server.apply(DAEMONSET);
    let replaced = decide(&at_start).await;
    assert!(
        matches!(&replaced, Decision::Uninstall(why) if why.contains("was replaced")),
        "{replaced:?}"
    );
    // A new agent, which found the new one at start, restarts.
    let mut seen = uninstall::at_start(agent.clone(), name.clone());
    let now = seen.wait_for(|s| *s != AtStart::Unknown).await.unwrap().clone();
    assert!(matches!(decide(&now).await, Decision::Restart(_)));
}

fn endpoints_yaml(subsets: &[(&str, u16)]) -> String {
    let subsets: Vec<String> = subsets
        .iter()
        .map(|(ip, port)| format!("- addresses: [{{ip: \"{ip}\"}}]\n  ports: [{{name: grpc, port: {port}}}, {{name: metrics, port: 15014}}]\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: weft-controller, namespace: weft-system}}\nsubsets:\n{}",
        subsets.concat()
    )
}

const ENDPOINTS: &str = "/api/v1/namespaces/weft-system/endpoints";

fn ips(e: &Endpoints) -> Vec<String> {
    e.subsets
        .iter()
        .flat_map(|s| s.addresses.iter().map(|a| a.ip.clone()))
        .collect()
}

/// The next event of `w`, within [`TIMEOUT`].
async fn next(w: &mut kube::Watcher<Endpoints>) -> Event<Endpoints> {
    tokio::time::timeout(TIMEOUT, w.next())
        .await
        .expect("an event in time")
        .expect("no error")
}

fn controller_selector() -> String {
    format!("fieldSelector={}", kube::query_value("metadata.name=weft-controller"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_where_each_stream_ended() {
    let Some(server) = ApiServer::start("watch", &[]) else {
        return;
    };
    server.apply(&endpoints_yaml(&[("10.244.1.5", 15012)]));
    // The API server ends each stream after 1 s.
    let agent = server.agent(kube::Deadlines {
        watch: Duration::from_secs(1),
        watch_slack: Duration::from_secs(2),
        ..kube::Deadlines::default()
    });
    let mut watcher = agent.watch::<Endpoints>(ENDPOINTS, &controller_selector());
    let Event::Restarted(items) = next(&mut watcher).await else {
        panic!("a list first")
    };
    assert_eq!(items.iter().map(ips).collect::<Vec<_>>(), [["10.244.1.5"]]);

    // Nothing for 5 s: streams end and are resumed, without a new list.
    let quiet = tokio::time::timeout(Duration::from_secs(5), watcher.next()).await;
    assert!(quiet.is_err(), "no event while nothing changes: {quiet:?}");
    let patch = json!({"subsets": [{"addresses": [{"ip": "10.244.2.7"}], "ports": [{"name": "grpc", "port": 15012}]}]});
    server
        .admin()
        .merge_patch::<Endpoints>(&format!("{ENDPOINTS}/weft-controller"), &patch)
        .await
        .expect("the administrator patches");
    let event = next(&mut watcher).await;
    assert!(
        matches!(&event, Event::Applied(e) if ips(e) == ["10.244.2.7"]),
        "the change, on the resumed watch: {event:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_version_the_api_server_no_longer_has_lists_again() {
    // Watches served from etcd, whose history the API server compacts every second: a version soon
    // becomes too old, as one does in a long-running cluster after a long disconnection.
    let Some(server) = ApiServer::start("relist", &["--watch-cache=false", "--etcd-compaction-interval=1s"]) else {
        return;
    };
    server.apply(&endpoints_yaml(&[("10.244.1.5", 15012)]));
    let agent = server.agent(kube::Deadlines::default());
    // Once version 1 is compacted away the API server answers 410 Gone, and the watcher lists
    // instead (before that, the watch replays the history: the object's creation).
    let items = eventually("a list after 410 Gone", async || {
        let mut watcher = agent
            .watch::<Endpoints>(ENDPOINTS, &controller_selector())
            .from_version("1");
        match next(&mut watcher).await {
            Event::Restarted(items) => Some(items),
            _ => None,
        }
    })
    .await;
    assert_eq!(items.iter().map(ips).collect::<Vec<_>>(), [["10.244.1.5"]]);
}

/// A controller replica that serves one full push on each config stream and counts streams and ACKs.
struct FakeController {
    addr: SocketAddr,
    streams: Arc<AtomicUsize>,
    acks: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
struct FakeConfig {
    streams: Arc<AtomicUsize>,
    acks: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Config for FakeConfig {
    type StreamStream = ReceiverStream<Result<Push, tonic::Status>>;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<StreamRequest>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        self.streams.fetch_add(1, Ordering::SeqCst);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let acks = self.acks.clone();
        tokio::spawn(async move {
            let _subscribe = inbound.message().await;
            let push = Push {
                nonce: "n1".into(),
                full: true,
                revision: 5,
                store_id: "store-1".into(),
                ..Push::default()
            };
            let _ = tx.send(Ok(push)).await;
            while let Ok(Some(m)) = inbound.message().await {
                if let Some(Kind::Ack(ack)) = m.kind
                    && ack.error.is_empty()
                {
                    acks.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

impl FakeController {
    /// Serves on `ip` (a free port) with `cert`/`key` (PEM), on a thread and runtime of its own.
    fn start(ip: IpAddr, cert: &str, key: &str) -> FakeController {
        let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let config = FakeConfig {
            streams: Arc::default(),
            acks: Arc::default(),
        };
        let (streams, acks) = (config.streams.clone(), config.acks.clone());
        let identity = tonic::transport::Identity::from_pem(cert, key);
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let serve = tonic::transport::Server::builder()
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                    .unwrap()
                    .add_service(ConfigServer::new(config))
                    .serve_with_incoming(TcpListenerStream::new(listener));
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime ends every connection: the replica is dead.
        });
        FakeController {
            addr,
            streams,
            acks,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn acks(&self) -> usize {
        self.acks.load(Ordering::SeqCst)
    }
}

impl Drop for FakeController {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An address of this host that is not loopback (the API server refuses loopback endpoints).
fn host_address() -> Option<IpAddr> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let word = text.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
    word.split('/').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_stream_fails_over_to_another_ready_controller_replica() {
    let Some(ip) = host_address() else {
        eprintln!("note: skipped, this host has no non-loopback IPv4 address for the fake controllers");
        return;
    };
    let Some(server) = ApiServer::start("failover", &[]) else {
        return;
    };
    // tonic's server takes the process's provider, and both are compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::env::temp_dir().join(format!("weft-node-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let issued = rcgen::generate_simple_self_signed(vec!["weft-controller".to_owned()]).unwrap();
    let (cert, key) = (issued.cert.pem(), issued.signing_key.serialize_pem());
    std::fs::write(dir.join("root.pem"), &cert).unwrap();
    std::fs::write(dir.join("node-token"), "node1-token").unwrap();
    let mut replicas = [
        FakeController::start(ip, &cert, &key),
        FakeController::start(ip, &cert, &key),
    ];
    let subsets: Vec<(String, u16)> = replicas.iter().map(|r| (ip.to_string(), r.addr.port())).collect();
    let yaml = |s: &[(String, u16)]| {
        let refs: Vec<(&str, u16)> = s.iter().map(|(ip, p)| (ip.as_str(), *p)).collect();
        endpoints_yaml(&refs)
    };
    server.apply(&yaml(&subsets));

    let agent = server.agent(kube::Deadlines::default());
    let controller = Controller::from_endpoints(
        agent,
        "weft-system/weft-controller".parse().unwrap(),
        &dir.join("root.pem"),
        "weft-controller",
        &dir.join("node-token"),
        Deadlines::default(),
    )
    .unwrap();
    let (tx, mut states) = watch::channel(Arc::new(State::default()));
    let discovery = tokio::spawn(discovery::run(controller, "node1".into(), tx));
    tokio::time::timeout(TIMEOUT, states.wait_for(|s| s.synced))
        .await
        .expect("a first push in time")
        .unwrap();
    let first = eventually("one replica has the ACK", async || {
        replicas.iter().position(|r| r.acks() == 1)
    })
    .await;
    let other = 1 - first;
    assert_eq!(
        replicas[other].streams.load(Ordering::SeqCst),
        0,
        "one stream, to one replica"
    );

    // The replica dies, and Kubernetes takes it out of the Service's endpoints.
    let killed = Instant::now();
    replicas[first].kill();
    server.apply(&yaml(&subsets[other..=other]));
    eventually("the config stream moves to the other replica", async || {
        (replicas[other].acks() >= 1).then_some(())
    })
    .await;
    eprintln!(
        "config stream on the other replica {:?} after the kill",
        killed.elapsed()
    );
    discovery.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
