//! The durable backend: session records in an embedded, crash-safe key-value store (fjall, an
//! LSM tree; the measurement that chose it over redb is in docs/benchmarks.md) in the state
//! directory. The table in front of it is the truth while the process runs; the write-behind
//! layer commits the table's changes here in batches, one `fdatasync` per batch.
//!
//! The state directory holds `store/` (fjall), `roam.lock` (held while a process uses the
//! directory; it names that process), `flush-mark` (the newest batch known to be written, kept
//! outside the store so that a store that lost written batches is noticed), and `clean` (present
//! only after a graceful shutdown).
//!
//! Opening replays fjall's journal, which can take seconds after a crash: it happens on a
//! thread of its own while the server already accepts; a request that needs a record waits for
//! it (see [`DiskBackend::ready`]).

use super::backend::{
    Backend, Begin, BeginError, BoxFuture, Committed, Report, StoreError, Stored,
};
use super::clock::Clock;
use super::key::{Ended, Epoch, Record, SessionKey};
use super::table::Full;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// Bytes of a stored record: offset u64, version u32, epoch u16, ended u8, a reserved byte,
/// touched u32 (Unix seconds), all little-endian.
const VALUE_LEN: usize = 20;
/// The store's own format, kept in the meta keyspace.
const FORMAT: u64 = 1;
/// How often `flush-mark` is rewritten at most (it costs a rename and two syncs).
const MARK_EVERY: Duration = Duration::from_secs(1);
/// Records expired per delete batch.
const EXPIRE_BATCH: usize = 20_000;
/// A batch is not even attempted with less free space than this (plus its own size) on the
/// store's file system: fjall treats a failed write of its journal as fatal (it "poisons" the
/// database until it is opened again), so a full disk must stay an ordinary, retried condition.
const FREE_MARGIN: u64 = 8 << 20;

/// Why the state directory cannot be used. Each names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot create the state directory {path}: {cause}")]
    Create { path: PathBuf, cause: io::Error },
    #[error("cannot write in the state directory {path}: {cause}")]
    NotWritable { path: PathBuf, cause: io::Error },
    #[error(
        "the state directory {path} is in use by another roam process ({holder}); stop it, or \
         give this one another --state-dir"
    )]
    Locked { path: PathBuf, holder: String },
}

fn encode(r: &Record, touched: u64) -> [u8; VALUE_LEN] {
    let mut v = [0u8; VALUE_LEN];
    v[..8].copy_from_slice(&r.offset.to_le_bytes());
    v[8..12].copy_from_slice(&r.version.to_le_bytes());
    v[12..14].copy_from_slice(&r.epoch.0.to_le_bytes());
    v[14] = r.ended.bits();
    let t = u32::try_from(touched).unwrap_or(u32::MAX);
    v[16..20].copy_from_slice(&t.to_le_bytes());
    v
}

