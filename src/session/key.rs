//! What a session is called and what its record holds: plain values shared by every part of
//! the session module and by every backend.

use crate::id::ClientId;
use sha2::{Digest as _, Sha256};
use std::path::Path;

/// The file half of a session key: a 64-bit hash of the file's path below the served folder,
/// so the same (client, path) is the same session in every process, after a restart and on
/// every node of a fleet. Two paths collide with probability 2⁻⁶⁴ per pair; the version kept in
/// the record still guards against ever splicing two versions of one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey(pub u64);

impl FileKey {
    /// The key of a root-relative path (as routed: normal components only).
    pub fn of_path(path: &Path) -> FileKey {
        use std::os::unix::ffi::OsStrExt;
        let mut h = Sha256::new();
        // Versioned, so a future change of derivation cannot silently alias old records.
        h.update(b"roam file key v1\0");
        h.update(path.as_os_str().as_bytes());
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        FileKey(u64::from_be_bytes(first))
    }
}

/// The key of one download: a client and a file. 16 bytes: the client's nonce (which
/// determines its whole ID) and the file's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub client: u64,
    pub file: FileKey,
}

impl SessionKey {
    pub fn new(client: ClientId, file: FileKey) -> Self {
        SessionKey {
            client: client.nonce(),
            file,
        }
    }

    /// Big-endian client then file: the byte form backends store, sorted by client.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.client.to_be_bytes());
        b[8..].copy_from_slice(&self.file.0.to_be_bytes());
        b
    }

    pub fn from_bytes(b: [u8; 16]) -> Self {
        let mut c = [0u8; 8];
        let mut f = [0u8; 8];
        c.copy_from_slice(&b[..8]);
        f.copy_from_slice(&b[8..]);
        SessionKey {
            client: u64::from_be_bytes(c),
            file: FileKey(u64::from_be_bytes(f)),
        }
    }
}

/// Which sender owns a session record. Every start of a server-resumed download and every
/// position a client declares with `Range: bytes=N-` begins a new epoch; progress reported
/// under an older epoch is ignored, so a late report from a replaced sender can never move the
/// offset of its successor.
///
/// Sixteen bits: the counter wraps after 65,536 new owners of one session, and only a sender
/// that outlived all of them could be mistaken for the current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Epoch(pub u16);

impl Epoch {
    /// The epoch after this one (wrapping).
    pub fn next(self) -> Epoch {
        Epoch(self.0.wrapping_add(1))
    }
}

/// How the last sender of a session stopped. Two bits in every store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ended {
    /// A sender began and has not reported an end: it is sending, or the process stopped
    /// without recording one (a crash).
    Sending = 0,
    /// The whole body was acknowledged and the connection ended in order.
    Clean = 1,
    /// The network failed or the server stopped the sender: the connection hung and was taken
    /// over, stalled, timed out, or the server shut down. The client is alive and holds every
    /// byte its TCP acknowledged.
    Network = 2,
    /// The peer closed or reset the connection while bytes were unread or in flight: what the
    /// client kept is unknown and may be less than it acknowledged.
    Peer = 3,
}

impl Ended {
    /// From the two bits a store keeps.
    pub fn from_bits(bits: u8) -> Ended {
        match bits & 3 {
            0 => Ended::Sending,
            1 => Ended::Clean,
            2 => Ended::Network,
            _ => Ended::Peer,
        }
    }

    pub fn bits(self) -> u8 {
        self as u8
    }

    /// The name written in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Sending => "sending",
            Ended::Clean => "clean",
            Ended::Network => "network",
            Ended::Peer => "peer",
        }
    }
}

/// A copy of one session record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Bytes of the file the client has confirmed, counted from byte 0.
    pub offset: u64,
    /// The version (a hash of the strong ETag) the offset refers to.
    pub version: u32,
    /// The current owner.
    pub epoch: Epoch,
    /// How the current owner's sending ended (or that it has not).
    pub ended: Ended,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_are_stable_and_distinct() {
        // Pinned: the same path must name the same session in every process and release.
        let k = FileKey::of_path(Path::new("a/b.txt"));
        assert_eq!(k, FileKey::of_path(Path::new("a/b.txt")));
        assert_ne!(k, FileKey::of_path(Path::new("a/b.txT")));
        assert_ne!(
            FileKey::of_path(Path::new("ab")),
            FileKey::of_path(Path::new("a/b"))
        );
        assert_eq!(k.0, 0x6f4f_8ddc_cae2_3f5c);
    }

    #[test]
    fn key_bytes_round_trip() {
        let key = SessionKey {
            client: 0x0102_0304_0506_0708,
            file: FileKey(u64::MAX - 3),
        };
        assert_eq!(SessionKey::from_bytes(key.to_bytes()), key);
        assert_eq!(key.to_bytes()[0], 1);
    }

    #[test]
    fn ended_bits_round_trip() {
        for e in [Ended::Sending, Ended::Clean, Ended::Network, Ended::Peer] {
            assert_eq!(Ended::from_bits(e.bits()), e);
        }
    }
}
