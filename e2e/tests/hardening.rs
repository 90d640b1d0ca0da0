//! Fail closed, end to end: what a pod, a peer or a new user can do to an enrolled pod's capture.
//! Real eBPF, real network namespaces, real agents.

use std::{
    io::Read as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use weft_e2e::{Cluster, bin, privileged, text, wait_for};

/// `curl URL` in a pod: its exit code and how long it took.
fn timed_curl(c: &Cluster, pod: &str, url: &str) -> (i32, Duration) {
    let started = Instant::now();
    let out = c.exec(pod, &["curl", "-sS", "-m", "5", "-o", "/dev/null", url]);
    (out.status.code().unwrap_or(-1), started.elapsed())
}

/// File descriptors the agent of `node` holds.
fn agent_fds(c: &Cluster, node: &str) -> usize {
    let pid = c.node(node)["agent"]["pid"].as_i64().expect("agent pid");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// curl's exit code for "could not connect": the kernel refused the connect.
const CURL_COULDNT_CONNECT: i32 = 7;

#[test]
fn the_agent_is_never_its_own_upstream() {
    if !privileged("agent_never_its_own_upstream") {
        return;
    }
    // app-X-1 in the enrolled namespace `default`, app-X-2 in `plain`, outside the mesh.
    let c = Cluster::up(
        "e2e-selfloop",
        &["--namespaces", "default,plain", "--ambient", "default"],
    );
    let _server = c.serve("app-2-1", "8080");
    let fds_before = agent_fds(&c, "node1");
    let own_ip = c.pod_ip("app-1-1", false);

    // From inside an enrolled pod, the agent's ports on loopback or the unspecified address: refused
    // by the capture programs at connect, before any agent sees the connection.
    for url in [
        "http://127.0.0.1:15006/",
        "http://127.0.0.1:15001/",
        "http://127.0.0.1:15008/",
        "http://0.0.0.0:15006/",
        "http://[::1]:15006/",
        "http://[::]:15001/",
    ] {
        let (code, took) = timed_curl(&c, "app-1-1", url);
        assert_eq!(code, CURL_COULDNT_CONNECT, "{url} from an enrolled pod must be refused");
        assert!(took < Duration::from_secs(2), "{url}: refused only after {took:?}");
    }
    // The pod's own address on 15006 goes through the agent, which refuses to proxy to itself.
    let url = format!("http://{own_ip}:15006/");
    let (code, took) = timed_curl(&c, "app-1-1", &url);
    assert_ne!(code, 0, "{url} from the pod itself must not be served");
    assert!(took < Duration::from_secs(2), "{url}: ended only after {took:?}");

    // From outside the mesh, an enrolled pod's 15006 and 15001 are no plaintext targets.
    for port in [15006, 15001] {
        let url = format!("http://{own_ip}:{port}/");
        let (code, took) = timed_curl(&c, "app-2-2", &url);
        assert_eq!(
            code, CURL_COULDNT_CONNECT,
            "{url} from outside the mesh must be refused"
        );
        assert!(took < Duration::from_secs(2), "{url}: refused only after {took:?}");
    }

    // The agent did not spiral, and keeps serving.
    let fds_after = agent_fds(&c, "node1");
    assert!(
        fds_after < fds_before + 20,
        "the agent's file descriptors grew from {fds_before} to {fds_after}"
    );
    let server = format!("http://{}:8080/", c.pod_ip("app-2-1", false));
    let (code, _) = timed_curl(&c, "app-1-1", &server);
    assert_eq!(code, 0, "a normal connection after the refusals");

    // A user piping output into a reader that stops early: no panic, nothing on stderr.
    let mut child = Command::new(bin("weftctl"))
        .args(["dev", "status", "--name", &c.name, "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weftctl");
    drop(child.stdout.take()); // the reader is gone before weftctl writes
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("reading stderr");
    let _ = child.wait();
    assert!(
        stderr.is_empty(),
        "weftctl into a closed pipe must end quietly, said: {stderr}"
    );
}

#[test]
fn a_pod_cannot_opt_out_by_setting_the_agents_socket_mark() {
    if !privileged("socket_mark_opt_out") {
        return;
    }
    let c = Cluster::up("e2e-mark", &["--namespaces", "default,plain", "--ambient", "default"]);
    // The server is outside the mesh: its agent does not reconnect, so the source port it sees tells
    // whether the client's agent did (captured) or the client itself (not captured).
    let _server = c.serve("app-2-2", "8080");
    let addr = format!("{}:8080", c.pod_ip("app-2-2", false));
    let probe = bin("weft-probe");
    let probe = probe.to_str().expect("utf-8 path");
    let captured = |args: &[&str]| -> bool {
        let out = c.exec("app-1-1", &[&[probe, "get", "--addr", &addr], args].concat());
        assert!(out.status.success(), "weft-probe get: {}", text(&out));
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let local = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("local_port="))
            .expect("local port");
        let seen = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("peer="))
            .and_then(|p| p.rsplit_once(':'))
            .map(|(_, port)| port.to_owned())
            .expect("the server names the peer");
        seen != local
    };
    assert!(captured(&[]), "an ordinary connection from an enrolled pod is captured");
    for mark in ["0x539", "0x1539", "0xfffff539"] {
        assert!(
            captured(&["--mark", mark]),
            "a socket marked {mark} (the agent's tag) must still be captured"
        );
    }
}

#[test]
fn a_closed_port_on_an_enrolled_pod_is_refused_at_once() {
    if !privileged("closed_port_refused") {
        return;
    }
    let c = Cluster::up("e2e-closed", &["--ambient", "default"]);
    let _server = c.serve("app-2-1", "8080");
    let ip = c.pod_ip("app-2-1", false);
    let ip6 = c.pod_ip("app-2-1", true);
    // Nothing listens on 9 in app-2-1: without the mesh curl is refused at once.
    for url in [format!("http://{ip}:9/"), format!("http://[{ip6}]:9/")] {
        let (code, took) = timed_curl(&c, "app-1-1", &url);
        assert_ne!(code, 0, "{url}: nothing listens there");
        assert!(
            took < Duration::from_secs(2),
            "{url}: the refusal must reach the client at once, took {took:?} (curl exit {code})"
        );
    }
    let record = wait_for("node2's record of the refused port", Duration::from_secs(5), || {
        c.access_records("node2")
            .into_iter()
            .find(|r| r["direction"] == "inbound" && r["dst.addr"] == format!("{ip}:9"))
    });
    assert_eq!(record["reason"], "upstream_connect", "{record}");
    assert!(
        record["duration_ms"].as_u64().unwrap_or(u64::MAX) < 1000,
        "the destination's agent learned of the refusal at once: {record}"
    );
    // The open port still works.
    let (code, _) = timed_curl(&c, "app-1-1", &format!("http://{ip}:8080/"));
    assert_eq!(code, 0);
}

/// The pod `name` as a Kubernetes object, as `weftctl dev status` describes it, with `labels` added.
fn pod_with_labels(c: &Cluster, name: &str, labels: &[(&str, &str)]) -> String {
    let status = c.status();
    let pod = status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["name"] == name)
        .expect("pod")
        .clone();
    let mut all = pod["labels"].as_object().cloned().unwrap_or_default();
    for (k, v) in labels {
        all.insert((*k).to_owned(), (*v).into());
    }
    let ips: Vec<_> = pod["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|ip| serde_json::json!({ "ip": ip }))
        .collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod["name"], "namespace": pod["namespace"], "uid": pod["uid"],
            "labels": all, "annotations": pod["annotations"],
        },
        "spec": { "nodeName": pod["node"], "serviceAccountName": pod["serviceAccount"] },
        "status": { "podIPs": ips },
    })
    .to_string()
}

