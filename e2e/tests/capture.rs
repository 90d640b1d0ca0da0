//! Capture, end to end: real eBPF, real network namespaces, real agents, an unmodified curl.

use std::{collections::BTreeSet, time::Duration};

use serde_json::Value;
use weft_e2e::{Cluster, bin, captured, curl, privileged, text, wait_for};

/// Waits for a node's agent to record a connection in `direction` to `dst`.
fn record_to(c: &Cluster, node: &str, direction: &str, dst: &str) -> Value {
    wait_for(
        &format!("{node}'s {direction} record to {dst}"),
        Duration::from_secs(5),
        || {
            c.access_records(node)
                .into_iter()
                .find(|r| r["direction"] == direction && r["dst.addr"] == dst)
        },
    )
}

/// `weft-probe connect` in a pod: `count` bounded connections, each checked against its port.
fn probe_connect(
    c: &Cluster,
    pod: &str,
    addr: &str,
    ports: &str,
    count: u32,
    concurrency: u32,
) -> std::process::Output {
    let probe = bin("weft-probe");
    let (count, concurrency) = (count.to_string(), concurrency.to_string());
    c.exec(
        pod,
        &[
            probe.to_str().unwrap(),
            "connect",
            "--addr",
            addr,
            "--ports",
            ports,
            "--count",
            &count,
            "--concurrency",
            &concurrency,
        ],
    )
}

fn curl_across_nodes(name: &str, v6: bool) {
    let c = Cluster::up(name, &["--ambient", "default"]);
    let _server = c.serve("app-2-1", "8080");
    let (client_ip, server_ip) = (c.pod_ip("app-1-1", v6), c.pod_ip("app-2-1", v6));
    let (dst, url) = if v6 {
        (format!("[{server_ip}]:8080"), format!("http://[{server_ip}]:8080/"))
    } else {
        (format!("{server_ip}:8080"), format!("http://{server_ip}:8080/"))
    };

    let (code, body, remote) = curl(&c, "app-1-1", &url);
    assert_eq!(code, 0, "curl failed: {body}");
    assert!(
        body.starts_with(&format!(
            "peer={}",
            if v6 {
                format!("[{client_ip}]")
            } else {
                client_ip.clone()
            }
        )),
        "the server must see the client pod's address, saw: {body}"
    );
    assert_eq!(
        remote, server_ip,
        "getpeername must report the original destination to curl"
    );

    let out = record_to(&c, "node1", "outbound", &dst);
    assert_eq!(out["src.workload"], "default/app-1-1");
    assert_eq!(out["reason"], "done");
    let inbound = record_to(&c, "node2", "inbound", &dst);
    assert!(
        inbound["src.addr"].as_str().unwrap_or_default().contains(&client_ip),
        "{inbound:?}"
    );
    assert_eq!(inbound["dst.workload"], "default/app-2-1");
}

#[test]
fn curl_across_nodes_is_captured_on_both_sides_and_server_sees_client_ip() {
    if privileged("curl_across_nodes_ipv4") {
        curl_across_nodes("e2e-curl4", false);
    }
}

#[test]
fn curl_over_ipv6_is_captured_on_both_sides_and_server_sees_client_ip() {
    if privileged("curl_across_nodes_ipv6") {
        curl_across_nodes("e2e-curl6", true);
    }
}

#[test]
fn parallel_connections_to_200_ports_each_reach_their_destination() {
    if !privileged("parallel_200_ports") {
        return;
    }
    let c = Cluster::up("e2e-ports", &["--ambient", "default"]);
    let _server = c.serve("app-2-1", "20000-20199");
    let server_ip = c.pod_ip("app-2-1", false);
    let out = probe_connect(&c, "app-1-1", &server_ip, "20000-20199", 200, 200);
    // weft-probe checks that each answer names the port the connection was made to.
    assert!(out.status.success(), "{}", text(&out));
    let ports = wait_for("200 outbound records", Duration::from_secs(10), || {
        let ports: BTreeSet<String> = c
            .access_records("node1")
            .iter()
            .filter(|r| r["direction"] == "outbound" && r["reason"] == "done")
            .filter_map(|r| r["dst.addr"].as_str().map(str::to_owned))
            .collect();
        (ports.len() >= 200).then_some(ports)
    });
    let expected: BTreeSet<String> = (20000..20200).map(|p| format!("{server_ip}:{p}")).collect();
    assert_eq!(
        ports, expected,
        "each connection's original destination must be recorded exactly"
    );
}

