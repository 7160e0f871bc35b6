//! Download sessions: for each (client, file), the offset the client's TCP acknowledged, the
//! file version it refers to, which sender owns it, and how that sender ended. This module owns
//! the whole resume protocol; the request path and the connection talk only to [`Sessions`]
//! and the [`Claim`] it hands out.
//!
//! The protocol, in order, for a download whose start the server decides (no `Range`):
//! 1. take the session over from a stale sender (`owners`): abort it, wait for its release;
//! 2. read the record (`store`, from the table or, on a miss, the backend);
//! 3. begin a new epoch where the client stands (a finished session begins nothing);
//! 4. while sending, record acknowledged progress on the claim (memory only, cheap);
//! 5. finish the claim: write how the sender ended, then release the session, which wakes a
//!    successor waiting in step 1.
//!
//! A download whose start the client declares (`Range: bytes=N-`) skips steps 1 and 2.
//!
//! In a fleet sharing one store (Redis), steps 2 and 3 happen in the store in one atomic step;
//! if it answers that another node's sender holds the session, that node is asked to stop
//! (`owners::stop_remote`) and the begin is made again expecting the epoch it held. While the
//! store is unreachable, steps 2 and 3 use what this node knows, and the store learns of the
//! epoch with the write-behind layer's next batch once it is back.

pub mod backend;
pub mod clock;
pub mod contract;
pub mod disk;
pub mod key;
pub mod memory;
pub mod owners;
pub mod redis;
pub mod store;
pub mod table;
pub mod writebehind;

pub use self::backend::{BeginError, SharedStore, StoreError};
pub use self::key::{Ended, Epoch, FileKey, Record, SessionKey};
pub use self::owners::{ConnectionHandle, Owners, Preempted, Sender};
pub use self::store::Store;
pub use self::table::Full;

use self::backend::{Resumed, StopRequest};
use crate::ops::metrics::{Metrics, TakeoverScope};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// How many times a server-resumed begin in a shared store is tried when other senders keep
/// beginning the same session meanwhile (each try may wait for one of them to stop).
const SHARED_BEGIN_TRIES: usize = 4;

/// Why a session could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The store holds its maximum of sessions: `503`.
    #[error(transparent)]
    Full(#[from] Full),
    /// A newer request took the session while this one waited: send nothing.
    #[error(transparent)]
    Preempted(#[from] Preempted),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<BeginError> for SessionError {
    fn from(e: BeginError) -> Self {
        match e {
            BeginError::Full(f) => SessionError::Full(f),
            BeginError::Store(s) => SessionError::Store(s),
            // Only a shared store reports conflicts, and the façade does not expect an epoch.
            BeginError::Conflict => {
                SessionError::Store(StoreError("an unexpected begin conflict".into()))
            }
        }
    }
}

/// Where a download whose start the server decides begins.
#[derive(Debug)]
pub enum Resume {
    /// Everything was confirmed: nothing to send (`416`), nothing begun.
    Finished { length: u64 },
    /// Send from `claim.start()`.
    From(Claim),
}

/// Where a server-resumed `GET` would start now (for `HEAD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    Finished { length: u64 },
    At(u64),
}

/// The sessions of one server: the store stack and the registry of senders. A cheap-clone
/// handle.
#[derive(Clone, Debug)]
pub struct Sessions {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    owners: Arc<Owners>,
    metrics: Metrics,
}

impl Sessions {
    /// Sessions over `store`, counting into a registry of their own.
    pub fn new(store: Store) -> Sessions {
        Self::with_metrics(store, Metrics::new())
    }

    /// Sessions over `store`, counting takeovers and store batches into `metrics`.
    pub fn with_metrics(mut store: Store, metrics: Metrics) -> Sessions {
        store.observe(metrics.store());
        Sessions {
            inner: Arc::new(Inner {
                store,
                owners: Arc::new(Owners::counting(metrics.takeovers(TakeoverScope::Local))),
                metrics,
            }),
        }
    }

    /// The metrics this server counts into.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The store stack (the sweeper, the write-behind task and tests reach it).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// A `GET` without `Range`: takes the session over from any other sender, reads where the
    /// client stands on `version` of a `length`-byte file, and begins there.
    ///
    /// `here`: the epoch and end offset of the last body this same connection sent for the
    /// session, if one is still being confirmed (pipelined or back-to-back requests). The
    /// connection delivers bytes in order, so the client gets all of that body before this
    /// response, or neither if the connection dies: this response continues where that body
    /// ends, under the same epoch (no new one: the earlier body's confirmations still count,
    /// and the record never gets ahead of what was acknowledged).
    pub async fn resume(
        &self,
        key: SessionKey,
        version: u32,
        length: u64,
        conn: &ConnectionHandle,
        here: Option<(Epoch, u64)>,
    ) -> Result<Resume, SessionError> {
        let sender = self.inner.owners.take_over(key, conn).await?;
        let store = &self.inner.store;
        if let Some(shared) = store.shared() {
            return self
                .resume_shared(shared.as_ref(), key, version, length, conn, here, sender)
                .await;
        }
        let record = store.get(key).await?.filter(|r| r.version == version);
        if let (Some(r), Some((epoch, end))) = (record, here) {
            if r.epoch == epoch {
                if end >= length {
                    return Ok(Resume::Finished { length });
                }
                self.inner.store.end(&key, epoch, Ended::Sending);
                return Ok(Resume::From(Claim::new(self, key, epoch, end, sender)));
            }
        }
        match Self::position_of(record, length) {
            Position::Finished { length } => Ok(Resume::Finished { length }),
            Position::At(offset) => {
                let epoch = self.inner.store.begin(key, version, offset).await?;
                Ok(Resume::From(Claim::new(self, key, epoch, offset, sender)))
            }
        }
    }