fn decode(v: &[u8]) -> Option<Stored> {
    if v.len() != VALUE_LEN || v[14] > 3 {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(v[i..i + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |i: usize| u32::from_le_bytes(v[i..i + 4].try_into().unwrap_or([0; 4]));
    Some(Stored {
        record: Record {
            offset: u64_at(0),
            version: u32_at(8),
            epoch: Epoch(u16::from_le_bytes([v[12], v[13]])),
            ended: Ended::from_bits(v[14]),
        },
        touched: u64::from(u32_at(16)),
    })
}

fn store_error(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what}: {e}"))
}

/// The open fjall database.
struct Db {
    db: fjall::Database,
    sessions: fjall::Keyspace,
    meta: fjall::Keyspace,
    digests: fjall::Keyspace,
}

enum State {
    Opening,
    Open(Arc<Db>),
    /// The store cannot be opened: the server stops.
    Failed(String),
    /// A write failed in a way that leaves the engine unusable until it is opened again (fjall
    /// "poisons" itself when a journal sync fails): the next operation reopens it.
    Broken(String),
}

/// What opening found, for the start-up log line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The previous process did not shut down gracefully.
    pub after_crash: bool,
    /// The store holds older batches than `flush-mark` says were written: records may be
    /// older than what their clients acknowledged since, so none resumes without `Range`.
    pub lost_batches: Option<(u64, u64)>,
    /// The newest time the store recorded (Unix seconds): the session clock never starts
    /// earlier.
    pub newest_touch: u64,
    pub sessions: usize,
    pub opened_in: Duration,
}

struct Shared {
    dir: PathBuf,
    state: RwLock<State>,
    ready: watch::Sender<bool>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    cap: usize,
    /// Number of the last batch committed.
    seq: AtomicU64,
    /// When `flush-mark` was last written (clock seconds).
    mark_written: AtomicU64,
    /// Set when opening found lost batches: every record read is then treated as ended by the
    /// peer (whole file again without `Range`), never trusted to be as new as acknowledged.
    distrust: AtomicBool,
    recovery: Mutex<Recovery>,
    /// Serialises the read-modify-write of begins and fenced commits (the write-behind layer
    /// writes from one task; the contract suite from several).
    writes: Mutex<()>,
    /// Held (locked) for the life of the backend: the directory lock.
    _lock: File,
}

/// Session records on disk. A cheap-clone handle.
#[derive(Clone)]
pub struct DiskBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DiskBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiskBackend({})", self.shared.dir.display())
    }
}