#[test]
fn pods_not_enrolled_are_untouched_and_enrollment_follows_annotations_on_running_pods() {
    if !privileged("enrollment") {
        return;
    }
    // app-X-1 in namespace "mesh" (enrolled), app-X-2 in namespace "plain" (not enrolled).
    let c = Cluster::up("e2e-enroll", &["--namespaces", "mesh,plain", "--ambient", "mesh"]);
    let _server = c.serve("app-2-2", "8080");
    // The server stays out of the mesh whatever its namespace does, so only client capture is seen.
    c.annotate("pod", "app-2-2", "weft.dev/dataplane-mode=none");
    let url = format!("http://{}:8080/", c.pod_ip("app-2-2", false));

    assert!(
        !captured(&c, "app-1-2", &url),
        "a pod in a namespace that is not enrolled was captured"
    );
    assert!(captured(&c, "app-1-1", &url), "an enrolled pod was not captured");

    // Opt the running pod out: new connections stop being captured within 2 seconds.
    c.annotate("pod", "app-1-1", "weft.dev/dataplane-mode=none");
    wait_for("un-enrollment to take effect", Duration::from_secs(2), || {
        (!captured(&c, "app-1-1", &url)).then_some(())
    });
    // And back in, again without restarting anything.
    c.annotate("pod", "app-1-1", "weft.dev/dataplane-mode-");
    wait_for("re-enrollment to take effect", Duration::from_secs(2), || {
        captured(&c, "app-1-1", &url).then_some(())
    });
    // Enrolling a whole namespace on a running cluster.
    c.annotate("namespace", "plain", "weft.dev/dataplane-mode=ambient");
    wait_for("namespace enrollment to take effect", Duration::from_secs(2), || {
        captured(&c, "app-1-2", &url).then_some(())
    });
}

fn map_entries(pin_dir: &str, map: &str) -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", &format!("{pin_dir}/maps/{map}")])
        .output()
        .expect("running bpftool");
    assert!(out.status.success(), "bpftool: {}", text(&out));
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("bpftool JSON")
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn per_connection_map_entries_are_gone_after_10000_short_connections() {
    if !privileged("map_cleanup") {
        return;
    }
    let c = Cluster::up("e2e-maps", &["--ambient", "default"]);
    let _server = c.serve("app-2-1", "8080");
    let out = probe_connect(&c, "app-1-1", &c.pod_ip("app-2-1", false), "8080", 10_000, 32);
    assert!(out.status.success(), "{}", text(&out));
    let pins = c.node("node1")["bpfPinDir"].as_str().unwrap().to_owned();
    wait_for("per-connection entries to be deleted", Duration::from_secs(10), || {
        let left = map_entries(&pins, "WEFT_ORIG_BY_TUPLE") + map_entries(&pins, "WEFT_ORIG_BY_COOKIE");
        (left == 0).then_some(())
    });
    // The maps did hold entries while connections were open: the agent recorded every one.
    let done = c
        .access_records("node1")
        .iter()
        .filter(|r| r["direction"] == "outbound" && r["reason"] == "done")
        .count();
    assert_eq!(done, 10000);
}

fn attach_types(cgroup: &str) -> Vec<String> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show", cgroup])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool: {}", text(&out));
    let mut types: Vec<String> = serde_json::from_slice::<Value>(&out.stdout)
        .expect("bpftool JSON")
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["attach_type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    types.sort();
    types
}

fn sk_lookup_links(netns: &str) -> usize {
    let ino = std::fs::metadata(format!("/var/run/netns/{netns}"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .expect("bpftool");
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("bpftool JSON")
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|l| l["type"] == "netns" && l["netns_ino"] == ino)
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_restarted_agent_captures_again_with_one_attachment_and_connections_are_refused_while_it_is_down() {
    if !privileged("agent_restart") {
        return;
    }
    let c = Cluster::up("e2e-restart", &["--ambient", "default"]);
    let _server = c.serve("app-2-1", "8080");
    let _local_server = c.serve("app-1-1", "8080");
    let url = format!("http://{}:8080/", c.pod_ip("app-2-1", false));
    let node = c.node("node1");
    let cgroup = node["cgroup"].as_str().unwrap().to_owned();
    let before = attach_types(&cgroup);
    assert_eq!(
        before,
        [
            "cgroup_inet4_connect",
            "cgroup_inet4_getpeername",
            "cgroup_inet6_connect",
            "cgroup_inet6_getpeername",
            "cgroup_getsockopt",
            "cgroup_sock_ops"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>(),
        "one attachment of each capture program"
    );

    c.kill_agent("node1");

    // While it is down, captured connections are refused, never sent around the agent.
    let inbound_before = c.access_records("node2").len();
    let (code, body, _) = curl(&c, "app-1-1", &url);
    assert_eq!(
        code, 7,
        "curl must fail to connect (refused) while the agent is down, got {code}: {body}"
    );
    // Inbound to an enrolled pod on the stopped node is refused too, although its server listens.
    let (code, body, _) = curl(&c, "app-2-2", &format!("http://{}:8080/", c.pod_ip("app-1-1", false)));
    assert_ne!(
        code, 0,
        "inbound to a pod whose agent is down must be refused, got: {body}"
    );
    assert!(
        !c.access_records("node2")
            .iter()
            .skip(inbound_before)
            .any(|r| r["direction"] == "inbound"),
        "nothing reached the server's node"
    );

    let out = weft_e2e::weftctl(&["dev", "start-agent", "--name", &c.name, "node1"]);
    assert!(out.status.success(), "{}", text(&out));
    let (code, body, _) = curl(&c, "app-1-1", &url);
    assert_eq!(code, 0, "after restart: {body}");
    assert!(body.starts_with(&format!("peer={}", c.pod_ip("app-1-1", false))));
    assert_eq!(
        attach_types(&cgroup),
        before,
        "restart must not attach the programs again"
    );
    assert_eq!(
        sk_lookup_links("weft.e2e-restart.app-1-1"),
        1,
        "one inbound steering link per pod"
    );
}
