//! Delivery accounting: turns the kernel's acknowledgement counter for a connection into the
//! number of body bytes each response has had confirmed, and records that on each body's
//! session claim. The arithmetic ([`Ledger`], [`BodySpan`]) is pure; [`Deliveries`] applies it
//! to the bodies a connection has in flight. The counter itself is read by `sys`.
//!
//! A connection carries several responses (keep-alive, pipelining), each a head and a body. We
//! count every byte we write on the connection, remember where each body starts in that stream,
//! and clamp the peer's cumulative acknowledgement to each body. Written is not delivered: the
//! send queue, packets in flight and the peer's receive window sit between, and a client that
//! vanished mid-download would otherwise be resumed past a gap.

use crate::ops::access_log::{AccessLog, AccessRecord, BodyEnd};
use crate::session::{Claim, Delivered, Ended, Epoch, SessionKey};
use crate::sys::AckCounter;
use std::collections::VecDeque;

/// Where one response body sits in the connection's outgoing byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodySpan {
    /// Bytes written on the connection before this body's first byte (earlier responses and this
    /// response's head).
    pub stream_start: u64,
    /// Body bytes handed to the kernel so far; never more than the response's `Content-Length`.
    pub written: u64,
}

impl BodySpan {
    /// Body bytes confirmed, given how many bytes of the connection's stream the peer has
    /// acknowledged.
    pub fn confirmed(&self, delivered: u64) -> u64 {
        delivered
            .saturating_sub(self.stream_start)
            .min(self.written)
    }
}

/// Counts what a connection wrote and converts the kernel's counter into stream bytes
/// delivered.
#[derive(Clone, Copy, Debug)]
pub struct Ledger {
    /// Bytes written on the connection since accept; the total the kernel will eventually
    /// acknowledge (not counting our FIN).
    written: u64,
    /// The `tcpi_bytes_acked` value read right after accept, before we wrote anything, so that
    /// handshake accounting never counts as data.
    baseline: u64,
}

impl Ledger {
    /// A ledger for a fresh connection whose counter read `at_accept` before any write.
    pub fn new(at_accept: AckCounter) -> Self {
        let baseline = match at_accept {
            AckCounter::BytesAcked(n) => n,
            AckCounter::Outstanding(_) | AckCounter::Unknown => 0,
        };
        Ledger {
            written: 0,
            baseline,
        }
    }

    /// Records `n` more bytes handed to the kernel.
    pub fn wrote(&mut self, n: u64) {
        self.written += n;
    }

    /// Bytes written on the connection so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes of our stream the peer has acknowledged according to `counter`, never more than
    /// we wrote (the acknowledgement of our FIN counts one more byte in `tcpi_bytes_acked`).
    /// With no counter we can only assume what was written was delivered.
    pub fn delivered(&self, counter: AckCounter) -> u64 {
        match counter {
            AckCounter::BytesAcked(acked) => acked.saturating_sub(self.baseline).min(self.written),
            AckCounter::Outstanding(queued) => self.written.saturating_sub(queued),
            AckCounter::Unknown => self.written,
        }
    }
}

/// The handle a body being written owns: which tracked body the bytes it writes belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyId(u64);

/// A body whose delivery is not yet fully confirmed, the claim its progress goes to (for a
/// body that advances a session), and its access log line.
#[derive(Debug)]
struct Tracked {
    id: BodyId,
    claim: Option<Claim>,
    span: BodySpan,
    /// The response's full body length: the body is done when this much is confirmed.
    len: u64,
    /// Body bytes confirmed at the last settle.
    confirmed: u64,
    log: Option<Box<AccessRecord>>,
}

/// Bodies wholly acknowledged that a later reset by the peer would take back: at most this many,
/// the newest (a client's unread bytes are the last ones it was sent).
const DELIVERED_KEPT: usize = 64;

/// Everything a connection wrote, and its bodies until each is confirmed.
#[derive(Debug)]
pub struct Deliveries {
    ledger: Ledger,
    bodies: Vec<Tracked>,
    /// Bodies in `bodies` with a claim.
    claimed: usize,
    next_id: u64,
    /// The newest bodies wholly acknowledged on this connection: if the peer resets it, their
    /// bytes may have died unread in its socket buffer.
    delivered: VecDeque<Delivered>,
    /// Body bytes written, and body bytes confirmed, since [`Deliveries::take_counts`].
    unreported: (u64, u64),
}

