//! `cargo xtask images`: OCI image archives of Weft's release binaries.
//!
//! (being written)

use std::path::{Path, PathBuf};

/// Builds every image archive from `root`'s release build; returns the archives' paths.
pub fn build(_root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::bail!("cargo xtask images: not built yet")
}
