//! The controller's services in process: TLS on 127.0.0.1:0, a temp state dir, clients that trust
//! the published root.pem and authenticate as nodes.

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
    time::Duration,
};

use rustls::pki_types::pem::PemObject as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Request, Streaming,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use weft_api::v1::{
    self, Ack, Held, Push, SignRequest, StreamRequest, Subscribe, ca_client::CaClient, config_client::ConfigClient,
    stream_request,
};
use weft_controller::app::{Config, Controller};
use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

const WAIT: Duration = Duration::from_secs(10);

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop, labels: {app: cart}}
spec: {nodeName: node1, serviceAccountName: cart}
status: {podIP: 10.0.1.2}
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec: {rules: [{from: [{source: {namespaces: [default]}}]}]}
"#;

struct Harness {
    dir: tempfile::TempDir,
    controller: Option<Controller>,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        // The store holds BASE before the controller starts, so its first distribution index
        // (built before it serves) has it. Applied after the start, a subscriber could connect
        // before the index caught up and get a first push without it.
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        weft_controller::store::Store::open(&state)
            .unwrap()
            .apply(BASE, "base.yaml")
            .unwrap();
        let controller = start_in(dir.path()).await;
        Harness {
            dir,
            controller: Some(controller),
        }
    }

    fn controller(&self) -> &Controller {
        self.controller.as_ref().unwrap()
    }

    async fn channel(&self) -> Channel {
        let root = std::fs::read_to_string(self.controller().roots_path()).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root))
            .domain_name("weft-controller");
        Endpoint::from_shared(format!("https://{}", self.controller().listen_addr()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn apply(&self, yaml: &str) {
        self.controller().store().apply(yaml, "test.yaml").unwrap();
    }

    async fn stop(mut self) -> tempfile::TempDir {
        self.controller.take().unwrap().shutdown().await.unwrap();
        self.dir
    }
}

async fn start_in(dir: &Path) -> Controller {
    start_with(dir, Default::default()).await
}

async fn start_with(dir: &Path, limits: weft_controller::listener::Limits) -> Controller {
    let tokens = dir.join("tokens.json");
    if !tokens.exists() {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tokens)
            .unwrap();
        f.write_all(br#"{"node1": "token-1", "node2": "token-2"}"#).unwrap();
    }
    Controller::start(Config {
        state_dir: dir.join("state"),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.join("admin.sock"),
        trust_domain: "cluster.local".into(),
        root_namespace: "weft-system".into(),
        cert_lifetime: Duration::from_secs(3600),
        node_tokens: Some(tokens),
        ca: None,
        server_name: "weft-controller".into(),
        limits,
    })
    .await
    .unwrap()
}

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// A subscriber: its outbound sender and the pushes coming in.
struct Sub {
    tx: mpsc::Sender<StreamRequest>,
    rx: Streaming<Push>,
}

impl Sub {
    async fn open(channel: Channel, token: &str, node: &str, types: &[&str]) -> Result<Sub, tonic::Status> {
        Self::subscribe(channel, token, node, types, None, false).await
    }

    /// Subscribes with token-1 (node1's), saying what it holds.
    async fn open_held(channel: Channel, node: &str, held: Option<Held>) -> Result<Sub, tonic::Status> {
        Self::subscribe(channel, "token-1", node, &[], held, false).await
    }

    /// Subscribes as node1, saying whether it understands notices that its resync waits.
    async fn open_queued(channel: Channel, accepts_queued: bool) -> Sub {
        Self::subscribe(channel, "token-1", "node1", &[], None, accepts_queued)
            .await
            .unwrap()
    }

    async fn subscribe(
        channel: Channel,
        token: &str,
        node: &str,
        types: &[&str],
        held: Option<Held>,
        accepts_queued: bool,
    ) -> Result<Sub, tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(StreamRequest {
            kind: Some(stream_request::Kind::Subscribe(Subscribe {
                node: node.into(),
                types: types.iter().map(|t| t.to_string()).collect(),
                held,
                accepts_queued,
            })),
        })
        .await
        .unwrap();
        let response = ConfigClient::new(channel)
            .stream(authed(ReceiverStream::new(rx), token))
            .await?;
        Ok(Sub {
            tx,
            rx: response.into_inner(),
        })
    }

    async fn next(&mut self) -> Result<Push, tonic::Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(push))) => Ok(push),
            Ok(Ok(None)) => panic!("stream ended"),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("no push within {WAIT:?}"),
        }
    }

    async fn ack(&self, push: &Push) {
        self.answer(push, "", &[]).await;
    }

    async fn answer(&self, push: &Push, error: &str, rejected: &[&str]) {
        self.tx
            .send(StreamRequest {
                kind: Some(stream_request::Kind::Ack(Ack {
                    nonce: push.nonce.clone(),
                    error: error.into(),
                    rejected: rejected.iter().map(|r| r.to_string()).collect(),
                })),
            })
            .await
            .unwrap();
    }

    /// Asserts that nothing arrives for a short while (used only to check a push is *not* sent).
    async fn quiet(&mut self) {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), self.rx.message()).await {
            panic!("unexpected message: {m:?}");
        }
    }
}

