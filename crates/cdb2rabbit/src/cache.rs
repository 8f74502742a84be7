//! CACHE_DIR: what cdb2rabbit remembers between runs, in the original's layout
//! so an existing cache directory keeps working.
//!
//! - `cached_info.xml`: the index as of the last run, in the broker's format;
//!   a profile's mtime there advances only once the profile was processed
//!   (published and confirmed, or found unchanged).
//! - `<name>`: the last published JSON of each profile (namespaced names are
//!   subdirectories), to tell a real change from a recompile.
//! - `.cdb2rabbit.lock`: the exclusive run lock (cron, the timer and the
//!   cdispd hook may overlap).
//! - `.cdb2rabbit-spare/<name>`: the copy a profile had before its last
//!   change (see below); never read.
//! - `.cdb2rabbit-tmp/`: the new cached index before it replaces the old
//!   one; emptied by every run when it takes the lock.
//! - `.cdb2rabbit-unsynced`: the profiles whose cached copies cannot be
//!   trusted, while there are any (see below).
//!
//! Every file is replaced atomically, so a reader never sees half a file.
//! The index: temp file in the same directory, then rename. A profile's
//! copy: the new JSON is written into its spare file (overwriting it in
//! place), which is then swapped with the copy in one
//! `renameat2(RENAME_EXCHANGE)`; the spare keeps the old copy's inode and
//! disk block for the next change. Creating a temp file and renaming it
//! over the copy instead costs an inode allocated and one freed per copy,
//! and on ext4 without a journal inode allocation skips every inode freed
//! in the last half minute, block by block: a run rewriting 1,000 copies
//! shortly after another spent most of its time there (0.6 s of system CPU
//! against 0.1 s with the swap). Truncating the spare before writing it
//! frees its block, which on a filesystem mounted with `discard` waits for
//! the device to trim it (240 µs a copy against 30 µs in place). Where the
//! swap is not supported (other filesystems) the spare is renamed over the
//! copy, which is as atomic. What needs to be durable, and when:
//!
//! - Whether a profile is looked at at all is decided by the cached index,
//!   and a profile's mtime there advances only after its publish was
//!   confirmed by the broker and its copy is durable: a run that dies
//!   leaves its profiles to the next run.
//! - A copy the dead run wrote may hold anything after a crash (new JSON,
//!   old, the spare's, a mix), and compared against it could hide a change
//!   (the profile reverted to what the stale copy holds). So before the
//!   first copy is written, the profiles the run may write copies for are
//!   durably listed in [`UNSYNCED_MARK`], and a run publishes a listed
//!   profile whatever its copy says until an index records it
//!   ([`Transaction::untrusted`]): a duplicate, never a loss.
//! - The copies must be durable *before* the index that points past them:
//!   were the index to survive a crash and a copy not, a later change
//!   reverting the profile to that older copy would compare equal and
//!   never be published.
//!
//! So copies are written without fsync (an fsync each was most of a large
//! run's cost). A `syncfs(2)` is started on another thread every
//! [`SYNC_EVERY`] copies and once the downloads are done, so that the
//! kernel writes them back in large batches while the run goes on
//! (starting each copy's writeback as it was written cost a block request
//! each, and a tenth of the run's CPU); then one `syncfs(2)`
//! on CACHE_DIR's filesystem (as the [`Transaction`] finishes) makes all of them
//! durable at once, then the index is written with temp file, fsync,
//! rename, fsync of the directory, and only then do the profiles it
//! records leave [`UNSYNCED_MARK`].

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::index::{self, Index, IndexError};
use crate::names::check_name;

pub use crate::names::CACHED_INDEX;
/// The run lock (a dot file: [`check_name`] keeps profiles away from it).
pub const LOCK_FILE: &str = ".cdb2rabbit.lock";
/// Where each profile's spare file lives (a dot directory, like the lock).
pub const SPARE_DIR: &str = ".cdb2rabbit-spare";
/// Where the cached index is written before it is renamed into place; a
/// temp file left there by a run that died is removed by the next run.
pub const TEMP_DIR: &str = ".cdb2rabbit-tmp";
/// The profiles whose cached copies cannot be trusted, a name a line: see
/// [`Transaction::untrusted`].
pub const UNSYNCED_MARK: &str = ".cdb2rabbit-unsynced";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: cached index is unusable ({source}); remove it to record a new baseline")]
    BadIndex { path: PathBuf, source: IndexError },
    #[error("{path}: another cdb2rabbit run still holds the lock after {waited:?}")]
    LockTimeout { path: PathBuf, waited: Duration },
}

impl CacheError {
    /// The filesystem (or the quota) is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, CacheError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
    }
}

/// Room left on CACHE_DIR's filesystem, as `statvfs(2)` tells it.
#[derive(Debug, Clone, Copy)]
pub struct Room {
    /// Bytes free for us.
    pub free: u64,
    /// The allocation unit: a file takes whole blocks.
    pub block: u64,
    /// Inodes free, where the filesystem counts them.
    pub files: Option<u64>,
}

