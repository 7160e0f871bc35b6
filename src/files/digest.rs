//! Representation digests (RFC 9530 `Repr-Digest: sha-256=:…:`), computed once per file version
//! in the background and cached. A request never waits for a digest: until it is ready the
//! response says `Roam-Digest: pending` instead, so a multi-gigabyte file costs its first
//! client nothing and a client can tell "not computed yet" from "this server has none".
//!
//! Everything here is bounded:
//! - A file waiting for its turn is a job in a queue of at most [`MAX_QUEUED`], and a job holds
//!   no descriptor: it names the path, and the worker opens it when its turn comes and checks it
//!   is still the same file (device, inode, length, mtime). One file is hashed at a time, so the
//!   digests hold at most one descriptor, and a worker that runs out of descriptors waits and
//!   tries again instead of failing anyone's request.
//! - Results are keyed by the file's identity and version, not by path: any number of paths
//!   that reach one file (symlinks, `x/../x`) share one computation and one result.
//! - At most [`MAX_KNOWN`] results are kept; past that the finished ones are forgotten (and
//!   computed again when asked for).
//! - Files of at most 16 KiB, whose content the file table holds, are hashed at once from that
//!   copy.

use super::root::{mtime_ns, OpenFile, Root};
use crate::http::target::RelPath;
use crate::session::FileKey;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Files waiting to be hashed; a request for another file past this gets `pending` without
/// queueing it (its next request queues it once there is room).
pub const MAX_QUEUED: usize = 256;
/// Results kept.
pub const MAX_KNOWN: usize = 100_000;
/// How long the worker waits after running out of descriptors.
const DESCRIPTOR_BACKOFF: Duration = Duration::from_secs(1);

/// Where computed digests are kept across restarts (the disk session store implements it), so
/// a restarted server does not hash large files again. Keyed by the path's key and the ETag,
/// and checked against the inode, so a file replaced while the server was down is hashed anew.
pub trait DigestStore: Send + Sync + std::fmt::Debug + 'static {
    fn get(&self, id: StoredDigestId) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>>;
    fn put(
        &self,
        id: StoredDigestId,
        field: String,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// What a stored digest belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDigestId {
    pub file: FileKey,
    pub etag: Arc<str>,
    pub dev: u64,
    pub ino: u64,
}

/// What a response can say about the digest of the version it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DigestState {
    /// The `Repr-Digest` field value.
    Ready(Arc<str>),
    /// Being computed or waiting its turn: ask again later (`Roam-Digest: pending`).
    Pending,
    /// None will be computed (the server is stopping).
    Unavailable,
}

/// One version of one file on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DigestKey {
    dev: u64,
    ino: u64,
    /// The ETag's hash: a rewrite in place is another version of the same inode.
    version: u64,
}

impl DigestKey {
    fn of(file: &OpenFile) -> DigestKey {
        DigestKey {
            dev: file.identity.dev,
            ino: file.identity.ino,
            version: file.version,
        }
    }
}

#[derive(Debug)]
enum Known {
    Queued,
    Ready(Arc<str>),
}

/// A file waiting to be hashed: where to find it, and what it must still be.
#[derive(Debug)]
struct Job {
    key: DigestKey,
    path: RelPath,
    len: u64,
    mtime_ns: i128,
    /// For the digest store: the path's key and the ETag.
    file: FileKey,
    etag: Arc<str>,
}

/// The digest cache, its queue and the worker's state.
#[derive(Debug, Default)]
pub struct Digests {
    known: crate::ConcurrentMap<DigestKey, Known>,
    queue: Mutex<VecDeque<Job>>,
    wake: Notify,
    /// Set at shutdown: hashing stops at the next chunk, so a multi-gigabyte file cannot hold
    /// the process past its shutdown deadline.
    stopped: Arc<AtomicBool>,
    /// Where results are kept across restarts, when the server has a durable store.
    store: OnceLock<Arc<dyn DigestStore>>,
}

impl Digests {
    /// Keeps results in `store` from now on (and looks there before hashing).
    pub fn keep_in(&self, store: Arc<dyn DigestStore>) {
        let _ = self.store.set(store);
    }

    /// Stops the computation in progress and refuses new ones.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// The digest of this version of `file` (opened at `path`) if it is known; otherwise queues
    /// it (once) and says it is pending.
    pub fn get_or_start(&self, file: &OpenFile, path: &RelPath) -> DigestState {
        let key = DigestKey::of(file);
        match self.known.get(&key).as_deref() {
            Some(Known::Ready(field)) => return DigestState::Ready(Arc::clone(field)),
            Some(Known::Queued) => return DigestState::Pending,
            None => {}
        }
        if self.stopped.load(Ordering::Relaxed) {
            return DigestState::Unavailable;
        }
        if self.known.len() >= MAX_KNOWN {
            self.known.retain(|_, k| matches!(k, Known::Queued));
        }
        if let Some(content) = &file.small {
            let field: Arc<str> = Arc::from(field_value(&Sha256::digest(content)));
            self.known.insert(key, Known::Ready(Arc::clone(&field)));
            return DigestState::Ready(field);
        }
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= MAX_QUEUED {
            return DigestState::Pending;
        }
        // Checked again under the queue's lock: two requests racing queue it once.
        if self.known.contains_key(&key) {
            return DigestState::Pending;
        }
        self.known.insert(key, Known::Queued);
        queue.push_back(Job {
            key,
            path: path.clone(),
            len: file.len,
            mtime_ns: file_mtime_ns(file),
            file: FileKey::of_path(path.as_path()),
            etag: Arc::clone(&file.etag),
        });
        drop(queue);
        self.wake.notify_one();
        DigestState::Pending
    }

