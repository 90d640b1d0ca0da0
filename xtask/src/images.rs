//! `cargo xtask images`: OCI image archives of Weft's release binaries, for a cluster without a
//! registry (`ctr -n k8s.io images import target/images/<name>.oci.tar`).
//!
//! Each image is one uncompressed layer, distroless-style: the binaries, exactly the shared
//! libraries the dynamic loader resolves for them on this machine (the real files, copied to the
//! paths the loader found them at, the loader included), a minimal /etc/passwd and /etc/group
//! (root, nobody, nonroot 65532) and /tmp (1777); no shell, no package manager, no CA certificates.
//! The same binaries give the same digests (see `oci`).
//!
//! Besides Weft's own images, `registry.k8s.io/pause:3.6`, the pod sandbox image containerd 1.6
//! asks for: a static build of `xtask/images/pause.c`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use serde_json::json;

use crate::{output, run, step};

mod elf;
mod oci;
#[cfg(test)]
mod tests;

/// Where Weft's images are named.
pub const REGISTRY: &str = "weft.dev";
/// The workspace's version: the tag of Weft's images, which the manifests refer to.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The sandbox image containerd 1.6 uses by default (its `sandbox_image`).
pub const PAUSE_REFERENCE: &str = "registry.k8s.io/pause:3.6";
const PAUSE_SOURCE: &str = include_str!("../images/pause.c");
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n\
                      nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n";
/// glibc's lookups (users, groups, hosts) from /etc and DNS, both built into its libc.
const NSSWITCH: &str = "passwd: files\ngroup: files\nhosts: files dns\n";
const NONROOT: u64 = 65532;

/// Builds every image archive from `root`'s release build (`target/<triple>/release`, [`crate::release_dir`]) into
/// `target/images/<name>.oci.tar`, writes `target/images/images.json` (`[{name, reference, path,
/// digest, size}]`: the manifest's digest, the archive's size in bytes) and prints each reference and
/// size. Returns the archives' paths. A missing binary, an unresolvable library or a failing gcc stop
/// it; archives are replaced whole (written aside, then renamed), never left half-written.
pub fn build(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let release = root.join("target").join(crate::release_target()).join("release");
    let out = root.join("target").join("images");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let pause = pause_binary(&out.join("cache"))?;

    let mut built = Vec::new();
    for spec in specs(&release, &pause) {
        step(&format!("image {}", spec.reference));
        let archive = spec.archive()?;
        let path = out.join(format!("{}.oci.tar", spec.name));
        write_whole(&path, &archive.bytes)?;
        built.push(Built {
            name: spec.name.to_owned(),
            reference: spec.reference,
            path,
            digest: archive.digest,
            size: archive.bytes.len() as u64,
        });
    }

    let list = json!(
        built
            .iter()
            .map(|b| json!({
                "name": b.name,
                "reference": b.reference,
                "path": b.path,
                "digest": b.digest,
                "size": b.size,
            }))
            .collect::<Vec<_>>()
    );
    let list_path = out.join("images.json");
    write_whole(
        &list_path,
        format!("{}\n", serde_json::to_string_pretty(&list)?).as_bytes(),
    )?;

    step(&format!("images (list: {})", list_path.display()));
    for b in &built {
        println!(
            "    {:<40} {:>8.1} MiB  {}  {}",
            b.reference,
            b.size as f64 / (1024.0 * 1024.0),
            b.digest,
            b.path.display()
        );
    }
    Ok(built.into_iter().map(|b| b.path).collect())
}

/// Builds `xtask/images/pause.c` with `gcc -Os -static -s` into `cache`, once per source and
/// compiler; returns the binary's path.
pub fn pause_binary(cache: &Path) -> anyhow::Result<PathBuf> {
    let gcc = output(Command::new("gcc").arg("--version")).context("the pause image is built with gcc")?;
    let key = oci::digest(format!("{PAUSE_SOURCE}\0{gcc}").as_bytes());
    let key = key.get(7..23).context("short digest")?;
    let bin = cache.join(format!("pause-{key}"));
    if bin.is_file() {
        return Ok(bin);
    }
    step("building the pause binary (gcc -Os -static)");
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let src = cache.join(format!("pause-{key}.c"));
    std::fs::write(&src, PAUSE_SOURCE).with_context(|| format!("writing {}", src.display()))?;
    let partial = cache.join(format!("pause-{key}.partial-{}", std::process::id()));
    run(Command::new("gcc")
        .args(["-Os", "-static", "-s", "-o"])
        .arg(&partial)
        .arg(&src))?;
    std::fs::rename(&partial, &bin).with_context(|| format!("renaming to {}", bin.display()))?;
    Ok(bin)
}