impl Room {
    /// What a file of `len` bytes takes, in whole blocks.
    pub fn needed(&self, len: usize) -> u64 {
        (len as u64).div_ceil(self.block.max(1)) * self.block
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cached index as it is on disk, not yet parsed: most runs only read
/// it in step with the broker's (see [`CachedIndex::against`]).
#[derive(Debug)]
pub struct CachedIndex {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl CachedIndex {
    /// The broker's `index` set against this one
    /// ([`index::match_cached_document`]); `Err` when this one cannot be read.
    pub fn against(self, index: &Index) -> Result<index::Matched<'_>, CacheError> {
        index::match_cached_document(index, self.bytes).map_err(|source| CacheError::BadIndex {
            path: self.path,
            source,
        })
    }
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct CacheDir {
    root: PathBuf,
}

/// Held while a run works on the cache; released when dropped (or when the
/// process dies, so a crashed run never wedges the next one).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl CacheDir {
    pub fn new(root: impl Into<PathBuf>) -> CacheDir {
        CacheDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn index_path(&self) -> PathBuf {
        self.root.join(CACHED_INDEX)
    }

    /// Where the cached copy of `name` lives. `name` must have passed [`check_name`].
    pub fn profile_path(&self, name: &str) -> PathBuf {
        debug_assert!(check_name(name).is_ok());
        self.root.join(copy_path(name))
    }

    /// Takes the exclusive run lock, creating CACHE_DIR if needed. Waits at
    /// most `wait` for another run to finish; `on_wait` is called once if it
    /// has to wait at all.
    fn lock(&self, wait: Duration, on_wait: impl FnOnce()) -> Result<RunLock, CacheError> {
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => return Ok(self.locked(file)),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
        on_wait();
        // The blocking lock runs on a thread of its own so the wait can be
        // bounded; on timeout that thread is left blocked and dies with the process.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let result = file.lock().map(|()| file);
            let _ = tx.send(result);
        });
        match rx.recv_timeout(wait) {
            Ok(Ok(file)) => Ok(self.locked(file)),
            Ok(Err(e)) => Err(io(&path)(e)),
            Err(_) => Err(CacheError::LockTimeout { path, waited: wait }),
        }
    }

    /// The lock is ours: what a run that died left in [`TEMP_DIR`] goes.
    fn locked(&self, file: File) -> RunLock {
        if let Ok(entries) = std::fs::read_dir(self.root.join(TEMP_DIR)) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        RunLock { _file: file }
    }

    /// The cached index, or `None` on the first run.
    pub fn read_index(&self) -> Result<Option<Index>, CacheError> {
        let Some(cached) = self.read_index_document()? else {
            return Ok(None);
        };
        index::parse(cached.bytes)
            .map(Some)
            .map_err(|source| CacheError::BadIndex {
                path: cached.path,
                source,
            })
    }

    /// The cached index as it is on disk, or `None` on the first run.
    fn read_index_document(&self) -> Result<Option<CachedIndex>, CacheError> {
        let path = self.index_path();
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(CachedIndex { path, bytes })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Replaces the cached index with `entries`, durably.
    fn write_index<'a>(&self, entries: impl IntoIterator<Item = (&'a str, u64)>) -> Result<(), CacheError> {
        self.commit(self.write_temp_index(entries)?, Durability::Durable)
    }

    /// As [`CacheDir::write_index`], after this run's cached copies: one
    /// `syncfs(2)` makes the copies and the new index durable together,
    /// before the new index replaces the old one.
    fn write_index_after_copies<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<(), CacheError> {
        self.commit(self.write_temp_index(entries)?, Durability::DurableWithCopies)
    }

    /// Writes a new cached index to a temp file beside the current one, and
    /// starts writing it to disk, without replacing anything yet:
    /// [`CacheDir::commit_index`] does that. A run writes the index it
    /// expects while its downloads go on, so that a run where everything
    /// succeeds ends without a 5 MB write. Dropped uncommitted, the temp
    /// file is removed.
    fn prepare_index<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<PreparedIndex, CacheError> {
        let prepared = self.write_temp_index(entries)?;
        start_writeback(prepared.file.as_file());
        Ok(prepared)
    }

    /// Replaces the cached index with a prepared one: one `syncfs(2)` makes
    /// it and this run's cached copies durable, then the rename, then the
    /// directory's fsync.
    fn commit_index(&self, prepared: PreparedIndex) -> Result<(), CacheError> {
        self.commit(prepared, Durability::DurableWithCopies)
    }

    /// `entries` in a temp file in [`TEMP_DIR`], neither durable nor in place.
    fn write_temp_index<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<PreparedIndex, CacheError> {
        let file = self.temp_file()?;
        let mut w = BufWriter::new(file.as_file());
        index::write_cached(&mut w, entries).map_err(io(file.path()))?;
        w.flush().map_err(io(file.path()))?;
        drop(w);
        Ok(PreparedIndex { file })
    }

    /// A new temp file in [`TEMP_DIR`], removed when dropped (on an error
    /// too) unless persisted.
    fn temp_file(&self) -> Result<tempfile::NamedTempFile, CacheError> {
        let temps = self.root.join(TEMP_DIR);
        std::fs::create_dir_all(&temps).map_err(io(&temps))?;
        tempfile::Builder::new()
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(&temps)
            .map_err(io(&temps))
    }

    /// Makes a temp index durable as `durability` says, renames it over the
    /// cached index and fsyncs CACHE_DIR.
    fn commit(&self, prepared: PreparedIndex, durability: Durability) -> Result<(), CacheError> {
        let file = prepared.file;
        match durability {
            Durability::Durable => file.as_file().sync_all(),
            Durability::DurableWithCopies => syncfs(file.as_file()),
        }
        .map_err(io(file.path()))?;
        self.install(file, &self.index_path())
    }

