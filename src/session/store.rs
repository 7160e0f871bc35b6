//! The store stack the façade talks to: the table, and behind it, for a durable or shared
//! store, a backend fed by the write-behind layer. Progress always goes to the table first.
//!
//! In front of a store this process alone writes (disk), the table is the truth: reads are
//! answered by the table when it holds the key and by the backend on a miss, and begins happen
//! in the table. In front of a store shared by a fleet (Redis), the table is only this node's
//! view: another node may have moved any session since. A server-resumed begin therefore
//! happens in the store, atomically (it reads where the client stands and begins there), and
//! reads ask the store first. A begin the store need not decide (a position the client
//! declared) happens here and reaches the store with the next batch, as does every begin made
//! while the store is unreachable.

use super::backend::{Backend, BeginError, Local, ResumeAsk, Resumed, SharedStore, StoreError};
use super::clock::Clock;
use super::key::{Ended, Epoch, Record, SessionKey};
use super::table::Table;
use super::writebehind::WriteBehind;
use crate::ops::metrics::StoreMetrics;
use crate::throttle::LogThrottle;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A record in front of a durable store that nobody touched for this long leaves memory (it is
/// read back on its next request), so memory holds the sessions in use, not every session of
/// the last day.
pub const CACHE_IDLE: Duration = Duration::from_secs(600);

/// At most one warning a second for failed reads.
static READ_FAILURES: LogThrottle = LogThrottle::new();

/// The table plus an optional backend behind it.
#[derive(Debug)]
pub struct Store {
    table: Table,
    writer: Option<WriteBehind>,
    /// The backend as a store shared by a fleet, when it is one.
    shared: Option<Arc<dyn SharedStore>>,
    /// Counts failed reads and expiries (the writer counts its batches).
    metrics: StoreMetrics,
}

impl Store {
    /// Records in memory only: the table is the whole store (`--store memory`).
    pub fn memory(cap: usize, ttl: Duration, clock: Arc<dyn Clock>) -> Store {
        Store {
            table: Table::new(cap, ttl, clock, false),
            writer: None,
            shared: None,
            metrics: StoreMetrics::default(),
        }
    }

    /// The table in front of `backend`, written behind every `flush_interval`.
    pub fn with_backend(
        backend: Arc<dyn Backend>,
        cap: usize,
        ttl: Duration,
        clock: Arc<dyn Clock>,
        flush_interval: Duration,
    ) -> Store {
        Store {
            table: Table::new(cap, ttl, clock, true),
            writer: Some(WriteBehind::new(backend, flush_interval)),
            shared: None,
            metrics: StoreMetrics::default(),
        }
    }

    /// The table in front of a store shared by a fleet, written behind every `flush_interval`.
    pub fn with_shared(
        backend: Arc<dyn SharedStore>,
        cap: usize,
        ttl: Duration,
        clock: Arc<dyn Clock>,
        flush_interval: Duration,
    ) -> Store {
        let as_backend: Arc<dyn Backend> = backend.clone();
        Store {
            table: Table::new(cap, ttl, clock, true),
            writer: Some(WriteBehind::new(as_backend, flush_interval)),
            shared: Some(backend),
            metrics: StoreMetrics::default(),
        }
    }

    /// The store shared by a fleet, if this is one.
    pub fn shared(&self) -> Option<&Arc<dyn SharedStore>> {
        self.shared.as_ref()
    }

    /// Counts into `metrics` from now on (a server's registry).
    pub fn observe(&mut self, metrics: StoreMetrics) {
        if let Some(w) = &mut self.writer {
            w.observe(metrics.clone());
        }
        self.metrics = metrics;
    }

    /// `Ok` while the store can be reached and written: the backend says it is up and the last
    /// batch was committed. A memory store always is.
    pub fn health(&self) -> Result<(), StoreError> {
        let Some(w) = &self.writer else {
            return Ok(());
        };
        w.backend().health()?;
        w.health()
    }

    /// The table (tests and the sweeper look inside).
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The backend behind the table, if any.
    pub fn backend(&self) -> Option<&Arc<dyn Backend>> {
        self.writer.as_ref().map(WriteBehind::backend)
    }

    /// The record for `key`: from the table, or read from the backend on a miss (and kept in
    /// the table, which is the truth for an exclusive store from then on). A backend that
    /// cannot be read counts as holding no record: the client starts over (a repeat, never a
    /// gap) rather than failing, and the failure is logged once a second.
    pub async fn get(&self, key: SessionKey) -> Result<Option<Record>, StoreError> {
        if let Some(shared) = &self.shared {
            return Ok(self.get_shared(shared.as_ref(), key).await);
        }
        if let Some(r) = self.table.get(&key) {
            return Ok(Some(r));
        }
        let Some(w) = &self.writer else {
            return Ok(None);
        };
        match w.backend().read(key).await {
            Ok(Some(stored)) => Ok(Some(self.table.fill(key, stored.record, stored.touched))),
            Ok(None) => Ok(None),
            Err(e) => {
                self.metrics.error();
                if let Some(suppressed) = READ_FAILURES.admit() {
                    tracing::warn!(error = %e, suppressed, "cannot read a session; serving it from byte 0");
                }
                Ok(None)
            }
        }
    }

    /// The file version `key`'s record refers to (a `Range` request checks that the client's
    /// partial copy is of the current file). For a shared store, this node's own record
    /// answers when it has one, without a round trip to Redis: a version changes only when the
    /// file does, and every node serves the same files (docs/DEPLOYMENT.md); a stale answer
    /// only makes the client get the whole file again.
    pub async fn version(&self, key: SessionKey) -> Result<Option<u32>, StoreError> {
        if self.shared.is_some() {
            if let Some(r) = self.table.get(&key) {
                return Ok(Some(r.version));
            }
        }
        Ok(self.get(key).await?.map(|r| r.version))
    }

    /// A record of a shared store as this node should see it: the store's, unless this node
    /// holds newer progress of the same epoch, or an epoch it began and has not written yet.
    /// When the store cannot be asked (unreachable, or slow), this node's own record.
    async fn get_shared(&self, shared: &dyn SharedStore, key: SessionKey) -> Option<Record> {
        let mine = self.table.get(&key);
        let unwritten = mine.filter(|r| self.unwritten(key, r.epoch));
        if unwritten.is_some() {
            return unwritten;
        }
        match shared.holding(key).await {
            Ok(Some(h)) => {
                let stored = h.stored.record;
                match mine {
                    Some(m)
                        if m.epoch == stored.epoch
                            && h.holder.as_deref() == Some(shared.node()) =>
                    {
                        Some(Record {
                            offset: m.offset.max(stored.offset),
                            ..m
                        })
                    }
                    _ => Some(stored),
                }
            }
            Ok(None) => None,
            Err(e) => {
                if let Some(suppressed) = READ_FAILURES.admit() {
                    tracing::debug!(error = %e, suppressed, "cannot read a session from the shared store; using this node's record");
                }
                mine
            }
        }
    }

    /// True when `epoch` of `key` was begun here and the shared store has not been told yet.
    pub fn unwritten(&self, key: SessionKey, epoch: Epoch) -> bool {
        self.writer
            .as_ref()
            .is_some_and(|w| w.is_unwritten(key, epoch))
    }

    /// The record as this node holds it, without asking a shared store.
    pub fn local(&self, key: SessionKey) -> Option<Record> {
        self.table.get(&key)
    }

    /// Begins a new epoch for `key` at `offset` of `version`, in this process: the table is
    /// the truth for an exclusive store; a shared store learns of it with the next batch.
    pub async fn begin(
        &self,
        key: SessionKey,
        version: u32,
        offset: u64,
    ) -> Result<Epoch, BeginError> {
        let epoch = self.table.begin(key, version, offset)?;
        if let Some(w) = &self.writer {
            if self.shared.is_some() {
                // Written with the next regular batch: several begins of one session in a flush
                // interval (a client's successive Range requests) then cost one write. Another
                // node learns of it no later than that, and meanwhile a takeover from it waits
                // for this node (which answers for its newest sender).
                w.begun_here(key, epoch);
            } else {
                // A new epoch may move the offset backwards (a declared position): write it
                // soon.
                w.wake();
            }
        }
        Ok(epoch)
    }

    /// A server-resumed begin in the shared store: where the client stands and the new epoch,
    /// decided atomically by the store from its record and this node's newer knowledge of it.
    /// On success the table takes the record as the store now holds it.
    pub async fn resume_shared(
        &self,
        shared: &dyn SharedStore,
        key: SessionKey,
        version: u32,
        length: u64,
        expect: Option<Epoch>,
    ) -> Result<Resumed, BeginError> {
        let local = match self.table.get(&key) {
            None => Local::None,
            Some(r) if self.unwritten(key, r.epoch) => Local::Begun(r),
            Some(r) => Local::Registered(r),
        };
        let ask = ResumeAsk {
            version,
            length,
            expect,
            local,
        };
        let resumed = shared.resume(key, ask).await?;
        if let Resumed::Began { epoch, start } = resumed {
            self.table.put(
                key,
                Record {
                    offset: start,
                    version,
                    epoch,
                    ended: Ended::Sending,
                },
            );
        }
        Ok(resumed)
    }

    /// Records progress of the sender owning `epoch` (memory only; written behind).
    pub fn advance(&self, key: &SessionKey, epoch: Epoch, offset: u64) -> bool {
        self.table.advance(key, epoch, offset)
    }

    /// Records how the sender owning `epoch` stopped (written behind promptly).
    pub fn end(&self, key: &SessionKey, epoch: Epoch, ended: Ended) -> bool {
        let applied = self.table.end(key, epoch, ended);
        if applied {
            if let Some(w) = &self.writer {
                // In a fleet, a sender stopped for a takeover is awaited by another node: write
                // at once. A body delivered whole is not: the next regular batch carries it
                // (with the begin of the same request, most often: one write for both).
                if self.shared.is_none() || ended != Ended::Clean {
                    w.wake();
                }
            }
        }
        applied
    }

    /// Writes `key`'s record to the backend again with the next batch (a fleet node asked for
    /// this node's final record of it).
    pub fn rewrite(&self, key: SessionKey) {
        if let Some(w) = &self.writer {
            self.table.redirty(key);
            w.wake();
        }
    }

    /// Runs the write-behind layer until `stop` (then flushes once more and closes the backend);
    /// returns at once for a memory store.
    pub async fn run_writer(&self, stop: CancellationToken) {
        if let Some(w) = &self.writer {
            w.run(&self.table, stop).await;
            if let Err(e) = w.backend().close().await {
                tracing::warn!(error = %e, "closing the session store");
            }
        }
    }

    /// Writes every change to the backend now.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        match &self.writer {
            Some(w) => w.flush(&self.table, true).await,
            None => Ok(0),
        }
    }

    /// Forgets sessions idle for longer than the TTL (in the table and in the backend), and
    /// lets records that are idle and written leave memory (an exclusive store reads them back
    /// on their next request; a shared store is asked anyway).
    pub async fn expire(&self) -> usize {
        let mut expired = self.table.expire();
        if let Some(w) = &self.writer {
            self.table.evict_clean(CACHE_IDLE);
            w.forget_unwritten_not_in(&self.table);
            match w.backend().expire().await {
                Ok(n) => expired = expired.max(n),
                Err(e) => {
                    self.metrics.error();
                    tracing::warn!(error = %e, "cannot expire stored sessions");
                }
            }
        }
        expired
    }

    /// Sessions held (by the backend when there is one).
    pub fn len(&self) -> usize {
        match &self.writer {
            Some(w) => w.backend().len().max(self.table.len()),
            None => self.table.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