// === impl Spec ===

/// One image: what goes into it.
struct Spec {
    /// The archive's file name, `<name>.oci.tar`.
    name: &'static str,
    reference: String,
    /// `(file on this machine, path in the image)`; the first is the entrypoint.
    binaries: Vec<(PathBuf, String)>,
    /// The distroless base (passwd, group, /tmp) and the binaries' shared libraries; the pause image
    /// has only its static binary.
    base: bool,
    /// `org.opencontainers.image.version`.
    version: &'static str,
}

/// Weft's images, from the binaries in `release`, and the pause image from `pause`.
fn specs(release: &Path, pause: &Path) -> Vec<Spec> {
    let weft = |name: &'static str, binaries: &[&'static str]| Spec {
        name,
        reference: format!("{REGISTRY}/{name}:{VERSION}"),
        binaries: binaries
            .iter()
            .map(|b| (release.join(b), format!("/usr/bin/{b}")))
            .collect(),
        base: true,
        version: VERSION,
    };
    vec![
        // weft-cni is not run here: the DaemonSet copies it from this image onto the host.
        weft("weft-node", &["weft-node", "weft-cni"]),
        weft("weft-controller", &["weft-controller"]),
        // The end-to-end tests' workload (client and server Deployments).
        weft("weft-probe", &["weft-probe"]),
        Spec {
            name: "pause",
            reference: PAUSE_REFERENCE.to_owned(),
            binaries: vec![(pause.to_owned(), "/pause".to_owned())],
            base: false,
            version: "3.6",
        },
    ]
}

impl Spec {
    /// The image's file tree: base, binaries and what they load.
    fn rootfs(&self) -> anyhow::Result<oci::Tree> {
        let mut tree = oci::Tree::default();
        if self.base {
            tree.file("/etc/passwd", 0o644, PASSWD.into())?;
            tree.file("/etc/group", 0o644, GROUP.into())?;
            tree.file("/etc/nsswitch.conf", 0o644, NSSWITCH.into())?;
            tree.dir("/tmp", 0o1777)?;
            tree.dir("/root", 0o700)?;
            tree.dir_owned("/home/nonroot", 0o700, NONROOT, NONROOT)?;
        }
        for (file, path) in &self.binaries {
            tree.file(path, 0o755, read(file)?)?;
            let needed = elf::needed(file)?;
            anyhow::ensure!(
                self.base || needed.is_none(),
                "{} must be static: the {} image has no libraries",
                file.display(),
                self.name
            );
            if let Some(needed) = needed {
                let interp = &needed.interpreter;
                tree.file(&interp.to_string_lossy(), 0o755, read(interp)?)?;
                for lib in &needed.libraries {
                    tree.file(&lib.to_string_lossy(), 0o644, read(lib)?)?;
                }
            }
        }
        Ok(tree)
    }

    fn archive(&self) -> anyhow::Result<oci::Archive> {
        let entrypoint = self
            .binaries
            .first()
            .with_context(|| format!("the {} image has no binary", self.name))?
            .1
            .clone();
        let config = oci::Config {
            entrypoint: vec![entrypoint],
            env: vec![PATH_ENV.to_owned()],
            labels: BTreeMap::from([(oci::LABEL_VERSION.to_owned(), self.version.to_owned())]),
        };
        oci::archive(&self.reference, &config, &self.rootfs()?).with_context(|| format!("building {}", self.reference))
    }
}

struct Built {
    name: String,
    reference: String,
    path: PathBuf,
    digest: String,
    size: u64,
}

/// The real file's contents (symlinks followed).
fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes `path` aside and renames it into place.
fn write_whole(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let partial = path.with_extension(format!("partial-{}", std::process::id()));
    std::fs::write(&partial, bytes).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming to {}", path.display()))
}