fn keys(push: &Push) -> Vec<String> {
    let mut k: Vec<String> = push
        .resources
        .iter()
        .map(|r| {
            let key = r.key.as_ref().unwrap();
            format!("{}/{}", key.r#type, key.name)
        })
        .collect();
    k.sort();
    k
}

fn removed(push: &Push) -> Vec<String> {
    push.removed
        .iter()
        .map(|k| format!("{}/{}", k.r#type, k.name))
        .collect()
}

#[tokio::test]
async fn stream_sends_full_push_then_only_changes() {
    let h = Harness::start().await;
    let mut sub = Sub::open(h.channel().await, "token-1", "node1", &[]).await.unwrap();
    let first = sub.next().await.unwrap();
    assert!(first.full);
    assert_eq!(
        keys(&first),
        [
            "namespace/default",
            "namespace/shop",
            "policy/shop/allow-web",
            "workload/default/web",
            "workload/shop/cart",
        ]
    );
    sub.ack(&first).await;

    h.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: api, namespace: default}\nspec: {nodeName: node2}\nstatus: {podIP: 10.0.2.1}\n",
    );
    let delta = sub.next().await.unwrap();
    assert!(!delta.full);
    assert_eq!(keys(&delta), ["workload/default/api"]);
    assert!(delta.removed.is_empty());
    assert_ne!(delta.nonce, first.nonce);
    let Some(v1::resource::Kind::Workload(w)) = &delta.resources[0].kind else {
        panic!("not a workload")
    };
    assert_eq!(w.identity, "spiffe://cluster.local/ns/default/sa/default");
    assert_eq!(w.ips, ["10.0.2.1"]);
    sub.ack(&delta).await;

    h.controller()
        .store()
        .delete("apiVersion: v1\nkind: Pod\nmetadata: {name: api}\n", "rm.yaml", false)
        .unwrap();
    let gone = sub.next().await.unwrap();
    assert!(gone.resources.is_empty());
    assert_eq!(removed(&gone), ["workload/default/api"]);
    sub.ack(&gone).await;
    h.stop().await;
}

#[tokio::test]
async fn node_without_pods_in_a_namespace_gets_none_of_its_policies() {
    let h = Harness::start().await;
    let mut sub = Sub::open(h.channel().await, "token-2", "node2", &[]).await.unwrap();
    let first = sub.next().await.unwrap();
    assert!(
        !keys(&first).iter().any(|k| k.starts_with("policy/")),
        "{:?}",
        keys(&first)
    );
    sub.ack(&first).await;
    // A pod of shop lands on node2: now its policies are node2's business.
    h.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: cart2, namespace: shop}\nspec: {nodeName: node2}\n");
    let delta = sub.next().await.unwrap();
    assert_eq!(keys(&delta), ["policy/shop/allow-web", "workload/shop/cart2"]);
    h.stop().await;
}

#[tokio::test]
async fn nacked_resource_is_not_resent_until_it_changes() {
    let h = Harness::start().await;
    let mut sub = Sub::open(h.channel().await, "token-1", "node1", &["namespace"])
        .await
        .unwrap();
    let first = sub.next().await.unwrap();
    assert_eq!(keys(&first), ["namespace/default", "namespace/shop"]);
    sub.answer(&first, "cannot use shop", &["namespace/shop"]).await;
    // An unrelated change: only it is pushed, not the rejected version of shop.
    h.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n");
    let delta = sub.next().await.unwrap();
    assert_eq!(keys(&delta), ["namespace/extra"]);
    sub.ack(&delta).await;
    // shop changes: it is pushed again.
    h.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {fixed: \"yes\"}}\n");
    let fixed = sub.next().await.unwrap();
    assert_eq!(keys(&fixed), ["namespace/shop"]);
    sub.ack(&fixed).await;
    sub.quiet().await;
    h.stop().await;
}

