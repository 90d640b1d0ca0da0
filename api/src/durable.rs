//! Files that must survive a crash or a power cut whole: the old content or the new, never a torn
//! or empty file. The one durable-write helper of the controller (its store, its CA), the node agent
//! (its pod-network state) and `weftctl dev` (a dev cluster's state).

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

/// Replaces `path` with `bytes` durably: writes a temporary file beside it (created with `mode`),
/// flushes it to disk, renames it over `path`, and flushes the directory so the rename itself is on
/// disk. A crash at any point leaves either the previous file or the new one. The temporary file is
/// removed if any step fails.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        // A temporary file left by a crash is removed; a new one is created, never opened through
        // whatever stands at its name.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn replaces_the_file_whole_with_its_mode_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("weft-durable-{}", std::process::id()));
        fs_reset(&dir);
        let path = dir.join("state.json");
        super::write(&path, b"first", 0o600).unwrap();
        super::write(&path, b"second", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"], "nothing else is left in the directory");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_keeps_the_previous_content() {
        let dir = std::env::temp_dir().join(format!("weft-durable-fail-{}", std::process::id()));
        fs_reset(&dir);
        let path = dir.join("state.json");
        super::write(&path, b"good", 0o600).unwrap();
        // A directory where the file should go: the rename fails.
        let blocked = dir.join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"").unwrap();
        assert!(super::write(&blocked, b"new", 0o600).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"good");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left behind: {names:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn fs_reset(dir: &std::path::Path) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
    }
}
