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
}

impl Report {
    pub fn key(&self) -> SessionKey {
        match self {
            Report::Progress { key, .. } | Report::Snapshot { key, .. } => *key,
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
    /// TTL by its clock; returns how many.
    fn expire(&self) -> BoxFuture<'_, Result<usize, StoreError>>;

    /// Number of records held (an estimate where counting exactly would be costly: see
    /// [`Backend::len_is_exact`]).
    fn len(&self) -> usize;

    /// Called once at graceful shutdown, after the last commit (a durable store makes its next
    /// start quick and marks the shutdown clean).
    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// False when [`Backend::len`] is an estimate that may count replaced and deleted records
    /// until the store compacts them (never fewer than are held).
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
