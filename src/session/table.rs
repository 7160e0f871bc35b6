//! The session table: every record this process holds, in a sharded map of 32-byte slots. It is
//! the whole store for `--store memory` and the hot layer in front of a durable or shared
//! backend. Synchronous and cheap: the request path and the sending loop call it directly.
//!
//! Methods return copies and never hand out guards, so no map lock is held across an `.await`
//! or across a second call into the map.

use super::backend::{BeginError, Expect};
use super::clock::Clock;
use super::key::{Ended, Epoch, Record, SessionKey};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The table is at its session cap and the key is new.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the session store holds its maximum of {cap} sessions")]
pub struct Full {
    pub cap: usize,
}

/// Bits of [`Slot::meta`].
const TOUCHED_BITS: u16 = 13;
const TOUCHED_MASK: u16 = (1 << TOUCHED_BITS) - 1;
const ENDED_SHIFT: u16 = 13;
const ENDED_MASK: u16 = 0b11 << ENDED_SHIFT;
const DIRTY: u16 = 1 << 15;
/// A TTL spans at most this many touch units, so the 13-bit stamp wraps only after two TTLs
/// (the sweeper, running 16 times per TTL, removes idle slots long before).
const UNITS_PER_TTL: u64 = 1 << (TOUCHED_BITS - 1);

/// One record: 16 bytes, so a map slot (key and value) is 32. The offset and `meta` are atomics
/// so progress needs only a shard's read lock; the epoch and version change only under its
/// write lock, in `begin`.
#[derive(Debug)]
struct Slot {
    offset: AtomicU64,
    version: u32,
    epoch: u16,
    /// Bit 15: changed since the write-behind layer last took it. Bits 13-14: [`Ended`]. Bits
    /// 0-12: when the record was last begun or advanced, in touch units, wrapping.
    meta: AtomicU16,
}

impl Slot {
    fn record(&self) -> Record {
        let meta = self.meta.load(Ordering::Acquire);
        Record {
            offset: self.offset.load(Ordering::Acquire),
            version: self.version,
            epoch: Epoch(self.epoch),
            ended: Ended::from_bits(((meta & ENDED_MASK) >> ENDED_SHIFT) as u8),
        }
    }
}

/// The sharded map of sessions, with a cap, idle expiry and (for write-behind) the list of
/// records changed since they were last taken.
#[derive(Debug)]
pub struct Table {
    map: crate::ConcurrentMap<SessionKey, Slot>,
    /// Sessions held; kept beside the map because counting a DashMap takes every shard's lock.
    count: AtomicUsize,
    /// First epoch of the next new record: a record re-created after expiry must not start at
    /// an epoch a sender of the expired one still holds.
    next_epoch: AtomicU16,
    cap: usize,
    /// The TTL in touch units.
    ttl_units: u16,
    /// Seconds per touch unit: 1 for TTLs up to about 68 minutes, more for longer ones.
    unit_secs: u64,
    clock: Arc<dyn Clock>,
    /// Whether changes are listed for a write-behind layer (off for `--store memory`, where
    /// the table is the whole store and listing would be wasted work).
    track_dirty: bool,
    /// Keys whose dirty bit went from clear to set, each listed once until taken, with the
    /// record as it was just before (what the backend holds; `None` for a new record or after a
    /// failed write), so an unchanged record need not be written again.
    dirty: Mutex<Vec<Dirty>>,
}

/// A key listed for the write-behind layer.
#[derive(Debug, Clone, Copy)]
struct Dirty {
    key: SessionKey,
    /// The record as the backend holds it (`None`: new, or its write failed).
    before: Option<Record>,
    /// When it was listed.
    since: std::time::Instant,
}