/// Prepares `dir` for use by this process: creates it (mode 0700) if missing, checks it can be
/// written, and takes its lock. Synchronous and quick: call it before listening, so that a bad
/// directory stops the start with one line naming it.
pub fn claim_state_dir(dir: &Path) -> Result<File, StateDirError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|cause| StateDirError::Create {
                path: dir.to_path_buf(),
                cause,
            })?;
    }
    let not_writable = |cause| StateDirError::NotWritable {
        path: dir.to_path_buf(),
        cause,
    };
    let meta = std::fs::metadata(dir).map_err(not_writable)?;
    if !meta.is_dir() {
        return Err(not_writable(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    // Others must not read progress records or the ID secret (SECURITY.md).
    if meta.permissions().mode() & 0o077 != 0 {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let lock_path = dir.join("roam.lock");
    let mut lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(not_writable)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "a process that did not record its pid".to_owned(),
                h => h.to_owned(),
            };
            return Err(StateDirError::Locked {
                path: dir.to_path_buf(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(not_writable(e)),
    }
    lock.set_len(0).map_err(not_writable)?;
    let me = format!("pid {}", std::process::id());
    lock.write_all(me.as_bytes()).map_err(not_writable)?;
    lock.sync_all().map_err(not_writable)?;
    Ok(lock)
}

impl DiskBackend {
    /// A backend over `dir` (already claimed: `lock` is its lock), opening the store on a
    /// thread of its own. Records untouched for longer than `ttl` by `clock` expire; `cap` bounds
    /// the sessions new begins may create (through [`Backend::begin`]).
    pub fn open(
        dir: &Path,
        lock: File,
        ttl: Duration,
        cap: usize,
        clock: Arc<dyn Clock>,
    ) -> DiskBackend {
        let (ready, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            state: RwLock::new(State::Opening),
            ready,
            clock,
            ttl,
            cap,
            seq: AtomicU64::new(0),
            mark_written: AtomicU64::new(0),
            distrust: AtomicBool::new(false),
            recovery: Mutex::new(Recovery::default()),
            writes: Mutex::new(()),
            _lock: lock,
        });
        let s = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("roam-store-open".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                // A damaged store must end in an error the operator can read, never in a store
                // that stays "opening" because the engine panicked on it.
                let outcome =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open_db(&s)))
                        .unwrap_or_else(|_| {
                            Err(format!(
                            "the session store {} could not be read (the engine failed on it). It \
                             is damaged; move it away (roam then starts with no sessions: clients \
                             resume with Range, or start over) or restore it from a copy",
                            s.dir.join("store").display()
                        ))
                        });
                let state = match outcome {
                    Ok(db) => {
                        if let Ok(mut r) = s.recovery.lock() {
                            r.opened_in = started.elapsed();
                            r.sessions = db.sessions.approximate_len();
                        }
                        State::Open(Arc::new(db))
                    }
                    Err(e) => State::Failed(e),
                };
                if let Ok(mut st) = s.state.write() {
                    *st = state;
                }
                s.ready.send_replace(true);
            });
        if let Err(e) = spawned {
            if let Ok(mut st) = shared.state.write() {
                *st = State::Failed(format!("cannot start the thread that opens the store: {e}"));
            }
            shared.ready.send_replace(true);
        }
        DiskBackend { shared }
    }

    /// Waits until the store is open; the error says why it cannot be (a damaged store: the
    /// message names the file and what to do).
    pub async fn ready(&self) -> Result<Recovery, StoreError> {
        let mut rx = self.shared.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
        self.db()?;
        Ok(self.recovery())
    }

    /// What opening found.
    pub fn recovery(&self) -> Recovery {
        self.shared
            .recovery
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    fn db(&self) -> Result<Arc<Db>, StoreError> {
        match &*self
            .shared
            .state
            .read()
            .map_err(|_| StoreError("the store's lock is poisoned".into()))?
        {
            State::Open(db) => Ok(Arc::clone(db)),
            State::Opening => Err(StoreError("the store is still opening".into())),
            State::Failed(why) | State::Broken(why) => Err(StoreError(why.clone())),
        }
    }

    fn broken(&self) -> bool {
        matches!(self.shared.state.read().as_deref(), Ok(State::Broken(_)))
    }

    /// Waits for the open, then runs `f` with the database on the blocking pool.
    async fn with_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared, &Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let mut rx = self.shared.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
        if self.broken() {
            let shared = Arc::clone(&self.shared);
            tokio::task::spawn_blocking(move || shared.reopen())
                .await
                .map_err(|e| store_error("store task", e))??;
        }
        let db = self.db()?;
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || f(&shared, &db))
            .await
            .map_err(|e| store_error("store task", e))?
    }

    /// The `Repr-Digest` stored for this file (key, ETag) if it was computed for the same inode.
    pub async fn digest(
        &self,
        file: u64,
        etag: String,
        dev: u64,
        ino: u64,
    ) -> Result<Option<String>, StoreError> {
        self.with_db(move |_, db| {
            let key = digest_key(file, &etag);
            let Some(v) = db
                .digests
                .get(key)
                .map_err(|e| store_error("reading a digest", e))?
            else {
                return Ok(None);
            };
            if v.len() < 16 {
                return Ok(None);
            }
            let (d, i) = (
                u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8])),
                u64::from_le_bytes(v[8..16].try_into().unwrap_or([0; 8])),
            );
            if (d, i) != (dev, ino) {
                return Ok(None);
            }
            Ok(String::from_utf8(v[16..].to_vec()).ok())
        })
        .await
    }

    /// Stores a computed `Repr-Digest` for this file (key, ETag, inode).
    pub async fn put_digest(
        &self,
        file: u64,
        etag: String,
        dev: u64,
        ino: u64,
        field: String,
    ) -> Result<(), StoreError> {
        self.with_db(move |shared, db| {
            shared.room_for(1)?;
            let mut v = Vec::with_capacity(16 + field.len());
            v.extend_from_slice(&dev.to_le_bytes());
            v.extend_from_slice(&ino.to_le_bytes());
            v.extend_from_slice(field.as_bytes());
            db.digests
                .insert(digest_key(file, &etag), v)
                .map_err(|e| store_error("writing a digest", e))
        })
        .await
    }

    /// At graceful shutdown, after the last commit: moves the journal into table files (so the
    /// next open replays little), writes the flush mark, and marks the shutdown clean.
    pub async fn shut(&self) -> Result<(), StoreError> {
        self.with_db(|shared, db| {
            // Every keyspace: one left in memory pins every journal file it has data in, and
            // the next open would replay them all (the meta keyspace is written in every batch).
            for ks in [&db.sessions, &db.meta, &db.digests] {
                ks.rotate_memtable_and_wait()
                    .map_err(|e| store_error("flushing the store", e))?;
            }
            db.db
                .persist(fjall::PersistMode::SyncAll)
                .map_err(|e| store_error("syncing the store", e))?;
            write_mark(
                &shared.dir,
                shared.seq.load(Ordering::Relaxed),
                shared.clock.now(),
            )
            .map_err(|e| store_error("writing flush-mark", e))?;
            File::create(shared.dir.join("clean"))
                .and_then(|f| f.sync_all())
                .map_err(|e| store_error("marking a clean shutdown", e))
        })
        .await
    }
}