/// Pushes (each acked) until one has `key`, within the wait: a change reaches a stream once the
/// distribution index has it, a moment after the store committed it.
async fn until_pushed(sub: &mut Sub, key: &str) -> Vec<Push> {
    let mut pushes = Vec::new();
    loop {
        let push = sub.next().await.unwrap();
        sub.ack(&push).await;
        let done = keys(&push).iter().any(|k| k == key);
        pushes.push(push);
        if done {
            return pushes;
        }
    }
}

#[tokio::test]
async fn reconnect_without_holdings_gets_a_full_resync() {
    let h = Harness::start().await;
    let channel = h.channel().await;
    let mut sub = Sub::open(channel.clone(), "token-1", "node1", &[]).await.unwrap();
    let first = sub.next().await.unwrap();
    assert!(first.full && first.resync);
    sub.ack(&first).await;
    drop(sub);
    h.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n");
    let mut again = Sub::open(channel, "token-1", "node1", &[]).await.unwrap();
    let pushes = until_pushed(&mut again, "namespace/extra").await;
    assert!(pushes[0].full && pushes[0].resync);
    let all: std::collections::BTreeSet<String> = pushes.iter().flat_map(keys).collect();
    assert!(keys(&first).iter().all(|k| all.contains(k)), "{all:?}");
    assert!(pushes.last().unwrap().revision > first.revision);
    h.stop().await;
}

