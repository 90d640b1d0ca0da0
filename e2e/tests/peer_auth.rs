//! PeerAuthentication end to end: real eBPF, real agents, plaintext from a pod outside the mesh into
//! an enrolled pod, decided by the policies applied with `weftctl apply` as they are at each moment.

use std::time::Duration;

use serde_json::Value;
use weft_e2e::{Cluster, bin, privileged, text, wait_for};

/// curl's exit code to `url` from `pod` (0: an HTTP answer came back).
fn curl(c: &Cluster, pod: &str, url: &str) -> i32 {
    let out = c.exec(pod, &["curl", "-sS", "-m", "5", "-o", "/dev/null", url]);
    out.status.code().unwrap_or(-1)
}

/// The first of node2's inbound plaintext access records after the first `since` that `pred` holds for.
fn plaintext_record(c: &Cluster, since: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(5), || {
        c.access_records("node2")
            .into_iter()
            .skip(since)
            .find(|r| r["direction"] == "inbound" && r["mode"] == "plaintext" && pred(r))
    })
}

const STRICT: &str = "apiVersion: security.weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: default\nspec:\n  mtls:\n    mode: STRICT\n";

/// app-2-1 accepts plaintext on 8080 again; its other ports inherit the namespace's STRICT.
const EXEMPT_8080: &str = "apiVersion: security.weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata:\n  name: app-2-1-http\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: app-2-1\n  portLevelMtls:\n    8080:\n      mode: PERMISSIVE\n";

#[test]
fn peer_authentication_decides_plaintext_per_namespace_and_port_and_closes_what_strict_now_refuses() {
    if !privileged("peer_authentication") {
        return;
    }
    // app-X-1 enrolled (`default`), app-X-2 outside the mesh (`plain`).
    let c = Cluster::up(
        "e2e-peerauth",
        &["--namespaces", "default,plain", "--ambient", "default"],
    );
    let _http = c.serve("app-2-1", "8080-8081");
    let _echo = c.echo("app-2-1", 9000);
    let ip = c.pod_ip("app-2-1", false);
    let (http, other) = (format!("http://{ip}:8080/"), format!("http://{ip}:8081/"));

    // No PeerAuthentication: PERMISSIVE, as in Istio. Plaintext from outside the mesh is accepted.
    assert_eq!(curl(&c, "app-1-2", &http), 0, "plaintext accepted without a policy");
    plaintext_record(&c, 0, "the accepted plaintext record", |r| r["reason"] == "done");

    // A plaintext stream that is open when STRICT lands.
    let probe = bin("weft-probe");
    let server = format!("{ip}:9000");
    let mut stream = c.spawn(
        "app-1-2",
        &[
            probe.to_str().expect("utf-8 path"),
            "stream",
            "--addr",
            &server,
            "--seconds",
            "60",
        ],
    );
    wait_for(
        "the plaintext stream to reach the server",
        Duration::from_secs(10),
        || {
            let out = c.exec("app-2-1", &["ss", "-Htn", "state", "established", "( sport = :9000 )"]);
            (!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(())
        },
    );
    assert!(stream.child.try_wait().unwrap().is_none(), "streaming");

    // Namespace-wide STRICT.
    let since = c.access_records("node2").len();
    let out = c.apply(STRICT);
    assert!(out.status.success(), "{}", text(&out));
    // The open stream is closed, with a record naming the PeerAuthentication.
    let status = wait_for("the plaintext stream to be closed", Duration::from_secs(10), || {
        stream.child.try_wait().unwrap()
    });
    assert!(!status.success(), "the stream ended by error");
    let revoked = plaintext_record(&c, since, "the revoked record", |r| r["reason"] == "revoked");
    assert_eq!(revoked["policy"], "default/default", "{revoked}");
    // New plaintext connections are refused, on every port, naming the policy.
    for url in [&http, &other] {
        assert_ne!(curl(&c, "app-1-2", url), 0, "plaintext refused under STRICT: {url}");
    }
    let refused = plaintext_record(&c, since, "the strict_mtls record", |r| r["reason"] == "strict_mtls");
    assert_eq!(refused["policy"], "default/default", "{refused}");
    // Meshed clients (HBONE, mutual TLS) still connect.
    assert_eq!(curl(&c, "app-1-1", &http), 0, "mTLS accepted under STRICT");

    // A workload policy gives 8080 back to plaintext; 8081 stays STRICT (inherited).
    let out = c.apply(EXEMPT_8080);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("8080 to accept plaintext again", Duration::from_secs(10), || {
        (curl(&c, "app-1-2", &http) == 0).then_some(())
    });
    assert_ne!(curl(&c, "app-1-2", &other), 0, "8081 still STRICT");

    // Removing the namespace's STRICT makes the whole pod PERMISSIVE again.
    let out = c.delete(STRICT);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("8081 to accept plaintext again", Duration::from_secs(10), || {
        (curl(&c, "app-1-2", &other) == 0).then_some(())
    });
}

#[test]
fn an_invalid_peer_authentication_is_refused_by_weftctl_naming_the_field() {
    if !privileged("peer_authentication_invalid") {
        return;
    }
    let c = Cluster::up("e2e-peerauth-bad", &["--pods-per-node", "1"]);
    let bad = STRICT.replace(
        "spec:\n",
        "spec:\n  portLevelMtls:\n    8080:\n      mode: PERMISSIVE\n",
    );
    let out = c.apply(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PeerAuthentication default/default: spec.portLevelMtls: a mesh-wide or namespace-wide policy"),
        "{}",
        text(&out)
    );
}
