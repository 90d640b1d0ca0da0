//! The proxies' handlers on real sockets, without eBPF: the test's own network namespace stands in
//! for the pod's, and loopback addresses for the pod's (127.0.0.1) and its peer's (127.0.0.2). What
//! each handler decides, whom the application sees, and what the access record says.
//!
//! Opening a socket "in the pod" enters a network namespace, which needs root; under `CI=true`
//! these tests must run.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing_subscriber::layer::SubscriberExt as _;
use weft_api::v1;
use weft_dataplane::netns::NetNs;
use weft_hbone::{
    client::{Pool, PoolConfig},
    identity::Identity,
    server::{Admission, Handler, Refusal, Request},
};

use super::{PLAINTEXT_ADMISSION, inbound::Inbound, is_forbidden};
use crate::{
    controller::Controller,
    identity::Identities,
    mesh::Mesh,
    pod::PodContext,
    state::{State, fixtures::*},
};

const POD: &str = "127.0.0.1";
const PEER: &str = "127.0.0.2";
const DEADLINE: Duration = Duration::from_secs(10);

fn needs_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root (it enters a network namespace); under CI=true it must run"
    );
    eprintln!("skipping {test}: needs root");
    false
}

/// The mesh as pushed: the enrolled pod `shop/web` at 127.0.0.1, its peer `shop/client` at
/// 127.0.0.2, and `extra`.
fn state(extra: Vec<v1::Resource>) -> Arc<State> {
    let mut resources = vec![
        ns("shop", true),
        pod("shop", "web", POD, &[("app", "web")]),
        pod("shop", "client", PEER, &[]),
    ];
    resources.extend(extra);
    let (state, rejected) = State::default().apply(&push(true, resources, &[]));
    assert!(rejected.is_empty(), "{rejected:?}");
    Arc::new(state)
}

fn deny_all() -> v1::Resource {
    policy(
        "shop",
        "deny",
        v1::Action::Deny,
        v1::Scope::Namespace,
        vec![v1::Rule::default()],
    )
}

/// `shop/web`'s context in this network namespace, and the sender of the agent's state.
struct Pod {
    ctx: Arc<PodContext>,
    states: watch::Sender<Arc<State>>,
    dir: PathBuf,
}