#[tokio::test]
async fn reconnect_with_holdings_resyncs_only_what_differs() {
    let h = Harness::start().await;
    let channel = h.channel().await;
    let mut sub = Sub::open(channel.clone(), "token-1", "node1", &[]).await.unwrap();
    let first = sub.next().await.unwrap();
    sub.ack(&first).await;
    drop(sub);
    let held = Held {
        store_id: first.store_id.clone(),
        revision: first.revision,
        buckets: weft_api::sync::summarize(first.resources.iter().map(|r| {
            let key = r.key.as_ref().unwrap();
            (key.r#type.as_str(), key.name.as_str(), r.version)
        })),
    };
    // Nothing changed: the resync is empty.
    let mut same = Sub::open_held(channel.clone(), "node1", Some(held.clone()))
        .await
        .unwrap();
    let resync = same.next().await.unwrap();
    assert!(resync.resync && !resync.full, "{resync:?}");
    assert!(
        resync.resources.is_empty() && resync.replaced_buckets.is_empty(),
        "{resync:?}"
    );
    drop(same);
    // One namespace more: only its bucket comes again.
    h.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n");
    let mut again = Sub::open_held(channel, "node1", Some(held)).await.unwrap();
    let pushes = until_pushed(&mut again, "namespace/extra").await;
    assert!(pushes[0].resync && !pushes[0].full);
    let sent: Vec<String> = pushes.iter().flat_map(keys).collect();
    assert_eq!(sent, ["namespace/extra"], "only what differs");
    h.stop().await;
}

#[tokio::test]
async fn bad_token_is_unauthenticated_and_other_node_is_denied() {
    let h = Harness::start().await;
    let err = Sub::open(h.channel().await, "wrong", "node1", &[]).await.err().unwrap();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut sub = Sub::open(h.channel().await, "token-2", "node1", &[]).await.unwrap();
    let err = sub.next().await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("node2"), "{}", err.message());
    let err = CaClient::new(h.channel().await)
        .sign(authed(SignRequest::default(), "wrong"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    h.stop().await;
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::new(vec!["ignored.example".to_owned()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

#[tokio::test]
async fn ca_signs_only_identities_of_pods_on_the_calling_node() {
    let h = Harness::start().await;
    let mut ca = CaClient::new(h.channel().await);
    let sign = |identity: &str, csr_pem: String, token: &str| {
        authed(
            SignRequest {
                csr_pem,
                identity: identity.into(),
            },
            token,
        )
    };
    let ok = ca
        .sign(sign("spiffe://cluster.local/ns/shop/sa/cart", csr(), "token-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.chain_pem.len(), 1);
    assert_eq!(
        ok.roots_pem,
        [std::fs::read_to_string(h.controller().roots_path()).unwrap()]
    );
    let der = pem_der(&ok.chain_pem[0]);
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
    let names = &cert.subject_alternative_name().unwrap().unwrap().value.general_names;
    assert_eq!(names, &[GeneralName::URI("spiffe://cluster.local/ns/shop/sa/cart")]);
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(lifetime, 3600 + 60);

    let denied = ca
        .sign(sign("spiffe://cluster.local/ns/shop/sa/cart", csr(), "token-2"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("node node2") && denied.message().contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{}",
        denied.message()
    );
    let bad = ca
        .sign(sign(
            "spiffe://cluster.local/ns/shop/sa/cart",
            "garbage".into(),
            "token-1",
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("CSR"), "{}", bad.message());
    h.stop().await;
}

fn pem_der(pem: &str) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    p.contents
}

#[tokio::test]
async fn restart_keeps_the_root_the_store_and_a_private_key_file() {
    let h = Harness::start().await;
    let root = std::fs::read(h.controller().roots_path()).unwrap();
    let revision = h.controller().store().snapshot().revision;
    let dir = h.stop().await;
    let key = dir.path().join("state/ca/root.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let again = start_in(dir.path()).await;
    assert_eq!(std::fs::read(again.roots_path()).unwrap(), root);
    assert_eq!(again.store().snapshot().revision, revision);
    let pods: BTreeMap<String, String> = again
        .store()
        .snapshot()
        .pods()
        .map(|p| (p.name.clone(), p.uid.clone()))
        .collect();
    assert_eq!(pods.len(), 2);
    again.shutdown().await.unwrap();
}

/// A peer that finishes its TLS handshake and then sends nothing (no HTTP/2 preface) is closed at the
/// handshake deadline: it does not hold its connection slot for ever.
#[tokio::test]
async fn a_connection_silent_after_its_tls_handshake_is_closed_at_the_deadline() {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let deadline = Duration::from_millis(500);
    let controller = start_with(
        dir.path(),
        weft_controller::listener::Limits {
            handshake_timeout: deadline,
            ..Default::default()
        },
    )
    .await;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(controller.roots_path()).unwrap();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(controller.listen_addr()).await.unwrap();
    let started = std::time::Instant::now();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("weft-controller".try_into().unwrap(), tcp)
        .await
        .expect("the TLS handshake succeeds");
    // The server's HTTP/2 SETTINGS may come first; then the connection must end.
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection silent after its TLS handshake is still open after {WAIT:?}"
    );
    assert!(
        started.elapsed() < deadline + Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );
    controller.shutdown().await.unwrap();
}

/// A channel to the controller whose HTTP/2 windows are the protocol's smallest defaults: a
/// subscriber that stops reading on it stalls the controller's sending after about 64 KiB.
async fn narrow_channel(controller: &Controller) -> Channel {
    let root = std::fs::read_to_string(controller.roots_path()).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root))
        .domain_name("weft-controller");
    Endpoint::from_shared(format!("https://{}", controller.listen_addr()))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Longest a queued subscriber in these tests waits for its turn.
const RESYNC_WAIT: Duration = Duration::from_secs(20);

/// The notices that the resync waits (their `ahead`), then the whole resync that follows them:
/// its chunks' resource count. No notice may come once the push began.
async fn notices_then_resync(sub: &mut Sub) -> (Vec<u32>, Push, usize) {
    let mut notices = Vec::new();
    let deadline = std::time::Instant::now() + RESYNC_WAIT;
    let mut first = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no resync within {RESYNC_WAIT:?}, only notices: {notices:?}"
        );
        let message = sub.next().await.unwrap();
        match &message.queued {
            Some(q) => notices.push(q.ahead),
            None => break message,
        }
    };
    let mut resources = first.resources.len();
    let mut last = first.clone();
    while last.more {
        last = sub.next().await.unwrap();
        assert!(
            last.queued.is_none(),
            "a notice in the middle of push {:?}",
            first.nonce
        );
        assert_eq!(last.nonce, first.nonce);
        resources += last.resources.len();
    }
    first.resources.clear();
    (notices, first, resources)
}

/// After a restart thousands of agents need their whole config at once, and the controller sends
/// a bounded number of large resyncs at a time. A subscriber whose resync waits is told so at once
/// and then every notice period, with about how many wait ahead of it (so that the agent does not
/// take the wait for a silent controller and reconnect at the back of the queue); one that did not
/// ask for notices waits in silence; each gets its whole resync when its turn comes, in order.
/// A controller whose store holds about 3 MB of resync for node1 (far beyond what a stalled
/// subscriber's windows and the controller's buffers take in), one large resync at a time.
async fn one_turn_at_a_time(stall: Duration) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let labels: Vec<String> = (0..10).map(|j| format!("k{j}: {}", "v".repeat(60))).collect();
    let labels = labels.join(", ");
    let mut yaml = BASE.to_owned();
    for i in 0..2000 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: default, labels: {{{labels}}}}}\nspec: {{nodeName: node1}}\nstatus: {{podIP: 10.1.{}.{}}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    weft_controller::store::Store::open(&state)
        .unwrap()
        .apply(&yaml, "base.yaml")
        .unwrap();
    let limits = weft_controller::listener::Limits {
        resyncs: weft_controller::distribution::ResyncLimits {
            concurrent: 1,
            notice_every: Duration::from_millis(200),
            stall,
        },
        ..Default::default()
    };
    let controller = start_with(dir.path(), limits).await;
    Harness {
        dir,
        controller: Some(controller),
    }
}

/// A subscriber holding the one turn: its resync began (the first chunk is returned) and then
/// stalls, as it reads nothing more.
async fn stalled_holder(h: &Harness) -> (Sub, Push) {
    let mut holder = Sub::open_queued(narrow_channel(h.controller()).await, true).await;
    let begun = holder.next().await.unwrap();
    assert!(begun.queued.is_none() && begun.full && begun.more, "{:?}", begun.nonce);
    (holder, begun)
}

/// After a restart thousands of agents need their whole config at once, and the controller sends
/// a bounded number of large resyncs at a time. A subscriber whose resync waits is told so at once
/// and then every notice period, with about how many wait ahead of it (so that the agent does not
/// take the wait for a silent controller and reconnect at the back of the queue); one that did not
/// ask for notices waits in silence; each gets its whole resync when its turn comes.
#[tokio::test]
async fn a_resync_that_waits_for_its_turn_is_told_so_until_its_turn_comes() {
    let h = one_turn_at_a_time(Duration::from_secs(60)).await;
    let (mut holder, begun) = stalled_holder(&h).await;

    let channel = h.channel().await;
    let mut told = Sub::open_queued(channel.clone(), true).await;
    let first = told.next().await.unwrap();
    assert_eq!(
        first.queued,
        Some(v1::Queued { ahead: 0 }),
        "told at once, nothing ahead"
    );
    // Opened once the first is known to wait: one ahead of it.
    let mut second = Sub::open_queued(channel.clone(), true).await;
    assert_eq!(second.next().await.unwrap().queued, Some(v1::Queued { ahead: 1 }));
    let mut silent = Sub::open_queued(channel.clone(), false).await;
    // Told again while it waits, and nothing but that.
    for _ in 0..2 {
        assert_eq!(told.next().await.unwrap().queued, Some(v1::Queued { ahead: 0 }));
    }
    silent.quiet().await;

    // The holder reads its resync to the end: the turns go round.
    let mut total = begun.resources.len();
    let mut last = begun;
    while last.more {
        last = holder.next().await.unwrap();
        total += last.resources.len();
    }
    assert!(total > 2000, "{total} resources in the holder's resync");
    let (notices, push, resources) = notices_then_resync(&mut told).await;
    assert!(notices.iter().all(|a| *a == 0), "{notices:?}");
    assert!(push.full && push.resync);
    assert_eq!(resources, total, "the waiting subscriber's resync is whole");
    let (notices, push, resources) = notices_then_resync(&mut second).await;
    assert!(notices.iter().all(|a| *a <= 1), "{notices:?}");
    assert!(push.full);
    assert_eq!(resources, total);
    let (notices, push, resources) = notices_then_resync(&mut silent).await;
    assert!(
        notices.is_empty(),
        "a subscriber that did not ask is told nothing: {notices:?}"
    );
    assert!(push.full);
    assert_eq!(resources, total);
    h.stop().await;
}

/// A subscriber that stops reading in the middle of its resync (its connection alive, PINGs
/// answered) does not keep the turn: after the stall limit its stream ends and the next in line is
/// served, without the stalled one reading anything.
#[tokio::test]
async fn a_subscriber_that_stalls_its_resync_loses_the_turn() {
    let h = one_turn_at_a_time(Duration::from_secs(1)).await;
    // Before the holder subscribes: its stall limit cannot have started earlier.
    let started = std::time::Instant::now();
    let (_holder, _) = stalled_holder(&h).await;
    let mut told = Sub::open_queued(h.channel().await, true).await;
    let (notices, push, resources) = notices_then_resync(&mut told).await;
    assert!(!notices.is_empty(), "it waited for the holder's turn first");
    assert!(push.full);
    assert!(resources > 2000, "{resources}");
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    h.stop().await;
}