    /// Renames a temp file (already durable) to `path` in CACHE_DIR, and
    /// fsyncs CACHE_DIR so that the rename is durable too.
    fn install(&self, file: tempfile::NamedTempFile, path: &Path) -> Result<(), CacheError> {
        file.persist(path).map_err(|e| io(path)(e.error))?;
        File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.root))
    }

    /// The cached copy of a profile, `None` when there is none.
    pub fn read_profile(&self, name: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.profile_path(name);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Replaces the cached copy of a profile atomically, but not durably:
    /// call [`CacheDir::sync_copies`] before the index that relies on it.
    #[cfg(test)]
    fn write_profile(&self, name: &str, body: &[u8]) -> Result<(), CacheError> {
        self.write_copy(name, body, &mut CopyState::default())
    }

    /// [`CacheDir::write_profile`]: first (once per `state`) the profile and
    /// `state.suspects` are marked as unsynced, and directories `state`
    /// does not know yet are created.
    fn write_copy(&self, name: &str, body: &[u8], state: &mut CopyState) -> Result<(), CacheError> {
        self.mark_suspects(Some(name), state)?;
        let path = self.profile_path(name);
        let spare = self.root.join(SPARE_DIR).join(copy_path(name));
        for dir in [path.parent(), spare.parent()].into_iter().flatten() {
            if !state.made.contains(dir) {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
                state.made.insert(dir.to_path_buf());
            }
        }
        // The spare is overwritten in place, not truncated first: truncating
        // frees its disk block (and, on a filesystem mounted with `discard`,
        // waits for the device to trim it) only to allocate one again.
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&spare)
            .and_then(|mut file| {
                file.write_all(body)?;
                if file.metadata()?.len() != body.len() as u64 {
                    file.set_len(body.len() as u64)?;
                }
                // Written back with the others by the next syncfs
                // (see `Recorder::record`).
                Ok(())
            });
        written.map_err(io(&spare))?;
        swap_into_place(&spare, &path).map_err(io(&path))
    }

    /// Marks `state.suspects` (and `name`) as unsynced, unless `state`
    /// already did.
    fn mark_suspects(&self, name: Option<&str>, state: &mut CopyState) -> Result<(), CacheError> {
        if !state.marked {
            let names = state.suspects.iter().map(String::as_str).chain(name);
            self.mark_unsynced(names)?;
            state.marked = true;
        }
        Ok(())
    }

    /// The profiles whose cached copies cannot be trusted (usually none).
    ///
    /// A run writes a profile's copy after the broker confirmed it, and
    /// records the profile in the cached index only later, after one
    /// `syncfs`. Should the run die in between (killed, a crash, a power
    /// cut) or fail before it records its index, the profile is looked at
    /// again by the next run, but its copy may hold anything after a crash:
    /// the new JSON, the previous one, the spare's, a mix. Compared against,
    /// it could make a change look like no change (a profile reverted to
    /// what the stale copy holds, while the broker last got the newer
    /// version): a lost rebuild. So before a run writes its first copy it
    /// durably records the profiles it may write copies for, and a later
    /// run publishes those whatever their copy says (a duplicate, never a
    /// loss) until one records them. A run that ends normally keeps listed
    /// only what was listed before it and is still not recorded, and the
    /// profiles whose copy it could not write after the broker confirmed
    /// them (see `settle_unsynced`); the copy of a profile that failed
    /// otherwise was not touched.
    fn unsynced(&self) -> Result<HashSet<String>, CacheError> {
        let path = self.root.join(UNSYNCED_MARK);
        // Read leniently: a line that is not UTF-8 cannot name a profile anyway.
        match std::fs::read(&path) {
            Ok(bytes) => Ok(String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Adds `names` to [`UNSYNCED_MARK`], durably, before any copy of theirs
    /// can reach the disk.
    fn mark_unsynced<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<(), CacheError> {
        let mut all = self.unsynced()?;
        all.extend(names.into_iter().map(str::to_string));
        self.write_unsynced(all)
    }

    /// Once an index recording the profiles in `settled` is durably in
    /// place, their copies are trusted again: they leave [`UNSYNCED_MARK`],
    /// which goes when it is empty.
    fn settle_unsynced(&self, settled: impl Fn(&str) -> bool) -> Result<(), CacheError> {
        let before = self.unsynced()?;
        if before.is_empty() {
            return Ok(());
        }
        let after: HashSet<String> = before.iter().filter(|n| !settled(n)).cloned().collect();
        if after.len() == before.len() {
            Ok(())
        } else if after.is_empty() {
            // Need not be durable: were the removal lost, the next run would
            // only publish more than it needs to.
            let path = self.root.join(UNSYNCED_MARK);
            std::fs::remove_file(&path).map_err(io(&path))
        } else {
            self.write_unsynced(after)
        }
    }

    /// Replaces [`UNSYNCED_MARK`] with `names`, atomically and durably.
    fn write_unsynced(&self, names: HashSet<String>) -> Result<(), CacheError> {
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort();
        let mut text = names.join("\n");
        text.push('\n');
        let temp = self.temp_file()?;
        let mut file = temp.as_file();
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io(temp.path()))?;
        self.install(temp, &self.root.join(UNSYNCED_MARK))
    }

    /// Starts the thread that writes this run's cached copies (see
    /// [`CopyWriter`]), of some of the profiles `may_write` (with the
    /// first copy, all of them are marked [unsynced](CacheDir::unsynced)).
    fn copy_writer(&self, may_write: Vec<String>) -> CopyWriter {
        CopyWriter::start(self.clone(), may_write)
    }

    /// The room left on CACHE_DIR's filesystem.
    pub fn room(&self) -> std::io::Result<Room> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.root.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in CACHE_DIR"))?;
        // SAFETY: statvfs only writes into the struct we pass, and the path
        // is NUL-terminated and lives across the call.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let block = (st.f_frsize as u64).max(1);
        Ok(Room {
            free: st.f_bavail as u64 * block,
            block: (st.f_bsize as u64).max(block),
            files: (st.f_files > 0).then_some(st.f_favail as u64),
        })
    }

    /// Makes every profile copy written so far durable, with one
    /// `syncfs(2)` of the filesystem holding CACHE_DIR (new namespace
    /// directories included) instead of an fsync per copy.
    fn sync_copies(&self) -> Result<(), CacheError> {
        let dir = File::open(&self.root).map_err(io(&self.root))?;
        syncfs(&dir).map_err(io(&self.root))
    }
}

/// One run's work on CACHE_DIR: the only way a run reads or changes the
/// cache, so that the order the rules above ask for is kept here, and
/// nowhere else.
///
/// A run opens it under the run lock ([`CacheDir::begin`]; a dry run,
/// which only reads, without: [`CacheDir::peek`]), reads the cached index
/// and the cached copies through it, tells it which profiles it may write
/// copies for ([`Transaction::plan`]), records each profile the broker
/// confirmed ([`Recorder::record`]), and ends it with the profiles that
/// succeeded ([`Transaction::finish`]): the transaction then makes the
/// copies durable, records the new index and settles [`UNSYNCED_MARK`], in
/// that order. Dropped unfinished, it leaves the cached index as it was.
pub struct Transaction {
    cache: CacheDir,
    /// `None`: a dry run's, which writes nothing.
    lock: Option<RunLock>,
    /// Profiles whose cached copies were not trusted when it opened.
    untrusted: HashSet<String>,
    /// This run's copies (from [`Transaction::plan`] on).
    copies: Option<Rc<Copies>>,
    /// The profiles this run may write copies for.
    candidates: usize,
    /// The index the run records if every candidate succeeds, written
    /// ahead on another thread (and the index it was made from).
    ahead: Option<(Arc<Index>, Pending<PreparedIndex>)>,
}

/// Cache work going on on another thread.
type Pending<T> = tokio::task::JoinHandle<Result<T, CacheError>>;

