//! Write-behind: records change in the table on the hot path, and a writer takes the changed
//! ones in batches and commits them to the backend off the hot path (group commit: one sync per
//! batch in a durable store). A failed batch is listed again and retried at the next tick; the
//! table keeps serving meanwhile.

use super::backend::{Backend, Report, StoreError};
use super::table::Table;
use crate::throttle::LogThrottle;
use std::sync::Arc;
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
    failures: LogThrottle,
}

impl WriteBehind {
    /// A writer committing to `backend` at least every `interval`.
    pub fn new(backend: Arc<dyn Backend>, interval: Duration) -> Self {
        WriteBehind {
            backend,
            interval,
            min_gap: interval / 8,
            wake: Notify::new(),
            failures: LogThrottle::new(),
        }
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Asks for a flush now rather than at the next tick (a new epoch, a finished session).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Commits everything the table changed since the last flush; returns how many records.
    /// On failure the records are listed again, so the next flush retries them.
    pub async fn flush(&self, table: &Table) -> Result<usize, StoreError> {
        let taken = table.take_dirty();
        if taken.is_empty() {
            return Ok(0);
        }
        let exclusive = self.backend.exclusive();
        let batch: Vec<Report> = taken
            .iter()
            .map(|&(key, record)| {
                if exclusive {
                    Report::Snapshot { key, record }
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
        match self.backend.commit(batch).await {
            Ok(_) => Ok(taken.len()),
            Err(e) => {
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
        let mut failing = false;
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
            failing = self.report(self.flush(table).await, failing);
        }
        self.report(self.flush(table).await, failing);
    }

    /// Logs a failure once per burst (with a count) and the recovery; returns whether the
    /// store is failing now.
    fn report(&self, result: Result<usize, StoreError>, was_failing: bool) -> bool {
        match result {
            Ok(_) => {
                if was_failing {
                    tracing::info!(store = self.backend.name(), "session store writable again");
                }
                false
            }
            Err(e) => {
                if let Some(suppressed) = self.failures.admit() {
                    tracing::warn!(
                        store = self.backend.name(),
                        error = %e,
                        suppressed,
                        "cannot write sessions; keeping them in memory and retrying"
                    );
                }
                true
            }
        }
    }
}
