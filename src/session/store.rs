//! The store stack the façade talks to: the table, and behind it, for a durable or shared
//! store, a backend fed by the write-behind layer. Reads are answered by the table when it
//! holds the key and by the backend on a miss; progress always goes to the table first.

use super::backend::{Backend, BeginError, StoreError};
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
    /// Counts failed reads and expiries (the writer counts its batches).
    metrics: StoreMetrics,
}

impl Store {
    /// Records in memory only: the table is the whole store (`--store memory`).
    pub fn memory(cap: usize, ttl: Duration, clock: Arc<dyn Clock>) -> Store {
        Store {
            table: Table::new(cap, ttl, clock, false),
            writer: None,
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
            metrics: StoreMetrics::default(),
        }
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

    /// Begins a new epoch for `key` at `offset` of `version`.
    pub async fn begin(
        &self,
        key: SessionKey,
        version: u32,
        offset: u64,
    ) -> Result<Epoch, BeginError> {
        let epoch = self.table.begin(key, version, offset)?;
        if let Some(w) = &self.writer {
            // A new epoch may move the offset backwards (a declared position): write it soon.
            w.wake();
        }
        Ok(epoch)
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
                w.wake();
            }
        }
        applied
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
            Some(w) => w.flush(&self.table).await,
            None => Ok(0),
        }
    }

    /// Forgets sessions idle for longer than the TTL (in the table and in the backend), and
    /// lets records of an exclusive durable store that are idle and written leave memory.
    pub async fn expire(&self) -> usize {
        let mut expired = self.table.expire();
        if let Some(w) = &self.writer {
            if w.backend().exclusive() {
                self.table.evict_clean(CACHE_IDLE);
            }
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