impl crate::files::digest::DigestStore for DiskBackend {
    fn get(
        &self,
        id: crate::files::digest::StoredDigestId,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + '_>> {
        Box::pin(async move {
            self.digest(id.file.0, id.etag.to_string(), id.dev, id.ino)
                .await
                .unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "cannot read a stored digest");
                    None
                })
        })
    }

    fn put(
        &self,
        id: crate::files::digest::StoredDigestId,
        field: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Err(e) = self
                .put_digest(id.file.0, id.etag.to_string(), id.dev, id.ino, field)
                .await
            {
                tracing::debug!(error = %e, "cannot store a digest");
            }
        })
    }
}

impl DiskBackend {
    /// Compacts the session records fully (benchmarks measure disk use per session with it;
    /// in service the engine compacts in the background).
    pub async fn compact(&self) -> Result<(), StoreError> {
        self.with_db(|_, db| {
            db.sessions
                .major_compact()
                .map_err(|e| store_error("compacting", e))
        })
        .await
    }
}

fn digest_key(file: u64, etag: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + etag.len());
    k.extend_from_slice(&file.to_be_bytes());
    k.extend_from_slice(etag.as_bytes());
    k
}

/// Opens (or creates) the store and checks it against `flush-mark` and `clean`.
fn open_db(s: &Shared) -> Result<Db, String> {
    let store_dir = s.dir.join("store");
    // The journal is replayed on every open; at fjall's minimum size it replays in about a
    // second even after a crash (measured in docs/benchmarks.md).
    let db = fjall::Database::builder(&store_dir)
        .worker_threads(1)
        .cache_size(64 << 20)
        .max_journaling_size(64 << 20)
        .open()
        .map_err(|e| match e {
            fjall::Error::Locked => format!(
                "the store {} is locked by another process",
                store_dir.display()
            ),
            e => format!(
                "cannot open the session store {}: {e:?}. It is damaged; move it away (roam then \
                 starts with no sessions: clients resume with Range, or start over) or restore it \
                 from a copy",
                store_dir.display()
            ),
        })?;
    let open = |name: &str| {
        db.keyspace(name, fjall::KeyspaceCreateOptions::default)
            .map_err(|e| {
                format!(
                    "cannot open keyspace {name} in {}: {e:?}",
                    store_dir.display()
                )
            })
    };
    let (sessions, meta, digests) = (open("sessions")?, open("meta")?, open("digests")?);
    match meta
        .get("format")
        .map_err(|e| format!("reading the store's format: {e:?}"))?
    {
        None => meta
            .insert("format", FORMAT.to_le_bytes())
            .map_err(|e| format!("writing the store's format: {e:?}"))?,
        Some(v) if v[..] == FORMAT.to_le_bytes() => {}
        Some(v) => {
            return Err(format!(
                "the session store {} has format {:?}, this roam reads format {FORMAT}: use a \
                 matching roam, or move the store away to start empty",
                store_dir.display(),
                &v[..]
            ))
        }
    }
    let stored = read_u64(&meta, "mark")?.unwrap_or(0);
    let newest = read_u64(&meta, "newest")?.unwrap_or(0);
    s.seq.store(stored, Ordering::Relaxed);
    let marked = read_mark(&s.dir);
    let clean = s.dir.join("clean");
    let after_crash = !clean.exists() && (stored > 0 || marked.is_some());
    let _ = std::fs::remove_file(&clean);
    let lost = marked.filter(|&m| m > stored).map(|m| (stored, m));
    if lost.is_some() {
        s.distrust.store(true, Ordering::Relaxed);
    }
    if let Ok(mut r) = s.recovery.lock() {
        r.after_crash = after_crash;
        r.lost_batches = lost;
        r.newest_touch = newest;
    }
    Ok(Db {
        db,
        sessions,
        meta,
        digests,
    })
}

