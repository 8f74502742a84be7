//! CACHE_DIR: what cdb2rabbit remembers between runs, in the original's layout
//! so an existing cache directory keeps working.
//!
//! - `cached_info.xml`: the index as of the last run, in the broker's format;
//!   a profile's mtime there advances only once the profile was processed
//!   (published and confirmed, or found unchanged).
//! - `<name>`: the last published JSON of each profile (namespaced names are
//!   subdirectories), to tell a real change from a recompile; beside it
//!   `.<file>.cdb2rabbit-prev`, the copy before that (see [`CacheDir::write_profile`]).
//! - `.cdb2rabbit.lock`: the exclusive run lock (cron, the timer and the
//!   cdispd hook may overlap).
//!
//! Writes are atomic: temp file in the same directory, fsync, rename (or,
//! for a profile copy that exists, an atomic swap with its shadow). The
//! index also fsyncs its directory after the rename. Profile copies are
//! written concurrently and their directories fsynced once, by
//! [`CacheDir::sync_dirs`], before the index is committed: the index must
//! never point past a copy that a crash could still take back (the next
//! change would then be compared with an older copy).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::index::{self, Index, IndexError};

/// The cached index, as the original named it.
pub const CACHED_INDEX: &str = "cached_info.xml";
/// The run lock (a dot file: [`index::check_name`] keeps profiles away from it).
pub const LOCK_FILE: &str = ".cdb2rabbit.lock";
const TEMP_PREFIX: &str = ".cdb2rabbit-tmp-";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: cached index is unusable ({source}); remove it to record a new baseline")]
    BadIndex { path: PathBuf, source: IndexError },
    #[error("{path}: another cdb2rabbit run still holds the lock after {waited:?}")]
    LockTimeout { path: PathBuf, waited: Duration },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct CacheDir {
    root: PathBuf,
    /// Renames into the cache, one at a time: concurrent writers otherwise
    /// spin in the kernel on the directory lock (the fsyncs stay parallel).
    renames: Arc<Mutex<()>>,
}

/// Held while a run works on the cache; released when dropped (or when the
/// process dies, so a crashed run never wedges the next one).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl CacheDir {
    pub fn new(root: impl Into<PathBuf>) -> CacheDir {
        CacheDir {
            root: root.into(),
            renames: Arc::new(Mutex::new(())),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn index_path(&self) -> PathBuf {
        self.root.join(CACHED_INDEX)
    }

    /// Where the cached copy of `name` lives. `name` must have passed [`index::check_name`].
    pub fn profile_path(&self, name: &str) -> PathBuf {
        debug_assert!(index::check_name(name).is_ok());
        self.root.join(name)
    }

    /// Takes the exclusive run lock, creating CACHE_DIR if needed. Waits at
    /// most `wait` for another run to finish; `on_wait` is called once if it
    /// has to wait at all.
    pub fn lock(&self, wait: Duration, on_wait: impl FnOnce()) -> Result<RunLock, CacheError> {
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => return Ok(RunLock { _file: file }),
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
            Ok(Ok(file)) => Ok(RunLock { _file: file }),
            Ok(Err(e)) => Err(io(&path)(e)),
            Err(_) => Err(CacheError::LockTimeout { path, waited: wait }),
        }
    }

    /// The cached index, or `None` on the first run.
    pub fn read_index(&self) -> Result<Option<Index>, CacheError> {
        let path = self.index_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        index::parse(bytes)
            .map(Some)
            .map_err(|source| CacheError::BadIndex { path, source })
    }

    /// Replaces the cached index with `entries`, durably.
    pub fn write_index<'a>(&self, entries: impl IntoIterator<Item = (&'a str, u64)>) -> Result<(), CacheError> {
        let path = self.index_path();
        self.write_atomic(&path, true, |w| index::write_cached(w, entries))
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

    /// Replaces the cached copy of a profile (atomic, file fsynced). Returns
    /// the directory that holds it, to be passed to [`CacheDir::sync_dirs`].
    ///
    /// Once a copy exists, the new one is written into its shadow file
    /// (`.<file>.cdb2rabbit-prev`, which then holds the previous copy) and
    /// the two are swapped with `renameat2(RENAME_EXCHANGE)`: as atomic as a
    /// rename, but no inode is created or freed per write (ext4 makes
    /// creating files right after freeing many others slow).
    pub fn write_profile(&self, name: &str, body: &[u8]) -> Result<PathBuf, CacheError> {
        let path = self.profile_path(name);
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        if !exchange::write(&path, &shadow_path(&path), body, &self.renames)? {
            self.write_atomic(&path, false, |w| w.write_all(body))?;
        }
        Ok(parent)
    }

    /// Removes the cached copy of a profile that left the index (missing is fine).
    pub fn remove_profile(&self, name: &str) -> Result<(), CacheError> {
        let path = self.profile_path(name);
        for p in [shadow_path(&path), path] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&p)(e)),
            }
        }
        Ok(())
    }

    /// Makes the renames of profile copies durable: fsyncs each directory
    /// given and every directory between it and CACHE_DIR (new namespace
    /// directories must reach the disk too).
    pub fn sync_dirs(&self, dirs: impl IntoIterator<Item = PathBuf>) -> Result<(), CacheError> {
        let mut all = std::collections::BTreeSet::new();
        for dir in dirs {
            let mut d = dir.as_path();
            while d.starts_with(&self.root) && all.insert(d.to_path_buf()) {
                match d.parent() {
                    Some(p) => d = p,
                    None => break,
                }
            }
        }
        all.insert(self.root.clone());
        for dir in all {
            File::open(&dir).and_then(|d| d.sync_all()).map_err(io(&dir))?;
        }
        Ok(())
    }

    /// `sync_dir`: also fsync the directory after the rename (else the caller does).
    fn write_atomic(
        &self,
        path: &Path,
        sync_dir: bool,
        fill: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
    ) -> Result<(), CacheError> {
        let dir = path.parent().unwrap_or(&self.root);
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
            .map_err(io(dir))?;
        {
            let mut w = BufWriter::new(tmp.as_file());
            fill(&mut w).map_err(io(tmp.path()))?;
            w.flush().map_err(io(tmp.path()))?;
        }
        tmp.as_file().sync_all().map_err(io(tmp.path()))?;
        // NamedTempFile is created 0600; the cache is as readable as the original's.
        set_mode(tmp.as_file(), 0o644).map_err(io(tmp.path()))?;
        {
            let _one_at_a_time = self.renames.lock().unwrap_or_else(|e| e.into_inner());
            tmp.persist(path).map_err(|e| io(path)(e.error))?;
        }
        if sync_dir {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
        }
        Ok(())
    }
}

