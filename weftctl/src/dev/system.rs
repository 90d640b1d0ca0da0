//! The host facilities the dev cluster is built from: iproute2, network namespaces, cgroup v2, bpffs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use weft_dataplane::netns::NetNs;

/// Runs `ip ARGS...`, failing with its error output.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs `ip -n NETNS ARGS...`.
pub fn ip_in(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

/// Creates a named network namespace with loopback up and IPv6 duplicate-address detection off
/// (addresses are assigned by us and unique; DAD would only delay them).
pub fn create_netns(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    sysctls(
        name,
        &[
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ],
    )
}

/// Writes sysctls inside a network namespace (net sysctls are per namespace).
pub fn sysctls(netns: &str, values: &[(&str, &str)]) -> anyhow::Result<()> {
    let ns = NetNs::open(netns_path(netns)).with_context(|| format!("opening netns {netns}"))?;
    ns.run(|| -> anyhow::Result<()> {
        for (key, value) in values {
            fs::write(Path::new("/proc/sys").join(key), value)
                .with_context(|| format!("sysctl {key}={value} in netns {netns}"))?;
        }
        Ok(())
    })?
}

/// Network namespaces whose name starts with `prefix`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    weft_dataplane::cgroup::v2_root().context(
        "no cgroup v2 filesystem is mounted; Weft needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified)",
    )
}

/// Kills every process in a cgroup subtree and waits until it is empty, then removes the subtree.
pub fn remove_cgroup_tree(root: &Path) -> anyhow::Result<()> {
    if !root.exists() {
        return Ok(());
    }
    fs::write(root.join("cgroup.kill"), "1").with_context(|| format!("killing processes in {}", root.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cgroup_tree_empty(root) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "processes in {} did not exit within 10 s",
            root.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    rmdir_tree(root)
}

fn cgroup_tree_empty(dir: &Path) -> bool {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    procs.trim().is_empty() && subdirs(dir).iter().all(|d| cgroup_tree_empty(d))
}

fn rmdir_tree(dir: &Path) -> anyhow::Result<()> {
    for sub in subdirs(dir) {
        rmdir_tree(&sub)?;
    }
    // The kernel may need a moment after the last process exits before the cgroup can go.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                // A process that was joining (e.g. a `weftctl dev exec` started just before `down`)
                // may have entered after the kill: kill again.
                if !fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .trim()
                    .is_empty()
                {
                    let _ = fs::write(dir.join("cgroup.kill"), "1");
                }
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                let events = fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                return Err(e).with_context(|| {
                    format!(
                        "removing cgroup {} (events: {}; processes: {})",
                        dir.display(),
                        events.split_whitespace().collect::<Vec<_>>().join(" "),
                        procs.split_whitespace().collect::<Vec<_>>().join(" ")
                    )
                });
            }
        }
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// The dev cluster needs root and a few kernel features; say which is missing and what to do.
pub fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "the dev cluster needs root (network namespaces, cgroups, eBPF): run weftctl as root"
    );
    cgroup2_root()?;
    anyhow::ensure!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "this kernel has no BTF (/sys/kernel/btf/vmlinux): Weft's eBPF programs need CONFIG_DEBUG_INFO_BTF=y"
    );
    anyhow::ensure!(
        Command::new("ip").arg("-V").output().is_ok(),
        "`ip` was not found: install iproute2 (cargo xtask setup does)"
    );
    Ok(())
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}
