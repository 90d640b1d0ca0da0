//! Running pods' network namespaces, found without the CNI plugin. `pod-networks.json` is what the
//! agent learned from CNI reports; a lost or stale file would leave running pods unserved (captured
//! and refused) until they are re-created. So at start in Kubernetes the agent also reads the node's
//! network-namespace pins (`/run/netns/*`: containerd names them `cni-<uuid>`), and a pod of this node
//! it has no network for is given the namespace that holds its address, as if the CNI plugin had
//! reported it.
//!
//! Only an unambiguous match is taken: the namespace holds one of the pod's addresses, no other
//! namespace the agent does not know holds any of them, and no other pod matches that namespace.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use weft_dataplane::netns::NetNs;

/// Where the node's network-namespace pins are (hostPath-mounted at the same path).
pub const NETNS_DIR: &str = "/run/netns";

/// A network namespace's identity: the device and inode of its nsfs file, the same through every
/// path that names it.
pub type NsId = (u64, u64);

/// One network namespace and the addresses in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scanned {
    pub path: PathBuf,
    pub id: NsId,
    pub ips: Vec<IpAddr>,
}

/// A pod given a network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adoption {
    pub uid: String,
    pub netns: PathBuf,
    /// The pod's addresses found in it.
    pub ips: Vec<IpAddr>,
}

/// The identity of the namespace at `path`, if it can be read.
pub fn ns_id(path: &Path) -> io::Result<NsId> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Every network namespace pinned in `dir`, with its addresses. Must run on a thread that may
/// switch namespaces (a blocking thread, never a runtime worker). What cannot be opened or read is
/// skipped and logged.
pub fn scan(dir: &Path) -> Vec<Scanned> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list the node's network namespaces");
            return Vec::new();
        }
    };
    let mut found = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let read = || -> io::Result<Scanned> {
            let id = ns_id(&path)?;
            let ns = NetNs::open(&path)?;
            let ips = ns.run(addresses)??;
            Ok(Scanned {
                path: path.clone(),
                id,
                ips,
            })
        };
        match read() {
            Ok(s) => found.push(s),
            Err(e) => tracing::debug!(netns = %path.display(), error = %e, "network namespace not read"),
        }
    }
    found
}

/// The pods (`uid`, addresses) placed in a namespace of `scanned` that is not `known`: see the
/// module's documentation. Returns the adoptions, and for the log what was ambiguous.
pub fn matches(
    pods: &[(&str, &[IpAddr])],
    scanned: &[Scanned],
    known: &BTreeSet<NsId>,
) -> (Vec<Adoption>, Vec<String>) {
    let candidates: Vec<&Scanned> = scanned.iter().filter(|s| !known.contains(&s.id)).collect();
    let mut ambiguous = Vec::new();
    // Namespace index -> the pods that matched it.
    let mut by_ns: BTreeMap<usize, Vec<Adoption>> = BTreeMap::new();
    for (uid, ips) in pods {
        let holding: Vec<usize> = (0..candidates.len())
            .filter(|&i| ips.iter().any(|ip| candidates[i].ips.contains(ip)))
            .collect();
        match holding.as_slice() {
            [] => {}
            [i] => {
                let found = ips
                    .iter()
                    .filter(|ip| candidates[*i].ips.contains(ip))
                    .copied()
                    .collect();
                by_ns.entry(*i).or_default().push(Adoption {
                    uid: (*uid).to_owned(),
                    netns: candidates[*i].path.clone(),
                    ips: found,
                });
            }
            several => {
                let paths: Vec<String> = several
                    .iter()
                    .map(|i| candidates[*i].path.display().to_string())
                    .collect();
                ambiguous.push(format!("pod {uid}: its addresses are in {}", paths.join(", ")));
            }
        }
    }
    let mut adopted = Vec::new();
    for (i, mut pods) in by_ns {
        if pods.len() == 1 {
            adopted.append(&mut pods);
        } else {
            let uids: Vec<&str> = pods.iter().map(|a| a.uid.as_str()).collect();
            ambiguous.push(format!(
                "{} holds the addresses of pods {}",
                candidates[i].path.display(),
                uids.join(", ")
            ));
        }
    }
    (adopted, ambiguous)
}

