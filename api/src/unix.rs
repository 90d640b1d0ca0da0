//! Unix sockets that never exist with wider permissions than their final ones.
//!
//! Shared by the controller (the admin socket) and the node agent (the CNI socket). It lives in this
//! crate because it is the one both already depend on that may do I/O: `weft-model` is pure by
//! contract, and the controller does not depend on `weft-dataplane`. It needs nothing but std.

// The crate allows clippy's lints for the generated code; this module is written by hand.
#![warn(clippy::all)]

use std::{
    fmt, fs, io,
    os::unix::{
        fs::{DirBuilderExt as _, PermissionsExt as _},
        net::UnixListener,
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// How many staging directory names [`bind_private`] tries before giving up.
const STAGING_ATTEMPTS: u32 = 16;

/// A socket that could not be bound: which path, at which step, and the system's reason.
#[derive(Debug)]
pub enum Error {
    /// The private staging directory next to the socket could not be created.
    Stage { dir: PathBuf, source: io::Error },
    /// The socket could not be bound in the staging directory, or made private there.
    Bind { path: PathBuf, source: io::Error },
    /// The finished socket could not be moved to its final path.
    Publish { path: PathBuf, source: io::Error },
}

// (Display and Error by hand: this crate does not depend on thiserror.)
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Stage { dir, .. } => write!(f, "cannot create the private directory {} to bind in", dir.display()),
            Error::Bind { path, .. } => write!(f, "cannot bind {}", path.display()),
            Error::Publish { path, .. } => write!(f, "cannot move the bound socket to {}", path.display()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Stage { source, .. } | Error::Bind { source, .. } | Error::Publish { source, .. } => Some(source),
        }
    }
}

/// Binds a unix stream socket at `path` with mode 0600, such that nobody but this user (and root)
/// can ever connect to it, not even for an instant. Returns it non-blocking (ready for
/// `tokio::net::UnixListener::from_std`).
///
/// `bind(2)` creates the socket file with `0777 & !umask`, so binding at `path` and then `chmod`ing
/// leaves a window in which another local user may connect (and keep the connection). The umask
/// cannot close it: it is process-wide, and both callers are multi-threaded when they bind. Instead
/// the socket is bound inside a fresh directory created 0700 next to `path` (connecting needs search
/// permission on every directory of the path, so nobody else can reach it there), made 0600 there,
/// and then renamed to `path`: the name appears only once the socket is complete. A rename keeps the
/// inode the listener is bound to, so clients connecting at `path` reach this listener (its
/// `local_addr` still names the staging path). The staging directory is removed whatever happens.
///
/// A file already at `path` is replaced atomically: a caller that must not take over a socket that
/// is still in use checks that first. The staging path is about 18 bytes longer than
/// `<dir>/<name>`, which matters only near the 107-byte limit of a socket path.
pub fn bind_private(path: &Path) -> Result<UnixListener, Error> {
    let staging = Staging::create(path)?;
    let staged = staging.dir.join("s");
    let bind = |source| Error::Bind {
        path: staged.clone(),
        source,
    };
    let listener = UnixListener::bind(&staged).map_err(bind)?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o600)).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    fs::rename(&staged, path).map_err(|source| Error::Publish {
        path: path.to_owned(),
        source,
    })?;
    Ok(listener)
}

/// A directory only this user can enter, next to the socket's final path; removed (with a socket
/// left in it) on drop.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn create(path: &Path) -> Result<Staging, Error> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut attempt = 0;
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = parent.join(format!(".bind-{}-{n}", std::process::id()));
            // Created by this call or not used at all: a directory someone else made is never trusted.
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Staging { dir }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt + 1 < STAGING_ATTEMPTS => {
                    attempt += 1;
                }
                Err(source) => return Err(Error::Stage { dir, source }),
            }
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.dir.join("s"));
        let _ = fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        ffi::CString,
        fs::File,
        io::Read as _,
        os::{
            fd::FromRawFd as _,
            unix::{ffi::OsStrExt as _, fs::FileTypeExt as _, net::UnixStream},
        },
    };

    use super::*;

    // inotify, declared here rather than taken from the libc crate, which this crate does not use.
    const IN_NONBLOCK: i32 = 0o4000;
    const IN_CLOEXEC: i32 = 0o2000000;
    const IN_ATTRIB: u32 = 0x004;
    const IN_MOVED_TO: u32 = 0x080;
    const IN_CREATE: u32 = 0x100;
    unsafe extern "C" {
        fn inotify_init1(flags: i32) -> i32;
        fn inotify_add_watch(fd: i32, path: *const std::ffi::c_char, mask: u32) -> i32;
    }

    /// A fresh directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            let dir = std::env::temp_dir().join(format!("weft-unix-{name}-{}-{nanos}", std::process::id()));
            fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Watches `dir` for entries being created, moved in, or changing attributes.
    fn watch(dir: &Path) -> File {
        // SAFETY: plain syscalls; the fd is owned by the File below and the path outlives the call.
        unsafe {
            let fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
            assert!(fd >= 0, "inotify_init1: {}", io::Error::last_os_error());
            let path = CString::new(dir.as_os_str().as_bytes()).unwrap();
            let wd = inotify_add_watch(fd, path.as_ptr(), IN_ATTRIB | IN_MOVED_TO | IN_CREATE);
            assert!(wd >= 0, "inotify_add_watch: {}", io::Error::last_os_error());
            File::from_raw_fd(fd)
        }
    }

    /// The events queued so far, as (mask, name).
    fn events(inotify: &mut File) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = match inotify.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                Err(e) => panic!("reading inotify: {e}"),
            };
            let mut at = 0;
            while at + 16 <= n {
                let word = |i: usize| u32::from_ne_bytes(buf[at + i..at + i + 4].try_into().unwrap());
                let (mask, len) = (word(4), word(12) as usize);
                let name = &buf[at + 16..at + 16 + len];
                let name = String::from_utf8_lossy(name.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
                out.push((mask, name));
                at += 16 + len;
            }
        }
    }

    #[test]
    fn socket_never_exists_at_its_path_with_wider_permissions() {
        let dir = TempDir::new("mode");
        let path = dir.0.join("agent.sock");
        let mut inotify = watch(&dir.0);
        let _listener = bind_private(&path).unwrap();
        // The name appeared once, already complete: nothing was created at it and then tightened.
        let seen: Vec<u32> = events(&mut inotify)
            .into_iter()
            .filter(|(_, name)| name == "agent.sock")
            .map(|(mask, _)| mask)
            .collect();
        assert_eq!(
            seen,
            [IN_MOVED_TO],
            "events on the socket's name (0x80 moved in, 0x100 created, 0x4 attributes)"
        );
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        UnixStream::connect(&path).expect("the listener answers at its final path");
        let left: Vec<_> = fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["agent.sock"], "nothing is left behind");
    }

    #[test]
    fn stale_socket_file_is_replaced() {
        let dir = TempDir::new("stale");
        let path = dir.0.join("agent.sock");
        drop(bind_private(&path).unwrap());
        assert!(
            UnixStream::connect(&path).is_err(),
            "nobody listens on the stale socket"
        );
        let _listener = bind_private(&path).unwrap();
        UnixStream::connect(&path).expect("the new listener answers");
    }

    #[test]
    fn unbindable_path_is_an_error_naming_it() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("no/such/dir/agent.sock");
        let err = bind_private(&path).unwrap_err().to_string();
        assert!(err.contains(&dir.0.join("no/such/dir").display().to_string()), "{err}");
    }
}
