use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use serde_json::Value;

use super::{
    PAUSE_REFERENCE, Spec, VERSION, elf,
    oci::{self, Tree},
    pause_binary, specs,
};

mod containerd;

// === helpers ===

/// A directory removed on drop.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("weft-images-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One tar entry as read back.
#[derive(Debug)]
struct Read {
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    data: Vec<u8>,
}

/// A tar's entries by path (a directory's without its trailing '/'), in the order they were written.
fn untar(bytes: &[u8]) -> Vec<(String, Read)> {
    let mut archive = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().trim_end_matches('/').to_owned();
        let header = entry.header().clone();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.push((
            path,
            Read {
                kind: header.entry_type(),
                mode: header.mode().unwrap(),
                uid: header.uid().unwrap(),
                gid: header.gid().unwrap(),
                mtime: header.mtime().unwrap(),
                data,
            },
        ));
    }
    out
}

/// The archive's files by path, after checking it is a consistent OCI image layout: every blob is
/// named after its digest, each descriptor's digest and size match its blob, index -> manifest ->
/// config and layer, the config's diff_id is the layer's digest (uncompressed), and no blob is left
/// over. Returns (index, manifest, config, layer).
fn check_layout(archive: &oci::Archive) -> (Value, Value, Value, Vec<u8>) {
    let files: BTreeMap<String, Read> = untar(&archive.bytes)
        .into_iter()
        .filter(|(_, r)| r.kind == tar::EntryType::Regular)
        .collect();
    assert_eq!(
        files["oci-layout"].data, br#"{"imageLayoutVersion":"1.0.0"}"#,
        "oci-layout"
    );
    let blobs: BTreeMap<&str, &[u8]> = files
        .iter()
        .filter_map(|(p, r)| Some((p.strip_prefix("blobs/sha256/")?, r.data.as_slice())))
        .collect();
    for (name, data) in &blobs {
        assert_eq!(
            oci::digest(data),
            format!("sha256:{name}"),
            "blob named after its digest"
        );
    }
    let resolve = |descriptor: &Value, media_type: &str| -> Vec<u8> {
        assert_eq!(descriptor["mediaType"], media_type);
        let digest = descriptor["digest"].as_str().unwrap();
        let blob = blobs[digest.strip_prefix("sha256:").unwrap()];
        assert_eq!(
            descriptor["size"].as_u64().unwrap(),
            blob.len() as u64,
            "size of {digest}"
        );
        blob.to_vec()
    };
    let index: Value = serde_json::from_slice(&files["index.json"].data).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    let manifest_bytes = resolve(&index["manifests"][0], oci::MEDIA_TYPE_MANIFEST);
    assert_eq!(
        oci::digest(&manifest_bytes),
        archive.digest,
        "the archive's digest is the manifest's"
    );
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest["schemaVersion"], 2);
    let config: Value = serde_json::from_slice(&resolve(&manifest["config"], oci::MEDIA_TYPE_CONFIG)).unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
    let layer = resolve(&manifest["layers"][0], oci::MEDIA_TYPE_LAYER);
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([oci::digest(&layer)]));
    assert_eq!(blobs.len(), 3, "config, manifest and layer, nothing else");
    (index, manifest, config, layer)
}

fn small_rootfs() -> Tree {
    let mut tree = Tree::default();
    tree.file("/usr/bin/hello", 0o755, b"#!not really\n".to_vec()).unwrap();
    tree.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/sbin/nologin\n".to_vec())
        .unwrap();
    tree.dir("/tmp", 0o1777).unwrap();
    tree
}

fn small_config() -> oci::Config {
    oci::Config {
        entrypoint: vec!["/usr/bin/hello".into()],
        env: vec!["PATH=/usr/bin".into()],
        labels: BTreeMap::from([(oci::LABEL_VERSION.to_owned(), "1.2.3".to_owned())]),
    }
}

// === the archive ===