impl Table {
    /// A table of at most `cap` sessions that forgets those idle for longer than `ttl`.
    pub fn new(cap: usize, ttl: Duration, clock: Arc<dyn Clock>, track_dirty: bool) -> Self {
        let unit_secs = ttl.as_secs().div_ceil(UNITS_PER_TTL).max(1);
        Table {
            map: crate::ConcurrentMap::default(),
            count: AtomicUsize::new(0),
            next_epoch: AtomicU16::new(rand::random()),
            cap,
            ttl_units: u16::try_from(ttl.as_secs().div_ceil(unit_secs)).unwrap_or(u16::MAX),
            unit_secs,
            clock,
            track_dirty,
            dirty: Mutex::new(Vec::new()),
        }
    }

    /// The current time in touch units, wrapping at 13 bits.
    fn stamp(&self) -> u16 {
        ((self.clock.now() / self.unit_secs) as u16) & TOUCHED_MASK
    }

    /// The clock the table expires by.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// A copy of the record for `key`.
    pub fn get(&self, key: &SessionKey) -> Option<Record> {
        self.map.get(key).map(|s| s.record())
    }

    /// Starts a new owner of `key` at `offset` of `version` (creating the record if needed,
    /// unless the table is full) and returns its epoch.
    pub fn begin(&self, key: SessionKey, version: u32, offset: u64) -> Result<Epoch, Full> {
        match self.begin_with(key, version, offset, None, Expect::Any) {
            Ok(e) => Ok(e),
            Err(BeginError::Full(f)) => Err(f),
            // Expect::Any always holds, and the table has no other failure.
            Err(_) => unreachable!("a begin expecting anything cannot conflict"),
        }
    }

    /// Like [`Table::begin`], only if the record's current epoch is what `expect` says
    /// (checked under the same lock as the begin).
    pub fn begin_if(
        &self,
        key: SessionKey,
        version: u32,
        offset: u64,
        expect: Expect,
    ) -> Result<Epoch, BeginError> {
        self.begin_with(key, version, offset, None, expect)
    }

    /// Like [`Table::begin`], with the epoch chosen elsewhere (a shared store began it).
    pub fn begin_at(
        &self,
        key: SessionKey,
        epoch: Epoch,
        version: u32,
        offset: u64,
    ) -> Result<Epoch, Full> {
        match self.begin_with(key, version, offset, Some(epoch), Expect::Any) {
            Ok(e) => Ok(e),
            Err(BeginError::Full(f)) => Err(f),
            Err(_) => unreachable!("a begin expecting anything cannot conflict"),
        }
    }

    fn begin_with(
        &self,
        key: SessionKey,
        version: u32,
        offset: u64,
        epoch: Option<Epoch>,
        expect: Expect,
    ) -> Result<Epoch, BeginError> {
        let meta = self.stamp() | ((Ended::Sending.bits() as u16) << ENDED_SHIFT);
        // Racy by a few entries under concurrency: the cap bounds memory, it is not an exact
        // quota.
        let at_cap = self.count.load(Ordering::Relaxed) >= self.cap;
        let mut before = None;
        let (epoch, newly_dirty) = match self.map.entry(key) {
            dashmap::Entry::Occupied(mut o) => {
                let s = o.get_mut();
                if !expect.holds(Some(Epoch(s.epoch))) {
                    return Err(BeginError::Conflict);
                }
                before = Some(s.record());
                s.epoch = epoch.map_or(s.epoch.wrapping_add(1), |e| e.0);
                s.version = version;
                *s.offset.get_mut() = offset;
                let old = *s.meta.get_mut();
                *s.meta.get_mut() = meta | self.dirty_bit();
                (Epoch(s.epoch), old & DIRTY == 0)
            }
            dashmap::Entry::Vacant(_) if !expect.holds(None) => return Err(BeginError::Conflict),
            dashmap::Entry::Vacant(_) if at_cap => {
                return Err(BeginError::Full(Full { cap: self.cap }))
            }
            dashmap::Entry::Vacant(v) => {
                let e =
                    epoch.map_or_else(|| self.next_epoch.fetch_add(1, Ordering::Relaxed), |e| e.0);
                v.insert(Slot {
                    offset: AtomicU64::new(offset),
                    version,
                    epoch: e,
                    meta: AtomicU16::new(meta | self.dirty_bit()),
                });
                self.count.fetch_add(1, Ordering::Relaxed);
                (Epoch(e), true)
            }
        };
        if newly_dirty && self.track_dirty {
            self.list_dirty(key, before);
        }
        Ok(epoch)
    }