#[test]
fn a_label_change_is_applied_in_place_and_decides_the_next_stream_of_a_pooled_tunnel() {
    if !privileged("label_change_in_place") {
        return;
    }
    let c = Cluster::up("e2e-relabel", &["--ambient", "default"]);
    let _server = c.serve("app-2-1", "8080");
    let url = format!("http://{}:8080/", c.pod_ip("app-2-1", false));
    // Opens the HBONE connection between the two pods' agents; the pool keeps it for the next streams.
    assert_eq!(timed_curl(&c, "app-1-1", &url).0, 0);
    let lock = "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: lock\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      tier: locked\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"default\"]\n";
    let out = c.apply(lock);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(timed_curl(&c, "app-1-1", &url).0, 0, "the policy selects no pod yet");

    let out = c.apply(&pod_with_labels(&c, "app-2-1", &[("tier", "locked")]));
    assert!(out.status.success(), "{}", text(&out));
    // The next stream on the pooled connection is decided with the pod's new labels.
    wait_for("the relabelled pod to be locked", Duration::from_secs(10), || {
        (timed_curl(&c, "app-1-1", &url).0 != 0).then_some(())
    });
    let denied = wait_for("node2's denied record", Duration::from_secs(5), || {
        c.access_records("node2")
            .into_iter()
            .find(|r| r["direction"] == "inbound" && r["reason"] == "denied")
    });
    assert_eq!(denied["policy"], "default/lock", "{denied}");

    // Applied in place: the pod was never unenrolled (no moment uncaptured, no listener re-bound).
    let log = c.agent_log("node2");
    let about_pod = |message: &str| {
        log.iter()
            .filter(|l| l["message"] == message && l["pod"] == "default/app-2-1")
            .count()
    };
    assert_eq!(about_pod("unenrolled"), 0, "a label change must not unenroll the pod");
    assert_eq!(about_pod("enrolled"), 1, "enrolled once, at start");
    assert!(about_pod("updated in place") >= 1, "the change is applied in place");

    // `weftctl dev annotate` changes one annotation of the object the store holds: the label set with
    // `weftctl apply` stays, and so does the lock.
    c.annotate("pod", "app-2-1", "example.com/note=kept");
    let out = weft_e2e::weftctl(&["get", "pods", "-n", "default", "--cluster", &c.name]);
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        yaml.contains("tier: locked") && yaml.contains("example.com/note: kept"),
        "{}",
        text(&out)
    );
    assert_ne!(
        timed_curl(&c, "app-1-1", &url).0,
        0,
        "still locked after the annotation"
    );
}

