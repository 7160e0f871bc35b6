//! The storage seam: what a backend that keeps session records outside the table provides
//! (an embedded store on disk, a store shared by a fleet). Asynchronous, because those wait on
//! a disk or a network; the request path reaches a backend only on a cache miss or to begin an
//! epoch in a shared store, and the write-behind layer batches everything else.
//!
//! Every backend passes the contract suite in `session::contract`.

use super::key::{Ended, Epoch, Record, SessionKey};
use super::table::Full;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

/// One stored record and when it was last touched (begun or advanced), in the backend's clock's
/// seconds: so that a record read back after a restart keeps its age.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    pub record: Record,
    pub touched: u64,
}

/// A boxed future, so that backends can be trait objects chosen at start-up.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A backend could not do what was asked (disk or network trouble). The caller decides what
/// that costs: the request path serves from what the table knows, the write-behind layer keeps
/// the records and retries.
#[derive(Debug, thiserror::Error)]
#[error("session store: {0}")]
pub struct StoreError(pub String);

/// Why a new epoch did not begin.
#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    /// The store holds its maximum of sessions and the key is new.
    #[error(transparent)]
    Full(#[from] Full),
    /// The record's epoch is no longer the one expected: another sender began meanwhile.
    #[error("another sender began this session meanwhile")]
    Conflict,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a begin expects to find, so that two writers of a shared store cannot both begin from
/// the same record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there.
    Any,
    /// No record.
    Absent,
    /// A record whose current epoch is this one.
    Epoch(Epoch),
}

impl Expect {
    /// True when `current` (the stored record's epoch, if any) is what was expected.
    pub fn holds(self, current: Option<Epoch>) -> bool {
        match self {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Epoch(e) => current == Some(e),
        }
    }
}

/// A new owner of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Begin {
    /// The file version the offset refers to.
    pub version: u32,
    /// Where the new owner starts.
    pub offset: u64,
    pub expect: Expect,
}

/// One entry of a batch the write-behind layer commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// Progress of the sender that owns `epoch`: moves the offset forward only, and records how
    /// the sender ended when it did; ignored for any other epoch (fencing).
    Progress {
        key: SessionKey,
        epoch: Epoch,
        offset: u64,
        ended: Ended,
    },
    /// The whole record as the only writer of an exclusive store holds it (its table is the
    /// truth, so the newest snapshot replaces whatever is stored).
    Snapshot { key: SessionKey, record: Record },
    /// A record whose epoch a node of a fleet began by itself, without the shared store: a
    /// position the client declared, or any begin while the store was unreachable. The store
    /// takes it as that node's (the node's progress applies from then on), replacing whatever
    /// epoch it held. An exclusive store takes it as a snapshot.
    Begun { key: SessionKey, record: Record },
}

impl Report {
    pub fn key(&self) -> SessionKey {
        match self {
            Report::Progress { key, .. }
            | Report::Snapshot { key, .. }
            | Report::Begun { key, .. } => *key,
        }
    }
}

/// What a commit did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Reports that changed a record or confirmed it.
    pub applied: usize,
    /// Progress reports ignored because another sender began (or the record is gone).
    pub stale: usize,
}

/// A place session records live besides the table.
pub trait Backend: Send + Sync + Debug + 'static {
    /// Short name for logs (`memory`, `disk`, `redis`).
    fn name(&self) -> &'static str;

    /// True when this process is the only writer: the table in front of it is then the truth
    /// for every record it holds, and begins happen in the table (written behind as
    /// snapshots). False for a store shared with other processes: begins happen in the store.
    fn exclusive(&self) -> bool;

    /// The stored record for `key`.
    fn read(&self, key: SessionKey) -> BoxFuture<'_, Result<Option<Stored>, StoreError>>;

    /// Begins a new epoch for `key` at `begin.offset` of `begin.version`, creating the record
    /// (refused past the session cap) or renewing it, if the stored epoch is what
    /// `begin.expect` says. Returns the new epoch, which differs from the previous one.
    fn begin(&self, key: SessionKey, begin: Begin) -> BoxFuture<'_, Result<Epoch, BeginError>>;

    /// Applies a batch in order (see [`Report`]).
    fn commit(&self, batch: Vec<Report>) -> BoxFuture<'_, Result<Committed, StoreError>>;

    /// Forgets records untouched (neither begun nor advanced) for longer than the backend's
    /// TTL by its clock; returns how many (0 from a store that expires records by itself).
    fn expire(&self) -> BoxFuture<'_, Result<usize, StoreError>>;

    /// True for a store that expires records by itself: a record idle for longer than the TTL
    /// by the backend's clock reads as absent at once, whether or not [`Backend::expire`] ran
    /// (Redis: every script compares the record's touch time with the caller's clock, and the
    /// key's own TTL deletes it).
    fn expires_itself(&self) -> bool {
        false
    }

    /// Number of records held (an estimate where counting exactly would be costly: see
    /// [`Backend::len_is_exact`]).
    fn len(&self) -> usize;

    /// Called once at graceful shutdown, after the last commit (a durable store makes its next
    /// start quick and marks the shutdown clean).
    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// False when [`Backend::len`] is an estimate: a count that may include replaced and
    /// deleted records until the store compacts them, or a shared store's count as of its last
    /// refresh plus the records this process created since (never fewer than one process
    /// alone put there).
    fn len_is_exact(&self) -> bool {
        true
    }

    /// `Ok` while the backend can be reached (for `/readyz`); the error says why not (a disk
    /// store still opening or failed, a shared store whose connection is down). Cheap: no I/O.
    fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// True when no record is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// This node's own knowledge of a record that a shared store may not have yet, passed to a
