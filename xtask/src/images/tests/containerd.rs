//! The real thing: archives imported into a private containerd (its own root, state and socket
//! under a temporary directory) and run by runc. Needs root: with `CI=true` it must run, otherwise it
//! is skipped with a note.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use super::{super::PAUSE_REFERENCE, TempDir, test_spec};
use crate::images::{VERSION, pause_binary, specs};

/// The containerd namespace the test's images and containers live in; also the parent cgroup ctr
/// puts containers under, hence one per test process.
fn namespace() -> String {
    format!("weft-images-test-{}", std::process::id())
}
/// Set in the container so that `inside_the_image` knows where it runs.
const INSIDE: &str = "WEFT_INSIDE_IMAGE";

#[test]
fn archives_import_into_containerd_and_their_binaries_run() {
    if !crate::is_root() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true: this test imports images into a private containerd and must run; run it as root"
        );
        eprintln!("note: not root; skipping the containerd import test (it starts a private containerd)");
        return;
    }
    let dir = TempDir::new("containerd");

    // This test program, packed like Weft's binaries (dynamic, its loader and libraries copied).
    let test_image = test_spec();
    let test_archive = test_image.archive().unwrap();
    let test_tar = dir.path().join("image-test.oci.tar");
    std::fs::write(&test_tar, &test_archive.bytes).unwrap();
    let pause_bin = pause_binary(&dir.path().join("cache")).unwrap();
    let pause = specs(Path::new("/nowhere"), &pause_bin)
        .into_iter()
        .find(|s| s.reference == PAUSE_REFERENCE)
        .unwrap();
    let pause_archive = pause.archive().unwrap();
    let pause_tar = dir.path().join("pause.oci.tar");
    std::fs::write(&pause_tar, &pause_archive.bytes).unwrap();

    let containerd = Containerd::start(dir.path().join("containerd"));

    for (tar, reference, digest) in [
        (&test_tar, &test_image.reference, &test_archive.digest),
        (&pause_tar, &pause.reference, &pause_archive.digest),
    ] {
        let out = containerd.ctr(&["images", "import"]).arg(tar).output().unwrap();
        let said = succeeded(&out, "ctr images import");
        assert!(
            said.contains(&format!("unpacking {reference} ({digest})")),
            "the import names the image by its reference and digest: {said}"
        );
    }
    let listed = succeeded(
        &containerd.ctr(&["images", "ls", "--quiet"]).output().unwrap(),
        "ctr images ls",
    );
    let mut listed: Vec<&str> = listed.lines().collect();
    listed.sort_unstable();
    let test_reference = format!("weft.test/image-test:{VERSION}");
    assert_eq!(listed, [PAUSE_REFERENCE, test_reference.as_str()]);

    // The test binary runs in its image and checks the image from inside.
    let inside = format!("{}::inside_the_image", module_path!().trim_start_matches("xtask::"));
    let out = containerd
        .ctr(&[
            "run",
            "--rm",
            "--env",
            &format!("{INSIDE}=1"),
            &test_reference,
            "image-test",
        ])
        .args(["/usr/bin/image-test", "--exact", &inside, "--ignored", "--nocapture"])
        .output()
        .unwrap();
    let said = succeeded(&out, "ctr run image-test");
    assert!(said.contains("inside the image: ok"), "{said}");
    assert!(said.contains("1 passed"), "{said}");

    // The sandbox image runs until it is told to stop, and then stops cleanly.
    let mut run = containerd
        .ctr(&["run", "--rm", PAUSE_REFERENCE, "pause-test"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    containerd.wait_for_task("pause-test", "RUNNING");
    // Still running a moment later: it waits for a signal rather than exiting at once.
    std::thread::sleep(Duration::from_millis(300));
    assert!(run.try_wait().unwrap().is_none(), "pause exited on its own");
    succeeded(
        &containerd
            .ctr(&["tasks", "kill", "--signal", "SIGTERM", "pause-test"])
            .output()
            .unwrap(),
        "ctr tasks kill",
    );
    let status = wait_child(&mut run, Duration::from_secs(20)).expect("pause did not stop on SIGTERM");
    assert!(status.success(), "pause exited with {status}");
}

/// Runs inside the test image (above), not on the host: there it is a no-op.
#[test]
#[ignore = "runs inside the test image, started by archives_import_into_containerd_and_their_binaries_run"]
fn inside_the_image() {
    if std::env::var_os(INSIDE).is_none() {
        return;
    }
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let tmp = std::fs::metadata("/tmp").unwrap();
    assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777, "/tmp");
    std::fs::write("/tmp/written", b"x").expect("/tmp is writable");
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    assert!(passwd.contains("nonroot:x:65532:65532:"), "{passwd}");
    assert!(
        std::fs::read_to_string("/etc/group")
            .unwrap()
            .contains("nonroot:x:65532:")
    );
    assert_eq!(std::fs::metadata("/home/nonroot").unwrap().uid(), 65532);
    for absent in [
        "/bin/sh",
        "/usr/bin/sh",
        "/bin/busybox",
        "/usr/bin/apt",
        "/usr/bin/dpkg",
    ] {
        assert!(!Path::new(absent).exists(), "{absent} is in the image");
    }
    let usr_bin: Vec<String> = std::fs::read_dir("/usr/bin")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(usr_bin, ["image-test"]);
    let loader = std::fs::symlink_metadata("/lib64/ld-linux-x86-64.so.2").unwrap();
    assert!(loader.is_file(), "the loader is a real file");
    println!("inside the image: ok");
}