impl Pod {
    fn new(state: Arc<State>) -> Self {
        // A controller that is never reached: these handlers ask it nothing.
        let dir = std::env::temp_dir().join(format!("weft-proxy-tests-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["weft-controller".to_owned()]).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.join("token"), "t").unwrap();
        let controller = Controller::new(
            "https://127.0.0.1:1",
            &dir.join("ca.pem"),
            "weft-controller",
            &dir.join("token"),
        )
        .unwrap();
        let (states, receiver) = watch::channel(state.clone());
        let mesh = Arc::new(Mesh {
            state: receiver,
            identities: Identities::new(controller, "cluster.local".to_owned()),
            pool: Pool::new(PoolConfig::default()),
            next_endpoint: Default::default(),
            tunnel_congestion: None,
            admission: Admission::new(Default::default()),
            plaintext_admission: Admission::new(PLAINTEXT_ADMISSION),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            access: crate::access::AccessLog::inline(),
        });
        let workload = state.workload("shop/web").expect("shop/web");
        let ctx = PodContext::new(
            workload.to_pod(),
            Identity::clone(workload.identity()),
            NetNs::current().unwrap(),
            mesh,
        );
        Self {
            ctx: Arc::new(ctx),
            states,
            dir,
        }
    }

    fn inbound(&self) -> Inbound {
        Inbound(self.ctx.clone())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn client() -> Identity {
    Identity::try_new("cluster.local", "shop", "default").unwrap()
}

fn request(target: SocketAddr) -> Request {
    Request {
        peer: format!("{PEER}:40000").parse().unwrap(),
        identity: client(),
        target,
    }
}

/// The access records written while a test runs.
#[derive(Clone, Default)]
struct Records(Arc<Mutex<Vec<BTreeMap<String, String>>>>);

impl Records {
    /// Collects the records of this thread's events until the guard drops.
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let records = Self::default();
        let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(records.clone()));
        (records, guard)
    }

    fn all(&self) -> Vec<BTreeMap<String, String>> {
        self.0.lock().unwrap().clone()
    }

    /// The only record, once it is written.
    async fn one(&self) -> BTreeMap<String, String> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if let [one] = self.all().as_slice() {
                    return one.clone();
                }
                assert!(self.all().len() < 2, "{:?}", self.all());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("an access record")
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Records {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "weft::access" {
            let mut fields = Fields::default();
            event.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// The client sees its connection end (closed or reset), within the deadline.
/// The value of counter `name` in the pod's agent's metrics for the series with every one of
/// `labels`; 0 when there is none.
fn counter(pod: &Pod, name: &str, labels: &[(&str, &str)]) -> u64 {
    let text = pod.ctx.mesh.metrics.encode().unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn assert_ends(client: &mut TcpStream) {
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, client.read(&mut buf)).await.unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "the client sees its connection end");
}

#[tokio::test(flavor = "current_thread")]
async fn an_hbone_tunnel_reaches_the_application_from_the_clients_address_and_only_the_pods_own() {
    if !needs_root("hbone_inbound_handler") {
        return;
    }
    let (records, _guard) = Records::capture();
    let pod = Pod::new(state(vec![]));
    let app = TcpListener::bind((POD, 0)).await.unwrap();
    let target = app.local_addr().unwrap();

    let (session, upstream) = pod.inbound().open(&request(target)).await;
    let upstream = upstream.expect("allowed, and the application listens");
    let (_, seen) = tokio::time::timeout(DEADLINE, app.accept()).await.unwrap().unwrap();
    assert_eq!(seen.ip().to_string(), PEER, "the application sees the client's address");
    assert_eq!(upstream.peer_addr().unwrap(), target);
    // Counted as opened once connected, closed when it ends.
    let opened = [("reporter", "destination"), ("response_flags", "-")];
    assert_eq!(counter(&pod, "istio_tcp_connections_opened_total", &opened), 1);
    assert_eq!(counter(&pod, "istio_tcp_connections_closed_total", &opened), 0);
    drop(upstream);
    let moved = weft_hbone::server::Transferred {
        sent: 300,
        received: 4000,
    };
    pod.inbound().closed(session, Ok(moved));
    let record = records.one().await;
    assert_eq!(record["reason"], "done");
    assert_eq!(record["mode"], "hbone");
    assert_eq!(record["src.identity"], client().to_string());
    assert_eq!(record["dst.workload"], "shop/web");
    let client_principal = client().to_string();
    let series = [
        ("reporter", "destination"),
        ("source_principal", client_principal.as_str()),
        ("destination_workload", "web"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/default"),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    assert_eq!(counter(&pod, "istio_tcp_connections_opened_total", &series), 1);
    assert_eq!(counter(&pod, "istio_tcp_connections_closed_total", &series), 1);
    // From the client (request) is Istio's received, from the application (response) its sent.
    assert_eq!(counter(&pod, "istio_tcp_received_bytes_total", &series), 300);
    assert_eq!(counter(&pod, "istio_tcp_sent_bytes_total", &series), 4000);

    // Another address is not this pod's: the agent is not an open proxy.
    let elsewhere: SocketAddr = format!("127.0.0.3:{}", target.port()).parse().unwrap();
    let (session, refused) = pod.inbound().open(&request(elsewhere)).await;
    assert_eq!(refused.unwrap_err(), Refusal::Forbidden);
    pod.inbound().closed(
        session,
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            Refusal::Forbidden,
        )),
    );
    assert_eq!(records.all()[1]["reason"], "forbidden_target");
    // Refused before it carried anything: opened and closed at once, flagged.
    let refused = [("reporter", "destination"), ("response_flags", "CONNECT")];
    assert_eq!(counter(&pod, "istio_tcp_connections_opened_total", &refused), 1);
    assert_eq!(counter(&pod, "istio_tcp_connections_closed_total", &refused), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn an_hbone_tunnel_is_decided_by_the_current_state_and_names_the_denying_policy() {
    if !needs_root("hbone_inbound_current_state") {
        return;
    }
    let (records, _guard) = Records::capture();
    let pod = Pod::new(state(vec![]));
    let app = TcpListener::bind((POD, 0)).await.unwrap();
    let target = app.local_addr().unwrap();
    assert!(pod.inbound().allowed(&request(target)));

    // A new state denies it: an open tunnel is no longer allowed, and a new one is refused.
    pod.states.send_replace(state(vec![deny_all()]));
    assert!(!pod.inbound().allowed(&request(target)));
    let (session, refused) = pod.inbound().open(&request(target)).await;
    assert_eq!(refused.unwrap_err(), Refusal::Denied);
    pod.inbound().closed(
        session,
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            Refusal::Denied,
        )),
    );
    let record = records.one().await;
    assert_eq!(record["reason"], "denied");
    assert_eq!(record["policy"], "shop/deny");
    let client_principal = client().to_string();
    let denied = [
        ("response_flags", "DENY"),
        ("source_principal", client_principal.as_str()),
    ];
    assert_eq!(counter(&pod, "istio_tcp_connections_closed_total", &denied), 1);
    assert_eq!(
        counter(&pod, "istio_tcp_connections_closed_total", &[("response_flags", "-")]),
        0
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(100), app.accept())
            .await
            .is_err(),
        "nothing reached the application"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_plaintext_connection_a_policy_denies_is_closed_before_the_application_sees_it() {
    if !needs_root("plaintext_inbound_handler") {
        return;
    }
    let (records, _guard) = Records::capture();
    let pod = Pod::new(state(vec![deny_all()]));
    // Stands in for the pod's 15006 listener, as sk_lookup steers to it: the accepted socket's
    // local address is the original destination.
    let steered = TcpListener::bind((POD, 0)).await.unwrap();
    let dst = steered.local_addr().unwrap();
    let peer_socket = tokio::net::TcpSocket::new_v4().unwrap();
    peer_socket.bind(format!("{PEER}:0").parse().unwrap()).unwrap();
    let mut client = peer_socket.connect(dst).await.unwrap();
    let (downstream, peer) = steered.accept().await.unwrap();

    super::inbound_plaintext(pod.ctx.clone(), downstream, peer).await;
    assert_ends(&mut client).await;
    let record = records.one().await;
    assert_eq!(record["mode"], "plaintext");
    assert_eq!(record["reason"], "denied");
    assert_eq!(record["policy"], "shop/deny");
    assert_eq!(
        pod.ctx.mesh.plaintext_admission.connections(),
        0,
        "its admission slot came back"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_outbound_connection_without_an_original_destination_is_refused() {
    if !needs_root("outbound_handler") {
        return;
    }
    let (records, _guard) = Records::capture();
    let pod = Pod::new(state(vec![]));
    // Not steered by capture: the socket has no original destination to go to.
    let listener = TcpListener::bind((POD, 0)).await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (downstream, _) = listener.accept().await.unwrap();

    super::outbound(pod.ctx.clone(), downstream, false).await;
    assert_ends(&mut client).await;
    let record = records.one().await;
    assert_eq!(record["direction"], "outbound");
    assert_eq!(record["reason"], "no_original_dst");
}

#[test]
fn the_agents_own_ports_are_forbidden_targets_on_the_pods_loopback_and_unspecified_addresses() {
    let pod_ips = ["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()];
    let cases = [
        ("10.244.1.5:15001", true),
        ("10.244.1.5:15006", true),
        ("10.244.1.5:15008", true),
        ("127.0.0.1:15006", true),
        ("127.1.2.3:15001", true),
        ("0.0.0.0:15008", true),
        ("[::1]:15006", true),
        ("[::]:15001", true),
        ("[fd00::5]:15008", true),
        ("[::ffff:10.244.1.5]:15006", true),
        ("[::ffff:127.0.0.1]:15001", true),
        // Another pod's agent port is where HBONE goes; the application's ports are the pod's own.
        ("10.244.2.7:15008", false),
        ("10.244.1.5:8080", false),
        ("127.0.0.1:8080", false),
        ("[::1]:15000", false),
    ];
    for (dst, forbidden) in cases {
        assert_eq!(is_forbidden(dst.parse().unwrap(), &pod_ips), forbidden, "{dst}");
    }
}
