//! Network namespaces: sockets keep the namespace they were created in, so the agent creates its
//! in-pod sockets by switching one thread into the pod's namespace for the duration of a call.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

/// An open network namespace.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens the network namespace at `path` (`/proc/<pid>/ns/net`, `/var/run/netns/<name>`, ...).
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        Ok(Self { file, path })
    }

    /// The calling thread's current network namespace.
    pub fn current() -> io::Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the calling thread switched into this namespace, then switches back.
    ///
    /// `f` must be synchronous and must not yield to an async runtime, and must not itself switch
    /// namespaces: the thread goes back to its home namespace (where it first called `run`), which
    /// saves reopening it on every call. Returns an error, without running `f`, if the thread cannot
    /// enter the namespace.
    ///
    /// # Panics
    /// If the thread cannot return to its original namespace. That would leave a runtime thread
    /// silently in a pod's namespace; setns back to a namespace we hold open cannot fail short of
    /// kernel memory exhaustion, so this is treated as an invariant.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        HOME.with(|home| {
            // The thread's own namespace, opened once per thread: `run` always returns the thread
            // to it, so the namespace a thread first ran in stays its home.
            let home = match home.get() {
                Some(h) => h,
                None => {
                    let current = Self::current()?;
                    home.get_or_init(|| current)
                }
            };
            setns(self.file.as_fd())?;
            let out = f();
            #[allow(clippy::expect_used)]
            setns(home.file.as_fd()).expect("invariant: returning to the original network namespace");
            Ok(out)
        })
    }
}

thread_local! {
    static HOME: std::cell::OnceCell<NetNs> = const { std::cell::OnceCell::new() };
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid, open namespace file descriptor.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