// === impl Containerd ===

/// A private containerd, stopped (tasks, containers, mounts, the namespace's cgroup and its
/// directory removed) on drop.
struct Containerd {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Containerd {
    /// Starts containerd with everything under `dir` and the CRI plugin off; waits until it serves.
    fn start(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("containerd.sock");
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/debug.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd (Debian's containerd package)");
        let mut containerd = Containerd { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = containerd.child.try_wait().unwrap() {
                panic!("containerd exited ({status}): {}", containerd.log());
            }
            if containerd.ctr(&["version"]).output().is_ok_and(|o| o.status.success()) {
                return containerd;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not serve: {}",
                containerd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr` against this containerd, in the test's namespace.
    fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(namespace())
            .args(args);
        cmd
    }

    fn wait_for_task(&self, id: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.ctr(&["tasks", "ls"]).output().unwrap();
            let listed = String::from_utf8_lossy(&out.stdout).into_owned();
            if listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(id) && l.split_whitespace().nth(2) == Some(status))
            {
                return;
            }
            assert!(Instant::now() < deadline, "task {id} never {status}: {listed}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The ids `ctr <what> ls --quiet` lists.
    fn ids(&self, what: &str) -> Vec<String> {
        self.ctr(&[what, "ls", "--quiet"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks first: their shims outlive containerd otherwise.
        for id in self.ids("tasks") {
            let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", &id]).output();
            let _ = self.ctr(&["tasks", "delete", "--force", &id]).output();
        }
        for id in self.ids("containers") {
            let _ = self.ctr(&["containers", "delete", &id]).output();
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        if wait_child(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Whatever is still mounted under the directory (snapshots, task root file systems), deepest first.
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in mounts {
            let _ = Command::new("umount").arg("--lazy").arg(&mount).status();
        }
        // ctr puts each container's cgroup under /<namespace> of every hierarchy (each v1
        // controller and the v2 one on a hybrid host); runc removed the container's own.
        for hierarchy in cgroup_hierarchies() {
            let _ = std::fs::remove_dir(hierarchy.join(namespace()));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every mounted cgroup hierarchy (v1 controllers, and v2).
fn cgroup_hierarchies() -> Vec<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            matches!(f.get(2), Some(&"cgroup" | &"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
        })
        .collect()
}

/// The child's exit status, or `None` if it still runs after `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// stdout and stderr of a command that must have succeeded.
fn succeeded(out: &Output, what: &str) -> String {
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed ({}): {said}", out.status);
    said
}
