//! One sender per session: the registry of which connection currently owns each (client, file)
//! record, and the takeover that stops a stale owner before its successor starts.
//!
//! A phone that changes networks reconnects while the server may still be writing to its old,
//! dead path. Without takeover both connections would send the same bytes. With it, the new
//! request aborts the old connection (an RST: no further byte leaves it), waits until the old
//! connection has recorded what its peer acknowledged, and only then reads the offset.

use crate::store::SessionKey;
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a new request waits for a stale owner to record its final offset. The old task
/// only has to read `TCP_INFO` and update the store, so this bounds a bug, not normal work.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// The connection side of ownership: cancelling `abort` makes the connection stop at once,
/// record what was acknowledged and reset.
#[derive(Clone, Debug)]
pub struct ConnectionHandle {
    /// Unique per connection for the server's lifetime.
    pub id: u64,
    pub abort: CancellationToken,
    /// The peer's address (for per-address limits).
    pub peer: std::net::IpAddr,
}

#[derive(Debug)]
struct Slot {
    serial: u64,
    conn: ConnectionHandle,
    /// Cancelled when the owner has recorded its last progress and given up the session.
    released: CancellationToken,
}

/// Registry of current owners, keyed by session.
#[derive(Debug, Default)]
pub struct Owners {
    slots: DashMap<SessionKey, Slot>,
    serials: AtomicU64,
}

/// Proof of ownership. Dropping it releases the session (and wakes a waiting successor); it
/// must be dropped only after the owner's final progress has been recorded.
#[derive(Debug)]
pub struct Ownership {
    owners: Arc<Owners>,
    key: SessionKey,
    serial: u64,
    released: CancellationToken,
}

impl Drop for Ownership {
    fn drop(&mut self) {
        self.owners
            .slots
            .remove_if(&self.key, |_, slot| slot.serial == self.serial);
        self.released.cancel();
    }
}

impl Owners {
    /// Takes `key` for a server-resumed stream on `conn`: aborts the previous owner's connection
    /// (unless it is this same connection, whose earlier response is already complete) and
    /// waits until it has released the session.
    pub async fn take_over(
        self: &Arc<Self>,
        key: SessionKey,
        conn: &ConnectionHandle,
    ) -> Ownership {
        let (ownership, previous) = self.install(key, conn);
        if let Some(prev) = previous {
            if prev.conn.id != conn.id {
                prev.conn.abort.cancel();
                // Stop waiting if this connection is itself aborted meanwhile (two connections
                // taking a session from each other must not wait for each other); the caller
                // notices at its next check and sends nothing.
                tokio::select! {
                    _ = prev.released.cancelled() => {}
                    _ = conn.abort.cancelled() => {}
                    _ = tokio::time::sleep(TAKEOVER_WAIT) => {
                        tracing::warn!(?key, "stale owner did not release within the takeover wait");
                    }
                }
            }
        }
        ownership
    }

    /// Takes `key` for a stream whose position the client declared (`Range: bytes=N-`). The
    /// client chose its bytes, so the previous owner is not aborted; it simply stops counting
    /// (its epoch is stale).
    pub fn declare(self: &Arc<Self>, key: SessionKey, conn: &ConnectionHandle) -> Ownership {
        self.install(key, conn).0
    }

    fn install(
        self: &Arc<Self>,
        key: SessionKey,
        conn: &ConnectionHandle,
    ) -> (Ownership, Option<Slot>) {
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        let released = CancellationToken::new();
        let previous = self.slots.insert(
            key,
            Slot {
                serial,
                conn: conn.clone(),
                released: released.clone(),
            },
        );
        (
            Ownership {
                owners: Arc::clone(self),
                key,
                serial,
                released,
            },
            previous,
        )
    }

    /// Number of sessions with a live owner.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no session has a live owner.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileId;

    fn key() -> SessionKey {
        SessionKey {
            client: 1,
            file: FileId(3),
        }
    }

    fn conn(id: u64) -> ConnectionHandle {
        ConnectionHandle {
            id,
            abort: CancellationToken::new(),
            peer: [127, 0, 0, 1].into(),
        }
    }

    #[tokio::test]
    async fn takeover_aborts_and_waits_for_release() {
        let owners = Arc::new(Owners::default());
        let old_conn = conn(1);
        let old = owners.take_over(key(), &old_conn).await;
        let watcher = old_conn.abort.clone();
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = released.clone();
        tokio::spawn(async move {
            watcher.cancelled().await;
            flag.store(true, Ordering::SeqCst);
            drop(old);
        });
        let _new = owners.take_over(key(), &conn(2)).await;
        assert!(
            released.load(Ordering::SeqCst),
            "successor ran before the old owner released"
        );
        assert_eq!(owners.len(), 1);
    }

    #[tokio::test]
    async fn same_connection_and_declared_positions_do_not_abort() {
        let owners = Arc::new(Owners::default());
        let c = conn(1);
        let first = owners.take_over(key(), &c).await;
        let _second = owners.take_over(key(), &c).await;
        assert!(!c.abort.is_cancelled());
        drop(first); // an old guard must not remove its successor's slot
        assert_eq!(owners.len(), 1);
        let other = conn(2);
        let _declared = owners.declare(key(), &other);
        assert!(!c.abort.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_taker_aborted_while_waiting_stops_waiting() {
        let owners = Arc::new(Owners::default());
        let _stuck = owners.take_over(key(), &conn(1)).await;
        let taker = conn(2);
        let abort = taker.abort.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            abort.cancel();
        });
        let started = tokio::time::Instant::now();
        let _new = owners.take_over(key(), &taker).await;
        assert!(started.elapsed() < TAKEOVER_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_owner_delays_by_at_most_the_wait() {
        let owners = Arc::new(Owners::default());
        let _stuck = owners.take_over(key(), &conn(1)).await;
        let started = tokio::time::Instant::now();
        let _new = owners.take_over(key(), &conn(2)).await;
        assert_eq!(started.elapsed(), TAKEOVER_WAIT);
    }
}