fn read_u64(ks: &fjall::Keyspace, key: &str) -> Result<Option<u64>, String> {
    Ok(ks
        .get(key)
        .map_err(|e| format!("reading {key}: {e:?}"))?
        .and_then(|v| v[..].try_into().ok().map(u64::from_le_bytes)))
}

/// `flush-mark`: "SEQ SECONDS", the newest batch known written and the clock then.
fn read_mark_file(dir: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(dir.join("flush-mark")).ok()?;
    let mut parts = text.split_whitespace();
    let seq = parts.next()?.parse().ok()?;
    let secs = parts.next().and_then(|t| t.parse().ok()).unwrap_or(0);
    Some((seq, secs))
}

fn read_mark(dir: &Path) -> Option<u64> {
    read_mark_file(dir).map(|(seq, _)| seq)
}

/// The newest time the state directory recorded (Unix seconds; 0 if none): the session clock
/// of the next process starts no earlier, so a clock set back across a restart cannot make
/// stored sessions younger than they are.
pub fn stored_time(dir: &Path) -> u64 {
    read_mark_file(dir).map_or(0, |(_, secs)| secs)
}

/// Writes `flush-mark` atomically: a temporary file, synced, renamed over the old one.
fn write_mark(dir: &Path, seq: u64, secs: u64) -> io::Result<()> {
    let tmp = dir.join("flush-mark.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(format!("{seq} {secs}").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("flush-mark"))?;
    File::open(dir)?.sync_all()
}

impl Shared {
    fn key(k: SessionKey) -> [u8; 16] {
        k.to_bytes()
    }

    /// Opens the store again after a write left it unusable. The old handles must be gone
    /// first (their lock released); if one is still in use the reopen fails and is tried again
    /// at the next operation.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut st = self
            .state
            .write()
            .map_err(|_| StoreError("the store's lock is poisoned".into()))?;
        if !matches!(&*st, State::Broken(_)) {
            return Ok(());
        }
        let old = std::mem::replace(&mut *st, State::Opening);
        drop(old);
        match open_db(self) {
            Ok(db) => {
                *st = State::Open(Arc::new(db));
                tracing::info!(dir = %self.dir.display(), "session store opened again after a failed write");
                Ok(())
            }
            Err(e) => {
                *st = State::Broken(e.clone());
                Err(StoreError(e))
            }
        }
    }

    /// Marks the store for reopening after `e` if the engine may be unusable now.
    fn note_write_failure(&self, e: &fjall::Error) {
        if matches!(e, fjall::Error::Poisoned | fjall::Error::Io(_)) {
            if let Ok(mut st) = self.state.write() {
                if matches!(&*st, State::Open(_)) {
                    *st = State::Broken(format!("the store needs reopening after: {e:?}"));
                }
            }
        }
    }

    /// An error unless the store's file system has room for a batch of `records`.
    fn room_for(&self, records: usize) -> Result<(), StoreError> {
        let needed = FREE_MARGIN + (records as u64) * 64;
        match crate::sys::free_space(&self.dir) {
            Ok(free) if free < needed => Err(StoreError(format!(
                "the file system holding {} is full ({free} bytes free): keeping sessions in \
                 memory until there is room",
                self.dir.display()
            ))),
            _ => Ok(()),
        }
    }

    fn get(&self, db: &Db, key: SessionKey) -> Result<Option<Stored>, StoreError> {
        let Some(v) = db
            .sessions
            .get(Self::key(key))
            .map_err(|e| store_error("reading a session", e))?
        else {
            return Ok(None);
        };
        let Some(mut stored) = decode(&v) else {
            tracing::warn!(
                ?key,
                "a stored session record is damaged; treating it as absent"
            );
            return Ok(None);
        };
        if self.distrust.load(Ordering::Relaxed) {
            stored.record.ended = Ended::Peer;
        }
        Ok(Some(stored))
    }

    /// Commits `puts` in one batch with one `fdatasync`, with the batch number and the newest
    /// time in the meta keyspace; rewrites `flush-mark` at most once a second.
    fn write_batch(
        &self,
        db: &Db,
        puts: Vec<([u8; 16], [u8; VALUE_LEN])>,
    ) -> Result<(), StoreError> {
        self.room_for(puts.len())?;
        let now = self.clock.now();
        let seq = self.seq.load(Ordering::Relaxed) + 1;
        let mut batch = db.db.batch().durability(Some(fjall::PersistMode::SyncData));
        for (k, v) in puts {
            batch.insert(&db.sessions, k, v);
        }
        batch.insert(&db.meta, "mark", seq.to_le_bytes());
        batch.insert(&db.meta, "newest", now.to_le_bytes());
        batch.commit().map_err(|e| {
            self.note_write_failure(&e);
            store_error("committing sessions", e)
        })?;
        self.seq.store(seq, Ordering::Relaxed);
        if now.saturating_sub(self.mark_written.load(Ordering::Relaxed)) >= MARK_EVERY.as_secs() {
            self.mark_written.store(now, Ordering::Relaxed);
            write_mark(&self.dir, seq, now).map_err(|e| store_error("writing flush-mark", e))?;
        }
        Ok(())
    }
}