/// A run's cached copies: their writer, and what became of them.
struct Copies {
    cache: CacheDir,
    writer: CopyWriter,
    /// Copies written (made durable together before the index).
    written: Cell<usize>,
    /// The writer was asked to mark the suspects ahead of the first copy.
    marking: Cell<bool>,
    /// Profiles the broker confirmed whose copy could not be written.
    failed: RefCell<HashSet<String>>,
    /// The `syncfs(2)` started ahead of the closing one.
    early_sync: RefCell<Option<Pending<()>>>,
}

/// Records confirmed profiles for a [`Transaction`] (cheap to clone: the
/// publishes in flight hold one each).
#[derive(Clone)]
pub struct Recorder(Rc<Copies>);

/// The index a run records if every candidate succeeds: `index`'s entries,
/// then `extra` (bad entries the cache knew, with their cached mtimes).
pub struct Expected {
    pub index: Arc<Index>,
    pub extra: Vec<(String, u64)>,
}

impl CacheDir {
    /// Opens a run's transaction: takes the run lock (creating CACHE_DIR),
    /// waiting at most `wait` for another run to finish.
    pub fn begin(&self, wait: Duration) -> Result<Transaction, CacheError> {
        let lock = self.lock(wait, || {
            tracing::info!(
                "Another cdb2rabbit run holds {}; waiting for it (at most {wait:?})",
                self.root.join(LOCK_FILE).display(),
            )
        })?;
        self.open(Some(lock))
    }

    /// A transaction that only reads (a dry run): no lock, so CACHE_DIR is
    /// never created; it is not to be planned or finished.
    pub fn peek(&self) -> Result<Transaction, CacheError> {
        self.open(None)
    }

    fn open(&self, lock: Option<RunLock>) -> Result<Transaction, CacheError> {
        let untrusted = self.unsynced()?;
        if !untrusted.is_empty() {
            tracing::warn!(
                "The cached copies of {} profile(s) are not trusted (an earlier run stopped before \
                 recording them, or could not write them; listed in {}): if they changed they are \
                 published, whatever their cached copy says",
                untrusted.len(),
                self.root.join(UNSYNCED_MARK).display()
            );
        }
        Ok(Transaction {
            cache: self.clone(),
            lock,
            untrusted,
            copies: None,
            candidates: 0,
            ahead: None,
        })
    }
}

impl Transaction {
    pub fn root(&self) -> &Path {
        self.cache.root()
    }

    pub fn index_path(&self) -> PathBuf {
        self.cache.index_path()
    }

    /// The cached index (`None` on the first run), read on another thread
    /// from this call on, while the run does other things.
    pub fn cached_index(&self) -> impl std::future::Future<Output = Result<Option<CachedIndex>, CacheError>> {
        let cache = self.cache.clone();
        let task = tokio::task::spawn_blocking(move || cache.read_index_document());
        async move {
            task.await
                .unwrap_or_else(|e| panic!("reading the cached index panicked: {e}"))
        }
    }

    /// Whether the cached copy of `name` is not to be trusted (listed in
    /// [`UNSYNCED_MARK`] when the transaction opened: an earlier run may
    /// have left it in any state): if the profile changed it is published
    /// whatever its copy says.
    pub fn untrusted(&self, name: &str) -> bool {
        self.untrusted.contains(name)
    }

    /// The cached copy of a profile, `None` when there is none.
    pub fn read_profile(&self, name: &str) -> Result<Option<Vec<u8>>, CacheError> {
        self.cache.read_profile(name)
    }

    /// The room left on CACHE_DIR's filesystem.
    pub fn room(&self) -> std::io::Result<Room> {
        self.cache.room()
    }

    /// The first run: `entries` are recorded, durably, as the baseline.
    pub fn finish_baseline<'a>(self, entries: impl IntoIterator<Item = (&'a str, u64)>) -> Result<(), CacheError> {
        assert!(self.lock.is_some(), "a read-only transaction writes nothing");
        self.cache.write_index(entries)
    }

    /// The run may write copies for `candidates` (they are marked untrusted
    /// with the first copy written); `expected`, when given, is the index
    /// it will record if every candidate succeeds: it is written ahead, on
    /// another thread, so that such a run ends without a large write.
    pub fn plan(&mut self, candidates: &[(&str, u64)], expected: Option<Expected>) -> Recorder {
        self.candidates = candidates.len();
        let may_write = candidates.iter().map(|(name, _)| name.to_string()).collect();
        let copies = Rc::new(Copies {
            cache: self.cache.clone(),
            writer: self.cache.copy_writer(may_write),
            written: Cell::new(0),
            marking: Cell::new(false),
            failed: RefCell::new(HashSet::new()),
            early_sync: RefCell::new(None),
        });
        self.copies = Some(copies.clone());
        if let Some(Expected { index, extra }) = expected.filter(|_| self.lock.is_some()) {
            let (cache, ahead) = (self.cache.clone(), index.clone());
            let task = tokio::task::spawn_blocking(move || {
                let entries = ahead.entries.iter().map(|e| (e.name.as_str(), e.mtime));
                cache.prepare_index(entries.chain(extra.iter().map(|(n, m)| (n.as_str(), *m))))
            });
            self.ahead = Some((index, task));
        }
        Recorder(copies)
    }

    /// The run failed: nothing is recorded, and the index written ahead (if
    /// it was) is removed before the lock goes.
    pub async fn abandon(self) {
        if let Some((_, task)) = self.ahead {
            drop(task.await);
        }
    }

    /// Ends the run: `record` is the new cached index (`None`: the cached
    /// one stays as it is, not rewritten), `succeeded` the candidates that
    /// were processed. This run's copies are made durable before the index
    /// that points past them, and only then do the profiles the index now
    /// records leave [`UNSYNCED_MARK`].
    pub async fn finish(self, record: Option<Vec<(&str, u64)>>, succeeded: &HashSet<&str>) -> Result<(), CacheError> {
        assert!(self.lock.is_some(), "a read-only transaction writes nothing");
        let (written, failed) = match self.copies {
            Some(copies) => {
                let early_sync = copies.early_sync.borrow_mut().take();
                if let Some(sync) = early_sync {
                    // A failure is the closing syncfs's to report.
                    let _ = sync.await;
                }
                (copies.written.get(), copies.failed.take())
            }
            None => (0, HashSet::new()),
        };
        // The index written ahead, if it was (dropped, and its temp file
        // removed, when it is not the one to record).
        let ahead = match self.ahead {
            Some((index, task)) => match task.await {
                Ok(Ok(prepared)) => Some((index, prepared)),
                Ok(Err(e)) => {
                    tracing::debug!("writing the expected index ahead failed ({e}); writing it now");
                    None
                }
                Err(e) => panic!("writing the expected index panicked: {e}"),
            },
            None => None,
        };
        let start = std::time::Instant::now();
        match (record, ahead) {
            // Nothing to record: the file (100,000 entries are about 5 MB) is not rewritten.
            (None, _) if written > 0 => self.cache.sync_copies()?,
            (None, _) => {}
            // Every candidate succeeded: the index written ahead is the one to record.
            (Some(record), Some((index, prepared))) if succeeded.len() == self.candidates => {
                debug_assert!(
                    record.len() >= index.entries.len()
                        && record
                            .iter()
                            .zip(&index.entries)
                            .all(|(n, e)| n.0 == e.name && n.1 == e.mtime),
                    "the index written ahead differs from the one to record"
                );
                self.cache.commit_index(prepared)?
            }
            (Some(record), _) if written > 0 => self.cache.write_index_after_copies(record)?,
            (Some(record), _) => self.cache.write_index(record)?,
        }
        tracing::debug!(
            "cached index and {written} cached copies made durable in {:?}",
            start.elapsed()
        );
        // The index now records the profiles that succeeded, with their
        // copies. A profile listed before this run stays listed until it
        // succeeds; of this run's own, only those whose copy could not be
        // written after the broker confirmed them stay (the others' copies
        // were not touched, or are durable now).
        let untrusted = &self.untrusted;
        self.cache.settle_unsynced(|name| {
            if untrusted.contains(name) {
                succeeded.contains(name)
            } else {
                !failed.contains(name)
            }
        })
    }
}

