//! The store on disk, in its state directory: a snapshot and a write-ahead log.
//!
//! - `store.json`, the snapshot: `{"format":1,"id":…,"revision":R,"objects":[…]}`, the whole state
//!   at revision R. Only ever replaced whole (write, fsync, rename, fsync of the directory).
//! - `store.log`, the log: one line per commit after the snapshot's, `<checksum> <record>\n`. The
//!   record is JSON, `{"id":…,"revision":N,"put":[objects],"remove":[references]}` (what the commit
//!   changed); the checksum is the first 8 bytes of the record's SHA-256, in hex. A commit is
//!   acknowledged only once its line is on disk (fdatasync): a commit costs what it changed.
//!
//! Opening reads the snapshot and replays the records after its revision. The records must follow
//! each other without a gap up to the snapshot's revision and on, and belong to the snapshot's store.
//! A last line that is incomplete or fails its checksum is what a crash while appending leaves (it
//! was never acknowledged): it is cut, with a warning. A bad line before the end is an error naming
//! the file and the record. A log without a snapshot is what is left of a store that was removed:
//! it is set aside (`store.log.orphaned`) and a new store starts.
//!
//! Compaction: once the log is larger than the snapshot (and than [`COMPACT_AFTER`]), a thread
//! writes a snapshot of the state just committed, then rewrites the log without the records that
//! snapshot holds (a new file renamed over it); commits go on meanwhile. A store that is dropped
//! (a clean shutdown) is compacted: `store.json` alone then holds it.
//!
//! Why a crash loses no acknowledged revision and applies none twice: the snapshot and the log are
//! each replaced atomically, the snapshot always before the log loses records, and replay skips the
//! records the snapshot holds by their revision. Each append is on disk before the next begins, and
//! one that failed is cut before the next, so only the last line can be torn.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    thread,
    time::Instant,
};

use serde::{Deserialize, Serialize};

use super::{
    Error, FILE_NAME, State,
    objects::{Object, ObjectRef},
};

/// The file name of the log inside the state directory.
pub const LOG_NAME: &str = "store.log";

/// What a log found without a snapshot is renamed to.
const ORPHANED_NAME: &str = "store.log.orphaned";

/// The log is compacted once it holds more than this, and more than the snapshot.
pub(super) const COMPACT_AFTER: u64 = 1 << 20;

/// What is wrong with a record of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogProblem {
    #[error("its checksum does not match, and records follow it")]
    Checksum,
    #[error("it does not parse")]
    Parse {
        #[source]
        source: serde_json::Error,
    },
    #[error("its revision {found} does not follow revision {after}")]
    Gap { after: u64, found: u64 },
    #[error("it belongs to store {found:?}, not to {expected:?} (the snapshot's)")]
    OtherStore { expected: String, found: String },
}

/// The log's writer, and what it knows of the files. Shared with the compaction thread.
pub(super) struct Log {
    dir: PathBuf,
    path: PathBuf,
    snapshot_path: PathBuf,
    /// Opened on the first append (and again after the file is replaced).
    file: Option<File>,
    /// The length of the acknowledged records: bytes past it are cut before the next append.
    len: u64,
    /// (revision, offset) of each record in the file, oldest first.
    records: VecDeque<(u64, u64)>,
    /// An append began and did not finish (it failed, or panicked): the file may hold more than `len`.
    tail_dirty: bool,
    snapshot_len: u64,
    compact_after: u64,
    /// The compaction thread, while it runs (and until the next commit or close looks).
    compaction: Option<thread::JoinHandle<()>>,
    /// After a failed compaction, the log length at which it is tried again.
    retry_at: u64,
}

