//! The dev cluster as a user drives it: up, status, exec, down, and bad input.

use std::{path::Path, time::Duration};

use weft_e2e::{Cluster, privileged, text, wait_for, weftctl};

fn leftovers(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    let prefix = format!("weft.{name}.");
    for e in std::fs::read_dir("/var/run/netns").into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) {
            found.push(format!("netns {n}"));
        }
    }
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let cg = Path::new(root).join(format!("weft.{name}"));
        if cg.exists() {
            found.push(format!("cgroup {}", cg.display()));
        }
    }
    let pins = Path::new("/sys/fs/bpf/weft").join(name);
    if pins.exists() {
        found.push(format!("bpffs {}", pins.display()));
    }
    found
}

#[test]
fn up_then_down_leaves_no_netns_cgroup_pin_or_process_behind() {
    if !privileged("up_down") {
        return;
    }
    let name = "e2e-updown";
    let c = Cluster::up(name, &["--nodes", "2", "--pods-per-node", "3", "--ambient", "default"]);
    let status = c.status();
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(status["pods"].as_array().unwrap().len(), 6);
    let pids: Vec<i32> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["agent"]["pid"].as_i64().unwrap() as i32)
        .collect();
    assert!(!leftovers(name).is_empty());
    // A long-running process in a pod goes down with the cluster.
    let mut sleeper = c.spawn("app-1-1", &["sleep", "600"]);
    let sleeper_pid = sleeper.child.id() as i32;
    // `weftctl dev exec` joins the pod's cgroup, then becomes `sleep`.
    wait_for("the pod's process to start", Duration::from_secs(5), || {
        let cgroup = std::fs::read_to_string(format!("/proc/{sleeper_pid}/cgroup")).ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{sleeper_pid}/comm")).ok()?;
        (cgroup.contains("/app-1-1") && comm.trim() == "sleep").then_some(())
    });
    // Reap it as soon as `down` kills it: an unreaped zombie keeps its cgroup busy.
    let reaper = std::thread::spawn(move || sleeper.child.wait());
    drop(c);
    let exit = reaper
        .join()
        .expect("reaper thread")
        .expect("waiting for the pod process");
    assert!(
        !exit.success(),
        "the pod's process must have been killed by down, got {exit}"
    );
    assert_eq!(leftovers(name), Vec::<String>::new());
    for pid in pids.into_iter().chain([sleeper_pid]) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'));
        assert!(!running, "process {pid} survived weftctl dev down");
    }
    // A second down finds nothing and says so; it is not an error.
    let again = weftctl(&["dev", "down", "--name", name]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to remove"),
        "{}",
        text(&again)
    );
}

#[test]
fn exec_runs_in_the_pod_and_passes_the_exit_code_through() {
    if !privileged("exec") {
        return;
    }
    let c = Cluster::up("e2e-exec", &["--no-mesh", "--nodes", "1", "--pods-per-node", "1"]);
    let out = c.exec(
        "app-1-1",
        &["sh", "-c", "ip -4 -o addr show dev eth0; cat /proc/self/cgroup; exit 7"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("10.244.1.11/24"), "not in the pod's netns: {stdout}");
    assert!(
        stdout.contains("/weft.e2e-exec/node1/app-1-1"),
        "not in the pod's cgroup: {stdout}"
    );
}

#[test]
fn bad_input_gets_a_one_line_error_and_creates_nothing() {
    if !privileged("bad_input") {
        return;
    }
    let c = Cluster::up("e2e-bad", &["--no-mesh", "--nodes", "1", "--pods-per-node", "1"]);
    let clash = weftctl(&["dev", "up", "--name", "e2e-bad", "--no-mesh"]);
    assert!(!clash.status.success());
    assert!(
        String::from_utf8_lossy(&clash.stderr).contains("already running"),
        "{}",
        text(&clash)
    );

    let unknown = weftctl(&["dev", "exec", "--name", "e2e-bad", "nope", "--", "true"]);
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no pod \"nope\""),
        "{}",
        text(&unknown)
    );

    let bad_ns = weftctl(&["dev", "up", "--name", "e2e-bad2", "--ambient", "missing"]);
    assert!(!bad_ns.status.success());
    assert!(
        String::from_utf8_lossy(&bad_ns.stderr).contains("--ambient missing"),
        "{}",
        text(&bad_ns)
    );
    assert!(leftovers("e2e-bad2").is_empty());

    let bad_name = weftctl(&["dev", "up", "--name", "Bad.Name"]);
    assert!(
        String::from_utf8_lossy(&bad_name.stderr).contains("invalid cluster name"),
        "{}",
        text(&bad_name)
    );

    let bad_key = weftctl(&[
        "dev",
        "annotate",
        "--name",
        "e2e-bad",
        "namespace",
        "default",
        "no value",
    ]);
    assert!(!bad_key.status.success(), "{}", text(&bad_key));
    drop(c);
}

#[test]
fn up_on_a_stale_cluster_cleans_it_first() {
    if !privileged("stale") {
        return;
    }
    let name = "e2e-stale";
    let c = Cluster::up(name, &["--nodes", "1", "--pods-per-node", "1", "--ambient", "default"]);
    // Simulate a crash: the agent dies, the cluster's objects stay.
    c.kill_agent("node1");
    std::mem::forget(c);
    let again = weftctl(&[
        "dev",
        "up",
        "--name",
        name,
        "--nodes",
        "1",
        "--pods-per-node",
        "1",
        "--ambient",
        "default",
    ]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("cleaning stale cluster"));
    let c = Cluster { name: name.to_owned() };
    assert!(c.node("node1")["agent"]["running"].as_bool().unwrap());
}