    /// Stores `record` as it is (creating or replacing the slot): how an exclusive store's
    /// writer hands over its snapshot. Not dirty, and not subject to the cap (the writer's own
    /// table admitted it).
    pub fn put(&self, key: SessionKey, record: Record) {
        let meta = self.stamp() | ((record.ended.bits() as u16) << ENDED_SHIFT);
        let slot = Slot {
            offset: AtomicU64::new(record.offset),
            version: record.version,
            epoch: record.epoch.0,
            meta: AtomicU16::new(meta),
        };
        if self.map.insert(key, slot).is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn dirty_bit(&self) -> u16 {
        if self.track_dirty {
            DIRTY
        } else {
            0
        }
    }

    fn list_dirty(&self, key: SessionKey, before: Option<Record>) {
        if self.track_dirty {
            // A poisoned lock only means another thread panicked while pushing: the list is
            // still a valid Vec.
            self.dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Dirty {
                    key,
                    before,
                    since: std::time::Instant::now(),
                });
        }
    }

    /// Records that the owner `epoch` has `offset` bytes confirmed. Ignored (false) if another
    /// owner began since; never moves the offset backwards within an epoch.
    pub fn advance(&self, key: &SessionKey, epoch: Epoch, offset: u64) -> bool {
        let newly_dirty = {
            let Some(s) = self.map.get(key) else {
                return false;
            };
            if s.epoch != epoch.0 {
                return false;
            }
            let previous = s.offset.fetch_max(offset, Ordering::AcqRel);
            let record = s.record();
            self.touch(&s, previous < offset).then_some(Record {
                offset: previous,
                ..record
            })
        };
        if let Some(before) = newly_dirty {
            self.list_dirty(*key, Some(before));
        }
        true
    }