impl Recorder {
    /// The broker confirmed `name`: its cached copy becomes `body`
    /// (atomically; durably when the transaction finishes).
    pub async fn record(&self, name: String, body: Vec<u8>) -> Result<(), CacheError> {
        let result = self.0.writer.write(name.clone(), body).await;
        match &result {
            Ok(()) => {
                let written = self.0.written.get() + 1;
                self.0.written.set(written);
                if written.is_multiple_of(SYNC_EVERY) {
                    self.start_sync();
                }
            }
            Err(_) => {
                self.0.failed.borrow_mut().insert(name);
            }
        }
        result
    }

    /// Profiles are being published: copies are likely to follow, so the
    /// profiles this run may write copies for are marked unsynced now,
    /// while the broker confirms, and not with the first copy (whose fsync
    /// then held up that copy, and the downloads behind the publishes
    /// waiting for it, by 30 ms). Once per run. Not before the broker is
    /// connected: a run that cannot publish leaves the cache untouched.
    pub fn expect_copies(&self) {
        if !self.0.marking.replace(true) {
            self.0.writer.mark();
        }
    }

    /// No more profiles are downloaded: the copies written so far start
    /// going to disk while the last publishes are confirmed, so the closing
    /// `syncfs(2)` finds little left (at 1,000 copies, 12 ms -> 4 ms).
    pub fn sync_ahead(&self) {
        if self.0.written.get() > 0 {
            self.start_sync();
        }
    }

    /// Starts a `syncfs(2)` of the copies written so far, unless one is
    /// still going on.
    fn start_sync(&self) {
        let mut early_sync = self.0.early_sync.borrow_mut();
        if early_sync.as_ref().is_some_and(|sync| !sync.is_finished()) {
            return;
        }
        let cache = self.0.cache.clone();
        *early_sync = Some(tokio::task::spawn_blocking(move || cache.sync_copies()));
    }
}

/// Copies written between two `syncfs(2)` started ahead of the closing one.
const SYNC_EVERY: usize = 128;

/// The longest file name most filesystems take (NAME_MAX).
const NAME_MAX: usize = 255;

/// A profile's copy, relative to CACHE_DIR (and to [`SPARE_DIR`]): its name,
/// except that a path segment too long for a file name (an `<fqdn>.json`
/// can reach 258 bytes) is stored as `.long-<SHA-256 of the segment>`. The
/// leading dot keeps it clear of every profile's name ([`check_name`]
/// refuses segments starting with one) and of cdb2rabbit's own files.
fn copy_path(name: &str) -> std::borrow::Cow<'_, Path> {
    use std::fmt::Write;
    if name.len() <= NAME_MAX {
        return Path::new(name).into();
    }
    let mut path = PathBuf::new();
    for segment in name.split('/') {
        if segment.len() <= NAME_MAX {
            path.push(segment);
        } else {
            let digest = <sha2::Sha256 as sha2::Digest>::digest(segment.as_bytes());
            let mut hashed = String::with_capacity(70);
            hashed.push_str(".long-");
            for byte in digest {
                let _ = write!(hashed, "{byte:02x}");
            }
            path.push(hashed);
        }
    }
    path.into()
}

/// Puts `spare` in place of `path` atomically: swapped with it when it is
/// a regular file and the filesystem can (the spare then holds the old
/// copy), renamed over it otherwise (which fails on a directory, as it should).
fn swap_into_place(spare: &Path, path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => {}
        Ok(_) => return std::fs::rename(spare, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return std::fs::rename(spare, path),
        Err(e) => return Err(e),
    }
    let c_path = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a cache path"))
    };
    let (from, to) = (c_path(spare)?, c_path(path)?);
    // SAFETY: both are NUL-terminated paths that live across the call.
    let swapped = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if swapped == 0 {
        return Ok(());
    }
    match std::io::Error::last_os_error() {
        // No RENAME_EXCHANGE here (EINVAL: filesystem, ENOSYS: kernel).
        e if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) => {
            std::fs::rename(spare, path)
        }
        e => Err(e),
    }
}

