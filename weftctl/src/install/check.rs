//! `weftctl check`: whether this node's kernel has what Weft needs, naming what is missing.
//!
//! Each eBPF program and map type the capture uses is probed by loading a minimal one (what the
//! kernel answers, not what its version suggests); the rest are the filesystems the agent works on.

use std::{path::Path, process::ExitCode};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};

struct Check {
    what: String,
    ok: bool,
    detail: String,
}

fn mounted(fstype: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&fstype)).then(|| f[1].to_owned())
        })
        .collect()
}

fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    out.push(Check {
        what: "BTF (/sys/kernel/btf/vmlinux)".into(),
        ok: btf,
        detail: if btf {
            String::new()
        } else {
            "the kernel was built without CONFIG_DEBUG_INFO_BTF".into()
        },
    });
    let cgroup2 = mounted("cgroup2");
    out.push(Check {
        what: "cgroup v2".into(),
        ok: !cgroup2.is_empty(),
        detail: if cgroup2.is_empty() {
            "no cgroup2 filesystem is mounted (the capture programs attach to a cgroup v2)".into()
        } else {
            format!("mounted at {}", cgroup2.join(", "))
        },
    });
    let bpffs = mounted("bpf");
    out.push(Check {
        what: "bpffs".into(),
        ok: bpffs.iter().any(|m| m == "/sys/fs/bpf"),
        detail: if bpffs.is_empty() {
            "no bpf filesystem is mounted at /sys/fs/bpf (the agent pins its programs there to survive restarts)".into()
        } else {
            format!("mounted at {}", bpffs.join(", "))
        },
    });
    let programs = [
        (
            ProgramType::CgroupSockAddr,
            "cgroup/connect4|6, getpeername4|6 (capture outbound)",
        ),
        (ProgramType::SockOps, "sockops (follow captured connections)"),
        (ProgramType::CgroupSockopt, "cgroup/getsockopt (SO_ORIGINAL_DST)"),
        (ProgramType::SkLookup, "sk_lookup (capture inbound)"),
    ];
    for (ty, used_for) in programs {
        let r = is_program_supported(ty);
        out.push(Check {
            what: format!("BPF program type {ty:?}"),
            ok: matches!(r, Ok(true)),
            detail: match r {
                Ok(true) => used_for.into(),
                Ok(false) => format!("not supported by this kernel; needed for {used_for}"),
                Err(e) => format!("cannot probe ({e}); needs root or CAP_BPF"),
            },
        });
    }
    let maps = [
        (MapType::Hash, "enrolled pods"),
        (MapType::LruHash, "original destinations"),
        (MapType::Array, "the agent's cgroup"),
        (MapType::SockHash, "inbound listeners for sk_lookup"),
    ];
    for (ty, used_for) in maps {
        let r = is_map_supported(ty);
        out.push(Check {
            what: format!("BPF map type {ty:?}"),
            ok: matches!(r, Ok(true)),
            detail: match r {
                Ok(true) => used_for.into(),
                Ok(false) => format!("not supported by this kernel; needed for {used_for}"),
                Err(e) => format!("cannot probe ({e}); needs root or CAP_BPF"),
            },
        });
    }
    out
}

pub fn run() -> anyhow::Result<ExitCode> {
    let checks = checks();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel {}", release.trim());
    for c in &checks {
        println!(
            "  {} {:<40} {}",
            if c.ok { "ok     " } else { "MISSING" },
            c.what,
            c.detail
        );
    }
    let missing: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.what.as_str()).collect();
    if missing.is_empty() {
        println!("this node can run Weft");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("this node cannot run Weft: missing {}", missing.join(", "));
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test machines have everything (CI runs as root on a BPF/BTF/cgroup v2 kernel).
    #[test]
    fn this_machine_passes_every_check() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI=true: run the tests as root"
            );
            eprintln!("note: not root; skipping (probing BPF needs root)");
            return;
        }
        let failed: Vec<String> = checks()
            .into_iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.what, c.detail))
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
    }
}
