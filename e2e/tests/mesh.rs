//! The zero-trust mesh, end to end: controller, CA, HBONE in mutual TLS, L4 policy. Real network
//! namespaces, real eBPF, real agents and controller, unmodified curl; the capture on the wire is
//! read back and checked.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_e2e::{Background, Cluster, bin, curl, privileged, text, wait_for, wire};

const SPIFFE_DEFAULT: &str = "spiffe://cluster.local/ns/default/sa/default";

/// Waits for a node's agent to record a connection matching `pred`.
fn record(c: &Cluster, node: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(5), || {
        c.access_records(node).into_iter().find(|r| pred(r))
    })
}

/// tcpdump on the fabric bridge (the wire between nodes).
fn capture(c: &Cluster) -> wire::Capture {
    wire::Capture::start(Some(&format!("weft.{}.fabric", c.name)), "br0", &c.name, &["tcp"])
}

/// Waits until the capture holds pod-to-pod payload both ways, then stops it; its bytes.
fn stop(capture: wire::Capture) -> Vec<u8> {
    wait_for("the capture to hold both directions", Duration::from_secs(5), || {
        let flows = wire::tcp_flows(&capture.bytes()?).ok()?;
        let pods = flows.keys().filter(|(s, d)| is_pod(s) && is_pod(d)).count();
        (pods >= 2).then_some(())
    });
    capture.stop()
}

fn is_pod(a: &std::net::SocketAddr) -> bool {
    a.ip().to_string().starts_with("10.244.")
}

#[test]
fn between_nodes_only_tls13_crosses_the_wire_and_the_server_sees_the_client() {
    if !privileged("between_nodes_only_tls13_crosses_the_wire") {
        return;
    }
    let c = Cluster::up("e2e-mtls", &["--ambient", "default"]);
    let _server = c.serve("app-2-1", "8080");
    let (client_ip, server_ip) = (c.pod_ip("app-1-1", false), c.pod_ip("app-2-1", false));
    let marker = format!("weft-marker-{}", std::process::id());

    // A socket that the agent leaves alone gets reno in the client pod: the tunnel must say cubic.
    let netns = |pod: &str| format!("weft.{}.{pod}", c.name);
    let sysctl = Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns("app-1-1"),
            "sysctl",
            "-qw",
            "net.ipv4.tcp_congestion_control=reno",
        ])
        .status()
        .expect("running sysctl");
    assert!(sysctl.success(), "setting the client pod's default congestion control");

    let capture = capture(&c);
    let out = c.exec(
        "app-1-1",
        &[
            "curl",
            "-sS",
            "-m",
            "5",
            "-H",
            &format!("X-Secret: {marker}"),
            &format!("http://{server_ip}:8080/{marker}"),
        ],
    );
    let pcap = stop(capture);
    assert!(out.status.success(), "curl: {}", text(&out));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains(&format!("peer={client_ip}:")),
        "the server saw {body:?}, not the client pod {client_ip}"
    );

    // Nothing readable on the wire: not the marker, and every byte between the pods is TLS 1.3.
    assert!(
        !pcap.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the request's marker crossed the wire in the clear"
    );
    let flows = wire::tcp_flows(&pcap).expect("parsing the capture");
    let between_pods: Vec<_> = flows.iter().filter(|((s, d), _)| is_pod(s) && is_pod(d)).collect();
    assert!(!between_pods.is_empty(), "no pod-to-pod traffic captured");
    let mut saw_tls13 = false;
    for ((src, dst), flow) in &between_pods {
        assert!(
            src.port() == 15008 || dst.port() == 15008,
            "{src} -> {dst} is not HBONE (port 15008)"
        );
        let records = wire::tls_records(&flow.bytes).unwrap_or_else(|e| panic!("{src} -> {dst}: {e}"));
        if src.port() == 15008 {
            let hello = records.first().expect("server records");
            assert_eq!(hello.kind, 22, "the server's first record is a handshake");
            assert!(
                wire::server_hello_is_tls13(hello.body),
                "the server did not select TLS 1.3"
            );
            saw_tls13 = true;
        }
        // After the hellos, everything is encrypted application data (ChangeCipherSpec allowed
        // for middlebox compatibility).
        for r in records.iter().skip(1) {
            let kind = r.kind;
            assert!(
                matches!(kind, 20 | 23),
                "{src} -> {dst}: record type {kind} after the hello"
            );
        }
    }
    assert!(saw_tls13, "no ServerHello captured");

    // Both ends of the pooled HBONE connection run the agent's congestion control, not the pod's.
    for (pod, filter) in [("app-1-1", "( dport = :15008 )"), ("app-2-1", "( sport = :15008 )")] {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns(pod),
                "ss",
                "-Htin",
                "state",
                "established",
                filter,
            ])
            .output()
            .expect("running ss");
        let sockets = String::from_utf8_lossy(&out.stdout);
        assert!(
            sockets.contains(":15008") && sockets.split_whitespace().any(|w| w == "cubic"),
            "{pod}'s HBONE connection does not use cubic:\n{sockets}"
        );
    }

    // The receiving agent names the client's SPIFFE identity; the sender names the server's.
    let inbound = record(&c, "node2", "node2's inbound HBONE record", |r| {
        r["direction"] == "inbound" && r["mode"] == "hbone" && r["dst.addr"] == format!("{server_ip}:8080")
    });
    assert_eq!(inbound["src.identity"], SPIFFE_DEFAULT, "{inbound}");
    assert_eq!(inbound["src.workload"], "default/app-1-1", "{inbound}");
    assert_eq!(inbound["reason"], "done", "{inbound}");
    let outbound = record(&c, "node1", "node1's outbound HBONE record", |r| {
        r["direction"] == "outbound" && r["mode"] == "hbone"
    });
    assert_eq!(outbound["dst.identity"], SPIFFE_DEFAULT, "{outbound}");
}