/// Starts a stopped node's agent again and waits until it says it is ready.
fn start_agent(c: &Cluster, node: &str) {
    let out = weft_e2e::weftctl(&["dev", "start-agent", "--name", &c.name, node]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Whether anything from `client_ip` reached node2's agent in plaintext since `since` records.
fn plaintext_from(c: &Cluster, client_ip: &str, since: usize) -> bool {
    c.access_records("node2").iter().skip(since).any(|r| {
        r["mode"] == "plaintext"
            && r["src.addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{client_ip}:")))
    })
}

#[test]
fn a_pod_whose_reenrollment_fails_stays_captured_and_is_refused_until_the_agent_can_serve_it() {
    if !privileged("reenrollment_fails_closed") {
        return;
    }
    let c = Cluster::up("e2e-squat", &["--ambient", "default"]);
    let _server = c.serve("app-2-1", "8080");
    let url = format!("http://{}:8080/", c.pod_ip("app-2-1", false));
    let client_ip = c.pod_ip("app-1-1", false);
    assert_eq!(timed_curl(&c, "app-1-1", &url).0, 0);

    // While the agent is away, the application takes the agent's HBONE port in its own pod.
    c.kill_agent("node1");
    let squatter = c.echo("app-1-1", 15008);
    start_agent(&c, "node1");
    let records = c.access_records("node2").len();
    let (code, _) = timed_curl(&c, "app-1-1", &url);
    assert_ne!(
        code, 0,
        "the pod could not be enrolled again: its connection must be refused"
    );
    assert!(
        !plaintext_from(&c, &client_ip, records),
        "nothing may leave the pod around the agent"
    );
    let said = c.agent_log("node1").iter().any(|l| {
        l["message"] == "enrolling pod; will retry" && l["error"].as_str().is_some_and(|e| e.contains("15008"))
    });
    assert!(said, "the agent says why the pod is not served");

    // The port is free again: the agent enrolls the pod on its next attempt.
    drop(squatter);
    wait_for("the pod to be served again", Duration::from_secs(10), || {
        (timed_curl(&c, "app-1-1", &url).0 == 0).then_some(())
    });
    assert!(!plaintext_from(&c, &client_ip, records));
}