#[test]
fn archive_is_an_oci_layout_containerd_names_by_its_reference() {
    let archive = oci::archive("weft.dev/hello:1.2.3", &small_config(), &small_rootfs()).unwrap();
    let (index, _, config, layer) = check_layout(&archive);

    let annotations = &index["manifests"][0]["annotations"];
    assert_eq!(annotations[oci::ANNOTATION_IMAGE_NAME], "weft.dev/hello:1.2.3");
    assert_eq!(annotations[oci::ANNOTATION_REF_NAME], "1.2.3");
    assert_eq!(index["manifests"][0]["platform"]["architecture"], "amd64");

    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/usr/bin/hello"]));
    assert_eq!(config["config"]["Env"], serde_json::json!(["PATH=/usr/bin"]));
    assert_eq!(config["config"]["Labels"][oci::LABEL_VERSION], "1.2.3");

    let entries = untar(&layer);
    let paths: Vec<&str> = entries.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        ["etc", "etc/passwd", "tmp", "usr", "usr/bin", "usr/bin/hello"],
        "sorted, each directory before what it holds"
    );
    for (path, entry) in &entries {
        assert_eq!((entry.uid, entry.gid, entry.mtime), (0, 0, 0), "{path}");
    }
    let entry = |p: &str| &entries.iter().find(|(path, _)| path == p).unwrap().1;
    assert_eq!(entry("tmp").kind, tar::EntryType::Directory);
    assert_eq!(entry("tmp").mode, 0o1777);
    assert_eq!(entry("usr").mode, 0o755);
    assert_eq!(entry("usr/bin/hello").mode, 0o755);
    assert_eq!(entry("usr/bin/hello").data, b"#!not really\n");
}

#[test]
fn same_files_give_the_same_digest_in_any_order() {
    let first = oci::archive("weft.dev/hello:1.2.3", &small_config(), &small_rootfs()).unwrap();
    let mut reordered = Tree::default();
    reordered.dir("/tmp", 0o1777).unwrap();
    reordered
        .file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/sbin/nologin\n".to_vec())
        .unwrap();
    reordered
        .file("/usr/bin/hello", 0o755, b"#!not really\n".to_vec())
        .unwrap();
    let second = oci::archive("weft.dev/hello:1.2.3", &small_config(), &reordered).unwrap();
    assert_eq!(first.digest, second.digest);
    assert!(first.bytes == second.bytes, "the archives differ");

    let mut changed = small_rootfs();
    changed.file("/usr/bin/other", 0o755, b"x".to_vec()).unwrap();
    let third = oci::archive("weft.dev/hello:1.2.3", &small_config(), &changed).unwrap();
    assert_ne!(first.digest, third.digest, "a different file tree, a different digest");
}

#[test]
fn tree_refuses_conflicting_and_escaping_paths() {
    let mut tree = small_rootfs();
    tree.file("/usr/bin/hello", 0o755, b"#!not really\n".to_vec())
        .expect("the same file twice is one file");
    assert!(tree.file("/usr/bin/hello", 0o755, b"other".to_vec()).is_err());
    assert!(tree.file("/usr/bin/hello", 0o644, b"#!not really\n".to_vec()).is_err());
    assert!(
        tree.file("/usr/bin/hello/x", 0o644, Vec::new()).is_err(),
        "under a file"
    );
    assert!(tree.dir("/usr/bin/hello", 0o755).is_err(), "a file is no directory");
    assert!(tree.file("/usr", 0o644, Vec::new()).is_err(), "a directory is no file");
    assert!(tree.file("/../etc/x", 0o644, Vec::new()).is_err());
    assert!(tree.file("/etc//x", 0o644, Vec::new()).is_err());
    assert!(tree.file("/", 0o644, Vec::new()).is_err());
}

