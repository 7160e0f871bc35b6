//! Representation digests (RFC 9530 `Repr-Digest: sha-256=:…:`), computed once per file version
//! in the background and cached. A request never waits for a digest: until it is ready the
//! response says `Roam-Digest: pending` instead, so a multi-gigabyte file costs its first
//! client nothing and a client can tell "not computed yet" from "this server has none".

use super::root::OpenFile;
use crate::session::FileKey;
use base64::Engine as _;
use dashmap::DashMap;
use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Digests computed at once: hashing reads whole files, and serving must keep the rest of the
/// disk bandwidth and the other core.
const CONCURRENT_DIGESTS: usize = 1;

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

#[derive(Debug, Clone)]
enum Known {
    Computing { version: u64 },
    Ready { version: u64, field: Arc<str> },
}

/// Cache of `Repr-Digest` field values by file, one version each: like the file ids, one small
/// entry per file that was ever served while the server ran.
#[derive(Debug)]
pub struct Digests {
    known: DashMap<FileKey, Known>,
    permits: Arc<Semaphore>,
    /// Set at shutdown: hashing stops at the next chunk, so a multi-gigabyte file cannot hold
    /// the process past its shutdown deadline.
    stopped: Arc<AtomicBool>,
}

impl Default for Digests {
    fn default() -> Self {
        Digests {
            known: DashMap::new(),
            permits: Arc::new(Semaphore::new(CONCURRENT_DIGESTS)),
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Digests {
    /// Stops every computation in progress and refuses new ones.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.permits.close();
    }

    /// The field value for this version of the file if it is known; otherwise starts computing
    /// it (once) and returns `None`. Must be called inside a Tokio runtime.
    ///
    /// At most one computation per file at a time, whatever its version: a file that keeps
    /// changing must not queue a hash (and a descriptor) per version. When a computation of an
    /// older version ends, the next request starts one for the current version.
    pub fn get_or_start(self: &Arc<Self>, id: FileKey, file: &OpenFile) -> DigestState {
        match self.known.get(&id).as_deref() {
            Some(Known::Ready { version, field }) if *version == file.version => {
                return DigestState::Ready(Arc::clone(field))
            }
            Some(Known::Computing { .. }) => return DigestState::Pending,
            _ => {}
        }
        if self.stopped.load(Ordering::Relaxed) {
            return DigestState::Unavailable;
        }
        let stopped = Arc::clone(&self.stopped);
        self.known.insert(
            id,
            Known::Computing {
                version: file.version,
            },
        );
        let this = Arc::clone(self);
        let handle = Arc::clone(&file.source.file);
        let version = file.version;
        let etag = file.etag.clone();
        tokio::spawn(async move {
            let Ok(_permit) = this.permits.acquire().await else {
                return;
            };
            let result =
                tokio::task::spawn_blocking(move || hash_if_unchanged(&handle, &etag, &stopped))
                    .await;
            match result {
                Ok(Ok(Some(field))) => {
                    let field: Arc<str> = Arc::from(field);
                    // Only the computation that was asked for may land: a newer version may have
                    // started its own meanwhile.
                    this.known.alter(&id, |_, k| match k {
                        Known::Computing { version: v } if v == version => {
                            Known::Ready { version, field }
                        }
                        other => other,
                    });
                }
                other => {
                    if let Ok(Err(e)) = &other {
                        tracing::warn!(error = %e, "cannot compute a file digest");
                    }
                    this.known.remove_if(
                        &id,
                        |_, k| matches!(k, Known::Computing { version: v } if *v == version),
                    );
                }
            }
        });
        DigestState::Pending
    }
}

/// Hashes the whole file, then checks that its length and modification time still give the
/// same ETag: a digest of a file written to during hashing would describe no version at all.
/// Returns `None` for a changed file or when `stopped` is set.
fn hash_if_unchanged(file: &File, etag: &str, stopped: &AtomicBool) -> io::Result<Option<String>> {
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
    let now =
        super::root::strong_etag(meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
    if now != etag || pos != meta.len() {
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
        let etag = crate::files::strong_etag(meta.len(), meta.modified().unwrap());
        assert!(hash_if_unchanged(&f, &etag, &AtomicBool::new(false))
            .unwrap()
            .is_some());
        assert_eq!(
            hash_if_unchanged(&f, "\"stale\"", &AtomicBool::new(false)).unwrap(),
            None
        );
        assert_eq!(
            hash_if_unchanged(&f, &etag, &AtomicBool::new(true)).unwrap(),
            None
        );
    }
}
