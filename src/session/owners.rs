//! One sender per session: which connection is sending each session, and the takeover that
//! stops a stale sender before its successor reads where the session stands.
//!
//! A phone that changes networks reconnects while the server may still be writing to its old,
//! dead path. Without takeover both connections would send the same bytes. With it, the new
//! request aborts the old connection (an RST: no further byte leaves it), waits until the old
//! connection has recorded what its peer acknowledged and released the session, and only then
//! reads the offset and begins.
//!
//! Requests can pile up while one waits (a phone flapping between networks reconnects faster
//! than the old path is torn down). The session then has one *sender* (the last connection that
//! began sending) and at most one *claimant* (the newest request waiting for that sender). A
//! newer request aborts the claimant, which begins nothing, and waits for the sender itself:
//! whoever takes over last waits for the last sender's final record.

use super::backend::SharedStore;
use super::key::{Ended, Epoch, SessionKey};
use prometheus_client::metrics::counter::Counter;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a new request waits for a stale sender to record its final offset. The old task
/// only has to read `TCP_INFO` and update the table, so this bounds a bug, not normal work.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// The connection side of ownership: cancelling `abort` makes the connection stop at once,
/// record what was acknowledged and reset.
#[derive(Clone, Debug)]
pub struct ConnectionHandle {
    /// Unique per connection for the server's lifetime.
    pub id: u64,
    /// A child of `shutdown`: cancelled by a takeover or by the server stopping.
    pub abort: CancellationToken,
    /// The server's shutdown token.
    pub shutdown: CancellationToken,
    /// The peer's address (for per-address limits).
    pub peer: std::net::IpAddr,
}

impl ConnectionHandle {
    /// A handle for connection `id` from `peer`, stopped by `shutdown` or by a takeover.
    pub fn new(id: u64, peer: std::net::IpAddr, shutdown: &CancellationToken) -> Self {
        ConnectionHandle {
            id,
            // A child of the shutdown token: one wake-up source per wait instead of two
            // (registering a waiter on a token costs a lock), told apart by asking the parent.
            abort: shutdown.child_token(),
            shutdown: shutdown.clone(),
            peer,
        }
    }

    /// True when another request took this connection's session over (not a shutdown).
    pub fn taken_over(&self) -> bool {
        self.abort.is_cancelled() && !self.shutdown.is_cancelled()
    }
}

#[derive(Clone, Debug)]
struct Holder {
    serial: u64,
    conn: ConnectionHandle,
    /// Cancelled when the sender has recorded its last progress and given up the session.
    released: CancellationToken,
}

#[derive(Debug, Default)]
struct Slot {
    sender: Option<Holder>,
    claimant: Option<Holder>,
}

/// Registry of current senders, keyed by session.
#[derive(Debug, Default)]
pub struct Owners {
    slots: crate::ConcurrentMap<SessionKey, Slot>,
    serials: AtomicU64,
    /// `roam_takeovers_total{scope="local"}`: senders stopped by a takeover.
    takeovers: Counter,
}

/// A newer request took the session while this one waited: it must begin nothing (its
/// connection is being aborted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("taken over by a newer request while waiting")]
pub struct Preempted;

/// Proof of being a session's sender. Dropping it releases the session (and wakes a waiting
/// successor); it must be dropped only after the sender's final progress has been recorded.
#[derive(Debug)]
pub struct Sender {
    owners: Arc<Owners>,
    key: SessionKey,
    serial: u64,
    released: CancellationToken,
}

impl Drop for Sender {
    fn drop(&mut self) {
        let serial = self.serial;
        let empty = match self.owners.slots.get_mut(&self.key) {
            Some(mut slot) => {
                if slot.sender.as_ref().is_some_and(|h| h.serial == serial) {
                    slot.sender = None;
                }
                slot.sender.is_none() && slot.claimant.is_none()
            }
            None => false,
        };
        if empty {
            self.owners
                .slots
                .remove_if(&self.key, |_, s| s.sender.is_none() && s.claimant.is_none());
        }
        self.released.cancel();
    }
}

impl Owners {
    /// A registry counting the senders it stops in `takeovers`.
    pub fn counting(takeovers: Counter) -> Owners {
        Owners {
            takeovers,
            ..Owners::default()
        }
    }

