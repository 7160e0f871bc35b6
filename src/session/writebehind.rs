//! Write-behind: records change in the table on the hot path, and a writer takes the changed
//! ones in batches and commits them to the backend off the hot path (group commit: one sync per
//! batch in a durable store). A failed batch is listed again and retried at the next tick; the
//! table keeps serving meanwhile.
//!
//! For a store shared by a fleet, the writer also remembers which epochs this node began by
//! itself: their records go out as [`Report::Begun`] (the store takes them as this node's),
//! every later change as [`Report::Progress`] (fenced by the store).

use super::backend::{Backend, Report, StoreError};
use super::key::{Epoch, SessionKey};
use super::table::Table;
use crate::ops::metrics::StoreMetrics;
use dashmap::DashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Batches the table's changes into a backend.
#[derive(Debug)]
pub struct WriteBehind {
    backend: Arc<dyn Backend>,
    /// Longest time a change waits in memory.
    interval: Duration,
    /// Shortest time between two flushes, however often the writer is woken: a prompt flush
    /// must not turn into one commit per request under load.
    min_gap: Duration,
    wake: Notify,
    /// Failed flushes in the current burst (0: writing works).
    failures: std::sync::atomic::AtomicU64,
    /// Shared stores: epochs begun here that the store has not taken yet.
    unwritten: DashMap<SessionKey, Epoch>,
    /// Why the last flush failed, while `failures` > 0.
    last_error: Mutex<Option<String>>,
    metrics: StoreMetrics,
}

impl WriteBehind {
    /// A writer committing to `backend` at least every `interval`.
    pub fn new(backend: Arc<dyn Backend>, interval: Duration) -> Self {
        WriteBehind {
            backend,
            interval,
            min_gap: interval / 8,
            wake: Notify::new(),
            failures: std::sync::atomic::AtomicU64::new(0),
            unwritten: DashMap::new(),
            last_error: Mutex::new(None),
            metrics: StoreMetrics::default(),
        }
    }

    /// Notes that this node began `epoch` of `key` without the shared store.
    pub fn begun_here(&self, key: SessionKey, epoch: Epoch) {
        self.unwritten.insert(key, epoch);
    }

    /// True when `epoch` of `key` was begun here and not written yet.
    pub fn is_unwritten(&self, key: SessionKey, epoch: Epoch) -> bool {
        self.unwritten.get(&key).is_some_and(|e| *e == epoch)
    }

    /// Forgets begun epochs the table no longer holds (a newer epoch replaced it, or the
    /// record left memory), so the list stays as long as the table at most.
    pub fn forget_unwritten_not_in(&self, table: &Table) {
        self.unwritten
            .retain(|key, epoch| table.get(key).is_some_and(|r| r.epoch == *epoch));
    }

    /// Times batches and counts failures into `metrics`.
    pub fn observe(&mut self, metrics: StoreMetrics) {
        self.metrics = metrics;
    }

    /// `Ok` unless the last flush failed (then its error).
    pub fn health(&self) -> Result<(), StoreError> {
        if self.failing() == 0 {
            return Ok(());
        }
        let why = self
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "writing sessions fails".into());
        Err(StoreError(why))
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Asks for a flush now rather than at the next tick (a new epoch, a finished session).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Commits what the table changed since the last flush; returns how many records. On
    /// failure the records are listed again, so the next flush retries them. Unless `all`, an
    /// exclusive store's new epochs still sending wait up to one flush interval
    /// ([`Table::take_dirty`]); the writer's regular batches pass `false`, its last one and
    /// [`Store::flush`](super::store::Store::flush) `true`.
    pub async fn flush(&self, table: &Table, all: bool) -> Result<usize, StoreError> {
        let exclusive = self.backend.exclusive();
        let taken = table.take_dirty((exclusive && !all).then_some(self.interval));
        if taken.is_empty() {
            return Ok(0);
        }
        let batch: Vec<Report> = taken
            .iter()
            .map(|&(key, record)| {
                if exclusive {
                    Report::Snapshot { key, record }
                } else if self.is_unwritten(key, record.epoch) {
                    Report::Begun { key, record }
                } else {
                    Report::Progress {
                        key,
                        epoch: record.epoch,
                        offset: record.offset,
                        ended: record.ended,
                    }
                }
            })
            .collect();
        let started = std::time::Instant::now();
        let committed = self.backend.commit(batch).await;
        self.metrics.flushed(started.elapsed());
        match committed {
            Ok(_) => {
                if !exclusive {
                    for (key, record) in &taken {
                        self.unwritten.remove_if(key, |_, e| *e == record.epoch);
                    }
                }
                Ok(taken.len())
            }
            Err(e) => {
                self.metrics.error();
                for (key, _) in taken {
                    table.redirty(key);
                }
                Err(e)
            }
        }
    }

