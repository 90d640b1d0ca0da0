//! Loads Weft's eBPF programs, pins them, and manages the per-pod capture state in their maps.
//!
//! Layout under the pin directory:
//! - `maps/<MAP>`: every map, found again by the next agent on this node;
//! - `links/<program>`: the node-cgroup attachments, one each;
//! - `pods/<uid>/sk_lookup`: the inbound steering link of each enrolled pod's network namespace.
//!
//! A restarted agent reuses pinned maps and links instead of attaching again, so capture (and
//! fail-closed refusal while no agent runs) continues across restarts.

use std::{
    fs::{self, File},
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, SockHash},
    programs::{
        CgroupSockAddr, CgroupSockopt, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use weft_dataplane::netns::NetNs;
use weft_ebpf_common::{Ip, ListenerKey, PodEntry, names};

/// The compiled eBPF object, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bpffs: {what} {path}")]
    BpfFs {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning the link of {name} at {path}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("eBPF link of {name}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The node's capture state.
pub struct Capture {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodEntry>,
    listeners: SockHash<MapData, ListenerKey>,
}

impl Capture {
    /// Loads the programs and maps (reusing pinned ones), exempts the agent's cgroup (`agent_cgroup`,
    /// a cgroup v2 id) from capture, and makes sure each cgroup program is attached to `cgroup` exactly
    /// once.
    pub fn start(pin_dir: &Path, cgroup: &Path, agent_cgroup: u64) -> Result<Self, Error> {
        ensure_bpffs(pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        for dir in [&maps_dir, &pin_dir.join("links"), &pin_dir.join("pods")] {
            fs::create_dir_all(dir).map_err(|source| Error::BpfFs {
                what: "creating",
                path: dir.clone(),
                source,
            })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)
            .map_err(Error::Load)?;
        // Before anything attaches: programs attached with an empty slot would capture the agent itself.
        let mut agent: Array<MapData, u64> = take_map(&mut ebpf, names::MAP_AGENT_CGROUP)?;
        agent.set(0, agent_cgroup, 0).map_err(|source| Error::Map {
            name: names::MAP_AGENT_CGROUP,
            source,
        })?;
        let cgroup_file = File::open(cgroup).map_err(|source| Error::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        for name in names::CGROUP_PROGRAMS {
            attach_cgroup_program(&mut ebpf, name, &cgroup_file, &pin_dir.join("links").join(name))?;
        }
        let sk_lookup: &mut SkLookup = program(&mut ebpf, names::PROG_SK_LOOKUP)?;
        sk_lookup.load().map_err(|source| Error::Program {
            name: names::PROG_SK_LOOKUP,
            source,
        })?;

        let enrolled = take_map(&mut ebpf, names::MAP_ENROLLED)?;
        let listeners = take_map(&mut ebpf, names::MAP_LISTENERS)?;
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            ebpf,
            enrolled,
            listeners,
        })
    }

    /// Starts steering inbound connections to `ip` in the pod's namespace to `listener`.
    pub fn set_listener(&mut self, ip: IpAddr, listener: &impl AsRawFd) -> Result<(), Error> {
        self.listeners
            .insert(listener_key(ip), listener.as_raw_fd(), 0)
            .map_err(|source| Error::Map {
                name: names::MAP_LISTENERS,
                source,
            })
    }

    pub fn remove_listener(&mut self, ip: IpAddr) {
        let _ = self.listeners.remove(&listener_key(ip));
    }

    /// Attaches inbound steering to a pod's namespace, unless a pinned link already does.
    pub fn attach_pod(&mut self, uid: &str, netns: &NetNs) -> Result<(), Error> {
        let dir = self.pod_dir(uid);
        let pin = dir.join("sk_lookup");
        if PinnedLink::from_pin(&pin).is_ok() {
            return Ok(());
        }
        fs::create_dir_all(&dir).map_err(|source| Error::BpfFs {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        let prog: &mut SkLookup = program(&mut self.ebpf, names::PROG_SK_LOOKUP)?;
        let err = |source| Error::Program {
            name: names::PROG_SK_LOOKUP,
            source,
        };
        let id = prog.attach(netns).map_err(err)?;
        let link = FdLink::from(prog.take_link(id).map_err(err)?);
        link.pin(&pin).map_err(|source| Error::Pin {
            name: names::PROG_SK_LOOKUP,
            path: pin,
            source,
        })?;
        Ok(())
    }

    /// Removes a pod's inbound steering link (the kernel detaches it with its last reference).
    pub fn detach_pod(&mut self, uid: &str) {
        let _ = fs::remove_dir_all(self.pod_dir(uid));
    }

    /// Pods with a pinned steering link.
    pub fn attached_pods(&self) -> Vec<String> {
        fs::read_dir(self.pin_dir.join("pods"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn enroll(&mut self, netns_cookie: u64) -> Result<(), Error> {
        self.enrolled
            .insert(netns_cookie, PodEntry::default(), 0)
            .map_err(|source| Error::Map {
                name: names::MAP_ENROLLED,
                source,
            })
    }

    pub fn unenroll(&mut self, netns_cookie: u64) {
        let _ = self.enrolled.remove(&netns_cookie);
    }

    /// Network namespaces currently captured.
    pub fn enrolled_netns(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Takes capture off the node for good (an uninstall): removes every pin (maps, the cgroup links,
    /// each pod's `sk_lookup` link) and the pin directory, then closes the agent's own references,
    /// after which the kernel detaches and frees everything.
    pub fn remove(self) -> Result<(), Error> {
        match fs::remove_dir_all(&self.pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::BpfFs {
                what: "removing",
                path: self.pin_dir.clone(),
                source,
            }),
        }
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.pin_dir.join("pods").join(uid)
    }
}

fn listener_key(ip: IpAddr) -> ListenerKey {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    ListenerKey {
        ip: Ip {
            words: [word(0), word(4), word(8), word(12)],
        },
    }
}

fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    let root = Path::new("/sys/fs/bpf");
    if fs_magic(root) != Some(BPF_FS_MAGIC) {
        mount_bpffs(root).map_err(|source| Error::BpfFs {
            what: "mounting",
            path: root.to_path_buf(),
            source,
        })?;
    }
    if !pin_dir.starts_with(root) {
        return Err(Error::BpfFs {
            what: "pin directory outside",
            path: pin_dir.to_path_buf(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        });
    }
    Ok(())
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: zeroed statfs is valid; path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type)
}

fn mount_bpffs(root: &Path) -> io::Result<()> {
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(root)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("mount -t bpf exited with {status}")))
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    prog.try_into().map_err(|source| Error::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

/// Attaches one cgroup program through a pinned link, or keeps the pinned link a previous agent left.
fn attach_cgroup_program(ebpf: &mut Ebpf, name: &'static str, cgroup: &File, pin: &Path) -> Result<(), Error> {
    if PinnedLink::from_pin(pin).is_ok() {
        tracing::debug!(program = name, "reusing pinned attachment");
        return Ok(());
    }
    let _ = fs::remove_file(pin);
    let err = |source| Error::Program { name, source };
    macro_rules! load {
        ($ty:ty, $attach_type:expr) => {{
            let prog: &mut $ty = program(ebpf, name)?;
            prog.load().map_err(err)?;
            let fd = prog.fd().map_err(err)?;
            raw::link_create(fd.as_fd(), cgroup.as_fd(), $attach_type)
        }};
    }
    let link = match name {
        names::PROG_SOCKOPS => load!(SockOps, raw::BPF_CGROUP_SOCK_OPS),
        names::PROG_GETSOCKOPT => load!(CgroupSockopt, raw::BPF_CGROUP_GETSOCKOPT),
        names::PROG_CONNECT4 => load!(CgroupSockAddr, raw::BPF_CGROUP_INET4_CONNECT),
        names::PROG_CONNECT6 => load!(CgroupSockAddr, raw::BPF_CGROUP_INET6_CONNECT),
        names::PROG_GETPEERNAME4 => load!(CgroupSockAddr, raw::BPF_CGROUP_INET4_GETPEERNAME),
        _ => load!(CgroupSockAddr, raw::BPF_CGROUP_INET6_GETPEERNAME),
    }
    .map_err(|source| Error::BpfFs {
        what: "creating the cgroup link of",
        path: pin.to_path_buf(),
        source,
    })?;
    raw::obj_pin(link.as_fd(), pin).map_err(|source| Error::BpfFs {
        what: "pinning",
        path: pin.to_path_buf(),
        source,
    })?;
    tracing::info!(program = name, "attached");
    Ok(())
}

/// The two `bpf()` commands aya 0.14 does not expose for every cgroup program type: creating a
/// cgroup link from a loaded program, and pinning it.
mod raw {
    use std::{
        ffi::CString,
        io,
        os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        path::Path,
    };

    pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
    pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
    pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;
    pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
    pub const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_LINK_CREATE: libc::c_long = 28;

    #[repr(C)]
    #[derive(Default)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 4],
    }

    #[repr(C)]
    #[derive(Default)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: attr is a zero-initialised prefix of `union bpf_attr` for `cmd`, of the given size.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    pub fn link_create(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
        let mut attr = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type,
            ..Default::default()
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
        let path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut attr = ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf(BPF_OBJ_PIN, &mut attr).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// The attach types of the programs attached to `cgroup`, and the `sk_lookup` links of the
    /// namespace with inode `netns_ino`, as bpftool sees them.
    fn attached(cgroup: &Path, netns_ino: u64) -> (usize, usize) {
        let json = |args: &[&str]| -> serde_json::Value {
            let out = std::process::Command::new("bpftool")
                .arg("-j")
                .args(args)
                .output()
                .expect("bpftool");
            serde_json::from_slice(&out.stdout).unwrap_or_default()
        };
        let cgroup = cgroup.to_str().expect("utf-8");
        let programs = json(&["cgroup", "show", cgroup]).as_array().map_or(0, Vec::len);
        let links = json(&["link", "show"]).as_array().map_or(0, |a| {
            a.iter()
                .filter(|l| l["type"] == "netns" && l["netns_ino"] == netns_ino)
                .count()
        });
        (programs, links)
    }

    #[test]
    fn removing_capture_detaches_every_program_and_unpins_everything() {
        // SAFETY: plain getter.
        let root = unsafe { libc::geteuid() } == 0;
        let bpftool = std::process::Command::new("bpftool").arg("version").output().is_ok();
        if !root || !bpftool {
            eprintln!("note: skipped, needs root and bpftool");
            return;
        }
        /// Removes what the test made, also when it fails.
        struct Scratch {
            cgroup: PathBuf,
            pins: PathBuf,
            netns: String,
        }
        impl Drop for Scratch {
            fn drop(&mut self) {
                let _ = fs::remove_dir_all(&self.pins);
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &self.netns])
                    .status();
                let _ = fs::remove_dir(&self.cgroup);
            }
        }
        let id = std::process::id();
        let scratch = Scratch {
            cgroup: weft_dataplane::cgroup::v2_root()
                .expect("cgroup v2")
                .join(format!("weft-capture-test-{id}")),
            pins: PathBuf::from(format!("/sys/fs/bpf/weft-capture-test-{id}")),
            netns: format!("weft-capture-test-{id}"),
        };
        let (cgroup, pins, netns) = (&scratch.cgroup, &scratch.pins, &scratch.netns);
        fs::create_dir_all(cgroup).expect("a cgroup");
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", netns])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add");
        let netns_path = Path::new("/run/netns").join(netns);
        let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&netns_path).expect("pinned"));

        let mut capture = Capture::start(pins, cgroup, 1).expect("capture starts");
        let ns = NetNs::open(&netns_path).expect("the namespace");
        capture.attach_pod("u1", &ns).expect("sk_lookup attaches");
        capture.enroll(42).expect("enrolled");
        assert_eq!(attached(cgroup, ino), (names::CGROUP_PROGRAMS.len(), 1));
        assert!(pins.join("maps").join(names::MAP_ENROLLED).exists());

        capture.remove().expect("removed");
        assert!(!pins.exists(), "the pin directory is gone");
        let deadline = Instant::now() + Duration::from_secs(10);
        while attached(cgroup, ino) != (0, 0) {
            assert!(Instant::now() < deadline, "still attached: {:?}", attached(cgroup, ino));
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(ns);
        drop(scratch);
    }

    #[test]
    fn listener_keys_use_mapped_ipv4() {
        let k = listener_key("10.244.1.5".parse().unwrap());
        assert!(k.ip.is_v4_mapped());
        assert_eq!(k.ip.v4_be(), Some(u32::from_ne_bytes([10, 244, 1, 5])));
        let k6 = listener_key("fd00::5".parse().unwrap());
        assert!(!k6.ip.is_v4_mapped());
    }
}
