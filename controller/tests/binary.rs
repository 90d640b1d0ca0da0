//! The real `weft-controller` binary: starts on a temp state dir, serves the store on its unix
//! socket the way `weftctl apply` talks to it, and stops cleanly on SIGTERM.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tonic::{
    Code,
    transport::{Channel, Endpoint},
};
use weft_api::v1::{ApplyRequest, DeleteRequest, GetRequest, store_client::StoreClient};

const DEADLINE: Duration = Duration::from_secs(20);

/// Kills the child on drop, so a failing test leaves no controller behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn controller(state: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft-controller"));
    cmd.arg("--state-dir")
        .arg(state)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

async fn connect(socket: &Path, child: &mut Child) -> StoreClient<Channel> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("controller exited early: {status}");
        }
        if socket.exists()
            && let Ok(channel) = Endpoint::from_shared(format!("unix:{}", socket.display()))
                .unwrap()
                .connect()
                .await
        {
            return StoreClient::new(channel);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no admin socket at {} in time",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Async, so that the client connections on this runtime can answer the server's GOAWAY meanwhile.
async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < DEADLINE, "controller did not exit in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn apply_through_the_admin_socket_then_sigterm_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut running = Running(controller(&state, &[]).spawn().unwrap());
    let socket = state.join("admin.sock");
    let mut client = connect(&socket, &mut running.0).await;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(state.join("root.pem")).unwrap().permissions().mode() & 0o777,
        0o644
    );

    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  nodeName: node1\nstatus:\n  podIP: 10.0.0.1\n";
    let out = client
        .apply(ApplyRequest {
            yaml: yaml.into(),
            source: "web.yaml".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.results, ["namespace default created", "pod default/web created"]);
    assert_eq!(out.revision, 1);

    let bad = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: other\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: api\n";
    let err = client
        .apply(ApplyRequest {
            yaml: bad.into(),
            source: "deploy.yaml".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "deploy.yaml: document 2: Pod default/api: spec.nodeName: required"
    );

    let got = client
        .get(GetRequest {
            kind: "pods".into(),
            namespace: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        got.yaml.contains("name: web") && !got.yaml.contains("other"),
        "{}",
        got.yaml
    );

    let err = client
        .delete(DeleteRequest {
            yaml: "apiVersion: v1\nkind: Pod\nmetadata:\n  name: nope\n".into(),
            source: "rm.yaml".into(),
            ignore_not_found: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "rm.yaml: document 1: Pod default/nope: not found");
    drop(client);

    let pid = running.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = wait_exit(&mut running.0).await;
    assert_eq!(status.code(), Some(0), "graceful exit");
    assert!(!socket.exists(), "the socket is removed on exit");
    let store = std::fs::read_to_string(state.join("store.json")).unwrap();
    assert!(store.contains("\"web\""), "{store}");
}

#[test]
fn refuses_to_start_with_a_readable_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"node1": "t"}"#).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = controller(&dir.path().join("state"), &["--node-tokens", tokens.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--node-tokens") && stderr.contains("readable by group or others"),
        "{stderr}"
    );
}

#[test]
fn bad_flags_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = controller(dir.path(), &["--cert-lifetime", "forever"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cert-lifetime"));
    let out = controller(dir.path(), &["--ca-cert", "x.pem"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-key"));
}