    /// Files waiting to be hashed.
    pub fn queued(&self) -> usize {
        self.queue.lock().map_or(0, |q| q.len())
    }

    fn next_job(&self) -> Option<Job> {
        self.queue.lock().ok()?.pop_front()
    }

    /// The worker: hashes queued files one at a time until `stop` or [`Digests::stop`].
    pub async fn run(self: Arc<Self>, root: Arc<Root>, stop: CancellationToken) {
        loop {
            if self.stopped.load(Ordering::Relaxed) {
                return;
            }
            let Some(job) = self.next_job() else {
                tokio::select! {
                    () = self.wake.notified() => continue,
                    () = stop.cancelled() => return,
                }
            };
            let stored_id = StoredDigestId {
                file: job.file,
                etag: Arc::clone(&job.etag),
                dev: job.key.dev,
                ino: job.key.ino,
            };
            let store = self.store.get().cloned();
            if let Some(store) = &store {
                if let Some(field) = store.get(stored_id.clone()).await {
                    tracing::debug!(path = %job.path.as_path().display(), "digest restored from the store");
                    self.known.insert(job.key, Known::Ready(Arc::from(field)));
                    continue;
                }
            }
            tracing::debug!(path = %job.path.as_path().display(), len = job.len, "hashing a file");
            let (this, root2) = (Arc::clone(&self), Arc::clone(&root));
            let outcome = tokio::task::spawn_blocking(move || this.hash_job(&root2, job)).await;
            match outcome {
                Ok(Outcome::OutOfDescriptors(job)) => {
                    // Put it back at the front and wait: the descriptors are the server's to
                    // use first.
                    if let Ok(mut q) = self.queue.lock() {
                        q.push_front(job);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(DESCRIPTOR_BACKOFF) => {}
                        () = stop.cancelled() => return,
                    }
                }
                Ok(Outcome::Done(Some(field))) => {
                    if let Some(store) = &store {
                        store.put(stored_id, field).await;
                    }
                }
                Ok(Outcome::Done(None)) => {}
                Err(e) => tracing::warn!(error = %e, "digest worker failed"),
            }
        }
    }

    /// Opens, checks and hashes one queued file (on the blocking pool).
    fn hash_job(&self, root: &Root, job: Job) -> Outcome {
        let forget = |key| {
            self.known
                .remove_if(&key, |_, k| matches!(k, Known::Queued));
        };
        let file = match root.open_regular(&job.path) {
            Ok((file, meta)) => {
                use std::os::unix::fs::MetadataExt;
                let same = meta.dev() == job.key.dev
                    && meta.ino() == job.key.ino
                    && meta.len() == job.len
                    && mtime_ns(&meta) == job.mtime_ns;
                if !same {
                    // Replaced or rewritten since it was queued: the next request queues the
                    // file that is there now.
                    forget(job.key);
                    return Outcome::Done(None);
                }
                file
            }
            Err(super::root::OpenError::Io(e)) if is_out_of_descriptors(&e) => {
                return Outcome::OutOfDescriptors(job)
            }
            Err(_) => {
                forget(job.key);
                return Outcome::Done(None);
            }
        };
        match hash_if_unchanged(&file, job.len, job.mtime_ns, &self.stopped) {
            Ok(Some(field)) => {
                self.known
                    .insert(job.key, Known::Ready(Arc::from(field.as_str())));
                Outcome::Done(Some(field))
            }
            Ok(None) => {
                forget(job.key);
                Outcome::Done(None)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot compute a file digest");
                forget(job.key);
                Outcome::Done(None)
            }
        }
    }
}

enum Outcome {
    /// Hashed (the field), or given up on.
    Done(Option<String>),
    OutOfDescriptors(Job),
}

fn file_mtime_ns(file: &OpenFile) -> i128 {
    file.source
        .file
        .metadata()
        .map_or(i128::MIN, |m| mtime_ns(&m))
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Hashes the whole file, then checks that its length and modification time are still what
/// they were when it was queued: a digest of a file written to during hashing would describe
/// no version at all. Returns `None` for a changed file or when `stopped` is set.
fn hash_if_unchanged(
    file: &File,
    len: u64,
    mtime: i128,
    stopped: &AtomicBool,
) -> io::Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        if stopped.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = match file.read_at(&mut buf, pos) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    let meta = file.metadata()?;
    if meta.len() != len || mtime_ns(&meta) != mtime || pos != len {
        return Ok(None);
    }
    Ok(Some(field_value(&hasher.finalize())))
}

/// `sha-256=:BASE64:` as RFC 9530 §3 writes it (a structured-field dictionary member whose value
/// is a byte sequence).
pub fn field_value(sha256: &[u8]) -> String {
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(sha256)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_9530_example_shape() {
        // RFC 9530 appendix: sha-256 of `{"hello": "world"}`.
        let d = Sha256::digest(br#"{"hello": "world"}"#);
        assert_eq!(
            field_value(&d),
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        );
    }

    #[test]
    fn a_file_changed_while_hashing_gets_no_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let f = File::open(&p).unwrap();
        let meta = f.metadata().unwrap();
        let (len, mtime) = (meta.len(), mtime_ns(&meta));
        let never = AtomicBool::new(false);
        assert!(hash_if_unchanged(&f, len, mtime, &never).unwrap().is_some());
        assert_eq!(hash_if_unchanged(&f, len, mtime + 1, &never).unwrap(), None);
        assert_eq!(hash_if_unchanged(&f, len + 1, mtime, &never).unwrap(), None);
        assert_eq!(
            hash_if_unchanged(&f, len, mtime, &AtomicBool::new(true)).unwrap(),
            None
        );
    }
}