impl Deliveries {
    pub fn new(at_accept: AckCounter) -> Self {
        Deliveries {
            ledger: Ledger::new(at_accept),
            bodies: Vec::new(),
            claimed: 0,
            next_id: 0,
            delivered: VecDeque::new(),
            unreported: (0, 0),
        }
    }

    /// Bytes written on the connection so far.
    pub fn written(&self) -> u64 {
        self.ledger.written()
    }

    /// Registers a body of `len` bytes whose first byte will be at `stream_start` in the
    /// connection's stream, with the claim its progress advances (if any) and its access log
    /// record (if the log is on); returns the handle its writes carry.
    pub fn track(
        &mut self,
        claim: Option<Claim>,
        len: u64,
        stream_start: u64,
        log: Option<Box<AccessRecord>>,
    ) -> BodyId {
        let id = BodyId(self.next_id);
        self.next_id += 1;
        self.claimed += usize::from(claim.is_some());
        self.bodies.push(Tracked {
            id,
            claim,
            span: BodySpan {
                stream_start,
                written: 0,
            },
            len,
            confirmed: 0,
            log,
        });
        id
    }

    /// Records `n` more bytes handed to the kernel, of which those past its start belong to
    /// `body` (a head and a body may share one write).
    pub fn wrote(&mut self, n: u64, body: Option<BodyId>) {
        self.ledger.wrote(n);
        if let Some(id) = body {
            let written = self.ledger.written();
            if let Some(t) = self.bodies.iter_mut().find(|t| t.id == id) {
                let before = t.span.written;
                t.span.written = written.saturating_sub(t.span.stream_start).min(t.len);
                self.unreported.0 += t.span.written - before;
                if t.span.written == t.len {
                    if let Some(log) = &mut t.log {
                        log.written_whole();
                    }
                }
            }
        }
    }

    /// True when a body that advances a session is not yet fully confirmed.
    pub fn pending(&self) -> bool {
        self.claimed > 0
    }

    /// True when any body is not yet fully confirmed (its acknowledged bytes are still being
    /// counted).
    pub fn unsettled(&self) -> bool {
        !self.bodies.is_empty()
    }

    /// Frees the list of bodies once all are confirmed (a connection going idle keeps no
    /// buffer: 512 bytes for the first four bodies). A busy connection rarely gets here with
    /// none pending, since small bodies are confirmed in batches.
    pub fn release_buffers(&mut self) {
        if self.bodies.is_empty() && self.bodies.capacity() > 0 {
            self.bodies = Vec::new();
        }
    }

    /// How many bodies are not yet fully confirmed.
    pub fn pending_count(&self) -> usize {
        self.bodies.len()
    }

    /// Body bytes written and confirmed since the last call (for the metrics, which are fed
    /// at settle points rather than per write).
    pub fn take_counts(&mut self) -> (u64, u64) {
        std::mem::take(&mut self.unreported)
    }

    /// The epoch and end (file offset) of the last body this connection sent for `key` that is
    /// not yet wholly confirmed.
    pub fn written_end(&self, key: SessionKey) -> Option<(Epoch, u64)> {
        self.bodies
            .iter()
            .rev()
            .filter_map(|t| Some((t.claim.as_ref()?, t.len)))
            .find(|(c, _)| c.key() == key)
            .map(|(c, len)| (c.epoch(), c.start() + len))
    }

    /// True when a pending body belongs to client `nonce`.
    pub fn pending_for(&self, nonce: u64) -> bool {
        self.bodies
            .iter()
            .any(|t| t.claim.as_ref().is_some_and(|c| c.key().client == nonce))
    }

    /// Bytes of the stream the peer has acknowledged according to `counter`.
    pub fn delivered(&self, counter: AckCounter) -> u64 {
        self.ledger.delivered(counter)
    }

