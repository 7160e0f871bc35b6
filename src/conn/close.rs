//! Closing a connection so that every recorded offset is exact: an orderly close waits (bounded)
//! for the peer's acknowledgements, an abort waits briefly until nothing is in flight and then
//! resets, and in every case progress is settled one last time before the socket is dropped,
//! and sessions are released only after that.

use super::end::{Close, Ending};
use super::{Connection, SETTLE_TICK};
use crate::sys;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;
use tokio::time::Instant;

/// Shortest and longest wait for in-flight acknowledgements before an abort: at least one
/// delayed-ACK interval (Linux delays ACKs by up to 40 ms), at most half a second; in between,
/// two smoothed round trips of the connection (a cellular path takes 50 to 200 ms).
const FINAL_ACK_WAIT_MIN: Duration = Duration::from_millis(50);
const FINAL_ACK_WAIT_MAX: Duration = Duration::from_millis(500);
/// After our last response, how long we keep reading (and discarding) so that unread request
/// bytes do not turn our close into a reset that destroys the response in flight.
const LINGER_READ: Duration = Duration::from_secs(2);

/// How an orderly close ended.
#[derive(Debug, PartialEq, Eq)]
enum Lingered {
    Done,
    /// A takeover arrived while we waited: close with a reset instead.
    TakenOver,
    /// The peer reset the connection while we waited.
    PeerReset,
}

impl Connection {
    /// Ends the connection: records final progress, closes the socket, and only then releases
    /// the sessions it owned, so a successor never starts while this socket can still send.
    /// What the sessions record about how their sender ended comes from `end` and, before our
    /// own reset, from what the peer did to the socket: a reset or close that arrived while a
    /// takeover was deciding is still the peer's doing.
    pub(super) async fn close(mut self, end: Ending) {
        let mut end = end;
        match end.close() {
            Close::Orderly => match self.linger().await {
                Lingered::Done => {}
                Lingered::PeerReset => {
                    end = Ending::PeerReset(io::ErrorKind::ConnectionReset.into())
                }
                Lingered::TakenOver => {
                    // A successor is waiting: bytes still queued must not reach the peer after
                    // the offset we record.
                    self.await_final_acks().await;
                    end = self.unless_peer_left(Ending::TakenOver);
                    self.reset_on_close();
                }
            },
            Close::Abort => {
                self.await_final_acks().await;
                end = self.unless_peer_left(end);
                self.reset_on_close();
                tracing::debug!(peer = %self.peer, why = %end.describe(), "connection aborted");
            }
            Close::Reset => {
                self.reset_on_close();
                tracing::debug!(peer = %self.peer, why = %end.describe(), "peer gone");
            }
        }
        self.settle();
        let ended = end.session_end();
        let peer_reset = matches!(end, Ending::PeerReset(_));
        let Connection {
            stream,
            mut deliveries,
            svc,
            ..
        } = self;
        drop(stream);
        deliveries.finish_all(ended, peer_reset, end.body_end(), &svc.ops().access_log);
        let (sent, acked) = deliveries.take_counts();
        svc.metrics().body_bytes(sent, acked);
    }