/// server-resumed begin so that the store decides from the newest state (the node's flush may
/// still be on its way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    /// The node holds nothing for the key.
    None,
    /// A record of an epoch the store began for this node: the store takes its offset (if
    /// larger) and its end, if the store's record is still that epoch and this node's.
    Registered(Record),
    /// A record of an epoch this node began by itself and has not written yet (see
    /// [`Report::Begun`]): the store takes it as written, unless another node's sender holds
    /// the session.
    Begun(Record),
}

/// What a server-resumed begin asks of a shared store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumeAsk {
    /// The file version the client downloads.
    pub version: u32,
    /// The file's length: a record at or past it is finished.
    pub length: u64,
    /// Begin only if the record's epoch is this one (after the holder of that epoch was asked
    /// to stop); `None`: begin unless another node's sender holds the session.
    pub expect: Option<Epoch>,
    pub local: Local,
}

/// What a server-resumed begin in a shared store found and did, in one atomic step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resumed {
    /// A new epoch began for this node: send from `start`.
    Began { epoch: Epoch, start: u64 },
    /// The client confirmed the whole file: nothing began.
    Finished,
    /// Another node's sender holds the session under `epoch`: ask it to stop, then begin
    /// expecting that epoch.
    Held { holder: String, epoch: Epoch },
    /// The expected epoch is gone (another sender began meanwhile): ask again.
    Conflict,
}

/// A record as a shared store holds it, with the node whose sender owns its epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    pub stored: Stored,
    pub holder: Option<String>,
}

/// A node of the fleet asked this one to stop sending a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopRequest {
    pub key: SessionKey,
    /// The epoch the asking node saw this node hold.
    pub epoch: Epoch,
}

/// What a store shared by a fleet adds to a [`Backend`]: server-resumed begins that read where
/// the client stands and begin there atomically, and the messages of a takeover across nodes.
/// Calls on the request path wait for the store a bounded time (and not at all while it is
/// known to be unreachable): a request is then served from what this node knows.
pub trait SharedStore: Backend {
    /// This node's name in the store (the holder of the epochs it begins).
    fn node(&self) -> &str;

    /// False while the store is known to be unreachable (requests then use local knowledge at
    /// once instead of waiting); true again as soon as a background call gets through.
    fn reachable(&self) -> bool;

    /// Reads where the client stands and begins there, if nobody else holds the session.
    fn resume(&self, key: SessionKey, ask: ResumeAsk)
        -> BoxFuture<'_, Result<Resumed, BeginError>>;

    /// The record and its holder (HEAD, version checks, and polling during a takeover).
    fn holding(&self, key: SessionKey) -> BoxFuture<'_, Result<Option<Holding>, StoreError>>;

    /// Asks `holder` to stop its sender of `key` (epoch `epoch`). False when that node is gone
    /// (not subscribed, or its heartbeat lapsed): nobody will answer, so do not wait.
    fn stop(
        &self,
        holder: &str,
        key: SessionKey,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Gives up this node's hold of `key` at `epoch` without progress (a stop arrived for a
    /// sender this node no longer runs and holds no record of).
    fn release(&self, key: SessionKey, epoch: Epoch) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Runs this node's presence in the fleet until `stop` (then withdraws it): connects,
    /// keeps a heartbeat, and delivers the stop requests other nodes send to `stops`.
    fn run(
        &self,
        stops: tokio::sync::mpsc::UnboundedSender<StopRequest>,
        stop: tokio_util::sync::CancellationToken,
    ) -> BoxFuture<'_, ()>;
}