    /// Records every pending body's confirmed offset given the kernel's `counter`, and
    /// finishes (cleanly) the bodies that are wholly confirmed, handing their lines to `log`.
    pub fn settle(&mut self, counter: AckCounter, log: &AccessLog) {
        let delivered = self.ledger.delivered(counter);
        let mut i = 0;
        while i < self.bodies.len() {
            let t = &mut self.bodies[i];
            let confirmed = t.span.confirmed(delivered).max(t.confirmed);
            self.unreported.1 += confirmed - t.confirmed;
            t.confirmed = confirmed;
            if let Some(claim) = &t.claim {
                claim.record(claim.start() + confirmed);
            }
            if confirmed >= t.len {
                let t = self.bodies.remove(i);
                if let Some(mut line) = t.log {
                    line.end(BodyEnd::Complete, t.span.written, confirmed);
                    log.write(line);
                }
                if let Some(claim) = t.claim {
                    self.claimed -= 1;
                    if self.delivered.len() == DELIVERED_KEPT {
                        self.delivered.pop_front();
                    } else if self.delivered.capacity() == 0 {
                        // Most connections carry one download at a time: room for one first
                        // (32 bytes kept while idle, not 128).
                        self.delivered.reserve_exact(1);
                    }
                    self.delivered.push_back(claim.delivered());
                }
            } else {
                i += 1;
            }
        }
    }

    /// Finishes every body still pending, recording how its sender ended (`ended` for the
    /// session, `how` for the access log); if the peer reset the connection, the bodies it
    /// acknowledged whole are no longer cleanly finished either.
    pub fn finish_all(&mut self, ended: Ended, peer_reset: bool, how: BodyEnd, log: &AccessLog) {
        self.claimed = 0;
        for t in self.bodies.drain(..) {
            if let Some(mut line) = t.log {
                line.end(how, t.span.written, t.confirmed);
                log.write(line);
            }
            if let Some(claim) = t.claim {
                claim.finish(ended);
            }
        }
        let delivered = std::mem::take(&mut self.delivered);
        if peer_reset {
            for d in delivered {
                d.peer_reset();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn second_response_on_keep_alive_connection_excludes_first_and_heads() {
        let mut ledger = Ledger::new(AckCounter::BytesAcked(0));
        // First response: 100-byte head, 1000-byte body.
        ledger.wrote(100);
        let first = BodySpan {
            stream_start: ledger.written(),
            written: 1000,
        };
        ledger.wrote(1000);
        // Second response: 120-byte head, 5000-byte body of which 3000 written.
        ledger.wrote(120);
        let second = BodySpan {
            stream_start: ledger.written(),
            written: 3000,
        };
        ledger.wrote(3000);
        let delivered = ledger.delivered(AckCounter::BytesAcked(1100 + 120 + 700));
        assert_eq!(first.confirmed(delivered), 1000);
        assert_eq!(second.confirmed(delivered), 700);
        // Acknowledged only into the second head: nothing of the second body.
        let delivered = ledger.delivered(AckCounter::BytesAcked(1150));
        assert_eq!(second.confirmed(delivered), 0);
        assert_eq!(first.confirmed(delivered), 1000);
    }

    #[test]
    fn fin_acknowledgement_never_counts_as_data() {
        let mut ledger = Ledger::new(AckCounter::BytesAcked(0));
        ledger.wrote(10);
        // Everything plus our FIN acknowledged: one more than we wrote.
        assert_eq!(ledger.delivered(AckCounter::BytesAcked(11)), 10);
    }

    #[test]
    fn baseline_at_accept_is_subtracted() {
        let mut ledger = Ledger::new(AckCounter::BytesAcked(1));
        ledger.wrote(50);
        assert_eq!(ledger.delivered(AckCounter::BytesAcked(1)), 0);
        assert_eq!(ledger.delivered(AckCounter::BytesAcked(31)), 30);
    }

    #[test]
    fn short_tcp_info_falls_back_to_send_queue() {
        let mut ledger = Ledger::new(AckCounter::Outstanding(0));
        ledger.wrote(4096);
        assert_eq!(ledger.delivered(AckCounter::Outstanding(1000)), 3096);
        assert_eq!(ledger.delivered(AckCounter::Outstanding(9999)), 0);
    }

    #[test]
    fn no_counter_means_written_counts() {
        let mut ledger = Ledger::new(AckCounter::Unknown);
        ledger.wrote(77);
        assert_eq!(ledger.delivered(AckCounter::Unknown), 77);
    }

    proptest! {
        #[test]
        fn confirmed_is_bounded_and_monotonic(start in 0u64..1 << 40, written in 0u64..1 << 40,
                                              a in 0u64..1 << 41, b in 0u64..1 << 41) {
            let span = BodySpan { stream_start: start, written };
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(span.confirmed(hi) <= written);
            prop_assert!(span.confirmed(lo) <= span.confirmed(hi));
        }
    }
}
