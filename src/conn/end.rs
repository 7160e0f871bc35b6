//! Why a connection stopped sending, as one typed value: it decides how the connection closes
//! (in order, with an abort, or at once) and what a session's record says about how its sender
//! ended.

use crate::ops::access_log::BodyEnd;
use crate::session::Ended;
use std::io;

/// Why a connection (and any body it was sending) ended.
#[derive(Debug)]
pub enum Ending {
    /// Orderly: the answer was sent with `Connection: close`, the client closed an idle
    /// connection, or an idle or header timeout passed.
    Done,
    /// The server is shutting down.
    Shutdown,
    /// Another request took one of this connection's sessions over.
    TakenOver,
    /// The file being sent shrank, was rewritten in place, or could not be read: sending more
    /// would splice two versions.
    FileChanged(&'static str),
    /// The peer closed its side (a FIN) while a body was still being sent, or reset the
    /// connection after that FIN (Linux reports `EPIPE` for a reset that follows the peer's
    /// FIN). A socket closed with unread bytes sends a reset, not a FIN, so the client's kernel
    /// had handed over everything it acknowledged; but the client itself went away mid-body (a
    /// process killed while its buffer happened to be empty sends a FIN too), and the next
    /// request without `Range` may come from a fresh download that would keep only a tail. So
    /// it counts as the peer's end, like a reset: the next such request gets the whole file.
    PeerClosed,
    /// The peer reset the connection without closing it first (`ECONNRESET`, `ECONNABORTED`):
    /// the client's process died or closed with bytes unread, and what it kept is unknown.
    PeerReset(io::Error),
    /// The socket made no progress for `--write-stall-timeout`.
    Stalled,
    /// The kernel gave up on the path (`ETIMEDOUT` from `TCP_USER_TIMEOUT` or keepalive,
    /// unreachable) or another socket error.
    NetworkFailed(io::Error),
}

/// How a connection closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// FIN after the last byte; wait (bounded) for the acknowledgements so recorded offsets are
    /// exact, and drain what the peer sends.
    Orderly,
    /// Stop sending at once; wait briefly until nothing is in flight, then reset, so that not
    /// one more byte reaches the peer after the offset recorded.
    Abort,
    /// The peer is gone: reset without waiting.
    Reset,
}

impl Ending {
    /// A socket error seen while reading or writing.
    pub fn from_io(e: io::Error) -> Ending {
        use io::ErrorKind::*;
        match e.kind() {
            ConnectionReset | ConnectionAborted => Ending::PeerReset(e),
            BrokenPipe => Ending::PeerClosed,
            _ => Ending::NetworkFailed(e),
        }
    }

    pub fn close(&self) -> Close {
        match self {
            Ending::Done | Ending::Shutdown | Ending::PeerClosed => Close::Orderly,
            Ending::TakenOver | Ending::FileChanged(_) => Close::Abort,
            Ending::PeerReset(_) | Ending::Stalled | Ending::NetworkFailed(_) => Close::Reset,
        }
    }

    /// What the record of a session whose body this connection had not finished says about how
    /// its sender ended: the network (the client holds everything its TCP acknowledged: it is
    /// alive, or it closed after reading), or the peer (it reset the connection, so bytes may
    /// have died unread in its socket buffer).
    pub fn session_end(&self) -> Ended {
        match self {
            Ending::PeerReset(_) | Ending::PeerClosed => Ended::Peer,
            Ending::Done
            | Ending::Shutdown
            | Ending::TakenOver
            | Ending::FileChanged(_)
            | Ending::Stalled
            | Ending::NetworkFailed(_) => Ended::Network,
        }
    }

    /// How a body this connection had not finished (every byte written and acknowledged)
    /// ended, for the access log. An orderly end with bytes unacknowledged means the client
    /// stopped acknowledging before the connection closed.
    pub fn body_end(&self) -> BodyEnd {
        match self {
            Ending::Done | Ending::PeerClosed | Ending::PeerReset(_) => BodyEnd::ClientGone,
            Ending::Shutdown => BodyEnd::Shutdown,
            Ending::TakenOver => BodyEnd::TakenOver,
            Ending::FileChanged(_) => BodyEnd::FileChanged,
            Ending::Stalled => BodyEnd::Stalled,
            Ending::NetworkFailed(_) => BodyEnd::NetworkFailed,
        }
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match self {
            Ending::Done => "done".into(),
            Ending::Shutdown => "shutdown".into(),
            Ending::TakenOver => "taken over".into(),
            Ending::FileChanged(why) => (*why).into(),
            Ending::PeerClosed => "peer closed mid-body".into(),
            Ending::PeerReset(e) => format!("peer reset: {e}"),
            Ending::Stalled => "write stalled".into(),
            Ending::NetworkFailed(e) => format!("network failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_are_the_peer_and_timeouts_the_network() {
        let reset = Ending::from_io(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(reset.session_end(), Ended::Peer);
        assert_eq!(reset.close(), Close::Reset);
        // A reset after the peer's FIN: the client left mid-body, as with a reset.
        let pipe = Ending::from_io(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(pipe.session_end(), Ended::Peer);
        assert_eq!(Ending::PeerClosed.session_end(), Ended::Peer);
        let timeout = Ending::from_io(io::Error::from(io::ErrorKind::TimedOut));
        assert_eq!(timeout.session_end(), Ended::Network);
        assert_eq!(Ending::TakenOver.close(), Close::Abort);
        assert_eq!(Ending::Shutdown.close(), Close::Orderly);
        assert_eq!(Ending::Stalled.session_end(), Ended::Network);
    }
}
