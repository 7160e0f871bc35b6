//! Where each TLS record sits: the map from positions in the connection's ciphertext stream to
//! the plaintext a client can use once those ciphertext bytes have arrived.
//!
//! A client's TLS stack releases a record's plaintext only when the whole record has arrived
//! and its tag has been checked (AEAD authenticates whole records), so plaintext is delivered
//! record by record: the plaintext end of the last data record whose last ciphertext byte the
//! client's TCP acknowledged. Control records (handshake messages, session tickets, a TLS 1.3
//! KeyUpdate, alerts) move the ciphertext position and deliver no plaintext. Pure arithmetic;
//! the TLS layer in `tls::conn` feeds it what rustls emitted.

use std::collections::VecDeque;

/// Length of a TLS record header (content type, version, length).
pub const HEADER_LEN: usize = 5;
/// The most plaintext one record carries (RFC 8446 §5.1, RFC 5246 §6.2.1), which rustls uses
/// unless `max_fragment_size` says otherwise (roam never sets it).
pub const MAX_FRAGMENT: usize = 16 * 1024;

/// The ciphertext-to-plaintext map of one connection's outgoing stream.
#[derive(Debug, Default)]
pub struct RecordMap {
    /// Ciphertext bytes produced so far (records whole; some may still wait in our buffer).
    produced: u64,
    /// Plaintext bytes encrypted so far.
    plain: u64,
    /// Data records not yet known to be acknowledged: (ciphertext end, plaintext end), both
    /// increasing. Bounded by what is in flight: the send buffer over the record size.
    pending: VecDeque<(u64, u64)>,
    /// Plaintext end of the last data record known to be acknowledged.
    delivered: u64,
}

/// The records of one piece of ciphertext did not parse as whole records carrying the
/// plaintext they were said to carry. A bug in the caller or the TLS library: the caller stops
/// the connection rather than risk counting bytes the client never had.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("TLS records do not match the plaintext written ({0})")]
pub struct Mismatch(&'static str);

impl RecordMap {
    pub fn new() -> RecordMap {
        RecordMap::default()
    }

    /// Ciphertext bytes produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Plaintext bytes encrypted so far.
    pub fn plaintext(&self) -> u64 {
        self.plain
    }

    /// Records `len` bytes of control records (no plaintext).
    pub fn control(&mut self, len: usize) {
        self.produced += len as u64;
    }

    /// Records `out`, every byte the TLS library emitted for one write of `plain` plaintext
    /// bytes: whole records, the data records last (each write is cut into records of
    /// [`MAX_FRAGMENT`] from its start, so there are `ceil(plain / MAX_FRAGMENT)` of them), any
    /// control record the library had queued (a KeyUpdate) in front of them.
    pub fn wrote(&mut self, out: &[u8], plain: usize) -> Result<(), Mismatch> {
        let lens = record_lengths(out)?;
        let data = plain.div_ceil(MAX_FRAGMENT);
        if data > lens.len() {
            return Err(Mismatch("fewer records than the plaintext needs"));
        }
        let first_data = lens.len() - data;
        let mut left = plain;
        for (i, len) in lens.into_iter().enumerate() {
            self.produced += len as u64;
            if i >= first_data {
                let carried = left.min(MAX_FRAGMENT);
                if len <= carried + HEADER_LEN {
                    return Err(Mismatch("a data record shorter than its plaintext"));
                }
                left -= carried;
                self.plain += carried as u64;
                self.pending.push_back((self.produced, self.plain));
            }
        }
        Ok(())
    }

    /// Plaintext delivered once the peer has acknowledged `acked` bytes of the ciphertext
    /// stream: everything up to the last data record wholly inside it. Never decreases.
    pub fn delivered(&mut self, acked: u64) -> u64 {
        while let Some(&(cipher_end, plain_end)) = self.pending.front() {
            if cipher_end > acked {
                break;
            }
            self.delivered = plain_end;
            self.pending.pop_front();
        }
        self.delivered
    }
}

/// The lengths (header included) of the whole records `buf` holds.
fn record_lengths(mut buf: &[u8]) -> Result<Vec<usize>, Mismatch> {
    let mut lens = Vec::with_capacity(buf.len() / (MAX_FRAGMENT + HEADER_LEN) + 2);
    while !buf.is_empty() {
        if buf.len() < HEADER_LEN {
            return Err(Mismatch("a partial record header"));
        }
        let len = HEADER_LEN + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
        if len > buf.len() {
            return Err(Mismatch("a partial record"));
        }
        lens.push(len);
        buf = &buf[len..];
    }
    Ok(lens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: usize) -> Vec<u8> {
        let mut r = vec![23u8, 3, 3];
        r.extend_from_slice(&(payload as u16).to_be_bytes());
        r.resize(HEADER_LEN + payload, 0xab);
        r
    }

    #[test]
    fn one_record_per_fragment_and_control_in_front() {
        let mut m = RecordMap::new();
        m.control(700);
        // 20,000 bytes: one full record and one of 3,616, each with 17 bytes of overhead after
        // the header, behind a 22-byte KeyUpdate.
        let mut out = record(22);
        out.extend(record(MAX_FRAGMENT + 17));
        out.extend(record(20_000 - MAX_FRAGMENT + 17));
        m.wrote(&out, 20_000).unwrap();
        let first_end = 700 + 27 + (HEADER_LEN + MAX_FRAGMENT + 17) as u64;
        assert_eq!(m.produced(), 700 + out.len() as u64);
        assert_eq!(m.delivered(700), 0);
        assert_eq!(
            m.delivered(first_end - 1),
            0,
            "a record short of one byte is unusable"
        );
        assert_eq!(m.delivered(first_end), MAX_FRAGMENT as u64);
        assert_eq!(m.delivered(m.produced() - 1), MAX_FRAGMENT as u64);
        assert_eq!(m.delivered(m.produced()), 20_000);
        assert_eq!(m.delivered(0), 20_000, "never decreases");
    }

    #[test]
    fn bad_output_is_refused() {
        let mut m = RecordMap::new();
        assert!(m.wrote(&record(100)[..50], 10).is_err());
        assert!(m.wrote(&record(100), MAX_FRAGMENT + 1).is_err());
        assert!(
            m.wrote(&record(10), 10).is_err(),
            "no room for the plaintext"
        );
        assert!(m.wrote(&[23, 3], 1).is_err());
    }
}