/// Reads the store in `dir` (an empty one at revision 0 when there is none yet, its identity on
/// disk before this returns). Errors name the file.
pub(super) fn open(dir: &Path, compact_after: u64) -> Result<(State, Log), Error> {
    let snapshot_path = dir.join(FILE_NAME);
    let path = dir.join(LOG_NAME);
    let snapshot = read_snapshot(&snapshot_path)?;
    let mut bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(Error::Read { path, source }),
    };
    if snapshot.is_none() && !bytes.is_empty() {
        let orphaned = dir.join(ORPHANED_NAME);
        fs::rename(&path, &orphaned).map_err(|source| Error::Persist {
            path: orphaned.clone(),
            source,
        })?;
        tracing::warn!(
            log = %path.display(),
            moved_to = %orphaned.display(),
            "the store's log has no snapshot beside it (the store was removed): set aside, a new store starts"
        );
        bytes.clear();
    }
    let (mut state, mut snapshot_len) = snapshot.unwrap_or_default();
    if state.id.is_empty() {
        // A new store (or one written before stores had an identity): its identity is fixed now,
        // on disk before anyone is told it.
        state.id = super::random_uid()?;
        snapshot_len = write_snapshot(&snapshot_path, &state)?;
    }
    let replayed = replay(&path, &bytes, &mut state)?;
    let mut log = Log {
        dir: dir.to_owned(),
        path,
        snapshot_path,
        file: None,
        len: bytes.len() as u64,
        records: replayed.records,
        tail_dirty: false,
        snapshot_len,
        compact_after,
        compaction: None,
        retry_at: 0,
    };
    if replayed.keep != (0..bytes.len()) {
        if replayed.keep.end < bytes.len() {
            tracing::warn!(
                log = %log.path.display(),
                bytes = bytes.len() - replayed.keep.end,
                "cut a torn last record (a crash while it was written; it was never acknowledged)"
            );
        }
        let records = std::mem::take(&mut log.records);
        log.replace(&bytes[replayed.keep], records)
            .map_err(|source| Error::Persist {
                path: log.path.clone(),
                source,
            })?;
    }
    Ok((state, log))
}

/// Takes the log's lock. A panic while it was held leaves nothing half-done that the next append
/// does not undo first (`tail_dirty`), so a poisoned lock is safe to take over.
pub(super) fn lock(log: &Mutex<Log>) -> MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits for a compaction under way, then compacts what the log holds into a snapshot of `state`
/// (the current one). Failures are logged: the log still holds every revision.
pub(super) fn close(shared: &Mutex<Log>, state: &State) {
    wait_for_compaction(shared);
    if !lock(shared).records.is_empty() {
        compact(shared, state);
    }
}

/// Waits for a compaction under way, if any.
pub(super) fn wait_for_compaction(shared: &Mutex<Log>) {
    let job = lock(shared).compaction.take();
    if let Some(job) = job {
        joined(job);
    }
}

/// Reaps a compaction thread that ended (or waits for it to).
fn joined(job: thread::JoinHandle<()>) {
    if job.join().is_err() {
        tracing::error!("the store's compaction panicked; the log still holds every revision");
    }
}

impl Log {
    /// Appends the record of the commit from `before` to `after` (`after.revision` is the next
    /// one) and waits until it is on disk. On failure nothing is acknowledged, and what the
    /// append may have written is cut.
    pub(super) fn append(&mut self, before: &State, after: &State) -> Result<(), Error> {
        let path = self.path.clone();
        let persist = |source| Error::Persist { path, source };
        let mut record = RecordRef {
            id: &after.id,
            revision: after.revision,
            put: Vec::new(),
            remove: Vec::new(),
        };
        for change in before.changes(after) {
            match change {
                (_, Some(new)) => record.put.push(new),
                (Some(old), None) => record.remove.push(old.object_ref()),
                (None, None) => {}
            }
        }
        let line = match serde_json::to_vec(&record) {
            Ok(json) => frame(&json),
            Err(e) => return Err(persist(io::Error::other(e))),
        };
        self.write_line(after.revision, &line).map_err(persist)
    }

    /// Starts a compaction of `state` (just committed) on a thread of its own when the log has
    /// outgrown the snapshot and none is under way.
    pub(super) fn compact_if_due(&mut self, shared: &Arc<Mutex<Log>>, state: &Arc<State>) {
        if let Some(ended) = self.compaction.take_if(|job| job.is_finished()) {
            joined(ended);
        }
        if self.compaction.is_some() || self.len <= self.bound() || self.len < self.retry_at {
            return;
        }
        let (shared, state) = (shared.clone(), state.clone());
        let span = tracing::info_span!("store_compaction", revision = state.revision);
        let spawned = thread::Builder::new()
            .name("store-compaction".into())
            .spawn(move || span.in_scope(|| compact(&shared, &state)));
        match spawned {
            Ok(job) => self.compaction = Some(job),
            Err(e) => {
                self.retry_at = self.len + self.bound();
                tracing::warn!(error = %e, "cannot start the store's compaction; the log keeps growing");
            }
        }
    }

