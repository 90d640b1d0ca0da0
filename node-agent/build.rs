//! Builds the eBPF object (ebpf/) with the pinned nightly toolchain, as aya-build does, but quietly:
//! the sub-build's progress lines (`Compiling ...`) are kept out of the build's output, and its
//! compiler diagnostics and errors are shown (as `cargo:warning` lines), so that a build prints
//! what needs attention and nothing else.
use std::{
    ffi::OsString,
    io::{BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use cargo_metadata::{Artifact, CompilerMessage, Message, diagnostic::DiagnosticLevel};

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
    // Our build-dependency on weft-ebpf covers its library; its binaries are watched here.
    println!("cargo:rerun-if-changed={root_dir}");
    // The eBPF toolchain is pinned (bpf-linker 0.10.4 links LLVM 22 bitcode only); xtask sets it.
    println!("cargo:rerun-if-env-changed=WEFT_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("WEFT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned());
    // `cargo xtask setup` installs bpf-linker into its cache, outside the clone: found there, a plain
    // `cargo build` or `cargo test` works after setup as it does under xtask.
    println!("cargo:rerun-if-env-changed=WEFT_CACHE_DIR");
    let cache = std::env::var_os("WEFT_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache").join("weft")));
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(bin) = cache.map(|c| c.join("bin")).filter(|b| b.join("bpf-linker").exists()) {
        let paths = std::iter::once(bin).chain(std::env::split_paths(&path));
        path = std::env::join_paths(paths).context("PATH with the bpf-linker cache")?;
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    build(&toolchain, ebpf.name.as_str(), &out_dir, &path)
}

/// `cargo build` of `package`'s binaries for the BPF target, with `toolchain`; each binary is
/// copied into `out_dir` under its name.
fn build(toolchain: &str, package: &str, out_dir: &Path, path: &OsString) -> anyhow::Result<()> {
    let endian = std::env::var("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN not set")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported endianness {other}"),
    };
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, "cargo", "build", "--package", package, "--bins"])
        .args(["--message-format=json", "--release", "--target", target])
        .args(["-Z", "build-std=core"])
        // A target directory of its own: cargo would wait on its own lock otherwise.
        .arg("--target-dir")
        .arg(out_dir.join("ebpf-target"))
        .env("PATH", path)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // The toolchain's own rustc, not the one this build runs with.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {cmd:?} (is rustup installed?)"))?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let progress = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut binaries = Vec::new();
    let stdout = BufReader::new(child.stdout.take().context("stdout")?);
    for message in Message::parse_stream(stdout) {
        match message.context("the eBPF build's messages")? {
            Message::CompilerArtifact(Artifact {
                executable: Some(executable),
                target,
                ..
            }) => binaries.push((target.name, executable.into_std_path_buf())),
            Message::CompilerMessage(CompilerMessage { message, .. })
                if matches!(message.level, DiagnosticLevel::Warning | DiagnosticLevel::Error) =>
            {
                for line in message.rendered.unwrap_or_default().lines() {
                    println!("cargo:warning={line}");
                }
            }
            _ => {}
        }
    }
    let status = child.wait().context("waiting for the eBPF build")?;
    let progress = progress.join().unwrap_or_default();
    if !status.success() {
        // Failed: everything it said, to find why.
        for line in progress.lines() {
            println!("cargo:warning={line}");
        }
        bail!("the eBPF build failed ({status}): {cmd:?}");
    }
    for (name, binary) in binaries {
        let dst = out_dir.join(&name);
        std::fs::copy(&binary, &dst).with_context(|| format!("copying {} to {}", binary.display(), dst.display()))?;
    }
    Ok(())
}
