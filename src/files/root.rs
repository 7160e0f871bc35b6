//! The served folder: opening a validated relative path so that nothing outside the root can be
//! reached, and describing the file (length, validators, type).

use super::identity::Identity;
use crate::http::target::RelPath;
use bytes::Bytes;
use std::fs::{File, Metadata};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The folder every download is served from.
#[derive(Debug)]
pub struct Root {
    /// Canonical path of the folder (symlinks resolved).
    path: PathBuf,
    /// The folder itself, opened once: relative opens resolve against it, so renaming the
    /// folder's parents cannot redirect them.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    dir: File,
}

/// Why a file could not be served.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Missing, not a regular file, outside the root, or not readable: all look the same from
    /// outside.
    #[error("no such file")]
    NotFound,
    /// The system could not open it for a reason that is ours, not the client's (descriptor
    /// exhaustion, I/O error).
    #[error("cannot open file: {0}")]
    Io(#[source] io::Error),
}

/// An open file and the version it was opened at, for sending bodies.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: Arc<File>,
    /// Length and modification time when opened: what the ETag says.
    len: u64,
    mtime_ns: i128,
    /// When the whole file was last found in the page cache (milliseconds since
    /// [`warm_clock`]'s start; 0: never), shared by every response from this open file.
    warm_at: Arc<AtomicU64>,
}

/// Milliseconds since the first call (never 0 once called): the coarse clock of
/// [`Source::recently_warm`].
fn warm_clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// How long a file found wholly in the page cache is taken to stay there.
const WARM_FOR_MS: u64 = 1000;

impl Source {
    /// True when the file's length or modification time no longer match the version being
    /// sent: it was rewritten in place, and the rest of the body would splice two versions. (The
    /// status-change time is not compared: deleting or replacing the path changes it too, and
    /// a body goes on from its descriptor then.)
    pub fn changed(&self) -> bool {
        match self.file.metadata() {
            Ok(meta) => meta.len() != self.len || mtime_ns(&meta) != self.mtime_ns,
            Err(_) => true,
        }
    }

    /// The file's length when opened.
    pub fn opened_len(&self) -> u64 {
        self.len
    }

    /// True when the whole file was found in the page cache within the last second: a probe
    /// of its chunks can be skipped (a file evicted that fast is only sent by a blocking read,
    /// as other servers always do).
    pub fn recently_warm(&self) -> bool {
        let at = self.warm_at.load(Ordering::Relaxed);
        at != 0 && warm_clock().saturating_sub(at) < WARM_FOR_MS
    }

    /// Notes that the whole file is in the page cache now.
    pub fn mark_warm(&self) {
        self.warm_at.store(warm_clock(), Ordering::Relaxed);
    }
}

/// An open file ready to serve, with what its response head needs.
#[derive(Debug, Clone)]
pub struct OpenFile {
    pub source: Source,
    pub len: u64,
    /// Which file this is on this machine.
    pub identity: Identity,
    /// Modification time truncated to whole seconds, as `Last-Modified` carries it; `None` for
    /// a file dated in the future, which has no consistent last-modified date (see
    /// [`last_modified`]).
    pub last_modified: Option<SystemTime>,
    /// Strong validator, quotes included.
    pub etag: Arc<str>,
    /// A hash of the ETag: what a session remembers of the version it is downloading.
    pub version: u64,
    pub content_type: &'static str,
    /// The representation fields every download response carries (`Last-Modified`, `ETag`,
    /// `Accept-Ranges`, `Cache-Control`), rendered once per version.
    pub fields: Bytes,
    /// The whole content, for files of at most [`SMALL_FILE`] bytes: served from memory with
    /// the head in one write.
    pub small: Option<Bytes>,
    /// What is known of this version's `Repr-Digest` (see `digest`).
    pub digest: super::digest::DigestState,
}

/// Files up to this size are read whole when opened and served from that copy (which the file
/// table then keeps with the rest of the entry).
pub const SMALL_FILE: u64 = 16 * 1024;