impl Backend for DiskBackend {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn exclusive(&self) -> bool {
        true
    }

    fn read(&self, key: SessionKey) -> BoxFuture<'_, Result<Option<Stored>, StoreError>> {
        Box::pin(self.with_db(move |shared, db| shared.get(db, key)))
    }

    fn begin(&self, key: SessionKey, begin: Begin) -> BoxFuture<'_, Result<Epoch, BeginError>> {
        Box::pin(async move {
            let r = self
                .with_db(move |shared, db| {
                    let _w = shared.writes.lock().unwrap_or_else(|p| p.into_inner());
                    let current = shared.get(db, key)?;
                    if !begin.expect.holds(current.map(|c| c.record.epoch)) {
                        return Ok(Err(BeginError::Conflict));
                    }
                    if current.is_none() && db.sessions.approximate_len() >= shared.cap {
                        return Ok(Err(BeginError::Full(Full { cap: shared.cap })));
                    }
                    let epoch = current.map_or(Epoch(rand::random()), |c| c.record.epoch.next());
                    let record = Record {
                        offset: begin.offset,
                        version: begin.version,
                        epoch,
                        ended: Ended::Sending,
                    };
                    shared.write_batch(
                        db,
                        vec![(Shared::key(key), encode(&record, shared.clock.now()))],
                    )?;
                    Ok(Ok(epoch))
                })
                .await;
            match r {
                Ok(inner) => inner,
                Err(e) => Err(BeginError::Store(e)),
            }
        })
    }

    fn commit(&self, batch: Vec<Report>) -> BoxFuture<'_, Result<Committed, StoreError>> {
        Box::pin(self.with_db(move |shared, db| {
            let _w = shared.writes.lock().unwrap_or_else(|p| p.into_inner());
            let now = shared.clock.now();
            let mut done = Committed::default();
            let mut puts = Vec::with_capacity(batch.len());
            for report in batch {
                match report {
                    Report::Snapshot { key, record } | Report::Begun { key, record } => {
                        puts.push((Shared::key(key), encode(&record, now)));
                        done.applied += 1;
                    }
                    Report::Progress {
                        key,
                        epoch,
                        offset,
                        ended,
                    } => {
                        // A store this process alone writes gets snapshots; progress reports are
                        // applied with the fencing a shared store needs (the contract suite).
                        let stored = puts
                            .iter()
                            .rev()
                            .find(|(k, _)| *k == Shared::key(key))
                            .and_then(|(_, v)| decode(v))
                            .map(Ok)
                            .or_else(|| shared.get(db, key).transpose());
                        match stored.transpose()? {
                            Some(s) if s.record.epoch == epoch => {
                                let record = Record {
                                    offset: s.record.offset.max(offset),
                                    ended,
                                    ..s.record
                                };
                                puts.push((Shared::key(key), encode(&record, now)));
                                done.applied += 1;
                            }
                            _ => done.stale += 1,
                        }
                    }
                }
            }
            shared.write_batch(db, puts)?;
            Ok(done)
        }))
    }

    fn expire(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(self.with_db(|shared, db| {
            let cutoff = shared.clock.now().saturating_sub(shared.ttl.as_secs());
            let mut expired = Vec::new();
            for kv in db.sessions.iter() {
                let (k, v) = kv
                    .into_inner()
                    .map_err(|e| store_error("scanning sessions", e))?;
                match decode(&v) {
                    Some(s) if s.touched >= cutoff => {}
                    _ => expired.push(k),
                }
            }
            for chunk in expired.chunks(EXPIRE_BATCH) {
                shared.room_for(chunk.len())?;
                let mut b = db.db.batch().durability(Some(fjall::PersistMode::SyncData));
                for k in chunk {
                    b.remove(&db.sessions, k.clone());
                }
                b.commit()
                    .map_err(|e| store_error("deleting expired sessions", e))?;
            }
            Ok(expired.len())
        }))
    }

    fn len(&self) -> usize {
        self.db()
            .map(|db| db.sessions.approximate_len())
            .unwrap_or(0)
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.shut())
    }

    /// Ready once opened; not while opening, after a failed open, or while a failed write
    /// left the engine waiting to be reopened.
    fn health(&self) -> Result<(), StoreError> {
        self.db().map(|_| ())
    }

    /// fjall's count is kept without reading: it includes replaced and deleted records until
    /// they are compacted away. Counting exactly would read all 10 million.
    fn len_is_exact(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::clock::ManualClock;

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let r = Record {
            offset: u64::MAX - 7,
            version: 0xdead_beef,
            epoch: Epoch(65_535),
            ended: Ended::Peer,
        };
        let v = encode(&r, 1_900_000_000);
        assert_eq!(
            decode(&v),
            Some(Stored {
                record: r,
                touched: 1_900_000_000
            })
        );
        assert_eq!(decode(&v[..19]), None);
        let mut bad = v;
        bad[14] = 9;
        assert_eq!(decode(&bad), None);
    }

    #[test]
    fn a_second_process_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let _held = claim_state_dir(dir.path()).unwrap();
        match claim_state_dir(dir.path()) {
            Err(StateDirError::Locked { holder, .. }) => {
                assert_eq!(holder, format!("pid {}", std::process::id()))
            }
            other => panic!("{other:?}"),
        }
    }

    fn factory(clock: Arc<ManualClock>, cap: usize, ttl: Duration) -> Arc<dyn Backend> {
        // Each backend gets a fresh directory, kept for the test process's life.
        let dir = tempfile::tempdir().unwrap().keep();
        let lock = claim_state_dir(&dir).unwrap();
        Arc::new(DiskBackend::open(&dir, lock, ttl, cap, clock))
    }

    crate::contract_tests!(factory);
}
