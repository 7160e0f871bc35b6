//! The file table: open files with their response metadata (length, validators, type,
//! pre-rendered fields, and the content of small files), cached per path so that a request for
//! a hot file does no path resolution, `open` or `stat`.
//!
//! Staleness is bounded: an entry is re-resolved by path when it is older than the revalidation
//! interval (1 s by default), so a replaced, renamed or deleted file is seen within that time. A
//! large file rewritten in place is seen at once: its descriptor is checked with `fstat` on
//! every request and between chunks while sending (a small file served from memory stays a
//! consistent old version until the next revalidation).
//!
//! Each entry also carries the file's session key, derived from its path (see
//! [`FileKey::of_path`]): the same in every process, so nothing per path needs remembering.

use super::identity::Identities;
use super::root::{identity_of, mtime_ns, OpenError, OpenFile, Root};
use crate::http::target::RelPath;
use crate::session::FileKey;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// Entries not requested for this long are closed by the sweeper.
const IDLE_ENTRY: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Entry {
    file: OpenFile,
    key: FileKey,
    /// Milliseconds since the table's origin when the path was last resolved.
    checked_ms: u64,
    /// Milliseconds since the table's origin of the last request.
    used_ms: AtomicU64,
}

/// Cache of open files by validated relative path.
#[derive(Debug)]
pub struct FileTable {
    entries: crate::ConcurrentMap<PathBuf, Arc<Entry>>,
    /// Which files each path named, for ETags that tell them apart (see `identity`).
    identities: Identities,
    revalidate_ms: u64,
    max_entries: usize,
    origin: Instant,
}

impl FileTable {
    /// A table that re-resolves paths older than `revalidate` (zero: every request) and holds at
    /// most `max_entries` open files (zero: caches nothing).
    pub fn new(revalidate: Duration, max_entries: usize) -> Self {
        FileTable {
            entries: crate::ConcurrentMap::default(),
            identities: Identities::default(),
            revalidate_ms: u64::try_from(revalidate.as_millis()).unwrap_or(u64::MAX),
            max_entries,
            origin: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The file at `rel` under `root`, and its session key.
    pub fn open(&self, root: &Root, rel: &RelPath) -> Result<(OpenFile, FileKey), OpenError> {
        let now = self.now_ms();
        let cached = self.entries.get(rel.as_path()).map(|e| Arc::clone(&e));
        if let Some(entry) = cached {
            let fresh = now.saturating_sub(entry.checked_ms) < self.revalidate_ms;
            // A large file is sent from the descriptor: make sure it still is the version the
            // head will describe. Small files are served from the copy in memory.
            if fresh && (entry.file.small.is_some() || !entry.file.source.changed()) {
                entry.used_ms.store(now, Ordering::Relaxed);
                return Ok((entry.file.clone(), entry.key));
            }
        }
        let opened = match self.describe(root, rel) {
            // Out of descriptors: the cached ones are the ones we can give back. Close them all
            // and try once more, so the cache can never starve the server.
            Err(OpenError::Io(e)) if is_out_of_descriptors(&e) => {
                tracing::warn!("out of file descriptors: closing the file table's cached files");
                self.entries.clear();
                self.describe(root, rel)
            }
            other => other,
        };
        match opened {
            Ok((file, key)) => {
                self.remember(rel.as_path(), &file, key, now);
                Ok((file, key))
            }
            Err(e) => {
                self.entries.remove(rel.as_path());
                Err(e)
            }
        }
    }

    /// Opens `rel` and describes it, with an ETag that tells it apart from another file served
    /// from the same path with the same length and mtime.
    fn describe(&self, root: &Root, rel: &RelPath) -> Result<(OpenFile, FileKey), OpenError> {
        let (file, meta) = root.open_regular(rel)?;
        let key = FileKey::of_path(rel.as_path());
        let suffix = self
            .identities
            .observe(key, meta.len(), mtime_ns(&meta), identity_of(&meta));
        Ok((OpenFile::new(file, &meta, rel, suffix), key))
    }

    fn remember(&self, path: &Path, file: &OpenFile, key: FileKey, now: u64) {
        if self.max_entries == 0 {
            return;
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(path) {
            // Full: the sweeper makes room by closing idle entries; until then, serve uncached.
            return;
        }
        let entry = Arc::new(Entry {
            file: file.clone(),
            key,
            checked_ms: now,
            used_ms: AtomicU64::new(now),
        });
        self.entries.insert(path.to_path_buf(), entry);
    }

    /// Closes entries nobody asked for recently; returns how many.
    pub fn sweep(&self) -> usize {
        let now = self.now_ms();
        let idle = u64::try_from(IDLE_ENTRY.as_millis()).unwrap_or(u64::MAX);
        let before = self.entries.len();
        self.entries
            .retain(|_, e| now.saturating_sub(e.used_ms.load(Ordering::Relaxed)) < idle);
        before.saturating_sub(self.entries.len())
    }

    /// Number of cached files.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::target::{route, Route};

    fn rel(p: &str) -> RelPath {
        match route(&format!("/id/{p}"), false).unwrap() {
            Route::File { path, .. } => path,
            Route::Mint => unreachable!(),
        }
    }

    #[test]
    fn hits_share_the_descriptor_and_changes_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; 100_000];
        std::fs::write(dir.path().join("big"), &big).unwrap();
        std::fs::write(dir.path().join("small"), b"hello").unwrap();
        let root = Root::open(dir.path()).unwrap();
        let table = FileTable::new(Duration::from_secs(3600), 10);
        let (a, key_a) = table.open(&root, &rel("big")).unwrap();
        let (b, key_b) = table.open(&root, &rel("big")).unwrap();
        assert!(
            Arc::ptr_eq(&a.source.file, &b.source.file),
            "second request reused the open file"
        );
        assert_eq!(key_a, key_b);
        assert_eq!(key_a, FileKey::of_path(Path::new("big")));
        let (s, _) = table.open(&root, &rel("small")).unwrap();
        assert_eq!(s.small.as_deref(), Some(&b"hello"[..]));
        // An in-place rewrite of the large file is noticed at once (fstat of the descriptor).
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("big"))
            .unwrap();
        f.set_len(50_000).unwrap();
        let (c, _) = table.open(&root, &rel("big")).unwrap();
        assert_eq!(c.len, 50_000);
        assert_ne!(c.etag, a.etag);
    }

    #[test]
    fn deletion_and_replacement_are_seen_after_revalidation() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"one").unwrap();
        let root = Root::open(dir.path()).unwrap();
        let table = FileTable::new(Duration::ZERO, 10);
        assert_eq!(table.open(&root, &rel("f")).unwrap().0.len, 3);
        std::fs::write(dir.path().join("g"), b"three").unwrap();
        std::fs::rename(dir.path().join("g"), dir.path().join("f")).unwrap();
        assert_eq!(table.open(&root, &rel("f")).unwrap().0.len, 5);
        std::fs::remove_file(dir.path().join("f")).unwrap();
        assert!(matches!(
            table.open(&root, &rel("f")),
            Err(OpenError::NotFound)
        ));
        assert!(table.is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5 {
            std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
        }
        let root = Root::open(dir.path()).unwrap();
        let table = FileTable::new(Duration::from_secs(3600), 3);
        for i in 0..5 {
            table.open(&root, &rel(&format!("f{i}"))).unwrap();
        }
        assert_eq!(table.len(), 3);
        let off = FileTable::new(Duration::from_secs(3600), 0);
        off.open(&root, &rel("f0")).unwrap();
        assert!(off.is_empty());
    }
}