    /// Flushes every `interval`, or when woken (at most every `min_gap`), until `stop`; then
    /// once more, so what the last connections recorded reaches the backend.
    pub async fn run(&self, table: &Table, stop: CancellationToken) {
        let mut last = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(last + self.interval) => {}
                () = self.wake.notified() => {
                    tokio::select! {
                        () = tokio::time::sleep_until(last + self.min_gap) => {}
                        () = stop.cancelled() => break,
                    }
                }
                () = stop.cancelled() => break,
            }
            last = Instant::now();
            self.report(self.flush(table, false).await);
        }
        self.report(self.flush(table, true).await);
    }

    /// Logs the first failure of a burst, and the recovery with how many flushes failed in
    /// between: one line each, however long the disk stays full.
    fn report(&self, result: Result<usize, StoreError>) {
        use std::sync::atomic::Ordering::Relaxed;
        match result {
            Ok(_) => {
                let failed = self.failures.swap(0, Relaxed);
                if failed > 0 {
                    tracing::info!(
                        store = self.backend.name(),
                        failed_flushes = failed,
                        "session store writable again; the sessions kept in memory are written"
                    );
                }
            }
            Err(e) => {
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(e.0.clone());
                }
                if self.failures.fetch_add(1, Relaxed) == 0 {
                    tracing::warn!(
                        store = self.backend.name(),
                        error = %e,
                        "cannot write sessions; keeping them in memory and retrying every flush"
                    );
                }
            }
        }
    }

    /// Flushes in a row that failed (0 while writing works).
    pub fn failing(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::backend::{Begin, BeginError, BoxFuture, Committed, Stored};
    use crate::session::clock::ManualClock;
    use crate::session::contract::{key, T0};
    use crate::session::key::{Ended, Epoch, Record, SessionKey};
    use crate::session::memory::MemoryBackend;
    use crate::session::store::Store;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A memory backend whose next `failures` commits fail, counting the commits it took.
    #[derive(Debug)]
    struct Flaky {
        inner: MemoryBackend,
        failures: AtomicUsize,
        commits: AtomicUsize,
    }

    impl Backend for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn exclusive(&self) -> bool {
            true
        }
        fn read(&self, key: SessionKey) -> BoxFuture<'_, Result<Option<Stored>, StoreError>> {
            self.inner.read(key)
        }
        fn begin(&self, key: SessionKey, b: Begin) -> BoxFuture<'_, Result<Epoch, BeginError>> {
            self.inner.begin(key, b)
        }
        fn commit(&self, batch: Vec<Report>) -> BoxFuture<'_, Result<Committed, StoreError>> {
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Box::pin(std::future::ready(Err(StoreError("disk full".into()))));
            }
            self.commits.fetch_add(1, Ordering::SeqCst);
            self.inner.commit(batch)
        }
        fn expire(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
            self.inner.expire()
        }
        fn len(&self) -> usize {
            self.inner.len()
        }
    }

    fn flaky(failures: usize) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner: MemoryBackend::new(100, Duration::from_secs(3600), clock()),
            failures: AtomicUsize::new(failures),
            commits: AtomicUsize::new(0),
        })
    }

    fn clock() -> Arc<ManualClock> {
        Arc::new(ManualClock::at(T0))
    }

    fn store(backend: Arc<Flaky>, interval: Duration) -> Store {
        Store::with_backend(backend, 100, Duration::from_secs(3600), clock(), interval)
    }

    #[tokio::test]
    async fn changes_reach_the_backend_when_flushed() {
        let backend = flaky(0);
        let s = store(Arc::clone(&backend), Duration::from_secs(3600));
        let e = s.begin(key(1), 3, 10).await.unwrap();
        assert!(s.advance(&key(1), e, 50));
        assert_eq!(
            backend.inner.read(key(1)).await.unwrap(),
            None,
            "written behind"
        );
        assert_eq!(s.flush().await.unwrap(), 1);
        let stored = backend.inner.read(key(1)).await.unwrap().unwrap().record;
        assert_eq!((stored.offset, stored.version, stored.epoch), (50, 3, e));
        // Nothing changed since: nothing to write.
        assert_eq!(s.flush().await.unwrap(), 0);
        s.end(&key(1), e, Ended::Clean);
        assert_eq!(s.flush().await.unwrap(), 1);
        assert_eq!(
            backend
                .inner
                .read(key(1))
                .await
                .unwrap()
                .unwrap()
                .record
                .ended,
            Ended::Clean
        );
    }

    #[tokio::test]
    async fn a_failed_batch_is_kept_and_written_by_the_next_flush() {
        let backend = flaky(2);
        let s = store(Arc::clone(&backend), Duration::from_secs(3600));
        let e = s.begin(key(2), 1, 0).await.unwrap();
        s.advance(&key(2), e, 100);
        assert!(s.flush().await.is_err());
        s.advance(&key(2), e, 200);
        assert!(s.flush().await.is_err());
        assert_eq!(backend.inner.read(key(2)).await.unwrap(), None);
        // Serving goes on from memory meanwhile.
        assert_eq!(s.get(key(2)).await.unwrap().unwrap().offset, 200);
        assert_eq!(s.flush().await.unwrap(), 1);
        assert_eq!(
            backend
                .inner
                .read(key(2))
                .await
                .unwrap()
                .unwrap()
                .record
                .offset,
            200
        );
    }

    #[tokio::test]
    async fn a_miss_is_read_from_the_backend_and_kept() {
        let backend = flaky(0);
        let record = Record {
            offset: 77,
            version: 9,
            epoch: Epoch(5),
            ended: Ended::Network,
        };
        backend
            .inner
            .commit(vec![Report::Snapshot {
                key: key(3),
                record,
            }])
            .await
            .unwrap();
        // A new process: an empty table over the same store.
        let s = store(Arc::clone(&backend), Duration::from_secs(3600));
        assert_eq!(s.table().get(&key(3)), None);
        assert_eq!(s.get(key(3)).await.unwrap(), Some(record));
        assert_eq!(s.table().get(&key(3)), Some(record), "kept in the table");
        // The next begin continues the stored epochs.
        let e = s.begin(key(3), 9, 77).await.unwrap();
        assert_eq!(e, Epoch(6));
        assert_eq!(s.get(key(4)).await.unwrap(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_writer_flushes_when_woken_and_once_more_at_stop() {
        let backend = flaky(0);
        let s = Arc::new(store(Arc::clone(&backend), Duration::from_secs(3600)));
        let stop = CancellationToken::new();
        let writer = {
            let (s, stop) = (Arc::clone(&s), stop.clone());
            tokio::spawn(async move { s.run_writer(stop).await })
        };
        // A begin wakes the writer: written within the minimum gap, not the hour.
        let e = s.begin(key(5), 1, 0).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3600 / 8 + 1);
        while backend.inner.read(key(5)).await.unwrap().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "never flushed");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Progress alone waits for the tick; the stop flushes it.
        s.advance(&key(5), e, 42);
        stop.cancel();
        writer.await.unwrap();
        assert_eq!(
            backend
                .inner
                .read(key(5))
                .await
                .unwrap()
                .unwrap()
                .record
                .offset,
            42
        );
    }

    /// In the load tests every request begins an epoch on a finished session and finishes it
    /// again within microseconds: between two flushes the record is back where it was, and
    /// writing it again would cost the store a write per session per flush for nothing.
    #[tokio::test]
    async fn a_record_back_to_its_stored_state_is_not_written_again() {
        let backend = flaky(0);
        let s = store(Arc::clone(&backend), Duration::from_secs(3600));
        let e = s.begin(key(6), 1, 0).await.unwrap();
        s.advance(&key(6), e, 100);
        s.end(&key(6), e, Ended::Clean);
        assert_eq!(s.flush().await.unwrap(), 1);
        let e2 = s.begin(key(6), 1, 0).await.unwrap();
        s.advance(&key(6), e2, 100);
        s.end(&key(6), e2, Ended::Clean);
        assert_eq!(
            s.flush().await.unwrap(),
            0,
            "offset, version and end as stored"
        );
        assert_eq!(backend.commits.load(Ordering::SeqCst), 1);
        // A begin that is still in progress at the flush is written (it moved backwards).
        s.begin(key(6), 1, 0).await.unwrap();
        assert_eq!(s.flush().await.unwrap(), 1);
        let stored = backend.inner.read(key(6)).await.unwrap().unwrap().record;
        assert_eq!((stored.offset, stored.ended), (0, Ended::Sending));
    }

    /// Under load every request begins an epoch of a finished session: regular batches pass
    /// over a new epoch still sending for one flush interval, so a short download that ends
    /// within it costs no write; one still sending then is written; the last batch writes
    /// everything.
    #[tokio::test]
    async fn a_new_epoch_still_sending_waits_one_flush_interval() {
        const INTERVAL: Duration = Duration::from_millis(200);
        let backend = flaky(0);
        let wb = WriteBehind::new(backend.clone(), INTERVAL);
        let table = Table::new(100, Duration::from_secs(3600), clock(), true);
        let k = key(8);
        let e = table.begin(k, 1, 0).unwrap();
        table.advance(&k, e, 100);
        table.end(&k, e, Ended::Clean);
        assert_eq!(wb.flush(&table, false).await.unwrap(), 1, "a new record");
        // Begun again and finished before the next batch: nothing to write.
        let e = table.begin(k, 1, 0).unwrap();
        assert_eq!(wb.flush(&table, false).await.unwrap(), 0, "passed over");
        table.advance(&k, e, 100);
        table.end(&k, e, Ended::Clean);
        assert_eq!(wb.flush(&table, false).await.unwrap(), 0, "back as stored");
        assert_eq!(backend.commits.load(Ordering::SeqCst), 1);
        // Still sending one interval later: written.
        let e = table.begin(k, 1, 0).unwrap();
        let begun = std::time::Instant::now();
        assert_eq!(wb.flush(&table, false).await.unwrap(), 0);
        table.advance(&k, e, 40);
        // Every batch until the interval has passed leaves it listed; the first after writes it.
        let written = loop {
            let n = wb.flush(&table, false).await.unwrap();
            if n > 0 || begun.elapsed() > 10 * INTERVAL {
                break n;
            }
            tokio::time::sleep(INTERVAL / 8).await;
        };
        assert_eq!(written, 1);
        assert!(begun.elapsed() >= INTERVAL, "written before one interval");
        let stored = backend.inner.read(k).await.unwrap().unwrap().record;
        assert_eq!((stored.offset, stored.ended), (40, Ended::Sending));
        // Its progress from now on goes out with every batch.
        table.advance(&k, e, 60);
        assert_eq!(wb.flush(&table, false).await.unwrap(), 1);
        // A new epoch at the last batch (`all`) is written at once.
        let e2 = table.begin(k, 1, 0).unwrap();
        assert_eq!(wb.flush(&table, true).await.unwrap(), 1);
        let stored = backend.inner.read(k).await.unwrap().unwrap().record;
        assert_eq!((stored.epoch, stored.offset), (e2, 0));
    }
}