/// The addresses a pod can be known by in the calling thread's network namespace: no loopback,
/// link-local, multicast or unspecified ones.
fn addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that freeifaddrs releases below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ips = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says which one it is.
        let ip = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
            || matches!(ip, IpAddr::V4(v4) if v4.is_link_local());
        let skipped = ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || link_local;
        if !skipped && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, ino: u64, ips: &[&str]) -> Scanned {
        Scanned {
            path: Path::new(NETNS_DIR).join(name),
            id: (4, ino),
            ips: ips.iter().map(|ip| ip.parse().expect("an address")).collect(),
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().expect("an address")).collect()
    }

    #[test]
    fn a_pod_gets_the_one_unknown_namespace_holding_its_address() {
        let scanned = [
            ns("cni-a", 1, &["10.244.1.5", "fd00:10:244:1::5"]),
            ns("cni-b", 2, &["10.244.1.6"]),
            ns("cni-known", 3, &["10.244.1.7"]),
            // A stale namespace that still holds an address another pod now has.
            ns("cni-c", 4, &["10.244.1.8"]),
            ns("cni-d", 5, &["10.244.1.8"]),
            // Two pods whose addresses are in one namespace.
            ns("cni-e", 6, &["10.244.1.9", "10.244.1.10"]),
        ];
        let known = BTreeSet::from([(4, 3)]);
        let (web, db, known_pod, dup, x, y, outside) = (
            ips(&["10.244.1.5", "fd00:10:244:1::5"]),
            ips(&["10.244.1.6"]),
            ips(&["10.244.1.7"]),
            ips(&["10.244.1.8"]),
            ips(&["10.244.1.9"]),
            ips(&["10.244.1.10"]),
            ips(&["10.244.2.5"]),
        );
        let pods: Vec<(&str, &[IpAddr])> = vec![
            ("web", &web),
            ("db", &db),
            ("known", &known_pod),
            ("dup", &dup),
            ("x", &x),
            ("y", &y),
            ("outside", &outside),
        ];
        let (adopted, ambiguous) = matches(&pods, &scanned, &known);
        assert_eq!(
            adopted,
            [
                Adoption {
                    uid: "web".into(),
                    netns: "/run/netns/cni-a".into(),
                    ips: ips(&["10.244.1.5", "fd00:10:244:1::5"]),
                },
                Adoption {
                    uid: "db".into(),
                    netns: "/run/netns/cni-b".into(),
                    ips: ips(&["10.244.1.6"]),
                },
            ]
        );
        assert_eq!(
            ambiguous,
            [
                "pod dup: its addresses are in /run/netns/cni-c, /run/netns/cni-d",
                "/run/netns/cni-e holds the addresses of pods x, y",
            ]
        );
    }

    #[test]
    fn the_scan_reads_the_addresses_of_a_pinned_namespace() {
        if !weft_test_root() {
            return;
        }
        /// Deletes the namespace even if the test fails.
        struct Pinned(String);
        impl Drop for Pinned {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &self.0])
                    .status();
            }
        }
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip {args:?}");
        };
        let name = format!("weft-adopt-{}", std::process::id());
        run(&["netns", "add", &name]);
        let pinned = Pinned(name.clone());
        // A pod's interface: one end of a veth pair (both ends in the namespace).
        run(&[
            "-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        run(&["-n", &name, "addr", "add", "10.250.0.5/24", "dev", "eth0"]);
        run(&["-n", &name, "addr", "add", "fd00:250::5/64", "dev", "eth0", "nodad"]);
        run(&["-n", &name, "link", "set", "lo", "up"]);
        run(&["-n", &name, "link", "set", "peer0", "up"]);
        run(&["-n", &name, "link", "set", "eth0", "up"]);
        let scanned = std::thread::spawn(|| scan(Path::new(NETNS_DIR)))
            .join()
            .expect("the scan");
        let pin = Path::new(NETNS_DIR).join(&name);
        let mine = scanned.iter().find(|s| s.path == pin).expect("the namespace is found");
        assert_eq!(
            mine.ips,
            ips(&["10.250.0.5", "fd00:250::5"]),
            "loopback and link-local are left out"
        );
        assert_eq!(mine.id, ns_id(&pin).expect("pinned"));
        drop(pinned);
    }

    /// Creating namespaces needs root; other users skip (with a note).
    fn weft_test_root() -> bool {
        // SAFETY: plain getter.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("note: skipped, needs root");
        }
        root
    }
}
