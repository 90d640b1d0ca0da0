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

/// The cgroup v2 directory this process runs in.
pub fn own() -> io::Result<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim()
        .trim_start_matches('/');
    Ok(v2_root()?.join(rel))
}

/// The id the kernel gives a cgroup v2 directory (`bpf_get_current_cgroup_id` in eBPF): the inode
/// number of its directory on 64-bit kernels.
pub fn id(dir: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(dir)?.ino())
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_cgroup_is_a_directory_under_the_v2_root_with_an_id() {
        let (Ok(root), Ok(own)) = (super::v2_root(), super::own()) else {
            return; // no cgroup v2 here: nothing to check
        };
        assert!(own.starts_with(&root), "{} under {}", own.display(), root.display());
        assert!(own.is_dir(), "{}", own.display());
        assert_ne!(super::id(&own).unwrap(), 0);
    }
}