/// The shadow of a cached copy: a dot file, so no profile name can be it.
fn shadow_path(path: &Path) -> PathBuf {
    let file = path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default();
    path.with_file_name(format!(".{file}.cdb2rabbit-prev"))
}

/// Writing a copy by swapping it with its shadow (Linux, glibc).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod exchange {
    use std::ffi::CString;
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::sync::Mutex;

    use super::{io, set_mode, CacheError};

    /// `Ok(false)`: not done (no copy yet, or the filesystem cannot swap); write it the plain way.
    pub fn write(path: &Path, shadow: &Path, body: &[u8], renames: &Mutex<()>) -> Result<bool, CacheError> {
        if !path.exists() {
            return Ok(false);
        }
        // A crash while the shadow is rewritten leaves the copy itself intact.
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(shadow)
            .map_err(io(shadow))?;
        set_mode(&f, 0o644).map_err(io(shadow))?;
        f.write_all(body).map_err(io(shadow))?;
        f.sync_all().map_err(io(shadow))?;
        drop(f);
        let (from, to) = match (
            CString::new(shadow.as_os_str().as_bytes()),
            CString::new(path.as_os_str().as_bytes()),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Ok(false),
        };
        let _one_at_a_time = renames.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: both are NUL-terminated paths that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            // No exchange on this filesystem: the shadow is a complete, fsynced
            // new copy, so a plain rename over the old one is just as safe.
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                std::fs::rename(shadow, path).map_err(io(path))?;
                Ok(true)
            }
            _ => Err(io(path)(err)),
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod exchange {
    use std::path::Path;

    pub fn write(_: &Path, _: &Path, _: &[u8], _: &std::sync::Mutex<()>) -> Result<bool, super::CacheError> {
        Ok(false)
    }
}

#[cfg(unix)]
fn set_mode(file: &File, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &File, _: u32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_copies_go_in_namespace_directories() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        let dir_written = cache.write_profile("ns/sub/a.json", b"{}").unwrap();
        assert_eq!(dir_written, dir.path().join("ns/sub"));
        assert_eq!(std::fs::read(dir.path().join("ns/sub/a.json")).unwrap(), b"{}");
        assert_eq!(cache.read_profile("ns/sub/a.json").unwrap().unwrap(), b"{}");
        assert_eq!(cache.read_profile("b.json").unwrap(), None);
        cache.remove_profile("ns/sub/a.json").unwrap();
        cache.remove_profile("ns/sub/a.json").unwrap();
        cache.sync_dirs([dir_written]).unwrap();
        // No temp files left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("ns/sub")).unwrap().collect();
        assert!(left.is_empty());
    }

    #[test]
    fn rewriting_a_copy_swaps_it_with_its_shadow() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        cache.write_profile("a.json", b"{\"v\": 1}").unwrap();
        cache.write_profile("a.json", b"{\"v\": 2}").unwrap();
        cache.write_profile("a.json", b"{\"v\": 3}").unwrap();
        assert_eq!(cache.read_profile("a.json").unwrap().unwrap(), b"{\"v\": 3}");
        cache.remove_profile("a.json").unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
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
