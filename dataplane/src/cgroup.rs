//! cgroup v2 facts of the host.

use std::{io, path::PathBuf};

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on pure v2 hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn v2_root() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .min_by_key(|p| p.as_os_str().len())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 filesystem is mounted"))
}