    /// `end`, unless the peer had already reset its side (its RST arrived while the connection
    /// was stopping for another reason): then the peer ended it. The pending socket error tells
    /// a reset that followed the peer's FIN (`EPIPE`: it closed after reading) from one that did
    /// not (`ECONNRESET`).
    ///
    /// On a Multipath TCP connection the TCP state is its first subflow's, which a lost path
    /// closes while the connection lives on; there the connection's pending error says it: a
    /// client's reset (MP_FASTCLOSE, or a reset of every subflow) leaves `ECONNRESET`.
    fn unless_peer_left(&self, end: Ending) -> Ending {
        #[cfg(target_os = "linux")]
        if self.transport == sys::Transport::Mptcp && sys::mptcp_active(self.fd()) {
            return match self.stream.take_error() {
                Ok(Some(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    Ending::from_io(e)
                }
                _ => end,
            };
        }
        #[cfg(target_os = "linux")]
        if sys::peer_ended(self.fd()) == Some(sys::PeerEnd::Reset) {
            return match self.stream.take_error() {
                Ok(Some(e)) => Ending::from_io(e),
                _ => Ending::PeerReset(io::ErrorKind::ConnectionReset.into()),
            };
        }
        end
    }

    /// `SO_LINGER` 0: the close sends an RST and discards the send queue, so not one more byte
    /// reaches the peer after the offset recorded.
    fn reset_on_close(&self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
    }

    /// Before aborting, waits (briefly) until nothing is in flight: a receiver delays its ACK
    /// by up to 40 ms, and a segment it already holds but has not acknowledged would be
    /// recorded as undelivered and sent again by the successor. The kernel may still send
    /// queued bytes while we wait (we write nothing), so the condition is "no segment in
    /// flight", not "everything acknowledged": the reset then discards only bytes that never
    /// left. A dead path never acknowledges; then the deadline passes and only acknowledged
    /// bytes count, which is right.
    async fn await_final_acks(&mut self) {
        if !self.deliveries.pending() {
            return;
        }
        let wait = sys_rtt(self.fd())
            .map_or(FINAL_ACK_WAIT_MIN, |rtt| rtt * 2)
            .clamp(FINAL_ACK_WAIT_MIN, FINAL_ACK_WAIT_MAX);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !self.nothing_in_flight() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// True when every segment sent has been acknowledged (or we cannot tell).
    fn nothing_in_flight(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            sys::nothing_in_flight(self.fd(), self.transport).unwrap_or(true)
        }
        #[cfg(not(target_os = "linux"))]
        {
            self.all_delivered()
        }
    }

    /// True when the socket was reset, whether or not its error was already taken (a write
    /// that failed with `EPIPE` took it): nothing more will be acknowledged. Without this, a
    /// client that reset mid-body held its connection for the whole write-stall timeout.
    fn reset_seen(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            sys::peer_ended(self.fd()) == Some(sys::PeerEnd::Reset)
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    /// True when the peer has acknowledged every byte we wrote (or we cannot tell).
    fn all_delivered(&mut self) -> bool {
        match self.ack_counter() {
            Ok(counter) => self.deliveries.delivered(counter) >= self.deliveries.written(),
            Err(_) => true,
        }
    }

    /// Orderly close: send our FIN after the last byte, wait (bounded by the write-stall timeout)
    /// until the peer has acknowledged the tracked bodies so their offsets are exact, and drain
    /// what the peer sends so that unread request bytes do not make the kernel reset the
    /// connection (destroying the end of our response) when we close.
    async fn linger(&mut self) -> Lingered {
        self.tls_close_notify();
        let _ = socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Write);
        let started = Instant::now();
        let ack_deadline = started + self.svc.config().write_stall_timeout;
        let read_deadline = started + LINGER_READ;
        let mut peer_done = false;
        // Shutdown also fires the connection's token; only a takeover turns the close into a
        // reset.
        let mut shutting_down = self.handle.shutdown.is_cancelled();
        let mut scratch = [0u8; 1024];
        loop {
            self.settle();
            let now = Instant::now();
            // A reset peer will acknowledge nothing more (behind a proxy, a FIN then an RST is
            // normal), so stop waiting as soon as the socket reports an error. `EPIPE` is a reset
            // after the peer's FIN: it had read what it acknowledged.
            match self.stream.take_error() {
                Ok(Some(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Lingered::Done,
                Ok(Some(_)) => return Lingered::PeerReset,
                _ => {}
            }
            let awaiting_acks = self.deliveries.pending()
                && now < ack_deadline
                && !self.all_delivered()
                && !self.reset_seen();
            if !awaiting_acks && (peer_done || now >= read_deadline) {
                return Lingered::Done;
            }
            let wake = if awaiting_acks {
                now + SETTLE_TICK
            } else {
                read_deadline
            };
            tokio::select! {
                biased;
                _ = self.handle.abort.cancelled(), if !shutting_down => {
                    if self.handle.shutdown.is_cancelled() {
                        shutting_down = true;
                    } else {
                        return Lingered::TakenOver;
                    }
                }
                r = self.stream.readable(), if !peer_done => {
                    if r.is_err() {
                        return Lingered::PeerReset;
                    }
                    match self.stream.try_read(&mut scratch) {
                        Ok(0) => peer_done = true,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                            return Lingered::PeerReset
                        }
                        Err(_) => return Lingered::Done,
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// The connection's smoothed round-trip time, where the platform tells it.
fn sys_rtt(fd: RawFd) -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        sys::smoothed_rtt(fd).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        None
    }
}