    /// `resume` in a fleet: the begin happens in the shared store, after the node holding the
    /// session (if another) stopped its sender; from this node's own record while the store
    /// cannot be reached.
    #[allow(clippy::too_many_arguments)]
    async fn resume_shared(
        &self,
        shared: &dyn SharedStore,
        key: SessionKey,
        version: u32,
        length: u64,
        conn: &ConnectionHandle,
        here: Option<(Epoch, u64)>,
        sender: Sender,
    ) -> Result<Resume, SessionError> {
        let store = &self.inner.store;
        // The same connection goes on after a body of its own: the client stands where that
        // body ends, whatever any store says.
        if let (Some(r), Some((epoch, end))) = (store.local(key), here) {
            if r.epoch == epoch && r.version == version {
                if end >= length {
                    return Ok(Resume::Finished { length });
                }
                store.end(&key, epoch, Ended::Sending);
                return Ok(Resume::From(Claim::new(self, key, epoch, end, sender)));
            }
        }
        if shared.reachable() {
            let mut expect = None;
            for _ in 0..SHARED_BEGIN_TRIES {
                match store
                    .resume_shared(shared, key, version, length, expect)
                    .await
                {
                    Ok(Resumed::Began { epoch, start }) => {
                        return Ok(Resume::From(Claim::new(self, key, epoch, start, sender)))
                    }
                    Ok(Resumed::Finished) => return Ok(Resume::Finished { length }),
                    Ok(Resumed::Held { holder, epoch }) => {
                        self.inner.metrics.takeovers(TakeoverScope::Remote).inc();
                        owners::stop_remote(shared, key, &holder, epoch, conn).await?;
                        expect = Some(epoch);
                    }
                    Ok(Resumed::Conflict) => expect = None,
                    Err(BeginError::Full(f)) => return Err(SessionError::Full(f)),
                    // Unreachable or slow: serve from what this node knows.
                    Err(_) => break,
                }
            }
        }
        let record = store.local(key).filter(|r| r.version == version);
        match Self::position_of(record, length) {
            Position::Finished { length } => Ok(Resume::Finished { length }),
            Position::At(offset) => {
                let epoch = store.begin(key, version, offset).await?;
                Ok(Resume::From(Claim::new(self, key, epoch, offset, sender)))
            }
        }
    }

    /// Another node asked this one to stop its sender of `key` (it is taking the session
    /// over): aborts it as a local takeover does; with no sender here, makes sure the store
    /// shows this node's hold ended (writing the record it has, or releasing the epoch).
    pub async fn stop_here(&self, request: StopRequest) {
        let StopRequest { key, epoch } = request;
        let store = &self.inner.store;
        let local = store.local(key);
        // The sender to stop is the one of the epoch the message names, or one this node began
        // by itself since and has not written yet (a declared Range: the asking node could not
        // know it, and the client left it). A sender of another epoch that the store knows
        // began after the message was sent (it is late: sent again while its sender waited, or
        // slow to arrive): not the one to stop.
        let current = local.is_none_or(|r| r.epoch == epoch || store.unwritten(key, r.epoch));
        if current && self.inner.owners.stop(key) {
            return;
        }
        match local {
            Some(r) if r.epoch == epoch => {
                if r.ended == Ended::Sending {
                    store.end(&key, epoch, Ended::Network);
                } else {
                    store.rewrite(key);
                }
            }
            _ => {
                if let Some(shared) = store.shared() {
                    if let Err(e) = shared.release(key, epoch).await {
                        tracing::debug!(error = %e, ?key, "cannot release a session for another node");
                    }
                }
            }
        }
    }

    /// Where a download without `Range` starts given the record: where the client's TCP left
    /// off, only if its last sender ended because of the network, the server, or cleanly. If
    /// the peer went away (closed or reset with bytes unread or in flight), what it kept is
    /// unknown: the whole file again, from 0 (a repeat the `200` announces, never a gap).
    fn position_of(record: Option<Record>, length: u64) -> Position {
        match record {
            Some(r) if r.ended == Ended::Peer => Position::At(0),
            Some(r) if r.offset >= length => Position::Finished { length },
            Some(r) => Position::At(r.offset),
            None => Position::At(0),
        }
    }