/// Writes a run's cached copies on one thread of its own, one after
/// another: copies land in the same directory, and concurrent writers there
/// only queue on its lock in the kernel (and cost a thread hand-off each).
/// Dropping it waits for the copies already asked for.
struct CopyWriter {
    jobs: Option<mpsc::Sender<CopyJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a writer of cached copies has done so far.
#[derive(Default)]
struct CopyState {
    /// The profiles this writer may write copies for (marked unsynced with the first copy).
    suspects: Vec<String>,
    /// [`UNSYNCED_MARK`] has this writer's profiles.
    marked: bool,
    /// Directories known to exist.
    made: HashSet<PathBuf>,
}

enum CopyJob {
    /// A copy is likely to follow: mark the suspects now, so that the
    /// first copy does not wait for that fsync (a failure is left for the
    /// first copy to report).
    Mark,
    Write {
        name: String,
        body: Vec<u8>,
        done: tokio::sync::oneshot::Sender<Result<(), CacheError>>,
    },
}

impl CopyWriter {
    fn start(cache: CacheDir, suspects: Vec<String>) -> CopyWriter {
        let (jobs, queue) = mpsc::channel::<CopyJob>();
        let thread = std::thread::Builder::new()
            .name("cache-writer".into())
            .spawn(move || {
                let mut state = CopyState {
                    suspects,
                    ..CopyState::default()
                };
                // Directories known to exist: mkdir once per namespace, not per copy.
                state.made.insert(cache.root.clone());
                for job in queue {
                    let start = std::time::Instant::now();
                    match job {
                        CopyJob::Mark => match cache.mark_suspects(None, &mut state) {
                            Ok(()) => tracing::debug!("unsynced profiles marked in {:?}", start.elapsed()),
                            Err(e) => tracing::debug!(
                                "marking the unsynced profiles failed ({e}); retried with the first copy"
                            ),
                        },
                        CopyJob::Write { name, body, done } => {
                            let result = cache.write_copy(&name, &body, &mut state);
                            tracing::debug!("cached copy of {name} written in {:?}", start.elapsed());
                            let _ = done.send(result);
                        }
                    }
                }
            })
            .expect("cannot start the cache writer thread");
        CopyWriter {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    /// Marks the suspects unsynced ahead of the first copy.
    fn mark(&self) {
        if let Some(jobs) = &self.jobs {
            // A writer that stopped says so with the first copy.
            let _ = jobs.send(CopyJob::Mark);
        }
    }

    /// Replaces the cached copy of `name` (atomically, not durably: see
    /// [`CacheDir::sync_copies`]).
    pub async fn write(&self, name: String, body: Vec<u8>) -> Result<(), CacheError> {
        let (done, result) = tokio::sync::oneshot::channel();
        let path = PathBuf::from(&name);
        let job = CopyJob::Write { name, body, done };
        let stopped = || CacheError::Io {
            path: path.clone(),
            source: std::io::Error::other("the cache writer thread stopped"),
        };
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        jobs.send(job).map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }
}

impl Drop for CopyWriter {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A new cached index written to a temp file by [`CacheDir::prepare_index`];
/// dropped uncommitted, the temp file is removed.
#[derive(Debug)]
struct PreparedIndex {
    file: tempfile::NamedTempFile,
}

/// Asks the kernel to start writing `file` to disk now, so that the
/// `syncfs(2)` that makes it durable later finds little left to do.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call; this only
    // starts writeback (a failure just leaves the work to syncfs).
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File) {}

/// How a new cached index is made durable before it is renamed into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Atomic and durable: file fsynced before the rename, directory after.
    Durable,
    /// As `Durable`, with `syncfs(2)` instead of the file's fsync, so the
    /// cached copies written before it are durable too.
    DurableWithCopies,
}

#[cfg(target_os = "linux")]
fn syncfs(dir: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere: sync(2), which flushes every filesystem (and reports nothing).
#[cfg(not(target_os = "linux"))]
fn syncfs(_: &File) -> std::io::Result<()> {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_over_long_segment_is_stored_under_its_hash() {
        let long = format!("{}.example.org.json", "h".repeat(250));
        assert_eq!(copy_path("ns/a.json"), Path::new("ns/a.json"));
        let name = format!("ns/{long}");
        let path = copy_path(&name);
        let hashed = path.file_name().unwrap().to_str().unwrap();
        assert!(hashed.starts_with(".long-") && hashed.len() == 70, "{hashed}");
        assert_eq!(path.parent().unwrap(), Path::new("ns"));
        assert_ne!(copy_path(&format!("ns/{long}x")), path, "another name, another file");
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        cache.write_profile(&name, b"{}").unwrap();
        cache.write_profile(&name, b"[]").unwrap();
        assert_eq!(cache.read_profile(&name).unwrap().unwrap(), b"[]");
        assert!(dir.path().join("ns").join(hashed).is_file());
        assert!(dir.path().join(SPARE_DIR).join("ns").join(hashed).is_file());
    }

    #[test]
    fn profile_copies_go_in_namespace_directories() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        cache.write_profile("ns/sub/a.json", b"{}").unwrap();
        assert_eq!(std::fs::read(dir.path().join("ns/sub/a.json")).unwrap(), b"{}");
        assert_eq!(cache.read_profile("ns/sub/a.json").unwrap().unwrap(), b"{}");
        assert_eq!(cache.read_profile("b.json").unwrap(), None);
        cache.sync_copies().unwrap();
    }

    #[test]
    fn rewriting_a_copy_swaps_it_with_its_spare_and_leaves_no_temp_file() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        let ino = |p: &str| std::fs::metadata(dir.path().join(p)).unwrap().ino();
        cache.write_profile("ns/a.json", b"{\"v\": 1}").unwrap();
        let first = ino("ns/a.json");
        cache.write_profile("ns/a.json", b"{\"v\": 2}").unwrap();
        let second = ino("ns/a.json");
        assert_ne!(first, second, "a copy is never rewritten in place");
        assert_eq!(
            ino(".cdb2rabbit-spare/ns/a.json"),
            first,
            "the old copy became the spare"
        );
        assert_eq!(
            std::fs::read(dir.path().join(".cdb2rabbit-spare/ns/a.json")).unwrap(),
            b"{\"v\": 1}"
        );
        cache.write_profile("ns/a.json", b"{\"v\": 3}").unwrap();
        // The two inodes take turns: no inode is allocated or freed for a rewrite.
        assert_eq!(ino("ns/a.json"), first);
        assert_eq!(ino(".cdb2rabbit-spare/ns/a.json"), second);
        cache.sync_copies().unwrap();
        assert_eq!(cache.read_profile("ns/a.json").unwrap().unwrap(), b"{\"v\": 3}");
        let mut left: Vec<_> = walk(dir.path())
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".cdb2rabbit-spare",
                ".cdb2rabbit-spare/ns",
                ".cdb2rabbit-spare/ns/a.json",
                ".cdb2rabbit-tmp",
                ".cdb2rabbit-unsynced",
                "ns",
                "ns/a.json"
            ]
        );
        assert_eq!(std::fs::read_dir(dir.path().join(TEMP_DIR)).unwrap().count(), 0);
        let mode = std::fs::metadata(dir.path().join("ns/a.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn a_spare_rewritten_in_place_holds_exactly_the_new_json() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        let long = format!("{{\"v\": \"{}\"}}", "x".repeat(10_000));
        let bodies = [
            long.as_bytes(),
            b"{\"v\": 1}",
            b"{\"v\": 22}",
            long.as_bytes(),
            b"{}",
            b"{}",
        ];
        let mut inodes = HashSet::new();
        for body in bodies {
            cache.write_profile("a.json", body).unwrap();
            assert_eq!(cache.read_profile("a.json").unwrap().unwrap(), body);
            inodes.insert(std::fs::metadata(dir.path().join("a.json")).unwrap().ino());
        }
        assert_eq!(inodes.len(), 2, "the copy and its spare take turns");
        // The spare holds the copy before last, whole and nothing more.
        assert_eq!(std::fs::read(dir.path().join(SPARE_DIR).join("a.json")).unwrap(), b"{}");
    }

    #[test]
    fn a_symlink_copy_is_replaced_and_a_directory_in_the_way_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        let outside = dir.path().join("outside.txt");
        std::fs::write(&outside, b"keep me").unwrap();
        std::os::unix::fs::symlink(&outside, dir.path().join("l.json")).unwrap();
        cache.write_profile("l.json", b"{}").unwrap();
        assert!(!std::fs::symlink_metadata(dir.path().join("l.json"))
            .unwrap()
            .is_symlink());
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");

        std::fs::create_dir_all(dir.path().join("d.json/x")).unwrap();
        let err = cache.write_profile("d.json", b"{}").unwrap_err();
        assert!(err.to_string().contains("d.json"), "{err}");
        assert!(dir.path().join("d.json/x").is_dir(), "the directory was moved");
    }

    #[test]
    fn the_copy_writer_writes_in_order_and_reports_each_failure() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        // A file where a namespace directory should be: that copy fails, the others do not.
        std::fs::write(dir.path().join("blocked"), b"").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let writer = cache.copy_writer(Vec::new());
        runtime.block_on(async {
            writer.write("a.json".into(), b"1".to_vec()).await.unwrap();
            writer.write("ns/b.json".into(), b"2".to_vec()).await.unwrap();
            writer.write("a.json".into(), b"3".to_vec()).await.unwrap();
            let err = writer.write("blocked/c.json".into(), b"4".to_vec()).await.unwrap_err();
            assert!(err.to_string().contains("blocked"), "{err}");
            writer.write("ns/d.json".into(), b"5".to_vec()).await.unwrap();
        });
        drop(writer);
        assert_eq!(cache.read_profile("a.json").unwrap().unwrap(), b"3");
        assert_eq!(cache.read_profile("ns/b.json").unwrap().unwrap(), b"2");
        assert_eq!(cache.read_profile("ns/d.json").unwrap().unwrap(), b"5");
        let temps: Vec<_> = walk(dir.path())
            .into_iter()
            .filter(|p| p.starts_with(dir.path().join(TEMP_DIR)) && *p != dir.path().join(TEMP_DIR))
            .collect();
        assert!(temps.is_empty(), "temp files left: {temps:?}");
    }