    /// The size the log may reach before it is compacted.
    fn bound(&self) -> u64 {
        self.snapshot_len.max(self.compact_after)
    }

    fn write_line(&mut self, revision: u64, line: &[u8]) -> io::Result<()> {
        let file = match self.file.take() {
            Some(file) => file,
            None => open_log(&self.path, &self.dir)?,
        };
        let file = self.file.insert(file);
        if self.tail_dirty {
            file.set_len(self.len)?;
            self.tail_dirty = false;
        }
        self.tail_dirty = true;
        if let Err(e) = file.write_all_at(line, self.len).and_then(|()| file.sync_data()) {
            // Not acknowledged: cut now, so that it does not come back after a crash either (and
            // if this fails too, before the next append).
            if file.set_len(self.len).and_then(|()| file.sync_data()).is_ok() {
                self.tail_dirty = false;
            }
            return Err(e);
        }
        self.tail_dirty = false;
        self.records.push_back((revision, self.len));
        self.len += line.len() as u64;
        Ok(())
    }

    /// Rewrites the log without the records up to `revision` (a snapshot holds them).
    fn drop_through(&mut self, revision: u64) -> io::Result<()> {
        let keep = self
            .records
            .iter()
            .find(|(r, _)| *r > revision)
            .map_or(self.len, |(_, offset)| *offset);
        if keep == 0 {
            return Ok(());
        }
        let mut rest = vec![0; usize::try_from(self.len - keep).map_err(io::Error::other)?];
        File::open(&self.path)?.read_exact_at(&mut rest, keep)?;
        let records = self
            .records
            .iter()
            .filter(|(r, _)| *r > revision)
            .map(|(r, offset)| (*r, offset - keep))
            .collect();
        self.replace(&rest, records)
    }

    /// Replaces the log file with `bytes` (whole records, at `records`) durably.
    fn replace(&mut self, bytes: &[u8], records: VecDeque<(u64, u64)>) -> io::Result<()> {
        self.file = None;
        weft_api::durable::write(&self.path, bytes, 0o600)?;
        self.len = bytes.len() as u64;
        self.records = records;
        self.tail_dirty = false;
        Ok(())
    }
}

/// Writes a snapshot of `state` and drops from the log what it holds. Runs on the compaction
/// thread (the log's lock is not held while the snapshot is written), or on close.
fn compact(shared: &Mutex<Log>, state: &State) {
    let started = Instant::now();
    let snapshot_path = lock(shared).snapshot_path.clone();
    let written = write_snapshot(&snapshot_path, state);
    let mut log = lock(shared);
    let result = written.and_then(|bytes| {
        log.snapshot_len = bytes;
        log.drop_through(state.revision).map_err(|source| Error::Persist {
            path: log.path.clone(),
            source,
        })
    });
    match result {
        Ok(()) => tracing::info!(
            revision = state.revision,
            snapshot_bytes = log.snapshot_len,
            log_bytes = log.len,
            ms = started.elapsed().as_millis() as u64,
            "store compacted"
        ),
        Err(e) => {
            log.retry_at = log.len + log.bound();
            tracing::warn!(
                error = %e,
                cause = %std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default(),
                "cannot compact the store (the log still holds every revision; tried again later)"
            );
        }
    }
}

/// The on-disk form of the snapshot.
#[derive(Deserialize)]
struct Persisted {
    // `format` is not read: there has been one (1).
    #[serde(default)]
    id: String,
    revision: u64,
    objects: Vec<Object>,
}

/// [`Persisted`], written from a state without copying its objects.
#[derive(Serialize)]
struct PersistedRef<'a> {
    format: u32,
    id: &'a str,
    revision: u64,
    objects: Vec<&'a Object>,
}

/// One record of the log.
#[derive(Deserialize)]
struct Record {
    id: String,
    revision: u64,
    #[serde(default)]
    put: Vec<Object>,
    #[serde(default)]
    remove: Vec<ObjectRef>,
}

/// [`Record`], written from a state without copying its objects.
#[derive(Serialize)]
struct RecordRef<'a> {
    id: &'a str,
    revision: u64,
    put: Vec<&'a Object>,
    remove: Vec<ObjectRef>,
}

/// The snapshot and its size, `None` when there is none.
fn read_snapshot(path: &Path) -> Result<Option<(State, u64)>, Error> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let file: Persisted = serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt {
        path: path.to_owned(),
        source,
    })?;
    let state = State::new(file.id, file.revision, file.objects);
    Ok(Some((state, bytes.len() as u64)))
}