    fn serial(&self) -> u64 {
        self.serials.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes `key` for a server-resumed stream on `conn`: aborts a waiting claimant and the
    /// current sender (unless it is this same connection, whose earlier response is already
    /// complete), and waits until that sender has released the session, at most
    /// [`TAKEOVER_WAIT`]. `Err(Preempted)` if a newer request took over meanwhile.
    pub async fn take_over(
        self: &Arc<Self>,
        key: SessionKey,
        conn: &ConnectionHandle,
    ) -> Result<Sender, Preempted> {
        let serial = self.serial();
        let sender = {
            let mut slot = self.slots.entry(key).or_default();
            if let Some(previous) = slot.claimant.take() {
                if previous.conn.id != conn.id {
                    previous.conn.abort.cancel();
                }
            }
            slot.claimant = Some(Holder {
                serial,
                conn: conn.clone(),
                released: CancellationToken::new(),
            });
            slot.sender.clone()
        };
        if let Some(sender) = sender.filter(|s| s.conn.id != conn.id) {
            self.takeovers.inc();
            sender.conn.abort.cancel();
            self.wait_for_release(key, &sender, conn).await;
        }
        let mut slot = self.slots.entry(key).or_default();
        let still_claimant = slot.claimant.as_ref().is_some_and(|c| c.serial == serial);
        if !still_claimant || conn.taken_over() {
            if still_claimant {
                slot.claimant = None;
            }
            let empty = slot.sender.is_none() && slot.claimant.is_none();
            drop(slot);
            if empty {
                self.slots
                    .remove_if(&key, |_, s| s.sender.is_none() && s.claimant.is_none());
            }
            return Err(Preempted);
        }
        slot.claimant = None;
        let released = CancellationToken::new();
        slot.sender = Some(Holder {
            serial,
            conn: conn.clone(),
            released: released.clone(),
        });
        Ok(Sender {
            owners: Arc::clone(self),
            key,
            serial,
            released,
        })
    }

    /// Waits until `sender` released, this request is taken over itself, or the wait ends. A
    /// shutdown does not end the wait: the sender is stopping too and will release promptly.
    async fn wait_for_release(&self, key: SessionKey, sender: &Holder, conn: &ConnectionHandle) {
        let deadline = Instant::now() + TAKEOVER_WAIT;
        loop {
            tokio::select! {
                () = sender.released.cancelled() => return,
                () = conn.abort.cancelled(), if !conn.shutdown.is_cancelled() => {
                    if conn.taken_over() {
                        return;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(?key, "stale sender did not release within the takeover wait");
                    return;
                }
            }
        }
    }

    /// Takes `key` for a stream whose position the client declared (`Range: bytes=N-`). The
    /// client chose its bytes, so the previous sender is not aborted; it simply stops counting
    /// (its epoch is stale once this one begins).
    pub fn declare(self: &Arc<Self>, key: SessionKey, conn: &ConnectionHandle) -> Sender {
        let serial = self.serial();
        let released = CancellationToken::new();
        self.slots.entry(key).or_default().sender = Some(Holder {
            serial,
            conn: conn.clone(),
            released: released.clone(),
        });
        Sender {
            owners: Arc::clone(self),
            key,
            serial,
            released,
        }
    }

    /// Number of sessions with a live sender or a waiting claimant.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no session has a live sender or claimant.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// How often a node waiting for another node's sender looks at the session's record.
pub const REMOTE_POLL: Duration = Duration::from_millis(5);
/// How often a node waiting for another node's sender asks it again (pub/sub delivers at most
/// once: a message sent while the other node was reconnecting is lost).
pub const REMOTE_REPEAT: Duration = Duration::from_millis(500);

impl Owners {
    /// Another node took `key` over: aborts this node's sender and waiting claimant of it, as a
    /// local takeover does. True when a sender was aborted (it records its final offset and
    /// releases, which the write-behind layer reports to the shared store).
    pub fn stop(&self, key: SessionKey) -> bool {
        let Some(slot) = self.slots.get(&key) else {
            return false;
        };
        if let Some(c) = &slot.claimant {
            c.conn.abort.cancel();
        }
        match &slot.sender {
            Some(s) => {
                s.conn.abort.cancel();
                true
            }
            None => false,
        }
    }
}

/// The takeover across nodes: `holder`, another node of the fleet, runs the sender of `key`
/// under `epoch`. Asks it to stop (it aborts that connection exactly as a local takeover does,
/// and its final offset reaches the store), and waits until the store shows the sender ended,
/// the epoch changed, or the holder is gone; at most [`TAKEOVER_WAIT`]. The message only makes
/// the final offset arrive sooner: whatever happens, the caller then begins expecting `epoch`,
/// and the store's epoch keeps a node that did not answer from ever moving the session (the
/// caller starts from the last offset that node committed: a bounded repeat, never a gap).
/// `Err(Preempted)` if a newer request on this node took the session meanwhile.
pub async fn stop_remote(
    shared: &dyn SharedStore,
    key: SessionKey,
    holder: &str,
    epoch: Epoch,
    conn: &ConnectionHandle,
) -> Result<(), Preempted> {
    let started = Instant::now();
    let deadline = started + TAKEOVER_WAIT;
    let mut ask_at = started;
    loop {
        if Instant::now() >= ask_at {
            match shared.stop(holder, key, epoch).await {
                Ok(true) => {}
                // Gone (its process ended, or its heartbeat lapsed), or the store cannot be
                // asked: nobody will answer.
                Ok(false) | Err(_) => return Ok(()),
            }
            ask_at += REMOTE_REPEAT;
        }
        tokio::select! {
            () = tokio::time::sleep(REMOTE_POLL) => {}
            () = conn.abort.cancelled(), if !conn.shutdown.is_cancelled() => {
                if conn.taken_over() {
                    return Err(Preempted);
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(?key, holder, "another node's sender did not stop within the takeover wait; starting from its last committed offset");
                return Ok(());
            }
        }
        match shared.holding(key).await {
            Ok(Some(h))
                if h.stored.record.epoch == epoch
                    && h.stored.record.ended == Ended::Sending
                    && h.holder.as_deref() == Some(holder) => {}
            _ => {
                tracing::debug!(?key, holder, waited = ?started.elapsed(), "another node's sender stopped");
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::key::FileKey;

    fn key() -> SessionKey {
        SessionKey {
            client: 1,
            file: FileKey(3),
        }
    }

    fn conn(id: u64) -> ConnectionHandle {
        ConnectionHandle::new(id, [127, 0, 0, 1].into(), &CancellationToken::new())
    }

    #[tokio::test]
    async fn takeover_aborts_and_waits_for_release() {
        let owners = Arc::new(Owners::default());
        let old_conn = conn(1);
        let old = owners.take_over(key(), &old_conn).await.unwrap();
        let watcher = old_conn.abort.clone();
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = released.clone();
        tokio::spawn(async move {
            watcher.cancelled().await;
            flag.store(true, Ordering::SeqCst);
            drop(old);
        });
        let _new = owners.take_over(key(), &conn(2)).await.unwrap();
        assert!(
            released.load(Ordering::SeqCst),
            "successor ran before the old sender released"
        );
        assert_eq!(owners.len(), 1);
    }

    #[tokio::test]
    async fn same_connection_and_declared_positions_do_not_abort() {
        let owners = Arc::new(Owners::default());
        let c = conn(1);
        let first = owners.take_over(key(), &c).await.unwrap();
        let _second = owners.take_over(key(), &c).await.unwrap();
        assert!(!c.abort.is_cancelled());
        drop(first); // an old guard must not remove its successor's slot
        assert_eq!(owners.len(), 1);
        let other = conn(2);
        let _declared = owners.declare(key(), &other);
        assert!(!c.abort.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_taker_aborted_while_waiting_stops_waiting_and_begins_nothing() {
        let owners = Arc::new(Owners::default());
        let _stuck = owners.take_over(key(), &conn(1)).await.unwrap();
        let taker = conn(2);
        let abort = taker.abort.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            abort.cancel();
        });
        let started = tokio::time::Instant::now();
        assert_eq!(
            owners.take_over(key(), &taker).await.unwrap_err(),
            Preempted
        );
        assert!(started.elapsed() < TAKEOVER_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_sender_delays_by_at_most_the_wait() {
        let owners = Arc::new(Owners::default());
        let _stuck = owners.take_over(key(), &conn(1)).await.unwrap();
        let started = tokio::time::Instant::now();
        let _new = owners.take_over(key(), &conn(2)).await.unwrap();
        assert_eq!(started.elapsed(), TAKEOVER_WAIT);
    }

    /// Issue 11: with a sender A, B waiting for it and C arriving, C aborted B (which then
    /// released its ownership and woke C at once) so C never waited for A. Now C waits for A.
    #[tokio::test(start_paused = true)]
    async fn the_last_taker_waits_for_the_sender_not_for_the_aborted_claimant() {
        let owners = Arc::new(Owners::default());
        let a = conn(1);
        let sender_a = owners.take_over(key(), &a).await.unwrap();
        let (b, c) = (conn(2), conn(3));
        let o = Arc::clone(&owners);
        let b2 = b.clone();
        let waiting_b = tokio::spawn(async move { o.take_over(key(), &b2).await });
        tokio::task::yield_now().await;
        assert!(a.abort.is_cancelled());
        let o = Arc::clone(&owners);
        let c2 = c.clone();
        let waiting_c = tokio::spawn(async move { o.take_over(key(), &c2).await });
        tokio::task::yield_now().await;
        assert!(
            b.abort.is_cancelled(),
            "the newer request aborts the claimant"
        );
        assert_eq!(waiting_b.await.unwrap().unwrap_err(), Preempted);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting_c.is_finished(),
            "C must still wait for A's release"
        );
        drop(sender_a);
        let _c = waiting_c.await.unwrap().unwrap();
        assert!(!c.abort.is_cancelled());
    }
}