    #[test]
    fn copies_are_unsynced_from_the_first_write_until_settled() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<HashSet<String>>();
        assert!(cache.unsynced().unwrap().is_empty());
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();

        // A writer that writes nothing marks nothing.
        drop(cache.copy_writer(vec!["idle.json".into()]));
        assert!(cache.unsynced().unwrap().is_empty());
        assert!(!dir.path().join(UNSYNCED_MARK).exists());

        // Asked ahead of the first copy, a writer marks them with no copy written.
        let writer = cache.copy_writer(vec!["early.json".into()]);
        writer.mark();
        drop(writer);
        assert_eq!(cache.unsynced().unwrap(), names(&["early.json"]));
        assert!(!dir.path().join("early.json").exists());
        cache.settle_unsynced(|_| true).unwrap();

        // The first copy marks every profile the writer may write, before it is written.
        let writer = cache.copy_writer(vec!["a.json".into(), "ns/b.json".into(), "c.json".into()]);
        runtime
            .block_on(writer.write("ns/b.json".into(), b"{}".to_vec()))
            .unwrap();
        drop(writer);
        assert_eq!(cache.unsynced().unwrap(), names(&["a.json", "ns/b.json", "c.json"]));
        // A later writer adds to what is marked, never takes away.
        cache.write_profile("d.json", b"{}").unwrap();
        assert_eq!(
            cache.unsynced().unwrap(),
            names(&["a.json", "ns/b.json", "c.json", "d.json"])
        );