#[test]
fn capture_survives_a_corrupt_or_missing_pod_network_state() {
    if !privileged("lost_state_fails_closed") {
        return;
    }
    let c = Cluster::up("e2e-lost", &["--ambient", "default"]);
    let _server = c.serve("app-2-1", "8080");
    let url = format!("http://{}:8080/", c.pod_ip("app-2-1", false));
    let client_ip = c.pod_ip("app-1-1", false);
    assert_eq!(timed_curl(&c, "app-1-1", &url).0, 0);
    let state = std::path::PathBuf::from(c.node("node1")["agent"]["stateDir"].as_str().expect("agent state dir"))
        .join("pod-networks.json");
    assert!(state.exists(), "{} written", state.display());

    for (what, lose) in [
        (
            "corrupt",
            Box::new(|p: &std::path::Path| std::fs::write(p, b"{\"truncated").unwrap())
                as Box<dyn Fn(&std::path::Path)>,
        ),
        (
            "missing",
            Box::new(|p: &std::path::Path| {
                let _ = std::fs::remove_file(p);
            }),
        ),
    ] {
        c.kill_agent("node1");
        lose(&state);
        let log_before = c.agent_log("node1").len();
        start_agent(&c, "node1");
        let records = c.access_records("node2").len();
        let (code, _) = timed_curl(&c, "app-1-1", &url);
        assert_ne!(code, 0, "{what} state: the pod stays captured, its connection refused");
        assert!(
            !plaintext_from(&c, &client_ip, records),
            "{what} state: nothing may leave the pod around the agent"
        );
        let loud = c
            .agent_log("node1")
            .iter()
            .skip(log_before)
            .any(|l| l["level"] == "ERROR" && l["message"].as_str().is_some_and(|m| m.contains("stay captured")));
        assert!(loud, "{what} state: the agent says so loudly");
    }
    assert!(
        state.with_extension("json.unreadable").exists(),
        "the unreadable file is kept for an operator"
    );
}

#[test]
fn agents_keep_their_config_when_the_controller_comes_back_with_a_lost_store() {
    if !privileged("lost_store_keeps_config") {
        return;
    }
    let c = Cluster::up("e2e-lost-store", &["--ambient", "default"]);
    let _server = c.serve("app-2-1", "8080");
    let server_ip = c.pod_ip("app-2-1", false);
    let url = format!("http://{server_ip}:8080/");
    assert_eq!(timed_curl(&c, "app-1-1", &url).0, 0);

    // The controller's store is lost (its CA is kept, so agents still trust and reach it).
    c.kill_controller();
    let state_dir = std::path::PathBuf::from(c.status()["controller"]["root"].as_str().expect("root path"))
        .parent()
        .expect("state dir")
        .to_path_buf();
    std::fs::remove_file(state_dir.join("store.json")).expect("removing the store");
    c.start_controller();

    // Both agents refuse the empty store and say so...
    for node in ["node1", "node2"] {
        wait_for(
            &format!("{node} to refuse the new store"),
            Duration::from_secs(15),
            || {
                c.agent_log(node)
                    .iter()
                    .any(|l| {
                        l["level"] == "ERROR"
                            && l["error"]
                                .as_str()
                                .is_some_and(|e| e.contains("not the one this agent follows"))
                    })
                    .then_some(())
            },
        );
    }
    // ...and the mesh goes on: the pods are still captured, in mutual TLS.
    let outbound_before = c.access_records("node1").len();
    assert_eq!(timed_curl(&c, "app-1-1", &url).0, 0);
    let record = wait_for("node1's outbound record", Duration::from_secs(5), || {
        c.access_records("node1")
            .into_iter()
            .skip(outbound_before)
            .find(|r| r["direction"] == "outbound" && r["dst.addr"] == format!("{server_ip}:8080"))
    });
    assert_eq!(record["mode"], "hbone", "{record}");
}