impl OpenFile {
    /// Describes an open regular file. `etag_suffix`: the status-change time to put in the ETag
    /// when another file with the same length and mtime was served from this path before
    /// (see `identity`).
    pub fn new(file: File, meta: &Metadata, rel: &RelPath, etag_suffix: Option<i128>) -> OpenFile {
        let modified = meta.modified().unwrap_or(UNIX_EPOCH);
        let len = meta.len();
        let etag = strong_etag(len, modified, etag_suffix);
        let version = fnv1a(etag.as_bytes());
        let source = Source {
            file: Arc::new(file),
            len,
            mtime_ns: mtime_ns(meta),
            warm_at: Arc::new(AtomicU64::new(0)),
        };
        let last_modified = last_modified(modified, SystemTime::now());
        let content_type = mime_guess::from_path(rel.as_path())
            .first_raw()
            .unwrap_or("application/octet-stream");
        let mut fields = String::with_capacity(160);
        if let Some(lm) = last_modified {
            fields.push_str(&format!(
                "Last-Modified: {}\r\n",
                httpdate::fmt_http_date(lm)
            ));
        }
        fields.push_str(&format!(
            "ETag: {etag}\r\nAccept-Ranges: bytes\r\nCache-Control: no-store\r\n"
        ));
        // A copy read while the file is rewritten in place would put new bytes under the old
        // ETag: keep it only if the file still has the version we describe once it is read.
        let small = if len <= SMALL_FILE {
            read_whole(&source.file, len).filter(|_| !source.changed())
        } else {
            None
        };
        OpenFile {
            source,
            len,
            identity: identity_of(meta),
            last_modified,
            etag: Arc::from(etag),
            version,
            content_type,
            fields: Bytes::from(fields),
            small,
            digest: super::digest::DigestState::Unavailable,
        }
    }

    /// The 32-bit version a session record keeps (two versions are mistaken for each other
    /// with probability 2^-32 per change of the file).
    pub fn session_version(&self) -> u32 {
        (self.version ^ (self.version >> 32)) as u32
    }
}

impl Root {
    /// Opens the root folder; fails if it is not a readable directory.
    pub fn open(path: &Path) -> io::Result<Root> {
        let canonical = std::fs::canonicalize(path)?;
        let dir = File::open(&canonical)?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a directory",
            ));
        }
        Ok(Root {
            path: canonical,
            dir,
        })
    }

    /// The canonical root path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `rel` below the root. Symlinks that stay inside the root are followed; any that
    /// lead outside are refused, as are directories and special files. Returns the file and
    /// its metadata.
    pub fn open_regular(&self, rel: &RelPath) -> Result<(File, Metadata), OpenError> {
        let file = self.open_confined(rel.as_path())?;
        let meta = file.metadata().map_err(OpenError::Io)?;
        if !meta.is_file() {
            return Err(OpenError::NotFound);
        }
        Ok((file, meta))
    }

    /// Opens `rel` and describes it with the plain ETag (callers that track identities use
    /// [`Root::open_regular`] and [`OpenFile::new`]).
    pub fn open_file(&self, rel: &RelPath) -> Result<OpenFile, OpenError> {
        let (file, meta) = self.open_regular(rel)?;
        Ok(OpenFile::new(file, &meta, rel, None))
    }

    #[cfg(target_os = "linux")]
    fn open_confined(&self, rel: &Path) -> Result<File, OpenError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let c =
            std::ffi::CString::new(rel.as_os_str().as_bytes()).map_err(|_| OpenError::NotFound)?;
        match crate::sys::open_beneath(self.dir.as_raw_fd(), &c) {
            Ok(Some(fd)) => Ok(File::from(fd)),
            Ok(None) => self.open_canonical(rel),
            Err(e) => Err(classify(e)),
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn open_confined(&self, rel: &Path) -> Result<File, OpenError> {
        self.open_canonical(rel)
    }

    /// Portable confinement: resolve every symlink, then insist the result is still below the
    /// root. Racy against a symlink swapped between the check and the open, which is why Linux
    /// uses `openat2(RESOLVE_BENEATH)` instead.
    fn open_canonical(&self, rel: &Path) -> Result<File, OpenError> {
        let resolved = std::fs::canonicalize(self.path.join(rel)).map_err(classify)?;
        if !resolved.starts_with(&self.path) {
            return Err(OpenError::NotFound);
        }
        // Non-blocking, so that a FIFO planted under the root cannot block a runtime thread in
        // open(2); it is then refused as not a regular file.
        let mut options = std::fs::OpenOptions::new();
        options.read(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
        options.open(resolved).map_err(classify)
    }
}

/// Reads a small file whole; `None` if it no longer has `len` bytes (it is being rewritten:
/// the caller then sends from the descriptor, which detects the change).
fn read_whole(file: &File, len: u64) -> Option<Bytes> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], filled as u64) {
            Ok(0) => return None,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(Bytes::from(buf))
}