        // Settling some keeps the others, in a file replaced atomically.
        cache
            .settle_unsynced(|n| ["a.json", "ns/b.json", "x.json"].contains(&n))
            .unwrap();
        assert_eq!(cache.unsynced().unwrap(), names(&["c.json", "d.json"]));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(UNSYNCED_MARK)).unwrap(),
            "c.json\nd.json\n"
        );
        assert_eq!(std::fs::read_dir(dir.path().join(TEMP_DIR)).unwrap().count(), 0);
        // Settling what is not marked changes nothing.
        cache.settle_unsynced(|n| n == "zzz.json").unwrap();
        assert_eq!(cache.unsynced().unwrap(), names(&["c.json", "d.json"]));
        // Settling the rest removes the mark.
        cache.settle_unsynced(|_| true).unwrap();
        assert!(!dir.path().join(UNSYNCED_MARK).exists());
        assert!(cache.unsynced().unwrap().is_empty());
        cache.settle_unsynced(|_| true).unwrap();

        // A damaged list still lists the names it can read.
        std::fs::write(dir.path().join(UNSYNCED_MARK), b"e.json\n\xff\xfe\nf.json\n").unwrap();
        let listed = cache.unsynced().unwrap();
        assert!(listed.contains("e.json") && listed.contains("f.json"), "{listed:?}");
    }

    #[test]
    fn a_transaction_records_what_succeeded_and_keeps_the_rest_untrusted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        cache
            .write_index([("a.json", 1u64), ("b.json", 1), ("old.json", 1)])
            .unwrap();
        // An earlier run died after writing the copy of old.json.
        cache.mark_unsynced(["old.json"]).unwrap();
        let index = Arc::new(Index {
            entries: ["a.json", "b.json", "old.json"]
                .map(|name| index::Entry {
                    name: name.into(),
                    mtime: 2,
                })
                .to_vec(),
            problems: Vec::new(),
        });
        let candidates = [("a.json", 2), ("b.json", 2), ("old.json", 2)];
        let mtimes = |cache: &CacheDir| {
            let idx = cache.read_index().unwrap().unwrap();
            idx.entries.into_iter().map(|e| (e.name, e.mtime)).collect::<Vec<_>>()
        };
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            // a.json is published and recorded; b.json's copy cannot be
            // written after its publish; old.json fails before it.
            let mut txn = cache.begin(Duration::from_secs(1)).unwrap();
            assert!(txn.untrusted("old.json") && !txn.untrusted("a.json"));
            let expected = Expected {
                index: index.clone(),
                extra: Vec::new(),
            };
            let recorder = txn.plan(&candidates, Some(expected));
            recorder.record("a.json".into(), b"{}".to_vec()).await.unwrap();
            std::fs::create_dir_all(dir.path().join("b.json")).unwrap();
            recorder.record("b.json".into(), b"{}".to_vec()).await.unwrap_err();
            recorder.sync_ahead();
            drop(recorder);
            let record = vec![("a.json", 2), ("b.json", 1), ("old.json", 1)];
            txn.finish(Some(record), &HashSet::from(["a.json"])).await.unwrap();
        });
        let want = |b, old| {
            vec![
                ("a.json".to_string(), 2),
                ("b.json".to_string(), b),
                ("old.json".to_string(), old),
            ]
        };
        assert_eq!(mtimes(&cache), want(1, 1));
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<HashSet<String>>();
        assert_eq!(cache.unsynced().unwrap(), names(&["b.json", "old.json"]));
        assert_eq!(
            std::fs::read_dir(dir.path().join(TEMP_DIR)).unwrap().count(),
            0,
            "the index written ahead was not the one to record, and is gone"
        );

        // The next run: everything succeeds, and the index written ahead is recorded.
        std::fs::remove_dir(dir.path().join("b.json")).unwrap();
        runtime.block_on(async {
            let mut txn = cache.begin(Duration::from_secs(1)).unwrap();
            let expected = Expected {
                index,
                extra: Vec::new(),
            };
            let recorder = txn.plan(&candidates, Some(expected));
            for (name, _) in candidates {
                recorder.record(name.into(), b"[]".to_vec()).await.unwrap();
            }
            drop(recorder);
            let record = candidates.to_vec();
            txn.finish(Some(record), &candidates.iter().map(|(n, _)| *n).collect())
                .await
                .unwrap();
        });
        assert_eq!(mtimes(&cache), want(2, 2));
        assert!(cache.unsynced().unwrap().is_empty());
        assert_eq!(cache.read_profile("old.json").unwrap().unwrap(), b"[]");
    }

    #[test]
    fn a_temp_file_left_by_a_crashed_run_is_not_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        std::fs::create_dir_all(dir.path().join(TEMP_DIR)).unwrap();
        for stale in [".tmpAbCdEf", ".tmp123456", "4242-0"] {
            std::fs::write(dir.path().join(TEMP_DIR).join(stale), b"half an index").unwrap();
        }
        cache.write_index([("a.json", 7u64)]).unwrap();
        assert_eq!(cache.read_index().unwrap().unwrap().entries[0].mtime, 7);
    }

    #[test]
    fn taking_the_lock_removes_what_a_dead_run_left_in_the_temp_dir() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        std::fs::create_dir_all(dir.path().join(TEMP_DIR)).unwrap();
        std::fs::write(dir.path().join(TEMP_DIR).join("4242-0"), b"<profiles>").unwrap();
        std::fs::write(dir.path().join("keep.json"), b"{}").unwrap();
        let _lock = cache.lock(Duration::from_secs(1), || {}).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join(TEMP_DIR)).unwrap().count(), 0);
        assert!(dir.path().join("keep.json").exists());
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
        out
    }

    #[test]
    fn a_prepared_index_replaces_the_cached_one_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        cache.write_index([("a.json", 1u64)]).unwrap();
        let entries = |cache: &CacheDir| {
            let idx = cache.read_index().unwrap().unwrap();
            idx.entries.into_iter().map(|e| (e.name, e.mtime)).collect::<Vec<_>>()
        };
        let files = || std::fs::read_dir(dir.path().join(TEMP_DIR)).unwrap().count();

        let prepared = cache.prepare_index([("a.json", 2u64), ("b.json", 3)]).unwrap();
        assert_eq!(files(), 1, "the prepared index is a temp file");
        assert_eq!(
            entries(&cache),
            [("a.json".to_string(), 1)],
            "not replaced before the commit"
        );
        drop(prepared);
        assert_eq!(files(), 0, "an abandoned prepared index leaves nothing behind");
        assert_eq!(entries(&cache), [("a.json".to_string(), 1)]);

        let prepared = cache.prepare_index([("a.json", 2u64), ("b.json", 3)]).unwrap();
        cache.commit_index(prepared).unwrap();
        assert_eq!(entries(&cache), [("a.json".to_string(), 2), ("b.json".to_string(), 3)]);
        assert_eq!(files(), 0);
    }

    #[test]
    fn index_round_trips_and_absence_is_first_run() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path().join("new"));
        let _lock = cache.lock(Duration::from_secs(1), || {}).unwrap();
        assert!(cache.read_index().unwrap().is_none());
        cache.write_index([("a.json", 7u64)]).unwrap();
        let idx = cache.read_index().unwrap().unwrap();
        assert_eq!(idx.entries[0].mtime, 7);
    }

    #[test]
    fn second_lock_waits_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        let held = cache.lock(Duration::from_secs(1), || {}).unwrap();
        let mut waited = false;
        let err = cache.lock(Duration::from_millis(200), || waited = true).unwrap_err();
        assert!(waited);
        assert!(matches!(err, CacheError::LockTimeout { .. }), "{err}");
        drop(held);
        cache.lock(Duration::from_secs(1), || {}).unwrap();
    }
}
