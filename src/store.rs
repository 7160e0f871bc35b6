//! The progress store: for each (client, file) session, the offset the client has confirmed,
//! the file version it is downloading, and which sender currently owns the record.
//!
//! [`ProgressStore`] is the seam for other backends (persistent, shared across machines);
//! [`MemoryStore`] is a sharded in-memory map. Handles return copies and never hand out guards,
//! so no map lock can be held across an `.await` or a second call into the map.

use crate::id::ClientId;
use dashmap::DashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A file's small integer name, interned once per path so that sessions do not each carry a
/// path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId(pub u32);

/// The key of one download: a client and a file. 16 bytes: the client's nonce (which
/// determines its whole ID) and the interned file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub client: u64,
    pub file: FileId,
}

impl SessionKey {
    pub fn new(client: ClientId, file: FileId) -> Self {
        SessionKey {
            client: client.nonce(),
            file,
        }
    }
}

/// Which sender owns a session record. Every start of a server-resumed download and every
/// position a client declares with `Range: bytes=N-` begins a new epoch; progress reported
/// under an older epoch is ignored, so a late write from a replaced connection can never move
/// the offset of its successor.
///
/// Sixteen bits: the counter wraps after 65,536 new owners of one session, and only a stream
/// that outlived all of them could be mistaken for the current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epoch(pub u16);

/// A copy of one session record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the file the client has confirmed, counted from byte 0.
    pub offset: u64,
    /// The version (a hash of the strong ETag) the offset refers to.
    pub version: u32,
    /// The current owner.
    pub epoch: Epoch,
}

/// The store is at its session cap and the key is new.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the progress store holds its maximum of {cap} sessions")]
pub struct StoreFull {
    pub cap: usize,
}

/// What every progress backend provides. Calls are synchronous and short: no backend may block
/// a runtime thread for long (a remote backend would batch behind this interface).
pub trait ProgressStore: Send + Sync + 'static {
    /// The record for `key`, if any.
    fn get(&self, key: &SessionKey) -> Option<Progress>;
    /// Starts a new owner of `key` at `offset` of `version`, creating the record if needed.
    fn begin(&self, key: SessionKey, version: u32, offset: u64) -> Result<Epoch, StoreFull>;
    /// Records that the owner `epoch` has `offset` bytes confirmed. Ignored (returns false) if
    /// another owner began since; never moves the offset backwards within an epoch.
    fn advance(&self, key: &SessionKey, epoch: Epoch, offset: u64) -> bool;
    /// Drops sessions untouched for longer than the TTL; returns how many.
    fn expire(&self) -> usize;
    /// Number of sessions held.
    fn len(&self) -> usize;
    /// True when no session is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One record of [`MemoryStore`]: 16 bytes, so a map slot (key and value) is 32. The offset
/// and the touch time are atomics so progress updates need only a shard's read lock; the epoch
/// and version change only under its write lock, in `begin`.
#[derive(Debug)]
struct Entry {
    offset: AtomicU64,
    version: u32,
    epoch: u16,
    /// When the record was last begun or advanced, in the store's coarse time units (see
    /// `MemoryStore::unit_secs`), wrapping.
    touched: AtomicU16,
}

/// An in-memory [`ProgressStore`] over a sharded map, with a session cap and idle expiry.
#[derive(Debug)]
pub struct MemoryStore {
    map: DashMap<SessionKey, Entry>,
    /// Sessions held; kept beside the map because counting a DashMap takes every shard's lock.
    count: AtomicUsize,
    /// First epoch of the next new record: a record re-created after expiry must not start at
    /// an epoch an owner of the expired one still holds.
    next_epoch: AtomicU16,
    cap: usize,
    /// The TTL in time units.
    ttl_units: u16,
    /// Seconds per time unit: 1 for TTLs up to about 4.5 hours, more for longer ones, so the
    /// TTL always spans at most 16,384 units and a 16-bit stamp wraps only after four TTLs (the
    /// sweeper, running 16 times per TTL, removes idle entries long before).
    unit_secs: u64,
    origin: Instant,
}

impl MemoryStore {
    /// A store that holds at most `cap` sessions and forgets those idle for longer than `ttl`.
    pub fn new(cap: usize, ttl: Duration) -> Self {
        let unit_secs = ttl.as_secs().div_ceil(16_384).max(1);
        MemoryStore {
            map: DashMap::new(),
            count: AtomicUsize::new(0),
            next_epoch: AtomicU16::new(0),
            cap,
            ttl_units: u16::try_from(ttl.as_secs().div_ceil(unit_secs)).unwrap_or(u16::MAX),
            unit_secs,
            origin: Instant::now(),
        }
    }

    fn now(&self) -> u16 {
        // Wrapping by design: only differences between recent stamps are compared.
        (self.origin.elapsed().as_secs() / self.unit_secs) as u16
    }
}

impl ProgressStore for MemoryStore {
    fn get(&self, key: &SessionKey) -> Option<Progress> {
        self.map.get(key).map(|e| Progress {
            offset: e.offset.load(Ordering::Acquire),
            version: e.version,
            epoch: Epoch(e.epoch),
        })
    }