#[test]
fn reference_tag_is_after_the_last_colon_of_the_last_component() {
    assert_eq!(oci::tag("weft.dev/weft-node:0.1.0"), Some("0.1.0"));
    assert_eq!(oci::tag("registry.k8s.io/pause:3.6"), Some("3.6"));
    assert_eq!(oci::tag("localhost:5000/weft:v1"), Some("v1"));
    assert_eq!(oci::tag("localhost:5000/weft"), None);
    assert_eq!(oci::tag("weft:"), None);
    assert!(oci::archive("weft.dev/untagged", &small_config(), &small_rootfs()).is_err());
}

// === what goes into an image ===

#[test]
fn images_are_weft_binaries_at_the_workspace_version_and_the_pause_sandbox() {
    let list: Vec<String> = specs(Path::new("/rel"), Path::new("/cache/pause"))
        .iter()
        .map(|s| {
            let files: Vec<String> = s
                .binaries
                .iter()
                .map(|(f, p)| format!("{} -> {p}", f.display()))
                .collect();
            format!("{} {} [{}] {}", s.name, s.reference, files.join(", "), s.version)
        })
        .collect();
    assert_eq!(
        list,
        [
            format!(
                "weft-node weft.dev/weft-node:{VERSION} \
                 [/rel/weft-node -> /usr/bin/weft-node, /rel/weft-cni -> /usr/bin/weft-cni] {VERSION}"
            ),
            format!(
                "weft-controller weft.dev/weft-controller:{VERSION} \
                 [/rel/weft-controller -> /usr/bin/weft-controller] {VERSION}"
            ),
            format!("weft-probe weft.dev/weft-probe:{VERSION} [/rel/weft-probe -> /usr/bin/weft-probe] {VERSION}"),
            "pause registry.k8s.io/pause:3.6 [/cache/pause -> /pause] 3.6".to_owned(),
        ]
    );
}

/// A Spec of one dynamically linked binary: this test program, a Rust binary like Weft's.
pub(super) fn test_spec() -> Spec {
    Spec {
        name: "image-test",
        reference: format!("weft.test/image-test:{VERSION}"),
        binaries: vec![(std::env::current_exe().unwrap(), "/usr/bin/image-test".into())],
        base: true,
        version: VERSION,
    }
}

#[test]
fn dynamic_binary_comes_with_its_loader_and_libraries_as_real_files() {
    let spec = test_spec();
    let archive = spec.archive().unwrap();
    let (_, _, config, layer) = check_layout(&archive);
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/bin/image-test"])
    );
    assert_eq!(config["config"]["Labels"][oci::LABEL_VERSION], VERSION);

    let entries: BTreeMap<String, Read> = untar(&layer).into_iter().collect();
    let needed = elf::needed(&spec.binaries[0].0)
        .unwrap()
        .expect("a Rust test binary is dynamic");
    assert_eq!(needed.interpreter, Path::new("/lib64/ld-linux-x86-64.so.2"));
    assert!(needed.libraries.iter().any(|l| l.ends_with("libc.so.6")), "{needed:?}");
    for file in std::iter::once(&needed.interpreter).chain(&needed.libraries) {
        let entry = &entries[file.to_str().unwrap().trim_start_matches('/')];
        assert_eq!(entry.kind, tar::EntryType::Regular, "{} is a real file", file.display());
        assert!(entry.data == std::fs::read(file).unwrap(), "{} copied", file.display());
    }
    assert_eq!(entries["lib64/ld-linux-x86-64.so.2"].mode, 0o755);

    // Distroless: the binary, what it loads, a user database and /tmp; nothing else.
    let extra: Vec<&str> = entries
        .iter()
        .filter(|(_, e)| e.kind == tar::EntryType::Regular)
        .map(|(p, _)| p.as_str())
        .filter(|p| {
            !needed
                .libraries
                .iter()
                .chain([&needed.interpreter])
                .any(|l| *l == Path::new("/").join(p))
                && !["usr/bin/image-test", "etc/passwd", "etc/group", "etc/nsswitch.conf"].contains(p)
        })
        .collect();
    assert!(extra.is_empty(), "unexpected files {extra:?}");
    assert!(!entries.contains_key("bin/sh") && !entries.contains_key("usr/bin/sh"));
    let passwd = String::from_utf8_lossy(&entries["etc/passwd"].data).into_owned();
    assert!(passwd.contains("\nnonroot:x:65532:65532:"), "{passwd}");
    let group = String::from_utf8_lossy(&entries["etc/group"].data).into_owned();
    assert!(group.contains("\nnonroot:x:65532:"), "{group}");
    assert_eq!(entries["tmp"].mode, 0o1777);
    assert_eq!(
        (entries["home/nonroot"].uid, entries["home/nonroot"].gid),
        (65532, 65532)
    );

    assert_eq!(
        spec.archive().unwrap().digest,
        archive.digest,
        "rebuilt, the same digest"
    );
}

