//! `weft-cni` as a container runtime calls it: environment, stdin configuration, JSON on stdout.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixListener,
    process::{Command, Output, Stdio},
};

use serde_json::{Value, json};

fn cni(command: &str, conf: &Value) -> (Output, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", "/var/run/netns/test-pod")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart;K8S_POD_UID=uid-1",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, json)
}

fn conf(socket: &str, prev: bool) -> Value {
    let mut c = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "weft-cni", "agentSocket": socket});
    if prev {
        c["prevResult"] =
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/24"}, {"address": "fd00::5/64"}]});
    }
    c
}

#[test]
fn version_lists_supported_versions() {
    let (out, v) = cni("VERSION", &json!({"cniVersion": "1.0.0"}));
    assert!(out.status.success());
    assert!(v["supportedVersions"].as_array().unwrap().contains(&json!("1.0.0")));
}

#[test]
fn add_reports_the_pod_to_the_agent_and_passes_the_previous_result_through() {
    let dir = std::env::temp_dir().join(format!("weft-cni-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("agent.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let agent = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        (&stream).write_all(b"{\"ok\":true}\n").unwrap();
        serde_json::from_str::<Value>(&line).unwrap()
    });
    let (out, result) = cni("ADD", &conf(socket.to_str().unwrap(), true));
    let event = agent.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "{result}");
    assert_eq!(
        event,
        json!({"event": "add", "uid": "uid-1", "namespace": "shop", "name": "cart",
               "netns": "/var/run/netns/test-pod", "ips": ["10.244.1.5", "fd00::5"]})
    );
    assert_eq!(
        result["ips"][0]["address"], "10.244.1.5/24",
        "prevResult must pass through unchanged"
    );
}

#[test]
fn add_fails_with_try_again_later_when_the_agent_is_not_there() {
    let (out, err) = cni("ADD", &conf("/nonexistent/weft/cni.sock", true));
    assert!(!out.status.success());
    assert_eq!(err["code"], 11, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("not reachable"), "{err}");
}

#[test]
fn add_without_a_previous_result_is_a_configuration_error() {
    let (out, err) = cni("ADD", &conf("/nonexistent", false));
    assert!(!out.status.success());
    assert_eq!(err["code"], 7, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("chained plugin"), "{err}");
}

#[test]
fn del_succeeds_even_without_an_agent() {
    let (out, _) = cni("DEL", &conf("/nonexistent", false));
    assert!(out.status.success());
}
