//! `--cgroup auto`: in Kubernetes, capture attaches to the cgroup that holds every pod of the node,
//! found above the agent's own cgroup (the agent is one of those pods): the nearest ancestor named
//! `kubepods` (kubelet's cgroupfs driver) or `kubepods.slice` (systemd driver).

use std::{
    io,
    path::{Path, PathBuf},
};

/// The names kubelet gives the cgroup of all pods.
pub const KUBEPODS: [&str; 2] = ["kubepods", "kubepods.slice"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("/proc/self/cgroup has no cgroup v2 entry (0::)")]
    NoV2Entry,
    #[error(
        "--cgroup auto: no ancestor of the agent's cgroup {own} is named kubepods or kubepods.slice{}",
        if own == "/" { " (the agent sees its own cgroup as /: it runs in a cgroup namespace of its own, so it cannot see where it is; pass --cgroup <dir>)" } else { "" }
    )]
    NoKubepods { own: String },
}

/// The kubepods cgroup above this process, as a directory under the cgroup v2 mount.
pub fn find() -> Result<PathBuf, Error> {
    let root = weft_dataplane::cgroup::v2_root().map_err(|source| Error::Read {
        path: "/proc/self/mounts",
        source,
    })?;
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|source| Error::Read {
        path: "/proc/self/cgroup",
        source,
    })?;
    kubepods(&root, v2_path(&own).ok_or(Error::NoV2Entry)?)
}

/// The cgroup v2 path in the text of `/proc/<pid>/cgroup` (its `0::` line).
pub fn v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(str::trim)
}

/// The nearest proper ancestor of cgroup `own` (a path from `/proc/self/cgroup`, relative to the
/// v2 mount) named `kubepods` or `kubepods.slice`, as a directory under `root`, the v2 mount.
pub fn kubepods(root: &Path, own: &str) -> Result<PathBuf, Error> {
    let parts: Vec<&str> = own.split('/').filter(|p| !p.is_empty()).collect();
    // Proper ancestors only, nearest first: the agent's own cgroup is a container's.
    (1..parts.len())
        .rev()
        .find(|&n| KUBEPODS.contains(&parts[n - 1]))
        .map(|n| parts[..n].iter().fold(root.to_path_buf(), |p, part| p.join(part)))
        .ok_or_else(|| Error::NoKubepods { own: own.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_kubepods_ancestor_is_found_under_the_v2_mount() {
        let hybrid = Path::new("/sys/fs/cgroup/unified");
        let v2 = Path::new("/sys/fs/cgroup");
        let uid = "pod0b6c7a59-7c43-4d2c-9d26-6a1f0e1d2b3c";
        let ctr = "2f1c9e6d5b4a";
        let found = |root: &Path, own: &str| kubepods(root, own).map_err(|e| e.to_string());
        let cases: [(&Path, String, Result<&str, &str>); 8] = [
            // The local cluster: kubelet's cgroupRoot is the node's subtree, cgroupfs driver.
            (
                hybrid,
                format!("/weft-kube/node1/kubepods/besteffort/{uid}/{ctr}"),
                Ok("/sys/fs/cgroup/unified/weft-kube/node1/kubepods"),
            ),
            // Guaranteed pods sit right under kubepods.
            (v2, format!("/kubepods/{uid}/{ctr}"), Ok("/sys/fs/cgroup/kubepods")),
            // The systemd driver.
            (
                v2,
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{uid}.slice/cri-containerd-{ctr}.scope"
                ),
                Ok("/sys/fs/cgroup/kubepods.slice"),
            ),
            // Nearest wins.
            (
                v2,
                "/a/kubepods/b/kubepods/c".into(),
                Ok("/sys/fs/cgroup/a/kubepods/b/kubepods"),
            ),
            // The agent's own cgroup does not count, nor does a name that only starts alike.
            (
                v2,
                "/kubepods".into(),
                Err("no ancestor of the agent's cgroup /kubepods"),
            ),
            (v2, "/kubepods-x/ctr".into(), Err("no ancestor")),
            (v2, "/system.slice/containerd.service".into(), Err("no ancestor")),
            // A private cgroup namespace hides where the agent is.
            (v2, "/".into(), Err("cgroup namespace of its own")),
        ];
        for (root, own, want) in cases {
            match (found(root, &own), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, Path::new(want), "{own}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{own}: {got}"),
                (got, want) => panic!("{own}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn the_v2_entry_is_the_0_line_of_proc_cgroup() {
        let hybrid =
            "12:memory:/weft-kube/node1/kubepods/besteffort/podx/c\n0::/weft-kube/node1/kubepods/besteffort/podx/c\n";
        assert_eq!(v2_path(hybrid), Some("/weft-kube/node1/kubepods/besteffort/podx/c"));
        assert_eq!(v2_path("0::/\n"), Some("/"));
        assert_eq!(v2_path("4:memory:/x\n"), None);
    }
}