    /// Where a `GET` without `Range` would start, touching nothing (`HEAD`). A record of
    /// another version counts as none.
    pub async fn position(
        &self,
        key: SessionKey,
        version: u32,
        length: u64,
    ) -> Result<Position, SessionError> {
        let record = self
            .inner
            .store
            .get(key)
            .await?
            .filter(|r| r.version == version);
        Ok(Self::position_of(record, length))
    }

    /// A download whose start the client declared (`Range: bytes=N-`, or a whole file that
    /// restarts the session at 0): begins there without stopping anyone (a previous sender
    /// just stops counting).
    pub async fn declare(
        &self,
        key: SessionKey,
        version: u32,
        start: u64,
        conn: &ConnectionHandle,
    ) -> Result<Claim, SessionError> {
        let sender = self.inner.owners.declare(key, conn);
        let epoch = self.inner.store.begin(key, version, start).await?;
        Ok(Claim::new(self, key, epoch, start, sender))
    }

    /// The version the session's record refers to, if there is a record.
    pub async fn version(&self, key: SessionKey) -> Result<Option<u32>, SessionError> {
        Ok(self.inner.store.version(key).await?)
    }

    /// A copy of the record (tests, diagnostics).
    pub async fn record(&self, key: SessionKey) -> Result<Option<Record>, SessionError> {
        Ok(self.inner.store.get(key).await?)
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.inner.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions with a live sender or a request waiting for one.
    pub fn senders(&self) -> usize {
        self.inner.owners.len()
    }

    /// Forgets idle sessions; returns how many.
    pub async fn expire(&self) -> usize {
        self.inner.store.expire().await
    }

    /// Runs the write-behind layer until `stop`, then flushes once more. In a fleet, also runs
    /// this node's presence (its heartbeat and stop channel) and answers other nodes' stop
    /// requests, until then.
    pub async fn run_writer(&self, stop: CancellationToken) {
        let Some(shared) = self.inner.store.shared().cloned() else {
            self.inner.store.run_writer(stop).await;
            return;
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let fleet_stop = CancellationToken::new();
        let presence = shared.run(tx, fleet_stop.clone());
        let answers = async {
            while let Some(request) = rx.recv().await {
                let sessions = self.clone();
                tokio::spawn(async move { sessions.stop_here(request).await });
            }
        };
        let writer = async {
            self.inner.store.run_writer(stop).await;
            // The last batch is written: leave the fleet.
            fleet_stop.cancel();
        };
        tokio::join!(presence, writer, async {
            tokio::select! {
                () = answers => {}
                () = fleet_stop.cancelled() => {}
            }
        });
    }
}

/// The right to advance one session: held by the connection sending its body from `start`,
/// under the epoch begun for it. Recording progress is synchronous and touches memory only;
/// finishing writes how the sender ended, then releases the session.
#[derive(Debug)]
pub struct Claim {
    sessions: Sessions,
    key: SessionKey,
    epoch: Epoch,
    start: u64,
    /// How the sender ended; set by `finish`, recorded by `drop`.
    ended: Option<Ended>,
    /// Released (dropped) after `drop` has written the end.
    _sender: Sender,
}

impl Claim {
    fn new(sessions: &Sessions, key: SessionKey, epoch: Epoch, start: u64, sender: Sender) -> Self {
        Claim {
            sessions: sessions.clone(),
            key,
            epoch,
            start,
            ended: None,
            _sender: sender,
        }
    }

    pub fn key(&self) -> SessionKey {
        self.key
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The file offset of the body's first byte.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Records that the client acknowledged the file up to `offset`. Ignored once another
    /// sender began; never moves backwards.
    pub fn record(&self, offset: u64) -> bool {
        self.sessions
            .inner
            .store
            .advance(&self.key, self.epoch, offset)
    }

    /// Ends the claim: records how the sender ended, then releases the session.
    pub fn finish(mut self, ended: Ended) {
        self.ended = Some(ended);
    }

    /// Ends the claim of a body the client acknowledged whole, and keeps what is needed to
    /// take that back: if the connection is later reset by the peer, the body may have died
    /// unread in the client's socket buffer (see [`Delivered::peer_reset`]).
    pub fn delivered(self) -> Delivered {
        let d = Delivered {
            sessions: self.sessions.clone(),
            key: self.key,
            epoch: self.epoch,
        };
        self.finish(Ended::Clean);
        d
    }
}

/// A body wholly acknowledged on a connection that is still open.
#[derive(Debug)]
pub struct Delivered {
    sessions: Sessions,
    key: SessionKey,
    epoch: Epoch,
}

impl Delivered {
    /// The connection was reset by the peer afterwards: what it acknowledged may be unread and
    /// lost, so the session no longer counts as cleanly finished (unless another sender began
    /// since).
    pub fn peer_reset(self) {
        self.sessions
            .inner
            .store
            .end(&self.key, self.epoch, Ended::Peer);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // A claim dropped without `finish` never sent its body (the connection was taken over
        // or stopped before it started): the network, not the client, ended it.
        let ended = self.ended.unwrap_or(Ended::Network);
        self.sessions.inner.store.end(&self.key, self.epoch, ended);
        // `_sender` is dropped after this: the release follows the final record.
    }
}