    fn begin(&self, key: SessionKey, version: u32, offset: u64) -> Result<Epoch, StoreFull> {
        let now = self.now();
        // Racy by a few entries under concurrency: the cap bounds memory, it is not an exact
        // quota.
        let at_cap = self.count.load(Ordering::Relaxed) >= self.cap;
        match self.map.entry(key) {
            dashmap::Entry::Occupied(mut o) => {
                let e = o.get_mut();
                e.epoch = e.epoch.wrapping_add(1);
                e.version = version;
                *e.offset.get_mut() = offset;
                *e.touched.get_mut() = now;
                Ok(Epoch(e.epoch))
            }
            dashmap::Entry::Vacant(_) if at_cap => Err(StoreFull { cap: self.cap }),
            dashmap::Entry::Vacant(v) => {
                let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
                v.insert(Entry {
                    offset: AtomicU64::new(offset),
                    version,
                    epoch,
                    touched: AtomicU16::new(now),
                });
                self.count.fetch_add(1, Ordering::Relaxed);
                Ok(Epoch(epoch))
            }
        }
    }

    fn advance(&self, key: &SessionKey, epoch: Epoch, offset: u64) -> bool {
        let Some(e) = self.map.get(key) else {
            return false;
        };
        if e.epoch != epoch.0 {
            return false;
        }
        e.offset.fetch_max(offset, Ordering::AcqRel);
        e.touched.store(self.now(), Ordering::Relaxed);
        true
    }

    fn expire(&self) -> usize {
        let now = self.now();
        let ttl = self.ttl_units;
        let mut removed = 0usize;
        self.map.retain(|_, e| {
            let keep = now.wrapping_sub(e.touched.load(Ordering::Relaxed)) <= ttl;
            removed += usize::from(!keep);
            keep
        });
        self.count.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

/// Interns served paths (relative to the root) into [`FileId`]s. Only paths that resolved to
/// an existing regular file are interned, so the table is bounded by the files that ever
/// existed under the root while the server ran (about 100 bytes each); ids are never reused,
/// so a session can never be mistaken for another file's.
#[derive(Debug, Default)]
pub struct FileIds {
    ids: DashMap<Arc<Path>, FileId>,
    next: AtomicU32,
}

impl FileIds {
    /// The id of `path`, assigning the next one on first sight.
    pub fn intern(&self, path: &Path) -> FileId {
        if let Some(id) = self.ids.get(path) {
            return *id;
        }
        *self
            .ids
            .entry(Arc::from(path))
            .or_insert_with(|| FileId(self.next.fetch_add(1, Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdAuthority;

    fn key(n: u32) -> SessionKey {
        SessionKey::new(IdAuthority::new(b"t").mint(), FileId(n))
    }

    #[test]
    fn begin_then_advance_within_epoch() {
        let store = MemoryStore::new(10, Duration::from_secs(60));
        let k = key(1);
        let e = store.begin(k, 7, 100).unwrap();
        assert!(store.advance(&k, e, 150));
        assert!(store.advance(&k, e, 120), "accepted but does not move back");
        assert_eq!(
            store.get(&k),
            Some(Progress {
                offset: 150,
                version: 7,
                epoch: e
            })
        );
    }

    #[test]
    fn stale_epoch_cannot_move_successor() {
        let store = MemoryStore::new(10, Duration::from_secs(60));
        let k = key(1);
        let old = store.begin(k, 7, 0).unwrap();
        let new = store.begin(k, 7, 500).unwrap();
        assert_ne!(old, new);
        assert!(!store.advance(&k, old, 900));
        assert_eq!(store.get(&k).unwrap().offset, 500);
        // A declared position may move backwards: a new epoch is the client's word.
        let restart = store.begin(k, 7, 0).unwrap();
        assert!(store.advance(&k, restart, 10));
        assert_eq!(store.get(&k).unwrap().offset, 10);
    }

    #[test]
    fn cap_refuses_new_keys_but_not_existing() {
        let store = MemoryStore::new(2, Duration::from_secs(60));
        let (a, b, c) = (key(1), key(2), key(3));
        store.begin(a, 1, 0).unwrap();
        store.begin(b, 1, 0).unwrap();
        assert_eq!(store.begin(c, 1, 0), Err(StoreFull { cap: 2 }));
        assert!(store.begin(a, 1, 5).is_ok());
    }

    #[test]
    fn expiry_drops_only_idle_sessions() {
        let store = MemoryStore::new(10, Duration::ZERO);
        let k = key(1);
        store.begin(k, 1, 0).unwrap();
        assert_eq!(
            store.expire(),
            0,
            "touched this second: not idle for longer than 0 s"
        );
        let store = MemoryStore {
            origin: Instant::now() - Duration::from_secs(5),
            ..MemoryStore::new(10, Duration::from_secs(2))
        };
        store.map.insert(
            k,
            Entry {
                offset: AtomicU64::new(0),
                version: 1,
                epoch: 0,
                touched: AtomicU16::new(0),
            },
        );
        store.count.fetch_add(1, Ordering::Relaxed);
        store.begin(key(2), 1, 0).unwrap();
        assert_eq!(store.expire(), 1);
        assert!(store.get(&k).is_none());
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn interning_is_stable() {
        let ids = FileIds::default();
        let a = ids.intern(Path::new("a/b.txt"));
        let b = ids.intern(Path::new("c"));
        assert_ne!(a, b);
        assert_eq!(ids.intern(Path::new("a/b.txt")), a);
    }
}