fn policy(name: &str, namespace: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  selector:\n    matchLabels:\n      app: app-2-1\n  action: {action}\n  rules:\n{rules}"
    )
}

/// curl's exit code and how long it took.
fn timed_curl(c: &Cluster, pod: &str, url: &str) -> (i32, Duration) {
    let started = Instant::now();
    let (code, _, _) = curl(c, pod, url);
    (code, started.elapsed())
}

#[test]
fn policies_allow_deny_and_deleting_them_restores_access() {
    if !privileged("policies_allow_deny_and_deleting_them_restores_access") {
        return;
    }
    // Namespaces a and b are meshed; c is not (its pods reach a's in plaintext).
    let c = Cluster::up(
        "e2e-policy",
        &["--namespaces", "a,b,c", "--pods-per-node", "3", "--ambient", "a,b"],
    );
    // app-1-1 and app-2-1 are in a, app-1-2 in b, app-1-3 in c.
    let _server = c.serve("app-2-1", "8080");
    let url = format!("http://{}:8080/", c.pod_ip("app-2-1", false));
    for pod in ["app-1-1", "app-1-2", "app-1-3"] {
        assert_eq!(curl(&c, pod, &url).0, 0, "{pod} before any policy");
    }

    let allow_a = policy(
        "allow-a",
        "a",
        "ALLOW",
        "  - from:\n    - source:\n        namespaces: [\"a\"]\n",
    );
    let out = c.apply(&allow_a);
    assert!(out.status.success(), "apply: {}", text(&out));
    wait_for("the ALLOW policy to refuse b", Duration::from_secs(5), || {
        (curl(&c, "app-1-2", &url).0 != 0).then_some(())
    });
    assert_eq!(curl(&c, "app-1-1", &url).0, 0, "a client in a is allowed");
    let (code, took) = timed_curl(&c, "app-1-2", &url);
    assert_ne!(code, 0);
    assert_ne!(code, 28, "refused, not timed out");
    assert!(
        took < Duration::from_secs(3),
        "a denied client fails fast, took {took:?}"
    );
    // Refused at the server's agent with a 401 on the tunnel, named on both sides.
    let denied = record(&c, "node2", "node2's denial", |r| {
        r["reason"] == "denied" && r["src.workload"] == "b/app-1-2"
    });
    assert_eq!(denied["policy"], "", "no ALLOW rule matched: {denied}");
    assert_eq!(denied["src.identity"], "spiffe://cluster.local/ns/b/sa/default");
    record(&c, "node1", "node1's record of the 401", |r| {
        r["direction"] == "outbound" && r["reason"] == "denied" && r["src.workload"] == "b/app-1-2"
    });
    // Plaintext from outside the mesh has no identity, hence no namespace: refused too.
    assert_ne!(
        curl(&c, "app-1-3", &url).0,
        0,
        "plaintext client refused by the ALLOW policy"
    );

    // DENY beats ALLOW.
    let deny_a = policy(
        "deny-client",
        "a",
        "DENY",
        "  - from:\n    - source:\n        principals: [\"cluster.local/ns/a/sa/default\"]\n",
    );
    let out = c.apply(&deny_a);
    assert!(out.status.success(), "apply: {}", text(&out));
    wait_for("the DENY policy to refuse a", Duration::from_secs(5), || {
        (curl(&c, "app-1-1", &url).0 != 0).then_some(())
    });
    let denied = record(&c, "node2", "the DENY's record", |r| {
        r["reason"] == "denied" && r["policy"] == "a/deny-client"
    });
    assert_eq!(denied["src.workload"], "a/app-1-1");

    // Deleting the policies restores access within 2 s, nothing restarted.
    let out = c.delete(&format!("{allow_a}---\n{deny_a}"));
    assert!(out.status.success(), "delete: {}", text(&out));
    // wait_for fails the test past its 2 s deadline.
    wait_for("access restored within 2 s", Duration::from_secs(2), || {
        (curl(&c, "app-1-1", &url).0 == 0 && curl(&c, "app-1-2", &url).0 == 0).then_some(())
    });

    // Bad input is refused whole, with the object and field named, and nothing applied.
    let bad = format!(
        "{}---\n{}",
        policy(
            "ok",
            "a",
            "DENY",
            "  - from:\n    - source:\n        namespaces: [\"b\"]\n"
        ),
        policy(
            "bad",
            "a",
            "ALLOW",
            "  - to:\n    - operation:\n        ports: [\"99999\"]\n"
        )
    );
    let out = c.apply(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a/bad") && err.contains("ports"), "{err}");
    assert_eq!(
        curl(&c, "app-1-2", &url).0,
        0,
        "the valid half of a bad file was not applied"
    );
}

#[test]
fn many_connections_share_few_tls_connections() {
    if !privileged("many_connections_share_few_tls_connections") {
        return;
    }
    let c = Cluster::up("e2e-pool", &["--ambient", "default"]);
    let probe = bin("weft-probe");
    let probe = probe.to_str().expect("utf-8 path");
    let _echo = c.echo("app-2-1", 9000);
    let server = c.pod_ip("app-2-1", false);
    let out = c.exec(
        "app-1-1",
        &[
            probe,
            "stream",
            "--addr",
            &format!("{server}:9000"),
            "--seconds",
            "2",
            "--connections",
            "100",
        ],
    );
    assert!(out.status.success(), "100 concurrent streams: {}", text(&out));
    // Pooled connections stay open while idle (60 s), so the server pod's sockets on 15008 are
    // every TLS connection the client's agent opened.
    let ss = c.exec("app-2-1", &["ss", "-Htn", "state", "established", "( sport = :15008 )"]);
    let tls_connections = String::from_utf8_lossy(&ss.stdout).lines().count();
    assert!(
        (1..=2).contains(&tls_connections),
        "100 connections rode on {tls_connections} TLS connections"
    );
}

#[test]
fn the_mesh_keeps_working_without_the_controller_and_resyncs_after() {
    if !privileged("the_mesh_keeps_working_without_the_controller") {
        return;
    }
    let c = Cluster::up("e2e-outage", &["--ambient", "default"]);
    let _server = c.serve("app-2-1", "8080");
    let _echo = c.echo("app-2-1", 9000);
    let url = format!("http://{}:8080/", c.pod_ip("app-2-1", false));
    assert_eq!(curl(&c, "app-1-1", &url).0, 0);
    let root = c.status()["controller"]["root"].as_str().expect("root path").to_owned();
    let root_before = std::fs::read(&root).expect("the CA root");

    // A connection that lives through the whole outage.
    let probe = bin("weft-probe");
    let long = Command::new(bin("weftctl"))
        .args(["dev", "exec", "--name", &c.name, "app-1-2", "--"])
        .args([probe.to_str().expect("utf-8 path"), "stream", "--seconds", "70"])
        .args(["--addr", &format!("{}:9000", c.pod_ip("app-2-1", false))])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the long stream");
    let mut long = Background { child: long };

    c.kill_controller();
    let down = Instant::now();
    // New connections between known pods for a minute, one every 2 s.
    while down.elapsed() < Duration::from_secs(60) {
        let (code, body, _) = curl(&c, "app-1-1", &url);
        assert_eq!(code, 0, "a new connection {:?} into the outage: {body}", down.elapsed());
        std::thread::sleep(Duration::from_secs(2));
    }
    c.start_controller();
    let mut summary = String::new();
    if let Some(mut stdout) = long.child.stdout.take() {
        std::io::Read::read_to_string(&mut stdout, &mut summary).expect("the long stream's output");
    }
    let status = long.child.wait().expect("the long stream");
    assert!(status.success(), "the long connection broke: {summary}");

    // The restarted controller kept its CA, and the agents resynced: a policy applied now is enforced.
    assert_eq!(
        std::fs::read(&root).expect("the CA root"),
        root_before,
        "the CA root changed"
    );
    let deny = policy(
        "deny-all",
        "default",
        "DENY",
        "  - from:\n    - source:\n        namespaces: [\"default\"]\n",
    );
    let out = c.apply(&deny);
    assert!(out.status.success(), "apply: {}", text(&out));
    wait_for(
        "the agents to follow the restarted controller",
        Duration::from_secs(10),
        || (curl(&c, "app-1-1", &url).0 != 0).then_some(()),
    );
    let inbound = record(&c, "node2", "a denial after the restart", |r| r["reason"] == "denied");
    assert_eq!(inbound["src.identity"], SPIFFE_DEFAULT, "identities unchanged");
}

#[test]
fn a_streaming_connection_survives_certificate_renewals() {
    if !privileged("a_streaming_connection_survives_certificate_renewals") {
        return;
    }
    let c = Cluster::up("e2e-renew", &["--ambient", "default", "--cert-lifetime", "60s"]);
    let _echo = c.echo("app-2-1", 9000);
    let probe = bin("weft-probe");
    let out = c.exec(
        "app-1-1",
        &[
            probe.to_str().expect("utf-8 path"),
            "stream",
            "--addr",
            &format!("{}:9000", c.pod_ip("app-2-1", false)),
            "--seconds",
            "180",
        ],
    );
    assert!(out.status.success(), "the stream broke: {}", text(&out));
    // Renewed at half life (30 s): several certificates per identity over 3 minutes, on both nodes.
    for node in ["node1", "node2"] {
        let issued = c
            .agent_log(node)
            .into_iter()
            .filter(|l| l["message"] == "certificate issued")
            .count();
        assert!(issued >= 4, "{node}: {issued} certificates issued in 3 minutes");
    }
    // New connections work with the latest certificate.
    let _server = c.serve("app-2-1", "8080");
    assert_eq!(
        curl(&c, "app-1-1", &format!("http://{}:8080/", c.pod_ip("app-2-1", false))).0,
        0
    );
}

#[test]
fn outside_the_mesh_is_passthrough_and_a_service_vip_spreads_over_its_endpoints() {
    if !privileged("outside_the_mesh_is_passthrough") {
        return;
    }
    // default is meshed, legacy is not; a mesh-wide STRICT PeerAuthentication refuses plaintext into
    // meshed pods.
    let c = Cluster::up(
        "e2e-svc",
        &[
            "--namespaces",
            "default,legacy",
            "--pods-per-node",
            "3",
            "--ambient",
            "default",
        ],
    );
    let strict = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: weft-system\n---\napiVersion: security.weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: weft-system\nspec:\n  mtls:\n    mode: STRICT\n";
    let out = c.apply(strict);
    assert!(out.status.success(), "{}", text(&out));
    // app-I-1 and app-I-3: default; app-I-2: legacy.
    let _legacy = c.serve("app-2-2", "8080");
    let legacy_ip = c.pod_ip("app-2-2", false);
    let (code, body, _) = curl(&c, "app-1-1", &format!("http://{legacy_ip}:8080/"));
    assert_eq!(code, 0, "passthrough to a pod outside the mesh: {body}");
    let r = record(&c, "node1", "the passthrough record", |r| {
        r["mode"] == "passthrough" && r["dst.addr"] == format!("{legacy_ip}:8080")
    });
    assert_eq!(r["dst.workload"], "legacy/app-2-2");
    assert_eq!(r["reason"], "done");

    // Strict mTLS: plaintext from outside the mesh into a meshed pod is refused.
    let _meshed = c.serve("app-2-1", "8080");
    let meshed_url = format!("http://{}:8080/", c.pod_ip("app-2-1", false));
    // (The policy reaches node2's agent within a second of the apply.)
    wait_for(
        "plaintext to be refused in strict mode",
        Duration::from_secs(10),
        || (curl(&c, "app-1-2", &meshed_url).0 != 0).then_some(()),
    );
    let refused = record(&c, "node2", "the strict refusal", |r| r["reason"] == "strict_mtls");
    assert_eq!(refused["policy"], "weft-system/default", "{refused}");
    assert_eq!(curl(&c, "app-1-1", &meshed_url).0, 0, "meshed clients still connect");

    // A service over two meshed pods: label them, then curl the VIP.
    let status = c.status();
    let mut pods = String::new();
    for name in ["app-2-1", "app-1-3"] {
        let p = status["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap();
        let ips: Vec<String> = p["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| format!("{{\"ip\": \"{}\"}}", ip.as_str().unwrap()))
            .collect();
        pods.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  uid: {}\n  labels: {{app: {name}, tier: web}}\nspec:\n  nodeName: {}\n  serviceAccountName: default\nstatus:\n  podIPs: [{}]\n---\n",
            p["uid"].as_str().unwrap(),
            p["node"].as_str().unwrap(),
            ips.join(", ")
        ));
    }
    pods.push_str(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  clusterIP: 10.96.0.10\n  selector: {tier: web}\n  ports:\n  - port: 80\n    targetPort: 8080\n",
    );
    let out = c.apply(&pods);
    assert!(out.status.success(), "apply: {}", text(&out));
    let _second = c.serve("app-1-3", "8080");
    let seen = wait_for("the VIP to reach both endpoints", Duration::from_secs(10), || {
        let mut locals = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let (code, body, _) = curl(&c, "app-1-1", "http://10.96.0.10:80/");
            if code != 0 {
                return None;
            }
            if let Some(l) = body.split_whitespace().find_map(|w| w.strip_prefix("local=")) {
                locals.insert(l.to_owned());
            }
        }
        (locals.len() == 2).then_some(locals)
    });
    let want: std::collections::BTreeSet<String> = ["app-1-3", "app-2-1"]
        .iter()
        .map(|p| format!("{}:8080", c.pod_ip(p, false)))
        .collect();
    assert_eq!(seen, want);
}