fn classify(e: io::Error) -> OpenError {
    #[cfg(target_os = "linux")]
    const REFUSALS: &[i32] = &[
        libc::ENOENT,
        libc::ENOTDIR,
        libc::EXDEV, // RESOLVE_BENEATH: the path left the root
        libc::ELOOP,
        libc::EACCES,
        libc::EPERM,
        libc::ENAMETOOLONG,
        libc::ENXIO,
    ];
    #[cfg(not(target_os = "linux"))]
    const REFUSALS: &[i32] = &[];
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => OpenError::NotFound,
        _ if e.raw_os_error().is_some_and(|c| REFUSALS.contains(&c)) => OpenError::NotFound,
        _ => OpenError::Io(e),
    }
}

/// A strong ETag from length and modification time to the nanosecond: the same on every
/// machine serving the same file with the same mtime, stable across restarts, and changed by
/// any write that changes either. The inode is left out (it differs between machines); a
/// different file with the same length and mtime gets its status-change time as `suffix`
/// (see `identity`).
pub fn strong_etag(len: u64, modified: SystemTime, suffix: Option<i128>) -> String {
    let nanos = match modified.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos(),
        Err(_) => 0,
    };
    match suffix {
        None => format!("\"{len:x}-{nanos:x}\""),
        Some(c) => format!("\"{len:x}-{nanos:x}-{:x}\"", c.max(0)),
    }
}

/// Nanoseconds since the epoch of the modification time (negative before it).
pub fn mtime_ns(meta: &Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// The file's identity on this machine.
pub fn identity_of(meta: &Metadata) -> Identity {
    use std::os::unix::fs::MetadataExt;
    Identity {
        dev: meta.dev(),
        ino: meta.ino(),
        ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
    }
}

/// `Last-Modified` for a modification time, at time `now`: truncated to whole seconds, and
/// absent for a file dated in the future. RFC 9110 §8.8.2.1 would have the origin send the
/// response's `Date` instead, but that value moves every second, so a date `If-Range` could
/// never match it; §8.8.2 lets a server omit `Last-Modified` when no consistent date can be
/// determined, and the strong ETag remains.
pub fn last_modified(modified: SystemTime, now: SystemTime) -> Option<SystemTime> {
    (modified <= now).then(|| truncate_to_second(modified))
}

fn truncate_to_second(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => UNIX_EPOCH,
    }
}

/// FNV-1a, 64-bit: a stable hash (unlike std's randomly keyed hasher) for version numbers.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::target::{route, Route};

    fn rel(p: &str) -> RelPath {
        match route(&format!("/id/{p}"), true).unwrap() {
            Route::File { path, .. } => path,
            Route::Mint => unreachable!(),
        }
    }

    #[test]
    fn symlinks_inside_are_followed_and_outside_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"token").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("sub/a.txt", dir.path().join("inside")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("../../", dir.path().join("sub/up")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        assert_eq!(root.open_file(&rel("sub/a.txt")).unwrap().len, 5);
        assert_eq!(root.open_file(&rel("inside")).unwrap().len, 5);
        assert!(matches!(
            root.open_file(&rel("abs")),
            Err(OpenError::NotFound)
        ));
        assert!(matches!(
            root.open_file(&rel("sub/up/etc/passwd")),
            Err(OpenError::NotFound)
        ));
        assert!(matches!(
            root.open_file(&rel("sub")),
            Err(OpenError::NotFound)
        ));
        assert!(matches!(
            root.open_file(&rel("missing")),
            Err(OpenError::NotFound)
        ));
        // The portable path agrees.
        assert!(root.open_canonical(Path::new("abs")).is_err());
        assert!(root.open_canonical(Path::new("inside")).is_ok());
    }

    #[test]
    fn etag_depends_on_length_and_nanoseconds() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(strong_etag(10, t, None), strong_etag(10, t, None));
        assert_ne!(strong_etag(10, t, None), strong_etag(11, t, None));
        assert_ne!(
            strong_etag(10, t, None),
            strong_etag(10, t + Duration::from_nanos(1), None)
        );
        assert_ne!(strong_etag(10, t, None), strong_etag(10, t, Some(3)));
        let e = strong_etag(10, t, None);
        assert!(e.starts_with('"') && !e.starts_with("W/"));
        assert_eq!(e, "\"a-17979cfe362a0005\"");
    }

    #[test]
    fn a_future_mtime_has_no_last_modified() {
        let now = UNIX_EPOCH + Duration::new(1_700_000_000, 0);
        assert_eq!(
            last_modified(now - Duration::from_millis(1500), now),
            Some(now - Duration::from_secs(2))
        );
        assert_eq!(last_modified(now, now), Some(now));
        assert_eq!(last_modified(now + Duration::from_secs(1), now), None);
    }
}