/// Connections to `port` in `pod`'s network namespace that are established, as `ss` counts them.
fn established(c: &Cluster, pod: &str, port: u16) -> usize {
    let filter = format!("( sport = :{port} )");
    let out = c.exec(pod, &["ss", "-Htn", "state", "established", &filter]);
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn open_connections_a_new_policy_denies_are_closed_with_a_record_saying_so() {
    if !privileged("policy_revokes_open_connections") {
        return;
    }
    // app-X-1 enrolled (`default`), app-X-2 outside the mesh (`plain`).
    let c = Cluster::up("e2e-revoke", &["--namespaces", "default,plain", "--ambient", "default"]);
    let _echo = c.echo("app-2-1", 9000);
    let server = format!("{}:9000", c.pod_ip("app-2-1", false));
    let probe = bin("weft-probe");
    let probe = probe.to_str().expect("utf-8 path");
    let stream = |pod: &str| c.spawn(pod, &[probe, "stream", "--addr", &server, "--seconds", "60"]);
    // One over HBONE from an enrolled pod, one in plaintext from outside the mesh.
    let mut clients = [stream("app-1-1"), stream("app-1-2")];
    // Both reach the application (the agent's connections to it, from the clients' addresses).
    wait_for("both streams to reach the server", Duration::from_secs(10), || {
        (established(&c, "app-2-1", 9000) >= 2).then_some(())
    });
    for client in &mut clients {
        assert!(
            client.child.try_wait().unwrap().is_none(),
            "streaming until a policy says otherwise"
        );
    }

    let deny = "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-9000\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: app-2-1\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"9000\"]\n";
    let out = c.apply(deny);
    assert!(out.status.success(), "{}", text(&out));

    // Both are cut: the clients see their streams fail long before the 60 s they asked for.
    for (client, what) in clients.iter_mut().zip(["HBONE", "plaintext"]) {
        let status = wait_for(
            &format!("the {what} stream to be closed"),
            Duration::from_secs(10),
            || client.child.try_wait().unwrap(),
        );
        assert!(!status.success(), "the {what} stream ended by error");
    }
    let revoked: Vec<_> = wait_for("node2's two revoked records", Duration::from_secs(5), || {
        let r: Vec<_> = c
            .access_records("node2")
            .into_iter()
            .filter(|r| r["direction"] == "inbound" && r["reason"] == "revoked")
            .collect();
        (r.len() >= 2).then_some(r)
    });
    let modes: std::collections::BTreeSet<_> = revoked
        .iter()
        .map(|r| r["mode"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(modes, ["hbone", "plaintext"].map(str::to_owned).into(), "{revoked:?}");
    assert!(revoked.iter().all(|r| r["policy"] == "default/no-9000"), "{revoked:?}");
    // New connections are refused too.
    let (code, _) = timed_curl(&c, "app-1-1", &format!("http://{server}/"));
    assert_ne!(code, 0);
}

/// Resident memory of the agent of `node`, in KiB.
fn agent_rss_kib(c: &Cluster, node: &str) -> u64 {
    let pid = c.node(node)["agent"]["pid"].as_i64().expect("agent pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_plaintext_flood_from_one_source_costs_the_agent_a_bounded_share_and_others_are_served() {
    if !privileged("plaintext_flood") {
        return;
    }
    // app-1-1 enrolled (`default`) on node1; app-2-2 (node2) and app-1-2 (node1) outside the mesh.
    let c = Cluster::up("e2e-pflood", &["--namespaces", "default,plain", "--ambient", "default"]);
    let _echo = c.echo("app-1-1", 9000);
    let _http = c.serve("app-1-1", "8080");
    let ip = c.pod_ip("app-1-1", false);
    let (fds_before, rss_before) = (agent_fds(&c, "node1"), agent_rss_kib(&c, "node1"));

    // 10,000 plaintext connections from one source, each steered to node1's agent (15006).
    let probe = bin("weft-probe");
    let target = format!("{ip}:9000");
    let mut flood = c.spawn(
        "app-2-2",
        &[
            probe.to_str().expect("utf-8 path"),
            "flood",
            "--addr",
            &target,
            "--connections",
            "10000",
            "--hold",
            "120",
        ],
    );
    let mut line = String::new();
    let stdout = flood.child.stdout.take().expect("piped stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("reading the flood");
    let summary: serde_json::Value = serde_json::from_str(
        line.strip_prefix("holding ")
            .unwrap_or_else(|| panic!("flood said {line:?}")),
    )
    .expect("flood summary");
    // One source holds its share (512), the rest is refused at once: none hangs.
    assert_eq!(summary["served"], 512, "{summary}");
    assert_eq!(summary["stalled"], 0, "{summary}");
    assert_eq!(summary["refused"], 10_000 - 512, "{summary}");

    // While the share is held: the agent's cost is bounded, and another source is served at once.
    let (fds_during, rss_during) = (agent_fds(&c, "node1"), agent_rss_kib(&c, "node1"));
    assert!(
        fds_during <= fds_before + 2 * 512 + 64,
        "agent fds {fds_before} -> {fds_during} while one source floods"
    );
    assert!(
        rss_during <= rss_before + 16 * 1024,
        "agent RSS {rss_before} -> {rss_during} KiB while one source floods"
    );
    let (code, took) = timed_curl(&c, "app-1-2", &format!("http://{ip}:8080/"));
    assert_eq!(
        code, 0,
        "a plaintext client from another source is served during the flood"
    );
    assert!(took < Duration::from_secs(2), "served at once, took {took:?}");

    // The flood ends: its connections and their file descriptors go back.
    drop(flood);
    wait_for("the agent's fds to return to baseline", Duration::from_secs(10), || {
        (agent_fds(&c, "node1") <= fds_before + 8).then_some(())
    });
}