#[test]
fn pause_is_a_cached_static_binary_alone_in_its_image() {
    let cache = TempDir::new("pause");
    let bin = pause_binary(cache.path()).unwrap();
    let modified = std::fs::metadata(&bin).unwrap().modified().unwrap();
    assert_eq!(pause_binary(cache.path()).unwrap(), bin);
    assert_eq!(
        std::fs::metadata(&bin).unwrap().modified().unwrap(),
        modified,
        "built once"
    );
    assert_eq!(elf::interpreter(&std::fs::read(&bin).unwrap()).unwrap(), None, "static");

    let specs = specs(Path::new("/nowhere"), &bin);
    let pause = specs.iter().find(|s| s.reference == PAUSE_REFERENCE).unwrap();
    let (index, _, config, layer) = check_layout(&pause.archive().unwrap());
    assert_eq!(index["manifests"][0]["annotations"][oci::ANNOTATION_REF_NAME], "3.6");
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/pause"]));
    let paths: Vec<String> = untar(&layer).into_iter().map(|(p, _)| p).collect();
    assert_eq!(paths, ["pause"]);
}

#[test]
fn a_dynamic_binary_is_refused_where_no_libraries_go() {
    let mut spec = test_spec();
    spec.base = false;
    let err = format!("{:#}", spec.archive().err().expect("refused"));
    assert!(err.contains("must be static"), "{err}");
}

// === the dynamic loader ===

#[test]
fn loader_list_gives_every_file_and_refuses_a_missing_library() {
    let out = "\tlinux-vdso.so.1 (0x00007ffc4a9f1000)\n\
               \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1f9a89d000)\n\
               \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1f9933e000)\n\
               \t/lib64/ld-linux-x86-64.so.2 (0x00007f1f9a8d0000)\n";
    assert_eq!(
        elf::parse_list(out).unwrap(),
        [
            "/lib/x86_64-linux-gnu/libgcc_s.so.1",
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib64/ld-linux-x86-64.so.2"
        ]
        .map(PathBuf::from)
    );
    let missing = format!("{out}\tlibweft.so.1 => not found\n");
    let err = elf::parse_list(&missing).unwrap_err().to_string();
    assert!(err.contains("libweft.so.1"), "{err}");
    assert!(elf::parse_list("\tstatically linked\n").is_err());
}

#[test]
fn interpreter_is_read_from_the_elf_program_headers() {
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert_eq!(
        elf::interpreter(&exe).unwrap().as_deref(),
        Some("/lib64/ld-linux-x86-64.so.2")
    );
    assert!(elf::interpreter(b"#!/bin/sh\n").is_err(), "not ELF");
    assert!(elf::interpreter(&exe[..0x30]).is_err(), "truncated");
    let mut arm = exe.clone();
    arm[0x12..0x14].copy_from_slice(&183u16.to_le_bytes());
    assert!(elf::interpreter(&arm).is_err(), "aarch64 is no amd64 image");
}
