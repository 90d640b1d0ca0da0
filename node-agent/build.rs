//! Builds the eBPF object (ebpf/) with aya-build and the pinned nightly toolchain.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "weft-ebpf")
        .ok_or_else(|| anyhow!("package weft-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    // The eBPF toolchain is pinned (bpf-linker 0.10.4 links LLVM 22 bitcode only); xtask sets it.
    println!("cargo:rerun-if-env-changed=WEFT_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("WEFT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned());
    // `cargo xtask setup` installs bpf-linker into its cache, outside the clone: found there, a plain
    // `cargo build` or `cargo test` works after setup as it does under xtask.
    println!("cargo:rerun-if-env-changed=WEFT_CACHE_DIR");
    let cache = std::env::var_os("WEFT_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache").join("weft")));
    if let Some(bin) = cache.map(|c| c.join("bin")).filter(|b| b.join("bpf-linker").exists()) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let paths = std::iter::once(bin).chain(std::env::split_paths(&path));
        let joined = std::env::join_paths(paths).context("PATH with the bpf-linker cache")?;
        // SAFETY: a build script is single-threaded here; the child cargo inherits this PATH.
        unsafe { std::env::set_var("PATH", joined) };
    }
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain))
}
