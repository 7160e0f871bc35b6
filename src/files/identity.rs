//! Which file a path named, and when a new one must get a new ETag.
//!
//! The ETag is the length and the modification time (`"len-mtime"`), so identical copies on
//! several nodes (deployed with `rsync -t`, `cp -p`, a reproducible build) have equal ETags
//! and a client can move between them. But those tools also make a *different* file with the
//! same length and mtime possible; under the same ETag, a client holding part of the old one
//! would be resumed into the new one (a splice), and the old `Repr-Digest` would describe it.
//!
//! So the table remembers, per path, the identities (device, inode and status-change time) it
//! served for each (length, mtime). The first identity seen for a (path, length, mtime) keeps
//! the plain ETag; a later, different one (a file renamed over it, or rewritten in place with
//! its mtime restored, which changes the ctime) gets `"len-mtime-ctime"`, which no other file
//! has. A `chmod` also changes the ctime: that costs a restart from byte 0, never a splice.
//!
//! Limits (PROTOCOL.md): the memory is per process (a restart, or another node, that never saw
//! the first file gives the new one the plain ETag) and holds the last [`HISTORY`] (length,
//! mtime) versions of each path, for at most [`MAX_PATHS`] paths.

use crate::session::FileKey;
use dashmap::DashMap;

/// (length, mtime) versions remembered per path.
pub const HISTORY: usize = 4;
/// Paths remembered; past this the oldest half is forgotten (about 100 bytes per path).
pub const MAX_PATHS: usize = 1 << 20;

/// What identifies one file on this machine, as `fstat` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    /// Status change time, nanoseconds: changes with every write, rename onto the inode's
    /// path, `chmod` or `utime`, and cannot be set by user space.
    pub ctime_ns: i128,
}

/// The first identity served for one (length, mtime) of a path.
#[derive(Clone, Copy, Debug)]
struct Seen {
    len: u64,
    mtime_ns: i128,
    identity: Identity,
    /// Order of first sight, to forget the oldest.
    serial: u64,
}

/// Identities served per path.
#[derive(Debug, Default)]
pub struct Identities {
    paths: DashMap<FileKey, Vec<Seen>>,
    serials: std::sync::atomic::AtomicU64,
}

impl Identities {
    /// Records that the file at `key` with this length and mtime is `identity`; returns the
    /// suffix its ETag needs (none for the first identity seen for this length and mtime).
    pub fn observe(
        &self,
        key: FileKey,
        len: u64,
        mtime_ns: i128,
        identity: Identity,
    ) -> Option<i128> {
        if self.paths.len() >= MAX_PATHS && !self.paths.contains_key(&key) {
            self.forget_older_half();
        }
        let serial = self
            .serials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut seen = self.paths.entry(key).or_default();
        match seen.iter().find(|s| s.len == len && s.mtime_ns == mtime_ns) {
            Some(first) if first.identity == identity => None,
            Some(_) => Some(identity.ctime_ns),
            None => {
                if seen.len() == HISTORY {
                    let oldest = (0..seen.len()).min_by_key(|&i| seen[i].serial).unwrap_or(0);
                    seen.remove(oldest);
                }
                seen.push(Seen {
                    len,
                    mtime_ns,
                    identity,
                    serial,
                });
                None
            }
        }
    }

    fn forget_older_half(&self) {
        let now = self.serials.load(std::sync::atomic::Ordering::Relaxed);
        let half = now / 2;
        self.paths
            .retain(|_, seen| seen.iter().any(|s| s.serial >= half));
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64, ctime_ns: i128) -> Identity {
        Identity {
            dev: 1,
            ino,
            ctime_ns,
        }
    }

    #[test]
    fn a_new_file_with_the_same_length_and_mtime_gets_its_own_suffix() {
        let ids = Identities::default();
        let k = FileKey(7);
        assert_eq!(ids.observe(k, 10, 500, id(1, 900)), None);
        assert_eq!(
            ids.observe(k, 10, 500, id(1, 900)),
            None,
            "the same file again"
        );
        assert_eq!(
            ids.observe(k, 10, 500, id(2, 950)),
            Some(950),
            "renamed over it"
        );
        assert_eq!(ids.observe(k, 10, 500, id(2, 950)), Some(950), "stable");
        assert_eq!(
            ids.observe(k, 10, 500, id(1, 990)),
            Some(990),
            "rewritten, mtime restored"
        );
        // An ordinary change (new mtime) keeps the plain ETag, on every node alike.
        assert_eq!(ids.observe(k, 10, 600, id(3, 1000)), None);
        // Other paths are independent.
        assert_eq!(ids.observe(FileKey(8), 10, 500, id(2, 950)), None);
    }

    #[test]
    fn history_is_bounded_per_path() {
        let ids = Identities::default();
        let k = FileKey(1);
        for m in 0..10 {
            ids.observe(k, 1, m, id(m as u64, m));
        }
        assert_eq!(ids.paths.get(&k).unwrap().len(), HISTORY);
        // The newest versions are remembered.
        assert_eq!(ids.observe(k, 1, 9, id(99, 99)), Some(99));
    }
}