    /// Records how the owner `epoch` stopped sending. Ignored (false) for another epoch.
    pub fn end(&self, key: &SessionKey, epoch: Epoch, ended: Ended) -> bool {
        let newly_dirty = {
            let Some(s) = self.map.get(key) else {
                return false;
            };
            if s.epoch != epoch.0 {
                return false;
            }
            let bits = (ended.bits() as u16) << ENDED_SHIFT;
            let old = s
                .meta
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
                    Some((m & !ENDED_MASK) | bits | self.dirty_bit())
                })
                .unwrap_or_else(|m| m);
            (self.track_dirty && old & DIRTY == 0).then(|| Record {
                ended: Ended::from_bits(((old & ENDED_MASK) >> ENDED_SHIFT) as u8),
                ..s.record()
            })
        };
        if let Some(before) = newly_dirty {
            self.list_dirty(*key, Some(before));
        }
        true
    }

    /// Refreshes the touch stamp (one load when it is current) and, if `changed`, sets the
    /// dirty bit. True when the bit was newly set: the caller lists the key.
    fn touch(&self, s: &Slot, changed: bool) -> bool {
        let now = self.stamp();
        let dirty = if changed { self.dirty_bit() } else { 0 };
        let m = s.meta.load(Ordering::Relaxed);
        if m & TOUCHED_MASK == now && m & dirty == dirty {
            return false;
        }
        let old = s
            .meta
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |m| {
                Some((m & !TOUCHED_MASK) | now | dirty)
            })
            .unwrap_or_else(|m| m);
        dirty != 0 && old & DIRTY == 0
    }

    /// Puts a record read from a backend into the table (a cache fill), unless the table
    /// already holds the key, and returns what the table holds. Not dirty: the backend has it.
    /// `touched`: when it was last touched, in clock seconds (its age is kept, so it expires
    /// when it would have).
    pub fn fill(&self, key: SessionKey, record: Record, touched: u64) -> Record {
        let stamp = ((touched.min(self.clock.now()) / self.unit_secs) as u16) & TOUCHED_MASK;
        let meta = stamp | ((record.ended.bits() as u16) << ENDED_SHIFT);
        match self.map.entry(key) {
            dashmap::Entry::Occupied(o) => o.get().record(),
            dashmap::Entry::Vacant(v) => {
                v.insert(Slot {
                    offset: AtomicU64::new(record.offset),
                    version: record.version,
                    epoch: record.epoch.0,
                    meta: AtomicU16::new(meta),
                });
                self.count.fetch_add(1, Ordering::Relaxed);
                record
            }
        }
    }

    /// Takes every record changed since the last call: the dirty bit is cleared before the
    /// record is read, so a change racing with this is listed again, never lost. A record whose
    /// offset, version and end are back to what they were when it became dirty (a session begun
    /// again and finished again between two flushes) is left out: the backend holds it already.
    /// (Its epoch may differ; an exclusive store needs no epoch across restarts, and a shared
    /// store began it itself.)
    ///
    /// With `young` (a store this process alone writes), a record whose epoch began since the
    /// backend's copy, that is still sending and was listed less than `young` ago, stays listed
    /// for a later batch: a short download usually ends within it, its record back to the
    /// stored state, and then costs no write at all. Under load (every request a new epoch of a
    /// finished session, settled in batches) this keeps the disk store from writing every
    /// request twice. A download still sending after `young` is written, and from then on
    /// with every batch.
    pub fn take_dirty(&self, young: Option<Duration>) -> Vec<(SessionKey, Record)> {
        let listed = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        let mut passed = Vec::new();
        let taken = listed
            .into_iter()
            .filter_map(|d| {
                let s = self.map.get(&d.key)?;
                if let Some(young) = young {
                    let now = s.record();
                    let new_epoch = d.before.is_some_and(|b| b.epoch != now.epoch);
                    if new_epoch && now.ended == Ended::Sending && d.since.elapsed() < young {
                        // Still dirty: no change can list it twice meanwhile.
                        passed.push(d);
                        return None;
                    }
                }
                s.meta.fetch_and(!DIRTY, Ordering::AcqRel);
                let now = s.record();
                let unchanged = d.before.is_some_and(|b| {
                    (b.offset, b.version, b.ended) == (now.offset, now.version, now.ended)
                });
                (!unchanged).then_some((d.key, now))
            })
            .collect();
        if !passed.is_empty() {
            self.dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(passed);
        }
        taken
    }

    /// Lists `key` as dirty again (its write to the backend failed).
    pub fn redirty(&self, key: SessionKey) {
        let newly = self
            .map
            .get(&key)
            .is_some_and(|s| s.meta.fetch_or(self.dirty_bit(), Ordering::AcqRel) & DIRTY == 0);
        if newly {
            self.list_dirty(key, None);
        }
    }

    /// Drops sessions untouched for longer than the TTL; returns how many. A dirty record is
    /// kept until the write-behind layer has taken it.
    pub fn expire(&self) -> usize {
        self.remove_idle(self.ttl_units)
    }

    /// Drops records that are untouched for longer than `idle` and have nothing waiting to be
    /// written (a cache in front of a durable store forgets what it can read again).
    pub fn evict_clean(&self, idle: Duration) -> usize {
        let units = u16::try_from(idle.as_secs().div_ceil(self.unit_secs))
            .unwrap_or(u16::MAX)
            .min(self.ttl_units);
        self.remove_idle(units)
    }

    fn remove_idle(&self, units: u16) -> usize {
        let now = self.stamp();
        let mut removed = 0usize;
        self.map.retain(|_, s| {
            let m = s.meta.load(Ordering::Relaxed);
            let idle = now.wrapping_sub(m & TOUCHED_MASK) & TOUCHED_MASK;
            let keep = idle <= units || m & DIRTY != 0;
            removed += usize::from(!keep);
            keep
        });
        self.count.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Number of sessions held.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most sessions the table admits.
    pub fn cap(&self) -> usize {
        self.cap
    }
}