/// Writes `state` as the snapshot durably; its size.
pub(super) fn write_snapshot(path: &Path, state: &State) -> Result<u64, Error> {
    let err = |source| Error::Persist {
        path: path.to_owned(),
        source,
    };
    let file = PersistedRef {
        format: 1,
        id: &state.id,
        revision: state.revision,
        objects: state.objects().collect(),
    };
    let bytes = serde_json::to_vec(&file).map_err(|e| err(io::Error::other(e)))?;
    weft_api::durable::write(path, &bytes, 0o600).map_err(err)?;
    Ok(bytes.len() as u64)
}

/// What replay keeps of a log file: the bytes (the records after the snapshot, up to the torn
/// last one if there is one) and where each record is in them.
struct Replayed {
    keep: std::ops::Range<usize>,
    records: VecDeque<(u64, u64)>,
}

/// Checks the records of `bytes` (the log at `path`) and applies those after the snapshot's
/// revision to `state`.
fn replay(path: &Path, bytes: &[u8], state: &mut State) -> Result<Replayed, Error> {
    let corrupt = |index: usize, problem| Error::LogCorrupt {
        path: path.to_owned(),
        record: index + 1,
        problem,
    };
    // (start, end, the record if the line is whole and its checksum matches)
    let mut lines = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        let (end, record) = match bytes[start..].iter().position(|b| *b == b'\n') {
            Some(n) => (start + n + 1, unframe(&bytes[start..start + n])),
            None => (bytes.len(), None),
        };
        lines.push((start, end, record));
        start = end;
    }
    let whole = match lines.iter().position(|(_, _, record)| record.is_none()) {
        Some(bad) if lines[bad + 1..].iter().any(|(_, _, record)| record.is_some()) => {
            return Err(corrupt(bad, LogProblem::Checksum));
        }
        Some(torn) => torn,
        None => lines.len(),
    };
    let end = lines[..whole].last().map_or(0, |(_, end, _)| *end);
    let base = state.revision;
    let mut previous = None;
    let mut keep_from = None;
    let mut records = VecDeque::new();
    for (index, (start, _, json)) in lines[..whole].iter().enumerate() {
        let record: Record = serde_json::from_slice(json.unwrap_or_default())
            .map_err(|source| corrupt(index, LogProblem::Parse { source }))?;
        if record.id != state.id {
            return Err(corrupt(
                index,
                LogProblem::OtherStore {
                    expected: state.id.clone(),
                    found: record.id,
                },
            ));
        }
        // Contiguous, and reaching the snapshot's revision at least.
        let gap = match previous {
            Some(after) => (record.revision != after + 1).then_some(after),
            None => (record.revision > base + 1).then_some(base),
        };
        if let Some(after) = gap {
            return Err(corrupt(
                index,
                LogProblem::Gap {
                    after,
                    found: record.revision,
                },
            ));
        }
        previous = Some(record.revision);
        if record.revision <= base {
            continue; // the snapshot holds it
        }
        let from = *keep_from.get_or_insert(*start);
        records.push_back((record.revision, (start - from) as u64));
        for r in &record.remove {
            state.remove(r);
        }
        for object in record.put {
            state.put(Arc::new(object));
        }
        state.revision = record.revision;
    }
    Ok(Replayed {
        keep: keep_from.unwrap_or(end)..end,
        records,
    })
}

/// `<checksum> <json>`, newline-terminated.
fn frame(json: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(json.len() + 18);
    line.extend_from_slice(checksum(json).as_bytes());
    line.push(b' ');
    line.extend_from_slice(json);
    line.push(b'\n');
    line
}

/// The JSON of a line (without its newline) whose checksum matches.
fn unframe(line: &[u8]) -> Option<&[u8]> {
    let (sum, rest) = line.split_at_checked(16)?;
    let json = rest.strip_prefix(b" ")?;
    (checksum(json).as_bytes() == sum).then_some(json)
}

/// The first 8 bytes of the SHA-256 of `json`, in hex.
fn checksum(json: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, json);
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens the log for writing, creating it (and making its name durable) if there is none.
fn open_log(path: &Path, dir: &Path) -> io::Result<File> {
    match OpenOptions::new().write(true).open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            File::open(dir)?.sync_all()?;
            Ok(file)
        }
        opened => opened,
    }
}
