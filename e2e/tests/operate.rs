//! Operating a node: the agent's HTTP endpoints, reached as an operator on the node reaches them.

use std::{process::Command, time::Duration};

use serde_json::Value;
use weft_e2e::{Cluster, privileged, text, wait_for, weftctl};

/// `curl` inside network namespace `netns`: (HTTP status, body); status 0 when nothing answered.
fn curl_in(netns: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .output()
        .expect("running curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn agent_endpoints_serve_readiness_metrics_and_admin_on_the_node() {
    if !privileged("agent_endpoints") {
        return;
    }
    let c = Cluster::up(
        "e2e-endpoints",
        &["--nodes", "1", "--pods-per-node", "2", "--ambient", "default"],
    );
    let node = c.node("node1");
    let netns = node["netns"].as_str().expect("node netns").to_owned();
    let ip = node["ips"][0].as_str().expect("node address").to_owned();
    let at = |port: u16, path: &str| format!("http://{ip}:{port}{path}");

    // Readiness and metrics on the node's address, as kubelet and Prometheus reach them.
    assert_eq!(
        curl_in(&netns, &[&at(15021, "/healthz/ready")]),
        (200, "ready\n".to_owned())
    );
    let (status, metrics) = curl_in(&netns, &[&at(15020, "/metrics")]);
    assert_eq!(status, 200, "{metrics}");
    assert!(metrics.contains("process_resident_memory_bytes "), "{metrics}");
    assert!(metrics.contains("weft_build_info{version=\""), "{metrics}");
    // The admin API is on loopback only: the node's address refuses it.
    assert_eq!(curl_in(&netns, &[&at(15000, "/config_dump")]).0, 0);

    let admin = |path: &str| format!("http://127.0.0.1:15000{path}");
    // Certificates are fetched as pods enroll, not before the agent is ready: wait for it.
    let dump = wait_for(
        "the node's certificate in /config_dump",
        Duration::from_secs(10),
        || {
            let (status, dump) = curl_in(&netns, &[&admin("/config_dump")]);
            assert_eq!(status, 200, "{dump}");
            let dump: Value = serde_json::from_str(&dump).expect("config_dump is JSON");
            (dump["certificates"][0]["state"] == "valid").then_some(dump)
        },
    );
    assert_eq!(dump["config"]["node"], "node1");
    assert_eq!(dump["state"]["synced"], true);
    let mut pods: Vec<(&str, &str)> = dump["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["identity"].as_str().unwrap()))
        .collect();
    pods.sort();
    let identity = "spiffe://cluster.local/ns/default/sa/default";
    assert_eq!(pods, [("default/app-1-1", identity), ("default/app-1-2", identity)]);
    let workloads: Vec<&str> = dump["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(workloads, ["default/app-1-1", "default/app-1-2"]);
    // The node's certificate for its pods' identity, without its key.
    let certs = dump["certificates"].as_array().expect("certificates");
    assert_eq!(certs.len(), 1, "{certs:?}");
    assert_eq!(certs[0]["identity"], identity);
    assert_eq!(certs[0]["state"], "valid");
    assert_eq!(certs[0]["chain"][0]["uris"][0], identity);
    assert!(certs[0]["serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(certs[0]["renews_in_s"].as_i64().unwrap() > 0);
    let whole = dump.to_string();
    assert!(
        !whole.contains("PRIVATE KEY") && !whole.contains("\"key\""),
        "no key in the dump"
    );

    // weftctl's node views show the same, as tables and as JSON, live and from a saved dump.
    let node_cmd = |args: &[&str]| {
        let out = weftctl(&[&["node"], args, &["--name", &c.name, "--node", "node1"]].concat());
        assert!(out.status.success(), "weftctl node {args:?}: {}", text(&out));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let table = node_cmd(&["workloads"]);
    assert!(table.starts_with("NAMESPACE/NAME"), "{table}");
    for pod in ["default/app-1-1", "default/app-1-2"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(pod) && l.contains(identity) && l.contains(" yes ")),
            "{pod} in:\n{table}"
        );
    }
    let json: Value = serde_json::from_str(&node_cmd(&["workloads", "-o", "json"])).expect("JSON");
    assert_eq!(json, dump["workloads"]);
    let certs = node_cmd(&["certs"]);
    assert!(
        certs
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(identity) && l.contains("valid")),
        "{certs}"
    );
    let pods_table = node_cmd(&["pods"]);
    assert_eq!(
        pods_table.lines().filter(|l| l.ends_with("enrolled")).count(),
        2,
        "{pods_table}"
    );
    let saved = std::env::temp_dir().join(format!("weft-e2e-dump-{}.json", std::process::id()));
    std::fs::write(&saved, node_cmd(&["config-dump"])).unwrap();
    let from_file = weftctl(&["node", "workloads", "--file", saved.to_str().unwrap()]);
    std::fs::remove_file(&saved).unwrap();
    assert!(from_file.status.success(), "{}", text(&from_file));
    assert_eq!(
        String::from_utf8_lossy(&from_file.stdout),
        table,
        "the saved dump prints the same"
    );
    let policies = node_cmd(&["policies", "-o", "yaml"]);
    assert!(policies.contains("authorization_policies:"), "{policies}");
    // A node that is not there, and an agent that is not there, are named.
    let out = weftctl(&["node", "workloads", "--name", &c.name, "--node", "node9"]);
    assert!(text(&out).contains("has no node \"node9\""), "{}", text(&out));
    let out = weftctl(&["node", "workloads", "--admin", "127.0.0.1:1"]);
    assert!(
        text(&out).contains("the agent's admin API is not reachable at 127.0.0.1:1"),
        "{}",
        text(&out)
    );

    // One object of the store by name.
    let out = weftctl(&["get", "pod", "app-1-1", "-n", "default", "--cluster", &c.name]);
    assert!(out.status.success(), "{}", text(&out));
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(yaml.contains("name: app-1-1") && !yaml.contains("app-1-2"), "{yaml}");
    let out = weftctl(&["get", "pod", "nosuch", "--cluster", &c.name]);
    assert!(
        !out.status.success() && text(&out).contains("pod \"nosuch\" not found"),
        "{}",
        text(&out)
    );

    // The log level changes at run time: a config push is logged at debug only.
    let pushes = || {
        c.agent_log("node1")
            .iter()
            .filter(|l| l["message"] == "config push")
            .count()
    };
    let namespace = |n: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {n}\n");
    assert_eq!(
        node_cmd(&["log-level", "debug"]),
        "log filter: debug\n",
        "weftctl node log-level sets it"
    );
    let before = pushes();
    assert!(c.apply(&namespace("loud")).status.success());
    wait_for("a config push logged at debug", Duration::from_secs(10), || {
        (pushes() > before).then_some(())
    });
    assert_eq!(
        curl_in(&netns, &["-X", "POST", &admin("/logging?level=dbug")]).0,
        400,
        "a mistyped level is refused"
    );
    assert_eq!(curl_in(&netns, &[&admin("/logging")]).1, "log filter: debug\n");

    // /quitquitquit stops the agent as a restart: capture stays attached.
    assert_eq!(curl_in(&netns, &["-X", "POST", &admin("/quitquitquit")]).0, 200);
    wait_for("the agent to stop", Duration::from_secs(10), || {
        (!c.node("node1")["agent"]["running"].as_bool().unwrap_or(true)).then_some(())
    });
    let log = c.agent_log("node1");
    assert!(
        log.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("shutting down for a restart"))
            && l["reason"].as_str().is_some_and(|r| r.starts_with("/quitquitquit"))),
        "no restart line for /quitquitquit"
    );
}

/// The sum of counter `name` over the series that carry every one of `labels`.
fn counter(metrics: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn connection_metrics_move_by_each_connection_and_its_bytes_at_both_ends() {
    if !privileged("connection_metrics") {
        return;
    }
    let c = Cluster::up(
        "e2e-tcpmetrics",
        &["--nodes", "2", "--pods-per-node", "1", "--ambient", "default"],
    );
    let _server = c.serve("app-2-1", "8080");
    let scrape = |node: &str| {
        let n = c.node(node);
        let (netns, ip) = (n["netns"].as_str().unwrap(), n["ips"][0].as_str().unwrap());
        let (status, text) = curl_in(netns, &[&format!("http://{ip}:15020/metrics")]);
        assert_eq!(status, 200, "{node}: {text}");
        text
    };
    let (source, destination) = (
        [
            ("reporter", "source"),
            ("source_workload", "app-1-1"),
            ("destination_workload", "app-2-1"),
        ],
        [
            ("reporter", "destination"),
            ("source_workload", "app-1-1"),
            ("destination_workload", "app-2-1"),
        ],
    );
    let before = [scrape("node1"), scrape("node2")];

    let server_ip = c.pod_ip("app-2-1", false);
    let probe = weft_e2e::bin("weft-probe");
    let out = c.exec(
        "app-1-1",
        &[
            probe.to_str().unwrap(),
            "connect",
            "--addr",
            &server_ip,
            "--ports",
            "8080",
            "--count",
            "100",
            "--concurrency",
            "4",
        ],
    );
    assert!(out.status.success(), "{}", weft_e2e::text(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("the probe's summary");
    assert_eq!(summary["ok"], 100);
    let (request, response) = (
        summary["bytes_sent"].as_u64().unwrap(),
        summary["bytes_received"].as_u64().unwrap(),
    );

    for (node, series, before) in [
        ("node1", &source[..], &before[0]),
        ("node2", &destination[..], &before[1]),
    ] {
        let delta = |text: &str, name: &str| counter(text, name, series) - counter(before, name, series);
        // Closed is counted as each connection's last byte is through; wait for the hundredth.
        let after = wait_for(
            &format!("{node}'s 100 closed connections"),
            Duration::from_secs(10),
            || {
                let text = scrape(node);
                (delta(&text, "istio_tcp_connections_closed_total") >= 100).then_some(text)
            },
        );
        let labels = format!("{series:?}");
        assert_eq!(
            delta(&after, "istio_tcp_connections_opened_total"),
            100,
            "{node} {labels}"
        );
        assert_eq!(
            delta(&after, "istio_tcp_connections_closed_total"),
            100,
            "{node} {labels}"
        );
        assert_eq!(
            delta(&after, "istio_tcp_received_bytes_total"),
            request,
            "{node}: the requests' bytes"
        );
        assert_eq!(
            delta(&after, "istio_tcp_sent_bytes_total"),
            response,
            "{node}: the responses' bytes"
        );
        let flags = [
            series,
            &[("connection_security_policy", "mutual_tls"), ("response_flags", "-")],
        ]
        .concat();
        assert_eq!(
            counter(&after, "istio_tcp_connections_closed_total", &flags)
                - counter(before, "istio_tcp_connections_closed_total", &flags),
            100
        );
    }
}
