//! A file tree and the OCI image archive made of it: pure, no I/O.
//!
//! The archive is an OCI image layout in a tar (`oci-layout`, `index.json`, `blobs/sha256/…`) with
//! one uncompressed layer, which `ctr images import` accepts. Everything is deterministic: entries
//! sorted by path, mtime 0, owner 0:0 unless set otherwise, JSON with sorted keys. The same files
//! give the same digests.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// The full image reference containerd names the image by on import.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// The tag, per the OCI image layout.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const LABEL_VERSION: &str = "org.opencontainers.image.version";
/// Every timestamp in an image: the epoch, so that nothing depends on when it was built.
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in hash {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

// === impl Tree ===

/// A file tree, kept sorted by path; `tar` writes it as a deterministic tar.
#[derive(Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

struct Entry {
    /// `None` for a directory.
    data: Option<Vec<u8>>,
    mode: u32,
    uid: u64,
    gid: u64,
}

impl Tree {
    /// Adds a directory (and its missing parents, 0755) owned by 0:0. Adding an existing directory
    /// again sets its mode; a file at that path is an error.
    pub fn dir(&mut self, path: &str, mode: u32) -> anyhow::Result<()> {
        self.dir_owned(path, mode, 0, 0)
    }

    /// Adds a directory owned by `uid:gid`.
    pub fn dir_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> anyhow::Result<()> {
        let path = self.parents(path)?;
        match self.entries.get_mut(&path) {
            Some(Entry { data: Some(_), .. }) => bail!("{path} is a file, not a directory"),
            Some(dir) => {
                dir.mode = mode;
                dir.uid = uid;
                dir.gid = gid;
            }
            None => {
                self.entries.insert(
                    path,
                    Entry {
                        data: None,
                        mode,
                        uid,
                        gid,
                    },
                );
            }
        }
        Ok(())
    }

    /// Adds a regular file (and its missing parent directories, 0755) owned by 0:0. The same file
    /// added twice is kept once; different contents or modes at one path are an error.
    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> anyhow::Result<()> {
        let path = self.parents(path)?;
        if let Some(have) = self.entries.get(&path) {
            ensure!(
                have.data.as_deref() == Some(data.as_slice()) && have.mode == mode,
                "{path} is added twice with different contents or modes"
            );
            return Ok(());
        }
        self.entries.insert(
            path,
            Entry {
                data: Some(data),
                mode,
                uid: 0,
                gid: 0,
            },
        );
        Ok(())
    }

    /// The tree as a tar: entries sorted by path (a directory before what it holds), mtime 0.
    pub fn tar(&self) -> anyhow::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(entry.mode);
            header.set_uid(entry.uid);
            header.set_gid(entry.gid);
            header.set_mtime(0);
            // Names fixed rather than the building host's: the archive must not depend on it.
            header.set_username("")?;
            header.set_groupname("")?;
            match &entry.data {
                Some(data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(data.len() as u64);
                    tar.append_data(&mut header, path, data.as_slice())
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    tar.append_data(&mut header, format!("{path}/"), std::io::empty())
                }
            }
            .with_context(|| format!("writing {path} into a tar"))?;
        }
        tar.into_inner().context("finishing a tar")
    }

    /// Checks `path` and adds its missing parent directories; returns it without the leading '/'.
    fn parents(&mut self, path: &str) -> anyhow::Result<String> {
        let path = path.trim_start_matches('/');
        ensure!(
            !path.is_empty() && path.split('/').all(|c| !c.is_empty() && c != "." && c != ".."),
            "bad path in an image: {path:?}"
        );
        let mut end = 0;
        while let Some(slash) = path[end..].find('/') {
            end += slash;
            let parent = &path[..end];
            match self.entries.get(parent) {
                Some(Entry { data: Some(_), .. }) => bail!("{parent} is a file, so {path} cannot be under it"),
                Some(_) => {}
                None => {
                    self.entries.insert(
                        parent.to_owned(),
                        Entry {
                            data: None,
                            mode: 0o755,
                            uid: 0,
                            gid: 0,
                        },
                    );
                }
            }
            end += 1;
        }
        Ok(path.to_owned())
    }
}

// === impl Image ===

/// What an image's config says besides its layer.
pub struct Config {
    pub entrypoint: Vec<String>,
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// An image archive, ready to be written.
pub struct Archive {
    /// The tar of the OCI image layout.
    pub bytes: Vec<u8>,
    /// The manifest's digest: what containerd lists as the image's digest.
    pub digest: String,
}

/// The OCI image archive for `reference` (`name:tag`) of one layer, `rootfs`.
pub fn archive(reference: &str, config: &Config, rootfs: &Tree) -> anyhow::Result<Archive> {
    let tag = tag(reference).with_context(|| format!("image reference {reference:?} has no tag"))?;
    let layer = rootfs.tar()?;
    let layer_digest = digest(&layer);

    let config = canonical(json!({
        "architecture": "amd64",
        "config": {
            "Entrypoint": config.entrypoint,
            "Env": config.env,
            "Labels": config.labels,
            "WorkingDir": "/",
        },
        "created": EPOCH,
        "history": [{"created": EPOCH, "created_by": "cargo xtask images"}],
        "os": "linux",
        // Uncompressed, the layer's diff_id is its digest.
        "rootfs": {"diff_ids": [layer_digest], "type": "layers"},
    }))?;
    let manifest = canonical(json!({
        "config": descriptor(MEDIA_TYPE_CONFIG, &config),
        "layers": [descriptor(MEDIA_TYPE_LAYER, &layer)],
        "mediaType": MEDIA_TYPE_MANIFEST,
        "schemaVersion": 2,
    }))?;
    let manifest_digest = digest(&manifest);
    let mut manifest_descriptor = descriptor(MEDIA_TYPE_MANIFEST, &manifest);
    manifest_descriptor["annotations"] = json!({
        ANNOTATION_IMAGE_NAME: reference,
        ANNOTATION_REF_NAME: tag,
    });
    manifest_descriptor["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let index = canonical(json!({
        "manifests": [manifest_descriptor],
        "mediaType": MEDIA_TYPE_INDEX,
        "schemaVersion": 2,
    }))?;

    let mut layout = Tree::default();
    layout.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec())?;
    layout.file("index.json", 0o644, index)?;
    for blob in [layer, config, manifest] {
        let path = format!("blobs/sha256/{}", digest(&blob).trim_start_matches("sha256:"));
        layout.file(&path, 0o644, blob)?;
    }
    Ok(Archive {
        bytes: layout.tar()?,
        digest: manifest_digest,
    })
}

/// The tag of `name:tag` (a ':' in a registry's host:port is not one).
pub fn tag(reference: &str) -> Option<&str> {
    let last = reference.rsplit('/').next()?;
    let (name, tag) = last.rsplit_once(':')?;
    (!name.is_empty() && !tag.is_empty()).then_some(tag)
}

fn descriptor(media_type: &str, blob: &[u8]) -> Value {
    json!({"digest": digest(blob), "mediaType": media_type, "size": blob.len()})
}

/// `value` as JSON with every object's keys sorted, whatever serde_json's features (with
/// `preserve_order`, unified in from elsewhere in the workspace, maps keep insertion order).
fn canonical(mut value: Value) -> anyhow::Result<Vec<u8>> {
    value.sort_all_objects();
    serde_json::to_vec(&value).context("serializing image JSON")
}
