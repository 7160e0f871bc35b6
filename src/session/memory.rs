//! The in-memory backend: the session table behind the [`Backend`] interface, so the contract
//! suite holds the table to the same rules as every other store, and so the write-behind layer
//! can be tested against a store that is fast and inspectable.
//!
//! `--store memory` does not go through this: the server uses its table directly.

use super::backend::{
    Backend, Begin, BeginError, BoxFuture, Committed, Report, StoreError, Stored,
};
use super::clock::Clock;
use super::key::{Epoch, SessionKey};
use super::table::Table;
use std::sync::Arc;
use std::time::Duration;

/// A [`Backend`] over a [`Table`] of its own.
#[derive(Debug)]
pub struct MemoryBackend {
    table: Table,
}

impl MemoryBackend {
    pub fn new(cap: usize, ttl: Duration, clock: Arc<dyn Clock>) -> Self {
        MemoryBackend {
            table: Table::new(cap, ttl, clock, false),
        }
    }

    /// The table itself, for tests that look inside.
    pub fn table(&self) -> &Table {
        &self.table
    }
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn exclusive(&self) -> bool {
        true
    }

    fn read(&self, key: SessionKey) -> BoxFuture<'_, Result<Option<Stored>, StoreError>> {
        // The table keeps relative touch stamps; an age to the second is all a reader needs.
        let touched = self.table.clock().now();
        let stored = self
            .table
            .get(&key)
            .map(|record| Stored { record, touched });
        Box::pin(std::future::ready(Ok(stored)))
    }

    fn begin(&self, key: SessionKey, begin: Begin) -> BoxFuture<'_, Result<Epoch, BeginError>> {
        let r = self
            .table
            .begin_if(key, begin.version, begin.offset, begin.expect);
        Box::pin(std::future::ready(r))
    }

    fn commit(&self, batch: Vec<Report>) -> BoxFuture<'_, Result<Committed, StoreError>> {
        let mut done = Committed::default();
        for report in batch {
            let applied = match report {
                Report::Progress {
                    key,
                    epoch,
                    offset,
                    ended,
                } => self.table.advance(&key, epoch, offset) && self.table.end(&key, epoch, ended),
                Report::Snapshot { key, record } | Report::Begun { key, record } => {
                    self.table.put(key, record);
                    true
                }
            };
            if applied {
                done.applied += 1;
            } else {
                done.stale += 1;
            }
        }
        Box::pin(std::future::ready(Ok(done)))
    }

    fn expire(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(std::future::ready(Ok(self.table.expire())))
    }

    fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::clock::ManualClock;

    fn factory(clock: Arc<ManualClock>, cap: usize, ttl: Duration) -> Arc<dyn Backend> {
        Arc::new(MemoryBackend::new(cap, ttl, clock))
    }

    crate::contract_tests!(factory);
}
